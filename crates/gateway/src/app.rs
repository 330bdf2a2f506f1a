//! The daemon assembled: `Application::build(settings)` connects, migrates and
//! binds; `run_until_stopped()` runs the feed and the HTTP server, supervises
//! them, and drains every connection on shutdown. Tests and `main` start it
//! the same way.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, anyhow};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::capture;
use crate::change::Position;
use crate::config::{Auth, Settings};
use crate::feed::Feed;
use crate::http;
use crate::rooms::Hub;
use crate::telemetry::Telemetry;

/// How long shutdown waits for connections to close before giving up on them.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What every task of the gateway shares.
pub struct AppState {
    /// Replaced whole on reload, so a reader sees one consistent version.
    settings: RwLock<Arc<Settings>>,
    /// Bumped after each reload: hot loops keep their copy of the settings
    /// and re-read them only when this moves (see [`SettingsCache`]).
    settings_version: AtomicU64,
    pub hub: Arc<Hub>,
    pub telemetry: Arc<Telemetry>,
    pub pool: PgPool,
    pub auth: Authenticator,
    /// Cancelled once, on shutdown; every loop selects on it.
    pub shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them to finish.
    pub connections: TaskTracker,
    /// Distinguishes this instance's connection ids from other instances'.
    pub instance_id: String,
    pub next_connection_id: AtomicU64,
    pub active_connections: AtomicUsize,
    /// Every open connection's liveness, for `/healthz` `connectionPool`.
    connections_live: std::sync::Mutex<std::collections::HashMap<u64, ConnectionHandle>>,
    /// Refusals by code (error codes, HTTP refusals) and closes by code.
    pub refusals: crate::socket::limits::Tally,
    pub closes: crate::socket::limits::Tally,
    /// `realtime.authorize`, cached.
    pub authorizer: crate::authz::Authorizer,
    pub started_at: std::time::Instant,
}

impl AppState {
    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().expect("settings lock"))
    }

    /// Asks every open connection to close: each send loop writes what it
    /// had queued, then this close frame. Shutdown does this once; a
    /// connection registered after it sees the cancelled token itself
    /// (`socket::serve`).
    pub fn close_all(&self, reason: &crate::rooms::CloseReason) {
        let live = self.connections_live.lock().expect("connections lock");
        for handle in live.values() {
            handle.subscriber.close(reason.clone());
        }
    }

    pub fn register_connection(&self, id: u64, handle: ConnectionHandle) {
        self.connections_live
            .lock()
            .expect("connections lock")
            .insert(id, handle);
    }

    pub fn unregister_connection(&self, id: u64) {
        self.connections_live.lock().expect("connections lock").remove(&id);
    }

    /// The open connections' pool figures (the probe's own excluded).
    pub fn connection_pool(&self) -> PoolSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let now = crate::change::now_us();
        let active_window = self.settings().heartbeat.interval.as_micros() as i64 * 2;
        let live = self.connections_live.lock().expect("connections lock");
        let mut pool = PoolSnapshot::default();
        let mut round_trips = Vec::new();
        for (id, handle) in live.iter() {
            if self.telemetry.is_probe(*id) {
                continue;
            }
            let l = &handle.liveness;
            let spoke = now - l.last_message_us.load(Relaxed) < active_window;
            if l.subscriptions.load(Relaxed) > 0 || spoke {
                pool.active += 1;
            } else {
                pool.idle += 1;
            }
            let rtt = l.round_trip_us.load(Relaxed);
            if rtt > 0 {
                round_trips.push(rtt);
            }
            if handle.subscriber.queued_bytes() > 0 {
                pool.backlogged += 1;
            }
        }
        if !round_trips.is_empty() {
            pool.average_round_trip_ms = round_trips.iter().sum::<i64>() as f64 / round_trips.len() as f64 / 1000.0;
        }
        pool
    }

    /// A client acknowledged `position`: commit-to-ack, less half its round
    /// trip, when the change is still in recent memory.
    pub fn record_ack(&self, position: Position, liveness: &crate::socket::Liveness) {
        if let Some(committed_at) = self.hub.committed_at(position) {
            let round_trip = liveness.round_trip_us.load(std::sync::atomic::Ordering::Relaxed);
            self.telemetry.record_ack(committed_at, round_trip);
        }
    }

    /// What SIGHUP does: re-reads the config file (under the environment)
    /// and applies the feature switches and tunables to new work, without
    /// dropping a connection. What only a restart can change (database,
    /// address, channel, auth, pool) keeps its value, with a warning.
    pub fn reload(&self) -> Result<(), crate::config::ConfigError> {
        let current = self.settings();
        let fresh = match &current.config_file {
            Some(path) => Settings::from_file_and_env(path)?,
            None => Settings::from_env()?,
        };
        self.apply(fresh);
        Ok(())
    }

    /// Applies reloaded settings (see [`AppState::reload`]).
    pub fn apply(&self, fresh: Settings) {
        let current = self.settings();
        let mut next = fresh;
        let fixed = [
            ("DATABASE_URL", next.database_url != current.database_url),
            ("GATEWAY_LISTEN", next.listen != current.listen),
            ("GATEWAY_CHANNEL", next.channel != current.channel),
            ("GATEWAY_AUTH/GATEWAY_JWT_SECRET", next.auth != current.auth),
            ("GATEWAY_POOL_SIZE", next.pool_size != current.pool_size),
        ];
        for (variable, changed) in fixed {
            if changed {
                tracing::warn!(variable, "changed in the config, but only a restart applies it");
            }
        }
        next.database_url = current.database_url.clone();
        next.listen = current.listen;
        next.channel = current.channel.clone();
        next.auth = current.auth.clone();
        next.pool_size = current.pool_size;
        next.config_file = current.config_file.clone();
        self.hub.configure(next.pipeline.clone(), next.features);
        tracing::info!(features = ?next.features, "configuration reloaded");
        *self.settings.write().expect("settings lock") = Arc::new(next);
        self.settings_version.fetch_add(1, Ordering::Release);
    }

    /// A copy of the settings that follows reloads, for a loop that reads
    /// them per message (the shared lock's counter would bounce between
    /// cores on every read).
    pub fn settings_cache(&self) -> SettingsCache {
        SettingsCache {
            version: self.settings_version.load(Ordering::Acquire),
            settings: self.settings(),
        }
    }
}

/// See [`AppState::settings_cache`].
pub struct SettingsCache {
    version: u64,
    settings: Arc<Settings>,
}

impl SettingsCache {
    /// The current settings: the copy, re-read if a reload happened since.
    pub fn get(&mut self, state: &AppState) -> &Settings {
        let version = state.settings_version.load(Ordering::Acquire);
        if version != self.version {
            self.version = version;
            self.settings = state.settings();
        }
        &self.settings
    }
}

/// What the gateway keeps of each open connection for `/healthz`.
pub struct ConnectionHandle {
    pub liveness: Arc<crate::socket::Liveness>,
    pub subscriber: Arc<crate::rooms::Subscriber>,
}

/// `/healthz` `connectionPool`, from the open connections.
#[derive(Debug, Default, Clone, Copy)]
pub struct PoolSnapshot {
    /// Subscribed, or heard from within two heartbeat intervals.
    pub active: usize,
    pub idle: usize,
    /// Mean ping round trip of connections that answered one.
    pub average_round_trip_ms: f64,
    /// Connections with frames waiting to be written.
    pub backlogged: usize,
}

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
    state: Arc<AppState>,
    feed: Feed,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let database_url = settings.database_url.clone().ok_or_else(|| {
            anyhow!(
                "DATABASE_URL is not set: point it at the ConstructTrack database (or run `make run` for a local demo)"
            )
        })?;
        let connect: PgConnectOptions = database_url
            .parse()
            .context("DATABASE_URL is not a valid PostgreSQL URL")?;
        let pool = PgPoolOptions::new()
            .max_connections(settings.pool_size)
            .acquire_timeout(Duration::from_secs(5))
            .connect_with(connect.application_name("ws-gateway"))
            .await
            .context("connecting to DATABASE_URL")?;

        if settings.auto_migrate {
            capture::migrate(&pool, &settings.channel).await?;
        } else {
            match capture::database_channel(&pool).await? {
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

        let listener = bind(settings.listen).with_context(|| format!("binding GATEWAY_LISTEN={}", settings.listen))?;

        if matches!(settings.auth, Auth::None) {
            tracing::warn!(
                "GATEWAY_AUTH=none: ANY client can read EVERY room. Use this for local development only; set GATEWAY_AUTH=jwt and GATEWAY_JWT_SECRET in production"
            );
        }
        let telemetry = Arc::new(Telemetry::default());
        let hub = Arc::new(Hub::new(Position(0), settings.pipeline.clone(), settings.features));
        let feed = Feed::new(
            database_url,
            settings.channel.clone(),
            pool.clone(),
            Arc::clone(&hub),
            Arc::clone(&telemetry),
        );
        let state = Arc::new(AppState {
            auth: Authenticator::new(&settings.auth, settings.history.jwt_leeway.as_secs()),
            authorizer: crate::authz::Authorizer::new(pool.clone(), settings.cache.capacity),
            connections_live: Default::default(),
            refusals: Default::default(),
            closes: Default::default(),
            settings: RwLock::new(Arc::new(settings)),
            settings_version: AtomicU64::new(0),
            hub,
            telemetry,
            pool,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            instance_id: instance_id(),
            next_connection_id: AtomicU64::new(1),
            active_connections: AtomicUsize::new(0),
            started_at: std::time::Instant::now(),
        });
        Ok(Application { listener, state, feed })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("a bound listener has an address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
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
        let Application { listener, state, feed } = self;
        let shutdown = state.shutdown.clone();
        tracing::info!(address = %listener.local_addr()?, "ws-gateway listening");

        let mut feed_task = tokio::spawn(feed.run(shutdown.clone()));
        let closer = Arc::clone(&state);
        tokio::spawn(async move {
            closer.shutdown.cancelled().await;
            closer.close_all(&crate::rooms::CloseReason::going_away());
        });
        let mut reload_task = tokio::spawn(reload_on_hangup(Arc::clone(&state)));
        let mut pruner_task = tokio::spawn(crate::history::run_pruner(
            state.pool.clone(),
            state.settings().history.retention,
            shutdown.clone(),
        ));
        let mut probe_task = tokio::spawn(crate::probe::run(Arc::clone(&state), listener.local_addr()?));
        let mut monitor_task = tokio::spawn(crate::telemetry::monitor::run(Arc::clone(&state)));
        let router = http::router(Arc::clone(&state));
        // No Nagle: a change is one small frame, written when it is ready;
        // held back until the previous frame's ACK it would wait out the
        // client's delayed ACK (up to 40 ms).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on a connection");
            }
        });
        let mut http_task = tokio::spawn(
            axum::serve(listener, router)
                .with_graceful_shutdown(shutdown.clone().cancelled_owned())
                .into_future(),
        );

        let died = tokio::select! {
            () = shutdown.cancelled() => None,
            result = &mut feed_task => Some(("feed", flatten(result))),
            result = &mut pruner_task => Some(("history pruner", flatten(result))),
            result = &mut reload_task => Some(("SIGHUP reload", flatten(result))),
            result = &mut probe_task => Some(("probe", flatten(result))),
            result = &mut monitor_task => Some(("telemetry monitor", flatten(result))),
            result = &mut http_task => Some(("http server", flatten(result.map(|r| r.map_err(anyhow::Error::from))))),
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
        for task in [&mut probe_task, &mut monitor_task] {
            if !task.is_finished() {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, task).await;
            }
        }
        if !http_task.is_finished() {
            let _ = tokio::time::timeout(DRAIN_TIMEOUT, &mut http_task).await;
        }
        state.pool.close().await;
        tracing::info!("ws-gateway stopped");
        outcome
    }
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

/// Short, unique enough to tell instances apart in connection ids and logs.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{:x}{:04x}", std::process::id(), nanos & 0xffff)
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
