//! Connection slots: every TCP connection a listener accepts holds one from
//! accept to close, upgraded to a WebSocket or not (`GATEWAY_MAX_CONNECTIONS`
//! on the client port). Past the limit a few reserved slots remain, for
//! health checks and the probe; `http::serve` decides what they may do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Slots past the limit, for `/healthz`, `/metrics` and the probe, so the
/// gateway can still be asked how it is when clients fill the port.
pub const RESERVED_SLOTS: usize = 8;

/// The slots of one listener.
pub struct Slots {
    /// The most ordinary slots (a reload may move it: [`Slots::set_limit`]).
    limit: AtomicUsize,
    ordinary: AtomicUsize,
    reserved: AtomicUsize,
}

impl Slots {
    pub fn new(limit: usize) -> Arc<Slots> {
        Arc::new(Slots {
            limit: AtomicUsize::new(limit),
            ordinary: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
        })
    }

    /// A new limit, for connections accepted from now on.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// A slot for a connection just accepted; None when even the reserved
    /// slots are taken.
    pub fn take(self: &Arc<Slots>) -> Option<Arc<Slot>> {
        let slot = |over_limit| {
            Arc::new(Slot {
                slots: Arc::clone(self),
                over_limit,
                counted: AtomicBool::new(true),
            })
        };
        if self.ordinary.fetch_add(1, Ordering::AcqRel) < self.limit.load(Ordering::Relaxed) {
            return Some(slot(false));
        }
        self.ordinary.fetch_sub(1, Ordering::AcqRel);
        if self.reserved.fetch_add(1, Ordering::AcqRel) < RESERVED_SLOTS {
            return Some(slot(true));
        }
        self.reserved.fetch_sub(1, Ordering::AcqRel);
        None
    }

    /// Connections holding a slot (ordinary and reserved).
    pub fn open(&self) -> usize {
        self.ordinary.load(Ordering::Relaxed) + self.reserved.load(Ordering::Relaxed)
    }
}

/// One connection's slot, from accept until its last holder lets go: the
/// HTTP connection, then (after an upgrade) the WebSocket's task.
pub struct Slot {
    slots: Arc<Slots>,
    /// Taken past the limit: only the reserved paths are served.
    over_limit: bool,
    counted: AtomicBool,
}

impl Slot {
    pub fn over_limit(&self) -> bool {
        self.over_limit
    }

    /// Stops counting this connection (the probe's: it is not a client).
    pub fn uncount(&self) {
        if self.counted.swap(false, Ordering::AcqRel) {
            let count = if self.over_limit {
                &self.slots.reserved
            } else {
                &self.slots.ordinary
            };
            count.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.uncount();
    }
}

/// Drops a request's TCP connection at once, whatever hyper is writing:
/// how a streamed response (`/sse`) ends a client that stopped reading,
/// which hyper alone would wait on for ever. The accept loop makes one per
/// connection and hands it to each request.
#[derive(Clone, Default)]
pub struct ConnectionAbort(tokio_util::sync::CancellationToken);

impl ConnectionAbort {
    pub fn new() -> ConnectionAbort {
        ConnectionAbort::default()
    }

    pub fn abort(&self) {
        self.0.cancel();
    }

    /// Cancelled by [`ConnectionAbort::abort`]: what the accept loop waits on.
    pub fn token(&self) -> tokio_util::sync::CancellationToken {
        self.0.clone()
    }
}
