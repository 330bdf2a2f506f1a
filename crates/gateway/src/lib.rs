//! ws-gateway: committed PostgreSQL changes, pushed to WebSocket rooms.
//!
//! The data path reads top to bottom: the capture SQL (`migrations/`, applied
//! by `db`; or, with `GATEWAY_SOURCE=wal`, logical replication written into
//! the same outbox by `source::wal`) -> `source` (LISTEN and outbox
//! catch-up, behind the `Source` seam) -> `hub` (rooms, per-connection queues, recent window) through
//! `pipeline` (dedup, batch, encode) -> `socket` (one task pair per client).
//! Beside it: `http` (upgrade, health, metrics, dashboard), `telemetry` and
//! its `monitor`, the `probe`, `config`, `auth`/`authz`. `state` is the
//! shared state below every handler; `app` assembles and supervises it all.
//!
//! Modules are private; the public surface is what the `ws-gateway` binary,
//! the tools and the tests need, listed below.

mod app;
mod auth;
mod authz;
pub mod change;
pub mod config;
pub mod db;
mod http;
mod hub;
mod monitor;
mod pipeline;
mod probe;
mod protocol;
mod slots;
mod socket;
mod source;
mod state;
mod telemetry;

/// The daemon: `Application::build(settings)`, then `run_until_stopped()`;
/// `main` and the tests start it the same way.
pub use app::{Application, shutdown_signal};
/// `ws-gateway source notify|wal`: switching the database's capture source.
pub use source::{SwitchOutcome, switch_to_notify, switch_to_wal};
/// What a running gateway shares; tests reload settings through it.
pub use state::AppState;

/// Crates whose `trace` events are never written, whatever the log filter
/// asks for: at `trace`, tungstenite logs every frame it reads or writes
/// and every handshake request it sends, so tokens (`?token=`, in-band
/// `auth`) and the probe's ticket would land in the log.
pub const TRACE_SILENCED: &[&str] = &["tungstenite", "tokio_tungstenite"];

/// Whether a log event may be written: every log subscriber of the daemon
/// adds this as a filter beside its level filter (`filter_fn(may_log)`).
/// It only drops [`TRACE_SILENCED`]'s trace events: their debug and higher
/// follow the level filter, so the default `info` stays quiet.
pub fn may_log(metadata: &tracing::Metadata<'_>) -> bool {
    if *metadata.level() != tracing::Level::TRACE {
        return true;
    }
    let target = metadata.target();
    !TRACE_SILENCED.iter().any(|krate| {
        target
            .strip_prefix(krate)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// For the fuzz tests: the client protocol's decoder and the token check.
pub use auth::Authenticator;
pub use protocol::{ClientMessage, MAX_ROOM_BYTES, decode};

/// For the criterion benches and the compression report: the fan-out and
/// encoding stages of the hot path.
pub use hub::{Hub, Subscriber};
pub use pipeline::encode::{Encoding, Unit, brotli, gzip};
