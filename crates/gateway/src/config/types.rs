//! The typed settings: what each variable of SPEC section 3 becomes once it
//! has been read and validated. Nothing here reads anything.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::Secret;

/// Bounds of the adaptive heartbeat: the configured interval must lie within
/// them, and adaptation never leaves them.
pub const HEARTBEAT_MIN: Duration = Duration::from_millis(HEARTBEAT_MIN_MS);
pub const HEARTBEAT_MAX: Duration = Duration::from_millis(HEARTBEAT_MAX_MS);
pub(super) const HEARTBEAT_MIN_MS: u64 = 10_000;
pub(super) const HEARTBEAT_MAX_MS: u64 = 60_000;

/// The shortest JWT secret accepted: HS256 with fewer than 256 bits of key is
/// guessable.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// The whole configuration of one gateway process, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// The ConstructTrack database; `None` lets `serve` start a private
    /// throwaway cluster for the demo.
    pub database_url: Option<Secret>,
    /// The clients' port: WebSocket, and the admin endpoints too unless
    /// `admin_listen` is set.
    pub listen: SocketAddr,
    /// A second port for `/metrics`, `/latency`, `/api/*`, the dashboard and
    /// the full `/healthz`, to keep behind a firewall; `None` serves them on
    /// `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// The NOTIFY channel the capture trigger and the feed agree on.
    pub channel: String,
    /// Where changes are captured; must match the database's
    /// (`realtime.settings.source`, set by `ws-gateway source`).
    pub source: CaptureSource,
    pub auth: Auth,
    /// Whether `serve` applies the embedded migrations before listening.
    pub auto_migrate: bool,
    /// Connections in the pool for client-driven work (replays,
    /// authorization); the feed and the probe have pools of their own.
    pub pool_size: u32,
    /// The env file these settings were layered over, re-read on SIGHUP.
    pub config_file: Option<PathBuf>,
    pub pipeline: PipelineSettings,
    pub heartbeat: HeartbeatSettings,
    pub cache: CacheSettings,
    pub profiler: ProfilerSettings,
    pub regression: RegressionSettings,
    pub limits: Limits,
    pub history: HistorySettings,
    /// The rollback switch: each optimization can be turned off without a
    /// new build.
    pub features: Features,
    /// How the process logs (read before anything else by the binary; see
    /// [`LogSettings`]).
    pub log: LogSettings,
}

/// Where committed changes are captured (SPEC section 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaptureSource {
    /// A commit-time trigger on each tracked table writes the outbox.
    Notify,
    /// Logical replication: one leading instance writes the outbox from a
    /// replication slot; the writers carry nothing of the gateway.
    Wal,
}

impl CaptureSource {
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureSource::Notify => "notify",
            CaptureSource::Wal => "wal",
        }
    }

    pub fn parse(name: &str) -> Result<CaptureSource, String> {
        match name.to_ascii_lowercase().as_str() {
            "notify" => Ok(CaptureSource::Notify),
            "wal" => Ok(CaptureSource::Wal),
            _ => Err("expected notify (a trigger on each tracked table) or wal (logical replication)".to_owned()),
        }
    }
}

impl fmt::Display for CaptureSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How clients prove which rooms they may join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Every connection may join every room: local development only.
    None,
    /// JWTs, verified by any of these keys.
    Jwt(JwtKeys),
}

impl Auth {
    /// JWT auth with one HS256 secret and no other key: what tests and
    /// small deployments use.
    pub fn hs256(secret: &str) -> Auth {
        Auth::Jwt(JwtKeys {
            secrets: vec![Secret::from(secret)],
            ..JwtKeys::default()
        })
    }
}

/// Where the keys that verify tokens come from (SPEC section 3, "keys").
/// A token verifies if any key of its algorithm does.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JwtKeys {
    /// HS256 secrets, each at least [`MIN_JWT_SECRET_BYTES`]: several at
    /// once let an issuer rotate without a moment when tokens fail.
    pub secrets: Vec<Secret>,
    /// Public keys read from PEM files, for tokens an identity provider signs.
    pub public_keys: Vec<PublicKeyFile>,
    /// An identity provider's JSON Web Key Set: fetched at start, cached,
    /// refetched for an unknown `kid` at most once a minute.
    pub jwks_url: Option<String>,
}

/// One PEM public key file, read and checked when the settings are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKeyFile {
    pub path: PathBuf,
    /// What the key verifies: RS256 (RSA), ES256/ES384 (EC P-256/P-384) or
    /// EdDSA (Ed25519).
    pub algorithm: jsonwebtoken::Algorithm,
    /// The file's text, for the verifier to build its key from.
    pub pem: String,
}

/// How the process logs: `GATEWAY_LOG_FORMAT` and `GATEWAY_LOG`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    /// Which events are written, in `RUST_LOG` syntax (`info,ws_gateway=debug`);
    /// checked when read.
    pub filter: String,
}

/// How each log line is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One line per event for people; colour only on a terminal.
    Text,
    /// One JSON object per line for log shippers.
    Json,
}

impl LogFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl fmt::Display for LogFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The filter when neither `GATEWAY_LOG` nor `RUST_LOG` is set.
pub const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn";

/// What `migrate`, `track`, `untrack` and `grants` read: the database and
/// nothing else (an operator's deploy step has no JWT secret).
#[derive(Debug, Clone, PartialEq)]
pub struct DatabaseSettings {
    pub database_url: Secret,
    /// The NOTIFY channel `migrate` points the capture triggers at.
    pub channel: String,
}

/// What the pipeline stages between feed and rooms may do to a change.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSettings {
    /// Most changes sent together in one `batch` frame.
    pub batch_size: usize,
    /// How long a socket that wrote changes waits before its next write of
    /// normal-priority changes, to send what arrived meanwhile together
    /// (`GATEWAY_BATCH_LINGER_MS`). Zero: never waits.
    pub batch_linger: Duration,
    /// Tables whose changes are not normal priority, keyed by the name as
    /// configured (`table` or `schema.table`, lowercase): see
    /// [`PipelineSettings::priority_of`].
    pub priority_tables: HashMap<String, Priority>,
    /// Frames at least this many bytes long are compressed for clients that
    /// asked for an encoding.
    pub compression_threshold: usize,
    /// Brotli quality (0..=11); gzip takes `min(level, 9)`.
    pub compression_level: u32,
    /// How long an identical change for the same row and room is suppressed.
    pub dedup_window: Duration,
}

impl PipelineSettings {
    /// The priority of a change to `schema.table`: a schema-qualified entry
    /// wins over a bare table name, and unlisted tables are normal.
    pub fn priority_of(&self, schema: &str, table: &str) -> Priority {
        self.priority_tables
            .get(&format!("{schema}.{table}"))
            .or_else(|| self.priority_tables.get(table))
            .copied()
            .unwrap_or(Priority::Normal)
    }
}

/// Priority of a table's changes in the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Priority {
    Critical,
    High,
    Normal,
}

impl Priority {
    pub(super) const NAMES: &str = "critical, high or normal";

    /// Critical and high priority changes go out alone, at once: the user
    /// waiting for a safety incident should not wait for a batch to fill.
    pub fn bypasses_batching(self) -> bool {
        matches!(self, Priority::Critical | Priority::High)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Critical => "critical",
            Priority::High => "high",
            Priority::Normal => "normal",
        }
    }

    pub(super) fn parse(name: &str) -> Option<Priority> {
        match name.to_ascii_lowercase().as_str() {
            "critical" => Some(Priority::Critical),
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            _ => None,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Liveness of client connections.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatSettings {
    /// The interval announced in `welcome` and used until adaptation moves it.
    pub interval: Duration,
    /// Lower bound of adaptation ([`HEARTBEAT_MIN`]).
    pub min: Duration,
    /// Upper bound of adaptation ([`HEARTBEAT_MAX`]).
    pub max: Duration,
    /// A connection silent for this long (no pong, no message) is closed.
    pub connection_timeout: Duration,
    /// A connection with no subscription and no message for this long is closed.
    pub max_idle: Duration,
}

/// The encoded-message cache.
#[derive(Debug, Clone, PartialEq)]
pub struct CacheSettings {
    /// Most entries kept; the least recently used go first.
    pub capacity: usize,
    /// How long an entry may be served after it was stored.
    pub ttl: Duration,
}

/// The in-process profiler behind `/healthz` `performance`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfilerSettings {
    /// How often stage timings are sampled into metrics.
    pub interval: Duration,
    /// How long samples are kept.
    pub metric_retention: Duration,
    /// A stage slower than this is reported as a bottleneck.
    pub bottleneck_threshold: Duration,
}

/// Comparison of current latency with a rolling baseline.
#[derive(Debug, Clone, PartialEq)]
pub struct RegressionSettings {
    /// How often the comparison runs.
    pub check_interval: Duration,
    /// Percent slower than baseline that raises a warning.
    pub warn_pct: f64,
    /// Percent slower than baseline that raises a critical alert; above `warn_pct`.
    pub crit_pct: f64,
    /// The span of history the baseline is computed over.
    pub baseline_window: Duration,
}

/// Bounds that keep one client, or many, from exhausting the gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Open TCP connections on the client port, upgraded or not; past it a
    /// few reserved slots answer only `/healthz`, `/metrics` and the probe.
    pub max_connections: usize,
    /// A connection that has not sent its request headers (or, for any
    /// request, had it answered) by then is closed; also the longest a
    /// kept-alive HTTP connection may sit idle.
    pub handshake_timeout: Duration,
    /// Rooms one connection may be subscribed to at once.
    pub max_subscriptions: usize,
    /// Largest inbound message; larger ones close with 1009.
    pub max_message_bytes: usize,
    /// Inbound messages per second per connection; more close with 1008.
    pub rate_limit: u32,
    /// Bytes queued for one connection before it is a slow consumer (4008).
    pub send_queue_bytes: usize,
}

/// Resume, probe, and token checks.
#[derive(Debug, Clone, PartialEq)]
pub struct HistorySettings {
    /// How long changes stay in the outbox for resume.
    pub retention: Duration,
    /// How often the built-in latency probe commits; `None` turns it off.
    pub probe_interval: Option<Duration>,
    /// Clock skew tolerated on `exp`.
    pub jwt_leeway: Duration,
    /// Browser origins allowed to connect, lowercase `scheme://host[:port]`;
    /// empty allows any.
    pub allowed_origins: Vec<String>,
}

impl HistorySettings {
    /// Whether a browser's `Origin` header may open a WebSocket.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins.is_empty()
            || self
                .allowed_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    }
}

/// Optimizations that can be switched off (`GATEWAY_FEATURES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    pub dedup: bool,
    pub batching: bool,
    pub compression: bool,
    pub adaptive_heartbeat: bool,
    pub cache: bool,
}

impl Features {
    pub const ALL: Features = Features {
        dedup: true,
        batching: true,
        compression: true,
        adaptive_heartbeat: true,
        cache: true,
    };
    pub const NONE: Features = Features {
        dedup: false,
        batching: false,
        compression: false,
        adaptive_heartbeat: false,
        cache: false,
    };
    pub const NAMES: [&str; 5] = ["dedup", "batching", "compression", "adaptive_heartbeat", "cache"];

    /// Each switch with its name, in [`Features::NAMES`] order.
    pub fn switches(self) -> [(&'static str, bool); 5] {
        [
            ("dedup", self.dedup),
            ("batching", self.batching),
            ("compression", self.compression),
            ("adaptive_heartbeat", self.adaptive_heartbeat),
            ("cache", self.cache),
        ]
    }

    pub(super) fn switch(&mut self, name: &str) -> Option<&mut bool> {
        match name {
            "dedup" => Some(&mut self.dedup),
            "batching" => Some(&mut self.batching),
            "compression" => Some(&mut self.compression),
            "adaptive_heartbeat" => Some(&mut self.adaptive_heartbeat),
            "cache" => Some(&mut self.cache),
            _ => None,
        }
    }
}

/// The shortest form `GATEWAY_FEATURES` accepts for these switches: `all`,
/// `none`, `all,-compression` or `none,dedup`.
impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let switches = self.switches();
        let on = switches.iter().filter(|(_, on)| *on).count();
        // Start from whichever base needs fewer exceptions.
        let base_all = on * 2 >= switches.len();
        f.write_str(if base_all { "all" } else { "none" })?;
        for (name, state) in switches {
            if state != base_all {
                write!(f, ",{}{name}", if state { "" } else { "-" })?;
            }
        }
        Ok(())
    }
}
