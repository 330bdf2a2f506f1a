//! Repeated warnings, collapsed: the first occurrence is logged, then one
//! summary per interval with how many more there were, and one line when
//! it stops. A 75 s database outage is three lines, not twenty.

use std::time::Duration;

use tokio::time::Instant;

/// How often a condition that keeps recurring is summarized.
pub const SUMMARY_EVERY: Duration = Duration::from_secs(30);

/// One kind of recurring event (a failing reconnect, a failing probe).
#[derive(Debug)]
pub struct Repeats {
    every: Duration,
    /// When the current run of occurrences began; None while it is quiet.
    since: Option<Instant>,
    last_logged: Option<Instant>,
    /// The latest occurrence: a run ends by itself after a quiet spell.
    last_at: Option<Instant>,
    /// Occurrences since the last line logged.
    unlogged: u64,
    /// Occurrences in the current run.
    total: u64,
}

/// What to log for an occurrence.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Occurrence {
    /// The first of a run: log it in full.
    First,
    /// Within the interval: count it, log nothing.
    Quiet,
    /// The interval passed: log a summary of the `more` since the last line.
    Summary { more: u64, for_s: f64 },
}

impl Repeats {
    pub const fn new(every: Duration) -> Repeats {
        Repeats {
            every,
            since: None,
            last_logged: None,
            last_at: None,
            unlogged: 0,
            total: 0,
        }
    }

    pub fn occur(&mut self, now: Instant) -> Occurrence {
        // Quiet for four intervals: whatever it was has passed, for callers
        // that never see the success that would end a run.
        if self.last_at.is_some_and(|at| now.duration_since(at) > self.every * 4) {
            self.recover(now);
        }
        self.last_at = Some(now);
        self.total += 1;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.last_logged = Some(now);
            return Occurrence::First;
        };
        self.unlogged += 1;
        match self.last_logged {
            Some(at) if now.duration_since(at) < self.every => Occurrence::Quiet,
            _ => {
                let more = std::mem::take(&mut self.unlogged);
                self.last_logged = Some(now);
                Occurrence::Summary {
                    more,
                    for_s: now.duration_since(since).as_secs_f64(),
                }
            }
        }
    }

    /// The condition cleared: how many occurrences the run had and how long
    /// it lasted, if there was one.
    pub fn recover(&mut self, now: Instant) -> Option<(u64, Duration)> {
        let since = self.since.take()?;
        let total = std::mem::take(&mut self.total);
        self.unlogged = 0;
        self.last_logged = None;
        self.last_at = None;
        Some((total, now.duration_since(since)))
    }

    /// Whether a run is under way.
    pub fn active(&self) -> bool {
        self.since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_logs_first_then_a_summary_per_interval_then_recovery() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut r = Repeats::new(Duration::from_secs(30));
        assert!(!r.active());
        // A 75 s outage with a retry every 5 s: 16 occurrences.
        let logged: Vec<(u64, Occurrence)> = (0..=15)
            .map(|i| (i * 5, r.occur(at(i * 5))))
            .filter(|(_, o)| *o != Occurrence::Quiet)
            .collect();
        assert_eq!(
            logged,
            [
                (0, Occurrence::First),
                (30, Occurrence::Summary { more: 6, for_s: 30.0 }),
                (60, Occurrence::Summary { more: 6, for_s: 60.0 }),
            ]
        );
        assert!(r.active());
        assert_eq!(r.recover(at(76)), Some((16, Duration::from_secs(76))));
        assert_eq!(r.recover(at(77)), None);
        // The next run starts over.
        assert_eq!(r.occur(at(100)), Occurrence::First);
        assert_eq!(r.occur(at(101)), Occurrence::Quiet);
        // So does one after a quiet spell, with no recovery seen.
        assert_eq!(r.occur(at(400)), Occurrence::First);
    }
}

/// Recurring events of several kinds, each collapsed on its own: what the
/// connections share for their warnings (a database outage would otherwise
/// log once per client).
#[derive(Debug, Default)]
pub struct SharedRepeats {
    kinds: std::sync::Mutex<std::collections::HashMap<&'static str, Repeats>>,
}

impl SharedRepeats {
    pub fn occur(&self, kind: &'static str) -> Occurrence {
        let mut kinds = self.kinds.lock().expect("repeats lock");
        kinds
            .entry(kind)
            .or_insert_with(|| Repeats::new(SUMMARY_EVERY))
            .occur(Instant::now())
    }
}
