//! The `ws-gateway` command (SPEC section 6): `serve`, `migrate`, `track`,
//! `untrack`, `source`, `grants`, `latency`, and the tools: `bench`, `demo`
//! (what `make run` starts) and `dev-db` for the test set-up. Thin: the
//! libraries do the work. Each command reads only the settings it uses.

mod demo;
mod dev_db;
mod grants;
mod latency;
mod logging;
mod schema;
mod serve;
mod source;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use ws_gateway::db;

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
        /// Send only these columns (and the key), e.g. `--columns title,status`.
        #[arg(long, value_delimiter = ',', conflicts_with = "exclude")]
        columns: Option<Vec<String>>,
        /// Send every column but these, e.g. `--exclude password_hash,drawing`.
        #[arg(long, value_delimiter = ',')]
        exclude: Option<Vec<String>>,
    },
    /// Stop capturing changes of TABLE.
    Untrack { table: String },
    /// Show the database's capture source, or switch it: `notify` (a trigger
    /// on each tracked table) or `wal` (logical replication). See the
    /// README's "Capture sources" for the procedure.
    Source {
        #[arg(value_parser = ["notify", "wal"])]
        target: Option<String>,
        /// The replication slot for `wal` (default: ws_gateway_<database>).
        #[arg(long)]
        slot: Option<String>,
    },
    /// Print (or, with --apply, run) the GRANTs a least-privileged gateway
    /// role needs; run the gateway as ROLE with GATEWAY_AUTO_MIGRATE=false.
    Grants {
        /// The role the gateway logs in as (it must exist).
        role: String,
        /// Run them on DATABASE_URL (as the owner of the realtime schema)
        /// instead of printing them.
        #[arg(long)]
        apply: bool,
        /// The capture source the gateway runs with.
        #[arg(long, default_value = "notify", value_parser = ws_gateway::db::GrantSource::NAMES.to_vec())]
        source: String,
    },
    /// A private PostgreSQL with the demo ConstructTrack schema, a demo writer
    /// and the gateway: what `make run` starts.
    Demo {
        /// Where the private cluster lives.
        #[arg(long, default_value = ".data/postgres")]
        data_dir: PathBuf,
        /// Demo changes per second.
        #[arg(long, default_value_t = 5.0)]
        rate: f64,
        /// Where the project board (a page of the demo application, using
        /// the gateway's /client.js) is served.
        #[arg(long, default_value = "127.0.0.1:8081")]
        board_listen: std::net::SocketAddr,
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
    let log = match ws_gateway::config::LogSettings::from_env() {
        Ok(log) => log,
        Err(error) => return fail(&error),
    };
    let guard = logging::init(&log);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let outcome = runtime.block_on(run(cli.command));
    // Flush what is queued for stderr before the last line. The writer's
    // guard may print (to stdout) when the writer is stuck on a full pipe;
    // a closed stdout must not turn that into a panic at exit.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(guard)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(&format!("{error:#}")),
    }
}

/// The one line a failed command ends with. Written with `writeln!`, not
/// `eprintln!`, which would panic when stderr is a closed pipe.
fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "ws-gateway: {error}");
    ExitCode::FAILURE
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve::serve(ws_gateway::config::Settings::from_env()?, CancellationToken::new()).await,
        Command::Migrate => schema::migrate().await,
        Command::Track {
            table,
            rooms,
            columns,
            exclude,
        } => {
            let projection = match (columns, exclude) {
                (Some(columns), _) => db::Projection::Columns(columns),
                (None, Some(exclude)) => db::Projection::Exclude(exclude),
                (None, None) => db::Projection::All,
            };
            schema::track(&table, &rooms, &projection).await
        }
        Command::Untrack { table } => schema::untrack(&table).await,
        Command::Source { target, slot } => source::source(target.as_deref(), slot.as_deref()).await,
        Command::Grants { role, apply, source } => grants::run(&role, apply, &source).await,
        Command::Demo {
            data_dir,
            rate,
            board_listen,
        } => demo::run(data_dir, rate, board_listen).await,
        Command::Bench(args) => ws_gateway_bench::run(args).await,
        Command::Latency { url } => latency::print_latency(&url).await,
        Command::DevDb { action, dir } => match action.as_str() {
            "start" => dev_db::start(&dir).await,
            _ => dev_db::stop(&dir).await,
        },
    }
}
