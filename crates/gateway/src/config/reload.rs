//! What a reload (SIGHUP) may change: the feature switches and tunables,
//! for new work, without dropping a connection. What only a restart can
//! change (the database, the address, the channel, the source, auth, the
//! pool) keeps its running value.

use super::Settings;

/// The settings a reload applies: `fresh`, with what only a restart changes
/// taken from `current`; and the variables `fresh` would have changed there.
pub fn for_reload(current: &Settings, fresh: Settings) -> (Settings, Vec<&'static str>) {
    let mut next = fresh;
    let fixed = [
        ("DATABASE_URL", next.database_url != current.database_url),
        ("GATEWAY_LISTEN", next.listen != current.listen),
        ("GATEWAY_CHANNEL", next.channel != current.channel),
        ("GATEWAY_SOURCE", next.source != current.source),
        ("GATEWAY_AUTH/GATEWAY_JWT_SECRET", next.auth != current.auth),
        ("GATEWAY_POOL_SIZE", next.pool_size != current.pool_size),
    ];
    let ignored = fixed
        .into_iter()
        .filter_map(|(variable, changed)| changed.then_some(variable))
        .collect();
    next.database_url = current.database_url.clone();
    next.listen = current.listen;
    next.channel = current.channel.clone();
    next.source = current.source;
    next.auth = current.auth.clone();
    next.pool_size = current.pool_size;
    next.config_file = current.config_file.clone();
    (next, ignored)
}
