//! What the gateway counts and times: delivery counters, the state of the
//! feed, and commit-to-send latency as HDR histograms over a sliding minute.

use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Microsecond histograms: 1 us to 1 hour at 3 significant digits.
fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

const SLOT_SECONDS: u64 = 10;
const SLOTS: usize = 6;

/// A latency histogram over the last minute (six 10-second slots), plus one
/// over the whole run for Prometheus.
pub struct WindowedHistogram {
    inner: Mutex<Windows>,
}

struct Windows {
    slots: Vec<(u64, Histogram<u64>)>,
    total: Histogram<u64>,
}

/// Percentiles of a window, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        let ms = |us: u64| Some(us as f64 / 1000.0);
        if h.is_empty() {
            return Percentiles {
                count: 0,
                p50_ms: None,
                p95_ms: None,
                p99_ms: None,
                max_ms: None,
            };
        }
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Default for WindowedHistogram {
    fn default() -> Self {
        WindowedHistogram {
            inner: Mutex::new(Windows {
                slots: (0..SLOTS).map(|_| (0, new_histogram())).collect(),
                total: new_histogram(),
            }),
        }
    }
}

impl WindowedHistogram {
    /// Records many values under one lock (a send task's whole write).
    pub fn record_all(&self, values_us: impl IntoIterator<Item = u64>) {
        let epoch = now_secs() / SLOT_SECONDS;
        let mut w = self.inner.lock().expect("histogram lock");
        let Windows { slots, total } = &mut *w;
        let (slot_epoch, slot) = &mut slots[epoch as usize % SLOTS];
        if *slot_epoch != epoch {
            slot.reset();
            *slot_epoch = epoch;
        }
        for v in values_us {
            let v = v.max(1);
            slot.saturating_record(v);
            total.saturating_record(v);
        }
    }

    pub fn record(&self, value_us: u64) {
        self.record_all([value_us]);
    }

    /// Percentiles over the last `seconds` (rounded up to whole slots, at most
    /// a minute).
    pub fn recent(&self, seconds: u64) -> Percentiles {
        let epoch = now_secs() / SLOT_SECONDS;
        let wanted = seconds.div_ceil(SLOT_SECONDS).clamp(1, SLOTS as u64);
        let w = self.inner.lock().expect("histogram lock");
        let mut merged = new_histogram();
        for (slot_epoch, h) in &w.slots {
            if *slot_epoch + wanted > epoch && *slot_epoch <= epoch {
                merged.add(h).expect("same bounds");
            }
        }
        Percentiles::of(&merged)
    }

    /// A copy of the whole-run histogram.
    pub fn total(&self) -> Histogram<u64> {
        self.inner.lock().expect("histogram lock").total.clone()
    }
}

/// Where the feed from the database stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedState {
    Down = 0,
    CatchingUp = 1,
    Live = 2,
}

/// The feed's state, shared with `/healthz`.
#[derive(Default)]
pub struct FeedStatus {
    state: AtomicU8,
    pub position: AtomicI64,
    /// Commit to arrival of the last notification, microseconds.
    pub lag_us: AtomicI64,
    pub reconnects: AtomicU64,
    /// Database clock minus gateway clock, microseconds.
    pub clock_offset_us: AtomicI64,
}

impl FeedStatus {
    pub fn state(&self) -> FeedState {
        match self.state.load(Ordering::Acquire) {
            2 => FeedState::Live,
            1 => FeedState::CatchingUp,
            _ => FeedState::Down,
        }
    }

    pub fn set_state(&self, state: FeedState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

/// Counters, each bumped in one place.
#[derive(Default)]
pub struct Counters {
    pub changes_received: AtomicU64,
    pub deliveries_queued: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub client_errors: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connections_refused: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Everything measured, shared by the feed, the sockets and `/healthz`.
#[derive(Default)]
pub struct Telemetry {
    pub commit_to_send: WindowedHistogram,
    pub feed: FeedStatus,
    pub counters: Counters,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let h = WindowedHistogram::default();
        h.record_all(1..=10_000u64);
        let p = h.recent(60);
        assert_eq!(p.count, 10_000);
        let within = |got: Option<f64>, want: f64| (got.unwrap() - want).abs() <= want * 0.002;
        assert!(within(p.p50_ms, 5.0), "{p:?}");
        assert!(within(p.p95_ms, 9.5), "{p:?}");
        assert!(within(p.p99_ms, 9.9), "{p:?}");
        assert!(within(p.max_ms, 10.0), "{p:?}");
    }

    #[test]
    fn empty_windows_have_no_percentiles() {
        let p = WindowedHistogram::default().recent(60);
        assert_eq!(p.count, 0);
        assert_eq!(p.p99_ms, None);
    }
}
