//! The test harness: a real PostgreSQL (the one `make test` starts, named by
//! TEST_DATABASE_URL or DATABASE_URL, else a private cluster per test
//! process), a fresh database per test, the real gateway on port 0, and
//! tokio-tungstenite clients.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pg_private::{ClusterOptions, PrivateCluster};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use ws_gateway::Application;
use ws_gateway::config::{CaptureSource, Settings};

/// How long any awaited condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

static CLUSTER: OnceCell<PrivateCluster> = OnceCell::const_new();
static DATABASES: AtomicU32 = AtomicU32::new(0);

/// A directory for test clusters. Under the system temp dir, not the
/// checkout: the `postgres` user must be able to reach it, and a checkout
/// under /root would not be.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir()
        .join("ws-gateway-tests")
        .join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// The admin URL of a server where tests may create databases.
async fn server_url() -> String {
    for var in ["TEST_DATABASE_URL", "DATABASE_URL"] {
        if let Ok(url) = std::env::var(var)
            && !url.is_empty()
        {
            return url;
        }
    }
    let cluster = CLUSTER
        .get_or_init(|| async {
            let options = ClusterOptions {
                fast_unsafe: true,
                ..ClusterOptions::default()
            };
            let cluster = PrivateCluster::start(&scratch_dir("shared"), options)
                .await
                .expect("starting a private PostgreSQL for the tests");
            // A static is never dropped: stop the server when the process exits.
            unsafe { libc::atexit(stop_shared_cluster) };
            cluster
        })
        .await;
    cluster.url("postgres")
}

extern "C" fn stop_shared_cluster() {
    if let Some(cluster) = CLUSTER.get()
        && let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build()
    {
        let _ = runtime.block_on(pg_private::stop_dir(cluster.dir(), pg_private::StopMode::Immediate));
        // Its files too: run without TEST_DATABASE_URL, every test process
        // has a cluster of its own (~40 MB), and they piled up in /tmp.
        let _ = std::fs::remove_dir_all(cluster.dir());
    }
}

/// The `ws-gateway` binary, for the tests that need the daemon as a process
/// (configuration refusals at start, signals, a killed gateway). It belongs
/// to the CLI package (`crates/cli`), so cargo does not build it for this
/// package's tests: `make test` builds the whole workspace first. A missing
/// binary, or one older than the sources it is built from, fails the test
/// with the command that fixes it, rather than testing old code.
pub fn gateway_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(locate_gateway_binary).clone()
}

fn locate_gateway_binary() -> PathBuf {
    // This test runs as target/<profile>/deps/api-<hash>; the binary is
    // target/<profile>/ws-gateway.
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test runs from target/<profile>/deps");
    let binary = profile_dir.join("ws-gateway");
    let rebuild = "cargo build --workspace --bins (make test does)";
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| panic!("{} is missing: {rebuild}", binary.display()));
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    if let Some(newer) = newer_source(&workspace, built) {
        panic!("{} is older than {}: {rebuild}", binary.display(), newer.display());
    }
    binary
}

/// A file the binary is built from that changed after `built`.
fn newer_source(workspace: &std::path::Path, built: std::time::SystemTime) -> Option<PathBuf> {
    fn walk(path: &std::path::Path, built: std::time::SystemTime) -> Option<PathBuf> {
        let meta = std::fs::metadata(path).ok()?;
        if meta.is_dir() {
            let entries = std::fs::read_dir(path).ok()?;
            return entries.flatten().find_map(|e| walk(&e.path(), built));
        }
        (meta.modified().ok()? > built).then(|| path.to_owned())
    }
    // The binary embeds the JavaScript client (`GET /client.js`).
    let mut roots = vec![
        workspace.join("Cargo.lock"),
        workspace.join("Cargo.toml"),
        workspace.join("clients/js/client.js"),
    ];
    for entry in std::fs::read_dir(workspace.join("crates")).ok()?.flatten() {
        let krate = entry.path();
        for part in ["src", "migrations", "Cargo.toml", "constructtrack.sql"] {
            roots.push(krate.join(part));
        }
    }
    roots.iter().find_map(|root| walk(root, built))
}

/// A fresh database with the `realtime` schema and the demo ConstructTrack
/// schema (its tables tracked), plus `items`, a small table tracked into
/// `project:{project_id}` and `item:{id}`, and `markers`, tracked into the
/// room `markers` (see [`Client::barrier`]).
pub struct TestDb {
    pub url: String,
    pub pool: PgPool,
    /// The database's capture source.
    pub source: CaptureSource,
    /// The replication slot of a database switched to wal: dropped with it,
    /// so that the shared test server does not run out of slots nor keep
    /// WAL for it.
    slot: Option<String>,
}

impl TestDb {
    /// The same database for a second instance; the slot stays with `self`.
    pub fn shared(&self) -> TestDb {
        TestDb {
            url: self.url.clone(),
            pool: self.pool.clone(),
            source: self.source,
            slot: None,
        }
    }

    /// The same database reached at `url` (another role, say); the slot
    /// stays with `self`.
    pub fn at_url(&self, url: String) -> TestDb {
        TestDb {
            url,
            pool: self.pool.clone(),
            source: self.source,
            slot: None,
        }
    }

    /// Switches the database to `source` (`ws-gateway source`'s library call).
    pub async fn switch_to(&mut self, source: CaptureSource) {
        self.try_switch_to(source)
            .await
            .unwrap_or_else(|e| panic!("switching the test database to {source:?}: {e:#}"));
    }

    /// [`TestDb::switch_to`], returning the switch's outcome or its refusal.
    pub async fn try_switch_to(&mut self, source: CaptureSource) -> anyhow::Result<ws_gateway::SwitchOutcome> {
        let outcome = match source {
            CaptureSource::Wal => {
                let outcome = ws_gateway::switch_to_wal(&self.pool, None, DEADLINE).await?;
                self.slot = outcome.slot.clone().or(self.slot.take());
                outcome
            }
            CaptureSource::Notify => ws_gateway::switch_to_notify(&self.pool, &self.url, DEADLINE).await?,
        };
        self.source = source;
        Ok(outcome)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        // Blocking on purpose: the test's runtime cannot run the gateway's
        // tasks meanwhile, so no leader recreates the slot.
        let url = self.url.clone();
        let _ = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            runtime.block_on(async {
                use sqlx::Connection;
                let Ok(Ok(mut conn)) =
                    tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(&url)).await
                else {
                    return;
                };
                for _ in 0..50 {
                    let _ = sqlx::query(
                        "select pg_terminate_backend(active_pid) from pg_replication_slots \
                         where slot_name = $1 and active_pid is not null",
                    )
                    .bind(&slot)
                    .execute(&mut conn)
                    .await;
                    let _ = sqlx::query(
                        "select pg_drop_replication_slot(slot_name) from pg_replication_slots \
                         where slot_name = $1 and active_pid is null",
                    )
                    .bind(&slot)
                    .execute(&mut conn)
                    .await;
                    let gone = sqlx::query_scalar::<_, bool>(
                        "select not exists (select 1 from pg_replication_slots where slot_name = $1)",
                    )
                    .bind(&slot)
                    .fetch_one(&mut conn)
                    .await;
                    if matches!(gone, Ok(true)) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        })
        .join();
    }
}

/// Creates a database of a name unique to this run (`prefix` first) on the
/// test server: its URL.
async fn create_database(server: &str, prefix: &str) -> String {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(server)
        .await
        .expect("connecting to the test server");
    let name = format!(
        "{prefix}{}_{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_micros()
    );
    sqlx::query(&format!("create database {name}"))
        .execute(&admin)
        .await
        .expect("create database");
    admin.close().await;
    replace_database(server, &name)
}

pub async fn fresh_database_on(server: &str) -> TestDb {
    let url = create_database(server, "t").await;
    let pool = PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .expect("connecting to the test database");
    ws_gateway::db::migrate(&pool, "realtime_changes")
        .await
        .expect("migrate");
    ws_gateway_demo::load_schema(&pool).await.expect("demo schema");
    sqlx::raw_sql(
        "create table items (id bigint primary key, project_id int, body text not null default '');
         select realtime.track('public.items', array['project:{project_id}', 'item:{id}']);
         create table markers (id bigserial primary key, note text);
         select realtime.track('public.markers', array['markers']);",
    )
    .execute(&pool)
    .await
    .expect("test tables");
    TestDb {
        url,
        pool,
        source: CaptureSource::Notify,
        slot: None,
    }
}

pub async fn fresh_database() -> TestDb {
    fresh_database_on(&server_url().await).await
}

/// [`fresh_database`], capturing with `source`.
pub async fn fresh_database_for(source: CaptureSource) -> TestDb {
    let mut db = fresh_database().await;
    if source == CaptureSource::Wal {
        db.switch_to(source).await;
    }
    db
}

/// [`spawn_app`], capturing with `source`.
pub async fn spawn_app_for(source: CaptureSource) -> TestApp {
    let db = fresh_database_for(source).await;
    spawn_app_with(db, |_| {}).await
}

/// Runs an async test once per capture source: `for_each_source!(async fn
/// name(source) { ... })` becomes the tests `name::notify` and `name::wal`.
#[macro_export]
macro_rules! for_each_source {
    ($(#[$meta:meta])* async fn $name:ident($source:ident) $body:block) => {
        $(#[$meta])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn run($source: ws_gateway::config::CaptureSource) $body

            #[tokio::test]
            async fn notify() {
                run(ws_gateway::config::CaptureSource::Notify).await
            }

            #[tokio::test]
            async fn wal() {
                run(ws_gateway::config::CaptureSource::Wal).await
            }
        }
    };
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

/// A database on the test server with nothing in it (no realtime schema):
/// what an operator's first `migrate` meets. Its URL and a pool.
pub async fn empty_database() -> (String, PgPool) {
    let url = create_database(&server_url().await, "e").await;
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("connecting to the empty database");
    (url, pool)
}

/// `url` pointing at `database` instead.
pub fn with_database(url: &str, database: &str) -> String {
    replace_database(url, database)
}

/// The real gateway, in this process, on an ephemeral port.
pub struct TestApp {
    pub address: std::net::SocketAddr,
    /// Where the admin endpoints are: `address` unless the settings gave
    /// them a port of their own.
    pub admin: std::net::SocketAddr,
    pub db: TestDb,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// The running gateway's shared state (reloads go through it).
    pub state: std::sync::Arc<ws_gateway::AppState>,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(fresh_database().await, |_| {}).await
}

pub async fn spawn_app_with(db: TestDb, configure: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = Settings::for_tests();
    settings.database_url = Some(db.url.clone().into());
    settings.source = db.source;
    configure(&mut settings);
    let app = Application::build(settings).await.expect("building the gateway");
    let address = app.local_addr();
    let admin = app.admin_addr();
    let shutdown = app.shutdown_token();
    let state = app.state();
    let task = tokio::spawn(app.run_until_stopped());
    let test_app = TestApp {
        address,
        admin,
        db,
        shutdown,
        task,
        state,
    };
    test_app.wait_for_feed("live").await;
    test_app
}

impl TestApp {
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.address)
    }

    pub async fn health(&self) -> (u16, Value) {
        http_get_json(self.admin, "/healthz").await
    }

    /// Waits until every change committed so far has reached this gateway's
    /// feed (in wal mode a change reaches the outbox a moment after its
    /// commit): a marker is committed and awaited at the feed's position.
    pub async fn settle(&self) {
        let marker = format!("settle-{}", DATABASES.fetch_add(1, Ordering::Relaxed));
        barrier(&self.db.pool, &marker).await;
        eventually("the feed to reach the last commit", || async {
            let position: Option<i64> = sqlx::query_scalar(
                "select position from realtime.changes where table_name = 'markers' and row->>'note' = $1",
            )
            .bind(&marker)
            .fetch_optional(&self.db.pool)
            .await
            .unwrap();
            let (_, health) = self.health().await;
            let fed: i64 = health["feed"]["position"].as_str()?.parse().ok()?;
            position.filter(|p| fed >= *p).map(|_| ())
        })
        .await
    }

    pub async fn wait_for_feed(&self, state: &str) {
        eventually("feed state", || async {
            let (_, health) = self.health().await;
            (health["feed"]["state"] == state).then_some(())
        })
        .await
    }

    pub async fn connect(&self) -> Client {
        Client::connect(&self.ws_url()).await
    }

    /// Stops the gateway and waits for it to finish.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("gateway stops in time")
            .expect("gateway task joins")
    }
}

/// Polls `check` until it returns Some, or fails the test at the deadline.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one series in a Prometheus text exposition: the sample
/// whose name and labels are written exactly as `series` (`ws_gateway_rooms`,
/// `ws_gateway_closes_total{reason="protocol_error"}`); None when absent.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            if name == series { value.parse().ok() } else { None }
        })
}

/// `series` in the `/metrics` served at `address`; 0 when it is not there
/// (a labelled counter appears with its first increment).
pub async fn metric(address: std::net::SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(address, "/metrics").await;
    sample(&text, series).unwrap_or(0.0)
}

/// GETs `path` from the gateway at `address`: the status and the body.
pub async fn http_get(address: std::net::SocketAddr, path: &str) -> (u16, String) {
    // No idle connections: a pooled one would belong to the runtime of the
    // test that opened it, and tests sharing a process each have their own.
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .timeout(DEADLINE)
            .pool_max_idle_per_host(0)
            .build()
            .expect("an HTTP client")
    });
    let response = client
        .get(format!("http://{address}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let status = response.status().as_u16();
    let body = response.text().await.expect("a readable body");
    (status, body)
}

pub async fn http_get_json(address: std::net::SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = http_get(address, path).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A WebSocket client speaking the gateway's protocol.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
}

/// What a client saw of its connection's end.
#[derive(Debug)]
pub struct Closed {
    pub code: Option<u16>,
    pub reason: String,
}

impl Client {
    pub async fn connect(url: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("WebSocket connect");
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        client.welcome = client.next_json().await;
        assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
        client
    }

    /// A client whose socket buffers almost nothing: when it stops reading,
    /// the gateway's queue for it fills quickly.
    pub async fn connect_with_small_buffer(url: &str) -> Client {
        let address = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .parse::<std::net::SocketAddr>()
            .unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let stream = socket.connect(address).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(url, MaybeTlsStream::Plain(stream))
            .await
            .expect("WebSocket handshake");
        let mut client = Client {
            ws,
            welcome: Value::Null,
        };
        client.welcome = client.next_json().await;
        client
    }

    /// The ids (`key.id`) of the next `count` changes, found without parsing
    /// whole messages: for tests that move many large rows.
    pub async fn change_ids(&mut self, count: usize) -> Vec<i64> {
        const KEY: &str = "\"key\":";
        let mut ids = Vec::with_capacity(count);
        while ids.len() < count {
            let Message::Text(text) = self.next_frame().await else {
                panic!("expected text")
            };
            for (at, _) in text.match_indices(KEY) {
                let digits: String = text[at + KEY.len()..]
                    .chars()
                    .skip_while(|c| !c.is_ascii_digit())
                    .take_while(|c| c.is_ascii_digit())
                    .collect();
                ids.push(digits.parse().unwrap());
            }
        }
        ids
    }

    pub async fn send_json(&mut self, value: Value) {
        self.send_text(&value.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send");
    }

    /// The next protocol message (text frame), within the deadline.
    pub async fn next_json(&mut self) -> Value {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a message within the deadline")
                .expect("connection open")
                .expect("readable");
            match message {
                Message::Text(text) => return serde_json::from_str(&text).expect("JSON"),
                Message::Close(frame) => panic!("connection closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next text or binary frame, as it came.
    pub async fn next_frame(&mut self) -> Message {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("a frame within the deadline")
                .expect("connection open")
                .expect("readable");
            match message {
                Message::Text(_) | Message::Binary(_) => return message,
                Message::Close(frame) => panic!("connection closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// Reads until the server closes the connection; returns its close frame.
    pub async fn closed(&mut self) -> Closed {
        loop {
            let message = tokio::time::timeout(DEADLINE, self.ws.next())
                .await
                .expect("close within the deadline");
            match message {
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|CloseFrame { code, reason }| (Some(u16::from(code)), reason.to_string()))
                        .unwrap_or((None, String::new()));
                    return Closed { code, reason };
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => {
                    return Closed {
                        code: None,
                        reason: String::new(),
                    };
                }
            }
        }
    }

    /// Subscribes and waits for `subscribed`; returns its position.
    pub async fn subscribe(&mut self, room: &str) -> String {
        self.subscribe_since(room, None).await
    }

    pub async fn subscribe_since(&mut self, room: &str, since: Option<&str>) -> String {
        let mut message = json!({"type": "subscribe", "room": room});
        if let Some(since) = since {
            message["since"] = json!(since);
        }
        self.send_json(message).await;
        let reply = self.next_json().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        assert_eq!(reply["room"], room);
        reply["position"].as_str().expect("position").to_owned()
    }

    /// The next `count` changes (batches unpacked).
    pub async fn changes(&mut self, count: usize) -> Vec<Value> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let message = self.next_json().await;
            match message["type"].as_str() {
                Some("change") => out.push(message),
                Some("batch") => out.extend(message["changes"].as_array().unwrap().iter().cloned()),
                _ => panic!("expected a change, got {message}"),
            }
        }
        out
    }

    /// Every change up to the next marker change (see [`barrier`]): the
    /// gateway delivers in commit order, so once the marker is here anything
    /// committed before it has arrived too. The client must be subscribed
    /// to `markers`.
    pub async fn changes_until_marker(&mut self, marker: &str) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let message = self.next_json().await;
            let changes = match message["type"].as_str() {
                Some("change") => vec![message],
                Some("batch") => message["changes"].as_array().unwrap().clone(),
                _ => panic!("expected a change, got {message}"),
            };
            for change in changes {
                if change["table"] == "markers" && change["row"]["note"] == marker {
                    return out;
                }
                out.push(change);
            }
        }
    }
}

/// Inserts a project (the demo schema's tracked table) named `name`;
/// returns its id.
pub async fn insert_project(pool: &PgPool, name: &str) -> i64 {
    sqlx::query_scalar(
        "insert into projects (name, client, city, budget, starts_on, ends_on) \
         values ($1, 'Acme', 'Springfield', 1000, current_date, current_date + 90) returning id",
    )
    .bind(name)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Commits a marker change to the `markers` room; see
/// [`Client::changes_until_marker`].
pub async fn barrier(pool: &PgPool, marker: &str) {
    sqlx::query("insert into markers (note) values ($1)")
        .bind(marker)
        .execute(pool)
        .await
        .expect("marker insert");
}

/// The positions of `changes`, as numbers.
pub fn positions(changes: &[Value]) -> Vec<i64> {
    changes
        .iter()
        .map(|c| c["position"].as_str().unwrap().parse().unwrap())
        .collect()
}
