//! Each setting as an operator would write its variable, so that a reload
//! can say what it changed (`GATEWAY_BATCH_SIZE 10 -> 20`) without
//! printing a secret.

use std::fmt;

use super::redact::redact_url;
use super::types::{Auth, Settings};
use super::values::format_span;

/// One variable's value in a form `GATEWAY_*` accepts; `compare` is what
/// tells two values apart when `shown` hides it (secrets).
struct Described {
    variable: &'static str,
    shown: String,
    compare: Option<String>,
}

fn shown(variable: &'static str, value: impl fmt::Display) -> Described {
    Described {
        variable,
        shown: value.to_string(),
        compare: None,
    }
}

fn ms(variable: &'static str, d: std::time::Duration) -> Described {
    shown(variable, d.as_millis())
}

/// Every variable the settings came from (`KNOWN_VARIABLES` and
/// `DATABASE_URL`), described; a unit test holds the two lists equal.
fn describe(s: &Settings) -> Vec<Described> {
    let (mode, secrets, public_keys, jwks) = match &s.auth {
        Auth::None => ("none", Vec::new(), Vec::new(), None),
        Auth::Jwt(keys) => (
            "jwt",
            keys.secrets.clone(),
            keys.public_keys.clone(),
            keys.jwks_url.clone(),
        ),
    };
    let mut priority: Vec<String> = s
        .pipeline
        .priority_tables
        .iter()
        .map(|(table, priority)| format!("{table}={priority}"))
        .collect();
    priority.sort();
    let h = &s.heartbeat;
    let r = &s.regression;
    let l = &s.limits;
    vec![
        Described {
            variable: "DATABASE_URL",
            shown: s
                .database_url
                .as_ref()
                .map(|u| redact_url(u.expose()))
                .unwrap_or_default(),
            compare: Some(
                s.database_url
                    .as_ref()
                    .map(|u| u.expose().to_owned())
                    .unwrap_or_default(),
            ),
        },
        shown("GATEWAY_LISTEN", s.listen),
        shown(
            "GATEWAY_ADMIN_LISTEN",
            s.admin_listen.map(|a| a.to_string()).unwrap_or_default(),
        ),
        shown("GATEWAY_CHANNEL", &s.channel),
        shown("GATEWAY_SOURCE", s.source),
        shown("GATEWAY_AUTH", mode),
        Described {
            variable: "GATEWAY_JWT_SECRET",
            shown: format!("<{} secrets, hidden>", secrets.len()),
            compare: Some(secrets.iter().map(|s| s.expose()).collect::<Vec<_>>().join(",")),
        },
        Described {
            variable: "GATEWAY_JWT_PUBLIC_KEYS",
            shown: public_keys
                .iter()
                .map(|k| k.path.display().to_string())
                .collect::<Vec<_>>()
                .join(","),
            compare: Some(
                public_keys
                    .iter()
                    .map(|k| k.pem.as_str())
                    .collect::<Vec<_>>()
                    .join("\n"),
            ),
        },
        shown("GATEWAY_JWKS_URL", jwks.unwrap_or_default()),
        shown("GATEWAY_AUTO_MIGRATE", s.auto_migrate),
        shown("GATEWAY_POOL_SIZE", s.pool_size),
        shown(
            "GATEWAY_CONFIG_FILE",
            s.config_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        ),
        shown("GATEWAY_BATCH_SIZE", s.pipeline.batch_size),
        ms("GATEWAY_BATCH_LINGER_MS", s.pipeline.batch_linger),
        shown("GATEWAY_PRIORITY_TABLES", priority.join(",")),
        shown("GATEWAY_COMPRESSION_THRESHOLD", s.pipeline.compression_threshold),
        shown("GATEWAY_COMPRESSION_LEVEL", s.pipeline.compression_level),
        ms("GATEWAY_DEDUP_WINDOW_MS", s.pipeline.dedup_window),
        ms("GATEWAY_HEARTBEAT_MS", h.interval),
        ms("GATEWAY_CONNECTION_TIMEOUT_MS", h.connection_timeout),
        ms("GATEWAY_MAX_IDLE_MS", h.max_idle),
        shown("GATEWAY_CACHE_CAPACITY", s.cache.capacity),
        ms("GATEWAY_CACHE_TTL_MS", s.cache.ttl),
        ms("GATEWAY_PROFILING_INTERVAL_MS", s.profiler.interval),
        ms("GATEWAY_METRIC_RETENTION_MS", s.profiler.metric_retention),
        ms("GATEWAY_BOTTLENECK_THRESHOLD_MS", s.profiler.bottleneck_threshold),
        ms("GATEWAY_REGRESSION_CHECK_MS", r.check_interval),
        shown("GATEWAY_REGRESSION_WARN_PCT", r.warn_pct),
        shown("GATEWAY_REGRESSION_CRIT_PCT", r.crit_pct),
        ms("GATEWAY_BASELINE_WINDOW_MS", r.baseline_window),
        shown("GATEWAY_MAX_CONNECTIONS", l.max_connections),
        ms("GATEWAY_HANDSHAKE_TIMEOUT_MS", l.handshake_timeout),
        shown("GATEWAY_MAX_SUBSCRIPTIONS", l.max_subscriptions),
        shown("GATEWAY_MAX_MESSAGE_BYTES", l.max_message_bytes),
        shown("GATEWAY_RATE_LIMIT", l.rate_limit),
        shown("GATEWAY_SEND_QUEUE_BYTES", l.send_queue_bytes),
        shown("GATEWAY_HISTORY_RETENTION", format_span(s.history.retention)),
        shown(
            "GATEWAY_PROBE_INTERVAL_MS",
            s.history.probe_interval.map_or(0, |d| d.as_millis()),
        ),
        shown("GATEWAY_JWT_LEEWAY_S", s.history.jwt_leeway.as_secs()),
        shown("GATEWAY_ALLOWED_ORIGINS", s.history.allowed_origins.join(",")),
        shown("GATEWAY_FEATURES", s.features),
        shown("GATEWAY_LOG_FORMAT", s.log.format),
        shown("GATEWAY_LOG", &s.log.filter),
    ]
}

/// One variable whose value differs between two settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingChange {
    pub variable: &'static str,
    /// The values as `GATEWAY_*` takes them; secrets and passwords hidden.
    pub from: String,
    pub to: String,
}

impl fmt::Display for SettingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = |v: &str| {
            if v.is_empty() {
                "(unset)".to_owned()
            } else {
                v.to_owned()
            }
        };
        if self.from == self.to {
            // Hidden values that differ look the same.
            write!(f, "{} changed ({})", self.variable, value(&self.to))
        } else {
            write!(f, "{} {} -> {}", self.variable, value(&self.from), value(&self.to))
        }
    }
}

/// The variables whose values differ from `before` to `after`, in the
/// order of `config/gateway.env.example`.
pub fn changes(before: &Settings, after: &Settings) -> Vec<SettingChange> {
    describe(before)
        .into_iter()
        .zip(describe(after))
        .filter(|(a, b)| a.shown != b.shown || a.compare != b.compare)
        .map(|(a, b)| SettingChange {
            variable: a.variable,
            from: a.shown,
            to: b.shown,
        })
        .collect()
}

/// Every variable [`describe`] names, for the test that holds it to
/// `KNOWN_VARIABLES`.
#[cfg(test)]
pub(super) fn described_variables(s: &Settings) -> Vec<&'static str> {
    describe(s).into_iter().map(|d| d.variable).collect()
}
