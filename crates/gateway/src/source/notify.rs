//! The notify source (SPEC section 2, `GATEWAY_SOURCE=notify`): one
//! dedicated LISTEN connection that turns the database's notifications into
//! commit-ordered changes.
//!
//! A session connects, LISTENs, waits out the transactions committing right
//! now, catches up from the outbox after the last position dispatched, then
//! follows notifications live. Catching up from that position after any
//! reconnect is what loses nothing.
//!
//! In wal mode the leader's instance also takes [`HandOff`]s: the leader's
//! committed batches, ahead of their NOTIFYs (which then find them
//! dispatched, and are dropped as any repeat is). Taking one can never
//! reorder or lose anything: it is taken only when its first position
//! follows the last one dispatched. A position is drawn under the position
//! lock, held until its transaction ends, so when the leader's commit
//! returns every smaller position has committed or never will; and the
//! feed dispatches in commit order, so with the one just before it
//! dispatched, none of those is still to come. Any other hand-off (the
//! feed behind, or a position of someone else's in between, as during a
//! switch) is dropped, and its NOTIFY delivers it.

use std::time::Duration;

use anyhow::{Context, anyhow};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::listen::{AbortOnDrop, listen};
use super::{Dispatcher, HandOff, Source};
use crate::change::{Change, Notification, Position};
use crate::db;
use crate::telemetry::FeedState;

/// Most notifications dispatched as one group.
const MAX_GROUP: usize = 512;
/// Rows read per catch-up query.
const CATCH_UP_PAGE: i64 = 1000;
/// How often the LISTEN connection is checked; with the timeout this bounds
/// how long a silent, dead connection goes unnoticed (SPEC: /healthz says
/// 503 within 5 s).
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Any single database call of the source. A partition leaves a call hanging
/// rather than failing (connect timeouts cover only the TCP handshake), and
/// a hung session must end so that a new one can start.
const DB_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a database call of the source under [`DB_CALL_TIMEOUT`].
async fn bounded<T, E>(what: &str, call: impl Future<Output = Result<T, E>>) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(DB_CALL_TIMEOUT, call).await {
        Ok(result) => result.with_context(|| what.to_owned()),
        Err(_) => Err(anyhow!("{what}: no answer from the database in {DB_CALL_TIMEOUT:?}")),
    }
}

pub struct NotifySource {
    database_url: String,
    channel: String,
    pool: PgPool,
    /// The wal leader's committed batches, in wal mode.
    handoffs: Option<tokio::sync::mpsc::Receiver<HandOff>>,
}

impl NotifySource {
    pub fn new(database_url: String, channel: String, pool: PgPool) -> NotifySource {
        NotifySource {
            database_url,
            channel,
            pool,
            handoffs: None,
        }
    }

    /// Also takes the wal leader's [`HandOff`]s (see the module
    /// documentation).
    pub fn with_handoffs(mut self, handoffs: tokio::sync::mpsc::Receiver<HandOff>) -> NotifySource {
        self.handoffs = Some(handoffs);
        self
    }
}

impl Source for NotifySource {
    fn name(&self) -> &'static str {
        "notify"
    }

    /// One session: connect, LISTEN, catch up, then follow live. Returns Ok
    /// only on shutdown.
    async fn session(&mut self, out: &mut Dispatcher, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let (client, mut notifications, driver) =
            tokio::time::timeout(DB_CALL_TIMEOUT, listen(&self.database_url, &self.channel))
                .await
                .map_err(|_| anyhow!("connecting the LISTEN connection: no answer in {DB_CALL_TIMEOUT:?}"))??;
        let _driver = AbortOnDrop(driver);
        out.set_state(FeedState::CatchingUp);

        // LISTEN is in place: every commit from now on is notified. Wait out
        // the transactions committing right now, then read the outbox: a
        // change is in the read or in the notifications, or in both.
        let caught_up = self.catch_up(out).await?;
        tracing::info!(position = caught_up.0, "feed live");
        out.set_state(FeedState::Live);

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
                        let changes = read_notifications(&self.pool, out, payloads).await?;
                        out.live(changes);
                        if let Some(error) = failed {
                            return Err(error).context("LISTEN connection failed");
                        }
                    }
                    Some(Err(error)) => return Err(error).context("LISTEN connection failed"),
                    None => return Err(anyhow!("LISTEN connection closed")),
                },
                handoff = next_handoff(&mut self.handoffs) => {
                    if out.is_next(handoff.first) {
                        let changes = read_notifications(&self.pool, out, vec![handoff.payload]).await?;
                        out.handed_off(changes);
                    }
                }
                _ = heartbeat.tick() => heartbeat_check(&client).await?,
            }
        }
    }
}

impl NotifySource {
    async fn catch_up(&self, out: &mut Dispatcher) -> anyhow::Result<Position> {
        bounded("waiting out committing transactions", db::wait_out_commits(&self.pool)).await?;
        let mut from = match out.position() {
            Some(p) => {
                let pruned_through =
                    bounded("reading how far the outbox was pruned", db::pruned_through(&self.pool)).await?;
                if p < pruned_through {
                    // Down for longer than the retention: changes after our
                    // position are gone.
                    out.history_lost(pruned_through);
                    pruned_through
                } else {
                    p
                }
            }
            None => {
                // First session: live from the end of the outbox.
                let end = db::outbox_end(&self.pool)
                    .await
                    .context("reading the end of the outbox")?;
                out.start_at(end);
                end
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
            out.caught_up(changes);
            if (page.len() as i64) < CATCH_UP_PAGE {
                return Ok(from);
            }
        }
    }
}

/// The next hand-off; never, without any.
async fn next_handoff(handoffs: &mut Option<tokio::sync::mpsc::Receiver<HandOff>>) -> HandOff {
    if let Some(receiver) = handoffs {
        if let Some(handoff) = receiver.recv().await {
            return handoff;
        }
        // The leader's side is gone (it never is before shutdown).
        *handoffs = None;
    }
    std::future::pending().await
}

/// References read back from the outbox per statement: one round trip for
/// a wal batch's many large rows instead of one each, and never more than
/// this many documents' text held at once.
const REFERENCES_PER_READ: usize = 64;

/// The changes of notification payloads, large ones read from the outbox.
async fn read_notifications(pool: &PgPool, out: &Dispatcher, payloads: Vec<String>) -> anyhow::Result<Vec<Change>> {
    // Each slot is a change, or the position of one to read back.
    let mut slots: Vec<Result<Change, Position>> = Vec::with_capacity(payloads.len());
    for payload in &payloads {
        // One document (the trigger's), or several (the wal leader's).
        let notifications = match Notification::parse_payload(payload) {
            Ok(notifications) => notifications,
            Err(error) => {
                tracing::warn!(%error, "ignoring a notification on the gateway's channel that is not a change");
                continue;
            }
        };
        for notification in notifications {
            match notification {
                Notification::Change(change) => slots.push(Ok(change)),
                Notification::Reference(position) if out.is_new(position) => slots.push(Err(position)),
                Notification::Reference(_) => {}
            }
        }
    }
    let wanted: Vec<Position> = slots.iter().filter_map(|slot| slot.as_ref().err().copied()).collect();
    let mut read = Vec::with_capacity(wanted.len());
    for chunk in wanted.chunks(REFERENCES_PER_READ) {
        read.extend(fetch(pool, chunk).await?);
    }
    let mut read = read.into_iter();
    Ok(slots
        .into_iter()
        .map(|slot| slot.unwrap_or_else(|_| read.next().expect("fetch returns one change per position")))
        .collect())
}

/// Reads changes too large for their NOTIFY payloads back from the outbox,
/// in the order of `positions`.
async fn fetch(pool: &PgPool, positions: &[Position]) -> anyhow::Result<Vec<Change>> {
    let what = match positions {
        [one] => format!("reading change {one} from the outbox"),
        _ => format!("reading {} changes from the outbox", positions.len()),
    };
    let docs = bounded(&what, db::change_documents(pool, positions)).await?;
    let mut docs = docs.into_iter();
    positions
        .iter()
        .map(|&position| {
            let doc = match docs.next() {
                Some((at, doc)) if at == position.0 => doc,
                _ => return Err(anyhow!("change {position} is not in the outbox")),
            };
            match Notification::parse(&doc)? {
                Notification::Change(change) => Ok(change),
                Notification::Reference(_) => Err(anyhow!("outbox document for {position} is a reference")),
            }
        })
        .collect()
}

/// Proves the LISTEN connection alive.
async fn heartbeat_check(client: &tokio_postgres::Client) -> anyhow::Result<()> {
    // Liveness only: the clock offset is estimated by the telemetry
    // monitor, from round-trip-corrected samples on a pool connection.
    tokio::time::timeout(HEARTBEAT_TIMEOUT, client.simple_query(""))
        .await
        .map_err(|_| anyhow!("LISTEN connection silent for {HEARTBEAT_TIMEOUT:?}"))?
        .context("LISTEN connection heartbeat")?;
    Ok(())
}
