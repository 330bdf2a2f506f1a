//! A resume's replay as a cursor over a room's (or an `/sse` stream's rooms') history: each page is read
//! when the socket has taken the last one, from the hub's recent window
//! while it still holds the gap, else from the outbox (one statement per
//! page, from the client-work pool, within a time limit, released before
//! the page is sent). Memory per connection is one page, whatever the gap.

use std::sync::Arc;
use std::time::Duration;

use crate::change::{Change, Notification, Position};
use crate::hub::{PageLimits, ReplayRange, Room};
use crate::state::AppState;
use crate::telemetry::Counters;

/// Most changes and bytes in one page: what a connection holds of its
/// replay at a time (a single larger change is a page of its own).
const PAGE_CHANGES: usize = 500;
const PAGE_BYTES: usize = 1 << 20;
/// The longest one page's read from the outbox may take, waiting for a
/// pooled connection included.
pub(crate) const PAGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a replay stands: `(after, upto]` is still owed.
#[derive(Debug)]
pub(crate) struct ReplayCursor {
    /// One room (`/ws`), or every room of an `/sse` stream.
    rooms: Vec<Room>,
    /// Each position whole in one message (a multi-room `/sse` stream,
    /// whose event id resumes every room).
    ordered: bool,
    after: Position,
    upto: Position,
}

/// What the next page holds.
#[derive(Debug)]
pub(crate) enum Page {
    /// The room's next changes, oldest first (possibly none: that stretch of
    /// memory held nothing for the room).
    Changes(Vec<Arc<Change>>),
    /// Part of the gap was pruned: the client must refetch (`reset`). The
    /// replay ends here; the live stream goes on.
    Pruned,
}

/// Why a page could not be read. The client comes back and resumes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReplayError {
    #[error("history read failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("history read did not finish within {PAGE_TIMEOUT:?}")]
    TimedOut,
}

impl ReplayCursor {
    pub(crate) fn new(range: ReplayRange, ordered: bool) -> ReplayCursor {
        let ReplayRange { rooms, since, upto } = range;
        ReplayCursor {
            rooms,
            ordered,
            after: since,
            upto,
        }
    }

    pub(crate) fn rooms(&self) -> &[Room] {
        &self.rooms
    }

    /// The messages `change` makes for the replayed rooms: one per room it
    /// reaches, or for an ordered stream all of them in one `batch`.
    pub(crate) fn messages_for(&self, change: &Change) -> Vec<String> {
        let messages: Vec<String> = self
            .rooms
            .iter()
            .filter(|room| change.reaches(room))
            .map(|room| change.message_for(room))
            .collect();
        if self.ordered && messages.len() > 1 {
            vec![crate::hub::batch_of(&messages)]
        } else {
            messages
        }
    }

    /// Where the replay ends and the live stream takes over: after a
    /// `reset`, the position the room's stream goes on after.
    pub(crate) fn upto(&self) -> Position {
        self.upto
    }

    /// Nothing more is owed.
    pub(crate) fn is_done(&self) -> bool {
        self.after >= self.upto
    }

    /// Reads the next page and moves past it.
    pub(crate) async fn next_page(&mut self, state: &AppState) -> Result<Page, ReplayError> {
        let limits = PageLimits {
            changes: PAGE_CHANGES,
            bytes: PAGE_BYTES,
        };
        let counters = &state.telemetry.counters;
        if let Some(page) = state.hub.replay_page(&self.rooms, self.after, self.upto, limits) {
            self.after = page.through;
            Counters::add(&counters.replayed_from_memory, page.changes.len() as u64);
            return Ok(Page::Changes(page.changes));
        }
        let read = crate::db::room_page(
            &state.pool,
            &self.rooms,
            self.after,
            self.upto,
            PAGE_CHANGES as i64,
            PAGE_BYTES as i64,
        );
        let page = tokio::time::timeout(PAGE_TIMEOUT, read)
            .await
            .map_err(|_| ReplayError::TimedOut)??;
        if self.after < page.pruned_through {
            self.after = self.upto;
            return Ok(Page::Pruned);
        }
        let Some(last) = page.last else {
            self.after = self.upto;
            return Ok(Page::Changes(Vec::new()));
        };
        self.after = last;
        let mut changes = Vec::with_capacity(page.documents.len());
        for document in &page.documents {
            match Notification::parse(document) {
                Ok(Notification::Change(change)) => changes.push(Arc::new(change)),
                Ok(Notification::Reference(_)) | Err(_) => {
                    tracing::warn!(rooms = ?self.rooms, "skipping an outbox row that is not a change document");
                }
            }
        }
        Counters::add(&counters.replayed_from_outbox, changes.len() as u64);
        Ok(Page::Changes(changes))
    }
}
