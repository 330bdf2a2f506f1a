//! `ws-gateway bench`, run for real with tiny numbers: each scenario delivers
//! every change exactly once and writes a well-formed report, the writer-cost
//! mode reports its numbers, and a fabricated regression fails the run; with
//! either capture source.
//! Correctness only, never speed: these run beside everything else.
//!
//! Each run gets a fresh database on TEST_DATABASE_URL (what `make test`
//! starts) when it is set, else the bench starts its own private PostgreSQL.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::Value;

static RUNS: AtomicU32 = AtomicU32::new(0);

/// Small enough for seconds, big enough to interleave writers and rooms:
/// 150 commits to 2 rooms of 10 clients each.
const SMALL: &[&str] = &[
    "--connections",
    "20",
    "--rooms",
    "2",
    "--rate",
    "50",
    "--duration",
    "3",
    "--warmup",
    "0",
    "--no-progress",
];

struct Run {
    output: Output,
    report: Option<Value>,
}

impl Run {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    fn explain(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.output.status.code(),
            self.stdout(),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }

    fn report(&self) -> &Value {
        self.report
            .as_ref()
            .unwrap_or_else(|| panic!("no JSON report\n{}", self.explain()))
    }
}

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ws-gateway-bench-smoke-{}-{}-{name}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ))
}

/// A fresh database on the `make test` server, or None (the bench then
/// starts its own PostgreSQL).
fn fresh_database() -> Option<(String, String)> {
    let server = std::env::var("TEST_DATABASE_URL").ok().filter(|u| !u.is_empty())?;
    let name = format!(
        "bench_smoke_{}_{}",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    );
    admin(&server, &format!("create database {name}"));
    let base = match server.rfind('/') {
        Some(slash) if slash > "postgres://".len() => &server[..slash],
        _ => server.as_str(),
    };
    Some((format!("{base}/{name}"), name))
}

fn admin(server: &str, sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::PgConnection::connect(server)
            .await
            .expect("connecting to TEST_DATABASE_URL");
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    });
}

/// Runs `ws-gateway bench ARGS --json FILE` and reads the report back.
fn bench(name: &str, args: &[&str]) -> Run {
    let json = scratch(&format!("{name}.json"));
    let mut command = Command::new(env!("CARGO_BIN_EXE_ws-gateway"));
    command.arg("bench").args(args).arg("--json").arg(&json);
    let database = fresh_database();
    if let Some((url, _)) = &database {
        command.arg("--db").arg(url);
    }
    command.env("RUST_LOG", "warn");
    let output = command.output().expect("running ws-gateway bench");
    let report = std::fs::read_to_string(&json)
        .ok()
        .map(|text| serde_json::from_str(&text).expect("the report is JSON"));
    let _ = std::fs::remove_file(&json);
    if let (Some((_, name)), Ok(server)) = (&database, std::env::var("TEST_DATABASE_URL")) {
        // A database with a replication slot (--source wal) cannot be
        // dropped: its slots go first (each statement on its own: DROP
        // DATABASE cannot run in the implicit transaction of several).
        admin(
            &server,
            &format!(
                "do $$ begin
                   for i in 1 .. 100 loop
                     perform pg_terminate_backend(active_pid) from pg_replication_slots
                      where database = '{name}' and active_pid is not null;
                     perform pg_drop_replication_slot(slot_name) from pg_replication_slots
                      where database = '{name}' and active_pid is null;
                     exit when not exists (select 1 from pg_replication_slots where database = '{name}');
                     perform pg_sleep(0.05);
                   end loop;
                 end $$"
            ),
        );
        admin(&server, &format!("drop database if exists {name} with (force)"));
    }
    Run { output, report }
}

/// The report has every documented key, and nothing was lost, duplicated,
/// reordered or refused.
fn assert_clean(run: &Run, expected: u64) {
    assert!(run.output.status.success(), "{}", run.explain());
    let report = run.report();
    for key in [
        "/schema",
        "/kind",
        "/scenario",
        "/started_at",
        "/config/connections",
        "/writes/committed",
        "/deliveries/expected",
        "/deliveries/delivered",
        "/deliveries/lost",
        "/deliveries/duplicated",
        "/deliveries/out_of_order",
        "/deliveries/per_s",
        "/latency_ms/p50",
        "/latency_ms/p95",
        "/latency_ms/p99",
        "/latency_ms/p99_9",
        "/latency_ms/max",
        "/connections/connect_errors",
        "/gateway/cpu_s",
        "/gateway/cpu_ms_per_1k_deliveries",
        "/gateway/peak_rss_bytes",
        "/gateway/rss_per_connection_bytes",
        "/bench/cpu_s",
        "/machine/cpus",
        "/passed",
    ] {
        assert!(report.pointer(key).is_some(), "{key} missing from {report:#}");
    }
    let d = &report["deliveries"];
    assert_eq!(d["expected"], expected, "{report:#}");
    assert_eq!(d["delivered"], expected, "{report:#}");
    for zero in ["lost", "duplicated", "out_of_order", "unexpected"] {
        assert_eq!(d[zero], 0, "{zero} in {report:#}");
    }
    assert_eq!(report["connections"]["connect_errors"], 0);
    assert_eq!(report["connections"]["connected"], 20);
    assert!(report["latency_ms"]["p99"].as_f64().is_some());
    assert_eq!(report["passed"], true);
    assert_eq!(report["failures"], serde_json::json!([]));
    assert!(run.stdout().contains("result        PASS"), "{}", run.explain());
}

#[test]
fn baseline_with_the_floor_delivers_everything_once() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "baseline", "--floor"]);
    let run = bench("baseline", &args);
    // 150 commits, each to the 10 clients of its room.
    assert_clean(&run, 1500);
    let floor = &run.report()["floor"];
    assert_eq!(floor["expected"], 150, "{floor:#}");
    assert_eq!(floor["delivered"], 150);
    assert!(floor["latency_ms"]["p99"].as_f64().is_some());
}

#[test]
fn high_delivers_everything_once() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "high"]);
    let run = bench("high", &args);
    assert_clean(&run, 1500);
    assert_eq!(run.report()["scenario"], "high");
}

/// `--fanout-floor`: the same scenario served first by the bench's own
/// minimal fan-out server, then by the gateway; both deliver everything
/// once, and the report gives the floor's numbers beside the gateway's.
#[test]
fn high_with_the_fanout_floor_reports_both_and_their_ratio() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "high", "--fanout-floor"]);
    let run = bench("fanout-floor", &args);
    assert_clean(&run, 1500);
    let report = run.report();
    let floor = &report["fanout_floor"];
    assert_eq!(floor["delivered"], 1500, "{floor:#}");
    for zero in ["lost", "duplicated", "out_of_order", "unexpected"] {
        assert_eq!(floor[zero], 0, "{zero} in {floor:#}");
    }
    assert_eq!(floor["failures"], serde_json::json!([]));
    assert!(floor["target"].as_str().unwrap().contains("fan-out floor"), "{floor:#}");
    assert!(
        report["target"].as_str().unwrap().contains("ws-gateway serve"),
        "{report:#}"
    );
    // One frame per delivery is what the floor does.
    assert_eq!(floor["frames_per_delivery"], 1.0, "{floor:#}");
    assert!(
        floor["gateway_cpu_ratio"].as_f64().is_some_and(|r| r > 0.0),
        "{floor:#}"
    );
    assert!(floor["wakeups_per_delivery"].as_f64().is_some(), "{floor:#}");
    let frames = report["deliveries"]["frames_per_delivery"].as_f64().unwrap();
    assert!(frames > 0.0 && frames <= 1.0, "{report:#}");
    assert!(
        report["gateway"]["wakeups_per_delivery"].as_f64().is_some(),
        "{report:#}"
    );
    assert!(run.stdout().contains("fan-out floor cpu"), "{}", run.explain());
}

#[test]
fn high_with_the_wal_source_delivers_everything_once() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "high", "--source", "wal"]);
    let run = bench("high-wal", &args);
    assert_clean(&run, 1500);
    assert_eq!(run.report()["config"]["source"], "wal");
    assert!(run.stdout().contains("source wal"), "{}", run.explain());
}

#[test]
fn burst_delivers_everything_once() {
    let mut args = SMALL.to_vec();
    // Bursts of 25 commits every half second.
    args.extend(["--scenario", "burst", "--burst-size", "25"]);
    let run = bench("burst", &args);
    assert_clean(&run, 1500);
    assert_eq!(run.report()["config"]["burst_size"], 25);
}

#[test]
fn stability_reports_intervals() {
    let mut args = SMALL.to_vec();
    args.extend(["--scenario", "stability", "--report-every", "1"]);
    let run = bench("stability", &args);
    assert_clean(&run, 1500);
    let intervals = run.report()["intervals"].as_array().expect("intervals");
    assert!(intervals.len() >= 2, "{intervals:#?}");
    assert!(intervals[0]["latency_ms"]["count"].as_u64().is_some());
    assert!(run.stdout().contains("0h00m01s"), "{}", run.explain());
}

#[test]
fn writers_only_reports_every_capture_and_shape() {
    let run = bench(
        "writers",
        &[
            "--writers-only",
            "--writers",
            "2",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--wide-row-bytes",
            "8000",
            "--no-progress",
        ],
    );
    assert!(run.output.status.success(), "{}", run.explain());
    let report = run.report();
    assert_eq!(report["kind"], "writers_only");
    let results = report["results"].as_array().expect("results");
    // Four captures, two shapes, synchronous_commit on and off.
    assert_eq!(results.len(), 16, "{report:#}");
    for r in results {
        assert!(r["commits_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
    }
    let find = |shape: &str, capture: &str| {
        results
            .iter()
            .find(|r| r["shape"] == shape && r["capture"] == capture && r["synchronous_commit"] == true)
            .unwrap()
    };
    // The notifying variants were drained by a listener: one per commit.
    let tracked = find("insert", "tracked");
    assert!(tracked["notifications"].as_u64().unwrap() >= tracked["commits"].as_u64().unwrap());
    // With the wal source a leading gateway wrote the outbox meanwhile.
    assert!(
        find("insert", "wal")["notifications"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    assert!(
        find("wide_update", "wal")["notifications"].as_u64().unwrap() > 0,
        "{report:#}"
    );
    for ratio in [
        "/tracked_vs_plain_notify_pct/synchronous_commit_on",
        "/wal_vs_untracked_pct/synchronous_commit_on",
        "/wide_update_wal_vs_untracked_pct/synchronous_commit_off",
    ] {
        assert!(
            report.pointer(ratio).and_then(Value::as_f64).is_some(),
            "{ratio} in {report:#}"
        );
    }
    assert!(run.stdout().contains("GATEWAY_SOURCE=wal"), "{}", run.explain());
    // Where the CPU went: the wal source's processes were found and spent
    // some, and the machine's time per commit is reported beside it.
    let cpu = &find("insert", "wal")["cpu"];
    for part in ["walsender_s", "leader_backend_s", "gateway_s"] {
        assert!(cpu[part].as_f64().unwrap() > 0.0, "{part} in {cpu}");
    }
    assert!(
        find("insert", "none")["cpu"]["machine_s"].as_f64().unwrap() > 0.0,
        "{report:#}"
    );
    assert!(
        run.stdout()
            .contains("CPU           single-row INSERT, sync_commit=on: untracked"),
        "{}",
        run.explain()
    );
}

#[test]
fn a_critical_regression_fails_the_run() {
    // A baseline no real run can match: 1 us P99, a trillion deliveries/s.
    let baseline = scratch("baseline.json");
    let fabricated = serde_json::json!({
        "schema": "ws-gateway-bench/1",
        "kind": "delivery",
        "config": {},
        "latency_ms": {"p99": 0.001},
        "deliveries": {"per_s": 1e12},
    });
    std::fs::write(&baseline, fabricated.to_string()).unwrap();
    let mut args = SMALL.to_vec();
    let path = baseline.to_string_lossy().into_owned();
    args.extend(["--baseline", path.as_str()]);
    let run = bench("regressed", &args);
    let _ = std::fs::remove_file(&baseline);
    assert!(!run.output.status.success(), "{}", run.explain());
    let stdout = run.stdout();
    assert!(stdout.contains("CRITICAL"), "{}", run.explain());
    // The deliveries themselves were fine; the report says why it failed.
    let report = run.report();
    assert_eq!(report["deliveries"]["lost"], 0);
    assert_eq!(report["passed"], false);
    assert!(
        report["failures"][0].as_str().unwrap().contains("critical regression"),
        "{report:#}"
    );
}
