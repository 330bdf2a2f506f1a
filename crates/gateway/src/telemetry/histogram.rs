//! Latency histograms over sliding windows: what `/latency?window=`, the
//! dashboard, the profiler and the regression detector read.
//!
//! Values are microseconds in HDR histograms at two significant digits: exact
//! below 256 us, within 1 % above, from 1 us to an hour. Recent data sits in
//! ten-second slots covering ten minutes; a slot that is reused is first
//! folded into one-minute slots covering the hour, so a value lives in
//! exactly one slot and any window up to an hour is a merge of whole slots.
//! A slot keeps its values as a plain list until it holds enough of them for
//! a histogram to be smaller, so an idle gateway pays a few bytes per slot
//! rather than the 27 KiB of a histogram.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Significant digits kept: 1 % is far finer than any latency decision.
const SIGNIFICANT_DIGITS: u8 = 2;
/// Largest value tracked; larger ones are recorded as this (saturated).
pub const MAX_TRACKED_US: u64 = 3_600_000_000;
/// Values a slot keeps as a list before switching to a histogram: 8 KiB of
/// list against 27 KiB of histogram.
const LIST_LIMIT: usize = 2048;

/// Ten-second slots over ten minutes.
pub const FINE_SLOT_S: u64 = 10;
const FINE_SLOTS: u64 = 60;
/// One-minute slots over the hour.
pub const COARSE_SLOT_S: u64 = 60;
const COARSE_SLOTS: u64 = 60;
/// The longest window a query can ask for.
pub const MAX_WINDOW: Duration = Duration::from_secs(COARSE_SLOT_S * COARSE_SLOTS);

/// An empty microsecond histogram with the bounds every slot shares.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_TRACKED_US, SIGNIFICANT_DIGITS).expect("valid histogram bounds")
}

/// The values of one slot.
#[derive(Default)]
enum Samples {
    #[default]
    Empty,
    List(Vec<u32>),
    Histogram(Box<Histogram<u64>>),
}

fn clamp(value_us: u64) -> u64 {
    value_us.clamp(1, MAX_TRACKED_US)
}

impl Samples {
    fn record(&mut self, value_us: u64) {
        let v = clamp(value_us);
        match self {
            Samples::Empty => *self = Samples::List(vec![v as u32]),
            Samples::List(list) if list.len() < LIST_LIMIT => list.push(v as u32),
            Samples::List(_) => {
                self.promote();
                self.record(v);
            }
            Samples::Histogram(h) => h.saturating_record(v),
        }
    }

    /// Turns a list into a histogram.
    fn promote(&mut self) {
        if let Samples::List(list) = self {
            let mut h = new_histogram();
            for &v in list.iter() {
                h.saturating_record(u64::from(v));
            }
            *self = Samples::Histogram(Box::new(h));
        }
    }

    fn len(&self) -> u64 {
        match self {
            Samples::Empty => 0,
            Samples::List(list) => list.len() as u64,
            Samples::Histogram(h) => h.len(),
        }
    }

    fn add_to(&self, into: &mut Histogram<u64>) {
        match self {
            Samples::Empty => {}
            Samples::List(list) => {
                for &v in list {
                    into.saturating_record(u64::from(v));
                }
            }
            Samples::Histogram(h) => into.add(&**h).expect("slots share bounds"),
        }
    }

    /// Moves `other`'s values into this slot.
    fn absorb(&mut self, other: Samples) {
        match (&mut *self, other) {
            (_, Samples::Empty) => {}
            (Samples::Empty, other) => *self = other,
            (Samples::Histogram(h), other) => other.add_to(h),
            (Samples::List(_), Samples::Histogram(mut h)) => {
                self.add_to(&mut h);
                *self = Samples::Histogram(h);
            }
            (Samples::List(list), Samples::List(more)) => {
                list.extend(more);
                if list.len() > LIST_LIMIT {
                    self.promote();
                }
            }
        }
    }

    /// Empties the slot, keeping a histogram's allocation for reuse.
    fn clear(&mut self) {
        match self {
            Samples::Histogram(h) => h.reset(),
            _ => *self = Samples::Empty,
        }
    }
}

/// One slot: the values recorded in `[index * width, (index + 1) * width)`
/// seconds since the Unix epoch.
#[derive(Default)]
struct Slot {
    index: u64,
    samples: Samples,
}

struct Rings {
    fine: Vec<Slot>,
    /// Empty for a histogram that only needs the last ten minutes.
    coarse: Vec<Slot>,
    /// Everything since start, for Prometheus (cumulative by definition).
    total: Histogram<u64>,
    total_sum_us: u64,
}

/// A latency histogram over sliding windows of up to an hour (or ten minutes,
/// see [`WindowedHistogram::ten_minutes`]), plus one over the whole run.
pub struct WindowedHistogram {
    rings: Mutex<Rings>,
}

/// Percentiles of a window, in milliseconds; `None` when it is empty.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub mean_ms: Option<f64>,
}

impl Percentiles {
    pub const EMPTY: Percentiles = Percentiles {
        count: 0,
        p50_ms: None,
        p95_ms: None,
        p99_ms: None,
        max_ms: None,
        mean_ms: None,
    };

    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::EMPTY;
        }
        let ms = |us: u64| Some(us as f64 / 1000.0);
        Percentiles {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.50)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: Some(h.mean() / 1000.0),
        }
    }
}

/// Prometheus' view of a histogram: cumulative counts at each bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Cumulative {
    /// `(bound_us, values <= bound)`, bounds ascending.
    pub buckets: Vec<(u64, u64)>,
    pub count: u64,
    pub sum_us: u64,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl Default for WindowedHistogram {
    fn default() -> Self {
        WindowedHistogram::hour()
    }
}

impl WindowedHistogram {
    /// Windows of up to an hour: the end-to-end measurements.
    pub fn hour() -> WindowedHistogram {
        WindowedHistogram::with_coarse(true)
    }

    /// Windows of up to ten minutes, in half the memory: per-stage timings.
    pub fn ten_minutes() -> WindowedHistogram {
        WindowedHistogram::with_coarse(false)
    }

    fn with_coarse(coarse: bool) -> WindowedHistogram {
        let slots = |n: u64| (0..n).map(|_| Slot::default()).collect::<Vec<_>>();
        WindowedHistogram {
            rings: Mutex::new(Rings {
                fine: slots(FINE_SLOTS),
                coarse: if coarse { slots(COARSE_SLOTS) } else { Vec::new() },
                total: new_histogram(),
                total_sum_us: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rings> {
        self.rings.lock().expect("histogram lock")
    }

    /// The longest window this histogram answers for.
    pub fn span(&self) -> Duration {
        if self.lock().coarse.is_empty() {
            Duration::from_secs(FINE_SLOT_S * FINE_SLOTS)
        } else {
            MAX_WINDOW
        }
    }

    /// Records many values under one lock (a send task's whole write).
    pub fn record_all(&self, values_us: impl IntoIterator<Item = u64>) {
        self.record_all_at(now_secs(), values_us);
    }

    pub fn record(&self, value_us: u64) {
        self.record_all([value_us]);
    }

    /// Records and empties `held`, samples a caller kept for a while. Unless
    /// told to `wait` it gives up at once when the lock is held (a reader
    /// merging windows for a percentile holds it for up to a millisecond)
    /// and leaves them for the next try: the delivery path uses this, so a
    /// worker thread never stalls on a reader while deliveries wait behind
    /// it. Returns whether `held` is now empty.
    pub fn record_held(&self, held: &mut Vec<u64>, wait: bool) -> bool {
        if held.is_empty() {
            return true;
        }
        let mut rings = match self.rings.try_lock() {
            Ok(rings) => rings,
            Err(std::sync::TryLockError::WouldBlock) if wait => self.lock(),
            Err(std::sync::TryLockError::WouldBlock) => return false,
            Err(std::sync::TryLockError::Poisoned(e)) => panic!("histogram lock poisoned: {e}"),
        };
        Self::record_into(&mut rings, now_secs(), held.drain(..));
        true
    }

    fn record_all_at(&self, now_s: u64, values_us: impl IntoIterator<Item = u64>) {
        Self::record_into(&mut self.lock(), now_s, values_us);
    }

    fn record_into(rings: &mut Rings, now_s: u64, values_us: impl IntoIterator<Item = u64>) {
        let Rings {
            fine,
            coarse,
            total,
            total_sum_us,
        } = rings;
        let epoch = now_s / FINE_SLOT_S;
        let slot = &mut fine[(epoch % FINE_SLOTS) as usize];
        if slot.index != epoch {
            // Ten minutes old: it moves to its minute, or out if there is none.
            let old = std::mem::take(&mut slot.samples);
            fold(coarse, slot.index, old);
            slot.index = epoch;
        }
        for v in values_us {
            let v = clamp(v);
            slot.samples.record(v);
            total.saturating_record(v);
            *total_sum_us = total_sum_us.saturating_add(v);
        }
    }

    /// Percentiles over the last `seconds` (whole slots covering at least
    /// that, at most the span).
    pub fn recent(&self, seconds: u64) -> Percentiles {
        self.recent_at(now_secs(), seconds)
    }

    fn recent_at(&self, now_s: u64, seconds: u64) -> Percentiles {
        Percentiles::of(&self.between_at(now_s.saturating_sub(seconds.max(1)), u64::MAX))
    }

    /// Percentiles of the values recorded between `from_ago` and `to_ago`
    /// before now (`from_ago` > `to_ago`): the slots that end in that span.
    pub fn between(&self, from_ago: Duration, to_ago: Duration) -> Percentiles {
        let now = now_secs();
        Percentiles::of(&self.between_at(
            now.saturating_sub(from_ago.as_secs()),
            now.saturating_sub(to_ago.as_secs()),
        ))
    }

    /// Merges the slots whose end lies in `(lo_s, hi_s]`.
    fn between_at(&self, lo_s: u64, hi_s: u64) -> Histogram<u64> {
        let rings = self.lock();
        let mut merged = new_histogram();
        let mut add = |slots: &[Slot], width: u64| {
            for slot in slots {
                let end = (slot.index + 1) * width;
                if end > lo_s && end <= hi_s {
                    slot.samples.add_to(&mut merged);
                }
            }
        };
        add(&rings.fine, FINE_SLOT_S);
        add(&rings.coarse, COARSE_SLOT_S);
        merged
    }

    /// Values recorded since start.
    pub fn total_count(&self) -> u64 {
        self.lock().total.len()
    }

    /// Cumulative counts at `bounds_us` since start, for `/metrics`.
    pub fn cumulative(&self, bounds_us: &[u64]) -> Cumulative {
        let rings = self.lock();
        let total = &rings.total;
        let buckets = bounds_us
            .iter()
            .map(|&bound| {
                let count = if total.is_empty() {
                    0
                } else {
                    total.count_between(0, bound)
                };
                (bound, count)
            })
            .collect();
        Cumulative {
            buckets,
            count: total.len(),
            sum_us: rings.total_sum_us,
        }
    }

    /// Values held in windows, for `/healthz` `performance`.
    pub fn recent_count(&self, seconds: u64) -> u64 {
        let lo = now_secs().saturating_sub(seconds.max(1));
        let rings = self.lock();
        let count = |slots: &[Slot], width: u64| -> u64 {
            slots
                .iter()
                .filter(|s| (s.index + 1) * width > lo)
                .map(|s| s.samples.len())
                .sum()
        };
        count(&rings.fine, FINE_SLOT_S) + count(&rings.coarse, COARSE_SLOT_S)
    }
}

/// Moves a ten-second slot's values into the one-minute slot it falls in,
/// unless that slot already holds a later minute (the values are over an
/// hour old) or there are no one-minute slots.
fn fold(coarse: &mut [Slot], fine_index: u64, samples: Samples) {
    if coarse.is_empty() || matches!(samples, Samples::Empty) {
        return;
    }
    let minute = fine_index * FINE_SLOT_S / COARSE_SLOT_S;
    let slot = &mut coarse[(minute % COARSE_SLOTS) as usize];
    if slot.index < minute {
        slot.samples.clear();
        slot.index = minute;
    }
    if slot.index == minute {
        slot.samples.absorb(samples);
    }
}

/// Counts of small integers (batch sizes) in fixed Prometheus buckets.
pub struct SizeHistogram {
    bounds: &'static [u64],
    /// Non-cumulative: `counts[i]` holds values in `(bounds[i-1], bounds[i]]`;
    /// the last one everything above the last bound.
    counts: Vec<std::sync::atomic::AtomicU64>,
    sum: std::sync::atomic::AtomicU64,
}

impl SizeHistogram {
    pub fn new(bounds: &'static [u64]) -> SizeHistogram {
        SizeHistogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| Default::default()).collect(),
            sum: Default::default(),
        }
    }

    pub fn record(&self, value: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let i = self.bounds.partition_point(|&b| b < value);
        self.counts[i].fetch_add(1, Relaxed);
        self.sum.fetch_add(value, Relaxed);
    }

    /// `(bound, cumulative count)` per bound, then the total count and sum.
    pub fn cumulative(&self) -> (Vec<(u64, u64)>, u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut running = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.counts)
            .map(|(&b, c)| {
                running += c.load(Relaxed);
                (b, running)
            })
            .collect();
        let total = running + self.counts[self.bounds.len()].load(Relaxed);
        (buckets, total, self.sum.load(Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Within `pct` percent of `want`.
    fn near(got: Option<f64>, want: f64, pct: f64) -> bool {
        got.is_some_and(|g| (g - want).abs() <= want * pct / 100.0)
    }

    const T0: u64 = 1_800_000_000;

    #[test]
    fn a_held_lock_leaves_the_values_for_the_next_try() {
        let h = WindowedHistogram::ten_minutes();
        let mut values = vec![100, 200, 300];
        {
            let _reader = h.lock();
            assert!(
                !h.record_held(&mut values, false),
                "gave up while a reader holds the lock"
            );
        }
        assert_eq!(values.len(), 3, "nothing taken on a failed try");
        assert!(h.record_held(&mut values, false));
        assert!(values.is_empty());
        assert_eq!(h.total_count(), 3);
        let mut more = vec![400];
        assert!(h.record_held(&mut more, true), "told to wait, it records");
        assert_eq!(h.total_count(), 4);
    }

    #[test]
    fn percentiles_of_a_uniform_distribution() {
        let h = WindowedHistogram::default();
        h.record_all_at(T0, 1..=10_000u64);
        let p = h.recent_at(T0, 60);
        assert_eq!(p.count, 10_000);
        assert!(near(p.p50_ms, 5.0, 1.0), "{p:?}");
        assert!(near(p.p95_ms, 9.5, 1.0), "{p:?}");
        assert!(near(p.p99_ms, 9.9, 1.0), "{p:?}");
        assert!(near(p.max_ms, 10.0, 1.0), "{p:?}");
        assert!(near(p.mean_ms, 5.0, 1.0), "{p:?}");
    }

    #[test]
    fn percentiles_of_an_exponential_distribution() {
        // Quantiles of Exp(mean 2 ms): -mean * ln(1 - q). Values from the
        // inverse CDF at evenly spaced probabilities, so the sample is exact.
        let mean_us = 2000.0_f64;
        let n = 100_000;
        let values = (0..n).map(|i| {
            let q = (i as f64 + 0.5) / n as f64;
            (-mean_us * (1.0 - q).ln()) as u64
        });
        let h = WindowedHistogram::default();
        h.record_all_at(T0, values);
        let p = h.recent_at(T0, 60);
        let quantile = |q: f64| -mean_us * (1.0f64 - q).ln() / 1000.0;
        assert!(near(p.p50_ms, quantile(0.50), 1.0), "{p:?}");
        assert!(near(p.p95_ms, quantile(0.95), 1.0), "{p:?}");
        assert!(near(p.p99_ms, quantile(0.99), 1.0), "{p:?}");
        assert!(near(p.mean_ms, 2.0, 1.0), "{p:?}");
    }

    #[test]
    fn small_samples_are_exact_below_256_us() {
        let h = WindowedHistogram::default();
        h.record_all_at(T0, [7, 100, 250]);
        let p = h.recent_at(T0, 10);
        assert_eq!(p.count, 3);
        assert_eq!(p.p50_ms, Some(0.1));
        assert_eq!(p.max_ms, Some(0.25));
        // Zero is recorded as the smallest trackable value, 1 us.
        h.record_all_at(T0, [0]);
        assert_eq!(h.recent_at(T0, 10).count, 4);
    }

    #[test]
    fn a_bimodal_distribution_shows_its_tail() {
        // 98 % at 1 ms, 2 % at 40 ms: P95 is fast, P99 is the slow mode.
        let h = WindowedHistogram::default();
        h.record_all_at(
            T0,
            std::iter::repeat_n(1000, 9800).chain(std::iter::repeat_n(40_000, 200)),
        );
        let p = h.recent_at(T0, 60);
        assert!(near(p.p95_ms, 1.0, 1.0), "{p:?}");
        assert!(near(p.p99_ms, 40.0, 1.0), "{p:?}");
    }

    #[test]
    fn lists_promote_to_histograms_without_losing_values() {
        let h = WindowedHistogram::default();
        let n = LIST_LIMIT as u64 * 3 + 17;
        h.record_all_at(T0, (1..=n).map(|i| i * 10));
        let p = h.recent_at(T0, 10);
        assert_eq!(p.count, n);
        assert!(near(p.max_ms, n as f64 / 100.0, 1.0), "{p:?}");
    }

    #[test]
    fn windows_select_whole_slots() {
        let h = WindowedHistogram::default();
        // One value per ten-second slot for ten minutes: slot k holds k ms.
        for k in 0..60u64 {
            h.record_all_at(T0 + k * FINE_SLOT_S, [k * 1000 + 1000]);
        }
        // Exactly at a slot's end, windows are exact.
        let end = T0 + 60 * FINE_SLOT_S;
        assert_eq!(h.recent_at(end, 10).count, 1);
        assert_eq!(h.recent_at(end, 30).count, 3);
        assert_eq!(h.recent_at(end, 60).count, 6);
        // Within a slot, they take every slot they overlap: at least the
        // window, at most a slot more.
        let now = T0 + 59 * FINE_SLOT_S + 5;
        assert_eq!(h.recent_at(now, 10).count, 2);
        assert_eq!(h.recent_at(now, 30).count, 4);
        assert_eq!(h.recent_at(now, 60).count, 7);
        assert_eq!(h.recent_at(now, 600).count, 60);
        // The last minute holds the largest values.
        assert!(near(h.recent_at(now, 60).p50_ms, 57.0, 1.0));
        // Disjoint windows split the data exactly.
        let slot_end = |k: u64| (T0 / FINE_SLOT_S + k + 1) * FINE_SLOT_S;
        let older = h.between_at(slot_end(0), slot_end(29)).len();
        let newer = h.between_at(slot_end(29), u64::MAX).len();
        assert_eq!(older + newer, 59);
        assert_eq!(newer, 30);
    }

    #[test]
    fn an_hour_is_kept_in_minutes_after_ten_minutes() {
        let h = WindowedHistogram::hour();
        // 100 values a minute for 70 minutes, spread over the slots.
        for minute in 0..70u64 {
            for k in 0..6 {
                let t = T0 + minute * 60 + k * FINE_SLOT_S;
                h.record_all_at(t, std::iter::repeat_n(minute * 100 + 100, 100 / 6 + 1));
            }
        }
        let now = T0 + 70 * 60 - 1;
        let per_minute = 6 * (100 / 6 + 1);
        let ten = h.recent_at(now, 600).count;
        assert!(
            (ten as i64 - 10 * per_minute as i64).abs() <= per_minute as i64,
            "{ten}"
        );
        let hour = h.recent_at(now, 3600).count;
        // An hour of data (and the minute straddling its start), never more
        // than the hour and a minute the rings can hold.
        assert!(hour >= 60 * per_minute && hour <= 61 * per_minute, "{hour}");
        // The ten-minute variant forgets what is older.
        let short = WindowedHistogram::ten_minutes();
        for minute in 0..70u64 {
            short.record_all_at(T0 + minute * 60, [1000]);
        }
        assert!(short.recent_at(T0 + 70 * 60, 3600).count <= 11);
        assert_eq!(short.span(), Duration::from_secs(600));
    }

    #[test]
    fn totals() {
        let h = WindowedHistogram::default();
        h.record_all_at(T0, [1000, 2000, 3000]);
        h.record_all_at(T0 + 1000, [50_000]);
        let c = h.cumulative(&[1500, 2500, 100_000]);
        assert_eq!(c.buckets, vec![(1500, 1), (2500, 2), (100_000, 4)]);
        assert_eq!(c.count, 4);
        assert_eq!(c.sum_us, 56_000);
    }

    #[test]
    fn empty_windows_have_no_percentiles() {
        let p = WindowedHistogram::default().recent(60);
        assert_eq!(p, Percentiles::EMPTY);
    }

    #[test]
    fn size_histogram_is_cumulative() {
        let h = SizeHistogram::new(&[1, 5, 10]);
        for v in [1, 1, 3, 10, 11, 400] {
            h.record(v);
        }
        let (buckets, count, sum) = h.cumulative();
        assert_eq!(buckets, vec![(1, 2), (5, 3), (10, 4)]);
        assert_eq!(count, 6);
        assert_eq!(sum, 426);
    }
}
