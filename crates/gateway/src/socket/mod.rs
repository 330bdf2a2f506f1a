//! One client connection: a receive half that handles what the client sends
//! (`session`), and a send half that owns the socket's writing side and
//! works through the connection's queue (`send`), with its heartbeat and
//! limits beside them.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocket;
use futures_util::StreamExt;

use crate::auth::Identity;
use crate::hub::{CloseKind, CloseReason, DROPPED, Subscriber};
use crate::pipeline::encode::Encoding;
use crate::protocol;
use crate::state::{AppState, ConnectionHandle, Liveness};
use crate::telemetry::Counters;

pub mod heartbeat;
pub mod limits;
pub(crate) mod race;
mod replay;
mod send;
mod session;
pub mod sse;

/// How long a client closed as a slow consumer has to read on: first to
/// take what the socket still holds and the close frame (the send loop),
/// then, from when that frame is written, to answer it (here). Past either,
/// the socket is dropped: a half-open client holds a task for at most twice
/// this. Dropping it sooner, while the client is still reading its backlog,
/// resets the connection and discards the close frame in the client's
/// kernel: the client would see a broken connection instead of 4008 and
/// back off instead of resuming at once.
const SLOW_CLOSE_GRACE: Duration = Duration::from_secs(10);
/// How long to wait for the client's half of a closing handshake.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

/// Serves one upgraded WebSocket until either side closes it or the gateway
/// shuts down.
///
/// Not an `async fn`: the set-up runs here, so the returned future holds only
/// the socket's two halves, not also the moved-from socket (an `async fn`
/// keeps its arguments for its whole life). That future is what each open
/// connection keeps resident: `ws-gateway bench --connections 10000`
/// reports it as RSS per idle connection.
pub fn serve(
    socket: WebSocket,
    state: Arc<AppState>,
    identity: Identity,
    connection_id: u64,
    encoding: Encoding,
    fd: Option<i32>,
) -> impl Future<Output = ()> + Send {
    let settings = state.settings();
    let (subscriber, queue) = Subscriber::new(connection_id, settings.limits.send_queue_bytes);
    // The dispatcher writes live changes to this socket itself while its
    // send task idles (not the probe's: its latencies are not the clients').
    if let Some(fd) = fd
        && !state.telemetry.is_probe(connection_id)
    {
        subscriber.write_directly(fd, encoding);
    }
    let liveness = Arc::new(Liveness::new());
    state.register_connection(
        connection_id,
        ConnectionHandle {
            liveness: Arc::clone(&liveness),
            subscriber: Arc::clone(&subscriber),
        },
    );
    if state.shutdown.is_cancelled() {
        // Registered after shutdown's sweep (`AppState::close_all`).
        subscriber.close(CloseReason::going_away());
    }
    subscriber.push_control(protocol::welcome_message(
        &format!("{}-{connection_id}", state.instance_id),
        settings.heartbeat.interval.as_millis() as u64,
        encoding.as_str(),
    ));
    let (sink, stream) = socket.split();
    let mut session = session::Session::new(
        Arc::clone(&state),
        Arc::clone(&subscriber),
        identity,
        Arc::clone(&liveness),
    );
    async move {
        {
            // Pinned in place (`tokio::pin!` of a local would keep a second,
            // moved-from copy of each future alive in this one's state).
            let mut send = std::pin::pin!(send::send_loop(sink, queue, &subscriber, &state, &liveness, encoding));
            let mut receive = std::pin::pin!(session.receive_loop(stream));
            match race::race(send.as_mut(), receive.as_mut(), &liveness).await {
                race::First::Send => {
                    // We closed (slow consumer, shutdown, write error): give the
                    // client a moment to answer the close frame, reading (and
                    // dropping) what it sends meanwhile. A slow consumer is
                    // still working through its backlog: it gets its grace,
                    // unless the gateway is stopping.
                    let slow = subscriber
                        .close_reason()
                        .is_some_and(|r| r.kind == CloseKind::SlowConsumer);
                    let linger = if slow { SLOW_CLOSE_GRACE } else { CLOSE_LINGER };
                    // Boxed, like the wait below: their timers are needed
                    // only while closing; unboxed they would sit in every
                    // open connection's task.
                    Box::pin(async {
                        tokio::select! {
                            _ = tokio::time::timeout(linger, &mut receive) => {}
                            () = state.shutdown.cancelled(), if slow => {}
                        }
                    })
                    .await;
                }
                race::First::Receive => {
                    // The client closed or broke the protocol: answer its close.
                    subscriber.close(CloseReason::new(CloseKind::Client, ""));
                    let _ = Box::pin(tokio::time::timeout(CLOSE_LINGER, &mut send)).await;
                }
            }
        }
        session.leave_all();
        ended(&state, &subscriber, connection_id);
    }
}

/// A connection (a WebSocket, or an `/sse` stream) is gone: forgets it and
/// counts its close.
fn ended(state: &AppState, subscriber: &Subscriber, connection_id: u64) {
    state.unregister_connection(connection_id);
    // Slow-consumer closes were counted by the send loop when decided.
    let reason = subscriber.close_reason();
    // A connection that ended without a close (1006, abnormal closure)
    // failed too.
    if reason.as_ref().is_none_or(|r| r.kind.is_failure()) && !state.telemetry.is_probe(connection_id) {
        Counters::add(&state.telemetry.counters.connection_failures, 1);
    }
    let kind = reason.map_or(DROPPED, |r| r.kind.label());
    state.closes.count(kind);
    tracing::debug!(connection_id, kind, "connection closed");
}
