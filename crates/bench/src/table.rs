//! The bench's own table, `bench_events`: one row per commit, tracked into
//! rooms `bench:{room}`. Created afresh for every run.

use anyhow::{Context, Result};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub const TABLE: &str = "public.bench_events";
pub const ROOM_TEMPLATE: &str = "bench:{room}";

/// The INSERT every writer prepares. `sent_at_us` is the bench's clock (not
/// the database's): it lets anyone reading the table see what the bench saw.
pub const INSERT: &str = "insert into bench_events (id, room, nonce, sent_at_us, payload) values ($1, $2, $3, $4, $5)";

pub async fn connect(db_url: &str) -> Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(db_url)
        .await
        .context("connecting to the bench database")
}

/// The room name of room number `room`.
pub fn room_name(room: u64) -> String {
    ROOM_TEMPLATE.replace("{room}", &room.to_string())
}

/// Installs the `realtime` schema when the database lacks it (no gateway has
/// run against it yet); returns the channel its capture triggers notify.
pub async fn ensure_realtime(pool: &PgPool, channel: &str) -> Result<String> {
    match ws_gateway::db::database_channel(pool).await? {
        Some(channel) => Ok(channel),
        None => {
            ws_gateway::db::migrate(pool, channel).await?;
            Ok(channel.to_owned())
        }
    }
}

/// Drops and re-creates `bench_events`, untracked and without triggers.
pub async fn recreate(pool: &PgPool) -> Result<()> {
    let realtime = ws_gateway::db::database_channel(pool).await?.is_some();
    let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
        .bind(TABLE)
        .fetch_one(pool)
        .await?;
    if realtime && exists {
        ws_gateway::db::untrack(pool, TABLE).await?;
    }
    sqlx::raw_sql(
        "drop table if exists bench_events;
         create table bench_events (
             id bigint primary key,
             room int not null,
             nonce bigint not null,
             sent_at_us bigint,
             payload text
         );",
    )
    .execute(pool)
    .await
    .context("creating the bench_events table")?;
    Ok(())
}

pub async fn track(pool: &PgPool) -> Result<()> {
    ws_gateway::db::track(pool, TABLE, &[ROOM_TEMPLATE.to_owned()], &Default::default()).await
}

/// The filler of every row's `payload`.
pub fn payload(bytes: usize) -> String {
    "x".repeat(bytes)
}

/// A row's nonce: unique per id within a run, and differing between runs.
pub fn nonce(run_seed: u64, id: u64) -> i64 {
    (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ run_seed) as i64
}
