//! A resuming subscriber: connects to one of several gateway URLs,
//! subscribes to its rooms, and on any disconnect reconnects (to the next
//! URL, after a backoff) and resubscribes every room `since` the last
//! position it delivered. Changes come out once each, in position order per
//! room: a repeat across a reconnect seam is dropped, and counted.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::Backoff;

/// Events queued for a consumer that reads slowly, before the socket stops
/// being read (the gateway then sees a slow consumer, and we resume).
const EVENTS_QUEUED: usize = 4096;

/// How a [`Subscriber`] connects and reconnects.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// `ws://host:port/ws?token=...` URLs, tried in turn.
    pub urls: Vec<String>,
    pub rooms: Vec<String>,
    /// Reconnect backoff bounds (full jitter), as in the JavaScript client.
    pub min_delay: Duration,
    pub max_delay: Duration,
    /// A connection attempt that takes longer has failed.
    pub connect_timeout: Duration,
}

impl SubscriberConfig {
    pub fn new(urls: Vec<String>, rooms: Vec<String>) -> SubscriberConfig {
        SubscriberConfig {
            urls,
            rooms,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// What the subscriber saw, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A connection is open (before its subscriptions are).
    Connected { url: String },
    /// A room is live after `position`; `resumed` when it was asked `since`
    /// an earlier position (what was missed follows).
    Subscribed { room: String, position: i64, resumed: bool },
    /// A change (or a change out of a `batch`), after every earlier one of
    /// its room: the whole `change` message.
    Change {
        room: String,
        position: i64,
        message: Value,
    },
    /// History the room needed is gone (`history_expired`): refetch.
    Reset { room: String, reason: String },
    /// The gateway refused something (`forbidden`, `invalid_room`...).
    Refused { code: String, message: String },
    /// The gateway closed the connection; the subscriber reconnects.
    Closed { code: Option<u16>, reason: String },
    /// The connection broke or ended without a close frame; it reconnects.
    Lost { error: String },
}

/// A running resuming subscriber. Dropping it stops it.
pub struct Subscriber {
    events: mpsc::Receiver<Event>,
    reconnect: Arc<Notify>,
    repeats: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Subscriber {
    pub fn start(config: SubscriberConfig) -> Subscriber {
        assert!(!config.urls.is_empty(), "a subscriber needs at least one URL");
        let (tx, events) = mpsc::channel(EVENTS_QUEUED);
        let reconnect = Arc::new(Notify::new());
        let repeats = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(run(config, tx, Arc::clone(&reconnect), Arc::clone(&repeats)));
        Subscriber {
            events,
            reconnect,
            repeats,
            task,
        }
    }

    /// The next event; `None` once the subscriber has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Closes the current connection and resumes at once on the next URL
    /// (moving to another gateway instance, say).
    pub fn reconnect(&self) {
        self.reconnect.notify_one();
    }

    /// Changes dropped because their position was not after the last one
    /// delivered for their room. A gateway that keeps its promise sends
    /// none: it resumes strictly after `since`.
    pub fn repeats(&self) -> u64 {
        self.repeats.load(Ordering::Relaxed)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why one connection ended.
enum End {
    /// Asked to move on ([`Subscriber::reconnect`]): reconnect at once.
    Asked,
    /// Closed or broken: reconnect after the backoff.
    Failed,
    /// Nobody listens any more.
    Stopped,
}

async fn run(config: SubscriberConfig, events: mpsc::Sender<Event>, reconnect: Arc<Notify>, repeats: Arc<AtomicU64>) {
    let mut backoff = Backoff::new(config.min_delay, config.max_delay, config.max_delay).with_full_jitter();
    let mut last: HashMap<String, i64> = HashMap::new();
    for attempt in 0.. {
        let url = &config.urls[attempt % config.urls.len()];
        let started = Instant::now();
        let end =
            match tokio::time::timeout(config.connect_timeout, tokio_tungstenite::connect_async(url.as_str())).await {
                Ok(Ok((ws, _))) => {
                    if events.send(Event::Connected { url: url.clone() }).await.is_err() {
                        return;
                    }
                    connection(ws, &config.rooms, &mut last, &events, &reconnect, &repeats).await
                }
                Ok(Err(error)) => lost(&events, error.to_string()).await,
                Err(_) => lost(&events, format!("no connection within {:?}", config.connect_timeout)).await,
            };
        match end {
            End::Stopped => return,
            End::Asked => backoff.reset(),
            End::Failed => {
                let delay = backoff.next_delay(started);
                tokio::time::sleep(delay).await;
            }
        }
    }
}

async fn lost(events: &mpsc::Sender<Event>, error: String) -> End {
    match events.send(Event::Lost { error }).await {
        Ok(()) => End::Failed,
        Err(_) => End::Stopped,
    }
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// One connection: subscribe every room (from its last position), then
/// deliver until it ends.
async fn connection(
    mut ws: Socket,
    rooms: &[String],
    last: &mut HashMap<String, i64>,
    events: &mpsc::Sender<Event>,
    reconnect: &Notify,
    repeats: &AtomicU64,
) -> End {
    for room in rooms {
        let mut subscribe = json!({"type": "subscribe", "room": room});
        if let Some(since) = last.get(room) {
            subscribe["since"] = json!(since.to_string());
        }
        if let Err(error) = ws.send(Message::text(subscribe.to_string())).await {
            return lost(events, error.to_string()).await;
        }
    }
    loop {
        let message = tokio::select! {
            () = reconnect.notified() => {
                let _ = ws.close(None).await;
                return End::Asked;
            }
            message = ws.next() => message,
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let (code, reason) = frame.map_or((None, String::new()), |f| {
                    (Some(u16::from(f.code)), f.reason.to_string())
                });
                return match events.send(Event::Closed { code, reason }).await {
                    Ok(()) => End::Failed,
                    Err(_) => End::Stopped,
                };
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => return lost(events, error.to_string()).await,
            None => return lost(events, "the connection ended".to_owned()).await,
        };
        let Ok(value) = serde_json::from_str::<Value>(&text) else {
            return lost(events, format!("not JSON from the gateway: {text}")).await;
        };
        for event in interpret(value, last, repeats) {
            if events.send(event).await.is_err() {
                return End::Stopped;
            }
        }
    }
}

/// What one server message means for the consumer, given the last position
/// delivered per room (updated here).
fn interpret(value: Value, last: &mut HashMap<String, i64>, repeats: &AtomicU64) -> Vec<Event> {
    let text = |v: &Value, key: &str| v[key].as_str().unwrap_or_default().to_owned();
    let position = |v: &Value| v["position"].as_str().and_then(|p| p.parse::<i64>().ok());
    let changes = match value["type"].as_str() {
        Some("change") => vec![value],
        Some("batch") => value["changes"].as_array().cloned().unwrap_or_default(),
        Some("subscribed") => {
            let room = text(&value, "room");
            let Some(at) = position(&value) else {
                return Vec::new();
            };
            let resumed = last.contains_key(&room);
            last.entry(room.clone()).or_insert(at);
            return vec![Event::Subscribed {
                room,
                position: at,
                resumed,
            }];
        }
        Some("reset") => {
            return vec![Event::Reset {
                room: text(&value, "room"),
                reason: text(&value, "reason"),
            }];
        }
        Some("error") => {
            return vec![Event::Refused {
                code: text(&value, "code"),
                message: text(&value, "message"),
            }];
        }
        _ => return Vec::new(),
    };
    let mut out = Vec::with_capacity(changes.len());
    for change in changes {
        let room = text(&change, "room");
        let Some(at) = position(&change) else { continue };
        if last.get(&room).is_some_and(|&seen| at <= seen) {
            repeats.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        last.insert(room.clone(), at);
        out.push(Event::Change {
            room,
            position: at,
            message: change,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_come_out_once_in_order_and_repeats_are_counted() {
        let mut last = HashMap::new();
        let repeats = AtomicU64::new(0);
        let subscribed = interpret(
            json!({"type": "subscribed", "room": "r", "position": "10"}),
            &mut last,
            &repeats,
        );
        assert_eq!(
            subscribed,
            [Event::Subscribed {
                room: "r".into(),
                position: 10,
                resumed: false
            }]
        );
        let change = |p: i64| json!({"type": "change", "room": "r", "position": p.to_string()});
        let batch = json!({"type": "batch", "changes": [change(11), change(12)]});
        let got = interpret(batch, &mut last, &repeats);
        assert_eq!(got.len(), 2);
        // Across a seam: 12 again, then 13.
        let got = interpret(change(12), &mut last, &repeats);
        assert!(got.is_empty());
        let got = interpret(change(13), &mut last, &repeats);
        assert!(matches!(&got[..], [Event::Change { position: 13, .. }]));
        assert_eq!(repeats.load(Ordering::Relaxed), 1);
        assert_eq!(last["r"], 13);
        // A resubscribe keeps the room's last position.
        let again = interpret(
            json!({"type": "subscribed", "room": "r", "position": "13"}),
            &mut last,
            &repeats,
        );
        assert!(matches!(&again[..], [Event::Subscribed { resumed: true, .. }]));
        let reset = interpret(
            json!({"type": "reset", "room": "r", "reason": "history_expired"}),
            &mut last,
            &repeats,
        );
        assert_eq!(
            reset,
            [Event::Reset {
                room: "r".into(),
                reason: "history_expired".into()
            }]
        );
        assert!(interpret(json!({"type": "welcome"}), &mut last, &repeats).is_empty());
    }
}
