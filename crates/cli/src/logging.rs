//! Logging, set up before any command runs: `GATEWAY_LOG_FORMAT` (text for
//! people, colour only on a terminal; json for log shippers) and
//! `GATEWAY_LOG` (levels in `RUST_LOG` syntax).
//!
//! Lines go to stderr through a writer thread with a bounded queue that
//! drops lines when it is full: a stderr that is a closed pipe (`serve 2>&1
//! | head -3`) or a full one (nobody reading) can never stall a task or
//! swallow a signal. Write errors are ignored rather than reported on the
//! same stderr (tracing-subscriber's default would `eprintln!`, which
//! panics on a closed pipe).

use std::io::IsTerminal;

use tracing_appender::non_blocking::WorkerGuard;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use ws_gateway::config::{LogFormat, LogSettings};

/// Lines queued for the writer thread before new ones are dropped.
const QUEUED_LINES: usize = 16 * 1024;

/// Installs the global subscriber; keep the guard until the process ends
/// (dropping it flushes what is queued, waiting a bounded time).
pub fn init(settings: &LogSettings) -> WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(QUEUED_LINES)
        .lossy(true)
        .thread_name("ws-gateway-log")
        .finish(std::io::stderr());
    let filter = EnvFilter::builder()
        .parse(&settings.filter)
        .unwrap_or_else(|_| EnvFilter::new(ws_gateway::config::DEFAULT_LOG_FILTER));
    // Whatever GATEWAY_LOG or RUST_LOG asks: tungstenite's trace would log tokens.
    let may_log = tracing_subscriber::filter::filter_fn(ws_gateway::may_log);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false);
    match settings.format {
        LogFormat::Text => {
            // Colour for a person at a terminal; never in files or pipes,
            // nor when NO_COLOR asks (https://no-color.org).
            let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
            builder.with_ansi(colour).finish().with(may_log).init();
        }
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .with_ansi(false)
            .finish()
            .with(may_log)
            .init(),
    }
    guard
}
