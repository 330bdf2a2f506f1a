//! `GET /latency?window=60s&source=send|ack|probe`: commit-to-receive
//! percentiles over a recent window, the answer to "what is our P99 now?".

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::state::AppState;
use crate::telemetry::{MAX_WINDOW, WindowedHistogram};

const SOURCES: &str =
    "send (commit to socket write), ack (commit to client ack) or probe (commit to the built-in probe's receipt)";

/// Parses `30s`, `5m`, `1h` (a whole number and a unit) into a window of at
/// most an hour; the error says what is accepted.
pub fn parse_window(raw: &str) -> Result<Duration, String> {
    let bad = || {
        format!(
            "window={raw:?}: expected a whole number and a unit, like 30s, 5m or 1h, from 1s to {}m",
            MAX_WINDOW.as_secs() / 60
        )
    };
    let unit_at = raw.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = raw.split_at(unit_at);
    let number: u64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        _ => return Err(bad()),
    };
    if seconds == 0 || seconds > MAX_WINDOW.as_secs() {
        return Err(bad());
    }
    Ok(Duration::from_secs(seconds))
}

/// Which histogram a `source` names.
fn source<'a>(state: &'a AppState, name: &str) -> Option<&'a WindowedHistogram> {
    let t = &state.telemetry;
    match name {
        "send" => Some(&t.commit_to_send),
        "ack" => Some(&t.commit_to_ack),
        "probe" => Some(&t.probe),
        _ => None,
    }
}

fn bad_request(message: String) -> Response {
    (StatusCode::BAD_REQUEST, axum::Json(json!({"error": message}))).into_response()
}

pub async fn latency(State(state): State<Arc<AppState>>, Query(params): Query<HashMap<String, String>>) -> Response {
    if let Some(unknown) = params.keys().find(|k| !matches!(k.as_str(), "window" | "source")) {
        return bad_request(format!(
            "unknown parameter {unknown:?}: /latency takes window (like 60s, 5m, 1h) and source ({SOURCES})"
        ));
    }
    let window = match params.get("window").map(|w| parse_window(w)) {
        None => Duration::from_secs(60),
        Some(Ok(window)) => window,
        Some(Err(message)) => return bad_request(message),
    };
    let name = params.get("source").map_or("send", String::as_str);
    let Some(histogram) = source(&state, name) else {
        return bad_request(format!("source={name:?}: expected {SOURCES}"));
    };
    let p = histogram.recent(window.as_secs());
    axum::Json(json!({
        "source": name,
        "window_s": window.as_secs(),
        "count": p.count,
        "p50_ms": p.p50_ms,
        "p95_ms": p.p95_ms,
        "p99_ms": p.p99_ms,
        "max_ms": p.max_ms,
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_window("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_window("60m"), Ok(Duration::from_secs(3600)));
        for bad in [
            "",
            "60",
            "0s",
            "2h",
            "61m",
            "1.5m",
            "-1s",
            "5 m",
            "1d",
            "s",
            "99999999999999999999s",
        ] {
            let error = parse_window(bad).unwrap_err();
            assert!(error.contains("like 30s, 5m or 1h"), "{bad:?}: {error}");
        }
    }
}
