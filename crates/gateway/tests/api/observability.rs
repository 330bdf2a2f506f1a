//! Observability through the real daemon: the probe measured end to end,
//! `/latency`, `/metrics` read by a Prometheus text parser, `/healthz`'s
//! performance and regression fields, the probe riding out a database
//! outage, and the dashboard rendered by headless Chromium.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use ws_gateway::Application;
use ws_gateway::config::{Auth, Settings};

use crate::fault_kit::{KillSwitch, redirect};
use crate::helpers::{TestApp, eventually, fresh_database, http_get, http_get_json, sample, spawn_app_with};

const PROBE_EVERY: Duration = Duration::from_millis(100);

pub(crate) async fn spawn_probed() -> TestApp {
    spawn_app_with(fresh_database().await, |s| s.history.probe_interval = Some(PROBE_EVERY)).await
}

async fn latency(app: &TestApp, query: &str) -> (u16, Value) {
    http_get_json(app.address, &format!("/latency?{query}")).await
}

/// Waits until the probe has measured at least `n` round trips.
async fn wait_for_probes(app: &TestApp, n: u64) -> Value {
    eventually("probe measurements", || async {
        let (_, body) = latency(app, "source=probe&window=60s").await;
        (body["count"].as_u64()? >= n).then_some(body)
    })
    .await
}

/// `name` in the app's `/metrics`, which must have it.
async fn metric(app: &TestApp, name: &str) -> f64 {
    sample(&http_get(app.address, "/metrics").await.1, name).unwrap_or_else(|| panic!("no {name} in /metrics"))
}

#[tokio::test]
async fn the_probe_measures_commit_to_receive_through_the_real_path() {
    let app = spawn_probed().await;
    let body = wait_for_probes(&app, 3).await;
    assert_eq!(body["source"], "probe");
    assert_eq!(body["window_s"], 60);
    let p50 = body["p50_ms"].as_f64().unwrap();
    let p99 = body["p99_ms"].as_f64().unwrap();
    let max = body["max_ms"].as_f64().unwrap();
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{body}");
    assert!(p99 < 1000.0, "a local round trip within a second: {body}");

    // It went the real way: a captured change in the probe's room, which
    // is this instance's own.
    let rooms: Vec<String> = sqlx::query_scalar(
        "select distinct unnest(rooms) from realtime.changes where schema_name = 'realtime' and table_name = 'probe'",
    )
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(rooms.len(), 1, "{rooms:?}");
    assert!(rooms[0].starts_with("__probe:"), "{rooms:?}");
    assert!(metric(&app, "ws_gateway_probes_received_total").await >= 3.0);
    assert_eq!(metric(&app, "ws_gateway_probe_failures_total").await, 0.0);
    let (_, health) = app.health().await;
    assert!(health["probe"]["count"].as_u64().unwrap() >= 3, "{health}");

    // The clock offset is sampled, corrected by the round trip: the database
    // runs on this host, so it is zero within the sample's uncertainty.
    let health = eventually("a clock estimate", || async {
        let (_, health) = app.health().await;
        (health["feed"]["clock_uncertainty_ms"].as_f64()? > 0.0).then_some(health)
    })
    .await;
    let offset = health["feed"]["clock_offset_ms"].as_f64().unwrap();
    let uncertainty = health["feed"]["clock_uncertainty_ms"].as_f64().unwrap();
    assert!(offset.abs() <= uncertainty + 1.0, "{}", health["feed"]);
    assert!(
        health["feed"]["db_round_trip_ms"].as_f64().unwrap() > 0.0,
        "{}",
        health["feed"]
    );
    assert!(health["connectionPool"]["averageLatency"].as_f64().unwrap() >= 0.0);
    app.stop().await.expect("a clean stop");
}

/// `ws-gateway latency` against a running gateway prints the table of both
/// windows and every source, with the probe's numbers filled in; a gateway
/// that is not there is a clear error.
#[tokio::test]
async fn the_latency_command_prints_the_running_gateways_percentiles() {
    let app = spawn_probed().await;
    wait_for_probes(&app, 3).await;
    let output = tokio::process::Command::new(crate::helpers::gateway_binary())
        .args(["latency", "--url", &format!("http://{}/", app.address)])
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("feed live"), "{stdout}");
    for label in [
        "last minute",
        "last hour",
        "probe (commit",
        "send (commit",
        "ack (commit",
    ] {
        assert!(stdout.contains(label), "{label}: {stdout}");
    }
    let probe_row = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("probe"))
        .expect("a probe row");
    let count: u64 = probe_row
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .expect("a count");
    assert!(count >= 3 && !probe_row.contains('–'), "{probe_row}");

    let port = crate::fault_kit::free_port().await;
    let output = tokio::process::Command::new(crate::helpers::gateway_binary())
        .args(["latency", "--url", &format!("http://127.0.0.1:{port}")])
        .output()
        .await
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach ws-gateway") && stderr.contains("is it running"),
        "{stderr}"
    );
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn the_probe_is_not_counted_as_client_traffic() {
    let app = spawn_probed().await;
    wait_for_probes(&app, 3).await;
    let (_, health) = app.health().await;
    assert_eq!(health["connections"], 0, "{health}");
    assert_eq!(health["rooms"], 0, "{health}");
    // "send" is real traffic: the probe's own frames are measured as the probe.
    assert_eq!(health["latency"]["count"], 0, "{health}");
    let (_, send) = latency(&app, "source=send").await;
    assert_eq!(send["count"], 0, "{send}");
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn the_probe_mints_its_own_token_when_auth_is_jwt() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.auth = Auth::hs256("observability-test-secret-of-32-bytes-or-more");
        s.history.probe_interval = Some(PROBE_EVERY);
    })
    .await;
    wait_for_probes(&app, 3).await;
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn latency_takes_windows_and_sources_and_refuses_bad_ones() {
    let app = spawn_probed().await;
    wait_for_probes(&app, 1).await;
    for (query, source, window_s) in [
        ("", "send", 60),
        ("window=30s", "send", 30),
        ("window=5m&source=ack", "ack", 300),
        ("window=1h&source=probe", "probe", 3600),
        ("source=probe", "probe", 60),
    ] {
        let (status, body) = latency(&app, query).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(body["source"], source, "{query}: {body}");
        assert_eq!(body["window_s"], window_s, "{query}: {body}");
        for key in ["count", "p50_ms", "p95_ms", "p99_ms", "max_ms"] {
            assert!(body.get(key).is_some(), "{query}: no {key} in {body}");
        }
    }
    let (_, hour) = latency(&app, "window=1h&source=probe").await;
    assert!(hour["count"].as_u64().unwrap() >= 1, "{hour}");
    let (_, ack) = latency(&app, "source=ack").await;
    assert_eq!(ack["count"], 0);
    assert!(ack["p99_ms"].is_null(), "{ack}");

    for (query, mentions) in [
        ("window=2h", "1h"),
        ("window=abc", "30s"),
        ("window=0s", "30s"),
        ("window=", "30s"),
        ("window=60", "unit"),
        ("source=nope", "probe"),
        ("windw=5m", "windw"),
    ] {
        let (status, body) = latency(&app, query).await;
        assert_eq!(status, 400, "{query}: {body}");
        let message = body["error"].as_str().unwrap_or_default();
        assert!(message.contains(mentions), "{query}: {body}");
    }
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_with_cumulative_histograms() {
    let app = spawn_probed().await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    for id in 1..=5 {
        sqlx::query("insert into items (id, project_id) values ($1, 1)")
            .bind(id)
            .execute(&app.db.pool)
            .await
            .unwrap();
    }
    client.changes(5).await;
    wait_for_probes(&app, 3).await;
    // Sends are recorded once the frame is flushed, just after the client
    // could read it.
    eventually("five sends measured", || async {
        let (_, body) = latency(&app, "source=send").await;
        (body["count"].as_u64()? >= 5).then_some(())
    })
    .await;

    let (status, text) = http_get(app.address, "/metrics").await;
    assert_eq!(status, 200);
    let families = prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    for (name, at_least) in [
        ("ws_gateway_commit_to_send_seconds", 5.0),
        ("ws_gateway_commit_to_ack_seconds", 0.0),
        ("ws_gateway_probe_commit_to_receive_seconds", 3.0),
        ("ws_gateway_stage_seconds", 0.0),
        ("ws_gateway_batch_size", 0.0),
    ] {
        let family = families.get(name).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        assert_eq!(family.kind, "histogram", "{name}");
        let series = prometheus::check_histogram(family).unwrap_or_else(|e| panic!("{name}: {e}"));
        let count: f64 = series.values().sum();
        assert!(count >= at_least, "{name}: {count} < {at_least}");
    }
    let stages = prometheus::check_histogram(&families["ws_gateway_stage_seconds"]).unwrap();
    for stage in ["notify_lag", "queueing", "batch_wait", "encoding", "socket_write"] {
        assert!(
            stages
                .keys()
                .any(|labels| labels.contains(&format!("stage=\"{stage}\""))),
            "no stage {stage}: {stages:?}"
        );
    }
    for (name, kind) in [
        ("ws_gateway_connections", "gauge"),
        ("ws_gateway_rooms", "gauge"),
        ("ws_gateway_deliveries_total", "counter"),
        ("ws_gateway_messages_out_total", "counter"),
        ("ws_gateway_bytes_out_total", "counter"),
        ("ws_gateway_bytes_out_raw_total", "counter"),
        ("ws_gateway_bytes_out_sent_total", "counter"),
        ("ws_gateway_messages_in_total", "counter"),
        ("ws_gateway_dedup_dropped_total", "counter"),
        ("ws_gateway_refusals_total", "counter"),
        ("ws_gateway_closes_total", "counter"),
        ("ws_gateway_slow_consumer_disconnects_total", "counter"),
        ("ws_gateway_feed_reconnects_total", "counter"),
        ("ws_gateway_clock_offset_seconds", "gauge"),
    ] {
        let family = families.get(name).unwrap_or_else(|| panic!("no {name}:\n{text}"));
        assert_eq!(family.kind, kind, "{name}");
    }
    // The shipped Prometheus example and Grafana dashboard only name metrics
    // that exist.
    for file in ["config/grafana-dashboard.json", "config/prometheus.yml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(file);
        let config = std::fs::read_to_string(&path).unwrap();
        let mut named = 0;
        for (i, _) in config.match_indices("ws_gateway_") {
            let name: String = config[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let family = name.strip_suffix("_bucket").unwrap_or(&name);
            assert!(
                families.contains_key(family),
                "{file} names {name}, which /metrics lacks"
            );
            named += 1;
        }
        assert!(named > 2, "{file}");
    }
    assert_eq!(metric(&app, "ws_gateway_connections").await, 1.0);
    assert_eq!(metric(&app, "ws_gateway_rooms").await, 1.0);
    assert!(metric(&app, "ws_gateway_deliveries_total").await >= 5.0);
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn healthz_reports_performance_and_regression_detection() {
    let app = spawn_probed().await;
    wait_for_probes(&app, 3).await;
    let (status, health) = app.health().await;
    assert_eq!(status, 200);
    let performance = &health["performance"];
    assert!(performance["totalMetrics"].as_u64().unwrap() >= 3, "{performance}");
    assert!(performance["recentMetrics"].as_u64().is_some(), "{performance}");
    assert!(performance["averageLatency"].as_f64().is_some(), "{performance}");
    let regression = &health["regressionDetection"];
    for key in ["totalAlerts", "criticalAlerts", "warningAlerts"] {
        assert_eq!(regression[key], 0, "{regression}");
    }
    assert!(regression["affectedMetrics"].as_array().unwrap().is_empty());
    assert!(regression["recommendations"].as_array().unwrap().is_empty());
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn a_reload_switches_the_probe_off_and_on_and_it_reconnects() {
    let db = fresh_database().await;
    let mut settings = Settings::for_tests();
    settings.database_url = Some(db.url.clone().into());
    settings.history.probe_interval = Some(PROBE_EVERY);
    let built = Application::build(settings).await.expect("building the gateway");
    let state = built.state();
    let app = TestApp {
        address: built.local_addr(),
        admin: built.admin_addr(),
        db,
        shutdown: built.shutdown_token(),
        state: built.state(),
        task: tokio::spawn(built.run_until_stopped()),
    };
    app.wait_for_feed("live").await;
    wait_for_probes(&app, 3).await;

    let mut off = (*state.settings()).clone();
    off.history.probe_interval = None;
    state.apply(off);
    eventually("the probe leaves its socket", || async {
        (!state.probe_live()).then_some(())
    })
    .await;

    let mut on = (*state.settings()).clone();
    on.history.probe_interval = Some(PROBE_EVERY * 2);
    state.apply(on);
    let before = metric(&app, "ws_gateway_probes_received_total").await;
    eventually("the probe back, measuring", || async {
        let received = metric(&app, "ws_gateway_probes_received_total").await;
        (state.probe_live() && received >= before + 3.0).then_some(())
    })
    .await;
    app.stop().await.expect("a clean stop");
}

#[tokio::test]
async fn the_probe_rides_out_a_database_outage() {
    let db = fresh_database().await;
    let (upstream, _) = redirect(&db.url, 0);
    let proxy = KillSwitch::start(upstream).await;
    let (_, via_proxy) = redirect(&db.url, proxy.port);
    let app = spawn_app_with(db, |s| {
        s.database_url = Some(via_proxy.into());
        s.history.probe_interval = Some(PROBE_EVERY);
    })
    .await;
    wait_for_probes(&app, 3).await;

    proxy.set_down(true);
    eventually("probe failures while the database is down", || async {
        let (status, _) = app.health().await;
        (status == 503 && metric(&app, "ws_gateway_probe_failures_total").await > 0.0).then_some(())
    })
    .await;
    assert!(!app.task.is_finished(), "the gateway keeps running");

    proxy.set_down(false);
    let before = metric(&app, "ws_gateway_probes_received_total").await;
    eventually("probes measured again", || async {
        (metric(&app, "ws_gateway_probes_received_total").await >= before + 3.0).then_some(())
    })
    .await;
    app.wait_for_feed("live").await;
    app.stop().await.expect("a clean stop");
}

/// Chromium, or the test fails saying how to get it.
pub(crate) fn chromium_binary() -> PathBuf {
    chromium().expect(
        "no Chromium at /usr/bin/chromium (or $CHROMIUM): this test needs it; \
         .ci/run installs Debian's `chromium` (apt-get install chromium)",
    )
}

/// Chromium from the distribution (`.ci/run` installs it); never one a
/// tool downloads.
fn chromium() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("CHROMIUM")
        && !path.is_empty()
    {
        return Some(path.into());
    }
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

/// Runs headless Chromium on `url` with `extra` arguments; its stdout.
pub(crate) async fn run_chromium(binary: &Path, url: &str, extra: &[&str]) -> String {
    let profile = tempdir("chromium-profile");
    let mut command = tokio::process::Command::new(binary);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(90), command.output())
        .await
        .expect("chromium finishes within 90 s")
        .expect("chromium runs");
    let _ = std::fs::remove_dir_all(&profile);
    let log = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "chromium failed: {}\n{log}", output.status);
    // The page's console: a script error would leave charts half drawn.
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") && (l.contains("Uncaught") || l.contains("Error")))
        .collect();
    assert!(errors.is_empty(), "the page logged errors:\n{}", errors.join("\n"));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "ws-gateway-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The number in `data-points="N"` of the series `key` of chart `id`.
fn points_of(dom: &str, chart: &str, key: &str) -> usize {
    let Some(start) = dom.find(&format!("data-chart=\"{chart}\"")) else {
        return 0;
    };
    let end = dom[start..].find("</svg>").map_or(dom.len(), |e| start + e);
    let svg = &dom[start..end];
    let marker = format!("data-series=\"{key}\" data-points=\"");
    svg.find(&marker)
        .and_then(|i| {
            let rest = &svg[i + marker.len()..];
            rest[..rest.find('"')?].parse().ok()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn the_dashboard_renders_live_charts_in_headless_chromium() {
    // A test that cannot run here fails: the dashboard is a user's part.
    let chromium = chromium().expect(
        "no Chromium at /usr/bin/chromium (or $CHROMIUM): this test needs it; \
         .ci/run installs Debian's `chromium` (apt-get install chromium)",
    );
    let app = spawn_probed().await;
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    let writer = {
        let pool = app.db.pool.clone();
        tokio::spawn(async move {
            for id in 1..=400 {
                let _ = sqlx::query("insert into items (id, project_id, body) values ($1, 1, 'x')")
                    .bind(id)
                    .execute(&pool)
                    .await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    // Three points of the server-side series, with sends and probes in them.
    eventually("three points of history", || async {
        let (_, stats) = http_get_json(app.address, "/api/stats").await;
        let series = stats["series"].as_array()?;
        let with = |key: &str| series.iter().filter(|p| p[key].as_u64() > Some(0)).count();
        (with("send_count") >= 3 && with("probe_count") >= 3).then_some(())
    })
    .await;
    let url = format!("http://{}/", app.address);

    let dom = run_chromium(&chromium, &url, &["--dump-dom"]).await;
    for (chart, key) in [
        ("chart-send", "p99"),
        ("chart-send", "p50"),
        ("chart-probe", "p99"),
        ("chart-throughput", "deliveries"),
        ("chart-connections", "connections"),
        ("chart-compression", "after"),
    ] {
        let n = points_of(&dom, chart, key);
        assert!(n >= 3, "{chart}/{key} drew {n} points:\n{dom}");
    }
    for stage in ["notify_lag", "queueing", "batch_wait", "encoding", "socket_write"] {
        assert!(
            dom.contains(&format!("data-stage=\"{stage}\"")),
            "no {stage} row: {dom}"
        );
    }
    // The tiles' texts.
    let tile = |id: &str| {
        let at = dom.find(&format!("id=\"{id}\">")).unwrap() + id.len() + 6;
        dom[at..at + dom[at..].find('<').unwrap()].to_owned()
    };
    // Healthy, unless this (debug, shared) machine made a minute's P99 miss
    // the 250 ms target: then the header says which, as the red tile does.
    let p99_of = |id: &str| tile(id).parse::<f64>().unwrap_or(0.0);
    if p99_of("send-p99") > 250.0 || p99_of("probe-p99") > 250.0 {
        assert!(dom.contains("class=\"pill warning\""), "{dom}");
        assert!(dom.contains("over 250 ms<"), "{dom}");
    } else {
        assert!(dom.contains("class=\"pill healthy\""), "{dom}");
    }
    assert!(!dom.contains("id=\"probe-p99\">–<"), "probe card filled: {dom}");
    // Tiles and charts show the same minute: the tile is the legend's
    // (the newest point's) value.
    let legend = |id: &str, label: &str| {
        let start = dom.find(&format!("id=\"{id}\"")).unwrap();
        let at = start + dom[start..].find(&format!("{label} <b>")).unwrap() + label.len() + 4;
        dom[at..at + dom[at..].find('<').unwrap()].to_owned()
    };
    assert_eq!(tile("send-p99"), legend("legend-send", "P99"), "{dom}");
    assert_eq!(
        tile("connections"),
        legend("legend-connections", "connections"),
        "{dom}"
    );
    assert_eq!(tile("rate"), legend("legend-throughput", "deliveries/s"), "{dom}");
    assert!(
        dom.contains("data-chart=\"chart-send\" data-scale=\"log\""),
        "latency on a log scale"
    );
    // The icon: linked from the page, and served.
    assert!(dom.contains("<link rel=\"icon\" href=\"/favicon.ico\""), "{dom}");
    let (status, icon) = http_get(app.admin, "/favicon.ico").await;
    assert_eq!(status, 200);
    assert!(icon.starts_with("<svg"), "{icon}");

    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target");
    std::fs::create_dir_all(&target).unwrap();
    let screenshot = target.join("dashboard.png");
    let _ = std::fs::remove_file(&screenshot);
    run_chromium(
        &chromium,
        &url,
        &[
            &format!("--screenshot={}", screenshot.display()),
            "--window-size=1400,1000",
        ],
    )
    .await;
    let size = std::fs::metadata(&screenshot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 20_000, "screenshot {} is {size} bytes", screenshot.display());
    writer.abort();
    app.stop().await.expect("a clean stop");
}

/// A test-only reader of the Prometheus text exposition format (0.0.4):
/// enough to hold `/metrics` to the format and to its histogram rules.
pub(crate) mod prometheus {
    use super::BTreeMap;

    #[derive(Debug, Default)]
    pub struct Family {
        pub kind: String,
        pub help: bool,
        pub samples: Vec<Sample>,
    }

    #[derive(Debug)]
    pub struct Sample {
        pub name: String,
        pub labels: Vec<(String, String)>,
        pub value: f64,
    }

    /// Families by name. Every sample must belong to a family declared by
    /// `# TYPE` before it, under its name or, for histograms, `_bucket`,
    /// `_sum` and `_count`.
    pub fn parse(text: &str) -> Result<BTreeMap<String, Family>, String> {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if line.trim().is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind) {
                            return Err(at(format!("unknown type {kind}")));
                        }
                        let family = families.entry(name.to_owned()).or_default();
                        if !family.kind.is_empty() || !family.samples.is_empty() {
                            return Err(at("TYPE after samples or twice".into()));
                        }
                        family.kind = kind.to_owned();
                    }
                    (Some("HELP"), Some(name), _) => {
                        families.entry(name.to_owned()).or_default().help = true;
                    }
                    _ => {}
                }
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line).map_err(at)?;
            let family =
                family_of(&families, &sample.name).ok_or_else(|| at(format!("{} has no # TYPE", sample.name)))?;
            families.get_mut(&family).unwrap().samples.push(sample);
        }
        Ok(families)
    }

    fn family_of(families: &BTreeMap<String, Family>, name: &str) -> Option<String> {
        if families.get(name).is_some_and(|f| !f.kind.is_empty()) {
            return Some(name.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            (families.get(base)?.kind == "histogram").then(|| base.to_owned())
        })
    }

    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }

    fn parse_sample(line: &str) -> Result<Sample, String> {
        let name_end = line.find(['{', ' ']).ok_or_else(|| "no value".to_owned())?;
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(format!("bad metric name {name:?}"));
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            loop {
                let (start, c) = chars.next().ok_or("unterminated labels")?;
                if c == '}' {
                    rest = &inner[start + 1..];
                    break;
                }
                let eq = inner[start..].find('=').ok_or("label without =")? + start;
                let label = &inner[start..eq];
                if !valid_name(label) || label.contains(':') {
                    return Err(format!("bad label name {label:?}"));
                }
                while chars.peek().is_some_and(|(i, _)| *i <= eq) {
                    chars.next();
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err("label value not quoted".into());
                }
                let mut value = String::new();
                loop {
                    match chars.next().ok_or("unterminated label value")?.1 {
                        '"' => break,
                        '\\' => match chars.next().ok_or("dangling escape")?.1 {
                            'n' => value.push('\n'),
                            c @ ('\\' | '"') => value.push(c),
                            c => return Err(format!("bad escape \\{c}")),
                        },
                        c => value.push(c),
                    }
                }
                labels.push((label.to_owned(), value));
                if chars.peek().is_some_and(|(_, c)| *c == ',') {
                    chars.next();
                }
            }
        }
        let mut fields = rest.split_whitespace();
        let value = fields.next().ok_or("no value")?;
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
        }
        if fields.next().is_some() {
            return Err("trailing fields".into());
        }
        Ok(Sample {
            name: name.to_owned(),
            labels,
            value,
        })
    }

    /// Checks each series of a histogram (labels other than `le`): buckets
    /// in ascending `le`, cumulative counts, a `+Inf` bucket equal to
    /// `_count`, a `_sum`. Returns each series' count.
    pub fn check_histogram(family: &Family) -> Result<BTreeMap<String, f64>, String> {
        #[derive(Default)]
        struct Series {
            buckets: Vec<(f64, f64)>,
            sum: Option<f64>,
            count: Option<f64>,
        }
        let mut series: BTreeMap<String, Series> = BTreeMap::new();
        for s in &family.samples {
            let key = s
                .labels
                .iter()
                .filter(|(k, _)| k != "le")
                .map(|(k, v)| format!("{k}=\"{v}\""))
                .collect::<Vec<_>>()
                .join(",");
            let entry = series.entry(key).or_default();
            if s.name.ends_with("_bucket") {
                let le = s.labels.iter().find(|(k, _)| k == "le").ok_or("bucket without le")?;
                let bound = match le.1.as_str() {
                    "+Inf" => f64::INFINITY,
                    v => v.parse().map_err(|_| format!("bad le {v:?}"))?,
                };
                entry.buckets.push((bound, s.value));
            } else if s.name.ends_with("_sum") {
                entry.sum = Some(s.value);
            } else if s.name.ends_with("_count") {
                entry.count = Some(s.value);
            } else {
                return Err(format!("{} in a histogram", s.name));
            }
        }
        if series.is_empty() {
            return Err("no series".into());
        }
        let mut counts = BTreeMap::new();
        for (key, s) in series {
            let count = s.count.ok_or(format!("{{{key}}} has no _count"))?;
            let sum = s.sum.ok_or(format!("{{{key}}} has no _sum"))?;
            if sum < 0.0 || !sum.is_finite() {
                return Err(format!("{{{key}}} _sum {sum}"));
            }
            for pair in s.buckets.windows(2) {
                if pair[1].0 <= pair[0].0 {
                    return Err(format!("{{{key}}} le not ascending: {:?}", s.buckets));
                }
                if pair[1].1 < pair[0].1 {
                    return Err(format!("{{{key}}} buckets not cumulative: {:?}", s.buckets));
                }
            }
            let last = s.buckets.last().ok_or(format!("{{{key}}} has no buckets"))?;
            if last.0 != f64::INFINITY {
                return Err(format!("{{{key}}} has no +Inf bucket"));
            }
            if last.1 != count {
                return Err(format!("{{{key}}} +Inf {} != _count {count}", last.1));
            }
            counts.insert(key, count);
        }
        Ok(counts)
    }

    #[test]
    fn the_reader_refuses_what_prometheus_would() {
        let good = "# HELP x_seconds t\n# TYPE x_seconds histogram\nx_seconds_bucket{a=\"q\\\"\",le=\"0.1\"} 1\nx_seconds_bucket{a=\"q\\\"\",le=\"+Inf\"} 2\nx_seconds_sum{a=\"q\\\"\"} 0.3\nx_seconds_count{a=\"q\\\"\"} 2\n";
        let families = parse(good).unwrap();
        let counts = check_histogram(&families["x_seconds"]).unwrap();
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), [2.0]);
        assert!(parse("x 1\n").is_err(), "no TYPE");
        assert!(parse("# TYPE x gauge\nx{a=b} 1\n").is_err(), "unquoted");
        assert!(parse("# TYPE x gauge\nx one\n").is_err(), "bad value");
        let not_cumulative = good.replace("} 1\n", "} 3\n");
        assert!(check_histogram(&parse(&not_cumulative).unwrap()["x_seconds"]).is_err());
        let wrong_count = good.replace("_count{a=\"q\\\"\"} 2", "_count{a=\"q\\\"\"} 5");
        assert!(check_histogram(&parse(&wrong_count).unwrap()["x_seconds"]).is_err());
    }
}
