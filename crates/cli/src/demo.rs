//! `ws-gateway demo` (what `make run` starts): a private PostgreSQL under
//! `.data` unless DATABASE_URL is set, the demo ConstructTrack schema and
//! writer, and the gateway; prints where to look.
//!
//! A demo holds a lock beside its data directory for as long as it runs: a
//! second `make run` on the same directory refuses, naming the first one,
//! and never touches its database.

use std::io::Write;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use pg_private::{ClusterOptions, PrivateCluster, StopMode};
use ws_gateway::config::{Auth, Settings};
use ws_gateway::{Application, db, shutdown_signal};
use ws_gateway_demo as demo;

pub async fn run(data_dir: PathBuf, rate: f64, board_listen: SocketAddr) -> anyhow::Result<()> {
    let mut settings = Settings::from_env_with_defaults(&[("GATEWAY_AUTH", "none")])?;
    let mut lock = None;
    let cluster = if settings.database_url.is_none() {
        lock = Some(DemoLock::take(&data_dir)?);
        ensure_free(settings.listen, "GATEWAY_LISTEN").await?;
        if let Some(admin) = settings.admin_listen {
            ensure_free(admin, "GATEWAY_ADMIN_LISTEN").await?;
        }
        ensure_free(board_listen, "--board-listen").await?;
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
    let pool = db::connect(url.expose(), 4, "ws-gateway demo").await?;
    db::migrate(&pool, &settings.channel).await?;
    demo::load_schema(&pool).await?;

    let settings_url = settings.redacted_database_url();
    // The board's backend mints tokens the way the application's would:
    // it shares the gateway's secret.
    let jwt_secret = match &settings.auth {
        Auth::Jwt(keys) => keys.secrets.first().map(|secret| secret.expose().to_owned()),
        Auth::None => None,
    };
    let board_listener = tokio::net::TcpListener::bind(board_listen)
        .await
        .with_context(|| format!("binding the project board to {board_listen} (--board-listen)"))?;
    let board_address = board_listener.local_addr()?;
    let app = Application::build(settings).await?;
    let address = app.local_addr();
    let admin = app.admin_addr();
    if let Some(lock) = &mut lock {
        lock.describe(&format!("dashboard http://{admin}/"));
    }
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
    let mut out = std::io::stdout();
    let _ = writeln!(
        out,
        "\n  ws-gateway demo is running\n  dashboard:  http://{admin}/\n  \
         board:      http://{board_address}/   (a project board that updates live, through /client.js)\n  \
         websocket:  ws://{address}/ws   (try {{\"type\":\"subscribe\",\"room\":\"project:1\"}})\n  \
         health:     http://{admin}/healthz\n  database:   {}\n  ctrl-c stops it all\n",
        settings_url.as_deref().unwrap_or("(DATABASE_URL)")
    );
    let _ = out.flush();
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
    drop(lock);
    result
}

/// Refuses an address another process listens on before the database is
/// started for nothing.
async fn ensure_free(address: SocketAddr, variable: &str) -> anyhow::Result<()> {
    if address.port() == 0 {
        return Ok(());
    }
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address).map_err(|e| {
        let next = SocketAddr::new(address.ip(), address.port().wrapping_add(1).max(1));
        anyhow!("{variable}={address} is not free ({e}): another gateway or demo listens there; set {variable}={next} or another free address")
    })?;
    Ok(())
}

/// An exclusive lock on `<data dir>.lock`, held while the demo runs; the
/// file says who holds it.
struct DemoLock {
    file: std::fs::File,
}

impl DemoLock {
    fn take(data_dir: &Path) -> anyhow::Result<DemoLock> {
        let path = PathBuf::from(format!("{}.lock", data_dir.display()));
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor this value owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            return Err(anyhow!(
                "another ws-gateway demo is running on {} ({}); its database is left alone. Stop it \
                 first (ctrl-c in its terminal), or run this one beside it with another data directory \
                 and port: ws-gateway demo --data-dir .data/second with GATEWAY_LISTEN=127.0.0.1:8081",
                data_dir.display(),
                if holder.is_empty() { "starting" } else { holder }
            ));
        }
        let mut lock = DemoLock { file };
        lock.describe("starting");
        Ok(lock)
    }

    /// Rewrites what the lock file says about its holder.
    fn describe(&mut self, what: &str) {
        let _ = self.file.set_len(0);
        let text = format!("pid {}, {what}\n", std::process::id());
        let _ = std::os::unix::fs::FileExt::write_at(&self.file, text.as_bytes(), 0);
    }
}

impl Drop for DemoLock {
    fn drop(&mut self) {
        // The lock goes with the descriptor; the file says nobody holds it.
        let _ = self.file.set_len(0);
    }
}
