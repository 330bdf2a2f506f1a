//! Where settings come from: the env file named by `GATEWAY_CONFIG_FILE`,
//! then the process environment over it; which `GATEWAY_*` names exist, and
//! what becomes of one that does not: a near miss of a known name is a typo
//! and refused with the name it meant; any other is someone else's (Kubernetes
//! injects `GATEWAY_SERVICE_HOST`, `GATEWAY_PORT`... for a service named
//! `gateway`, tools export `GATEWAY_BIN`) and only warned about.

use std::collections::BTreeMap;
use std::path::Path;

use super::{ConfigError, Settings};

/// Every `GATEWAY_*` variable the gateway reads. Any other name with that
/// prefix is refused when it is a near miss of one of these, and warned
/// about otherwise; add a new variable here and in
/// `config/gateway.env.example` (a unit test checks both).
pub const KNOWN_VARIABLES: &[&str] = &[
    "GATEWAY_LISTEN",
    "GATEWAY_ADMIN_LISTEN",
    "GATEWAY_CHANNEL",
    "GATEWAY_SOURCE",
    "GATEWAY_AUTH",
    "GATEWAY_JWT_SECRET",
    "GATEWAY_JWT_PUBLIC_KEYS",
    "GATEWAY_JWKS_URL",
    "GATEWAY_AUTO_MIGRATE",
    "GATEWAY_POOL_SIZE",
    "GATEWAY_CONFIG_FILE",
    "GATEWAY_BATCH_SIZE",
    "GATEWAY_BATCH_LINGER_MS",
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
    "GATEWAY_HANDSHAKE_TIMEOUT_MS",
    "GATEWAY_MAX_SUBSCRIPTIONS",
    "GATEWAY_MAX_MESSAGE_BYTES",
    "GATEWAY_RATE_LIMIT",
    "GATEWAY_SEND_QUEUE_BYTES",
    "GATEWAY_HISTORY_RETENTION",
    "GATEWAY_PROBE_INTERVAL_MS",
    "GATEWAY_JWT_LEEWAY_S",
    "GATEWAY_ALLOWED_ORIGINS",
    "GATEWAY_FEATURES",
    "GATEWAY_LOG_FORMAT",
    "GATEWAY_LOG",
];

/// Variables that existed and were removed, with why: one left in an
/// environment or a config file is refused, so nobody believes it still
/// does something.
pub const REMOVED_VARIABLES: &[(&str, &str)] = &[(
    "GATEWAY_BATCH_TIMEOUT_MS",
    "use GATEWAY_BATCH_LINGER_MS, which holds a socket's next write (not each change) until that long \
     after its last, and sends what arrived meanwhile together; by default nothing waits",
)];

/// Why `name` is refused, when it is a removed variable.
pub(super) fn removed_variable(name: &str) -> Option<String> {
    REMOVED_VARIABLES
        .iter()
        .find(|(removed, _)| *removed == name)
        .map(|(_, why)| format!("{name} was removed: {why}; remove it"))
}

/// What the `GATEWAY_*` names in `vars` that the gateway does not read
/// are: an error for the first near miss of a known name (a typo would
/// otherwise fall back to a default unnoticed), else the names to warn about.
pub(super) fn unknown_variables<'a>(
    vars: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<Vec<String>, ConfigError> {
    let mut unknown = Vec::new();
    for (name, value) in vars {
        if let Some(why) = removed_variable(name) {
            return Err(ConfigError::new(name, value, why));
        }
        if !name.starts_with("GATEWAY_") || KNOWN_VARIABLES.contains(&name.as_str()) {
            continue;
        }
        match near_miss(name) {
            Some(meant) => {
                return Err(ConfigError::new(
                    name,
                    value,
                    format!(
                        "unknown variable (did you mean {meant}?); known: DATABASE_URL, {}",
                        KNOWN_VARIABLES.join(", ")
                    ),
                ));
            }
            None => unknown.push(name.clone()),
        }
    }
    Ok(unknown)
}

/// The known variable `name` is a typo of: the same but for case, or a few
/// edits away from it (one edit per four characters of the known name's
/// part after `GATEWAY_`, at most two). `GATEWAY_BATCH_SIZ` and
/// `GATEWAY_JWT_SECRETS` are near misses; `GATEWAY_PORT`, `GATEWAY_BIN` and
/// `GATEWAY_SERVICE_HOST` are not.
pub(super) fn near_miss(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_uppercase();
    let part = name.strip_prefix("GATEWAY_").unwrap_or(&name);
    KNOWN_VARIABLES
        .iter()
        .filter_map(|known| {
            let known_part = &known["GATEWAY_".len()..];
            let distance = edit_distance(part, known_part);
            let allowed = (known_part.len() / 4).clamp(1, 2);
            (distance <= allowed).then_some((distance, *known))
        })
        .min()
        .map(|(_, known)| known)
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
pub(super) fn process_env() -> Result<BTreeMap<String, String>, ConfigError> {
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
pub(super) fn layered_vars(
    path: &Path,
    env: BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>, ConfigError> {
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
    Ok(vars)
}

/// Settings from the env file at `path` with `env` over it.
pub(super) fn layered(path: &Path, env: BTreeMap<String, String>) -> Result<Settings, ConfigError> {
    let mut settings = Settings::from_vars(layered_vars(path, env)?)?;
    settings.config_file = Some(path.to_path_buf());
    Ok(settings)
}

/// `KEY=value` lines, `#` comments, an optional `export ` prefix and optional
/// quotes around the value; a later line wins. Errs with the 1-based number
/// of the first line that is none of these.
pub(super) fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, usize> {
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
