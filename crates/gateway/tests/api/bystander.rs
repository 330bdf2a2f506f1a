//! The hardening tests' witness: a client subscribed to a room of its own
//! while a writer commits rows there, for as long as an attack runs; at the
//! end its stream is compared with the outbox (every change, once, in
//! commit order) and its worst commit-to-receive lag is reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::fault_kit::committed_positions;
use crate::helpers::DEADLINE;

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket that takes frames of any size (the default client
/// config stops at 16 MiB frames).
pub async fn connect_unlimited(url: &str) -> Socket {
    let config = WebSocketConfig::default().max_message_size(None).max_frame_size(None);
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url}: {e}"));
    ws
}

/// The next protocol message; panics on a close, naming its frame.
pub async fn next_json(ws: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(DEADLINE, ws.next())
            .await
            .expect("a message within the deadline")
            .expect("connection open")
            .expect("readable");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
            Message::Close(frame) => panic!("connection closed: {frame:?}"),
            _ => continue,
        }
    }
}

/// Subscribes and returns the `subscribed` position.
pub async fn subscribe(ws: &mut Socket, room: &str, since: Option<i64>) -> i64 {
    let mut request = json!({"type": "subscribe", "room": room});
    if let Some(since) = since {
        request["since"] = json!(since.to_string());
    }
    ws.send(Message::text(request.to_string())).await.expect("send");
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply["position"].as_str().unwrap().parse().unwrap()
}

/// The changes of a message (a `change` or a `batch`), or nothing.
pub fn changes_of(message: &Value) -> Vec<Value> {
    match message["type"].as_str() {
        Some("change") => vec![message.clone()],
        Some("batch") => message["changes"].as_array().unwrap().clone(),
        _ => Vec::new(),
    }
}

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros() as i64
}

/// What the bystander saw.
pub struct Seen {
    pub changes: usize,
    /// Worst commit-to-receive lag, ms (same host, same clock).
    pub max_lag_ms: f64,
}

pub struct Bystander {
    room: String,
    start: i64,
    marker: i64,
    stop: Arc<AtomicBool>,
    writer: JoinHandle<()>,
    reader: JoinHandle<Vec<(i64, i64)>>,
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} changes, worst lag {:.1} ms", self.changes, self.max_lag_ms)
    }
}

impl Bystander {
    /// Subscribes to `project:{project}` at `ws_url` (token included, if
    /// any) and commits a row of `row_bytes` there every 10 ms until
    /// [`Bystander::check`].
    pub async fn start(ws_url: &str, pool: &PgPool, project: i32, row_bytes: usize) -> Bystander {
        let room = format!("project:{project}");
        let mut ws = connect_unlimited(ws_url).await;
        assert_eq!(next_json(&mut ws).await["type"], "welcome");
        let start = subscribe(&mut ws, &room, None).await;
        let marker = -(i64::from(project) * 1_000_000);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn({
            let pool = pool.clone();
            let stop = Arc::clone(&stop);
            async move {
                let mut id = i64::from(project) * 1_000_000;
                while !stop.load(Ordering::Relaxed) {
                    id += 1;
                    sqlx::query("insert into items (id, project_id, body) values ($1, $2, repeat('b', $3))")
                        .bind(id)
                        .bind(project)
                        .bind(row_bytes as i32)
                        .execute(&pool)
                        .await
                        .expect("the bystander's writer commits");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        let reader = tokio::spawn(async move {
            // (position, received at, us), until the marker row.
            let mut seen = Vec::new();
            loop {
                let message = tokio::time::timeout(Duration::from_secs(120), next_json(&mut ws))
                    .await
                    .expect("the bystander keeps receiving");
                for change in changes_of(&message) {
                    let position = change["position"].as_str().unwrap().parse().unwrap();
                    seen.push((position, now_us()));
                    if change["key"]["id"].as_i64() == Some(marker) {
                        return seen;
                    }
                }
            }
        });
        Bystander {
            room,
            start,
            marker,
            stop,
            writer,
            reader,
        }
    }

    /// Stops the writer, commits a last row, and checks that the bystander
    /// received exactly what the outbox holds for its room, in order.
    pub async fn check(self, pool: &PgPool) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        self.writer.await.expect("the bystander's writer");
        let project: i32 = self.room["project:".len()..].parse().unwrap();
        sqlx::query("insert into items (id, project_id) values ($1, $2)")
            .bind(self.marker)
            .bind(project)
            .execute(pool)
            .await
            .unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(120), self.reader)
            .await
            .expect("the bystander receives the last row")
            .expect("the bystander's reader");
        let got: Vec<i64> = seen.iter().map(|(p, _)| *p).collect();
        let want = committed_positions(pool, &self.room, self.start).await;
        assert_eq!(
            got.len(),
            want.len(),
            "the bystander received {} of {} changes",
            got.len(),
            want.len()
        );
        assert_eq!(got, want, "the bystander's stream differs from the outbox");
        let committed: Vec<(i64, i64)> = sqlx::query_as(
            "select position, (extract(epoch from committed_at) * 1000000)::bigint
               from realtime.changes where position = any($1) order by position",
        )
        .bind(&got)
        .fetch_all(pool)
        .await
        .unwrap();
        let max_lag_us = seen
            .iter()
            .zip(&committed)
            .map(|((_, received), (_, at))| received - at)
            .max()
            .unwrap_or(0);
        Seen {
            changes: got.len(),
            max_lag_ms: max_lag_us as f64 / 1000.0,
        }
    }
}
