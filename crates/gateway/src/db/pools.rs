//! The database connections, by who may use them: the pools the gateway
//! opens beside the feed's LISTEN connection.

use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The database connections, by who may use them. Client-driven work
/// (replays, authorization) has a pool of its own, bounded and with a time
/// limit on every statement, so no client can take the connections the feed
/// reads with or the probe commits with.
#[derive(Clone)]
pub struct Pools {
    /// Resumes' replay pages, `realtime.authorize`, resume-position checks:
    /// `GATEWAY_POOL_SIZE` connections.
    pub clients: PgPool,
    /// The feed's catch-up and large-row reads (beside its LISTEN connection).
    pub feed: PgPool,
    /// The probe's commits, clock sampling and outbox pruning.
    pub internal: PgPool,
}

/// Connections in the feed's and the internal pools.
const FEED_POOL: u32 = 2;
const INTERNAL_POOL: u32 = 2;
/// A statement from the clients' pool that runs longer is cancelled by the
/// server: a caller that gave up on its side (authorization after 2 s) does
/// not leave the connection busy for longer than this.
const CLIENT_STATEMENT_TIMEOUT: &str = "2s";
/// How long client-driven work waits for a pooled connection.
const CLIENT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(2);

impl Pools {
    /// Opens the pools, once one connection has shown the database can be
    /// reached (else the error says in one line where and why not).
    pub async fn connect(connect: &PgConnectOptions, clients: u32) -> anyhow::Result<Pools> {
        super::connect::check(connect).await?;
        let pool = |name: &str, size: u32, acquire: Duration, options: PgConnectOptions| {
            PgPoolOptions::new()
                .max_connections(size)
                .acquire_timeout(acquire)
                .connect_with(options.application_name(name))
        };
        let client_options = connect
            .clone()
            .options([("statement_timeout", CLIENT_STATEMENT_TIMEOUT)]);
        let clients = pool("ws-gateway clients", clients, CLIENT_ACQUIRE_TIMEOUT, client_options)
            .await
            .context("connecting to DATABASE_URL")?;
        let feed = pool(
            "ws-gateway feed reads",
            FEED_POOL,
            Duration::from_secs(5),
            connect.clone(),
        )
        .await
        .context("connecting to DATABASE_URL")?;
        let internal = pool(
            "ws-gateway internal",
            INTERNAL_POOL,
            Duration::from_secs(5),
            connect.clone(),
        )
        .await
        .context("connecting to DATABASE_URL")?;
        Ok(Pools {
            clients,
            feed,
            internal,
        })
    }

    /// Every pool with its name, for `/metrics`.
    pub fn named(&self) -> [(&'static str, &PgPool); 3] {
        [
            ("clients", &self.clients),
            ("feed", &self.feed),
            ("internal", &self.internal),
        ]
    }

    pub async fn close(&self) {
        for (_, pool) in self.named() {
            pool.close().await;
        }
    }
}
