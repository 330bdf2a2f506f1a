//! Tools for the fault tests: concurrent writers that commit N changes
//! across rooms no matter what, resilient subscribers that reconnect and
//! resume like a real client, the gateway as a real process, and a TCP proxy
//! that can cut the network.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use ws_gateway_client::{Client, ClientBuilder, ClientEvent, Subscription, Update};

use crate::helpers::{DEADLINE, eventually, http_get_json};

/// The room of item `id` when writing to `rooms` rooms.
pub fn room_of(id: i64, rooms: i64) -> String {
    format!("project:{}", id % rooms)
}

/// `writers` concurrent connections commit items `1..=total` (one per
/// transaction, rooms `project:{id % rooms}`), retrying through any outage
/// until every one is committed. Inserts are idempotent, so a commit whose
/// outcome was lost with the connection is simply tried again.
pub struct Workload {
    pub committed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

impl Workload {
    pub fn start(url: &str, total: i64, rooms: i64, writers: i64) -> Workload {
        let committed = Arc::new(AtomicU64::new(0));
        let tasks = (0..writers)
            .map(|w| {
                let url = url.to_owned();
                let committed = Arc::clone(&committed);
                tokio::spawn(async move {
                    let mut pool: Option<PgPool> = None;
                    let mut id = w + 1;
                    while id <= total {
                        let conn = match &pool {
                            Some(p) => p.clone(),
                            None => match sqlx::postgres::PgPoolOptions::new()
                                .max_connections(1)
                                .acquire_timeout(Duration::from_secs(2))
                                .connect(&url)
                                .await
                            {
                                Ok(p) => {
                                    pool = Some(p.clone());
                                    p
                                }
                                Err(_) => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            },
                        };
                        let result = sqlx::query(
                            "insert into items (id, project_id, body) values ($1, $2, 'load') \
                             on conflict (id) do nothing",
                        )
                        .bind(id)
                        .bind((id % rooms) as i32)
                        .execute(&conn)
                        .await;
                        match result {
                            Ok(_) => {
                                committed.fetch_add(1, Ordering::Relaxed);
                                id += writers;
                            }
                            Err(_) => {
                                pool = None;
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    }
                })
            })
            .collect();
        Workload { committed, tasks }
    }

    pub async fn wait_committed(&self, at_least: u64) {
        eventually("writers to commit", || async {
            (self.committed.load(Ordering::Relaxed) >= at_least).then_some(())
        })
        .await
    }

    pub async fn finish(self) {
        for task in self.tasks {
            tokio::time::timeout(Duration::from_secs(120), task)
                .await
                .expect("writers finish")
                .expect("writer task");
        }
    }
}

/// What one subscriber received, per room.
#[derive(Default)]
pub struct Received {
    /// Positions in arrival order, per room.
    pub positions: HashMap<String, Vec<i64>>,
    /// When each change in `positions` arrived.
    pub times: HashMap<String, Vec<Instant>>,
    /// The first `subscribed` position per room: changes after it are owed.
    pub start: HashMap<String, i64>,
    /// Every `subscribed`: room, position, resumed, when.
    pub subscribed: Vec<(String, i64, bool, Instant)>,
    pub connections: usize,
    /// The URL it is connected to now (`None` between connections).
    pub url: Option<String>,
    /// Every close: code, reason, the client's first retry delay, when.
    pub closes: Vec<(Option<u16>, String)>,
    pub disconnects: Vec<(Option<u16>, String, Duration, Instant)>,
    pub resets: Vec<(String, String, i64)>,
    /// Problems the client reported that concern no room.
    pub errors: Vec<(String, String)>,
    /// Changes the client dropped because their position was not after the
    /// room's last one: a gateway that keeps its promise sends none.
    pub repeats: u64,
}

/// A client that behaves like a well-written application: the Rust client
/// ([`ws_gateway_client::Client`]), one subscription per room, resuming
/// each `since` its last position on any disconnect (to the next of
/// `urls`). What it delivers is recorded for the checks below, with what it
/// dropped as repeats.
pub struct Subscriber {
    pub client: Client,
    pub received: Arc<Mutex<Received>>,
    tasks: Vec<JoinHandle<()>>,
    /// Deliberate moves to the next URL (after `hop_every` changes).
    pub hops: Arc<AtomicUsize>,
    /// Changes between hops; 0 stops them.
    pub hop_every: Arc<AtomicUsize>,
}

impl Subscriber {
    /// `hop_every`: move to the next URL after this many changes (0: only
    /// on disconnect).
    pub fn start(urls: Vec<String>, rooms: Vec<String>, hop_every: usize) -> Subscriber {
        let builder = urls
            .iter()
            .skip(1)
            .fold(Client::builder(&urls[0]), |b, url| b.url(url))
            .reconnect_delays(Duration::from_millis(50), Duration::from_secs(1))
            .connect_timeout(Duration::from_secs(2));
        Subscriber::start_with(builder, rooms, hop_every)
    }

    /// As [`Subscriber::start`], with the client configured by the caller.
    pub fn start_with(builder: ClientBuilder, rooms: Vec<String>, hop_every: usize) -> Subscriber {
        let client = builder.start();
        let received = Arc::new(Mutex::new(Received::default()));
        let hops = Arc::new(AtomicUsize::new(0));
        let hop_every = Arc::new(AtomicUsize::new(hop_every));
        let since_hop = Arc::new(AtomicUsize::new(0));
        let mut tasks = vec![tokio::spawn(record_events(
            client.events(),
            Arc::clone(&received),
            Arc::clone(&since_hop),
        ))];
        for room in rooms {
            let subscription = client.subscribe(&room, None).expect("a valid room");
            tasks.push(tokio::spawn(record_room(
                subscription,
                client.clone(),
                Arc::clone(&hop_every),
                Arc::clone(&since_hop),
                Arc::clone(&received),
                Arc::clone(&hops),
            )));
        }
        Subscriber {
            client,
            received,
            tasks,
            hops,
            hop_every,
        }
    }

    pub async fn wait_started(&self, rooms: usize) {
        eventually("subscriber to subscribe", || async {
            (self.received.lock().unwrap().start.len() >= rooms).then_some(())
        })
        .await
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.client.close();
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn record_events(
    events: impl futures_util::Stream<Item = ClientEvent>,
    received: Arc<Mutex<Received>>,
    since_hop: Arc<AtomicUsize>,
) {
    let mut events = std::pin::pin!(events);
    while let Some(event) = events.next().await {
        let mut r = received.lock().unwrap();
        match event {
            ClientEvent::Connected { url, .. } => {
                r.connections += 1;
                r.url = Some(url);
                since_hop.store(0, Ordering::Relaxed);
            }
            ClientEvent::Disconnected {
                code,
                reason,
                reconnect_in: Some(delay),
            } => {
                r.url = None;
                r.closes.push((code, reason.clone()));
                r.disconnects.push((code, reason, delay, Instant::now()));
            }
            ClientEvent::Error { code, message } => r.errors.push((code, message)),
            _ => {}
        }
    }
}

/// Records what one room's subscription yields; moves the client on every
/// `hop_every` changes (across its rooms).
async fn record_room(
    mut subscription: Subscription,
    client: Client,
    hop_every: Arc<AtomicUsize>,
    since_hop: Arc<AtomicUsize>,
    received: Arc<Mutex<Received>>,
    hops: Arc<AtomicUsize>,
) {
    let room = subscription.room().to_owned();
    while let Some(update) = subscription.next().await {
        let mut r = received.lock().unwrap();
        r.repeats = client.stats().duplicates;
        match update {
            Update::Subscribed { position, resumed } => {
                r.start.entry(room.clone()).or_insert(position.0);
                r.subscribed.push((room.clone(), position.0, resumed, Instant::now()));
            }
            Update::Change(change) | Update::Event(change) => {
                r.positions.entry(room.clone()).or_default().push(change.position.0);
                r.times.entry(room.clone()).or_default().push(Instant::now());
                let hop_every = hop_every.load(Ordering::Relaxed);
                if hop_every > 0 && since_hop.fetch_add(1, Ordering::Relaxed) + 1 >= hop_every {
                    since_hop.store(0, Ordering::Relaxed);
                    hops.fetch_add(1, Ordering::Relaxed);
                    client.reconnect();
                }
            }
            Update::Reset { reason, position } => r.resets.push((room.clone(), reason, position.0)),
            Update::Refused { code, message } => panic!("the gateway refused {room}: {code}: {message}"),
            _ => {}
        }
    }
}

/// The positions committed to each room after `start`, in commit order: the
/// truth a subscriber's stream must equal.
pub async fn committed_positions(pool: &PgPool, room: &str, after: i64) -> Vec<i64> {
    sqlx::query_scalar(
        "select position from realtime.changes where $1 = any (rooms) and position > $2 order by position",
    )
    .bind(room)
    .bind(after)
    .fetch_all(pool)
    .await
    .expect("reading the outbox")
}

/// Waits until everything committed so far is in the outbox: a marker row is
/// committed and awaited there. In wal mode the leader writes a change a
/// moment after its commit, in commit order; in notify mode it is at once.
pub async fn wait_outbox_caught_up(pool: &PgPool) {
    static MARKERS: AtomicU64 = AtomicU64::new(0);
    let marker = format!("caught-up-{}", MARKERS.fetch_add(1, Ordering::Relaxed));
    crate::helpers::barrier(pool, &marker).await;
    eventually("the outbox to have every commit", || async {
        sqlx::query_scalar::<_, bool>(
            "select exists (select 1 from realtime.changes where table_name = 'markers' and row->>'note' = $1)",
        )
        .bind(&marker)
        .fetch_one(pool)
        .await
        .ok()?
        .then_some(())
    })
    .await
}

/// Waits until `subscriber` has every change committed to its rooms (after
/// what it started from), then checks it got each exactly once, in order.
pub async fn assert_received_everything(pool: &PgPool, subscriber: &Subscriber, rooms: &[String]) {
    wait_outbox_caught_up(pool).await;
    let mut expected = HashMap::new();
    for room in rooms {
        let start = subscriber.received.lock().unwrap().start[room];
        expected.insert(room.clone(), committed_positions(pool, room, start).await);
    }
    let complete = || {
        let r = subscriber.received.lock().unwrap();
        rooms
            .iter()
            .all(|room| r.positions.get(room).map_or(0, Vec::len) >= expected[room].len())
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !complete() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = subscriber.received.lock().unwrap();
    assert_eq!(
        r.repeats, 0,
        "the gateway sent changes again (dropped by the client as repeats)"
    );
    for room in rooms {
        let got = r.positions.get(room).cloned().unwrap_or_default();
        let want = &expected[room];
        if &got != want {
            let missing: Vec<_> = want.iter().filter(|p| !got.contains(p)).take(10).collect();
            let mut seen = std::collections::HashSet::new();
            let duplicated: Vec<_> = got.iter().filter(|p| !seen.insert(**p)).take(10).collect();
            panic!(
                "{room}: received {} of {} changes; missing (first 10) {missing:?}; duplicated {duplicated:?}; in order: {}",
                got.len(),
                want.len(),
                got.windows(2).all(|w| w[0] < w[1])
            );
        }
    }
}

/// The gateway as a separate process, for faults a process can suffer.
pub struct GatewayProcess {
    pub address: SocketAddr,
    /// Where the operator endpoints are: `GATEWAY_ADMIN_LISTEN` when the
    /// start gave it, else `address`.
    pub admin: SocketAddr,
    pub child: tokio::process::Child,
    pub log: PathBuf,
}

pub async fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl GatewayProcess {
    pub async fn start(database_url: &str, port: u16, extra_env: &[(&str, &str)]) -> GatewayProcess {
        GatewayProcess::start_with_file_limit(database_url, port, extra_env, None).await
    }

    /// [`GatewayProcess::start`], with the process's open-file limit (soft
    /// and hard) set to `open_files`.
    pub async fn start_with_file_limit(
        database_url: &str,
        port: u16,
        extra_env: &[(&str, &str)],
        open_files: Option<u64>,
    ) -> GatewayProcess {
        let log = std::env::temp_dir().join(format!("ws-gateway-{}-{port}.log", std::process::id()));
        let log_file = std::fs::File::create(&log).unwrap();
        let mut command = tokio::process::Command::new(crate::helpers::gateway_binary());
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", database_url)
            .env("GATEWAY_AUTH", "none")
            .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true);
        for (k, v) in extra_env {
            command.env(k, v);
        }
        if let Some(limit) = open_files {
            let limit = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit is async-signal-safe; nothing else runs here.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command.spawn().expect("starting the gateway binary");
        let address: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin = extra_env
            .iter()
            .find(|(k, _)| *k == "GATEWAY_ADMIN_LISTEN")
            .map_or(address, |(_, v)| v.parse().expect("GATEWAY_ADMIN_LISTEN as ip:port"));
        let gateway = GatewayProcess {
            address,
            admin,
            child,
            log,
        };
        gateway.wait_live().await;
        gateway
    }

    pub async fn wait_live(&self) {
        eventually("gateway process to be live", || async {
            let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(self.address)).await else {
                return None;
            };
            let (status, health) = http_get_json(self.admin, "/healthz").await;
            (status == 200 && health["feed"]["state"] == "live").then_some(())
        })
        .await
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.address)
    }

    pub fn signal(&self, signal: i32) {
        let pid = self.child.id().expect("running") as i32;
        unsafe { libc::kill(pid, signal) };
    }

    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("gateway exits in time")
            .unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A TCP proxy in front of PostgreSQL that can cut the network: while cut,
/// bytes are held (not refused, not reset), as in a real partition.
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let cut = Arc::clone(&cut);
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        return;
                    };
                    let cut = Arc::clone(&cut);
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        let a = tokio::spawn(pump(cr, sw, Arc::clone(&cut)));
                        let b = tokio::spawn(pump(sr, cw, cut));
                        let _ = tokio::join!(a, b);
                    });
                }
            }
        });
        Proxy { port, cut, task }
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, cut: Arc<AtomicBool>) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        // While cut, neither read nor write: the peer's bytes wait in the
        // kernel, like packets lost in a partition.
        while cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        while cut.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP proxy in front of PostgreSQL that can play "database down": it
/// drops every connection and refuses new ones until it is back up.
pub struct KillSwitch {
    pub port: u16,
    down: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl KillSwitch {
    pub async fn start(upstream: String) -> KillSwitch {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (down, _) = watch::channel(false);
        let task = tokio::spawn({
            let down = down.clone();
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut is_down = down.subscribe();
                    if *is_down.borrow() {
                        continue;
                    }
                    let upstream = upstream.clone();
                    tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = is_down.wait_for(|d| *d) => {}
                        }
                    });
                }
            }
        });
        KillSwitch { port, down, task }
    }

    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }
}

impl Drop for KillSwitch {
    fn drop(&mut self) {
        self.set_down(true);
        self.task.abort();
    }
}

/// `(host:port, url with host:port replaced)` of a PostgreSQL URL.
pub fn redirect(url: &str, port: u16) -> (String, String) {
    let start = url.find('@').map(|i| i + 1).unwrap_or(url.find("://").unwrap() + 3);
    let end = start + url[start..].find('/').unwrap();
    let authority = url[start..end].to_owned();
    let redirected = format!("{}127.0.0.1:{port}{}", &url[..start], &url[end..]);
    (authority, redirected)
}
