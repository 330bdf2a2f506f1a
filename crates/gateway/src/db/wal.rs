//! The queries of the wal source (migrations/0005_wal_source.sql): the
//! leader's lock, progress and batch writes, the replication slot (its
//! state, lag, and creation), and the switches between sources that
//! `ws-gateway source` makes.

use sqlx::{Executor, PgConnection, PgPool, Row};

/// The session-level advisory lock whose holder is the wal leader.
pub const LEADER_LOCK: i64 = 7_310_582_919_341_551_618;

/// The transaction-level advisory lock `realtime.publish` takes shared and
/// a switch exclusively (migrations/0008_publish_switch_lock.sql).
pub const SWITCH_LOCK: i64 = 7_310_582_919_341_551_619;

/// SQLSTATE of `realtime.wal_write` when the epoch moved on: another
/// instance leads.
pub const STALE_LEADER: &str = "RT001";
/// SQLSTATE of a lock wait that ran into `lock_timeout`.
const LOCK_NOT_AVAILABLE: &str = "55P03";

/// What `realtime.settings` says about the source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSettings {
    /// `notify` or `wal`.
    pub source: String,
    pub slot: Option<String>,
    pub publication: String,
}

/// The source the database is set to, or None when the `realtime` schema
/// is not installed.
pub async fn source_settings(pool: &PgPool) -> Result<Option<SourceSettings>, sqlx::Error> {
    let installed: bool = sqlx::query_scalar("select to_regclass('realtime.settings') is not null")
        .fetch_one(pool)
        .await?;
    if !installed {
        return Ok(None);
    }
    let mut conn = pool.acquire().await?;
    source_settings_on(&mut conn).await.map(Some)
}

pub async fn source_settings_on(conn: &mut PgConnection) -> Result<SourceSettings, sqlx::Error> {
    let row = sqlx::query("select source, wal_slot, wal_publication from realtime.settings")
        .fetch_one(&mut *conn)
        .await?;
    Ok(SourceSettings {
        source: row.get(0),
        slot: row.get(1),
        publication: row.get(2),
    })
}

/// What the server and the role allow for logical replication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerReadiness {
    pub wal_level: String,
    /// The role may open replication connections and create slots
    /// (REPLICATION, superuser, or RDS's `rds_replication`).
    pub can_replicate: bool,
    pub role: String,
    pub max_wal_senders: i32,
    pub max_replication_slots: i32,
    pub slots_in_use: i64,
    pub server_encoding: String,
    pub database: String,
}

pub async fn server_readiness(pool: &PgPool) -> Result<ServerReadiness, sqlx::Error> {
    let row = sqlx::query(
        "select current_setting('wal_level'),
                r.rolreplication or r.rolsuper
                    or coalesce(pg_has_role(current_user, to_regrole('rds_replication'), 'member'), false),
                current_user::text,
                current_setting('max_wal_senders')::int,
                current_setting('max_replication_slots')::int,
                (select count(*) from pg_replication_slots),
                current_setting('server_encoding'),
                current_database()::text
           from pg_roles r where r.rolname = current_user",
    )
    .fetch_one(pool)
    .await?;
    Ok(ServerReadiness {
        wal_level: row.get(0),
        can_replicate: row.get(1),
        role: row.get(2),
        max_wal_senders: row.get(3),
        max_replication_slots: row.get(4),
        slots_in_use: row.get(5),
        server_encoding: row.get(6),
        database: row.get(7),
    })
}

/// The leader's durable progress (`realtime.wal_progress`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub epoch: i64,
    /// The last change written: its transaction's commit LSN, and its index.
    pub commit_lsn: String,
    pub seq: i32,
    /// How far the slot may be confirmed.
    pub end_lsn: String,
    pub state: String,
}

/// Sets up the leader's own connection: synchronous commits (a NOTIFY is
/// delivered at commit, so an outbox row a client saw must be durable), and
/// lock waits that end, so that a follower notices shutdown.
pub async fn prepare_leader_session(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    for setting in [
        "set synchronous_commit = on",
        "set lock_timeout = '2s'",
        "set statement_timeout = 0",
    ] {
        (&mut *conn).execute(setting).await?;
    }
    Ok(())
}

/// Waits up to `lock_timeout` for the leader lock: true once held (until the
/// connection ends), false when another instance still holds it.
pub async fn wait_for_leadership(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    match sqlx::query("select pg_advisory_lock($1)")
        .bind(LEADER_LOCK)
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(LOCK_NOT_AVAILABLE) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Becomes the leader of a new epoch: every write of an older leader fails
/// from now on. Returns the progress to continue from.
pub async fn take_leadership(conn: &mut PgConnection) -> Result<Progress, sqlx::Error> {
    let row = sqlx::query(
        "update realtime.wal_progress set epoch = epoch + 1
         returning epoch, commit_lsn::text, seq, end_lsn::text, state",
    )
    .fetch_one(&mut *conn)
    .await?;
    Ok(Progress {
        epoch: row.get(0),
        commit_lsn: row.get(1),
        seq: row.get(2),
        end_lsn: row.get(3),
        state: row.get(4),
    })
}

/// A replication slot, as `pg_replication_slots` shows it to anyone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotState {
    /// `reserved`, `extended`, `unreserved` (invalidation is near) or `lost`.
    pub wal_status: Option<String>,
    /// The walsender streaming it, if any.
    pub active_pid: Option<i32>,
    /// WAL written since what the slot confirmed: what a leader has yet to
    /// read (or confirm).
    pub lag_bytes: Option<i64>,
    /// WAL the server keeps for the slot (from its restart LSN; a
    /// long-running transaction holds it back even at lag 0).
    pub retained_bytes: Option<i64>,
    /// How much more WAL may be written before the slot is lost, when
    /// `max_slot_wal_keep_size` bounds it.
    pub safe_wal_bytes: Option<i64>,
}

pub async fn slot_state(conn: &mut PgConnection, slot: &str) -> Result<Option<SlotState>, sqlx::Error> {
    let row = sqlx::query(
        "select wal_status, active_pid,
                pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint,
                pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint,
                safe_wal_size
           from pg_replication_slots where slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row.map(|row| SlotState {
        wal_status: row.get(0),
        active_pid: row.get(1),
        lag_bytes: row.get(2),
        retained_bytes: row.get(3),
        safe_wal_bytes: row.get(4),
    }))
}

/// Ends the walsender holding `slot` (a leader that lost its lock, or one
/// on a host that vanished, which lingers up to `wal_sender_timeout`).
pub async fn end_slot_holder(conn: &mut PgConnection, slot: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "select pg_terminate_backend(active_pid) from pg_replication_slots
          where slot_name = $1 and active_pid is not null",
    )
    .bind(slot)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Creates the logical replication slot; returns its consistent point (the
/// first LSN it decodes from). Waits for transactions running now to end.
pub async fn create_slot(conn: &mut PgConnection, slot: &str) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select lsn::text from pg_create_logical_replication_slot($1, 'pgoutput')")
        .bind(slot)
        .fetch_one(&mut *conn)
        .await
}

/// Drops the slot if it exists and nobody streams it.
pub async fn drop_slot(conn: &mut PgConnection, slot: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "select pg_drop_replication_slot(slot_name) from pg_replication_slots
          where slot_name = $1 and active_pid is null",
    )
    .bind(slot)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// One batch for `realtime.wal_write`: an element per change, in commit
/// order, and the progress it completes.
#[derive(Debug, Default, Clone)]
pub struct WalBatch {
    pub commit_lsns: Vec<String>,
    pub seqs: Vec<i32>,
    /// RFC 3339 with microseconds.
    pub committed_ats: Vec<String>,
    pub tables: Vec<i64>,
    pub schemas: Vec<String>,
    pub names: Vec<String>,
    pub ops: Vec<&'static str>,
    /// The rows' values as JSON objects of text.
    pub news: Vec<Option<String>>,
    pub olds: Vec<Option<String>>,
    /// The progress once written: the last change or marker it covers.
    pub upto: Option<(String, i32)>,
    /// How far the slot may be confirmed once written; None while a
    /// transaction is still being written.
    pub end_lsn: Option<String>,
    /// A new progress state (`ok` after a switch or a reset).
    pub state: Option<&'static str>,
}

impl WalBatch {
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The table whose write function (`realtime.wal_write_<oid>`,
    /// migrations/0010) can write the batch: Some when every entry is a row
    /// change of that one table.
    pub fn one_table(&self) -> Option<i64> {
        let first = *self.tables.first()?;
        let rows_of_first = self.tables.iter().all(|&t| t == first)
            && self.ops.iter().all(|op| matches!(*op, "INSERT" | "UPDATE" | "DELETE"));
        rows_of_first.then_some(first)
    }

    /// Whether writing it would change anything.
    pub fn has_work(&self) -> bool {
        !self.is_empty() || self.upto.is_some() || self.end_lsn.is_some() || self.state.is_some()
    }

    pub fn clear(&mut self) {
        *self = WalBatch::default();
    }
}

/// What one `realtime.wal_write` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Written {
    pub written: i32,
    /// Replayed changes the outbox had already, and changes of tables
    /// without a render function.
    pub skipped: i32,
    pub first_position: Option<i64>,
    /// The batch's NOTIFY text, when a table's write function sent it as
    /// one notification.
    pub notified: Option<String>,
}

/// Which function writes a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalWriter {
    /// `realtime.wal_write`: any batch.
    Any,
    /// `realtime.wal_write_<oid>`: the row changes of that one table (it
    /// hands any other batch to `wal_write`).
    Table(i64),
}

/// Writes `batch` in the connection's transaction (see
/// `realtime.wal_write`). `safe` renders row by row, so that a row that
/// cannot be read as its table's row type is written as text instead of
/// failing the batch.
pub async fn wal_write(
    conn: &mut PgConnection,
    epoch: i64,
    batch: &WalBatch,
    safe: bool,
    writer: WalWriter,
) -> Result<Written, sqlx::Error> {
    let (upto_lsn, upto_seq) = match &batch.upto {
        Some((lsn, seq)) => (Some(lsn.as_str()), *seq),
        None => (None, 0),
    };
    let (function, notified) = match writer {
        WalWriter::Any => ("wal_write".to_owned(), "null::text"),
        WalWriter::Table(oid) => (format!("wal_write_{oid}"), "notified"),
    };
    let sql = format!(
        "select written, skipped, first_position, {notified} from realtime.{function}(
            $1, $2::text[]::pg_lsn[], $3, $4::text[]::timestamptz[], $5, $6, $7, $8,
            $9::text[]::json[], $10::text[]::json[], $11,
            coalesce($12::text::pg_lsn, '0/0'), $13, $14::text::pg_lsn, $15)"
    );
    let row = sqlx::query(&sql)
        .bind(epoch)
        .bind(&batch.commit_lsns)
        .bind(&batch.seqs)
        .bind(&batch.committed_ats)
        .bind(&batch.tables)
        .bind(&batch.schemas)
        .bind(&batch.names)
        .bind(&batch.ops)
        .bind(&batch.news)
        .bind(&batch.olds)
        .bind(safe)
        .bind(upto_lsn)
        .bind(upto_seq)
        .bind(batch.end_lsn.as_deref())
        .bind(batch.state)
        .fetch_one(&mut *conn)
        .await?;
    Ok(Written {
        written: row.get(0),
        skipped: row.get(1),
        first_position: row.get(2),
        notified: row.get(3),
    })
}

/// Whether `error` says the function called does not exist (SQLSTATE
/// 42883): a table's write function that was never made.
pub fn is_undefined_function(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("42883"))
}

/// Whether `error` is `realtime.wal_write` refusing a replaced leader.
pub fn is_stale_leader(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some(STALE_LEADER))
}

/// Sets the progress state, as the leader of `epoch`.
pub async fn set_progress_state(conn: &mut PgConnection, epoch: i64, state: &str) -> Result<(), sqlx::Error> {
    let updated = sqlx::query("update realtime.wal_progress set state = $2 where epoch = $1")
        .bind(epoch)
        .bind(state)
        .execute(&mut *conn)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(sqlx::Error::Protocol(format!(
            "the wal leader of epoch {epoch} was replaced"
        )));
    }
    Ok(())
}

/// Opens a transaction on the leader's connection: the batch writes of one
/// outbox commit.
pub async fn begin(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    (&mut *conn).execute("begin").await?;
    Ok(())
}

pub async fn commit(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    (&mut *conn).execute("commit").await?;
    Ok(())
}

pub async fn rollback(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    (&mut *conn).execute("rollback").await?;
    Ok(())
}

/// Proves the connection alive.
pub async fn ping(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    (&mut *conn).execute("select 1").await?;
    Ok(())
}

/// Whether `error` comes from rendering a batch's rows (bad data, a table
/// changed since the change committed) rather than from the connection or
/// the server's state: a replay row by row can get past it.
pub fn is_render_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Database(e) = error else {
        return false;
    };
    let code = e.code().unwrap_or_default();
    ["22", "23", "42", "2F", "P0", "0A", "XX"]
        .iter()
        .any(|class| code.starts_with(class))
        && code != STALE_LEADER
}

/// After the lost slot was recreated at `start`: a reset of every room
/// (`history_lost`) at the next position, and the progress starting over
/// at `start`, in one transaction (`realtime.wal_reset`). Returns the
/// reset's position.
pub async fn write_slot_reset(conn: &mut PgConnection, epoch: i64, start: &str) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select realtime.wal_reset($1, $2::pg_lsn, 'history_lost')")
        .bind(epoch)
        .bind(start)
        .fetch_one(&mut *conn)
        .await
}

/// Creates the publication of the tracked tables if it is missing. It must
/// exist before the slot: a slot older than its publication cannot decode.
pub async fn ensure_publication(conn: &mut PgConnection, publication: &str) -> Result<(), sqlx::Error> {
    let exists: bool = sqlx::query_scalar("select exists (select 1 from pg_publication where pubname = $1)")
        .bind(publication)
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        (&mut *conn)
            .execute(format!("create publication {}", quote_ident(publication)).as_str())
            .await?;
    }
    Ok(())
}

pub async fn drop_publication(conn: &mut PgConnection, publication: &str) -> Result<(), sqlx::Error> {
    (&mut *conn)
        .execute(format!("drop publication if exists {}", quote_ident(publication)).as_str())
        .await?;
    Ok(())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `realtime.switch_to_wal`: the switch transaction of `ws-gateway source
/// wal`, once the publication and the slot (starting at `start`) exist.
/// Returns the tables switched.
pub async fn switch_to_wal(conn: &mut PgConnection, slot: &str, start: &str) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select realtime.switch_to_wal($1, $2::pg_lsn)")
        .bind(slot)
        .bind(start)
        .fetch_one(&mut *conn)
        .await
}

/// The tracked tables that exist, as `regclass` text (quoted where needed),
/// in oid order.
pub async fn tracked_table_names(conn: &mut PgConnection) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("select t::text from realtime.tracked_tables() t")
        .fetch_all(&mut *conn)
        .await
}

/// `lock_timeout` for the rest of the caller's transaction.
pub async fn set_local_lock_timeout(conn: &mut PgConnection, wait: std::time::Duration) -> Result<(), sqlx::Error> {
    sqlx::query("select set_config('lock_timeout', $1, true)")
        .bind(format!("{}ms", wait.as_millis().max(1)))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// The server's `deadlock_timeout`: how long a lock wait lasts before
/// PostgreSQL looks for a cycle (and aborts a transaction in one).
pub async fn deadlock_timeout(conn: &mut PgConnection) -> Result<std::time::Duration, sqlx::Error> {
    let ms: i64 =
        sqlx::query_scalar("select (extract(epoch from current_setting('deadlock_timeout')::interval) * 1000)::bigint")
            .fetch_one(&mut *conn)
            .await?;
    Ok(std::time::Duration::from_millis(ms.max(1) as u64))
}

/// The progress row's state (`idle`, `switching`, `ok`, `resetting`),
/// unlocked.
pub async fn progress_state(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select state from realtime.wal_progress")
        .fetch_one(&mut *conn)
        .await
}

/// In the switch transaction that holds the progress row: a new epoch,
/// which fences every leader (their writes fail with RT001).
pub async fn fence_leaders(conn: &mut PgConnection) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("update realtime.wal_progress set epoch = epoch + 1 returning epoch")
        .fetch_one(&mut *conn)
        .await
}

/// Whether `error` is a lock wait that gave up (`lock_timeout`) or that
/// PostgreSQL ended as part of a deadlock: the transaction may be retried.
pub fn is_lock_conflict(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if matches!(e.code().as_deref(), Some(LOCK_NOT_AVAILABLE) | Some("40P01")))
}

/// Commits a drain marker (its own transaction, on its own connection);
/// returns the LSN it ends at.
pub async fn commit_drain_marker(conn: &mut PgConnection) -> Result<String, sqlx::Error> {
    sqlx::query_scalar("select pg_logical_emit_message(true, 'realtime.drain', 'notify')::text")
        .fetch_one(&mut *conn)
        .await
}

/// `realtime.switch_to_notify`, in the transaction that locked the tracked
/// tables. Returns the tables switched.
pub async fn switch_to_notify(conn: &mut PgConnection, drain: &str, timeout_s: f64) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("select realtime.switch_to_notify($1::pg_lsn, make_interval(secs => $2))")
        .bind(drain)
        .bind(timeout_s)
        .fetch_one(&mut *conn)
        .await
}

/// Whether the leader's progress is at or past `drain` (committed state:
/// each statement of a read-committed transaction sees the latest).
pub async fn drained_past(conn: &mut PgConnection, drain: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("select end_lsn >= $1::pg_lsn from realtime.wal_progress")
        .bind(drain)
        .fetch_one(&mut *conn)
        .await
}
