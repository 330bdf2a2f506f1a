//! The one clock every timing of a run is read on (monotonic, this process),
//! and the send time of every row, kept where a receiver finds it by id.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Microseconds since the run's origin on the monotonic clock; never 0, so 0
/// can mean "not yet".
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { origin: Instant::now() }
    }

    pub fn now_us(&self) -> u64 {
        self.origin.elapsed().as_micros() as u64 + 1
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

/// A row's INSERT failed: nobody should receive it.
const FAILED: u64 = u64::MAX;

/// When each row's INSERT was sent, indexed by id (`1..=capacity`). A slot
/// per row, preallocated: a writer's store and a client's load touch one
/// word, with no lock and no hashing on the hot path.
pub struct SendLog {
    pub clock: Clock,
    sent_us: Box<[AtomicU64]>,
}

impl SendLog {
    pub fn new(clock: Clock, capacity: u64) -> SendLog {
        SendLog {
            clock,
            sent_us: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Stamps row `id` as sent now; returns the stamp.
    pub fn record_send(&self, id: u64) -> u64 {
        let now = self.clock.now_us();
        if let Some(slot) = self.slot(id) {
            slot.store(now, Ordering::Release);
        }
        now
    }

    pub fn mark_failed(&self, id: u64) {
        if let Some(slot) = self.slot(id) {
            slot.store(FAILED, Ordering::Release);
        }
    }

    /// When row `id` was sent; None for an id never sent (or failed).
    pub fn sent_at(&self, id: u64) -> Option<u64> {
        match self.slot(id)?.load(Ordering::Acquire) {
            0 | FAILED => None,
            us => Some(us),
        }
    }

    fn slot(&self, id: u64) -> Option<&AtomicU64> {
        let index = usize::try_from(id.checked_sub(1)?).ok()?;
        self.sent_us.get(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_send_times_by_id() {
        let log = SendLog::new(Clock::new(), 3);
        assert_eq!(log.sent_at(1), None);
        let at = log.record_send(2);
        assert!(at >= 1);
        assert_eq!(log.sent_at(2), Some(at));
        log.record_send(3);
        log.mark_failed(3);
        assert_eq!(log.sent_at(3), None);
        // Out of range ids are ignored, never a panic.
        log.record_send(0);
        log.record_send(4);
        assert_eq!(log.sent_at(0), None);
        assert_eq!(log.sent_at(4), None);
    }
}
