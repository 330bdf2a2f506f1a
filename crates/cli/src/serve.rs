//! `ws-gateway serve`: the daemon, until ctrl-c or SIGTERM.

use tokio_util::sync::CancellationToken;
use ws_gateway::config::Settings;
use ws_gateway::{Application, shutdown_signal};

/// Runs the daemon until ctrl-c or SIGTERM; `extra` stops it too.
pub async fn serve(settings: Settings, extra: CancellationToken) -> anyhow::Result<()> {
    let app = Application::build(settings).await?;
    let token = app.shutdown_token();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown_signal() => {}
            () = extra.cancelled() => {}
        }
        token.cancel();
    });
    app.run_until_stopped().await
}
