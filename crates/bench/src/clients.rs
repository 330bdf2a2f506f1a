//! The WebSocket side: one task per client, subscribed to one room, timing
//! every change from its send stamp to its arrival and keeping the room's
//! ledger. Per frame: one clock read, one scan, a bit test per change, one
//! histogram lock.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use super::clock::SendLog;
use super::frames::{self, Scan};
use super::latency::LatencyRecorder;
use super::ledger::{RoomLedger, Seen};
use super::plan::Encoding;
use super::table;

/// How long one client may take to connect and get its `subscribed`.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client waits for the server's half of a close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// What every client shares.
pub struct ClientContext {
    pub url: String,
    pub rooms: u64,
    pub encoding: Encoding,
    pub read_buffer_bytes: usize,
    /// Rows up to this id are warmup: counted, not timed.
    pub measure_after_id: u64,
    pub send_log: Arc<SendLog>,
    pub latency: Arc<LatencyRecorder>,
    /// Caps concurrent connection attempts.
    pub connecting: Arc<Semaphore>,
    /// Cancelled once every expected delivery arrived (or the drain gave up).
    pub stop: CancellationToken,
}

/// What the monitor reads of one client while it runs.
pub struct ClientProbe {
    pub room: u64,
    /// Distinct rows received.
    pub delivered: AtomicU64,
    /// The connection ended early (closed by the gateway, or failed).
    pub ended: AtomicBool,
}

impl ClientProbe {
    pub fn new(room: u64) -> ClientProbe {
        ClientProbe {
            room,
            delivered: AtomicU64::new(0),
            ended: AtomicBool::new(false),
        }
    }
}

/// How a client's connection ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEnd {
    /// Stopped by the bench after the drain: the normal end.
    Stopped,
    /// Never got to `subscribed`.
    ConnectFailed(String),
    /// The gateway closed it, or it broke, mid-run.
    Dropped(String),
    /// It got something it could not read (a compressed frame this build
    /// cannot decode, a change without an id); the run is invalid.
    Undecodable(String),
}

pub struct ClientOutcome {
    pub ledger: RoomLedger,
    pub end: ClientEnd,
    /// Frames that carried changes (a `batch` counts once).
    pub change_frames: u64,
    /// Of those, binary (compressed) frames.
    pub compressed_frames: u64,
    /// Frames that needed the full JSON parse.
    pub slow_frames: u64,
    /// `error` or `reset` messages from the gateway.
    pub protocol_errors: u64,
    /// When the last change arrived (run clock, us; 0 if none).
    pub last_receive_us: u64,
}

/// Connects, subscribes to `room`, reports readiness on `ready`, and counts
/// and times changes until stopped.
pub async fn run_client(
    index: usize,
    ctx: Arc<ClientContext>,
    probe: Arc<ClientProbe>,
    ready: mpsc::UnboundedSender<bool>,
) -> ClientOutcome {
    let room = probe.room;
    let mut outcome = ClientOutcome {
        ledger: RoomLedger::new(room, ctx.rooms),
        end: ClientEnd::Stopped,
        change_frames: 0,
        compressed_frames: 0,
        slow_frames: 0,
        protocol_errors: 0,
        last_receive_us: 0,
    };
    let connected = {
        let _permit = ctx.connecting.acquire().await;
        tokio::time::timeout(CONNECT_TIMEOUT, connect(&ctx, room)).await
    };
    let mut ws = match connected {
        Ok(Ok(ws)) => ws,
        Ok(Err(e)) => return failed(outcome, &probe, &ready, e),
        Err(_) => {
            return failed(
                outcome,
                &probe,
                &ready,
                format!("no `subscribed` within {CONNECT_TIMEOUT:?}"),
            );
        }
    };
    let _ = ready.send(true);

    let mut pairs: Vec<(u64, i64)> = Vec::with_capacity(16);
    let mut latencies: Vec<u64> = Vec::with_capacity(16);
    let stopped = ctx.stop.cancelled();
    tokio::pin!(stopped);
    loop {
        let message = tokio::select! {
            biased;
            () = &mut stopped => {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
                break;
            }
            message = ws.next() => message,
        };
        let now = ctx.send_log.clock.now_us();
        let decoded;
        let text: &str = match &message {
            Some(Ok(Message::Text(text))) => text.as_str(),
            Some(Ok(Message::Binary(bytes))) => match frames::decode_binary(ctx.encoding, bytes) {
                Ok(text) => {
                    outcome.compressed_frames += 1;
                    decoded = text;
                    &decoded
                }
                Err(e) => {
                    outcome.end = ClientEnd::Undecodable(e);
                    break;
                }
            },
            Some(Ok(Message::Close(frame))) => {
                outcome.end = ClientEnd::Dropped(match frame {
                    Some(f) => format!("closed by the gateway: {} {}", u16::from(f.code), f.reason),
                    None => "closed by the gateway".to_owned(),
                });
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                outcome.end = ClientEnd::Dropped(format!("connection failed: {e}"));
                break;
            }
            None => {
                outcome.end = ClientEnd::Dropped("connection ended".to_owned());
                break;
            }
        };
        match frames::scan(text, &mut pairs) {
            Scan::Fast => {}
            Scan::Slow => outcome.slow_frames += 1,
            Scan::Control(message) => {
                if matches!(message["type"].as_str(), Some("error" | "reset")) {
                    outcome.protocol_errors += 1;
                    tracing::warn!(client = index, %message, "gateway refused or reset");
                }
                continue;
            }
            Scan::Invalid(why) => {
                outcome.end = ClientEnd::Undecodable(why);
                break;
            }
        }
        outcome.change_frames += 1;
        latencies.clear();
        for &(id, position) in &pairs {
            if outcome.ledger.observe(id, position) == Seen::First
                && id > ctx.measure_after_id
                && let Some(sent) = ctx.send_log.sent_at(id)
            {
                latencies.push(now.saturating_sub(sent));
            }
        }
        outcome.last_receive_us = now;
        probe.delivered.store(outcome.ledger.unique(), Ordering::Relaxed);
        if !latencies.is_empty() {
            ctx.latency.record(index, &latencies);
        }
    }
    if outcome.end != ClientEnd::Stopped {
        probe.ended.store(true, Ordering::Relaxed);
    }
    outcome
}

fn failed(
    mut outcome: ClientOutcome,
    probe: &ClientProbe,
    ready: &mpsc::UnboundedSender<bool>,
    why: String,
) -> ClientOutcome {
    outcome.end = ClientEnd::ConnectFailed(why);
    probe.ended.store(true, Ordering::Relaxed);
    let _ = ready.send(false);
    outcome
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(ctx: &ClientContext, room: u64) -> Result<Ws, String> {
    subscribed(&ctx.url, ctx.encoding, ctx.read_buffer_bytes, &table::room_name(room)).await
}

/// A connection subscribed to `room_name`, once the gateway says it is live.
async fn subscribed(url: &str, encoding: Encoding, read_buffer_bytes: usize, room_name: &str) -> Result<Ws, String> {
    let url = match encoding {
        Encoding::None => url.to_owned(),
        other => format!("{url}?encoding={}", other.as_str()),
    };
    // A modest read buffer (tungstenite allocates it eagerly) and no write
    // buffering: a client sends one message.
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer_bytes)
        .write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(config), true)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let subscribe = serde_json::json!({"type": "subscribe", "room": room_name}).to_string();
    ws.send(Message::text(subscribe))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    loop {
        let message = ws
            .next()
            .await
            .ok_or("closed before `subscribed`")?
            .map_err(|e| format!("waiting for `subscribed`: {e}"))?;
        let Message::Text(text) = message else {
            if let Message::Close(frame) = message {
                return Err(format!("closed before `subscribed`: {frame:?}"));
            }
            continue;
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("not JSON before `subscribed`: {e}"))?;
        match value["type"].as_str() {
            Some("subscribed") if value["room"] == room_name => return Ok(ws),
            Some("error") => return Err(format!("subscribe refused: {value}")),
            _ => continue,
        }
    }
}

/// Proves that the gateway delivers this database's changes before anything
/// is measured: a row committed to a room no measuring client is in must
/// arrive. A `--gateway` serving another database fails here, not as 100 %
/// loss.
pub async fn preflight(url: &str, encoding: Encoding, db_url: &str) -> anyhow::Result<()> {
    use anyhow::{Context, anyhow};
    /// Room -1 and id 0: outside every measured room and row.
    const ROOM: i32 = -1;
    const ID: i64 = 0;
    let room_name = format!("bench:{ROOM}");
    let mut ws = subscribed(url, encoding, 4096, &room_name)
        .await
        .map_err(|e| anyhow!("preflight client at {url}: {e}"))?;
    let (client, connection) = tokio_postgres::connect(db_url, tokio_postgres::NoTls)
        .await
        .context("preflight: connecting to the database")?;
    let driver = tokio::spawn(connection);
    client
        .execute(
            "insert into bench_events (id, room, nonce) values ($1, $2, 0)",
            &[&ID, &ROOM],
        )
        .await
        .context("preflight: inserting a row")?;
    let arrived = tokio::time::timeout(Duration::from_secs(10), async {
        let mut pairs = Vec::new();
        while let Some(Ok(message)) = ws.next().await {
            let text = match message {
                Message::Text(text) => text.as_str().to_owned(),
                Message::Binary(bytes) => match frames::decode_binary(encoding, &bytes) {
                    Ok(text) => text,
                    Err(_) => continue,
                },
                _ => continue,
            };
            if matches!(frames::scan(&text, &mut pairs), Scan::Fast | Scan::Slow)
                && pairs.iter().any(|&(id, _)| id == ID as u64)
            {
                return true;
            }
        }
        false
    })
    .await;
    client
        .execute("delete from bench_events where id = $1", &[&ID])
        .await
        .context("preflight: deleting its row")?;
    drop(client);
    let _ = driver.await;
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
    match arrived {
        Ok(true) => Ok(()),
        _ => Err(anyhow!(
            "the gateway at {url} did not deliver a change committed to the bench's database within 10 s: \
             is it serving another database than --db?"
        )),
    }
}
