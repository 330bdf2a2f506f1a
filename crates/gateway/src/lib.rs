//! ws-gateway: committed PostgreSQL changes, pushed to WebSocket rooms.
//!
//! The data path reads top to bottom: `capture` (the SQL side) -> `feed`
//! (LISTEN and catch-up) -> `hub` (fan-out) -> `socket` (one task pair per
//! client), with `http`, `config`, `telemetry` beside it. `state` is the
//! shared state below every handler; `app` assembles and supervises it all.

pub mod app;
pub mod auth;
pub mod authz;
pub mod change;
pub mod config;
pub mod db;
pub mod http;
pub mod hub;
pub mod monitor;
pub mod pipeline;
pub mod probe;
pub mod protocol;
pub mod socket;
pub mod source;
pub mod state;
pub mod telemetry;
