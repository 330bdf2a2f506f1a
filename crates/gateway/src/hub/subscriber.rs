//! A connection as the hub sees it: a queue bounded by bytes that the
//! connection's send task works through, and a way to ask for a close.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use axum::extract::ws::Utf8Bytes;
use futures_util::task::AtomicWaker;

use super::Room;
use super::close::{CloseKind, CloseReason};
use crate::change::Position;
use crate::pipeline::encode::Unit;

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

    fn pop(&self) -> Option<Outbound> {
        self.queue.lock().expect("queue lock").items.pop_front()
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
