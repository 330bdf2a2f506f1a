//! HTTP beside the data path, on the same port: the WebSocket upgrade
//! (`/ws`), `/healthz`, `/metrics`, `/latency` and the dashboard page.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;

use crate::app::AppState;
use crate::socket;
use crate::telemetry::{Counters, FeedState};

mod metrics;

/// Socket buffer sizes, chosen for memory per idle connection: tungstenite's
/// 128 KiB read buffer default would be resident on every socket.
const READ_BUFFER_BYTES: usize = 1024;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// The largest outbound frame (a change carrying a very large row).
const MAX_OUTBOUND_FRAME_BYTES: usize = 256 * 1024 * 1024;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/ws", get(upgrade))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::render))
        .with_state(state)
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

#[derive(Deserialize)]
struct UpgradeParams {
    token: Option<String>,
    encoding: Option<String>,
}

fn refuse(state: &AppState, status: StatusCode, reason: String) -> Response {
    Counters::add(&state.telemetry.counters.connections_refused, 1);
    (status, reason).into_response()
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(params): Query<UpgradeParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let settings = state.settings();
    if state.shutdown.is_cancelled() {
        return refuse(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "gateway shutting down".into(),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && !settings.history.origin_allowed(origin)
    {
        return refuse(
            &state,
            StatusCode::FORBIDDEN,
            format!("origin {origin} is not allowed"),
        );
    }
    match params.encoding.as_deref() {
        None | Some("none") | Some("") => {}
        // Compression is delivered by the pipeline issue; until then these
        // are accepted and the welcome message says frames are plain.
        Some("br") | Some("gzip") => {}
        Some(other) => {
            return refuse(
                &state,
                StatusCode::BAD_REQUEST,
                format!("unknown encoding {other:?}: expected br, gzip or none"),
            );
        }
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let token = params.token.as_deref().or(bearer);
    let identity = match state.auth.authenticate(token) {
        Ok(identity) => identity,
        Err(error) => return refuse(&state, StatusCode::UNAUTHORIZED, error.to_string()),
    };
    let max = settings.limits.max_connections;
    if state.active_connections.load(Ordering::Acquire) >= max {
        return refuse(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            format!("connection limit reached ({max}); try another instance or later"),
        );
    }

    // Frames past the configured size get an `error` reply and the
    // connection carries on; frames past this hard bound close it (1009).
    let inbound_hard_limit = settings
        .limits
        .max_message_bytes
        .saturating_mul(16)
        .max(2 << 20);
    let id = state.next_connection_id.fetch_add(1, Ordering::Relaxed);
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_OUTBOUND_FRAME_BYTES)
        .max_message_size(inbound_hard_limit)
        .max_frame_size(inbound_hard_limit)
        .on_upgrade(move |socket| {
            let tracked = Arc::clone(&state);
            state.connections.track_future(async move {
                let counters = &tracked.telemetry.counters;
                Counters::add(&counters.connections_opened, 1);
                tracked.active_connections.fetch_add(1, Ordering::AcqRel);
                socket::serve(socket, Arc::clone(&tracked), identity, id).await;
                tracked.active_connections.fetch_sub(1, Ordering::AcqRel);
                Counters::add(&counters.connections_closed, 1);
            })
        })
}

/// The original gateway's health document (SPEC section 5), 503 while the
/// feed from the database is down.
async fn healthz(State(state): State<Arc<AppState>>) -> Response {
    let telemetry = &state.telemetry;
    let counters = &telemetry.counters;
    let feed = &telemetry.feed;
    let feed_state = feed.state();
    let connections = state.active_connections.load(Ordering::Relaxed);
    let latency = telemetry.commit_to_send.recent(60);
    let uptime_s = state.started_at.elapsed().as_secs_f64().max(1e-3);
    let sent = Counters::get(&counters.messages_sent);
    let received = Counters::get(&counters.messages_received);
    let errors = Counters::get(&counters.client_errors);
    let status = match feed_state {
        FeedState::Live => "healthy",
        FeedState::CatchingUp => "degraded",
        FeedState::Down => "unhealthy",
    };
    let lag_ms = match feed_state {
        FeedState::Down => None,
        _ => Some(feed.lag_us.load(Ordering::Relaxed).max(0) as f64 / 1000.0),
    };
    let body = serde_json::json!({
        "status": status,
        "connections": connections,
        "rooms": state.hub.room_count(),
        "timestamp": crate::change::format_rfc3339_micros(crate::change::now_us()),
        "performance": {
            "totalMetrics": latency.count,
            "recentMetrics": latency.count,
            "averageLatency": latency.p50_ms.unwrap_or(0.0),
        },
        "cache": {"hits": 0, "misses": 0, "hitRate": 0.0, "totalEntries": 0},
        "connectionPool": {
            "totalConnections": Counters::get(&counters.connections_opened),
            "activeConnections": connections,
            "idleConnections": 0,
            "averageLatency": 0.0,
            "throughput": sent as f64 / uptime_s,
            "errorRate": if received == 0 { 0.0 } else { errors as f64 / received as f64 },
        },
        "messageOptimization": {"pendingBatches": 0, "deduplicationCacheSize": 0, "activeBatchTimers": 0},
        "regressionDetection": {
            "totalAlerts": 0, "criticalAlerts": 0, "warningAlerts": 0,
            "affectedMetrics": [], "recommendations": [],
        },
        "latency": {
            "p50_ms": latency.p50_ms,
            "p95_ms": latency.p95_ms,
            "p99_ms": latency.p99_ms,
            "count": latency.count,
        },
        "feed": {
            "state": feed_state,
            "position": feed.position.load(Ordering::Relaxed).to_string(),
            "lag_ms": lag_ms,
            "reconnects": feed.reconnects.load(Ordering::Relaxed),
            "clock_offset_ms": feed.clock_offset_us.load(Ordering::Relaxed) as f64 / 1000.0,
        },
    });
    let code = if feed_state == FeedState::Down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, axum::Json(body)).into_response()
}
