//! The Rust client (`ws-gateway-client`) against the real gateway binary
//! under the faults the JavaScript client's tests inject: two rooms, 1,500
//! commits from concurrent writers through SIGKILL + restart on the same
//! address, SIGTERM (1001) + restart, and a killed LISTEN connection; a
//! stalled reader closed as a slow consumer; 3 s tokens; a reset. Every
//! stream is compared with the outbox. Also: `GET /client.js`, and the
//! README's Rust example.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::json;
use ws_gateway_client::{Client, ClientEvent, Encoding, Position, Update};

use crate::fault_kit::{GatewayProcess, Received, Subscriber, Workload, committed_positions, free_port, room_of};
use crate::helpers::{eventually, fresh_database, http_get, http_get_json, spawn_app};

#[allow(dead_code)] // its `main` is for `cargo run --example follow`
#[path = "../../../client/examples/follow.rs"]
mod follow_example;

const SECRET: &str = "rust-client-tests-secret-0123456789abcdef";
const ROOMS: i64 = 2;

fn rooms() -> Vec<String> {
    (0..ROOMS).map(|r| room_of(r, ROOMS)).collect()
}

/// An HS256 token for `project:*` that lives `lifetime`.
fn token(lifetime: Duration) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let claims = json!({"sub": "rust-client", "rooms": ["project:*"], "iat": now, "exp": now + lifetime.as_secs()});
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn jwt_env() -> Vec<(&'static str, &'static str)> {
    vec![("GATEWAY_AUTH", "jwt"), ("GATEWAY_JWT_SECRET", SECRET)]
}

async fn outbox_head(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("select coalesce(max(position), 0) from realtime.changes")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A fault, and what the client did about it.
struct Fault {
    name: &'static str,
    at: Instant,
    /// The outbox's end when it took effect: later changes count for it.
    head: i64,
    gateway_live_at: Option<Instant>,
}

/// Waits until every room has resumed (`subscribed` with `resumed`) after
/// `fault`.
async fn wait_resumed(subscriber: &Subscriber, fault: &Fault) {
    eventually(&format!("the client to resume after {}", fault.name), || async {
        let r = subscriber.received.lock().unwrap();
        rooms()
            .iter()
            .all(|room| {
                r.subscribed
                    .iter()
                    .any(|(s, _, resumed, at)| s == room && *resumed && *at >= fault.at)
            })
            .then_some(())
    })
    .await
}

/// Per fault: expected / delivered / duplicates of the changes committed
/// from it to the next, and what the client measured.
fn report(r: &Received, want: &std::collections::HashMap<String, Vec<i64>>, faults: &[Fault]) -> Vec<String> {
    let mut lines = Vec::new();
    for (i, fault) in faults.iter().enumerate() {
        let upto = faults.get(i + 1).map(|f| f.head);
        let window = |p: &i64| *p > fault.head && upto.is_none_or(|u| *p <= u);
        let (mut expected, mut delivered, mut duplicates) = (0, 0, 0);
        for room in rooms() {
            let got: Vec<i64> = r
                .positions
                .get(&room)
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(window)
                .collect();
            expected += want[&room].iter().filter(|p| window(p)).count();
            delivered += got.len();
            let mut seen = std::collections::HashSet::new();
            duplicates += got.iter().filter(|p| !seen.insert(**p)).count();
        }
        let close = r.disconnects.iter().find(|(_, _, _, at)| *at >= fault.at);
        let live: Option<Instant> = rooms()
            .iter()
            .map(|room| {
                r.subscribed
                    .iter()
                    .find(|(s, _, resumed, at)| s == room && *resumed && *at >= fault.at)
                    .map(|s| s.3)
            })
            .collect::<Option<Vec<_>>>()
            .and_then(|ats| ats.into_iter().max());
        let first_new = rooms()
            .iter()
            .filter_map(|room| {
                let positions = r.positions.get(room)?;
                let index = positions.iter().position(|p| *p > fault.head)?;
                Some(r.times[room][index])
            })
            .min();
        let measured = match (close, live) {
            (Some((code, _, delay, at)), Some(live)) => format!(
                "close {code:?} seen after {} ms (first retry in {} ms); rooms live again {} ms after the fault{}",
                at.duration_since(fault.at).as_millis(),
                delay.as_millis(),
                live.duration_since(fault.at).as_millis(),
                fault
                    .gateway_live_at
                    .map(|g| format!(
                        ", {} ms after the new gateway was live",
                        live.saturating_duration_since(g).as_millis()
                    ))
                    .unwrap_or_default()
            ),
            _ => "the client stayed connected".to_owned(),
        };
        let first_new = first_new.map_or("-".into(), |t| t.duration_since(fault.at).as_millis().to_string());
        lines.push(format!(
            "  {}: expected {expected} / delivered {delivered} / duplicates {duplicates}; {measured}; first change committed after it delivered {first_new} ms after the fault",
            fault.name
        ));
    }
    lines
}

#[tokio::test]
async fn the_rust_client_keeps_every_change_through_sigkill_sigterm_and_a_killed_listen_connection() {
    const TOTAL: i64 = 1500;
    let db = fresh_database().await;
    let port = free_port().await;
    let env = jwt_env();
    let mut gateway = GatewayProcess::start(&db.url, port, &env).await;
    let tokens = Arc::new(AtomicU64::new(0));
    let builder = {
        let tokens = Arc::clone(&tokens);
        Client::builder(gateway.ws_url())
            .token_fn(move || {
                tokens.fetch_add(1, Ordering::Relaxed);
                async { Ok(token(Duration::from_secs(3600))) }
            })
            .reconnect_delays(Duration::from_millis(100), Duration::from_secs(1))
    };
    let subscriber = Subscriber::start_with(builder, rooms(), 0);
    subscriber.wait_started(rooms().len()).await;
    let work = Workload::start(&db.url, TOTAL, ROOMS, 4);
    let mut faults = Vec::new();

    // 1. SIGKILL: no close frame; writers go on while no gateway runs.
    work.wait_committed(300).await;
    let at = Instant::now();
    gateway.signal(libc::SIGKILL);
    gateway.wait_exit().await;
    let head = outbox_head(&db.pool).await;
    work.wait_committed(550).await;
    gateway = GatewayProcess::start(&db.url, port, &env).await;
    faults.push(Fault {
        name: "SIGKILL, restarted on the same address",
        at,
        head,
        gateway_live_at: Some(Instant::now()),
    });
    wait_resumed(&subscriber, faults.last().unwrap()).await;

    // 2. SIGTERM: the gateway says 1001, "reconnect and resume".
    work.wait_committed(850).await;
    let at = Instant::now();
    gateway.signal(libc::SIGTERM);
    let status = gateway.wait_exit().await;
    assert!(
        status.success(),
        "graceful stop exits 0: {status:?}\n{}",
        gateway.log_text()
    );
    let head = outbox_head(&db.pool).await;
    let _gateway = GatewayProcess::start(&db.url, port, &env).await;
    faults.push(Fault {
        name: "SIGTERM (1001), restarted",
        at,
        head,
        gateway_live_at: Some(Instant::now()),
    });
    wait_resumed(&subscriber, faults.last().unwrap()).await;
    {
        let r = subscriber.received.lock().unwrap();
        let d = r.disconnects.iter().find(|(code, ..)| *code == Some(1001));
        let (_, reason, delay, _) = d.unwrap_or_else(|| panic!("the client saw the gateway's 1001: {:?}", r.closes));
        assert!(reason.contains("resume"), "{reason}");
        assert_eq!(*delay, Duration::ZERO, "after 1001 the first retry goes at once");
    }

    // 3. The gateway's LISTEN connection dies; clients stay connected.
    work.wait_committed(1150).await;
    let connections_before = subscriber.client.stats().connections;
    let at = Instant::now();
    let killed: Vec<bool> = sqlx::query_scalar(
        "select pg_terminate_backend(pid) from pg_stat_activity \
         where application_name = 'ws-gateway feed' and datname = current_database()",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(killed.contains(&true), "found and killed the feed's LISTEN connection");
    faults.push(Fault {
        name: "LISTEN connection killed",
        at,
        head: outbox_head(&db.pool).await,
        gateway_live_at: None,
    });

    work.finish().await;
    let mut want = std::collections::HashMap::new();
    for room in rooms() {
        let start = subscriber.received.lock().unwrap().start[&room];
        want.insert(room.clone(), committed_positions(&db.pool, &room, start).await);
    }
    eventually("every committed change to reach the subscriptions", || async {
        let r = subscriber.received.lock().unwrap();
        rooms()
            .iter()
            .all(|room| r.positions.get(room).map_or(0, Vec::len) >= want[room].len())
            .then_some(())
    })
    .await;
    let r = subscriber.received.lock().unwrap();
    println!(
        "\nws-gateway-client under gateway faults (per fault: the changes committed from it to the next, both rooms):"
    );
    for line in report(&r, &want, &faults) {
        println!("{line}");
    }
    let stats = subscriber.client.stats();
    println!(
        "  client: {stats:?}; token function asked {} times",
        tokens.load(Ordering::Relaxed)
    );
    for room in rooms() {
        assert_eq!(
            r.positions[&room], want[&room],
            "{room}: the outbox's positions, in order, once"
        );
    }
    assert_eq!(want.values().map(Vec::len).sum::<usize>() as i64, TOTAL);
    assert_eq!(stats.duplicates, 0, "the gateway's resumes are exact");
    assert_eq!(
        stats.connections, connections_before,
        "a feed fault does not drop clients"
    );
    assert!(
        tokens.load(Ordering::Relaxed) >= 3,
        "the token function is asked on every connect"
    );
    assert!(
        r.resets.is_empty() && r.errors.is_empty(),
        "{:?} {:?}",
        r.resets,
        r.errors
    );
}

/// A reader that stops reading its subscription while transactions of ten
/// 16 KB rows arrive: each is more than the 64 KB send queue holds, so the
/// gateway closes it 4008 while its socket still has room for the close
/// frame; the client reconnects at once and resumes with nothing lost.
///
/// The test reads again only once the gateway counted the close. The close
/// frame then still waits in the gateway's kernel (the client's window is
/// full) behind the backlog; the gateway keeps the socket open, reading and
/// dropping the client's acks, for its slow-consumer grace
/// (`SLOW_CLOSE_GRACE`), so the frame arrives. (When it dropped the socket
/// 1 s after the close, the acks reached a closed socket and the reset that
/// answered them discarded the close frame: the client saw a broken
/// connection and backed off.)
#[tokio::test]
async fn a_stalled_reader_closed_4008_by_a_burst_resumes_at_once_with_nothing_lost() {
    let (code, delay) = stall_and_resume("4008, burst while stalled", 10).await;
    assert_eq!(code, Some(4008), "closed as a slow consumer, and the client saw it");
    assert_eq!(delay, Duration::ZERO, "after 4008 the first retry goes at once");
}

/// Transactions of two 16 KB rows, under the queue's bound: only a reader
/// that stopped reading falls behind, until its socket and queue are full.
/// The gateway's close frame waits behind the full socket; a client that
/// reads again within the slow-consumer grace gets it (4008), reconnects at
/// once and resumes with nothing lost.
#[tokio::test]
async fn a_reader_stalled_until_its_socket_is_full_is_closed_as_slow_and_resumes() {
    let (code, delay) = stall_and_resume("slow consumer, socket full", 2).await;
    assert_eq!(code, Some(4008), "closed as a slow consumer, and the client saw it");
    assert_eq!(delay, Duration::ZERO, "after 4008 the first retry goes at once");
}

/// Subscribes, stops reading the subscription (the client then stops
/// reading the socket), commits transactions of `rows` 16 KB rows until the
/// gateway has closed it as a slow consumer (64 KB `GATEWAY_SEND_QUEUE_BYTES`),
/// reads again, and checks the resumed stream against the outbox. The close
/// code it saw, and its first retry's delay.
async fn stall_and_resume(name: &str, rows: i64) -> (Option<u16>, Duration) {
    const ROOM: &str = "project:1";
    let db = fresh_database().await;
    let gateway = GatewayProcess::start(&db.url, free_port().await, &[("GATEWAY_SEND_QUEUE_BYTES", "65536")]).await;
    let client = Client::builder(gateway.ws_url())
        .encoding(Encoding::None)
        .buffer(4)
        .reconnect_delays(Duration::from_millis(100), Duration::from_secs(1))
        .start();
    let mut events = Box::pin(client.events());
    let mut sub = client.subscribe(ROOM, None).unwrap();
    let Some(Update::Subscribed { position: start, .. }) = sub.next().await else {
        panic!("subscribed first")
    };
    let body = "x".repeat(16_000);
    let burst = |from: i64| {
        sqlx::query(
            "insert into items (id, project_id, body) select g, 1, $3 from generate_series($1::bigint, $2::bigint) g",
        )
        .bind(from)
        .bind(from + rows - 1)
        .bind(body.clone())
    };
    sqlx::query("insert into items (id, project_id, body) values (1, 1, 'before the stall')")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.is_empty() {
        match sub.next().await {
            Some(Update::Change(c)) => got.push(c.position.0),
            Some(_) => {}
            None => panic!("the subscription ended"),
        }
    }
    // Stall: nobody reads `sub`. Commit transactions of two 16 KB rows
    // (under the queue's bound: only a reader that stopped reading falls
    // behind) until the gateway says it closed us.
    let slow_closed = || async {
        let (_, metrics) = http_get(gateway.address, "/metrics").await;
        metrics
            .lines()
            .find(|l| l.starts_with("ws_gateway_slow_consumer_disconnects_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .is_some_and(|n| n >= 1.0)
    };
    let mut next = 2;
    while !slow_closed().await {
        assert!(
            next < 20_000,
            "the gateway closes a stalled reader before 320 MB are committed for it"
        );
        burst(next).execute(&db.pool).await.unwrap();
        next += rows;
    }
    // Everything committed has been dispatched: what follows is the resume.
    let head = outbox_head(&db.pool).await;
    eventually("the gateway to dispatch what was committed", || async {
        let (_, health) = http_get_json(gateway.address, "/healthz").await;
        let position: i64 = health["feed"]["position"].as_str()?.parse().ok()?;
        (position >= head).then_some(())
    })
    .await;
    let read_again = Instant::now();
    let want_backlog = committed_positions(&db.pool, ROOM, start.0).await;
    // Read again, and keep reading: the backlog, the close, the resume,
    // then what follows.
    let got = Arc::new(std::sync::Mutex::new(got));
    let resumed_at = Arc::new(std::sync::Mutex::new(None));
    let reader = tokio::spawn({
        let (got, resumed_at) = (Arc::clone(&got), Arc::clone(&resumed_at));
        async move {
            while let Some(update) = sub.next().await {
                match update {
                    Update::Change(c) => got.lock().unwrap().push(c.position.0),
                    Update::Subscribed { resumed: true, .. } => {
                        resumed_at.lock().unwrap().get_or_insert(Instant::now());
                    }
                    _ => {}
                }
            }
        }
    });
    let (close_code, close_reason, close_at, delay) = loop {
        match tokio::time::timeout(Duration::from_secs(30), events.next()).await {
            Ok(Some(ClientEvent::Disconnected {
                code,
                reason,
                reconnect_in: Some(delay),
            })) => break (code, reason, Instant::now(), delay),
            Ok(Some(_)) => continue,
            other => panic!("no disconnect: {other:?}"),
        }
    };
    let resumed_at = eventually("the client to resume", || async { *resumed_at.lock().unwrap() }).await;
    sqlx::query("insert into items (id, project_id, body) select g, 1, 'after' from generate_series($1::bigint, $1::bigint + 99) g")
        .bind(next)
        .execute(&db.pool)
        .await
        .unwrap();
    let want = committed_positions(&db.pool, ROOM, start.0).await;
    eventually("every change to arrive", || async {
        (got.lock().unwrap().len() >= want.len()).then_some(())
    })
    .await;
    reader.abort();
    let got = got.lock().unwrap().clone();
    println!(
        "\nws-gateway-client, {name}: expected {} / delivered {} / duplicates {} (dropped at the seam: {}); \
         closed {close_code:?} ({close_reason}) {} ms after it read again, first retry in {} ms; live again {} ms after it read again; {} connections",
        want.len(),
        got.len(),
        got.len() - got.iter().collect::<std::collections::HashSet<_>>().len(),
        client.stats().duplicates,
        close_at.duration_since(read_again).as_millis(),
        delay.as_millis(),
        resumed_at.saturating_duration_since(read_again).as_millis(),
        client.stats().connections,
    );
    assert!(want_backlog.len() < want.len());
    assert_eq!(got, want, "every change once, in order");
    assert!(client.stats().connections >= 2, "a new connection after the close");
    client.close();
    (close_code, delay)
}

/// Tokens that expire every 3 s with no leeway: the token function is asked
/// before each `exp` and the fresh token sent in band; for 10 s of changes
/// the connection never closes and nothing is missed.
#[tokio::test]
async fn three_second_tokens_are_refreshed_in_band_and_the_stream_never_stops() {
    const ROOM: &str = "project:1";
    let db = fresh_database().await;
    let mut env = jwt_env();
    env.push(("GATEWAY_JWT_LEEWAY_S", "0"));
    let gateway = GatewayProcess::start(&db.url, free_port().await, &env).await;
    let client = Client::builder(gateway.ws_url())
        .token_fn(|| async { Ok(token(Duration::from_secs(3))) })
        .start();
    let mut events = Box::pin(client.events());
    let mut sub = client.subscribe(ROOM, None).unwrap();
    let Some(Update::Subscribed { position: start, .. }) = sub.next().await else {
        panic!("subscribed first")
    };
    let writer = {
        let pool = db.pool.clone();
        tokio::spawn(async move {
            let began = Instant::now();
            let mut id = 1;
            while began.elapsed() < Duration::from_secs(10) {
                sqlx::query("insert into items (id, project_id) values ($1, 1)")
                    .bind(id)
                    .execute(&pool)
                    .await
                    .unwrap();
                id += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    let mut got = Vec::new();
    let mut arrivals = Vec::new();
    let mut want = Vec::new();
    let mut written = false;
    while !written || got.len() < want.len() {
        tokio::select! {
            update = sub.next() => match update {
                Some(Update::Change(c)) => {
                    got.push(c.position.0);
                    arrivals.push(Instant::now());
                }
                Some(other) => panic!("only changes: {other:?}"),
                None => panic!("the subscription ended"),
            },
            event = events.next(), if !written => {
                if let Some(ClientEvent::Disconnected { code, reason, .. }) = event {
                    panic!("the connection closed ({code:?} {reason}): tokens must be refreshed in band");
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)), if !written => {
                if writer.is_finished() {
                    written = true;
                    want = committed_positions(&db.pool, ROOM, start.0).await;
                }
            }
        }
    }
    let gap = arrivals.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default();
    let stats = client.stats();
    println!(
        "\nws-gateway-client, 3 s tokens for 10 s: expected {} / delivered {} / duplicates 0; no close; {} in-band refreshes; largest gap between changes {} ms",
        want.len(),
        got.len(),
        stats.token_refreshes,
        gap.as_millis()
    );
    assert_eq!(got, want);
    assert!(stats.token_refreshes >= 3, "{stats:?}");
    assert_eq!(stats.connections, 1, "{stats:?}");
    client.close();
}

/// A resume from pruned history: `Reset` (with where the stream goes on),
/// then the stream goes on, across a restart, with no second reset.
#[tokio::test]
async fn a_resume_from_pruned_history_is_reset_and_the_stream_goes_on() {
    const ROOM: &str = "project:1";
    let db = fresh_database().await;
    sqlx::query("insert into items (id, project_id) select g, 1 from generate_series(1, 10) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let old = committed_positions(&db.pool, ROOM, 0).await;
    sqlx::query("update realtime.changes set committed_at = now() - interval '2 days' where position <= $1")
        .bind(old[4])
        .execute(&db.pool)
        .await
        .unwrap();
    let env = [("GATEWAY_HISTORY_RETENTION", "1m")];
    let port = free_port().await;
    let mut gateway = GatewayProcess::start(&db.url, port, &env).await;
    eventually("the gateway to prune the old changes", || async {
        let pruned: i64 = sqlx::query_scalar("select pruned_through from realtime.settings")
            .fetch_one(&db.pool)
            .await
            .ok()?;
        (pruned >= old[4]).then_some(())
    })
    .await;
    let client = Client::builder(gateway.ws_url())
        .reconnect_delays(Duration::from_millis(100), Duration::from_secs(1))
        .start();
    // Resumes from a position stored two days ago.
    let mut sub = client.subscribe(ROOM, Some(Position(old[0]))).unwrap();
    let Some(Update::Subscribed {
        position: live,
        resumed: true,
    }) = sub.next().await
    else {
        panic!("subscribed, resumed")
    };
    let Some(Update::Reset { reason, position }) = sub.next().await else {
        panic!("a reset")
    };
    assert_eq!(reason, "history_expired");
    assert_eq!(position, live, "the stream goes on after where it went live");
    assert_eq!(sub.position(), Some(live));
    sqlx::query("insert into items (id, project_id) select g, 1 from generate_series(11, 20) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut resets = 1 + take(&mut sub, &mut got, 10).await;
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit().await.success());
    sqlx::query("insert into items (id, project_id) select g, 1 from generate_series(21, 30) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let _gateway = GatewayProcess::start(&db.url, port, &env).await;
    sqlx::query("insert into items (id, project_id) select g, 1 from generate_series(31, 40) g")
        .execute(&db.pool)
        .await
        .unwrap();
    let want = committed_positions(&db.pool, ROOM, live.0).await;
    resets += take(&mut sub, &mut got, want.len()).await;
    assert_eq!(got, want, "every change after the reset, once, in order");
    assert_eq!(resets, 1, "no second reset on the resume after it");
    println!(
        "\nws-gateway-client, reset: one Reset (history_expired), then expected {} / delivered {} / duplicates 0 across a restart",
        want.len(),
        got.len()
    );
    client.close();
}

/// Reads `sub` until `got` holds `n` changes; the resets seen meanwhile.
async fn take(sub: &mut ws_gateway_client::Subscription, got: &mut Vec<i64>, n: usize) -> usize {
    let mut resets = 0;
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(30), sub.next()).await {
            Ok(Some(Update::Change(c))) => got.push(c.position.0),
            Ok(Some(Update::Reset { .. })) => resets += 1,
            Ok(Some(_)) => {}
            other => panic!("{} of {n} changes, then {other:?}", got.len()),
        }
    }
    resets
}

/// `GET /client.js` is the npm package's module, byte for byte, importable
/// from any origin, cached briefly and revalidated.
#[tokio::test]
async fn the_gateway_serves_the_javascript_client() {
    let app = spawn_app().await;
    let url = format!("http://{}/client.js", app.address);
    let http = reqwest::Client::new();
    let response = http.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let header = |name: &str| response.headers()[name].to_str().unwrap().to_owned();
    assert!(
        header("content-type").starts_with("text/javascript"),
        "{}",
        header("content-type")
    );
    assert_eq!(header("access-control-allow-origin"), "*");
    assert!(
        header("cache-control").contains("max-age="),
        "{}",
        header("cache-control")
    );
    let etag = header("etag");
    let body = response.text().await.unwrap();
    let package = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../clients/js/client.js")).unwrap();
    assert_eq!(body, package, "the same file as the npm package's");
    let again = http.get(&url).header("if-none-match", &etag).send().await.unwrap();
    assert_eq!(again.status(), 304);
    assert_eq!(again.headers()["access-control-allow-origin"], "*");
}

/// The README's Rust example, as it is, against a gateway.
#[tokio::test]
async fn the_readme_rust_example_follows_a_room() {
    let app = spawn_app().await;
    let url = app.ws_url();
    let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
    let follower = {
        let lines = Arc::clone(&lines);
        tokio::spawn(async move {
            follow_example::follow(&url, "project:42", |line| {
                let go_on = !line.contains(r#"{"id":9002}"#);
                lines.lock().unwrap().push(line);
                go_on
            })
            .await
        })
    };
    // Live once a marker arrives; then two more.
    let mut id = 1;
    eventually("the example to print a change", || {
        id += 1;
        let (pool, id) = (app.db.pool.clone(), id);
        let lines = Arc::clone(&lines);
        async move {
            sqlx::query("insert into items (id, project_id) values ($1, 42)")
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
            (!lines.lock().unwrap().is_empty()).then_some(())
        }
    })
    .await;
    for n in [9001, 9002] {
        sqlx::query("insert into items (id, project_id) values ($1, 42)")
            .bind(n)
            .execute(&app.db.pool)
            .await
            .unwrap();
    }
    tokio::time::timeout(Duration::from_secs(20), follower)
        .await
        .expect("the example stops once its printer says so")
        .unwrap()
        .unwrap();
    let lines = lines.lock().unwrap();
    let tail = &lines[lines.len() - 2..];
    assert!(tail[0].ends_with(r#"INSERT items {"id":9001}"#), "{lines:?}");
    assert!(tail[1].ends_with(r#"INSERT items {"id":9002}"#), "{lines:?}");
}

/// The README's client examples are the files the tests run, verbatim.
#[test]
fn the_readme_client_examples_are_the_tested_files() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let read = |path: &str| std::fs::read_to_string(format!("{root}/{path}")).unwrap();
    let readme = read("README.md");
    let rust = read("crates/client/examples/follow.rs");
    let follow = &rust[rust.find("/// Hands `print`").unwrap()..];
    assert!(
        readme.contains(follow.trim()),
        "README's Rust example is crates/client/examples/follow.rs's `follow`"
    );
    let node = read("clients/js/examples/node.mjs");
    assert!(
        readme.contains(node.trim()),
        "README's Node example is clients/js/examples/node.mjs"
    );
    let page = read("clients/js/examples/browser.html");
    let script = &page[page.find("<script type=\"module\">").unwrap() + 22..page.find("</script>").unwrap()];
    let script: Vec<&str> = script
        .trim_matches('\n')
        .lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect();
    assert!(
        readme.contains(&script.join("\n")),
        "README's browser example is clients/js/examples/browser.html's script"
    );
}
