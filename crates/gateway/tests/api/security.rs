//! Connections you can trust: every refusal path with its exact code, while
//! 20 other clients on the same gateway keep receiving every change.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use ws_gateway::config::{Auth, Settings};

use crate::helpers::{Client, TestApp, eventually, fresh_database, http_get_json, spawn_app_with};

pub(crate) const SECRET: &str = "test-secret-that-is-at-least-32-bytes-long";

pub(crate) fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

pub(crate) fn token(sub: &str, rooms: &[&str], exp: u64) -> String {
    token_signed(sub, rooms, exp, SECRET)
}

pub(crate) fn token_signed(sub: &str, rooms: &[&str], exp: u64, secret: &str) -> String {
    let claims = json!({"sub": sub, "exp": exp, "rooms": rooms});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub(crate) fn jwt(settings: &mut Settings) {
    settings.auth = Auth::hs256(SECRET);
    settings.history.jwt_leeway = Duration::ZERO;
}

async fn jwt_app(configure: impl FnOnce(&mut Settings)) -> TestApp {
    spawn_app_with(fresh_database().await, |s| {
        jwt(s);
        configure(s);
    })
    .await
}

async fn connect_as(app: &TestApp, token: &str) -> Client {
    Client::connect(&format!("{}?token={token}", app.ws_url())).await
}

/// 20 clients in `project:1` reading everything, and a writer committing a
/// change there every few milliseconds, for as long as the test runs.
struct Bystanders {
    readers: Vec<JoinHandle<Vec<i64>>>,
    writer: JoinHandle<i64>,
    stop: Arc<AtomicBool>,
}

impl Bystanders {
    async fn start(app: &TestApp) -> Bystanders {
        let stop = Arc::new(AtomicBool::new(false));
        let mut readers = Vec::new();
        let mut clients = Vec::new();
        for _ in 0..20 {
            let mut c = connect_as(app, &token("bystander", &["project:1"], now_s() + 3600)).await;
            c.subscribe("project:1").await;
            clients.push(c);
        }
        let pool = app.db.pool.clone();
        let writer_stop = Arc::clone(&stop);
        let writer = tokio::spawn(async move {
            let mut id = 0;
            while !writer_stop.load(Ordering::Relaxed) {
                id += 1;
                sqlx::query("insert into items (id, project_id) values ($1, 1)")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            id
        });
        for mut c in clients {
            readers.push(tokio::spawn(async move {
                let mut ids = Vec::new();
                loop {
                    let message = c.next_json().await;
                    for change in match message["type"].as_str() {
                        Some("batch") => message["changes"].as_array().unwrap().clone(),
                        _ => vec![message],
                    } {
                        let id = change["row"]["id"].as_i64().unwrap();
                        ids.push(id);
                        if id < 0 {
                            return ids;
                        }
                    }
                }
            }));
        }
        Bystanders { readers, writer, stop }
    }

    /// Stops the writer, sends a last change (id -1), and checks every
    /// bystander got every change, in order.
    async fn check(self, app: &TestApp) {
        self.stop.store(true, Ordering::Relaxed);
        let last = self.writer.await.unwrap();
        sqlx::query("insert into items (id, project_id) values (-1, 1)")
            .execute(&app.db.pool)
            .await
            .unwrap();
        let mut expected: Vec<i64> = (1..=last).collect();
        expected.push(-1);
        for reader in self.readers {
            assert_eq!(reader.await.unwrap(), expected, "a bystander missed changes");
        }
    }
}

/// The HTTP status and body of a refused upgrade.
pub async fn refused_upgrade(url: &str, headers: &[(&'static str, &str)]) -> (u16, String) {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        request.headers_mut().insert(*k, v.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok(_) => panic!("upgrade accepted"),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let body = response
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Err(other) => panic!("unexpected error {other}"),
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_at_the_upgrade_with_401_and_a_reason() {
    let app = jwt_app(|_| {}).await;
    let by = Bystanders::start(&app).await;
    let url = app.ws_url();
    let cases = [
        (url.clone(), "missing token"),
        (format!("{url}?token=not.a.jwt"), "malformed"),
        (
            format!(
                "{url}?token={}",
                token_signed("u", &[], now_s() + 60, "another-secret-at-least-32-bytes-long!")
            ),
            "signature",
        ),
        (format!("{url}?token={}", token("u", &[], now_s() - 60)), "expired"),
    ];
    for (url, reason) in cases {
        let (status, body) = refused_upgrade(&url, &[]).await;
        assert_eq!(status, 401, "{reason}");
        assert!(body.contains(reason), "{reason}: {body}");
    }
    // The header form works, and is checked the same way.
    let good = token("u", &["project:1"], now_s() + 60);
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {good}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    let welcome = ws.next().await.unwrap().unwrap();
    assert!(welcome.to_text().unwrap().contains("welcome"));
    let (status, _) = refused_upgrade(&url, &[("authorization", "Bearer nope")]).await;
    assert_eq!(status, 401);
    by.check(&app).await;
    let (_, metrics) = crate::helpers::http_get(app.address, "/metrics").await;
    assert!(
        metrics.contains("ws_gateway_refusals_total{code=\"unauthorized\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn rooms_outside_the_token_are_forbidden() {
    let app = jwt_app(|_| {}).await;
    let by = Bystanders::start(&app).await;
    let mut c = connect_as(&app, &token("u1", &["project:*", "task:9"], now_s() + 600)).await;
    c.subscribe("project:42").await;
    c.subscribe("task:9").await;
    for room in ["task:10", "rfi:1", "projects"] {
        c.send_json(json!({"type": "subscribe", "room": room, "id": format!("s-{room}")}))
            .await;
        let error = c.next_json().await;
        assert_eq!(error["code"], "forbidden", "{room}: {error}");
        // The refusal names the request it refuses (protocol 2).
        assert_eq!(
            (&error["room"], &error["id"]),
            (&json!(room), &json!(format!("s-{room}")))
        );
    }
    by.check(&app).await;
}

#[tokio::test]
async fn an_expired_token_closes_with_4001_unless_refreshed_in_band() {
    let app = jwt_app(|_| {}).await;
    let by = Bystanders::start(&app).await;
    let mut expiring = connect_as(&app, &token("u1", &["project:*"], now_s() + 2)).await;
    expiring.subscribe("project:5").await;
    let mut refreshed = connect_as(&app, &token("u2", &["project:*", "task:*"], now_s() + 2)).await;
    refreshed.subscribe("project:5").await;
    refreshed.subscribe("task:5").await;
    // A fresh token that no longer grants task:*: the connection lives on,
    // and the task room is dropped.
    refreshed
        .send_json(json!({"type": "auth", "token": token("u2", &["project:*"], now_s() + 3600)}))
        .await;
    let dropped = refreshed.next_json().await;
    assert_eq!(dropped["type"], "unsubscribed", "{dropped}");
    assert_eq!(dropped["room"], "task:5");
    let ack = refreshed.next_json().await;
    assert_eq!(ack["type"], "authenticated", "{ack}");
    // A token for someone else, or a bad one, is refused and changes nothing.
    refreshed
        .send_json(json!({"type": "auth", "token": token("mallory", &["*"], now_s() + 3600)}))
        .await;
    assert_eq!(refreshed.next_json().await["code"], "invalid_token");
    refreshed.send_json(json!({"type": "auth", "token": "garbage"})).await;
    assert_eq!(refreshed.next_json().await["code"], "invalid_token");

    let closed = expiring.closed().await;
    assert_eq!(closed.code, Some(4001), "{closed:?}");
    assert!(closed.reason.contains("expired"));
    sqlx::query("insert into items (id, project_id) values (100000, 5)")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let got = refreshed.changes(1).await;
    assert_eq!(
        got[0]["row"]["id"], 100000,
        "the refreshed connection outlived the first exp"
    );
    by.check(&app).await;
}

#[tokio::test]
async fn the_database_can_authorize_rooms_and_answers_are_cached() {
    let app = jwt_app(|_| {}).await;
    sqlx::raw_sql(
        "create function realtime.authorize(sub text, room text) returns boolean language sql as $$
             select sub = 'inspector' and room like 'inspection:%'
         $$",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let by = Bystanders::start(&app).await;
    for _ in 0..3 {
        let mut c = connect_as(&app, &token("inspector", &[], now_s() + 600)).await;
        c.subscribe("inspection:7").await;
        c.send_json(json!({"type": "subscribe", "room": "rfi:7"})).await;
        assert_eq!(c.next_json().await["code"], "forbidden");
    }
    let mut other = connect_as(&app, &token("visitor", &[], now_s() + 600)).await;
    other
        .send_json(json!({"type": "subscribe", "room": "inspection:7"}))
        .await;
    assert_eq!(other.next_json().await["code"], "forbidden");
    let (_, health) = app.health().await;
    let cache = &health["cache"];
    assert!(cache["hits"].as_u64().unwrap() >= 4, "{cache}");
    assert!(cache["misses"].as_u64().unwrap() >= 3, "{cache}");
    assert!(cache["totalEntries"].as_u64().unwrap() >= 3, "{cache}");
    assert!(cache["hitRate"].as_f64().unwrap() > 0.0);
    by.check(&app).await;
}

#[tokio::test]
async fn origins_outside_the_allow_list_are_refused_with_403() {
    let app = jwt_app(|s| s.history.allowed_origins = vec!["https://app.constructtrack.com".into()]).await;
    let by = Bystanders::start(&app).await;
    let url = format!("{}?token={}", app.ws_url(), token("u", &["project:1"], now_s() + 60));
    let (status, body) = refused_upgrade(&url, &[("origin", "https://evil.example")]).await;
    assert_eq!(status, 403);
    assert!(body.contains("evil.example"), "{body}");
    let mut request = url.clone().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("origin", "https://app.constructtrack.com".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(request).await.is_ok());
    by.check(&app).await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_with_503() {
    let app = jwt_app(|s| s.limits.max_connections = 22).await;
    let by = Bystanders::start(&app).await;
    let url = format!("{}?token={}", app.ws_url(), token("u", &["project:1"], now_s() + 60));
    // 20 bystanders, the probe's connection may be the 21st: fill up to 22.
    let mut kept = Vec::new();
    loop {
        let (_, health) = app.health().await;
        if health["connections"].as_u64().unwrap() >= 22 {
            break;
        }
        let (ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
        kept.push(ws);
        eventually("the connection to count", || async {
            let (_, health) = app.health().await;
            (health["connections"].as_u64().unwrap() as usize >= 20 + kept.len()).then_some(())
        })
        .await;
    }
    let (status, body) = refused_upgrade(&url, &[]).await;
    assert_eq!(status, 503);
    assert!(body.contains("limit"), "{body}");
    by.check(&app).await;
}

#[tokio::test]
async fn subscriptions_beyond_the_limit_are_refused() {
    let app = jwt_app(|s| s.limits.max_subscriptions = 3).await;
    let by = Bystanders::start(&app).await;
    let mut c = connect_as(&app, &token("u", &["task:*"], now_s() + 60)).await;
    for i in 0..3 {
        c.subscribe(&format!("task:{i}")).await;
    }
    c.send_json(json!({"type": "subscribe", "room": "task:3"})).await;
    assert_eq!(c.next_json().await["code"], "too_many_subscriptions");
    by.check(&app).await;
}

#[tokio::test]
async fn a_flooding_client_is_rate_limited_then_closed_with_1008() {
    let app = jwt_app(|s| s.limits.rate_limit = 20).await;
    let by = Bystanders::start(&app).await;
    let mut c = connect_as(&app, &token("u", &["project:*"], now_s() + 60)).await;
    for _ in 0..200 {
        let _ = c.ws.send(Message::text(r#"{"type":"ack","position":"1"}"#)).await;
    }
    let first_error = c.next_json().await;
    assert_eq!(first_error["code"], "rate_limited", "{first_error}");
    assert_eq!(first_error["dropped"], "ack", "it says what it dropped: {first_error}");
    let closed = c.closed().await;
    assert_eq!(closed.code, Some(1008), "{closed:?}");
    assert!(closed.reason.contains("rate"), "{closed:?}");
    by.check(&app).await;
}

#[tokio::test]
async fn silent_and_idle_connections_are_closed_and_counted() {
    let app = jwt_app(|s| {
        s.heartbeat.interval = Duration::from_millis(200);
        s.heartbeat.min = Duration::from_millis(100);
        s.heartbeat.max = Duration::from_millis(400);
        s.heartbeat.connection_timeout = Duration::from_millis(1500);
        s.heartbeat.max_idle = Duration::from_millis(1200);
    })
    .await;
    let by = Bystanders::start(&app).await;
    // Subscribes, then never reads, so never answers a ping.
    let mut silent = Client::connect(&format!(
        "{}?token={}",
        app.ws_url(),
        token("s", &["project:*"], now_s() + 60)
    ))
    .await;
    silent
        .send_json(json!({"type": "subscribe", "room": "project:9"}))
        .await;
    // Reads (answers pings) but subscribes to nothing and says nothing.
    let mut idle = connect_as(&app, &token("i", &["project:*"], now_s() + 60)).await;
    let closed = idle.closed().await;
    assert_eq!(closed.code, Some(1000), "{closed:?}");
    assert!(closed.reason.contains("idle"), "{closed:?}");
    // Reading would answer the pings: wait until the gateway has given up.
    eventually("the silent connection to time out", || async {
        let (_, metrics) = crate::helpers::http_get(app.address, "/metrics").await;
        metrics
            .contains("ws_gateway_closes_total{reason=\"heartbeat_timeout\"} 1")
            .then_some(())
    })
    .await;
    // A silent client is usually gone: reading now answers the queued pings
    // on a socket the gateway has closed, which may reset it before the
    // close frame (1008, "heartbeat timeout") is read. Either way it is shut.
    let closed = silent.closed().await;
    assert!(
        closed.code.is_none() || (closed.code == Some(1008) && closed.reason.contains("heartbeat")),
        "{closed:?}"
    );
    // The bystanders answer pings and are subscribed: still here.
    by.check(&app).await;
    let (_, metrics) = crate::helpers::http_get(app.address, "/metrics").await;
    assert!(
        metrics.contains("ws_gateway_closes_total{reason=\"idle\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("ws_gateway_closes_total{reason=\"heartbeat_timeout\"}"),
        "{metrics}"
    );
}

/// 1,000 connections opened and closed in a loop: the connection and task
/// counts return to zero.
#[tokio::test]
async fn a_thousand_connections_in_a_loop_leak_nothing() {
    let app = jwt_app(|s| s.history.probe_interval = None).await;
    let url = format!("{}?token={}", app.ws_url(), token("u", &["project:*"], now_s() + 600));
    for round in 0..10 {
        let mut open = Vec::new();
        for _ in 0..100 {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
            ws.send(Message::text(
                json!({"type": "subscribe", "room": format!("project:{round}")}).to_string(),
            ))
            .await
            .unwrap();
            open.push(ws);
        }
        for mut ws in open {
            if round % 2 == 0 {
                let _ = ws.close(None).await;
            }
            drop(ws);
        }
    }
    eventually("every connection and room to be gone", || async {
        let (_, health) = http_get_json(app.address, "/healthz").await;
        (health["connections"] == 0 && health["rooms"] == 0).then_some(())
    })
    .await;
}
