//! The feed: runs a [`Source`]'s sessions with capped backoff, and is the
//! [`Dispatcher`] the source hands its changes to.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use ws_gateway_client::Backoff;

use super::Source;
use crate::change::{Change, Position, now_us};
use crate::hub::{DirectWrites, Hub};
use crate::telemetry::repeats::{Occurrence, Repeats, SUMMARY_EVERY};
use crate::telemetry::stages::Stage;
use crate::telemetry::{Counters, FeedState, Telemetry};

/// Reconnect backoff: doubles from the first to the cap, and starts over once
/// a session has stayed up for `HEALTHY_AFTER`.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Past this many held stage samples the feed waits for the histogram.
const HELD_SAMPLES_MAX: usize = 4096;

pub struct Feed<S> {
    source: S,
    out: Dispatcher,
}

impl<S: Source> Feed<S> {
    pub fn new(source: S, hub: Arc<Hub>, telemetry: Arc<Telemetry>) -> Feed<S> {
        Feed {
            source,
            out: Dispatcher {
                hub,
                telemetry,
                position: None,
                connected: false,
                failures: Repeats::new(SUMMARY_EVERY),
                held_lag_us: Vec::new(),
                held_encoding_us: Vec::new(),
            },
        }
    }

    /// Runs sessions until shutdown. `reconnects` counts connections lost,
    /// not attempts: a session that never connected is a failed attempt,
    /// logged collapsed (the first, then a summary every 30 s).
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = Backoff::new(BACKOFF_FIRST, BACKOFF_CAP, HEALTHY_AFTER);
        loop {
            let started = Instant::now();
            self.out.connected = false;
            let ended = tokio::select! {
                ended = self.source.session(&mut self.out, &shutdown) => ended,
                _ = shutdown.cancelled() => Ok(()),
            };
            let status = &self.out.telemetry.feed;
            status.set_state(FeedState::Down);
            let Err(error) = ended else {
                return Ok(());
            };
            let delay = backoff.next_delay(started);
            let error = format!("{error:#}");
            let position = self.out.position.map_or_else(|| "none".to_owned(), |p| p.to_string());
            if self.out.connected {
                status.reconnects.fetch_add(1, Ordering::Relaxed);
                self.out.failures.recover(Instant::now());
                self.out.failures.occur(Instant::now());
                tracing::warn!(
                    source = self.source.name(),
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    %position,
                    "feed down: lost the database connection; clients stay connected and will get every change once it is back"
                );
            } else {
                match self.out.failures.occur(Instant::now()) {
                    Occurrence::First => tracing::warn!(
                        source = self.source.name(),
                        %error,
                        retry_in_ms = delay.as_millis() as u64,
                        %position,
                        "feed down: cannot connect to the database; retrying"
                    ),
                    Occurrence::Quiet => tracing::debug!(%error, "feed still down"),
                    Occurrence::Summary { more, for_s } => tracing::warn!(
                        source = self.source.name(),
                        %error,
                        failed_attempts = more,
                        down_for_s = format!("{for_s:.0}"),
                        "feed still down: the database cannot be reached; retrying"
                    ),
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }
}

/// What a source hands its changes to: keeps the last position dispatched,
/// drops changes at or below it (a catch-up and a notification can both
/// carry one), queues the rest into the hub, and keeps the feed's status.
pub struct Dispatcher {
    hub: Arc<Hub>,
    telemetry: Arc<Telemetry>,
    /// The last position dispatched; None until the first session has found
    /// where the outbox ends.
    position: Option<Position>,
    /// The current session got its connection (it said catching up or live):
    /// losing it is a reconnect; failing before it is only a failed attempt.
    connected: bool,
    /// The current outage's failed sessions, for collapsed warnings.
    failures: Repeats,
    /// Stage samples (notify lag, encoding) not yet in the shared histograms:
    /// the feed is on every delivery's path, so it never waits for a reader
    /// of them (see `WindowedHistogram::record_held`).
    held_lag_us: Vec<u64>,
    held_encoding_us: Vec<u64>,
}

impl Dispatcher {
    /// The last position dispatched; None before the first session found
    /// where the outbox ends.
    pub fn position(&self) -> Option<Position> {
        self.position
    }

    /// Whether `position` is after the last one dispatched: anything at or
    /// below it was dispatched already.
    pub fn is_new(&self, position: Position) -> bool {
        self.position.is_none_or(|p| position > p)
    }

    /// Whether `position` is the one right after the last dispatched.
    pub fn is_next(&self, position: Position) -> bool {
        self.position.is_some_and(|p| p.0 + 1 == position.0)
    }

    pub fn set_state(&mut self, state: FeedState) {
        if state != FeedState::Down {
            self.connected = true;
        }
        if state == FeedState::Live
            && let Some((sessions, down_for)) = self.failures.recover(Instant::now())
        {
            tracing::info!(
                failed_sessions = sessions,
                down_for_s = format!("{:.1}", down_for.as_secs_f64()),
                "feed back: connected and caught up"
            );
        }
        self.telemetry.feed.set_state(state);
    }

    /// The first session found the outbox ending at `end`: live from there,
    /// and subscriptions may join.
    pub fn start_at(&mut self, end: Position) {
        self.set_position(end);
        self.hub.advance(end);
        self.hub.mark_ready();
    }

    /// The feed was away longer than the retention: changes after its
    /// position up to `pruned_through` are gone. Every client is told to
    /// reset; the feed goes on from what is left.
    pub fn history_lost(&mut self, pruned_through: Position) {
        tracing::error!(
            position = self.position.map(|p| p.0),
            pruned_through = pruned_through.0,
            "feed was away longer than GATEWAY_HISTORY_RETENTION: some changes are gone; telling every client to reset"
        );
        self.hub.reset_all("history_expired", pruned_through);
        self.hub.advance(pruned_through);
        self.set_position(pruned_through);
    }

    /// Changes read while catching up, in commit order.
    pub fn caught_up(&mut self, changes: Vec<Change>) {
        self.dispatch(changes);
    }

    /// Changes that arrived live, in commit order: also timed from commit
    /// to arrival (`/healthz` `feed.lag_ms`, the notify_lag stage).
    pub fn live(&mut self, mut changes: Vec<Change>) {
        // Repeats (a NOTIFY of what a hand-off brought) are not timed.
        changes.retain(|c| self.is_new(c.position));
        if let Some(last) = changes.last() {
            let lag = self.telemetry.since_commit_us(last.committed_at_us);
            self.telemetry.feed.lag_us.store(lag as i64, Ordering::Relaxed);
        }
        let telemetry = &self.telemetry;
        self.held_lag_us
            .extend(changes.iter().map(|c| telemetry.since_commit_us(c.committed_at_us)));
        self.dispatch(changes);
        self.publish_stages();
    }

    /// Changes of a batch the wal leader of this instance committed, ahead
    /// of their NOTIFY (see `source::notify`): live changes, counted.
    pub fn handed_off(&mut self, changes: Vec<Change>) {
        let wal = &self.telemetry.wal;
        wal.changes_handed_off
            .fetch_add(changes.len() as u64, Ordering::Relaxed);
        self.live(changes);
    }

    /// Moves held stage samples into the shared histograms if they are free.
    fn publish_stages(&mut self) {
        let stages = &self.telemetry.stages;
        for (stage, held) in [
            (Stage::NotifyLag, &mut self.held_lag_us),
            (Stage::Encoding, &mut self.held_encoding_us),
        ] {
            let wait = held.len() > HELD_SAMPLES_MAX;
            stages.record_held(stage, held, wait);
        }
    }

    /// Fans changes out, once (see [`Dispatcher::is_new`]).
    fn dispatch(&mut self, changes: Vec<Change>) {
        let fresh: Vec<Arc<Change>> = changes
            .into_iter()
            .filter(|c| self.is_new(c.position))
            .map(Arc::new)
            .collect();
        let Some(last) = fresh.last().map(|c| c.position) else {
            return;
        };
        let counters = &self.telemetry.counters;
        Counters::add(&counters.changes_received, fresh.len() as u64);
        let done = self.hub.dispatch_group(fresh);
        Counters::add(&counters.deliveries_queued, done.deliveries as u64);
        self.record_direct(done.direct);
        if done.units > 0 {
            self.held_encoding_us.push(done.encoding_us);
        }
        self.set_position(last);
    }

    /// Records what the dispatcher wrote to idle sockets itself, as a send
    /// loop records its writes (the probe's socket is never one of them).
    fn record_direct(&self, mut direct: DirectWrites) {
        if direct.sent.is_empty() {
            return;
        }
        let telemetry = &self.telemetry;
        let offset = telemetry.db_now_us() - now_us();
        let mut held: Vec<u64> = direct
            .sent
            .iter()
            .map(|(committed, sent)| (sent + offset - committed).max(0) as u64)
            .collect();
        telemetry.commit_to_send.record_held(&mut held, true);
        direct.held.publish(telemetry, &self.hub.stats, true);
    }

    fn set_position(&mut self, position: Position) {
        self.position = Some(position);
        self.telemetry.feed.position.store(position.0, Ordering::Relaxed);
    }
}
