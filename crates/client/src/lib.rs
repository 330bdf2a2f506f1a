//! ws-gateway-client: the Rust client of ws-gateway (SPEC section 9), for
//! services and for the project's own tests and tools. It speaks the wire
//! protocol (SPEC section 4) and does not depend on the daemon.
//!
//! A [`Client`] holds one connection for any number of rooms; each
//! [`Client::subscribe`] is a [`Subscription`], a `Stream` of that room's
//! [`Update`]s: every change once, in commit order, across reconnects,
//! gateway restarts, slow-consumer closes and token expiry; a
//! [`Update::Reset`] when that cannot be kept.
//!
//! How a frame travels: socket → (brotli/gzip decoded, in arrival order) →
//! `rooms.rs` (batches unpacked, repeats at a seam dropped by position,
//! refusals matched to their room) → the room's channel → your `next()`.
//!
//! - Reconnects after any close it did not ask for, with full-jitter
//!   backoff (`reconnect_delays`); at once after 1001, 4001 and 4008. Every
//!   room resumes `since` its last position.
//! - A token function is asked on every connect and again before `exp`,
//!   then sent in band (`{"type":"auth"}`), so the connection lives on.
//! - `{"type":"ping"}` after a silent heartbeat interval; no frame within
//!   another, and the connection is given up and resumed.
//! - Live changes are acked (at most one ack per 100 ms) for the gateway's
//!   commit-to-ack latency.
//!
//! [`Backoff`] is also what the gateway's own reconnecting loops use.

mod backoff;
mod client;
mod connection;
mod frames;
mod rooms;
mod token;
mod update;

pub use backoff::Backoff;
pub use client::{Client, ClientBuilder, ClientEvent, Stats, StatsSnapshot, SubscribeError, Subscription};
pub use frames::Encoding;
pub use token::{Token, TokenError};
pub use update::{BadPosition, Change, Position, Update};
