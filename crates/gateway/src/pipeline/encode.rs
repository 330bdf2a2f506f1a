//! Encoding: a room's group of changes becomes one message (`change`,
//! `event`, or `batch` of several), serialized once; each compressed form is made at most
//! once, by the first socket that needs it, and shared by all the others.

use std::io::Write;
use std::sync::OnceLock;

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;

use crate::change::Change;

/// What a client asked for with `?encoding=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    None = 0,
    Brotli = 1,
    Gzip = 2,
}

/// When and how hard units are compressed for br and gzip clients.
#[derive(Debug, Clone, Copy)]
pub struct Compression {
    /// Units of this many bytes or fewer go as text.
    pub threshold: usize,
    pub level: u32,
}

impl Compression {
    /// `GATEWAY_FEATURES`' compression, with the pipeline's threshold and
    /// level; None when it is off.
    pub fn of(enabled: bool, pipeline: &crate::config::PipelineSettings) -> Option<Compression> {
        enabled.then_some(Compression {
            threshold: pipeline.compression_threshold,
            level: pipeline.compression_level,
        })
    }
}

impl Encoding {
    /// The encoding whose `as u8` is `value` (anything else: `None`).
    pub fn from_u8(value: u8) -> Encoding {
        match value {
            1 => Encoding::Brotli,
            2 => Encoding::Gzip,
            _ => Encoding::None,
        }
    }

    pub fn parse(value: Option<&str>) -> Result<Encoding, String> {
        match value.unwrap_or("") {
            "" | "none" => Ok(Encoding::None),
            "br" => Ok(Encoding::Brotli),
            "gzip" => Ok(Encoding::Gzip),
            other => Err(format!("unknown encoding {other:?}: expected br, gzip or none")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::None => "none",
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// Brotli window: 2^20 bytes. Below 18 bits brotli gets much slower for no
/// gain on our payloads (measured: lgwin 16 costs 10x).
const BROTLI_LGWIN: i32 = 20;

pub fn brotli(input: &[u8], quality: u32) -> Vec<u8> {
    let params = brotli::enc::BrotliEncoderParams {
        quality: quality.min(11) as i32,
        lgwin: BROTLI_LGWIN,
        size_hint: input.len(),
        ..Default::default()
    };
    let mut out = Vec::with_capacity(input.len() / 3 + 64);
    brotli::BrotliCompress(&mut &input[..], &mut out, &params).expect("compressing into memory cannot fail");
    out
}

pub fn gzip(input: &[u8], level: u32) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(input.len() / 3 + 64),
        flate2::Compression::new(level.min(9)),
    );
    encoder.write_all(input).expect("compressing into memory cannot fail");
    encoder.finish().expect("compressing into memory cannot fail")
}

/// One message for one room, ready for every member of the room.
#[derive(Debug)]
pub struct Unit {
    /// The message as JSON text.
    pub text: Utf8Bytes,
    /// Where the change objects sit in `text` (comma-separated), so a busy
    /// socket can merge several units into one `batch` without parsing.
    changes_at: std::ops::Range<usize>,
    /// Commit time of each change, database clock, microseconds.
    pub committed_at_us: Vec<i64>,
    /// Critical or high priority tables' changes go alone, never merged.
    pub priority: bool,
    /// When it was built and queued: the start of its queueing stage.
    pub queued_at: std::time::Instant,
    brotli: OnceLock<Bytes>,
    gzip: OnceLock<Bytes>,
}

impl Unit {
    /// The message for `changes` (one or more, in commit order) in `room`.
    pub fn new(room: &str, changes: &[&Change], priority: bool) -> Unit {
        Unit::build(changes.iter().map(|c| (room, *c)), changes.len(), priority)
    }

    /// The message for changes of several rooms, in commit order: for a
    /// connection that needs one stream in position order across its rooms
    /// (a multi-room `/sse` stream, whose event ids resume all of them).
    pub fn for_rooms(entries: &[(&str, &Change)], priority: bool) -> Unit {
        Unit::build(entries.iter().copied(), entries.len(), priority)
    }

    fn build<'a>(entries: impl Iterator<Item = (&'a str, &'a Change)> + Clone, count: usize, priority: bool) -> Unit {
        let committed_at_us = entries.clone().map(|(_, c)| c.committed_at_us).collect();
        let (text, changes_at) = if count == 1 {
            let (room, only) = entries.clone().next().expect("one entry");
            let text = only.message_for(room);
            let all = 0..text.len();
            (text, all)
        } else {
            let mut text = String::with_capacity(entries.clone().map(|(_, c)| c.size()).sum::<usize>() + 32);
            text.push_str("{\"type\":\"batch\",\"changes\":[");
            let start = text.len();
            for (i, (room, change)) in entries.enumerate() {
                if i > 0 {
                    text.push(',');
                }
                text.push_str(&change.message_for(room));
            }
            let end = text.len();
            text.push_str("]}");
            (text, start..end)
        };
        Unit {
            text: text.into(),
            changes_at,
            committed_at_us,
            priority,
            queued_at: std::time::Instant::now(),
            brotli: OnceLock::new(),
            gzip: OnceLock::new(),
        }
    }

    pub fn change_count(&self) -> usize {
        self.committed_at_us.len()
    }

    /// The change objects, comma-separated.
    pub fn changes_json(&self) -> &str {
        &self.text[self.changes_at.clone()]
    }

    /// The compressed form for `encoding`, made on first use.
    pub fn compressed(&self, encoding: Encoding, level: u32) -> Option<&Bytes> {
        match encoding {
            Encoding::None => None,
            _ => Some(self.compressed_timed(encoding, level).0),
        }
    }

    /// The compressed form for `encoding` (not `None`), and how long making
    /// it took when this call made it.
    pub fn compressed_timed(&self, encoding: Encoding, level: u32) -> (&Bytes, Option<std::time::Duration>) {
        type Compress = fn(&[u8], u32) -> Vec<u8>;
        let (cell, compress): (&OnceLock<Bytes>, Compress) = match encoding {
            Encoding::Gzip => (&self.gzip, gzip),
            _ => (&self.brotli, brotli),
        };
        let mut took = None;
        let bytes = cell.get_or_init(|| {
            let started = std::time::Instant::now();
            let bytes = compress(self.text.as_bytes(), level).into();
            took = Some(started.elapsed());
            bytes
        });
        (bytes, took)
    }

    /// The compressed form this unit goes out in to a client of `encoding`
    /// (and how long making it took when this call made it), or None when
    /// it goes as text: compression off, a `none` client, or too short.
    pub fn compressed_for(
        &self,
        encoding: Encoding,
        compression: Option<Compression>,
    ) -> Option<(&Bytes, Option<std::time::Duration>)> {
        let compression = compression?;
        (encoding != Encoding::None && self.text.len() > compression.threshold)
            .then(|| self.compressed_timed(encoding, compression.level))
    }

    /// Roughly the memory a queued unit holds.
    pub fn size(&self) -> usize {
        self.text.len() + self.committed_at_us.len() * 8 + 96
    }
}

/// Merges units queued at one busy socket into one `batch` message.
pub fn merge(units: &[std::sync::Arc<Unit>]) -> String {
    let mut text = String::with_capacity(units.iter().map(|u| u.text.len()).sum::<usize>() + 32);
    text.push_str("{\"type\":\"batch\",\"changes\":[");
    for (i, unit) in units.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(unit.changes_json());
    }
    text.push_str("]}");
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Op, Position};
    use serde_json::{Value, value::RawValue};
    use std::io::Read;
    use std::sync::Arc;

    fn change(position: i64, body: &str) -> Change {
        let key = RawValue::from_string(format!("{{\"id\":{position}}}")).unwrap();
        let row = RawValue::from_string(format!("{{\"id\":{position},\"notes\":\"{body}\"}}")).unwrap();
        Change::new(
            Position(position),
            1_000_000,
            "public".into(),
            "daily_logs".into(),
            Op::Insert,
            &key,
            &row,
            vec!["project:1".into()],
        )
    }

    #[test]
    fn one_change_is_a_change_message_several_are_a_batch() {
        let (a, b) = (change(1, "a"), change(2, "b"));
        let single = Unit::new("project:1", &[&a], false);
        let v: Value = serde_json::from_str(&single.text).unwrap();
        assert_eq!(v["type"], "change");
        assert_eq!(single.changes_json(), &*single.text);
        let batch = Unit::new("project:1", &[&a, &b], false);
        let v: Value = serde_json::from_str(&batch.text).unwrap();
        assert_eq!(v["type"], "batch");
        assert_eq!(v["changes"].as_array().unwrap().len(), 2);
        assert_eq!(v["changes"][1]["position"], "2");
        let merged: Value = serde_json::from_str(&merge(&[Arc::new(single), Arc::new(batch)])).unwrap();
        let positions: Vec<_> = merged["changes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["position"].clone())
            .collect();
        assert_eq!(positions, ["1", "1", "2"]);
    }

    #[test]
    fn compressed_forms_decode_to_the_plain_message_and_are_made_once() {
        let body = "Concrete pour on level 3 completed; rebar inspection passed. ".repeat(40);
        let unit = Unit::new("project:1", &[&change(7, &body)], false);
        let br = unit.compressed(Encoding::Brotli, 6).unwrap().clone();
        let mut plain = Vec::new();
        brotli::Decompressor::new(&br[..], 4096)
            .read_to_end(&mut plain)
            .unwrap();
        assert_eq!(plain, unit.text.as_bytes());
        let gz = unit.compressed(Encoding::Gzip, 6).unwrap().clone();
        let mut plain = Vec::new();
        flate2::read::GzDecoder::new(&gz[..]).read_to_end(&mut plain).unwrap();
        assert_eq!(plain, unit.text.as_bytes());
        assert!(br.len() < unit.text.len() / 5, "{} -> {}", unit.text.len(), br.len());
        // The same bytes every time: compressed once.
        assert_eq!(unit.compressed(Encoding::Brotli, 6).unwrap().as_ptr(), br.as_ptr());
        assert!(unit.compressed(Encoding::None, 6).is_none());
    }

    #[test]
    fn encodings_parse() {
        assert_eq!(Encoding::parse(None), Ok(Encoding::None));
        assert_eq!(Encoding::parse(Some("br")), Ok(Encoding::Brotli));
        assert_eq!(Encoding::parse(Some("gzip")), Ok(Encoding::Gzip));
        assert!(Encoding::parse(Some("zstd")).unwrap_err().contains("zstd"));
    }
}
