//! No shared pool to starve (issue 14, fault 3): replays and authorization
//! draw from the clients' pool, a page or a question at a time within a
//! time limit; the feed and the probe have connections of their own.

use std::time::Duration;

use serde_json::json;

use crate::bystander::Bystander;
use crate::helpers::{Client, TestApp, eventually, fresh_database, http_get, metric, spawn_app_with};
use crate::security::{jwt, now_s, token};

/// Samples `/healthz` every 50 ms until `done`; the statuses that were not 200.
async fn health_while<F: Future>(app: &TestApp, done: F) -> (F::Output, Vec<u16>) {
    let mut done = std::pin::pin!(done);
    let mut bad = Vec::new();
    loop {
        tokio::select! {
            output = &mut done => return (output, bad),
            () = tokio::time::sleep(Duration::from_millis(50)) => {
                let (status, _) = http_get(app.address, "/healthz").await;
                if status != 200 {
                    bad.push(status);
                }
            }
        }
    }
}

/// The six resumers, as eight: each resumes from far back (27 MB of
/// 9 KB rows, read from the outbox) and never reads. Each holds no database
/// connection while its socket is full, so the feed still reads the
/// bystander's 9 KB rows back (too large for a NOTIFY) and `/healthz` stays
/// 200. Before the fix they held the whole pool for 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumers_that_never_read_hold_no_database_connection() {
    let db = fresh_database().await;
    // Committed before the gateway starts: its memory does not hold them.
    sqlx::query(
        "insert into items (id, project_id, body)
         select g, 904, repeat(md5(g::text), 288) from generate_series(1, 3000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let app = spawn_app_with(db, |_| {}).await;
    let bystander = Bystander::start(&app.ws_url(), &app.db.pool, 1, 9 * 1024).await;
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut c = Client::connect_with_small_buffer(&app.ws_url()).await;
        c.send_json(json!({"type": "subscribe", "room": "project:904", "since": "0"}))
            .await;
        stalled.push(c);
    }
    let (_, bad) = health_while(&app, async {
        eventually("every resumer to be stuck on a full socket", || async {
            // 8 stuck resumers have read some pages, and none holds a
            // connection of the clients' pool.
            let replayed = metric(app.address, "ws_gateway_replayed_changes_total{source=\"outbox\"}").await;
            let in_use = metric(
                app.address,
                "ws_gateway_db_pool_connections{pool=\"clients\",state=\"in_use\"}",
            )
            .await;
            (replayed >= 8.0 * 100.0 && in_use == 0.0).then_some(())
        })
        .await;
        // And it stays so while the bystander's rows keep coming.
        for _ in 0..20 {
            let in_use = metric(
                app.address,
                "ws_gateway_db_pool_connections{pool=\"clients\",state=\"in_use\"}",
            )
            .await;
            assert!(in_use <= 1.0, "stalled readers hold {in_use} connections");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(bad.is_empty(), "/healthz answered {bad:?} while readers stalled");
    let seen = bystander.check(&app.db.pool).await;
    println!("bystander beside 8 stalled resumers: {seen}");
    drop(stalled);
}

/// `realtime.authorize` taking 20 ms for most rooms and 30 s for `slow:`
/// ones: subscribes past the 2 s limit are answered
/// `authorization_unavailable`, the others succeed, and the bystander (its
/// room granted by its token) and `/healthz` do not notice. Before the fix
/// the slow checks held the feed's pool and its rows stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_authorizer_times_out_and_delays_no_one_else() {
    let db = fresh_database().await;
    sqlx::raw_sql(
        "create function realtime.authorize(sub text, room text) returns boolean
         language sql as $$
             select pg_sleep(case when room like 'slow:%' then 30 else 0.02 end) is not null
         $$",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    let app = spawn_app_with(db, jwt).await;
    let by_url = format!(
        "{}?token={}",
        app.ws_url(),
        token("bystander", &["project:1"], now_s() + 600)
    );
    let bystander = Bystander::start(&by_url, &app.db.pool, 1, 9 * 1024).await;
    let url = |sub: &str| format!("{}?token={}", app.ws_url(), token(sub, &[], now_s() + 600));

    let (results, bad) = health_while(&app, async {
        let slow = (0..4).map(|i| {
            let url = url(&format!("slow-{i}"));
            tokio::spawn(async move {
                let mut c = Client::connect(&url).await;
                c.send_json(json!({"type": "subscribe", "room": format!("slow:{i}")}))
                    .await;
                c.next_json().await
            })
        });
        let fast = (0..10).map(|i| {
            let url = url(&format!("fast-{i}"));
            tokio::spawn(async move {
                let mut c = Client::connect(&url).await;
                let mut replies = Vec::new();
                for room in 0..10 {
                    c.send_json(json!({"type": "subscribe", "room": format!("task:{i}{room}")}))
                        .await;
                    replies.push(c.next_json().await);
                }
                replies
            })
        });
        let fast: Vec<_> = fast.collect();
        let mut slow_replies = Vec::new();
        for task in slow.collect::<Vec<_>>() {
            slow_replies.push(task.await.unwrap());
        }
        let mut fast_replies = Vec::new();
        for task in fast {
            fast_replies.extend(task.await.unwrap());
        }
        (slow_replies, fast_replies)
    })
    .await;
    let (slow_replies, fast_replies) = results;
    for reply in &slow_replies {
        assert_eq!(reply["code"], "authorization_unavailable", "{reply}");
    }
    let subscribed = fast_replies.iter().filter(|r| r["type"] == "subscribed").count();
    let unavailable = fast_replies
        .iter()
        .filter(|r| r["code"] == "authorization_unavailable")
        .count();
    assert_eq!(subscribed + unavailable, 100, "{fast_replies:?}");
    assert!(subscribed > 0, "{fast_replies:?}");
    assert!(
        bad.is_empty(),
        "/healthz answered {bad:?} during the authorization storm"
    );
    assert!(metric(app.address, "ws_gateway_authorize_timeouts_total").await >= 4.0);
    let seen = bystander.check(&app.db.pool).await;
    println!("bystander beside a slow authorizer: {seen} ({subscribed} of 100 fast checks in time)");
}
