//! What a run does: the command line, the scenario presets of SPEC section 6
//! with the explicit flags laid over them, and the writers' schedule. Pure.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// `ws-gateway bench`: see BENCHMARKS.md for what each number means. Boxed,
/// so that the command enum stays small; fields read through `Deref`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    options: Box<BenchOptions>,
}

impl std::ops::Deref for BenchArgs {
    type Target = BenchOptions;

    fn deref(&self) -> &BenchOptions {
        &self.options
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct BenchOptions {
    /// Load shape; the flags below override its values.
    /// baseline: 100 connections, 10 rooms, 10 commits/s, 60 s.
    /// high: 1000 connections, 20 rooms, 1000 commits/s, 30 s.
    /// burst: 1000 connections opened at once, bursts of 500 commits every 2 s, 20 s.
    /// stability: 100 connections, 10 rooms, 100 commits/s, 1 h, a report line every minute.
    /// soak: 20 resuming subscribers (2 rooms each) of 10 rooms over two gateway instances,
    ///   100 commits/s, 30 min, a fault every --fault-every; an exact count at the end.
    #[arg(long, value_enum, default_value_t = Scenario::Baseline, verbatim_doc_comment)]
    pub scenario: Scenario,
    /// A running gateway (`http://host:port`) to test instead of starting one;
    /// needs --db, the database it serves.
    #[arg(long, requires = "db")]
    pub gateway: Option<String>,
    /// The --gateway's process id, to read its CPU and memory from /proc.
    #[arg(long, requires = "gateway")]
    pub gateway_pid: Option<u32>,
    /// The database to write to (it gets a `bench_events` table). Without it a
    /// private PostgreSQL is started under /tmp and removed afterwards.
    #[arg(long)]
    pub db: Option<String>,
    /// WebSocket clients, each subscribed to one room.
    #[arg(long)]
    pub connections: Option<usize>,
    /// Rooms `bench:0`.. the clients and rows are spread over (round-robin).
    #[arg(long)]
    pub rooms: Option<usize>,
    /// Commits per second, all writers together (burst: the mean rate, which
    /// sets the time between bursts).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Bytes of filler text in each row.
    #[arg(long)]
    pub payload_bytes: Option<usize>,
    /// How long the measured part writes: `30`, `30s`, `5m`, `2h`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Writing before the measured part; delivered and counted, not timed.
    #[arg(long, value_parser = parse_duration)]
    pub warmup: Option<Duration>,
    /// The capture source of the gateway the bench starts: notify (a trigger
    /// on the table) or wal (logical replication). The bench switches the
    /// database to it first (`ws-gateway source`). With --gateway, the
    /// database must already use it. --writers-only measures both anyway.
    #[arg(long, value_enum, default_value_t = Source::Notify)]
    pub source: Source,
    /// Ask the gateway for compressed frames (`?encoding=`).
    #[arg(long, value_enum, default_value_t = Encoding::None)]
    pub encoding: Encoding,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Compare with an earlier JSON report: warning at 15 % worse, critical
    /// (non-zero exit) at 30 %.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Also time commit-to-NOTIFY on one plain LISTEN connection in the same
    /// run: the physical floor. With --connections 0 no gateway is started.
    #[arg(long)]
    pub floor: bool,
    /// Run the same scenario first against the bench's own minimal fan-out
    /// server in the gateway's place (one thread, epoll, each change's frame
    /// built once, one send() per delivery, no queue), then against the
    /// gateway: the report gives the gateway's CPU, wake-ups and system
    /// calls per delivery beside the floor's, and their ratio.
    #[arg(long, conflicts_with_all = ["gateway", "writers_only"])]
    pub fanout_floor: bool,
    /// Internal: serve as the fan-out floor on this address (what a
    /// --fanout-floor run starts as a child, with --db and --channel).
    #[arg(long, hide = true)]
    pub serve_fanout_floor: Option<String>,
    /// Measure writer throughput instead: commits/s of --writers connections
    /// on an untracked table, with a plain pg_notify trigger, and tracked by
    /// ws-gateway, each with synchronous_commit on and off.
    #[arg(long, conflicts_with_all = ["gateway", "floor"])]
    pub writers_only: bool,
    /// With --writers-only: bytes of the wide row's unchanged column in the
    /// UPDATE shape (TOASTed out of line from about 2 KB).
    #[arg(long, default_value_t = 102_400)]
    pub wide_row_bytes: usize,
    /// Concurrent writer connections (default 8 with --writers-only, else 4).
    #[arg(long)]
    pub writers: Option<usize>,
    /// Rows per burst (burst scenario).
    #[arg(long)]
    pub burst_size: Option<u64>,
    /// Print a report line this often (stability: every minute).
    #[arg(long, value_parser = parse_duration)]
    pub report_every: Option<Duration>,
    /// After the writers stop, how long to wait for outstanding deliveries
    /// before counting them as lost.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub drain_timeout: Duration,
    /// Clients connecting at the same time (burst: all of them).
    #[arg(long)]
    pub connect_concurrency: Option<usize>,
    /// The NOTIFY channel for a gateway the bench starts, and for the
    /// `realtime` schema when the bench installs it (--floor alone);
    /// otherwise the database's own setting is used.
    #[arg(long, env = "GATEWAY_CHANNEL", default_value = "realtime_changes")]
    pub channel: String,
    /// Read buffer of each WebSocket client, bytes. tungstenite allocates it
    /// eagerly (its 128 KiB default would be 1.3 GB for 10,000 clients) and
    /// zero-fills it before every read, so small is also cheaper per message.
    #[arg(long, default_value_t = 4096)]
    pub client_read_buffer: usize,
    /// No progress bar (there is none anyway when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Soak: time between faults (LISTEN kill, pool kill, PostgreSQL
    /// restart, slow readers, SIGTERM of one instance, in turn).
    #[arg(long, value_parser = parse_duration, default_value = "2m")]
    pub fault_every: Duration,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Baseline,
    High,
    Burst,
    Stability,
    Soak,
}

impl Scenario {
    pub fn as_str(self) -> &'static str {
        match self {
            Scenario::Baseline => "baseline",
            Scenario::High => "high",
            Scenario::Burst => "burst",
            Scenario::Stability => "stability",
            Scenario::Soak => "soak",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Notify,
    Wal,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Notify => "notify",
            Source::Wal => "wal",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    None,
    Br,
    Gzip,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::None => "none",
            Encoding::Br => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// When each row is due, as an offset from the writers' start. Row `i`
/// (0-based) gets id `i + 1` and room `i % rooms`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// Evenly spaced at `rate` rows per second.
    Steady { rate: f64 },
    /// `size` rows due together, a burst every `every`.
    Bursts { size: u64, every: Duration },
}

impl Schedule {
    pub fn due(&self, row: u64) -> Duration {
        match *self {
            Schedule::Steady { rate } => Duration::from_secs_f64(row as f64 / rate),
            Schedule::Bursts { size, every } => every * (row / size) as u32,
        }
    }

    /// How many rows are due before `t`.
    pub fn rows_before(&self, t: Duration) -> u64 {
        match *self {
            Schedule::Steady { rate } => {
                // Rounded first: 50/s for 3 s is 150 rows, not 151 by a float's whim.
                let exact = rate * t.as_secs_f64();
                let rounded = exact.round();
                if (exact - rounded).abs() < 1e-6 {
                    rounded as u64
                } else {
                    exact.ceil() as u64
                }
            }
            Schedule::Bursts { size, every } => {
                if t.is_zero() {
                    return 0;
                }
                let bursts = t.as_secs_f64() / every.as_secs_f64();
                let rounded = bursts.round();
                let bursts = if (bursts - rounded).abs() < 1e-6 {
                    rounded
                } else {
                    bursts.ceil()
                };
                bursts as u64 * size
            }
        }
    }

    /// Rows per second over a long run.
    pub fn mean_rate(&self) -> f64 {
        match *self {
            Schedule::Steady { rate } => rate,
            Schedule::Bursts { size, every } => size as f64 / every.as_secs_f64(),
        }
    }

    pub fn burst_size(&self) -> Option<u64> {
        match *self {
            Schedule::Steady { .. } => None,
            Schedule::Bursts { size, .. } => Some(size),
        }
    }
}

/// A delivery run, resolved: the preset with the flags laid over it.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub scenario: Scenario,
    pub connections: usize,
    pub rooms: usize,
    pub schedule: Schedule,
    pub payload_bytes: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub writers: usize,
    pub encoding: Encoding,
    pub floor: bool,
    /// Run the scenario against the fan-out floor first (`fanout.rs`).
    pub fanout_floor: bool,
    pub source: Source,
    pub connect_concurrency: usize,
    pub report_every: Option<Duration>,
    pub drain_timeout: Duration,
    pub read_buffer_bytes: usize,
}

/// NOTIFY payloads above ~7900 bytes travel as a reference without the row,
/// which a plain LISTEN connection cannot time by id.
const MAX_FLOOR_PAYLOAD: usize = 7000;

/// What a scenario starts from.
struct Preset {
    connections: usize,
    rooms: usize,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    burst_size: Option<u64>,
    connect_all_at_once: bool,
    report_every: Option<Duration>,
}

fn preset(scenario: Scenario) -> Preset {
    let secs = Duration::from_secs;
    match scenario {
        Scenario::Baseline => Preset {
            connections: 100,
            rooms: 10,
            rate: 10.0,
            duration: secs(60),
            warmup: secs(2),
            burst_size: None,
            connect_all_at_once: false,
            report_every: None,
        },
        Scenario::High => Preset {
            connections: 1000,
            rooms: 20,
            rate: 1000.0,
            duration: secs(30),
            warmup: secs(2),
            burst_size: None,
            connect_all_at_once: false,
            report_every: None,
        },
        Scenario::Burst => Preset {
            connections: 1000,
            rooms: 20,
            // 500 rows every 2 s.
            rate: 250.0,
            duration: secs(20),
            warmup: Duration::ZERO,
            burst_size: Some(500),
            connect_all_at_once: true,
            report_every: None,
        },
        Scenario::Stability => Preset {
            connections: 100,
            rooms: 10,
            rate: 100.0,
            duration: secs(3600),
            warmup: secs(2),
            burst_size: None,
            connect_all_at_once: false,
            report_every: Some(secs(60)),
        },
        Scenario::Soak => Preset {
            connections: 20,
            rooms: 10,
            rate: 100.0,
            duration: secs(1800),
            warmup: Duration::ZERO,
            burst_size: None,
            connect_all_at_once: false,
            report_every: None,
        },
    }
}

/// Clients connecting at once unless the scenario says all of them.
const DEFAULT_CONNECT_CONCURRENCY: usize = 200;

impl Plan {
    pub fn resolve(args: &BenchArgs) -> Result<Plan, String> {
        let p = preset(args.scenario);
        let connections = args.connections.unwrap_or(p.connections);
        let rooms = args.rooms.unwrap_or(p.rooms);
        let rate = args.rate.unwrap_or(p.rate);
        let duration = args.duration.unwrap_or(p.duration);
        let warmup = args.warmup.unwrap_or(p.warmup);
        let writers = args.writers.unwrap_or(4);
        let payload_bytes = args.payload_bytes.unwrap_or(100);
        if rooms == 0 {
            return Err("--rooms must be at least 1".into());
        }
        if !(rate.is_finite() && rate > 0.0) {
            return Err(format!("--rate {rate} must be a positive number of commits per second"));
        }
        if writers == 0 {
            return Err("--writers must be at least 1".into());
        }
        if duration.is_zero() {
            return Err("--duration must be more than 0".into());
        }
        if connections == 0 && !args.floor {
            return Err(
                "--connections 0 leaves nobody to receive: add --floor to time the raw NOTIFY floor alone".into(),
            );
        }
        if args.fanout_floor && connections == 0 {
            return Err("--fanout-floor needs clients: --connections 0 has nobody to fan out to".into());
        }
        if args.fanout_floor && args.source != Source::Notify {
            return Err("--fanout-floor listens to the notify source's NOTIFYs: use --source notify".into());
        }
        if (args.floor || args.fanout_floor) && payload_bytes > MAX_FLOOR_PAYLOAD {
            return Err(format!(
                "--floor and --fanout-floor need --payload-bytes at most {MAX_FLOOR_PAYLOAD}: larger changes are notified as a reference without the row"
            ));
        }
        if args.client_read_buffer < 256 {
            return Err("--client-read-buffer must be at least 256 bytes".into());
        }
        let burst_size = args.burst_size.or(p.burst_size);
        let schedule = match burst_size {
            Some(0) => return Err("--burst-size must be at least 1".into()),
            Some(size) => Schedule::Bursts {
                size,
                every: Duration::from_secs_f64(size as f64 / rate),
            },
            None => Schedule::Steady { rate },
        };
        let connect_concurrency = match args.connect_concurrency {
            Some(0) => return Err("--connect-concurrency must be at least 1".into()),
            Some(n) => n,
            None if p.connect_all_at_once => connections.max(1),
            None => DEFAULT_CONNECT_CONCURRENCY,
        };
        let report_every = match args.report_every {
            Some(every) if every.is_zero() => None,
            Some(every) => Some(every),
            None => p.report_every,
        };
        Ok(Plan {
            scenario: args.scenario,
            connections,
            rooms,
            schedule,
            payload_bytes,
            duration,
            warmup,
            writers,
            encoding: args.encoding,
            floor: args.floor,
            fanout_floor: args.fanout_floor,
            source: args.source,
            connect_concurrency,
            report_every,
            drain_timeout: args.drain_timeout,
            read_buffer_bytes: args.client_read_buffer,
        })
    }

    /// Rows written in all, warmup included.
    pub fn total_rows(&self) -> u64 {
        self.schedule.rows_before(self.warmup + self.duration)
    }

    /// Rows `1..=warmup_rows()` are delivered and counted but not timed.
    pub fn warmup_rows(&self) -> u64 {
        self.schedule.rows_before(self.warmup)
    }

    /// The room client `index` subscribes to.
    pub fn room_of_client(&self, index: usize) -> u64 {
        (index % self.rooms) as u64
    }

    /// Whether a gateway is needed at all (the floor alone needs only the
    /// database and the capture triggers).
    pub fn needs_gateway(&self) -> bool {
        self.connections > 0
    }
}

/// `90`, `90s`, `500ms`, `1.5m`, `2h`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration: use seconds (30) or 500ms, 30s, 5m, 2h");
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(bad()),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: BenchArgs,
    }

    fn args(line: &[&str]) -> BenchArgs {
        let mut argv = vec!["bench"];
        argv.extend_from_slice(line);
        Cli::try_parse_from(argv).expect("valid arguments").args
    }

    #[test]
    fn presets_follow_the_spec_and_flags_override_them() {
        let high = Plan::resolve(&args(&["--scenario", "high"])).unwrap();
        assert_eq!((high.connections, high.rooms), (1000, 20));
        assert_eq!(high.schedule, Schedule::Steady { rate: 1000.0 });
        assert_eq!(high.writers, 4);

        let small = Plan::resolve(&args(&[
            "--scenario",
            "high",
            "--connections",
            "20",
            "--rooms",
            "2",
            "--rate",
            "50",
            "--duration",
            "3s",
            "--warmup",
            "0",
        ]))
        .unwrap();
        assert_eq!((small.connections, small.rooms), (20, 2));
        assert_eq!(small.total_rows(), 150);
        assert_eq!(small.warmup_rows(), 0);

        let burst = Plan::resolve(&args(&["--scenario", "burst"])).unwrap();
        assert_eq!(
            burst.schedule,
            Schedule::Bursts {
                size: 500,
                every: Duration::from_secs(2)
            }
        );
        assert_eq!(burst.connect_concurrency, 1000);
        assert_eq!(burst.total_rows(), 5000);

        let stability = Plan::resolve(&args(&["--scenario", "stability"])).unwrap();
        assert_eq!(stability.report_every, Some(Duration::from_secs(60)));
        let quiet = Plan::resolve(&args(&["--scenario", "stability", "--report-every", "0"]));
        assert_eq!(quiet.unwrap().report_every, None);
    }

    #[test]
    fn refuses_plans_that_cannot_run() {
        for bad in [
            &["--rooms", "0"][..],
            &["--rate", "0"],
            &["--writers", "0"],
            &["--connections", "0"],
            &["--floor", "--payload-bytes", "9000"],
            &["--duration", "0"],
            &["--fanout-floor", "--source", "wal"],
            &["--fanout-floor", "--connections", "0", "--floor"],
            &["--fanout-floor", "--payload-bytes", "9000"],
        ] {
            assert!(Plan::resolve(&args(bad)).is_err(), "{bad:?} accepted");
        }
        assert!(Plan::resolve(&args(&["--connections", "0", "--floor"])).is_ok());
        assert!(
            Plan::resolve(&args(&["--fanout-floor", "--scenario", "high"]))
                .unwrap()
                .fanout_floor
        );
    }

    #[test]
    fn schedules_space_rows_and_count_them() {
        let steady = Schedule::Steady { rate: 1000.0 };
        assert_eq!(steady.due(0), Duration::ZERO);
        assert_eq!(steady.due(1500), Duration::from_millis(1500));
        assert_eq!(steady.rows_before(Duration::from_secs(2)), 2000);
        assert_eq!(steady.rows_before(Duration::from_micros(1500)), 2);
        let bursts = Schedule::Bursts {
            size: 500,
            every: Duration::from_secs(2),
        };
        assert_eq!(bursts.due(499), Duration::ZERO);
        assert_eq!(bursts.due(500), Duration::from_secs(2));
        assert_eq!(bursts.rows_before(Duration::ZERO), 0);
        assert_eq!(bursts.rows_before(Duration::from_secs(1)), 500);
        assert_eq!(bursts.rows_before(Duration::from_secs(4)), 1000);
        assert_eq!(bursts.mean_rate(), 250.0);
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1").is_err());
        assert!(parse_duration("3d").is_err());
    }
}
