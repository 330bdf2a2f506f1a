//! A delivery run from start to report: target up, table created, clients
//! connected and subscribed (memory measured idle), writers and floor ready,
//! then write, drain, stop, count.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::clients::{self, ClientContext, ClientEnd, ClientOutcome, ClientProbe};
use super::clock::{Clock, SendLog};
use super::floor::{FloorOutcome, FloorSpec};
use super::latency::{Collector, LatencyRecorder, LatencySummary};
use super::ledger::Tally;
use super::plan::{BenchArgs, Plan};
use super::procfs::{self, MachineCpu};
use super::progress::Progress;
use super::report::{
    self, BenchUsage, Connections, Deliveries, FloorResult, GatewayUsage, Interval, MachineUsage, PostgresUsage,
    Report, RunConfig, Writes,
};
use super::table;
use super::target::{Server, Target, TargetOptions};
use super::writers::{DbSide, WriteOutcome, WriteProgress, WriterSpec};

/// Latency histogram shards for the clients (see latency.rs).
const LATENCY_SHARDS: usize = 32;
/// How often the monitor looks at progress while writing and draining.
const TICK: Duration = Duration::from_millis(20);
/// How often latencies are collected for the progress bar.
const COLLECT_EVERY: Duration = Duration::from_secs(1);
/// Quiet time between the last `subscribed` and the idle memory reading.
const SETTLE: Duration = Duration::from_secs(1);

pub async fn run(args: &BenchArgs, interrupt: CancellationToken) -> Result<Report> {
    let plan = Plan::resolve(args).map_err(|e| anyhow!(e))?;
    let fd_limit = procfs::raise_fd_limit();
    let needed = plan.connections as u64 + 256;
    if fd_limit < needed {
        bail!(
            "the open-file limit is {fd_limit} and {} connections need about {needed}: raise the hard limit (`ulimit -Hn`)",
            plan.connections
        );
    }
    let options = TargetOptions {
        gateway: args.gateway.clone(),
        gateway_pid: args.gateway_pid,
        db: args.db.clone(),
        // With --fanout-floor, the floor serves first (`serve_with`).
        needs_gateway: plan.needs_gateway() && !plan.fanout_floor,
        connections: plan.connections,
        channel: args.channel.clone(),
        source: args.source,
    };
    let mut target = Target::start(&options).await?;
    let outcome = async {
        let floor = if plan.fanout_floor {
            target.serve_with(Server::FanoutFloor, &options).await?;
            let floor = measure(&plan, args, &mut target, &interrupt).await?;
            target.serve_with(Server::Gateway, &options).await?;
            Some(floor)
        } else {
            None
        };
        let mut report = measure(&plan, args, &mut target, &interrupt).await?;
        if let Some(floor) = &floor {
            report.attach_fanout_floor(floor);
        }
        Ok::<_, anyhow::Error>(report)
    }
    .await;
    let stopped = target.shutdown().await;
    let report = outcome?;
    if let Err(e) = stopped {
        tracing::warn!(error = format!("{e:#}"), "cleaning up after the run");
    }
    Ok(report)
}

/// CPU and time at one moment.
struct Usage {
    at: Instant,
    gateway_cpu: Option<Duration>,
    gateway_switches: Option<procfs::Switches>,
    postgres_cpu: Option<Duration>,
    bench_cpu: Duration,
    machine: Option<MachineCpu>,
}

impl Usage {
    fn now(target: &Target) -> Usage {
        Usage {
            at: Instant::now(),
            gateway_cpu: target.gateway_pid.and_then(procfs::process_cpu),
            gateway_switches: target.gateway_pid.and_then(procfs::process_switches),
            postgres_cpu: target.postgres_pid.and_then(procfs::process_tree_cpu),
            bench_cpu: procfs::self_cpu(),
            machine: MachineCpu::now(),
        }
    }
}

fn delta(later: Option<Duration>, earlier: Option<Duration>) -> Option<f64> {
    Some(later?.saturating_sub(earlier?).as_secs_f64())
}

async fn measure(plan: &Plan, args: &BenchArgs, target: &mut Target, interrupt: &CancellationToken) -> Result<Report> {
    let started_at = ws_gateway::change::format_rfc3339_micros(ws_gateway::change::now_us());
    let pool = table::connect(&target.db_url).await?;
    let channel = table::ensure_realtime(&pool, &args.channel).await?;
    table::recreate(&pool).await?;
    table::track(&pool).await?;
    pool.close().await;

    let clock = Clock::new();
    let total_rows = plan.total_rows();
    let send_log = Arc::new(SendLog::new(clock, total_rows));
    let latency = Arc::new(LatencyRecorder::new(LATENCY_SHARDS));
    let floor_latency = Arc::new(LatencyRecorder::new(1));
    let rooms = plan.rooms as u64;

    if let Some(url) = target.ws_url() {
        clients::preflight(&url, plan.encoding, &target.db_url).await?;
    }

    // Idle memory: before any client, then with all of them subscribed.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let memory_before = target.gateway_pid.and_then(procfs::process_memory);

    let stop_clients = CancellationToken::new();
    let ctx = Arc::new(ClientContext {
        url: target.ws_url().unwrap_or_default(),
        rooms,
        encoding: plan.encoding,
        read_buffer_bytes: plan.read_buffer_bytes,
        measure_after_id: plan.warmup_rows(),
        send_log: Arc::clone(&send_log),
        latency: Arc::clone(&latency),
        connecting: Arc::new(Semaphore::new(plan.connect_concurrency)),
        stop: stop_clients.clone(),
    });
    let clients = connect_clients(plan, ctx, interrupt).await?;
    let memory_after = if clients.connected > 0 {
        tokio::time::sleep(SETTLE).await;
        target.gateway_pid.and_then(procfs::process_memory)
    } else {
        memory_before
    };

    let progress = Arc::new(WriteProgress::new(rooms));
    let floor_spec = plan.floor.then(|| FloorSpec {
        db_url: target.db_url.clone(),
        channel: channel.clone(),
        measure_after_id: plan.warmup_rows(),
    });
    let mut db_side = DbSide::start(
        WriterSpec {
            db_url: target.db_url.clone(),
            writers: plan.writers,
            schedule: plan.schedule,
            total_rows,
            rooms,
            payload_bytes: plan.payload_bytes,
            run_seed: ws_gateway::change::now_us() as u64,
            measure_after_id: plan.warmup_rows(),
        },
        floor_spec,
        Arc::clone(&send_log),
        Arc::clone(&progress),
        Arc::clone(&floor_latency),
        interrupt.clone(),
    )
    .await?;

    let bar = Progress::new(!args.no_progress, total_rows, plan.scenario.as_str());
    let mut collector = Collector::new();
    let syscalls = target.gateway_pid.and_then(procfs::SyscallCount::start);
    if syscalls.is_some() {
        // perf attaches to the process's threads.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let usage_start = Usage::now(target);
    db_side.go();
    let watched = Watch {
        plan,
        progress: &progress,
        probes: &clients.probes,
        latency: &latency,
        bar: &bar,
        usage_start: &usage_start,
        interrupt,
    }
    .run(target, &mut db_side, &mut collector)
    .await?;
    let usage_end = Usage::now(target);
    let syscalls = syscalls.and_then(procfs::SyscallCount::finish);
    let memory_end = target.gateway_pid.and_then(procfs::process_memory);
    bar.finish();

    stop_clients.cancel();
    let mut outcomes = Vec::with_capacity(clients.handles.len());
    for handle in clients.handles {
        outcomes.push(handle.await.context("a client task panicked")?);
    }
    let floor = db_side.finish().await;
    collector.collect(&latency);
    let mut floor_collector = Collector::new();
    floor_collector.collect(&floor_latency);
    let writes = watched.writes;
    let mut commit_collector = Collector::new();
    commit_collector.collect(&progress.commit_latency);

    let report = assemble(Assembly {
        plan,
        started_at,
        target,
        writes: &writes,
        outcomes: &outcomes,
        floor,
        latency: LatencySummary::of(&collector.total),
        floor_latency: LatencySummary::of(&floor_collector.total),
        commit_latency: LatencySummary::of(&commit_collector.total),
        connected: clients.connected,
        connect_s: clients.connect_s,
        usage: (&usage_start, &usage_end),
        syscalls,
        memory: (memory_before, memory_after, memory_end),
        intervals: watched.intervals,
        extra_failures: watched.failures,
    });
    Ok(report)
}

/// The clients, connected and subscribed (or failed).
struct Clients {
    probes: Vec<Arc<ClientProbe>>,
    handles: Vec<tokio::task::JoinHandle<ClientOutcome>>,
    connected: usize,
    /// From the first connect to the last `subscribed` (or failure).
    connect_s: f64,
}

/// Starts every client and waits until each has subscribed or failed.
async fn connect_clients(plan: &Plan, ctx: Arc<ClientContext>, interrupt: &CancellationToken) -> Result<Clients> {
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    let mut probes = Vec::with_capacity(plan.connections);
    let mut handles = Vec::with_capacity(plan.connections);
    for index in 0..plan.connections {
        let probe = Arc::new(ClientProbe::new(plan.room_of_client(index)));
        probes.push(Arc::clone(&probe));
        handles.push(tokio::spawn(clients::run_client(
            index,
            Arc::clone(&ctx),
            probe,
            ready_tx.clone(),
        )));
    }
    drop(ready_tx);
    let mut connected = 0;
    let mut answered = 0;
    while answered < plan.connections {
        tokio::select! {
            ok = ready_rx.recv() => match ok {
                Some(ok) => {
                    answered += 1;
                    connected += usize::from(ok);
                }
                None => break,
            },
            () = interrupt.cancelled() => {
                ctx.stop.cancel();
                bail!("interrupted while connecting");
            }
        }
    }
    Ok(Clients {
        probes,
        handles,
        connected,
        connect_s: started.elapsed().as_secs_f64(),
    })
}

/// What watching the writes and the drain produced.
struct Watched {
    writes: WriteOutcome,
    intervals: Vec<Interval>,
    /// Why the run cannot be trusted beyond its counts (interrupted, the
    /// gateway died).
    failures: Vec<String>,
}

/// Watches the writers, then the drain (until every connected client, and
/// the floor, has every committed row of its room, or the drain timeout),
/// keeping the progress bar and the interval lines.
struct Watch<'a> {
    plan: &'a Plan,
    progress: &'a WriteProgress,
    probes: &'a [Arc<ClientProbe>],
    latency: &'a LatencyRecorder,
    bar: &'a Progress,
    usage_start: &'a Usage,
    interrupt: &'a CancellationToken,
}

impl Watch<'_> {
    async fn run(self, target: &mut Target, db_side: &mut DbSide, collector: &mut Collector) -> Result<Watched> {
        let plan = self.plan;
        let mut writes: Option<WriteOutcome> = None;
        let mut drain_deadline = None;
        let mut failures = Vec::new();
        let mut intervals = Vec::new();
        let mut last_collect = Instant::now();
        let mut last_interval = Usage::now(target);
        let mut writes_done = db_side.writes();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                done = &mut writes_done, if writes.is_none() => {
                    writes = Some(done?);
                    drain_deadline = Some(Instant::now() + plan.drain_timeout);
                }
                _ = tick.tick() => {}
            }
            if let Some(why) = target.gateway_exited() {
                failures.push(why);
                break;
            }
            let committed: Vec<u64> = self
                .progress
                .committed_per_room
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect();
            let (delivered, in_flight, dropped) = delivery_state(self.probes, &committed);
            if last_collect.elapsed() >= COLLECT_EVERY {
                collector.collect(self.latency);
                last_collect = Instant::now();
            }
            let p99 = LatencySummary::of(&collector.total).p99;
            self.bar.update(
                self.progress.committed.load(Ordering::Relaxed),
                format!(
                    "delivered {delivered}  in flight {in_flight}  dropped {dropped}  p99 {} ms",
                    p99.map(report::num).unwrap_or_else(|| "-".into())
                ),
            );
            if let Some(every) = plan.report_every
                && last_interval.at.elapsed() >= every
            {
                collector.collect(self.latency);
                let now = Usage::now(target);
                let bench_cpu = now.bench_cpu.saturating_sub(last_interval.bench_cpu).as_secs_f64();
                let line = Interval {
                    elapsed_s: now.at.duration_since(self.usage_start.at).as_secs_f64(),
                    committed: committed.iter().sum(),
                    delivered,
                    in_flight,
                    dropped_connections: dropped,
                    latency_ms: collector.take_window(),
                    gateway_cpu_pct: delta(now.gateway_cpu, last_interval.gateway_cpu)
                        .and_then(|cpu| percent_of_core(cpu, &now, &last_interval)),
                    gateway_rss_bytes: target.gateway_pid.and_then(procfs::process_memory).map(|m| m.rss),
                    bench_cpu_pct: percent_of_core(bench_cpu, &now, &last_interval).unwrap_or(0.0),
                };
                self.bar.println(&line.to_text());
                intervals.push(line);
                last_interval = now;
            }
            if self.interrupt.is_cancelled() {
                failures.push("interrupted".to_owned());
                if writes.is_none() {
                    writes = Some((&mut writes_done).await?);
                }
                break;
            }
            let floor_pending = plan.floor
                && self.progress.floor_delivered.load(Ordering::Relaxed)
                    < self.progress.committed.load(Ordering::Relaxed);
            if let Some(deadline) = drain_deadline
                && ((in_flight == 0 && !floor_pending) || Instant::now() >= deadline)
            {
                break;
            }
        }
        Ok(Watched {
            writes: writes.unwrap_or_default(),
            intervals,
            failures,
        })
    }
}

/// CPU seconds as a percentage of one core over the time between two readings.
fn percent_of_core(cpu_s: f64, later: &Usage, earlier: &Usage) -> Option<f64> {
    let seconds = later.at.duration_since(earlier.at).as_secs_f64();
    (seconds > 0.0).then_some(cpu_s * 100.0 / seconds)
}

/// Delivered (distinct, all clients), still expected by live clients, and
/// clients that ended early.
fn delivery_state(probes: &[Arc<ClientProbe>], committed: &[u64]) -> (u64, u64, usize) {
    let mut delivered = 0;
    let mut in_flight = 0;
    let mut dropped = 0;
    for probe in probes {
        let got = probe.delivered.load(Ordering::Relaxed);
        delivered += got;
        if probe.ended.load(Ordering::Relaxed) {
            dropped += 1;
        } else {
            in_flight += committed[probe.room as usize].saturating_sub(got);
        }
    }
    (delivered, in_flight, dropped)
}

struct Assembly<'a> {
    plan: &'a Plan,
    started_at: String,
    target: &'a Target,
    writes: &'a WriteOutcome,
    outcomes: &'a [ClientOutcome],
    floor: Option<FloorOutcome>,
    latency: LatencySummary,
    floor_latency: LatencySummary,
    commit_latency: LatencySummary,
    connected: usize,
    connect_s: f64,
    usage: (&'a Usage, &'a Usage),
    /// The gateway's system calls over the window, when perf could count them.
    syscalls: Option<u64>,
    memory: (Option<procfs::Memory>, Option<procfs::Memory>, Option<procfs::Memory>),
    intervals: Vec<Interval>,
    extra_failures: Vec<String>,
}

fn assemble(a: Assembly<'_>) -> Report {
    let plan = a.plan;
    let mut tally = Tally::default();
    let mut connect_errors = 0;
    let mut dropped = 0;
    let mut first_error = None;
    let mut slow_path_frames = 0;
    let mut change_frames = 0;
    let mut compressed_frames = 0;
    let mut protocol_errors = 0;
    let mut last_receive_us = 0;
    let mut extra = a.extra_failures;
    for outcome in a.outcomes {
        let expected = a.writes.committed_per_room[outcome.ledger.room() as usize];
        slow_path_frames += outcome.slow_frames;
        change_frames += outcome.change_frames;
        compressed_frames += outcome.compressed_frames;
        protocol_errors += outcome.protocol_errors;
        last_receive_us = last_receive_us.max(outcome.last_receive_us);
        let error = match &outcome.end {
            ClientEnd::Stopped => None,
            ClientEnd::ConnectFailed(e) => {
                connect_errors += 1;
                Some(e)
            }
            ClientEnd::Dropped(e) => {
                dropped += 1;
                Some(e)
            }
            ClientEnd::Undecodable(e) => {
                if !extra.contains(e) {
                    extra.push(e.clone());
                }
                Some(e)
            }
        };
        if first_error.is_none() {
            first_error = error.cloned();
        }
        if !matches!(outcome.end, ClientEnd::ConnectFailed(_)) {
            tally.add(&outcome.ledger, expected);
        }
    }
    let writes = a.writes;
    let committed = writes.committed();
    let write_s = (writes.last_commit_us.saturating_sub(writes.first_send_us)) as f64 / 1e6;
    let delivery_s = (last_receive_us.saturating_sub(writes.first_send_us)) as f64 / 1e6;
    let per_s = if delivery_s > 0.0 {
        tally.delivered as f64 / delivery_s
    } else {
        0.0
    };
    let (start, end) = a.usage;
    let gateway_cpu = delta(end.gateway_cpu, start.gateway_cpu);
    let (before, after, at_end) = a.memory;
    let switches = match (end.gateway_switches, start.gateway_switches) {
        (Some(e), Some(s)) => Some((
            e.voluntary.saturating_sub(s.voluntary),
            e.involuntary.saturating_sub(s.involuntary),
        )),
        _ => None,
    };
    let per_delivery = |n: u64| (tally.delivered > 0).then(|| n as f64 / tally.delivered as f64);
    let gateway = a.target.gateway_pid.map(|pid| GatewayUsage {
        pid,
        cpu_s: gateway_cpu,
        cpu_ms_per_1k_deliveries: gateway_cpu.and_then(|c| report::cpu_ms_per_1k(c, tally.delivered)),
        peak_rss_bytes: at_end.map(|m| m.peak_rss),
        rss_before_clients_bytes: before.map(|m| m.rss),
        rss_after_clients_bytes: after.map(|m| m.rss),
        rss_per_connection_bytes: match (before, after) {
            (Some(b), Some(af)) if a.connected > 0 => Some((af.rss as f64 - b.rss as f64) / a.connected as f64),
            _ => None,
        },
        wakeups: switches.map(|(voluntary, _)| voluntary),
        preemptions: switches.map(|(_, involuntary)| involuntary),
        wakeups_per_delivery: switches.and_then(|(voluntary, _)| per_delivery(voluntary)),
        syscalls: a.syscalls,
        syscalls_per_delivery: a.syscalls.and_then(per_delivery),
    });
    let bench_cpu = end.bench_cpu.saturating_sub(start.bench_cpu).as_secs_f64();
    let floor = a.floor.map(|f| {
        let mut floor_tally = Tally::default();
        floor_tally.add(&f.ledger, committed);
        FloorResult {
            tally: floor_tally,
            latency_ms: a.floor_latency,
            error: f.error,
        }
    });
    let mut report = Report {
        schema: report::SCHEMA.into(),
        kind: "delivery".into(),
        scenario: plan.scenario.as_str().into(),
        started_at: a.started_at,
        config: RunConfig {
            connections: plan.connections,
            rooms: plan.rooms,
            rate: plan.schedule.mean_rate(),
            burst_size: plan.schedule.burst_size(),
            payload_bytes: plan.payload_bytes,
            duration_s: plan.duration.as_secs_f64(),
            warmup_s: plan.warmup.as_secs_f64(),
            writers: plan.writers,
            encoding: plan.encoding.as_str().into(),
            floor: plan.floor,
            source: plan.source.as_str().into(),
        },
        target: a.target.description.clone(),
        writes: Writes {
            planned: plan.total_rows(),
            committed,
            failed: writes.failed,
            commits_per_s: if write_s > 0.0 { committed as f64 / write_s } else { 0.0 },
            max_behind_schedule_ms: writes.max_behind.as_secs_f64() * 1000.0,
            commit_ms: a.commit_latency,
            first_error: writes.first_error.clone(),
        },
        deliveries: Deliveries {
            tally,
            per_s,
            frames_per_delivery: (tally.delivered > 0).then(|| change_frames as f64 / tally.delivered as f64),
        },
        latency_ms: a.latency,
        connections: Connections {
            requested: plan.connections,
            connected: a.connected,
            connect_errors,
            dropped,
            connect_s: a.connect_s,
            first_error,
            change_frames,
            compressed_frames,
            slow_path_frames,
            protocol_errors,
        },
        gateway,
        postgres: delta(end.postgres_cpu, start.postgres_cpu).map(|cpu_s| PostgresUsage { cpu_s }),
        bench: BenchUsage {
            cpu_s: bench_cpu,
            cpu_ms_per_1k_deliveries: report::cpu_ms_per_1k(bench_cpu, tally.delivered),
        },
        machine: MachineUsage {
            cpus: procfs::cpus(),
            busy_pct: match (end.machine, start.machine) {
                (Some(e), Some(s)) => e.busy_pct_since(&s),
                _ => None,
            },
            irq_cpu_s: match (end.machine, start.machine) {
                (Some(e), Some(s)) => e.irq_seconds_since(&s),
                _ => None,
            },
            other_cpu_s: match (end.machine, start.machine) {
                (Some(e), Some(s)) => e.busy_seconds_since(&s).map(|busy| {
                    (busy
                        - bench_cpu
                        - gateway_cpu.unwrap_or(0.0)
                        - delta(end.postgres_cpu, start.postgres_cpu).unwrap_or(0.0))
                    .max(0.0)
                }),
                _ => None,
            },
        },
        floor,
        fanout_floor: None,
        intervals: a.intervals,
        failures: Vec::new(),
        passed: false,
    };
    report.judge(extra);
    report
}
