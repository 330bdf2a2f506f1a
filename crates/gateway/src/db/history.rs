//! The outbox's retention: changes older than `GATEWAY_HISTORY_RETENTION`
//! are pruned, by one gateway instance at a time (an advisory lock), and
//! `realtime.settings.pruned_through` records how far, so a resume from
//! before it is answered with `reset` instead of a silent gap.

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::connect::failed;
use crate::telemetry::repeats::{Occurrence, Repeats, SUMMARY_EVERY};

/// The advisory lock that makes pruning one instance's job at a time.
pub const PRUNE_LOCK: i64 = 7_310_582_919_341_551_617;
/// Rows deleted per statement, so a large backlog is pruned in steps that
/// never hold many locks or a long transaction.
const PRUNE_BATCH: i64 = 10_000;

/// Deletes changes committed longer than `retention` ago. Returns how many
/// rows went, or None when another instance holds the pruning lock.
pub async fn prune(pool: &PgPool, retention: Duration) -> anyhow::Result<Option<u64>> {
    let mut deleted = 0;
    loop {
        let mut tx = pool.begin().await.map_err(|e| failed("starting a prune", &e))?;
        let ours: bool = sqlx::query_scalar("select pg_try_advisory_xact_lock($1)")
            .bind(PRUNE_LOCK)
            .fetch_one(&mut *tx)
            .await
            .map_err(|e| failed("taking the pruning lock", &e))?;
        if !ours {
            return Ok(None);
        }
        // committed_at grows with position (both are taken at COMMIT under
        // one lock), so "older than the cutoff" is a prefix of positions.
        let cut: Option<i64> = sqlx::query_scalar(
            "select max(position) from (
                 select position, committed_at from realtime.changes
                  where position > (select pruned_through from realtime.settings)
                  order by position limit $2
             ) batch
             where committed_at < clock_timestamp() - make_interval(secs => $1)",
        )
        .bind(retention.as_secs_f64())
        .bind(PRUNE_BATCH)
        .fetch_one(&mut *tx)
        .await
        .map_err(|e| failed("finding what to prune", &e))?;
        let Some(cut) = cut else {
            tx.commit().await.map_err(|e| failed("committing a prune", &e))?;
            return Ok(Some(deleted));
        };
        let result = sqlx::query("delete from realtime.changes where position <= $1")
            .bind(cut)
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("pruning the outbox", &e))?;
        sqlx::query("update realtime.settings set pruned_through = greatest(pruned_through, $1)")
            .bind(cut)
            .execute(&mut *tx)
            .await
            .map_err(|e| failed("recording how far the outbox was pruned", &e))?;
        tx.commit().await.map_err(|e| failed("committing a prune", &e))?;
        deleted += result.rows_affected();
        if result.rows_affected() == 0 {
            return Ok(Some(deleted));
        }
    }
}

/// Prunes on a timer until shutdown. Failures are logged, not fatal: the
/// database may be down for a while, and pruning can wait.
pub async fn run_pruner(pool: PgPool, retention: Duration, shutdown: CancellationToken) -> anyhow::Result<()> {
    let every = (retention / 20).clamp(Duration::from_secs(1), Duration::from_secs(60));
    let mut timer = tokio::time::interval(every);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = Repeats::new(SUMMARY_EVERY);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = timer.tick() => match prune(&pool, retention).await {
                Ok(deleted) => {
                    if let Some((failed, _)) = failures.recover(tokio::time::Instant::now()) {
                        tracing::info!(failed, "outbox pruning works again");
                    }
                    if let Some(n) = deleted.filter(|n| *n > 0) {
                        tracing::info!(deleted = n, "pruned the outbox");
                    }
                }
                Err(error) => match failures.occur(tokio::time::Instant::now()) {
                    Occurrence::First => {
                        tracing::warn!(error = format!("{error:#}"), "outbox pruning failed; will retry")
                    }
                    Occurrence::Quiet => {}
                    Occurrence::Summary { more, for_s } => tracing::warn!(
                        error = format!("{error:#}"),
                        failed = more,
                        failing_for_s = format!("{for_s:.0}"),
                        "outbox pruning still failing"
                    ),
                },
            },
        }
    }
}
