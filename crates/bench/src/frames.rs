//! Reading the gateway's frames at the bench's clients: just the row id and
//! the position of each change, found by a scan rather than a parse. The
//! clients share two cores with the gateway and PostgreSQL, so what they do
//! per message is kept to a few substring searches.
//!
//! The scan relies only on each change carrying one `"position":"N"` and one
//! `"key":{"id": N}` (SPEC section 4); a frame where it finds anything else
//! is parsed properly instead, and counted, so a slow client shows.

use serde_json::Value;

use super::plan::Encoding;

const POSITION: &str = "\"position\":\"";
const KEY: &str = "\"key\":";

/// What a text frame held.
#[derive(Debug, PartialEq)]
pub enum Scan {
    /// Changes, found by the scan; `(id, position)` pairs are in `out`.
    Fast,
    /// Changes, found by a full JSON parse (the scan did not add up).
    Slow,
    /// A protocol message other than a change (welcome, subscribed, error, ...).
    Control(Value),
    /// Not JSON, or a change without an id or position.
    Invalid(String),
}

/// Finds the `(id, position)` of every change in `text` (a `change` or a
/// `batch` message), appending them to `out` (cleared first).
pub fn scan(text: &str, out: &mut Vec<(u64, i64)>) -> Scan {
    out.clear();
    let is_change = text.starts_with("{\"type\":\"change\"") || text.starts_with("{\"type\":\"batch\"");
    if is_change && scan_fast(text, out) {
        return Scan::Fast;
    }
    out.clear();
    let value: Value = match serde_json::from_str(text) {
        Ok(value) => value,
        Err(e) => return Scan::Invalid(format!("not JSON ({e}): {}", clip(text))),
    };
    let changes: Vec<&Value> = match value["type"].as_str() {
        Some("change") => vec![&value],
        Some("batch") => match value["changes"].as_array() {
            Some(changes) => changes.iter().collect(),
            None => return Scan::Invalid(format!("batch without changes: {}", clip(text))),
        },
        _ => return Scan::Control(value),
    };
    for change in changes {
        let position = change["position"].as_str().and_then(|p| p.parse().ok());
        let id = change["key"]["id"].as_u64().or_else(|| change["row"]["id"].as_u64());
        match (id, position) {
            (Some(id), Some(position)) => out.push((id, position)),
            _ => return Scan::Invalid(format!("change without id or position: {}", clip(text))),
        }
    }
    Scan::Slow
}

/// The scan proper: every position, then every key's id, paired in order.
fn scan_fast(text: &str, out: &mut Vec<(u64, i64)>) -> bool {
    let mut at = 0;
    while let Some(found) = text[at..].find(POSITION) {
        let start = at + found + POSITION.len();
        let Some((position, len)) = leading_digits(&text[start..]) else {
            return false;
        };
        if !text[start + len..].starts_with('"') {
            return false;
        }
        out.push((0, position as i64));
        at = start + len;
    }
    let mut paired = 0;
    at = 0;
    while let Some(found) = text[at..].find(KEY) {
        let start = at + found + KEY.len();
        let Some((id, end)) = key_id(&text[start..]) else {
            return false;
        };
        let Some(slot) = out.get_mut(paired) else {
            return false;
        };
        slot.0 = id;
        paired += 1;
        at = start + end;
    }
    paired > 0 && paired == out.len()
}

/// `{"id": 42` (any spacing) at the start of `text`: the id and the bytes read.
fn key_id(text: &str) -> Option<(u64, usize)> {
    let bytes = text.as_bytes();
    let mut i = skip_spaces(bytes, 0);
    if bytes.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_spaces(bytes, i + 1);
    if !text[i..].starts_with("\"id\"") {
        return None;
    }
    i = skip_spaces(bytes, i + 4);
    if bytes.get(i) != Some(&b':') {
        return None;
    }
    i = skip_spaces(bytes, i + 1);
    let (id, len) = leading_digits(&text[i..])?;
    Some((id, i + len))
}

fn skip_spaces(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(|b| b.is_ascii_whitespace()) {
        i += 1;
    }
    i
}

/// The decimal number at the start of `text` and its length.
fn leading_digits(text: &str) -> Option<(u64, usize)> {
    let mut value: u64 = 0;
    let mut len = 0;
    for b in text.bytes() {
        if !b.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        len += 1;
    }
    (len > 0 && len <= 19).then_some((value, len))
}

/// Decodes a binary frame: the compressed JSON of one message, when the
/// client asked for an encoding (SPEC section 4).
pub fn decode_binary(encoding: Encoding, bytes: &[u8]) -> Result<String, String> {
    use std::io::Read;
    let mut text = String::with_capacity(bytes.len() * 4);
    let read = match encoding {
        Encoding::None => {
            return Err(format!(
                "a binary frame ({} bytes) on a connection that asked for no encoding",
                bytes.len()
            ));
        }
        Encoding::Br => brotli::Decompressor::new(bytes, 4096).read_to_string(&mut text),
        Encoding::Gzip => flate2::read::GzDecoder::new(bytes).read_to_string(&mut text),
    };
    read.map(|_| text).map_err(|e| {
        format!(
            "a binary frame ({} bytes) is not {} compressed UTF-8: {e}",
            bytes.len(),
            encoding.as_str()
        )
    })
}

fn clip(text: &str) -> &str {
    match text.char_indices().nth(160) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the gateway sends today (src/change.rs): the key and row are
    /// PostgreSQL's jsonb text, with its spacing.
    const CHANGE: &str = r#"{"type":"change","room":"bench:3","position":"1234","schema":"public","table":"bench_events","op":"INSERT","key":{"id": 42},"row":{"id": 42, "room": 3, "nonce": 77, "payload": "xxxx", "sent_at_us": 5},"committed_at":"2026-11-26T10:30:00.123456Z"}"#;

    #[test]
    fn scans_a_change() {
        let mut out = Vec::new();
        assert_eq!(scan(CHANGE, &mut out), Scan::Fast);
        assert_eq!(out, [(42, 1234)]);
    }

    #[test]
    fn scans_a_batch_in_either_field_order() {
        let batch = format!(
            r#"{{"type":"batch","changes":[{},{}]}}"#,
            CHANGE.replace("1234", "7").replace("42", "9"),
            r#"{"type":"change","key":{"id":10},"room":"bench:3","position":"8","row":{"id":10}}"#
        );
        let mut out = vec![(1, 1)];
        assert_eq!(scan(&batch, &mut out), Scan::Fast);
        assert_eq!(out, [(9, 7), (10, 8)]);
    }

    #[test]
    fn falls_back_to_a_parse_when_the_scan_does_not_add_up() {
        // No key: the id comes from the row, through serde_json.
        let change = r#"{"type":"change","room":"r","position":"5","row":{"id":3}}"#;
        let mut out = Vec::new();
        assert_eq!(scan(change, &mut out), Scan::Slow);
        assert_eq!(out, [(3, 5)]);
        // Spaced out JSON is parsed too.
        let spaced = r#"{ "type": "change", "position": "6", "key": {"id": 4} }"#;
        assert_eq!(scan(spaced, &mut out), Scan::Slow);
        assert_eq!(out, [(4, 6)]);
    }

    #[test]
    fn hands_back_control_messages_and_refuses_garbage() {
        let mut out = Vec::new();
        let Scan::Control(value) = scan(r#"{"type":"subscribed","room":"bench:0","position":"12"}"#, &mut out) else {
            panic!("expected a control message")
        };
        assert_eq!(value["position"], "12");
        assert!(matches!(scan("nope", &mut out), Scan::Invalid(_)));
        assert!(matches!(
            scan(r#"{"type":"change","position":"x"}"#, &mut out),
            Scan::Invalid(_)
        ));
    }

    #[test]
    fn decodes_compressed_frames() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(CHANGE.as_bytes()).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(decode_binary(Encoding::Gzip, &gz).unwrap(), CHANGE);

        let mut br = Vec::new();
        brotli::BrotliCompress(
            &mut CHANGE.as_bytes(),
            &mut br,
            &brotli::enc::BrotliEncoderParams::default(),
        )
        .unwrap();
        assert_eq!(decode_binary(Encoding::Br, &br).unwrap(), CHANGE);

        assert!(decode_binary(Encoding::Gzip, b"not gzip").is_err());
        assert!(decode_binary(Encoding::None, &gz).is_err());
    }
}
