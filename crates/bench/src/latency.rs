//! Commit-to-receive latencies: recorded by many client tasks into a few
//! sharded HDR histograms (a client locks its shard once per frame, which no
//! other thread wants at that moment), collected into a total and into
//! per-interval windows for the stability lines.
//!
//! Sharded rather than one histogram per client: 10,000 clients would each
//! hold ~190 KB of counts; 32 shards hold 6 MB whatever the client count.

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// 1 us to 1 hour at 3 significant digits (0.1 %), in microseconds.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

pub struct LatencyRecorder {
    shards: Box<[Mutex<Histogram<u64>>]>,
}

impl LatencyRecorder {
    pub fn new(shards: usize) -> LatencyRecorder {
        LatencyRecorder {
            shards: (0..shards.max(1)).map(|_| Mutex::new(new_histogram())).collect(),
        }
    }

    /// Records microsecond latencies into the shard of `client`.
    pub fn record(&self, client: usize, latencies_us: &[u64]) {
        let shard = &self.shards[client % self.shards.len()];
        let mut histogram = shard.lock().expect("latency shard lock");
        for &us in latencies_us {
            histogram.saturating_record(us.max(1));
        }
    }

    /// Moves everything recorded so far into `into` (and leaves the shards empty).
    pub fn drain_into(&self, into: &mut Histogram<u64>) {
        for shard in self.shards.iter() {
            let mut histogram = shard.lock().expect("latency shard lock");
            if !histogram.is_empty() {
                into.add(&*histogram).expect("same bounds");
                histogram.reset();
            }
        }
    }
}

/// The total of a run and the window since the last interval line.
pub struct Collector {
    pub total: Histogram<u64>,
    pub window: Histogram<u64>,
}

impl Collector {
    pub fn new() -> Collector {
        Collector {
            total: new_histogram(),
            window: new_histogram(),
        }
    }

    pub fn collect(&mut self, recorder: &LatencyRecorder) {
        let mut fresh = new_histogram();
        recorder.drain_into(&mut fresh);
        self.total.add(&fresh).expect("same bounds");
        self.window.add(&fresh).expect("same bounds");
    }

    /// The window's summary; starts a new window.
    pub fn take_window(&mut self) -> LatencySummary {
        let summary = LatencySummary::of(&self.window);
        self.window.reset();
        summary
    }
}

impl Default for Collector {
    fn default() -> Self {
        Collector::new()
    }
}

/// Percentiles in milliseconds; `None` when nothing was recorded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
    #[serde(rename = "p99_9")]
    pub p999: Option<f64>,
    pub max: Option<f64>,
    pub mean: Option<f64>,
}

impl LatencySummary {
    pub fn of(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        // Each percentile is the highest value equivalent to its bucket, so a
        // reported P99 is never below the true one.
        let ms = |us: u64| Some(round3(h.highest_equivalent(us) as f64 / 1000.0));
        LatencySummary {
            count: h.len(),
            p50: ms(h.value_at_quantile(0.50)),
            p95: ms(h.value_at_quantile(0.95)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
            mean: Some(round3(h.mean() / 1000.0)),
        }
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let recorder = LatencyRecorder::new(4);
        // 1..=1000 us, spread over clients (and so shards).
        for us in 1..=1000u64 {
            recorder.record(us as usize, &[us]);
        }
        let mut collector = Collector::new();
        collector.collect(&recorder);
        let s = LatencySummary::of(&collector.total);
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, Some(0.5));
        assert_eq!(s.p95, Some(0.95));
        assert_eq!(s.p99, Some(0.99));
        assert_eq!(s.p999, Some(0.999));
        assert_eq!(s.max, Some(1.0));
        assert!((s.mean.unwrap() - 0.5005).abs() < 0.001, "{s:?}");
    }

    #[test]
    fn windows_restart_and_totals_accumulate() {
        let recorder = LatencyRecorder::new(2);
        let mut collector = Collector::new();
        recorder.record(0, &[1000, 2000]);
        collector.collect(&recorder);
        let first = collector.take_window();
        assert_eq!(first.count, 2);
        recorder.record(1, &[5000]);
        collector.collect(&recorder);
        let second = collector.take_window();
        // 5000 us lies in a bucket 4 us wide: reported as its top, 5.003 ms.
        assert_eq!((second.count, second.max), (1, Some(5.003)));
        assert_eq!(LatencySummary::of(&collector.total).count, 3);
        // Nothing is counted twice: the shards were emptied.
        collector.collect(&recorder);
        assert_eq!(LatencySummary::of(&collector.total).count, 3);
        assert_eq!(collector.take_window(), LatencySummary::default());
    }

    #[test]
    fn empty_and_huge_values() {
        assert_eq!(LatencySummary::of(&new_histogram()).p99, None);
        let recorder = LatencyRecorder::new(1);
        recorder.record(0, &[0, u64::MAX]);
        let mut collector = Collector::new();
        collector.collect(&recorder);
        let s = LatencySummary::of(&collector.total);
        assert_eq!(s.count, 2);
        assert!(s.max.unwrap() >= 3_600_000.0);
    }
}
