//! `POST /publish`: an application event from a backend service that has no
//! database access (SPEC section 10). The body `{"room","event","payload"}`
//! goes through `realtime.publish`, so the event is an outbox entry like
//! one published from SQL: positioned at its commit, retained, resumable.
//!
//! Refusals: 401 without a valid token, 403 when its `publish` claim does
//! not grant the room, 400 for a body that is not the document above (or a
//! room or event name `realtime.publish` would refuse), 413 past
//! `GATEWAY_MAX_MESSAGE_BYTES`, 429 past `GATEWAY_RATE_LIMIT` publishes a
//! second per token (counting what would reach the database), 503 when the database cannot take it now.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, to_bytes};
use axum::extract::{Extension, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::auth::is_reserved_room;
use crate::socket::limits::{RateLimit, Verdict};
use crate::state::AppState;

/// The longest room or event name, as `realtime.publish` allows.
const MAX_NAME_BYTES: usize = 200;
/// Token buckets idle this long are forgotten (a full bucket again).
const RATE_IDLE: Duration = Duration::from_secs(10);

/// Per-token rate limits of `POST /publish`, by a hash of the token (one
/// set per router).
#[derive(Default)]
pub struct PublishRates {
    buckets: Mutex<HashMap<u64, (RateLimit, Instant)>>,
}

impl PublishRates {
    /// Whether the bearer of `token` may publish once more now.
    fn admit(&self, token: &str, rate: u32) -> bool {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        token.hash(&mut hasher);
        let key = hasher.finish();
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("publish rates lock");
        if buckets.len() > 10_000 {
            buckets.retain(|_, (_, used)| now.duration_since(*used) < RATE_IDLE);
        }
        let (bucket, used) = buckets.entry(key).or_insert_with(|| (RateLimit::new(rate, now), now));
        *used = now;
        bucket.check(now) == Verdict::Allow
    }
}

#[derive(Deserialize)]
pub struct PublishParams {
    token: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    room: Option<String>,
    event: Option<String>,
    #[serde(borrow)]
    payload: Option<&'a RawValue>,
}

fn refuse(state: &AppState, status: StatusCode, code: &str, message: String) -> Response {
    state.refusals.count(code);
    let body = serde_json::json!({"error": code, "message": message});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// What is wrong with `name` as a room name, as `realtime.publish` says it.
fn room_problem(room: &str) -> Option<String> {
    if room.is_empty() {
        return Some("give a room name, e.g. \"project:42\"".into());
    }
    if room.len() > MAX_NAME_BYTES {
        return Some(format!(
            "room name is {} bytes; at most {MAX_NAME_BYTES} allowed",
            room.len()
        ));
    }
    if room.chars().any(|c| c.is_whitespace() || c.is_control() || c == '*') {
        return Some(format!(
            "room {room:?}: a room name has no spaces, control characters or *"
        ));
    }
    if is_reserved_room(room) {
        return Some(format!("room {room:?}: rooms starting with __ are the gateway's own"));
    }
    None
}

pub async fn publish(
    State(state): State<Arc<AppState>>,
    Extension(rates): Extension<Arc<PublishRates>>,
    Query(params): Query<PublishParams>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let settings = state.settings();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "));
    let token = bearer.or(params.token.as_deref());
    let identity = match state.auth.authenticate(token).await {
        Ok(identity) => identity,
        Err(error) => return refuse(&state, StatusCode::UNAUTHORIZED, "unauthorized", error.to_string()),
    };
    let limit = settings.limits.max_message_bytes;
    let too_big = || {
        refuse(
            &state,
            StatusCode::PAYLOAD_TOO_LARGE,
            "message_too_big",
            format!(
                "the body is over {limit} bytes (GATEWAY_MAX_MESSAGE_BYTES); publish large payloads with realtime.publish from SQL"
            ),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_big();
    }
    let Ok(bytes) = to_bytes(body, limit).await else {
        return too_big();
    };
    let document: PublishBody = match serde_json::from_slice(&bytes) {
        Ok(document) => document,
        Err(error) => {
            return refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "invalid_json",
                format!("the body must be JSON {{\"room\",\"event\",\"payload\"}}: {error}"),
            );
        }
    };
    let Some(room) = document.room else {
        return refuse(
            &state,
            StatusCode::BAD_REQUEST,
            "invalid_message",
            "\"room\" is missing".into(),
        );
    };
    if let Some(problem) = room_problem(&room) {
        return refuse(&state, StatusCode::BAD_REQUEST, "invalid_room", problem);
    }
    let event = match document.event {
        Some(event) if !event.is_empty() && event.len() <= MAX_NAME_BYTES => event,
        _ => {
            return refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "invalid_message",
                format!("\"event\" must be a name of 1 to {MAX_NAME_BYTES} bytes, e.g. \"inspection_passed\""),
            );
        }
    };
    if !identity.publish.allows(&room) {
        return refuse(
            &state,
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this token's \"publish\" claim does not grant room {room:?}"),
        );
    }
    // What reaches the database is limited; refusals above cost it nothing.
    if !rates.admit(token.unwrap_or(""), settings.limits.rate_limit) {
        let limit = settings.limits.rate_limit;
        let mut response = refuse(
            &state,
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("at most {limit} publishes per second per token"),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return response;
    }
    let payload = document.payload.map_or("{}", RawValue::get);
    let published = sqlx::query("select realtime.publish($1, $2, $3::text::jsonb)")
        .bind(&room)
        .bind(&event)
        .bind(payload)
        .execute(&state.pool)
        .await;
    match published {
        Ok(_) => {
            let body = serde_json::json!({"room": room, "event": event, "published": true});
            (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_string(),
            )
                .into_response()
        }
        Err(sqlx::Error::Database(error)) if error.code().as_deref() == Some("P0001") => refuse(
            &state,
            StatusCode::BAD_REQUEST,
            "invalid_message",
            error.message().to_owned(),
        ),
        Err(error) => {
            tracing::warn!(%error, room, "publish failed");
            refuse(
                &state,
                StatusCode::SERVICE_UNAVAILABLE,
                "publish_unavailable",
                "the database cannot take the event right now; retry".into(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_checked_as_realtime_publish_does() {
        assert!(room_problem("project:42").is_none());
        for bad in ["", "a b", "project:*", "__probe:x", "tab\there"] {
            assert!(room_problem(bad).is_some(), "{bad:?}");
        }
        assert!(room_problem(&"x".repeat(201)).unwrap().contains("201 bytes"));
    }

    #[tokio::test]
    async fn each_token_has_its_own_bucket() {
        let rates = PublishRates::default();
        assert!(rates.admit("a", 2) && rates.admit("a", 2));
        assert!(!rates.admit("a", 2), "the third within a second");
        assert!(rates.admit("b", 2), "another token is not held back");
    }
}
