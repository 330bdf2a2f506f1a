//! The replication connection: `DATABASE_URL` turned into a
//! `pgwire-replication` session of the slot and publication, the first
//! stage of the wal source (**stream** -> transactions -> batch -> outbox).

use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use pgwire_replication::{Lsn, ReplicationConfig};

/// How often the confirmed position is reported to the server: what bounds
/// how far behind `confirmed_flush_lsn` (the slot lag) trails the outbox.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
/// Events buffered between the connection's reader and the leader: a batch
/// can grow this large while the previous one is being written.
const BUFFER_EVENTS: usize = 16 * 1024;

/// Text output the decoder's database side reads back unambiguously
/// (`json_populate_record` parses each value with its type's input
/// function): ISO dates, `postgres` intervals, hex bytea, exact floats.
const OUTPUT_OPTIONS: &str = "-c datestyle=ISO -c intervalstyle=postgres -c bytea_output=hex -c extra_float_digits=1";

/// The replication session's configuration, from `DATABASE_URL`.
pub fn replication_config(
    database_url: &str,
    slot: &str,
    publication: &str,
    start: Lsn,
    application_name: &str,
) -> anyhow::Result<ReplicationConfig> {
    let config: tokio_postgres::Config = database_url.parse().context("parsing DATABASE_URL")?;
    if config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        bail!(
            "DATABASE_URL asks for sslmode=require, and the wal source's replication connection has no TLS yet; \
             use GATEWAY_SOURCE=notify, or reach the database over a trusted network without TLS"
        );
    }
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(dir)) => dir.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = match config.get_user() {
        Some(user) => user.to_owned(),
        None => std::env::var("USER").map_err(|_| anyhow!("DATABASE_URL names no user"))?,
    };
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    Ok(
        ReplicationConfig::new(host, user, password, database, slot, publication)
            .with_port(port)
            .with_start_lsn(start)
            // Never report less than what is durable, nor more before it is.
            .with_ack_lsn(start)
            .with_status_interval(STATUS_INTERVAL)
            .with_wakeup_interval(STATUS_INTERVAL)
            .with_buffer_size(BUFFER_EVENTS)
            .with_options(OUTPUT_OPTIONS)
            .with_application_name(application_name),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_database_url_apart() {
        let config = replication_config(
            "postgres://gw:s%40cret@db.example:6543/app",
            "ws_gateway_app",
            "ws_gateway",
            Lsn(16),
            "ws-gateway wal",
        )
        .unwrap();
        assert_eq!(
            (
                config.host.as_str(),
                config.port,
                config.user.as_str(),
                config.password.as_str()
            ),
            ("db.example", 6543, "gw", "s@cret")
        );
        assert_eq!(config.database, "app");
        assert_eq!(config.slot, "ws_gateway_app");
        assert_eq!((config.start_lsn, config.ack_lsn), (Lsn(16), Some(Lsn(16))));
        let refused = replication_config("postgres://gw@db/app?sslmode=require", "s", "p", Lsn(0), "x");
        assert!(refused.unwrap_err().to_string().contains("sslmode=require"));
    }
}
