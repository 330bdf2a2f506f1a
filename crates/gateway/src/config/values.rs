//! The value parsers: one per kind of value (integers in a range, spans,
//! flags, percentages, lists), and the readers that turn the variables of
//! each area into its typed settings. Every bad value becomes a
//! [`ConfigError`] that names the variable, the value and what is allowed.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use super::types::{DEFAULT_LOG_FILTER, JwtKeys, LogFormat, LogSettings, PublicKeyFile};
use super::types::{HEARTBEAT_MAX_MS, HEARTBEAT_MIN_MS};
use super::{
    Auth, ConfigError, Features, HEARTBEAT_MAX, HEARTBEAT_MIN, HeartbeatSettings, HistorySettings, Limits,
    MIN_JWT_SECRET_BYTES, PipelineSettings, Priority, ProfilerSettings, RegressionSettings, Secret,
};

pub(super) fn parse_database_url(raw: &str) -> Result<Secret, String> {
    if raw.starts_with("postgres://") || raw.starts_with("postgresql://") {
        Ok(Secret::from(raw))
    } else {
        Err("expected a URL starting with postgres:// or postgresql://".to_owned())
    }
}

pub(super) fn parse_listen(raw: &str) -> Result<SocketAddr, String> {
    raw.parse().map_err(|_| {
        "expected an IP address and port such as 127.0.0.1:8080 or [::]:8080 \
         (port 0 picks a free port)"
            .to_owned()
    })
}

pub(super) fn parse_channel(raw: &str) -> Result<String, String> {
    if is_lowercase_identifier(raw) {
        Ok(raw.to_owned())
    } else {
        Err("expected a lowercase SQL identifier: a-z or _, then up to 62 of a-z, 0-9 or _".into())
    }
}

pub(super) fn read_pipeline(vars: &Vars<'_>) -> Result<PipelineSettings, ConfigError> {
    Ok(PipelineSettings {
        batch_size: vars.int("GATEWAY_BATCH_SIZE", 10, 1..=1000)?,
        batch_linger: vars.millis("GATEWAY_BATCH_LINGER_MS", 0, 0..=10_000)?,
        priority_tables: vars.parse("GATEWAY_PRIORITY_TABLES", HashMap::new(), parse_priority_tables)?,
        compression_threshold: vars.int("GATEWAY_COMPRESSION_THRESHOLD", 1024, 0..=1 << 20)?,
        compression_level: vars.int("GATEWAY_COMPRESSION_LEVEL", 6, 0..=11)?,
        dedup_window: vars.millis("GATEWAY_DEDUP_WINDOW_MS", 5000, 1..=600_000)?,
    })
}

pub(super) fn read_limits(vars: &Vars<'_>) -> Result<Limits, ConfigError> {
    Ok(Limits {
        max_connections: vars.int("GATEWAY_MAX_CONNECTIONS", 10_000, 1..=1_000_000)?,
        handshake_timeout: vars.millis("GATEWAY_HANDSHAKE_TIMEOUT_MS", 10_000, 100..=300_000)?,
        max_subscriptions: vars.int("GATEWAY_MAX_SUBSCRIPTIONS", 100, 1..=10_000)?,
        max_message_bytes: vars.int("GATEWAY_MAX_MESSAGE_BYTES", 64 << 10, 1 << 10..=16 << 20)?,
        rate_limit: vars.int("GATEWAY_RATE_LIMIT", 100, 1..=100_000)?,
        send_queue_bytes: vars.int("GATEWAY_SEND_QUEUE_BYTES", 8 << 20, 64 << 10..=1 << 30)?,
    })
}

pub(super) fn read_history(vars: &Vars<'_>) -> Result<HistorySettings, ConfigError> {
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

pub(super) fn read_auth(vars: &Vars<'_>) -> Result<Auth, ConfigError> {
    let jwt = vars.parse("GATEWAY_AUTH", true, |raw| match raw.to_ascii_lowercase().as_str() {
        "jwt" => Ok(true),
        "none" => Ok(false),
        _ => Err("expected jwt or none".to_owned()),
    })?;
    let keys = JwtKeys {
        secrets: vars.parse("GATEWAY_JWT_SECRET", Vec::new(), parse_secrets)?,
        public_keys: vars.parse("GATEWAY_JWT_PUBLIC_KEYS", Vec::new(), parse_public_keys)?,
        jwks_url: vars.optional("GATEWAY_JWKS_URL", parse_jwks_url)?,
    };
    if !jwt {
        return Ok(Auth::None);
    }
    if keys.secrets.is_empty() && keys.public_keys.is_empty() && keys.jwks_url.is_none() {
        return Err(ConfigError::new(
            "GATEWAY_JWT_SECRET",
            "",
            format!(
                "required with GATEWAY_AUTH=jwt (the default) unless GATEWAY_JWT_PUBLIC_KEYS or \
                 GATEWAY_JWKS_URL is set: expected one or more secrets of at least \
                 {MIN_JWT_SECRET_BYTES} bytes separated by commas, or GATEWAY_AUTH=none for local development"
            ),
        ));
    }
    Ok(Auth::Jwt(keys))
}

/// `secret1,secret2`: any of them verifies an HS256 token (rotation).
fn parse_secrets(list: &str) -> Result<Vec<Secret>, String> {
    let mut secrets = Vec::new();
    for (index, secret) in list.split(',').map(str::trim).enumerate() {
        if secret.len() < MIN_JWT_SECRET_BYTES {
            return Err(format!(
                "expected one or more secrets of at least {MIN_JWT_SECRET_BYTES} bytes, separated by \
                 commas; secret {} has {} bytes",
                index + 1,
                secret.len()
            ));
        }
        secrets.push(Secret::from(secret));
    }
    Ok(secrets)
}

/// `/etc/ws-gateway/idp.pem,/etc/ws-gateway/old.pem`: each file read now,
/// and refused unless it holds a public key the gateway can verify with.
fn parse_public_keys(list: &str) -> Result<Vec<PublicKeyFile>, String> {
    let allowed = "expected paths of PEM public key files (RSA for RS256, EC P-256 or P-384 for \
                   ES256/ES384, Ed25519 for EdDSA) separated by commas";
    let mut keys = Vec::new();
    for path in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let pem = std::fs::read_to_string(path).map_err(|e| format!("{allowed}; cannot read {path}: {e}"))?;
        let algorithm = public_key_algorithm(&pem).ok_or_else(|| {
            format!("{allowed}; {path} holds no such key (a private key or a certificate is not one)")
        })?;
        keys.push(PublicKeyFile {
            path: path.into(),
            algorithm,
            pem,
        });
    }
    if keys.is_empty() {
        return Err(allowed.to_owned());
    }
    Ok(keys)
}

/// What a PEM public key verifies, or None when it is not one.
fn public_key_algorithm(pem: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk};
    use jsonwebtoken::{Algorithm, DecodingKey};
    if !pem.contains("PUBLIC KEY-----") {
        return None;
    }
    if DecodingKey::from_rsa_pem(pem.as_bytes()).is_ok() {
        return Some(Algorithm::RS256);
    }
    if DecodingKey::from_ed_pem(pem.as_bytes()).is_ok() {
        return Some(Algorithm::EdDSA);
    }
    let key = DecodingKey::from_ec_pem(pem.as_bytes()).ok()?;
    match Jwk::from_decoding_key(&key, None).ok()?.algorithm {
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        _ => None,
    }
}

/// An `https://` URL; `http://` only to a loopback address (a key set
/// fetched in clear could be replaced by anyone on the path; a test or a
/// local sidecar is on the same host).
fn parse_jwks_url(raw: &str) -> Result<String, String> {
    let allowed = "expected an https:// URL of a JSON Web Key Set (http:// only for a loopback host: \
                   localhost, 127.0.0.1 or [::1])";
    let url = reqwest::Url::parse(raw).map_err(|e| format!("{allowed}; {e}"))?;
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::Ipv4Addr>().is_ok_and(|ip| ip.is_loopback())
        || host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .and_then(|h| h.parse::<std::net::Ipv6Addr>().ok())
            .is_some_and(|ip| ip.is_loopback());
    match url.scheme() {
        "https" if !host.is_empty() => Ok(url.to_string()),
        "http" if loopback => Ok(url.to_string()),
        "http" => Err(format!("{allowed}; this one is http:// to a host that is not loopback")),
        _ => Err(allowed.to_owned()),
    }
}

/// `GATEWAY_ADMIN_LISTEN`: an address like `GATEWAY_LISTEN`'s, but not the same one.
pub(super) fn read_admin_listen(vars: &Vars<'_>, listen: SocketAddr) -> Result<Option<SocketAddr>, ConfigError> {
    let admin = vars.optional("GATEWAY_ADMIN_LISTEN", parse_listen)?;
    match admin {
        Some(admin) if admin == listen && admin.port() != 0 => Err(ConfigError::new(
            "GATEWAY_ADMIN_LISTEN",
            &admin.to_string(),
            "expected an address other than GATEWAY_LISTEN's (leave it empty to serve the admin \
             endpoints on GATEWAY_LISTEN)",
        )),
        admin => Ok(admin),
    }
}

/// `GATEWAY_LOG_FORMAT` and `GATEWAY_LOG` (`RUST_LOG` when that is unset).
pub(super) fn read_log(vars: &Vars<'_>) -> Result<LogSettings, ConfigError> {
    let format = vars.parse("GATEWAY_LOG_FORMAT", LogFormat::Text, |raw| {
        match raw.to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            _ => Err(
                "expected text (lines for people; colour only on a terminal) or json (one object per line)".to_owned(),
            ),
        }
    })?;
    let check = |raw: &str| match tracing_subscriber::EnvFilter::builder().parse(raw) {
        Ok(_) => Ok(raw.to_owned()),
        Err(e) => Err(format!(
            "expected levels in RUST_LOG syntax, such as info or warn,ws_gateway=debug ({e})"
        )),
    };
    let filter = match vars.optional("GATEWAY_LOG", check)? {
        Some(filter) => filter,
        None => vars.parse("RUST_LOG", DEFAULT_LOG_FILTER.to_owned(), check)?,
    };
    Ok(LogSettings { format, filter })
}

pub(super) fn read_heartbeat(vars: &Vars<'_>) -> Result<HeartbeatSettings, ConfigError> {
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

pub(super) fn read_profiler(vars: &Vars<'_>) -> Result<ProfilerSettings, ConfigError> {
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

pub(super) fn read_regression(vars: &Vars<'_>) -> Result<RegressionSettings, ConfigError> {
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
pub(super) struct Vars<'a> {
    pub(super) lookup: &'a dyn Fn(&str) -> Option<String>,
}

impl Vars<'_> {
    pub(super) fn get(&self, name: &str) -> Option<String> {
        (self.lookup)(name)
            .map(|value| value.trim().to_owned())
            .filter(|value| !value.is_empty())
    }

    /// `parse` returns the value, or what would have been allowed.
    pub(super) fn optional<T>(
        &self,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<Option<T>, ConfigError> {
        let Some(raw) = self.get(name) else {
            return Ok(None);
        };
        parse(&raw)
            .map(Some)
            .map_err(|allowed| ConfigError::new(name, &raw, allowed))
    }

    pub(super) fn parse<T>(
        &self,
        name: &str,
        default: T,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Result<T, ConfigError> {
        Ok(self.optional(name, parse)?.unwrap_or(default))
    }

    pub(super) fn int<T>(&self, name: &str, default: T, range: RangeInclusive<T>) -> Result<T, ConfigError>
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

    pub(super) fn millis(
        &self,
        name: &str,
        default_ms: u64,
        range_ms: RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        self.int(name, default_ms, range_ms).map(Duration::from_millis)
    }

    pub(super) fn percent(&self, name: &str, default: f64, range: RangeInclusive<f64>) -> Result<f64, ConfigError> {
        self.parse(name, default, |raw| {
            raw.parse()
                .ok()
                .filter(|pct| range.contains(pct))
                .ok_or_else(|| format!("expected a percentage from {} to {}", range.start(), range.end()))
        })
    }

    pub(super) fn flag(&self, name: &str, default: bool) -> Result<bool, ConfigError> {
        self.parse(name, default, |raw| match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false (also 1/0, yes/no, on/off)".to_owned()),
        })
    }

    /// A duration written with a unit: `90s`, `30m`, `24h`, `7d`.
    pub(super) fn span(
        &self,
        name: &str,
        default: Duration,
        range: RangeInclusive<Duration>,
    ) -> Result<Duration, ConfigError> {
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

pub(super) fn parse_span(raw: &str) -> Option<Duration> {
    let digits = raw.find(|c: char| !c.is_ascii_digit())?;
    let (count, unit) = raw.split_at(digits);
    let count: u64 = count.parse().ok()?;
    let (_, seconds) = SPAN_UNITS.iter().find(|(name, _)| *name == unit)?;
    count.checked_mul(*seconds).map(Duration::from_secs)
}

pub(super) fn format_span(span: Duration) -> String {
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
        let priority = match priority.trim() {
            low if low.eq_ignore_ascii_case("low") => {
                return Err(refuse(
                    "asks for priority `low`, which was removed: it never changed how a change is sent",
                ));
            }
            other => Priority::parse(other).ok_or_else(|| refuse("has an unknown priority"))?,
        };
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

impl Features {
    /// Parses a list like `all,-compression`, `none,dedup` or `-cache`.
    ///
    /// `all` or `none` as the first item sets the base. Without one, a list
    /// that starts by turning something on (`dedup,batching`) means "only
    /// these", and one that starts by turning something off (`-compression`)
    /// means "everything but these": either reading is what its author meant.
    pub(super) fn parse(list: &str) -> Result<Features, String> {
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
