//! One client connection: a receive loop that handles what the client sends,
//! and a send loop that owns the socket's writing half and works through the
//! connection's queue (changes, protocol replies, replays, close requests).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use crate::app::AppState;
use crate::auth::Identity;
use crate::change::{Notification, Position, now_us};
use crate::protocol::{self, ClientMessage, ProtocolError, codes};
use crate::pipeline::encode::{Encoding, Unit, merge};
use crate::rooms::{CloseReason, Joined, Outbound, Room, Subscriber};
use crate::telemetry::Counters;

/// Most frames written between two flushes: a socket that fell behind
/// catches up in large writes, and still yields to other tasks.
const MAX_FRAMES_PER_WRITE: usize = 256;
/// The longest a replay from the outbox may take before the client is told
/// to come back (1013) rather than have its live changes wait behind it.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);
/// Outbox rows read per replay query.
const REPLAY_PAGE: i64 = 500;
/// A client that sends this many refused messages within the window is
/// closed: it is broken or hostile, and answering it costs everyone.
const ERROR_BUDGET: u32 = 50;
const ERROR_WINDOW: Duration = Duration::from_secs(10);
/// How long a client that stopped reading has to read on before its socket
/// is dropped without a close frame.
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the client's half of a closing handshake.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// What both halves of a connection know about the client's liveness.
struct Liveness {
    /// When anything was last heard from the client (gateway clock, us).
    last_heard_us: AtomicI64,
    /// Last measured ping round trip, us (0 until measured).
    round_trip_us: AtomicI64,
}

/// Serves one upgraded WebSocket until either side closes it or the gateway
/// shuts down.
pub async fn serve(
    socket: WebSocket,
    state: Arc<AppState>,
    identity: Identity,
    connection_id: u64,
    encoding: Encoding,
) {
    let settings = state.settings();
    let (subscriber, queue) = Subscriber::new(connection_id, settings.limits.send_queue_bytes);
    let liveness = Arc::new(Liveness {
        last_heard_us: AtomicI64::new(now_us()),
        round_trip_us: AtomicI64::new(0),
    });
    subscriber.push_control(protocol::welcome_message(
        &format!("{}-{connection_id}", state.instance_id),
        settings.heartbeat.interval.as_millis() as u64,
        encoding.as_str(),
    ));

    let (sink, stream) = socket.split();
    let mut session = Session {
        state: Arc::clone(&state),
        subscriber: Arc::clone(&subscriber),
        identity,
        rooms: HashSet::new(),
        errors: ErrorBudget::default(),
    };
    {
        let send = send_loop(sink, queue, &subscriber, &state, &liveness, encoding);
        let receive = session.receive_loop(stream, &liveness);
        tokio::pin!(send, receive);
        tokio::select! {
            () = &mut send => {
                // We closed (slow consumer, shutdown, write error): give the
                // client a moment to answer the close frame.
                let _ = tokio::time::timeout(CLOSE_LINGER, &mut receive).await;
            }
            () = &mut receive => {
                // The client closed or broke the protocol: answer its close.
                subscriber.close(CloseReason::new(1000, ""));
                let _ = tokio::time::timeout(CLOSE_LINGER, &mut send).await;
            }
        }
    }
    for room in &session.rooms {
        state.hub.unsubscribe(room, connection_id);
    }
    if subscriber.close_reason_code() == Some(CloseReason::SLOW_CONSUMER) {
        Counters::add(&state.telemetry.counters.slow_consumer_closes, 1);
    }
    tracing::debug!(connection_id, "connection closed");
}

/// Writes queued items to the socket, flushing once per drained batch; sends
/// pings; closes the socket when asked to.
async fn send_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::UnboundedReceiver<Outbound>,
    subscriber: &Subscriber,
    state: &AppState,
    liveness: &Liveness,
    encoding: Encoding,
) {
    let settings = state.settings();
    let mut ping = tokio::time::interval(settings.heartbeat.interval);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    let mut writer = Writer {
        encoding,
        latencies: Vec::new(),
        carry: None,
    };
    let close = loop {
        tokio::select! {
            biased;
            reason = subscriber.close_requested() => break reason,
            () = state.shutdown.cancelled() => break CloseReason::new(
                CloseReason::GOING_AWAY,
                "gateway shutting down; reconnect and resume from your last position",
            ),
            item = next_item(&mut writer.carry, &mut queue) => {
                let Some(item) = item else { return };
                let written = writer.write_ready(&mut sink, item, &mut queue, subscriber, state).await;
                if let Err(reason) = written {
                    break reason;
                }
                // A client that stops reading blocks this flush. Once its
                // queue overflows (close requested) it has a grace period to
                // read on and get its close frame; then the socket is
                // dropped: it must not hold a task or memory forever.
                tokio::select! {
                    flushed = sink.flush() => if flushed.is_err() { return },
                    reason = subscriber.close_requested() => {
                        match tokio::time::timeout(SLOW_CLOSE_GRACE, sink.flush()).await {
                            Ok(Ok(())) => break reason,
                            _ => return,
                        }
                    }
                }
                writer.record_latencies(state);
            }
            _ = ping.tick() => {
                let silent_us = now_us() - liveness.last_heard_us.load(Ordering::Relaxed);
                let timeout = settings.heartbeat.connection_timeout;
                if silent_us > timeout.as_micros() as i64 {
                    break CloseReason::new(
                        CloseReason::POLICY,
                        format!("no pong or message for {} ms", timeout.as_millis()),
                    );
                }
                let stamp = now_us().to_be_bytes();
                if sink.send(Message::Ping(stamp.to_vec().into())).await.is_err() {
                    return;
                }
            }
        }
    };
    let frame = CloseFrame {
        code: close.code,
        reason: close.reason.into(),
    };
    let _ = tokio::time::timeout(SLOW_CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
}

/// The next queued item: one held back by the last merge, else the queue's.
async fn next_item(carry: &mut Option<Outbound>, queue: &mut mpsc::UnboundedReceiver<Outbound>) -> Option<Outbound> {
    match carry.take() {
        Some(item) => Some(item),
        None => queue.recv().await,
    }
}

/// The send loop's state between writes.
struct Writer {
    encoding: Encoding,
    /// Commit times of the changes written since the last flush.
    latencies: Vec<i64>,
    /// An item taken from the queue that did not fit the last merge.
    carry: Option<Outbound>,
}

impl Writer {
    /// Feeds `first` and whatever else is queued right now (up to
    /// [`MAX_FRAMES_PER_WRITE`] frames) to the socket; the caller flushes.
    /// While the socket was busy, changes waiting for it are merged into
    /// batches of up to the batch size (plain-text clients; compressed units
    /// go as they are, to keep their shared compressed bytes).
    async fn write_ready(
        &mut self,
        sink: &mut SplitSink<WebSocket, Message>,
        first: Outbound,
        queue: &mut mpsc::UnboundedReceiver<Outbound>,
        subscriber: &Subscriber,
        state: &AppState,
    ) -> Result<(), CloseReason> {
        let settings = state.settings();
        let stats = &state.hub.stats;
        let mut item = first;
        let mut frames = 0;
        loop {
            subscriber.sent(item.queued_size());
            let message = match item {
                Outbound::Control(text) => Message::Text(text),
                Outbound::Replay { room, since, upto } => {
                    tokio::time::timeout(REPLAY_TIMEOUT, replay(sink, state, &room, since, upto))
                        .await
                        .unwrap_or_else(|_| Err(CloseReason::new(1013, "history read timed out; reconnect and resume")))?;
                    match self.next_ready(queue) {
                        Some(next) => {
                            item = next;
                            continue;
                        }
                        None => return Ok(()),
                    }
                }
                Outbound::Changes(unit) => {
                    let mergeable = |u: &Unit| {
                        self.encoding == Encoding::None && settings.features.batching && !u.priority
                    };
                    let mut units = vec![unit];
                    if mergeable(&units[0]) {
                        let mut count = units[0].change_count();
                        while count < settings.pipeline.batch_size {
                            match queue.try_recv() {
                                Ok(Outbound::Changes(next))
                                    if mergeable(&next) && count + next.change_count() <= settings.pipeline.batch_size =>
                                {
                                    subscriber.sent(next.text.len());
                                    count += next.change_count();
                                    units.push(next);
                                }
                                Ok(other) => {
                                    self.carry = Some(other);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                    }
                    for unit in &units {
                        self.latencies.extend_from_slice(&unit.committed_at_us);
                    }
                    let changes: usize = units.iter().map(|u| u.change_count()).sum();
                    let raw: usize = units.iter().map(|u| u.text.len()).sum();
                    let message = if units.len() > 1 {
                        Message::Text(merge(&units).into())
                    } else {
                        let unit = &units[0];
                        let compress = settings.features.compression
                            && unit.text.len() > settings.pipeline.compression_threshold;
                        match unit.compressed(self.encoding, settings.pipeline.compression_level) {
                            Some(bytes) if compress => Message::Binary(bytes.clone()),
                            _ => Message::Text(unit.text.clone()),
                        }
                    };
                    let sent = match &message {
                        Message::Binary(b) => b.len(),
                        Message::Text(t) => t.len(),
                        _ => 0,
                    };
                    let encoding = if matches!(message, Message::Binary(_)) { self.encoding } else { Encoding::None };
                    stats.record_frame(encoding, changes, raw, sent);
                    message
                }
            };
            if let Message::Text(text) = &message {
                Counters::add(&state.telemetry.counters.bytes_sent, text.len() as u64);
            } else if let Message::Binary(bytes) = &message {
                Counters::add(&state.telemetry.counters.bytes_sent, bytes.len() as u64);
            }
            Counters::add(&state.telemetry.counters.messages_sent, 1);
            sink.feed(message)
                .await
                .map_err(|e| CloseReason::new(1011, format!("write failed: {e}")))?;
            frames += 1;
            if frames >= MAX_FRAMES_PER_WRITE {
                return Ok(());
            }
            match self.next_ready(queue) {
                Some(next) => item = next,
                None => return Ok(()),
            }
        }
    }

    fn next_ready(&mut self, queue: &mut mpsc::UnboundedReceiver<Outbound>) -> Option<Outbound> {
        self.carry.take().or_else(|| queue.try_recv().ok())
    }

    /// Commit-to-send for what was just flushed, on the database's clock.
    fn record_latencies(&mut self, state: &AppState) {
        if self.latencies.is_empty() {
            return;
        }
        let offset = state.telemetry.feed.clock_offset_us.load(Ordering::Relaxed);
        let now = now_us() + offset;
        state
            .telemetry
            .commit_to_send
            .record_all(self.latencies.drain(..).map(|committed| (now - committed).max(0) as u64));
    }
}

/// Sends a room's history `(since, upto]` from the outbox, or `reset` when
/// part of it has been pruned. Runs in the send loop, so live changes queued
/// meanwhile wait behind it and follow it in order.
async fn replay(
    sink: &mut SplitSink<WebSocket, Message>,
    state: &AppState,
    room: &Room,
    since: Position,
    upto: Position,
) -> Result<(), CloseReason> {
    let unavailable = |e: sqlx::Error| {
        tracing::warn!(error = %e, room = %room, "history read failed");
        // Try Again Later: the client resumes from the same position.
        CloseReason::new(1013, "history unavailable right now; reconnect and resume")
    };
    let mut tx = state.pool.begin().await.map_err(unavailable)?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    let pruned_through: i64 = sqlx::query_scalar("select pruned_through from realtime.settings")
        .fetch_one(&mut *tx)
        .await
        .map_err(unavailable)?;
    if since.0 < pruned_through {
        let reset = protocol::reset_message(room, "history_expired");
        return sink
            .feed(Message::Text(reset.into()))
            .await
            .map_err(|e| CloseReason::new(1011, format!("write failed: {e}")));
    }
    let mut from = since;
    loop {
        let page: Vec<String> = sqlx::query_scalar(
            "select realtime.payload(c) from realtime.changes c \
             where c.position > $1 and c.position <= $2 and $3 = any (c.rooms) \
             order by c.position limit $4",
        )
        .bind(from.0)
        .bind(upto.0)
        .bind(&**room)
        .bind(REPLAY_PAGE)
        .fetch_all(&mut *tx)
        .await
        .map_err(unavailable)?;
        for doc in &page {
            let Ok(Notification::Change(change)) = Notification::parse(doc) else {
                continue;
            };
            from = change.position;
            sink.feed(Message::Text(change.message_for(room).into()))
                .await
                .map_err(|e| CloseReason::new(1011, format!("write failed: {e}")))?;
        }
        if (page.len() as i64) < REPLAY_PAGE {
            return Ok(());
        }
    }
}

impl Session {
    /// A `since` ahead of this instance's feed is fine when another instance
    /// handed it out (this one will catch up); one ahead of the database
    /// never came from us.
    async fn check_position_exists(&self, since: Position) -> Result<(), ProtocolError> {
        let query = sqlx::query_scalar("select last_value from realtime.position_seq").fetch_one(&self.state.pool);
        let latest: Result<i64, String> = match tokio::time::timeout(Duration::from_secs(5), query).await {
            Ok(result) => result.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".into()),
        };
        match latest {
            Ok(latest) if since.0 > latest => Err(ProtocolError::new(
                codes::INVALID_POSITION,
                format!("position {since} was never handed out by this database (latest is {latest})"),
            )),
            Ok(_) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "could not check a resume position");
                Err(ProtocolError::new(
                    codes::HISTORY_UNAVAILABLE,
                    "cannot check that position right now; retry",
                ))
            }
        }
    }
}

/// Counts refused messages in a sliding window.
#[derive(Default)]
struct ErrorBudget {
    window_start: Option<Instant>,
    count: u32,
}

impl ErrorBudget {
    /// Records one refusal; true when the budget is spent.
    fn spend(&mut self) -> bool {
        let now = Instant::now();
        match self.window_start {
            Some(start) if now.duration_since(start) < ERROR_WINDOW => self.count += 1,
            _ => {
                self.window_start = Some(now);
                self.count = 1;
            }
        }
        self.count > ERROR_BUDGET
    }
}

/// The receiving half's state.
struct Session {
    state: Arc<AppState>,
    subscriber: Arc<Subscriber>,
    identity: Identity,
    rooms: HashSet<Room>,
    errors: ErrorBudget,
}

impl Session {
    async fn receive_loop(&mut self, mut stream: SplitStream<WebSocket>, liveness: &Liveness) {
        while let Some(message) = stream.next().await {
            liveness.last_heard_us.store(now_us(), Ordering::Relaxed);
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    self.on_read_error(error);
                    return;
                }
            };
            Counters::add(&self.state.telemetry.counters.messages_received, 1);
            match message {
                Message::Text(text) => self.on_text(&text).await,
                Message::Binary(_) => self.refuse(ProtocolError::new(
                    codes::BINARY_NOT_SUPPORTED,
                    "binary frames are not accepted; send JSON text frames",
                )),
                Message::Pong(payload) => {
                    if let Ok(stamp) = <[u8; 8]>::try_from(&payload[..]) {
                        let round_trip = now_us() - i64::from_be_bytes(stamp);
                        liveness
                            .round_trip_us
                            .store(round_trip.max(0), Ordering::Relaxed);
                    }
                }
                Message::Ping(_) => {}
                Message::Close(_) => return,
            }
            if self.subscriber.is_closing() {
                return;
            }
        }
    }

    fn on_read_error(&self, error: axum::Error) {
        use tokio_tungstenite::tungstenite::Error as WsError;
        let inner = error.into_inner();
        match inner.downcast_ref::<WsError>() {
            Some(WsError::Capacity(capacity)) => {
                Counters::add(&self.state.telemetry.counters.client_errors, 1);
                self.subscriber.close(CloseReason::new(
                    CloseReason::TOO_BIG,
                    format!("inbound message too big: {capacity}"),
                ));
            }
            _ => tracing::debug!(connection_id = self.subscriber.id, error = %inner, "read failed"),
        }
    }

    fn refuse(&mut self, error: ProtocolError) {
        Counters::add(&self.state.telemetry.counters.client_errors, 1);
        self.subscriber.push_control(error.to_message());
        if self.errors.spend() {
            self.subscriber.close(CloseReason::new(
                CloseReason::POLICY,
                format!("more than {ERROR_BUDGET} refused messages in {ERROR_WINDOW:?}"),
            ));
        }
    }

    async fn on_text(&mut self, text: &str) {
        let limit = self.state.settings().limits.max_message_bytes;
        if text.len() > limit {
            return self.refuse(ProtocolError::new(
                codes::MESSAGE_TOO_BIG,
                format!("message is {} bytes; at most {limit} allowed", text.len()),
            ));
        }
        let result = match protocol::decode(text) {
            Ok(message) => self.handle(message).await,
            Err(error) => Err(error),
        };
        if let Err(error) = result {
            self.refuse(error);
        }
    }

    async fn handle(&mut self, message: ClientMessage) -> Result<(), ProtocolError> {
        match message {
            ClientMessage::Subscribe { room, since } => self.subscribe(room, since).await,
            ClientMessage::Unsubscribe { room } => {
                if !self.rooms.remove(room.as_str()) {
                    return Err(ProtocolError::new(
                        codes::NOT_SUBSCRIBED,
                        format!("not subscribed to {room:?}"),
                    ));
                }
                self.state.hub.unsubscribe(&room, self.subscriber.id);
                self.subscriber
                    .push_control(protocol::unsubscribed_message(&room));
                Ok(())
            }
            // Acks feed the commit-to-ack measurement (its own issue).
            ClientMessage::Ack { .. } => Ok(()),
            ClientMessage::Auth { token } => {
                let identity = self
                    .state
                    .auth
                    .authenticate(Some(&token))
                    .map_err(|e| ProtocolError::new(codes::INVALID_TOKEN, e.to_string()))?;
                self.identity = identity;
                let revoked: Vec<Room> = self
                    .rooms
                    .iter()
                    .filter(|room| !self.identity.grants.allows(room))
                    .cloned()
                    .collect();
                for room in revoked {
                    self.rooms.remove(&room);
                    self.state.hub.unsubscribe(&room, self.subscriber.id);
                    self.subscriber
                        .push_control(protocol::unsubscribed_message(&room));
                }
                Ok(())
            }
        }
    }

    async fn subscribe(&mut self, room: String, since: Option<Position>) -> Result<(), ProtocolError> {
        if !self.identity.grants.allows(&room) {
            return Err(ProtocolError::new(
                codes::FORBIDDEN,
                format!("your token does not grant room {room:?}"),
            ));
        }
        if self.rooms.contains(room.as_str()) {
            return Err(ProtocolError::new(
                codes::ALREADY_SUBSCRIBED,
                format!("already subscribed to {room:?}"),
            ));
        }
        let limit = self.state.settings().limits.max_subscriptions;
        if self.rooms.len() >= limit {
            return Err(ProtocolError::new(
                codes::TOO_MANY_SUBSCRIPTIONS,
                format!("at most {limit} subscriptions per connection"),
            ));
        }
        if let Some(since) = since
            && since > self.state.hub.position()
        {
            self.check_position_exists(since).await?;
        }
        match self.state.hub.subscribe(&room, &self.subscriber, since) {
            Joined::Live { .. } => {
                self.rooms.insert(Room::from(room));
                Ok(())
            }
            Joined::AlreadyMember => Err(ProtocolError::new(
                codes::ALREADY_SUBSCRIBED,
                format!("already subscribed to {room:?}"),
            )),
        }
    }
}
