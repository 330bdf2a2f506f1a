//! Per-connection limits on what a client sends.

use std::time::Duration;

use tokio::time::Instant;

/// What the rate limit says about one inbound message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Over the limit: refuse this message (`rate_limited`).
    Refuse,
    /// Far over it for a second: close the connection (1008).
    Close,
}

/// A token bucket of `rate` messages per second (bursts up to `rate`). A
/// client refused more than `rate` times within one second is closed.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    tokens: f64,
    last: Instant,
    refused_since: Instant,
    refused: u32,
}

impl RateLimit {
    pub fn new(rate: u32, now: Instant) -> RateLimit {
        RateLimit {
            rate: f64::from(rate.max(1)),
            tokens: f64::from(rate.max(1)),
            last: now,
            refused_since: now,
            refused: 0,
        }
    }

    pub fn check(&mut self, now: Instant) -> Verdict {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Verdict::Allow;
        }
        if now.duration_since(self.refused_since) > Duration::from_secs(1) {
            self.refused_since = now;
            self.refused = 0;
        }
        self.refused += 1;
        if f64::from(self.refused) > self.rate {
            Verdict::Close
        } else {
            Verdict::Refuse
        }
    }
}

/// Counts refused messages in a sliding window: a client that sends too many
/// bad messages is broken or hostile, and answering it costs everyone.
#[derive(Debug)]
pub struct ErrorBudget {
    budget: u32,
    window: Duration,
    window_start: Option<Instant>,
    count: u32,
}

impl ErrorBudget {
    pub fn new(budget: u32, window: Duration) -> ErrorBudget {
        ErrorBudget {
            budget,
            window,
            window_start: None,
            count: 0,
        }
    }

    /// Records one refusal; true when the budget is spent.
    pub fn spend(&mut self, now: Instant) -> bool {
        match self.window_start {
            Some(start) if now.duration_since(start) < self.window => self.count += 1,
            _ => {
                self.window_start = Some(now);
                self.count = 1;
            }
        }
        self.count > self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_bucket_allows_the_rate_refuses_the_excess_and_closes_a_flood() {
        let mut limit = RateLimit::new(10, Instant::now());
        let verdicts: Vec<_> = (0..15).map(|_| limit.check(Instant::now())).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Allow).count(), 10);
        assert_eq!(verdicts[10], Verdict::Refuse);
        tokio::time::advance(Duration::from_millis(500)).await;
        let verdicts: Vec<_> = (0..5).map(|_| limit.check(Instant::now())).collect();
        assert!(
            verdicts.iter().all(|v| *v == Verdict::Allow),
            "refilled at 10/s: {verdicts:?}"
        );
        let flood: Vec<_> = (0..20).map(|_| limit.check(Instant::now())).collect();
        assert_eq!(flood.last(), Some(&Verdict::Close), "{flood:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_error_budget_refills_after_its_window() {
        let mut budget = ErrorBudget::new(3, Duration::from_secs(10));
        assert!(!(0..3).any(|_| budget.spend(Instant::now())));
        assert!(budget.spend(Instant::now()));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!budget.spend(Instant::now()));
    }
}
