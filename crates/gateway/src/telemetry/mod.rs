//! What the gateway counts and times, beside the data path: delivery
//! counters, the state of the feed, commit-to-send / commit-to-ack / probe
//! latency and per-stage timings as HDR histograms over sliding windows, the
//! database clock's offset, the profiler and the regression detector.
//!
//! Recording is synchronous and cheap (a counter, or a short lock on a
//! histogram). The monitor task (`crate::monitor`) does the periodic work: clock samples,
//! the dashboard's time series, bottleneck and regression checks.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::change::now_us;

pub mod clock;
mod histogram;
pub mod process;
pub mod regression;
pub mod repeats;
pub mod stages;
mod tally;
pub mod timeline;
pub mod writes;

pub use histogram::{FINE_SLOT_S, MAX_WINDOW, Percentiles, SizeHistogram, WindowedHistogram};
pub use stages::{Profile, Stage, Stages, profile_window};
pub use tally::Tally;

use regression::AlertLog;
use timeline::Timeline;

/// Where the feed from the database stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedState {
    Down = 0,
    CatchingUp = 1,
    Live = 2,
}

/// The feed's state, shared with `/healthz`.
#[derive(Default)]
pub struct FeedStatus {
    state: AtomicU8,
    pub position: AtomicI64,
    /// Commit to arrival of the last notification, microseconds.
    pub lag_us: AtomicI64,
    pub reconnects: AtomicU64,
    /// Database clock minus gateway clock, microseconds (the monitor's
    /// round-trip-corrected estimate, see [`clock`]).
    pub clock_offset_us: AtomicI64,
    /// The true offset is within this of `clock_offset_us`.
    pub clock_uncertainty_us: AtomicI64,
    /// Mean round trip of a query on the pool, microseconds.
    pub db_round_trip_us: AtomicI64,
}

impl FeedStatus {
    pub fn state(&self) -> FeedState {
        match self.state.load(Ordering::Acquire) {
            2 => FeedState::Live,
            1 => FeedState::CatchingUp,
            _ => FeedState::Down,
        }
    }

    pub fn set_state(&self, state: FeedState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

/// The wal source (`GATEWAY_SOURCE=wal`), shared with `/healthz` and
/// `/metrics`: whether this instance leads, and the slot as every instance
/// sees it. Byte gauges are -1 while unknown.
pub struct WalStatus {
    /// Whether this gateway runs the wal source at all.
    pub enabled: AtomicBool,
    /// Whether this instance is the leader, streaming the slot.
    pub leader: AtomicBool,
    /// WAL written since the slot's confirmed position.
    pub slot_lag_bytes: AtomicI64,
    /// WAL the server keeps for the slot (from its restart position).
    pub slot_retained_bytes: AtomicI64,
    /// WAL that may still be written before the slot is lost
    /// (`max_slot_wal_keep_size`); -1 when unbounded or unknown.
    pub slot_safe_wal_bytes: AtomicI64,
    /// `pg_replication_slots.wal_status`: [`SlotHealth`] as a number.
    slot_health: AtomicU8,
    /// Times the slot was found lost (or missing) and recreated, with every
    /// room told to reset.
    pub slot_resets: AtomicU64,
    /// Changes and outbox transactions the leader wrote (this instance).
    pub changes_written: AtomicU64,
    pub batches_written: AtomicU64,
    /// Changes this instance's feed took from its leader at the outbox
    /// commit, ahead of their NOTIFY.
    pub changes_handed_off: AtomicU64,
}

impl Default for WalStatus {
    fn default() -> Self {
        WalStatus {
            enabled: AtomicBool::new(false),
            leader: AtomicBool::new(false),
            slot_lag_bytes: AtomicI64::new(-1),
            slot_retained_bytes: AtomicI64::new(-1),
            slot_safe_wal_bytes: AtomicI64::new(-1),
            slot_health: AtomicU8::new(SlotHealth::Unknown as u8),
            slot_resets: AtomicU64::new(0),
            changes_written: AtomicU64::new(0),
            batches_written: AtomicU64::new(0),
            changes_handed_off: AtomicU64::new(0),
        }
    }
}

/// The slot's `wal_status`, and whether it exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SlotHealth {
    Unknown = 0,
    Reserved = 1,
    Extended = 2,
    /// Past `max_wal_size`, within `max_slot_wal_keep_size`: invalidation is near.
    Unreserved = 3,
    Lost = 4,
    Missing = 5,
}

impl SlotHealth {
    pub fn from_wal_status(status: Option<&str>) -> SlotHealth {
        match status {
            Some("reserved") => SlotHealth::Reserved,
            Some("extended") => SlotHealth::Extended,
            Some("unreserved") => SlotHealth::Unreserved,
            Some("lost") => SlotHealth::Lost,
            _ => SlotHealth::Unknown,
        }
    }
}

impl WalStatus {
    pub fn slot_health(&self) -> SlotHealth {
        match self.slot_health.load(Ordering::Relaxed) {
            1 => SlotHealth::Reserved,
            2 => SlotHealth::Extended,
            3 => SlotHealth::Unreserved,
            4 => SlotHealth::Lost,
            5 => SlotHealth::Missing,
            _ => SlotHealth::Unknown,
        }
    }

    pub fn set_slot_health(&self, health: SlotHealth) {
        self.slot_health.store(health as u8, Ordering::Relaxed);
    }
}

/// Counters, each bumped in one place.
#[derive(Default)]
pub struct Counters {
    pub changes_received: AtomicU64,
    pub deliveries_queued: AtomicU64,
    pub messages_sent: AtomicU64,
    /// Bytes written to sockets, as sent (compressed where compressed;
    /// the pipeline's own stats split change frames by encoding).
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub bytes_received: AtomicU64,
    pub client_errors: AtomicU64,
    pub slow_consumer_closes: AtomicU64,
    pub connections_opened: AtomicU64,
    pub connections_closed: AtomicU64,
    pub connections_refused: AtomicU64,
    /// Refused upgrades and abnormal closes (see `CloseKind::is_failure`):
    /// the detector's connection failure rate, over opened plus refused.
    pub connection_failures: AtomicU64,
    /// The built-in probe: rows committed, received back over its own
    /// WebSocket, failed (commit refused, or not back within its timeout),
    /// and times its socket was reconnected.
    pub probes_sent: AtomicU64,
    pub probes_received: AtomicU64,
    pub probe_failures: AtomicU64,
    pub probe_reconnects: AtomicU64,
    /// `accept` failures on a listener (EMFILE and the like, which back off).
    pub accept_errors: AtomicU64,
    /// Connections closed for not sending their request headers in time.
    pub handshake_timeouts: AtomicU64,
    /// Changes sent by resumes' replays, by where their pages were read.
    pub replayed_from_memory: AtomicU64,
    pub replayed_from_outbox: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Bounds of the batch-size histogram (changes per `batch` frame).
pub const BATCH_SIZE_BOUNDS: [u64; 10] = [1, 2, 3, 5, 10, 20, 50, 100, 200, 500];

/// Everything measured, shared by the feed, the sockets, the probe and HTTP.
pub struct Telemetry {
    /// Database commit to frame written (flushed) to a client socket.
    pub commit_to_send: WindowedHistogram,
    /// Database commit to a client's `ack`, minus half its round trip.
    pub commit_to_ack: WindowedHistogram,
    /// The probe's commit to its own WebSocket client receiving the change.
    pub probe: WindowedHistogram,
    pub stages: Stages,
    pub feed: FeedStatus,
    pub wal: WalStatus,
    pub counters: Counters,
    /// Changes per `batch` frame.
    pub batch_sizes: SizeHistogram,
    /// What the monitor task computed, for `/healthz`, `/api/stats` and logs.
    timeline: Mutex<Timeline>,
    alerts: Mutex<AlertLog>,
    profile: Mutex<Option<Profile>>,
    /// The built-in probe is a client of its own gateway, but not one the
    /// operator counts: it presents a ticket (`/ws?probe=`) issued for one
    /// connection, and its connection is left out of connections, rooms
    /// and commit-to-send. Single-use and short-lived, so a ticket that
    /// ended up in a log or a proxy's access log opens nothing.
    probe_ticket: Mutex<Option<(String, std::time::Instant)>>,
    probe_connection: AtomicU64,
    probe_live: AtomicBool,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            commit_to_send: WindowedHistogram::hour(),
            commit_to_ack: WindowedHistogram::hour(),
            probe: WindowedHistogram::hour(),
            stages: Stages::default(),
            feed: FeedStatus::default(),
            wal: WalStatus::default(),
            counters: Counters::default(),
            batch_sizes: SizeHistogram::new(&BATCH_SIZE_BOUNDS),
            timeline: Mutex::new(Timeline::new(
                timeline::SERIES_KEPT.as_micros() as i64,
                (MAX_WINDOW.as_micros() + timeline::SAMPLE_EVERY.as_micros() * 2) as i64,
            )),
            alerts: Mutex::new(AlertLog::default()),
            profile: Mutex::new(None),
            probe_ticket: Mutex::new(None),
            probe_connection: AtomicU64::new(0),
            probe_live: AtomicBool::new(false),
        }
    }
}

/// How long a probe ticket may wait for its connection.
const PROBE_TICKET_LIFETIME: std::time::Duration = std::time::Duration::from_secs(30);

/// 128 bits from the kernel's generator, hex: a probe ticket nobody can guess.
fn random_ticket() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .is_err()
    {
        // No /dev/urandom: the standard library's per-process random keys.
        use std::hash::{BuildHasher, Hasher};
        for chunk in bytes.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_i64(now_us());
            chunk.copy_from_slice(&h.finish().to_le_bytes());
        }
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("telemetry lock")
}

impl Telemetry {
    /// Now on the database's clock, microseconds: what a `committed_at` is
    /// subtracted from.
    pub fn db_now_us(&self) -> i64 {
        now_us() + self.feed.clock_offset_us.load(Ordering::Relaxed)
    }

    /// Microseconds from `committed_at_us` (database clock) until now.
    pub fn since_commit_us(&self, committed_at_us: i64) -> u64 {
        (self.db_now_us() - committed_at_us).max(0) as u64
    }

    /// Frames carrying changes committed at `committed_at_us` (database
    /// clock) were just flushed to connection `connection_id`'s socket. The
    /// probe's own connection is left out: it is measured end to end as the
    /// probe, and "send" is real traffic.
    pub fn record_sends(&self, connection_id: u64, committed_at_us: impl IntoIterator<Item = i64>) {
        let now = self.db_now_us();
        self.record_send_latencies(
            connection_id,
            committed_at_us.into_iter().map(|c| (now - c).max(0) as u64),
        );
    }

    /// Commit-to-send latencies already computed at the flush (a connection
    /// publishes them in groups); the probe's connection is left out.
    pub fn record_send_latencies(&self, connection_id: u64, latencies_us: impl IntoIterator<Item = u64>) {
        if !self.is_probe(connection_id) {
            self.commit_to_send.record_all(latencies_us);
        }
    }

    /// Held commit-to-send latencies: see
    /// [`histogram::WindowedHistogram::record_held`].
    pub fn record_held_send_latencies(&self, connection_id: u64, held_us: &mut Vec<u64>, wait: bool) -> bool {
        if self.is_probe(connection_id) {
            held_us.clear();
            return true;
        }
        self.commit_to_send.record_held(held_us, wait)
    }

    /// A ticket for the probe's next connection (it replaces any earlier
    /// one not yet used).
    pub fn issue_probe_ticket(&self) -> String {
        let ticket = random_ticket();
        *lock(&self.probe_ticket) = Some((ticket.clone(), std::time::Instant::now()));
        ticket
    }

    /// Whether `ticket` is the probe's current one, which it then uses up.
    /// A wrong one uses nothing up: guessing cannot lock the probe out.
    pub fn redeem_probe_ticket(&self, ticket: &str) -> bool {
        let mut current = lock(&self.probe_ticket);
        let Some((issued, at)) = current.as_ref() else {
            return false;
        };
        // Compared in constant time, for the principle of it.
        let same = issued.len() == ticket.len()
            && issued
                .bytes()
                .zip(ticket.bytes())
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0;
        if !same {
            return false;
        }
        let fresh = at.elapsed() < PROBE_TICKET_LIFETIME;
        *current = None;
        fresh
    }

    /// Marks `connection_id` as the probe's (the upgrade saw its key).
    pub fn set_probe_connection(&self, connection_id: u64) {
        self.probe_connection.store(connection_id, Ordering::Relaxed);
    }

    pub fn is_probe(&self, connection_id: u64) -> bool {
        connection_id != 0 && self.probe_connection.load(Ordering::Relaxed) == connection_id
    }

    /// Whether the probe is subscribed to its room right now (so `rooms`
    /// can leave that room out).
    pub fn set_probe_live(&self, live: bool) {
        self.probe_live.store(live, Ordering::Relaxed);
    }

    pub fn probe_live(&self) -> bool {
        self.probe_live.load(Ordering::Relaxed)
    }

    /// A count of rooms or subscriptions with the probe's own (one of each) left out.
    pub fn excluding_probe(&self, count: usize) -> usize {
        count.saturating_sub(usize::from(self.probe_live()))
    }

    /// A client acked the change committed at `committed_at_us`; its
    /// connection's last measured round trip is `round_trip_us` (0 when not
    /// measured yet). The ack left the client half a round trip ago.
    pub fn record_ack(&self, committed_at_us: i64, round_trip_us: i64) {
        let latency = self.db_now_us() - committed_at_us - round_trip_us.max(0) / 2;
        self.commit_to_ack.record(latency.max(0) as u64);
    }

    /// `/healthz` `regressionDetection`.
    pub fn regression_summary(&self) -> regression::RegressionSummary {
        lock(&self.alerts).summary()
    }

    /// The newest alerts, newest first.
    pub fn latest_alerts(&self, n: usize) -> Vec<regression::Alert> {
        lock(&self.alerts).latest(n)
    }

    /// The profiler's last verdict.
    pub fn profile(&self) -> Option<Profile> {
        lock(&self.profile).clone()
    }

    /// The monitor's new profile.
    pub fn set_profile(&self, profile: Profile) {
        *lock(&self.profile) = Some(profile);
    }

    /// The dashboard's series, for the monitor to extend.
    pub fn timeline(&self) -> MutexGuard<'_, Timeline> {
        lock(&self.timeline)
    }

    /// The alert log, for the monitor to extend and prune.
    pub fn alerts(&self) -> MutexGuard<'_, AlertLog> {
        lock(&self.alerts)
    }

    /// The dashboard's points after `t` (ms since the Unix epoch).
    pub fn series_after(&self, t: i64) -> Vec<timeline::Sample> {
        lock(&self.timeline).samples_after(t)
    }

    /// The counters the timeline keeps, as of now; `compression` is the
    /// pipeline's `(bytes before, bytes after)` over change frames.
    pub fn counter_snapshot(&self, compression: (u64, u64), connections: u64) -> timeline::CounterSnapshot {
        let c = &self.counters;
        let get = Counters::get;
        let process = process::ProcessStats::read();
        timeline::CounterSnapshot {
            at_us: now_us(),
            changes: get(&c.changes_received),
            connections,
            rss_bytes: process.rss_bytes.unwrap_or(0),
            cpu_us: process.cpu_us.unwrap_or(0),
            connection_attempts: get(&c.connections_opened) + get(&c.connections_refused),
            connection_failures: get(&c.connection_failures),
            deliveries: get(&c.deliveries_queued),
            messages_sent: get(&c.messages_sent),
            bytes_sent: get(&c.bytes_sent),
            change_bytes_raw: compression.0,
            change_bytes_sent: compression.1,
            errors: get(&c.slow_consumer_closes) + get(&c.probe_failures),
            attempts: get(&c.deliveries_queued) + get(&c.probes_sent),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_subtract_half_the_round_trip() {
        let t = Telemetry::default();
        t.feed.clock_offset_us.store(5_000_000, Ordering::Relaxed);
        // Committed 20 ms ago on the database's clock, which runs 5 s ahead.
        let committed = now_us() + 5_000_000 - 20_000;
        t.record_ack(committed, 8_000);
        let p = t.commit_to_ack.recent(60);
        assert_eq!(p.count, 1);
        let ms = p.p50_ms.unwrap();
        assert!((16.0..17.0).contains(&ms), "{ms}");
    }

    #[test]
    fn the_probe_connection_is_not_real_traffic() {
        let t = Telemetry::default();
        let committed = t.db_now_us() - 3_000;
        t.record_sends(7, [committed, committed]);
        t.set_probe_connection(9);
        t.record_sends(9, [committed]);
        assert_eq!(t.commit_to_send.recent(60).count, 2);
        assert!(t.is_probe(9) && !t.is_probe(7) && !t.is_probe(0));
        assert_eq!(t.excluding_probe(3), 3);
        t.set_probe_live(true);
        assert_eq!(t.excluding_probe(3), 2);
        let ticket = t.issue_probe_ticket();
        assert_eq!(ticket.len(), 32);
        assert!(!t.redeem_probe_ticket("not-it"), "a wrong ticket");
        assert!(t.redeem_probe_ticket(&ticket), "a wrong guess uses nothing up");
        assert!(!t.redeem_probe_ticket(&ticket), "single use");
    }
}
