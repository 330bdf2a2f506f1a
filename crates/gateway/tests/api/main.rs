//! Integration tests: the real gateway, a real PostgreSQL, real sockets.

mod bystander;
mod fault_kit;
mod helpers;

mod application;
mod client;
mod dashboard;
mod delivery;
mod faults;
mod handshake;
mod keys;
mod lifecycle;
mod monitoring;
mod observability;
mod operations;
mod pipeline;
mod pools;
mod refusals;
mod security;
mod sources;
mod sse;
mod streaming;
mod tokens;
