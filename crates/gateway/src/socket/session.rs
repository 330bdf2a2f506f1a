//! The receiving half of a connection: decodes what the client sends and
//! acts on it (subscribe, unsubscribe, ack, auth), within its limits, and
//! closes the connection when its token expires.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures_util::StreamExt;
use futures_util::stream::SplitStream;
use tokio::time::Instant;

use super::limits::{ErrorBudget, RateLimit, Verdict};
use crate::auth::Identity;
use crate::change::{Position, now_us};
use crate::hub::{CloseKind, CloseReason, Joined, Room, Subscriber};
use crate::protocol::{self, ClientMessage, ProtocolError, codes};
use crate::state::AppState;
use crate::state::Liveness;
use crate::telemetry::Counters;

/// A client that sends this many refused messages within the window is
/// closed: it is broken or hostile, and answering it costs everyone.
const ERROR_BUDGET: u32 = 50;
const ERROR_WINDOW: Duration = Duration::from_secs(10);
/// How long a subscribe waits for a gateway that just started to find the
/// live position before it is refused.
const FEED_READY_WAIT: Duration = Duration::from_secs(10);
/// The longest single sleep towards a token's expiry.
const EXPIRY_STEP: Duration = Duration::from_secs(24 * 3600);

/// Returns at `expiry` (never for None). Far deadlines (a token valid for
/// centuries) are slept in steps the timer holds exactly.
pub(super) async fn until(expiry: Option<Instant>) {
    match expiry {
        Some(at) => loop {
            let step = Instant::now() + EXPIRY_STEP;
            if at <= step {
                break tokio::time::sleep_until(at).await;
            }
            tokio::time::sleep_until(step).await;
        },
        None => std::future::pending().await,
    }
}

/// [`until`] for the receive loop, which waits on it beside every read: the
/// timer (and its registration) is made only for a token that expires, and
/// lives on the heap while it is waited on, not in every connection's task.
async fn expiring(expiry: Option<Instant>) {
    match expiry {
        Some(_) => Box::pin(until(expiry)).await,
        None => std::future::pending().await,
    }
}

/// The receiving half's state.
pub(super) struct Session {
    state: Arc<AppState>,
    subscriber: Arc<Subscriber>,
    identity: Identity,
    rooms: HashSet<Room>,
    liveness: Arc<Liveness>,
    errors: ErrorBudget,
    rate: RateLimit,
}

impl Session {
    pub(super) fn new(
        state: Arc<AppState>,
        subscriber: Arc<Subscriber>,
        identity: Identity,
        liveness: Arc<Liveness>,
    ) -> Session {
        let rate = RateLimit::new(state.settings().limits.rate_limit, Instant::now());
        Session {
            state,
            subscriber,
            identity,
            rooms: HashSet::new(),
            liveness,
            errors: ErrorBudget::new(ERROR_BUDGET, ERROR_WINDOW),
            rate,
        }
    }

    /// Leaves every room (the connection is gone).
    pub(super) fn leave_all(&mut self) {
        for room in self.rooms.drain() {
            self.state.hub.unsubscribe(&room, self.subscriber.id);
        }
    }

    /// When the token stops being valid: its `exp` plus the leeway (a token
    /// accepted within the leeway after `exp` lives until then, no longer).
    /// None: never, or too far ahead for the clock to hold.
    pub(super) fn expires_at(&self) -> Option<Instant> {
        let exp = self.identity.expires_at?;
        let leeway = self.state.settings().history.jwt_leeway;
        // In microseconds as i128: any exp up to year 9999 fits exactly.
        let left_us = (i128::from(exp) * 1_000_000 + leeway.as_micros() as i128 - i128::from(now_us())).max(0);
        Instant::now().checked_add(Duration::from_micros(u64::try_from(left_us).ok()?))
    }

    pub(super) async fn receive_loop(&mut self, mut stream: SplitStream<WebSocket>) {
        loop {
            let expiry = self.expires_at();
            let next = tokio::select! {
                next = stream.next() => next,
                () = expiring(expiry) => {
                    self.state.refusals.count("token_expired");
                    self.subscriber.close(CloseReason::new(
                        CloseKind::TokenExpired,
                        "token expired: reconnect with a fresh token (or send {\"type\":\"auth\"} before exp)",
                    ));
                    return;
                }
            };
            let Some(message) = next else { return };
            if self.subscriber.is_closing() {
                // Closing: read on (ignoring it) until the client's close
                // frame, so the socket is not torn down with unread data,
                // which would reset it and lose our close frame.
                match message {
                    Ok(Message::Close(_)) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
            let now = now_us();
            self.liveness.last_heard_us.store(now, Ordering::Relaxed);
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    self.on_read_error(error);
                    return;
                }
            };
            match message {
                Message::Text(text) => {
                    Counters::add(&self.state.telemetry.counters.bytes_received, text.len() as u64);
                    self.liveness.last_message_us.store(now, Ordering::Relaxed);
                    if self.admit(&text) {
                        // Boxed: what handling a request holds (the decoded
                        // request, the database calls) is needed only while
                        // it runs; unboxed it would sit in every idle
                        // connection's task.
                        Box::pin(self.on_text(&text)).await;
                    }
                }
                Message::Binary(bytes) => {
                    Counters::add(&self.state.telemetry.counters.bytes_received, bytes.len() as u64);
                    self.liveness.last_message_us.store(now, Ordering::Relaxed);
                    if self.admit("") {
                        self.refuse(ProtocolError::new(
                            codes::BINARY_NOT_SUPPORTED,
                            "binary frames are not accepted; send JSON text frames",
                        ));
                    }
                }
                Message::Pong(payload) => {
                    if let Ok(stamp) = <[u8; 8]>::try_from(&payload[..]) {
                        let round_trip = now - i64::from_be_bytes(stamp);
                        self.liveness.round_trip_us.store(round_trip.max(0), Ordering::Relaxed);
                        self.liveness.ping_outstanding.store(false, Ordering::Relaxed);
                    }
                }
                Message::Ping(_) => {}
                Message::Close(_) => return,
            }
        }
    }

    /// The inbound rate limit (`GATEWAY_RATE_LIMIT` messages/s). A dropped
    /// text message is named in the refusal (its `type`, `room` and `id`),
    /// so the client knows what to send again.
    fn admit(&mut self, text: &str) -> bool {
        Counters::add(&self.state.telemetry.counters.messages_received, 1);
        match self.rate.check(Instant::now()) {
            Verdict::Allow => true,
            Verdict::Refuse => {
                let limit = self.state.settings().limits.rate_limit;
                let request = if text.len() <= self.state.settings().limits.max_message_bytes {
                    protocol::decode_request(text).0
                } else {
                    Default::default()
                };
                self.refuse(
                    ProtocolError::new(
                        codes::RATE_LIMITED,
                        format!("more than {limit} messages per second; this one was dropped"),
                    )
                    .refusing(&request),
                );
                false
            }
            Verdict::Close => {
                self.state.refusals.count("rate_limit_close");
                self.subscriber
                    .close(CloseReason::new(CloseKind::RateLimited, "rate limit exceeded"));
                false
            }
        }
    }

    fn on_read_error(&self, error: axum::Error) {
        use tokio_tungstenite::tungstenite::Error as WsError;
        let inner = error.into_inner();
        match inner.downcast_ref::<WsError>() {
            Some(WsError::Capacity(capacity)) => {
                Counters::add(&self.state.telemetry.counters.client_errors, 1);
                self.state.refusals.count("message_too_big_close");
                self.subscriber.close(CloseReason::new(
                    CloseKind::MessageTooBig,
                    format!("inbound message too big: {capacity}"),
                ));
            }
            Some(WsError::Protocol(error)) => {
                Counters::add(&self.state.telemetry.counters.client_errors, 1);
                self.state.refusals.count("protocol_error_close");
                self.subscriber.close(CloseReason::new(
                    CloseKind::ProtocolError,
                    format!("protocol error: {error}"),
                ));
            }
            Some(WsError::Utf8(_)) => {
                Counters::add(&self.state.telemetry.counters.client_errors, 1);
                self.state.refusals.count("invalid_utf8_close");
                self.subscriber.close(CloseReason::new(
                    CloseKind::InvalidUtf8,
                    "a text frame was not valid UTF-8",
                ));
            }
            _ => tracing::debug!(connection_id = self.subscriber.id, error = %inner, "read failed"),
        }
    }

    fn refuse(&mut self, error: ProtocolError) {
        Counters::add(&self.state.telemetry.counters.client_errors, 1);
        self.state.refusals.count(error.code);
        self.subscriber.push_control(error.to_message());
        if self.errors.spend(Instant::now()) {
            self.state.refusals.count("error_budget_close");
            self.subscriber.close(CloseReason::new(
                CloseKind::Misbehaving,
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
        let (request, decoded) = protocol::decode_request(text);
        let result = match decoded {
            // Boxed: handling may query the database, and that future is
            // large; unboxed it would sit in every idle connection's task.
            Ok(message) => Box::pin(self.handle(message)).await.map_err(|e| e.refusing(&request)),
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
                if !self.rooms.contains(room.as_str()) {
                    return Err(ProtocolError::new(
                        codes::NOT_SUBSCRIBED,
                        format!("not subscribed to {room:?}"),
                    ));
                }
                self.leave(&room);
                Ok(())
            }
            ClientMessage::Ack { position } => {
                self.state.record_ack(position, &self.liveness);
                Ok(())
            }
            ClientMessage::Auth { token } => self.reauthenticate(&token).await,
            ClientMessage::Ping { id } => {
                self.subscriber.push_control(protocol::pong_message(id.as_deref()));
                Ok(())
            }
        }
    }

    fn leave(&mut self, room: &str) {
        self.rooms.remove(room);
        self.state.hub.unsubscribe(room, self.subscriber.id);
        self.liveness.subscriptions.store(self.rooms.len(), Ordering::Relaxed);
        self.subscriber.push_control(protocol::unsubscribed_message(room));
    }

    /// A fresh token in-band: extends the connection past the old `exp` and
    /// replaces its rooms; subscriptions the new token no longer allows are
    /// dropped (each with an `unsubscribed`).
    async fn reauthenticate(&mut self, token: &str) -> Result<(), ProtocolError> {
        let identity =
            self.state.auth.authenticate(Some(token)).await.map_err(|e| {
                ProtocolError::new(codes::INVALID_TOKEN, format!("{e}; the current token stays in force"))
            })?;
        if identity.subject != self.identity.subject {
            return Err(ProtocolError::new(
                codes::INVALID_TOKEN,
                "the new token is for another subject; open a new connection for it",
            ));
        }
        self.identity = identity;
        let rooms: Vec<Room> = self.rooms.iter().cloned().collect();
        for room in rooms {
            if !self.may_read(&room).await.unwrap_or(false) {
                self.leave(&room);
            }
        }
        self.subscriber
            .push_control(protocol::authenticated_message(self.identity.expires_at));
        Ok(())
    }

    /// The token grants the room, or `realtime.authorize` does (never for
    /// the gateway's own `__` rooms).
    async fn may_read(&self, room: &str) -> Result<bool, ProtocolError> {
        if self.identity.grants.allows(room) {
            return Ok(true);
        }
        if crate::auth::is_reserved_room(room) {
            return Ok(false);
        }
        let Some(subject) = self.identity.subject.as_deref() else {
            return Ok(false);
        };
        let settings = self.state.settings();
        let ttl = settings.features.cache.then_some(settings.cache.ttl);
        self.state.authorizer.allows(subject, room, ttl).await.map_err(|e| {
            self.state.warn_repeated("authorization check failed", room, &e);
            ProtocolError::new(
                codes::AUTHORIZATION_UNAVAILABLE,
                "cannot check access to that room right now; retry",
            )
        })
    }

    async fn subscribe(&mut self, room: String, since: Option<Position>) -> Result<(), ProtocolError> {
        self.subscribe_rooms(vec![room], since).await.map(|_| ())
    }

    /// Subscribes to every room of `rooms` at once (one `/ws` subscribe, or
    /// the rooms of an `/sse` stream), after the same checks for each: not
    /// subscribed yet, within the limit, granted, `since` real. Returns the
    /// position the rooms are live after.
    pub(super) async fn subscribe_rooms(
        &mut self,
        rooms: Vec<String>,
        since: Option<Position>,
    ) -> Result<Position, ProtocolError> {
        if let Some(room) = rooms.iter().find(|r| self.rooms.contains(r.as_str())) {
            return Err(ProtocolError::new(
                codes::ALREADY_SUBSCRIBED,
                format!("already subscribed to {room:?}"),
            ));
        }
        let limit = self.state.settings().limits.max_subscriptions;
        if self.rooms.len() + rooms.len() > limit {
            return Err(ProtocolError::new(
                codes::TOO_MANY_SUBSCRIPTIONS,
                format!("at most {limit} subscriptions per connection"),
            ));
        }
        if !self.state.hub.wait_ready(FEED_READY_WAIT).await {
            return Err(ProtocolError::new(
                codes::HISTORY_UNAVAILABLE,
                "the gateway is not connected to the database yet; retry in a moment",
            ));
        }
        for room in &rooms {
            if !self.may_read(room).await? {
                return Err(ProtocolError::new(
                    codes::FORBIDDEN,
                    format!("you may not read room {room:?}"),
                ));
            }
        }
        if let Some(since) = since
            && since > self.state.hub.position()
        {
            self.check_position_exists(since).await?;
        }
        let rooms: Vec<Room> = rooms.into_iter().map(Room::from).collect();
        match self.state.hub.subscribe_rooms(&rooms, &self.subscriber, since) {
            Joined::Live { position, .. } => {
                self.rooms.extend(rooms);
                self.liveness.subscriptions.store(self.rooms.len(), Ordering::Relaxed);
                Ok(position)
            }
            Joined::AlreadyMember => Err(ProtocolError::new(
                codes::ALREADY_SUBSCRIBED,
                "already subscribed to one of these rooms",
            )),
        }
    }

    /// A `since` ahead of this instance's feed is fine when another instance
    /// handed it out (this one will catch up); one ahead of the database
    /// never came from us.
    async fn check_position_exists(&self, since: Position) -> Result<(), ProtocolError> {
        let query = crate::db::latest_position(&self.state.pool);
        let latest: Result<i64, String> = match tokio::time::timeout(Duration::from_secs(5), query).await {
            Ok(result) => result.map_err(|e| crate::db::describe(&e)),
            Err(_) => Err("timed out".into()),
        };
        match latest {
            Ok(latest) if since.0 > latest => Err(ProtocolError::new(
                codes::INVALID_POSITION,
                format!("position {since} was never handed out by this database (latest is {latest})"),
            )),
            Ok(_) => Ok(()),
            Err(error) => {
                self.state
                    .warn_repeated("could not check a resume position", "", &error);
                Err(ProtocolError::new(
                    codes::HISTORY_UNAVAILABLE,
                    "cannot check that position right now; retry",
                ))
            }
        }
    }
}
