//! Configuration, beside the data path: every variable of SPEC section 3 is read
//! and validated once (at start, and again on SIGHUP) into typed [`Settings`];
//! no other module reads the environment.
//!
//! Sources, later ones winning: the env file named by `GATEWAY_CONFIG_FILE`,
//! then the process environment. Empty values count as unset, surrounding
//! whitespace is ignored. A `GATEWAY_*` name that is not in
//! [`KNOWN_VARIABLES`] but a near miss of one is refused, so that a typo
//! cannot silently fall back to a default; any other is warned about (it
//! belongs to someone else: Kubernetes service variables, tools).
//!
//! Each command reads only what it uses: `serve` and `demo` the whole
//! [`Settings`], `migrate`/`track`/`untrack`/`grants` the
//! [`DatabaseSettings`], and every command the [`LogSettings`] first.
//!
//! `types` holds the settings, `values` the parsers, `sources` the env file
//! and the environment, `redact` the [`Secret`] type and what errors may
//! show, `reload` what a SIGHUP may change, `describe` each setting as an
//! operator would write it (what a reload says it changed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod describe;
mod redact;
mod reload;
mod sources;
mod types;
mod values;

#[cfg(test)]
mod tests;

pub use describe::{SettingChange, changes};
pub use redact::Secret;
pub use reload::for_reload;
pub use sources::{KNOWN_VARIABLES, REMOVED_VARIABLES};
pub use types::{
    Auth, CacheSettings, CaptureSource, DEFAULT_LOG_FILTER, DatabaseSettings, Features, HEARTBEAT_MAX, HEARTBEAT_MIN,
    HeartbeatSettings, HistorySettings, JwtKeys, Limits, LogFormat, LogSettings, MIN_JWT_SECRET_BYTES,
    PipelineSettings, Priority, ProfilerSettings, PublicKeyFile, RegressionSettings, Settings,
};

use redact::{redact_url, shown_value};
use sources::{layered, layered_vars, process_env, unknown_variables};
use values::{
    Vars, parse_channel, parse_database_url, parse_listen, read_admin_listen, read_auth, read_heartbeat, read_history,
    read_limits, read_log, read_pipeline, read_profiler, read_regression,
};

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
    pub(crate) fn new(variable: &str, value: &str, allowed: impl Into<String>) -> ConfigError {
        ConfigError {
            variable: variable.to_owned(),
            value: shown_value(variable, value),
            allowed: allowed.into(),
        }
    }
}

/// The variables of the process: the environment, layered over
/// `GATEWAY_CONFIG_FILE` when that is set, with `defaults` standing in for
/// what neither sets.
fn environment(defaults: &[(&str, &str)]) -> Result<(BTreeMap<String, String>, Option<PathBuf>), ConfigError> {
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
        Some(path) => Ok((layered_vars(&path, env)?, Some(path))),
        None => Ok((env, None)),
    }
}

/// Warns about each `GATEWAY_*` name the gateway does not read (near misses
/// were refused already).
fn warn_unknown(names: &[String]) {
    for name in names {
        tracing::warn!(
            variable = %name,
            "ignoring an unknown GATEWAY_* variable (not a near miss of a known one; Kubernetes and tools set some)"
        );
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
        let (vars, file) = environment(defaults)?;
        let mut settings = Settings::from_vars(vars)?;
        if file.is_some() {
            settings.config_file = file;
        }
        Ok(settings)
    }

    /// Re-reads the env file at `path` under the process environment (which
    /// still wins): what SIGHUP does.
    pub fn from_file_and_env(path: &Path) -> Result<Settings, ConfigError> {
        layered(path, process_env()?)
    }

    /// Settings from a complete set of variables: a near miss of a known
    /// name or a removed variable is refused, any other unknown `GATEWAY_*`
    /// name warned about. Reads nothing from the process but the public key
    /// files the variables name.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Settings, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        warn_unknown(&unknown_variables(&vars)?);
        Settings::from_lookup(|name| vars.get(name).cloned())
    }

    /// Settings from whatever `lookup` returns for each variable. Pure, and
    /// it cannot see names it does not ask for: unknown variables are caught
    /// by [`Settings::from_vars`] and the functions built on it.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let vars = Vars { lookup: &lookup };
        let listen = vars.parse("GATEWAY_LISTEN", ([127, 0, 0, 1], 8080).into(), parse_listen)?;
        Ok(Settings {
            database_url: vars.optional("DATABASE_URL", parse_database_url)?,
            listen,
            admin_listen: read_admin_listen(&vars, listen)?,
            channel: vars.parse("GATEWAY_CHANNEL", "realtime_changes".into(), parse_channel)?,
            source: vars.parse("GATEWAY_SOURCE", CaptureSource::Notify, CaptureSource::parse)?,
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
            log: read_log(&vars)?,
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
        self.database_url.as_ref().map(|url| redact_url(url.expose()))
    }
}

impl DatabaseSettings {
    /// `DATABASE_URL` (required) and `GATEWAY_CHANNEL` from the environment
    /// and `GATEWAY_CONFIG_FILE`, nothing else: any other variable, even a
    /// bad one, is `serve`'s business, so unknown names are only warned about.
    pub fn from_env() -> Result<DatabaseSettings, ConfigError> {
        let (vars, _) = environment(&[])?;
        DatabaseSettings::from_vars(vars)
    }

    /// [`DatabaseSettings::from_env`] over a complete set of variables.
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<DatabaseSettings, ConfigError> {
        let vars: BTreeMap<String, String> = vars.into_iter().collect();
        match unknown_variables(&vars) {
            Ok(unknown) => warn_unknown(&unknown),
            Err(error) => tracing::warn!(%error, "a variable this command does not use would stop `serve`"),
        }
        let lookup = |name: &str| vars.get(name).cloned();
        let vars = Vars { lookup: &lookup };
        let database_url = vars.optional("DATABASE_URL", parse_database_url)?.ok_or_else(|| {
            ConfigError::new(
                "DATABASE_URL",
                "",
                "required: expected the database's URL, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE",
            )
        })?;
        Ok(DatabaseSettings {
            database_url,
            channel: vars.parse("GATEWAY_CHANNEL", "realtime_changes".into(), parse_channel)?,
        })
    }
}

impl LogSettings {
    /// `GATEWAY_LOG_FORMAT` and `GATEWAY_LOG` (else `RUST_LOG`) from the
    /// environment and `GATEWAY_CONFIG_FILE`: what the binary reads first,
    /// before any command, to set up logging.
    pub fn from_env() -> Result<LogSettings, ConfigError> {
        let (vars, _) = environment(&[])?;
        read_log(&Vars {
            lookup: &|name: &str| vars.get(name).cloned(),
        })
    }
}
