//! Replays and rows of any size stream through a connection: the send
//! queue bounds what waits for a slow reader, not what a reader is owed
//! (issue 14, fault 1). `GATEWAY_SEND_QUEUE_BYTES` is 1 MiB, so that
//! megabytes stand for the hundreds of them (any smaller, and the
//! bystander's own backlog while the feed reads 9 KB rows back one by one
//! would overflow it).

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::bystander::{Bystander, Socket, changes_of, connect_unlimited, next_json, subscribe};
use crate::fault_kit::committed_positions;
use crate::helpers::{Client, DEADLINE, TestApp, eventually, fresh_database, metric, spawn_app_with};

const QUEUE_BYTES: usize = 1 << 20;

async fn small_queue_app() -> TestApp {
    spawn_app_with(fresh_database().await, |s| s.limits.send_queue_bytes = QUEUE_BYTES).await
}

/// Commits `count` rows of `bytes` to `project:{project}`, 100 per
/// transaction, ids from `first`.
async fn commit_rows(pool: &sqlx::PgPool, project: i32, first: i64, count: i64, bytes: i32) {
    let mut id = first;
    while id < first + count {
        let n = (first + count - id).min(100);
        sqlx::query(
            "insert into items (id, project_id, body)
             select g, $3, repeat(md5(g::text), $4 / 32) from generate_series($1, $2) g",
        )
        .bind(id)
        .bind(id + n - 1)
        .bind(project)
        .bind(bytes)
        .execute(pool)
        .await
        .unwrap();
        id += n;
    }
}

/// Waits until this gateway's feed has dispatched everything committed.
async fn wait_dispatched(app: &TestApp) {
    let end: i64 = sqlx::query_scalar("select coalesce(max(position), 0) from realtime.changes")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    eventually("the feed to dispatch every committed change", || async {
        let (_, health) = app.health().await;
        let position: i64 = health["feed"]["position"].as_str()?.parse().ok()?;
        (position >= end).then_some(())
    })
    .await
}

/// Reads changes of `room` until the socket closes; the positions, and the
/// close code.
async fn read_until_closed(ws: &mut Socket) -> (Vec<i64>, Option<CloseCode>) {
    let mut positions = Vec::new();
    loop {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame or the close within the deadline");
        match message {
            Some(Ok(Message::Text(text))) => {
                let value = serde_json::from_str(&text).unwrap();
                for change in changes_of(&value) {
                    positions.push(change["position"].as_str().unwrap().parse().unwrap());
                }
            }
            Some(Ok(Message::Close(frame))) => return (positions, frame.map(|f| f.code)),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return (positions, None),
        }
    }
}

/// Reads `count` changes; their positions.
async fn read_changes(ws: &mut Socket, count: usize) -> Vec<i64> {
    let mut positions = Vec::new();
    while positions.len() < count {
        let message = next_json(ws).await;
        for change in changes_of(&message) {
            positions.push(change["position"].as_str().unwrap().parse().unwrap());
        }
    }
    positions
}

/// The lengths of the row bodies of the next `count` changes, read without
/// building a JSON tree of 20 MB.
async fn body_lengths(ws: &mut Socket, count: usize) -> Vec<usize> {
    #[derive(serde::Deserialize)]
    struct Change<'a> {
        r#type: &'a str,
        #[serde(borrow)]
        row: Option<Row<'a>>,
        #[serde(borrow)]
        changes: Option<Vec<Change<'a>>>,
    }
    #[derive(serde::Deserialize)]
    struct Row<'a> {
        body: &'a str,
    }
    let mut lengths = Vec::new();
    while lengths.len() < count {
        let frame = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a frame within the deadline")
            .expect("open")
            .expect("readable");
        let Message::Text(text) = frame else {
            assert!(!matches!(frame, Message::Close(_)), "closed: {frame:?}");
            continue;
        };
        let message: Change = serde_json::from_str(&text).expect("a change or a batch");
        let changes = match message.r#type {
            "batch" => message.changes.expect("a batch's changes"),
            "change" => vec![message],
            other => panic!("expected a change, got {other}"),
        };
        lengths.extend(changes.into_iter().map(|c| c.row.expect("a row").body.len()));
    }
    lengths
}

/// The first case, scaled to the 1 MiB queue: 1,000 rows of 9 KB
/// (9 MB, 9 times the queue) missed while away, resumed from memory by a
/// client that reads. One that stops reading mid-replay is still closed
/// 4008, and resuming again from its last position gets the rest. Before
/// the fix every resume was closed 4008 before its first change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_far_larger_than_the_send_queue_streams_from_memory() {
    let app = small_queue_app().await;
    let bystander = Bystander::start(&app.ws_url(), &app.db.pool, 1, 200).await;
    let room = "project:902";

    let mut away = connect_unlimited(&app.ws_url()).await;
    next_json(&mut away).await;
    let since = subscribe(&mut away, room, None).await;
    drop(away);
    commit_rows(&app.db.pool, 902, 1, 1000, 9 * 1024).await;
    wait_dispatched(&app).await;
    let owed = committed_positions(&app.db.pool, room, since).await;
    assert_eq!(owed.len(), 1000);

    // A resume that reads gets all of it, from memory.
    let mut reading = connect_unlimited(&app.ws_url()).await;
    next_json(&mut reading).await;
    subscribe(&mut reading, room, Some(since)).await;
    assert_eq!(read_changes(&mut reading, owed.len()).await, owed);
    drop(reading);

    // One that stops reading (a 4 KiB receive buffer): the replay
    // outgrows every buffer, and live changes queue behind it.
    let mut stalled = Client::connect_with_small_buffer(&app.ws_url()).await;
    stalled
        .send_json(serde_json::json!({"type": "subscribe", "room": room, "since": since.to_string()}))
        .await;
    eventually("the replay to start", || async {
        (metric(app.address, "ws_gateway_replayed_changes_total{source=\"memory\"}").await > 0.0).then_some(())
    })
    .await;
    // More than the queue holds, queued behind the replay.
    commit_rows(&app.db.pool, 902, 1001, 150, 9 * 1024).await;
    wait_dispatched(&app).await;
    // Reading again: a gap-free prefix of what it was owed, then 4008.
    let reply = stalled.next_json().await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    let (prefix, code) = read_until_closed(&mut stalled.ws).await;
    assert_eq!(code, Some(CloseCode::from(4008)), "after {} changes", prefix.len());
    assert!(!prefix.is_empty() && prefix.len() < 1150, "{}", prefix.len());
    let owed = committed_positions(&app.db.pool, room, since).await;
    assert_eq!(prefix[..], owed[..prefix.len()], "a prefix, in order, without gaps");

    // Resuming from its last position, reading: everything else.
    let last = *prefix.last().unwrap();
    let mut again = connect_unlimited(&app.ws_url()).await;
    next_json(&mut again).await;
    subscribe(&mut again, room, Some(last)).await;
    let rest = read_changes(&mut again, owed.len() - prefix.len()).await;
    assert_eq!(rest[..], owed[prefix.len()..]);
    assert!(metric(app.address, "ws_gateway_replayed_changes_total{source=\"memory\"}").await >= 1000.0);
    assert_eq!(
        metric(app.address, "ws_gateway_replayed_changes_total{source=\"outbox\"}").await,
        0.0
    );

    let seen = bystander.check(&app.db.pool).await;
    println!("bystander: {seen}");
}

/// A 20 MB row, 20 times the queue, reaches every reader live, and a
/// resume across it on another instance reads it from the outbox as a page
/// of its own. Before the fix every reader was closed 4008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_far_larger_than_the_send_queue_reaches_every_reader() {
    let app = small_queue_app().await;
    let bystander = Bystander::start(&app.ws_url(), &app.db.pool, 1, 200).await;
    let room = "project:903";
    let mut readers = Vec::new();
    for _ in 0..3 {
        let mut ws = connect_unlimited(&app.ws_url()).await;
        next_json(&mut ws).await;
        let since = subscribe(&mut ws, room, None).await;
        readers.push((ws, since));
    }
    sqlx::query("insert into items (id, project_id, body) values (1, 903, repeat('0123456789abcdef', 1250000))")
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query("insert into items (id, project_id, body) values (2, 903, 'small')")
        .execute(&app.db.pool)
        .await
        .unwrap();
    for (ws, _) in &mut readers {
        assert_eq!(body_lengths(ws, 2).await, [20_000_000, 5]);
    }

    // Another instance on the same database: its memory starts empty, so a
    // resume from before the row reads the outbox.
    let db = app.db.shared();
    let second = spawn_app_with(db, |s| s.limits.send_queue_bytes = QUEUE_BYTES).await;
    let mut resumed = connect_unlimited(&second.ws_url()).await;
    next_json(&mut resumed).await;
    subscribe(&mut resumed, room, Some(readers[0].1)).await;
    assert_eq!(body_lengths(&mut resumed, 2).await, [20_000_000, 5]);
    assert_eq!(
        metric(second.address, "ws_gateway_replayed_changes_total{source=\"outbox\"}").await,
        2.0
    );

    let seen = bystander.check(&app.db.pool).await;
    println!("bystander: {seen}");
}
