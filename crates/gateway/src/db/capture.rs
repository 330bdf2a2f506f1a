//! Applying the `realtime` migrations (crates/gateway/migrations/) and
//! tracking tables. The capture itself is SQL.

use sqlx::PgPool;

use super::connect::failed;

/// The advisory lock under which the capture trigger allocates positions at
/// COMMIT (migrations/0001_realtime.sql). Taking and releasing it waits out
/// every transaction that is committing changes right now.
pub const POSITION_LOCK: i64 = 7_310_582_919_341_551_616;

/// The migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// One migration, as `migrate` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    pub version: i64,
    pub description: String,
}

/// What [`migrate`] did: the migrations it applied now (empty when the
/// schema was up to date) and the newest one in the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub applied: Vec<Migration>,
    pub latest: Option<Migration>,
}

/// The versions recorded in `realtime._sqlx_migrations` (none before the
/// first migrate).
async fn applied_versions(conn: &mut sqlx::PgConnection) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("select to_regclass('realtime._sqlx_migrations') is not null")
        .fetch_one(&mut *conn)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("select version from realtime._sqlx_migrations where success order by version")
        .fetch_all(&mut *conn)
        .await
}

/// Applies the `realtime` migrations. The bookkeeping table goes into
/// `realtime` too, so an application database gains nothing outside it.
/// Concurrent gateways are safe: sqlx takes an advisory lock.
pub async fn migrate(pool: &PgPool, channel: &str) -> anyhow::Result<Migrated> {
    let mut conn = pool
        .acquire()
        .await
        .map_err(|e| failed("connecting to the database to migrate", &e))?;
    let before = applied_versions(&mut conn)
        .await
        .map_err(|e| failed("reading which migrations were applied", &e))?;
    sqlx::raw_sql("create schema if not exists realtime; set search_path to realtime")
        .execute(&mut *conn)
        .await
        .map_err(|e| failed("creating the realtime schema", &e))?;
    let applied = MIGRATOR.run_direct(&mut *conn).await;
    // The connection goes back to the pool: give it its usual search path.
    sqlx::raw_sql("reset search_path").execute(&mut *conn).await?;
    applied.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => failed("applying the realtime migrations", &e),
        sqlx::migrate::MigrateError::ExecuteMigration(e, version) => {
            failed(&format!("applying realtime migration {version}"), &e)
        }
        other => anyhow::anyhow!("applying the realtime migrations: {other}"),
    })?;
    sqlx::query("select realtime.set_channel($1)")
        .bind(channel)
        .execute(&mut *conn)
        .await
        .map_err(|e| failed("setting the notification channel", &e))?;
    let after = applied_versions(&mut conn)
        .await
        .map_err(|e| failed("reading which migrations were applied", &e))?;
    let describe = |version: i64| Migration {
        version,
        description: MIGRATOR
            .iter()
            .find(|m| m.version == version)
            .map(|m| m.description.to_string())
            .unwrap_or_default(),
    };
    Ok(Migrated {
        applied: after
            .iter()
            .filter(|v| !before.contains(v))
            .map(|&v| describe(v))
            .collect(),
        latest: after.last().map(|&v| describe(v)),
    })
}

/// The channel the database's capture triggers notify, or None when the
/// `realtime` schema is not installed.
pub async fn database_channel(pool: &PgPool) -> anyhow::Result<Option<String>> {
    let installed: bool = sqlx::query_scalar("select to_regclass('realtime.settings') is not null")
        .fetch_one(pool)
        .await
        .map_err(|e| failed("looking for the realtime schema", &e))?;
    if !installed {
        return Ok(None);
    }
    let channel = sqlx::query_scalar("select channel from realtime.settings")
        .fetch_one(pool)
        .await
        .map_err(|e| failed("reading realtime.settings", &e))?;
    Ok(Some(channel))
}

/// Which columns a tracked table's changes carry (`realtime.track`'s
/// `columns =>` / `exclude =>`): the key columns always.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Projection {
    #[default]
    All,
    /// These (and the key); columns added to the table later are not sent.
    Columns(Vec<String>),
    /// All but these; columns added later are sent.
    Exclude(Vec<String>),
}

/// `realtime.track(table, rooms, columns =>, exclude =>)`: errors from the
/// database (no such table, a template or projection naming a missing
/// column, an excluded key column) come back with its message.
pub async fn track(pool: &PgPool, table: &str, rooms: &[String], projection: &Projection) -> anyhow::Result<()> {
    let (columns, exclude) = match projection {
        Projection::All => (None, None),
        Projection::Columns(columns) => (Some(columns), None),
        Projection::Exclude(exclude) => (None, Some(exclude)),
    };
    sqlx::query("select realtime.track($1::regclass, $2, columns => $3, exclude => $4)")
        .bind(table)
        .bind(rooms)
        .bind(columns)
        .bind(exclude)
        .execute(pool)
        .await
        .map_err(|e| failed(&format!("tracking {table}"), &e))?;
    Ok(())
}

pub async fn untrack(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query("select realtime.untrack($1::regclass)")
        .bind(table)
        .execute(pool)
        .await
        .map_err(|e| failed(&format!("untracking {table}"), &e))?;
    Ok(())
}
