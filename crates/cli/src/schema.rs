//! `ws-gateway migrate`, `track` and `untrack`: an operator's deploy steps.
//! Each reads and validates only `DATABASE_URL` (and the channel): a deploy
//! step has no JWT secret.

use anyhow::Context;
use sqlx::postgres::PgPoolOptions;
use ws_gateway::config::{Secret, Settings};
use ws_gateway::db;

pub fn settings() -> anyhow::Result<Settings> {
    Ok(Settings::from_env()?)
}

async fn pool(settings: &Settings) -> anyhow::Result<sqlx::PgPool> {
    let url = settings
        .database_url
        .as_ref()
        .map(Secret::expose)
        .context("DATABASE_URL is not set")?;
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .context("connecting to DATABASE_URL")
}

pub async fn migrate() -> anyhow::Result<()> {
    let settings = settings()?;
    db::migrate(&pool(&settings).await?, &settings.channel).await?;
    println!("realtime schema is up to date (channel {})", settings.channel);
    Ok(())
}

pub async fn track(table: &str, rooms: &[String]) -> anyhow::Result<()> {
    let settings = settings()?;
    db::track(&pool(&settings).await?, table, rooms).await?;
    println!("tracking {table} into rooms {}", rooms.join(", "));
    Ok(())
}

pub async fn untrack(table: &str) -> anyhow::Result<()> {
    let settings = settings()?;
    db::untrack(&pool(&settings).await?, table).await?;
    println!("no longer tracking {table}");
    Ok(())
}
