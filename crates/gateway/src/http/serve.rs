//! The accept loop and each connection's HTTP/1.1 server (hyper's, with a
//! header-read timeout and a header cap that `axum::serve` does not have).
//! Every accepted TCP connection takes a slot from accept to close,
//! upgraded to a WebSocket or not: past the limit a few reserved slots
//! answer only `/healthz`, `/metrics` and the probe, and beyond those a
//! connection is closed at once. One function serves any listener: the
//! client port, or an admin port with slots of its own.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tower_service::Service;

use crate::slots::{ConnectionAbort, Slot, Slots};
use crate::state::AppState;
use crate::telemetry::Counters;

/// Request headers larger than this are refused (431): SPEC section 3.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Paths an over-limit connection may ask for (`/ws` only with the probe's
/// ticket, which the upgrade checks).
const RESERVED_PATHS: [&str; 3] = ["/healthz", "/metrics", "/ws"];
/// Backoff after an `accept` that failed for want of resources (EMFILE,
/// ENFILE, ENOBUFS, ENOMEM): doubles up to the cap, resets on success.
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_CAP: Duration = Duration::from_secs(1);
/// At most one warning about failing accepts per this (each is counted in
/// `ws_gateway_accept_errors_total`).
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);
/// What a connection beyond even the reserved slots gets before it is
/// closed (written if the socket takes it at once; never waited for).
const FULL_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
connection: close\r\ncontent-length: 24\r\n\r\nconnection limit reached";

/// Accepts connections on `listener` and serves `router` on each until
/// shutdown, then lets the HTTP connections in flight finish (upgraded
/// WebSockets are `AppState::connections`', drained by the caller).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    slots: Arc<Slots>,
    state: Arc<AppState>,
) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let connections = TaskTracker::new();
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    // Failures are counted each, and logged at most every ACCEPT_WARN_EVERY.
    let mut warned: Option<tokio::time::Instant> = None;
    let mut unlogged = 0u64;
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                Counters::add(&state.telemetry.counters.accept_errors, 1);
                if is_per_connection(&error) {
                    // That connection went away before we took it.
                    continue;
                }
                unlogged += 1;
                if warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                    warned = Some(tokio::time::Instant::now());
                    tracing::warn!(
                        %error,
                        failures = std::mem::take(&mut unlogged),
                        open = slots.open(),
                        "accept failed (out of file descriptors? raise `ulimit -n` or lower GATEWAY_MAX_CONNECTIONS); backing off"
                    );
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_CAP);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_FIRST;
        let Some(slot) = slots.take() else {
            Counters::add(&state.telemetry.counters.connections_refused, 1);
            state.refusals.count("connection_limit");
            let _ = tcp.try_write(FULL_RESPONSE);
            continue;
        };
        // No Nagle: a change is one small frame, written when it is ready;
        // held back until the previous frame's ACK it would wait out the
        // client's delayed ACK (up to 40 ms).
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
        }
        connections.spawn(serve_connection(tcp, peer, router.clone(), slot, Arc::clone(&state)));
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Errors that concern only the connection being accepted.
fn is_per_connection(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        error.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused | Interrupted
    )
}

/// One TCP connection's HTTP/1.1: requests until it closes, or until it is
/// upgraded (then the WebSocket's task holds the slot).
async fn serve_connection(tcp: TcpStream, peer: SocketAddr, router: Router, slot: Arc<Slot>, state: Arc<AppState>) {
    let timeout = state.settings().limits.handshake_timeout;
    // For the dispatcher's direct writes of WebSocket frames (`hub::
    // Subscriber::push_live`): this is the plain TCP socket the frames go
    // out on, since the gateway has no TLS of its own (a proxy in front
    // terminates it).
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let over_limit = slot.over_limit();
    let abort = ConnectionAbort::new();
    let aborted = abort.token();
    let service = {
        let state = Arc::clone(&state);
        hyper::service::service_fn(move |mut request: Request<Incoming>| {
            let mut router = router.clone();
            let slot = Arc::clone(&slot);
            let state = Arc::clone(&state);
            let abort = abort.clone();
            async move {
                if slot.over_limit() && !RESERVED_PATHS.contains(&request.uri().path()) {
                    return Ok::<_, Infallible>(super::connection_limit(&state));
                }
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(crate::hub::SocketFd(fd));
                request.extensions_mut().insert(slot);
                request.extensions_mut().insert(abort.clone());
                // A request must be answered within the timeout too: a
                // slow body holds its slot no longer than slow headers.
                match tokio::time::timeout(timeout, router.call(request.map(Body::new))).await {
                    Ok(Ok(response)) => Ok(response),
                    Ok(Err(never)) => match never {},
                    Err(_) => {
                        state.refusals.count("request_timeout");
                        Ok(request_timeout(timeout))
                    }
                }
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // From accept (and after each response) to the end of the headers.
        .header_read_timeout(timeout)
        .max_buf_size(MAX_HEADER_BYTES)
        // An over-limit connection answers one request and frees its slot.
        .keep_alive(!over_limit);
    let connection = builder.serve_connection(TokioIo::new(tcp), service).with_upgrades();
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = state.shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            tokio::select! {
                result = connection.as_mut() => result,
                () = aborted.cancelled() => Ok(()),
            }
        }
        // Dropped with whatever hyper still holds for a client that does
        // not read (an `/sse` stream's slow consumer).
        () = aborted.cancelled() => Ok(()),
    };
    if let Err(error) = result {
        if error.is_timeout() {
            Counters::add(&state.telemetry.counters.handshake_timeouts, 1);
        } else if error.is_parse_too_large() {
            state.refusals.count("headers_too_large");
        } else {
            tracing::debug!(%error, %peer, "HTTP connection ended with an error");
        }
    }
}

fn request_timeout(timeout: Duration) -> Response {
    (
        StatusCode::REQUEST_TIMEOUT,
        format!("request not completed within {} ms", timeout.as_millis()),
    )
        .into_response()
}
