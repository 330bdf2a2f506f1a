//! `ws-gateway grants ROLE [--apply] [--source notify]`: the privileges a
//! least-privileged gateway role needs, printed as SQL for a DBA to read and
//! run, or run on `DATABASE_URL` (as the owner of the `realtime` schema).

use anyhow::{Context, anyhow};
use ws_gateway::config::DatabaseSettings;
use ws_gateway::db::{self, GrantSource};

pub async fn run(role: &str, apply: bool, source: &str) -> anyhow::Result<()> {
    let source = GrantSource::parse(source).ok_or_else(|| anyhow!("unknown source {source:?}"))?;
    let grants = db::grants(role, source).map_err(|e| anyhow!(e))?;
    if !apply {
        println!(
            "-- What a least-privileged ws-gateway role needs (source: {}). Run as the owner of the",
            source.as_str()
        );
        println!("-- realtime schema, after `ws-gateway migrate`; then run the gateway as {role:?}");
        println!("-- with GATEWAY_AUTO_MIGRATE=false. `ws-gateway grants {role} --apply` runs them.");
        for grant in &grants {
            println!();
            println!("-- {}", grant.why);
            println!("{}", grant.sql);
        }
        return Ok(());
    }
    let settings = DatabaseSettings::from_env()?;
    let pool = crate::schema::pool(&settings).await?;
    let mut tx = pool.begin().await.context("starting a transaction")?;
    for grant in &grants {
        sqlx::raw_sql(&grant.sql)
            .execute(&mut *tx)
            .await
            .map_err(|e| anyhow!("{}: {}", grant.sql, db::describe(&e)))?;
    }
    tx.commit()
        .await
        .map_err(|e| anyhow!("committing the grants: {}", db::describe(&e)))?;
    println!(
        "granted role {role:?} what the gateway needs (source {}): {} statements",
        source.as_str(),
        grants.len()
    );
    Ok(())
}
