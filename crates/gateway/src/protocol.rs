//! The client side of the WebSocket protocol (SPEC section 4): decoding what
//! clients send, and the server's protocol messages other than changes.
//!
//! Decoding never trusts the frame: every refusal names what was wrong, with
//! an error code a client can switch on.

use serde_json::{Map, Value};

use crate::change::{Position, push_json_str};

/// Longest room name accepted.
pub const MAX_ROOM_BYTES: usize = 200;

/// Longest `id` a request may carry (it is echoed back).
pub const MAX_PING_ID_BYTES: usize = 64;

/// The protocol revision `welcome` announces. 2: an `error` that refuses a
/// request echoes its `id` and, when it named one, its `room`;
/// `rate_limited` says which message it `dropped`; `reset` says the
/// `position` the room's stream continues after. Absent (1): none of these.
pub const PROTOCOL_REVISION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMessage {
    Subscribe {
        room: String,
        since: Option<Position>,
    },
    Unsubscribe {
        room: String,
    },
    Ack {
        position: Position,
    },
    Auth {
        token: String,
    },
    /// Answered at once with `pong` (same `id`): how a browser, which cannot
    /// see WebSocket ping frames, finds out that a connection is dead.
    Ping {
        id: Option<String>,
    },
}

/// A refused client message: the `error` frame's code and message, and
/// what it echoes of the request it refuses, so a client can tell which of
/// its requests failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: &'static str,
    pub message: String,
    /// The refused request's `id` and `room`, and (for `rate_limited`) its
    /// `type`.
    pub request: RequestContext,
}

/// What identifies a request, read before anything else about it is
/// checked, so that even a request refused for its own content is named.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestContext {
    /// The client's own `id` for the request (a string of at most
    /// [`MAX_PING_ID_BYTES`]).
    pub id: Option<String>,
    /// The `room` it named (subscribe, unsubscribe), as sent.
    pub room: Option<String>,
    /// Its `type`, when it is one the gateway knows.
    pub kind: Option<&'static str>,
}

impl ProtocolError {
    pub fn new(code: &'static str, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
            request: RequestContext::default(),
        }
    }

    /// The refusal of `request`: its `error` frame names it.
    pub fn refusing(mut self, request: &RequestContext) -> ProtocolError {
        self.request = request.clone();
        self
    }

    /// The `error` frame. `rate_limited` also says what was dropped.
    pub fn to_message(&self) -> String {
        let mut out = String::with_capacity(64 + self.message.len());
        out.push_str("{\"type\":\"error\",\"code\":");
        push_json_str(&mut out, self.code);
        out.push_str(",\"message\":");
        push_json_str(&mut out, &self.message);
        if let Some(room) = &self.request.room {
            out.push_str(",\"room\":");
            push_json_str(&mut out, room);
        }
        if let Some(id) = &self.request.id {
            out.push_str(",\"id\":");
            push_json_str(&mut out, id);
        }
        if self.code == codes::RATE_LIMITED
            && let Some(kind) = self.request.kind
        {
            out.push_str(",\"dropped\":");
            push_json_str(&mut out, kind);
        }
        out.push('}');
        out
    }
}

pub mod codes {
    pub const INVALID_JSON: &str = "invalid_json";
    pub const INVALID_MESSAGE: &str = "invalid_message";
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    pub const INVALID_ROOM: &str = "invalid_room";
    pub const INVALID_POSITION: &str = "invalid_position";
    pub const BINARY_NOT_SUPPORTED: &str = "binary_not_supported";
    pub const MESSAGE_TOO_BIG: &str = "message_too_big";
    pub const FORBIDDEN: &str = "forbidden";
    pub const ALREADY_SUBSCRIBED: &str = "already_subscribed";
    pub const NOT_SUBSCRIBED: &str = "not_subscribed";
    pub const TOO_MANY_SUBSCRIPTIONS: &str = "too_many_subscriptions";
    pub const INVALID_TOKEN: &str = "invalid_token";
    pub const HISTORY_UNAVAILABLE: &str = "history_unavailable";
    pub const RATE_LIMITED: &str = "rate_limited";
    pub const AUTHORIZATION_UNAVAILABLE: &str = "authorization_unavailable";
}

pub fn welcome_message(connection_id: &str, heartbeat_ms: u64, encoding: &str) -> String {
    serde_json::json!({
        "type": "welcome",
        "connection_id": connection_id,
        "heartbeat_ms": heartbeat_ms,
        "encoding": encoding,
        "protocol": PROTOCOL_REVISION,
    })
    .to_string()
}

/// The reply to an accepted in-band `auth`: the connection now lives until
/// the new token's `exp` (seconds since the epoch).
pub fn authenticated_message(expires_at: Option<u64>) -> String {
    serde_json::json!({"type": "authenticated", "expires_at": expires_at}).to_string()
}

pub fn unsubscribed_message(room: &str) -> String {
    serde_json::json!({"type": "unsubscribed", "room": room}).to_string()
}

/// The answer to a client's `ping`, echoing its `id` when it gave one.
pub fn pong_message(id: Option<&str>) -> String {
    let mut out = String::from("{\"type\":\"pong\"");
    if let Some(id) = id {
        out.push_str(",\"id\":");
        push_json_str(&mut out, id);
    }
    out.push('}');
    out
}

/// History the room's stream needed is gone; the stream goes on after
/// `position` (a client resumes from there, not from before the gap).
pub fn reset_message(room: &str, reason: &str, position: Position) -> String {
    serde_json::json!({"type": "reset", "room": room, "reason": reason, "position": position.to_string()}).to_string()
}

/// The message types a client may send.
const KINDS: [&str; 5] = ["subscribe", "unsubscribe", "ack", "auth", "ping"];

/// Decodes one text frame.
pub fn decode(text: &str) -> Result<ClientMessage, ProtocolError> {
    decode_request(text).1
}

/// Decodes one text frame, and says what identifies it (for the reply to
/// name it, even when it is refused).
pub fn decode_request(text: &str) -> (RequestContext, Result<ClientMessage, ProtocolError>) {
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => {
            let error = ProtocolError::new(codes::INVALID_JSON, format!("message is not valid JSON: {e}"));
            return (RequestContext::default(), Err(error));
        }
    };
    let request = context(&value);
    let result = decode_value(value, &request).map_err(|e| e.refusing(&request));
    (request, result)
}

/// The `id`, `room` and known `type` of a request, where they are well formed.
fn context(value: &Value) -> RequestContext {
    RequestContext {
        id: match value.get("id") {
            Some(Value::String(id)) if id.len() <= MAX_PING_ID_BYTES => Some(id.clone()),
            _ => None,
        },
        room: match value.get("room") {
            Some(Value::String(room)) => Some(room.clone()),
            _ => None,
        },
        kind: value
            .get("type")
            .and_then(Value::as_str)
            .and_then(|kind| KINDS.iter().copied().find(|k| *k == kind)),
    }
}

fn decode_value(value: Value, request: &RequestContext) -> Result<ClientMessage, ProtocolError> {
    match value.get("id") {
        None | Some(Value::Null) => {}
        Some(Value::String(id)) if id.len() > MAX_PING_ID_BYTES => {
            return Err(ProtocolError::new(
                codes::INVALID_MESSAGE,
                format!("\"id\" is {} bytes; at most {MAX_PING_ID_BYTES} allowed", id.len()),
            ));
        }
        Some(Value::String(_)) => {}
        Some(_) => return Err(ProtocolError::new(codes::INVALID_MESSAGE, "\"id\" must be a string")),
    }
    let Value::Object(fields) = value else {
        return Err(ProtocolError::new(
            codes::INVALID_MESSAGE,
            "message must be a JSON object with a \"type\"",
        ));
    };
    let kind = match fields.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => {
            return Err(ProtocolError::new(codes::INVALID_MESSAGE, "\"type\" must be a string"));
        }
        None => {
            return Err(ProtocolError::new(codes::INVALID_MESSAGE, "message has no \"type\""));
        }
    };
    match kind {
        "subscribe" => Ok(ClientMessage::Subscribe {
            room: room(&fields, kind)?,
            since: optional_position(&fields, "since")?,
        }),
        "unsubscribe" => Ok(ClientMessage::Unsubscribe {
            room: room(&fields, kind)?,
        }),
        "ack" => match optional_position(&fields, "position")? {
            Some(position) => Ok(ClientMessage::Ack { position }),
            None => Err(ProtocolError::new(
                codes::INVALID_MESSAGE,
                "ack needs a \"position\" string",
            )),
        },
        "auth" => match fields.get("token") {
            Some(Value::String(token)) if !token.is_empty() => Ok(ClientMessage::Auth { token: token.clone() }),
            _ => Err(ProtocolError::new(
                codes::INVALID_MESSAGE,
                "auth needs a \"token\" string",
            )),
        },
        // The id was checked above.
        "ping" => Ok(ClientMessage::Ping { id: request.id.clone() }),
        other => {
            let mut shown: String = other.chars().take(40).collect();
            if shown.len() < other.len() {
                shown.push('…');
            }
            Err(ProtocolError::new(
                codes::UNKNOWN_TYPE,
                format!("unknown message type {shown:?}; expected subscribe, unsubscribe, ack, auth or ping"),
            ))
        }
    }
}

fn room(fields: &Map<String, Value>, kind: &str) -> Result<String, ProtocolError> {
    let Some(room) = fields.get("room") else {
        return Err(ProtocolError::new(
            codes::INVALID_MESSAGE,
            format!("{kind} needs a \"room\" string, e.g. \"project:42\""),
        ));
    };
    let Value::String(room) = room else {
        return Err(ProtocolError::new(codes::INVALID_MESSAGE, "\"room\" must be a string"));
    };
    validate_room(room)?;
    Ok(room.clone())
}

/// Room names are what templates render: printable, no spaces, bounded.
pub fn validate_room(room: &str) -> Result<(), ProtocolError> {
    if room.is_empty() {
        return Err(ProtocolError::new(codes::INVALID_ROOM, "room name is empty"));
    }
    if room.len() > MAX_ROOM_BYTES {
        return Err(ProtocolError::new(
            codes::INVALID_ROOM,
            format!("room name is {} bytes; at most {MAX_ROOM_BYTES} allowed", room.len()),
        ));
    }
    if room.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ProtocolError::new(
            codes::INVALID_ROOM,
            "room name must not contain spaces or control characters",
        ));
    }
    if room.contains('*') {
        return Err(ProtocolError::new(
            codes::INVALID_ROOM,
            "room name must not contain '*': patterns are for token grants; subscribe to each room by name",
        ));
    }
    Ok(())
}

fn optional_position(fields: &Map<String, Value>, name: &str) -> Result<Option<Position>, ProtocolError> {
    match fields.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => s
            .parse()
            .map(Some)
            .map_err(|e: crate::change::BadPosition| ProtocolError::new(codes::INVALID_POSITION, e.to_string())),
        Some(_) => Err(ProtocolError::new(
            codes::INVALID_POSITION,
            format!("\"{name}\" must be a position string as received in a change"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_message() {
        assert_eq!(
            decode(r#"{"type":"subscribe","room":"project:42"}"#),
            Ok(ClientMessage::Subscribe {
                room: "project:42".into(),
                since: None
            })
        );
        assert_eq!(
            decode(r#"{"type":"subscribe","room":"task:7","since":"120"}"#),
            Ok(ClientMessage::Subscribe {
                room: "task:7".into(),
                since: Some(Position(120))
            })
        );
        assert_eq!(
            decode(r#"{"type":"unsubscribe","room":"task:7"}"#),
            Ok(ClientMessage::Unsubscribe { room: "task:7".into() })
        );
        assert_eq!(
            decode(r#"{"type":"ack","position":"5"}"#),
            Ok(ClientMessage::Ack { position: Position(5) })
        );
        assert_eq!(
            decode(r#"{"type":"auth","token":"x.y.z"}"#),
            Ok(ClientMessage::Auth { token: "x.y.z".into() })
        );
        assert_eq!(
            decode(r#"{"type":"ping","id":"7"}"#),
            Ok(ClientMessage::Ping { id: Some("7".into()) })
        );
        assert_eq!(decode(r#"{"type":"ping"}"#), Ok(ClientMessage::Ping { id: None }));
        assert_eq!(pong_message(Some("7")), r#"{"type":"pong","id":"7"}"#);
        assert_eq!(pong_message(None), r#"{"type":"pong"}"#);
    }

    #[test]
    fn refusals_name_the_problem() {
        let code = |text: &str| decode(text).unwrap_err().code;
        assert_eq!(code("not json"), codes::INVALID_JSON);
        assert_eq!(code("[1,2]"), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"room":"a"}"#), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"type":7}"#), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"type":"dance"}"#), codes::UNKNOWN_TYPE);
        assert_eq!(code(r#"{"type":"subscribe"}"#), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"type":"subscribe","room":5}"#), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"type":"subscribe","room":""}"#), codes::INVALID_ROOM);
        assert_eq!(code(r#"{"type":"subscribe","room":"a b"}"#), codes::INVALID_ROOM);
        assert_eq!(code(r#"{"type":"subscribe","room":"task:*"}"#), codes::INVALID_ROOM);
        assert_eq!(code(r#"{"type":"subscribe","room":"*"}"#), codes::INVALID_ROOM);
        let long = format!(r#"{{"type":"subscribe","room":"{}"}}"#, "x".repeat(201));
        assert_eq!(code(&long), codes::INVALID_ROOM);
        assert_eq!(
            code(r#"{"type":"subscribe","room":"a","since":"-4"}"#),
            codes::INVALID_POSITION
        );
        assert_eq!(
            code(r#"{"type":"subscribe","room":"a","since":4}"#),
            codes::INVALID_POSITION
        );
        assert_eq!(code(r#"{"type":"ack"}"#), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"type":"auth","token":""}"#), codes::INVALID_MESSAGE);
        assert_eq!(code(r#"{"type":"ping","id":5}"#), codes::INVALID_MESSAGE);
        let long_id = format!(r#"{{"type":"ping","id":"{}"}}"#, "x".repeat(65));
        assert_eq!(code(&long_id), codes::INVALID_MESSAGE);
        let msg = decode(r#"{"type":"subscribe"}"#).unwrap_err().to_message();
        let v: Value = serde_json::from_str(&msg).unwrap();
        assert_eq!(v["type"], "error");
        assert!(v["message"].as_str().unwrap().contains("room"));
        assert_eq!(
            code(r#"{"type":"subscribe","room":"a","id":5}"#),
            codes::INVALID_MESSAGE
        );
    }

    /// Protocol revision 2: a refusal names the request it refuses.
    #[test]
    fn refusals_echo_the_requests_id_and_room() {
        let frame = |text: &str| -> Value {
            let (_, result) = decode_request(text);
            serde_json::from_str(&result.unwrap_err().to_message()).unwrap()
        };
        let refused = frame(r#"{"type":"subscribe","room":"a b","id":"s1"}"#);
        assert_eq!(refused["code"], codes::INVALID_ROOM);
        assert_eq!(refused["room"], "a b");
        assert_eq!(refused["id"], "s1");
        let refused = frame(r#"{"type":"ack","position":"x","id":"a1"}"#);
        assert_eq!(
            (&refused["code"], &refused["id"]),
            (&Value::from(codes::INVALID_POSITION), &Value::from("a1"))
        );
        assert!(refused.get("room").is_none());
        let no_context = frame("[]");
        assert!(no_context.get("room").is_none() && no_context.get("id").is_none());
        // A valid request's context, for refusals decided later.
        let (request, result) = decode_request(r#"{"type":"subscribe","room":"project:1","id":"7"}"#);
        assert!(result.is_ok());
        let later = ProtocolError::new(codes::FORBIDDEN, "no")
            .refusing(&request)
            .to_message();
        let later: Value = serde_json::from_str(&later).unwrap();
        assert_eq!(
            (&later["room"], &later["id"]),
            (&Value::from("project:1"), &Value::from("7"))
        );
        assert!(later.get("dropped").is_none(), "only rate_limited says what it dropped");
        let dropped = ProtocolError::new(codes::RATE_LIMITED, "slow down")
            .refusing(&request)
            .to_message();
        let dropped: Value = serde_json::from_str(&dropped).unwrap();
        assert_eq!(dropped["dropped"], "subscribe");
        let (unknown, _) = decode_request(r#"{"type":"dance","room":"r"}"#);
        assert_eq!(unknown.kind, None, "only known types are echoed as dropped");
        let reset: Value = serde_json::from_str(&reset_message("r", "history_expired", Position(9))).unwrap();
        assert_eq!(reset["position"], "9");
    }
}
