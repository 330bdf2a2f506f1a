//! A connection's two halves in its one task, each polled only when it was
//! woken.
//!
//! `tokio::select!` polls every branch whenever the task wakes. At high load
//! nearly every wake-up is a delivery for the send half, and each also
//! polled the receive half for nothing: the split socket's lock,
//! tungstenite's read path, the socket's readiness, the token's timer. Here
//! the receive half gets a waker of its own, which marks it woken before it
//! wakes the task; the send half, polled on every wake-up, uses the task's.

use std::mem::ManuallyDrop;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, RawWaker, RawWakerVTable, Waker};

use crate::state::Liveness;

/// Which half ended first.
pub(super) enum First {
    Send,
    Receive,
}

/// Runs both halves until one ends: the send half on every wake-up, the
/// receive half on its own wake-ups only (and once at the start).
pub(super) async fn race(
    mut send: Pin<&mut impl Future<Output = ()>>,
    mut receive: Pin<&mut impl Future<Output = ()>>,
    liveness: &Arc<Liveness>,
) -> First {
    let wake = &liveness.receive_wake;
    wake.woken.store(true, Ordering::Relaxed);
    std::future::poll_fn(|cx| {
        // Before either half is polled: a wake-up of the receive half
        // during their polls wakes this poll's task.
        wake.task.register(cx.waker());
        if send.as_mut().poll(cx).is_ready() {
            return Poll::Ready(First::Send);
        }
        if wake.woken.swap(false, Ordering::AcqRel) {
            let waker = receive_waker(liveness);
            if receive.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
                return Poll::Ready(First::Receive);
            }
        }
        Poll::Pending
    })
    .await
}

/// The receive half's waker, borrowing the caller's count of the
/// `Liveness`: never dropped (`ManuallyDrop`); its clones count their own.
fn receive_waker(liveness: &Arc<Liveness>) -> ManuallyDrop<Waker> {
    let data = Arc::as_ptr(liveness).cast::<()>();
    // SAFETY: `data` is a live `Arc<Liveness>`'s pointer, which VTABLE's
    // functions treat as one count of that Arc: `clone` takes a count,
    // `wake` and `drop` give one back. This waker itself holds none (it
    // borrows `liveness`, which outlives it) and is never dropped.
    ManuallyDrop::new(unsafe { Waker::from_raw(RawWaker::new(data, &VTABLE)) })
}

static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake_by_ref, drop_waker);

unsafe fn clone(data: *const ()) -> RawWaker {
    // SAFETY: `data` is a counted `Arc<Liveness>` pointer (see `receive_waker`).
    unsafe { Arc::increment_strong_count(data.cast::<Liveness>()) };
    RawWaker::new(data, &VTABLE)
}

unsafe fn wake(data: *const ()) {
    // SAFETY: as in `clone`; this waker's count is given back after.
    unsafe {
        wake_by_ref(data);
        drop_waker(data);
    }
}

unsafe fn wake_by_ref(data: *const ()) {
    // SAFETY: as in `clone`: the Arc is alive while a waker holds a count.
    let liveness = unsafe { &*data.cast::<Liveness>() };
    liveness.receive_wake.woken.store(true, Ordering::Release);
    liveness.receive_wake.task.wake();
}

unsafe fn drop_waker(data: *const ()) {
    // SAFETY: gives back the count this waker's `clone` took.
    unsafe { Arc::decrement_strong_count(data.cast::<Liveness>()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn the_receive_half_is_polled_on_its_own_wake_ups_only() {
        let liveness = Arc::new(Liveness::new());
        let (send_tx, mut send_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let (receive_tx, mut receive_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut send = std::pin::pin!(async move {
            for _ in 0..10 {
                send_rx.recv().await;
            }
        });
        let polls = AtomicUsize::new(0);
        let mut receive = std::pin::pin!(std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            loop {
                match receive_rx.poll_recv(cx) {
                    Poll::Ready(Some(())) => continue,
                    Poll::Ready(None) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        }));
        let waking = tokio::spawn(async move {
            for i in 0..10 {
                tokio::task::yield_now().await;
                send_tx.send(()).unwrap();
                if i == 4 {
                    receive_tx.send(()).unwrap();
                }
            }
            receive_tx
        });
        let first = race(send.as_mut(), receive.as_mut(), &liveness).await;
        assert!(matches!(first, First::Send));
        // Once at the start, once for its one message: not on the send
        // half's ten wake-ups.
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        // Closing its channel ends it.
        drop(waking.await.unwrap());
        receive.await;
        assert_eq!(Arc::strong_count(&liveness), 1, "no waker outlives the race");
    }
}
