//! What operators monitor the gateway with, checked with their own tools:
//! the alert rules with promtool (syntax and unit tests), the real
//! Prometheus 2.42 scraping a loaded gateway (its quantiles agree with
//! `/latency`, and it evaluates every Grafana panel and every rule), the
//! Grafana panels' expressions against the metrics' names and types, and
//! the systemd unit with systemd-analyze.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use ws_gateway::config::{Auth, JwtKeys};

use crate::fault_kit::free_port;
use crate::helpers::{DEADLINE, eventually, fresh_database, http_get, http_get_json, spawn_app_with};
use crate::keys::Provider;
use crate::observability::prometheus::{self, Family};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(path)
}

/// A tool of the distribution's, or the test fails saying how to get it.
fn tool(path: &str, package: &str) -> PathBuf {
    let path = PathBuf::from(path);
    assert!(
        path.exists(),
        "{} is missing: this test needs Debian's `{package}` package (.ci/run installs it)",
        path.display()
    );
    path
}

async fn run(program: &Path, args: &[&str]) -> std::process::Output {
    tokio::time::timeout(DEADLINE, tokio::process::Command::new(program).args(args).output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} finishes in time", program.display()))
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Before: the alerts were comments in config/prometheus.yml.
#[tokio::test]
async fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    let promtool = tool("/usr/bin/promtool", "prometheus");
    for args in [
        vec!["check", "rules", "config/alerts.yml"],
        vec!["test", "rules", "config/alerts.test.yml"],
        vec!["check", "config", "config/prometheus.yml"],
    ] {
        let out = tokio::time::timeout(
            DEADLINE,
            tokio::process::Command::new(&promtool)
                .args(&args)
                .current_dir(repo(""))
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        assert!(text(&out.stdout).contains("SUCCESS"), "{args:?}: {}", text(&out.stdout));
    }
}

/// A Prometheus server of its own: scraping `target` every second and
/// evaluating config/alerts.yml every second.
struct Prometheus {
    address: SocketAddr,
    child: tokio::process::Child,
    dir: PathBuf,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let binary = tool("/usr/bin/prometheus", "prometheus");
        let dir = std::env::temp_dir().join(format!(
            "ws-gateway-prometheus-{}-{}",
            std::process::id(),
            target.port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: ws-gateway\n    static_configs:\n      - targets: [\"{target}\"]\n",
                repo("config/alerts.yml").display()
            ),
        )
        .unwrap();
        let address: SocketAddr = format!("127.0.0.1:{}", free_port().await).parse().unwrap();
        let child = tokio::process::Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={address}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .kill_on_drop(true)
            .spawn()
            .expect("starting prometheus");
        let prometheus = Prometheus { address, child, dir };
        eventually("prometheus ready", || async {
            let ok =
                tokio::net::TcpStream::connect(address).await.is_ok() && http_get(address, "/-/ready").await.0 == 200;
            ok.then_some(())
        })
        .await;
        prometheus
    }

    /// An instant query: its result vector.
    async fn query(&self, query: &str) -> Vec<Value> {
        let (status, body) = http_get_json(self.address, &format!("/api/v1/query?query={}", encode(query))).await;
        assert_eq!(status, 200, "{query}: {body}");
        assert_eq!(body["status"], "success", "{query}: {body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The one value of a query that returns one sample.
    async fn value(&self, query: &str) -> f64 {
        let result = self.query(query).await;
        assert_eq!(result.len(), 1, "{query}: {result:?}");
        result[0]["value"][1].as_str().unwrap().parse().unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Percent-encoding for a query string value.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Every `expr` of the Grafana dashboard, with the panel's title and unit.
fn grafana_exprs() -> Vec<(String, String, String)> {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/grafana-dashboard.json")).unwrap()).unwrap();
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_owned();
        let unit = panel["fieldConfig"]["defaults"]["unit"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        for target in panel["targets"].as_array().unwrap() {
            out.push((title.clone(), unit.clone(), target["expr"].as_str().unwrap().to_owned()));
        }
    }
    assert!(out.len() > 20, "{out:?}");
    out
}

/// Every `expr` of config/alerts.yml, with its alert's name.
fn alert_exprs() -> Vec<(String, String)> {
    let rules = std::fs::read_to_string(repo("config/alerts.yml")).unwrap();
    let mut out = Vec::new();
    let mut lines = rules.lines().peekable();
    let mut name = String::new();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if let Some(alert) = trimmed.strip_prefix("- alert: ") {
            name = alert.to_owned();
        } else if let Some(expr) = trimmed.strip_prefix("expr: ") {
            let mut expr = expr.trim_start_matches('|').trim().to_owned();
            let indent = line.len() - trimmed.len();
            while let Some(next) = lines.peek() {
                let next_indent = next.len() - next.trim_start().len();
                if next.trim().is_empty() || next_indent <= indent {
                    break;
                }
                expr.push(' ');
                expr.push_str(next.trim());
                lines.next();
            }
            out.push((name.clone(), expr));
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

/// The functions a name at `at` in `expr` is nested in, innermost first
/// (aggregations written `sum by (x) (...)` count as `sum`).
fn enclosing(expr: &str, at: usize) -> Vec<String> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut i = at;
    while i > 0 {
        i -= 1;
        match bytes[i] {
            b')' => depth += 1,
            b'(' if depth > 0 => depth -= 1,
            b'(' => {
                let mut end = i;
                while end > 0 && bytes[end - 1] == b' ' {
                    end -= 1;
                }
                // `sum by (le) (`: skip the grouping to the aggregation.
                if end > 0 && bytes[end - 1] == b')' {
                    let mut d = 0;
                    let mut j = end;
                    while j > 0 {
                        j -= 1;
                        match bytes[j] {
                            b')' => d += 1,
                            b'(' => {
                                d -= 1;
                                if d == 0 {
                                    break;
                                }
                            }
                            _ => {}
                        }
                    }
                    end = expr[..j]
                        .trim_end()
                        .trim_end_matches("by")
                        .trim_end_matches("without")
                        .trim_end()
                        .len();
                }
                let start = expr[..end]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |p| p + 1);
                out.push(expr[start..end].to_owned());
            }
            _ => {}
        }
    }
    out
}

/// Checks each metric name in `expr` against the families: it exists, and
/// it is used as its type allows (rate of counters, histogram_quantile of
/// bucket rates, gauges as they are).
fn check_expr(families: &BTreeMap<String, Family>, what: &str, expr: &str) -> Result<(), String> {
    let mut named = 0;
    for (at, _) in expr.match_indices("ws_gateway_") {
        if at > 0 && (expr.as_bytes()[at - 1].is_ascii_alphanumeric() || expr.as_bytes()[at - 1] == b'_') {
            continue;
        }
        let name: String = expr[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        named += 1;
        let outer = enclosing(expr, at);
        let ranged = |f: &[&str]| outer.first().is_some_and(|o| f.contains(&o.as_str()));
        let (family, part) = match ["_bucket", "_count", "_sum"].iter().find_map(|suffix| {
            name.strip_suffix(suffix)
                .filter(|f| families.get(*f).is_some_and(|f| f.kind == "histogram"))
                .map(|f| (f, *suffix))
        }) {
            Some((family, part)) => (family.to_owned(), part),
            None => (name.clone(), ""),
        };
        let kind = families
            .get(&family)
            .map(|f| f.kind.as_str())
            .ok_or_else(|| format!("{what}: {name} is not in /metrics"))?;
        match (kind, part) {
            ("histogram", "_bucket") => {
                if !ranged(&["rate", "increase"]) || !outer.iter().any(|o| o == "histogram_quantile") {
                    return Err(format!(
                        "{what}: {name} outside histogram_quantile(rate(...)): {outer:?}"
                    ));
                }
            }
            ("histogram", _) | ("counter", _) => {
                if !ranged(&["rate", "increase", "irate"]) {
                    return Err(format!("{what}: counter {name} not under rate/increase: {outer:?}"));
                }
            }
            ("gauge", _) => {
                if outer
                    .iter()
                    .any(|o| ["rate", "increase", "irate"].contains(&o.as_str()))
                {
                    return Err(format!("{what}: gauge {name} under rate/increase: {outer:?}"));
                }
            }
            (other, _) => return Err(format!("{what}: {name} has type {other}")),
        }
    }
    if named == 0 {
        return Err(format!("{what}: names no metric: {expr}"));
    }
    Ok(())
}

/// The metric families of a gateway with every optional family present
/// (a JWKS configured).
async fn families_of(admin: SocketAddr) -> BTreeMap<String, Family> {
    let (_, text) = http_get(admin, "/metrics").await;
    prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}"))
}

/// Before: amber and red thresholds both at 1, deliveries/s in `reqps`, and
/// names only checked to exist.
#[tokio::test]
async fn grafana_panels_and_alert_rules_use_metrics_as_their_types_allow() {
    let provider = Provider::start().await;
    provider.publish(&[("rsa-a", "a")]);
    let app = spawn_app_with(fresh_database().await, |s| {
        s.auth = Auth::Jwt(JwtKeys {
            jwks_url: Some(provider.url()),
            ..JwtKeys::default()
        })
    })
    .await;
    let families = families_of(app.admin).await;
    let mut errors = Vec::new();
    for (title, unit, expr) in grafana_exprs() {
        if let Err(e) = check_expr(&families, &format!("panel {title:?}"), &expr) {
            errors.push(e);
        }
        let quantile = expr.contains("histogram_quantile");
        let rate_only = expr.contains("rate(") && !quantile && !expr.contains(" / ");
        if quantile && unit != "s" {
            errors.push(format!("panel {title:?}: a latency in unit {unit:?}, not s"));
        }
        if rate_only && (unit == "s" || unit == "reqps") {
            errors.push(format!("panel {title:?}: a rate in unit {unit:?}"));
        }
    }
    for (name, expr) in alert_exprs() {
        if let Err(e) = check_expr(&families, &format!("alert {name}"), &expr) {
            errors.push(e);
        }
    }
    // Thresholds climb: each step above the one before.
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(repo("config/grafana-dashboard.json")).unwrap()).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        let steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let values: Vec<f64> = steps.iter().filter_map(|s| s["value"].as_f64()).collect();
        if values.windows(2).any(|w| w[1] <= w[0]) {
            errors.push(format!(
                "panel {:?}: thresholds {values:?} do not climb",
                panel["title"]
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
    // The checker itself refuses what it should.
    assert!(check_expr(&families, "t", "rate(ws_gateway_connections[5m])").is_err());
    assert!(check_expr(&families, "t", "ws_gateway_deliveries_total").is_err());
    assert!(
        check_expr(
            &families,
            "t",
            "sum(rate(ws_gateway_commit_to_send_seconds_bucket[5m]))"
        )
        .is_err()
    );
    assert!(check_expr(&families, "t", "ws_gateway_nonexistent").is_err());
    assert!(
        check_expr(
            &families,
            "t",
            "histogram_quantile(0.5, sum by (le) (rate(ws_gateway_commit_to_send_seconds_bucket[1m])))"
        )
        .is_ok()
    );
    app.stop().await.expect("a clean stop");
}

/// Before: buckets jumped 5 -> 7.5 -> 10 -> 25 ms and Prometheus' P99 was
/// up to 3x /latency's. Now the real Prometheus, scraping a loaded gateway,
/// agrees with it within 20 %, evaluates every Grafana panel's expression
/// and loads and evaluates every alert rule.
#[tokio::test]
async fn prometheus_agrees_with_latency_and_evaluates_every_panel_and_rule() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.history.probe_interval = Some(Duration::from_millis(100));
    })
    .await;
    let prometheus = Prometheus::start(app.admin).await;
    // Scraping before any delivery, so increase() sees every one.
    eventually("two scrapes of the gateway", || async {
        let result = prometheus.query("count_over_time(up{job=\"ws-gateway\"}[1m])").await;
        (result.first()?["value"][1].as_str()?.parse::<f64>().ok()? >= 2.0).then_some(())
    })
    .await;

    // Load: ten readers of project:1, a hundred commits a second.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..10 {
        let mut client = app.connect().await;
        client.subscribe("project:1").await;
        let stop = Arc::clone(&stop);
        readers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let _ = tokio::time::timeout(Duration::from_millis(200), client.ws.next()).await;
            }
        }));
    }
    let pool = app.db.pool.clone();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        for id in 1..=2500i64 {
            tick.tick().await;
            let _ = sqlx::query("insert into items (id, project_id) values ($1, 1)")
                .bind(id)
                .execute(&pool)
                .await;
        }
    });
    writer.await.unwrap();
    // Every delivery sent and scraped.
    let sent = eventually("every delivery sent", || async {
        let (_, body) = http_get_json(app.admin, "/latency?window=5m").await;
        let count = body["count"].as_u64()?;
        (count >= 20_000).then_some(count)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let _ = reader.await;
    }
    let (_, ours) = http_get_json(app.admin, "/latency?window=5m").await;
    let total = ours["count"].as_u64().unwrap();
    assert!(total >= sent);
    eventually("prometheus scraped every delivery", || async {
        let scraped = prometheus.value("sum(ws_gateway_commit_to_send_seconds_count)").await;
        (scraped as u64 == total).then_some(())
    })
    .await;

    for (q, key) in [(0.5, "p50_ms"), (0.95, "p95_ms"), (0.99, "p99_ms")] {
        let theirs_s = prometheus
            .value(&format!(
                "histogram_quantile({q}, sum by (le) (increase(ws_gateway_commit_to_send_seconds_bucket[5m])))"
            ))
            .await;
        let ours_ms = ours[key].as_f64().unwrap();
        let ratio = theirs_s * 1000.0 / ours_ms;
        assert!(
            (0.8..=1.2).contains(&ratio),
            "P{}: Prometheus {:.3} ms against /latency {ours_ms:.3} ms ({ratio:.2}x) over {total} sends",
            q * 100.0,
            theirs_s * 1000.0
        );
    }
    // Every panel's expression evaluates; all but filters return data.
    for (title, _, expr) in grafana_exprs() {
        let expr = expr.replace("$instance", ".*").replace("$__rate_interval", "30s");
        let result = prometheus.query(&expr).await;
        assert!(
            !result.is_empty() || expr.contains(" > 0"),
            "panel {title:?} returned nothing: {expr}"
        );
    }
    // Every rule is loaded and evaluated without an error.
    eventually("every rule evaluated", || async {
        let (_, rules) = http_get_json(prometheus.address, "/api/v1/rules").await;
        let groups = rules["data"]["groups"].as_array()?;
        let rules: Vec<&Value> = groups
            .iter()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        assert_eq!(rules.len(), alert_exprs().len(), "{rules:?}");
        for rule in &rules {
            assert_ne!(rule["health"], "err", "{rule}");
        }
        rules.iter().all(|r| r["health"] == "ok").then_some(())
    })
    .await;
    let firing = prometheus.query("ALERTS{alertstate=\"firing\"}").await;
    assert!(firing.is_empty(), "a healthy gateway fires nothing: {firing:?}");
    drop(prometheus);
    app.stop().await.expect("a clean stop");
}

/// deploy/ws-gateway.service: verified by systemd itself, and hardened
/// (DynamicUser, ProtectSystem, LimitNOFILE...) to an exposure of 2 or less.
#[tokio::test]
async fn the_systemd_unit_verifies_and_is_hardened() {
    let analyze = tool("/usr/bin/systemd-analyze", "systemd");
    let unit = std::fs::read_to_string(repo("deploy/ws-gateway.service")).unwrap();
    for directive in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "LimitNOFILE=",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(unit.contains(directive), "{directive} missing");
    }
    // systemd checks that ExecStart's program exists: the one just built.
    let dir = std::env::temp_dir().join(format!("ws-gateway-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ws-gateway.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/ws-gateway",
            &crate::helpers::gateway_binary().display().to_string(),
        ),
    )
    .unwrap();
    let verify = run(&analyze, &["verify", path.to_str().unwrap()]).await;
    let complaints = format!("{}{}", text(&verify.stdout), text(&verify.stderr));
    assert!(
        verify.status.success() && complaints.trim().is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
    let security = run(&analyze, &["security", "--offline=true", path.to_str().unwrap()]).await;
    let report = text(&security.stdout);
    let exposure: f64 = report
        .split("Overall exposure level for ws-gateway.service: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level:\n{report}{}", text(&security.stderr)));
    assert!(exposure <= 2.0, "exposure {exposure}:\n{report}");
    // A misspelt directive is what verify exists to catch.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("ProtectSystem=", "ProtectSystm="),
    )
    .unwrap();
    let broken = run(&analyze, &["verify", path.to_str().unwrap()]).await;
    assert!(text(&broken.stderr).contains("Unknown key"), "{}", text(&broken.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn enclosing_functions_are_found() {
    let expr = "histogram_quantile(0.99, sum by (instance, le) (rate(ws_gateway_x_bucket[5m])))";
    let at = expr.find("ws_gateway_").unwrap();
    assert_eq!(enclosing(expr, at), ["rate", "sum", "histogram_quantile"]);
    let expr = "max(ws_gateway_regression_level{instance=~\"$instance\"})";
    assert_eq!(enclosing(expr, expr.find("ws_").unwrap()), ["max"]);
}
