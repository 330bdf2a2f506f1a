//! The message pipeline through real sockets: dedup, batching, priorities,
//! compression, slow consumers, and switching features at run time.

use std::io::Read;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use ws_gateway::config::Priority;

use crate::fault_kit::{GatewayProcess, free_port};
use crate::helpers::{Client, barrier, eventually, fresh_database, metric, sample, spawn_app, spawn_app_with};

fn changes_in(message: &Value) -> Vec<Value> {
    match message["type"].as_str() {
        Some("change") => vec![message.clone()],
        Some("batch") => message["changes"].as_array().unwrap().clone(),
        _ => panic!("not a change: {message}"),
    }
}

#[tokio::test]
async fn a_b_a_arrives_three_times_and_a_a_once() {
    let app = spawn_app().await;
    let pool = &app.db.pool;
    let mut client = app.connect().await;
    client.subscribe("item:1").await;
    client.subscribe("markers").await;
    for sql in [
        "insert into items (id, project_id, body) values (1, 1, 'A')",
        "update items set body = 'B' where id = 1",
        "update items set body = 'A' where id = 1",
        "update items set body = 'A' where id = 1",
        "update items set body = 'A' where id = 1",
    ] {
        sqlx::query(sql).execute(pool).await.unwrap();
    }
    barrier(pool, "done").await;
    let got = client.changes_until_marker("done").await;
    let bodies: Vec<_> = got
        .iter()
        .map(|c| c["row"]["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        bodies,
        ["A", "B", "A"],
        "INSERT A, UPDATE B, UPDATE A; the repeated A->A updates dropped"
    );
    let dropped = metric(app.address, "ws_gateway_dedup_dropped_total").await;
    assert!(dropped >= 2.0, "dedup drops counted: {dropped}");
}

/// 100 changes committed together reach the client in fewer frames, batches
/// of at most the batch size, in commit order, none later than a second:
/// nothing waits on a timer for companions.
#[tokio::test]
async fn a_burst_arrives_in_fewer_frames_than_changes() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.pipeline.batch_size = 10;
    })
    .await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    sqlx::query("insert into items (id, project_id) select g, 1 from generate_series(1, 100) g")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut frames = 0;
    let mut ids = Vec::new();
    while ids.len() < 100 {
        let message = client.next_json().await;
        let changes = changes_in(&message);
        assert!(changes.len() <= 10, "batch of {}", changes.len());
        let received_at = ws_gateway::change::now_us();
        for change in changes {
            ids.push(change["row"]["id"].as_i64().unwrap());
            let committed = change["committed_at"].as_str().unwrap();
            let waited_ms = (received_at - parse_rfc3339_us(committed)) as f64 / 1000.0;
            assert!(waited_ms < 1000.0, "a change waited {waited_ms} ms");
        }
        frames += 1;
    }
    assert_eq!(ids, (1..=100).collect::<Vec<_>>(), "commit order");
    assert!(frames < 100, "{frames} frames for 100 changes");
}

/// `2026-11-26T10:30:00.123456Z` to microseconds since the epoch.
fn parse_rfc3339_us(s: &str) -> i64 {
    let (y, m, d) = (&s[0..4], &s[5..7], &s[8..10]);
    let (hh, mm, ss, us) = (&s[11..13], &s[14..16], &s[17..19], &s[20..26]);
    let (y, m, d): (i64, i64, i64) = (y.parse().unwrap(), m.parse().unwrap(), d.parse().unwrap());
    // days_from_civil (Howard Hinnant)
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400
        + hh.parse::<i64>().unwrap() * 3600
        + mm.parse::<i64>().unwrap() * 60
        + ss.parse::<i64>().unwrap();
    secs * 1_000_000 + us.parse::<i64>().unwrap()
}

/// `GATEWAY_BATCH_LINGER_MS`: after a write, a socket waits out the linger
/// before its next; ten changes committed one transaction at a time right
/// after the first go out together, in fewer frames, in commit order.
#[tokio::test]
async fn a_linger_sends_what_arrived_meanwhile_as_one_batch() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.pipeline.batch_linger = Duration::from_millis(3000);
    })
    .await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    for id in 1..=10 {
        sqlx::query("insert into items (id, project_id) values ($1, 1)")
            .bind(id)
            .execute(&app.db.pool)
            .await
            .unwrap();
    }
    let mut frames = Vec::new();
    let mut ids = Vec::new();
    while ids.len() < 10 {
        let changes = changes_in(&client.next_json().await);
        frames.push(changes.len());
        ids.extend(changes.iter().map(|c| c["row"]["id"].as_i64().unwrap()));
    }
    assert_eq!(ids, (1..=10).collect::<Vec<_>>(), "commit order, once");
    assert!(
        frames.len() < 10,
        "ten transactions in {} frames: {frames:?}",
        frames.len()
    );
}

/// With a long linger, a critical table's change still goes at once, and
/// takes what waited ahead of it along: the normal change committed just
/// before it, held by the linger, arrives first, long before the linger
/// would have let it go.
#[tokio::test]
async fn critical_tables_bypass_the_linger() {
    const LINGER_MS: f64 = 10_000.0;
    let app = spawn_app_with(fresh_database().await, |s| {
        s.pipeline.batch_linger = Duration::from_millis(LINGER_MS as u64);
        s.pipeline.priority_tables.insert("markers".into(), Priority::Critical);
    })
    .await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    client.subscribe("markers").await;
    let insert = |id: i64| {
        sqlx::query("insert into items (id, project_id) values ($1, 1)")
            .bind(id)
            .execute(&app.db.pool)
    };
    // The first change goes at once; the linger starts with its write.
    insert(1).await.unwrap();
    assert_eq!(changes_in(&client.next_json().await)[0]["row"]["id"], 1);
    insert(2).await.unwrap();
    barrier(&app.db.pool, "critical").await;
    let held = changes_in(&client.next_json().await);
    assert_eq!(held[0]["row"]["id"], 2, "the held change first: {held:?}");
    let marker = client.next_json().await;
    assert_eq!(marker["type"], "change", "critical changes go alone: {marker}");
    assert_eq!(marker["row"]["note"], "critical");
    let received_at = ws_gateway::change::now_us();
    for change in [&held[0], &marker] {
        let committed = change["committed_at"].as_str().unwrap();
        let waited_ms = (received_at - parse_rfc3339_us(committed)) as f64 / 1000.0;
        assert!(
            waited_ms < LINGER_MS / 2.0,
            "{waited_ms} ms: the critical change did not end the linger"
        );
    }
}

#[tokio::test]
async fn critical_tables_are_never_batched() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.pipeline.priority_tables.insert("items".into(), Priority::Critical);
    })
    .await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    sqlx::query("insert into items (id, project_id) select g, 1 from generate_series(1, 30) g")
        .execute(&app.db.pool)
        .await
        .unwrap();
    for id in 1..=30 {
        let message = client.next_json().await;
        assert_eq!(message["type"], "change", "critical changes go alone: {message}");
        assert_eq!(message["row"]["id"], id);
    }
}

async fn connect_with(app: &crate::helpers::TestApp, encoding: &str) -> Client {
    Client::connect(&format!("{}?encoding={encoding}", app.ws_url())).await
}

fn decode(encoding: &str, bytes: &[u8]) -> String {
    let mut plain = String::new();
    match encoding {
        "br" => brotli::Decompressor::new(bytes, 4096)
            .read_to_string(&mut plain)
            .unwrap(),
        "gzip" => flate2::read::GzDecoder::new(bytes).read_to_string(&mut plain).unwrap(),
        _ => unreachable!(),
    };
    plain
}

#[tokio::test]
async fn compressed_frames_decode_to_exactly_the_plain_message() {
    let app = spawn_app().await;
    let mut plain = app.connect().await;
    let mut br = connect_with(&app, "br").await;
    let mut gz = connect_with(&app, "gzip").await;
    assert_eq!(br.welcome["encoding"], "br");
    assert_eq!(gz.welcome["encoding"], "gzip");
    for c in [&mut plain, &mut br, &mut gz] {
        c.subscribe("project:4").await;
    }
    let notes = "Level 3 east: formwork stripped, slab cured 7 days, rebar inspection passed. ".repeat(60);
    sqlx::query("insert into items (id, project_id, body) values (1, 4, $1)")
        .bind(&notes)
        .execute(&app.db.pool)
        .await
        .unwrap();
    let Message::Text(expected) = plain.next_frame().await else {
        panic!("plain clients get text")
    };
    for (client, encoding) in [(&mut br, "br"), (&mut gz, "gzip")] {
        let frame = client.next_frame().await;
        let Message::Binary(bytes) = frame else {
            panic!("{encoding}: large messages come compressed")
        };
        assert!(
            bytes.len() < expected.len() / 4,
            "{encoding}: {} -> {}",
            expected.len(),
            bytes.len()
        );
        assert_eq!(
            decode(encoding, &bytes),
            expected.as_str(),
            "{encoding} decodes to the plain message"
        );
    }
    // Below the threshold, everyone gets text.
    sqlx::query("insert into items (id, project_id, body) values (2, 4, 'short')")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let Message::Text(small) = plain.next_frame().await else {
        panic!()
    };
    for client in [&mut br, &mut gz] {
        let Message::Text(text) = client.next_frame().await else {
            panic!("small messages stay text")
        };
        assert_eq!(text, small);
    }
    // Connections publish their counts every 100 ms.
    eventually("brotli savings to be counted", || async {
        let (_, metrics) = crate::helpers::http_get(app.address, "/metrics").await;
        let raw = sample(&metrics, "ws_gateway_bytes_out_raw_total{encoding=\"br\"}").unwrap_or(0.0);
        let sent = sample(&metrics, "ws_gateway_bytes_out_sent_total{encoding=\"br\"}").unwrap_or(0.0);
        (sent > 0.0 && raw > sent).then_some(())
    })
    .await;
}

/// One client stops reading: it is closed with 4008 while 50 others get
/// every change (five of them in its own room, reading the same 8 MB), and
/// the gateway's queue for it stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_as_slow_and_others_keep_up() {
    const ROUNDS: i64 = 80;
    const BIG_PER_ROUND: i64 = 5;
    let app = spawn_app_with(fresh_database().await, |s| {
        s.limits.send_queue_bytes = 1024 * 1024;
    })
    .await;
    let mut slow = Client::connect_with_small_buffer(&app.ws_url()).await;
    slow.subscribe("project:2").await;
    let mut readers = Vec::new();
    // Rounds each reader has received: the writer stays at most a few
    // rounds ahead of the slowest reader, so the readers keep up however
    // loaded the machine is, and only the client that stops reading fills
    // its queue.
    let progress: Arc<Vec<AtomicI64>> = Arc::new((0..50).map(|_| AtomicI64::new(0)).collect());
    for i in 0..50 {
        let (room, per_round) = if i < 5 {
            ("project:2", BIG_PER_ROUND)
        } else {
            ("project:3", 1)
        };
        let mut c = app.connect().await;
        c.subscribe(room).await;
        let progress = Arc::clone(&progress);
        readers.push(tokio::spawn(async move {
            let expected = ROUNDS * per_round;
            let mut ids = Vec::new();
            while (ids.len() as i64) < expected {
                ids.extend(c.change_ids(1).await);
                progress[i].store(ids.len() as i64 / per_round, Ordering::Relaxed);
            }
            (expected, ids)
        }));
    }
    // Each round: five 20 KB rows for project:2 and one small row for
    // project:3, in one transaction. 8 MB in all for project:2: past what
    // the kernel buffers for the client that does not read (its receive
    // buffer is small; the gateway's send buffer is up to 4 MB) plus its
    // 1 MiB queue, ten rounds: the readers are never more than five behind.
    let body = "x".repeat(20_000);
    for round in 0..ROUNDS {
        eventually("the readers to keep up", || async {
            let slowest = progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap();
            (slowest >= round - 4).then_some(())
        })
        .await;
        let first = round * (BIG_PER_ROUND + 1);
        sqlx::query(
            "insert into items (id, project_id, body)
             select g, case when g = $1 + $2 then 3 else 2 end, $3 || g
               from generate_series($1, $1 + $2) g",
        )
        .bind(first)
        .bind(BIG_PER_ROUND)
        .bind(&body)
        .execute(&app.db.pool)
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for reader in readers {
        let (expected, ids) = reader.await.unwrap();
        assert_eq!(ids.len() as i64, expected);
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "in commit order");
    }
    // It reads again: what was queued before the close, then the close.
    let closed = slow.closed().await;
    assert_eq!(closed.code, Some(4008), "{closed:?}");
    assert!(closed.reason.contains("resume"), "{closed:?}");
    eventually("the slow consumer to be counted", || async {
        (metric(app.address, "ws_gateway_slow_consumer_disconnects_total").await >= 1.0).then_some(())
    })
    .await;
}

/// SIGHUP re-reads the config file: compression switched off applies to new
/// batches, and nobody is disconnected.
#[tokio::test]
async fn sighup_switches_compression_off_without_dropping_connections() {
    let db = fresh_database().await;
    let config = std::env::temp_dir().join(format!("ws-gateway-sighup-{}.env", std::process::id()));
    std::fs::write(&config, "GATEWAY_FEATURES=all\n").unwrap();
    let gateway = GatewayProcess::start(
        &db.url,
        free_port().await,
        &[("GATEWAY_CONFIG_FILE", config.to_str().unwrap())],
    )
    .await;
    let mut client = Client::connect(&format!("{}?encoding=gzip", gateway.ws_url())).await;
    client.subscribe("project:3").await;
    let big = "Crane inspection log: boom, hoist rope, limit switches checked. ".repeat(50);
    let mut next_id = 1;
    let mut insert = || {
        next_id += 1;
        sqlx::query("insert into items (id, project_id, body) values ($1, 3, $2)")
            .bind(next_id)
            .bind(big.clone())
    };
    insert().execute(&db.pool).await.unwrap();
    assert!(
        matches!(client.next_frame().await, Message::Binary(_)),
        "compressed while on"
    );

    std::fs::write(&config, "GATEWAY_FEATURES=all,-compression\n").unwrap();
    gateway.signal(libc::SIGHUP);
    // Frames already queued may still be compressed; once a text frame
    // arrives, every later one is text.
    let mut switched = false;
    for _ in 0..200 {
        insert().execute(&db.pool).await.unwrap();
        match client.next_frame().await {
            Message::Text(_) => {
                switched = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(switched, "compression switched off by SIGHUP");
    for _ in 0..3 {
        insert().execute(&db.pool).await.unwrap();
        assert!(matches!(client.next_frame().await, Message::Text(_)));
    }
    assert!(gateway.log_text().contains("configuration reloaded"));
    let _ = std::fs::remove_file(&config);
}
