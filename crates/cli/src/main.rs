//! The `ws-gateway` command (SPEC section 6): `serve`, `migrate`, `track`,
//! `untrack`, `latency`, and the tools: `bench`, `demo` (what `make run`
//! starts) and `dev-db` for the test set-up. Thin: the libraries do the work.

mod latency;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sqlx::postgres::PgPoolOptions;
use tokio_util::sync::CancellationToken;

use pg_private::{ClusterOptions, PrivateCluster, StopMode};
use ws_gateway::config::{Secret, Settings};
use ws_gateway::db;
use ws_gateway::{Application, shutdown_signal};
use ws_gateway_demo as demo;

#[derive(Parser)]
#[command(
    name = "ws-gateway",
    version,
    about = "Pushes committed PostgreSQL changes to WebSocket rooms"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (configured by environment variables, see config/gateway.env.example).
    Serve,
    /// Apply the `realtime` schema migrations to DATABASE_URL.
    Migrate,
    /// Capture changes of TABLE into rooms rendered from templates over its columns.
    Track {
        /// Table, optionally schema-qualified: `public.tasks`.
        table: String,
        /// Room template, e.g. `project:{project_id}`; repeat for several rooms.
        #[arg(long = "room", required = true)]
        rooms: Vec<String>,
    },
    /// Stop capturing changes of TABLE.
    Untrack { table: String },
    /// A private PostgreSQL with the demo ConstructTrack schema, a demo writer
    /// and the gateway: what `make run` starts.
    Demo {
        /// Where the private cluster lives.
        #[arg(long, default_value = ".data/postgres")]
        data_dir: PathBuf,
        /// Demo changes per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
    },
    /// Load-test a gateway (or a private one it starts) and report
    /// commit-to-receive latency, losses and resource use.
    Bench(ws_gateway_bench::BenchArgs),
    /// Print the running daemon's commit-to-receive percentiles.
    Latency {
        /// The gateway's base URL.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Start or stop a private PostgreSQL cluster (used by `make test`).
    #[command(hide = true)]
    DevDb {
        #[arg(value_parser = ["start", "stop"])]
        action: String,
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ws-gateway: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn settings() -> anyhow::Result<Settings> {
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

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(settings()?, CancellationToken::new()).await,
        Command::Migrate => {
            let settings = settings()?;
            db::migrate(&pool(&settings).await?, &settings.channel).await?;
            println!("realtime schema is up to date (channel {})", settings.channel);
            Ok(())
        }
        Command::Track { table, rooms } => {
            let settings = settings()?;
            db::track(&pool(&settings).await?, &table, &rooms).await?;
            println!("tracking {table} into rooms {}", rooms.join(", "));
            Ok(())
        }
        Command::Untrack { table } => {
            let settings = settings()?;
            db::untrack(&pool(&settings).await?, &table).await?;
            println!("no longer tracking {table}");
            Ok(())
        }
        Command::Demo { data_dir, rate } => run_demo(data_dir, rate).await,
        Command::Bench(args) => ws_gateway_bench::run(args).await,
        Command::Latency { url } => latency::print_latency(&url).await,
        Command::DevDb { action, dir } => {
            if action == "start" {
                let options = ClusterOptions {
                    fast_unsafe: true,
                    ..ClusterOptions::default()
                };
                let cluster = PrivateCluster::start(&dir, options).await?;
                println!("{}", cluster.url("postgres"));
                cluster.detach();
            } else {
                stop_cluster_dir(&dir).await?;
            }
            Ok(())
        }
    }
}

/// Runs the daemon until ctrl-c or SIGTERM; `extra` stops it too.
async fn serve(settings: Settings, extra: CancellationToken) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    let token = app.shutdown_token();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown_signal() => {}
            () = extra.cancelled() => {}
        }
        token.cancel();
    });
    app.run_until_stopped().await
}

async fn run_demo(data_dir: PathBuf, rate: f64) -> anyhow::Result<()> {
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
    let app = Application::build(settings).await?;
    let address = app.local_addr();
    let token = app.shutdown_token();
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
    if let Some(cluster) = cluster {
        cluster.stop(StopMode::Fast).await?;
    }
    result
}

async fn stop_cluster_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    pg_private::stop_dir(dir, StopMode::Immediate).await
}
