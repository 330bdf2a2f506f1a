//! A connection as the hub sees it: a queue bounded by bytes that the
//! connection's send task works through, and a way to ask for a close.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;

use super::Room;
use super::close::{CloseKind, CloseReason};
use crate::change::Position;
use crate::pipeline::encode::{Compression, Encoding, Unit};
use crate::telemetry::writes::HeldWrites;

/// What a connection's send task works through, in order. Kept to 16 bytes
/// (each variant one pointer): every connection's queue holds these.
#[derive(Debug)]
pub enum Outbound {
    /// A protocol message (welcome, subscribed, error, reset) or a replayed
    /// change: plain text, not measured as a live delivery.
    Control(Box<Utf8Bytes>),
    /// Live changes for one room, encoded once for every member.
    Changes(Arc<Unit>),
    /// Read the room's history `(since, upto]` from the outbox and send it
    /// here: live changes queued after this item are all past `upto`, so the
    /// replay and the live stream join with no gap and no duplicate.
    Replay(Box<ReplayRange>),
}

#[derive(Debug)]
pub struct ReplayRange {
    /// One room (`/ws`), or every room of a multi-room `/sse` stream, whose
    /// history is then read as one sequence in position order.
    pub rooms: Vec<Room>,
    pub since: Position,
    pub upto: Position,
}

impl Outbound {
    /// Whether it goes out at once even while the socket lingers
    /// (`GATEWAY_BATCH_LINGER_MS`): everything but normal-priority changes.
    pub fn must_not_wait(&self) -> bool {
        match self {
            Outbound::Changes(unit) => unit.priority,
            Outbound::Control(_) | Outbound::Replay(_) => true,
        }
    }

    /// Bytes it holds in the queue, as counted against the queue's bound.
    pub fn queued_size(&self) -> usize {
        match self {
            Outbound::Control(text) => text.len(),
            Outbound::Changes(unit) => unit.text.len(),
            Outbound::Replay(_) => 0,
        }
    }
}

/// The sending half of one WebSocket connection, as the rest of the gateway
/// sees it: a queue bounded by bytes, and a way to ask for a close.
///
/// The queue is a `VecDeque` under a mutex rather than a channel: an idle
/// connection then holds no channel blocks (a tokio mpsc costs ~1.8 KiB per
/// connection before its first message), and the send task takes what
/// waits in one lock.
#[derive(Debug)]
pub struct Subscriber {
    pub id: u64,
    /// What it is sent must be in position order across all its rooms, each
    /// position whole in one item: a multi-room `/sse` stream, whose one
    /// event id resumes every room. A WebSocket client resumes per room, so
    /// it shares each room's units instead.
    pub ordered: bool,
    queue: Mutex<QueueState>,
    /// Wakes the send task: an item was queued into an empty queue, or a
    /// close was requested. The send task waits on this one thing only, and
    /// it is the only task that waits on it: one waker slot is enough, and
    /// waking it takes no lock (a `Notify` locked its waiter list on every
    /// wait and every wake, twice per delivery).
    queued: AtomicWaker,
    /// The send task is lingering after a write (`QueueReceiver::linger`):
    /// only an item that must not wait wakes it.
    lingering: AtomicBool,
    /// Bytes queued and not yet written to the socket: the queue's bound
    /// (`GATEWAY_SEND_QUEUE_BYTES`).
    queued_bytes: AtomicUsize,
    queue_limit: usize,
    /// Set once; after it nothing more is queued, so what the client got is a
    /// gap-free prefix it can resume from.
    closing: AtomicBool,
    close_reason: Mutex<Option<CloseReason>>,
    /// The socket's descriptor while the dispatcher may write live changes
    /// to it itself ([`Subscriber::push_live`]); -1 otherwise.
    direct_fd: AtomicI32,
    /// The client's encoding, for those writes ([`Encoding`] as u8).
    direct_encoding: AtomicU8,
    /// Who may write the socket: [`WRITER_IDLE`] (the send task waits with
    /// nothing in hand: a pusher may take it), [`WRITER_TASK`] or
    /// [`WRITER_DIRECT`] (a pusher is writing).
    writer: AtomicU8,
}

/// The raw descriptor of a connection's TCP socket, from accept.
#[derive(Debug, Clone, Copy)]
pub struct SocketFd(pub i32);

const WRITER_IDLE: u8 = 0;
const WRITER_TASK: u8 = 1;
const WRITER_DIRECT: u8 = 2;

/// How the dispatcher may write live changes itself, and what it wrote,
/// for the feed to record as a send loop records its writes.
#[derive(Debug, Default)]
pub struct DirectWrites {
    /// Compression as the send loop does it.
    pub compression: Option<Compression>,
    /// Per change written: its commit time (database clock) and when it
    /// was written (this host's clock), microseconds.
    pub sent: Vec<(i64, i64)>,
    pub held: HeldWrites,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Outbound>,
    /// The send task is gone: nothing is queued any more.
    detached: bool,
}

/// The send task's end of a connection's queue. Dropping it detaches the
/// queue: later pushes fail and what was queued is freed.
#[derive(Debug)]
pub struct QueueReceiver {
    subscriber: Arc<Subscriber>,
}

impl QueueReceiver {
    /// The next queued item, if one is waiting.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.subscriber.pop()
    }

    /// Waits for the next item; `None` once a close has been requested
    /// (what is still queued stays for [`QueueReceiver::try_recv`]).
    pub async fn recv(&mut self) -> Option<Outbound> {
        let subscriber = &self.subscriber;
        let look = || {
            if subscriber.is_closing() {
                return Poll::Ready(None);
            }
            subscriber.pop().map_or(Poll::Pending, |item| Poll::Ready(Some(item)))
        };
        std::future::poll_fn(|cx| {
            // What waits is taken without registering; before going to
            // sleep, register and look again: a push or a close after that
            // second look wakes it.
            if let Poll::Ready(item) = look() {
                return Poll::Ready(item);
            }
            subscriber.queued.register(cx.waker());
            look()
        })
        .await
    }

    /// Waits until `until` (`GATEWAY_BATCH_LINGER_MS` after the socket's
    /// last write), or until an item that must not wait is queued
    /// (a protocol message, a replay, a critical or high priority change)
    /// or a close is requested. Meanwhile other pushes do not wake the send
    /// task: what they queue goes out together when the wait ends.
    pub async fn linger(&mut self, until: tokio::time::Instant) {
        let subscriber = &self.subscriber;
        subscriber.lingering.store(true, Ordering::SeqCst);
        let mut deadline = std::pin::pin!(tokio::time::sleep_until(until));
        std::future::poll_fn(|cx| {
            // A wake from an earlier push polls this once for nothing: the
            // checks below send it back to sleep.
            subscriber.queued.register(cx.waker());
            if subscriber.is_closing() || subscriber.has_urgent() {
                return Poll::Ready(());
            }
            deadline.as_mut().poll(cx)
        })
        .await;
        subscriber.lingering.store(false, Ordering::SeqCst);
    }

    /// Resolves once a close has been requested.
    pub async fn closed(&self) -> CloseReason {
        let subscriber = &self.subscriber;
        std::future::poll_fn(|cx| {
            subscriber.queued.register(cx.waker());
            if !subscriber.is_closing() {
                return Poll::Pending;
            }
            // Set before `closing` is seen only by a racing `close`, which
            // wakes this again once the reason is in.
            match subscriber.close_reason() {
                Some(reason) => Poll::Ready(reason),
                None => Poll::Pending,
            }
        })
        .await
    }
}

impl Drop for QueueReceiver {
    fn drop(&mut self) {
        let mut queue = self.subscriber.queue.lock().expect("queue lock");
        queue.detached = true;
        queue.items = VecDeque::new();
    }
}

impl Subscriber {
    pub fn new(id: u64, queue_limit: usize) -> (Arc<Subscriber>, QueueReceiver) {
        Subscriber::with_order(id, queue_limit, false)
    }

    /// A subscriber whose items must be in position order across its rooms
    /// (see [`Subscriber::ordered`]).
    pub fn with_order(id: u64, queue_limit: usize, ordered: bool) -> (Arc<Subscriber>, QueueReceiver) {
        let sub = Arc::new(Subscriber {
            id,
            ordered,
            queue: Mutex::new(QueueState::default()),
            queued: AtomicWaker::new(),
            lingering: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            queue_limit,
            closing: AtomicBool::new(false),
            close_reason: Mutex::new(None),
            direct_fd: AtomicI32::new(-1),
            direct_encoding: AtomicU8::new(Encoding::None as u8),
            writer: AtomicU8::new(WRITER_TASK),
        });
        let receiver = QueueReceiver {
            subscriber: Arc::clone(&sub),
        };
        (sub, receiver)
    }

    /// Queues a protocol message.
    pub fn push_control(&self, text: String) -> bool {
        self.push(Outbound::Control(Box::new(text.into())))
    }

    /// Queues an item. A full queue means the client cannot keep up: it is
    /// closed as a slow consumer rather than slowing anyone else down.
    ///
    /// The bound is on what waits, not on what one item weighs: an item
    /// counts for at most half the bound ([`Subscriber::charge`]), so a row
    /// of any size (a 20 MB row against 8 MiB) goes to a reader that reads,
    /// and what queues behind it while it is written is still bounded.
    /// (The item's bytes are shared by every member of its room.)
    pub fn push(&self, item: Outbound) -> bool {
        if self.closing.load(Ordering::Relaxed) {
            return false;
        }
        let len = self.charge(item.queued_size());
        let queued = self.queued_bytes.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.queue_limit {
            self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            self.close(CloseReason::new(
                CloseKind::SlowConsumer,
                "slow consumer: send queue full; resume from your last position",
            ));
            return false;
        }
        let urgent = item.must_not_wait();
        let was_empty = {
            let mut queue = self.queue.lock().expect("queue lock");
            if queue.detached {
                return false;
            }
            queue.items.push_back(item);
            queue.items.len() == 1
        };
        // The send task only waits after finding the queue empty: a push
        // into a queue that has items needs no wake-up. A lingering one
        // takes what waits when the linger ends: only an item that must
        // not wait wakes it. (Read after the queue's lock: a linger that
        // began after this push saw the item when it looked.)
        let wake = if self.lingering.load(Ordering::SeqCst) {
            urgent
        } else {
            was_empty
        };
        if wake {
            self.queued.wake();
        }
        true
    }

    /// Whether an item that must not wait is queued.
    fn has_urgent(&self) -> bool {
        self.queue
            .lock()
            .expect("queue lock")
            .items
            .iter()
            .any(Outbound::must_not_wait)
    }

    /// The next item; the send task holds the socket from here (under the
    /// queue's lock, where a pusher looks before writing itself: an item
    /// taken here is never overtaken by a later one written directly).
    fn pop(&self) -> Option<Outbound> {
        let mut queue = self.queue.lock().expect("queue lock");
        if queue.items.is_empty() {
            return None;
        }
        self.writer_take();
        queue.items.pop_front()
    }

    /// Lets the dispatcher write live changes to the socket `fd` itself
    /// while the send task idles (a WebSocket; not the probe's).
    pub fn write_directly(&self, fd: i32, encoding: Encoding) {
        self.direct_encoding.store(encoding as u8, Ordering::Relaxed);
        self.direct_fd.store(fd, Ordering::Release);
    }

    /// The send task waits with nothing in hand: a pusher may write.
    pub fn writer_idle(&self) {
        if self.direct_fd.load(Ordering::Relaxed) >= 0 {
            self.writer.store(WRITER_IDLE, Ordering::Release);
        }
    }

    /// The send task is about to write: waits out a pusher's write (one
    /// frame into the socket's buffer, or the rest of one it began).
    pub fn writer_take(&self) {
        loop {
            match self
                .writer
                .compare_exchange(WRITER_IDLE, WRITER_TASK, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) | Err(WRITER_TASK) => return,
                Err(_) => std::thread::yield_now(),
            }
        }
    }

    /// No more direct writes (the socket is about to go): waits out one in
    /// progress.
    pub fn stop_direct(&self) {
        self.direct_fd.store(-1, Ordering::Release);
        self.writer_take();
    }

    /// [`Subscriber::push`] for the dispatcher's live changes: written to
    /// the socket at once when the send task idles with nothing queued
    /// and the socket takes the whole frame without waiting (no task
    /// wake-up, no queue); queued otherwise.
    pub fn push_live(&self, item: Outbound, direct: Option<&mut DirectWrites>) -> bool {
        if let (Some(direct), Outbound::Changes(unit)) = (direct, &item)
            && self.direct_fd.load(Ordering::Acquire) >= 0
            && !self.closing.load(Ordering::Relaxed)
        {
            let taken = {
                let queue = self.queue.lock().expect("queue lock");
                !queue.detached
                    && queue.items.is_empty()
                    && self
                        .writer
                        .compare_exchange(WRITER_IDLE, WRITER_DIRECT, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            };
            if taken {
                let wrote = self.write_unit(unit, direct);
                self.writer.store(WRITER_IDLE, Ordering::Release);
                if wrote {
                    return true;
                }
            }
        }
        self.push(item)
    }

    /// One frame of `unit` to the socket, as the send loop would frame it.
    fn write_unit(&self, unit: &Unit, direct: &mut DirectWrites) -> bool {
        let fd = self.direct_fd.load(Ordering::Acquire);
        if fd < 0 {
            return false;
        }
        let encoding = Encoding::from_u8(self.direct_encoding.load(Ordering::Relaxed));
        let started = std::time::Instant::now();
        let (opcode, payload, encoding) = match unit.compressed_for(encoding, direct.compression) {
            Some((bytes, took)) => {
                if let Some(took) = took {
                    direct.held.encoding_us.push(took.as_micros() as u64);
                }
                (0x82, bytes.as_ref(), encoding)
            }
            None => (0x81, unit.text.as_bytes(), Encoding::None),
        };
        match write_frame(fd, opcode, payload) {
            Frame::Written => {}
            Frame::NotWritten => return false,
            Frame::Cut => {
                // Nothing more can follow half a frame: the connection
                // ends, and the client resumes from its last position.
                self.close(CloseReason::new(
                    CloseKind::SlowConsumer,
                    "slow consumer: a frame could not be written; resume from your last position",
                ));
                // SAFETY: shuts the socket down; its descriptor stays open.
                unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                return false;
            }
        }
        let written = std::time::Instant::now();
        let written_us = crate::change::now_us();
        let changes = unit.change_count();
        direct
            .sent
            .extend(unit.committed_at_us.iter().map(|committed| (*committed, written_us)));
        direct
            .held
            .queueing_us
            .push(started.saturating_duration_since(unit.queued_at).as_micros() as u64);
        direct
            .held
            .socket_write_us
            .push(written.saturating_duration_since(started).as_micros() as u64);
        direct.held.frame(encoding, changes, unit.text.len(), payload.len());
        direct.held.message(payload.len());
        true
    }

    /// What an item of `bytes` counts against the bound.
    fn charge(&self, bytes: usize) -> usize {
        bytes.min(self.queue_limit / 2)
    }

    /// The send task reports an item of `bytes` it has taken from the queue.
    pub fn sent(&self, bytes: usize) {
        self.queued_bytes.fetch_sub(self.charge(bytes), Ordering::Relaxed);
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Asks the send task to close the socket. The first reason wins.
    pub fn close(&self, reason: CloseReason) {
        if self.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.close_reason.lock().expect("close reason lock") = Some(reason);
        self.queued.wake();
    }

    pub fn close_reason(&self) -> Option<CloseReason> {
        self.close_reason.lock().expect("close reason lock").clone()
    }

    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected TCP pair on loopback: (the gateway's end, non-blocking;
    /// the client's end).
    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        (server, client)
    }

    #[test]
    fn a_direct_write_is_one_whole_websocket_frame() {
        use std::io::Read;
        use std::os::fd::AsRawFd;
        let (server, mut client) = tcp_pair();
        let fd = server.as_raw_fd();
        // 7-bit and 16-bit lengths, text and binary.
        let small = b"{\"type\":\"change\"}".to_vec();
        let large = vec![b'x'; 300];
        assert_eq!(write_frame(fd, 0x81, &small), Frame::Written);
        assert_eq!(write_frame(fd, 0x82, &large), Frame::Written);
        let mut got = vec![0u8; 2 + small.len() + 4 + large.len()];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got[..2], &[0x81, small.len() as u8]);
        assert_eq!(&got[2..2 + small.len()], &small[..]);
        let rest = &got[2 + small.len()..];
        assert_eq!(&rest[..4], &[0x82, 126, 1, 44]);
        assert_eq!(&rest[4..], &large[..]);
    }

    #[test]
    fn a_direct_write_leaves_a_socket_that_is_behind_to_the_send_task() {
        use std::os::fd::AsRawFd;
        let (server, client) = tcp_pair();
        let fd = server.as_raw_fd();
        // Larger than a direct write may leave queued: never written.
        assert_eq!(write_frame(fd, 0x81, &vec![b'x'; DIRECT_MAX_QUEUED]), Frame::NotWritten);
        // A client that does not read: once its receive buffer is full and
        // its socket holds more than the bound, nothing more is written
        // directly, and no frame is cut.
        let frame = vec![b'y'; 1000];
        let mut written = 0;
        while write_frame(fd, 0x81, &frame) == Frame::Written {
            written += 1;
            assert!(written < 100_000, "the bound stops direct writes");
        }
        assert!(written >= 1);
        drop(client);
    }

    #[test]
    fn queue_items_are_one_pointer_wide() {
        // Every connection's queue holds these; see `Outbound`.
        assert_eq!(std::mem::size_of::<Outbound>(), 16);
    }

    #[tokio::test]
    async fn a_close_wakes_the_send_task_waiting_on_an_empty_queue() {
        let (sub, mut rx) = Subscriber::new(1, 1 << 20);
        let waiting = tokio::spawn(async move { (rx.recv().await.is_none(), rx.closed().await) });
        tokio::task::yield_now().await;
        sub.close(CloseReason::going_away());
        let (ended, reason) = tokio::time::timeout(std::time::Duration::from_secs(5), waiting)
            .await
            .expect("the close woke the send task")
            .unwrap();
        assert!(ended);
        assert_eq!(reason.kind, CloseKind::Shutdown);
        assert!(!sub.push_control("after the close".into()));
    }

    #[tokio::test]
    async fn recv_gives_nothing_once_closed_even_with_items_queued() {
        let (sub, mut rx) = Subscriber::new(1, 1 << 20);
        assert!(sub.push_control("one".into()));
        sub.close(CloseReason::new(CloseKind::Client, "bye"));
        assert!(rx.recv().await.is_none(), "a close goes before what waits");
        assert!(rx.try_recv().is_some(), "what was queued stays for the drain");
    }

    #[test]
    fn an_item_larger_than_the_bound_counts_for_half_of_it() {
        let (sub, mut rx) = Subscriber::new(1, 100);
        assert!(sub.push_control("x".repeat(1000)), "a row of any size");
        assert_eq!(sub.queued_bytes(), 50);
        assert!(
            sub.push_control("y".repeat(40)),
            "what waits behind it, within the bound"
        );
        assert!(!sub.push_control("z".repeat(20)), "past the bound");
        assert_eq!(sub.close_reason().unwrap().kind, CloseKind::SlowConsumer);
        while let Some(item) = rx.try_recv() {
            sub.sent(item.queued_size());
        }
        assert_eq!(sub.queued_bytes(), 0, "taking items gives back what they counted");
    }

    fn unit(priority: bool) -> Outbound {
        let key = serde_json::value::RawValue::from_string("{\"id\":1}".into()).unwrap();
        let row = serde_json::value::RawValue::from_string("{\"id\":1}".into()).unwrap();
        let change = crate::change::Change::new(
            Position(1),
            0,
            "public".into(),
            "tasks".into(),
            crate::change::Op::Insert,
            &key,
            &row,
            vec!["r".into()],
        );
        Outbound::Changes(Arc::new(Unit::new("r", &[&change], priority)))
    }

    #[tokio::test(start_paused = true)]
    async fn a_linger_is_ended_by_its_deadline_an_urgent_item_or_a_close_not_by_normal_changes() {
        use tokio::time::{Duration, Instant};
        let linger = Duration::from_millis(100);
        let (sub, mut rx) = Subscriber::new(1, 1 << 20);
        // Normal changes queued while it lingers wait for the deadline.
        let started = Instant::now();
        let pushing = {
            let sub = Arc::clone(&sub);
            tokio::spawn(async move {
                for _ in 0..5 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    assert!(sub.push(unit(false)));
                }
            })
        };
        rx.linger(started + linger).await;
        pushing.await.unwrap();
        assert_eq!(Instant::now() - started, linger, "the normal changes did not end it");
        let mut waiting = 0;
        while rx.try_recv().is_some() {
            waiting += 1;
        }
        assert_eq!(waiting, 5, "all of them wait for the one write after it");
        // A critical (or high) change ends it at once; so does a protocol
        // message (a pong, an error).
        for urgent in [unit(true), Outbound::Control(Box::new("pong".into()))] {
            let started = Instant::now();
            let pushing = {
                let sub = Arc::clone(&sub);
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    assert!(sub.push(unit(false)));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    assert!(sub.push(urgent));
                })
            };
            rx.linger(started + linger).await;
            pushing.await.unwrap();
            assert_eq!(Instant::now() - started, Duration::from_millis(20));
            assert!(rx.try_recv().is_some() && rx.try_recv().is_some() && rx.try_recv().is_none());
        }
        // Already queued: it does not wait at all.
        assert!(sub.push(unit(true)));
        let started = Instant::now();
        rx.linger(started + linger).await;
        assert_eq!(Instant::now(), started);
        rx.try_recv();
        // A close ends it.
        let closing = {
            let sub = Arc::clone(&sub);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30)).await;
                sub.close(CloseReason::going_away());
            })
        };
        let started = Instant::now();
        rx.linger(started + linger).await;
        closing.await.unwrap();
        assert_eq!(Instant::now() - started, Duration::from_millis(30));
    }

    #[test]
    fn a_detached_queue_takes_nothing_more() {
        let (sub, rx) = Subscriber::new(1, 1 << 20);
        assert!(sub.push_control("one".into()));
        drop(rx);
        assert!(!sub.push_control("two".into()), "push after the send task is gone");
    }
}

/// Most bytes a direct write leaves in the socket's send queue: far below
/// the smallest send buffer (16 KiB), so the frame is taken whole, and a
/// client that has fallen behind (more than this unacknowledged) is served
/// by its send task and queue, with their slow-consumer bound.
const DIRECT_MAX_QUEUED: usize = 8 * 1024;

/// What [`write_frame`] did.
#[derive(Debug, PartialEq, Eq)]
enum Frame {
    Written,
    /// Nothing written: the send task takes it.
    NotWritten,
    /// Part of the frame went out and the rest could not follow within a
    /// second: the stream is cut mid-frame and must end.
    Cut,
}

/// One unmasked WebSocket frame (`opcode`: 0x81 text, 0x82 binary) of
/// `payload` on a non-blocking socket, if the socket's send queue has room
/// for it (see [`DIRECT_MAX_QUEUED`]).
fn write_frame(fd: i32, opcode: u8, payload: &[u8]) -> Frame {
    let mut header = [0u8; 10];
    let len = payload.len();
    header[0] = opcode;
    let header_len = if len < 126 {
        header[1] = len as u8;
        2
    } else if len < 65536 {
        header[1] = 126;
        header[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        header[1] = 127;
        header[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    let total = header_len + len;
    if total > DIRECT_MAX_QUEUED {
        return Frame::NotWritten;
    }
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int: the bytes in the socket's
    // send queue, unsent or unacknowledged.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 || queued as usize + total > DIRECT_MAX_QUEUED {
        return Frame::NotWritten;
    }
    let mut done = 0usize;
    while done < total {
        let (head, body) = if done < header_len {
            (&header[done..header_len], payload)
        } else {
            (&header[..0], &payload[done - header_len..])
        };
        let iov = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut libc::c_void,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: body.as_ptr() as *mut libc::c_void,
                iov_len: body.len(),
            },
        ];
        // SAFETY: both iovecs point into live buffers of their lengths; the
        // descriptor stays open while the writer is held (`stop_direct`).
        let n = unsafe { libc::writev(fd, iov.as_ptr(), 2) };
        if n > 0 {
            done += n as usize;
            continue;
        }
        let error = std::io::Error::last_os_error();
        match error.kind() {
            std::io::ErrorKind::Interrupted => {}
            std::io::ErrorKind::WouldBlock if done > 0 => {
                let mut poll = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd, valid for the call.
                if unsafe { libc::poll(&mut poll, 1, 1000) } <= 0 {
                    return Frame::Cut;
                }
            }
            _ if done > 0 => return Frame::Cut,
            _ => return Frame::NotWritten,
        }
    }
    Frame::Written
}
