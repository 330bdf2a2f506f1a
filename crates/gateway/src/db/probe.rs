//! The built-in probe's row in `realtime.probe` (migrations/0002), one per
//! gateway instance, tracked into the room `__probe:<instance>`.

use sqlx::PgPool;

/// Commits probe number `seq` of `instance`: its change is what the probe
/// then receives over its own WebSocket.
pub async fn commit_probe(pool: &PgPool, instance: &str, seq: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into realtime.probe (instance, seq) values ($1, $2) \
         on conflict (instance) do update set seq = excluded.seq, sent_at = clock_timestamp()",
    )
    .bind(instance)
    .bind(seq)
    .execute(pool)
    .await?;
    Ok(())
}

/// Deletes the rows of instances gone for a day (one row per process).
pub async fn forget_old_probes(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("delete from realtime.probe where sent_at < now() - interval '1 day'")
        .execute(pool)
        .await?;
    Ok(())
}
