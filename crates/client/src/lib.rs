//! ws-gateway-client: the Rust client of ws-gateway (SPEC section 9), for
//! services and for the project's own tests and tools. It does not depend
//! on the daemon: it speaks the wire protocol.
//!
//! - [`Backoff`]: capped exponential reconnect backoff, optionally with
//!   full jitter (also what the gateway's own reconnecting loops use).

mod backoff;

pub use backoff::Backoff;
