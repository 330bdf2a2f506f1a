//! The dashboard's properties, each checked in headless Chromium on the
//! page the gateway serves: the page is fed a state through a small server
//! in front of the gateway that answers `/api/stats` with the gateway's own
//! document, edited into the state under test (one delivery in the last
//! minute, latencies spread over two decades, a critical alert, stages from
//! microseconds to tens of milliseconds).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::ws::WebSocketUpgrade;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::helpers::{eventually, http_get, http_get_json};
use crate::observability::{chromium_binary, run_chromium, spawn_probed};

/// Serves the gateway's page and icon, `stats` as `/api/stats`, and a
/// WebSocket that stays quiet (the live panel connects to it).
struct StatePage {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl StatePage {
    async fn start(gateway: SocketAddr, stats: Value) -> StatePage {
        let (_, html) = http_get(gateway, "/").await;
        let (_, icon) = http_get(gateway, "/favicon.ico").await;
        let stats = Arc::new(stats);
        let router = axum::Router::new()
            .route(
                "/",
                axum::routing::get(move || async move { axum::response::Html(html) }),
            )
            .route(
                "/favicon.ico",
                axum::routing::get(move || async move { ([("content-type", "image/svg+xml")], icon) }),
            )
            .route(
                "/api/stats",
                axum::routing::get(move || async move { axum::Json((*stats).clone()) }),
            )
            .route(
                "/ws",
                axum::routing::get(|ws: WebSocketUpgrade| async move {
                    ws.on_upgrade(|mut socket| async move { while let Some(Ok(_)) = socket.recv().await {} })
                        .into_response()
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        StatePage { address, task }
    }

    async fn dom(&self) -> String {
        let chromium = chromium_binary();
        run_chromium(&chromium, &format!("http://{}/", self.address), &["--dump-dom"]).await
    }
}

impl Drop for StatePage {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The text of the element with `id`, up to its first child tag.
fn text_of(dom: &str, id: &str) -> String {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id}"));
    let rest = &dom[start..];
    let open = rest.find('>').unwrap() + 1;
    let close = rest[open..].find('<').unwrap();
    rest[open..open + close].to_owned()
}

/// The `name="..."` attribute inside the element carrying `marker`.
fn attribute(dom: &str, marker: &str, name: &str) -> Option<String> {
    let start = dom.find(marker)?;
    let tag_start = dom[..start].rfind('<')?;
    let tag_end = start + dom[start..].find('>')?;
    let tag = &dom[tag_start..tag_end];
    let key = format!("{name}=\"");
    let at = tag.find(&key)? + key.len();
    Some(tag[at..at + tag[at..].find('"')?].to_owned())
}

/// The legend's bold value after `label` in legend `id`.
fn legend_value(dom: &str, id: &str, label: &str) -> String {
    let start = dom.find(&format!("id=\"{id}\"")).unwrap();
    let legend = &dom[start..start + dom[start..].find("</div>").unwrap()];
    let at = legend
        .find(&format!("{label} <b>"))
        .unwrap_or_else(|| panic!("{label} in {legend}"))
        + label.len()
        + 4;
    legend[at..at + legend[at..].find("</b>").unwrap()].to_owned()
}

/// The gateway's real stats document once it has a few points.
async fn real_stats(gateway: SocketAddr) -> Value {
    eventually("points of history", || async {
        let (_, stats) = http_get_json(gateway, "/api/stats").await;
        (stats["series"].as_array()?.len() >= 3).then_some(stats)
    })
    .await
}

/// `stats` with every point of the series edited by `edit(index, point)`.
fn with_points(mut stats: Value, edit: impl Fn(usize, &mut Value)) -> Value {
    for (i, point) in stats["series"].as_array_mut().unwrap().iter_mut().enumerate() {
        edit(i, point);
    }
    stats
}

#[tokio::test]
async fn the_dashboard_never_contradicts_itself() {
    let app = spawn_probed().await;
    let stats = real_stats(app.admin).await;
    let points = stats["series"].as_array().unwrap().len();

    // Before: "no deliveries yet" beside a tile showing 0.663 ms (n 1).
    let one = with_points(stats.clone(), |i, p| {
        let last = i + 1 == points;
        for key in ["send_p50", "send_p95", "send_p99"] {
            p[key] = if last { json!(0.663) } else { Value::Null };
        }
        p["send_count"] = json!(u64::from(last));
        p["connections"] = json!(if last { 1 } else { 0 });
    });
    let page = StatePage::start(app.admin, one).await;
    let dom = page.dom().await;
    assert_eq!(text_of(&dom, "send-p99"), "0.663", "the tile");
    let send_chart = &dom[dom.find("data-chart=\"chart-send\"").unwrap()..];
    let send_chart = &send_chart[..send_chart.find("</svg>").unwrap()];
    assert!(
        !send_chart.contains("class=\"empty\""),
        "an empty state beside a filled tile:\n{send_chart}"
    );
    assert_eq!(
        attribute(&dom, "data-series=\"p99\"", "data-points").as_deref(),
        Some("1")
    );
    assert!(
        text_of(&dom, "send-sub").contains("n 1"),
        "{}",
        text_of(&dom, "send-sub")
    );
    assert!(dom.contains("(n 1: P95, P99 ≈ the slowest)"), "few samples said so");
    // Before: the Connections chart said 0 while the tile said 1.
    assert_eq!(text_of(&dom, "connections"), "1");
    assert_eq!(legend_value(&dom, "legend-connections", "connections"), "1");
    drop(page);

    // Before: P50 flattened out of sight on a 0-100 ms axis.
    let spread = with_points(stats.clone(), |_, p| {
        p["send_p50"] = json!(0.5);
        p["send_p95"] = json!(20.0);
        p["send_p99"] = json!(80.0);
        p["send_count"] = json!(5000);
    });
    let page = StatePage::start(app.admin, spread).await;
    let dom = page.dom().await;
    let chart = &dom[dom.find("data-chart=\"chart-send\"").unwrap()..];
    assert!(
        chart.starts_with("data-chart=\"chart-send\" data-scale=\"log\""),
        "{}",
        &chart[..200]
    );
    let top: f64 = attribute(&dom, "data-chart=\"chart-send\"", "data-plot-top")
        .unwrap()
        .parse()
        .unwrap();
    let bottom: f64 = attribute(&dom, "data-chart=\"chart-send\"", "data-plot-bottom")
        .unwrap()
        .parse()
        .unwrap();
    let y = |series: &str| -> f64 {
        let marker = format!("data-series=\"{series}\"");
        attribute(chart, &marker, "data-last-y").unwrap().parse().unwrap()
    };
    let height = bottom - top;
    assert!(
        (bottom - y("p50")) / height > 0.15,
        "P50 at {} of {top}..{bottom}",
        y("p50")
    );
    assert!(
        (y("p50") - y("p95")) / height > 0.2 && y("p95") > y("p99"),
        "P50 > P95 > P99 apart"
    );
    // P95 and P99 from one histogram, both shown, and the tile the same.
    assert_eq!(legend_value(&dom, "legend-send", "P95"), "20.0");
    assert_eq!(legend_value(&dom, "legend-send", "P99"), "80.0");
    assert_eq!(text_of(&dom, "send-p99"), "80.0");
    assert!(
        text_of(&dom, "send-sub").starts_with("P50 0.500 · P95 20.0 · n 5,000"),
        "{}",
        text_of(&dom, "send-sub")
    );
    drop(page);

    // Before: HEALTHY in green beside a red "1 critical".
    let mut critical = stats.clone();
    critical["health"]["regressionDetection"] = json!({
        "totalAlerts": 1, "criticalAlerts": 1, "warningAlerts": 0,
        "affectedMetrics": ["p99_latency"], "recommendations": ["check it"],
    });
    critical["alerts"] = json!([{
        "at_us": stats["now"].as_i64().unwrap() * 1000, "metric": "p99_latency", "severity": "critical",
        "baseline": 30.0, "current": 60.0, "change_pct": 100.0, "recommendation": "check it",
    }]);
    let page = StatePage::start(app.admin, critical.clone()).await;
    let dom = page.dom().await;
    assert_eq!(
        attribute(&dom, "id=\"status\"", "data-state").as_deref(),
        Some("critical")
    );
    assert_eq!(text_of(&dom, "status"), "critical · 1 alert");
    assert_eq!(
        attribute(&dom, "id=\"card-alerts\"", "class").as_deref(),
        Some("card bad")
    );
    drop(page);
    let mut warning = critical;
    warning["health"]["regressionDetection"]["criticalAlerts"] = json!(0);
    warning["health"]["regressionDetection"]["warningAlerts"] = json!(2);
    warning["health"]["regressionDetection"]["totalAlerts"] = json!(2);
    let page = StatePage::start(app.admin, warning.clone()).await;
    assert_eq!(text_of(&page.dom().await, "status"), "warning · 2 alerts");
    drop(page);
    let mut down = warning;
    down["health"]["status"] = json!("unhealthy");
    let page = StatePage::start(app.admin, down).await;
    assert_eq!(text_of(&page.dom().await, "status"), "unhealthy · feed down");
    drop(page);

    // Before: HEALTHY in green beside a red probe tile (P99 over the 250 ms
    // target, no alert because the baseline was as slow).
    let slow = with_points(stats.clone(), |_, p| {
        p["probe_p50"] = json!(120.0);
        p["probe_p99"] = json!(400.0);
        p["probe_count"] = json!(60);
    });
    let page = StatePage::start(app.admin, slow.clone()).await;
    let dom = page.dom().await;
    assert_eq!(
        attribute(&dom, "id=\"status\"", "data-state").as_deref(),
        Some("warning")
    );
    assert_eq!(text_of(&dom, "status"), "warning · probe P99 over 250 ms");
    assert_eq!(
        attribute(&dom, "id=\"card-probe\"", "class").as_deref(),
        Some("card bad"),
        "the probe tile is red"
    );
    drop(page);
    let mut slow_and_warned = slow;
    slow_and_warned["health"]["regressionDetection"] = json!({
        "totalAlerts": 1, "criticalAlerts": 0, "warningAlerts": 1,
        "affectedMetrics": ["p99_latency"], "recommendations": ["check it"],
    });
    let page = StatePage::start(app.admin, slow_and_warned).await;
    assert_eq!(
        text_of(&page.dom().await, "status"),
        "warning · 1 alert · probe P99 over 250 ms"
    );
    drop(page);

    // Before: stage bars on an unlabelled log scale (0.094 ms drawn half
    // as long as 20.5 ms). Now the scale is labelled at every decade and the
    // bars sit where the labels say.
    let mut stages = stats.clone();
    let stage = |name: &str, p99: f64| json!({"stage": name, "count": 500, "p50_ms": p99 / 4.0, "p95_ms": p99 / 2.0, "p99_ms": p99, "bottleneck": false});
    stages["stages"] = json!([
        stage("notify_lag", 0.094),
        stage("queueing", 1.0),
        stage("batch_wait", 0.01),
        stage("encoding", 0.2),
        stage("socket_write", 20.5),
    ]);
    let page = StatePage::start(app.admin, stages).await;
    let dom = page.dom().await;
    let tick = |ms: &str| -> f64 {
        let marker = format!("data-tick-ms=\"{ms}\"");
        let style = attribute(&dom, &marker, "style").unwrap_or_else(|| panic!("no {ms} ms tick"));
        style.trim_start_matches("left:").trim_end_matches('%').parse().unwrap()
    };
    assert!(dom.contains("ms, log scale"), "the scale says what it is");
    for label in [">0.01<", ">0.1<", ">1<", ">10<", ">100<"] {
        let axis = &dom[dom.find("class=\"stage stage-axis\"").unwrap()..];
        assert!(axis[..axis.find("</div>").unwrap()].contains(label), "tick {label}");
    }
    let bar = |stage: &str| {
        let row = &dom[dom.find(&format!("data-stage=\"{stage}\"")).unwrap()..];
        attribute(row, "data-bar=\"p99\"", "width")
            .unwrap()
            .trim_end_matches('%')
            .parse::<f64>()
            .unwrap()
    };
    assert!((bar("queueing") - tick("1")).abs() < 0.5, "1 ms on the 1 ms tick");
    assert!(
        bar("notify_lag") < tick("0.1") && bar("notify_lag") > tick("0.01"),
        "0.094 ms just short of 0.1"
    );
    assert!(
        bar("socket_write") > tick("10") && bar("socket_write") < tick("100"),
        "20.5 ms between 10 and 100"
    );
    drop(page);
    app.stop().await.expect("a clean stop");
}
