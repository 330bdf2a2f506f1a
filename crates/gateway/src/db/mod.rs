//! Every query on the `realtime` schema, in one place: applying the
//! migrations and tracking tables (`capture`), reading the outbox for the
//! source's catch-up and the sockets' replays (`outbox`), pruning it
//! (`history`), `realtime.authorize` (`authorize`), the probe's row
//! (`probe`), the database clock (`clock`), and the pools they run on,
//! by who may use them (`pools`). The capture itself is SQL
//! (`crates/gateway/migrations/`); callers here decide timeouts and what a
//! failure means.

mod authorize;
mod capture;
mod clock;
mod history;
mod outbox;
mod pools;
mod probe;

// What an operator's commands, the tools and the tests use.
pub use capture::{POSITION_LOCK, database_channel, migrate, track, untrack};
pub use history::{PRUNE_LOCK, prune};
pub use pools::Pools;

// What the daemon's own parts use.
pub(crate) use authorize::{authorize, authorize_exists};
pub(crate) use clock::clock_now_us;
pub(crate) use history::run_pruner;
pub(crate) use outbox::{
    change_document, changes_after, latest_position, outbox_end, pruned_through, room_page, wait_out_commits,
};
pub(crate) use probe::{commit_probe, forget_old_probes};
