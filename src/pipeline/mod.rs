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

use encode::Encoding;

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
    pub fn record_frame(&self, encoding: Encoding, changes: usize, raw: usize, sent: usize) {
        self.frames.fetch_add(1, Ordering::Relaxed);
        self.changes.fetch_add(changes as u64, Ordering::Relaxed);
        if changes > 1 {
            self.batched_frames.fetch_add(1, Ordering::Relaxed);
        }
        let i = encoding as usize;
        self.bytes_raw[i].fetch_add(raw as u64, Ordering::Relaxed);
        self.bytes_sent[i].fetch_add(sent as u64, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
