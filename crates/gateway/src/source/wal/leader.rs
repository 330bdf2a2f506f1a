//! One leader session: wait for the leader lock, take the next epoch,
//! check the slot (recreating it if it was lost), stream it, and write what
//! it decodes into the outbox in batches, confirming the slot only up to
//! what has committed there.
//!
//! The lock, the progress and the batch writes share one connection: the
//! instance that writes is the instance that holds the lock, and when that
//! connection dies the lock goes with it. The epoch check in every write is
//! the second fence.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::FutureExt;
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgConnection};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::batch::{Batch, Concern};
use super::stream::replication_config;
use super::transactions::{At, Step, Transactions};
use super::{SessionEnd, bounded};
use crate::change::Position;
use crate::db::{self, Progress};
use crate::source::HandOff;
use crate::telemetry::{SlotHealth, Telemetry};

/// A batch is written once this many changes wait at a transaction's end.
const MAX_BATCH_CHANGES: usize = 4096;
/// A transaction larger than this is written in chunks, inside the one
/// outbox transaction that commits it.
const CHUNK_CHANGES: usize = 4096;
const CHUNK_BYTES: usize = 16 << 20;
/// How long START_REPLICATION may take (the client has no connect timeout).
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a replaced leader's walsender may take to go.
const SLOT_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// The leader's connection is proven alive this often when idle; a
/// partition otherwise leaves the lock held by a dead session unnoticed.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// A batch write, which can be large.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Follows until the lock is ours, then leads until something ends it.
pub(super) async fn session(
    database_url: &str,
    telemetry: &Arc<Telemetry>,
    handoff: Option<&tokio::sync::mpsc::Sender<HandOff>>,
    safe_until: &mut Option<Lsn>,
    shutdown: &CancellationToken,
) -> anyhow::Result<SessionEnd> {
    let options: PgConnectOptions = database_url.parse().context("parsing DATABASE_URL")?;
    // A follower waits in lock calls, and batches can be large: neither is
    // a slow statement worth a warning.
    let options = options
        .application_name("ws-gateway wal leader")
        .log_slow_statements(tracing::log::LevelFilter::Off, Duration::from_secs(3600));
    let mut conn = bounded("connecting the wal leader's connection", options.connect()).await?;
    bounded(
        "setting up the wal leader's session",
        db::prepare_leader_session(&mut conn),
    )
    .await?;

    loop {
        let settings = bounded("reading realtime.settings", db::source_settings_on(&mut conn)).await?;
        if settings.source != "wal" {
            return Ok(SessionEnd::NotWal);
        }
        // Waits up to lock_timeout, then looks at the settings again.
        let ours = tokio::select! {
            ours = db::wait_for_leadership(&mut conn) => ours.context("waiting for the wal leader lock")?,
            () = shutdown.cancelled() => return Ok(SessionEnd::Shutdown),
        };
        if ours {
            break;
        }
    }

    let progress = bounded("taking the wal leadership", db::take_leadership(&mut conn)).await?;
    let settings = bounded("reading realtime.settings", db::source_settings_on(&mut conn)).await?;
    if settings.source != "wal" {
        return Ok(SessionEnd::NotWal);
    }
    let slot = settings
        .slot
        .context("realtime.settings.wal_slot is not set: run `ws-gateway source wal`")?;
    if progress.state == "idle" {
        bail!(
            "the database's source is wal but the leader's progress is not set up: run `ws-gateway source wal` again"
        );
    }
    telemetry.wal.leader.store(true, Ordering::Relaxed);
    tracing::info!(epoch = progress.epoch, slot = %slot, state = %progress.state, "leading the wal source");

    release_slot(&mut conn, &slot).await?;
    let state = bounded("reading the replication slot", db::slot_state(&mut conn, &slot)).await?;
    let lost = match &state {
        None => Some("the replication slot is missing".to_owned()),
        Some(s) if s.wal_status.as_deref() == Some("lost") => {
            Some("the replication slot was invalidated (it retained more WAL than max_slot_wal_keep_size)".to_owned())
        }
        _ => None,
    };
    let progress = match (lost, progress.state.as_str()) {
        (Some(why), _) => recreate_slot(&mut conn, telemetry, progress.epoch, slot.clone(), why).await?,
        (None, "resetting") => {
            recreate_slot(
                &mut conn,
                telemetry,
                progress.epoch,
                slot.clone(),
                "a slot reset was interrupted".into(),
            )
            .await?
        }
        _ => progress,
    };

    let start = parse_lsn(&progress.end_lsn)?;
    let config = replication_config(database_url, &slot, &settings.publication, start, "ws-gateway wal")?;
    let mut client = ReplicationClient::connect(config)
        .await
        .context("starting the replication connection")?;
    match tokio::time::timeout(START_TIMEOUT, client.wait_started()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            client.abort();
            return Err(anyhow!(error)).context(format!("START_REPLICATION of slot {slot}"));
        }
        Err(_) => {
            client.abort();
            bail!("START_REPLICATION of slot {slot}: no answer in {START_TIMEOUT:?}");
        }
    }
    tracing::info!(slot = %slot, from = %start, "streaming the wal slot");

    let mut leading = Leading {
        conn,
        client,
        epoch: progress.epoch,
        durable: At {
            commit_lsn: parse_lsn(&progress.commit_lsn)?,
            seq: progress.seq,
        },
        switching: progress.state == "switching",
        transactions: Transactions::default(),
        batch: Batch::default(),
        open: false,
        pending_durable: None,
        pending_confirm: None,
        written_in_open: 0,
        last_db: Instant::now(),
        switch_to: None,
        warned: Default::default(),
        without_write_function: Default::default(),
        handoff: handoff.cloned(),
        telemetry: Arc::clone(telemetry),
    };
    let ended = leading.run(safe_until, shutdown).await;
    leading.client.abort();
    ended
}

fn parse_lsn(text: &str) -> anyhow::Result<Lsn> {
    Lsn::parse(text).map_err(|e| anyhow!("reading LSN {text:?}: {e}"))
}

/// Ends a walsender still holding the slot (a replaced leader's), and waits
/// until the slot is free.
async fn release_slot(conn: &mut PgConnection, slot: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + SLOT_RELEASE_TIMEOUT;
    loop {
        let state = bounded("reading the replication slot", db::slot_state(conn, slot)).await?;
        if state.is_none_or(|s| s.active_pid.is_none()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the replication slot {slot} is still streamed by another session after {SLOT_RELEASE_TIMEOUT:?}");
        }
        bounded("ending the slot's previous walsender", db::end_slot_holder(conn, slot)).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The slot is gone (invalidated, or dropped): what it held is lost.
/// Recreates it, then writes a reset of every room (`history_lost`) at a
/// fresh position, in the transaction that starts the progress over at the
/// new slot's consistent point: every change committed after that point
/// comes after the reset, so a client that refetches on the reset misses
/// nothing. A leader that dies in between finds the state `resetting` and
/// does it again.
async fn recreate_slot(
    conn: &mut PgConnection,
    telemetry: &Telemetry,
    epoch: i64,
    slot: String,
    why: String,
) -> anyhow::Result<Progress> {
    let slot = slot.as_str();
    tracing::error!(
        slot,
        reason = %why,
        "the wal slot is lost: changes committed since the last one written are gone; recreating the slot and telling every client to reset (history_lost)"
    );
    telemetry.wal.set_slot_health(SlotHealth::Lost);
    bounded(
        "marking the slot reset",
        db::set_progress_state(conn, epoch, "resetting"),
    )
    .await?;
    release_slot(conn, slot).await?;
    bounded("dropping the lost slot", db::drop_slot(conn, slot)).await?;
    // Waits for the transactions running now: a consistent starting point.
    let start = tokio::time::timeout(Duration::from_secs(300), db::create_slot(conn, slot))
        .await
        .map_err(|_| anyhow!("creating the slot {slot}: still waiting for running transactions after 300 s"))?
        .with_context(|| format!("creating the replication slot {slot}"))?;
    let reset = match bounded(
        "writing the history_lost reset",
        db::write_slot_reset(conn, epoch, &start),
    )
    .await
    {
        Ok(reset) => reset,
        Err(error) => {
            // `ws-gateway source notify` found the slot gone while this
            // leader was creating it (slot creation waits for its
            // transaction): it wrote the reset and fenced this leader. The
            // slot made here would only retain WAL.
            let switched_away = db::source_settings_on(conn).await.is_ok_and(|s| s.source != "wal");
            if switched_away {
                let _ = db::drop_slot(conn, slot).await;
            }
            return Err(error);
        }
    };
    telemetry.wal.set_slot_health(SlotHealth::Reserved);
    telemetry.wal.slot_resets.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(slot, start = %start, position = reset, "recreated the wal slot; every room was told to reset");
    Ok(Progress {
        epoch,
        commit_lsn: start.clone(),
        seq: 0,
        end_lsn: start,
        state: "ok".to_owned(),
    })
}

/// A leader streaming its slot.
struct Leading {
    conn: PgConnection,
    client: ReplicationClient,
    epoch: i64,
    /// The last change committed in the outbox.
    durable: At,
    /// A fresh slot: its transactions up to the switch marker had triggers,
    /// and are in the outbox already.
    switching: bool,
    transactions: Transactions,
    batch: Batch,
    /// Whether an outbox transaction is open on `conn`.
    open: bool,
    /// What `durable` and the slot's confirmable position become when the
    /// open outbox transaction commits.
    pending_durable: Option<At>,
    pending_confirm: Option<Lsn>,
    written_in_open: usize,
    /// When a call on `conn` last succeeded: it is proven alive when idle.
    last_db: Instant,
    /// The open replicated transaction switches the source to this.
    switch_to: Option<String>,
    /// Tables already warned about (replica identity), once per session.
    warned: std::collections::HashSet<String>,
    /// Tables without a write function of their own (published by hand):
    /// their batches go to `realtime.wal_write`.
    without_write_function: std::collections::HashSet<i64>,
    /// This instance's feed, given each batch committed in one NOTIFY.
    handoff: Option<tokio::sync::mpsc::Sender<HandOff>>,
    telemetry: Arc<Telemetry>,
}

impl Leading {
    async fn run(&mut self, safe_until: &mut Option<Lsn>, shutdown: &CancellationToken) -> anyhow::Result<SessionEnd> {
        loop {
            let event = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    self.rollback().await;
                    return Ok(SessionEnd::Shutdown);
                }
                event = self.client.recv() => event,
                () = tokio::time::sleep_until(self.last_db + HEARTBEAT_EVERY) => {
                    self.heartbeat().await?;
                    self.last_db = Instant::now();
                    continue;
                }
            };
            // Block for one event, then take what is already there: a batch
            // is what arrived while the last one was being written.
            let mut event = Some(event);
            let mut end = None;
            while let Some(next) = event.take() {
                let next = next
                    .context("replication stream failed")?
                    .ok_or_else(|| anyhow!("the replication stream ended"))?;
                if let Some(ended) = self.on_event(next, safe_until).await? {
                    end = Some(ended);
                    break;
                }
                let boundary = !self.transactions.in_transaction();
                if boundary && self.written_in_open + self.batch.len() >= MAX_BATCH_CHANGES {
                    break;
                }
                // Unconstrained: tokio's cooperative budget would make a
                // ready channel look empty after ~128 receives, cutting
                // every batch there (batches of ~40 transactions, the
                // leader's throughput capped at ~5k changes/s).
                event = tokio::task::unconstrained(self.client.recv()).now_or_never();
            }
            if !self.transactions.in_transaction() {
                self.flush(true, safe_until).await?;
            }
            if let Some(end) = end {
                return Ok(end);
            }
        }
    }

    /// Handles one event; Some when the session should end (a switch away).
    async fn on_event(
        &mut self,
        event: ReplicationEvent,
        safe_until: &mut Option<Lsn>,
    ) -> anyhow::Result<Option<SessionEnd>> {
        let Some(step) = self.transactions.on_event(event)? else {
            return Ok(None);
        };
        match step {
            Step::Item {
                at,
                committed_at_us,
                item,
            } => {
                if self.switching || at <= self.durable {
                    // Before the switch (the trigger captured it), or
                    // replayed: in the outbox already.
                    return Ok(None);
                }
                if let Some(concern) = self.batch.push(at, committed_at_us, &item) {
                    self.warn_once(concern);
                }
                if self.batch.len() >= CHUNK_CHANGES || self.batch.bytes >= CHUNK_BYTES {
                    // A large transaction: write what it has so far, in the
                    // outbox transaction that will commit all of it.
                    self.flush(false, safe_until).await?;
                }
            }
            Step::Switch { to } => self.switch_to = Some(to),
            Step::Commit {
                commit_lsn,
                end_lsn,
                last_seq,
            } => {
                // A skipped transaction moves the progress too: a replay
                // ends at what the outbox had, the switch at its marker.
                self.batch.commit(commit_lsn, end_lsn, last_seq);
                match self.switch_to.take().as_deref() {
                    Some("wal") if self.switching => {
                        // Everything before this commit had triggers.
                        self.switching = false;
                        self.batch.rows.state = Some("ok");
                        tracing::info!(at = %commit_lsn, "the switch to wal is in the stream: capturing from here");
                    }
                    Some("notify") => {
                        self.flush(true, safe_until).await?;
                        tracing::info!(at = %commit_lsn, "the database switched to notify: the wal leader stops");
                        return Ok(Some(SessionEnd::NotWal));
                    }
                    _ => {}
                }
                self.pending_confirm_candidate(end_lsn);
            }
            Step::KeepAlive { wal_end } => {
                if !self.open
                    && self.batch.rows.end_lsn.is_none()
                    && self.batch.is_empty()
                    && !self.transactions.in_transaction()
                {
                    // Nothing is in flight: confirming the server's position
                    // keeps the slot from retaining WAL of other tables.
                    self.client.update_applied_lsn(wal_end);
                }
            }
        }
        Ok(None)
    }

    fn pending_confirm_candidate(&mut self, lsn: Lsn) {
        self.pending_confirm = Some(self.pending_confirm.map_or(lsn, |p| p.max(lsn)));
    }

    fn warn_once(&mut self, concern: Concern) {
        let (table, message) = match &concern {
            Concern::BadEvent { error } => {
                tracing::warn!(
                    %error,
                    "a logical message with the prefix `realtime` is not an event of realtime.publish: not delivered"
                );
                return;
            }
            Concern::UnknownColumns { table, columns } => (
                table.clone(),
                format!(
                    "an UPDATE of {table} left large columns {columns:?} unchanged and the WAL does not carry them: they are delivered as null. Its REPLICA IDENTITY is not FULL; run realtime.track on it again"
                ),
            ),
            Concern::PartialOldRow { table } => (
                table.clone(),
                format!(
                    "{table} sends UPDATEs and DELETEs without the old row (REPLICA IDENTITY is not FULL): an UPDATE misses the old row's rooms, a DELETE carries only the key. Run realtime.track on it again"
                ),
            ),
        };
        if self.warned.insert(table) {
            tracing::warn!("{message}");
        }
    }

    /// Writes the batch into the open outbox transaction (opening one), and
    /// with `commit` commits it and confirms the slot.
    ///
    /// A whole batch with no transaction open (every batch but a large
    /// transaction's chunks) is one statement in its own implicit
    /// transaction: one round trip instead of BEGIN, write, COMMIT. Why:
    /// at light load a change waits for the leader's outbox commit, and the
    /// two extra round trips were part of that wait. The same guarantees:
    /// the statement commits or not as a whole, and the call returns only
    /// after the commit (sqlx reads up to ReadyForQuery, which follows
    /// it), so the slot is still confirmed only past what is committed.
    async fn flush(&mut self, commit: bool, safe_until: &mut Option<Lsn>) -> anyhow::Result<()> {
        let mut one_statement = false;
        if self.batch.rows.has_work() {
            if !self.open && commit {
                one_statement = true;
            } else if !self.open {
                timed("beginning an outbox transaction", db::begin(&mut self.conn)).await?;
                self.open = true;
            }
            let last_lsn = self.batch.rows.upto.as_ref().map(|(lsn, _)| lsn.clone());
            let safe = match (*safe_until, last_lsn.as_deref().map(Lsn::parse)) {
                (Some(until), Some(Ok(last))) => last <= until,
                _ => false,
            };
            let mut written = match self.write(safe, one_statement).await {
                Ok(written) => written,
                Err(error) => {
                    self.open = false;
                    if let Some(sqlx) = error.downcast_ref::<sqlx::Error>() {
                        if db::is_stale_leader(sqlx) {
                            bail!("another instance took over the wal leadership");
                        }
                        if !safe && db::is_render_error(sqlx) {
                            // Replay it row by row: what cannot be read as its
                            // table's row goes out as text (with a warning).
                            *safe_until = last_lsn.as_deref().and_then(|l| Lsn::parse(l).ok());
                        }
                    }
                    return Err(error);
                }
            };
            if let Some((lsn, seq)) = &self.batch.rows.upto {
                self.pending_durable = Some(At {
                    commit_lsn: parse_lsn(lsn)?,
                    seq: *seq,
                });
            }
            if one_statement
                && let (Some(feed), Some(first), Some(payload)) =
                    (&self.handoff, written.first_position, written.notified.take())
            {
                // Committed: this instance's feed may have it now rather
                // than at its NOTIFY. A full queue drops it; the NOTIFY
                // still comes.
                let _ = feed.try_send(HandOff {
                    first: Position(first),
                    payload,
                });
            }
            self.written_in_open += self.batch.len();
            let wal = &self.telemetry.wal;
            wal.changes_written
                .fetch_add(written.written.max(0) as u64, Ordering::Relaxed);
            if written.skipped > 0 {
                tracing::debug!(
                    skipped = written.skipped,
                    "changes the outbox had already (a replay) were skipped"
                );
            }
            self.batch.clear();
        }
        if one_statement || (commit && self.open) {
            if !one_statement {
                timed("committing an outbox transaction", db::commit(&mut self.conn)).await?;
            }
            self.last_db = Instant::now();
            self.open = false;
            self.written_in_open = 0;
            self.telemetry.wal.batches_written.fetch_add(1, Ordering::Relaxed);
            if let Some(durable) = self.pending_durable.take() {
                self.durable = self.durable.max(durable);
            }
            if let Some(confirm) = self.pending_confirm.take() {
                // Committed in the outbox: now, and only now, the slot may
                // let it go.
                self.client.update_applied_lsn(confirm);
            }
            if safe_until.is_some_and(|until| self.durable.commit_lsn > until) {
                *safe_until = None;
            }
        }
        Ok(())
    }

    /// One `wal_write` of the batch. The common batch, one table's row
    /// changes in a statement of its own, goes to that table's write
    /// function (migrations/0010); where there is none (a table published
    /// by hand), nothing was written, and `realtime.wal_write` takes it.
    async fn write(&mut self, safe: bool, one_statement: bool) -> anyhow::Result<db::Written> {
        const WHAT: &str = "writing a batch to the outbox";
        let rows = &self.batch.rows;
        let table = rows
            .one_table()
            .filter(|oid| one_statement && !safe && !self.without_write_function.contains(oid));
        if let Some(oid) = table {
            let writer = db::WalWriter::Table(oid);
            match timed(WHAT, db::wal_write(&mut self.conn, self.epoch, rows, safe, writer)).await {
                Err(error)
                    if error
                        .downcast_ref::<sqlx::Error>()
                        .is_some_and(db::is_undefined_function) =>
                {
                    tracing::debug!(
                        table = oid,
                        "no realtime.wal_write_<oid>: writing with realtime.wal_write"
                    );
                    self.without_write_function.insert(oid);
                }
                result => return result,
            }
        }
        let writer = db::WalWriter::Any;
        timed(WHAT, db::wal_write(&mut self.conn, self.epoch, rows, safe, writer)).await
    }

    async fn heartbeat(&mut self) -> anyhow::Result<()> {
        match tokio::time::timeout(HEARTBEAT_TIMEOUT, db::ping(&mut self.conn)).await {
            Ok(result) => result.context("the wal leader's connection failed"),
            Err(_) => bail!("the wal leader's connection is silent for {HEARTBEAT_TIMEOUT:?}"),
        }
    }

    async fn rollback(&mut self) {
        if self.open {
            let _ = tokio::time::timeout(Duration::from_secs(2), db::rollback(&mut self.conn)).await;
            self.open = false;
        }
    }
}

/// A batch call under [`WRITE_TIMEOUT`].
async fn timed<T>(what: &str, call: impl Future<Output = Result<T, sqlx::Error>>) -> anyhow::Result<T> {
    match tokio::time::timeout(WRITE_TIMEOUT, call).await {
        Ok(result) => result.map_err(|e| anyhow::Error::new(e).context(what.to_owned())),
        Err(_) => Err(anyhow!("{what}: no answer from the database in {WRITE_TIMEOUT:?}")),
    }
}
