//! Why the gateway closes a connection (SPEC section 4 close codes): a
//! [`CloseKind`] the metrics count by, and the text the client reads.

use std::borrow::Cow;

/// What ended a connection. Each kind has its close code and its label in
/// `ws_gateway_closes_total{reason}`; the metrics read the kind, never the
/// text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// The client closed (1000).
    Client,
    /// No subscription and no message for `GATEWAY_MAX_IDLE_MS` (1000).
    Idle,
    /// The gateway is shutting down: reconnect elsewhere and resume (1001).
    Shutdown,
    /// A frame RFC 6455 forbids: unmasked, reserved bits or opcodes, a
    /// fragmented or oversized control frame (1002).
    ProtocolError,
    /// A text frame that is not UTF-8 (1007).
    InvalidUtf8,
    /// Nothing heard for `GATEWAY_CONNECTION_TIMEOUT_MS` (1008).
    HeartbeatTimeout,
    /// Far over `GATEWAY_RATE_LIMIT` (1008).
    RateLimited,
    /// Too many refused messages in a short window (1008).
    Misbehaving,
    /// An inbound frame past the hard size limit (1009).
    MessageTooBig,
    /// Writing to the socket failed (1011).
    WriteFailed,
    /// A replay could not read the outbox: come back and resume (1013).
    HistoryUnavailable,
    /// The token expired and no fresh one came in band (4001).
    TokenExpired,
    /// The send queue overflowed: resume from your last position (4008).
    SlowConsumer,
}

impl CloseKind {
    /// The WebSocket close code.
    pub fn code(self) -> u16 {
        match self {
            CloseKind::Client | CloseKind::Idle => 1000,
            CloseKind::Shutdown => 1001,
            CloseKind::ProtocolError => 1002,
            CloseKind::InvalidUtf8 => 1007,
            CloseKind::HeartbeatTimeout | CloseKind::RateLimited | CloseKind::Misbehaving => 1008,
            CloseKind::MessageTooBig => 1009,
            CloseKind::WriteFailed => 1011,
            CloseKind::HistoryUnavailable => 1013,
            CloseKind::TokenExpired => 4001,
            CloseKind::SlowConsumer => 4008,
        }
    }

    /// Whether this close counts against the connection failure rate: the
    /// gateway gave up on the connection (timeouts, write errors, slow
    /// readers) or the client broke the rules; a client's own close, an
    /// idle close, shutdown and token expiry are a connection's normal ends.
    pub fn is_failure(self) -> bool {
        !matches!(
            self,
            CloseKind::Client | CloseKind::Idle | CloseKind::Shutdown | CloseKind::TokenExpired
        )
    }

    /// The `reason` label of `ws_gateway_closes_total`.
    pub fn label(self) -> &'static str {
        match self {
            CloseKind::Client => "client",
            CloseKind::Idle => "idle",
            CloseKind::Shutdown => "shutdown",
            CloseKind::ProtocolError => "protocol_error",
            CloseKind::InvalidUtf8 => "invalid_utf8",
            CloseKind::HeartbeatTimeout => "heartbeat_timeout",
            CloseKind::RateLimited => "rate_limited",
            CloseKind::Misbehaving => "misbehaving",
            CloseKind::MessageTooBig => "message_too_big",
            CloseKind::WriteFailed | CloseKind::HistoryUnavailable => "error",
            CloseKind::TokenExpired => "token_expired",
            CloseKind::SlowConsumer => "slow_consumer",
        }
    }
}

/// A close the gateway asked for: its kind, and the text sent with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub kind: CloseKind,
    pub reason: Cow<'static, str>,
}

impl CloseReason {
    pub fn new(kind: CloseKind, reason: impl Into<Cow<'static, str>>) -> CloseReason {
        CloseReason {
            kind,
            reason: reason.into(),
        }
    }

    /// Shutdown: 1001 with what the client should do.
    pub fn going_away() -> CloseReason {
        CloseReason::new(
            CloseKind::Shutdown,
            "gateway shutting down; reconnect and resume from your last position",
        )
    }

    /// The WebSocket close code.
    pub fn code(&self) -> u16 {
        self.kind.code()
    }
}

/// The `reason` label of a connection that ended without a close the
/// gateway asked for or answered (the socket just went away).
pub const DROPPED: &str = "dropped";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_keep_their_codes_and_labels() {
        let all = [
            (CloseKind::Client, 1000, "client"),
            (CloseKind::Idle, 1000, "idle"),
            (CloseKind::Shutdown, 1001, "shutdown"),
            (CloseKind::ProtocolError, 1002, "protocol_error"),
            (CloseKind::InvalidUtf8, 1007, "invalid_utf8"),
            (CloseKind::HeartbeatTimeout, 1008, "heartbeat_timeout"),
            (CloseKind::RateLimited, 1008, "rate_limited"),
            (CloseKind::Misbehaving, 1008, "misbehaving"),
            (CloseKind::MessageTooBig, 1009, "message_too_big"),
            (CloseKind::WriteFailed, 1011, "error"),
            (CloseKind::HistoryUnavailable, 1013, "error"),
            (CloseKind::TokenExpired, 4001, "token_expired"),
            (CloseKind::SlowConsumer, 4008, "slow_consumer"),
        ];
        for (kind, code, label) in all {
            assert_eq!((kind.code(), kind.label()), (code, label), "{kind:?}");
        }
        assert_eq!(CloseReason::going_away().code(), 1001);
    }
}
