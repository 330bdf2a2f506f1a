//! The feed: one dedicated LISTEN connection that turns the database's
//! notifications into dispatched changes, in commit order, exactly once.
//!
//! A session connects, LISTENs, catches up from the outbox after the last
//! position it dispatched, then follows notifications live. When the
//! connection is lost the session ends and a new one starts after a capped
//! backoff; catching up from the same position is what loses nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Notification, Position};
use crate::db;
use crate::hub::Hub;
use crate::telemetry::stages::Stage;
use crate::telemetry::{Counters, FeedState, Telemetry};

/// Most notifications dispatched as one group.
const MAX_GROUP: usize = 512;
/// Rows read per catch-up query.
const CATCH_UP_PAGE: i64 = 1000;
/// How often the LISTEN connection is checked (and the clock offset sampled);
/// with the timeout this bounds how long a silent, dead connection goes
/// unnoticed (SPEC: /healthz says 503 within 5 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);
/// Reconnect backoff: doubles from the first to the cap, and starts over once
/// a session has stayed up for `HEALTHY_AFTER`.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(10);

/// Any single database call of the feed. A partition leaves a call hanging
/// rather than failing (connect timeouts cover only the TCP handshake), and
/// a hung feed must end its session so it can start a new one.
const DB_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a database call of the feed under [`DB_CALL_TIMEOUT`].
async fn bounded<T, E>(what: &str, call: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(DB_CALL_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => Err(anyhow!("{what}: no answer from the database in {DB_CALL_TIMEOUT:?}")),
    }
}

/// How a feed session ended.
enum SessionEnd {
    Shutdown,
    Disconnected(anyhow::Error),
}

pub struct Feed {
    database_url: String,
    channel: String,
    pool: PgPool,
    hub: Arc<Hub>,
    telemetry: Arc<Telemetry>,
    /// The last position dispatched; None until the first session has found
    /// where the outbox ends.
    position: Option<Position>,
    /// Stage samples (notify lag, encoding) not yet in the shared histograms:
    /// the feed is on every delivery's path, so it never waits for a reader
    /// of them (see `WindowedHistogram::record_held`).
    held_lag_us: Vec<u64>,
    held_encoding_us: Vec<u64>,
}

/// Past this many held stage samples the feed waits for the histogram.
const HELD_SAMPLES_MAX: usize = 4096;

impl Feed {
    pub fn new(database_url: String, channel: String, pool: PgPool, hub: Arc<Hub>, telemetry: Arc<Telemetry>) -> Feed {
        Feed {
            database_url,
            channel,
            pool,
            hub,
            telemetry,
            position: None,
            held_lag_us: Vec::new(),
            held_encoding_us: Vec::new(),
        }
    }

    /// Runs sessions until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let mut backoff = BACKOFF_FIRST;
        loop {
            let started = Instant::now();
            let end = tokio::select! {
                end = self.session(&shutdown) => end,
                _ = shutdown.cancelled() => SessionEnd::Shutdown,
            };
            let status = &self.telemetry.feed;
            status.set_state(FeedState::Down);
            match end {
                SessionEnd::Shutdown => return Ok(()),
                SessionEnd::Disconnected(error) => {
                    status.reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if started.elapsed() >= HEALTHY_AFTER {
                        backoff = BACKOFF_FIRST;
                    }
                    tracing::warn!(
                        error = format!("{error:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        position = ?self.position.map(|p| p.0),
                        "feed down: lost the database connection; clients stay connected and will get every change once it is back"
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => return Ok(()),
                    }
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                }
            }
        }
    }

    async fn session(&mut self, shutdown: &CancellationToken) -> SessionEnd {
        match self.follow(shutdown).await {
            Ok(()) => SessionEnd::Shutdown,
            Err(error) => SessionEnd::Disconnected(error),
        }
    }

    /// One session: connect, LISTEN, catch up, then follow live. Returns Ok
    /// only on shutdown.
    async fn follow(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let telemetry = Arc::clone(&self.telemetry);
        let status = &telemetry.feed;
        let (client, mut notifications, driver) =
            tokio::time::timeout(DB_CALL_TIMEOUT, listen(&self.database_url, &self.channel))
                .await
                .map_err(|_| anyhow!("connecting the LISTEN connection: no answer in {DB_CALL_TIMEOUT:?}"))??;
        let _driver = AbortOnDrop(driver);
        status.set_state(FeedState::CatchingUp);

        // LISTEN is in place: every commit from now on is notified. Wait out
        // the transactions committing right now, then read the outbox: a
        // change is in the read or in the notifications, or in both.
        let caught_up = self.catch_up().await?;
        tracing::info!(position = caught_up.0, "feed live");
        status.set_state(FeedState::Live);

        let mut heartbeat = tokio::time::interval(HEARTBEAT_EVERY);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                event = notifications.recv() => match event {
                    Some(Ok(payload)) => {
                        // Everything that arrived meanwhile goes as one group,
                        // so each room's share can be batched.
                        let mut payloads = vec![payload];
                        let mut failed = None;
                        while payloads.len() < MAX_GROUP {
                            match notifications.try_recv() {
                                Ok(Ok(payload)) => payloads.push(payload),
                                Ok(Err(error)) => {
                                    failed = Some(error);
                                    break;
                                }
                                Err(_) => break,
                            }
                        }
                        self.on_notifications(payloads).await?;
                        if let Some(error) = failed {
                            return Err(error).context("LISTEN connection failed");
                        }
                    }
                    Some(Err(error)) => return Err(error).context("LISTEN connection failed"),
                    None => return Err(anyhow!("LISTEN connection closed")),
                },
                _ = heartbeat.tick() => self.heartbeat(&client).await?,
            }
        }
    }

    async fn catch_up(&mut self) -> anyhow::Result<Position> {
        bounded("waiting out committing transactions", db::wait_out_commits(&self.pool)).await?;
        let mut from = match self.position {
            Some(p) => {
                let Position(pruned_through) =
                    bounded("reading how far the outbox was pruned", db::pruned_through(&self.pool)).await?;
                if p.0 < pruned_through {
                    // Down for longer than the retention: changes after our
                    // position are gone. Say so to every client, go on from
                    // what is left.
                    tracing::error!(
                        position = p.0,
                        pruned_through,
                        "feed was away longer than GATEWAY_HISTORY_RETENTION: some changes are gone; telling every client to reset"
                    );
                    self.hub.reset_all("history_expired");
                    self.hub.advance(Position(pruned_through));
                    self.set_position(Position(pruned_through));
                    Position(pruned_through)
                } else {
                    p
                }
            }
            None => {
                // First session: live from the end of the outbox.
                let Position(end) = db::outbox_end(&self.pool)
                    .await
                    .context("reading the end of the outbox")?;
                self.set_position(Position(end));
                self.hub.advance(Position(end));
                self.hub.mark_ready();
                Position(end)
            }
        };
        loop {
            let page = bounded(
                "catching up from the outbox",
                db::changes_after(&self.pool, from, CATCH_UP_PAGE),
            )
            .await?;
            let mut changes = Vec::with_capacity(page.len());
            for doc in &page {
                if let Notification::Change(change) = Notification::parse(doc)? {
                    from = change.position;
                    changes.push(change);
                }
            }
            self.dispatch(changes);
            if (page.len() as i64) < CATCH_UP_PAGE {
                return Ok(from);
            }
        }
    }

    async fn on_notifications(&mut self, payloads: Vec<String>) -> anyhow::Result<()> {
        let mut changes = Vec::with_capacity(payloads.len());
        for payload in &payloads {
            let change = match Notification::parse(payload) {
                Ok(Notification::Change(change)) => change,
                Ok(Notification::Reference(position)) => {
                    if self.position.is_some_and(|p| position <= p) {
                        continue;
                    }
                    self.fetch(position).await?
                }
                Err(error) => {
                    tracing::warn!(%error, "ignoring a notification on the gateway's channel that is not a change");
                    continue;
                }
            };
            changes.push(change);
        }
        if let Some(last) = changes.last() {
            let lag = self.telemetry.since_commit_us(last.committed_at_us);
            self.telemetry.feed.lag_us.store(lag as i64, Ordering::Relaxed);
        }
        let telemetry = &self.telemetry;
        self.held_lag_us
            .extend(changes.iter().map(|c| telemetry.since_commit_us(c.committed_at_us)));
        self.dispatch(changes);
        self.publish_stages();
        Ok(())
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

    /// Reads a change too large for a NOTIFY payload back from the outbox.
    async fn fetch(&self, position: Position) -> anyhow::Result<Change> {
        let doc = bounded(
            &format!("reading change {position} from the outbox"),
            db::change_document(&self.pool, position),
        )
        .await?;
        match Notification::parse(&doc)? {
            Notification::Change(change) => Ok(change),
            Notification::Reference(_) => Err(anyhow!("outbox document for {position} is a reference")),
        }
    }

    /// Fans changes out, once: anything at or below the last position was
    /// dispatched already (a catch-up and a notification can both carry it).
    fn dispatch(&mut self, changes: Vec<Change>) {
        let after = self.position;
        let fresh: Vec<Arc<Change>> = changes
            .into_iter()
            .filter(|c| after.is_none_or(|p| c.position > p))
            .map(Arc::new)
            .collect();
        let Some(last) = fresh.last().map(|c| c.position) else {
            return;
        };
        let counters = &self.telemetry.counters;
        Counters::add(&counters.changes_received, fresh.len() as u64);
        let done = self.hub.dispatch_group(fresh);
        Counters::add(&counters.deliveries_queued, done.deliveries as u64);
        if done.units > 0 {
            self.held_encoding_us.push(done.encoding_us);
        }
        self.set_position(last);
    }

    fn set_position(&mut self, position: Position) {
        self.position = Some(position);
        self.telemetry
            .feed
            .position
            .store(position.0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Proves the LISTEN connection alive.
    async fn heartbeat(&self, client: &tokio_postgres::Client) -> anyhow::Result<()> {
        // Liveness only: the clock offset is estimated by the telemetry
        // monitor, from round-trip-corrected samples on a pool connection.
        tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query(""))
            .await
            .map_err(|_| anyhow!("LISTEN connection silent for {HEARTBEAT_TIMEOUT:?}"))?
            .context("LISTEN connection heartbeat")?;
        Ok(())
    }
}

type Notifications = mpsc::Receiver<Result<String, tokio_postgres::Error>>;

/// Connects the dedicated LISTEN connection. Notifications only arrive when
/// the connection is driven with `poll_message`, so a task does that and
/// forwards them; when the connection dies, the error (or the channel's end)
/// tells the session.
async fn listen(
    database_url: &str,
    channel: &str,
) -> anyhow::Result<(tokio_postgres::Client, Notifications, tokio::task::JoinHandle<()>)> {
    let mut config: tokio_postgres::Config = database_url.parse().context("parsing DATABASE_URL")?;
    config
        .application_name("ws-gateway feed")
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .context("connecting the LISTEN connection")?;
    // Bounded: if dispatch falls behind, the driver stops reading and
    // PostgreSQL keeps the notifications queued on its side.
    let (tx, rx) = mpsc::channel(16 * 1024);
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let forwarded = match message {
                Ok(AsyncMessage::Notification(n)) => tx.send(Ok(n.payload().to_owned())).await,
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(notice = %notice, "notice on the LISTEN connection");
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(error) => {
                    let _ = tx.send(Err(error)).await;
                    return;
                }
            };
            if forwarded.is_err() {
                return;
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .context("LISTEN")?;
    Ok((client, rx, driver))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
