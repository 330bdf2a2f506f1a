//! The telemetry monitor, a task beside the data path (what it computes is
//! kept in `telemetry`, below the state): samples the database's clock, takes
//! a point of the dashboard's time series every couple of seconds, runs the
//! profiler every `GATEWAY_PROFILING_INTERVAL_MS` and the regression
//! detector every `GATEWAY_REGRESSION_CHECK_MS`. Settings are read at every
//! turn, so a reload applies at the next one. It never fails: a database
//! that is down only pauses the clock samples.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sqlx::PgPool;
use tokio::time::{Instant, MissedTickBehavior};

use crate::change::now_us;
use crate::config::{ProfilerSettings, Settings};
use crate::db;
use crate::state::AppState;
use crate::telemetry::clock::{ClockOffsetEstimator, ClockSample};
use crate::telemetry::regression::{RegressionDetector, Severity, WindowStats, dominant_stage};
use crate::telemetry::repeats::{Occurrence, Repeats, SUMMARY_EVERY};
use crate::telemetry::timeline::{CounterSnapshot, SAMPLE_EVERY, SERIES_WINDOW, Sample};
use crate::telemetry::{MAX_WINDOW, Percentiles, Profile, Stage, Telemetry, profile_window};

/// How often the clock is sampled, and the window its best sample is kept.
const CLOCK_EVERY: Duration = Duration::from_secs(1);
const CLOCK_WINDOW: Duration = Duration::from_secs(60);
/// Queries per sample: the first on a connection may carry a statement
/// preparation; the minimum-round-trip filter keeps the clean one.
const CLOCK_QUERIES: usize = 2;
const CLOCK_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs until shutdown.
pub async fn run(state: Arc<AppState>) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    tokio::select! {
        () = shutdown.cancelled() => {}
        () = clock_loop(&state.pools.internal, &state.telemetry) => {}
        () = observe_loop(&state) => {}
    }
    Ok(())
}

async fn clock_loop(pool: &PgPool, telemetry: &Telemetry) {
    let mut estimator = ClockOffsetEstimator::new(CLOCK_WINDOW);
    let mut tick = tokio::time::interval(CLOCK_EVERY);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut failures = Repeats::new(SUMMARY_EVERY);
    loop {
        tick.tick().await;
        match tokio::time::timeout(CLOCK_TIMEOUT, sample_clock(pool, &mut estimator)).await {
            Ok(Ok(())) => {
                if let Some((failed, _)) = failures.recover(Instant::now()) {
                    tracing::info!(failed, "database clock sampling resumed");
                }
            }
            outcome => {
                let error = match outcome {
                    Ok(Err(e)) => db::describe(&e),
                    _ => format!("no answer within {CLOCK_TIMEOUT:?}"),
                };
                match failures.occur(Instant::now()) {
                    Occurrence::First => {
                        tracing::warn!(%error, "cannot sample the database clock; keeping the last offset")
                    }
                    Occurrence::Quiet => {}
                    Occurrence::Summary { more, for_s } => tracing::warn!(
                        %error,
                        failed = more,
                        failing_for_s = format!("{for_s:.0}"),
                        "database clock sampling still failing"
                    ),
                }
            }
        }
        if let Some(estimate) = estimator.estimate() {
            let feed = &telemetry.feed;
            feed.clock_offset_us.store(estimate.offset_us, Ordering::Relaxed);
            feed.clock_uncertainty_us
                .store(estimate.uncertainty_us, Ordering::Relaxed);
            feed.db_round_trip_us
                .store(estimate.mean_round_trip_us, Ordering::Relaxed);
        }
    }
}

/// Times `clock_timestamp()` round trips on one pooled connection (the
/// pool's wait for a connection is not part of any round trip).
async fn sample_clock(pool: &PgPool, estimator: &mut ClockOffsetEstimator) -> Result<(), sqlx::Error> {
    let mut conn = pool.acquire().await?;
    for _ in 0..CLOCK_QUERIES {
        let sent_us = now_us();
        let db_us = db::clock_now_us(&mut conn).await?;
        let received_us = now_us();
        estimator.add(ClockSample {
            sent_us,
            db_us,
            received_us,
        });
    }
    Ok(())
}

async fn observe_loop(state: &AppState) {
    let telemetry = &state.telemetry;
    let mut sample_tick = tokio::time::interval(SAMPLE_EVERY);
    sample_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let start = Instant::now();
    let mut next_profile = start + state.settings().profiler.interval;
    let mut next_check = start + state.settings().regression.check_interval;
    let mut bottlenecks: Vec<Stage> = Vec::new();
    loop {
        tokio::select! {
            _ = sample_tick.tick() => take_sample(state),
            () = tokio::time::sleep_until(next_profile) => {
                let settings = state.settings();
                bottlenecks = profile(telemetry, &settings.profiler, &bottlenecks);
                next_profile = Instant::now() + settings.profiler.interval;
            }
            () = tokio::time::sleep_until(next_check) => {
                let settings = state.settings();
                check_regressions(telemetry, &settings);
                next_check = Instant::now() + settings.regression.check_interval;
            }
        }
    }
}

/// One point of the dashboard's series, and a counter snapshot. Every
/// number of a point covers the minute before it, like `/latency`'s and
/// `/healthz`'s default window: the page's tiles show the newest point, so
/// a tile and its chart never disagree, and one sample is never a tile.
fn take_sample(state: &AppState) {
    let t = &state.telemetry;
    let connections = state.active_connections.load(Ordering::Relaxed) as u64;
    let snapshot = t.counter_snapshot(state.hub.stats.compression_bytes(), connections);
    let window = SERIES_WINDOW.as_secs();
    let send = t.commit_to_send.recent(window);
    let probe = t.probe.recent(window);
    let ack = t.commit_to_ack.recent(window);
    let alerts = t.regression_summary().total_alerts as u64;
    let mut timeline = t.timeline();
    // Rates over the minute (or as much of it as there is).
    let since = timeline
        .counters_at(snapshot.at_us - SERIES_WINDOW.as_micros() as i64)
        .or_else(|| timeline.oldest_counters());
    let rate = |f: fn(&CounterSnapshot) -> u64| match since {
        Some(prev) if snapshot.at_us > prev.at_us => {
            f(&snapshot).saturating_sub(f(&prev)) as f64 * 1e6 / (snapshot.at_us - prev.at_us) as f64
        }
        _ => 0.0,
    };
    let sample = Sample {
        t: snapshot.at_us / 1000,
        send_p50: send.p50_ms,
        send_p95: send.p95_ms,
        send_p99: send.p99_ms,
        send_count: send.count,
        probe_p50: probe.p50_ms,
        probe_p99: probe.p99_ms,
        probe_count: probe.count,
        ack_p99: ack.p99_ms,
        ack_count: ack.count,
        connections,
        rooms: t.excluding_probe(state.hub.room_count()) as u64,
        subscriptions: t.excluding_probe(state.hub.subscription_count()) as u64,
        deliveries_per_s: rate(|s| s.deliveries),
        messages_per_s: rate(|s| s.messages_sent),
        bytes_out_per_s: rate(|s| s.bytes_sent),
        change_bytes_raw_per_s: rate(|s| s.change_bytes_raw),
        change_bytes_sent_per_s: rate(|s| s.change_bytes_sent),
        alerts,
    };
    timeline.push_counters(snapshot);
    timeline.push_sample(sample);
}

/// Profiles the stages; logs stages that became, or stopped being,
/// bottlenecks. Returns the current bottlenecks.
fn profile(telemetry: &Telemetry, settings: &ProfilerSettings, before: &[Stage]) -> Vec<Stage> {
    let window = profile_window(settings);
    let stats = telemetry.stages.recent(window);
    let profile = Profile::of(now_us(), window, settings.bottleneck_threshold, &stats);
    for stage in &profile.stages {
        if stage.bottleneck && !before.contains(&stage.stage) {
            tracing::warn!(
                stage = stage.stage.name(),
                p99_ms = stage.p99_ms,
                p95_ms = stage.p95_ms,
                threshold_ms = profile.threshold_ms,
                window_s = profile.window_s,
                "bottleneck: stage P99 over GATEWAY_BOTTLENECK_THRESHOLD_MS"
            );
        } else if !stage.bottleneck && before.contains(&stage.stage) {
            tracing::info!(stage = stage.stage.name(), p99_ms = stage.p99_ms, "bottleneck cleared");
        }
    }
    let now = profile.bottlenecks.clone();
    telemetry.set_profile(profile);
    now
}

/// Compares the last check interval with the baseline window before it.
fn check_regressions(telemetry: &Telemetry, settings: &Settings) {
    let r = &settings.regression;
    let now = now_us();
    // Both windows must fit in the hour the histograms keep.
    let check = r.check_interval.min(MAX_WINDOW / 2);
    let baseline = r.baseline_window.min(MAX_WINDOW - check);
    let micros = |d: Duration| d.as_micros() as i64;
    let (current_counts, baseline_counts, levels) = {
        let timeline = telemetry.timeline();
        let (from, split) = (now - micros(check + baseline), now - micros(check));
        let current = timeline.growth(split, now);
        let base = timeline.growth(from, split);
        let mean = |a, b, f| timeline.mean(a, b, f);
        let levels = [
            (
                mean(from, split, |s| s.connections),
                mean(split, now, |s| s.connections),
            ),
            (mean(from, split, |s| s.rss_bytes), mean(split, now, |s| s.rss_bytes)),
        ];
        match (current, base) {
            (Some(c), Some(b)) => (c, b, levels),
            _ => {
                tracing::debug!("regression check skipped: the baseline window is not filled yet");
                return;
            }
        }
    };
    let current_latency = telemetry.commit_to_send.recent(check.as_secs());
    let baseline_latency = telemetry.commit_to_send.between(check + baseline, check);
    let window = |latency: Percentiles,
                  (counts, seconds): (CounterSnapshot, f64),
                  connections: Option<f64>,
                  rss: Option<f64>| WindowStats {
        p99_ms: latency.p99_ms,
        latency_samples: latency.count,
        deliveries: counts.deliveries,
        errors: counts.errors,
        attempts: counts.attempts,
        seconds,
        changes: counts.changes,
        connections: connections.unwrap_or(0.0),
        rss_bytes: rss.filter(|bytes| *bytes > 0.0),
        cpu_us: counts.cpu_us,
        connection_attempts: counts.connection_attempts,
        connection_failures: counts.connection_failures,
    };
    let [(base_connections, connections), (base_rss, rss)] = levels;
    let current = window(current_latency, current_counts, connections, rss);
    let base = window(baseline_latency, baseline_counts, base_connections, base_rss);
    let stages: Vec<_> = Stage::ALL
        .iter()
        .map(|&s| {
            let h = telemetry.stages.histogram(s);
            (s, h.between(check + baseline, check), h.recent(check.as_secs()))
        })
        .collect();
    let detector = RegressionDetector {
        warn_pct: r.warn_pct,
        crit_pct: r.crit_pct,
    };
    let alerts = detector.check(&base, &current, dominant_stage(&stages), now);
    let mut log = telemetry.alerts();
    for alert in alerts {
        match alert.severity {
            Severity::Critical => tracing::error!(
                metric = alert.metric.name(),
                baseline = format!("{:.3}", alert.baseline),
                current = format!("{:.3}", alert.current),
                change_pct = format!("{:.1}", alert.change_pct),
                recommendation = %alert.recommendation,
                "critical regression: {alert}"
            ),
            Severity::Warning => tracing::warn!(
                metric = alert.metric.name(),
                baseline = format!("{:.3}", alert.baseline),
                current = format!("{:.3}", alert.current),
                change_pct = format!("{:.1}", alert.change_pct),
                recommendation = %alert.recommendation,
                "regression: {alert}"
            ),
        }
        log.push(alert);
    }
    log.prune(now - micros(settings.profiler.metric_retention));
}
