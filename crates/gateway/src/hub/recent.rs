//! The recent window: the last changes the hub dispatched, kept in memory
//! (bounded by count and by bytes) so that most resumes (a client that
//! blipped, or moved from another instance) are served without a database
//! read, and acks find their change's commit time.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::change::{Change, Position};

/// How much recent history is kept.
const RECENT_CHANGES: usize = 10_000;
const RECENT_BYTES: usize = 32 << 20;
/// Most entries one replay page looks at under the hub's lock.
const SCAN_LIMIT: usize = 4096;

/// How large one replay page may be: whichever bound is reached first (a
/// single change larger than `bytes` is a page of its own).
#[derive(Debug, Clone, Copy)]
pub struct PageLimits {
    pub changes: usize,
    pub bytes: usize,
}

/// One page of a room's history, from memory.
#[derive(Debug)]
pub struct MemoryPage {
    /// The room's changes in the page, oldest first (possibly none: the
    /// scanned stretch held nothing for the room).
    pub changes: Vec<Arc<Change>>,
    /// Everything up to this position has been looked at: the next page
    /// starts after it.
    pub through: Position,
}

pub(super) struct Recent {
    /// Every change dispatched after `floor`, oldest first.
    changes: VecDeque<Arc<Change>>,
    floor: Position,
    bytes: usize,
}

impl Recent {
    pub(super) fn new(floor: Position) -> Recent {
        Recent {
            changes: VecDeque::new(),
            floor,
            bytes: 0,
        }
    }

    /// Keeps `change` (the newest), dropping the oldest past the bounds.
    pub(super) fn remember(&mut self, change: Arc<Change>) {
        self.bytes += change.size();
        self.changes.push_back(change);
        while self.changes.len() > RECENT_CHANGES || self.bytes > RECENT_BYTES {
            let Some(old) = self.changes.pop_front() else {
                break;
            };
            self.bytes -= old.size();
            self.floor = old.position;
        }
    }

    /// Forgets everything: memory no longer covers what comes after `floor`.
    pub(super) fn forget(&mut self, floor: Position) {
        self.changes.clear();
        self.bytes = 0;
        self.floor = floor;
    }

    /// Whether every change after `since` is here.
    pub(super) fn covers(&self, since: Position) -> bool {
        since >= self.floor
    }

    /// The next page of the changes reaching any of `rooms` in `(after, upto]`, or None when
    /// memory no longer holds everything after `after` (the outbox does).
    /// A page ends at `limits`; it looks at no more than [`SCAN_LIMIT`]
    /// entries, so the hub's lock is held briefly whatever the gap.
    pub(super) fn page(
        &self,
        rooms: &[super::Room],
        after: Position,
        upto: Position,
        limits: PageLimits,
    ) -> Option<MemoryPage> {
        if !self.covers(after) {
            return None;
        }
        let start = self.changes.partition_point(|c| c.position <= after);
        let mut page = MemoryPage {
            changes: Vec::new(),
            through: upto,
        };
        let mut bytes = 0;
        for (scanned, change) in self.changes.range(start..).enumerate() {
            if change.position > upto {
                break;
            }
            let full = page.changes.len() >= limits.changes || (bytes > 0 && bytes + change.size() > limits.bytes);
            if full || scanned >= SCAN_LIMIT {
                // Stop before this one: the next page starts with it.
                page.through = Position(change.position.0 - 1);
                return Some(page);
            }
            if rooms.iter().any(|room| change.reaches(room)) {
                bytes += change.size();
                page.changes.push(Arc::clone(change));
            }
        }
        Some(page)
    }

    /// The commit time of the change at `position`, if it is here.
    pub(super) fn committed_at(&self, position: Position) -> Option<i64> {
        let index = self.changes.binary_search_by_key(&position, |c| c.position).ok()?;
        Some(self.changes[index].committed_at_us)
    }
}
