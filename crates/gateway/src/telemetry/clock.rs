//! The database's clock against ours. `committed_at` is read on the
//! database's clock and every receive time on the gateway's; the difference
//! is only a latency once the offset between the two clocks is taken out.
//!
//! Each sample asks the database for `clock_timestamp()` and notes when the
//! question left and the answer came back. The database read its clock
//! somewhere inside that round trip, so a sample's offset is off by at most
//! half its round trip; the sample with the shortest round trip in a sliding
//! window bounds the error best (NTP's clock filter, in one line).

use std::collections::VecDeque;
use std::time::Duration;

/// One question to the database, all in microseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockSample {
    /// Gateway clock when the query was sent.
    pub sent_us: i64,
    /// Database clock (`clock_timestamp()`) while it answered.
    pub db_us: i64,
    /// Gateway clock when the answer arrived.
    pub received_us: i64,
}

impl ClockSample {
    pub fn round_trip_us(&self) -> i64 {
        self.received_us - self.sent_us
    }

    /// Database clock minus gateway clock, assuming the query spent as long
    /// going as coming back.
    pub fn offset_us(&self) -> i64 {
        self.db_us - (self.sent_us + self.received_us) / 2
    }
}

/// The current best estimate of the offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockEstimate {
    /// Database clock minus gateway clock.
    pub offset_us: i64,
    /// The true offset is within this of `offset_us`: half the best round trip.
    pub uncertainty_us: i64,
    /// Mean round trip of the samples in the window (the pool's latency).
    pub mean_round_trip_us: i64,
    pub samples: usize,
}

/// Keeps the samples of the last `window` and estimates from the one with the
/// shortest round trip. A clock that steps is followed once the window has
/// slid past the samples taken before the step.
#[derive(Debug, Clone)]
pub struct ClockOffsetEstimator {
    window_us: i64,
    samples: VecDeque<ClockSample>,
}

/// Samples kept at most, whatever the window: one a second for minutes.
const MAX_SAMPLES: usize = 512;

impl ClockOffsetEstimator {
    pub fn new(window: Duration) -> ClockOffsetEstimator {
        ClockOffsetEstimator {
            window_us: window.as_micros() as i64,
            samples: VecDeque::new(),
        }
    }

    /// Adds a sample; one with a negative round trip (our clock stepped
    /// back mid-query) says nothing and is dropped.
    pub fn add(&mut self, sample: ClockSample) {
        if sample.round_trip_us() < 0 {
            return;
        }
        let horizon = sample.received_us - self.window_us;
        while self
            .samples
            .front()
            .is_some_and(|s| s.received_us < horizon || s.received_us > sample.received_us)
        {
            self.samples.pop_front();
        }
        if self.samples.len() == MAX_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
    }

    pub fn estimate(&self) -> Option<ClockEstimate> {
        let best = self.samples.iter().min_by_key(|s| s.round_trip_us())?;
        let n = self.samples.len();
        let mean_round_trip_us = self.samples.iter().map(|s| s.round_trip_us()).sum::<i64>() / n as i64;
        Some(ClockEstimate {
            offset_us: best.offset_us(),
            uncertainty_us: (best.round_trip_us() + 1) / 2,
            mean_round_trip_us,
            samples: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stream of network delays, mostly short, sometimes
    /// long, often lopsided: the kind that fools a single sample.
    struct Delays(u64);

    impl Delays {
        fn next_us(&mut self) -> i64 {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            let r = (self.0 >> 33) % 1000;
            match r {
                0..=599 => 150 + (r as i64 % 100),  // LAN
                600..=899 => 2_000 + r as i64 * 10, // a busy moment
                _ => 40_000 + r as i64 * 50,        // a stall
            }
        }
    }

    /// Samples against a database whose clock is `skew_us` ahead of ours.
    fn sample(at_us: i64, skew_us: i64, delays: &mut Delays) -> ClockSample {
        let there = delays.next_us();
        let back = delays.next_us();
        ClockSample {
            sent_us: at_us,
            db_us: at_us + there + skew_us,
            received_us: at_us + there + back,
        }
    }

    #[test]
    fn an_injected_skew_is_recovered_despite_lopsided_delays() {
        for skew_us in [250_000, -1_700_000, 0, 3_600_000_000] {
            let mut delays = Delays(42);
            let mut estimator = ClockOffsetEstimator::new(Duration::from_secs(60));
            let mut worst_naive = 0;
            for i in 0..60 {
                let s = sample(1_800_000_000_000_000 + i * 1_000_000, skew_us, &mut delays);
                worst_naive = worst_naive.max((s.offset_us() - skew_us).abs());
                estimator.add(s);
            }
            let e = estimator.estimate().unwrap();
            let error = (e.offset_us - skew_us).abs();
            // The best sample's round trip bounds its error ...
            assert!(error <= e.uncertainty_us, "{e:?} for skew {skew_us}");
            // ... which is a LAN round trip, not a stall.
            assert!(e.uncertainty_us < 250, "{e:?}");
            // A single naive sample is off by milliseconds.
            assert!(worst_naive > 5_000, "{worst_naive}");
            assert_eq!(e.samples, 60);
        }
    }

    #[test]
    fn a_clock_step_is_followed_once_the_window_has_slid() {
        let mut delays = Delays(7);
        let mut estimator = ClockOffsetEstimator::new(Duration::from_secs(30));
        let start = 1_800_000_000_000_000;
        for i in 0..30 {
            estimator.add(sample(start + i * 1_000_000, 10_000, &mut delays));
        }
        assert!((estimator.estimate().unwrap().offset_us - 10_000).abs() < 250);
        // The database's clock is stepped back by 30 ms.
        for i in 30..90 {
            estimator.add(sample(start + i * 1_000_000, -20_000, &mut delays));
        }
        let e = estimator.estimate().unwrap();
        assert!((e.offset_us + 20_000).abs() < 250, "{e:?}");
        assert!(e.samples <= 31, "{e:?}");
    }

    #[test]
    fn no_samples_no_estimate_and_backward_steps_are_ignored() {
        let mut estimator = ClockOffsetEstimator::new(Duration::from_secs(60));
        assert_eq!(estimator.estimate(), None);
        estimator.add(ClockSample {
            sent_us: 100,
            db_us: 50,
            received_us: 90,
        });
        assert_eq!(estimator.estimate(), None);
        estimator.add(ClockSample {
            sent_us: 100,
            db_us: 1_150,
            received_us: 300,
        });
        let e = estimator.estimate().unwrap();
        assert_eq!(e.offset_us, 950);
        assert_eq!(e.uncertainty_us, 100);
        assert_eq!(e.mean_round_trip_us, 200);
    }
}
