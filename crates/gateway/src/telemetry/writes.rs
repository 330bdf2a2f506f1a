//! Measurements of change frames written to sockets, held by their writer
//! (a connection's send loop, or the dispatcher writing to idle sockets
//! itself) and published together: publishing takes shared locks and
//! touches counters every connection shares, which at one socket write per
//! delivery would cost more than the write itself.

use super::stages::Stage;
use super::{Counters, Telemetry};
use crate::pipeline::PipelineStats;
use crate::pipeline::encode::Encoding;

/// Held measurements, everything but commit-to-send (each writer records
/// that its own way: see `Telemetry::record_held_send_latencies`).
#[derive(Debug, Default)]
pub struct HeldWrites {
    pub queueing_us: Vec<u64>,
    pub batch_wait_us: Vec<u64>,
    pub encoding_us: Vec<u64>,
    pub socket_write_us: Vec<u64>,
    batch_sizes: Vec<u64>,
    /// Per encoding (none, br, gzip): frames, changes, batched frames, raw
    /// bytes, sent bytes.
    frames: [[u64; 5]; 3],
    messages: u64,
    bytes: u64,
}

impl HeldWrites {
    /// A frame of `changes` changes, `raw` bytes of JSON sent as `sent`
    /// bytes in `encoding` (None: as text).
    pub fn frame(&mut self, encoding: Encoding, changes: usize, raw: usize, sent: usize) {
        let frame = &mut self.frames[encoding as usize];
        frame[0] += 1;
        frame[1] += changes as u64;
        frame[2] += u64::from(changes > 1);
        frame[3] += raw as u64;
        frame[4] += sent as u64;
        self.batch_sizes.push(changes as u64);
    }

    /// Any message of `bytes` written (changes, protocol messages, replays).
    pub fn message(&mut self, bytes: usize) {
        self.messages += 1;
        self.bytes += bytes as u64;
    }

    /// Hands the measurements to the shared histograms and counters. Unless
    /// `force`d it does not wait for a histogram a reader holds: false when
    /// some samples could not go and are still held.
    pub fn publish(&mut self, telemetry: &Telemetry, stats: &PipelineStats, force: bool) -> bool {
        let mut published = true;
        for (stage, values) in [
            (Stage::Queueing, &mut self.queueing_us),
            (Stage::BatchWait, &mut self.batch_wait_us),
            (Stage::Encoding, &mut self.encoding_us),
            (Stage::SocketWrite, &mut self.socket_write_us),
        ] {
            published &= telemetry.stages.record_held(stage, values, force);
        }
        for size in self.batch_sizes.drain(..) {
            telemetry.batch_sizes.record(size);
        }
        for (i, frame) in self.frames.iter_mut().enumerate() {
            let [frames, changes, batched, raw, sent] = std::mem::take(frame);
            if frames > 0 {
                stats.add(i, frames, changes, batched, raw, sent);
            }
        }
        Counters::add(&telemetry.counters.messages_sent, std::mem::take(&mut self.messages));
        Counters::add(&telemetry.counters.bytes_sent, std::mem::take(&mut self.bytes));
        published
    }
}
