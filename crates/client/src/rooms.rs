//! The protocol's meaning for the client's rooms, as a plain synchronous
//! machine: it takes the server's messages in arrival order and says what
//! to deliver and what to send. Here live the guarantees: batches unpacked,
//! repeats across a seam dropped by position, refusals matched to their
//! subscription, resets moving the room past the gap, acks coalesced.
//! The connection task (`connection.rs`) feeds it and carries out [`Out`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::Stats;
use crate::update::{Change, Position, Update};

/// At most one ack per interval: acks only feed the gateway's latency
/// histogram, and `GATEWAY_RATE_LIMIT` counts them like any other message.
pub(crate) const ACK_INTERVAL: Duration = Duration::from_millis(100);

/// Subscribe refusals the same request may not get later: retried (with
/// backoff) instead of ending the subscription.
const RETRYABLE: [&str; 2] = ["history_unavailable", "authorization_unavailable"];
/// Refusals that answer a subscribe (protocol 1 names no room: the oldest
/// subscribe in flight owns them).
const SUBSCRIBE_REFUSALS: [&str; 7] = [
    "forbidden",
    "invalid_room",
    "invalid_position",
    "already_subscribed",
    "too_many_subscriptions",
    "history_unavailable",
    "authorization_unavailable",
];

/// One room the application subscribed to, across connections.
struct Room {
    tx: mpsc::Sender<Update>,
    /// The last position handed to the subscription (or where it started):
    /// the resume point.
    position: Option<Position>,
    /// Live on the current connection (its `subscribed` arrived).
    live: bool,
    /// Where it went live on the current connection: later changes are
    /// live (acked), earlier ones a replay.
    live_from: Option<Position>,
    /// The subscribe in flight asked `since` a position.
    sent_since: bool,
    /// Retryable refusals in a row (the retry's backoff).
    retries: u32,
}

/// What one connection knows (a reconnect starts it over).
#[derive(Default)]
struct ConnectionState {
    welcomed: bool,
    /// The gateway's protocol revision (`welcome`): from 2 on, a refusal
    /// names its room, `rate_limited` what it dropped, `reset` its position.
    protocol: u32,
    /// Subscribes sent and not yet answered, oldest first: the gateway
    /// answers each with `subscribed` or an `error`, in order.
    pending: VecDeque<String>,
    /// Unsubscribes sent and not yet answered, per room.
    unsubscribing: HashMap<String, u32>,
    /// The latest live position delivered and not yet acked.
    ackable: Option<Position>,
    last_ack: Option<Instant>,
    /// Changes delivered on this connection (a healthy connection).
    delivered: u64,
}

/// What the connection task is to do, in order.
#[derive(Debug)]
pub(crate) enum Out {
    /// A text frame to send.
    Send(String),
    /// An update for a subscription (awaited: a full subscription holds
    /// the connection back, and the gateway eventually sees a slow
    /// consumer, which a resume survives).
    Deliver(mpsc::Sender<Update>, Update),
    /// The connection is welcomed.
    Welcomed {
        connection_id: String,
        heartbeat: Option<Duration>,
        encoding: Option<String>,
    },
    /// Send this room's subscribe again after a backoff (`attempt` so far).
    RetrySubscribe { room: String, attempt: u32 },
    /// An in-band token refresh was accepted (`authenticated`).
    Authenticated,
    /// Ask for a token and send it again soon (refused, or dropped).
    RefreshSoon,
    /// Our ping was dropped: do not wait for its pong.
    PingDropped,
    /// A problem not tied to one subscription.
    ClientError { code: String, message: String },
    /// Give up on this connection and resume on a new one.
    Abort(String),
}

/// Every room of one client, and what the current connection knows.
pub(crate) struct Rooms {
    rooms: HashMap<String, Room>,
    conn: ConnectionState,
    stats: Arc<Stats>,
}

impl Rooms {
    pub(crate) fn new(stats: Arc<Stats>) -> Rooms {
        Rooms {
            rooms: HashMap::new(),
            conn: ConnectionState::default(),
            stats,
        }
    }

    /// Adds a room; on a welcomed connection its subscribe goes at once.
    pub(crate) fn subscribe(&mut self, room: String, since: Option<Position>, tx: mpsc::Sender<Update>) -> Vec<Out> {
        self.rooms.insert(
            room.clone(),
            Room {
                tx,
                position: since,
                live: false,
                live_from: None,
                sent_since: false,
                retries: 0,
            },
        );
        let mut out = Vec::new();
        if self.conn.welcomed {
            self.send_subscribe(&room, &mut out);
        }
        out
    }

    /// Removes a room (the application dropped its subscription).
    pub(crate) fn unsubscribe(&mut self, room: &str) -> Vec<Out> {
        let mut out = Vec::new();
        if self.rooms.remove(room).is_some() && self.conn.welcomed {
            *self.conn.unsubscribing.entry(room.to_owned()).or_default() += 1;
            out.push(Out::Send(json!({"type": "unsubscribe", "room": room}).to_string()));
        }
        out
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.rooms.is_empty()
    }

    /// A room's retry is due: subscribe again, if it is still wanted and
    /// not live.
    pub(crate) fn retry(&mut self, room: &str) -> Vec<Out> {
        let mut out = Vec::new();
        if self.conn.welcomed
            && self.rooms.get(room).is_some_and(|r| !r.live)
            && !self.conn.pending.iter().any(|p| p == room)
        {
            self.send_subscribe(room, &mut out);
        }
        out
    }

    /// The connection ended: nothing is live until the next `welcome`.
    pub(crate) fn connection_ended(&mut self) {
        self.conn = ConnectionState::default();
        for room in self.rooms.values_mut() {
            room.live = false;
            room.live_from = None;
        }
    }

    /// Whether this connection delivered anything (it was healthy).
    pub(crate) fn delivered(&self) -> u64 {
        self.conn.delivered
    }

    fn send_subscribe(&mut self, room: &str, out: &mut Vec<Out>) {
        let Some(state) = self.rooms.get_mut(room) else { return };
        let mut message = json!({"type": "subscribe", "room": room});
        if let Some(since) = state.position {
            message["since"] = json!(since.to_string());
        }
        state.sent_since = state.position.is_some();
        state.live = false;
        self.conn.pending.push_back(room.to_owned());
        out.push(Out::Send(message.to_string()));
    }

    /// One text frame from the gateway, received at `now`.
    pub(crate) fn on_text(&mut self, text: &str, now: Instant, received_at: SystemTime) -> Vec<Out> {
        let mut out = Vec::new();
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            out.push(Out::Abort("the gateway sent a frame that is not JSON".into()));
            return out;
        };
        Stats::add(&self.stats.frames, 1);
        match message.get("type").and_then(Value::as_str) {
            Some("change" | "event") => {
                self.deliver(message, received_at, &mut out);
                self.maybe_ack(now, &mut out);
            }
            Some("batch") => {
                if let Some(Value::Array(changes)) = message.get("changes").cloned() {
                    for change in changes {
                        self.deliver(change, received_at, &mut out);
                    }
                }
                self.maybe_ack(now, &mut out);
            }
            Some("welcome") => self.on_welcome(&message, &mut out),
            Some("subscribed") => self.on_subscribed(&message, &mut out),
            Some("reset") => self.on_reset(&message, &mut out),
            Some("unsubscribed") => self.on_unsubscribed(&message, &mut out),
            Some("error") => self.on_error(&message, &mut out),
            Some("authenticated") => out.push(Out::Authenticated),
            // `pong`: hearing anything is enough. Anything else: a newer
            // gateway's message, ignored.
            _ => {}
        }
        out
    }

    fn on_welcome(&mut self, message: &Value, out: &mut Vec<Out>) {
        if self.conn.welcomed {
            return;
        }
        self.conn.welcomed = true;
        self.conn.protocol = message.get("protocol").and_then(Value::as_u64).unwrap_or(1) as u32;
        out.push(Out::Welcomed {
            connection_id: message
                .get("connection_id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            heartbeat: message
                .get("heartbeat_ms")
                .and_then(Value::as_u64)
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            encoding: message.get("encoding").and_then(Value::as_str).map(str::to_owned),
        });
        let mut rooms: Vec<String> = self.rooms.keys().cloned().collect();
        rooms.sort();
        for room in rooms {
            self.send_subscribe(&room, out);
        }
    }

    /// The subscribe in flight for `room` (the oldest one when a protocol 1
    /// refusal names no room).
    fn take_pending(&mut self, room: Option<&str>) -> Option<String> {
        let index = match room {
            Some(room) => self.conn.pending.iter().position(|p| p == room)?,
            None => 0,
        };
        self.conn.pending.remove(index)
    }

    fn on_subscribed(&mut self, message: &Value, out: &mut Vec<Out>) {
        let room = message.get("room").and_then(Value::as_str);
        let Some(name) = self.take_pending(room) else { return };
        let (Some(state), Some(position)) = (self.rooms.get_mut(&name), Position::of(message)) else {
            return;
        };
        state.live = true;
        state.retries = 0;
        state.live_from = Some(position);
        if !state.sent_since {
            // A fresh subscription starts here: every change after it is owed.
            state.position = Some(position);
        }
        let update = Update::Subscribed {
            position,
            resumed: state.sent_since,
        };
        out.push(Out::Deliver(state.tx.clone(), update));
    }

    fn deliver(&mut self, change: Value, received_at: SystemTime, out: &mut Vec<Out>) {
        let Some(name) = change.get("room").and_then(Value::as_str) else {
            return;
        };
        // Before `subscribed` on this connection, a room's frames belong to
        // an earlier subscription (unsubscribed, or refused): not ours.
        let Some(state) = self.rooms.get_mut(name).filter(|s| s.live) else {
            return;
        };
        let Some(position) = Position::of(&change) else { return };
        if state.position.is_some_and(|seen| position <= seen) {
            Stats::add(&self.stats.duplicates, 1);
            return;
        }
        state.position = Some(position);
        self.conn.delivered += 1;
        Stats::add(&self.stats.changes, 1);
        // Only live changes are acked: a replayed one's commit-to-ack would
        // be the outage, not the latency.
        if state.live_from.is_some_and(|from| position > from) {
            self.conn.ackable = Some(position);
        }
        let is_event = change.get("type").and_then(Value::as_str) == Some("event");
        let change = Change {
            room: name.to_owned(),
            position,
            message: change,
            received_at,
        };
        let update = if is_event {
            Update::Event(change)
        } else {
            Update::Change(change)
        };
        out.push(Out::Deliver(state.tx.clone(), update));
    }

    /// Acks the latest live position, at most once per [`ACK_INTERVAL`], at
    /// the moment it is handled: a delayed (trailing) ack would add its
    /// delay to the latency the gateway measures.
    fn maybe_ack(&mut self, now: Instant, out: &mut Vec<Out>) {
        let Some(position) = self.conn.ackable else { return };
        if self
            .conn
            .last_ack
            .is_some_and(|at| now.duration_since(at) < ACK_INTERVAL)
        {
            return;
        }
        self.conn.last_ack = Some(now);
        self.conn.ackable = None;
        Stats::add(&self.stats.acks, 1);
        out.push(Out::Send(
            json!({"type": "ack", "position": position.to_string()}).to_string(),
        ));
    }

    fn on_reset(&mut self, message: &Value, out: &mut Vec<Out>) {
        let Some(name) = message.get("room").and_then(Value::as_str) else {
            return;
        };
        let Some(state) = self.rooms.get_mut(name).filter(|s| s.live) else {
            return;
        };
        // A reset carries its position (protocol 2): one at or below what
        // the room has is a repeat (the gateway sent it again across a
        // seam), and the application hears of each reset once.
        if let (Some(at), Some(seen)) = (Position::of(message), state.position)
            && at <= seen
        {
            Stats::add(&self.stats.duplicates, 1);
            return;
        }
        // What was missed is gone; the stream goes on after the reset's
        // position (protocol 2), or else after where this connection's
        // subscription went live: a later resume does not ask for the lost
        // history again.
        let Some(after) = Position::of(message).or(state.live_from) else {
            return;
        };
        if state.position.is_none_or(|p| after > p) {
            state.position = Some(after);
        }
        let reason = message
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_owned();
        out.push(Out::Deliver(
            state.tx.clone(),
            Update::Reset {
                reason,
                position: after,
            },
        ));
    }

    fn on_unsubscribed(&mut self, message: &Value, out: &mut Vec<Out>) {
        let Some(room) = message.get("room").and_then(Value::as_str) else {
            return;
        };
        if let Some(asked) = self.conn.unsubscribing.get_mut(room) {
            *asked -= 1;
            if *asked == 0 {
                self.conn.unsubscribing.remove(room);
            }
            return;
        }
        // Not asked for: a refreshed token no longer grants the room.
        if self.rooms.get(room).is_some_and(|s| s.live) {
            let message = format!("the refreshed token no longer grants room {room:?}");
            self.end(room, "forbidden", message, out);
        }
    }

    /// Ends a room's subscription with a refusal (its last update).
    fn end(&mut self, room: &str, code: &str, message: String, out: &mut Vec<Out>) {
        if let Some(state) = self.rooms.remove(room) {
            let update = Update::Refused {
                code: code.to_owned(),
                message,
            };
            out.push(Out::Deliver(state.tx, update));
        }
    }

    fn on_error(&mut self, message: &Value, out: &mut Vec<Out>) {
        let code = message
            .get("code")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let text = message
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let room = message.get("room").and_then(Value::as_str);
        let named = self.conn.protocol >= 2;
        if code == "rate_limited" {
            return self.on_rate_limited(message, room, code, text, out);
        }
        if SUBSCRIBE_REFUSALS.contains(&code.as_str()) && (room.is_some() || !named) {
            // Protocol 2 names the refused subscribe's room; protocol 1
            // answers every subscribe in order, so the oldest in flight
            // owns a refusal.
            let Some(name) = self.take_pending(room) else {
                out.push(Out::ClientError { code, message: text });
                return;
            };
            if !self.rooms.contains_key(&name) {
                return; // dropped meanwhile
            }
            if code == "already_subscribed" {
                // We and the gateway disagree about what is subscribed:
                // start over on a new connection (resuming loses nothing).
                out.push(Out::Abort(format!("subscription state out of step ({text})")));
                return;
            }
            if RETRYABLE.contains(&code.as_str()) {
                let state = self.rooms.get_mut(&name).expect("checked above");
                state.retries += 1;
                out.push(Out::RetrySubscribe {
                    room: name,
                    attempt: state.retries,
                });
                return;
            }
            return self.end(&name, &code, text, out);
        }
        if code == "not_subscribed" {
            let asked = match room {
                Some(room) => Some(room.to_owned()),
                None => self
                    .conn
                    .unsubscribing
                    .keys()
                    .find(|r| text.contains(&format!("{r:?}")))
                    .cloned(),
            };
            if let Some(room) = asked
                && let Some(count) = self.conn.unsubscribing.get_mut(&room)
            {
                *count -= 1;
                if *count == 0 {
                    self.conn.unsubscribing.remove(&room);
                }
                return;
            }
        }
        if code == "invalid_token" {
            // The in-band refresh was refused; the current token stays in
            // force until its exp. Ask again shortly (at worst, 4001 and a
            // reconnect with a fresh token).
            out.push(Out::RefreshSoon);
        }
        out.push(Out::ClientError { code, message: text });
    }

    /// The gateway dropped one of our messages. Protocol 2 says which: it is
    /// sent again (a subscribe, an unsubscribe, an auth) or let go (an ack,
    /// a ping). Protocol 1 cannot say: resubscribing on a new connection is
    /// the only answer that cannot lose anything.
    fn on_rate_limited(&mut self, message: &Value, room: Option<&str>, code: String, text: String, out: &mut Vec<Out>) {
        let dropped = message.get("dropped").and_then(Value::as_str);
        out.push(Out::ClientError {
            code,
            message: text.clone(),
        });
        match (dropped, room) {
            (Some("subscribe"), Some(room)) => {
                if self.take_pending(Some(room)).is_some()
                    && let Some(state) = self.rooms.get_mut(room)
                {
                    state.retries += 1;
                    out.push(Out::RetrySubscribe {
                        room: room.to_owned(),
                        attempt: state.retries,
                    });
                }
            }
            (Some("unsubscribe"), Some(room)) => {
                if self.conn.unsubscribing.contains_key(room) {
                    out.push(Out::Send(json!({"type": "unsubscribe", "room": room}).to_string()));
                }
            }
            (Some("ack"), _) => {}
            (Some("ping"), _) => out.push(Out::PingDropped),
            (Some("auth"), _) => out.push(Out::RefreshSoon),
            _ => out.push(Out::Abort(format!("rate limited by the gateway ({text})"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Machine {
        rooms: Rooms,
        rx: HashMap<String, mpsc::Receiver<Update>>,
        now: Instant,
    }

    impl Machine {
        fn new(names: &[&str]) -> Machine {
            let mut rooms = Rooms::new(Arc::new(Stats::default()));
            let mut rx = HashMap::new();
            for name in names {
                let (tx, r) = mpsc::channel(1000);
                assert!(
                    rooms.subscribe(name.to_string(), None, tx).is_empty(),
                    "nothing sent before welcome"
                );
                rx.insert(name.to_string(), r);
            }
            Machine {
                rooms,
                rx,
                now: Instant::now(),
            }
        }

        /// Feeds a message; returns the frames it sends, delivering updates.
        fn feed(&mut self, message: Value) -> Vec<Value> {
            let mut sent = Vec::new();
            for out in self.rooms.on_text(&message.to_string(), self.now, SystemTime::now()) {
                match out {
                    Out::Send(text) => sent.push(serde_json::from_str(&text).unwrap()),
                    Out::Deliver(tx, update) => tx.try_send(update).unwrap(),
                    Out::Abort(reason) => sent.push(format!("abort: {reason}").into()),
                    Out::RetrySubscribe { room, attempt } => sent.push(format!("retry {room} {attempt}").into()),
                    Out::ClientError { code, .. } => sent.push(format!("error {code}").into()),
                    Out::RefreshSoon => sent.push("refresh".into()),
                    Out::PingDropped => sent.push("ping dropped".into()),
                    Out::Welcomed { .. } | Out::Authenticated => {}
                }
            }
            sent
        }

        fn updates(&mut self, room: &str) -> Vec<Update> {
            let rx = self.rx.get_mut(room).unwrap();
            std::iter::from_fn(|| rx.try_recv().ok()).collect()
        }

        fn positions(&mut self, room: &str) -> Vec<i64> {
            self.updates(room)
                .into_iter()
                .filter_map(|u| match u {
                    Update::Change(c) | Update::Event(c) => Some(c.position.0),
                    _ => None,
                })
                .collect()
        }

        fn welcome(&mut self, protocol: u64) -> Vec<Value> {
            self.feed(json!({"type": "welcome", "connection_id": "c", "heartbeat_ms": 1000, "protocol": protocol}))
        }
    }

    fn change(room: &str, p: i64) -> Value {
        json!({"type": "change", "room": room, "position": p.to_string(), "op": "INSERT"})
    }

    #[test]
    fn subscribes_on_welcome_and_resumes_from_the_last_position() {
        let mut m = Machine::new(&["a"]);
        assert_eq!(m.welcome(2), [json!({"room":"a","type":"subscribe"})]);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "10"}));
        m.feed(change("a", 11));
        assert!(matches!(
            m.updates("a")[..],
            [
                Update::Subscribed {
                    position: Position(10),
                    resumed: false
                },
                Update::Change(_)
            ]
        ));
        m.rooms.connection_ended();
        // Frames of the dead connection's room are not delivered any more.
        m.feed(change("a", 12));
        assert!(m.updates("a").is_empty());
        let sent = m.welcome(2);
        assert_eq!(sent, [json!({"room":"a","since":"11","type":"subscribe"})]);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "20"}));
        assert!(matches!(m.updates("a")[..], [Update::Subscribed { resumed: true, .. }]));
    }

    #[test]
    fn batches_are_unpacked_in_order_and_repeats_at_a_seam_dropped() {
        let mut m = Machine::new(&["a", "b"]);
        m.welcome(2);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "0"}));
        m.feed(json!({"type": "subscribed", "room": "b", "position": "0"}));
        m.feed(json!({"type": "batch", "changes": [change("a", 1), change("b", 2), change("a", 3)]}));
        // Across a seam: 3 again, then 4; an event counts like a change.
        m.feed(change("a", 3));
        m.feed(json!({"type": "event", "room": "a", "position": "4", "name": "x"}));
        assert_eq!(m.positions("a"), [1, 3, 4]);
        assert_eq!(m.positions("b"), [2]);
        assert_eq!(m.rooms.stats.duplicates.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn refusals_end_their_own_subscription_by_room_or_in_order() {
        // Protocol 2: the refusal names its room, whatever the order.
        let mut m = Machine::new(&["a", "b"]);
        m.welcome(2);
        m.feed(json!({"type": "error", "code": "forbidden", "message": "no", "room": "b"}));
        m.feed(json!({"type": "subscribed", "room": "a", "position": "5"}));
        assert!(matches!(&m.updates("b")[..], [Update::Refused { code, .. }] if code == "forbidden"));
        assert!(matches!(m.updates("a")[..], [Update::Subscribed { .. }]));
        // An error without a room is then not a subscribe's (an ack's, say).
        assert_eq!(
            m.feed(json!({"type": "error", "code": "invalid_position", "message": "bad ack"})),
            ["error invalid_position"]
        );
        // Protocol 1: the oldest subscribe in flight owns it.
        let mut m = Machine::new(&["a", "b"]);
        m.welcome(1);
        m.feed(json!({"type": "error", "code": "forbidden", "message": "no"}));
        assert!(matches!(&m.updates("a")[..], [Update::Refused { .. }]));
        m.feed(json!({"type": "subscribed", "room": "b", "position": "5"}));
        assert!(matches!(m.updates("b")[..], [Update::Subscribed { .. }]));
        // Retryable refusals are retried, with their attempt count.
        let mut m = Machine::new(&["a"]);
        m.welcome(2);
        let sent = m.feed(json!({"type": "error", "code": "history_unavailable", "message": "later", "room": "a"}));
        assert_eq!(sent, ["retry a 1"]);
        assert_eq!(m.rooms.retry("a").len(), 1, "sent again when due");
    }

    #[test]
    fn rate_limited_says_what_to_send_again() {
        let mut m = Machine::new(&["a"]);
        m.welcome(2);
        let sent = m.feed(
            json!({"type": "error", "code": "rate_limited", "message": "slow", "dropped": "subscribe", "room": "a"}),
        );
        assert_eq!(sent, ["error rate_limited", "retry a 1"]);
        let sent = m.feed(json!({"type": "error", "code": "rate_limited", "message": "slow", "dropped": "ack"}));
        assert_eq!(sent, ["error rate_limited"]);
        let sent = m.feed(json!({"type": "error", "code": "rate_limited", "message": "slow"}));
        assert_eq!(
            sent,
            ["error rate_limited", "abort: rate limited by the gateway (slow)"]
        );
    }

    #[test]
    fn a_reset_moves_the_room_past_the_gap() {
        let mut m = Machine::new(&["a"]);
        m.welcome(2);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "3"}));
        m.feed(change("a", 4));
        m.feed(json!({"type": "reset", "room": "a", "reason": "history_expired", "position": "90"}));
        m.feed(change("a", 91));
        let updates = m.updates("a");
        assert!(
            matches!(
                &updates[2],
                Update::Reset {
                    position: Position(90),
                    ..
                }
            ),
            "{updates:?}"
        );
        m.rooms.connection_ended();
        assert_eq!(m.welcome(2), [json!({"room":"a","since":"91","type":"subscribe"})]);
        // The same reset again (a resume across it, a repeat): dropped by
        // position, as changes are; the next one is delivered.
        m.feed(json!({"type": "subscribed", "room": "a", "position": "95"}));
        m.feed(json!({"type": "reset", "room": "a", "reason": "truncated", "position": "90"}));
        m.feed(json!({"type": "reset", "room": "a", "reason": "truncated", "position": "96"}));
        m.feed(json!({"type": "reset", "room": "a", "reason": "truncated", "position": "96"}));
        let resets: Vec<Position> = m
            .updates("a")
            .into_iter()
            .filter_map(|u| match u {
                Update::Reset { position, .. } => Some(position),
                _ => None,
            })
            .collect();
        assert_eq!(resets, [Position(96)], "each reset once");
        assert_eq!(m.rooms.stats.duplicates.load(std::sync::atomic::Ordering::Relaxed), 2);
        // Protocol 1: the resume's reset continues from where it went live.
        let mut m = Machine::new(&["a"]);
        m.rooms.rooms.get_mut("a").unwrap().position = Some(Position(1));
        m.welcome(1);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "50"}));
        m.feed(json!({"type": "reset", "room": "a", "reason": "history_expired"}));
        m.rooms.connection_ended();
        assert_eq!(m.welcome(1), [json!({"room":"a","since":"50","type":"subscribe"})]);
    }

    #[test]
    fn acks_are_coalesced_and_only_for_live_changes() {
        let mut m = Machine::new(&["a"]);
        m.rooms.rooms.get_mut("a").unwrap().position = Some(Position(1));
        m.welcome(2);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "10"}));
        // Replayed (at or below 10): never acked.
        assert!(
            m.feed(json!({"type": "batch", "changes": [change("a", 5), change("a", 10)]}))
                .is_empty()
        );
        assert_eq!(m.feed(change("a", 11)), [json!({"position":"11","type":"ack"})]);
        assert!(m.feed(change("a", 12)).is_empty(), "within the interval");
        m.now += ACK_INTERVAL;
        assert_eq!(m.feed(change("a", 13)), [json!({"position":"13","type":"ack"})]);
    }

    #[test]
    fn a_token_that_no_longer_grants_a_room_ends_it() {
        let mut m = Machine::new(&["a", "b"]);
        m.welcome(2);
        m.feed(json!({"type": "subscribed", "room": "a", "position": "1"}));
        m.feed(json!({"type": "subscribed", "room": "b", "position": "1"}));
        assert_eq!(m.rooms.unsubscribe("b").len(), 1);
        m.feed(json!({"type": "unsubscribed", "room": "b"}));
        m.feed(json!({"type": "unsubscribed", "room": "a"}));
        assert!(matches!(&m.updates("a")[1], Update::Refused { code, .. } if code == "forbidden"));
        assert!(m.rooms.is_empty());
    }
}
