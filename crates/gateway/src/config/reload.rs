//! What a reload (SIGHUP) may change: the feature switches, the tunables
//! and the JWT keys (secrets, public keys, JWKS URL), for new work, without
//! dropping a connection. What only a restart can change (the database, the
//! addresses, the channel, the source, the auth mode, the pool, logging)
//! keeps its running value.

use super::describe::{SettingChange, changes};
use super::types::{Auth, Settings};

/// The variables a reload cannot apply.
pub const RESTART_ONLY: &[&str] = &[
    "DATABASE_URL",
    "GATEWAY_LISTEN",
    "GATEWAY_ADMIN_LISTEN",
    "GATEWAY_CHANNEL",
    "GATEWAY_SOURCE",
    "GATEWAY_AUTH",
    "GATEWAY_AUTO_MIGRATE",
    "GATEWAY_POOL_SIZE",
    "GATEWAY_CONFIG_FILE",
    "GATEWAY_LOG_FORMAT",
    "GATEWAY_LOG",
];

/// The settings a reload applies: `fresh`, with what only a restart changes
/// taken from `current`; and the changes in `fresh` that were not applied.
/// Keys follow `fresh` unless the auth mode itself changed (`none` <-> `jwt`).
pub fn for_reload(current: &Settings, fresh: Settings) -> (Settings, Vec<SettingChange>) {
    let mode_changed = matches!(current.auth, Auth::None) != matches!(fresh.auth, Auth::None);
    let key_variables = ["GATEWAY_JWT_SECRET", "GATEWAY_JWT_PUBLIC_KEYS", "GATEWAY_JWKS_URL"];
    let ignored = changes(current, &fresh)
        .into_iter()
        .filter(|change| {
            RESTART_ONLY.contains(&change.variable) || (mode_changed && key_variables.contains(&change.variable))
        })
        .collect();
    let mut next = fresh;
    next.database_url = current.database_url.clone();
    next.listen = current.listen;
    next.admin_listen = current.admin_listen;
    next.channel = current.channel.clone();
    next.source = current.source;
    if mode_changed {
        next.auth = current.auth.clone();
    }
    next.auto_migrate = current.auto_migrate;
    next.pool_size = current.pool_size;
    next.config_file = current.config_file.clone();
    next.log = current.log.clone();
    (next, ignored)
}
