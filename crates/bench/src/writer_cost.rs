//! `--writers-only`: what change capture costs the application's writers.
//! N connections commit as fast as they can, one row per transaction, in
//! two shapes: single-row INSERTs into `bench_events`, and UPDATEs of a wide
//! row (`bench_wide`: a small counter changes, a TOASTed column of
//! `--wide-row-bytes`, 100 KB by default, does not), each untracked, with the original gateway's per-row `pg_notify`
//! trigger, tracked by ws-gateway with `GATEWAY_SOURCE=notify` (the capture
//! trigger), and tracked with `GATEWAY_SOURCE=wal` (no trigger: logical
//! replication, REPLICA IDENTITY FULL), each with `synchronous_commit` on
//! and off.
//!
//! The notifying variants each have one LISTEN connection draining their
//! channel, as a gateway would: a notification nobody listens to costs less.
//! The wal variant runs a real gateway leading the source (`ws-gateway
//! serve`, no clients), on the same machine: its decoding and outbox writes
//! compete with the writers, as they would in production on one host. The
//! next variant waits (up to 30 s) for it to catch up, and the report says
//! how fast it wrote; after the wal variants the slot is dropped, since what
//! the leader has not written yet of the bench's rows is not needed.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::plan::{BenchArgs, Source};
use super::procfs;
use super::progress::Progress;
use super::report::{self, SCHEMA};
use super::table;
use super::target::{Target, TargetOptions};
use super::writers::{Writer, connect_writer};

/// The plain trigger's channel.
const PLAIN_CHANNEL: &str = "bench_plain";
const ROOMS: u64 = 10;
const WIDE_TABLE: &str = "public.bench_wide";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Capture {
    /// No trigger at all.
    None,
    /// `perform pg_notify('bench_plain', row_to_json(NEW)::text)` per row.
    PlainNotify,
    /// `realtime.track` with the notify source: outbox row, commit-ordered
    /// position, NOTIFY, inside the writer's commit.
    Tracked,
    /// `realtime.track` with the wal source: nothing in the writer's
    /// transaction; a leading gateway captures from the WAL.
    Wal,
}

impl Capture {
    const ALL: [Capture; 4] = [Capture::None, Capture::PlainNotify, Capture::Tracked, Capture::Wal];

    fn label(self) -> &'static str {
        match self {
            Capture::None => "untracked",
            Capture::PlainNotify => "plain pg_notify trigger",
            Capture::Tracked => "tracked, GATEWAY_SOURCE=notify",
            Capture::Wal => "tracked, GATEWAY_SOURCE=wal",
        }
    }
}

/// What each transaction of a writer does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// One new row of --payload-bytes.
    Insert,
    /// One UPDATE of the writer's own wide row: a counter changes, the
    /// large column (`--wide-row-bytes`) does not (REPLICA IDENTITY FULL
    /// logs it whole).
    WideUpdate,
}

impl Shape {
    const ALL: [Shape; 2] = [Shape::Insert, Shape::WideUpdate];

    fn label(self) -> &'static str {
        match self {
            Shape::Insert => "single-row INSERT",
            Shape::WideUpdate => "UPDATE of a wide row (large column unchanged)",
        }
    }

    fn table(self) -> &'static str {
        match self {
            Shape::Insert => table::TABLE,
            Shape::WideUpdate => WIDE_TABLE,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostResult {
    #[serde(default = "insert_shape")]
    pub shape: Shape,
    pub capture: Capture,
    pub synchronous_commit: bool,
    pub commits_per_s: f64,
    /// Commits inside the measured window.
    pub commits: u64,
    /// Notifications the LISTEN connection drained (whole run, warmup too;
    /// with the wal source: what the leader wrote to the outbox meanwhile).
    pub notifications: Option<u64>,
    pub errors: u64,
    /// With the wal source: how the leader kept up with these writers.
    #[serde(default)]
    pub leader: Option<LeaderCatchUp>,
    /// Where the machine's CPU went (None when PostgreSQL runs elsewhere).
    #[serde(default)]
    pub cpu: Option<VariantCpu>,
}

/// CPU seconds of one variant, read from /proc: from the writers' start to
/// their stop, or with the wal source to the leader's catching up, so that
/// its outbox writes of the variant's changes are all in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VariantCpu {
    /// Commits over the same span (warmup too).
    pub commits: u64,
    /// Every core's busy time.
    pub machine_s: f64,
    /// The bench's own process (the writers' client side).
    pub bench_s: f64,
    /// The wal source's share (0 in the other variants): the walsender
    /// decoding the slot, the leader's backend writing the outbox, the
    /// gateway's process, and its other backends (the feed, the probe).
    pub walsender_s: f64,
    pub leader_backend_s: f64,
    pub gateway_s: f64,
    pub gateway_backends_s: f64,
}

impl VariantCpu {
    /// The machine's time per commit without the bench's client side.
    fn per_commit_us(&self) -> f64 {
        (self.machine_s - self.bench_s).max(0.0) * 1e6 / self.commits.max(1) as f64
    }

    fn capture_s(&self) -> f64 {
        self.walsender_s + self.leader_backend_s + self.gateway_s + self.gateway_backends_s
    }
}

/// Which of the wal source's processes a backend is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CaptureRole {
    Walsender,
    Leader,
    GatewayBackend,
}

/// A reading of the machine's, the bench's, the gateway's and the wal
/// source's backends' CPU time (their pids from pg_stat_activity).
struct CpuReading {
    machine: Option<procfs::MachineCpu>,
    bench: Duration,
    gateway: Option<Duration>,
    backends: Vec<(u32, CaptureRole, Duration)>,
}

impl CpuReading {
    async fn take(pool: &PgPool, gateway_pid: Option<u32>) -> Result<CpuReading> {
        let rows: Vec<(i32, String, String)> = sqlx::query_as(
            "select pid, backend_type, coalesce(application_name, '') from pg_stat_activity
              where datname = current_database() and pid <> pg_backend_pid()
                and (backend_type = 'walsender'
                     or (application_name like 'ws-gateway%' and application_name not like 'ws-gateway bench%'))",
        )
        .fetch_all(pool)
        .await
        .context("reading the wal source's backends")?;
        let backends = rows
            .into_iter()
            .filter_map(|(pid, backend_type, application)| {
                let role = match (backend_type.as_str(), application.as_str()) {
                    ("walsender", _) => CaptureRole::Walsender,
                    (_, "ws-gateway wal leader") => CaptureRole::Leader,
                    _ => CaptureRole::GatewayBackend,
                };
                let pid = u32::try_from(pid).ok()?;
                Some((pid, role, procfs::process_cpu(pid)?))
            })
            .collect();
        Ok(CpuReading {
            machine: procfs::MachineCpu::now(),
            bench: procfs::self_cpu(),
            gateway: gateway_pid.and_then(procfs::process_cpu),
            backends,
        })
    }

    /// What was spent since `earlier`; a backend that started since counts
    /// whole, one that ended since is lost (the source's connections last).
    fn since(&self, earlier: &CpuReading, commits: u64) -> Option<VariantCpu> {
        let machine_s = self.machine.as_ref()?.busy_seconds_since(earlier.machine.as_ref()?)?;
        let mut cpu = VariantCpu {
            commits,
            machine_s,
            bench_s: self.bench.saturating_sub(earlier.bench).as_secs_f64(),
            gateway_s: match (self.gateway, earlier.gateway) {
                (Some(now), Some(then)) => now.saturating_sub(then).as_secs_f64(),
                _ => 0.0,
            },
            ..VariantCpu::default()
        };
        for &(pid, role, now) in &self.backends {
            let then = earlier
                .backends
                .iter()
                .find(|b| b.0 == pid)
                .map_or(Duration::ZERO, |b| b.2);
            let spent = now.saturating_sub(then).as_secs_f64();
            match role {
                CaptureRole::Walsender => cpu.walsender_s += spent,
                CaptureRole::Leader => cpu.leader_backend_s += spent,
                CaptureRole::GatewayBackend => cpu.gateway_backends_s += spent,
            }
        }
        Some(cpu)
    }
}

/// How the wal leader kept up with one variant's writers: it competes
/// with them for the same cores, and its outbox writes are what every
/// client waits for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeaderCatchUp {
    /// The variant's changes in the outbox once the leader caught up.
    pub changes: u64,
    /// Seconds from the writers' stop until the slot was confirmed past
    /// their last commit (0: it kept up).
    pub behind_s: f64,
    /// `changes` over the writers' whole run (warmup too) plus `behind_s`.
    pub changes_per_s: f64,
    /// Whether it caught up within [`LEADER_CATCH_UP_TIMEOUT`]; if not,
    /// `changes` is what it had written by then.
    #[serde(default = "yes")]
    pub caught_up: bool,
}

fn yes() -> bool {
    true
}

/// How long the next variant waits for the leader to catch up with this
/// one (a wide-row variant can leave far more than that behind: each
/// UPDATE carries its 100 KB old and new rows).
const LEADER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(30);

fn insert_shape() -> Shape {
    Shape::Insert
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostConfig {
    pub writers: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: usize,
    #[serde(default)]
    pub wide_row_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CostReport {
    pub schema: String,
    /// `writers_only`.
    pub kind: String,
    pub started_at: String,
    pub target: String,
    pub config: CostConfig,
    pub results: Vec<CostResult>,
    /// Tracked (notify) commits/s as a percentage of the plain trigger's,
    /// per `synchronous_commit` setting, single-row INSERTs.
    pub tracked_vs_plain_notify_pct: TrackedVsPlain,
    /// Tracked with the wal source as a percentage of untracked, per
    /// `synchronous_commit` setting (issue 13 asks for at least 90 %):
    /// single-row INSERTs, and UPDATEs of a wide row.
    #[serde(default)]
    pub wal_vs_untracked_pct: TrackedVsPlain,
    #[serde(default)]
    pub wide_update_wal_vs_untracked_pct: TrackedVsPlain,
    pub failures: Vec<String>,
    pub passed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrackedVsPlain {
    pub synchronous_commit_on: Option<f64>,
    pub synchronous_commit_off: Option<f64>,
}

pub async fn run(args: &BenchArgs, interrupt: CancellationToken) -> Result<CostReport> {
    let writers = args.writers.unwrap_or(8);
    if writers == 0 {
        return Err(anyhow!("--writers must be at least 1"));
    }
    let config = CostConfig {
        writers,
        duration_s: args.duration.unwrap_or(Duration::from_secs(10)).as_secs_f64(),
        warmup_s: args.warmup.unwrap_or(Duration::from_secs(2)).as_secs_f64(),
        payload_bytes: args.payload_bytes.unwrap_or(100),
        wide_row_bytes: args.wide_row_bytes.max(32),
    };
    if config.duration_s <= 0.0 {
        return Err(anyhow!("--duration must be more than 0"));
    }
    let mut target = Target::start(&TargetOptions {
        gateway: None,
        gateway_pid: None,
        db: args.db.clone(),
        needs_gateway: false,
        connections: 0,
        channel: args.channel.clone(),
        source: Source::Notify,
    })
    .await?;
    let outcome = measure(args, &config, &mut target, &interrupt).await;
    let stopped = target.shutdown().await;
    let report = outcome?;
    if let Err(e) = stopped {
        tracing::warn!(error = format!("{e:#}"), "cleaning up after the run");
    }
    Ok(report)
}

async fn measure(
    args: &BenchArgs,
    config: &CostConfig,
    target: &mut Target,
    interrupt: &CancellationToken,
) -> Result<CostReport> {
    let started_at = ws_gateway::change::format_rfc3339_micros(ws_gateway::change::now_us());
    let pool = table::connect(&target.db_url).await?;
    let channel = table::ensure_realtime(&pool, &args.channel).await?;
    if ws_gateway::db::source_settings(&pool)
        .await?
        .is_some_and(|s| s.source == "wal")
    {
        return Err(anyhow!(
            "the database's capture source is wal: --writers-only switches it itself; run `ws-gateway source notify` first"
        ));
    }
    table::recreate(&pool).await?;
    recreate_wide(&pool, config.writers, config.wide_row_bytes).await?;
    let private = args.db.is_none();
    let per_variant = Duration::from_secs_f64(config.duration_s + config.warmup_s);
    let runs = (Capture::ALL.len() * Shape::ALL.len() * 2) as u64;
    let bar = Progress::new(!args.no_progress, (per_variant.as_secs() * runs).max(1), "writers-only");
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut step = 0;
    for capture in Capture::ALL {
        set_capture(&pool, capture, &target.db_url).await?;
        if capture == Capture::Wal {
            target.start_wal_leader(&channel).await?;
        }
        for shape in Shape::ALL {
            for synchronous_commit in [true, false] {
                if interrupt.is_cancelled() {
                    failures.push("interrupted".to_owned());
                    break;
                }
                let what = format!(
                    "{}, {}, sync_commit={}",
                    shape.label(),
                    capture.label(),
                    on_off(synchronous_commit)
                );
                if shape == Shape::Insert {
                    sqlx::raw_sql("truncate bench_events")
                        .execute(&pool)
                        .await
                        .context("truncating bench_events")?;
                }
                if private && matches!(capture, Capture::Tracked | Capture::Wal) {
                    // Our own throwaway database: start each run with an empty outbox.
                    sqlx::raw_sql("truncate realtime.changes").execute(&pool).await?;
                }
                // In wal mode the leading gateway is the listener (its feed
                // LISTENs), and its NOTIFYs carry several changes each.
                let listen = match capture {
                    Capture::None | Capture::Wal => None,
                    Capture::PlainNotify => Some(PLAIN_CHANNEL),
                    Capture::Tracked => Some(channel.as_str()),
                };
                let outbox_before = outbox_end(&pool).await?;
                let listener = match listen {
                    Some(channel) => Some(Listener::start(&target.db_url, channel).await?),
                    None => None,
                };
                bar.update(step * per_variant.as_secs(), what.clone());
                step += 1;
                let cpu_before = CpuReading::take(&pool, target.gateway_pid).await?;
                let writers_started = Instant::now();
                let Hammered {
                    commits,
                    all_commits,
                    errors,
                    first_error,
                } = hammer(&target.db_url, config, shape, synchronous_commit, interrupt).await?;
                // Let the listener drain what is still queued for it.
                let mut notifications = match listener {
                    Some(l) => Some(l.finish(commits).await),
                    None => None,
                };
                // The next variant starts once the leader has written this
                // one's changes (and the switch back to notify needs it).
                let leader = if capture == Capture::Wal {
                    let caught_up = wait_for_leader(&pool, outbox_before, writers_started).await?;
                    notifications = Some(caught_up.changes);
                    Some(caught_up)
                } else {
                    None
                };
                let cpu = CpuReading::take(&pool, target.gateway_pid)
                    .await?
                    .since(&cpu_before, all_commits);
                if let Some(e) = first_error {
                    failures.push(format!("{what}: {e}"));
                }
                if commits == 0 {
                    failures.push(format!("{what}: no commits"));
                }
                results.push(CostResult {
                    shape,
                    capture,
                    synchronous_commit,
                    commits_per_s: commits as f64 / config.duration_s,
                    commits,
                    notifications,
                    errors,
                    leader,
                    cpu,
                });
            }
        }
        if capture == Capture::Wal {
            // What the leader has not written yet is not needed (the bench's
            // own rows): the slot is dropped and a leader recreates it (and
            // writes a history_lost reset), so the switch back to notify
            // drains a fresh slot instead of the wide rows. The slot must
            // exist before the switch: creating one waits for running
            // transactions, the switch's own among them.
            target.stop_gateway().await?;
            discard_slot(&pool).await?;
            target.start_wal_leader(&channel).await?;
            wait_for_slot(&pool).await?;
            set_capture(&pool, Capture::None, &target.db_url).await?;
            target.stop_gateway().await?;
        }
    }
    bar.finish();
    set_capture(&pool, Capture::None, &target.db_url).await?;
    pool.close().await;
    let rate =
        |shape: Shape, capture: Capture, sync: bool| result_of(&results, shape, capture, sync).map(|r| r.commits_per_s);
    let ratio = |shape: Shape, of: Capture, to: Capture| {
        let pct = |sync: bool| match (rate(shape, of, sync), rate(shape, to, sync)) {
            (Some(a), Some(b)) if b > 0.0 => Some(a * 100.0 / b),
            _ => None,
        };
        TrackedVsPlain {
            synchronous_commit_on: pct(true),
            synchronous_commit_off: pct(false),
        }
    };
    let passed = failures.is_empty();
    Ok(CostReport {
        schema: SCHEMA.into(),
        kind: "writers_only".into(),
        started_at,
        target: target.description.clone(),
        config: config.clone(),
        tracked_vs_plain_notify_pct: ratio(Shape::Insert, Capture::Tracked, Capture::PlainNotify),
        wal_vs_untracked_pct: ratio(Shape::Insert, Capture::Wal, Capture::None),
        wide_update_wal_vs_untracked_pct: ratio(Shape::WideUpdate, Capture::Wal, Capture::None),
        results,
        failures,
        passed,
    })
}

/// The result of one variant, if it ran.
fn result_of(results: &[CostResult], shape: Shape, capture: Capture, sync: bool) -> Option<&CostResult> {
    results
        .iter()
        .find(|r| r.shape == shape && r.capture == capture && r.synchronous_commit == sync)
}

/// The last position in the outbox.
async fn outbox_end(pool: &PgPool) -> Result<i64> {
    sqlx::query_scalar("select coalesce(max(position), 0) from realtime.changes")
        .fetch_one(pool)
        .await
        .context("reading the end of the outbox")
}

/// Waits until the wal leader has confirmed the slot past everything
/// committed now (the writers have stopped), and counts what it wrote.
async fn wait_for_leader(pool: &PgPool, outbox_before: i64, writers_started: Instant) -> Result<LeaderCatchUp> {
    let stopped = Instant::now();
    let slot = ws_gateway::db::source_settings(pool)
        .await?
        .and_then(|s| s.slot)
        .context("the database has no wal slot")?;
    let written_upto: String = sqlx::query_scalar("select pg_current_wal_lsn()::text")
        .fetch_one(pool)
        .await?;
    let mut caught_up_in_time = true;
    loop {
        let caught_up: Option<bool> = sqlx::query_scalar(
            "select confirmed_flush_lsn >= $2::pg_lsn from pg_replication_slots where slot_name = $1",
        )
        .bind(&slot)
        .bind(&written_upto)
        .fetch_optional(pool)
        .await?
        .flatten();
        if caught_up == Some(true) {
            break;
        }
        if stopped.elapsed() > LEADER_CATCH_UP_TIMEOUT {
            caught_up_in_time = false;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let behind_s = stopped.elapsed().as_secs_f64();
    let changes: i64 = sqlx::query_scalar("select count(*) from realtime.changes where position > $1")
        .bind(outbox_before)
        .fetch_one(pool)
        .await?;
    let changes = changes.max(0) as u64;
    let run_s = stopped.duration_since(writers_started).as_secs_f64() + behind_s;
    Ok(LeaderCatchUp {
        changes,
        behind_s,
        changes_per_s: changes as f64 / run_s.max(1e-9),
        caught_up: caught_up_in_time,
    })
}

/// Waits until the database's wal slot exists (a leader recreated it).
async fn wait_for_slot(pool: &PgPool) -> Result<()> {
    let slot = ws_gateway::db::source_settings(pool)
        .await?
        .and_then(|s| s.slot)
        .context("the database has no wal slot")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state: Option<String> = sqlx::query_scalar(
            "select p.state from realtime.wal_progress p
              where exists (select 1 from pg_replication_slots where slot_name = $1)",
        )
        .bind(&slot)
        .fetch_optional(pool)
        .await?;
        if state.as_deref() == Some("ok") {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("no wal leader recreated the slot {slot} within 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Drops the database's wal slot (no leader runs): what it held is given up.
async fn discard_slot(pool: &PgPool) -> Result<()> {
    let Some(slot) = ws_gateway::db::source_settings(pool).await?.and_then(|s| s.slot) else {
        return Ok(());
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        sqlx::query(
            "select pg_terminate_backend(active_pid) from pg_replication_slots
              where slot_name = $1 and active_pid is not null",
        )
        .bind(&slot)
        .execute(pool)
        .await?;
        sqlx::query(
            "select pg_drop_replication_slot(slot_name) from pg_replication_slots
              where slot_name = $1 and active_pid is null",
        )
        .bind(&slot)
        .execute(pool)
        .await?;
        let gone: bool =
            sqlx::query_scalar("select not exists (select 1 from pg_replication_slots where slot_name = $1)")
                .bind(&slot)
                .fetch_one(pool)
                .await?;
        if gone {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(anyhow!("the replication slot {slot} is still in use after 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

/// `bench_wide`: one row per writer, with a 100 KB column that the UPDATEs
/// leave alone.
async fn recreate_wide(pool: &PgPool, writers: usize, bytes: usize) -> Result<()> {
    if ws_gateway::db::database_channel(pool).await?.is_some() {
        let exists: bool = sqlx::query_scalar("select to_regclass($1) is not null")
            .bind(WIDE_TABLE)
            .fetch_one(pool)
            .await?;
        if exists {
            ws_gateway::db::untrack(pool, WIDE_TABLE).await?;
        }
    }
    sqlx::raw_sql(&format!(
        "drop table if exists bench_wide;
         create table bench_wide (id bigint primary key, room int not null, counter bigint not null, body text not null);
         insert into bench_wide
         select w, w % {ROOMS}, 0, (select string_agg(md5(w::text || ':' || i::text), '') from generate_series(1, {n}) i)
           from generate_series(1, {writers}) w;",
        n = bytes / 32,
    ))
    .execute(pool)
    .await
    .context("creating the bench_wide table")?;
    Ok(())
}

async fn set_capture(pool: &PgPool, capture: Capture, db_url: &str) -> Result<()> {
    for shape in Shape::ALL {
        ws_gateway::db::untrack(pool, shape.table()).await?;
    }
    sqlx::raw_sql(
        "drop trigger if exists bench_notify on bench_events;
         drop trigger if exists bench_notify on bench_wide;",
    )
    .execute(pool)
    .await?;
    let on_wal = ws_gateway::db::source_settings(pool)
        .await?
        .is_some_and(|s| s.source == "wal");
    if on_wal && capture != Capture::Wal {
        ws_gateway::switch_to_notify(pool, db_url, Duration::from_secs(60))
            .await
            .context("switching the bench database back to notify")?;
    }
    match capture {
        Capture::None => {}
        Capture::PlainNotify => {
            // What the original gateway installed on every table; a row too
            // large for a NOTIFY (which it could not send) goes as its key.
            sqlx::raw_sql(&format!(
                "create or replace function bench_notify() returns trigger language plpgsql as $$
                 declare
                     payload text := row_to_json(NEW)::text;
                 begin
                     if octet_length(payload) >= 8000 then
                         payload := json_build_object('id', NEW.id)::text;
                     end if;
                     perform pg_notify('{PLAIN_CHANNEL}', payload);
                     return null;
                 end $$;
                 create trigger bench_notify after insert or update or delete on bench_events
                     for each row execute function bench_notify();
                 create trigger bench_notify after insert or update or delete on bench_wide
                     for each row execute function bench_notify();"
            ))
            .execute(pool)
            .await
            .context("installing the plain pg_notify trigger")?;
        }
        Capture::Tracked | Capture::Wal => {
            if capture == Capture::Wal && !on_wal {
                ws_gateway::switch_to_wal(pool, None, Duration::from_secs(60))
                    .await
                    .context("switching the bench database to wal")?;
            }
            for shape in Shape::ALL {
                ws_gateway::db::track(
                    pool,
                    shape.table(),
                    &[table::ROOM_TEMPLATE.to_owned()],
                    &Default::default(),
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// What the writers of one variant did.
#[derive(Default)]
struct Hammered {
    /// Commits completed inside the measured window.
    commits: u64,
    /// Commits of the whole run, warmup too.
    all_commits: u64,
    errors: u64,
    first_error: Option<String>,
}

/// Every writer commits as fast as it can for warmup + duration.
async fn hammer(
    db_url: &str,
    config: &CostConfig,
    shape: Shape,
    synchronous_commit: bool,
    interrupt: &CancellationToken,
) -> Result<Hammered> {
    let connected = join_all((0..config.writers).map(|_| connect_writer(db_url))).await;
    let mut writers = Vec::new();
    for writer in connected {
        let writer = writer?;
        writer
            .client
            .batch_execute(&format!("set synchronous_commit = {}", on_off(synchronous_commit)))
            .await
            .context("setting synchronous_commit")?;
        let update = writer
            .client
            .prepare("update bench_wide set counter = counter + 1 where id = $1")
            .await
            .context("preparing the wide UPDATE")?;
        writers.push((writer, update));
    }
    let next_id = Arc::new(AtomicU64::new(1));
    let payload: Arc<str> = table::payload(config.payload_bytes).into();
    let start = Instant::now();
    let measure_from = start + Duration::from_secs_f64(config.warmup_s);
    let end = measure_from + Duration::from_secs_f64(config.duration_s);
    let runs = writers
        .into_iter()
        .enumerate()
        .map(|(w, (writer, update)): (usize, (Writer, _))| {
            let next_id = Arc::clone(&next_id);
            let payload = Arc::clone(&payload);
            let interrupt = interrupt.clone();
            tokio::spawn(async move {
                let mut counted = 0u64;
                let mut all = 0u64;
                let mut errors = 0u64;
                let mut first_error = None;
                // Each writer updates its own wide row: no lock waits between them.
                let own_row = w as i64 + 1;
                while Instant::now() < end && !interrupt.is_cancelled() {
                    let result = match shape {
                        Shape::Insert => {
                            let id = next_id.fetch_add(1, Ordering::Relaxed);
                            let room = (id % ROOMS) as i32;
                            writer
                                .client
                                .execute(
                                    &writer.insert,
                                    &[&(id as i64), &room, &(id as i64), &None::<i64>, &&*payload],
                                )
                                .await
                        }
                        Shape::WideUpdate => writer.client.execute(&update, &[&own_row]).await,
                    };
                    let done = Instant::now();
                    match result {
                        Ok(_) => {
                            all += 1;
                            if done >= measure_from && done < end {
                                counted += 1;
                            }
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| e.to_string());
                            if writer.client.is_closed() {
                                break;
                            }
                        }
                    }
                }
                (counted, all, errors, first_error)
            })
        });
    let mut total = Hammered::default();
    for run in join_all(runs).await {
        let (counted, all, errors, first_error) = run.context("a writer task panicked")?;
        total.commits += counted;
        total.all_commits += all;
        total.errors += errors;
        total.first_error = total.first_error.or(first_error);
    }
    Ok(total)
}

/// A LISTEN connection that drains and counts its channel.
struct Listener {
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    _client: tokio_postgres::Client,
}

impl Listener {
    async fn start(db_url: &str, channel: &str) -> Result<Listener> {
        let (client, mut connection) = tokio_postgres::connect(db_url, NoTls)
            .await
            .context("connecting the LISTEN connection")?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        let task = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(_) = message {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        client
            .batch_execute(&format!("LISTEN \"{channel}\""))
            .await
            .context("LISTEN")?;
        Ok(Listener {
            received,
            task,
            _client: client,
        })
    }

    /// Waits briefly for the backlog (at least `expected` notifications), then stops.
    async fn finish(self, expected: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.received.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.task.abort();
        self.received.load(Ordering::Relaxed)
    }
}

impl CostReport {
    /// Where the CPU went in one shape's untracked and wal variants: the
    /// machine's time per commit, and the wal source's per change.
    fn cpu_line(&self, shape: Shape, sync: bool) -> Option<String> {
        let untracked = result_of(&self.results, shape, Capture::None, sync)?.cpu.as_ref()?;
        let wal = result_of(&self.results, shape, Capture::Wal, sync)?;
        let (cpu, changes) = (wal.cpu.as_ref()?, wal.leader.as_ref()?.changes.max(1) as f64);
        let us = |seconds: f64| seconds * 1e6 / changes;
        Some(format!(
            "CPU           {}, sync_commit={}: untracked {:.0} µs of the machine per commit; wal {:.0} µs per commit, \
             of which the capture {:.0} µs per change (walsender {:.0}, leader's backend {:.0}, gateway {:.0}, \
             its other backends {:.0})",
            shape.label(),
            on_off(sync),
            untracked.per_commit_us(),
            cpu.per_commit_us(),
            us(cpu.capture_s()),
            us(cpu.walsender_s),
            us(cpu.leader_backend_s),
            us(cpu.gateway_s),
            us(cpu.gateway_backends_s),
        ))
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let _ = writeln!(
            s,
            "ws-gateway bench --writers-only: {} writers, {} s per variant (+{} s warmup), payload {} B, one row per commit",
            c.writers,
            report::num(c.duration_s),
            report::num(c.warmup_s),
            c.payload_bytes
        );
        let _ = writeln!(s, "target        {}", self.target);
        for shape in Shape::ALL {
            let _ = writeln!(s, "{}", shape.label());
            let _ = writeln!(
                s,
                "  {:<34} {:>26} {:>26}",
                "capture", "synchronous_commit on", "synchronous_commit off"
            );
            for capture in Capture::ALL {
                let cell = |sync: bool| {
                    let Some(r) = result_of(&self.results, shape, capture, sync) else {
                        return "-".to_owned();
                    };
                    let pct = match (shape, capture) {
                        (Shape::Insert, Capture::Tracked) => &self.tracked_vs_plain_notify_pct,
                        (Shape::Insert, Capture::Wal) => &self.wal_vs_untracked_pct,
                        (Shape::WideUpdate, Capture::Wal) => &self.wide_update_wal_vs_untracked_pct,
                        _ => &TrackedVsPlain::default(),
                    };
                    let pct = if sync {
                        pct.synchronous_commit_on
                    } else {
                        pct.synchronous_commit_off
                    };
                    match pct {
                        Some(p) => format!("{} /s ({p:.1} %)", report::num(r.commits_per_s)),
                        None => format!("{} /s", report::num(r.commits_per_s)),
                    }
                };
                let _ = writeln!(s, "  {:<34} {:>26} {:>26}", capture.label(), cell(true), cell(false));
            }
        }
        let _ = writeln!(
            s,
            "              (notify: % of the plain pg_notify trigger; wal: % of untracked; the targets are at least 90 %)"
        );
        for r in &self.results {
            if let Some(leader) = &r.leader {
                let _ = writeln!(
                    s,
                    "wal leader    {}, sync_commit={}: {} changes written, {} changes/s, {} {:.1} s after the writers stopped",
                    r.shape.label(),
                    on_off(r.synchronous_commit),
                    leader.changes,
                    report::num(leader.changes_per_s),
                    if leader.caught_up { "caught up" } else { "still behind" },
                    leader.behind_s
                );
            }
        }
        for shape in Shape::ALL {
            for sync in [true, false] {
                if let Some(line) = self.cpu_line(shape, sync) {
                    let _ = writeln!(s, "{line}");
                }
            }
        }
        if self.passed {
            let _ = writeln!(s, "result        PASS");
        } else {
            let _ = writeln!(s, "result        FAIL: {}", self.failures.join("; "));
        }
        s
    }
}
