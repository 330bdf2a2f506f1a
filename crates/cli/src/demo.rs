//! `ws-gateway demo` (what `make run` starts): a private PostgreSQL under
//! `.data` unless DATABASE_URL is set, the demo ConstructTrack schema and
//! writer, and the gateway; prints where to look.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use pg_private::{ClusterOptions, PrivateCluster, StopMode};
use sqlx::postgres::PgPoolOptions;
use ws_gateway::config::{Auth, Settings};
use ws_gateway::{Application, db, shutdown_signal};
use ws_gateway_demo as demo;

pub async fn run(data_dir: PathBuf, rate: f64, board_listen: SocketAddr) -> anyhow::Result<()> {
    let mut settings = Settings::from_env_with_defaults(&[("GATEWAY_AUTH", "none")])?;
    let cluster = if settings.database_url.is_none() {
        let cluster = PrivateCluster::start(&data_dir, ClusterOptions::default())
            .await
            .with_context(|| format!("starting the private PostgreSQL in {}", data_dir.display()))?;
        let url = cluster.create_database("constructtrack").await?;
        settings.database_url = Some(url.into());
        Some(cluster)
    } else {
        None
    };
    let url = settings.database_url.clone().expect("set above");
    let pool = PgPoolOptions::new().max_connections(4).connect(url.expose()).await?;
    db::migrate(&pool, &settings.channel).await?;
    demo::load_schema(&pool).await?;

    let settings_url = settings.redacted_database_url();
    // The board's backend mints tokens the way the application's would:
    // it shares the gateway's secret.
    let jwt_secret = match &settings.auth {
        Auth::Jwt { secret } => Some(secret.expose().to_owned()),
        Auth::None => None,
    };
    let board_listener = tokio::net::TcpListener::bind(board_listen)
        .await
        .with_context(|| format!("binding the project board to {board_listen} (--board-listen)"))?;
    let board_address = board_listener.local_addr()?;
    let app = Application::build(settings).await?;
    let address = app.local_addr();
    let token = app.shutdown_token();
    let board = tokio::spawn(demo::board::serve(
        board_listener,
        pool.clone(),
        demo::board::BoardOptions {
            gateway_port: address.port(),
            jwt_secret,
        },
        token.clone(),
    ));
    let writer = tokio::spawn(demo::run_writer(
        pool,
        demo::WriterOptions {
            changes_per_second: rate,
        },
        token.clone(),
    ));
    println!();
    println!("  ws-gateway demo is running");
    println!("  dashboard:  http://{address}/");
    println!("  board:      http://{board_address}/   (a project board that updates live, through /client.js)");
    println!("  websocket:  ws://{address}/ws   (try {{\"type\":\"subscribe\",\"room\":\"project:1\"}})");
    println!("  health:     http://{address}/healthz");
    println!("  database:   {}", settings_url.as_deref().unwrap_or("(DATABASE_URL)"));
    println!("  ctrl-c stops it all");
    println!();
    let signal_token = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signal_token.cancel();
    });
    let result = app.run_until_stopped().await;
    let _ = writer.await;
    if let Ok(Err(error)) = board.await {
        tracing::warn!(error = %format!("{error:#}"), "the project board stopped");
    }
    if let Some(cluster) = cluster {
        cluster.stop(StopMode::Fast).await?;
    }
    result
}
