//! Connecting to the database, and saying in one line why it failed: where
//! (host, port, database, user) and what (refused, no answer, unknown
//! database, authentication, permission), within the connect timeout,
//! never the same cause twice.

use std::fmt;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

/// How long a connection may take to open before the command gives up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a connection goes, as the operator wrote it.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

impl Target {
    fn of(options: &PgConnectOptions) -> Target {
        Target {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            database: options.get_database().unwrap_or(options.get_username()).to_owned(),
            user: options.get_username().to_owned(),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PostgreSQL at {}:{}, database {:?} as user {:?}",
            self.host, self.port, self.database, self.user
        )
    }
}

/// Why no connection could be made. Its text is the whole story (it has no
/// `source`), so an error chain prints the cause once.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("DATABASE_URL is not a PostgreSQL URL this gateway can use: {0}")]
    BadUrl(String),
    #[error("cannot connect to {target}: {cause}")]
    Failed { target: Target, cause: String },
}

/// `url` as connect options, or a one-line error saying what is wrong with it.
pub fn options(url: &str) -> Result<PgConnectOptions, ConnectError> {
    url.parse().map_err(|e: sqlx::Error| ConnectError::BadUrl(describe(&e)))
}

/// Opens one connection with `options` and closes it: a bad URL, a server
/// that is down or a refused login is reported here, in one line, within
/// [`CONNECT_TIMEOUT`] (a pool would retry a failure until its acquire
/// timeout and then report only that it timed out).
pub async fn check(options: &PgConnectOptions) -> Result<(), ConnectError> {
    let failed = |cause: String| ConnectError::Failed {
        target: Target::of(options),
        cause,
    };
    let first = tokio::time::timeout(CONNECT_TIMEOUT, options.connect())
        .await
        .map_err(|_| {
            failed(format!(
                "no answer within {CONNECT_TIMEOUT:?} (a firewall, or the wrong host?)"
            ))
        })?
        .map_err(|e| failed(describe(&e)))?;
    drop(first);
    Ok(())
}

/// A pool of up to `max` connections to `url`, once [`check`] has opened
/// one, so a failure is one clear line.
pub async fn connect(url: &str, max: u32, application: &str) -> Result<PgPool, ConnectError> {
    let options = options(url)?.application_name(application);
    check(&options).await?;
    Ok(PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_lazy_with(options))
}

/// One line for a database error: the server's message with what to do
/// about it, or what went wrong on the way there. sqlx's own text repeats
/// its source; this says each thing once.
pub fn describe(error: &sqlx::Error) -> String {
    match error {
        sqlx::Error::Database(db) => {
            let message = db.message();
            match db.code().as_deref() {
                Some("3D000") => format!("{message} (create it, or fix the database name in DATABASE_URL)"),
                Some("28P01") => format!("{message} (check the user and password in DATABASE_URL)"),
                Some("28000") => format!("{message} (the server's pg_hba.conf does not let this user in from here)"),
                Some("42501") => format!(
                    "{message} (the gateway's role lacks a grant: `ws-gateway grants ROLE` prints the ones it needs)"
                ),
                Some("53300") => format!("{message} (the server has no connection slot free)"),
                Some("57P03") => format!("{message} (the server is starting up or shutting down; try again)"),
                _ => message.to_owned(),
            }
        }
        sqlx::Error::Io(io) => match io.kind() {
            std::io::ErrorKind::ConnectionRefused => {
                "connection refused (is PostgreSQL running and listening on that address and port?)".to_owned()
            }
            std::io::ErrorKind::TimedOut => "the connection timed out".to_owned(),
            std::io::ErrorKind::NotFound => format!("{io} (no such socket or host)"),
            _ => io.to_string(),
        },
        sqlx::Error::Tls(tls) => format!("TLS failed: {tls}"),
        sqlx::Error::Configuration(config) => config.to_string(),
        sqlx::Error::PoolTimedOut => format!("no connection within {CONNECT_TIMEOUT:?}"),
        other => other.to_string(),
    }
}

/// A database error with what was being done, as one `anyhow` line.
pub fn failed(doing: &str, error: &sqlx::Error) -> anyhow::Error {
    anyhow::anyhow!("{doing}: {}", describe(error))
}
