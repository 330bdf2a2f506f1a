//! Fan-out: which connections are subscribed to which rooms. The source
//! hands committed changes to [`Hub::dispatch_group`], which runs them
//! through the pipeline (dedup, batching, encoding) and queues each room's
//! units, built once, to its members' queues (`subscriber.rs`); the last
//! changes stay in the recent window (`recent.rs`) for resumes.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::ws::Utf8Bytes;

use crate::change::{Change, Position, push_json_str};
use crate::config::{Features, PipelineSettings};
use crate::pipeline::batch::plan_units;
use crate::pipeline::dedup::{self, Dedup};
use crate::pipeline::encode::{Compression, Unit};

mod close;
mod recent;
mod subscriber;

pub use close::{CloseKind, CloseReason, DROPPED};
pub use subscriber::{DirectWrites, Outbound, QueueReceiver, ReplayRange, SocketFd, Subscriber};

use recent::Recent;
pub use recent::{MemoryPage, PageLimits};

/// A room name as clients and templates spell it: `project:42`.
pub type Room = Arc<str>;

struct Member {
    subscriber: Arc<Subscriber>,
    /// Live changes at or below this position are not sent: the client has
    /// them already (it subscribed `since` a position this instance's feed
    /// had not reached yet) or will get them from its replay.
    floor: Position,
}

struct HubState {
    rooms: HashMap<Room, Vec<Member>>,
    /// The last position dispatched: every change after it reaches every
    /// current member of its rooms.
    position: Position,
    /// The last changes dispatched, for resumes and acks.
    recent: Recent,
    dedup: Dedup,
    pipeline: PipelineSettings,
    features: Features,
}

/// Rooms and their members. One lock, held by the single feed task while it
/// fans a change out and by a subscribe while it joins: that is what makes
/// "every change after the `subscribed` position is delivered" exact.
pub struct Hub {
    state: Mutex<HubState>,
    pub stats: crate::pipeline::PipelineStats,
    /// Whether the feed has found where the outbox ends. Before that, the
    /// live position is not known, and a subscription could not be told
    /// which changes it is owed: subscribes wait for it.
    ready: tokio::sync::watch::Sender<bool>,
}

/// What one [`Hub::dispatch_group`] did.
#[derive(Debug, Default)]
pub struct Dispatched {
    /// Changes queued, counted once per member.
    pub deliveries: usize,
    /// Units (messages) built.
    pub units: usize,
    /// Room deliveries dropped as repeats.
    pub deduplicated: usize,
    /// Time spent serializing the units, microseconds.
    pub encoding_us: u64,
    /// What was written to idle sockets at once (see `Subscriber::push_live`).
    pub direct: DirectWrites,
}

/// What a subscribe did.
#[derive(Debug, PartialEq, Eq)]
pub enum Joined {
    /// Live after this position. For a `since` older than it, a replay of
    /// the gap is queued ahead of the live changes; `replay` says where it
    /// starts reading (memory, or the outbox).
    Live {
        position: Position,
        replay: Replay,
    },
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
    pub fn new(start: Position, pipeline: PipelineSettings, features: Features) -> Hub {
        Hub {
            state: Mutex::new(HubState {
                rooms: HashMap::new(),
                position: start,
                recent: Recent::new(start),
                dedup: Dedup::new(dedup::DEFAULT_CAPACITY),
                pipeline,
                features,
            }),
            stats: Default::default(),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }

    /// Takes new tunables and switches (SIGHUP) for the next groups.
    pub fn configure(&self, pipeline: PipelineSettings, features: Features) {
        let mut state = self.lock();
        if !features.dedup {
            state.dedup.clear();
        }
        state.pipeline = pipeline;
        state.features = features;
    }

    /// The commit time of a recently dispatched change (for acks).
    pub fn committed_at(&self, position: Position) -> Option<i64> {
        let state = self.lock();
        state.recent.committed_at(position)
    }

    /// Entries the dedup stage remembers.
    pub fn dedup_entries(&self) -> usize {
        self.lock().dedup.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HubState> {
        self.state.lock().expect("hub lock")
    }

    /// The last position dispatched.
    pub fn position(&self) -> Position {
        self.lock().position
    }

    /// The feed knows the live position: subscriptions may join.
    pub fn mark_ready(&self) {
        self.ready.send_replace(true);
    }

    /// Waits until [`Hub::mark_ready`]; false when `limit` passed first.
    pub async fn wait_ready(&self, limit: std::time::Duration) -> bool {
        let mut ready = self.ready.subscribe();
        tokio::time::timeout(limit, ready.wait_for(|r| *r))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Moves the live position forward without changes to send: the feed
    /// starting at the end of the outbox, or jumping over history that was
    /// pruned before it could read it. Memory no longer covers the gap.
    pub fn advance(&self, to: Position) {
        let mut state = self.lock();
        if to > state.position {
            state.position = to;
            state.recent.forget(to);
        }
    }

    /// Tells every member of every room that changes may be missing
    /// (`reset`): the feed could not read part of the history.
    /// Their streams go on after `continues_after`.
    pub fn reset_all(&self, reason: &str, continues_after: Position) {
        let state = self.lock();
        for (room, members) in &state.rooms {
            let message = Utf8Bytes::from(crate::protocol::reset_message(room, reason, continues_after));
            for member in members {
                member.subscriber.push(Outbound::Control(Box::new(message.clone())));
            }
        }
    }

    /// Joins `sub` to `room` and queues its `subscribed` message (and, for a
    /// `since` older than the live position, the replay of what it missed)
    /// before any live change can be queued behind it.
    pub fn subscribe(&self, room: &str, sub: &Arc<Subscriber>, since: Option<Position>) -> Joined {
        self.subscribe_rooms(&[Room::from(room)], sub, since)
    }

    /// Joins `sub` to every room of `rooms` at one live position, as
    /// [`Hub::subscribe`] does for one: a `subscribed` per room, then what it
    /// missed of all of them, then live changes. For an ordered subscriber
    /// (`/sse`) the replay is one sequence in position order across the
    /// rooms, each position whole in one message. `AlreadyMember` (and
    /// nothing joined) when it is a member of one of them already.
    pub fn subscribe_rooms(&self, rooms: &[Room], sub: &Arc<Subscriber>, since: Option<Position>) -> Joined {
        let mut state = self.lock();
        let live = state.position;
        let already = rooms.iter().any(|room| {
            state
                .rooms
                .get(room)
                .is_some_and(|members| members.iter().any(|m| m.subscriber.id == sub.id))
        });
        if already {
            return Joined::AlreadyMember;
        }
        let floor = since.map_or(live, |s| s.max(live));
        for room in rooms {
            state.rooms.entry(Arc::clone(room)).or_default().push(Member {
                subscriber: Arc::clone(sub),
                floor,
            });
            let mut msg = String::with_capacity(64 + room.len());
            msg.push_str("{\"type\":\"subscribed\",\"room\":");
            push_json_str(&mut msg, room);
            msg.push_str(",\"position\":\"");
            msg.push_str(&floor.to_string());
            msg.push_str("\"}");
            sub.push_control(msg);
        }
        let replay = match since.filter(|s| *s < live) {
            None => Replay::None,
            Some(since) => {
                // A cursor, not a copy: the send loop reads the gap page by
                // page as the socket drains (from memory while it still
                // holds it, else from the outbox), ahead of every live
                // change queued after it. What the client is owed never
                // counts against its queue's bound.
                sub.push(Outbound::Replay(Box::new(ReplayRange {
                    rooms: rooms.to_vec(),
                    since,
                    upto: live,
                })));
                if state.recent.covers(since) {
                    Replay::Memory
                } else {
                    Replay::Outbox
                }
            }
        };
        Joined::Live {
            position: floor,
            replay,
        }
    }

    /// The next page of a replay of `room`'s `(after, upto]` from memory;
    /// None when memory no longer holds all of it (read the outbox).
    pub fn replay_page(
        &self,
        rooms: &[Room],
        after: Position,
        upto: Position,
        limits: PageLimits,
    ) -> Option<MemoryPage> {
        self.lock().recent.page(rooms, after, upto, limits)
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

    /// Queues one change; see [`Hub::dispatch_group`].
    pub fn dispatch(&self, change: Arc<Change>) -> Dispatched {
        self.dispatch_group(vec![change])
    }

    /// Runs changes that reached the gateway together (in commit order)
    /// through the pipeline: per room, repeats are dropped, the rest grouped
    /// into units of up to the batch size, each unit encoded once and queued
    /// to every member. A truncation or a reset is a `reset` to every member
    /// of the rooms it reaches, in its place. Remembers the changes for resumes.
    pub fn dispatch_group(&self, changes: Vec<Arc<Change>>) -> Dispatched {
        let mut state = self.lock();
        let mut done = Dispatched::default();
        let mut start = 0;
        for (i, change) in changes.iter().enumerate() {
            if change.op.resets() {
                fan_out(&mut state, &changes[start..i], &mut done);
                reset_rooms(&mut state, change, &mut done);
                start = i + 1;
            }
        }
        fan_out(&mut state, &changes[start..], &mut done);
        self.stats
            .deduplicated
            .fetch_add(done.deduplicated as u64, Ordering::Relaxed);
        for change in changes {
            state.position = state.position.max(change.position);
            state.recent.remember(change);
        }
        done
    }

    pub fn room_count(&self) -> usize {
        self.lock().rooms.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.lock().rooms.values().map(Vec::len).sum()
    }
}

/// `{"type":"batch","changes":[...]}` of whole messages.
pub(crate) fn batch_of(messages: &[String]) -> String {
    let mut text = String::with_capacity(messages.iter().map(String::len).sum::<usize>() + 32);
    text.push_str("{\"type\":\"batch\",\"changes\":[");
    text.push_str(&messages.join(","));
    text.push_str("]}");
    text
}

/// The pipeline over a run of changes with no truncation among them: see
/// [`Hub::dispatch_group`].
fn fan_out(state: &mut HubState, changes: &[Arc<Change>], done: &mut Dispatched) {
    if changes.is_empty() {
        return;
    }
    let HubState {
        rooms,
        dedup,
        pipeline,
        features,
        ..
    } = state;
    let now = tokio::time::Instant::now();
    done.direct.compression = Compression::of(features.compression, pipeline);
    // Written at once to idle sockets, unless sockets linger
    // (GATEWAY_BATCH_LINGER_MS: their send tasks decide when to write).
    let direct = pipeline.batch_linger.is_zero();
    // Each room's share of the group, in commit order.
    let mut shares: Vec<(&str, Vec<&Change>)> = Vec::new();
    let mut share_of: HashMap<&str, usize> = HashMap::new();
    for change in changes {
        let mut content = None;
        for room in &change.rooms {
            if !rooms.contains_key(room.as_str()) {
                continue;
            }
            // Events are never repeats: two "crew checked in" are two.
            if features.dedup && change.op.is_row() {
                let content = *content.get_or_insert_with(|| dedup.content_of(change));
                if !dedup.admit(room, change, content, pipeline.dedup_window, now) {
                    done.deduplicated += 1;
                    continue;
                }
            }
            let index = *share_of.entry(room.as_str()).or_insert_with(|| {
                shares.push((room.as_str(), Vec::new()));
                shares.len() - 1
            });
            shares[index].1.push(change);
        }
    }
    let urgent = |c: &Change| c.op.is_row() && pipeline.priority_of(&c.schema, &c.table).bypasses_batching();
    // Ordered subscribers (multi-room /sse) in more than one of these rooms
    // get their own units, in position order across their rooms.
    // Per ordered subscriber: it, and the rooms it is in with their floors.
    type Memberships<'a> = (Arc<Subscriber>, Vec<(&'a str, Position)>);
    let mut ordered: HashMap<u64, Memberships> = HashMap::new();
    for (room, _) in &shares {
        for member in rooms[*room].iter().filter(|m| m.subscriber.ordered) {
            ordered
                .entry(member.subscriber.id)
                .or_insert_with(|| (Arc::clone(&member.subscriber), Vec::new()))
                .1
                .push((room, member.floor));
        }
    }
    ordered.retain(|_, (_, joined)| joined.len() > 1);
    for (room, share) in &shares {
        let members = &rooms[*room];
        let priority: Vec<bool> = share.iter().map(|c| urgent(c)).collect();
        for range in plan_units(&priority, pipeline.batch_size, features.batching) {
            let group = &share[range.clone()];
            let started = std::time::Instant::now();
            let unit = Arc::new(Unit::new(room, group, priority[range.start]));
            done.encoding_us += started.elapsed().as_micros() as u64;
            done.units += 1;
            let (first, last) = (group[0].position, group[group.len() - 1].position);
            for member in members {
                if ordered.contains_key(&member.subscriber.id) {
                    continue;
                }
                let item = if first > member.floor {
                    Outbound::Changes(Arc::clone(&unit))
                } else if last > member.floor {
                    // This member resumed past part of the group: its
                    // own unit, without what it already has.
                    let rest: Vec<&Change> = group.iter().copied().filter(|c| c.position > member.floor).collect();
                    Outbound::Changes(Arc::new(Unit::new(room, &rest, unit.priority)))
                } else {
                    continue;
                };
                let count = match &item {
                    Outbound::Changes(u) => u.change_count(),
                    _ => 0,
                };
                if member.subscriber.push_live(item, direct.then_some(&mut done.direct)) {
                    done.deliveries += count;
                }
            }
        }
    }
    for (subscriber, joined) in ordered.into_values() {
        let mut entries: Vec<(&str, &Change)> = Vec::new();
        for (room, share) in &shares {
            if let Some((_, floor)) = joined.iter().find(|(r, _)| r == room) {
                entries.extend(share.iter().filter(|c| c.position > *floor).map(|c| (*room, *c)));
            }
        }
        // Stable: a change in several of its rooms keeps the rooms' order.
        entries.sort_by_key(|(_, c)| c.position);
        let limit = if features.batching {
            pipeline.batch_size.max(1)
        } else {
            1
        };
        let mut i = 0;
        while i < entries.len() {
            let alone = urgent(entries[i].1);
            let mut j = i + 1;
            while !alone && j < entries.len() && j - i < limit && !urgent(entries[j].1) {
                j += 1;
            }
            // One position never straddles two units: an event id after
            // the first would skip the rest of it on a resume.
            while j < entries.len() && entries[j].1.position == entries[j - 1].1.position {
                j += 1;
            }
            let started = std::time::Instant::now();
            let unit = Unit::for_rooms(&entries[i..j], alone);
            done.encoding_us += started.elapsed().as_micros() as u64;
            done.units += 1;
            let count = unit.change_count();
            if subscriber.push(Outbound::Changes(Arc::new(unit))) {
                done.deliveries += count;
            }
            i = j;
        }
    }
}

/// A TRUNCATE or a RESET: `reset` (reason `truncated`, or the reset's) to
/// every member of every room its patterns reach (a TRUNCATE's: what the
/// table's templates can produce). An ordered subscriber in several of them
/// gets one message for all (one position, one item).
fn reset_rooms(state: &mut HubState, change: &Change, done: &mut Dispatched) {
    let mut ordered: HashMap<u64, (Arc<Subscriber>, Vec<String>)> = HashMap::new();
    for (room, members) in &state.rooms {
        if !change.reaches(room) {
            continue;
        }
        let message = change.message_for(room);
        let shared = Utf8Bytes::from(message.clone());
        for member in members.iter().filter(|m| m.floor < change.position) {
            if member.subscriber.ordered {
                ordered
                    .entry(member.subscriber.id)
                    .or_insert_with(|| (Arc::clone(&member.subscriber), Vec::new()))
                    .1
                    .push(message.clone());
            } else if member.subscriber.push(Outbound::Control(Box::new(shared.clone()))) {
                done.deliveries += 1;
            }
        }
    }
    for (subscriber, messages) in ordered.into_values() {
        let count = messages.len();
        let text = match <[String; 1]>::try_from(messages) {
            Ok([one]) => one,
            Err(messages) => batch_of(&messages),
        };
        if subscriber.push_control(text) {
            done.deliveries += count;
        }
    }
    // The table's rows may come back with the same content: the clients
    // refetch, so none of it may be dropped as a repeat.
    state.dedup.clear();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Op;
    use serde_json::value::RawValue;

    fn change(position: i64, rooms: &[&str]) -> Arc<Change> {
        let key = RawValue::from_string("{\"id\":1}".into()).unwrap();
        let row = RawValue::from_string(format!("{{\"id\":1,\"version\":{position}}}")).unwrap();
        Arc::new(Change::new(
            Position(position),
            0,
            "public".into(),
            "tasks".into(),
            Op::Update,
            &key,
            &row,
            rooms.iter().map(|r| r.to_string()).collect(),
        ))
    }

    fn hub_at(start: Position) -> Hub {
        let settings = crate::config::Settings::for_tests();
        Hub::new(start, settings.pipeline, settings.features)
    }

    fn drain(rx: &mut QueueReceiver) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(item) = rx.try_recv() {
            match item {
                Outbound::Control(text) => out.push(text.to_string()),
                Outbound::Changes(unit) => out.push(unit.text.to_string()),
                Outbound::Replay(r) => out.push(format!("replay {} {}..{}", r.rooms.join(","), r.since, r.upto)),
            }
        }
        out
    }

    #[test]
    fn changes_reach_members_of_their_rooms_only() {
        let hub = hub_at(Position(10));
        let (a, mut rx_a) = Subscriber::new(1, 1 << 20);
        let (b, mut rx_b) = Subscriber::new(2, 1 << 20);
        let live_at_10 = Joined::Live {
            position: Position(10),
            replay: Replay::None,
        };
        assert_eq!(hub.subscribe("project:1", &a, None), live_at_10);
        assert_eq!(hub.subscribe("project:2", &b, None), live_at_10);
        assert_eq!(hub.subscribe("project:2", &b, None), Joined::AlreadyMember);
        assert_eq!(hub.dispatch(change(11, &["project:1"])).deliveries, 1);
        assert_eq!(hub.dispatch(change(12, &["project:1", "project:2"])).deliveries, 2);
        let got_a = drain(&mut rx_a);
        let got_b = drain(&mut rx_b);
        assert_eq!(got_a.len(), 3, "{got_a:?}");
        assert!(got_a[0].contains("\"subscribed\"") && got_a[0].contains("\"position\":\"10\""));
        assert!(got_a[1].contains("\"position\":\"11\""));
        assert_eq!(got_b.len(), 2, "{got_b:?}");
        assert!(got_b[1].contains("\"room\":\"project:2\"") && got_b[1].contains("\"position\":\"12\""));
        assert_eq!(hub.position(), Position(12));
        assert!(hub.unsubscribe("project:1", 1));
        assert!(!hub.unsubscribe("project:1", 1));
        assert_eq!(hub.room_count(), 1);
    }

    #[test]
    fn since_before_memory_queues_an_outbox_replay_and_a_future_since_is_a_floor() {
        let hub = hub_at(Position(20));
        let (a, mut rx) = Subscriber::new(1, 1 << 20);
        let joined = hub.subscribe("r", &a, Some(Position(15)));
        assert!(matches!(
            joined,
            Joined::Live {
                replay: Replay::Outbox,
                ..
            }
        ));
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
        let hub = hub_at(Position(0));
        for p in 1..=5 {
            hub.dispatch(change(p, if p % 2 == 0 { &["even", "all"] } else { &["all"] }));
        }
        let (a, mut rx) = Subscriber::new(1, 1 << 20);
        let joined = hub.subscribe("even", &a, Some(Position(1)));
        assert!(matches!(
            joined,
            Joined::Live {
                position: Position(5),
                replay: Replay::Memory
            }
        ));
        hub.dispatch(change(6, &["even"]));
        let got = drain(&mut rx);
        // The gap is a cursor in the queue, ahead of the live change; its
        // pages come from memory.
        assert_eq!(got[1], "replay even 1..5");
        assert!(got[2].contains("\"position\":\"6\""), "{got:?}");
        let limits = PageLimits {
            changes: 1,
            bytes: 1 << 20,
        };
        let first = hub
            .replay_page(&[Room::from("even")], Position(1), Position(5), limits)
            .unwrap();
        assert_eq!(first.changes[0].position, Position(2));
        let second = hub
            .replay_page(&[Room::from("even")], first.through, Position(5), limits)
            .unwrap();
        assert_eq!(second.changes[0].position, Position(4));
        let last = hub
            .replay_page(&[Room::from("even")], second.through, Position(5), limits)
            .unwrap();
        assert!(last.changes.is_empty());
        assert_eq!(last.through, Position(5), "the page reached the end of the range");
        // A jump (pruned history) empties memory: older resumes read the outbox.
        hub.advance(Position(100));
        let (b, _rx) = Subscriber::new(2, 1 << 20);
        let joined = hub.subscribe("even", &b, Some(Position(5)));
        assert!(matches!(
            joined,
            Joined::Live {
                replay: Replay::Outbox,
                ..
            }
        ));
    }

    /// The feed lost history: every member is told, with the position its
    /// stream goes on after (protocol 2).
    #[test]
    fn a_reset_of_every_room_says_where_the_stream_goes_on() {
        let hub = hub_at(Position(0));
        let (a, mut rx) = Subscriber::new(1, 1 << 20);
        hub.subscribe("r", &a, None);
        hub.reset_all("history_expired", Position(40));
        let got = drain(&mut rx);
        let reset: serde_json::Value = serde_json::from_str(&got[1]).unwrap();
        assert_eq!(
            reset,
            serde_json::json!({"type": "reset", "room": "r", "reason": "history_expired", "position": "40"})
        );
    }

    #[test]
    fn a_full_queue_closes_the_subscriber_as_slow() {
        let hub = hub_at(Position(0));
        let (slow, _rx) = Subscriber::new(1, 600);
        hub.subscribe("r", &slow, None);
        let mut delivered = 0;
        for p in 1..100 {
            delivered += hub.dispatch(change(p, &["r"])).deliveries;
        }
        assert!(delivered < 5, "{delivered}");
        assert!(slow.is_closing());
        let reason = slow.close_reason().unwrap();
        assert_eq!(reason.kind, CloseKind::SlowConsumer);
    }

    #[test]
    fn an_ordered_subscriber_gets_one_sequence_across_its_rooms() {
        let hub = hub_at(Position(0));
        let (sse, mut rx) = Subscriber::with_order(1, 1 << 20, true);
        let (ws, mut rx_ws) = Subscriber::new(2, 1 << 20);
        hub.subscribe_rooms(&[Room::from("a"), Room::from("b")], &sse, None);
        hub.subscribe("a", &ws, None);
        hub.subscribe("b", &ws, None);
        hub.dispatch_group(vec![change(1, &["a"]), change(2, &["b"]), change(3, &["a", "b"])]);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 3, "two subscribed, one unit: {got:?}");
        let unit: serde_json::Value = serde_json::from_str(&got[2]).unwrap();
        let order: Vec<(String, String)> = unit["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["position"].as_str().unwrap().to_owned(),
                    c["room"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        let pairs = [("1", "a"), ("2", "b"), ("3", "a"), ("3", "b")].map(|(p, r)| (p.to_owned(), r.to_owned()));
        assert_eq!(order, pairs);
        // A WebSocket member shares each room's units instead.
        let got = drain(&mut rx_ws);
        assert_eq!(got.len(), 4, "{got:?}");
        assert!(got[2].contains("\"room\":\"a\"") && got[3].contains("\"room\":\"b\""));
    }

    #[test]
    fn a_truncation_resets_the_members_of_every_matching_room_in_its_place() {
        let hub = hub_at(Position(0));
        let (sse, mut rx) = Subscriber::with_order(1, 1 << 20, true);
        let (ws, mut rx_ws) = Subscriber::new(2, 1 << 20);
        hub.subscribe_rooms(&[Room::from("project:1"), Room::from("project:2")], &sse, None);
        hub.subscribe("project:1", &ws, None);
        hub.subscribe("task:1", &ws, None);
        let truncate = Arc::new(Change::truncate(
            Position(2),
            0,
            "public".into(),
            "tasks".into(),
            vec!["project:*".into()],
        ));
        hub.dispatch_group(vec![change(1, &["project:1"]), truncate, change(3, &["project:1"])]);
        let got = drain(&mut rx_ws);
        assert_eq!(got.len(), 5, "{got:?}");
        assert!(got[2].contains("\"position\":\"1\""));
        assert!(got[3].contains("\"type\":\"reset\"") && got[3].contains("truncated"));
        assert!(got[4].contains("\"position\":\"3\""));
        // The ordered subscriber: both resets in one message, in place.
        let got = drain(&mut rx);
        assert_eq!(got.len(), 5, "{got:?}");
        let resets: serde_json::Value = serde_json::from_str(&got[3]).unwrap();
        assert_eq!(resets["type"], "batch");
        assert_eq!(resets["changes"].as_array().unwrap().len(), 2);
        // Resuming across it from memory: the reset, for the resumed room.
        let (late, mut rx_late) = Subscriber::new(3, 1 << 20);
        hub.subscribe("project:2", &late, Some(Position(1)));
        let got = drain(&mut rx_late);
        assert_eq!(
            got,
            [
                r#"{"type":"subscribed","room":"project:2","position":"3"}"#,
                "replay project:2 1..3"
            ]
        );
        let limits = PageLimits {
            changes: 10,
            bytes: 1 << 20,
        };
        let page = hub
            .replay_page(&[Room::from("project:2")], Position(1), Position(3), limits)
            .unwrap();
        let found: Vec<Position> = page.changes.iter().map(|c| c.position).collect();
        assert_eq!(found, [Position(2)], "the truncation reaches project:2 by its pattern");
    }
}
