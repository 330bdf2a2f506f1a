//! What the bench runs against: a database (the one `--db` names, or a private
//! PostgreSQL under /tmp) and a gateway (the one `--gateway` names, or this
//! binary's `serve` started as a separate process, so that its CPU and memory
//! are its own in /proc). Dropping a [`Target`] stops what it started.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use pg_private::{ClusterOptions, PrivateCluster, StopMode};

use super::plan::Source;
use super::procfs;

/// How long a started gateway may take to report its feed live.
const GATEWAY_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stopped gateway may take to drain and exit before it is killed.
const GATEWAY_STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the gateway's log quoted when it fails.
const LOG_TAIL_LINES: usize = 30;

pub struct TargetOptions {
    pub gateway: Option<String>,
    pub gateway_pid: Option<u32>,
    pub db: Option<String>,
    /// Start (or check) a gateway; the floor alone and the writer-cost mode
    /// need only the database.
    pub needs_gateway: bool,
    /// WebSocket clients the gateway must accept.
    pub connections: usize,
    pub channel: String,
    /// The capture source the database is switched to (a gateway the bench
    /// starts runs with it; a --gateway must use it already).
    pub source: Source,
}

/// What serves the clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// `ws-gateway serve`.
    Gateway,
    /// The bench's own minimal fan-out server (`fanout.rs`), started as
    /// `ws-gateway bench --serve-fanout-floor`.
    FanoutFloor,
}

pub struct Target {
    pub db_url: String,
    /// `host:port` of the gateway's HTTP side, when there is a gateway.
    pub gateway_addr: Option<String>,
    /// The gateway's process, when known: started here or `--gateway-pid`.
    pub gateway_pid: Option<u32>,
    /// The postmaster of the private cluster (its CPU is reported too).
    pub postgres_pid: Option<u32>,
    /// One line for the report: what was tested.
    pub description: String,
    gateway: Option<GatewayChild>,
    cluster: Option<PrivateCluster>,
    scratch: PathBuf,
    /// The database half of `description`.
    database: String,
}

struct GatewayChild {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Target {
    pub async fn start(opts: &TargetOptions) -> Result<Target> {
        let scratch = std::env::temp_dir().join(format!(
            "ws-gateway-bench-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        ));
        std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
        let mut target = Target {
            db_url: String::new(),
            gateway_addr: None,
            gateway_pid: opts.gateway_pid,
            postgres_pid: None,
            description: String::new(),
            gateway: None,
            cluster: None,
            scratch,
            database: String::new(),
        };
        let mut parts = Vec::new();
        match &opts.db {
            Some(url) => {
                target.db_url = url.clone();
                parts.push("database from --db".to_owned());
            }
            None => {
                let options = ClusterOptions {
                    fast_unsafe: true,
                    max_connections: 300,
                    ..ClusterOptions::default()
                };
                let cluster = PrivateCluster::start(&target.scratch.join("pg"), options)
                    .await
                    .context("starting a private PostgreSQL for the bench")?;
                target.db_url = cluster.create_database("bench").await?;
                target.postgres_pid = procfs::postmaster_pid(&cluster.dir().join("data"));
                target.cluster = Some(cluster);
                parts.push("private PostgreSQL (fsync off, full_page_writes off, synchronous_commit on)".to_owned());
            }
        }
        target.database = parts.join(" + ");
        if opts.needs_gateway {
            prepare_source(&target.db_url, opts).await?;
            parts.push(format!("source {}", opts.source.as_str()));
            match &opts.gateway {
                Some(url) => {
                    let addr = http_authority(url)?;
                    wait_live(&addr, None, GATEWAY_START_TIMEOUT).await?;
                    target.gateway_addr = Some(addr);
                    parts.push(format!("gateway {url}"));
                }
                None => {
                    let (child, addr) = start_server(Server::Gateway, opts, &target).await?;
                    target.gateway_pid = child.child.id();
                    target.gateway = Some(child);
                    target.gateway_addr = Some(addr);
                    parts.push(format!(
                        "gateway `ws-gateway serve` as pid {}",
                        target.gateway_pid.unwrap_or(0)
                    ));
                }
            }
        }
        target.description = parts.join(" + ");
        Ok(target)
    }

    pub fn ws_url(&self) -> Option<String> {
        self.gateway_addr.as_ref().map(|a| format!("ws://{a}/ws"))
    }

    /// Whether a gateway this bench started has exited.
    pub fn gateway_exited(&mut self) -> Option<String> {
        let gateway = self.gateway.as_mut()?;
        match gateway.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the gateway exited ({status}); its log:\n{}",
                tail(&gateway.log)
            )),
            _ => None,
        }
    }

    /// Stops the server this bench started (if any) and starts `server` in
    /// its place on the same database: a `--fanout-floor` run serves its
    /// clients with the floor first, then with the gateway.
    pub async fn serve_with(&mut self, server: Server, opts: &TargetOptions) -> Result<()> {
        self.stop_gateway().await?;
        prepare_source(&self.db_url, opts).await?;
        let (child, addr) = start_server(server, opts, self).await?;
        self.gateway_pid = child.child.id();
        self.gateway = Some(child);
        self.gateway_addr = Some(addr);
        let what = match server {
            Server::Gateway => "gateway `ws-gateway serve`",
            Server::FanoutFloor => "fan-out floor `ws-gateway bench --serve-fanout-floor`",
        };
        self.description = format!(
            "{} + source {} + {what} as pid {}",
            self.database,
            opts.source.as_str(),
            self.gateway_pid.unwrap_or(0)
        );
        Ok(())
    }

    /// Starts a gateway with GATEWAY_SOURCE=wal and no clients, to lead the
    /// wal source while `--writers-only` measures its writers (the database
    /// is on wal already).
    pub async fn start_wal_leader(&mut self, channel: &str) -> Result<()> {
        let opts = TargetOptions {
            gateway: None,
            gateway_pid: None,
            db: None,
            needs_gateway: true,
            connections: 0,
            channel: channel.to_owned(),
            source: Source::Wal,
        };
        let (child, addr) = start_server(Server::Gateway, &opts, self).await?;
        self.gateway_pid = child.child.id();
        self.gateway = Some(child);
        self.gateway_addr = Some(addr);
        Ok(())
    }

    /// Stops a gateway this bench started: SIGTERM, then SIGKILL after a
    /// timeout.
    pub async fn stop_gateway(&mut self) -> Result<()> {
        let mut outcome = Ok(());
        if let Some(mut gateway) = self.gateway.take() {
            if let Some(pid) = gateway.child.id() {
                // SAFETY: signalling a child we started and have not reaped.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            match tokio::time::timeout(GATEWAY_STOP_TIMEOUT, gateway.child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => {
                    tracing::warn!(%status, log = %tail(&gateway.log), "the gateway exited badly on SIGTERM");
                }
                Ok(Err(e)) => outcome = Err(anyhow!(e).context("waiting for the gateway")),
                Err(_) => {
                    tracing::warn!("the gateway did not stop within {GATEWAY_STOP_TIMEOUT:?}; killing it");
                    let _ = gateway.child.kill().await;
                }
            }
        }
        self.gateway_addr = None;
        self.gateway_pid = None;
        outcome
    }

    /// Stops the gateway and the private PostgreSQL, and removes the
    /// scratch directory.
    pub async fn shutdown(mut self) -> Result<()> {
        let mut outcome = self.stop_gateway().await;
        if let Some(cluster) = self.cluster.take()
            && let Err(e) = cluster.stop(StopMode::Fast).await
        {
            outcome = Err(e.context("stopping the private PostgreSQL"));
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
        outcome
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        // After `shutdown` there is nothing left to do. Before it (an early
        // error), the gateway child is killed (kill_on_drop) and the cluster
        // stopped (its own drop) before their directory goes.
        self.gateway.take();
        self.cluster.take();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// Puts the database on `opts.source` before a gateway starts on it, or,
/// for a running --gateway, checks that it is there.
async fn prepare_source(db_url: &str, opts: &TargetOptions) -> Result<()> {
    let pool = super::table::connect(db_url).await?;
    super::table::ensure_realtime(&pool, &opts.channel).await?;
    let current = ws_gateway::db::source_settings(&pool)
        .await?
        .map(|s| s.source)
        .unwrap_or_default();
    let wanted = opts.source.as_str();
    let outcome = if current == wanted {
        Ok(())
    } else if opts.gateway.is_some() {
        Err(anyhow!(
            "the database's capture source is {current}, not {wanted}: pass --source {current}, or switch it with `ws-gateway source {wanted}` and restart the gateway"
        ))
    } else {
        match opts.source {
            Source::Wal => ws_gateway::switch_to_wal(&pool, None, Duration::from_secs(30))
                .await
                .map(|_| ()),
            Source::Notify => ws_gateway::switch_to_notify(&pool, db_url, Duration::from_secs(30))
                .await
                .map(|_| ()),
        }
        .with_context(|| format!("switching the bench database to --source {wanted}"))
    };
    pool.close().await;
    outcome
}

async fn start_server(server: Server, opts: &TargetOptions, target: &Target) -> Result<(GatewayChild, String)> {
    let exe = std::env::current_exe().context("finding this executable to start the gateway")?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("probing for a free port")?
        .port();
    let addr = format!("127.0.0.1:{port}");
    let log = target.scratch.join("gateway.log");
    let log_file =
        std::fs::File::create(&log).with_context(|| format!("creating the gateway log {}", log.display()))?;
    let mut command = tokio::process::Command::new(&exe);
    if server == Server::FanoutFloor {
        command
            .args([
                "bench",
                "--no-progress",
                "--serve-fanout-floor",
                &addr,
                "--db",
                &target.db_url,
            ])
            .args(["--channel", &opts.channel]);
    } else {
        command.arg("serve");
    }
    let child = command
        .env("DATABASE_URL", &target.db_url)
        .env("GATEWAY_AUTH", "none")
        .env("GATEWAY_LISTEN", &addr)
        .env("GATEWAY_CHANNEL", &opts.channel)
        .env("GATEWAY_SOURCE", opts.source.as_str())
        .env("GATEWAY_MAX_CONNECTIONS", (opts.connections + 100).to_string())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} serve", exe.display()))?;
    let mut gateway = GatewayChild { child, log };
    let started = wait_live(&addr, Some(&mut gateway), GATEWAY_START_TIMEOUT).await;
    match started {
        Ok(()) => Ok((gateway, addr)),
        Err(e) => {
            let log = tail(&gateway.log);
            Err(e.context(format!("the gateway did not come up; its log:\n{log}")))
        }
    }
}

/// Polls `/healthz` until it answers 200 with the feed live.
async fn wait_live(addr: &str, mut child: Option<&mut GatewayChild>, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(child) = child.as_deref_mut()
            && let Ok(Some(status)) = child.child.try_wait()
        {
            bail!("the gateway exited ({status}) while starting");
        }
        let last = match http_get(addr, "/healthz").await {
            Ok((200, body)) => {
                let health: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                if health["feed"]["state"] == "live" {
                    return Ok(());
                }
                format!("feed state {}", health["feed"]["state"])
            }
            Ok((status, body)) => format!("HTTP {status}: {body}"),
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!("gateway at {addr} not live after {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `http://host:port/...`, `ws://host:port` or `host:port` -> `host:port`.
pub fn http_authority(url: &str) -> Result<String> {
    let rest = url.split_once("://").map_or(url, |(scheme, rest)| match scheme {
        "http" | "ws" => rest,
        _ => "",
    });
    let authority = rest.split('/').next().unwrap_or("");
    if authority.is_empty() || !authority.contains(':') {
        bail!("--gateway {url:?}: expected http://host:port (https is not supported)");
    }
    Ok(authority.to_owned())
}

/// GETs `http://{addr}{path}`: the status and the body.
pub(crate) async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client with a timeout")
    });
    let response = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .with_context(|| format!("GET http://{addr}{path}"))?;
    let status = response.status().as_u16();
    let body = response
        .text()
        .await
        .with_context(|| format!("reading GET http://{addr}{path}"))?;
    Ok((status, body))
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_urls_become_authorities() {
        assert_eq!(http_authority("http://127.0.0.1:8080").unwrap(), "127.0.0.1:8080");
        assert_eq!(http_authority("ws://h:1/ws").unwrap(), "h:1");
        assert_eq!(http_authority("localhost:9").unwrap(), "localhost:9");
        assert!(http_authority("https://h:1").is_err());
        assert!(http_authority("http://nohost").is_err());
    }
}
