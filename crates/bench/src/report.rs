//! A run's results: the JSON document (`--json`, and what `--baseline`
//! reads back) and its text summary. Pure: built from plain numbers.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::latency::LatencySummary;
use super::ledger::Tally;

/// Identifies the JSON document and its version.
pub const SCHEMA: &str = "ws-gateway-bench/1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    /// `delivery` (this struct); `--writers-only` writes a `writers_only` document.
    pub kind: String,
    pub scenario: String,
    /// RFC 3339, UTC.
    pub started_at: String,
    pub config: RunConfig,
    pub target: String,
    pub writes: Writes,
    pub deliveries: Deliveries,
    /// Commit-to-receive at the bench's clients, from just before the INSERT
    /// was sent to the frame's arrival, on one clock.
    pub latency_ms: LatencySummary,
    pub connections: Connections,
    pub gateway: Option<GatewayUsage>,
    pub postgres: Option<PostgresUsage>,
    pub bench: BenchUsage,
    pub machine: MachineUsage,
    /// Commit-to-NOTIFY at one plain LISTEN connection in the same run.
    pub floor: Option<FloorResult>,
    /// The same scenario served by the bench's minimal fan-out server,
    /// just before the gateway (`--fanout-floor`).
    #[serde(default)]
    pub fanout_floor: Option<FanoutFloorResult>,
    /// Stability lines (`--report-every`).
    pub intervals: Vec<Interval>,
    /// Why the run failed; empty when it passed.
    pub failures: Vec<String>,
    pub passed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub connections: usize,
    pub rooms: usize,
    /// Mean commits per second asked for.
    pub rate: f64,
    pub burst_size: Option<u64>,
    pub payload_bytes: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub writers: usize,
    pub encoding: String,
    pub floor: bool,
    /// The capture source: `notify` or `wal` (older reports: notify).
    #[serde(default = "notify")]
    pub source: String,
}

fn notify() -> String {
    "notify".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Writes {
    pub planned: u64,
    pub committed: u64,
    pub failed: u64,
    /// Committed rows over the writing time (first send to last commit).
    pub commits_per_s: f64,
    /// The worst lag of a send behind its schedule: writers (or the
    /// database) that could not keep the rate.
    pub max_behind_schedule_ms: f64,
    /// Each INSERT from send to its commit acknowledged at the writer
    /// (includes the capture trigger's work at COMMIT).
    pub commit_ms: LatencySummary,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deliveries {
    #[serde(flatten)]
    pub tally: Tally,
    /// Distinct deliveries over the time from the first send to the last
    /// arrival.
    pub per_s: f64,
    /// Frames that carried changes over deliveries: 1 when every change
    /// went in a frame of its own, less when the server merged them.
    #[serde(default)]
    pub frames_per_delivery: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connections {
    pub requested: usize,
    pub connected: usize,
    pub connect_errors: usize,
    /// Connections the gateway closed (or that broke) mid-run.
    pub dropped: usize,
    /// Seconds from the first connect to the last `subscribed`.
    pub connect_s: f64,
    pub first_error: Option<String>,
    /// Frames that carried changes, and of those the compressed ones: the
    /// gateway's batching and compression as the clients saw them.
    pub change_frames: u64,
    pub compressed_frames: u64,
    /// Frames the clients needed a full JSON parse for (the scan failed).
    pub slow_path_frames: u64,
    /// `error` and `reset` messages received.
    pub protocol_errors: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayUsage {
    pub pid: u32,
    /// CPU over the measured window (writers' start to the end of the drain).
    pub cpu_s: Option<f64>,
    pub cpu_ms_per_1k_deliveries: Option<f64>,
    pub peak_rss_bytes: Option<u64>,
    pub rss_before_clients_bytes: Option<u64>,
    pub rss_after_clients_bytes: Option<u64>,
    /// (RSS with every client connected and subscribed, idle) minus (RSS
    /// before any), over the clients.
    pub rss_per_connection_bytes: Option<f64>,
    /// Voluntary context switches of all its threads over the measured
    /// window: each is a thread that waited (epoll, a futex) and was woken.
    #[serde(default)]
    pub wakeups: Option<u64>,
    /// Involuntary ones: a thread preempted (by the bench, PostgreSQL...).
    #[serde(default)]
    pub preemptions: Option<u64>,
    #[serde(default)]
    pub wakeups_per_delivery: Option<f64>,
    /// System calls over the measured window (`perf stat` on
    /// raw_syscalls:sys_enter; none without perf).
    #[serde(default)]
    pub syscalls: Option<u64>,
    #[serde(default)]
    pub syscalls_per_delivery: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PostgresUsage {
    /// The postmaster and every backend, over the measured window.
    pub cpu_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchUsage {
    /// This process (writers, clients, floor) over the measured window.
    pub cpu_s: f64,
    pub cpu_ms_per_1k_deliveries: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MachineUsage {
    pub cpus: usize,
    /// Percent of all cores busy over the measured window.
    pub busy_pct: Option<f64>,
    /// Of the busy time, seconds in interrupts and softirqs: mostly the
    /// loopback TCP traffic between the three. Also charged, tick by tick, to
    /// whichever process was running (mostly the sender), so it overlaps the
    /// per-process numbers.
    pub irq_cpu_s: Option<f64>,
    /// Busy CPU seconds not charged to the gateway, PostgreSQL or the bench:
    /// other work on the machine that the numbers competed with.
    pub other_cpu_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorResult {
    #[serde(flatten)]
    pub tally: Tally,
    pub latency_ms: LatencySummary,
    pub error: Option<String>,
}

/// The fan-out floor's run, as the gateway's report shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutFloorResult {
    /// What served the clients.
    pub target: String,
    #[serde(flatten)]
    pub tally: Tally,
    pub per_s: f64,
    pub latency_ms: LatencySummary,
    pub cpu_s: Option<f64>,
    pub cpu_ms_per_1k_deliveries: Option<f64>,
    pub frames_per_delivery: Option<f64>,
    pub wakeups_per_delivery: Option<f64>,
    pub syscalls_per_delivery: Option<f64>,
    pub machine_busy_pct: Option<f64>,
    /// The gateway's CPU per 1k deliveries over the floor's, in this run.
    pub gateway_cpu_ratio: Option<f64>,
    /// Why the floor's own run failed (its clients lost something...).
    pub failures: Vec<String>,
}

/// One stability line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Interval {
    pub elapsed_s: f64,
    pub committed: u64,
    pub delivered: u64,
    /// Committed for connected clients and not yet delivered to them.
    pub in_flight: u64,
    pub dropped_connections: usize,
    /// This interval's deliveries.
    pub latency_ms: LatencySummary,
    pub gateway_cpu_pct: Option<f64>,
    pub gateway_rss_bytes: Option<u64>,
    pub bench_cpu_pct: f64,
}

impl Report {
    /// Adds the fan-out floor's run (`floor`, the same scenario just before
    /// this one) and the ratio of this run's CPU per delivery to it; the
    /// floor's failures fail this report too.
    pub fn attach_fanout_floor(&mut self, floor: &Report) {
        let usage = floor.gateway.as_ref();
        let floor_cpu = usage.and_then(|g| g.cpu_ms_per_1k_deliveries);
        let gateway_cpu = self.gateway.as_ref().and_then(|g| g.cpu_ms_per_1k_deliveries);
        let result = FanoutFloorResult {
            target: floor.target.clone(),
            tally: floor.deliveries.tally,
            per_s: floor.deliveries.per_s,
            latency_ms: floor.latency_ms,
            cpu_s: usage.and_then(|g| g.cpu_s),
            cpu_ms_per_1k_deliveries: floor_cpu,
            frames_per_delivery: floor.deliveries.frames_per_delivery,
            wakeups_per_delivery: usage.and_then(|g| g.wakeups_per_delivery),
            syscalls_per_delivery: usage.and_then(|g| g.syscalls_per_delivery),
            machine_busy_pct: floor.machine.busy_pct,
            gateway_cpu_ratio: match (gateway_cpu, floor_cpu) {
                (Some(g), Some(f)) if f > 0.0 => Some(g / f),
                _ => None,
            },
            failures: floor.failures.clone(),
        };
        for failure in &result.failures {
            self.failures.push(format!("fan-out floor: {failure}"));
        }
        self.passed = self.failures.is_empty();
        self.fanout_floor = Some(result);
    }

    /// Fills `failures` and `passed` from the counts.
    pub fn judge(&mut self, extra: Vec<String>) {
        let mut failures = Vec::new();
        let t = &self.deliveries.tally;
        if t.lost > 0 {
            failures.push(format!("{} deliveries lost", t.lost));
        }
        if t.duplicated > 0 {
            failures.push(format!("{} deliveries duplicated", t.duplicated));
        }
        if t.out_of_order > 0 {
            failures.push(format!("{} deliveries out of commit order", t.out_of_order));
        }
        if t.unexpected > 0 {
            failures.push(format!("{} deliveries of rows not expected", t.unexpected));
        }
        if self.connections.connect_errors > 0 {
            failures.push(format!(
                "{} of {} connections failed",
                self.connections.connect_errors, self.connections.requested
            ));
        }
        if self.writes.failed > 0 {
            failures.push(format!("{} INSERTs failed", self.writes.failed));
        }
        if let Some(floor) = &self.floor {
            if !floor.tally.is_clean() {
                failures.push(format!(
                    "the floor listener lost {} and duplicated {} notifications",
                    floor.tally.lost, floor.tally.duplicated
                ));
            }
            if let Some(e) = &floor.error {
                failures.push(e.clone());
            }
        }
        failures.extend(extra);
        self.passed = failures.is_empty();
        self.failures = failures;
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let c = &self.config;
        let shape = match c.burst_size {
            Some(size) => format!("bursts of {size} commits every {:.2} s", size as f64 / c.rate),
            None => format!("{} commits/s", num(c.rate)),
        };
        let _ = writeln!(
            s,
            "ws-gateway bench: {} -- {} connections in {} rooms, {shape} for {} s (+{} s warmup), \
             payload {} B, {} writers, encoding {}",
            self.scenario,
            c.connections,
            c.rooms,
            num(c.duration_s),
            num(c.warmup_s),
            c.payload_bytes,
            c.writers,
            c.encoding
        );
        let _ = writeln!(s, "target        {}", self.target);
        let w = &self.writes;
        let _ = writeln!(
            s,
            "writes        {} committed of {} planned, {} failed, {} commits/s (worst {} ms behind schedule)",
            w.committed,
            w.planned,
            w.failed,
            num(w.commits_per_s),
            num(w.max_behind_schedule_ms)
        );
        let _ = writeln!(
            s,
            "commit ms     {}   INSERT sent to commit acknowledged",
            percentiles(&w.commit_ms)
        );
        let t = &self.deliveries.tally;
        let _ = writeln!(
            s,
            "deliveries    expected {}  delivered {}  lost {}  duplicated {}  out-of-order {}  unexpected {}",
            t.expected, t.delivered, t.lost, t.duplicated, t.out_of_order, t.unexpected
        );
        let _ = writeln!(s, "throughput    {} deliveries/s", num(self.deliveries.per_s));
        let _ = writeln!(
            s,
            "latency ms    {}   commit-to-receive at the clients",
            percentiles(&self.latency_ms)
        );
        if let Some(floor) = &self.floor {
            let _ = writeln!(
                s,
                "floor ms      {}   commit-to-NOTIFY, plain LISTEN, same run ({} of {} received)",
                percentiles(&floor.latency_ms),
                floor.tally.delivered,
                floor.tally.expected
            );
            if let (Some(gw), Some(fl)) = (self.latency_ms.p99, floor.latency_ms.p99) {
                let _ = writeln!(s, "              P99 above the floor: {} ms", num(gw - fl));
            }
        }
        let k = &self.connections;
        let _ = writeln!(
            s,
            "connections   {} of {} connected in {} s, {} connect errors, {} dropped mid-run{}",
            k.connected,
            k.requested,
            num(k.connect_s),
            k.connect_errors,
            k.dropped,
            k.first_error
                .as_deref()
                .map(|e| format!(" (first: {e})"))
                .unwrap_or_default()
        );
        if k.change_frames > 0 {
            let _ = writeln!(
                s,
                "frames        {} carried changes ({} changes per frame), {} of them compressed",
                k.change_frames,
                num(self.deliveries.tally.delivered as f64 / k.change_frames as f64),
                k.compressed_frames
            );
        }
        if k.slow_path_frames > 0 || k.protocol_errors > 0 {
            let _ = writeln!(
                s,
                "              {} frames needed a full parse, {} error/reset messages",
                k.slow_path_frames, k.protocol_errors
            );
        }
        if let Some(g) = &self.gateway {
            let _ = writeln!(
                s,
                "gateway       cpu {} s ({} ms per 1k deliveries), peak rss {}, {} per idle connection",
                opt(g.cpu_s),
                opt(g.cpu_ms_per_1k_deliveries),
                opt_bytes(g.peak_rss_bytes),
                g.rss_per_connection_bytes
                    .map(|b| bytes(b as u64))
                    .unwrap_or_else(|| "-".into())
            );
            let _ = writeln!(
                s,
                "per delivery  {} frames, {} wake-ups, {} system calls ({} wake-ups, {} preemptions, {} system calls in all)",
                opt(self.deliveries.frames_per_delivery),
                opt(g.wakeups_per_delivery),
                opt(g.syscalls_per_delivery),
                g.wakeups.map_or("-".into(), |n| n.to_string()),
                g.preemptions.map_or("-".into(), |n| n.to_string()),
                g.syscalls.map_or("-".into(), |n| n.to_string())
            );
        }
        if let Some(f) = &self.fanout_floor {
            let _ = writeln!(
                s,
                "fan-out floor cpu {} ms per 1k deliveries: the gateway's is {}x; {} deliveries/s, {} lost, latency {}",
                opt(f.cpu_ms_per_1k_deliveries),
                opt(f.gateway_cpu_ratio),
                num(f.per_s),
                f.tally.lost,
                percentiles(&f.latency_ms)
            );
            let _ = writeln!(
                s,
                "              per delivery {} frames, {} wake-ups, {} system calls; machine {} % busy (the same scenario, just before)",
                opt(f.frames_per_delivery),
                opt(f.wakeups_per_delivery),
                opt(f.syscalls_per_delivery),
                opt(f.machine_busy_pct)
            );
        }
        if let Some(p) = &self.postgres {
            let _ = writeln!(s, "postgres      cpu {} s", num(p.cpu_s));
        }
        let _ = writeln!(
            s,
            "bench         cpu {} s ({} ms per 1k deliveries)",
            num(self.bench.cpu_s),
            opt(self.bench.cpu_ms_per_1k_deliveries)
        );
        let _ = writeln!(
            s,
            "machine       {} cpus, {} % busy (softirq {} cpu s of it); other processes {} cpu s",
            self.machine.cpus,
            opt(self.machine.busy_pct),
            opt(self.machine.irq_cpu_s),
            opt(self.machine.other_cpu_s)
        );
        if self.passed {
            let _ = writeln!(s, "result        PASS");
        } else {
            let _ = writeln!(s, "result        FAIL: {}", self.failures.join("; "));
        }
        s
    }
}

impl Interval {
    pub fn to_text(&self) -> String {
        format!(
            "[{:>7}] committed {}  delivered {}  in flight {}  dropped {}  {}  gateway cpu {} % rss {}  bench cpu {} %",
            clock(self.elapsed_s),
            self.committed,
            self.delivered,
            self.in_flight,
            self.dropped_connections,
            percentiles(&self.latency_ms),
            opt(self.gateway_cpu_pct),
            opt_bytes(self.gateway_rss_bytes),
            num(self.bench_cpu_pct)
        )
    }
}

fn percentiles(l: &LatencySummary) -> String {
    format!(
        "p50 {}  p95 {}  p99 {}  p99.9 {}  max {}  (n={})",
        opt(l.p50),
        opt(l.p95),
        opt(l.p99),
        opt(l.p999),
        opt(l.max),
        l.count
    )
}

/// A number with sensible precision for a human.
pub fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 || (x == x.trunc() && a < 1e15) {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(num).unwrap_or_else(|| "-".into())
}

pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else if b >= 1024.0 {
        format!("{:.2} KiB", b / 1024.0)
    } else {
        format!("{b:.0} B")
    }
}

fn opt_bytes(b: Option<u64>) -> String {
    b.map(bytes).unwrap_or_else(|| "-".into())
}

fn clock(seconds: f64) -> String {
    let s = seconds.round() as u64;
    format!("{}h{:02}m{:02}s", s / 3600, s / 60 % 60, s % 60)
}

/// CPU milliseconds per 1,000 deliveries.
pub fn cpu_ms_per_1k(cpu_s: f64, deliveries: u64) -> Option<f64> {
    (deliveries > 0).then(|| cpu_s * 1000.0 / (deliveries as f64 / 1000.0))
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn sample() -> Report {
        Report {
            schema: SCHEMA.into(),
            kind: "delivery".into(),
            scenario: "high".into(),
            started_at: "2026-11-26T10:30:00.000000Z".into(),
            config: RunConfig {
                connections: 1000,
                rooms: 20,
                rate: 1000.0,
                burst_size: None,
                payload_bytes: 100,
                duration_s: 30.0,
                warmup_s: 2.0,
                writers: 4,
                encoding: "none".into(),
                source: "notify".into(),
                floor: true,
            },
            target: "private PostgreSQL + gateway".into(),
            writes: Writes {
                planned: 32000,
                committed: 32000,
                failed: 0,
                commits_per_s: 1000.0,
                max_behind_schedule_ms: 0.5,
                commit_ms: LatencySummary::default(),
                first_error: None,
            },
            deliveries: Deliveries {
                tally: Tally {
                    expected: 1_600_000,
                    delivered: 1_600_000,
                    ..Tally::default()
                },
                per_s: 50_000.0,
                frames_per_delivery: Some(1.0),
            },
            latency_ms: LatencySummary {
                count: 1_500_000,
                p50: Some(0.5),
                p95: Some(1.0),
                p99: Some(2.0),
                p999: Some(4.0),
                max: Some(9.0),
                mean: Some(0.6),
            },
            connections: Connections {
                requested: 1000,
                connected: 1000,
                connect_errors: 0,
                dropped: 0,
                connect_s: 1.5,
                first_error: None,
                change_frames: 1_600_000,
                compressed_frames: 0,
                slow_path_frames: 0,
                protocol_errors: 0,
            },
            gateway: Some(GatewayUsage {
                pid: 42,
                cpu_s: Some(10.0),
                cpu_ms_per_1k_deliveries: Some(0.2),
                peak_rss_bytes: Some(50 << 20),
                rss_before_clients_bytes: Some(10 << 20),
                rss_after_clients_bytes: Some(15 << 20),
                rss_per_connection_bytes: Some(5120.0),
                wakeups: Some(1_000_000),
                preemptions: Some(1000),
                wakeups_per_delivery: Some(0.625),
                syscalls: Some(3_200_000),
                syscalls_per_delivery: Some(2.0),
            }),
            postgres: Some(PostgresUsage { cpu_s: 12.0 }),
            bench: BenchUsage {
                cpu_s: 20.0,
                cpu_ms_per_1k_deliveries: Some(0.4),
            },
            machine: MachineUsage {
                cpus: 2,
                busy_pct: Some(80.0),
                irq_cpu_s: Some(1.0),
                other_cpu_s: Some(0.5),
            },
            floor: Some(FloorResult {
                tally: Tally {
                    expected: 32000,
                    delivered: 32000,
                    ..Tally::default()
                },
                latency_ms: LatencySummary {
                    count: 30000,
                    p99: Some(0.4),
                    ..LatencySummary::default()
                },
                error: None,
            }),
            fanout_floor: None,
            intervals: Vec::new(),
            failures: Vec::new(),
            passed: true,
        }
    }

    #[test]
    fn json_round_trips_with_the_documented_keys() {
        let report = sample();
        let json = serde_json::to_value(&report).unwrap();
        for key in [
            "/schema",
            "/scenario",
            "/deliveries/expected",
            "/deliveries/delivered",
            "/deliveries/lost",
            "/deliveries/duplicated",
            "/deliveries/out_of_order",
            "/deliveries/per_s",
            "/latency_ms/p50",
            "/latency_ms/p99",
            "/latency_ms/p99_9",
            "/latency_ms/max",
            "/connections/connect_errors",
            "/gateway/cpu_s",
            "/gateway/cpu_ms_per_1k_deliveries",
            "/gateway/peak_rss_bytes",
            "/gateway/rss_per_connection_bytes",
            "/bench/cpu_s",
            "/floor/latency_ms/p99",
        ] {
            assert!(json.pointer(key).is_some(), "{key} missing from {json}");
        }
        let back: Report = serde_json::from_value(json).unwrap();
        assert_eq!(back, report);
    }

    #[test]
    fn judges_correctness_not_speed() {
        let mut report = sample();
        report.latency_ms.p99 = Some(10_000.0);
        report.judge(Vec::new());
        assert!(report.passed, "{:?}", report.failures);

        report.deliveries.tally.lost = 3;
        report.deliveries.tally.duplicated = 1;
        report.connections.connect_errors = 2;
        report.judge(vec!["extra".into()]);
        assert!(!report.passed);
        assert_eq!(report.failures.len(), 4, "{:?}", report.failures);
        assert!(report.failures[0].contains("3 deliveries lost"));
        let text = report.to_text();
        assert!(text.contains("FAIL"), "{text}");
        assert!(text.contains("P99 above the floor"), "{text}");
    }

    #[test]
    fn formats_numbers_for_people() {
        assert_eq!(num(123456.7), "123457");
        assert_eq!(num(0.4567), "0.457");
        assert_eq!(num(0.0), "0");
        assert_eq!(num(50.0), "50");
        assert_eq!(bytes(5120), "5.00 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(clock(3725.0), "1h02m05s");
        assert_eq!(cpu_ms_per_1k(2.0, 1_000_000), Some(2.0));
        assert_eq!(cpu_ms_per_1k(2.0, 0), None);
    }
}
