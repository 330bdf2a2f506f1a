//! `--scenario soak`: the chaos soak (issue 14). A writer commits at the
//! rate into tracked rooms for the duration, two gateway instances serve one
//! private PostgreSQL, and every `--fault-every` one fault strikes, in turn:
//! the LISTEN connections killed, every pooled connection killed, PostgreSQL
//! restarted, a burst of readers that resume from the first change and never
//! read, and one instance stopped with SIGTERM while its clients resume on
//! the other (then started again). The subscribers are the Rust client
//! (`Client`, given both instances' URLs). At the end each subscriber's
//! stream is compared with the outbox: an exact count, not a latency (the
//! machine is shared; the timings it prints are for orientation only).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use pg_private::{ClusterOptions, PrivateCluster, StopMode};
use serde::Serialize;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use ws_gateway_client::{Client, ClientEvent, Update};

use crate::plan::{BenchArgs, Plan};
use crate::target::http_get;

/// Readers of the slow-reader burst (held until the next fault).
const SLOW_READERS: usize = 50;
/// How long a gateway may take to come up (or back).
const LIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// After the writer stops, how long the subscribers may take to get the rest.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// The faults, in the order they strike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    ListenKill,
    PoolKill,
    PostgresRestart,
    SlowReaders,
    GatewaySigterm,
}

const FAULTS: [Fault; 5] = [
    Fault::ListenKill,
    Fault::PoolKill,
    Fault::PostgresRestart,
    Fault::SlowReaders,
    Fault::GatewaySigterm,
];

impl Fault {
    fn describe(self) -> &'static str {
        match self {
            Fault::ListenKill => "LISTEN connections killed (pg_terminate_backend)",
            Fault::PoolKill => "every pooled connection killed (clients, feed reads, internal)",
            Fault::PostgresRestart => "PostgreSQL restarted (pg_ctl restart -m fast)",
            Fault::SlowReaders => "50 readers resume from the first change and never read",
            Fault::GatewaySigterm => "one instance stopped with SIGTERM, its clients resume on the other",
        }
    }
}

/// What the report says of one fault.
#[derive(Debug, Serialize)]
pub struct FaultRecord {
    pub at_s: f64,
    pub fault: String,
    pub detail: String,
    /// From the fault until both instances report their feed live again.
    pub recovered_ms: f64,
}

#[derive(Debug, Serialize)]
pub struct SoakConfig {
    pub subscribers: usize,
    pub rooms: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub fault_every_s: f64,
    pub payload_bytes: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct SoakDeliveries {
    /// Changes each subscriber was owed (its rooms' outbox rows after its
    /// first `subscribed`), summed over subscribers.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    /// Changes the application saw twice (the client is to drop repeats).
    pub duplicated: u64,
    /// Repeats the gateway sent that the client dropped by position
    /// (reported, not a failure: the application saw each change once).
    pub repeats_dropped: u64,
    /// Positions delivered that the outbox does not hold for the room.
    pub unexpected: u64,
    pub resets: u64,
}

#[derive(Debug, Serialize)]
pub struct SoakReport {
    pub schema: String,
    pub kind: String,
    pub scenario: String,
    pub started_at: String,
    pub config: SoakConfig,
    /// Changes in the outbox from the writer (one per committed row).
    pub committed: u64,
    pub faults: Vec<FaultRecord>,
    pub deliveries: SoakDeliveries,
    /// Connections the subscribers opened (one each at the start, then one
    /// per resume), and the close codes they saw (`none`: no close frame).
    pub connections: u64,
    pub closes: BTreeMap<String, u64>,
    pub failures: Vec<String>,
    pub passed: bool,
}

impl SoakReport {
    pub fn to_text(&self) -> String {
        let d = &self.deliveries;
        let mut out = String::new();
        out.push_str(&format!(
            "ws-gateway bench: soak, {} subscribers in {} rooms, {} commits/s for {:.0} s, a fault every {:.0} s\n",
            self.config.subscribers,
            self.config.rooms,
            self.config.rate,
            self.config.duration_s,
            self.config.fault_every_s
        ));
        for f in &self.faults {
            out.push_str(&format!(
                "  {:>7.1} s  {:<17} recovered in {:>7.0} ms  {}\n",
                f.at_s, f.fault, f.recovered_ms, f.detail
            ));
        }
        out.push_str(&format!("committed     {}\n", self.committed));
        out.push_str(&format!(
            "deliveries    expected {}  delivered {}  lost {}  duplicated {}  unexpected {}  resets {}  (repeats dropped by the client {})\n",
            d.expected, d.delivered, d.lost, d.duplicated, d.unexpected, d.resets, d.repeats_dropped
        ));
        let closes: Vec<String> = self.closes.iter().map(|(code, n)| format!("{code}: {n}")).collect();
        out.push_str(&format!(
            "connections   {} opened; closes seen {}\n",
            self.connections,
            if closes.is_empty() {
                "none".into()
            } else {
                closes.join(", ")
            }
        ));
        out.push_str(&format!(
            "result        {}\n",
            if self.passed {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", self.failures.join("; "))
            }
        ));
        out
    }
}

/// One gateway instance, as a child process of this binary (`serve`).
struct Instance {
    name: &'static str,
    port: u16,
    db_url: String,
    channel: String,
    log: PathBuf,
    child: Option<tokio::process::Child>,
}

impl Instance {
    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr())
    }

    async fn start(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("finding this executable to start the gateway")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        let child = tokio::process::Command::new(&exe)
            .arg("serve")
            .env("DATABASE_URL", &self.db_url)
            .env("GATEWAY_AUTH", "none")
            .env("GATEWAY_LISTEN", self.addr())
            .env("GATEWAY_CHANNEL", &self.channel)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting gateway {}", self.name))?;
        self.child = Some(child);
        wait_live(&[&*self]).await
    }

    /// SIGTERM, and waits for the process to drain and exit.
    async fn stop(&mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else {
            return Ok("not running".into());
        };
        if let Some(pid) = child.id() {
            // SAFETY: signalling a child we started and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        match tokio::time::timeout(Duration::from_secs(20), child.wait()).await {
            Ok(status) => Ok(format!("exited {}", status?)),
            Err(_) => {
                let _ = child.kill().await;
                bail!("gateway {} did not stop within 20 s of SIGTERM", self.name)
            }
        }
    }

    fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        Some(format!("gateway {} exited ({status}) on its own", self.name))
    }
}

/// Waits until every instance answers `/healthz` 200 with its feed live.
async fn wait_live(instances: &[&Instance]) -> Result<()> {
    let deadline = Instant::now() + LIVE_TIMEOUT;
    for instance in instances {
        loop {
            let live = match http_get(&instance.addr(), "/healthz").await {
                Ok((200, body)) => {
                    serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default()["feed"]["state"] == "live"
                }
                _ => false,
            };
            if live {
                break;
            }
            if Instant::now() >= deadline {
                bail!("gateway {} not live within {LIVE_TIMEOUT:?}", instance.name);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// What one subscriber received, per room.
#[derive(Default)]
struct Received {
    positions: HashMap<String, Vec<i64>>,
    /// The first `subscribed` position per room: changes after it are owed.
    start: HashMap<String, i64>,
    connections: u64,
    closes: Vec<Option<u16>>,
    resets: u64,
    refused: Vec<String>,
}

struct SoakSubscriber {
    rooms: Vec<String>,
    received: Arc<Mutex<Received>>,
    client: Client,
    tasks: Vec<JoinHandle<()>>,
}

impl SoakSubscriber {
    /// Repeats the gateway sent that the client dropped by position.
    fn repeats(&self) -> u64 {
        self.client.stats().duplicates
    }
}

impl Drop for SoakSubscriber {
    fn drop(&mut self) {
        self.client.close();
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One client over both instances (a reconnect moves to the other URL),
/// subscribed to `rooms` from now; what it receives is recorded.
fn start_subscriber(urls: Vec<String>, rooms: Vec<String>) -> Result<SoakSubscriber> {
    let received = Arc::new(Mutex::new(Received::default()));
    let mut builder = Client::builder(urls[0].clone());
    for url in &urls[1..] {
        builder = builder.url(url.clone());
    }
    let client = builder
        .reconnect_delays(Duration::from_millis(50), Duration::from_secs(1))
        .connect_timeout(Duration::from_secs(2))
        .start();
    let mut tasks = Vec::new();
    let mut events = Box::pin(client.events());
    let record = Arc::clone(&received);
    tasks.push(tokio::spawn(async move {
        while let Some(event) = events.next().await {
            let mut r = record.lock().expect("received lock");
            match event {
                ClientEvent::Connected { .. } => r.connections += 1,
                ClientEvent::Disconnected { code, .. } => r.closes.push(code),
                _ => {}
            }
        }
    }));
    for room in &rooms {
        let mut subscription = client
            .subscribe(room, None)
            .map_err(|e| anyhow!("subscribing to {room}: {e}"))?;
        let record = Arc::clone(&received);
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            while let Some(update) = subscription.next().await {
                let mut r = record.lock().expect("received lock");
                match update {
                    Update::Subscribed { position, .. } => {
                        r.start.entry(room.clone()).or_insert(position.0);
                    }
                    Update::Change(change) | Update::Event(change) => {
                        r.positions.entry(room.clone()).or_default().push(change.position.0)
                    }
                    Update::Reset { .. } => r.resets += 1,
                    Update::Refused { code, message } => r.refused.push(format!("{room}: {code}: {message}")),
                    _ => {}
                }
            }
        }));
    }
    Ok(SoakSubscriber {
        rooms,
        received,
        client,
        tasks,
    })
}

/// Commits row after row on schedule (`rate` per second) until `stop`,
/// retrying each through any outage (idempotent: a commit whose outcome was
/// lost with its connection is tried again and changes nothing the second
/// time). Returns the last id attempted.
async fn write(db_url: String, rate: f64, rooms: usize, payload: usize, stop: CancellationToken) -> i64 {
    let body = "x".repeat(payload);
    let started = tokio::time::Instant::now();
    let mut pool: Option<PgPool> = None;
    let mut id: i64 = 0;
    loop {
        id += 1;
        let due = started + Duration::from_secs_f64((id - 1) as f64 / rate);
        tokio::select! {
            () = stop.cancelled() => return id - 1,
            () = tokio::time::sleep_until(due) => {}
        }
        loop {
            if stop.is_cancelled() {
                return id;
            }
            let conn = match &pool {
                Some(p) => p.clone(),
                None => match PgPoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(Duration::from_secs(2))
                    .connect(&db_url)
                    .await
                {
                    Ok(p) => {
                        pool = Some(p.clone());
                        p
                    }
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let inserted =
                sqlx::query("insert into soak_events (id, room, body) values ($1, $2, $3) on conflict (id) do nothing")
                    .bind(id)
                    .bind((id as usize % rooms) as i32)
                    .bind(&body)
                    .execute(&conn)
                    .await;
            match inserted {
                Ok(_) => break,
                Err(_) => {
                    pool = None;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// Terminates the sessions of this database named `names`; how many.
async fn terminate(db_url: &str, names: &[&str]) -> Result<i64> {
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect(db_url)
        .await
        .context("connecting to terminate sessions")?;
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let killed: i64 = sqlx::query_scalar(
        "select count(*) filter (where pg_terminate_backend(pid)) from pg_stat_activity
          where datname = current_database() and application_name = any($1)",
    )
    .bind(&names)
    .fetch_one(&pool)
    .await?;
    pool.close().await;
    Ok(killed)
}

/// A reader that resumes `room` from the first change and never reads: a
/// 4 KiB receive buffer, and nothing taken from it.
async fn slow_reader(addr: &str, room: &str) -> Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    use futures_util::SinkExt;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let stream = socket.connect(addr.parse()?).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream).await?;
    let subscribe = serde_json::json!({"type": "subscribe", "room": room, "since": "0"});
    ws.send(tokio_tungstenite::tungstenite::Message::text(subscribe.to_string()))
        .await?;
    Ok(ws)
}

/// Everything the run owns, stopped at the end (or on an early error).
struct Stage {
    cluster: PrivateCluster,
    instances: [Instance; 2],
    scratch: PathBuf,
}

impl Stage {
    async fn teardown(mut self) {
        for instance in &mut self.instances {
            if let Err(error) = instance.stop().await {
                tracing::warn!(%error, "stopping a soak gateway");
            }
        }
        if let Err(error) = self.cluster.stop(StopMode::Fast).await {
            tracing::warn!(%error, "stopping the soak's PostgreSQL");
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

pub async fn run(args: &BenchArgs, interrupt: CancellationToken) -> Result<SoakReport> {
    if args.db.is_some() || args.gateway.is_some() {
        bail!("--scenario soak restarts PostgreSQL and its gateways: it starts its own (drop --db and --gateway)");
    }
    let plan = Plan::resolve(args).map_err(|e| anyhow!(e))?;
    let fault_every = args.fault_every;
    if fault_every.is_zero() {
        bail!("--fault-every must be more than 0");
    }
    let scratch = std::env::temp_dir().join(format!("ws-gateway-soak-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let cluster = PrivateCluster::start(
        &scratch.join("pg"),
        ClusterOptions {
            fast_unsafe: true,
            max_connections: 300,
            ..ClusterOptions::default()
        },
    )
    .await
    .context("starting a private PostgreSQL for the soak")?;
    let db_url = cluster.create_database("soak").await?;
    let setup = async {
        let pool = PgPoolOptions::new().max_connections(2).connect(&db_url).await?;
        ws_gateway::db::migrate(&pool, &args.channel).await?;
        sqlx::raw_sql("create table soak_events (id bigint primary key, room int not null, body text not null)")
            .execute(&pool)
            .await?;
        ws_gateway::db::track(
            &pool,
            "public.soak_events",
            &["soak:{room}".to_owned()],
            &Default::default(),
        )
        .await?;
        anyhow::Ok(pool)
    };
    let pool = setup.await.context("preparing the soak's database")?;
    let instance = |name: &'static str| -> Result<Instance> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Ok(Instance {
            name,
            port,
            db_url: db_url.clone(),
            channel: args.channel.clone(),
            log: scratch.join(format!("gateway-{name}.log")),
            child: None,
        })
    };
    let mut stage = Stage {
        cluster,
        instances: [instance("a")?, instance("b")?],
        scratch: scratch.clone(),
    };
    let outcome = soak(&plan, fault_every, &db_url, &pool, &mut stage, &interrupt).await;
    let logs: Vec<String> = stage
        .instances
        .iter()
        .map(|i| format!("{}:\n{}", i.name, tail(&i.log)))
        .collect();
    pool.close().await;
    stage.teardown().await;
    outcome.map_err(|e| e.context(format!("the gateways' logs:\n{}", logs.join("\n"))))
}

async fn soak(
    plan: &Plan,
    fault_every: Duration,
    db_url: &str,
    pool: &PgPool,
    stage: &mut Stage,
    interrupt: &CancellationToken,
) -> Result<SoakReport> {
    let started_at = ws_gateway::change::format_rfc3339_micros(ws_gateway::change::now_us());
    for instance in &mut stage.instances {
        instance.start().await?;
    }
    let urls = [stage.instances[0].ws_url(), stage.instances[1].ws_url()];
    let subscribers: Vec<SoakSubscriber> = (0..plan.connections)
        .map(|i| -> Result<SoakSubscriber> {
            let rooms = vec![
                format!("soak:{}", i % plan.rooms),
                format!("soak:{}", (i + 1) % plan.rooms),
            ];
            let mut urls = urls.to_vec();
            urls.rotate_left(i % 2);
            start_subscriber(urls, rooms)
        })
        .collect::<Result<_>>()?;
    let deadline = Instant::now() + LIVE_TIMEOUT;
    while !subscribers.iter().all(|s| {
        let r = s.received.lock().expect("received lock");
        s.rooms.iter().all(|room| r.start.contains_key(room))
    }) {
        if Instant::now() >= deadline {
            bail!("the subscribers did not all subscribe within {LIVE_TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stop_writing = CancellationToken::new();
    let writer = tokio::spawn(write(
        db_url.to_owned(),
        plan.schedule.mean_rate(),
        plan.rooms,
        plan.payload_bytes,
        stop_writing.clone(),
    ));
    let began = Instant::now();
    let mut faults = Vec::new();
    let mut sigterms = 0usize;
    let mut slow: Vec<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> = Vec::new();
    let mut next_fault = began + fault_every;
    let end = began + plan.duration;
    let mut failures = Vec::new();
    loop {
        let wake = next_fault.min(end);
        tokio::select! {
            () = interrupt.cancelled() => {
                failures.push("interrupted before the end".to_owned());
                break;
            }
            () = tokio::time::sleep_until(wake.into()) => {}
        }
        for instance in &mut stage.instances {
            if let Some(exit) = instance.exited() {
                bail!(exit);
            }
        }
        // The last burst of slow readers goes away (as such clients do).
        slow.clear();
        if Instant::now() >= end {
            break;
        }
        let fault = FAULTS[faults.len() % FAULTS.len()];
        let at = began.elapsed();
        let struck = Instant::now();
        let detail = match fault {
            Fault::ListenKill => {
                let killed = terminate(db_url, &["ws-gateway feed"]).await?;
                format!("{killed} sessions")
            }
            Fault::PoolKill => {
                let killed = terminate(
                    db_url,
                    &["ws-gateway clients", "ws-gateway feed reads", "ws-gateway internal"],
                )
                .await?;
                format!("{killed} sessions")
            }
            Fault::PostgresRestart => {
                stage.cluster.restart(StopMode::Fast).await?;
                "restarted".to_owned()
            }
            Fault::SlowReaders => {
                let mut opened = 0;
                for i in 0..SLOW_READERS {
                    let addr = stage.instances[i % 2].addr();
                    if let Ok(ws) = slow_reader(&addr, &format!("soak:{}", i % plan.rooms)).await {
                        slow.push(ws);
                        opened += 1;
                    }
                }
                format!("{opened} opened, held until the next fault")
            }
            Fault::GatewaySigterm => {
                let instance = &mut stage.instances[sigterms % 2];
                sigterms += 1;
                let stopped = instance.stop().await?;
                let name = instance.name;
                instance.start().await?;
                format!("instance {name} {stopped}, started again")
            }
        };
        let [a, b] = &stage.instances;
        wait_live(&[a, b]).await?;
        let recovered = struck.elapsed();
        eprintln!(
            "soak {:>7.1} s  {:<17} {detail}; both instances live after {:.0} ms",
            at.as_secs_f64(),
            format!("{fault:?}"),
            recovered.as_secs_f64() * 1000.0
        );
        faults.push(FaultRecord {
            at_s: at.as_secs_f64(),
            fault: serde_json::to_value(fault)?.as_str().unwrap_or_default().to_owned(),
            detail: format!("{}: {detail}", fault.describe()),
            recovered_ms: recovered.as_secs_f64() * 1000.0,
        });
        next_fault += fault_every;
    }
    drop(slow);
    stop_writing.cancel();
    writer.await.context("the soak's writer")?;

    // The truth: what the outbox holds for each room after each start.
    let committed: i64 = sqlx::query_scalar(
        "select count(*) from realtime.changes where schema_name = 'public' and table_name = 'soak_events'",
    )
    .fetch_one(pool)
    .await
    .context("counting the outbox")?;
    let mut owed: Vec<HashMap<String, Vec<i64>>> = Vec::new();
    for subscriber in &subscribers {
        let starts = subscriber.received.lock().expect("received lock").start.clone();
        let mut rooms = HashMap::new();
        for room in &subscriber.rooms {
            let positions: Vec<i64> = sqlx::query_scalar(
                "select position from realtime.changes where $1 = any (rooms) and position > $2 order by position",
            )
            .bind(room)
            .bind(starts[room])
            .fetch_all(pool)
            .await?;
            rooms.insert(room.clone(), positions);
        }
        owed.push(rooms);
    }
    let complete = |subscribers: &[SoakSubscriber]| {
        subscribers.iter().zip(&owed).all(|(s, owed)| {
            let r = s.received.lock().expect("received lock");
            owed.iter()
                .all(|(room, want)| r.positions.get(room).map_or(0, Vec::len) >= want.len())
        })
    };
    let drain_deadline = Instant::now() + DRAIN_TIMEOUT;
    while !complete(&subscribers) && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut deliveries = SoakDeliveries::default();
    let mut connections = 0;
    let mut closes = BTreeMap::new();
    for (subscriber, owed) in subscribers.iter().zip(&owed) {
        let r = subscriber.received.lock().expect("received lock");
        connections += r.connections;
        deliveries.repeats_dropped += subscriber.repeats();
        deliveries.resets += r.resets;
        for code in &r.closes {
            *closes
                .entry(code.map_or("none".to_owned(), |c| c.to_string()))
                .or_insert(0) += 1;
        }
        for refused in &r.refused {
            failures.push(format!("a subscriber was refused: {refused}"));
        }
        for (room, want) in owed {
            let got = r.positions.get(room).cloned().unwrap_or_default();
            let want_set: std::collections::HashSet<i64> = want.iter().copied().collect();
            let got_set: std::collections::HashSet<i64> = got.iter().copied().collect();
            deliveries.expected += want.len() as u64;
            deliveries.delivered += got.iter().filter(|p| want_set.contains(p)).count() as u64;
            deliveries.lost += want.iter().filter(|p| !got_set.contains(p)).count() as u64;
            deliveries.unexpected += got.iter().filter(|p| !want_set.contains(p)).count() as u64;
            deliveries.duplicated += (got.len() - got_set.len()) as u64;
        }
    }
    for (what, n) in [
        ("lost", deliveries.lost),
        ("duplicated", deliveries.duplicated),
        ("unexpected", deliveries.unexpected),
        ("reset", deliveries.resets),
    ] {
        if n > 0 {
            failures.push(format!("{n} changes {what}"));
        }
    }
    drop(subscribers);
    Ok(SoakReport {
        schema: "ws-gateway-bench/1".into(),
        kind: "soak".into(),
        scenario: "soak".into(),
        started_at,
        config: SoakConfig {
            subscribers: plan.connections,
            rooms: plan.rooms,
            rate: plan.schedule.mean_rate(),
            duration_s: plan.duration.as_secs_f64(),
            fault_every_s: fault_every.as_secs_f64(),
            payload_bytes: plan.payload_bytes,
        },
        committed: committed as u64,
        faults,
        deliveries,
        connections,
        closes,
        passed: failures.is_empty(),
        failures,
    })
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
