//! `ws-gateway dev-db start|stop --dir D`: a private PostgreSQL for the test
//! set-up (`make test`); `start` prints its URL and leaves it running.

use std::path::Path;

use pg_private::{ClusterOptions, PrivateCluster, StopMode};

pub async fn start(dir: &Path) -> anyhow::Result<()> {
    let options = ClusterOptions {
        fast_unsafe: true,
        ..ClusterOptions::default()
    };
    let cluster = PrivateCluster::start(dir, options).await?;
    println!("{}", cluster.url("postgres"));
    cluster.detach();
    Ok(())
}

pub async fn stop(dir: &Path) -> anyhow::Result<()> {
    pg_private::stop_dir(dir, StopMode::Immediate).await
}
