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

    /// The changes after `since`, oldest first.
    pub(super) fn after(&self, since: Position) -> impl Iterator<Item = &Arc<Change>> {
        self.changes.iter().filter(move |c| c.position > since)
    }

    /// The commit time of the change at `position`, if it is here.
    pub(super) fn committed_at(&self, position: Position) -> Option<i64> {
        let index = self.changes.binary_search_by_key(&position, |c| c.position).ok()?;
        Some(self.changes[index].committed_at_us)
    }
}
