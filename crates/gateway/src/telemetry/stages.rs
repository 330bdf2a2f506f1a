//! Where the time between commit and socket goes: one histogram per stage of
//! the data path, and the profiler's verdict on which stage is a bottleneck
//! (P99 over `GATEWAY_BOTTLENECK_THRESHOLD_MS`).

use std::time::{Duration, Instant};

use serde::Serialize;

use super::histogram::{Percentiles, WindowedHistogram};

/// The stages of the data path, in the order a change goes through them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Database commit to the feed holding the notification (corrected clock).
    NotifyLag,
    /// Dispatch to the send task picking the frame up from its queue.
    Queueing,
    /// Time a change waits in a batch before the batch is flushed.
    BatchWait,
    /// Serializing (and compressing) a room's batch, once per room.
    Encoding,
    /// Writing and flushing frames to one socket.
    SocketWrite,
}

impl Stage {
    pub const ALL: [Stage; 5] = [
        Stage::NotifyLag,
        Stage::Queueing,
        Stage::BatchWait,
        Stage::Encoding,
        Stage::SocketWrite,
    ];

    /// The `stage` label in `/metrics` and the key in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Stage::NotifyLag => "notify_lag",
            Stage::Queueing => "queueing",
            Stage::BatchWait => "batch_wait",
            Stage::Encoding => "encoding",
            Stage::SocketWrite => "socket_write",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// One histogram per stage (ten minutes of windows each: stage timings are
/// for finding today's bottleneck, the end-to-end histograms keep the hour).
pub struct Stages {
    by_stage: [WindowedHistogram; 5],
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            by_stage: std::array::from_fn(|_| WindowedHistogram::ten_minutes()),
        }
    }
}

impl Stages {
    pub fn record(&self, stage: Stage, value_us: u64) {
        self.by_stage[stage.index()].record(value_us);
    }

    /// Records many timings of one stage under one lock.
    pub fn record_all(&self, stage: Stage, values_us: impl IntoIterator<Item = u64>) {
        self.by_stage[stage.index()].record_all(values_us);
    }

    /// See [`super::histogram::WindowedHistogram::record_held`].
    pub fn record_held(&self, stage: Stage, held_us: &mut Vec<u64>, wait: bool) -> bool {
        self.by_stage[stage.index()].record_held(held_us, wait)
    }

    /// Records the time since `started`: `let t = Instant::now(); encode();
    /// stages.record_since(Stage::Encoding, t)`.
    pub fn record_since(&self, stage: Stage, started: Instant) {
        self.record(stage, started.elapsed().as_micros() as u64);
    }

    pub fn histogram(&self, stage: Stage) -> &WindowedHistogram {
        &self.by_stage[stage.index()]
    }

    /// Every stage's percentiles over the last `window`.
    pub fn recent(&self, window: Duration) -> Vec<(Stage, Percentiles)> {
        Stage::ALL
            .iter()
            .map(|&s| (s, self.histogram(s).recent(window.as_secs())))
            .collect()
    }
}

/// One stage in a profile.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageProfile {
    pub stage: Stage,
    pub count: u64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub bottleneck: bool,
}

/// What the profiler found at one tick.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Profile {
    /// Gateway clock, microseconds since the Unix epoch.
    pub at_us: i64,
    pub window_s: u64,
    pub threshold_ms: f64,
    pub stages: Vec<StageProfile>,
    /// Stages whose P99 is over the threshold, slowest first.
    pub bottlenecks: Vec<Stage>,
}

impl Profile {
    pub fn of(at_us: i64, window: Duration, threshold: Duration, stats: &[(Stage, Percentiles)]) -> Profile {
        let threshold_ms = threshold.as_secs_f64() * 1000.0;
        let stages: Vec<StageProfile> = stats
            .iter()
            .map(|(stage, p)| StageProfile {
                stage: *stage,
                count: p.count,
                p50_ms: p.p50_ms,
                p95_ms: p.p95_ms,
                p99_ms: p.p99_ms,
                bottleneck: p.p99_ms.is_some_and(|p99| p99 > threshold_ms),
            })
            .collect();
        let mut slow: Vec<&StageProfile> = stages.iter().filter(|s| s.bottleneck).collect();
        slow.sort_by(|a, b| b.p99_ms.partial_cmp(&a.p99_ms).expect("no NaN"));
        let bottlenecks = slow.iter().map(|s| s.stage).collect();
        Profile {
            at_us,
            window_s: window.as_secs(),
            threshold_ms,
            stages,
            bottlenecks,
        }
    }
}

/// The profiler looks at least this far back: a P99 needs samples.
const PROFILE_MIN_WINDOW: Duration = Duration::from_secs(60);

/// The profiler's window: the interval, but long enough for a P99, and no
/// longer than the retention or what stage histograms keep.
pub fn profile_window(settings: &crate::config::ProfilerSettings) -> Duration {
    settings
        .interval
        .max(PROFILE_MIN_WINDOW)
        .min(settings.metric_retention.max(PROFILE_MIN_WINDOW))
        .min(Duration::from_secs(600))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p99(ms: f64) -> Percentiles {
        Percentiles {
            count: 100,
            p50_ms: Some(ms / 2.0),
            p95_ms: Some(ms * 0.9),
            p99_ms: Some(ms),
            max_ms: Some(ms),
            mean_ms: Some(ms / 2.0),
        }
    }

    #[test]
    fn stages_over_the_threshold_are_bottlenecks_slowest_first() {
        let stats = [
            (Stage::NotifyLag, p99(0.4)),
            (Stage::Queueing, p99(150.0)),
            (Stage::BatchWait, p99(480.0)),
            (Stage::Encoding, Percentiles::EMPTY),
            (Stage::SocketWrite, p99(100.0)),
        ];
        let profile = Profile::of(0, Duration::from_secs(60), Duration::from_millis(100), &stats);
        assert_eq!(profile.bottlenecks, [Stage::BatchWait, Stage::Queueing]);
        assert!(!profile.stages[4].bottleneck, "exactly the threshold is not over it");
        assert!(!profile.stages[3].bottleneck);
        assert_eq!(profile.threshold_ms, 100.0);
    }

    #[test]
    fn each_stage_has_its_own_histogram() {
        let stages = Stages::default();
        stages.record(Stage::Encoding, 120);
        stages.record_all(Stage::SocketWrite, [10, 20, 30]);
        stages.record_since(Stage::Queueing, Instant::now());
        let recent = stages.recent(Duration::from_secs(60));
        let count = |s: Stage| recent.iter().find(|(x, _)| *x == s).unwrap().1.count;
        assert_eq!(count(Stage::Encoding), 1);
        assert_eq!(count(Stage::SocketWrite), 3);
        assert_eq!(count(Stage::Queueing), 1);
        assert_eq!(count(Stage::NotifyLag), 0);
        assert_eq!(
            Stage::ALL.map(Stage::name),
            ["notify_lag", "queueing", "batch_wait", "encoding", "socket_write"]
        );
    }
}
