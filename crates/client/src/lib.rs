//! ws-gateway-client: the Rust client of ws-gateway (SPEC section 9), for
//! services and for the project's own tests and tools. It does not depend
//! on the daemon: it speaks the wire protocol (SPEC section 4).
//!
//! - [`Subscriber`]: a resuming subscriber. It connects to one of several
//!   gateway URLs, subscribes to its rooms, and after any disconnect
//!   reconnects with backoff and resubscribes each room `since` the last
//!   position it delivered; repeats across the seam are dropped by position.
//! - [`Backoff`]: capped exponential reconnect backoff, optionally with full
//!   jitter (also what the gateway's own reconnecting loops use).

mod backoff;
mod subscriber;

pub use backoff::Backoff;
pub use subscriber::{Event, Subscriber, SubscriberConfig};
