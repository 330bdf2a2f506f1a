//! pg-private: a private, throwaway PostgreSQL cluster: what `make run`, the
//! integration tests, the fault tests (stop, crash, restart the server) and
//! the bench run against.
//!
//! It drives the stock `initdb` and `pg_ctl` binaries. Layout of `dir`:
//! `data/` (the cluster), `server.log`, and the server's unix socket. A `dir`
//! that already holds a `PG_VERSION` file is taken as the data directory
//! itself. PostgreSQL refuses to run as root, so as root every server command
//! runs as the `postgres` user through `runuser`. Every cluster runs with
//! `wal_level = logical`, so a logical-replication source works on it.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use sqlx::{Connection, PgConnection};

/// Name of the settings file written into the data directory before every
/// start; `postgresql.conf` includes it, so `pg_ctl` needs no `-o` quoting.
const SETTINGS_FILE: &str = "ws_gateway.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'ws_gateway.conf'";
/// Every cluster runs with `wal_level = logical` and this many replication
/// slots and WAL senders, so that a logical-replication capture source
/// (`GATEWAY_SOURCE=wal`) works on any of them, and tests can create slots.
const REPLICATION_SLOTS: u32 = 40;
/// How long `pg_ctl` may wait for a start or a stop.
const PG_CTL_TIMEOUT_S: &str = "60";
/// Attempts at a start on a freshly picked port when another process takes the
/// port between our probe and the server's bind.
const PORT_ATTEMPTS: usize = 8;
/// Lines of `server.log` quoted in errors.
const LOG_TAIL_LINES: usize = 25;
/// `sun_path` is 108 bytes on Linux, including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// How the cluster is started.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// TCP port on 127.0.0.1; `None` picks a free one (and retries on a race).
    pub port: Option<u16>,
    /// `fsync` and `full_page_writes` off: fast, and loses data on an OS
    /// crash (not on a server crash or an immediate stop). For tests only.
    /// `synchronous_commit` stays on: with it off, an immediate stop loses
    /// the last ~200 ms of acknowledged commits, and fault tests that count
    /// lost changes would blame the gateway for the database's loss. With
    /// fsync off, a synchronous commit costs only a write to the page cache.
    pub fast_unsafe: bool,
    /// `max_connections`; the load tests open many pools at once.
    pub max_connections: u32,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            port: None,
            fast_unsafe: false,
            max_connections: 300,
        }
    }
}

/// How `pg_ctl stop` ends the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, exit: a clean shutdown.
    Fast,
    /// Kill everything at once; the next start runs crash recovery. What a
    /// server crash looks like to the gateway (committed data survives).
    Immediate,
}

impl StopMode {
    fn as_pg_ctl_arg(self) -> &'static str {
        match self {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        }
    }
}

/// A running private cluster. Dropping it stops the server (immediate mode)
/// unless [`PrivateCluster::detach`] was called; the directory is left in
/// place, so a later [`PrivateCluster::start`] on it reuses its databases.
#[derive(Debug)]
pub struct PrivateCluster {
    /// The directory given to `start`: log and unix socket live here.
    dir: PathBuf,
    /// The data directory (`dir/data`, or `dir` itself when it was one).
    data_dir: PathBuf,
    log_file: PathBuf,
    bin_dir: PathBuf,
    /// The port stays fixed for the cluster's life so that clients (and the
    /// gateway under test) reconnect to the same URL after a restart.
    port: u16,
    /// Set when we are root: server commands run as this user.
    run_as: Option<PostgresUser>,
    /// Serializes stop/start so concurrent fault injections do not interleave
    /// two `pg_ctl` runs on one data directory.
    lifecycle: tokio::sync::Mutex<()>,
    /// `detach` was called: leave the server running on drop.
    detached: bool,
}

impl PrivateCluster {
    /// Initializes `dir` if needed (trust auth, superuser `postgres`, UTF8)
    /// and starts the server on 127.0.0.1. An existing cluster in `dir` is
    /// reused; a server left running on it by an earlier process is stopped
    /// first, and a stale `postmaster.pid` from a dead one is removed.
    pub async fn start(dir: &Path, opts: ClusterOptions) -> Result<PrivateCluster> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating cluster directory {}", dir.display()))?;
        let mut cluster = PrivateCluster::locate(dir)?;
        if let Some(user) = &cluster.run_as {
            user.chown(&cluster.dir)?;
            user.check_reachable(&cluster.dir).await?;
        }
        if !cluster.data_dir.join("PG_VERSION").exists() {
            cluster.initdb().await?;
        }
        if let Some(pid) = cluster.running_pid() {
            tracing::warn!(
                pid,
                data_dir = %cluster.data_dir.display(),
                "a server from an earlier run still uses this directory; stopping it"
            );
        }
        cluster.stop_server(StopMode::Immediate).await?;
        // From here on, a server this value starts is its to stop.
        cluster.detached = false;

        match opts.port {
            Some(port) => {
                cluster.port = port;
                cluster.write_settings(&opts)?;
                cluster.pg_ctl_start().await?;
            }
            None => {
                let mut attempt = 1;
                loop {
                    cluster.port = free_port()?;
                    cluster.write_settings(&opts)?;
                    match cluster.pg_ctl_start().await {
                        Ok(()) => break,
                        Err(StartError::PortTaken(_)) if attempt < PORT_ATTEMPTS => {
                            tracing::debug!(port = cluster.port, attempt, "port taken, retrying");
                            attempt += 1;
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        tracing::info!(
            port = cluster.port,
            dir = %cluster.dir.display(),
            "private PostgreSQL cluster started"
        );
        Ok(cluster)
    }

    /// The cluster in existing directory `dir`, not started. It is marked
    /// detached until started: dropping it must not stop a server that this
    /// value did not start.
    fn locate(dir: &Path) -> Result<PrivateCluster> {
        let bin_dir = find_bin_dir()?;
        let run_as = if unsafe { libc::geteuid() } == 0 {
            Some(PostgresUser::lookup()?)
        } else {
            None
        };
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving cluster directory {}", dir.display()))?;
        let data_dir = if dir.join("PG_VERSION").exists() {
            dir.clone()
        } else {
            dir.join("data")
        };
        Ok(PrivateCluster {
            log_file: dir.join("server.log"),
            dir,
            data_dir,
            bin_dir,
            port: 0,
            run_as,
            lifecycle: tokio::sync::Mutex::new(()),
            detached: true,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory given to `start`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE`
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/{}",
            self.port,
            percent_encode(database)
        )
    }

    /// Creates database `name` unless it exists already (a reused directory
    /// keeps its databases) and returns its URL.
    pub async fn create_database(&self, name: &str) -> Result<String> {
        if name.is_empty() || name.len() > 63 {
            bail!("database name {name:?} must be 1 to 63 bytes long");
        }
        let mut conn = PgConnection::connect(&self.url("postgres"))
            .await
            .with_context(|| format!("connecting to the private cluster on port {}", self.port))?;
        let exists = sqlx::query("select 1 from pg_database where datname = $1")
            .bind(name)
            .fetch_optional(&mut conn)
            .await
            .context("looking up the database")?
            .is_some();
        if !exists {
            let sql = format!("create database \"{}\"", name.replace('"', "\"\""));
            match sqlx::raw_sql(&sql).execute(&mut conn).await {
                Ok(_) => {}
                // Lost a race with a concurrent create of the same name.
                Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P04") => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("creating database {name:?}"));
                }
            }
        }
        conn.close().await.ok();
        Ok(self.url(name))
    }

    /// Stops the server and waits until it is gone. Stopping a stopped
    /// cluster does nothing.
    pub async fn stop(&self, mode: StopMode) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        self.stop_server(mode).await
    }

    /// Starts the server again on the same port and directory.
    pub async fn start_again(&self) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        self.pg_ctl_start().await.map_err(anyhow::Error::from)
    }

    /// `stop(mode)` then `start_again()`, as one step for concurrent callers.
    pub async fn restart(&self, mode: StopMode) -> Result<()> {
        let _lifecycle = self.lifecycle.lock().await;
        self.stop_server(mode).await?;
        self.pg_ctl_start().await.map_err(anyhow::Error::from)
    }

    /// Leaves the server running after this value is gone (for a command
    /// that starts a cluster for other processes to use).
    pub fn detach(mut self) {
        self.detached = true;
        tracing::info!(
            port = self.port,
            data_dir = %self.data_dir.display(),
            "leaving private PostgreSQL cluster running"
        );
    }

    async fn initdb(&self) -> Result<()> {
        std::fs::create_dir_all(&self.data_dir)
            .with_context(|| format!("creating data directory {}", self.data_dir.display()))?;
        if let Some(user) = &self.run_as {
            user.chown(&self.data_dir)?;
        }
        let output = self
            .server_command("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "--username=postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ])
            .output()
            .await
            .context("running initdb")?;
        if !output.status.success() {
            bail!(
                "initdb {} failed ({}):\n{}{}",
                self.data_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        Ok(())
    }

    /// Writes the server settings for this start, and makes sure
    /// `postgresql.conf` includes them (once).
    fn write_settings(&self, opts: &ClusterOptions) -> Result<()> {
        let conf = self.data_dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
        if !text.lines().any(|line| line.trim() == INCLUDE_LINE) {
            let mut text = text;
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(INCLUDE_LINE);
            text.push('\n');
            std::fs::write(&conf, text).with_context(|| format!("writing {}", conf.display()))?;
        }

        // A socket path over the kernel's limit makes the server refuse to
        // start; everything here connects over TCP, so go without one.
        let socket = self.dir.join(format!(".s.PGSQL.{}", self.port));
        let socket_dir = if socket.as_os_str().len() <= MAX_SOCKET_PATH {
            self.dir.to_string_lossy().into_owned()
        } else {
            tracing::debug!(dir = %self.dir.display(), "path too long for a unix socket, TCP only");
            String::new()
        };
        let durability = if opts.fast_unsafe { "off" } else { "on" };
        let settings = format!(
            "# Written by ws-gateway's PrivateCluster before every start.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             max_connections = {max_connections}\n\
             unix_socket_directories = '{socket_dir}'\n\
             fsync = {durability}\n\
             synchronous_commit = on\n\
             full_page_writes = {durability}\n\
             wal_level = logical\n\
             max_replication_slots = {REPLICATION_SLOTS}\n\
             max_wal_senders = {REPLICATION_SLOTS}\n",
            port = self.port,
            max_connections = opts.max_connections,
            socket_dir = socket_dir.replace('\'', "''"),
        );
        let path = self.data_dir.join(SETTINGS_FILE);
        std::fs::write(&path, settings).with_context(|| format!("writing {}", path.display()))?;
        if let Some(user) = &self.run_as {
            user.chown(&path)?;
        }
        Ok(())
    }

    async fn pg_ctl_start(&self) -> Result<(), StartError> {
        let log_offset = std::fs::metadata(&self.log_file).map_or(0, |m| m.len());
        let output = self
            .server_command("pg_ctl")
            .arg("start")
            .arg("-w")
            .args(["-t", PG_CTL_TIMEOUT_S])
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .output()
            .await
            .context("running pg_ctl start")?;
        if output.status.success() {
            return Ok(());
        }
        let new_log = read_from(&self.log_file, log_offset);
        let error = anyhow!(
            "starting PostgreSQL on 127.0.0.1:{} in {} failed ({}): {}{}\n--- tail of {} ---\n{}",
            self.port,
            self.data_dir.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            self.log_file.display(),
            tail_lines(&new_log, LOG_TAIL_LINES),
        );
        if new_log.contains("Address already in use") {
            Err(StartError::PortTaken(error))
        } else {
            Err(StartError::Other(error))
        }
    }

    async fn pg_ctl_stop(&self, mode: StopMode) -> Result<()> {
        let output = self
            .server_command("pg_ctl")
            .arg("stop")
            .arg("-w")
            .args(["-t", PG_CTL_TIMEOUT_S])
            .args(["-m", mode.as_pg_ctl_arg()])
            .arg("-D")
            .arg(&self.data_dir)
            .output()
            .await
            .context("running pg_ctl stop")?;
        if !output.status.success() {
            bail!(
                "stopping PostgreSQL in {} ({mode:?}) failed ({}): {}{}\n--- tail of {} ---\n{}",
                self.data_dir.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr),
                self.log_file.display(),
                self.log_tail(),
            );
        }
        Ok(())
    }

    /// The pid of the server running on our data directory, if one does.
    /// The pid in `postmaster.pid` counts only while that process is alive
    /// and sits in our data directory: after a kill -9 or a reboot the pid
    /// may be dead or reused by an unrelated process.
    fn running_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("postmaster.pid")).ok()?;
        let pid = text.lines().next()?.trim().parse::<i32>().ok()?;
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
        (pid > 0 && cwd == self.data_dir).then_some(pid)
    }

    /// Stops the server running on the data directory, if any, and removes
    /// a stale `postmaster.pid`: the server refuses to start over one whose
    /// pid is alive, and `pg_ctl stop` fails on one whose pid is dead.
    async fn stop_server(&self, mode: StopMode) -> Result<()> {
        if self.running_pid().is_some() {
            return self.pg_ctl_stop(mode).await;
        }
        let pid_file = self.data_dir.join("postmaster.pid");
        match std::fs::remove_file(&pid_file) {
            Ok(()) => {
                tracing::debug!(file = %pid_file.display(), "removed stale postmaster.pid");
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing stale {}", pid_file.display())),
        }
    }

    /// A command running `program` from the PostgreSQL bin directory, as the
    /// `postgres` user when we are root, from a directory it can enter.
    fn server_command(&self, program: &str) -> tokio::process::Command {
        let program = self.bin_dir.join(program);
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = tokio::process::Command::new("runuser");
                command.arg("-u").arg(&user.name).arg("--").arg(program);
                command
            }
            None => tokio::process::Command::new(program),
        };
        command.current_dir(&self.dir);
        command.stdin(std::process::Stdio::null());
        command
    }

    fn log_tail(&self) -> String {
        tail_lines(&read_from(&self.log_file, 0), LOG_TAIL_LINES)
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        if self.detached || self.running_pid().is_none() {
            return;
        }
        let program = self.bin_dir.join("pg_ctl");
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = std::process::Command::new("runuser");
                command.arg("-u").arg(&user.name).arg("--").arg(program);
                command
            }
            None => std::process::Command::new(program),
        };
        let result = command
            .args(["stop", "-w", "-t", PG_CTL_TIMEOUT_S, "-m", "immediate", "-D"])
            .arg(&self.data_dir)
            .current_dir(&self.dir)
            .stdin(std::process::Stdio::null())
            .output();
        match result {
            Ok(output) if output.status.success() => {}
            Ok(output) => tracing::warn!(
                status = %output.status,
                stderr = %String::from_utf8_lossy(&output.stderr),
                "stopping private PostgreSQL cluster on drop failed"
            ),
            Err(e) => tracing::warn!(error = %e, "running pg_ctl stop on drop failed"),
        }
    }
}

/// Why a start failed: a taken port is worth another try on another port.
#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("{0:#}")]
    PortTaken(anyhow::Error),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// The account the server runs as when we are root.
#[derive(Debug, Clone)]
struct PostgresUser {
    name: OsString,
    uid: u32,
    gid: u32,
}

impl PostgresUser {
    fn lookup() -> Result<PostgresUser> {
        let name = CString::new("postgres").expect("no NUL");
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut buf = vec![0 as libc::c_char; 16 * 1024];
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer refers to live, correctly sized storage.
        let rc = unsafe { libc::getpwnam_r(name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
        if rc != 0 || found.is_null() {
            bail!(
                "running as root, PostgreSQL must run as the \"postgres\" user, \
                 and there is no such user (create it, or run as a non-root user)"
            );
        }
        // SAFETY: on success pw_name points at a NUL-terminated string in buf.
        let name = unsafe { CStr::from_ptr(pwd.pw_name) };
        Ok(PostgresUser {
            name: OsStr::new(name.to_str().context("postgres user name is not UTF-8")?).into(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        })
    }

    fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid))
            .with_context(|| format!("giving {} to the postgres user", path.display()))
    }

    /// The server (running as this user) must enter `dir` and every parent.
    async fn check_reachable(&self, dir: &Path) -> Result<()> {
        if self.can_enter(dir).await? {
            return Ok(());
        }
        for ancestor in dir.ancestors().collect::<Vec<_>>().into_iter().rev() {
            if !self.can_enter(ancestor).await? {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(ancestor).map_or(0, |m| m.permissions().mode());
                bail!(
                    "the postgres user cannot reach the cluster directory {}: {} (mode {:o}) \
                     is not searchable by it; use a directory under {} or `chmod o+x {}`",
                    dir.display(),
                    ancestor.display(),
                    mode & 0o7777,
                    std::env::temp_dir().display(),
                    ancestor.display(),
                );
            }
        }
        bail!("the postgres user cannot enter the cluster directory {}", dir.display())
    }

    async fn can_enter(&self, dir: &Path) -> Result<bool> {
        let status = tokio::process::Command::new("runuser")
            .arg("-u")
            .arg(&self.name)
            .args(["--", "test", "-x"])
            .arg(dir)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .context("running runuser (to act as the postgres user)")?;
        Ok(status.success())
    }
}

/// Stops the server running in cluster directory `dir` (one left running by
/// [`PrivateCluster::detach`], say) and waits until it is gone. Does nothing
/// when no server runs there; removes a stale `postmaster.pid`.
pub async fn stop_dir(dir: &Path, mode: StopMode) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    PrivateCluster::locate(dir)?.stop_server(mode).await
}

/// `PG_BIN`, else the highest `/usr/lib/postgresql/*/bin`, else
/// `pg_config --bindir`.
fn find_bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN").filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        if !dir.join("pg_ctl").exists() {
            bail!("PG_BIN={} holds no pg_ctl", dir.display());
        }
        return Ok(dir);
    }
    let highest = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<f64>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("pg_ctl").exists().then_some((version, bin))
        })
        .max_by(|a, b| a.0.total_cmp(&b.0));
    if let Some((_, bin)) = highest {
        return Ok(bin);
    }
    if let Ok(output) = std::process::Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && dir.join("pg_ctl").exists() {
            return Ok(dir);
        }
    }
    bail!(
        "no PostgreSQL server binaries found: set PG_BIN to the directory holding \
         pg_ctl and initdb, or install PostgreSQL (e.g. apt-get install postgresql)"
    )
}

/// A port nobody listens on right now. Another process may take it before the
/// server binds it; `start` retries on that.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("probing for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The file from byte `offset` on, or "" if it cannot be read.
fn read_from(path: &Path, offset: u64) -> String {
    let mut text = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file
            .seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_to_end(&mut text));
    }
    String::from_utf8_lossy(&text).into_owned()
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A unique directory under the system temp dir (which the postgres user
/// can always reach), removed on drop: for tests that start a cluster.
/// Declare it before the cluster so the cluster is dropped (stopped) first.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let path = std::env::temp_dir().join(format!("ws-gateway-{label}-{}-{nanos}", std::process::id()));
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    async fn count_tasks(url: &str) -> Result<i64> {
        let mut conn = PgConnection::connect(url).await?;
        let (n,): (i64,) = sqlx::query_as("select count(*) from t").fetch_one(&mut conn).await?;
        conn.close().await.ok();
        Ok(n)
    }

    /// Retries `f` until it succeeds or the deadline passes.
    async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let until = Instant::now() + deadline;
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) if Instant::now() >= until => panic!("{what}: {e:#}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    #[tokio::test]
    async fn starts_restarts_and_stops() {
        let dir = TempDir::new("embedded");
        let opts = ClusterOptions {
            fast_unsafe: true,
            ..ClusterOptions::default()
        };
        let cluster = PrivateCluster::start(&dir.0, opts).await.unwrap();
        assert_ne!(cluster.port(), 0);
        assert!(dir.0.join("server.log").exists());

        let url = cluster.create_database("embedded test").await.unwrap();
        assert_eq!(url, cluster.url("embedded test"));
        assert!(url.ends_with("/embedded%20test"));
        // Idempotent.
        assert_eq!(cluster.create_database("embedded test").await.unwrap(), url);

        let mut conn = PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql("create table t (id int); insert into t values (1)")
            .execute(&mut conn)
            .await
            .unwrap();
        let (max_connections,): (String,) = sqlx::query_as("show max_connections")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(max_connections, "300");
        let (fsync,): (String,) = sqlx::query_as("show fsync").fetch_one(&mut conn).await.unwrap();
        assert_eq!(fsync, "off");
        for (setting, expected) in [
            ("wal_level", "logical"),
            ("max_replication_slots", "40"),
            ("max_wal_senders", "40"),
        ] {
            let (value,): (String,) = sqlx::query_as(&format!("show {setting}"))
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(value, expected, "{setting}");
        }

        conn.close().await.unwrap();
        let mut expected = 1;
        for mode in [StopMode::Fast, StopMode::Immediate] {
            // A commit acknowledged just before the stop survives it, even an
            // immediate one (a crash, to the server) with fast_unsafe.
            let mut conn = PgConnection::connect(&url).await.unwrap();
            sqlx::query("insert into t values (2)")
                .execute(&mut conn)
                .await
                .unwrap();
            expected += 1;
            cluster.restart(mode).await.unwrap();
            // The old connection is dead; the data survived, on the same URL.
            assert!(sqlx::query("select 1").execute(&mut conn).await.is_err());
            let n = eventually("reconnect after restart", Duration::from_secs(10), || count_tasks(&url)).await;
            assert_eq!(n, expected, "after {mode:?} restart");
        }

        cluster.stop(StopMode::Fast).await.unwrap();
        assert!(PgConnection::connect(&url).await.is_err());
        // Stopping twice is harmless.
        cluster.stop(StopMode::Immediate).await.unwrap();
        cluster.start_again().await.unwrap();
        assert_eq!(count_tasks(&url).await.unwrap(), 3);

        // A second start on the same directory reuses the cluster, taking
        // over from the server still running there.
        let port = cluster.port();
        cluster.detach();
        let again = PrivateCluster::start(&dir.0, ClusterOptions::default()).await.unwrap();
        assert_ne!(again.port(), 0);
        let url = again.url("embedded test");
        assert_eq!(count_tasks(&url).await.unwrap(), 3);
        let old = format!("postgres://postgres@127.0.0.1:{port}/postgres");
        assert!(PgConnection::connect(&old).await.is_err() || port == again.port());

        // A detached server is stopped through its directory.
        again.detach();
        assert_eq!(count_tasks(&url).await.unwrap(), 3);
        stop_dir(&dir.0, StopMode::Fast).await.unwrap();
        assert!(!dir.0.join("data/postmaster.pid").exists());
        assert!(PgConnection::connect(&url).await.is_err());
        stop_dir(&dir.0, StopMode::Fast).await.unwrap();

        // Dropping stops the server.
        let third = PrivateCluster::start(&dir.0, ClusterOptions::default()).await.unwrap();
        let url = third.url("embedded test");
        assert_eq!(count_tasks(&url).await.unwrap(), 3);
        drop(third);
        assert!(!dir.0.join("data/postmaster.pid").exists());
        assert!(PgConnection::connect(&url).await.is_err());
    }

    #[tokio::test]
    async fn removes_a_stale_pid_file() {
        let dir = TempDir::new("embedded-stale");
        let cluster = PrivateCluster::start(&dir.0, ClusterOptions::default()).await.unwrap();
        cluster.stop(StopMode::Immediate).await.unwrap();
        drop(cluster);
        // A dead run's lock file: a pid that is certainly not a postmaster.
        let pid_file = dir.0.join("data/postmaster.pid");
        std::fs::write(&pid_file, format!("{}\n{}\n", i32::MAX, dir.0.display())).unwrap();
        let cluster = PrivateCluster::start(&dir.0, ClusterOptions::default()).await.unwrap();
        let url = cluster.create_database("after_stale").await.unwrap();
        PgConnection::connect(&url).await.unwrap();
    }

    /// Processes whose working directory is `dir`: a postmaster and its
    /// children all sit in the data directory.
    fn processes_in(dir: &Path) -> Vec<i32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|c| c == dir))
            .collect()
    }

    #[tokio::test]
    async fn recovers_from_a_killed_postmaster() {
        let dir = TempDir::new("embedded-killed");
        let cluster = PrivateCluster::start(&dir.0, ClusterOptions::default()).await.unwrap();
        let url = cluster.create_database("killed").await.unwrap();
        let data_dir = dir.0.canonicalize().unwrap().join("data");
        let pid = cluster.running_pid().expect("server runs");
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        // Its children notice the postmaster is gone and exit; until they
        // have, they hold its shared memory and a new server would refuse.
        // Until init reaps the postmaster, its zombie keeps its pid alive
        // and the server would take the socket lock file as still held.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !processes_in(&data_dir).is_empty() || unsafe { libc::kill(pid, 0) } == 0 {
            assert!(Instant::now() < deadline, "server processes linger");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(data_dir.join("postmaster.pid").exists());
        // The lock file of a dead server is stale: stop succeeds.
        cluster.stop(StopMode::Fast).await.unwrap();
        assert!(!data_dir.join("postmaster.pid").exists());
        cluster.start_again().await.unwrap();
        PgConnection::connect(&url).await.unwrap();
    }

    #[tokio::test]
    async fn a_taken_port_is_an_error_with_the_log() {
        let dir = TempDir::new("embedded-port");
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let opts = ClusterOptions {
            port: Some(taken.local_addr().unwrap().port()),
            ..ClusterOptions::default()
        };
        let error = PrivateCluster::start(&dir.0, opts).await.unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("Address already in use"), "{message}");
    }

    #[tokio::test]
    async fn an_unreachable_directory_is_a_clear_error() {
        if unsafe { libc::geteuid() } != 0 {
            return; // Only root runs the server as another user.
        }
        use std::os::unix::fs::PermissionsExt;
        let parent = TempDir::new("embedded-private");
        std::fs::create_dir_all(&parent.0).unwrap();
        std::fs::set_permissions(&parent.0, std::fs::Permissions::from_mode(0o700)).unwrap();
        let error = PrivateCluster::start(&parent.0.join("cluster"), ClusterOptions::default())
            .await
            .unwrap_err();
        let message = format!("{error:#}");
        assert!(message.contains("not searchable"), "{message}");
        assert!(message.contains(&*parent.0.to_string_lossy()), "{message}");
    }

    #[test]
    fn encodes_database_names() {
        assert_eq!(percent_encode("ws_gateway-1"), "ws_gateway-1");
        assert_eq!(percent_encode("a b/c"), "a%20b%2Fc");
    }
}
