//! The shared state, below every handler: what the HTTP handlers, the
//! sockets, the probe and the monitor read and update. It depends on the
//! parts it holds (settings, hub, telemetry, auth) and on no task that uses
//! it, so no import runs in a circle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Authenticator;
use crate::authz::Authorizer;
use crate::change::{Position, now_us};
use crate::config::{Auth, Settings, changes, for_reload};
use crate::db::Pools;
use crate::hub::{CloseReason, Hub, Subscriber};
use crate::slots::Slots;
use crate::telemetry::repeats::SharedRepeats;
use crate::telemetry::{Tally, Telemetry};

/// What every task of the gateway shares.
pub struct AppState {
    /// Replaced whole on reload, so a reader sees one consistent version.
    settings: RwLock<Arc<Settings>>,
    /// Bumped after each reload: hot loops keep their copy of the settings
    /// and re-read them only when this moves (see [`SettingsCache`]).
    settings_version: AtomicU64,
    pub(crate) hub: Arc<Hub>,
    pub(crate) telemetry: Arc<Telemetry>,
    /// The pool for client-driven work (replays, authorization): bounded,
    /// every statement time-limited (`pools.clients`).
    pub(crate) pool: PgPool,
    /// Every pool: the feed's and the probe's are not for clients.
    pub(crate) pools: Pools,
    pub(crate) auth: Authenticator,
    /// Cancelled once, on shutdown; every loop selects on it.
    pub(crate) shutdown: CancellationToken,
    /// Every connection task, so shutdown can wait for them to finish.
    pub(crate) connections: TaskTracker,
    /// Distinguishes this instance's connection ids from other instances'.
    pub(crate) instance_id: String,
    pub(crate) next_connection_id: AtomicU64,
    /// Open WebSocket client connections (the probe's not counted).
    pub(crate) active_connections: AtomicUsize,
    /// The client port's connection slots: every TCP connection, from
    /// accept to close (`GATEWAY_MAX_CONNECTIONS`).
    pub(crate) client_slots: Arc<Slots>,
    /// Every open connection's liveness, for `/healthz` `connectionPool`.
    connections_live: Mutex<HashMap<u64, ConnectionHandle>>,
    /// Refusals by code (error codes, HTTP refusals) and closes by code.
    pub(crate) refusals: Tally,
    pub(crate) closes: Tally,
    /// `realtime.authorize`, cached.
    pub(crate) authorizer: Authorizer,
    /// The connections' warnings, collapsed across connections.
    pub(crate) repeats: SharedRepeats,
    pub(crate) started_at: std::time::Instant,
}

impl AppState {
    /// The state of a gateway about to start; `instance_id` is made here.
    pub fn new(settings: Settings, hub: Arc<Hub>, telemetry: Arc<Telemetry>, pools: Pools) -> AppState {
        let pool = pools.clients.clone();
        let max_connections = settings.limits.max_connections;
        AppState {
            auth: Authenticator::new(&settings.auth, settings.history.jwt_leeway.as_secs()),
            authorizer: Authorizer::new(pool.clone(), settings.cache.capacity, settings.pool_size as usize),
            connections_live: Default::default(),
            refusals: Default::default(),
            closes: Default::default(),
            repeats: Default::default(),
            settings: RwLock::new(Arc::new(settings)),
            settings_version: AtomicU64::new(0),
            hub,
            telemetry,
            pool,
            pools,
            shutdown: CancellationToken::new(),
            connections: TaskTracker::new(),
            instance_id: instance_id(),
            next_connection_id: AtomicU64::new(1),
            active_connections: AtomicUsize::new(0),
            client_slots: Slots::new(max_connections),
            started_at: std::time::Instant::now(),
        }
    }

    pub fn settings(&self) -> Arc<Settings> {
        Arc::clone(&self.settings.read().expect("settings lock"))
    }

    /// Asks every open connection to close: each send loop writes what it
    /// had queued, then this close frame. Shutdown does this once; a
    /// connection registered after it sees the cancelled token itself
    /// (`socket::serve`).
    pub fn close_all(&self, reason: &CloseReason) {
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
        let now = now_us();
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
    pub fn record_ack(&self, position: Position, liveness: &Liveness) {
        if let Some(committed_at) = self.hub.committed_at(position) {
            let round_trip = liveness.round_trip_us.load(Ordering::Relaxed);
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

    /// Applies reloaded settings (see [`AppState::reload`]): what
    /// `config::for_reload` lets a reload change. Logs what changed, and
    /// what changed but waits for a restart.
    pub fn apply(&self, fresh: Settings) {
        let current = self.settings();
        let (next, ignored) = for_reload(&current, fresh);
        for change in &ignored {
            tracing::warn!(
                variable = change.variable,
                running = %change.from,
                configured = %change.to,
                "changed in the config, but only a restart applies it"
            );
        }
        let applied = changes(&current, &next);
        self.hub.configure(next.pipeline.clone(), next.features);
        self.client_slots.set_limit(next.limits.max_connections);
        if let (Some(keys), Auth::Jwt(jwt)) = (self.auth.keys(), &next.auth)
            && keys.reload(jwt)
            && let Some(jwks) = keys.jwks()
        {
            // A new key set URL: fetch it now rather than at the next turn.
            tokio::spawn(async move {
                let _ = jwks.refresh().await;
            });
        }
        let list: Vec<String> = applied.iter().map(ToString::to_string).collect();
        tracing::info!(
            changed = %if list.is_empty() { "nothing".to_owned() } else { list.join(", ") },
            features = %next.features,
            "configuration reloaded"
        );
        *self.settings.write().expect("settings lock") = Arc::new(next);
        self.settings_version.fetch_add(1, Ordering::Release);
    }

    /// Logs a warning that every connection may hit at once (the database
    /// is down), collapsed across connections: the first in full, then a
    /// summary every 30 s with how many more.
    pub(crate) fn warn_repeated(&self, what: &'static str, room: &str, error: &dyn std::fmt::Display) {
        use crate::telemetry::repeats::Occurrence;
        match self.repeats.occur(what) {
            Occurrence::First => tracing::warn!(%error, room, "{what}"),
            Occurrence::Quiet => tracing::debug!(%error, room, "{what}"),
            Occurrence::Summary { more, for_s } => tracing::warn!(
                %error,
                times = more,
                for_s = format!("{for_s:.0}"),
                "{what} (again; repeats collapsed)"
            ),
        }
    }

    /// Whether the built-in probe is subscribed to its room right now.
    pub fn probe_live(&self) -> bool {
        self.telemetry.probe_live()
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

    /// Which reload the copy is of (as of the last [`SettingsCache::get`]).
    pub fn version(&self) -> u64 {
        self.version
    }
}

/// What the gateway keeps of each open connection for `/healthz`.
pub struct ConnectionHandle {
    pub liveness: Arc<Liveness>,
    pub subscriber: Arc<Subscriber>,
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

/// What both halves of a connection, and `/healthz`, know about it.
#[derive(Debug)]
pub struct Liveness {
    /// When anything was last heard from the client (gateway clock, us).
    pub last_heard_us: AtomicI64,
    /// When the client last sent a protocol message (us).
    pub last_message_us: AtomicI64,
    /// Last measured ping round trip, us (0 until measured).
    pub round_trip_us: AtomicI64,
    /// A ping is out and its pong has not come back.
    pub ping_outstanding: AtomicBool,
    pub subscriptions: AtomicUsize,
    /// The receive half's own wake-ups (the socket's `race`).
    pub receive_wake: ReceiveWake,
}

/// A connection's receive half's wake-ups: its waker (the socket's `race`)
/// points at the connection's [`Liveness`], one allocation it has anyway.
#[derive(Debug, Default)]
pub struct ReceiveWake {
    /// Woken since its last poll.
    pub(crate) woken: AtomicBool,
    /// The connection's task.
    pub(crate) task: futures_util::task::AtomicWaker,
}

impl Liveness {
    pub(crate) fn new() -> Liveness {
        let now = now_us();
        Liveness {
            last_heard_us: AtomicI64::new(now),
            last_message_us: AtomicI64::new(now),
            round_trip_us: AtomicI64::new(0),
            ping_outstanding: AtomicBool::new(false),
            subscriptions: AtomicUsize::new(0),
            receive_wake: Default::default(),
        }
    }
}

/// Short, unique enough to tell instances apart in connection ids and logs.
fn instance_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{:x}{:04x}", std::process::id(), nanos & 0xffff)
}
