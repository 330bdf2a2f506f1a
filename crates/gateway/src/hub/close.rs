//! Why the gateway closes a connection (SPEC section 4 close codes).

/// Why the gateway closes a connection (SPEC section 4 close codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: String,
}

impl CloseReason {
    pub const GOING_AWAY: u16 = 1001;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TOKEN_EXPIRED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4008;

    /// Shutdown: 1001 with what the client should do.
    pub fn going_away() -> CloseReason {
        CloseReason::new(
            CloseReason::GOING_AWAY,
            "gateway shutting down; reconnect and resume from your last position",
        )
    }

    pub fn new(code: u16, reason: impl Into<String>) -> CloseReason {
        CloseReason {
            code,
            reason: reason.into(),
        }
    }
}
