//! The sending half of a connection: works through its queue (changes,
//! protocol replies, replays, close requests), merges what waits while the
//! socket is busy, compresses per the client's encoding, and pings.

use std::sync::atomic::Ordering;

use axum::extract::ws::{CloseFrame, Message};
use futures_util::{Sink, SinkExt};

use std::time::Duration;

use tokio::time::Instant;

use super::heartbeat::Heartbeat;
use super::replay::{Page, ReplayCursor};
use super::{CLOSE_LINGER, SLOW_CLOSE_GRACE};
use crate::change::now_us;
use crate::config::Settings;
use crate::hub::{CloseKind, CloseReason, Outbound, QueueReceiver, Subscriber};
use crate::pipeline::encode::{Compression, Encoding, Unit, merge};
use crate::protocol;
use crate::state::AppState;
use crate::state::Liveness;
use crate::telemetry::Counters;
use crate::telemetry::writes::HeldWrites;

/// Most frames written between two flushes: a socket that fell behind
/// catches up in large writes, and still yields to other tasks.
const MAX_FRAMES_PER_WRITE: usize = 256;

/// Where the send loop writes: a WebSocket's sending half, or an `/sse`
/// stream (`sse.rs`), which turns the same messages into events.
pub(super) trait Transport: Sink<Message, Error = axum::Error> + Unpin + Send {}
impl<S: Sink<Message, Error = axum::Error> + Unpin + Send> Transport for S {}

/// Ends the dispatcher's direct writes to a connection's socket when its
/// send loop ends, before the socket can close.
struct StopDirect<'a>(&'a Subscriber);

impl Drop for StopDirect<'_> {
    fn drop(&mut self) {
        self.0.stop_direct();
    }
}

/// Writes queued items to the socket, flushing once per drained batch; sends
/// pings; closes the socket when asked to.
pub(super) async fn send_loop(
    mut sink: impl Transport,
    mut queue: QueueReceiver,
    subscriber: &Subscriber,
    state: &AppState,
    liveness: &Liveness,
    encoding: Encoding,
) {
    // However this future ends (dropped on the close path too), nothing
    // is written directly after it: the socket goes with it.
    let _direct = StopDirect(subscriber);
    let mut settings = state.settings_cache();
    let initial = settings.get(state);
    let mut heartbeat = Heartbeat::new(
        initial.heartbeat.interval,
        initial.heartbeat.min,
        ping_ceiling(
            initial.heartbeat.max,
            initial.heartbeat.min,
            initial.heartbeat.connection_timeout,
        ),
        initial.features.adaptive_heartbeat,
    );
    let mut next_ping = Instant::now() + heartbeat.interval();
    let mut writer = Writer {
        encoding,
        latencies: Vec::new(),
        carry: None,
        wrote_changes: false,
        replay: None,
        local: LocalTelemetry::default(),
    };
    // The loop waits on two things: its queue (which also wakes it for a
    // close request, shutdown included: see `AppState::close_all`) and one
    // timer, made once and moved. Waiting per message on the shutdown token
    // every connection shares locked that token's mutex on every delivery.
    let mut timer = std::pin::pin!(tokio::time::sleep_until(next_ping));
    // Whether this close was counted when it was decided (see `count_close`).
    let mut counted = false;
    // Whether the heartbeat and idle deadlines must be looked at again
    // before the next wait, and whether the idle one applied when they last
    // were. They only move later while the connection is heard from (the
    // timer firing early is harmless), so they are read again only after
    // the timer fired or when the idle deadline starts to apply (the last
    // subscription went) or a reload: two clock reads per delivery saved.
    let mut check_deadlines = true;
    let mut idle_watched = false;
    let mut deadlines_version = settings.version();
    // The close, and until when its frame may take to be written.
    let (close, grace) = loop {
        let idle_watch = liveness.subscriptions.load(Ordering::Relaxed) == 0;
        settings.get(state);
        if check_deadlines || (idle_watch && !idle_watched) || settings.version() != deadlines_version {
            let wake = next_ping.min(deadlines(settings.get(state), liveness));
            if wake < timer.deadline() {
                timer.as_mut().reset(wake);
            }
            check_deadlines = false;
            deadlines_version = settings.version();
        }
        idle_watched = idle_watch;
        // The timer only moves earlier here (once fired, it is parked at the
        // next ping): firing early is harmless, the timer branch checks what
        // is actually due.
        if let Some(due) = writer.local.due()
            && due < timer.deadline()
        {
            timer.as_mut().reset(due);
        }
        // Nothing in hand: the dispatcher may write to the socket itself
        // while this waits (taking the next item takes the socket back).
        if writer.carry.is_none() && writer.replay.is_none() {
            subscriber.writer_idle();
        }
        tokio::select! {
            biased;
            work = next_work(writer.replay.is_some(), &mut writer.carry, &mut queue, subscriber) => {
                subscriber.writer_take();
                let Some(item) = work else {
                    break (queue.closed().await, Instant::now() + SLOW_CLOSE_GRACE);
                };
                let write_started = std::time::Instant::now();
                let written = writer
                    .write_ready(&mut sink, item, &mut queue, subscriber, state, settings.get(state), write_started)
                    .await;
                if let Err(reason) = written {
                    break (reason, Instant::now() + SLOW_CLOSE_GRACE);
                }
                // A client that stops reading blocks this flush. Once its
                // queue overflows (close requested) it has a grace period to
                // read on and get its close frame; then the socket is
                // dropped: it must not hold a task or memory forever.
                tokio::select! {
                    // The flush first: it is nearly always done at once, and
                    // the close is looked at only when it is not.
                    biased;
                    flushed = sink.flush() => if flushed.is_err() { return },
                    reason = queue.closed() => {
                        let grace = Instant::now() + SLOW_CLOSE_GRACE;
                        count_close(state, &reason);
                        counted = true;
                        match tokio::time::timeout_at(grace, sink.flush()).await {
                            Ok(Ok(())) => break (reason, grace),
                            _ => return,
                        }
                    }
                }
                writer.record_flush(state, subscriber.id, write_started);
                // GATEWAY_BATCH_LINGER_MS: after a write of changes, the
                // next waits until the linger has passed (or something
                // that must not wait, or a close, comes), and takes what
                // arrived meanwhile as one batch.
                if let Some(until) = writer.linger_after(settings.get(state), write_started) {
                    queue.linger(until).await;
                }
            }
            () = &mut timer => {
                subscriber.writer_take();
                check_deadlines = true;
                if writer.local.due().is_some_and(|due| Instant::now() >= due) {
                    writer.local.publish(state, subscriber.id, false);
                }
                let settings = settings.get(state);
                let now = now_us();
                let silent = Duration::from_micros((now - liveness.last_heard_us.load(Ordering::Relaxed)).max(0) as u64);
                if silent > settings.heartbeat.connection_timeout {
                    break (
                        CloseReason::new(
                            CloseKind::HeartbeatTimeout,
                            format!("heartbeat timeout: nothing heard for {} ms", silent.as_millis()),
                        ),
                        Instant::now() + SLOW_CLOSE_GRACE,
                    );
                }
                let quiet = Duration::from_micros((now - liveness.last_message_us.load(Ordering::Relaxed)).max(0) as u64);
                if liveness.subscriptions.load(Ordering::Relaxed) == 0 && quiet > settings.heartbeat.max_idle {
                    break (
                        CloseReason::new(CloseKind::Idle, format!("idle: no subscription and no message for {} ms", quiet.as_millis())),
                        Instant::now() + SLOW_CLOSE_GRACE,
                    );
                }
                if Instant::now() >= next_ping {
                    if liveness.ping_outstanding.swap(true, Ordering::Relaxed) {
                        heartbeat.missed();
                    } else {
                        // Zero: no ping has been answered yet.
                        let round_trip = liveness.round_trip_us.load(Ordering::Relaxed).max(0) as u64;
                        if round_trip > 0 {
                            heartbeat.answered(Duration::from_micros(round_trip));
                        }
                    }
                    next_ping = Instant::now() + heartbeat.interval();
                    let stamp = now.to_be_bytes();
                    if sink.send(Message::Ping(stamp.to_vec().into())).await.is_err() {
                        return;
                    }
                }
                timer.as_mut().reset(next_ping);
            }
        }
    };
    subscriber.writer_take();
    writer.local.publish(state, subscriber.id, true);
    if !counted {
        count_close(state, &close);
    }
    // Recorded on the subscriber (closes from here, like the heartbeat's,
    // were decided locally), which also stops anything more being queued.
    subscriber.close(close.clone());
    if close.kind != CloseKind::SlowConsumer {
        // What was queued before the close (the errors that explain it, the
        // last changes) goes first; a slow consumer's queue is what it could
        // not take, and it resumes from its position instead.
        // Not past an unfinished replay: what was queued after it is later
        // than the rest of the replay, and the client would see a gap.
        let settings = state.settings();
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while writer.replay.is_none()
                && let Some(item) = writer.carry.take().or_else(|| queue.try_recv())
            {
                if matches!(item, Outbound::Replay(_)) {
                    break;
                }
                if writer
                    .write_ready(
                        &mut sink,
                        Work::Item(item),
                        &mut queue,
                        subscriber,
                        state,
                        &settings,
                        std::time::Instant::now(),
                    )
                    .await
                    .is_err()
                {
                    return;
                }
            }
            let _ = sink.flush().await;
        })
        .await;
    }
    let frame = CloseFrame {
        code: close.code(),
        reason: close.reason.into_owned().into(),
    };
    let _ = tokio::time::timeout_at(grace, sink.send(Message::Close(Some(frame)))).await;
}

/// Counts a slow-consumer close when the send loop learns of it, not when
/// the connection ends: that is up to two [`SLOW_CLOSE_GRACE`]s later.
fn count_close(state: &AppState, reason: &CloseReason) {
    if reason.kind == CloseKind::SlowConsumer {
        Counters::add(&state.telemetry.counters.slow_consumer_closes, 1);
    }
}

/// The longest the adaptive heartbeat may wait between pings: at most half
/// the connection timeout, so a healthy client that only receives always
/// answers a ping before it would count as silent (with both at 60 s, the
/// bench found receive-only clients closed every few minutes).
pub(super) fn ping_ceiling(max: Duration, min: Duration, connection_timeout: Duration) -> Duration {
    max.min(connection_timeout / 2).max(min)
}

/// When the connection must be looked at even if no ping is due: when it
/// would pass the heartbeat timeout, or go idle.
fn deadlines(settings: &Settings, liveness: &Liveness) -> Instant {
    let now = now_us();
    let heard = liveness.last_heard_us.load(Ordering::Relaxed);
    let silence_left = settings.heartbeat.connection_timeout.as_micros() as i64 - (now - heard);
    let mut left = silence_left;
    if liveness.subscriptions.load(Ordering::Relaxed) == 0 {
        let spoke = liveness.last_message_us.load(Ordering::Relaxed);
        left = left.min(settings.heartbeat.max_idle.as_micros() as i64 - (now - spoke));
    }
    // A millisecond past the limit, so the check sees it passed.
    Instant::now() + Duration::from_micros(left.max(0) as u64 + 1000)
}

/// What the send loop writes next.
enum Work {
    Item(Outbound),
    /// The next page of the replay in progress.
    ReplayPage,
}

/// The next thing to write: the replay in progress (everything queued is
/// later than it), else an item held back by the last merge, else the
/// queue's. `None` once a close has been requested: a close goes before
/// what waits.
async fn next_work(
    replaying: bool,
    carry: &mut Option<Outbound>,
    queue: &mut QueueReceiver,
    subscriber: &Subscriber,
) -> Option<Work> {
    if subscriber.is_closing() {
        return None;
    }
    if replaying {
        return Some(Work::ReplayPage);
    }
    match carry.take() {
        Some(item) => Some(Work::Item(item)),
        None => queue.recv().await.map(Work::Item),
    }
}

/// The send loop's state between writes.
struct Writer {
    encoding: Encoding,
    /// Commit times of the changes written since the last flush.
    latencies: Vec<i64>,
    /// An item taken from the queue that did not fit the last merge.
    carry: Option<Outbound>,
    /// The last write carried live changes (a linger may follow it).
    wrote_changes: bool,
    /// The resume being replayed, a page per write: nothing queued goes out
    /// before it ends. Boxed: most connections never replay.
    replay: Option<Box<ReplayCursor>>,
    /// Measurements gathered here and published together: publishing takes
    /// shared locks and touches counters every connection shares, which at
    /// one socket write per delivery cost more than the write itself.
    local: LocalTelemetry,
}

/// A connection's measurements not yet published.
#[derive(Default)]
struct LocalTelemetry {
    commit_to_send_us: Vec<u64>,
    held: HeldWrites,
    since: Option<Instant>,
}

/// Most samples a connection holds before publishing, and the longest it
/// holds them: what the histograms and /metrics show lags by at most this.
const PUBLISH_SAMPLES: usize = 256;
/// Past this many held samples a publish waits for the histograms' locks.
const PUBLISH_FORCE_SAMPLES: usize = 4 * PUBLISH_SAMPLES;
const PUBLISH_EVERY: Duration = Duration::from_millis(100);

impl LocalTelemetry {
    fn due(&self) -> Option<Instant> {
        self.since.map(|since| since + PUBLISH_EVERY)
    }

    fn touch(&mut self) {
        self.since.get_or_insert_with(Instant::now);
    }

    /// Hands the measurements to the shared histograms. Unless `force`d it
    /// does not wait for a histogram a reader holds: what could not go stays
    /// here for the next turn (bounded: past [`PUBLISH_FORCE_SAMPLES`] the
    /// publish waits).
    fn publish(&mut self, state: &AppState, connection_id: u64, force: bool) {
        if self.since.take().is_none() {
            return;
        }
        let telemetry = &state.telemetry;
        let mut published = telemetry.record_held_send_latencies(connection_id, &mut self.commit_to_send_us, force);
        published &= self.held.publish(telemetry, &state.hub.stats, force);
        if !published {
            self.since = Some(Instant::now());
        }
    }
}

impl Writer {
    /// Feeds `first` and whatever else is queued right now (up to
    /// [`MAX_FRAMES_PER_WRITE`] frames) to the socket; the caller flushes.
    /// While the socket was busy, changes waiting for it are merged into
    /// batches of up to the batch size (plain-text clients; compressed units
    /// go as they are, to keep their shared compressed bytes).
    ///
    /// A replay writes one page and returns, so the page is flushed (the
    /// socket has taken it) before the next is read.
    // `taken_at` is the caller's clock read, passed on to save one per write.
    #[allow(clippy::too_many_arguments)]
    async fn write_ready(
        &mut self,
        sink: &mut impl Transport,
        first: Work,
        queue: &mut QueueReceiver,
        subscriber: &Subscriber,
        state: &AppState,
        settings: &Settings,
        taken_at: std::time::Instant,
    ) -> Result<(), CloseReason> {
        // When the item in hand was taken from the queue: the first at
        // `taken_at` (read by the caller just before), later ones read anew.
        let mut taken_at = Some(taken_at);
        let mut item = match first {
            Work::ReplayPage => return self.write_replay_page(sink, state).await,
            Work::Item(item) => item,
        };
        let mut frames = 0;
        loop {
            subscriber.sent(item.queued_size());
            let message = match item {
                Outbound::Control(text) => Message::Text(*text),
                Outbound::Replay(range) => {
                    self.replay = Some(Box::new(ReplayCursor::new(*range, subscriber.ordered)));
                    return self.write_replay_page(sink, state).await;
                }
                Outbound::Changes(unit) => {
                    self.wrote_changes = true;
                    let mergeable =
                        |u: &Unit| self.encoding == Encoding::None && settings.features.batching && !u.priority;
                    let mut units = vec![unit];
                    if mergeable(&units[0]) {
                        let mut count = units[0].change_count();
                        while count < settings.pipeline.batch_size {
                            match queue.try_recv() {
                                Some(Outbound::Changes(next))
                                    if mergeable(&next)
                                        && count + next.change_count() <= settings.pipeline.batch_size =>
                                {
                                    subscriber.sent(next.text.len());
                                    count += next.change_count();
                                    units.push(next);
                                }
                                Some(other) => {
                                    self.carry = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                    }
                    self.local.touch();
                    // One clock read per frame, not per unit merged into it.
                    let taken = taken_at.take().unwrap_or_else(std::time::Instant::now);
                    for unit in &units {
                        self.latencies.extend_from_slice(&unit.committed_at_us);
                        let queued = taken.saturating_duration_since(unit.queued_at);
                        self.local.held.queueing_us.push(queued.as_micros() as u64);
                    }
                    if units.len() > 1 {
                        let waited = units[units.len() - 1].queued_at - units[0].queued_at;
                        self.local.held.batch_wait_us.push(waited.as_micros() as u64);
                    }
                    let changes: usize = units.iter().map(|u| u.change_count()).sum();
                    let raw: usize = units.iter().map(|u| u.text.len()).sum();
                    let message = if units.len() > 1 {
                        Message::Text(merge(&units).into())
                    } else {
                        let unit = &units[0];
                        let compression = Compression::of(settings.features.compression, &settings.pipeline);
                        match unit.compressed_for(self.encoding, compression) {
                            Some((bytes, took)) => {
                                if let Some(took) = took {
                                    self.local.held.encoding_us.push(took.as_micros() as u64);
                                }
                                Message::Binary(bytes.clone())
                            }
                            None => Message::Text(unit.text.clone()),
                        }
                    };
                    let (encoding, sent) = match &message {
                        Message::Binary(b) => (self.encoding, b.len()),
                        Message::Text(t) => (Encoding::None, t.len()),
                        _ => (Encoding::None, 0),
                    };
                    self.local.held.frame(encoding, changes, raw, sent);
                    message
                }
            };
            self.local.touch();
            self.local.held.message(match &message {
                Message::Text(text) => text.len(),
                Message::Binary(bytes) => bytes.len(),
                _ => 0,
            });
            sink.feed(message)
                .await
                .map_err(|e| CloseReason::new(CloseKind::WriteFailed, format!("write failed: {e}")))?;
            frames += 1;
            if frames >= MAX_FRAMES_PER_WRITE {
                return Ok(());
            }
            match self.next_ready(queue) {
                Some(next) => {
                    item = next;
                    taken_at = None;
                }
                None => return Ok(()),
            }
        }
    }

    /// Feeds the replay's next page to the socket (the caller flushes), or
    /// `reset` when part of the gap was pruned; ends the replay when nothing
    /// more is owed.
    async fn write_replay_page(&mut self, sink: &mut impl Transport, state: &AppState) -> Result<(), CloseReason> {
        // The cursor stays in place until the replay is done: a close on the
        // way (a failed read, a failed write) then drains nothing queued
        // behind it.
        let Writer { replay, local, .. } = self;
        let Some(cursor) = replay.as_mut() else {
            return Ok(());
        };
        // Boxed: its database future is large; unboxed it would sit in
        // every connection's task.
        let page = Box::pin(cursor.next_page(state)).await.map_err(|error| {
            state.warn_repeated(
                "replay page failed; the client will resume",
                &cursor.rooms().join(","),
                &error,
            );
            // Try Again Later: the client resumes from its last position.
            CloseReason::new(
                CloseKind::HistoryUnavailable,
                "history unavailable right now; reconnect and resume",
            )
        })?;
        let texts: Vec<String> = match page {
            // Nothing more of the gap is sent: the stream goes on after
            // where the subscription went live.
            Page::Pruned => cursor
                .rooms()
                .iter()
                .map(|room| protocol::reset_message(room, "history_expired", cursor.upto()))
                .collect(),
            Page::Changes(changes) => changes.iter().flat_map(|c| cursor.messages_for(c)).collect(),
        };
        for text in texts {
            local.touch();
            local.held.message(text.len());
            sink.feed(Message::Text(text.into()))
                .await
                .map_err(|e| CloseReason::new(CloseKind::WriteFailed, format!("write failed: {e}")))?;
        }
        if cursor.is_done() {
            *replay = None;
        }
        Ok(())
    }

    /// Until when to linger after the write that started at `started`:
    /// only after live changes, with a linger configured, and with nothing
    /// in hand that must not wait (a replay in progress, a carried item).
    fn linger_after(&mut self, settings: &Settings, started: std::time::Instant) -> Option<Instant> {
        let wrote_changes = std::mem::take(&mut self.wrote_changes);
        let linger = settings.pipeline.batch_linger;
        let idle_handed = self.replay.is_none() && !self.carry.as_ref().is_some_and(Outbound::must_not_wait);
        (wrote_changes && !linger.is_zero() && idle_handed).then(|| Instant::from_std(started) + linger)
    }

    fn next_ready(&mut self, queue: &mut QueueReceiver) -> Option<Outbound> {
        self.carry.take().or_else(|| queue.try_recv())
    }

    /// Commit-to-send for what was just flushed, on the database's clock.
    /// After a flush: commit-to-send of what was just written (computed
    /// now, published with the rest when due).
    fn record_flush(&mut self, state: &AppState, connection_id: u64, write_started: std::time::Instant) {
        if !self.latencies.is_empty() {
            let now = state.telemetry.db_now_us();
            self.local.commit_to_send_us.extend(
                self.latencies
                    .drain(..)
                    .map(|committed| (now - committed).max(0) as u64),
            );
        }
        // One clock read for the write's duration and the publish's due time.
        let flushed = std::time::Instant::now();
        self.local
            .held
            .socket_write_us
            .push(flushed.saturating_duration_since(write_started).as_micros() as u64);
        self.local.touch();
        let held = self.local.commit_to_send_us.len();
        if held >= PUBLISH_SAMPLES || self.local.due().is_some_and(|due| Instant::from_std(flushed) >= due) {
            self.local.publish(state, connection_id, held >= PUBLISH_FORCE_SAMPLES);
        }
    }
}
