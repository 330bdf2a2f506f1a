//! Capture sources: where committed changes come from, the first stage of
//! the data path after the database (capture SQL -> **source** -> hub ->
//! sockets).
//!
//! A [`Source`] runs sessions. A session connects, catches up after the last
//! position the feed dispatched, then follows live, handing commit-ordered
//! changes to the [`Dispatcher`]; it ends with an error when its connection
//! is lost, or cleanly on shutdown. The [`Feed`] does what every source
//! shares: it runs sessions with capped backoff, keeps the position, drops
//! what was dispatched already, queues changes into the hub, and says
//! whether the feed is live, catching up or down (`/healthz` `feed`).
//!
//! `notify` (SPEC section 2) is LISTEN plus outbox catch-up, over the rows
//! the writers' trigger puts in the outbox. `wal` (SPEC section 8, `wal/`)
//! puts the same rows there from logical replication instead, written by
//! one leading instance ([`WalCapture`]); every instance reads them as in
//! notify mode, since positions are outbox positions in both, so nothing
//! after the dispatcher changes and a gateway serves across a switch. The
//! leader also hands each small batch it commits to its own instance's
//! feed ([`HandOff`]), which takes it ahead of its NOTIFY when it is next
//! in commit order.

mod feed;
mod listen;
mod notify;
mod wal;

use tokio_util::sync::CancellationToken;

use crate::change::Position;

pub use feed::{Dispatcher, Feed};
pub use notify::NotifySource;
pub use wal::{SwitchOutcome, WalCapture, switch_to_notify, switch_to_wal, wal_readiness, watch_slot};

/// A batch the wal leader committed to the outbox, given to its own
/// instance's feed at once: what the batch's NOTIFY will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandOff {
    /// The batch's first position (its positions follow without a gap).
    pub first: Position,
    /// The NOTIFY's text, `{"docs":[...]}`.
    pub payload: String,
}

/// How many hand-offs may wait for the feed; more are dropped (their
/// NOTIFYs still come).
pub const HANDOFFS_QUEUED: usize = 64;

/// A capture source (see the module documentation).
pub trait Source: Send {
    /// The source's name in logs: `notify`, `wal`.
    fn name(&self) -> &'static str;

    /// One session: connect, catch up after [`Dispatcher::position`], then
    /// follow live, handing changes to `out` in commit order and saying when
    /// it is catching up and when live. Returns `Ok` only on shutdown; an
    /// error ends the session, and the feed starts another after a backoff.
    fn session(
        &mut self,
        out: &mut Dispatcher,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;
}
