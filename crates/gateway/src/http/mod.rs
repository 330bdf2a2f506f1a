//! HTTP beside the data path: for clients the WebSocket upgrade (`/ws`) and
//! the JavaScript client (`/client.js`); for operators `/healthz`,
//! `/metrics`, `/latency`, and the dashboard page (`/`) with the JSON it
//! polls (`/api/stats`). One port serves both unless `GATEWAY_ADMIN_LISTEN`
//! is set: then the clients' port keeps `/ws`, `/client.js` and a `/healthz`
//! that says only `status`, and the admin port has the rest (and the
//! clients' routes too, for the dashboard's live panel).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::FutureExt;
use serde::Deserialize;

use crate::auth::Identity;
use crate::change::Position;
use crate::pipeline::encode::Encoding;
use crate::slots::{ConnectionAbort, Slot};
use crate::socket;
use crate::state::AppState;
use crate::telemetry::Counters;

mod client_js;
mod health;
mod latency;
mod metrics;
mod publish;
mod serve;
mod stats;

pub use serve::serve;

/// Socket buffer sizes, chosen for memory per idle connection: tungstenite's
/// 128 KiB read buffer default would be resident on every socket. What
/// clients send is small (subscribe, ack, ping: under 100 bytes); a larger
/// frame (an `auth` with its token) grows the buffer to fit. At 10,000
/// connections 128 B against 512 B took 0.30 KiB off RSS per connection.
const READ_BUFFER_BYTES: usize = 128;
const WRITE_BUFFER_BYTES: usize = 16 * 1024;
/// The largest outbound frame (a change carrying a very large row).
const MAX_OUTBOUND_FRAME_BYTES: usize = 256 * 1024 * 1024;

/// What clients use: on `GATEWAY_LISTEN` always.
fn client_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/ws", get(upgrade))
        .route("/sse", get(sse).options(sse_preflight))
        .route(
            "/publish",
            post(publish::publish).layer(Extension(Arc::new(publish::PublishRates::default()))),
        )
        .route("/client.js", get(client_js::serve))
}

/// What operators use: on `GATEWAY_ADMIN_LISTEN` when it is set.
fn admin_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(dashboard))
        .route("/favicon.ico", get(favicon))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(metrics::render))
        .route("/latency", get(latency::latency))
        .route("/api/stats", get(stats::stats))
}

/// Everything on one port (no `GATEWAY_ADMIN_LISTEN`).
pub fn router(state: Arc<AppState>) -> Router {
    client_routes().merge(admin_routes()).with_state(state)
}

/// The clients' port beside an admin port: `/ws` and a `/healthz` that
/// says only `status` (what a load balancer needs, nothing an attacker could use).
pub fn public_router(state: Arc<AppState>) -> Router {
    client_routes()
        .route("/healthz", get(health::status_only))
        .with_state(state)
}

/// The admin port: every operator endpoint, and `/ws` for the dashboard's
/// live panel.
pub fn admin_router(state: Arc<AppState>) -> Router {
    admin_routes().merge(client_routes()).with_state(state)
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

/// The dashboard's icon (browsers ask for `/favicon.ico` whatever the page says).
async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        FAVICON_SVG,
    )
        .into_response()
}

/// Two arrows leaving a dot: a change going out to its rooms.
pub const FAVICON_SVG: &str = r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect width="32" height="32" rx="7" fill="#161b22"/><circle cx="10" cy="16" r="4" fill="#58a6ff"/><path d="M15 10h9m-3-3 3 3-3 3M15 22h9m-3-3 3 3-3 3" stroke="#3fb950" stroke-width="2.4" fill="none" stroke-linecap="round" stroke-linejoin="round"/></svg>"##;

#[derive(Deserialize)]
struct UpgradeParams {
    token: Option<String>,
    encoding: Option<String>,
    /// The built-in probe's single-use ticket (instead of a token): its
    /// connection is not counted as a client.
    probe: Option<String>,
}

/// Refuses an upgrade; `code` names the refusal in `/metrics`.
fn refuse(state: &AppState, status: StatusCode, code: &str, reason: String) -> Response {
    Counters::add(&state.telemetry.counters.connections_refused, 1);
    Counters::add(&state.telemetry.counters.connection_failures, 1);
    state.refusals.count(code);
    (status, reason).into_response()
}

/// What a connection past `GATEWAY_MAX_CONNECTIONS` gets (503).
fn connection_limit(state: &AppState) -> Response {
    let max = state.settings().limits.max_connections;
    refuse(
        state,
        StatusCode::SERVICE_UNAVAILABLE,
        "connection_limit",
        format!("connection limit reached ({max}); try another instance or later"),
    )
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(params): Query<UpgradeParams>,
    slot: Option<Extension<Arc<Slot>>>,
    fd: Option<Extension<crate::hub::SocketFd>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let settings = state.settings();
    if state.shutdown.is_cancelled() {
        return refuse(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "gateway shutting down".into(),
        );
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
        && !settings.history.origin_allowed(origin)
    {
        return refuse(
            &state,
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("origin {origin} is not allowed"),
        );
    }
    let encoding = match Encoding::parse(params.encoding.as_deref()) {
        Ok(encoding) => encoding,
        Err(message) => return refuse(&state, StatusCode::BAD_REQUEST, "bad_encoding", message),
    };
    let slot = slot.map(|Extension(slot)| slot);
    let is_probe = match params.probe.as_deref() {
        None => false,
        Some(ticket) if state.telemetry.redeem_probe_ticket(ticket) => true,
        Some(_) => {
            return refuse(
                &state,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "probe ticket not valid".into(),
            );
        }
    };
    if !is_probe && slot.as_ref().is_some_and(|s| s.over_limit()) {
        return connection_limit(&state);
    }
    let identity = if is_probe {
        Identity::probe(crate::probe::room(&state.instance_id))
    } else {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "));
        let token = params.token.as_deref().or(bearer);
        match state.auth.authenticate(token).await {
            Ok(identity) => identity,
            Err(error) => {
                return refuse(&state, StatusCode::UNAUTHORIZED, "unauthorized", error.to_string());
            }
        }
    };
    if is_probe && let Some(slot) = &slot {
        // The probe is not a client: it takes no client's slot.
        slot.uncount();
    }

    // Frames past the configured size get an `error` reply and the
    // connection carries on; frames past this hard bound close it (1009).
    let inbound_hard_limit = settings.limits.max_message_bytes.saturating_mul(16).max(2 << 20);
    let id = state.next_connection_id.fetch_add(1, Ordering::Relaxed);
    if is_probe {
        state.telemetry.set_probe_connection(id);
    }
    let upgraded = Box::new(Upgraded {
        slot,
        fd: fd.map(|Extension(f)| f.0),
        identity,
        id,
        encoding,
        is_probe,
    });
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_write_buffer_size(MAX_OUTBOUND_FRAME_BYTES)
        .max_message_size(inbound_hard_limit)
        .max_frame_size(inbound_hard_limit)
        .on_upgrade(move |socket| connection(socket, state, upgraded))
}

/// What a connection needs once its handshake is done. Boxed, because axum's
/// upgrade task keeps the callback it was given, and everything the callback
/// captured, for the connection's whole life: the callback captures this
/// box's pointer, not an `Identity` that `serve` has moved on.
struct Upgraded {
    /// The connection's slot, held until the socket is gone.
    slot: Option<Arc<Slot>>,
    /// The TCP socket's descriptor, for the dispatcher's direct writes.
    fd: Option<i32>,
    identity: Identity,
    id: u64,
    encoding: Encoding,
    is_probe: bool,
}

/// The upgraded connection's future, which its task keeps while it is open.
/// Not an `async` block: one keeps its captures for its whole life, so the
/// socket (368 B) and the identity (184 B), moved on into `serve`, would
/// stay beside `serve`'s future in every connection's task.
fn connection(socket: WebSocket, state: Arc<AppState>, upgraded: Box<Upgraded>) -> impl Future<Output = ()> + Send {
    let Upgraded {
        slot,
        fd,
        identity,
        id,
        encoding,
        is_probe,
    } = *upgraded;
    if !is_probe {
        Counters::add(&state.telemetry.counters.connections_opened, 1);
        state.active_connections.fetch_add(1, Ordering::AcqRel);
    }
    let serving = socket::serve(socket, Arc::clone(&state), identity, id, encoding, fd);
    let tracker = state.connections.clone();
    tracker.track_future(serving.map(move |()| {
        if !is_probe {
            state.active_connections.fetch_sub(1, Ordering::AcqRel);
            Counters::add(&state.telemetry.counters.connections_closed, 1);
        }
        drop(slot);
    }))
}

/// `GET /sse?room=R&room=R2`: the rooms' messages as server-sent events
/// (SPEC section 10). Token as for `/ws` (`?token=` or `Authorization:
/// Bearer`); `Last-Event-ID` (or `?since=`) resumes every room after it.
/// Refusals before the stream starts are HTTP errors with a JSON reason;
/// after, a last `close` event ends it.
async fn sse(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    slot: Option<Extension<Arc<Slot>>>,
    abort: Option<Extension<ConnectionAbort>>,
    headers: HeaderMap,
) -> Response {
    let settings = state.settings();
    let json_refusal = |status: StatusCode, code: &str, message: String| {
        Counters::add(&state.telemetry.counters.connections_refused, 1);
        state.refusals.count(code);
        let body = serde_json::json!({"error": code, "message": message}).to_string();
        (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
    };
    if state.shutdown.is_cancelled() {
        return json_refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "gateway shutting down".into(),
        );
    }
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin
        && !settings.history.origin_allowed(origin)
    {
        return json_refusal(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            format!("origin {origin} is not allowed"),
        );
    }
    let mut rooms = Vec::new();
    let mut token = None;
    let mut since = None;
    for (key, value) in form_urlencoded::parse(query.as_deref().unwrap_or("").as_bytes()) {
        match &*key {
            "room" => rooms.push(value.into_owned()),
            "token" => token = Some(value.into_owned()),
            "since" => since = Some(value.into_owned()),
            other => {
                return json_refusal(
                    StatusCode::BAD_REQUEST,
                    "invalid_message",
                    format!("unknown parameter {other:?}: /sse takes room (repeated), token and since"),
                );
            }
        }
    }
    if rooms.is_empty() {
        return json_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_message",
            "give at least one room: /sse?room=project:42&room=project:43".into(),
        );
    }
    for room in &rooms {
        if let Err(error) = crate::protocol::validate_room(room) {
            return json_refusal(StatusCode::BAD_REQUEST, error.code, error.message);
        }
    }
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let since = match last_id.or(since).filter(|s| !s.is_empty()) {
        None => None,
        Some(text) => match text.parse::<Position>() {
            Ok(position) => Some(position),
            Err(_) => {
                return json_refusal(
                    StatusCode::BAD_REQUEST,
                    crate::protocol::codes::INVALID_POSITION,
                    format!("{text:?} is not a position (an event id this gateway sent)"),
                );
            }
        },
    };
    let slot = slot.map(|Extension(slot)| slot);
    if slot.as_ref().is_some_and(|s| s.over_limit()) {
        return connection_limit(&state);
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let identity = match state.auth.authenticate(token.as_deref().or(bearer)).await {
        Ok(identity) => identity,
        Err(error) => return json_refusal(StatusCode::UNAUTHORIZED, "unauthorized", error.to_string()),
    };
    // Compressed only if asked for, and while the compression switch is on.
    let gzip = settings.features.compression
        && headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(socket::sse::accepts_gzip);
    let request = socket::sse::SseRequest {
        identity,
        rooms,
        since,
        slot,
        abort: abort.map(|Extension(abort)| abort),
        gzip,
    };
    let body = match socket::sse::open(Arc::clone(&state), request).await {
        Ok(body) => body,
        Err(error) => {
            use crate::protocol::codes;
            let status = match error.code {
                codes::FORBIDDEN => StatusCode::FORBIDDEN,
                codes::HISTORY_UNAVAILABLE | codes::AUTHORIZATION_UNAVAILABLE => StatusCode::SERVICE_UNAVAILABLE,
                _ if error.message.contains("not connected to the database") => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::BAD_REQUEST,
            };
            return json_refusal(status, error.code, error.message);
        }
    };
    let allow_origin = origin.unwrap_or("*").to_owned();
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        // nginx would otherwise buffer the stream.
        .header("x-accel-buffering", "no")
        .header(header::VARY, "accept-encoding, origin")
        // One stream per connection: when it ends, so does the connection
        // (EventSource reconnects on a new one anyway).
        .header(header::CONNECTION, "close")
        .header(header::ACCESS_CONTROL_ALLOW_ORIGIN, allow_origin);
    if gzip {
        response = response.header(header::CONTENT_ENCODING, "gzip");
    }
    response.body(body).expect("a valid response")
}

/// The CORS preflight of a cross-origin `/sse` request that sends
/// `Last-Event-ID` (a reconnecting `EventSource`) or `Authorization`.
async fn sse_preflight(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
    if let Some(origin) = origin
        && !state.settings().history.origin_allowed(origin)
    {
        return (StatusCode::FORBIDDEN, format!("origin {origin} is not allowed")).into_response();
    }
    (
        StatusCode::NO_CONTENT,
        [
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.unwrap_or("*").to_owned()),
            (header::ACCESS_CONTROL_ALLOW_METHODS, "GET".to_owned()),
            (
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                "last-event-id, authorization, cache-control".to_owned(),
            ),
            (header::ACCESS_CONTROL_MAX_AGE, "86400".to_owned()),
            (header::VARY, "origin".to_owned()),
        ],
    )
        .into_response()
}
