//! Dedup: per room and row, a change whose content equals the last one sent
//! within the window is dropped. A->B->A is three sends; A->A is one.
//!
//! Memory is bounded: entries expire with the window, and past `capacity`
//! the oldest are forgotten first (forgetting only means a repeat may be
//! sent, never that a change is lost).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash, Hasher};
use std::time::Duration;

use tokio::time::Instant;

use crate::change::Change;

/// Entries kept at most, across all rooms.
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Debug)]
pub struct Dedup {
    /// (room, row) -> (content of the last send, when it expires).
    last: HashMap<u64, (u64, Instant)>,
    /// Keys in the order their current entry was written, with that
    /// entry's expiry, so expired and oldest entries leave first.
    order: VecDeque<(u64, Instant)>,
    capacity: usize,
    hasher: std::hash::RandomState,
    pub dropped: u64,
}

impl Dedup {
    pub fn new(capacity: usize) -> Dedup {
        Dedup {
            last: HashMap::new(),
            order: VecDeque::new(),
            capacity,
            hasher: std::hash::RandomState::new(),
            dropped: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.last.len()
    }

    /// A fingerprint of what a client would see of the change (operation and
    /// row), computed once per change, shared by its rooms.
    pub fn content_of(&self, change: &Change) -> u64 {
        let mut h = self.hasher.build_hasher();
        change.op.as_str().hash(&mut h);
        change.row_json().hash(&mut h);
        h.finish()
    }

    /// True when `change` must be sent to `room`; records it as the last send.
    pub fn admit(&mut self, room: &str, change: &Change, content: u64, window: Duration, now: Instant) -> bool {
        self.expire(now);
        let mut h = self.hasher.build_hasher();
        room.hash(&mut h);
        change.schema.hash(&mut h);
        change.table.hash(&mut h);
        change.key_json().hash(&mut h);
        let key = h.finish();
        if let Some((last_content, expires)) = self.last.get(&key)
            && *last_content == content
            && *expires > now
        {
            self.dropped += 1;
            return false;
        }
        let expires = now + window;
        self.last.insert(key, (content, expires));
        self.order.push_back((key, expires));
        while self.last.len() > self.capacity {
            self.evict_front();
        }
        // Stale order entries (keys rewritten since) are bounded too.
        if self.order.len() > self.capacity * 2 {
            self.order
                .retain(|(k, e)| self.last.get(k).is_some_and(|(_, cur)| cur == e));
        }
        true
    }

    fn expire(&mut self, now: Instant) {
        while let Some((_, expires)) = self.order.front() {
            if *expires > now {
                break;
            }
            self.evict_front();
        }
    }

    fn evict_front(&mut self) {
        if let Some((key, expires)) = self.order.pop_front() {
            // Only the entry this order slot wrote; a later write of the same
            // key has its own slot further back.
            if self.last.get(&key).is_some_and(|(_, e)| *e == expires) {
                self.last.remove(&key);
            }
        }
    }

    pub fn clear(&mut self) {
        self.last.clear();
        self.order.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Op, Position};
    use serde_json::value::RawValue;

    fn change(id: i64, title: &str) -> Change {
        let key = RawValue::from_string(format!("{{\"id\":{id}}}")).unwrap();
        let row = RawValue::from_string(format!("{{\"id\":{id},\"title\":\"{title}\"}}")).unwrap();
        Change::new(
            Position(1),
            0,
            "public".into(),
            "tasks".into(),
            Op::Update,
            &key,
            &row,
            vec!["r".into()],
        )
    }

    fn send(d: &mut Dedup, room: &str, c: &Change, now: Instant) -> bool {
        let content = d.content_of(c);
        d.admit(room, c, content, Duration::from_secs(5), now)
    }

    #[tokio::test(start_paused = true)]
    async fn repeats_within_the_window_are_dropped() {
        let mut d = Dedup::new(100);
        let now = Instant::now();
        let (a, b) = (change(1, "A"), change(1, "B"));
        assert!(send(&mut d, "r", &a, now));
        assert!(send(&mut d, "r", &b, now));
        assert!(send(&mut d, "r", &a, now), "A->B->A is three sends");
        assert!(!send(&mut d, "r", &a, now), "A->A is one");
        assert!(send(&mut d, "other", &a, now), "rooms are separate");
        assert!(send(&mut d, "r", &change(2, "A"), now), "rows are separate");
        assert_eq!(d.dropped, 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(
            send(&mut d, "r", &a, Instant::now()),
            "after the window a repeat is sent"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let mut d = Dedup::new(10);
        let now = Instant::now();
        for id in 0..1000 {
            send(&mut d, "r", &change(id, "x"), now);
        }
        assert!(d.len() <= 10);
        assert!(d.order.len() <= 20);
        tokio::time::advance(Duration::from_secs(6)).await;
        send(&mut d, "r", &change(5000, "x"), Instant::now());
        assert_eq!(d.len(), 1, "expired entries leave");
    }
}
