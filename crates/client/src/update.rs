//! What a subscription yields: [`Update`]s of one room, in commit order, and
//! the [`Position`]s that order them.

use std::fmt;
use std::str::FromStr;
use std::time::SystemTime;

use serde_json::Value;

/// A place in the gateway's commit-ordered stream. Opaque on the wire (a
/// decimal string); ordered here, so repeats across a reconnect seam can be
/// dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position(pub i64);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Not a position as the gateway hands them out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a position (a decimal string as received in a change)")]
pub struct BadPosition(pub String);

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(s: &str) -> Result<Position, BadPosition> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(BadPosition(s.to_owned()));
        }
        s.parse().map(Position).map_err(|_| BadPosition(s.to_owned()))
    }
}

impl Position {
    /// The `position` field of a message, when it holds one.
    pub(crate) fn of(message: &Value) -> Option<Position> {
        message.get("position")?.as_str()?.parse().ok()
    }
}

/// One item of a room's stream.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Update {
    /// The room is live on a connection: everything committed after
    /// `position` follows. Yielded on every (re)connect; `resumed` when the
    /// subscription continued from an earlier position (what it missed
    /// comes first).
    Subscribed { position: Position, resumed: bool },
    /// A row change (a `change` message, or one out of a `batch`), after
    /// every earlier one of the room, once.
    Change(Change),
    /// An application event (`realtime.publish`), in the same order and
    /// with the same guarantee as changes.
    Event(Change),
    /// History the room needed is gone (`history_expired`, `truncated`):
    /// refetch the room's state. The stream goes on after `position` (the
    /// gateway's, from protocol 2; else where the subscription went live),
    /// and a later resume does not ask for the lost part again.
    Reset { reason: String, position: Position },
    /// The gateway refused the room (`forbidden`, `invalid_room`,
    /// `invalid_position`, `too_many_subscriptions`), or a refreshed token
    /// no longer grants it. The last item: the stream ends after it.
    Refused { code: String, message: String },
}

/// A change (or event) of a room: the gateway's whole message, with its
/// room and position parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub room: String,
    pub position: Position,
    /// The message as sent: `type`, `schema`, `table`, `op`, `key`, `row`,
    /// `committed_at` for a change (SPEC 4); an event's own fields.
    pub message: Value,
    /// When the frame that carried it was read off the socket.
    pub received_at: SystemTime,
}

impl Change {
    fn text(&self, field: &str) -> Option<&str> {
        self.message.get(field)?.as_str()
    }

    /// `INSERT`, `UPDATE` or `DELETE`.
    pub fn op(&self) -> Option<&str> {
        self.text("op")
    }

    pub fn schema(&self) -> Option<&str> {
        self.text("schema")
    }

    pub fn table(&self) -> Option<&str> {
        self.text("table")
    }

    /// The primary-key columns, with the same JSON values as in the row.
    pub fn key(&self) -> &Value {
        self.message.get("key").unwrap_or(&Value::Null)
    }

    /// The row after the change (for a DELETE, as it was before).
    pub fn row(&self) -> &Value {
        self.message.get("row").unwrap_or(&Value::Null)
    }

    /// The commit time, RFC 3339 with microseconds.
    pub fn committed_at(&self) -> Option<&str> {
        self.text("committed_at")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_parse_only_as_the_gateway_writes_them() {
        assert_eq!("42".parse(), Ok(Position(42)));
        for bad in ["", "-1", "+1", "1.5", " 1", "99999999999999999999999"] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
        assert!(Position(9) < Position(10), "ordered as numbers, not as text");
    }
}
