//! The wal source (`GATEWAY_SOURCE=wal`, SPEC section 8): capture that
//! costs the writers nothing. The tracked tables are members of one
//! publication; one gateway instance at a time, the leader, streams it from
//! a persistent logical replication slot and writes the decoded
//! transactions, in commit-LSN order, into the outbox (`realtime.wal_write`)
//! with positions and NOTIFYs, in batches, off the writers' path:
//!
//! stream (`stream.rs`) -> transactions (`transactions.rs`, over
//! `pgoutput.rs`) -> batch (`batch.rs`) -> outbox (`leader.rs`, through
//! `db::wal_write`).
//!
//! Every instance, the leader too, then reads the outbox exactly as in
//! notify mode (the feed over `NotifySource`: LISTEN and catch-up):
//! positions are outbox positions in commit order in both modes, so the
//! protocol, resume, retention and scale-out are the same, and a gateway
//! keeps serving across a switch. What wal mode adds is [`WalCapture`],
//! run beside the feed by every instance: followers wait on the leader lock
//! and take over.
//!
//! The slot is confirmed only up to what is committed in the outbox, so a
//! leader killed at any instant loses nothing; the progress row
//! (`realtime.wal_progress`) names the last change written, so a replayed
//! transaction is skipped, and its epoch fences a leader that was replaced.

mod batch;
mod leader;
mod pgoutput;
mod slot;
mod stream;
mod switch;
mod transactions;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::anyhow;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ws_gateway_client::Backoff;

use super::HandOff;
use crate::telemetry::Telemetry;

pub use slot::watch_slot;
pub use switch::{SwitchOutcome, switch_to_notify, switch_to_wal, wal_readiness};

/// Backoff between leader sessions that failed.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How often an instance whose database is not (or no longer) in wal mode
/// looks again.
const NOT_WAL_RECHECK: Duration = Duration::from_secs(5);

/// Any single database call of the leader outside a batch write (see
/// `source::notify` for why every call is bounded).
const DB_CALL_TIMEOUT: Duration = Duration::from_secs(10);

async fn bounded<T, E>(what: &str, call: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    use anyhow::Context;
    match tokio::time::timeout(DB_CALL_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => Err(anyhow!("{what}: no answer from the database in {DB_CALL_TIMEOUT:?}")),
    }
}

/// How a leader session ended, when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Shutdown,
    /// The database's source is notify (`ws-gateway source notify` ran, or
    /// never `source wal`): nothing to lead.
    NotWal,
}

/// The leader's side of the wal source: elections, and leader sessions
/// with capped backoff.
pub struct WalCapture {
    database_url: String,
    telemetry: Arc<Telemetry>,
    /// Set after a batch failed to render: the next sessions render row by
    /// row (`safe`) until they are past it, so that one bad row never stalls
    /// the slot.
    safe_until: Option<pgwire_replication::Lsn>,
    /// This instance's feed, which takes the batches this leader commits.
    handoff: Option<tokio::sync::mpsc::Sender<HandOff>>,
}

impl WalCapture {
    pub fn new(database_url: String, telemetry: Arc<Telemetry>) -> WalCapture {
        WalCapture {
            database_url,
            telemetry,
            safe_until: None,
            handoff: None,
        }
    }

    /// Hands each small batch this leader commits to `feed` (see
    /// `source::notify`).
    pub fn with_handoff(mut self, feed: tokio::sync::mpsc::Sender<HandOff>) -> WalCapture {
        self.handoff = Some(feed);
        self
    }

    /// Elects and leads until shutdown. Failures are logged and retried:
    /// the feed of every instance keeps serving what is in the outbox.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, HEALTHY_AFTER);
        let mut said_not_wal = false;
        loop {
            let started = Instant::now();
            let ended = tokio::select! {
                ended = leader::session(&self.database_url, &self.telemetry, self.handoff.as_ref(), &mut self.safe_until, &shutdown) => ended,
                () = shutdown.cancelled() => Ok(SessionEnd::Shutdown),
            };
            self.telemetry.wal.leader.store(false, Ordering::Relaxed);
            let delay = match ended {
                Ok(SessionEnd::Shutdown) => return Ok(()),
                Ok(SessionEnd::NotWal) => {
                    if !said_not_wal {
                        tracing::warn!(
                            "GATEWAY_SOURCE=wal, but the database's source is notify (`ws-gateway source notify` ran?): \
                             not capturing; the feed still serves the outbox. Restart with GATEWAY_SOURCE=notify"
                        );
                        said_not_wal = true;
                    }
                    NOT_WAL_RECHECK
                }
                Err(error) => {
                    said_not_wal = false;
                    let delay = backoff.next_delay(started);
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = delay.as_millis() as u64,
                        "wal leader session ended; electing again (nothing is lost: the slot is confirmed only up to the outbox)"
                    );
                    delay
                }
            };
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}
