//! Fan-out: which connections are subscribed to which rooms, and the bounded
//! send queue of each connection. The feed hands every committed change to
//! [`Hub::dispatch`]; each room's message is built once and cloned to members.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};

use crate::change::{Change, Position, push_json_str};

/// A room name as clients and templates spell it: `project:42`.
pub type Room = Arc<str>;

/// A message queued for one connection. Cloning shares the bytes.
#[derive(Debug, Clone)]
pub struct Frame {
    pub text: Utf8Bytes,
    /// Commit time of the change it carries (database clock, microseconds),
    /// or `None` for protocol messages; feeds the commit-to-send histogram.
    pub committed_at_us: Option<i64>,
}

impl Frame {
    pub fn control(text: String) -> Frame {
        Frame {
            text: text.into(),
            committed_at_us: None,
        }
    }
}

/// What a connection's send task works through, in order.
#[derive(Debug)]
pub enum Outbound {
    Frame(Frame),
    /// Read the room's history `(since, upto]` from the outbox and send it
    /// here: live changes queued after this item are all past `upto`, so the
    /// replay and the live stream join with no gap and no duplicate.
    Replay {
        room: Room,
        since: Position,
        upto: Position,
    },
}

/// Why the gateway closes a connection (SPEC section 4 close codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

impl CloseReason {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4008;

    pub fn new(code: u16, reason: impl Into<String>) -> CloseReason {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}

/// The sending half of one WebSocket connection, as the rest of the gateway
/// sees it: a queue bounded by bytes, and a way to ask for a close.
#[derive(Debug)]
pub struct Subscriber {
    pub id: u64,
    tx: mpsc::UnboundedSender<Outbound>,
    /// Bytes queued and not yet written to the socket. The channel itself is
    /// unbounded; this count is its bound (`GATEWAY_SEND_QUEUE_BYTES`).
    queued_bytes: AtomicUsize,
    queue_limit: usize,
    /// Set once; after it nothing more is queued, so what the client got is a
    /// gap-free prefix it can resume from.
    closing: AtomicBool,
    close_reason: Mutex<Option<CloseReason>>,
    close_requested: Notify,
}

impl Subscriber {
    pub fn new(
        id: u64,
        queue_limit: usize,
    ) -> (Arc<Subscriber>, mpsc::UnboundedReceiver<Outbound>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sub = Subscriber {
            id,
            tx,
            queued_bytes: AtomicUsize::new(0),
            queue_limit,
            closing: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            close_requested: Notify::new(),
        };
        (Arc::new(sub), rx)
    }

    /// Queues a frame. A full queue means the client cannot keep up: it is
    /// closed as a slow consumer rather than slowing anyone else down.
    pub fn push(&self, frame: Frame) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return false;
        }
        let len = frame.text.len();
        let queued = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.queue_limit {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseReason::new(
                CloseReason::SLOW_CONSUMER,
                "slow consumer: send queue full; resume from your last position",
            ));
            return false;
        }
        self.tx.send(Outbound::Frame(frame)).is_ok()
    }

    pub fn push_replay(&self, room: Room, since: Position, upto: Position) {
        if !self.closing.load(Ordering::Relaxed) {
            let _ = self.tx.send(Outbound::Replay { room, since, upto });
        }
    }

    /// The send task reports bytes it has written.
    pub fn sent(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Asks the send task to close the socket. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.close_reason.lock().expect("close reason lock") = Some(reason);
        self.close_requested.notify_one();
    }

    pub fn close_reason_code(&self) -> Option<u16> {
        self.close_reason
            .lock()
            .expect("close reason lock")
            .as_ref()
            .map(|r| r.code)
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Resolves once [`Subscriber::close`] has been called.
    pub async fn close_requested(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.close_reason.lock().expect("close reason lock").clone() {
                return reason;
            }
            self.close_requested.notified().await;
        }
    }
}

struct Member {
    subscriber: Arc<Subscriber>,
    /// Live changes at or below this position are not sent: the client has
    /// them already (it subscribed `since` a position this instance's feed
    /// had not reached yet) or will get them from its replay.
    floor: Position,
}

/// How much recent history the hub keeps in memory, so that most resumes
/// (a client that blipped, or moved from another instance) are served
/// without a database read.
const RECENT_CHANGES: usize = 10_000;
const RECENT_BYTES: usize = 32 << 20;

#[derive(Default)]
struct HubState {
    rooms: HashMap<Room, Vec<Member>>,
    /// The last position dispatched: every change after it reaches every
    /// current member of its rooms.
    position: Position,
    /// Every change dispatched after `recent_floor`, oldest first.
    recent: VecDeque<Arc<Change>>,
    recent_floor: Position,
    recent_bytes: usize,
}

impl HubState {
    fn remember(&mut self, change: Arc<Change>) {
        self.recent_bytes += change.size();
        self.recent.push_back(change);
        while self.recent.len() > RECENT_CHANGES || self.recent_bytes > RECENT_BYTES {
            let Some(old) = self.recent.pop_front() else { break };
            self.recent_bytes -= old.size();
            self.recent_floor = old.position;
        }
    }

    fn forget_recent(&mut self, floor: Position) {
        self.recent.clear();
        self.recent_bytes = 0;
        self.recent_floor = floor;
    }
}

/// Rooms and their members. One lock, held by the single feed task while it
/// fans a change out and by a subscribe while it joins: that is what makes
/// "every change after the `subscribed` position is delivered" exact.
#[derive(Default)]
pub struct Hub {
    state: Mutex<HubState>,
}

/// What a subscribe did.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Live after this position. A `since` older than it was replayed from
    /// memory (already queued) or from the outbox (a replay is queued).
    Live { position: Position, replay: Replay },
    AlreadyMember,
}

/// Where a resume's history came from.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Replay {
    None,
    Memory,
    Outbox,
}

impl Hub {
    pub fn new(start: Position) -> Hub {
        Hub {
            state: Mutex::new(HubState {
                position: start,
                recent_floor: start,
                ..HubState::default()
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().expect("hub lock")
    }

    /// The last position dispatched.
    pub fn position(&self) -> Position {
        self.lock().position
    }

    /// Moves the live position forward without changes to send: the feed
    /// starting at the end of the outbox, or jumping over history that was
    /// pruned before it could read it. Memory no longer covers the gap.
    pub fn advance(&self, to: Position) {
        let mut state = self.lock();
        if to > state.position {
            state.position = to;
            state.forget_recent(to);
        }
    }

    /// Tells every member of every room that changes may be missing
    /// (`reset`): the feed could not read part of the history.
    pub fn reset_all(&self, reason: &str) {
        let state = self.lock();
        for (room, members) in &state.rooms {
            let message = crate::protocol::reset_message(room, reason);
            let frame = Frame::control(message);
            for member in members {
                member.subscriber.push(frame.clone());
            }
        }
    }

    /// Joins `sub` to `room` and queues its `subscribed` message (and, for a
    /// `since` older than the live position, the replay of what it missed)
    /// before any live change can be queued behind it.
    pub fn subscribe(&self, room: &str, sub: &Arc<Subscriber>, since: Option<Position>) -> Joined {
        let mut state = self.lock();
        let live = state.position;
        let members = state.rooms.entry(Room::from(room)).or_default();
        if members.iter().any(|m| m.subscriber.id == sub.id) {
            return Joined::AlreadyMember;
        }
        let floor = since.map_or(live, |s| s.max(live));
        members.push(Member {
            subscriber: Arc::clone(sub),
            floor,
        });
        let mut msg = String::with_capacity(64 + room.len());
        msg.push_str("{\"type\":\"subscribed\",\"room\":");
        push_json_str(&mut msg, room);
        msg.push_str(",\"position\":\"");
        msg.push_str(&floor.to_string());
        msg.push_str("\"}");
        sub.push(Frame::control(msg));
        let replay = match since.filter(|s| *s < live) {
            None => Replay::None,
            Some(since) if since >= state.recent_floor => {
                // Memory holds every change after `since`: queue the room's
                // share of it now, ahead of any live change.
                for change in state.recent.iter().filter(|c| c.position > since) {
                    if change.rooms.iter().any(|r| r == room) {
                        sub.push(Frame::control(change.message_for(room)));
                    }
                }
                Replay::Memory
            }
            Some(since) => {
                sub.push_replay(Room::from(room), since, live);
                Replay::Outbox
            }
        };
        Joined::Live { position: floor, replay }
    }

    /// Removes `sub` from `room`; false when it was not a member.
    pub fn unsubscribe(&self, room: &str, sub_id: u64) -> bool {
        let mut state = self.lock();
        let Some(members) = state.rooms.get_mut(room) else {
            return false;
        };
        let before = members.len();
        members.retain(|m| m.subscriber.id != sub_id);
        let removed = members.len() != before;
        if members.is_empty() {
            state.rooms.remove(room);
        }
        removed
    }

    /// Queues `change` for every member of each of its rooms, and remembers
    /// it for resumes; returns how many deliveries were queued.
    pub fn dispatch(&self, change: Arc<Change>) -> usize {
        let mut state = self.lock();
        let mut deliveries = 0;
        for room in &change.rooms {
            let Some(members) = state.rooms.get(room.as_str()) else {
                continue;
            };
            let frame = Frame {
                text: change.message_for(room).into(),
                committed_at_us: Some(change.committed_at_us),
            };
            for member in members {
                if change.position > member.floor && member.subscriber.push(frame.clone()) {
                    deliveries += 1;
                }
            }
        }
        state.position = state.position.max(change.position);
        state.remember(change);
        deliveries
    }

    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.lock().rooms.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Op;
    use serde_json::value::RawValue;

    fn change(position: i64, rooms: &[&str]) -> Arc<Change> {
        let raw = RawValue::from_string("{\"id\":1}".into()).unwrap();
        Arc::new(Change::new(
            Position(position),
            0,
            "public".into(),
            "tasks".into(),
            Op::Update,
            &raw,
            &raw,
            rooms.iter().map(|r| r.to_string()).collect(),
        ))
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(item) = rx.try_recv() {
            match item {
                Outbound::Frame(f) => out.push(f.text.to_string()),
                Outbound::Replay { room, since, upto } => {
                    out.push(format!("replay {room} {since}..{upto}"))
                }
            }
        }
        out
    }

    #[test]
    fn changes_reach_members_of_their_rooms_only() {
        let hub = Hub::new(Position(10));
        let (a, mut rx_a) = Subscriber::new(1, 1 << 20);
        let (b, mut rx_b) = Subscriber::new(2, 1 << 20);
        let live_at_10 = Joined::Live {
            position: Position(10),
            replay: Replay::None,
        };
        assert_eq!(hub.subscribe("project:1", &a, None), live_at_10);
        assert_eq!(hub.subscribe("project:2", &b, None), live_at_10);
        assert_eq!(hub.subscribe("project:2", &b, None), Joined::AlreadyMember);
        assert_eq!(hub.dispatch(change(11, &["project:1"])), 1);
        assert_eq!(hub.dispatch(change(12, &["project:1", "project:2"])), 2);
        let got_a = drain(&mut rx_a);
        let got_b = drain(&mut rx_b);
        assert_eq!(got_a.len(), 3, "{got_a:?}");
        assert!(got_a[0].contains("\"subscribed\"") && got_a[0].contains("\"position\":\"10\""));
        assert!(got_a[1].contains("\"position\":\"11\""));
        assert_eq!(got_b.len(), 2, "{got_b:?}");
        assert!(
            got_b[1].contains("\"room\":\"project:2\"") && got_b[1].contains("\"position\":\"12\"")
        );
        assert_eq!(hub.position(), Position(12));
        assert!(hub.unsubscribe("project:1", 1));
        assert!(!hub.unsubscribe("project:1", 1));
        assert_eq!(hub.room_count(), 1);
    }

    #[test]
    fn since_before_memory_queues_an_outbox_replay_and_a_future_since_is_a_floor() {
        let hub = Hub::new(Position(20));
        let (a, mut rx) = Subscriber::new(1, 1 << 20);
        let joined = hub.subscribe("r", &a, Some(Position(15)));
        assert!(matches!(joined, Joined::Live { replay: Replay::Outbox, .. }));
        hub.dispatch(change(21, &["r"]));
        let got = drain(&mut rx);
        assert_eq!(got[1], "replay r 15..20");
        assert!(got[2].contains("\"position\":\"21\""));

        let (b, mut rx) = Subscriber::new(2, 1 << 20);
        assert_eq!(
            hub.subscribe("r", &b, Some(Position(23))),
            Joined::Live {
                position: Position(23),
                replay: Replay::None
            }
        );
        hub.dispatch(change(22, &["r"]));
        hub.dispatch(change(24, &["r"]));
        let got = drain(&mut rx);
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[1].contains("\"position\":\"24\""));
    }

    #[test]
    fn resumes_within_memory_are_replayed_from_it_in_order() {
        let hub = Hub::new(Position(0));
        for p in 1..=5 {
            hub.dispatch(change(p, if p % 2 == 0 { &["even", "all"] } else { &["all"] }));
        }
        let (a, mut rx) = Subscriber::new(1, 1 << 20);
        let joined = hub.subscribe("even", &a, Some(Position(1)));
        assert!(matches!(joined, Joined::Live { position: Position(5), replay: Replay::Memory }));
        hub.dispatch(change(6, &["even"]));
        let got = drain(&mut rx);
        let positions: Vec<_> = got[1..]
            .iter()
            .map(|m| serde_json::from_str::<serde_json::Value>(m).unwrap()["position"].clone())
            .collect();
        assert_eq!(positions, ["2", "4", "6"]);
        // A jump (pruned history) empties memory: older resumes read the outbox.
        hub.advance(Position(100));
        let (b, _rx) = Subscriber::new(2, 1 << 20);
        let joined = hub.subscribe("even", &b, Some(Position(5)));
        assert!(matches!(joined, Joined::Live { replay: Replay::Outbox, .. }));
    }

    #[test]
    fn a_full_queue_closes_the_subscriber_as_slow() {
        let hub = Hub::new(Position(0));
        let (slow, _rx) = Subscriber::new(1, 600);
        hub.subscribe("r", &slow, None);
        let mut delivered = 0;
        for p in 1..100 {
            delivered += hub.dispatch(change(p, &["r"]));
        }
        assert!(delivered < 5, "{delivered}");
        assert!(slow.is_closing());
        let reason = slow.close_reason.lock().unwrap().clone().unwrap();
        assert_eq!(reason.code, CloseReason::SLOW_CONSUMER);
    }
}
