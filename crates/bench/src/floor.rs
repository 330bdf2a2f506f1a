//! The physical floor: one plain LISTEN connection on the gateway's channel,
//! timing commit-to-notification for the same rows the gateway's clients
//! time. Nothing can deliver a change faster than PostgreSQL notifies it.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::clock::SendLog;
use super::latency::LatencyRecorder;
use super::ledger::RoomLedger;

/// What the listener saw.
pub struct FloorOutcome {
    /// Every row is "room 0 of 1" here: one receiver of everything.
    pub ledger: RoomLedger,
    pub error: Option<String>,
}

pub struct Floor {
    task: tokio::task::JoinHandle<FloorOutcome>,
    stop: CancellationToken,
    /// The connection lives as long as its client.
    _client: tokio_postgres::Client,
}

/// The capture trigger's document (migrations/0001_realtime.sql); only what
/// identifies the row.
#[derive(Deserialize)]
struct Document<'a> {
    p: i64,
    #[serde(borrow, default)]
    tb: Option<Cow<'a, str>>,
    #[serde(default)]
    k: Option<Key>,
}

#[derive(Deserialize)]
struct Key {
    id: u64,
}

/// The wal leader's payload: several documents (migrations/0006).
#[derive(Deserialize)]
struct Documents<'a> {
    #[serde(borrow)]
    docs: Vec<Document<'a>>,
}

fn documents(payload: &str) -> Vec<Document<'_>> {
    if payload.starts_with("{\"docs\":") {
        serde_json::from_str::<Documents>(payload).map_or_else(|_| Vec::new(), |d| d.docs)
    } else {
        serde_json::from_str::<Document>(payload).map_or_else(|_| Vec::new(), |d| vec![d])
    }
}

/// The table name the capture trigger reports for bench rows.
const TABLE_NAME: &str = "bench_events";

pub struct FloorSpec {
    pub db_url: String,
    pub channel: String,
    /// Rows up to this id are warmup: counted, not timed.
    pub measure_after_id: u64,
}

impl Floor {
    /// Connects and LISTENs; from return on, every commit is seen.
    pub async fn listen(
        spec: &FloorSpec,
        send_log: Arc<SendLog>,
        recorder: Arc<LatencyRecorder>,
        delivered: Arc<AtomicU64>,
    ) -> Result<Floor> {
        let mut config: tokio_postgres::Config = spec.db_url.parse().context("parsing the database URL")?;
        config
            .application_name("ws-gateway bench floor")
            .connect_timeout(Duration::from_secs(10));
        let (client, mut connection) = config
            .connect(NoTls)
            .await
            .context("connecting the floor's LISTEN connection")?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let measure_after = spec.measure_after_id;
        let task = tokio::spawn(async move {
            let mut ledger = RoomLedger::new(0, 1);
            let mut error = None;
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            loop {
                let message = tokio::select! {
                    biased;
                    () = stopped.cancelled() => break,
                    message = messages.next() => message,
                };
                let payload = match message {
                    Some(Ok(AsyncMessage::Notification(n))) => n,
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        error = Some(format!("floor connection failed: {e}"));
                        break;
                    }
                    None => {
                        error = Some("floor connection closed".to_owned());
                        break;
                    }
                };
                let now = send_log.clock.now_us();
                for doc in documents(payload.payload()) {
                    if doc.tb.as_deref() != Some(TABLE_NAME) {
                        continue;
                    }
                    let Some(key) = doc.k else { continue };
                    if ledger.observe(key.id, doc.p) == super::ledger::Seen::First {
                        delivered.store(ledger.unique(), Ordering::Relaxed);
                        if key.id > measure_after
                            && let Some(sent) = send_log.sent_at(key.id)
                        {
                            recorder.record(0, &[now.saturating_sub(sent)]);
                        }
                    }
                }
            }
            FloorOutcome { ledger, error }
        });
        client
            .batch_execute(&format!("LISTEN \"{}\"", spec.channel.replace('"', "\"\"")))
            .await
            .context("LISTEN on the floor connection")?;
        Ok(Floor {
            task,
            stop,
            _client: client,
        })
    }

    pub async fn finish(self) -> FloorOutcome {
        self.stop.cancel();
        match self.task.await {
            Ok(outcome) => outcome,
            Err(e) => FloorOutcome {
                ledger: RoomLedger::new(0, 1),
                error: Some(format!("floor task failed: {e}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_one_document_or_the_wal_leaders_several() {
        let one = r#"{"p":5,"t":1,"s":"public","tb":"bench_events","op":"INSERT","k":{"id":9},"r":{},"rooms":[]}"#;
        let docs = documents(one);
        assert_eq!(
            (docs.len(), docs[0].p, docs[0].k.as_ref().map(|k| k.id)),
            (1, 5, Some(9))
        );
        let several = format!(r#"{{"docs":[{one},{{"p":6,"ref":true}}]}}"#);
        let docs = documents(&several);
        assert_eq!(docs.iter().map(|d| d.p).collect::<Vec<_>>(), [5, 6]);
        assert!(documents("not json").is_empty());
    }
}
