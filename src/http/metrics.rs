//! `/metrics` in the Prometheus text format, names prefixed `ws_gateway_`.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use hdrhistogram::Histogram;

use crate::app::AppState;
use crate::telemetry::{Counters, FeedState};

/// Bucket bounds in seconds: fine below 10 ms, where we aim to be.
const BUCKETS_S: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 10.0,
];

pub async fn render(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let t = &state.telemetry;
    let c = &t.counters;
    let mut out = String::with_capacity(4096);
    let counters: [(&str, &str, u64); 10] = [
        (
            "changes_received_total",
            "Changes received from the database feed.",
            Counters::get(&c.changes_received),
        ),
        (
            "deliveries_total",
            "Change deliveries queued to connections.",
            Counters::get(&c.deliveries_queued),
        ),
        (
            "messages_out_total",
            "Frames written to client sockets.",
            Counters::get(&c.messages_sent),
        ),
        (
            "bytes_out_total",
            "Bytes written to client sockets (as sent).",
            Counters::get(&c.bytes_sent),
        ),
        (
            "messages_in_total",
            "Frames received from clients.",
            Counters::get(&c.messages_received),
        ),
        (
            "client_errors_total",
            "Client messages refused with an error.",
            Counters::get(&c.client_errors),
        ),
        (
            "slow_consumer_disconnects_total",
            "Connections closed because their send queue filled.",
            Counters::get(&c.slow_consumer_closes),
        ),
        (
            "connections_opened_total",
            "WebSocket connections accepted.",
            Counters::get(&c.connections_opened),
        ),
        (
            "connections_refused_total",
            "WebSocket upgrades refused.",
            Counters::get(&c.connections_refused),
        ),
        (
            "feed_reconnects_total",
            "Times the feed lost its LISTEN connection.",
            t.feed.reconnects.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP ws_gateway_{name} {help}\n# TYPE ws_gateway_{name} counter\nws_gateway_{name} {value}"
        );
    }
    let gauges: [(&str, &str, f64); 4] = [
        (
            "connections",
            "Open WebSocket connections.",
            state.active_connections.load(Ordering::Relaxed) as f64,
        ),
        (
            "rooms",
            "Rooms with at least one subscriber.",
            state.hub.room_count() as f64,
        ),
        (
            "feed_up",
            "1 while the database feed is live or catching up.",
            f64::from(u8::from(t.feed.state() != FeedState::Down)),
        ),
        (
            "clock_offset_seconds",
            "Database clock minus gateway clock.",
            t.feed.clock_offset_us.load(Ordering::Relaxed) as f64 / 1e6,
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP ws_gateway_{name} {help}\n# TYPE ws_gateway_{name} gauge\nws_gateway_{name} {value}"
        );
    }
    histogram(
        &mut out,
        "commit_to_send_seconds",
        "Database commit to frame written to the client socket.",
        &t.commit_to_send.total(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

fn histogram(out: &mut String, name: &str, help: &str, h: &Histogram<u64>) {
    let _ = writeln!(
        out,
        "# HELP ws_gateway_{name} {help}\n# TYPE ws_gateway_{name} histogram"
    );
    for bound in BUCKETS_S {
        let count = if h.is_empty() {
            0
        } else {
            h.count_between(0, (bound * 1e6) as u64)
        };
        let _ = writeln!(out, "ws_gateway_{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let _ = writeln!(out, "ws_gateway_{name}_bucket{{le=\"+Inf\"}} {}", h.len());
    let sum_s: f64 = h
        .iter_recorded()
        .map(|v| v.value_iterated_to() as f64 * v.count_at_value() as f64)
        .sum::<f64>()
        / 1e6;
    let _ = writeln!(
        out,
        "ws_gateway_{name}_sum {sum_s}\nws_gateway_{name}_count {}",
        h.len()
    );
}
