//! The application's handles: [`Client`] (one connection, shared by every
//! room), its [`ClientBuilder`], and [`Subscription`], a `Stream` of one
//! room's updates.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::connection::{Command, Task};
use crate::frames::Encoding;
use crate::token::{Token, TokenError};
use crate::update::{Position, Update};

/// Longest room name the gateway accepts (in UTF-8 bytes).
const MAX_ROOM_BYTES: usize = 200;
/// Client events kept for a listener that reads slowly (older ones are
/// skipped, never blocking the connection).
const EVENTS_KEPT: usize = 1024;

/// How a [`Client`] connects; see [`Client::builder`].
#[derive(Debug, Clone)]
pub(crate) struct Options {
    /// `ws://host:port/ws` URLs, one after another on each reconnect.
    pub(crate) urls: Vec<String>,
    pub(crate) token: Token,
    pub(crate) encoding: Encoding,
    /// Reconnect backoff bounds (full jitter).
    pub(crate) min_delay: Duration,
    pub(crate) max_delay: Duration,
    /// A connection attempt that takes longer has failed.
    pub(crate) connect_timeout: Duration,
    /// A socket that has not said `welcome` by then is given up (a hung
    /// gateway, a proxy that accepted and went silent).
    pub(crate) welcome_timeout: Duration,
    /// Updates a subscription holds for an application that reads it
    /// slowly, before the connection stops reading.
    pub(crate) buffer: usize,
}

/// Builds a [`Client`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    options: Options,
}

impl ClientBuilder {
    /// Another gateway instance: each reconnect moves to the next URL.
    pub fn url(mut self, url: impl Into<String>) -> ClientBuilder {
        self.options.urls.push(url.into());
        self
    }

    /// The same token on every connect (it cannot be refreshed: the
    /// connection closes 4001 at its `exp`, and reconnects with it).
    pub fn token(mut self, token: impl Into<String>) -> ClientBuilder {
        self.options.token = Token::Fixed(token.into());
        self
    }

    /// A function asked for a token on every connect and again before each
    /// token's `exp` (the fresh one is sent in band, so the connection lives
    /// on).
    pub fn token_fn<F, Fut>(mut self, f: F) -> ClientBuilder
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<String, TokenError>> + Send + 'static,
    {
        self.options.token = Token::function(f);
        self
    }

    /// Compression of large frames (default brotli).
    pub fn encoding(mut self, encoding: Encoding) -> ClientBuilder {
        self.options.encoding = encoding;
        self
    }

    /// Reconnect backoff: the n-th retry waits a random time up to
    /// `min(max, min * 2^n)` (full jitter). Default 500 ms to 20 s.
    pub fn reconnect_delays(mut self, min: Duration, max: Duration) -> ClientBuilder {
        self.options.min_delay = min.max(Duration::from_millis(1));
        self.options.max_delay = max.max(self.options.min_delay);
        self
    }

    /// Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientBuilder {
        self.options.connect_timeout = timeout;
        self
    }

    /// Updates a subscription holds before the connection waits for the
    /// application to read (default 1024). A connection that waits long
    /// enough is closed by the gateway as a slow consumer, and resumes.
    pub fn buffer(mut self, updates: usize) -> ClientBuilder {
        self.options.buffer = updates.max(1);
        self
    }

    /// Starts the client's task on the current tokio runtime: it connects,
    /// and keeps reconnecting, until [`Client::close`] or until every
    /// handle (the client and its subscriptions) is dropped.
    pub fn start(self) -> Client {
        let (commands, rx) = mpsc::unbounded_channel();
        let (events, _) = broadcast::channel(EVENTS_KEPT);
        let stats = Arc::new(Stats::default());
        let stop = CancellationToken::new();
        let buffer = self.options.buffer;
        let task = Task {
            options: self.options,
            commands: rx,
            events: events.clone(),
            stats: Arc::clone(&stats),
            stop: stop.clone(),
        };
        tokio::spawn(task.run());
        Client {
            shared: Arc::new(Shared {
                commands,
                events: events.downgrade(),
                stats,
                stop,
                rooms: Mutex::new(HashSet::new()),
                buffer,
            }),
        }
    }
}

/// What a connection went through, and problems not tied to one room.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ClientEvent {
    Connecting {
        /// Failed attempts since the last healthy connection.
        attempt: u32,
        url: String,
    },
    Connected {
        connection_id: String,
        url: String,
    },
    Disconnected {
        /// The gateway's close code (1001 shutting down, 4001 token expired,
        /// 4008 slow consumer...); `None` when the connection broke or was
        /// judged dead without one.
        code: Option<u16>,
        reason: String,
        /// When the next attempt goes; `None` after [`Client::close`].
        reconnect_in: Option<Duration>,
    },
    /// `invalid_token` (a refused refresh), `rate_limited`,
    /// `token_refresh_failed`...: the client carries on.
    Error {
        code: String,
        message: String,
    },
}

/// Counters since the client started.
#[derive(Debug, Default)]
pub struct Stats {
    pub(crate) connections: AtomicU64,
    pub(crate) frames: AtomicU64,
    pub(crate) changes: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) acks: AtomicU64,
    pub(crate) pings: AtomicU64,
    pub(crate) token_refreshes: AtomicU64,
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: get(&self.connections),
            frames: get(&self.frames),
            changes: get(&self.changes),
            duplicates: get(&self.duplicates),
            acks: get(&self.acks),
            pings: get(&self.pings),
            token_refreshes: get(&self.token_refreshes),
        }
    }
}

/// [`Client::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Connections opened.
    pub connections: u64,
    /// Server messages handled.
    pub frames: u64,
    /// Changes and events delivered to subscriptions.
    pub changes: u64,
    /// Changes dropped at a seam: at or below their room's position. A
    /// gateway that keeps its promise sends none; this is the guard.
    pub duplicates: u64,
    pub acks: u64,
    pub pings: u64,
    /// Tokens sent in band before `exp`.
    pub token_refreshes: u64,
}

/// Why [`Client::subscribe`] refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("already subscribed to {0:?} on this client: one subscription per room")]
    AlreadySubscribed(String),
    /// The gateway would refuse the name (`invalid_room`).
    #[error("invalid room name {room:?}: {reason}")]
    InvalidRoom { room: String, reason: String },
    #[error("this client is closed")]
    Closed,
}

struct Shared {
    commands: mpsc::UnboundedSender<Command>,
    /// Only the task holds the sender: when it ends, event streams end.
    events: broadcast::WeakSender<ClientEvent>,
    stats: Arc<Stats>,
    stop: CancellationToken,
    /// Rooms subscribed through this client (one subscription per room).
    rooms: Mutex<HashSet<String>>,
    /// Each subscription's channel capacity ([`ClientBuilder::buffer`]).
    buffer: usize,
}

/// A resuming ws-gateway client: one connection, any number of rooms, each
/// a [`Subscription`]. Cloning shares it.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// A client of the gateway at `url` (`ws://host:port/ws`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            options: Options {
                urls: vec![url.into()],
                token: Token::None,
                encoding: Encoding::default(),
                min_delay: Duration::from_millis(500),
                max_delay: Duration::from_secs(20),
                connect_timeout: Duration::from_secs(10),
                welcome_timeout: Duration::from_secs(15),
                buffer: 1024,
            },
        }
    }

    /// Subscribes to `room`, from `since` (a position received earlier,
    /// e.g. stored with the application's state) or from now.
    pub fn subscribe(&self, room: &str, since: Option<Position>) -> Result<Subscription, SubscribeError> {
        if let Some(reason) = room_problem(room) {
            return Err(SubscribeError::InvalidRoom {
                room: room.to_owned(),
                reason,
            });
        }
        if self.shared.stop.is_cancelled() {
            return Err(SubscribeError::Closed);
        }
        if !self.shared.rooms.lock().expect("rooms lock").insert(room.to_owned()) {
            return Err(SubscribeError::AlreadySubscribed(room.to_owned()));
        }
        let (tx, rx) = mpsc::channel(self.shared.buffer);
        let command = Command::Subscribe {
            room: room.to_owned(),
            since,
            tx,
        };
        if self.shared.commands.send(command).is_err() {
            self.shared.rooms.lock().expect("rooms lock").remove(room);
            return Err(SubscribeError::Closed);
        }
        Ok(Subscription {
            room: room.to_owned(),
            position: since,
            rx,
            shared: Arc::clone(&self.shared),
            ended: false,
        })
    }

    /// Connection events from now on (a listener that falls more than 1024
    /// behind skips the oldest). The stream ends once the client has
    /// stopped.
    pub fn events(&self) -> impl Stream<Item = ClientEvent> + Send + 'static {
        let rx = self.shared.events.upgrade().map(|events| events.subscribe());
        futures_util::stream::unfold(rx, |rx| async move {
            let mut rx = rx?;
            loop {
                match rx.recv().await {
                    Ok(event) => return Some((event, Some(rx))),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        })
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    /// Leaves the current connection and resumes on the next URL at once
    /// (moving to another gateway instance, say).
    pub fn reconnect(&self) {
        let _ = self.shared.commands.send(Command::Reconnect);
    }

    /// Closes the connection for good: subscriptions end (their streams
    /// return `None` once drained), nothing reconnects.
    pub fn close(&self) {
        self.shared.stop.cancel();
    }
}

/// Why the gateway would refuse `room` (`None`: it would not).
fn room_problem(room: &str) -> Option<String> {
    if room.is_empty() {
        return Some("room name is empty".into());
    }
    if room.len() > MAX_ROOM_BYTES {
        return Some(format!(
            "room name is {} bytes; at most {MAX_ROOM_BYTES} allowed",
            room.len()
        ));
    }
    if room.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Some("room name must not contain spaces or control characters".into());
    }
    if room.contains('*') {
        return Some("room name must not contain '*' (patterns only grant rooms in tokens)".into());
    }
    None
}

/// One room's updates, in commit order, each change once, across
/// reconnects: a `Stream` of [`Update`]. Dropping it unsubscribes.
pub struct Subscription {
    room: String,
    position: Option<Position>,
    rx: mpsc::Receiver<Update>,
    shared: Arc<Shared>,
    ended: bool,
}

impl Subscription {
    pub fn room(&self) -> &str {
        &self.room
    }

    /// The position of the last update taken from this stream (or where
    /// it started): store it with what you did with the change, and
    /// subscribe `since` it to resume after a restart.
    pub fn position(&self) -> Option<Position> {
        self.position
    }
}

impl Stream for Subscription {
    type Item = Update;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Update>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(update)) = &polled {
            match update {
                Update::Change(c) | Update::Event(c) => self.position = Some(c.position),
                Update::Subscribed {
                    position,
                    resumed: false,
                } if self.position.is_none() => {
                    self.position = Some(*position);
                }
                Update::Reset { position: after, .. } if self.position.is_none_or(|p| *after > p) => {
                    self.position = Some(*after);
                }
                Update::Refused { .. } => self.ended = true,
                _ => {}
            }
        }
        polled
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.shared.rooms.lock().expect("rooms lock").remove(&self.room);
        if !self.ended {
            let _ = self.shared.commands.send(Command::Unsubscribe {
                room: self.room.clone(),
            });
        }
    }
}
