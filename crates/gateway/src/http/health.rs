//! `/healthz`: the original gateway's health document (SPEC section 5), with
//! the same field names, 503 while the feed from the database is down.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::state::AppState;
use crate::telemetry::{Counters, FINE_SLOT_S, FeedState, Percentiles, Stage, Telemetry};

pub async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let (code, body) = document(&state);
    (code, axum::Json(body)).into_response()
}

/// The clients' port's `/healthz` when the admin endpoints have their own:
/// `{"status": ...}` with the same code, for a load balancer.
pub async fn status_only(State(state): State<Arc<AppState>>) -> Response {
    let (code, body) = document(&state);
    (code, axum::Json(json!({"status": body["status"]}))).into_response()
}

/// `auth`: the mode, how many keys verify tokens, and the JWKS's state.
fn auth_document(state: &AppState) -> Value {
    let Some(keys) = state.auth.keys() else {
        return json!({"mode": "none"});
    };
    let (secrets, public_keys) = keys.counts();
    json!({
        "mode": "jwt",
        "hs256_secrets": secrets,
        "public_keys": public_keys,
        "jwks": keys.jwks().map(|jwks| jwks.status()),
    })
}

/// `{p50_ms, p95_ms, p99_ms, count}`, percentiles null when empty.
pub fn summary(p: &Percentiles) -> Value {
    json!({"p50_ms": p.p50_ms, "p95_ms": p.p95_ms, "p99_ms": p.p99_ms, "count": p.count})
}

fn ms(us: i64) -> f64 {
    us as f64 / 1000.0
}

/// Timing samples held within `window` across every histogram.
fn metrics_within(t: &Telemetry, window: Duration) -> u64 {
    let seconds = window.as_secs().max(FINE_SLOT_S);
    [&t.commit_to_send, &t.commit_to_ack, &t.probe]
        .into_iter()
        .chain(Stage::ALL.iter().map(|&s| t.stages.histogram(s)))
        .map(|h| h.recent_count(seconds))
        .sum()
}

/// The document and its status code.
pub fn document(state: &AppState) -> (StatusCode, Value) {
    let settings = state.settings();
    let telemetry = &state.telemetry;
    let counters = &telemetry.counters;
    let feed = &telemetry.feed;
    let feed_state = feed.state();
    let connections = state.active_connections.load(Ordering::Relaxed);
    let pool = state.connection_pool();
    let latency = telemetry.commit_to_send.recent(60);
    let uptime_s = state.started_at.elapsed().as_secs_f64().max(1e-3);
    let sent = Counters::get(&counters.messages_sent);
    let received = Counters::get(&counters.messages_received);
    let errors = Counters::get(&counters.client_errors);
    // No key at all to verify tokens with (an identity provider whose key
    // set never arrived): nobody can connect, though the feed is fine.
    let keyless = state.auth.keys().is_some_and(|keys| {
        let (secrets, public_keys) = keys.counts();
        secrets + public_keys == 0 && keys.jwks().is_none_or(|jwks| jwks.keys().is_empty())
    });
    let status = match feed_state {
        FeedState::Live if keyless => "degraded",
        FeedState::Live => "healthy",
        FeedState::CatchingUp => "degraded",
        FeedState::Down => "unhealthy",
    };
    let lag_ms = match feed_state {
        FeedState::Down => None,
        _ => Some(ms(feed.lag_us.load(Ordering::Relaxed).max(0))),
    };
    let profile = telemetry.profile();
    let stages: Vec<Value> = match &profile {
        Some(p) => p
            .stages
            .iter()
            .map(|s| {
                json!({"stage": s.stage, "p50_ms": s.p50_ms, "p95_ms": s.p95_ms,
                       "p99_ms": s.p99_ms, "count": s.count, "bottleneck": s.bottleneck})
            })
            .collect(),
        None => Vec::new(),
    };
    let bottlenecks: Vec<Stage> = profile.map(|p| p.bottlenecks).unwrap_or_default();
    let body = json!({
        "status": status,
        "connections": connections,
        "rooms": telemetry.excluding_probe(state.hub.room_count()),
        "timestamp": crate::change::format_rfc3339_micros(crate::change::now_us()),
        "performance": {
            "totalMetrics": metrics_within(telemetry, settings.profiler.metric_retention),
            "recentMetrics": metrics_within(telemetry, settings.profiler.interval),
            "averageLatency": latency.mean_ms.unwrap_or(0.0),
            "stages": stages,
            "bottlenecks": bottlenecks,
        },
        "cache": state.authorizer.stats(),
        "connectionPool": {
            "totalConnections": connections,
            "activeConnections": pool.active,
            "idleConnections": pool.idle,
            // Mean WebSocket ping round trip; the database's is in `feed`.
            "averageLatency": pool.average_round_trip_ms,
            "throughput": sent as f64 / uptime_s,
            "errorRate": if received == 0 { 0.0 } else { errors as f64 / received as f64 },
        },
        // Batches form as changes arrive and while a socket is busy: none
        // waits on a timer.
        "messageOptimization": {
            // Connections with frames waiting: they go out merged as batches.
            "pendingBatches": pool.backlogged,
            "deduplicationCacheSize": state.hub.dedup_entries(),
            "activeBatchTimers": 0,
        },
        "regressionDetection": telemetry.regression_summary(),
        "auth": auth_document(state),
        "latency": summary(&latency),
        "probe": summary(&telemetry.probe.recent(60)),
        "ack": summary(&telemetry.commit_to_ack.recent(60)),
        "feed": {
            "state": feed_state,
            "position": feed.position.load(Ordering::Relaxed).to_string(),
            "lag_ms": lag_ms,
            "reconnects": feed.reconnects.load(Ordering::Relaxed),
            "clock_offset_ms": ms(feed.clock_offset_us.load(Ordering::Relaxed)),
            "clock_uncertainty_ms": ms(feed.clock_uncertainty_us.load(Ordering::Relaxed)),
            "db_round_trip_ms": ms(feed.db_round_trip_us.load(Ordering::Relaxed)),
        },
    });
    let mut body = body;
    body["feed"]["source"] = json!(settings.source.as_str());
    if telemetry.wal.enabled.load(Ordering::Relaxed) {
        let wal = &telemetry.wal;
        let bytes = |gauge: &std::sync::atomic::AtomicI64| {
            let v = gauge.load(Ordering::Relaxed);
            (v >= 0).then_some(v)
        };
        let feed = body["feed"].as_object_mut().expect("feed is an object");
        // WAL the slot holds back: what a leader has yet to read or confirm.
        feed.insert("slot_lag_bytes".into(), json!(bytes(&wal.slot_lag_bytes)));
        feed.insert("slot_retained_bytes".into(), json!(bytes(&wal.slot_retained_bytes)));
        feed.insert("slot_safe_wal_bytes".into(), json!(bytes(&wal.slot_safe_wal_bytes)));
        feed.insert("slot_status".into(), json!(wal.slot_health()));
        feed.insert("slot_resets".into(), json!(wal.slot_resets.load(Ordering::Relaxed)));
        feed.insert("leader".into(), json!(wal.leader.load(Ordering::Relaxed)));
    }
    let code = if feed_state == FeedState::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, body)
}
