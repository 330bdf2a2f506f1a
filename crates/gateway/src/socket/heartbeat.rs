//! The adaptive heartbeat: how long to wait before the next ping, from how
//! the connection has been doing. A healthy connection (pongs back quickly)
//! is pinged less and less often, up to the maximum, which saves wake-ups
//! across thousands of idle sockets; a slow or missed pong pulls the
//! interval down towards the minimum, so a dying connection is found fast.

use std::time::Duration;

/// A pong slower than this counts against the connection.
const SLOW_ROUND_TRIP: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct Heartbeat {
    interval: Duration,
    min: Duration,
    max: Duration,
    adaptive: bool,
    /// Pings in a row that got no pong before the next one was due.
    pub missed: u32,
}

impl Heartbeat {
    pub fn new(initial: Duration, min: Duration, max: Duration, adaptive: bool) -> Heartbeat {
        Heartbeat {
            interval: initial.clamp(min, max),
            min,
            max,
            adaptive,
            missed: 0,
        }
    }

    /// How long until the next ping.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    /// The previous ping was answered in `round_trip`.
    pub fn answered(&mut self, round_trip: Duration) {
        self.missed = 0;
        if !self.adaptive {
            return;
        }
        self.interval = if round_trip <= SLOW_ROUND_TRIP {
            self.interval.mul_f64(1.5)
        } else {
            self.interval.mul_f64(0.75)
        }
        .clamp(self.min, self.max);
    }

    /// The previous ping got no answer before this one was due.
    pub fn missed(&mut self) {
        self.missed += 1;
        if self.adaptive {
            self.interval = (self.interval / 2).clamp(self.min, self.max);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(10);
    const MAX: Duration = Duration::from_secs(60);

    #[test]
    fn healthy_connections_are_pinged_less_often_up_to_the_maximum() {
        let mut hb = Heartbeat::new(Duration::from_secs(25), MIN, MAX, true);
        hb.answered(Duration::from_millis(3));
        assert_eq!(hb.interval(), Duration::from_millis(37_500));
        for _ in 0..10 {
            hb.answered(Duration::from_millis(3));
        }
        assert_eq!(hb.interval(), MAX);
    }

    #[test]
    fn missed_and_slow_pongs_pull_the_interval_down_to_the_minimum() {
        let mut hb = Heartbeat::new(Duration::from_secs(60), MIN, MAX, true);
        hb.answered(Duration::from_secs(2));
        assert_eq!(hb.interval(), Duration::from_secs(45));
        hb.missed();
        assert_eq!(hb.interval(), Duration::from_millis(22_500));
        hb.missed();
        hb.missed();
        assert_eq!(hb.interval(), MIN);
        assert_eq!(hb.missed, 3);
        hb.answered(Duration::from_millis(1));
        assert_eq!(hb.missed, 0);
    }

    #[test]
    fn pings_stay_well_inside_the_connection_timeout() {
        let ceiling = crate::socket::send::ping_ceiling(MAX, MIN, Duration::from_secs(60));
        assert_eq!(ceiling, Duration::from_secs(30));
        let mut hb = Heartbeat::new(Duration::from_secs(25), MIN, ceiling, true);
        for _ in 0..10 {
            hb.answered(Duration::from_millis(3));
        }
        assert!(hb.interval() <= Duration::from_secs(30), "{:?}", hb.interval());
        assert_eq!(crate::socket::send::ping_ceiling(MAX, MIN, Duration::from_secs(5)), MIN);
    }

    #[test]
    fn without_the_feature_the_interval_is_fixed() {
        let mut hb = Heartbeat::new(Duration::from_secs(25), MIN, MAX, false);
        hb.answered(Duration::from_millis(1));
        hb.missed();
        assert_eq!(hb.interval(), Duration::from_secs(25));
    }
}
