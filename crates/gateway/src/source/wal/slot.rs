//! The slot as every instance sees it (`pg_replication_slots` is readable by
//! any role): how much WAL it holds back, for `/healthz` `feed.slot_lag_bytes`
//! and `ws_gateway_slot_lag_bytes`. WAL retained while no leader runs is
//! disk the database cannot free.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::db;
use crate::telemetry::{SlotHealth, Telemetry};

/// How often the slot is looked at.
const EVERY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the slot's state into the telemetry until shutdown. Failures leave
/// the gauges unknown and are retried: the database may be down a while.
pub async fn watch_slot(pool: PgPool, telemetry: Arc<Telemetry>, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut timer = tokio::time::interval(EVERY);
    timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            _ = timer.tick() => {}
        }
        let wal = &telemetry.wal;
        match tokio::time::timeout(TIMEOUT, read(&pool)).await {
            Ok(Ok(Seen::Slot(state))) => {
                let store = |gauge: &std::sync::atomic::AtomicI64, v: Option<i64>| {
                    gauge.store(v.unwrap_or(-1), Ordering::Relaxed)
                };
                store(&wal.slot_lag_bytes, state.lag_bytes);
                store(&wal.slot_retained_bytes, state.retained_bytes);
                store(&wal.slot_safe_wal_bytes, state.safe_wal_bytes);
                wal.set_slot_health(SlotHealth::from_wal_status(state.wal_status.as_deref()));
            }
            Ok(Ok(seen)) => {
                for gauge in [&wal.slot_lag_bytes, &wal.slot_retained_bytes, &wal.slot_safe_wal_bytes] {
                    gauge.store(-1, Ordering::Relaxed);
                }
                wal.set_slot_health(match seen {
                    Seen::Missing => SlotHealth::Missing,
                    _ => SlotHealth::Unknown,
                });
            }
            Ok(Err(error)) => {
                tracing::debug!(error = format!("{error:#}"), "reading the wal slot's state failed");
                wal.set_slot_health(SlotHealth::Unknown);
            }
            Err(_) => wal.set_slot_health(SlotHealth::Unknown),
        }
    }
}

enum Seen {
    /// The database is not in wal mode (any more).
    NotWal,
    Missing,
    Slot(db::SlotState),
}

async fn read(pool: &PgPool) -> anyhow::Result<Seen> {
    let Some(settings) = db::source_settings(pool).await? else {
        return Ok(Seen::NotWal);
    };
    let Some(slot) = settings.slot.filter(|_| settings.source == "wal") else {
        return Ok(Seen::NotWal);
    };
    let mut conn = pool.acquire().await?;
    Ok(match db::slot_state(&mut conn, &slot).await? {
        Some(state) => Seen::Slot(state),
        None => Seen::Missing,
    })
}
