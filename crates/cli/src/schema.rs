//! `ws-gateway migrate`, `track` and `untrack`: an operator's deploy steps.
//! Each reads and validates only `DATABASE_URL` and `GATEWAY_CHANNEL`: a
//! deploy step has no JWT secret, and a bad setting of `serve`'s is not its
//! business.

use ws_gateway::config::DatabaseSettings;
use ws_gateway::db;

pub async fn pool(settings: &DatabaseSettings) -> anyhow::Result<sqlx::PgPool> {
    Ok(db::connect(settings.database_url.expose(), 2, "ws-gateway migrate").await?)
}

pub async fn migrate() -> anyhow::Result<()> {
    let settings = DatabaseSettings::from_env()?;
    let migrated = db::migrate(&pool(&settings).await?, &settings.channel).await?;
    let name = |m: &db::Migration| format!("{:04} {}", m.version, m.description);
    let latest = migrated.latest.as_ref().map(name).unwrap_or_default();
    if migrated.applied.is_empty() {
        println!(
            "nothing to apply: the realtime schema is at {latest} (channel {})",
            settings.channel
        );
    } else {
        let count = migrated.applied.len();
        println!("applied {count} migration{}:", if count == 1 { "" } else { "s" });
        for migration in &migrated.applied {
            println!("  {}", name(migration));
        }
        println!("the realtime schema is at {latest} (channel {})", settings.channel);
    }
    Ok(())
}

pub async fn track(table: &str, rooms: &[String], projection: &db::Projection) -> anyhow::Result<()> {
    let settings = DatabaseSettings::from_env()?;
    db::track(&pool(&settings).await?, table, rooms, projection).await?;
    // Without a projection, the line operators' scripts already read.
    let carrying = match projection {
        db::Projection::All => String::new(),
        db::Projection::Columns(columns) => format!(", carrying the key and {}", columns.join(", ")),
        db::Projection::Exclude(exclude) => format!(", carrying every column but {}", exclude.join(", ")),
    };
    println!("tracking {table} into rooms {}{carrying}", rooms.join(", "));
    Ok(())
}

pub async fn untrack(table: &str) -> anyhow::Result<()> {
    let settings = DatabaseSettings::from_env()?;
    db::untrack(&pool(&settings).await?, table).await?;
    println!("no longer tracking {table}");
    Ok(())
}
