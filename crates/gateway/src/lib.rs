//! ws-gateway: committed PostgreSQL changes, pushed to WebSocket rooms.
//!
//! The data path reads top to bottom: `capture` (the SQL side) -> `feed`
//! (LISTEN and catch-up) -> `rooms` (fan-out) -> `socket` (one task pair per
//! client), with `http`, `config`, `telemetry` beside it.

pub mod app;
pub mod auth;
pub mod authz;
pub mod capture;
pub mod change;
pub mod config;
pub mod feed;
pub mod history;
pub mod http;
pub mod pipeline;
pub mod probe;
pub mod protocol;
pub mod rooms;
pub mod socket;
pub mod telemetry;
