//! `ws-gateway source notify|wal`: switching the database between the two
//! capture sources (SPEC section 8), and the server checks both the switch
//! and a starting wal gateway make.
//!
//! notify -> wal: the publication, then the slot (a slot older than its
//! publication cannot decode), then one transaction that drops the triggers
//! and marks the switch in the WAL (`realtime.switch_to_wal`): the leader
//! skips what the triggers captured up to the marker.
//!
//! wal -> notify: every tracked table locked, a drain marker committed, the
//! leader's progress awaited past it, then the triggers back in the same
//! transaction (`realtime.switch_to_notify`); the slot and the publication
//! are dropped after. A leader is needed for the drain: this process runs
//! one too, which waits as a follower when a gateway leads. A slot that is
//! gone cannot be drained: the switch then writes the `history_lost` reset
//! itself, and needs no leader.
//!
//! Every lock either switch waits for is taken explicitly, and none is
//! waited for long while another is held (see [`Budget`]): applications
//! take the same locks in their own order, and the switch gives way rather
//! than make a cycle that PostgreSQL would break by aborting one of them.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::WalCapture;
use crate::db::{self, ServerReadiness};
use crate::telemetry::Telemetry;

/// How long a slot created by the switch may wait for the transactions
/// running now (slot creation needs a moment when none is open).
const SLOT_CREATION_TIMEOUT: Duration = Duration::from_secs(60);

/// What a switch did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchOutcome {
    pub from: String,
    pub to: String,
    /// Whether anything changed (false: the database was there already).
    pub changed: bool,
    pub slot: Option<String>,
    /// Tracked tables switched.
    pub tables: i32,
    /// The slot was gone (dropped or invalidated), so what it held is lost:
    /// the position of the `history_lost` reset of every room the switch
    /// wrote.
    pub history_lost: Option<i64>,
}

/// Whether the server and the role can run the wal source; the error names
/// what to change.
pub async fn wal_readiness(pool: &PgPool) -> anyhow::Result<ServerReadiness> {
    let ready = db::server_readiness(pool)
        .await
        .context("reading the server's replication settings")?;
    if ready.wal_level != "logical" {
        bail!(
            "the database server runs with wal_level={}, and GATEWAY_SOURCE=wal needs wal_level=logical: \
             set it in postgresql.conf (managed services: rds.logical_replication=1, cloudsql.logical_decoding=on) \
             and restart the server",
            ready.wal_level
        );
    }
    if !ready.can_replicate {
        bail!(
            "the role {role:?} may not use logical replication, which GATEWAY_SOURCE=wal needs: \
             ALTER ROLE {role} REPLICATION (Amazon RDS/Aurora: GRANT rds_replication TO {role})",
            role = ready.role
        );
    }
    if ready.max_wal_senders < 1 {
        bail!(
            "the database server runs with max_wal_senders=0: GATEWAY_SOURCE=wal needs at least 1 (2 for a fast takeover)"
        );
    }
    if ready.server_encoding != "UTF8" {
        bail!(
            "the database's encoding is {}: GATEWAY_SOURCE=wal reads rows as UTF-8 text and needs a UTF8 database",
            ready.server_encoding
        );
    }
    Ok(ready)
}

/// A slot name of the database: slots are cluster-wide, so each database
/// gets its own (`ws_gateway_<database>`, lowercase, at most 63 bytes).
pub fn default_slot_name(database: &str) -> String {
    let mut name: String = format!("ws_gateway_{database}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    name.truncate(63);
    name
}

fn check_slot_name(name: &str) -> anyhow::Result<()> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        bail!("slot name {name:?} is not allowed: expected 1 to 63 of a-z, 0-9 or _");
    }
    Ok(())
}

/// notify -> wal. `slot` names the replication slot (default: one per
/// database); `wait` bounds how long the switch waits for the tracked
/// tables and `realtime.settings` (writers and publishers in flight).
pub async fn switch_to_wal(pool: &PgPool, slot: Option<&str>, wait: Duration) -> anyhow::Result<SwitchOutcome> {
    let ready = wal_readiness(pool).await?;
    let mut conn = pool.acquire().await.context("connecting to the database")?;
    let settings = db::source_settings_on(&mut conn)
        .await
        .context("reading realtime.settings (run `ws-gateway migrate` first)")?;
    if settings.source == "wal" {
        return Ok(SwitchOutcome {
            from: "wal".into(),
            to: "wal".into(),
            changed: false,
            slot: settings.slot,
            tables: 0,
            history_lost: None,
        });
    }
    let slot = slot.map_or_else(|| default_slot_name(&ready.database), str::to_owned);
    check_slot_name(&slot)?;
    let existing = db::slot_state(&mut conn, &slot).await?;
    if let Some(pid) = existing.as_ref().and_then(|s| s.active_pid) {
        bail!("the replication slot {slot} exists and is in use (walsender pid {pid}): choose another with --slot");
    }
    if existing.is_none() && ready.slots_in_use >= i64::from(ready.max_replication_slots) {
        bail!(
            "the server has no free replication slot (max_replication_slots={}, all in use): \
             raise it (server restart) or drop a stale slot",
            ready.max_replication_slots
        );
    }
    db::ensure_publication(&mut conn, &settings.publication)
        .await
        .with_context(|| format!("creating the publication {}", settings.publication))?;
    // A slot left from an earlier wal period holds nothing we need (the
    // triggers captured everything since): start over.
    db::drop_slot(&mut conn, &slot).await?;
    let start = tokio::time::timeout(SLOT_CREATION_TIMEOUT, db::create_slot(&mut conn, &slot))
        .await
        .map_err(|_| {
            anyhow!(
                "creating the replication slot {slot} waits for the transactions running now, and one has run for \
                 {SLOT_CREATION_TIMEOUT:?}: end it (see pg_stat_activity) and run the switch again"
            )
        })?
        .with_context(|| format!("creating the replication slot {slot}"))?;
    let budget = Budget::new(&mut conn, wait).await?;
    drop(conn);
    let mut prefer = None;
    let switched = loop {
        let attempt = async {
            let mut tx = pool.begin().await.map_err(Busy::Failed)?;
            // DROP TRIGGER and ALTER TABLE ... REPLICA IDENTITY take ACCESS
            // EXCLUSIVE: taken up front, with the rest, by take_locks.
            let tables = db::tracked_table_names(&mut tx).await.map_err(Busy::Failed)?;
            let mut locks = table_locks(&tables, "access exclusive");
            locks.extend([Lock::Settings, Lock::Progress]);
            take_locks(&mut tx, &budget, order(locks, prefer.as_ref())).await?;
            let n = db::switch_to_wal(&mut tx, &slot, &start).await.map_err(Busy::from)?;
            tx.commit().await.map_err(Busy::from)?;
            Ok::<_, Busy>(n)
        }
        .await;
        match attempt {
            Ok(n) => break Ok(n),
            Err(busy) => match budget.retry(busy, &mut prefer).await {
                Ok(()) => continue,
                Err(error) => break Err(error),
            },
        }
    };
    match switched {
        Ok(tables) => Ok(SwitchOutcome {
            from: "notify".into(),
            to: "wal".into(),
            changed: true,
            slot: Some(slot),
            tables,
            history_lost: None,
        }),
        Err(error) => {
            if let Ok(mut conn) = pool.acquire().await {
                let _ = db::drop_slot(&mut conn, &slot).await;
            }
            Err(error.context("switching to wal"))
        }
    }
}

/// wal -> notify. Writers may keep writing: they wait for the switch's
/// locks. A leader must drain the slot: a running gateway's, or the one
/// this call runs (`database_url`) when none does. A slot that is gone
/// (dropped by hand, or invalidated) cannot be drained: what it held is
/// lost, and the switch writes the `history_lost` reset of every room that
/// a leader would have written, without a leader. `wait` bounds the lock
/// waits and the drain.
pub async fn switch_to_notify(pool: &PgPool, database_url: &str, wait: Duration) -> anyhow::Result<SwitchOutcome> {
    let mut conn = pool.acquire().await.context("connecting to the database")?;
    let settings = db::source_settings_on(&mut conn)
        .await
        .context("reading realtime.settings (run `ws-gateway migrate` first)")?;
    if settings.source == "notify" {
        drop(conn);
        // A slot left behind by an interrupted switch would retain WAL.
        if let Some(slot) = &settings.slot {
            drop_slot_and_publication(pool, slot, &settings.publication).await?;
        }
        return Ok(SwitchOutcome {
            from: "notify".into(),
            to: "notify".into(),
            changed: false,
            slot: None,
            tables: 0,
            history_lost: None,
        });
    }
    let slot = settings
        .slot
        .clone()
        .context("realtime.settings.wal_slot is not set: run `ws-gateway source wal` first")?;
    let budget = Budget::new(&mut conn, wait).await?;
    // Only a slot that can be drained needs a leader: one started for a
    // missing slot would try to recreate it, and slot creation waits for
    // the switch's own transaction.
    let mut capture = None;
    if !slot_lost(&mut conn, &slot).await? {
        capture = Some(start_capture(database_url));
    }
    drop(conn);
    let mut prefer = None;
    let switched = loop {
        let attempt = attempt_to_notify(pool, &slot, &budget, prefer.as_ref()).await;
        match attempt {
            Ok(ToNotify::Done { tables, history_lost }) => break Ok((tables, history_lost)),
            Ok(ToNotify::NeedsLeader) => {
                // The slot came back (a gateway's leader recreated it).
                if capture.is_none() {
                    capture = Some(start_capture(database_url));
                }
            }
            Err(busy) => {
                if let Err(error) = budget.retry(busy, &mut prefer).await {
                    break Err(error);
                }
            }
        }
    };
    if let Some((stop, task)) = capture {
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    }
    let (tables, history_lost) = switched.map_err(|e| e.context("switching to notify"))?;
    drop_slot_and_publication(pool, &slot, &settings.publication).await?;
    Ok(SwitchOutcome {
        from: "wal".into(),
        to: "notify".into(),
        changed: true,
        slot: Some(slot),
        tables,
        history_lost,
    })
}

/// A leader run by the switch itself, for when no gateway leads.
fn start_capture(database_url: &str) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn(WalCapture::new(database_url.to_owned(), Arc::new(Telemetry::default())).run(stop.clone()));
    (stop, task)
}

/// Whether the slot cannot be drained: missing, invalidated, or being
/// recreated after that (`resetting`: the reset is still owed).
async fn slot_lost(conn: &mut sqlx::PgConnection, slot: &str) -> anyhow::Result<bool> {
    let state = db::slot_state(conn, slot)
        .await
        .context("reading the replication slot")?;
    let progress = db::progress_state(conn)
        .await
        .context("reading realtime.wal_progress")?;
    Ok(match state {
        None => true,
        Some(s) => s.wal_status.as_deref() == Some("lost") || progress == "resetting",
    })
}

enum ToNotify {
    Done { tables: i32, history_lost: Option<i64> },
    NeedsLeader,
}

/// One try at the wal -> notify transaction.
///
/// 1. Every tracked table in SHARE ROW EXCLUSIVE (writers wait; readers,
///    and the leader's rendering, which reads the tables' row types, do
///    not) and the settings row (publishers wait).
/// 2. A slot that is still there: a drain marker committed beside, the
///    leader's progress awaited past it, so that everything committed
///    before the locks is in the outbox with its position. A slot that is
///    gone: every leader fenced (a new epoch), and a reset of every room
///    (`history_lost`) at the next position, as the leader writes when it
///    finds its slot lost.
/// 3. ACCESS EXCLUSIVE on the tables (ALTER TABLE ... REPLICA IDENTITY
///    needs it) and the progress row; then `realtime.switch_to_notify`
///    puts the triggers back.
async fn attempt_to_notify(
    pool: &PgPool,
    slot: &str,
    budget: &Budget,
    prefer: Option<&Lock>,
) -> Result<ToNotify, Busy> {
    let mut tx = pool.begin().await.map_err(Busy::Failed)?;
    let tables = db::tracked_table_names(&mut tx).await.map_err(Busy::Failed)?;
    let mut locks = table_locks(&tables, "share row exclusive");
    locks.push(Lock::Settings);
    take_locks(&mut tx, budget, order(locks, prefer)).await?;
    let lost = slot_lost(&mut tx, slot).await.map_err(Busy::Other)?;
    let mut finish = table_locks(&tables, "access exclusive");
    finish.push(Lock::Progress);
    let (drain, history_lost) = if lost {
        take_locks_now(&mut tx, budget, finish).await?;
        // Under the progress row no leader can finish a reset: look again.
        if !slot_lost(&mut tx, slot).await.map_err(Busy::Other)? {
            return Ok(ToNotify::NeedsLeader);
        }
        let epoch = db::fence_leaders(&mut tx).await.map_err(Busy::from)?;
        let position = db::write_slot_reset(&mut tx, epoch, "0/0").await.map_err(Busy::from)?;
        ("0/0".to_owned(), Some(position))
    } else {
        let drain = {
            let mut marker = pool.acquire().await.map_err(Busy::Failed)?;
            db::commit_drain_marker(&mut marker).await.map_err(Busy::Failed)?
        };
        loop {
            if db::drained_past(&mut tx, &drain).await.map_err(Busy::Failed)? {
                break;
            }
            if budget.remaining().is_zero() {
                return Err(Busy::Other(anyhow!(
                    "no wal leader wrote the outbox up to {drain} within {:?}: is the database reachable for \
                     replication? (see /healthz feed.slot_lag_bytes)",
                    budget.wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        take_locks_now(&mut tx, budget, finish).await?;
        (drain, None)
    };
    let tables = db::switch_to_notify(&mut tx, &drain, 0.0).await.map_err(Busy::from)?;
    tx.commit().await.map_err(Busy::from)?;
    Ok(ToNotify::Done { tables, history_lost })
}

/// A lock the switch transactions take, explicitly and before they change
/// anything, so that every wait is one of these and bounded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Lock {
    /// A tracked table, in a `LOCK TABLE` mode.
    Table { table: String, mode: &'static str },
    /// `realtime.publish`'s advisory lock (taken shared by every publisher,
    /// in a fair queue), then the settings row, which it reads under KEY
    /// SHARE: one step, since publishers take them in that order.
    Settings,
    /// The leader's progress row, which its batch writes hold.
    Progress,
}

impl Lock {
    fn sql(&self) -> String {
        match self {
            Lock::Table { table, mode } => format!("lock table {table} in {mode} mode"),
            Lock::Settings => format!(
                "select pg_advisory_xact_lock({}); select 1 from realtime.settings for update",
                db::SWITCH_LOCK
            ),
            Lock::Progress => "select 1 from realtime.wal_progress for update".to_owned(),
        }
    }

    fn describe(&self) -> String {
        match self {
            Lock::Table { table, .. } => format!("the tracked table {table} (its writers and readers)"),
            Lock::Settings => "realtime.settings (transactions in realtime.publish)".to_owned(),
            Lock::Progress => "realtime.wal_progress (the wal leader's batch write)".to_owned(),
        }
    }

    fn same_target(&self, other: &Lock) -> bool {
        match (self, other) {
            (Lock::Table { table: a, .. }, Lock::Table { table: b, .. }) => a == b,
            _ => self == other,
        }
    }
}

fn table_locks(tables: &[String], mode: &'static str) -> Vec<Lock> {
    tables
        .iter()
        .map(|table| Lock::Table {
            table: table.clone(),
            mode,
        })
        .collect()
}

/// `locks` with the one that gave way last time first: the first lock is
/// waited for holding nothing, so it can wait long without a cycle.
fn order(mut locks: Vec<Lock>, prefer: Option<&Lock>) -> Vec<Lock> {
    if let Some(prefer) = prefer
        && let Some(at) = locks.iter().position(|l| l.same_target(prefer))
    {
        let lock = locks.remove(at);
        locks.insert(0, lock);
    }
    locks
}

/// Why a switch attempt did not finish.
enum Busy {
    /// A lock wait gave way (lock_timeout), or PostgreSQL chose the switch in
    /// a deadlock: roll back, let the others through, try again.
    Lock(Option<Lock>),
    /// The database failed otherwise.
    Failed(sqlx::Error),
    Other(anyhow::Error),
}

impl From<sqlx::Error> for Busy {
    fn from(error: sqlx::Error) -> Busy {
        if db::is_lock_conflict(&error) {
            Busy::Lock(None)
        } else {
            Busy::Failed(error)
        }
    }
}

/// How long a switch may wait, and how long any one lock wait may last
/// while the switch holds other locks.
///
/// Why: a transaction that publishes and writes a tracked table holds the
/// settings row (KEY SHARE) or the table, in the application's order, and
/// then waits for the other; so does one that writes two tracked tables.
/// No fixed order of the switch's locks avoids a cycle with both orders.
/// So the switch never waits long while it holds a lock: a wait beyond half
/// of `deadlock_timeout` (1 s at most) gives way, the switch rolls back
/// (the application's transaction goes on), and tries again with the lock
/// it gave way on first, waited for holding nothing. PostgreSQL's deadlock
/// check never sees a cycle, so it never aborts an application's
/// transaction for the switch.
struct Budget {
    wait: Duration,
    deadline: Instant,
    short: Duration,
}

impl Budget {
    async fn new(conn: &mut sqlx::PgConnection, wait: Duration) -> anyhow::Result<Budget> {
        let deadlock = db::deadlock_timeout(conn)
            .await
            .context("reading the server's deadlock_timeout")?;
        Ok(Budget {
            wait,
            deadline: Instant::now() + wait,
            short: (deadlock / 2).clamp(Duration::from_millis(1), Duration::from_secs(1)),
        })
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// After a failed attempt: Ok to try again (the lock that gave way
    /// preferred), or the error that ends the switch.
    async fn retry(&self, busy: Busy, prefer: &mut Option<Lock>) -> anyhow::Result<()> {
        match busy {
            Busy::Lock(lock) => {
                if self.remaining().is_zero() {
                    let what = lock
                        .as_ref()
                        .map_or_else(|| "the tracked tables or realtime.settings".to_owned(), Lock::describe);
                    bail!(
                        "other transactions kept {what} locked for {:?} (the switch gives way to them rather than \
                         deadlock with them): pause the writers of the tracked tables and run it again",
                        self.wait
                    );
                }
                if lock.is_some() {
                    *prefer = lock;
                }
                // Let the transactions it gave way to through.
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(())
            }
            Busy::Failed(error) => Err(anyhow::Error::new(error)),
            Busy::Other(error) => Err(error),
        }
    }
}

/// Takes `locks` in order: the first waits as long as the switch may (the
/// transaction holds nothing yet), each later one at most `budget.short`.
async fn take_locks(conn: &mut sqlx::PgConnection, budget: &Budget, locks: Vec<Lock>) -> Result<(), Busy> {
    let mut first = true;
    for lock in locks {
        let wait = if first {
            budget.remaining()
        } else {
            budget.short.min(budget.remaining())
        };
        first = false;
        take_lock(conn, wait, lock).await?;
    }
    // What the switch's functions lock after this is held already (or is
    // bounded the same way).
    db::set_local_lock_timeout(conn, budget.short.min(budget.remaining()))
        .await
        .map_err(Busy::from)
}

/// [`take_locks`] in a transaction that holds locks already: every wait
/// short.
async fn take_locks_now(conn: &mut sqlx::PgConnection, budget: &Budget, locks: Vec<Lock>) -> Result<(), Busy> {
    for lock in locks {
        take_lock(conn, budget.short.min(budget.remaining()), lock).await?;
    }
    Ok(())
}

async fn take_lock(conn: &mut sqlx::PgConnection, wait: Duration, lock: Lock) -> Result<(), Busy> {
    if wait.is_zero() {
        return Err(Busy::Lock(Some(lock)));
    }
    db::set_local_lock_timeout(conn, wait).await.map_err(Busy::from)?;
    match sqlx::raw_sql(&lock.sql()).execute(&mut *conn).await {
        Ok(_) => Ok(()),
        Err(error) if db::is_lock_conflict(&error) => Err(Busy::Lock(Some(lock))),
        Err(error) => Err(Busy::Failed(error)),
    }
}

/// Drops the slot (ending the walsender of a leader that has not stopped
/// yet) and then the publication.
async fn drop_slot_and_publication(pool: &PgPool, slot: &str, publication: &str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while db::slot_state(&mut conn, slot).await?.is_some() {
        if Instant::now() > deadline {
            bail!(
                "the replication slot {slot} is still in use after 10 s: drop it with pg_drop_replication_slot('{slot}')"
            );
        }
        db::end_slot_holder(&mut conn, slot).await?;
        db::drop_slot(&mut conn, slot).await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    db::drop_publication(&mut conn, publication).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_are_per_database_and_valid() {
        assert_eq!(
            default_slot_name("ConstructTrack-prod"),
            "ws_gateway_constructtrack_prod"
        );
        let long = default_slot_name(&"x".repeat(100));
        assert_eq!(long.len(), 63);
        assert!(check_slot_name(&long).is_ok());
        assert!(check_slot_name("Bad-Name").is_err());
        assert!(check_slot_name("").is_err());
    }
}
