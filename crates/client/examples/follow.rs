//! Follows a room and prints each change as it commits, resuming across
//! reconnects and gateway restarts:
//!
//!     GATEWAY_URL=ws://127.0.0.1:8080/ws cargo run -p ws-gateway-client --example follow -- project:42
//!
//! The integration tests run [`follow`] against a real gateway (and the
//! README's Rust example is copied from it).

use std::error::Error;

use futures_util::StreamExt;
use ws_gateway_client::{Client, Update};

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let url = std::env::var("GATEWAY_URL").unwrap_or_else(|_| "ws://127.0.0.1:8080/ws".into());
    let room = std::env::args().nth(1).unwrap_or_else(|| "project:42".into());
    follow(&url, &room, |line| {
        println!("{line}");
        true // keep going
    })
    .await
}

/// Hands `print` one line per change of `room`, until it returns false.
pub async fn follow(url: &str, room: &str, mut print: impl FnMut(String) -> bool) -> Result<(), BoxError> {
    let client = Client::builder(url)
        // Asked on every connect and again before exp: mint or fetch a fresh JWT here.
        .token_fn(|| async { Ok(std::env::var("GATEWAY_TOKEN").unwrap_or_default()) })
        .start();
    let mut changes = client.subscribe(room, None)?; // or Some(position) stored with your state
    while let Some(update) = changes.next().await {
        match update {
            Update::Change(c) => {
                let (op, table) = (c.op().unwrap_or("?"), c.table().unwrap_or("?"));
                let line = format!("{} {op} {table} {}", c.position, c.key());
                if !print(line) {
                    break;
                }
            }
            Update::Reset { reason, .. } => eprintln!("history is gone ({reason}): refetch the room's state"),
            Update::Refused { code, message } => return Err(format!("refused: {code}: {message}").into()),
            _ => {} // Subscribed (live on a connection), Event (realtime.publish)
        }
    }
    client.close();
    Ok(())
}
