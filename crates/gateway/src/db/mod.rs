//! Every query on the `realtime` schema, in one place: applying the
//! migrations and tracking tables (`capture`), reading the outbox for the
//! source's catch-up and the sockets' replays (`outbox`), pruning it
//! (`history`), `realtime.authorize` (`authorize`), the probe's row
//! (`probe`), the database clock (`clock`), the pools they run on, by
//! who may use them (`pools`), the wal source's leader, slot and switches
//! (`wal`); connecting, with errors in one line (`connect`), and the
//! privileges a least-privileged gateway role needs (`grants`). The capture itself is SQL
//! (`crates/gateway/migrations/`); callers here decide timeouts and what a
//! failure means.

mod authorize;
mod capture;
mod clock;
mod connect;
mod grants;
mod history;
mod outbox;
mod pools;
mod probe;
mod wal;

// What an operator's commands, the tools and the tests use.
pub use capture::{Migrated, Migration, POSITION_LOCK, Projection, database_channel, migrate, track, untrack};
pub use connect::{CONNECT_TIMEOUT, ConnectError, Target, connect, describe, options as connect_options};
pub use grants::{Grant, GrantSource, grants};
pub use history::{PRUNE_LOCK, prune};
pub use pools::Pools;
pub use wal::{LEADER_LOCK, SlotState, SourceSettings, slot_state, source_settings};

// What the daemon's own parts use.
pub(crate) use authorize::{authorize, authorize_exists};
pub(crate) use clock::clock_now_us;
pub(crate) use history::run_pruner;
pub(crate) use outbox::{
    change_documents, changes_after, latest_position, outbox_end, pruned_through, room_page, wait_out_commits,
};
pub(crate) use probe::{commit_probe, forget_old_probes};
pub(crate) use wal::{
    Progress, SWITCH_LOCK, ServerReadiness, WalBatch, WalWriter, Written, begin, commit, commit_drain_marker,
    create_slot, deadlock_timeout, drained_past, drop_publication, drop_slot, end_slot_holder, ensure_publication,
    fence_leaders, is_lock_conflict, is_render_error, is_stale_leader, is_undefined_function, ping,
    prepare_leader_session, progress_state, rollback, server_readiness, set_local_lock_timeout, set_progress_state,
    source_settings_on, switch_to_notify, switch_to_wal, take_leadership, tracked_table_names, wait_for_leadership,
    wal_write, write_slot_reset,
};
