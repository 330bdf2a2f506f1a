//! The daemon assembled: `Application::build(settings)` connects, migrates and
//! binds; `run_until_stopped()` runs the feed and the HTTP server, supervises
//! them, and drains every connection on shutdown. Tests and `main` start it
//! the same way.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::change::Position;
use crate::config::{Auth, CaptureSource, Settings};
use crate::db::{self, Pools};
use crate::http;
use crate::hub::{CloseReason, Hub};
use crate::slots::Slots;
use crate::source::{Feed, HANDOFFS_QUEUED, NotifySource, WalCapture};
use crate::state::AppState;
use crate::telemetry::Telemetry;

/// How long shutdown waits for connections to close before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the admin port holds at once (dashboards, scrapers, the
/// dashboard's live panel).
const ADMIN_CONNECTIONS: usize = 256;

/// Reloads the configuration on every SIGHUP until shutdown.
async fn reload_on_hangup(state: Arc<AppState>) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        let mut hangups =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).context("listening for SIGHUP")?;
        loop {
            tokio::select! {
                () = state.shutdown.cancelled() => return Ok(()),
                _ = hangups.recv() => {
                    if let Err(error) = state.reload() {
                        tracing::error!(%error, "SIGHUP: the new configuration is refused; keeping the current one");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        state.shutdown.cancelled().await;
        Ok(())
    }
}

pub struct Application {
    listener: TcpListener,
    /// `GATEWAY_ADMIN_LISTEN`'s, when set: the admin endpoints' own port.
    admin_listener: Option<TcpListener>,
    state: Arc<AppState>,
    feed: Feed<NotifySource>,
    /// With `GATEWAY_SOURCE=wal`: this instance's part in capturing (lead,
    /// or wait to take over).
    capture: Option<WalCapture>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let database_url = settings.database_url.clone().ok_or_else(|| {
            anyhow!(
                "DATABASE_URL is not set: point it at the ConstructTrack database (or run `make run` for a local demo)"
            )
        })?;
        let connect = db::connect_options(database_url.expose())?;
        let pools = Pools::connect(&connect, settings.pool_size).await?;
        let pool = pools.internal.clone();

        if settings.auto_migrate {
            db::migrate(&pool, &settings.channel).await?;
        } else {
            match db::database_channel(&pool).await? {
                None => {
                    return Err(anyhow!(
                        "the realtime schema is not installed and GATEWAY_AUTO_MIGRATE=false: run `ws-gateway migrate` first"
                    ));
                }
                Some(channel) if channel != settings.channel => {
                    return Err(anyhow!(
                        "the database's capture triggers notify channel {channel:?} but GATEWAY_CHANNEL={:?}: run `ws-gateway migrate` to switch the database, or fix GATEWAY_CHANNEL",
                        settings.channel
                    ));
                }
                Some(_) => {}
            }
        }

        check_source(&pool, settings.source).await?;

        let listener = bind(settings.listen).with_context(|| format!("binding GATEWAY_LISTEN={}", settings.listen))?;
        check_open_file_limit(settings.limits.max_connections);
        let admin_listener = match settings.admin_listen {
            Some(address) => Some(bind(address).with_context(|| format!("binding GATEWAY_ADMIN_LISTEN={address}"))?),
            None => None,
        };

        if matches!(settings.auth, Auth::None) {
            tracing::warn!(
                "GATEWAY_AUTH=none: ANY client can read EVERY room. Use this for local development only; set GATEWAY_AUTH=jwt and GATEWAY_JWT_SECRET in production"
            );
        }
        let telemetry = Arc::new(Telemetry::default());
        let hub = Arc::new(Hub::new(Position(0), settings.pipeline.clone(), settings.features));
        let mut source = NotifySource::new(
            database_url.expose().to_owned(),
            settings.channel.clone(),
            pools.feed.clone(),
        );
        let capture = if settings.source == CaptureSource::Wal {
            telemetry.wal.enabled.store(true, std::sync::atomic::Ordering::Relaxed);
            // When this instance leads, its feed takes the batches it
            // commits at once rather than at their NOTIFY.
            let (handoff, handoffs) = tokio::sync::mpsc::channel(HANDOFFS_QUEUED);
            source = source.with_handoffs(handoffs);
            Some(WalCapture::new(database_url.expose().to_owned(), Arc::clone(&telemetry)).with_handoff(handoff))
        } else {
            None
        };
        let feed = Feed::new(source, Arc::clone(&hub), Arc::clone(&telemetry));
        let state = Arc::new(AppState::new(settings, hub, telemetry, pools));
        // Fetched at start, so the first tokens verify; a failure is not
        // fatal (the refresh task retries, /healthz shows it).
        if let Some(jwks) = state.auth.keys().and_then(|keys| keys.jwks())
            && let Ok(n) = jwks.refresh().await
        {
            tracing::info!(url = jwks.url(), keys = n, "JWKS fetched");
        }
        Ok(Application {
            listener,
            admin_listener,
            state,
            feed,
            capture,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Where `/metrics`, `/latency`, `/api/*` and the dashboard are served:
    /// the admin port when `GATEWAY_ADMIN_LISTEN` is set, else the one port.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.as_ref().map_or_else(
            || self.local_addr(),
            |l| l.local_addr().expect("a bound listener has an address"),
        )
    }

    /// Cancel it to stop the gateway (what SIGTERM and ctrl-c do).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.state.shutdown.clone()
    }

    pub fn state(&self) -> Arc<AppState> {
        Arc::clone(&self.state)
    }

    /// Runs until the shutdown token is cancelled or a task dies; says which.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Application {
            listener,
            admin_listener,
            state,
            feed,
            capture,
        } = self;
        let shutdown = state.shutdown.clone();
        let source = state.settings().source;
        match &admin_listener {
            Some(admin) => tracing::info!(
                address = %listener.local_addr()?,
                admin = %admin.local_addr()?,
                %source,
                "ws-gateway listening; admin endpoints on their own port"
            ),
            None => tracing::info!(address = %listener.local_addr()?, %source, "ws-gateway listening"),
        }

        let mut feed_task = tokio::spawn(feed.run(shutdown.clone()));
        let wal = capture.is_some();
        let mut capture_task = tokio::spawn(run_or_idle(capture.map(|c| c.run(shutdown.clone())), shutdown.clone()));
        let mut slot_task = tokio::spawn(run_or_idle(
            wal.then(|| crate::source::watch_slot(state.pool.clone(), Arc::clone(&state.telemetry), shutdown.clone())),
            shutdown.clone(),
        ));
        let closer = Arc::clone(&state);
        tokio::spawn(async move {
            closer.shutdown.cancelled().await;
            closer.close_all(&CloseReason::going_away());
        });
        let mut reload_task = tokio::spawn(reload_on_hangup(Arc::clone(&state)));
        let mut pruner_task = tokio::spawn(db::run_pruner(
            state.pools.internal.clone(),
            state.settings().history.retention,
            shutdown.clone(),
        ));
        let mut probe_task = tokio::spawn(crate::probe::run(Arc::clone(&state), listener.local_addr()?));
        let mut monitor_task = tokio::spawn(crate::monitor::run(Arc::clone(&state)));
        let keys_state = Arc::clone(&state);
        let keys_shutdown = shutdown.clone();
        let mut keys_task = tokio::spawn(async move {
            match keys_state.auth.keys() {
                Some(keys) => keys.keep_jwks_fresh(&keys_shutdown).await,
                None => keys_shutdown.cancelled().await,
            }
            anyhow::Ok(())
        });
        let (router, admin_router) = match admin_listener {
            Some(_) => (
                http::public_router(Arc::clone(&state)),
                Some(http::admin_router(Arc::clone(&state))),
            ),
            None => (http::router(Arc::clone(&state)), None),
        };
        let mut http_task = tokio::spawn(http::serve(
            listener,
            router,
            Arc::clone(&state.client_slots),
            Arc::clone(&state),
        ));
        let mut admin_task = match (admin_listener, admin_router) {
            // Slots of its own: clients filling theirs do not lock operators out.
            (Some(listener), Some(router)) => tokio::spawn(http::serve(
                listener,
                router,
                Slots::new(ADMIN_CONNECTIONS),
                Arc::clone(&state),
            )),
            // No admin port: a task that ends with shutdown, like the others.
            _ => {
                let stopped = shutdown.clone();
                tokio::spawn(async move {
                    stopped.cancelled_owned().await;
                    anyhow::Ok(())
                })
            }
        };

        let died = tokio::select! {
            () = shutdown.cancelled() => None,
            result = &mut feed_task => Some(("feed", flatten(result))),
            result = &mut capture_task => Some(("wal capture", flatten(result))),
            result = &mut slot_task => Some(("wal slot watch", flatten(result))),
            result = &mut pruner_task => Some(("history pruner", flatten(result))),
            result = &mut reload_task => Some(("SIGHUP reload", flatten(result))),
            result = &mut probe_task => Some(("probe", flatten(result))),
            result = &mut monitor_task => Some(("telemetry monitor", flatten(result))),
            result = &mut keys_task => Some(("JWKS refresh", flatten(result))),
            result = &mut http_task => Some(("http server", flatten(result))),
            result = &mut admin_task => Some(("admin http server", flatten(result))),
        };
        // A task that returned cleanly because shutdown began did not die.
        let died = died.filter(|(_, result)| !(shutdown.is_cancelled() && result.is_ok()));
        shutdown.cancel();
        let outcome = match died {
            None => Ok(()),
            Some((task, Ok(()))) => Err(anyhow!("the {task} task stopped unexpectedly")),
            Some((task, Err(error))) => Err(error.context(format!("the {task} task died"))),
        };
        if let Err(error) = &outcome {
            tracing::error!(error = format!("{error:#}"), "shutting down");
        }

        // Drain: every connection sends its close frame and ends.
        state.connections.close();
        if tokio::time::timeout(DRAIN_TIMEOUT, state.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = state.connections.len(),
                "connections still open after the drain timeout"
            );
        }
        if !feed_task.is_finished() {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut feed_task).await;
        }
        for task in [&mut probe_task, &mut monitor_task, &mut capture_task, &mut slot_task] {
            if !task.is_finished() {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
            }
        }
        for task in [&mut http_task, &mut admin_task] {
            if !task.is_finished() {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
            }
        }
        keys_task.abort();
        state.pools.close().await;
        tracing::info!("ws-gateway stopped");
        outcome
    }
}

/// Runs `task` if there is one; else waits for shutdown (so that the
/// supervisor can treat both the same).
async fn run_or_idle(
    task: Option<impl Future<Output = anyhow::Result<()>>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    match task {
        Some(task) => task.await,
        None => {
            shutdown.cancelled().await;
            Ok(())
        }
    }
}

/// Refuses to start when `GATEWAY_SOURCE` is not the database's source, or
/// when the server cannot run the wal source.
async fn check_source(pool: &sqlx::PgPool, configured: CaptureSource) -> anyhow::Result<()> {
    let Some(database) = db::source_settings(pool)
        .await
        .context("reading the database's capture source")?
    else {
        return Ok(());
    };
    if database.source != configured.as_str() {
        return Err(anyhow!(
            "GATEWAY_SOURCE={configured}, but the database's capture source is {} (realtime.settings.source): \
             set GATEWAY_SOURCE={}, or switch the database with `ws-gateway source {configured}` \
             (see the README's \"Capture sources\" for the procedure)",
            database.source,
            database.source
        ));
    }
    if configured == CaptureSource::Wal {
        crate::source::wal_readiness(pool)
            .await
            .context("GATEWAY_SOURCE=wal cannot run against this server")?;
    }
    Ok(())
}

fn flatten(result: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<()> {
    match result {
        Ok(inner) => inner,
        Err(join) => Err(anyhow!("panicked: {join}")),
    }
}

/// Binds with a listen backlog of 4,096 (tokio's default is 1,024): a
/// reconnect storm after a restart otherwise overflows the kernel's queue and
/// those clients wait out a 1 s SYN retry.
fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if address.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(4096)
}

/// Raises the soft limit on open files to the hard limit (as Go's runtime
/// does), and warns when even that cannot hold `GATEWAY_MAX_CONNECTIONS`:
/// past it `accept` fails (EMFILE) before the connection limit is reached.
fn check_open_file_limit(max_connections: usize) {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only read and write `limit`.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return;
            }
            if limit.rlim_cur < limit.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: limit.rlim_max,
                    rlim_max: limit.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    limit = raised;
                }
            }
        }
        // The database connections, the listener, logs and a margin.
        let needed = max_connections as u64 + crate::slots::RESERVED_SLOTS as u64 + 64;
        if limit.rlim_cur < needed {
            tracing::warn!(
                open_file_limit = limit.rlim_cur,
                max_connections,
                "the open-file limit is below GATEWAY_MAX_CONNECTIONS plus a margin: accept will fail \
                 (EMFILE) before the connection limit; raise `ulimit -n` (LimitNOFILE= under systemd) \
                 or lower GATEWAY_MAX_CONNECTIONS"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = max_connections;
}

/// Resolves on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("ctrl-c: shutting down"),
        () = terminate => tracing::info!("SIGTERM: shutting down"),
    }
}
