//! A captured change as it leaves the database (the capture trigger's JSON
//! document) and as a client sees it (the `change` message of SPEC section 4).
//!
//! The row and key stay raw JSON from PostgreSQL: they are copied into the
//! client message, never parsed into values and serialized again.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde_json::value::RawValue;

/// A change's place in commit order. Allocated at COMMIT under one lock, so a
/// reader that has seen position P has seen every change committed before P.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position(pub i64);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why a client's position string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("position {0:?} is not a position this gateway handed out (expected a decimal number)")]
pub struct BadPosition(pub String);

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // Positions are opaque to clients, but they are our decimal numbers:
        // refuse signs, spaces and leading zeros so one change has one name.
        let well_formed = !s.is_empty()
            && s.len() <= 19
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        match s.parse::<i64>() {
            Ok(n) if well_formed => Ok(Position(n)),
            _ => Err(BadPosition(s.to_owned())),
        }
    }
}

/// What an outbox entry is: a row change, an application event
/// (`realtime.publish`), a table's TRUNCATE, or a reset of every room (the
/// wal source lost its slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Op {
    Insert,
    Update,
    Delete,
    /// `realtime.publish(room, event, payload)`: sent as an `event` message.
    Event,
    /// Its `rooms` are patterns (`project:*`): every matching room gets a
    /// `reset` (reason `truncated`).
    Truncate,
    /// Its `rooms` are patterns too (`*`: every room), its reason says why
    /// (`history_lost`): every matching room gets a `reset`.
    Reset,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "INSERT",
            Op::Update => "UPDATE",
            Op::Delete => "DELETE",
            Op::Event => "EVENT",
            Op::Truncate => "TRUNCATE",
            Op::Reset => "RESET",
        }
    }

    /// A change of one row (dedup and priorities apply to these only).
    pub fn is_row(self) -> bool {
        matches!(self, Op::Insert | Op::Update | Op::Delete)
    }

    /// A `reset` of the rooms its patterns reach: what was in them is gone.
    pub fn resets(self) -> bool {
        matches!(self, Op::Truncate | Op::Reset)
    }
}

/// One committed outbox entry (a row change, an event or a truncation),
/// ready to be fanned out to its rooms.
#[derive(Debug, Clone)]
pub struct Change {
    pub position: Position,
    /// Commit time in microseconds since the Unix epoch, on the database's clock.
    pub committed_at_us: i64,
    /// Empty for an event.
    pub schema: String,
    pub table: String,
    pub op: Op,
    /// The rooms it goes to; for a truncation or a reset, room patterns
    /// (see [`Change::reaches`]).
    pub rooms: Vec<String>,
    /// Everything of the client's message after its `room` field: built
    /// once, shared by every room the change goes to.
    message_tail: String,
    /// Where the key and the row sit in `message_tail`.
    key_at: std::ops::Range<usize>,
    row_at: std::ops::Range<usize>,
}

/// What arrives on the gateway's channel: a whole change, or, for a change too
/// large for a NOTIFY payload, the position to read it back from the outbox.
#[derive(Debug)]
pub enum Notification {
    Change(Change),
    Reference(Position),
}

/// The capture trigger's document (migrations/0001_realtime.sql,
/// `realtime.payload`): short keys, because it travels in every NOTIFY.
#[derive(Deserialize)]
struct Document<'a> {
    p: i64,
    #[serde(default, rename = "ref")]
    reference: bool,
    t: Option<i64>,
    s: Option<String>,
    tb: Option<String>,
    op: Option<Op>,
    #[serde(borrow)]
    k: Option<&'a RawValue>,
    #[serde(borrow)]
    r: Option<&'a RawValue>,
    rooms: Option<Vec<String>>,
    /// An event's name.
    ev: Option<String>,
    /// A reset's reason.
    reason: Option<String>,
}

/// A payload on our channel that is not a capture document.
#[derive(Debug, thiserror::Error)]
#[error("not a change document: {0}")]
pub struct BadDocument(String);

impl Notification {
    /// A NOTIFY payload: one document, or several (`{"docs":[...]}`, as
    /// the wal leader sends them), in position order.
    pub fn parse_payload(payload: &str) -> Result<Vec<Notification>, BadDocument> {
        if !payload.starts_with("{\"docs\":") {
            return Notification::parse(payload).map(|one| vec![one]);
        }
        #[derive(Deserialize)]
        struct Docs<'a> {
            #[serde(borrow)]
            docs: Vec<&'a RawValue>,
        }
        let docs: Docs = serde_json::from_str(payload).map_err(|e| BadDocument(e.to_string()))?;
        docs.docs.iter().map(|doc| Notification::parse(doc.get())).collect()
    }

    /// One document (`realtime.payload`).
    pub fn parse(payload: &str) -> Result<Notification, BadDocument> {
        let doc: Document = serde_json::from_str(payload).map_err(|e| BadDocument(e.to_string()))?;
        if doc.reference {
            return Ok(Notification::Reference(Position(doc.p)));
        }
        let missing = |field: &str| BadDocument(format!("field {field:?} missing"));
        let op = doc.op.ok_or_else(|| missing("op"))?;
        let at = doc.t.ok_or_else(|| missing("t"))?;
        let rooms = doc.rooms.ok_or_else(|| missing("rooms"))?;
        match op {
            Op::Event => {
                let null = RawValue::NULL;
                let change = Change::event(
                    Position(doc.p),
                    at,
                    doc.ev.ok_or_else(|| missing("ev"))?,
                    doc.r.unwrap_or(null),
                    rooms,
                );
                return Ok(Notification::Change(change));
            }
            Op::Truncate => {
                let change = Change::truncate(
                    Position(doc.p),
                    at,
                    doc.s.ok_or_else(|| missing("s"))?,
                    doc.tb.ok_or_else(|| missing("tb"))?,
                    rooms,
                );
                return Ok(Notification::Change(change));
            }
            Op::Reset => {
                let change = Change::reset(
                    Position(doc.p),
                    at,
                    &doc.reason.ok_or_else(|| missing("reason"))?,
                    rooms,
                );
                return Ok(Notification::Change(change));
            }
            Op::Insert | Op::Update | Op::Delete => {}
        }
        let change = Change::new(
            Position(doc.p),
            at,
            doc.s.ok_or_else(|| missing("s"))?,
            doc.tb.ok_or_else(|| missing("tb"))?,
            op,
            doc.k.ok_or_else(|| missing("k"))?,
            doc.r.ok_or_else(|| missing("r"))?,
            rooms,
        );
        Ok(Notification::Change(change))
    }
}

impl Change {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        position: Position,
        committed_at_us: i64,
        schema: String,
        table: String,
        op: Op,
        key: &RawValue,
        row: &RawValue,
        rooms: Vec<String>,
    ) -> Change {
        let mut tail = Tail::new(position, row.get().len() + key.get().len() + 160);
        tail.string("schema", &schema);
        tail.string("table", &table);
        tail.string("op", op.as_str());
        let key_at = tail.raw("key", key.get());
        let row_at = tail.raw("row", row.get());
        let tail = tail.end(committed_at_us);
        Change {
            position,
            committed_at_us,
            schema,
            table,
            op,
            rooms,
            message_tail: tail,
            key_at,
            row_at,
        }
    }

    /// An application event (`realtime.publish`): the client's `event`
    /// message, `{"type":"event","room":..,"position":..,"event":..,"payload":..,"committed_at":..}`.
    pub fn event(
        position: Position,
        committed_at_us: i64,
        event: String,
        payload: &RawValue,
        rooms: Vec<String>,
    ) -> Change {
        let mut tail = Tail::new(position, payload.get().len() + event.len() + 96);
        tail.string("event", &event);
        let row_at = tail.raw("payload", payload.get());
        let tail = tail.end(committed_at_us);
        Change {
            position,
            committed_at_us,
            schema: String::new(),
            table: String::new(),
            op: Op::Event,
            rooms,
            message_tail: tail,
            key_at: 0..0,
            row_at,
        }
    }

    /// A TRUNCATE of `schema.table`, for every room one of `patterns` can
    /// produce: each gets `{"type":"reset","room":..,"reason":"truncated","position":..,"schema":..,"table":..,"committed_at":..}`.
    pub fn truncate(
        position: Position,
        committed_at_us: i64,
        schema: String,
        table: String,
        patterns: Vec<String>,
    ) -> Change {
        let mut tail = Tail::with_reason("truncated", position, 128);
        tail.string("schema", &schema);
        tail.string("table", &table);
        let tail = tail.end(committed_at_us);
        Change {
            position,
            committed_at_us,
            schema,
            table,
            op: Op::Truncate,
            rooms: patterns,
            message_tail: tail,
            key_at: 0..0,
            row_at: 0..0,
        }
    }

    /// A reset of every room one of `patterns` can produce (`*`: all), for
    /// `reason`: each gets `{"type":"reset","room":..,"reason":..,"position":..,"committed_at":..}`.
    pub fn reset(position: Position, committed_at_us: i64, reason: &str, patterns: Vec<String>) -> Change {
        let tail = Tail::with_reason(reason, position, 96).end(committed_at_us);
        Change {
            position,
            committed_at_us,
            schema: String::new(),
            table: String::new(),
            op: Op::Reset,
            rooms: patterns,
            message_tail: tail,
            key_at: 0..0,
            row_at: 0..0,
        }
    }

    /// Whether the change goes to `room`: one of its rooms, or for a
    /// truncation or a reset, a room one of its patterns can produce.
    pub fn reaches(&self, room: &str) -> bool {
        match self.op {
            Op::Truncate | Op::Reset => self.rooms.iter().any(|pattern| room_matches(pattern, room)),
            _ => self.rooms.iter().any(|r| r == room),
        }
    }

    /// The primary key, as JSON (empty for events and truncations).
    pub fn key_json(&self) -> &str {
        &self.message_tail[self.key_at.clone()]
    }

    /// The row (an event's payload), as JSON.
    pub fn row_json(&self) -> &str {
        &self.message_tail[self.row_at.clone()]
    }

    /// Roughly the memory the change holds.
    pub fn size(&self) -> usize {
        self.message_tail.len()
            + self.schema.len()
            + self.table.len()
            + self.rooms.iter().map(|r| r.len() + 24).sum::<usize>()
            + 96
    }

    /// The client's message for one of the change's rooms: `change`,
    /// `event`, or for a truncation `reset`.
    pub fn message_for(&self, room: &str) -> String {
        let kind = match self.op {
            Op::Event => "{\"type\":\"event\",\"room\":",
            Op::Truncate | Op::Reset => "{\"type\":\"reset\",\"room\":",
            Op::Insert | Op::Update | Op::Delete => "{\"type\":\"change\",\"room\":",
        };
        let mut msg = String::with_capacity(self.message_tail.len() + room.len() + 32);
        msg.push_str(kind);
        push_json_str(&mut msg, room);
        msg.push_str(&self.message_tail);
        msg
    }
}

/// The part of a client's message after its `room` field, built once per
/// change: `,"position":"..."`, the kind's own fields, then
/// `,"committed_at":"..."}`. Every kind of change (row, event, truncation,
/// reset) builds its tail here, so they agree on the shared fields.
struct Tail(String);

impl Tail {
    fn new(position: Position, capacity: usize) -> Tail {
        let mut text = String::with_capacity(capacity);
        text.push_str(",\"position\":\"");
        text.push_str(&position.0.to_string());
        text.push('"');
        Tail(text)
    }

    /// A `reset`'s tail: its reason first, then as [`Tail::new`].
    fn with_reason(reason: &str, position: Position, capacity: usize) -> Tail {
        let mut tail = Tail(String::with_capacity(capacity));
        tail.string("reason", reason);
        tail.0.push_str(&Tail::new(position, 32).0);
        tail
    }

    /// `,"name":"value"`, the value JSON-escaped.
    fn string(&mut self, name: &str, value: &str) {
        self.name(name);
        push_json_str(&mut self.0, value);
    }

    /// `,"name":json`, the value as it is; returns where it sits.
    fn raw(&mut self, name: &str, json: &str) -> std::ops::Range<usize> {
        self.name(name);
        let at = self.0.len()..self.0.len() + json.len();
        self.0.push_str(json);
        at
    }

    fn name(&mut self, name: &str) {
        self.0.push_str(",\"");
        self.0.push_str(name);
        self.0.push_str("\":");
    }

    fn end(mut self, committed_at_us: i64) -> String {
        self.0.push_str(",\"committed_at\":\"");
        self.0.push_str(&format_rfc3339_micros(committed_at_us));
        self.0.push_str("\"}");
        self.0
    }
}

/// Whether `room` is a room `pattern` can produce: `*` stands for any text
/// (possibly empty), the rest must match exactly. `project:*` is what the
/// template `project:{project_id}` can produce. Same as the SQL
/// `realtime.room_matches` (migrations/0004).
pub fn room_matches(pattern: &str, room: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = room.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Appends `s` as a JSON string literal.
pub fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping, without an intermediate allocation per call site.
    let quoted = serde_json::to_string(s).expect("a str always serializes");
    out.push_str(&quoted);
}

/// Formats microseconds since the Unix epoch as `2026-11-26T10:30:00.123456Z`.
pub fn format_rfc3339_micros(us: i64) -> String {
    let secs = us.div_euclid(1_000_000);
    let micros = us.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod / 60 % 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Microseconds since the Unix epoch on this host's clock.
pub fn now_us() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    now.as_micros() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_timestamps() {
        assert_eq!(format_rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        // 2026-11-26T10:30:00.123456Z
        assert_eq!(
            format_rfc3339_micros(1_795_689_000_123_456),
            "2026-11-26T10:30:00.123456Z"
        );
        assert_eq!(
            format_rfc3339_micros(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(format_rfc3339_micros(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn positions_are_strict_decimals() {
        assert_eq!("42".parse::<Position>(), Ok(Position(42)));
        assert_eq!("0".parse::<Position>(), Ok(Position(0)));
        for bad in ["", "-1", "+1", "042", " 1", "1.0", "abc", "99999999999999999999"] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn parses_documents_and_renders_messages() {
        let doc = r#"{"p":7,"t":1795689000123456,"s":"public","tb":"tasks","op":"UPDATE","k":{"id":3},"r":{"id":3,"title":"Pour \"slab\""},"rooms":["project:1","task:3"]}"#;
        let Notification::Change(change) = Notification::parse(doc).unwrap() else {
            panic!("expected a change")
        };
        assert_eq!(change.position, Position(7));
        assert_eq!(change.rooms, ["project:1", "task:3"]);
        let msg: serde_json::Value = serde_json::from_str(&change.message_for("task:3")).unwrap();
        assert_eq!(
            msg,
            serde_json::json!({
                "type": "change", "room": "task:3", "position": "7", "schema": "public",
                "table": "tasks", "op": "UPDATE", "key": {"id": 3},
                "row": {"id": 3, "title": "Pour \"slab\""},
                "committed_at": "2026-11-26T10:30:00.123456Z"
            })
        );
        assert!(matches!(
            Notification::parse(r#"{"p":9,"ref":true}"#).unwrap(),
            Notification::Reference(Position(9))
        ));
        assert!(Notification::parse(r#"{"p":9}"#).is_err());

        let event =
            r#"{"p":8,"t":1795689000123456,"op":"EVENT","ev":"inspection_passed","r":{"id":7},"rooms":["project:1"]}"#;
        let Notification::Change(event) = Notification::parse(event).unwrap() else {
            panic!("expected an event")
        };
        let msg: serde_json::Value = serde_json::from_str(&event.message_for("project:1")).unwrap();
        assert_eq!(
            msg,
            serde_json::json!({
                "type": "event", "room": "project:1", "position": "8", "event": "inspection_passed",
                "payload": {"id": 7}, "committed_at": "2026-11-26T10:30:00.123456Z"
            })
        );
        assert!(event.reaches("project:1") && !event.reaches("project:2"));

        let truncate =
            r#"{"p":9,"t":1795689000123456,"s":"public","tb":"tasks","op":"TRUNCATE","rooms":["project:*","tasks"]}"#;
        let Notification::Change(truncate) = Notification::parse(truncate).unwrap() else {
            panic!("expected a truncation")
        };
        assert!(truncate.reaches("project:42") && truncate.reaches("tasks") && !truncate.reaches("task:1"));
        let msg: serde_json::Value = serde_json::from_str(&truncate.message_for("project:42")).unwrap();
        assert_eq!(
            msg,
            serde_json::json!({
                "type": "reset", "room": "project:42", "reason": "truncated", "position": "9",
                "schema": "public", "table": "tasks", "committed_at": "2026-11-26T10:30:00.123456Z"
            })
        );
        assert!(Notification::parse("hello").is_err());
    }

    #[test]
    fn a_reset_of_every_room_and_payloads_of_several_documents() {
        let payload = r#"{"docs":[{"p":10,"t":1795689000123456,"op":"RESET","reason":"history_lost","rooms":["*"]},{"p":11,"ref":true}]}"#;
        let parsed = Notification::parse_payload(payload).unwrap();
        assert_eq!(parsed.len(), 2);
        let Notification::Change(reset) = &parsed[0] else {
            panic!("expected a reset")
        };
        assert!(reset.op.resets() && reset.reaches("project:1") && reset.reaches("markers"));
        let msg: serde_json::Value = serde_json::from_str(&reset.message_for("markers")).unwrap();
        assert_eq!(
            msg,
            serde_json::json!({
                "type": "reset", "room": "markers", "reason": "history_lost", "position": "10",
                "committed_at": "2026-11-26T10:30:00.123456Z"
            })
        );
        assert!(matches!(parsed[1], Notification::Reference(Position(11))));
        assert_eq!(Notification::parse_payload(r#"{"p":9,"ref":true}"#).unwrap().len(), 1);
        assert!(Notification::parse_payload(r#"{"docs":[{"p":1}]}"#).is_err());
        assert!(
            Notification::parse(r#"{"p":1,"t":1,"op":"RESET","rooms":["*"]}"#).is_err(),
            "no reason"
        );
    }

    #[test]
    fn room_patterns_match_what_templates_produce() {
        assert!(room_matches("project:*", "project:42"));
        assert!(room_matches("project:*", "project:"));
        assert!(!room_matches("project:*", "task:42"));
        assert!(room_matches("org:*:project:*", "org:1:project:2"));
        assert!(!room_matches("org:*:project:*", "org:1:task:2"));
        assert!(room_matches("*:log", "site:log"));
        assert!(!room_matches("*:log", "site:logs"));
        assert!(room_matches("markers", "markers"));
        assert!(!room_matches("markers", "markers2"));
        assert!(room_matches("a*a", "aa"));
        assert!(!room_matches("a*a", "a"));
        assert!(!room_matches("ab*ba", "aba"));
    }
}
