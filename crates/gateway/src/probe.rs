//! The built-in latency probe, beside the feed: every
//! `GATEWAY_PROBE_INTERVAL_MS` it commits its row of `realtime.probe`
//! (tracked into the room `__probe:<instance>`) and receives the change like
//! any client, over a real WebSocket to this gateway's own `/ws`. Commit to
//! receipt, on the corrected clock, through every stage of the data path.
//!
//! It never takes the gateway down: a failed commit (database down) is
//! counted and logged once, a dropped socket is reconnected with backoff.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use ws_gateway_client::Backoff;

use crate::db;
use crate::state::AppState;
use crate::telemetry::Counters;
use crate::telemetry::repeats::{Occurrence, Repeats, SUMMARY_EVERY};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A commit that takes longer failed, as far as the probe is concerned.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// A committed probe not received within this (or three intervals) is lost.
const LOST_AFTER: Duration = Duration::from_secs(10);
/// Reconnect backoff: doubles up to the cap, starts over after a healthy run.
const BACKOFF_FIRST: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// How often a switched-off probe looks at its setting again (reloads).
const OFF_RECHECK: Duration = Duration::from_secs(1);

/// The room a gateway instance's probe changes go to.
pub fn room(instance_id: &str) -> String {
    format!("__probe:{instance_id}")
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How a probe session ended.
enum SessionEnd {
    Shutdown,
    /// The probe interval was changed or switched off by a reload.
    Reconfigured,
    Disconnected(anyhow::Error),
}

/// Marks the probe's room live for as long as a session holds it.
struct LiveWhileSubscribed(Arc<AppState>);

impl LiveWhileSubscribed {
    fn new(state: &Arc<AppState>) -> LiveWhileSubscribed {
        state.telemetry.set_probe_live(true);
        LiveWhileSubscribed(Arc::clone(state))
    }
}

impl Drop for LiveWhileSubscribed {
    fn drop(&mut self) {
        self.0.telemetry.set_probe_live(false);
    }
}

/// Aborts the commit in flight when the session ends.
struct InFlight(JoinHandle<(u64, Result<(), String>)>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Probe {
    state: Arc<AppState>,
    url: String,
    room: String,
    seq: u64,
    /// Committed (or being committed) and not received yet, oldest first.
    pending: VecDeque<(u64, Instant)>,
    /// Failed commits and probes lost on the way, for collapsed warnings.
    commit_failures: Repeats,
    losses: Repeats,
}

/// Runs until shutdown. `gateway` is the address the HTTP server listens on.
pub async fn run(state: Arc<AppState>, gateway: SocketAddr) -> anyhow::Result<()> {
    let shutdown = state.shutdown.clone();
    let mut target = gateway;
    if target.ip().is_unspecified() {
        target.set_ip(match target {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let mut probe = Probe {
        room: room(&state.instance_id),
        url: format!("ws://{target}/ws"),
        state,
        seq: 0,
        pending: VecDeque::new(),
        commit_failures: Repeats::new(SUMMARY_EVERY),
        losses: Repeats::new(SUMMARY_EVERY),
    };
    let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, HEALTHY_AFTER);
    let mut reported = false;
    loop {
        let Some(interval) = probe.state.settings().history.probe_interval else {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(OFF_RECHECK) => continue,
            }
        };
        let started = Instant::now();
        let end = tokio::select! {
            end = probe.session(interval) => end,
            () = shutdown.cancelled() => SessionEnd::Shutdown,
        };
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Reconfigured => backoff.reset(),
            SessionEnd::Disconnected(error) => {
                Counters::add(&probe.state.telemetry.counters.probe_reconnects, 1);
                if backoff.was_healthy(started) {
                    reported = false;
                }
                let delay = backoff.next_delay(started);
                if reported {
                    tracing::debug!(error = format!("{error:#}"), "probe socket still down");
                } else if !probe.state.shutdown.is_cancelled() {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = delay.as_millis() as u64,
                        "probe lost its WebSocket; reconnecting"
                    );
                    reported = true;
                }
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

impl Probe {
    /// Connects, subscribes to the probe room, then commits on every tick and
    /// measures every probe change that comes back.
    async fn session(&mut self, interval: Duration) -> SessionEnd {
        let mut ws = match self.connect().await {
            Ok(ws) => ws,
            Err(error) => return SessionEnd::Disconnected(error),
        };
        let _live = LiveWhileSubscribed::new(&self.state);
        // Probes committed before this subscription will never arrive.
        self.pending.clear();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut commit: Option<InFlight> = None;
        loop {
            tokio::select! {
                biased;
                message = ws.next() => {
                    // Stamp first: parsing is not the gateway's latency.
                    let received_db_us = self.state.telemetry.db_now_us();
                    match message {
                        Some(Ok(Message::Text(text))) => self.on_text(&text, received_db_us),
                        Some(Ok(Message::Close(frame))) => {
                            return SessionEnd::Disconnected(anyhow!("the gateway closed the probe's socket: {frame:?}"));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => return SessionEnd::Disconnected(error.into()),
                        None => return SessionEnd::Disconnected(anyhow!("the probe's socket ended")),
                    }
                }
                joined = async { (&mut commit.as_mut().expect("guarded").0).await }, if commit.is_some() => {
                    commit = None;
                    match joined {
                        Ok((seq, result)) => self.committed(seq, result),
                        Err(join) => self.committed(self.seq, Err(format!("commit task failed: {join}"))),
                    }
                }
                _ = tick.tick() => {
                    if self.state.settings().history.probe_interval != Some(interval) {
                        let _ = ws.close(None).await;
                        return SessionEnd::Reconfigured;
                    }
                    self.expire(interval);
                    // One commit at a time: a slow database skips ticks
                    // rather than piling commits up.
                    if commit.is_none() {
                        commit = Some(self.commit());
                    }
                }
            }
        }
    }

    /// Opens the socket and waits until the probe room is live. The probe
    /// needs no token (the gateway may hold no key it could sign one with):
    /// it presents a single-use ticket, which identifies it, grants it its
    /// room alone, and keeps it out of the client connection count.
    async fn connect(&self) -> anyhow::Result<Socket> {
        let url = format!("{}?probe={}", self.url, self.state.telemetry.issue_probe_ticket());
        let subscribe = async {
            let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
                .await
                .with_context(|| format!("connecting to {}", self.url))?;
            let request = json!({"type": "subscribe", "room": self.room}).to_string();
            ws.send(Message::text(request)).await?;
            while let Some(message) = ws.next().await {
                let Message::Text(text) = message? else {
                    continue;
                };
                let reply: Value = serde_json::from_str(&text).unwrap_or_default();
                match reply["type"].as_str() {
                    Some("subscribed") if reply["room"] == self.room.as_str() => return Ok(ws),
                    Some("error") => return Err(anyhow!("subscribing to {}: {reply}", self.room)),
                    _ => {}
                }
            }
            Err(anyhow!("the socket closed before the probe room was live"))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, subscribe)
            .await
            .map_err(|_| anyhow!("probe room not live within {CONNECT_TIMEOUT:?}"))?
    }

    /// Starts committing the next probe row, in a task of its own so the
    /// socket keeps being read (and timed) meanwhile.
    fn commit(&mut self) -> InFlight {
        self.seq += 1;
        let seq = self.seq;
        self.pending.push_back((seq, Instant::now()));
        Counters::add(&self.state.telemetry.counters.probes_sent, 1);
        let pool = self.state.pools.internal.clone();
        let instance = self.state.instance_id.clone();
        InFlight(tokio::spawn(async move {
            let upsert = db::commit_probe(&pool, &instance, seq as i64);
            let result = match tokio::time::timeout(COMMIT_TIMEOUT, upsert).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(error)) => Err(db::describe(&error)),
                Err(_) => Err(format!("no commit within {COMMIT_TIMEOUT:?}")),
            };
            if seq == 1 && result.is_ok() {
                // Rows of instances gone for a day (one row per process).
                let _ = db::forget_old_probes(&pool).await;
            }
            (seq, result)
        }))
    }

    fn committed(&mut self, seq: u64, result: Result<(), String>) {
        match result {
            Ok(()) => {
                if let Some((failed, for_d)) = self.commit_failures.recover(Instant::now()) {
                    tracing::info!(
                        failed,
                        for_s = format!("{:.1}", for_d.as_secs_f64()),
                        "probe commits again"
                    );
                }
            }
            Err(error) => {
                self.pending.retain(|(s, _)| *s != seq);
                Counters::add(&self.state.telemetry.counters.probe_failures, 1);
                match self.commit_failures.occur(Instant::now()) {
                    Occurrence::First => tracing::warn!(%error, "probe commit failed; will keep trying"),
                    Occurrence::Quiet => {}
                    Occurrence::Summary { more, for_s } => tracing::warn!(
                        %error,
                        failed = more,
                        failing_for_s = format!("{for_s:.0}"),
                        "probe commits still failing"
                    ),
                }
            }
        }
    }

    /// Counts probes that did not come back in time as failures.
    fn expire(&mut self, interval: Duration) {
        let lost_after = LOST_AFTER.max(interval * 3);
        let mut lost = 0;
        while self.pending.front().is_some_and(|(_, at)| at.elapsed() > lost_after) {
            self.pending.pop_front();
            lost += 1;
        }
        if lost > 0 {
            Counters::add(&self.state.telemetry.counters.probe_failures, lost);
            match self.losses.occur(Instant::now()) {
                Occurrence::First => tracing::warn!(
                    lost,
                    after_ms = lost_after.as_millis() as u64,
                    "probe changes committed but not received"
                ),
                Occurrence::Quiet => {}
                Occurrence::Summary { more, for_s } => tracing::warn!(
                    times = more,
                    for_s = format!("{for_s:.0}"),
                    "probe changes still not received"
                ),
            }
        } else if self.losses.active() && self.pending.is_empty() {
            self.losses.recover(Instant::now());
        }
    }

    fn on_text(&mut self, text: &str, received_db_us: i64) {
        let Ok(message) = serde_json::from_str::<Value>(text) else {
            return;
        };
        match message["type"].as_str() {
            Some("change") => self.on_change(&message, received_db_us),
            Some("batch") => {
                for change in message["changes"].as_array().into_iter().flatten() {
                    self.on_change(change, received_db_us);
                }
            }
            Some("error") => tracing::warn!(%message, "the gateway refused a probe request"),
            _ => {}
        }
    }

    fn on_change(&mut self, change: &Value, received_db_us: i64) {
        if change["room"] != self.room.as_str() {
            return;
        }
        let Some(seq) = change["row"]["seq"].as_u64() else {
            return;
        };
        let Some(i) = self.pending.iter().position(|(s, _)| *s == seq) else {
            return;
        };
        self.pending.remove(i);
        let Some(committed_us) = change["committed_at"].as_str().and_then(parse_rfc3339_micros) else {
            return;
        };
        let telemetry = &self.state.telemetry;
        telemetry.probe.record((received_db_us - committed_us).max(0) as u64);
        Counters::add(&telemetry.counters.probes_received, 1);
    }
}

/// Parses the `committed_at` the gateway writes: `2026-11-26T10:30:00.123456Z`
/// (any number of fraction digits, or none). Microseconds since the epoch.
pub fn parse_rfc3339_micros(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-');
    let year: i64 = d.next()?.parse().ok()?;
    let month: u32 = d.next()?.parse().ok()?;
    let day: u32 = d.next()?.parse().ok()?;
    let (hms, fraction) = match time.split_once('.') {
        Some((hms, f)) => (hms, f),
        None => (time, ""),
    };
    let mut t = hms.splitn(3, ':');
    let hour: i64 = t.next()?.parse().ok()?;
    let minute: i64 = t.next()?.parse().ok()?;
    let second: i64 = t.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    if !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let micros: i64 = format!("{fraction:0<6}")[..6].parse().ok()?;
    let days = days_from_civil(year, month, day);
    Some(((days * 86_400 + hour * 3600 + minute * 60 + second) * 1_000_000) + micros)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::format_rfc3339_micros;

    #[test]
    fn parses_what_the_gateway_formats() {
        for us in [0, 1_795_689_000_123_456, 951_782_400_000_001, -1, 4_102_444_799_999_999] {
            assert_eq!(parse_rfc3339_micros(&format_rfc3339_micros(us)), Some(us), "{us}");
        }
        assert_eq!(
            parse_rfc3339_micros("2026-11-26T10:30:00Z"),
            Some(1_795_689_000_000_000)
        );
        assert_eq!(
            parse_rfc3339_micros("2026-11-26T10:30:00.5Z"),
            Some(1_795_689_000_500_000)
        );
        for bad in [
            "",
            "2026-11-26",
            "2026-11-26T10:30:00",
            "2026-13-26T10:30:00Z",
            "2026-11-26T10:30:00.x1Z",
        ] {
            assert_eq!(parse_rfc3339_micros(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn probe_rooms_are_per_instance() {
        assert_eq!(room("1a2b"), "__probe:1a2b");
        crate::protocol::validate_room(&room("1a2b")).unwrap();
    }
}
