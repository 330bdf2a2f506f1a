//! The dedicated LISTEN connection of the notify source.

use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};

pub type Notifications = mpsc::Receiver<Result<String, tokio_postgres::Error>>;

/// Connects the dedicated LISTEN connection. Notifications only arrive when
/// the connection is driven with `poll_message`, so a task does that and
/// forwards them; when the connection dies, the error (or the channel's end)
/// tells the session.
pub async fn listen(
    database_url: &str,
    channel: &str,
) -> anyhow::Result<(tokio_postgres::Client, Notifications, tokio::task::JoinHandle<()>)> {
    let mut config: tokio_postgres::Config = database_url.parse().context("parsing DATABASE_URL")?;
    config
        .application_name("ws-gateway feed")
        .connect_timeout(Duration::from_secs(5))
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10));
    let (client, mut connection) = config
        .connect(NoTls)
        .await
        .context("connecting the LISTEN connection")?;
    // Bounded: if dispatch falls behind, the driver stops reading and
    // PostgreSQL keeps the notifications queued on its side.
    let (tx, rx) = mpsc::channel(16 * 1024);
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            let forwarded = match message {
                Ok(AsyncMessage::Notification(n)) => tx.send(Ok(n.payload().to_owned())).await,
                Ok(AsyncMessage::Notice(notice)) => {
                    tracing::debug!(notice = %notice, "notice on the LISTEN connection");
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(error) => {
                    let _ = tx.send(Err(error)).await;
                    return;
                }
            };
            if forwarded.is_err() {
                return;
            }
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{channel}\""))
        .await
        .context("LISTEN")?;
    Ok((client, rx, driver))
}

pub struct AbortOnDrop(pub tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
