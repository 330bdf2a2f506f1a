//! Configuration, beside the data path: every variable of SPEC section 3 is read
//! and validated once (at start, and again on SIGHUP) into typed [`Settings`];
//! no other module reads the environment.
//!
//! Sources, later ones winning: the env file named by `GATEWAY_CONFIG_FILE`,
//! then the process environment. Empty values count as unset, surrounding
//! whitespace is ignored, and any `GATEWAY_*` name that is not in
//! [`KNOWN_VARIABLES`] is refused so that a typo cannot silently fall back to a
//! default.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Every `GATEWAY_*` variable the gateway reads. Any other name with that
/// prefix is refused; add a new variable here and in
/// `config/gateway.env.example` (a unit test checks both).
pub const KNOWN_VARIABLES: &[&str] = &[
    "GATEWAY_LISTEN",
    "GATEWAY_CHANNEL",
    "GATEWAY_AUTH",
    "GATEWAY_JWT_SECRET",
    "GATEWAY_AUTO_MIGRATE",
    "GATEWAY_POOL_SIZE",
    "GATEWAY_CONFIG_FILE",
    "GATEWAY_BATCH_SIZE",
    "GATEWAY_BATCH_TIMEOUT_MS",
    "GATEWAY_PRIORITY_TABLES",
    "GATEWAY_COMPRESSION_THRESHOLD",
    "GATEWAY_COMPRESSION_LEVEL",
    "GATEWAY_DEDUP_WINDOW_MS",
    "GATEWAY_HEARTBEAT_MS",
    "GATEWAY_CONNECTION_TIMEOUT_MS",
    "GATEWAY_MAX_IDLE_MS",
    "GATEWAY_CACHE_CAPACITY",
    "GATEWAY_CACHE_TTL_MS",
    "GATEWAY_PROFILING_INTERVAL_MS",
    "GATEWAY_METRIC_RETENTION_MS",
    "GATEWAY_BOTTLENECK_THRESHOLD_MS",
    "GATEWAY_REGRESSION_CHECK_MS",
    "GATEWAY_REGRESSION_WARN_PCT",
    "GATEWAY_REGRESSION_CRIT_PCT",
    "GATEWAY_BASELINE_WINDOW_MS",
    "GATEWAY_MAX_CONNECTIONS",
    "GATEWAY_MAX_SUBSCRIPTIONS",
    "GATEWAY_MAX_MESSAGE_BYTES",
    "GATEWAY_RATE_LIMIT",
    "GATEWAY_SEND_QUEUE_BYTES",
    "GATEWAY_HISTORY_RETENTION",
    "GATEWAY_PROBE_INTERVAL_MS",
    "GATEWAY_JWT_LEEWAY_S",
    "GATEWAY_ALLOWED_ORIGINS",
    "GATEWAY_FEATURES",
];

/// Bounds of the adaptive heartbeat: the configured interval must lie within
/// them, and adaptation never leaves them.
pub const HEARTBEAT_MIN: Duration = Duration::from_millis(HEARTBEAT_MIN_MS);
pub const HEARTBEAT_MAX: Duration = Duration::from_millis(HEARTBEAT_MAX_MS);
const HEARTBEAT_MIN_MS: u64 = 10_000;
const HEARTBEAT_MAX_MS: u64 = 60_000;

/// The shortest JWT secret accepted: HS256 with fewer than 256 bits of key is
/// guessable.
pub const MIN_JWT_SECRET_BYTES: usize = 32;

/// The whole configuration of one gateway process, validated.
#[derive(Clone, PartialEq)]
pub struct Settings {
    /// The ConstructTrack database; `None` lets `serve` start a private
    /// throwaway cluster for the demo.
    pub database_url: Option<String>,
    /// One port for WebSocket, health, metrics and dashboard.
    pub listen: SocketAddr,
    /// The NOTIFY channel the capture trigger and the feed agree on.
    pub channel: String,
    pub auth: Auth,
    /// Whether `serve` applies the embedded migrations before listening.
    pub auto_migrate: bool,
    /// Connections in the pool beside the dedicated LISTEN connection.
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
}

/// How clients prove which rooms they may join.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    /// Every connection may join every room: local development only.
    None,
    /// HS256 tokens signed with `secret` (at least 32 bytes).
    Jwt { secret: String },
}

/// What the pipeline stages between feed and rooms may do to a change.
#[derive(Debug, Clone, PartialEq)]
pub struct PipelineSettings {
    /// Most changes sent together in one `batch` frame.
    pub batch_size: usize,
    /// The longest a change may wait for companions before it is sent.
    pub batch_timeout: Duration,
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
    Low,
}

impl Priority {
    const NAMES: &str = "critical, high, normal or low";

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
            Priority::Low => "low",
        }
    }

    fn parse(name: &str) -> Option<Priority> {
        match name.to_ascii_lowercase().as_str() {
            "critical" => Some(Priority::Critical),
            "high" => Some(Priority::High),
            "normal" => Some(Priority::Normal),
            "low" => Some(Priority::Low),
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
    /// Open WebSocket connections; more are refused at upgrade.
    pub max_connections: usize,
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

    fn switch(&mut self, name: &str) -> Option<&mut bool> {
        match name {
            "dedup" => Some(&mut self.dedup),
            "batching" => Some(&mut self.batching),
            "compression" => Some(&mut self.compression),
            "adaptive_heartbeat" => Some(&mut self.adaptive_heartbeat),
            "cache" => Some(&mut self.cache),
            _ => None,
        }
    }

    /// Parses a list like `all,-compression`, `none,dedup` or `-cache`.
    ///
    /// `all` or `none` as the first item sets the base. Without one, a list
    /// that starts by turning something on (`dedup,batching`) means "only
    /// these", and one that starts by turning something off (`-compression`)
    /// means "everything but these": either reading is what its author meant.
    fn parse(list: &str) -> Result<Features, String> {
        let allowed = || {
            format!(
                "expected a comma-separated list of features to turn on (`name`) or off (`-name`), \
                 optionally starting with `all` or `none`; features: {}",
                Features::NAMES.join(", ")
            )
        };
        let mut items = list
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .peekable();
        let mut features = match items.peek().copied() {
            Some("all") => {
                items.next();
                Features::ALL
            }
            Some("none") => {
                items.next();
                Features::NONE
            }
            Some(first) if !first.starts_with('-') => Features::NONE,
            _ => Features::ALL,
        };
        for item in items {
            let (name, on) = match item.strip_prefix('-') {
                Some(name) => (name.trim(), false),
                None => (item, true),
            };
            match features.switch(name) {
                Some(switch) => *switch = on,
                None if name == "all" || name == "none" => {
                    return Err(format!("`{name}` may only be the first item; {}", allowed()));
                }
                None => return Err(format!("unknown feature `{name}`; {}", allowed())),
            }
        }
        Ok(features)
    }
}

/// A value that is not allowed, named so that an operator can fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{variable}={value:?} is not allowed: {allowed}")]
pub struct ConfigError {
    pub variable: String,
    /// The value as given; secrets and database passwords are hidden.
    pub value: String,
    /// What would have been accepted.
    pub allowed: String,
}

impl ConfigError {
    fn new(variable: &str, value: &str, allowed: impl Into<String>) -> ConfigError {
        ConfigError {
            variable: variable.to_owned(),
            value: shown_value(variable, value),
            allowed: allowed.into(),
        }
    }
}

impl Settings {
    /// Reads the process environment, layered over `GATEWAY_CONFIG_FILE`
    /// when that is set.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Settings::from_env_with_defaults(&[])
    }

    /// [`Settings::from_env`], with `defaults` standing in for variables the
    /// environment does not set (the demo defaults to `GATEWAY_AUTH=none`).
    pub fn from_env_with_defaults(defaults: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut env = process_env()?;
        for (name, value) in defaults {
            if env.get(*name).is_none_or(|v| v.trim().is_empty()) {
                env.insert((*name).to_owned(), (*value).to_owned());
            }
        }
        let file = env
            .get("GATEWAY_CONFIG_FILE")
            .map(|path| PathBuf::from(path.trim()))
            .filter(|path| !path.as_os_str().is_empty());
        match file {
            Some(path) => layered(&path, env),
            None => Settings::from_vars(env),
        }
    }

    /// Re-reads the env file at `path` under the process environment (which
    /// still wins): what SIGHUP does.
    pub fn from_file_and_env(path: &Path) -> Result<Settings, ConfigError> {
        layered(path, process_env()?)
    }

    /// Settings from a complete set of variables, refusing unknown
    /// `GATEWAY_*` names. Pure: nothing is read from the process.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        for (name, value) in &vars {
            if name.starts_with("GATEWAY_") && !KNOWN_VARIABLES.contains(&name.as_str()) {
                return Err(ConfigError::new(name, value, unknown_variable(name)));
            }
        }
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    /// Settings from whatever `lookup` returns for each variable. Pure, and
    /// it cannot see names it does not ask for: unknown variables are caught
    /// by [`Settings::from_vars`] and the functions built on it.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let vars = Vars { lookup: &lookup };
        Ok(Settings {
            database_url: vars.optional("DATABASE_URL", parse_database_url)?,
            listen: vars.parse("GATEWAY_LISTEN", ([127, 0, 0, 1], 8080).into(), parse_listen)?,
            channel: vars.parse("GATEWAY_CHANNEL", "realtime_changes".into(), parse_channel)?,
            auth: read_auth(&vars)?,
            auto_migrate: vars.flag("GATEWAY_AUTO_MIGRATE", true)?,
            pool_size: vars.int("GATEWAY_POOL_SIZE", 4, 1..=64)?,
            config_file: vars.get("GATEWAY_CONFIG_FILE").map(PathBuf::from),
            pipeline: read_pipeline(&vars)?,
            heartbeat: read_heartbeat(&vars)?,
            cache: CacheSettings {
                capacity: vars.int("GATEWAY_CACHE_CAPACITY", 10_000, 1..=10_000_000)?,
                ttl: vars.millis("GATEWAY_CACHE_TTL_MS", 60_000, 100..=86_400_000)?,
            },
            profiler: read_profiler(&vars)?,
            regression: read_regression(&vars)?,
            limits: read_limits(&vars)?,
            history: read_history(&vars)?,
            features: vars.parse("GATEWAY_FEATURES", Features::ALL, Features::parse)?,
        })
    }

    /// Defaults, with no authentication, a free port and no database: what
    /// tests start from.
    pub fn for_tests() -> Settings {
        Settings::from_lookup(|name| match name {
            "GATEWAY_AUTH" => Some("none".to_owned()),
            "GATEWAY_LISTEN" => Some("127.0.0.1:0".to_owned()),
            _ => None,
        })
        .expect("the defaults are valid")
    }

    /// `database_url` with its password hidden, for logs.
    pub fn redacted_database_url(&self) -> Option<String> {
        self.database_url.as_deref().map(redact_url)
    }
}

impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("database_url", &self.redacted_database_url())
            .field("listen", &self.listen)
            .field("channel", &self.channel)
            .field("auth", &self.auth)
            .field("auto_migrate", &self.auto_migrate)
            .field("pool_size", &self.pool_size)
            .field("config_file", &self.config_file)
            .field("pipeline", &self.pipeline)
            .field("heartbeat", &self.heartbeat)
            .field("cache", &self.cache)
            .field("profiler", &self.profiler)
            .field("regression", &self.regression)
            .field("limits", &self.limits)
            .field("history", &self.history)
            .field("features", &self.features)
            .finish()
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::None => f.write_str("None"),
            Auth::Jwt { secret } => f
                .debug_struct("Jwt")
                .field("secret", &format_args!("<{} bytes, hidden>", secret.len()))
                .finish(),
        }
    }
}

fn parse_database_url(raw: &str) -> Result<String, String> {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        Ok(raw.to_owned())
    } else {
        Err("expected a URL starting with postgres:// or postgresql://".to_owned())
    }
}

fn parse_listen(raw: &str) -> Result<SocketAddr, String> {
    raw.parse().map_err(|_| {
        "expected an IP address and port such as 127.0.0.1:8080 or [::]:8080 \
         (port 0 picks a free port)"
            .to_owned()
    })
}

fn parse_channel(raw: &str) -> Result<String, String> {
    if is_lowercase_identifier(raw) {
        Ok(raw.to_owned())
    } else {
        Err("expected a lowercase SQL identifier: a-z or _, then up to 62 of a-z, 0-9 or _".into())
    }
}

fn read_pipeline(vars: &Vars<'_>) -> Result<PipelineSettings, ConfigError> {
    Ok(PipelineSettings {
        batch_size: vars.int("GATEWAY_BATCH_SIZE", 10, 1..=1000)?,
        batch_timeout: vars.millis("GATEWAY_BATCH_TIMEOUT_MS", 100, 1..=10_000)?,
        priority_tables: vars.parse("GATEWAY_PRIORITY_TABLES", HashMap::new(), parse_priority_tables)?,
        compression_threshold: vars.int("GATEWAY_COMPRESSION_THRESHOLD", 1024, 0..=1 << 20)?,
        compression_level: vars.int("GATEWAY_COMPRESSION_LEVEL", 6, 0..=11)?,
        dedup_window: vars.millis("GATEWAY_DEDUP_WINDOW_MS", 5000, 1..=600_000)?,
    })
}

fn read_limits(vars: &Vars<'_>) -> Result<Limits, ConfigError> {
    Ok(Limits {
        max_connections: vars.int("GATEWAY_MAX_CONNECTIONS", 10_000, 1..=1_000_000)?,
        max_subscriptions: vars.int("GATEWAY_MAX_SUBSCRIPTIONS", 100, 1..=10_000)?,
        max_message_bytes: vars.int("GATEWAY_MAX_MESSAGE_BYTES", 64 << 10, 1 << 10..=16 << 20)?,
        rate_limit: vars.int("GATEWAY_RATE_LIMIT", 100, 1..=100_000)?,
        send_queue_bytes: vars.int("GATEWAY_SEND_QUEUE_BYTES", 8 << 20, 64 << 10..=1 << 30)?,
    })
}

fn read_history(vars: &Vars<'_>) -> Result<HistorySettings, ConfigError> {
    let probe_interval = vars.parse(
        "GATEWAY_PROBE_INTERVAL_MS",
        Some(Duration::from_millis(1000)),
        |raw| match raw.parse::<u64>() {
            Ok(0) => Ok(None),
            Ok(ms @ 100..=3_600_000) => Ok(Some(Duration::from_millis(ms))),
            _ => Err("expected 0 (probe off) or an integer from 100 to 3600000".to_owned()),
        },
    )?;
    Ok(HistorySettings {
        retention: vars.span(
            "GATEWAY_HISTORY_RETENTION",
            Duration::from_secs(24 * HOUR),
            Duration::from_secs(MINUTE)..=Duration::from_secs(90 * DAY),
        )?,
        probe_interval,
        jwt_leeway: Duration::from_secs(vars.int("GATEWAY_JWT_LEEWAY_S", 5, 0..=300)?),
        allowed_origins: vars.parse("GATEWAY_ALLOWED_ORIGINS", Vec::new(), parse_origins)?,
    })
}

fn read_auth(vars: &Vars<'_>) -> Result<Auth, ConfigError> {
    let jwt = vars.parse("GATEWAY_AUTH", true, |raw| match raw.to_ascii_lowercase().as_str() {
        "jwt" => Ok(true),
        "none" => Ok(false),
        _ => Err("expected jwt or none".to_owned()),
    })?;
    if !jwt {
        return Ok(Auth::None);
    }
    let secret = vars.optional("GATEWAY_JWT_SECRET", |raw| {
        if raw.len() >= MIN_JWT_SECRET_BYTES {
            Ok(raw.to_owned())
        } else {
            Err(format!("expected at least {MIN_JWT_SECRET_BYTES} bytes"))
        }
    })?;
    let secret = secret.ok_or_else(|| {
        ConfigError::new(
            "GATEWAY_JWT_SECRET",
            "",
            format!(
                "required with GATEWAY_AUTH=jwt (the default): expected a secret of at least \
                 {MIN_JWT_SECRET_BYTES} bytes, or GATEWAY_AUTH=none for local development"
            ),
        )
    })?;
    Ok(Auth::Jwt { secret })
}

fn read_heartbeat(vars: &Vars<'_>) -> Result<HeartbeatSettings, ConfigError> {
    let interval = vars.millis("GATEWAY_HEARTBEAT_MS", 25_000, HEARTBEAT_MIN_MS..=HEARTBEAT_MAX_MS)?;
    let connection_timeout = vars.millis("GATEWAY_CONNECTION_TIMEOUT_MS", 60_000, 1000..=3_600_000)?;
    // A timeout shorter than the interval would close healthy connections
    // between two pings.
    if connection_timeout < interval {
        return Err(ConfigError::new(
            "GATEWAY_CONNECTION_TIMEOUT_MS",
            &connection_timeout.as_millis().to_string(),
            format!("expected at least GATEWAY_HEARTBEAT_MS ({})", interval.as_millis()),
        ));
    }
    Ok(HeartbeatSettings {
        interval,
        min: HEARTBEAT_MIN,
        max: HEARTBEAT_MAX,
        connection_timeout,
        max_idle: vars.millis("GATEWAY_MAX_IDLE_MS", 300_000, 10_000..=86_400_000)?,
    })
}

fn read_profiler(vars: &Vars<'_>) -> Result<ProfilerSettings, ConfigError> {
    let interval = vars.millis("GATEWAY_PROFILING_INTERVAL_MS", 5000, 100..=3_600_000)?;
    let metric_retention = vars.millis("GATEWAY_METRIC_RETENTION_MS", 300_000, 1000..=86_400_000)?;
    if metric_retention < interval {
        return Err(ConfigError::new(
            "GATEWAY_METRIC_RETENTION_MS",
            &metric_retention.as_millis().to_string(),
            format!(
                "expected at least GATEWAY_PROFILING_INTERVAL_MS ({})",
                interval.as_millis()
            ),
        ));
    }
    Ok(ProfilerSettings {
        interval,
        metric_retention,
        bottleneck_threshold: vars.millis("GATEWAY_BOTTLENECK_THRESHOLD_MS", 100, 1..=60_000)?,
    })
}

fn read_regression(vars: &Vars<'_>) -> Result<RegressionSettings, ConfigError> {
    let warn_pct = vars.percent("GATEWAY_REGRESSION_WARN_PCT", 15.0, 0.1..=1000.0)?;
    let crit_pct = vars.percent("GATEWAY_REGRESSION_CRIT_PCT", 30.0, 0.1..=1000.0)?;
    if crit_pct <= warn_pct {
        return Err(ConfigError::new(
            "GATEWAY_REGRESSION_CRIT_PCT",
            &crit_pct.to_string(),
            format!("expected more than GATEWAY_REGRESSION_WARN_PCT ({warn_pct})"),
        ));
    }
    Ok(RegressionSettings {
        check_interval: vars.millis("GATEWAY_REGRESSION_CHECK_MS", 60_000, 1000..=86_400_000)?,
        warn_pct,
        crit_pct,
        baseline_window: vars.millis("GATEWAY_BASELINE_WINDOW_MS", 300_000, 1000..=86_400_000)?,
    })
}

/// The variables as one lookup, with one parser per kind of value. Every
/// parser turns an unset or empty variable into its default and a bad value
/// into a [`ConfigError`] that says what is allowed.
struct Vars<'a> {
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    }

    /// `parse` returns the value, or what would have been allowed.
    fn optional<T>(&self, name: &str, parse: impl FnOnce(&str) -> Result<T, String>) -> Result<Option<T>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        parse(&raw)
            .map(Some)
            .map_err(|allowed| ConfigError::new(name, &raw, allowed))
    }

    fn parse<T>(
        &self,
        name: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        Ok(self.optional(name, parse)?.unwrap_or(default))
    }

    fn int<T>(&self, name: &str, default: T, range: RangeInclusive<T>) -> Result<T, ConfigError>
    where
        T: FromStr + PartialOrd + fmt::Display,
    {
        self.parse(name, default, |raw| {
            raw.parse()
                .ok()
                .filter(|n| range.contains(n))
                .ok_or_else(|| format!("expected an integer from {} to {}", range.start(), range.end()))
        })
    }

    fn millis(&self, name: &str, default_ms: u64, range_ms: RangeInclusive<u64>) -> Result<Duration, ConfigError> {
        self.int(name, default_ms, range_ms).map(Duration::from_millis)
    }

    fn percent(&self, name: &str, default: f64, range: RangeInclusive<f64>) -> Result<f64, ConfigError> {
        self.parse(name, default, |raw| {
            raw.parse()
                .ok()
                .filter(|pct| range.contains(pct))
                .ok_or_else(|| format!("expected a percentage from {} to {}", range.start(), range.end()))
        })
    }

    fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        self.parse(name, default, |raw| match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false (also 1/0, yes/no, on/off)".to_owned()),
        })
    }

    /// A duration written with a unit: `90s`, `30m`, `24h`, `7d`.
    fn span(&self, name: &str, default: Duration, range: RangeInclusive<Duration>) -> Result<Duration, ConfigError> {
        self.parse(name, default, |raw| {
            parse_span(raw).filter(|span| range.contains(span)).ok_or_else(|| {
                format!(
                    "expected a duration such as 90s, 30m, 24h or 7d, from {} to {}",
                    format_span(*range.start()),
                    format_span(*range.end())
                )
            })
        })
    }
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;
const SPAN_UNITS: [(&str, u64); 4] = [("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", 1)];

fn parse_span(raw: &str) -> Option<Duration> {
    let digits = raw.find(|c: char| !c.is_ascii_digit())?;
    let (count, unit) = raw.split_at(digits);
    let count: u64 = count.parse().ok()?;
    let (_, seconds) = SPAN_UNITS.iter().find(|(name, _)| *name == unit)?;
    count.checked_mul(*seconds).map(Duration::from_secs)
}

fn format_span(span: Duration) -> String {
    let seconds = span.as_secs();
    let (unit, per) = SPAN_UNITS
        .iter()
        .find(|(_, per)| seconds % per == 0)
        .expect("every whole number of seconds divides by 1");
    format!("{}{unit}", seconds / per)
}

/// `[a-z_][a-z0-9_]{0,62}`: a name PostgreSQL uses as written, unquoted.
fn is_lowercase_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && name.len() <= 63
}

/// `safety_incidents=critical,public.inspections=high`. Table names are
/// folded to lowercase, as PostgreSQL folds unquoted names.
fn parse_priority_tables(list: &str) -> Result<HashMap<String, Priority>, String> {
    let allowed = format!(
        "expected table=priority pairs separated by commas, where table is `name` or \
         `schema.name` and priority is {}",
        Priority::NAMES
    );
    let mut tables = HashMap::new();
    for item in list.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let refuse = |why: &str| format!("{allowed}; `{item}` {why}");
        let (table, priority) = item.split_once('=').ok_or_else(|| refuse("has no `=`"))?;
        let table = table.trim().to_ascii_lowercase();
        let parts = table.split('.').count();
        if parts > 2 || !table.split('.').all(is_lowercase_identifier) {
            return Err(refuse("does not name a table"));
        }
        let priority = Priority::parse(priority.trim()).ok_or_else(|| refuse("has an unknown priority"))?;
        if tables.insert(table, priority).is_some() {
            return Err(refuse("names a table already listed"));
        }
    }
    Ok(tables)
}

/// `https://app.constructtrack.com,http://localhost:3000`, normalized to
/// lowercase without a trailing slash, as browsers send `Origin`. A lone `*`
/// means any origin, like an empty list.
fn parse_origins(list: &str) -> Result<Vec<String>, String> {
    if list == "*" {
        return Ok(Vec::new());
    }
    let mut origins = Vec::new();
    for item in list.split(',').map(str::trim).filter(|item| !item.is_empty()) {
        let origin = item.trim_end_matches('/').to_ascii_lowercase();
        if !is_origin(&origin) {
            return Err(format!(
                "expected origins separated by commas, each http:// or https:// then a host and \
                 an optional :port, with no path (such as https://app.constructtrack.com), or `*` \
                 for any; `{item}` is not one"
            ));
        }
        origins.push(origin);
    }
    Ok(origins)
}

fn is_origin(origin: &str) -> bool {
    let Some(rest) = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
    else {
        return false;
    };
    // An IPv6 host is bracketed and full of colons: the port follows the `]`.
    let (host, port) = match rest.find(']') {
        Some(end) => rest.split_at(end + 1),
        None => rest.split_at(rest.find(':').unwrap_or(rest.len())),
    };
    let host_ok = match host.strip_prefix('[') {
        Some(bracketed) => bracketed
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => !host.is_empty() && host.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'),
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .and_then(|port| port.parse::<u16>().ok())
            .is_some_and(|port| port > 0);
    host_ok && port_ok
}

/// What an error may show of a value: never a secret, never a password.
fn shown_value(variable: &str, value: &str) -> String {
    match variable {
        "GATEWAY_JWT_SECRET" if !value.is_empty() => format!("<{} bytes, hidden>", value.len()),
        "DATABASE_URL" => redact_url(value),
        _ => value.to_owned(),
    }
}

/// `postgres://user:secret@host/db?password=x` -> `postgres://user:***@host/db?password=***`.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The last `@` ends the user info even when an unencoded password holds
    // `/`, `?` or `@`.
    let (userinfo, location) = match rest.rsplit_once('@') {
        Some((userinfo, location)) => match userinfo.split_once(':') {
            Some((user, _password)) => (format!("{user}:***@"), location),
            None => (format!("{userinfo}@"), location),
        },
        None => (String::new(), rest),
    };
    let location = match location.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => location.to_owned(),
    };
    format!("{scheme}://{userinfo}{location}")
}

fn unknown_variable(name: &str) -> String {
    let suggestion = KNOWN_VARIABLES
        .iter()
        .map(|known| (edit_distance(name, known), known))
        .filter(|(distance, _)| *distance <= 3)
        .min()
        .map(|(_, known)| format!(" (did you mean {known}?)"))
        .unwrap_or_default();
    format!(
        "unknown variable{suggestion}; known: DATABASE_URL, {}",
        KNOWN_VARIABLES.join(", ")
    )
}

/// Levenshtein distance, for suggesting the variable a typo meant.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substituted = diagonal + usize::from(ca != *cb);
            diagonal = row[j + 1];
            row[j + 1] = substituted.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

/// The process environment, as text. Names that are not UTF-8 cannot be ours
/// and are skipped; a value of ours that is not UTF-8 is refused.
fn process_env() -> Result<BTreeMap<String, String>, ConfigError> {
    let mut env = BTreeMap::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue;
        };
        match value.into_string() {
            Ok(value) => {
                env.insert(name, value);
            }
            Err(value) if name == "DATABASE_URL" || name.starts_with("GATEWAY_") => {
                return Err(ConfigError::new(
                    &name,
                    &value.to_string_lossy(),
                    "expected valid UTF-8",
                ));
            }
            Err(_) => {}
        }
    }
    Ok(env)
}

/// The env file at `path` with `env` over it; an empty value in `env` does
/// not hide the file's value, since empty counts as unset.
fn layered(path: &Path, env: BTreeMap<String, String>) -> Result<Settings, ConfigError> {
    let file_error = |allowed: String| ConfigError::new("GATEWAY_CONFIG_FILE", &path.display().to_string(), allowed);
    let text =
        std::fs::read_to_string(path).map_err(|err| file_error(format!("expected a readable env file: {err}")))?;
    let mut vars: BTreeMap<String, String> = parse_env_file(&text)
        .map_err(|line| {
            file_error(format!(
                "expected KEY=value lines, `#` comments and blank lines; line {line} is not one"
            ))
        })?
        .into_iter()
        .collect();
    vars.extend(env.into_iter().filter(|(_, value)| !value.trim().is_empty()));
    let mut settings = Settings::from_vars(vars)?;
    settings.config_file = Some(path.to_path_buf());
    Ok(settings)
}

/// `KEY=value` lines, `#` comments, an optional `export ` prefix and optional
/// quotes around the value; a later line wins. Errs with the 1-based number
/// of the first line that is none of these.
fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, usize> {
    let mut vars = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").map_or(line, str::trim_start);
        let (name, value) = line.split_once('=').ok_or(index + 1)?;
        let name = name.trim();
        let name_ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let value = unquote(value.trim());
        match (name_ok, value) {
            (true, Some(value)) => vars.push((name.to_owned(), value.to_owned())),
            _ => return Err(index + 1),
        }
    }
    Ok(vars)
}

/// `"value"` or `'value'` as written between the quotes; an unquoted value
/// ends at a ` #` comment. `None` for an unclosed quote.
fn unquote(value: &str) -> Option<&str> {
    for quote in ['"', '\''] {
        if let Some(inner) = value.strip_prefix(quote) {
            return inner.strip_suffix(quote);
        }
    }
    let end = value
        .char_indices()
        .find(|&(i, c)| c == '#' && value[..i].ends_with(char::is_whitespace))
        .map_or(value.len(), |(i, _)| i);
    Some(value[..end].trim_end())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect()
    }

    /// Settings from `pairs`, with authentication off unless `pairs` say otherwise.
    fn settings(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        let mut all = vars(&[("GATEWAY_AUTH", "none")]);
        all.extend(vars(pairs));
        Settings::from_vars(all)
    }

    /// Asserts that `pairs` are refused, naming `variable` and `value`.
    #[track_caller]
    fn assert_refused(pairs: &[(&str, &str)], variable: &str, value: &str) -> ConfigError {
        let err = settings(pairs).expect_err("should be refused");
        assert_eq!(err.variable, variable, "{err}");
        assert_eq!(err.value, value, "{err}");
        let shown = err.to_string();
        assert!(
            shown.starts_with(&format!("{variable}={value:?} is not allowed: ")),
            "{shown}"
        );
        err
    }

    #[test]
    fn defaults_parse() {
        let s = settings(&[]).unwrap();
        assert_eq!(s.database_url, None);
        assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(s.channel, "realtime_changes");
        assert_eq!(s.auth, Auth::None);
        assert!(s.auto_migrate);
        assert_eq!(s.pool_size, 4);
        assert_eq!(s.config_file, None);
        assert_eq!(s.pipeline.batch_size, 10);
        assert_eq!(s.pipeline.batch_timeout, Duration::from_millis(100));
        assert!(s.pipeline.priority_tables.is_empty());
        assert_eq!(s.pipeline.compression_threshold, 1024);
        assert_eq!(s.pipeline.compression_level, 6);
        assert_eq!(s.pipeline.dedup_window, Duration::from_millis(5000));
        assert_eq!(s.heartbeat.interval, Duration::from_millis(25_000));
        assert_eq!(s.heartbeat.min, Duration::from_secs(10));
        assert_eq!(s.heartbeat.max, Duration::from_secs(60));
        assert_eq!(s.heartbeat.connection_timeout, Duration::from_millis(60_000));
        assert_eq!(s.heartbeat.max_idle, Duration::from_millis(300_000));
        assert_eq!(s.cache.capacity, 10_000);
        assert_eq!(s.cache.ttl, Duration::from_millis(60_000));
        assert_eq!(s.profiler.interval, Duration::from_millis(5000));
        assert_eq!(s.profiler.metric_retention, Duration::from_millis(300_000));
        assert_eq!(s.profiler.bottleneck_threshold, Duration::from_millis(100));
        assert_eq!(s.regression.check_interval, Duration::from_millis(60_000));
        assert_eq!(s.regression.warn_pct, 15.0);
        assert_eq!(s.regression.crit_pct, 30.0);
        assert_eq!(s.regression.baseline_window, Duration::from_millis(300_000));
        assert_eq!(s.limits.max_connections, 10_000);
        assert_eq!(s.limits.max_subscriptions, 100);
        assert_eq!(s.limits.max_message_bytes, 65_536);
        assert_eq!(s.limits.rate_limit, 100);
        assert_eq!(s.limits.send_queue_bytes, 8_388_608);
        assert_eq!(s.history.retention, Duration::from_secs(24 * 3600));
        assert_eq!(s.history.probe_interval, Some(Duration::from_millis(1000)));
        assert_eq!(s.history.jwt_leeway, Duration::from_secs(5));
        assert!(s.history.allowed_origins.is_empty());
        assert_eq!(s.features, Features::ALL);
    }

    #[test]
    fn for_tests_is_defaults_without_auth_on_a_free_port() {
        let s = Settings::for_tests();
        assert_eq!(s.auth, Auth::None);
        assert_eq!(s.listen.port(), 0);
        assert_eq!(s.database_url, None);
        assert_eq!(s.pipeline, settings(&[]).unwrap().pipeline);
    }

    #[test]
    fn values_are_read() {
        let s = settings(&[
            ("DATABASE_URL", "postgresql://gw:pw@db:5432/ct"),
            ("GATEWAY_LISTEN", "[::]:9000"),
            ("GATEWAY_CHANNEL", "_changes_2"),
            ("GATEWAY_AUTH", "jwt"),
            ("GATEWAY_JWT_SECRET", SECRET),
            ("GATEWAY_AUTO_MIGRATE", "off"),
            ("GATEWAY_POOL_SIZE", " 64 "),
            ("GATEWAY_BATCH_SIZE", "50"),
            ("GATEWAY_HISTORY_RETENTION", "7d"),
            ("GATEWAY_PROBE_INTERVAL_MS", "0"),
            ("GATEWAY_REGRESSION_WARN_PCT", "12.5"),
            (
                "GATEWAY_ALLOWED_ORIGINS",
                "https://App.ConstructTrack.com/, http://localhost:3000",
            ),
        ])
        .unwrap();
        assert_eq!(s.database_url.as_deref(), Some("postgresql://gw:pw@db:5432/ct"));
        assert_eq!(s.listen, "[::]:9000".parse().unwrap());
        assert_eq!(s.channel, "_changes_2");
        assert_eq!(
            s.auth,
            Auth::Jwt {
                secret: SECRET.to_owned()
            }
        );
        assert!(!s.auto_migrate);
        assert_eq!(s.pool_size, 64);
        assert_eq!(s.pipeline.batch_size, 50);
        assert_eq!(s.history.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(s.history.probe_interval, None);
        assert_eq!(s.regression.warn_pct, 12.5);
        assert_eq!(
            s.history.allowed_origins,
            ["https://app.constructtrack.com", "http://localhost:3000"]
        );
        assert!(s.history.origin_allowed("https://app.constructtrack.com"));
        assert!(!s.history.origin_allowed("https://evil.example"));
    }

    #[test]
    fn empty_values_count_as_unset() {
        let s = settings(&[("GATEWAY_BATCH_SIZE", ""), ("GATEWAY_CHANNEL", "  ")]).unwrap();
        assert_eq!(s.pipeline.batch_size, 10);
        assert_eq!(s.channel, "realtime_changes");
    }

    #[test]
    fn bool_forms() {
        for (raw, expected) in [("true", true), ("1", true), ("YES", true), ("on", true)]
            .into_iter()
            .chain([("false", false), ("0", false), ("no", false), ("Off", false)])
        {
            let s = settings(&[("GATEWAY_AUTO_MIGRATE", raw)]).unwrap();
            assert_eq!(s.auto_migrate, expected, "{raw}");
        }
    }

    #[test]
    fn refuses_bad_int_with_the_message_operators_see() {
        let err = assert_refused(&[("GATEWAY_BATCH_SIZE", "abc")], "GATEWAY_BATCH_SIZE", "abc");
        assert_eq!(
            err.to_string(),
            r#"GATEWAY_BATCH_SIZE="abc" is not allowed: expected an integer from 1 to 1000"#
        );
        assert_refused(&[("GATEWAY_POOL_SIZE", "-1")], "GATEWAY_POOL_SIZE", "-1");
        assert_refused(&[("GATEWAY_CACHE_TTL_MS", "1.5")], "GATEWAY_CACHE_TTL_MS", "1.5");
    }

    #[test]
    fn refuses_out_of_range() {
        assert_refused(&[("GATEWAY_BATCH_SIZE", "0")], "GATEWAY_BATCH_SIZE", "0");
        assert_refused(&[("GATEWAY_POOL_SIZE", "65")], "GATEWAY_POOL_SIZE", "65");
        let err = assert_refused(
            &[("GATEWAY_COMPRESSION_LEVEL", "12")],
            "GATEWAY_COMPRESSION_LEVEL",
            "12",
        );
        assert!(err.allowed.contains("from 0 to 11"), "{err}");
        assert_refused(
            &[("GATEWAY_PROBE_INTERVAL_MS", "50")],
            "GATEWAY_PROBE_INTERVAL_MS",
            "50",
        );
        assert_refused(
            &[("GATEWAY_REGRESSION_WARN_PCT", "NaN")],
            "GATEWAY_REGRESSION_WARN_PCT",
            "NaN",
        );
    }

    #[test]
    fn refuses_bad_bool() {
        let err = assert_refused(&[("GATEWAY_AUTO_MIGRATE", "maybe")], "GATEWAY_AUTO_MIGRATE", "maybe");
        assert!(err.allowed.contains("true or false"), "{err}");
    }

    #[test]
    fn spans() {
        for (raw, seconds) in [("90s", 90), ("30m", 1800), ("24h", 86_400), ("90d", 90 * 86_400)] {
            let s = settings(&[("GATEWAY_HISTORY_RETENTION", raw)]).unwrap();
            assert_eq!(s.history.retention, Duration::from_secs(seconds), "{raw}");
        }
    }

    #[test]
    fn refuses_bad_duration() {
        for raw in ["24", "h", "1w", "-1h", "1.5h", "59s", "91d", "99999999999999999999d"] {
            let err = assert_refused(&[("GATEWAY_HISTORY_RETENTION", raw)], "GATEWAY_HISTORY_RETENTION", raw);
            assert!(err.allowed.contains("from 1m to 90d"), "{err}");
        }
    }

    #[test]
    fn refuses_bad_origin_list() {
        for raw in [
            "app.constructtrack.com",
            "ftp://x.com",
            "https://x.com/path",
            "https://x.com:0",
            "https://x.com:99999",
            "https://",
            "https://a.com,*",
            "https://x.com:",
            "https://x.com:80:80",
            "https://[::1",
            "https://[nothost]:80",
            "https://[::1]x",
        ] {
            let err = assert_refused(&[("GATEWAY_ALLOWED_ORIGINS", raw)], "GATEWAY_ALLOWED_ORIGINS", raw);
            assert!(err.allowed.contains("is not one"), "{err}");
        }
        let s = settings(&[("GATEWAY_ALLOWED_ORIGINS", "https://[::1]:8443,*")]);
        assert!(s.is_err());
        let s = settings(&[("GATEWAY_ALLOWED_ORIGINS", "https://[::1]:8443,http://[2001:db8::1:5],")]).unwrap();
        assert_eq!(
            s.history.allowed_origins,
            ["https://[::1]:8443", "http://[2001:db8::1:5]"]
        );
        let s = settings(&[("GATEWAY_ALLOWED_ORIGINS", "*")]).unwrap();
        assert!(s.history.origin_allowed("https://anything.example"));
    }

    #[test]
    fn features_lists() {
        let parse = |list: &str| Features::parse(list).unwrap();
        assert_eq!(parse(""), Features::ALL);
        assert_eq!(parse("all"), Features::ALL);
        assert_eq!(parse("none"), Features::NONE);
        assert_eq!(
            parse("-compression, -cache"),
            Features {
                compression: false,
                cache: false,
                ..Features::ALL
            }
        );
        assert_eq!(
            parse("all,-adaptive_heartbeat"),
            Features {
                adaptive_heartbeat: false,
                ..Features::ALL
            }
        );
        assert_eq!(
            parse("none,dedup"),
            Features {
                dedup: true,
                ..Features::NONE
            }
        );
        assert_eq!(
            parse("dedup,batching"),
            Features {
                dedup: true,
                batching: true,
                ..Features::NONE
            }
        );
        assert_eq!(parse("none,cache,-cache"), Features::NONE);
        let s = settings(&[("GATEWAY_FEATURES", "-batching")]).unwrap();
        assert!(!s.features.batching && s.features.dedup);
    }

    #[test]
    fn refuses_unknown_feature() {
        let err = assert_refused(&[("GATEWAY_FEATURES", "dedup,zip")], "GATEWAY_FEATURES", "dedup,zip");
        assert!(err.allowed.contains("`zip`"), "{err}");
        assert!(
            err.allowed
                .contains("dedup, batching, compression, adaptive_heartbeat, cache"),
            "{err}"
        );
        assert_refused(&[("GATEWAY_FEATURES", "dedup,all")], "GATEWAY_FEATURES", "dedup,all");
    }

    #[test]
    fn refuses_jwt_without_secret() {
        let err = assert_refused(&[("GATEWAY_AUTH", "jwt")], "GATEWAY_JWT_SECRET", "");
        assert!(err.allowed.contains("GATEWAY_AUTH=none"), "{err}");
        // jwt is the default
        let err = Settings::from_vars(Vec::new()).unwrap_err();
        assert_eq!(err.variable, "GATEWAY_JWT_SECRET");
    }

    #[test]
    fn refuses_short_secret_without_showing_it() {
        let err = assert_refused(
            &[("GATEWAY_AUTH", "jwt"), ("GATEWAY_JWT_SECRET", "tooshort")],
            "GATEWAY_JWT_SECRET",
            "<8 bytes, hidden>",
        );
        assert!(!format!("{err} {err:?}").contains("tooshort"));
    }

    #[test]
    fn refuses_bad_auth_mode() {
        assert_refused(&[("GATEWAY_AUTH", "basic")], "GATEWAY_AUTH", "basic");
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let s = settings(&[
            ("GATEWAY_AUTH", "jwt"),
            ("GATEWAY_JWT_SECRET", SECRET),
            (
                "DATABASE_URL",
                "postgres://gw:hunter2@db/ct?password=hunter3&sslmode=require",
            ),
        ])
        .unwrap();
        let shown = format!("{s:?} {s:#?}");
        assert!(!shown.contains(SECRET) && !shown.contains("hunter"), "{shown}");
        assert_eq!(
            s.redacted_database_url().unwrap(),
            "postgres://gw:***@db/ct?password=***&sslmode=require"
        );
    }

    #[test]
    fn refuses_crit_not_above_warn() {
        let err = assert_refused(
            &[
                ("GATEWAY_REGRESSION_WARN_PCT", "30"),
                ("GATEWAY_REGRESSION_CRIT_PCT", "30"),
            ],
            "GATEWAY_REGRESSION_CRIT_PCT",
            "30",
        );
        assert!(err.allowed.contains("GATEWAY_REGRESSION_WARN_PCT (30)"), "{err}");
        assert_refused(
            &[("GATEWAY_REGRESSION_CRIT_PCT", "10")],
            "GATEWAY_REGRESSION_CRIT_PCT",
            "10",
        );
    }

    #[test]
    fn refuses_unknown_gateway_variable() {
        let err = assert_refused(&[("GATEWAY_BACH_SIZE", "10")], "GATEWAY_BACH_SIZE", "10");
        assert!(err.allowed.starts_with("unknown variable"), "{err}");
        assert!(err.allowed.contains("did you mean GATEWAY_BATCH_SIZE?"), "{err}");
        assert!(err.allowed.contains("known: DATABASE_URL, GATEWAY_LISTEN"), "{err}");
        // Other prefixes are not ours to judge.
        settings(&[("GATEWAYS", "1"), ("PATH", "/bin"), ("RUST_LOG", "debug")]).unwrap();
    }

    #[test]
    fn refuses_heartbeat_outside_bounds() {
        for raw in ["9999", "60001"] {
            let err = assert_refused(&[("GATEWAY_HEARTBEAT_MS", raw)], "GATEWAY_HEARTBEAT_MS", raw);
            assert!(err.allowed.contains("from 10000 to 60000"), "{err}");
        }
        let s = settings(&[("GATEWAY_HEARTBEAT_MS", "60000")]).unwrap();
        assert_eq!(s.heartbeat.interval, s.heartbeat.max);
        assert_refused(
            &[
                ("GATEWAY_HEARTBEAT_MS", "30000"),
                ("GATEWAY_CONNECTION_TIMEOUT_MS", "20000"),
            ],
            "GATEWAY_CONNECTION_TIMEOUT_MS",
            "20000",
        );
    }

    #[test]
    fn refuses_metric_retention_below_interval() {
        assert_refused(
            &[("GATEWAY_METRIC_RETENTION_MS", "1000")],
            "GATEWAY_METRIC_RETENTION_MS",
            "1000",
        );
    }

    #[test]
    fn refuses_bad_database_url_without_showing_the_password() {
        assert_refused(
            &[("DATABASE_URL", "mysql://root:hunter2@db/ct")],
            "DATABASE_URL",
            "mysql://root:***@db/ct",
        );
        assert_refused(&[("DATABASE_URL", "localhost")], "DATABASE_URL", "localhost");
    }

    #[test]
    fn refuses_bad_listen_address() {
        assert_refused(
            &[("GATEWAY_LISTEN", "localhost:8080")],
            "GATEWAY_LISTEN",
            "localhost:8080",
        );
    }

    #[test]
    fn refuses_bad_channel_name() {
        for raw in ["Realtime", "1changes", "real-time", "a;drop table x", &"a".repeat(64)] {
            assert_refused(&[("GATEWAY_CHANNEL", raw)], "GATEWAY_CHANNEL", raw);
        }
        settings(&[("GATEWAY_CHANNEL", &"a".repeat(63))]).unwrap();
    }

    #[test]
    fn priority_tables() {
        let s = settings(&[(
            "GATEWAY_PRIORITY_TABLES",
            "safety_incidents=critical, Public.Inspections=HIGH,audit_log=low,",
        )])
        .unwrap();
        let p = &s.pipeline;
        assert_eq!(p.priority_tables.len(), 3);
        assert_eq!(p.priority_of("public", "safety_incidents"), Priority::Critical);
        assert_eq!(p.priority_of("public", "inspections"), Priority::High);
        assert_eq!(p.priority_of("audit", "inspections"), Priority::Normal);
        assert_eq!(p.priority_of("public", "audit_log"), Priority::Low);
        assert_eq!(p.priority_of("public", "tasks"), Priority::Normal);
        assert!(Priority::Critical.bypasses_batching() && Priority::High.bypasses_batching());
        assert!(!Priority::Normal.bypasses_batching() && !Priority::Low.bypasses_batching());
    }

    #[test]
    fn refuses_bad_priority() {
        for (raw, item) in [
            ("inspections=urgent", "inspections=urgent"),
            ("tasks=high,inspections", "inspections"),
            ("a.b.c=high", "a.b.c=high"),
            ("=high", "=high"),
            ("tasks=high,tasks=low", "tasks=low"),
        ] {
            let err = assert_refused(&[("GATEWAY_PRIORITY_TABLES", raw)], "GATEWAY_PRIORITY_TABLES", raw);
            assert!(err.allowed.contains(&format!("`{item}`")), "{err}");
            assert!(err.allowed.contains("critical, high, normal or low"), "{err}");
        }
    }

    #[test]
    fn every_known_variable_is_read_and_every_read_variable_is_known() {
        let asked = RefCell::new(Vec::new());
        Settings::from_lookup(|name| {
            asked.borrow_mut().push(name.to_owned());
            match name {
                "GATEWAY_AUTH" => Some("jwt".to_owned()),
                "GATEWAY_JWT_SECRET" => Some(SECRET.to_owned()),
                _ => None,
            }
        })
        .unwrap();
        let mut asked = asked.into_inner();
        asked.sort();
        let mut known: Vec<String> = KNOWN_VARIABLES.iter().map(|n| n.to_string()).collect();
        known.push("DATABASE_URL".to_owned());
        known.sort();
        assert_eq!(asked, known);
    }

    #[test]
    fn env_file_syntax() {
        let text = "# comment\n\nexport GATEWAY_BATCH_SIZE=20\nGATEWAY_CHANNEL = \"chan\" \n\
                    GATEWAY_AUTH='none'\nGATEWAY_FEATURES=-cache # trailing comment\n\
                    DATABASE_URL=postgres://u:p#w@h/db\nGATEWAY_BATCH_SIZE=30\n";
        assert_eq!(
            parse_env_file(text).unwrap(),
            vars(&[
                ("GATEWAY_BATCH_SIZE", "20"),
                ("GATEWAY_CHANNEL", "chan"),
                ("GATEWAY_AUTH", "none"),
                ("GATEWAY_FEATURES", "-cache"),
                ("DATABASE_URL", "postgres://u:p#w@h/db"),
                ("GATEWAY_BATCH_SIZE", "30"),
            ])
        );
        assert_eq!(parse_env_file("A=1\nnot a pair\n"), Err(2));
        assert_eq!(parse_env_file("A=\"unclosed\n"), Err(1));
        assert_eq!(parse_env_file("1A=x\n"), Err(1));
    }

    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, text: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!("ws-gateway-config-{}-{name}.env", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        vars(pairs).into_iter().collect()
    }

    #[test]
    fn env_wins_over_file() {
        let file = TempFile::new(
            "layering",
            "GATEWAY_AUTH=none\nGATEWAY_BATCH_SIZE=20\nGATEWAY_CHANNEL=from_file\n\
             GATEWAY_POOL_SIZE=8\n",
        );
        let s = layered(
            &file.0,
            env(&[
                ("GATEWAY_BATCH_SIZE", "30"),
                ("GATEWAY_POOL_SIZE", ""),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(s.pipeline.batch_size, 30);
        assert_eq!(s.channel, "from_file");
        assert_eq!(s.pool_size, 8, "an empty env value does not hide the file's");
        assert_eq!(s.config_file.as_deref(), Some(file.0.as_path()));
    }

    #[test]
    fn refuses_missing_or_malformed_file() {
        let missing = std::env::temp_dir().join("ws-gateway-config-does-not-exist.env");
        let err = layered(&missing, BTreeMap::new()).unwrap_err();
        assert_eq!(err.variable, "GATEWAY_CONFIG_FILE");
        assert_eq!(err.value, missing.display().to_string());
        assert!(err.allowed.contains("readable env file"), "{err}");

        let file = TempFile::new("malformed", "GATEWAY_AUTH=none\nthis is not a pair\n");
        let err = layered(&file.0, BTreeMap::new()).unwrap_err();
        assert_eq!(err.variable, "GATEWAY_CONFIG_FILE");
        assert!(err.allowed.contains("line 2"), "{err}");
    }

    #[test]
    fn refuses_unknown_variable_in_file() {
        let file = TempFile::new("unknown", "GATEWAY_AUTH=none\nGATEWAY_BATCH_SIZ=5\n");
        let err = layered(&file.0, BTreeMap::new()).unwrap_err();
        assert_eq!(err.variable, "GATEWAY_BATCH_SIZ");
    }

    #[test]
    fn bad_value_in_file_names_the_variable() {
        let file = TempFile::new("bad", "GATEWAY_AUTH=none\nGATEWAY_RATE_LIMIT=lots\n");
        let err = layered(&file.0, BTreeMap::new()).unwrap_err();
        assert_eq!(
            (err.variable.as_str(), err.value.as_str()),
            ("GATEWAY_RATE_LIMIT", "lots")
        );
    }

    /// The example lists every variable, and its values are the defaults.
    #[test]
    fn example_file_documents_every_variable_with_its_default() {
        let example = include_str!("../../../config/gateway.env.example");
        let uncommented: String = example
            .lines()
            .filter_map(|line| line.strip_prefix("# "))
            .filter(|line| {
                line.split_once('=').is_some_and(|(name, _)| {
                    !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
                })
            })
            .map(|line| format!("{line}\n"))
            .collect();
        let mut listed = parse_env_file(&uncommented).unwrap();
        let names: Vec<&str> = listed.iter().map(|(name, _)| name.as_str()).collect();
        for known in KNOWN_VARIABLES.iter().chain(&["DATABASE_URL"]) {
            assert!(names.contains(known), "{known} is missing from the example");
        }
        listed.retain(|(name, _)| name != "DATABASE_URL" && name != "GATEWAY_CONFIG_FILE");
        listed.push(("GATEWAY_JWT_SECRET".to_owned(), SECRET.to_owned()));
        let from_example = Settings::from_vars(listed).unwrap();
        let defaults = Settings::from_vars(vars(&[("GATEWAY_JWT_SECRET", SECRET)])).unwrap();
        assert_eq!(from_example, defaults);
    }
}
