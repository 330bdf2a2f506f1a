//! The message pipeline between the feed and the sockets: dedup drops
//! repeats, batching groups a room's changes that arrived together, and
//! encoding serializes (and compresses) each group once for every member.
//!
//! Every stage is a plain synchronous struct; the hub drives them under its
//! lock, and the sockets only pick ready bytes.

pub mod batch;
pub mod dedup;
pub mod encode;

use std::sync::atomic::{AtomicU64, Ordering};

/// What the pipeline saved and did, for /healthz and /metrics.
#[derive(Default)]
pub struct PipelineStats {
    /// Frames carrying changes, and the changes in them.
    pub frames: AtomicU64,
    pub changes: AtomicU64,
    /// Frames that carried more than one change.
    pub batched_frames: AtomicU64,
    /// Room deliveries dropped by dedup.
    pub deduplicated: AtomicU64,
    /// Per encoding (none, br, gzip): JSON bytes before compression, and the
    /// bytes actually written.
    pub bytes_raw: [AtomicU64; 3],
    pub bytes_sent: [AtomicU64; 3],
}

impl PipelineStats {
    /// Adds what one connection gathered (see `socket::send`): encoding
    /// index, frames, changes, batched frames, raw and sent bytes.
    pub fn add(&self, encoding: usize, frames: u64, changes: u64, batched: u64, raw: u64, sent: u64) {
        self.frames.fetch_add(frames, Ordering::Relaxed);
        self.changes.fetch_add(changes, Ordering::Relaxed);
        self.batched_frames.fetch_add(batched, Ordering::Relaxed);
        self.bytes_raw[encoding].fetch_add(raw, Ordering::Relaxed);
        self.bytes_sent[encoding].fetch_add(sent, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Change frames' bytes before and after compression, over every encoding.
    pub fn compression_bytes(&self) -> (u64, u64) {
        let sum = |counters: &[AtomicU64]| counters.iter().map(PipelineStats::get).sum();
        (sum(&self.bytes_raw), sum(&self.bytes_sent))
    }
}
