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
//! one too, which waits as a follower when a gateway leads.

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
/// How long writers may block the switch's locks.
const LOCK_TIMEOUT: &str = "30s";

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
/// database).
pub async fn switch_to_wal(pool: &PgPool, slot: Option<&str>) -> anyhow::Result<SwitchOutcome> {
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
    drop(conn);
    let switched = async {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("set local lock_timeout = '{LOCK_TIMEOUT}'"))
            .execute(&mut *tx)
            .await?;
        let tables = db::switch_to_wal(&mut tx, &slot, &start).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(tables)
    }
    .await;
    match switched {
        Ok(tables) => Ok(SwitchOutcome {
            from: "notify".into(),
            to: "wal".into(),
            changed: true,
            slot: Some(slot),
            tables,
        }),
        Err(error) => {
            if let Ok(mut conn) = pool.acquire().await {
                let _ = db::drop_slot(&mut conn, &slot).await;
            }
            Err(anyhow::Error::new(error).context(
                "switching to wal (writers holding the tracked tables for longer than the lock timeout make it refuse; retry)",
            ))
        }
    }
}

/// wal -> notify. Writers may keep writing: they wait for the switch's
/// locks. A leader must drain the slot: a running gateway's, or the one
/// this call runs (`database_url`) when none does.
pub async fn switch_to_notify(
    pool: &PgPool,
    database_url: &str,
    drain_timeout: Duration,
) -> anyhow::Result<SwitchOutcome> {
    let mut conn = pool.acquire().await.context("connecting to the database")?;
    let settings = db::source_settings_on(&mut conn)
        .await
        .context("reading realtime.settings (run `ws-gateway migrate` first)")?;
    drop(conn);
    if settings.source == "notify" {
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
        });
    }
    let stop_capture = CancellationToken::new();
    let capture = tokio::spawn(
        WalCapture::new(database_url.to_owned(), Arc::new(Telemetry::default())).run(stop_capture.clone()),
    );
    let switched = async {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("set local lock_timeout = '{LOCK_TIMEOUT}'"))
            .execute(&mut *tx)
            .await?;
        db::lock_tracked_tables(&mut tx).await?;
        let drain = {
            let mut marker = pool.acquire().await?;
            db::commit_drain_marker(&mut marker).await?
        };
        let tables = db::switch_to_notify(&mut tx, &drain, drain_timeout.as_secs_f64()).await?;
        tx.commit().await?;
        Ok::<_, sqlx::Error>(tables)
    }
    .await;
    stop_capture.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), capture).await;
    let tables = switched.map_err(|error| {
        let drained = matches!(&error, sqlx::Error::Database(e) if e.code().as_deref() == Some(db::NOT_DRAINED));
        let hint = if drained {
            "switching to notify: the wal leader did not catch up in time (is the database reachable for replication? \
             see /healthz feed.slot_lag_bytes)"
        } else {
            "switching to notify (writers holding the tracked tables for longer than the lock timeout make it refuse; retry)"
        };
        anyhow::Error::new(error).context(hint)
    })?;
    let slot = settings.slot.clone();
    if let Some(slot) = &slot {
        drop_slot_and_publication(pool, slot, &settings.publication).await?;
    }
    Ok(SwitchOutcome {
        from: "wal".into(),
        to: "notify".into(),
        changed: true,
        slot,
        tables,
    })
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
