//! Reconnect backoff, for the client and for the gateway's own reconnecting
//! loops (the capture source, the probe): the delay before the next attempt
//! doubles from `first` up to `cap`, and starts over once a session has
//! stayed up for `healthy_after`. With full jitter each delay is drawn
//! uniformly from zero to that bound, so a fleet of clients that lost the
//! same gateway does not come back in lockstep.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    cap: Duration,
    /// A session that lasted this long was healthy: the next failure starts
    /// over from `first`.
    healthy_after: Duration,
    /// The bound of the next delay.
    next: Duration,
    /// Full jitter's random state (xorshift64*); `None`: no jitter.
    jitter: Option<u64>,
}

impl Backoff {
    pub fn new(first: Duration, cap: Duration, healthy_after: Duration) -> Backoff {
        Backoff {
            first,
            cap: cap.max(first),
            healthy_after,
            next: first,
            jitter: None,
        }
    }

    /// Draws each delay uniformly from zero to its bound ("full jitter").
    pub fn with_full_jitter(mut self) -> Backoff {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let place = &self as *const Backoff as u64;
        self.jitter = Some((nanos ^ place.rotate_left(32)) | 1);
        self
    }

    /// Whether a session that began at `started` ran long enough to count
    /// as healthy.
    pub fn was_healthy(&self, started: Instant) -> bool {
        started.elapsed() >= self.healthy_after
    }

    /// How long to wait before the next attempt, now that the session (or
    /// attempt) that began at `started` has ended: the first delay again
    /// after a healthy session, else the next one of the doubling series.
    pub fn next_delay(&mut self, started: Instant) -> Duration {
        if self.was_healthy(started) {
            self.reset();
        }
        let bound = self.next;
        self.next = (self.next * 2).min(self.cap);
        match &mut self.jitter {
            None => bound,
            Some(state) => {
                // xorshift64*: plenty for spreading reconnects.
                *state ^= *state >> 12;
                *state ^= *state << 25;
                *state ^= *state >> 27;
                let draw = state.wrapping_mul(0x2545_F491_4F6C_DD1D);
                bound.mul_f64((draw >> 11) as f64 / (1u64 << 53) as f64)
            }
        }
    }

    /// Starts over from the first delay (a deliberate reconnect, say).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIRST: Duration = Duration::from_millis(100);
    const CAP: Duration = Duration::from_secs(5);
    const HEALTHY: Duration = Duration::from_secs(10);

    #[tokio::test(start_paused = true)]
    async fn doubles_up_to_the_cap() {
        let mut backoff = Backoff::new(FIRST, CAP, HEALTHY);
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.next_delay(Instant::now()).as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[tokio::test(start_paused = true)]
    async fn starts_over_after_a_healthy_session_only() {
        let mut backoff = Backoff::new(FIRST, CAP, HEALTHY);
        for _ in 0..4 {
            backoff.next_delay(Instant::now());
        }
        let started = Instant::now();
        tokio::time::advance(HEALTHY - Duration::from_millis(1)).await;
        assert!(!backoff.was_healthy(started));
        assert_eq!(
            backoff.next_delay(started),
            Duration::from_millis(1600),
            "too short to count"
        );
        let started = Instant::now();
        tokio::time::advance(HEALTHY).await;
        assert!(backoff.was_healthy(started));
        assert_eq!(backoff.next_delay(started), FIRST);
        assert_eq!(backoff.next_delay(Instant::now()), FIRST * 2);
        backoff.reset();
        assert_eq!(backoff.next_delay(Instant::now()), FIRST);
    }

    #[tokio::test(start_paused = true)]
    async fn full_jitter_stays_under_the_bound_and_varies() {
        let mut backoff = Backoff::new(FIRST, CAP, HEALTHY).with_full_jitter();
        let mut bounds = Backoff::new(FIRST, CAP, HEALTHY);
        let mut delays = Vec::new();
        for _ in 0..40 {
            let delay = backoff.next_delay(Instant::now());
            assert!(delay <= bounds.next_delay(Instant::now()), "{delay:?}");
            delays.push(delay);
        }
        delays.sort();
        delays.dedup();
        assert!(delays.len() > 20, "jitter varies: {delays:?}");
    }
}
