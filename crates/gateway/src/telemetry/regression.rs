//! The regression detector: every `GATEWAY_REGRESSION_CHECK_MS` the monitor
//! compares the last check interval with the baseline window before it
//! (`GATEWAY_BASELINE_WINDOW_MS`) on P99 commit-to-send latency, error rate
//! and throughput, and raises a warning or critical alert past
//! `GATEWAY_REGRESSION_WARN_PCT` / `_CRIT_PCT`, with what to do about it.
//!
//! Pure: the windows come in as numbers, alerts go out.

use std::collections::VecDeque;
use std::fmt;

use serde::Serialize;

use super::histogram::Percentiles;
use super::stages::Stage;

/// P99 over fewer samples than this is the maximum of a handful: not compared.
pub const MIN_LATENCY_SAMPLES: u64 = 100;
/// A P99 that rose by less than this is noise, whatever the percentage.
pub const LATENCY_NOISE_MS: f64 = 0.5;
/// Error rates are compared against at least this (0.1 %), so one error
/// after none is not an infinite regression.
pub const ERROR_RATE_FLOOR: f64 = 0.001;
/// Error rates need this many attempts in the current window.
pub const MIN_ATTEMPTS: u64 = 100;
/// Throughput is compared once the baseline carried this many deliveries/s.
pub const MIN_THROUGHPUT: f64 = 1.0;

/// What is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// P99 commit-to-send, milliseconds: up is worse.
    P99Latency,
    /// Failed deliveries and probes per attempt: up is worse.
    ErrorRate,
    /// Deliveries per second: down is worse.
    Throughput,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::P99Latency => "p99_latency",
            Metric::ErrorRate => "error_rate",
            Metric::Throughput => "throughput",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

/// One window's numbers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowStats {
    /// P99 commit-to-send over the window, and the samples it rests on.
    pub p99_ms: Option<f64>,
    pub latency_samples: u64,
    /// Changes delivered to connections.
    pub deliveries: u64,
    /// What went wrong (slow-consumer disconnects, failed or lost probes) and
    /// what it is a rate of (deliveries and probes).
    pub errors: u64,
    pub attempts: u64,
    pub seconds: f64,
}

impl WindowStats {
    pub fn error_rate(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            self.errors as f64 / self.attempts as f64
        }
    }

    pub fn throughput(&self) -> f64 {
        if self.seconds <= 0.0 {
            0.0
        } else {
            self.deliveries as f64 / self.seconds
        }
    }
}

/// A regression, as logged and shown.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Alert {
    /// Gateway clock, microseconds since the Unix epoch.
    pub at_us: i64,
    pub metric: Metric,
    pub severity: Severity,
    pub baseline: f64,
    pub current: f64,
    /// How much worse, in percent (positive).
    pub change_pct: f64,
    pub recommendation: String,
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (unit, scale) = match self.metric {
            Metric::P99Latency => (" ms", 1.0),
            Metric::ErrorRate => (" %", 100.0),
            Metric::Throughput => ("/s", 1.0),
        };
        write!(
            f,
            "{} {:.3}{unit} against a baseline of {:.3}{unit} ({:.0} % worse)",
            self.metric.name(),
            self.current * scale,
            self.baseline * scale,
            self.change_pct
        )
    }
}

/// The thresholds, in percent of degradation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RegressionDetector {
    pub warn_pct: f64,
    pub crit_pct: f64,
}

impl RegressionDetector {
    /// Compares `current` with `baseline`; `dominant` is the stage whose
    /// timing grew most (see [`dominant_stage`]), for the recommendation.
    pub fn check(
        &self,
        baseline: &WindowStats,
        current: &WindowStats,
        dominant: Option<Stage>,
        at_us: i64,
    ) -> Vec<Alert> {
        let mut alerts = Vec::new();
        let mut raise = |metric: Metric, base: f64, cur: f64, change_pct: f64| {
            let severity = if change_pct >= self.crit_pct {
                Severity::Critical
            } else if change_pct >= self.warn_pct {
                Severity::Warning
            } else {
                return;
            };
            alerts.push(Alert {
                at_us,
                metric,
                severity,
                baseline: base,
                current: cur,
                change_pct,
                recommendation: recommend(metric, dominant),
            });
        };

        if let (Some(base), Some(cur)) = (baseline.p99_ms, current.p99_ms)
            && baseline.latency_samples >= MIN_LATENCY_SAMPLES
            && current.latency_samples >= MIN_LATENCY_SAMPLES
            && cur - base >= LATENCY_NOISE_MS
        {
            raise(Metric::P99Latency, base, cur, percent(cur - base, base.max(0.001)));
        }

        if current.attempts >= MIN_ATTEMPTS {
            let base = baseline.error_rate();
            let cur = current.error_rate();
            let reference = base.max(ERROR_RATE_FLOOR);
            if cur > reference {
                raise(Metric::ErrorRate, base, cur, percent(cur - reference, reference));
            }
        }

        let base = baseline.throughput();
        let cur = current.throughput();
        if base >= MIN_THROUGHPUT && cur < base {
            raise(Metric::Throughput, base, cur, percent(base - cur, base));
        }
        alerts
    }
}

fn percent(delta: f64, of: f64) -> f64 {
    delta / of * 100.0
}

/// The stage to blame: the one whose P99 rose most between the windows
/// (by at least the noise floor), else the slowest one now.
pub fn dominant_stage(stages: &[(Stage, Percentiles, Percentiles)]) -> Option<Stage> {
    let rise =
        |(_, base, cur): &&(Stage, Percentiles, Percentiles)| cur.p99_ms.unwrap_or(0.0) - base.p99_ms.unwrap_or(0.0);
    let grew = stages
        .iter()
        .filter(|s| s.2.p99_ms.is_some() && rise(s) >= LATENCY_NOISE_MS)
        .max_by(|a, b| rise(a).total_cmp(&rise(b)));
    if let Some((stage, _, _)) = grew {
        return Some(*stage);
    }
    stages
        .iter()
        .filter_map(|(s, _, cur)| cur.p99_ms.map(|p| (*s, p)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(s, _)| s)
}

/// What an operator can do about a regression of `metric`.
pub fn recommend(metric: Metric, dominant: Option<Stage>) -> String {
    let stage_advice = match dominant {
        Some(Stage::BatchWait) => {
            "the batching stage dominates: set GATEWAY_FEATURES=-batching (or lower GATEWAY_BATCH_SIZE) and send SIGHUP"
        }
        Some(Stage::Encoding) => {
            "encoding dominates: set GATEWAY_FEATURES=-compression (or lower GATEWAY_COMPRESSION_LEVEL) and send SIGHUP"
        }
        Some(Stage::NotifyLag) => {
            "database-to-gateway notification lag dominates: check the database's load, long transactions and the network to it; no gateway switch helps"
        }
        Some(Stage::Queueing) => {
            "frames wait in send queues: the gateway is short of CPU or clients read slowly; check CPU, slow-consumer disconnects, or add an instance"
        }
        Some(Stage::SocketWrite) => {
            "socket writes dominate: clients or the network to them are slow; with compression off, GATEWAY_FEATURES=compression shrinks frames"
        }
        None => {
            "no stage stands out: compare with the last deploy or config change; GATEWAY_FEATURES=none rolls every optimization back"
        }
    };
    match metric {
        Metric::P99Latency => stage_advice.to_owned(),
        Metric::ErrorRate => "failed deliveries rose: check slow-consumer disconnects (GATEWAY_SEND_QUEUE_BYTES), the database (failed probes) and client health; GATEWAY_FEATURES=none rolls optimizations back".to_owned(),
        Metric::Throughput => format!(
            "deliveries per second fell: if the offered load did not fall, check the feed (reconnects, lag) and CPU; {stage_advice}"
        ),
    }
}

/// `/healthz` `regressionDetection`.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RegressionSummary {
    pub total_alerts: usize,
    pub critical_alerts: usize,
    pub warning_alerts: usize,
    pub affected_metrics: Vec<&'static str>,
    pub recommendations: Vec<String>,
}

/// Alerts raised within the metric retention window, newest last.
#[derive(Debug, Default)]
pub struct AlertLog {
    alerts: VecDeque<Alert>,
}

/// Alerts kept at most, whatever the retention.
const MAX_ALERTS: usize = 500;

impl AlertLog {
    pub fn push(&mut self, alert: Alert) {
        if self.alerts.len() == MAX_ALERTS {
            self.alerts.pop_front();
        }
        self.alerts.push_back(alert);
    }

    /// Forgets alerts raised before `horizon_us`.
    pub fn prune(&mut self, horizon_us: i64) {
        while self.alerts.front().is_some_and(|a| a.at_us < horizon_us) {
            self.alerts.pop_front();
        }
    }

    /// The newest `n`, newest first.
    pub fn latest(&self, n: usize) -> Vec<Alert> {
        self.alerts.iter().rev().take(n).cloned().collect()
    }

    pub fn summary(&self) -> RegressionSummary {
        let mut summary = RegressionSummary {
            total_alerts: self.alerts.len(),
            ..RegressionSummary::default()
        };
        // Newest first, so the recommendations lead with what matters now.
        for alert in self.alerts.iter().rev() {
            match alert.severity {
                Severity::Critical => summary.critical_alerts += 1,
                Severity::Warning => summary.warning_alerts += 1,
            }
            if !summary.affected_metrics.contains(&alert.metric.name()) {
                summary.affected_metrics.push(alert.metric.name());
            }
            if !summary.recommendations.contains(&alert.recommendation) {
                summary.recommendations.push(alert.recommendation.clone());
            }
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DETECTOR: RegressionDetector = RegressionDetector {
        warn_pct: 15.0,
        crit_pct: 30.0,
    };

    /// A window of `seconds` at `per_s` deliveries/s, P99 `p99_ms`, and
    /// `errors` failures.
    fn window(p99_ms: f64, per_s: f64, errors: u64, seconds: f64) -> WindowStats {
        let deliveries = (per_s * seconds) as u64;
        WindowStats {
            p99_ms: Some(p99_ms),
            latency_samples: deliveries,
            deliveries,
            errors,
            attempts: deliveries,
            seconds,
        }
    }

    fn severities(alerts: &[Alert], metric: Metric) -> Vec<Severity> {
        alerts
            .iter()
            .filter(|a| a.metric == metric)
            .map(|a| a.severity)
            .collect()
    }

    #[test]
    fn p99_latency_crossing_15_and_30_percent() {
        let baseline = window(10.0, 100.0, 0, 300.0);
        for (p99, want) in [
            (11.4, vec![]),
            (11.6, vec![Severity::Warning]),
            (12.9, vec![Severity::Warning]),
            (13.1, vec![Severity::Critical]),
            (25.0, vec![Severity::Critical]),
            (8.0, vec![]),
        ] {
            let alerts = DETECTOR.check(&baseline, &window(p99, 100.0, 0, 60.0), None, 0);
            assert_eq!(severities(&alerts, Metric::P99Latency), want, "p99 {p99}");
            assert!(alerts.iter().all(|a| a.metric == Metric::P99Latency));
        }
        let alert = &DETECTOR.check(&baseline, &window(13.1, 100.0, 0, 60.0), None, 7)[0];
        assert_eq!(alert.baseline, 10.0);
        assert_eq!(alert.current, 13.1);
        assert!((alert.change_pct - 31.0).abs() < 1e-9);
        assert_eq!(alert.at_us, 7);
        assert!(alert.to_string().contains("p99_latency 13.100 ms"), "{alert}");
    }

    #[test]
    fn throughput_falling_15_and_30_percent() {
        let baseline = window(10.0, 100.0, 0, 300.0);
        for (per_s, want) in [
            (90.0, vec![]),
            (84.0, vec![Severity::Warning]),
            (69.0, vec![Severity::Critical]),
            (150.0, vec![]),
        ] {
            let alerts = DETECTOR.check(&baseline, &window(10.0, per_s, 0, 60.0), None, 0);
            assert_eq!(severities(&alerts, Metric::Throughput), want, "{per_s}/s");
        }
    }

    #[test]
    fn error_rate_rising_15_and_30_percent() {
        // Baseline: 1 % of 30 000 attempts fail.
        let baseline = window(10.0, 100.0, 300, 300.0);
        for (errors, want) in [
            (66, vec![]),                   // 1.1 %
            (70, vec![Severity::Warning]),  // 1.17 %
            (79, vec![Severity::Critical]), // 1.32 %
        ] {
            let alerts = DETECTOR.check(&baseline, &window(10.0, 100.0, errors, 60.0), None, 0);
            assert_eq!(severities(&alerts, Metric::ErrorRate), want, "{errors} errors");
        }
        // From none: compared with 0.1 %, so a single error is not a regression.
        let clean = window(10.0, 100.0, 0, 300.0);
        let one = DETECTOR.check(&clean, &window(10.0, 100.0, 1, 60.0), None, 0);
        assert!(severities(&one, Metric::ErrorRate).is_empty());
        let many = DETECTOR.check(&clean, &window(10.0, 100.0, 60, 60.0), None, 0);
        assert_eq!(severities(&many, Metric::ErrorRate), [Severity::Critical]);
    }

    #[test]
    fn thin_or_tiny_differences_are_not_regressions() {
        // 0.3 ms to 0.5 ms is +67 %, but under the noise floor.
        let alerts = DETECTOR.check(&window(0.3, 100.0, 0, 300.0), &window(0.5, 100.0, 0, 60.0), None, 0);
        assert!(alerts.is_empty(), "{alerts:?}");
        // Too few samples for a P99; too little traffic for throughput.
        let thin = window(50.0, 0.5, 0, 60.0);
        let alerts = DETECTOR.check(&window(10.0, 0.9, 0, 300.0), &thin, None, 0);
        assert!(alerts.is_empty(), "{alerts:?}");
    }

    #[test]
    fn recommendations_name_the_switch_for_the_dominant_stage() {
        let baseline = window(10.0, 100.0, 0, 300.0);
        let alerts = DETECTOR.check(&baseline, &window(40.0, 100.0, 0, 60.0), Some(Stage::BatchWait), 0);
        assert!(alerts[0].recommendation.contains("GATEWAY_FEATURES=-batching"));
        assert!(recommend(Metric::P99Latency, Some(Stage::Encoding)).contains("-compression"));
        assert!(recommend(Metric::P99Latency, None).contains("GATEWAY_FEATURES=none"));
    }

    /// Advice names only variables the gateway reads (none that was removed).
    #[test]
    fn recommendations_name_only_known_variables() {
        let stages = Stage::ALL.map(Some).into_iter().chain([None]);
        let mut named = 0;
        for dominant in stages {
            for metric in [Metric::P99Latency, Metric::ErrorRate, Metric::Throughput] {
                let advice = recommend(metric, dominant);
                for (at, _) in advice.match_indices("GATEWAY_") {
                    let name: String = advice[at..]
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                        .collect();
                    assert!(
                        crate::config::KNOWN_VARIABLES.contains(&name.as_str()),
                        "{metric:?}/{dominant:?} advises {name}: {advice}"
                    );
                    named += 1;
                }
            }
        }
        assert!(named > 10, "{named}");
    }

    #[test]
    fn the_dominant_stage_is_the_one_that_grew() {
        let p = |ms: f64| Percentiles {
            count: 1000,
            p99_ms: Some(ms),
            ..Percentiles::EMPTY
        };
        let stages = [
            (Stage::NotifyLag, p(2.0), p(2.1)),
            (Stage::BatchWait, p(5.0), p(45.0)),
            (Stage::SocketWrite, p(60.0), p(61.0)),
        ];
        assert_eq!(dominant_stage(&stages), Some(Stage::BatchWait));
        // Nothing grew: the slowest one now.
        let flat = [(Stage::NotifyLag, p(2.0), p(2.0)), (Stage::SocketWrite, p(6.0), p(6.0))];
        assert_eq!(dominant_stage(&flat), Some(Stage::SocketWrite));
        assert_eq!(
            dominant_stage(&[(Stage::Encoding, Percentiles::EMPTY, Percentiles::EMPTY)]),
            None
        );
    }

    #[test]
    fn the_log_summarizes_for_healthz() {
        let mut log = AlertLog::default();
        let baseline = window(10.0, 100.0, 0, 300.0);
        for (at, p99) in [(1, 12.0), (2, 20.0), (3, 11.8)] {
            for alert in DETECTOR.check(&baseline, &window(p99, 60.0, 0, 60.0), None, at) {
                log.push(alert);
            }
        }
        let s = log.summary();
        assert_eq!(s.total_alerts, 6);
        assert_eq!(s.critical_alerts, 4);
        assert_eq!(s.warning_alerts, 2);
        // Newest first: the last check raised latency, then throughput.
        assert_eq!(s.affected_metrics, ["throughput", "p99_latency"]);
        assert_eq!(s.recommendations.len(), 2);
        log.prune(3);
        assert_eq!(log.summary().total_alerts, 2);
        assert_eq!(log.latest(1)[0].at_us, 3);
        let json = serde_json::to_value(log.summary()).unwrap();
        for key in [
            "totalAlerts",
            "criticalAlerts",
            "warningAlerts",
            "affectedMetrics",
            "recommendations",
        ] {
            assert!(json.get(key).is_some(), "{json}");
        }
    }
}
