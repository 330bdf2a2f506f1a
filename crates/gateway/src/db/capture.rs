//! Applying the `realtime` migrations (crates/gateway/migrations/) and
//! tracking tables. The capture itself is SQL.

use anyhow::Context;
use sqlx::PgPool;

/// The advisory lock under which the capture trigger allocates positions at
/// COMMIT (migrations/0001_realtime.sql). Taking and releasing it waits out
/// every transaction that is committing changes right now.
pub const POSITION_LOCK: i64 = 7_310_582_919_341_551_616;

/// The migrations, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Applies the `realtime` migrations. The bookkeeping table goes into
/// `realtime` too, so an application database gains nothing outside it.
/// Concurrent gateways are safe: sqlx takes an advisory lock.
pub async fn migrate(pool: &PgPool, channel: &str) -> anyhow::Result<()> {
    let mut conn = pool.acquire().await.context("connecting to the database to migrate")?;
    sqlx::raw_sql("create schema if not exists realtime; set search_path to realtime")
        .execute(&mut *conn)
        .await
        .context("creating the realtime schema")?;
    let applied = MIGRATOR.run_direct(&mut *conn).await;
    // The connection goes back to the pool: give it its usual search path.
    sqlx::raw_sql("reset search_path").execute(&mut *conn).await?;
    applied.context("applying the realtime migrations")?;
    sqlx::query("select realtime.set_channel($1)")
        .bind(channel)
        .execute(&mut *conn)
        .await
        .context("setting the notification channel")?;
    Ok(())
}

/// The channel the database's capture triggers notify, or None when the
/// `realtime` schema is not installed.
pub async fn database_channel(pool: &PgPool) -> anyhow::Result<Option<String>> {
    let installed: bool = sqlx::query_scalar("select to_regclass('realtime.settings') is not null")
        .fetch_one(pool)
        .await
        .context("looking for the realtime schema")?;
    if !installed {
        return Ok(None);
    }
    let channel = sqlx::query_scalar("select channel from realtime.settings")
        .fetch_one(pool)
        .await
        .context("reading realtime.settings")?;
    Ok(Some(channel))
}

/// `realtime.track(table, rooms)`: errors from the database (no such table,
/// a template naming a missing column) come back with its message.
pub async fn track(pool: &PgPool, table: &str, rooms: &[String]) -> anyhow::Result<()> {
    sqlx::query("select realtime.track($1::regclass, $2)")
        .bind(table)
        .bind(rooms)
        .execute(pool)
        .await
        .with_context(|| format!("tracking {table}"))?;
    Ok(())
}

pub async fn untrack(pool: &PgPool, table: &str) -> anyhow::Result<()> {
    sqlx::query("select realtime.untrack($1::regclass)")
        .bind(table)
        .execute(pool)
        .await
        .with_context(|| format!("untracking {table}"))?;
    Ok(())
}
