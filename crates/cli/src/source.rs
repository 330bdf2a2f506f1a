//! `ws-gateway source [notify|wal]`: shows or switches the database's
//! capture source (SPEC section 8). Reads only `DATABASE_URL`: a deploy
//! step has no JWT secret.

use std::time::Duration;

use anyhow::Context;
use ws_gateway::config::DatabaseSettings;
use ws_gateway::{SwitchOutcome, db};

/// How long a switch waits for the writers' locks (and `source notify` for
/// the wal leader to catch up).
const WAIT: Duration = Duration::from_secs(30);

pub async fn source(target: Option<&str>, slot: Option<&str>) -> anyhow::Result<()> {
    let settings = DatabaseSettings::from_env()?;
    let url = settings.database_url.expose();
    let pool = db::connect(url, 3, "ws-gateway source").await?;
    let outcome = match target {
        None => return show(&pool).await,
        Some("wal") => ws_gateway::switch_to_wal(&pool, slot, WAIT).await?,
        Some(_) => ws_gateway::switch_to_notify(&pool, url, WAIT).await?,
    };
    print_outcome(&outcome);
    Ok(())
}

fn print_outcome(outcome: &SwitchOutcome) {
    if !outcome.changed {
        println!("the database's capture source is {} already", outcome.to);
        return;
    }
    match outcome.to.as_str() {
        "wal" => println!(
            "switched the capture source from notify to wal: {} tracked tables, replication slot {}; \
             restart the gateways with GATEWAY_SOURCE=wal",
            outcome.tables,
            outcome.slot.as_deref().unwrap_or("?")
        ),
        _ => {
            if let Some(position) = outcome.history_lost {
                println!(
                    "the replication slot {} was gone (dropped, or invalidated past max_slot_wal_keep_size): \
                     changes committed since the wal leader's last write are lost; every room was reset \
                     (reason history_lost) at position {position}",
                    outcome.slot.as_deref().unwrap_or("-")
                );
            }
            println!(
                "switched the capture source from wal to notify: {} tracked tables, replication slot {} dropped; \
                 restart the gateways with GATEWAY_SOURCE=notify",
                outcome.tables,
                outcome.slot.as_deref().unwrap_or("-")
            )
        }
    }
}

async fn show(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let settings = db::source_settings(pool)
        .await?
        .context("the realtime schema is not installed: run `ws-gateway migrate`")?;
    println!("source      {}", settings.source);
    if settings.source == "wal" {
        let slot = settings.slot.unwrap_or_default();
        println!("publication {}", settings.publication);
        let mut conn = pool.acquire().await?;
        match db::slot_state(&mut conn, &slot).await? {
            Some(state) => {
                println!(
                    "slot        {slot} ({}, {})",
                    state.wal_status.as_deref().unwrap_or("unknown"),
                    match state.active_pid {
                        Some(pid) => format!("streamed by pid {pid}"),
                        None => "no leader streaming it".to_owned(),
                    }
                );
                println!(
                    "lag         {} bytes (retained {} bytes)",
                    state.lag_bytes.unwrap_or(0),
                    state.retained_bytes.unwrap_or(0)
                );
            }
            None => println!("slot        {slot} (missing: the next leader recreates it and every room is reset)"),
        }
    }
    Ok(())
}
