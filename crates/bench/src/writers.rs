//! The database side of a delivery run: paced writers (each row one commit)
//! and the floor listener, on a thread and runtime of their own so that the
//! clients' flood of frames neither delays a send stamp nor skews the pacing.
//!
//! Writer `w` of `W` writes rows `w, w + W, ...` when each falls due; a writer
//! that falls behind sends at once (the lag is reported). A row's send time
//! is stamped just before its INSERT goes to the writer's connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use futures_util::future::join_all;
use tokio::sync::oneshot;
use tokio_postgres::NoTls;
use tokio_util::sync::CancellationToken;

use super::clock::SendLog;
use super::floor::{Floor, FloorOutcome, FloorSpec};
use super::latency::LatencyRecorder;
use super::plan::Schedule;
use super::table;

pub struct WriterSpec {
    pub db_url: String,
    pub writers: usize,
    pub schedule: Schedule,
    pub total_rows: u64,
    pub rooms: u64,
    pub payload_bytes: usize,
    pub run_seed: u64,
    /// Rows up to this id are warmup: their commits are not timed.
    pub measure_after_id: u64,
}

/// What the monitor reads while writers run.
pub struct WriteProgress {
    pub committed: AtomicU64,
    pub committed_per_room: Box<[AtomicU64]>,
    /// Rows the floor listener has received (distinct).
    pub floor_delivered: Arc<AtomicU64>,
    /// Each INSERT's round trip, send to commit acknowledged: the part of
    /// every commit-to-receive number spent before the commit.
    pub commit_latency: LatencyRecorder,
}

impl WriteProgress {
    pub fn new(rooms: u64) -> WriteProgress {
        WriteProgress {
            committed: AtomicU64::new(0),
            committed_per_room: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            floor_delivered: Arc::new(AtomicU64::new(0)),
            commit_latency: LatencyRecorder::new(1),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct WriteOutcome {
    pub committed_per_room: Vec<u64>,
    pub failed: u64,
    pub first_error: Option<String>,
    /// First send and last commit, on the run's clock (us).
    pub first_send_us: u64,
    pub last_commit_us: u64,
    /// How far behind its schedule the slowest send was.
    pub max_behind: Duration,
}

impl WriteOutcome {
    pub fn committed(&self) -> u64 {
        self.committed_per_room.iter().sum()
    }

    fn merge(&mut self, other: WriteOutcome) {
        if self.committed_per_room.len() < other.committed_per_room.len() {
            self.committed_per_room.resize(other.committed_per_room.len(), 0);
        }
        for (total, n) in self.committed_per_room.iter_mut().zip(&other.committed_per_room) {
            *total += n;
        }
        self.failed += other.failed;
        self.first_error = self.first_error.take().or(other.first_error);
        if other.first_send_us > 0 && (self.first_send_us == 0 || other.first_send_us < self.first_send_us) {
            self.first_send_us = other.first_send_us;
        }
        self.last_commit_us = self.last_commit_us.max(other.last_commit_us);
        self.max_behind = self.max_behind.max(other.max_behind);
    }
}

/// The writer thread, connected and waiting for [`DbSide::go`].
pub struct DbSide {
    go: Option<oneshot::Sender<()>>,
    writes: Option<oneshot::Receiver<Result<WriteOutcome>>>,
    floor: Option<oneshot::Receiver<Option<FloorOutcome>>>,
    /// Stops writers early (interrupt) and, after the writes, the floor.
    stop_floor: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DbSide {
    /// Starts the thread, connects every writer (and the floor listener) and
    /// returns once they are ready.
    pub async fn start(
        spec: WriterSpec,
        floor: Option<FloorSpec>,
        send_log: Arc<SendLog>,
        progress: Arc<WriteProgress>,
        floor_latency: Arc<LatencyRecorder>,
        interrupt: CancellationToken,
    ) -> Result<DbSide> {
        let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
        let (go_tx, go_rx) = oneshot::channel::<()>();
        let (writes_tx, writes_rx) = oneshot::channel();
        let (floor_tx, floor_rx) = oneshot::channel();
        let stop_floor = CancellationToken::new();
        let stop_floor_inner = stop_floor.clone();
        let thread = std::thread::Builder::new()
            .name("bench-writers".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow!(e).context("writer runtime")));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let floor = match &floor {
                        Some(spec) => {
                            let delivered = Arc::clone(&progress.floor_delivered);
                            match Floor::listen(spec, Arc::clone(&send_log), floor_latency, delivered).await {
                                Ok(floor) => Some(floor),
                                Err(e) => {
                                    let _ = ready_tx.send(Err(e));
                                    return;
                                }
                            }
                        }
                        None => None,
                    };
                    let connected = join_all((0..spec.writers).map(|_| connect_writer(&spec.db_url))).await;
                    let mut writers = Vec::with_capacity(connected.len());
                    for writer in connected {
                        match writer {
                            Ok(writer) => writers.push(writer),
                            Err(e) => {
                                let _ = ready_tx.send(Err(e));
                                return;
                            }
                        }
                    }
                    let _ = ready_tx.send(Ok(()));
                    if go_rx.await.is_err() {
                        return;
                    }
                    let start = Instant::now();
                    let spec = Arc::new(spec);
                    let payload: Arc<str> = table::payload(spec.payload_bytes).into();
                    let runs = writers.into_iter().enumerate().map(|(w, writer)| {
                        run_writer(
                            w as u64,
                            writer,
                            Arc::clone(&spec),
                            Arc::clone(&payload),
                            start,
                            Arc::clone(&send_log),
                            Arc::clone(&progress),
                            interrupt.clone(),
                        )
                    });
                    let mut outcome = WriteOutcome {
                        committed_per_room: vec![0; spec.rooms as usize],
                        ..WriteOutcome::default()
                    };
                    for one in join_all(runs).await {
                        outcome.merge(one);
                    }
                    let _ = writes_tx.send(Ok(outcome));
                    let floor_outcome = match floor {
                        Some(floor) => {
                            stop_floor_inner.cancelled().await;
                            Some(floor.finish().await)
                        }
                        None => None,
                    };
                    let _ = floor_tx.send(floor_outcome);
                });
            })
            .context("starting the writer thread")?;
        let mut side = DbSide {
            go: Some(go_tx),
            writes: Some(writes_rx),
            floor: Some(floor_rx),
            stop_floor,
            thread: Some(thread),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(side),
            Ok(Err(e)) => {
                side.join().await;
                Err(e)
            }
            Err(_) => {
                side.join().await;
                Err(anyhow!("the writer thread ended before its writers connected"))
            }
        }
    }

    /// Starts writing; the schedule's time zero is now.
    pub fn go(&mut self) {
        if let Some(go) = self.go.take() {
            let _ = go.send(());
        }
    }

    /// Resolves once every writer has written its rows (or stopped). Taken
    /// once, so that a `select!` loop can poll it by reference.
    pub fn writes(&mut self) -> WritesDone {
        WritesDone(self.writes.take())
    }

    /// Stops the floor listener and the thread; the floor's outcome.
    pub async fn finish(mut self) -> Option<FloorOutcome> {
        self.stop_floor.cancel();
        let floor = match self.floor.take() {
            Some(rx) => rx.await.ok().flatten(),
            None => None,
        };
        self.join().await;
        floor
    }

    async fn join(&mut self) {
        self.go.take();
        self.stop_floor.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// See [`DbSide::writes`].
pub struct WritesDone(Option<oneshot::Receiver<Result<WriteOutcome>>>);

impl std::future::Future for WritesDone {
    type Output = Result<WriteOutcome>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        let Some(rx) = self.0.as_mut() else {
            return std::task::Poll::Ready(Err(anyhow!("the writes were already awaited")));
        };
        std::pin::Pin::new(rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(anyhow!("the writer thread ended without reporting"))))
    }
}

/// One writer connection and its prepared INSERT.
pub struct Writer {
    pub client: tokio_postgres::Client,
    pub insert: tokio_postgres::Statement,
}

pub async fn connect_writer(db_url: &str) -> Result<Writer> {
    let mut config: tokio_postgres::Config = db_url.parse().context("parsing the database URL")?;
    config
        .application_name("ws-gateway bench writer")
        .connect_timeout(Duration::from_secs(10));
    let (client, connection) = config.connect(NoTls).await.context("connecting a writer")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let insert = client
        .prepare(table::INSERT)
        .await
        .context("preparing the writer's INSERT")?;
    Ok(Writer { client, insert })
}

#[allow(clippy::too_many_arguments)]
async fn run_writer(
    w: u64,
    writer: Writer,
    spec: Arc<WriterSpec>,
    payload: Arc<str>,
    start: Instant,
    send_log: Arc<SendLog>,
    progress: Arc<WriteProgress>,
    interrupt: CancellationToken,
) -> WriteOutcome {
    let mut outcome = WriteOutcome {
        committed_per_room: vec![0; spec.rooms as usize],
        ..WriteOutcome::default()
    };
    let mut row = w;
    while row < spec.total_rows {
        let due = start + spec.schedule.due(row);
        let now = Instant::now();
        if due > now {
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                () = interrupt.cancelled() => break,
            }
        } else {
            outcome.max_behind = outcome.max_behind.max(now - due);
            if interrupt.is_cancelled() {
                break;
            }
        }
        let id = row + 1;
        let room = row % spec.rooms;
        let nonce = table::nonce(spec.run_seed, id);
        let sent = send_log.record_send(id);
        if outcome.first_send_us == 0 {
            outcome.first_send_us = sent;
        }
        let result = writer
            .client
            .execute(
                &writer.insert,
                &[&(id as i64), &(room as i32), &nonce, &(sent as i64), &&*payload],
            )
            .await;
        match result {
            Ok(_) => {
                let now = send_log.clock.now_us();
                if id > spec.measure_after_id {
                    progress.commit_latency.record(0, &[now.saturating_sub(sent)]);
                }
                outcome.committed_per_room[room as usize] += 1;
                outcome.last_commit_us = now;
                progress.committed_per_room[room as usize].fetch_add(1, Ordering::Relaxed);
                progress.committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                send_log.mark_failed(id);
                outcome.failed += 1;
                if outcome.first_error.is_none() {
                    outcome.first_error = Some(format!("writer {w}: {e}"));
                }
                if writer.client.is_closed() {
                    break;
                }
            }
        }
        row += spec.writers as u64;
    }
    outcome
}
