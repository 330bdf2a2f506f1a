//! Short history kept server-side: a point every couple of seconds for the
//! dashboard (so a freshly opened page has ten minutes of charts), and the
//! counters over the last hour, which the regression detector turns into
//! rates over its windows.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

/// One dashboard point every `SAMPLE_EVERY`, kept for `SERIES_KEPT`, each
/// over the `SERIES_WINDOW` before it.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
pub const SERIES_KEPT: Duration = Duration::from_secs(600);
pub const SERIES_WINDOW: Duration = Duration::from_secs(60);

/// The counters the regression detector and the charts take rates of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CounterSnapshot {
    /// Gateway clock, microseconds since the Unix epoch.
    pub at_us: i64,
    pub deliveries: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    /// Change frames' bytes before and after compression (the pipeline's).
    pub change_bytes_raw: u64,
    pub change_bytes_sent: u64,
    /// Slow-consumer disconnects and failed or lost probes.
    pub errors: u64,
    /// Deliveries and probes.
    pub attempts: u64,
    /// Changes received from the feed (the offered load).
    pub changes: u64,
    /// Open client connections at the snapshot (a level, not a count: see
    /// [`Timeline::mean`]).
    pub connections: u64,
    /// Resident memory at the snapshot (a level), bytes; 0 when unknown.
    pub rss_bytes: u64,
    /// Process CPU time since start, microseconds.
    pub cpu_us: u64,
    /// Upgrades accepted or refused, and the failures among connections.
    pub connection_attempts: u64,
    pub connection_failures: u64,
}

/// One point of the dashboard's charts: every figure over the
/// [`SERIES_WINDOW`] before `t`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch (what JavaScript's Date takes).
    pub t: i64,
    /// Commit-to-send percentiles, ms, all three from one histogram.
    pub send_p50: Option<f64>,
    pub send_p95: Option<f64>,
    pub send_p99: Option<f64>,
    pub send_count: u64,
    /// The probe's commit-to-receive, ms.
    pub probe_p50: Option<f64>,
    pub probe_p99: Option<f64>,
    pub probe_count: u64,
    /// Commit-to-ack P99, ms.
    pub ack_p99: Option<f64>,
    pub ack_count: u64,
    pub connections: u64,
    pub rooms: u64,
    pub subscriptions: u64,
    pub deliveries_per_s: f64,
    pub messages_per_s: f64,
    pub bytes_out_per_s: f64,
    /// Change frames' bytes per second before and after compression.
    pub change_bytes_raw_per_s: f64,
    pub change_bytes_sent_per_s: f64,
    /// Alerts raised within the retention window.
    pub alerts: u64,
}

/// Points and counter snapshots, each bounded by age and count.
#[derive(Debug)]
pub struct Timeline {
    samples: VecDeque<Sample>,
    counters: VecDeque<CounterSnapshot>,
    samples_kept_us: i64,
    counters_kept_us: i64,
}

/// Bounds on count, whatever the ages: a point every second for ten
/// minutes, a snapshot every second for an hour.
const MAX_SAMPLES: usize = 600;
const MAX_SNAPSHOTS: usize = 3600;

impl Timeline {
    pub fn new(samples_kept_us: i64, counters_kept_us: i64) -> Timeline {
        Timeline {
            samples: VecDeque::new(),
            counters: VecDeque::new(),
            samples_kept_us,
            counters_kept_us,
        }
    }

    pub fn push_sample(&mut self, sample: Sample) {
        let horizon_ms = sample.t - self.samples_kept_us / 1000;
        while self
            .samples
            .front()
            .is_some_and(|s| s.t < horizon_ms || self.samples.len() >= MAX_SAMPLES)
        {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    /// Points after `t` (ms), oldest first.
    pub fn samples_after(&self, t: i64) -> Vec<Sample> {
        let start = self.samples.partition_point(|s| s.t <= t);
        self.samples.range(start..).cloned().collect()
    }

    pub fn push_counters(&mut self, snapshot: CounterSnapshot) {
        let horizon = snapshot.at_us - self.counters_kept_us;
        while self
            .counters
            .front()
            .is_some_and(|s| s.at_us < horizon || self.counters.len() >= MAX_SNAPSHOTS)
        {
            self.counters.pop_front();
        }
        self.counters.push_back(snapshot);
    }

    pub fn oldest_counters(&self) -> Option<CounterSnapshot> {
        self.counters.front().copied()
    }

    /// The last snapshot taken at or before `at_us`.
    pub fn counters_at(&self, at_us: i64) -> Option<CounterSnapshot> {
        let after = self.counters.partition_point(|s| s.at_us <= at_us);
        after.checked_sub(1).map(|i| self.counters[i])
    }

    /// Counter growth from `from_us` to `to_us` (snapshots at or before
    /// each), or None when the history does not reach back to `from_us`.
    pub fn growth(&self, from_us: i64, to_us: i64) -> Option<(CounterSnapshot, f64)> {
        let a = self.counters_at(from_us)?;
        let b = self.counters_at(to_us)?;
        let seconds = (b.at_us - a.at_us) as f64 / 1e6;
        if seconds <= 0.0 {
            return None;
        }
        let d = |f: fn(&CounterSnapshot) -> u64| f(&b).saturating_sub(f(&a));
        Some((
            CounterSnapshot {
                at_us: b.at_us,
                deliveries: d(|s| s.deliveries),
                messages_sent: d(|s| s.messages_sent),
                bytes_sent: d(|s| s.bytes_sent),
                change_bytes_raw: d(|s| s.change_bytes_raw),
                change_bytes_sent: d(|s| s.change_bytes_sent),
                errors: d(|s| s.errors),
                attempts: d(|s| s.attempts),
                changes: d(|s| s.changes),
                // Levels are not differences: see `mean`.
                connections: b.connections,
                rss_bytes: b.rss_bytes,
                cpu_us: d(|s| s.cpu_us),
                connection_attempts: d(|s| s.connection_attempts),
                connection_failures: d(|s| s.connection_failures),
            },
            seconds,
        ))
    }

    /// The mean of a level (connections, resident memory) over the
    /// snapshots taken in `(from_us, to_us]`; None when there are none.
    pub fn mean(&self, from_us: i64, to_us: i64, level: fn(&CounterSnapshot) -> u64) -> Option<f64> {
        let start = self.counters.partition_point(|s| s.at_us <= from_us);
        let end = self.counters.partition_point(|s| s.at_us <= to_us);
        let n = end.checked_sub(start).filter(|n| *n > 0)?;
        let sum: f64 = self.counters.range(start..end).map(|s| level(s) as f64).sum();
        Some(sum / n as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(second: i64, deliveries: u64) -> CounterSnapshot {
        CounterSnapshot {
            at_us: second * 1_000_000,
            deliveries,
            attempts: deliveries,
            ..CounterSnapshot::default()
        }
    }

    #[test]
    fn growth_between_two_moments() {
        let mut t = Timeline::new(600_000_000, 3_600_000_000);
        for s in 0..100 {
            t.push_counters(snapshot(1000 + s * 2, (s * 20) as u64));
        }
        let (d, seconds) = t.growth(1_100_000_000, 1_150_000_000).unwrap();
        assert_eq!(seconds, 50.0);
        assert_eq!(d.deliveries, 500);
        assert_eq!(t.counters_at(1_001_000_000).unwrap().at_us, 1_000_000_000);
        // Before the history starts: no answer rather than a wrong one.
        assert_eq!(t.growth(999_000_000, 1_150_000_000), None);
    }

    #[test]
    fn history_is_bounded_by_age() {
        let mut t = Timeline::new(10_000_000, 20_000_000);
        for s in 0..100 {
            t.push_counters(snapshot(s, 0));
            t.push_sample(Sample {
                t: s * 1000,
                ..Sample::default()
            });
        }
        assert_eq!(t.counters_at(0), None);
        assert!(t.counters_at(80_000_000).is_some());
        let points = t.samples_after(0);
        assert_eq!(points.first().unwrap().t, 89_000);
        assert_eq!(points.len(), 11);
        assert_eq!(t.samples_after(97_000).len(), 2);
    }
}
