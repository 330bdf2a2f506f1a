//! `GET /api/stats[?since=<ms>]`: what the dashboard polls. The health
//! document, the last minute of each latency source, the profiler's stages,
//! recent alerts, and the time series points after `since` (all ten minutes
//! kept server-side when absent, so a freshly opened page has history).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::health::{document, summary};
use crate::state::AppState;
use crate::telemetry::timeline::{SAMPLE_EVERY, SERIES_WINDOW};
use crate::telemetry::{Counters, Stage, profile_window};

/// Alerts sent to the page at most.
const ALERTS_SHOWN: usize = 20;

pub async fn stats(State(state): State<Arc<AppState>>, Query(params): Query<HashMap<String, String>>) -> Response {
    let since = match params.get("since").map(|s| s.parse::<i64>()) {
        None => 0,
        Some(Ok(t)) => t,
        Some(Err(_)) => {
            return (
                StatusCode::BAD_REQUEST,
                axum::Json(json!({"error": "since: expected milliseconds since the Unix epoch"})),
            )
                .into_response();
        }
    };
    let settings = state.settings();
    let t = &state.telemetry;
    let c = &t.counters;
    let (_, health) = document(&state);
    let (raw, sent) = state.hub.stats.compression_bytes();
    // Stages over the profiler's window, live rather than as of its last tick.
    let window = profile_window(&settings.profiler);
    let threshold_ms = settings.profiler.bottleneck_threshold.as_secs_f64() * 1000.0;
    let stages: Vec<_> = t
        .stages
        .recent(window)
        .into_iter()
        .map(|(stage, p)| {
            json!({
                "stage": stage, "count": p.count, "p50_ms": p.p50_ms, "p95_ms": p.p95_ms,
                "p99_ms": p.p99_ms, "bottleneck": p.p99_ms.is_some_and(|v| v > threshold_ms),
            })
        })
        .collect();
    let body = json!({
        "now": crate::change::now_us() / 1000,
        "uptime_s": state.started_at.elapsed().as_secs(),
        "instance": state.instance_id,
        "sample_every_ms": SAMPLE_EVERY.as_millis() as u64,
        "series_window_s": SERIES_WINDOW.as_secs(),
        "health": health,
        "latency": {
            "send": summary(&t.commit_to_send.recent(60)),
            "ack": summary(&t.commit_to_ack.recent(60)),
            "probe": summary(&t.probe.recent(60)),
        },
        "stages": stages,
        "stage_names": Stage::ALL.map(Stage::name),
        "stage_window_s": window.as_secs(),
        "bottleneck_threshold_ms": threshold_ms,
        "alerts": t.latest_alerts(ALERTS_SHOWN),
        "totals": {
            "deliveries": Counters::get(&c.deliveries_queued),
            "messages_out": Counters::get(&c.messages_sent),
            "bytes_out": Counters::get(&c.bytes_sent),
            "change_bytes_raw": raw,
            "change_bytes_sent": sent,
            "dedup_drops": crate::pipeline::PipelineStats::get(&state.hub.stats.deduplicated),
            "slow_consumer_disconnects": Counters::get(&c.slow_consumer_closes),
            "probes_sent": Counters::get(&c.probes_sent),
            "probes_received": Counters::get(&c.probes_received),
            "probe_failures": Counters::get(&c.probe_failures),
            "subscriptions": t.excluding_probe(state.hub.subscription_count()),
            "connections": state.active_connections.load(Ordering::Relaxed),
        },
        "probe_interval_ms": settings.history.probe_interval.map(|d| d.as_millis() as u64),
        "series": t.series_after(since),
    });
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
}
