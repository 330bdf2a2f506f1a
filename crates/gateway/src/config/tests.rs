//! The configuration's tests: defaults, every refusal with the message an
//! operator sees, the env file, layering, and the shipped example.

use super::*;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::sources::parse_env_file;

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
    assert_eq!(s.pipeline.batch_linger, Duration::ZERO, "nothing waits by default");
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
    assert_eq!(s.limits.handshake_timeout, Duration::from_millis(10_000));
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
    assert_eq!(
        s.database_url.as_ref().map(Secret::expose),
        Some("postgresql://gw:pw@db:5432/ct")
    );
    assert_eq!(s.listen, "[::]:9000".parse().unwrap());
    assert_eq!(s.channel, "_changes_2");
    assert_eq!(s.auth, Auth::hs256(SECRET));
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
        &[("GATEWAY_HANDSHAKE_TIMEOUT_MS", "50")],
        "GATEWAY_HANDSHAKE_TIMEOUT_MS",
        "50",
    );
    assert!(err.allowed.contains("from 100 to 300000"), "{err}");
    assert_refused(
        &[("GATEWAY_HANDSHAKE_TIMEOUT_MS", "10s")],
        "GATEWAY_HANDSHAKE_TIMEOUT_MS",
        "10s",
    );
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
fn refuses_a_near_miss_of_a_known_variable() {
    let err = assert_refused(&[("GATEWAY_BACH_SIZE", "10")], "GATEWAY_BACH_SIZE", "10");
    assert!(err.allowed.starts_with("unknown variable"), "{err}");
    assert!(err.allowed.contains("did you mean GATEWAY_BATCH_SIZE?"), "{err}");
    assert!(err.allowed.contains("known: DATABASE_URL, GATEWAY_LISTEN"), "{err}");
    for (typo, meant) in [
        ("GATEWAY_BATCH_SIZ", "GATEWAY_BATCH_SIZE"),
        ("GATEWAY_JWT_SECRETS", "GATEWAY_JWT_SECRET"),
        ("GATEWAY_JWT_PUBLIC_KEY", "GATEWAY_JWT_PUBLIC_KEYS"),
        ("GATEWAY_Listen", "GATEWAY_LISTEN"),
        ("GATEWAY_LOGS", "GATEWAY_LOG"),
        ("GATEWAY_AUT", "GATEWAY_AUTH"),
        ("GATEWAY_ADMIN_LISTN", "GATEWAY_ADMIN_LISTEN"),
    ] {
        let err = settings(&[(typo, "1")]).expect_err(typo);
        assert!(err.allowed.contains(&format!("did you mean {meant}?")), "{typo}: {err}");
    }
    // Other prefixes are not ours to judge.
    settings(&[("GATEWAYS", "1"), ("PATH", "/bin"), ("RUST_LOG", "debug")]).unwrap();
}

/// Kubernetes injects `<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT...` for a
/// service named `gateway`, and tools export their own: warned about, not
/// refused.
#[test]
fn other_gateway_variables_are_only_warned_about() {
    let foreign = [
        ("GATEWAY_SERVICE_HOST", "10.0.0.7"),
        ("GATEWAY_SERVICE_PORT", "8080"),
        ("GATEWAY_SERVICE_PORT_HTTP", "8080"),
        ("GATEWAY_PORT", "tcp://10.0.0.7:8080"),
        ("GATEWAY_PORT_8080_TCP", "tcp://10.0.0.7:8080"),
        ("GATEWAY_PORT_8080_TCP_ADDR", "10.0.0.7"),
        ("GATEWAY_PORT_8080_TCP_PORT", "8080"),
        ("GATEWAY_PORT_8080_TCP_PROTO", "tcp"),
        ("GATEWAY_BIN", "/usr/local/bin/ws-gateway"),
        ("GATEWAY_HOST", "gw.internal"),
        ("GATEWAY_JWT_SECRET_FILE", "/run/secrets/jwt"),
    ];
    let s = settings(&foreign).unwrap();
    assert_eq!(s.listen, "127.0.0.1:8080".parse().unwrap());
    let vars: BTreeMap<String, String> = vars(&foreign).into_iter().collect();
    let warned = super::sources::unknown_variables(&vars).unwrap();
    assert_eq!(warned.len(), foreign.len());
    assert!(warned.contains(&"GATEWAY_PORT".to_owned()));
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
        "safety_incidents=critical, Public.Inspections=HIGH,audit.inspections=normal,",
    )])
    .unwrap();
    let p = &s.pipeline;
    assert_eq!(p.priority_tables.len(), 3);
    assert_eq!(p.priority_of("public", "safety_incidents"), Priority::Critical);
    assert_eq!(p.priority_of("public", "inspections"), Priority::High);
    assert_eq!(p.priority_of("audit", "inspections"), Priority::Normal);
    assert_eq!(p.priority_of("other", "inspections"), Priority::Normal);
    assert_eq!(p.priority_of("public", "tasks"), Priority::Normal);
    assert!(Priority::Critical.bypasses_batching() && Priority::High.bypasses_batching());
    assert!(!Priority::Normal.bypasses_batching());
}

#[test]
fn refuses_bad_priority() {
    for (raw, item) in [
        ("inspections=urgent", "inspections=urgent"),
        ("tasks=high,inspections", "inspections"),
        ("a.b.c=high", "a.b.c=high"),
        ("=high", "=high"),
        ("tasks=high,tasks=normal", "tasks=normal"),
    ] {
        let err = assert_refused(&[("GATEWAY_PRIORITY_TABLES", raw)], "GATEWAY_PRIORITY_TABLES", raw);
        assert!(err.allowed.contains(&format!("`{item}`")), "{err}");
        assert!(err.allowed.contains("critical, high or normal"), "{err}");
    }
}

#[test]
fn refuses_the_removed_low_priority() {
    for raw in ["audit_log=low", "safety_incidents=critical,audit_log=LOW"] {
        let err = assert_refused(&[("GATEWAY_PRIORITY_TABLES", raw)], "GATEWAY_PRIORITY_TABLES", raw);
        assert!(err.allowed.contains("`low`, which was removed"), "{err}");
        assert!(err.allowed.contains("critical, high or normal"), "{err}");
    }
}

#[test]
fn takes_a_batch_linger_and_refuses_bad_ones() {
    let s = settings(&[("GATEWAY_BATCH_LINGER_MS", "100")]).unwrap();
    assert_eq!(s.pipeline.batch_linger, Duration::from_millis(100));
    let s = settings(&[("GATEWAY_BATCH_LINGER_MS", "0")]).unwrap();
    assert_eq!(s.pipeline.batch_linger, Duration::ZERO);
    for bad in ["-1", "10001", "100ms", "abc", "1.5"] {
        let err = assert_refused(&[("GATEWAY_BATCH_LINGER_MS", bad)], "GATEWAY_BATCH_LINGER_MS", bad);
        assert_eq!(
            err.to_string(),
            format!("GATEWAY_BATCH_LINGER_MS={bad:?} is not allowed: expected an integer from 0 to 10000"),
        );
    }
}

#[test]
fn refuses_the_removed_batch_timeout() {
    let err = assert_refused(
        &[("GATEWAY_BATCH_TIMEOUT_MS", "100")],
        "GATEWAY_BATCH_TIMEOUT_MS",
        "100",
    );
    assert!(
        err.allowed
            .starts_with("GATEWAY_BATCH_TIMEOUT_MS was removed: use GATEWAY_BATCH_LINGER_MS"),
        "{err}"
    );
    assert!(err.allowed.ends_with("; remove it"), "{err}");
    // An empty value too: the name alone says the operator expects it to work.
    assert_refused(&[("GATEWAY_BATCH_TIMEOUT_MS", "")], "GATEWAY_BATCH_TIMEOUT_MS", "");
    // And in the config file.
    let file = TempFile::new("removed", "GATEWAY_AUTH=none\nGATEWAY_BATCH_TIMEOUT_MS=50\n");
    let err = layered(&file.0, BTreeMap::new()).unwrap_err();
    assert_eq!(
        (err.variable.as_str(), err.value.as_str()),
        ("GATEWAY_BATCH_TIMEOUT_MS", "50")
    );
    assert!(
        !KNOWN_VARIABLES
            .iter()
            .any(|known| REMOVED_VARIABLES.iter().any(|(r, _)| r == known))
    );
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
    // GATEWAY_LOG falls back to it.
    known.push("RUST_LOG".to_owned());
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
    let example = include_str!("../../../../config/gateway.env.example");
    let uncommented: String = example
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split_once('=')
                .is_some_and(|(name, _)| !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
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

#[test]
fn a_reload_keeps_what_only_a_restart_changes() {
    let current = settings(&[("DATABASE_URL", "postgres://a@db/ct"), ("GATEWAY_BATCH_SIZE", "10")]).unwrap();
    let fresh = settings(&[
        ("DATABASE_URL", "postgres://b@db/ct"),
        ("GATEWAY_CHANNEL", "other"),
        ("GATEWAY_BATCH_SIZE", "20"),
        ("GATEWAY_FEATURES", "-compression"),
    ])
    .unwrap();
    let (next, ignored) = for_reload(&current, fresh);
    assert_eq!(
        ignored.iter().map(|c| c.variable).collect::<Vec<_>>(),
        ["DATABASE_URL", "GATEWAY_CHANNEL"]
    );
    assert_eq!(next.database_url, current.database_url);
    assert_eq!(next.channel, current.channel);
    assert_eq!(next.pipeline.batch_size, 20, "tunables apply");
    assert!(!next.features.compression, "switches apply");
}

/// `migrate`, `track`, `untrack` and `grants` read DATABASE_URL and
/// GATEWAY_CHANNEL alone: no JWT secret, and a bad value of `serve`'s does
/// not stop them.
#[test]
fn the_deploy_commands_read_the_database_alone() {
    let s = DatabaseSettings::from_vars(vars(&[
        ("DATABASE_URL", "postgres://owner@db/ct"),
        ("GATEWAY_BATCH_SIZE", "lots"),
        ("GATEWAY_AUTH", "jwt"),
        ("GATEWAY_BACH_SIZE", "10"),
    ]))
    .unwrap();
    assert_eq!(s.database_url.expose(), "postgres://owner@db/ct");
    assert_eq!(s.channel, "realtime_changes");
    let err = DatabaseSettings::from_vars(vars(&[("GATEWAY_AUTH", "none")])).unwrap_err();
    assert_eq!(err.variable, "DATABASE_URL");
    assert!(err.allowed.starts_with("required"), "{err}");
    let err = DatabaseSettings::from_vars(vars(&[("DATABASE_URL", "mysql://x")])).unwrap_err();
    assert_eq!(err.variable, "DATABASE_URL");
    let err = DatabaseSettings::from_vars(vars(&[("DATABASE_URL", "postgres://x/y"), ("GATEWAY_CHANNEL", "Bad")]))
        .unwrap_err();
    assert_eq!(err.variable, "GATEWAY_CHANNEL");
}

fn key_path(name: &str) -> String {
    format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn several_secrets_public_keys_and_a_jwks_url() {
    let other = "fedcba9876543210fedcba9876543210";
    let s = settings(&[
        ("GATEWAY_AUTH", "jwt"),
        ("GATEWAY_JWT_SECRET", &format!("{SECRET}, {other}")),
        (
            "GATEWAY_JWT_PUBLIC_KEYS",
            &format!(
                "{},{} , {}",
                key_path("rsa-a.pub.pem"),
                key_path("ec-p256.pub.pem"),
                key_path("ed25519.pub.pem")
            ),
        ),
        ("GATEWAY_JWKS_URL", "https://idp.example/.well-known/jwks.json"),
    ])
    .unwrap();
    let Auth::Jwt(keys) = &s.auth else {
        panic!("{:?}", s.auth)
    };
    assert_eq!(
        keys.secrets.iter().map(Secret::expose).collect::<Vec<_>>(),
        [SECRET, other]
    );
    let algorithms: Vec<_> = keys.public_keys.iter().map(|k| k.algorithm).collect();
    use jsonwebtoken::Algorithm::{ES256, EdDSA, RS256};
    assert_eq!(algorithms, [RS256, ES256, EdDSA]);
    assert_eq!(
        keys.jwks_url.as_deref(),
        Some("https://idp.example/.well-known/jwks.json")
    );
    // Public keys alone, or a key set alone, are enough for jwt.
    settings(&[
        ("GATEWAY_AUTH", "jwt"),
        ("GATEWAY_JWT_PUBLIC_KEYS", &key_path("rsa-a.pub.pem")),
    ])
    .unwrap();
    settings(&[("GATEWAY_AUTH", "jwt"), ("GATEWAY_JWKS_URL", "http://127.0.0.1:9/jwks")]).unwrap();
}

#[test]
fn refuses_bad_keys_naming_what_is_wrong() {
    let jwt = |name: &str, value: &str| settings(&[("GATEWAY_AUTH", "jwt"), (name, value)]).unwrap_err();
    // One short secret among several: which one, and nothing of it.
    let err = jwt("GATEWAY_JWT_SECRET", &format!("{SECRET},short"));
    assert_eq!(err.variable, "GATEWAY_JWT_SECRET");
    assert!(err.allowed.contains("secret 2 has 5 bytes"), "{err}");
    assert!(!err.to_string().contains(SECRET), "{err}");
    let err = jwt("GATEWAY_JWT_PUBLIC_KEYS", "/nonexistent/idp.pem");
    assert!(err.allowed.contains("cannot read /nonexistent/idp.pem"), "{err}");
    let err = jwt("GATEWAY_JWT_PUBLIC_KEYS", &key_path("rsa-a.key.pem"));
    assert!(err.allowed.contains("holds no such key (a private key"), "{err}");
    let err = jwt("GATEWAY_JWT_PUBLIC_KEYS", &key_path("README.md"));
    assert!(err.allowed.contains("holds no such key"), "{err}");
    for url in [
        "http://idp.example/jwks",
        "ftp://idp.example/jwks",
        "not a url",
        "http://10.0.0.1/jwks",
    ] {
        let err = jwt("GATEWAY_JWKS_URL", url);
        assert_eq!(err.variable, "GATEWAY_JWKS_URL", "{url}");
        assert!(err.allowed.starts_with("expected an https:// URL"), "{url}: {err}");
    }
    for url in [
        "http://localhost:8000/jwks",
        "http://[::1]:8000/jwks",
        "http://127.0.0.2/jwks",
    ] {
        settings(&[("GATEWAY_AUTH", "jwt"), ("GATEWAY_JWKS_URL", url)]).unwrap_or_else(|e| panic!("{url}: {e}"));
    }
}

#[test]
fn the_admin_port_logs_and_their_refusals() {
    let s = settings(&[
        ("GATEWAY_LISTEN", "0.0.0.0:8080"),
        ("GATEWAY_ADMIN_LISTEN", "127.0.0.1:9090"),
        ("GATEWAY_LOG_FORMAT", "JSON"),
        ("GATEWAY_LOG", "warn,ws_gateway=debug"),
    ])
    .unwrap();
    assert_eq!(s.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.log.filter, "warn,ws_gateway=debug");
    let defaults = settings(&[]).unwrap();
    assert_eq!(defaults.admin_listen, None);
    assert_eq!(defaults.log.format, LogFormat::Text);
    assert_eq!(defaults.log.filter, DEFAULT_LOG_FILTER);
    assert_eq!(settings(&[("RUST_LOG", "debug")]).unwrap().log.filter, "debug");
    assert_eq!(
        settings(&[("RUST_LOG", "debug"), ("GATEWAY_LOG", "warn")])
            .unwrap()
            .log
            .filter,
        "warn"
    );
    let err = assert_refused(
        &[
            ("GATEWAY_LISTEN", "127.0.0.1:8080"),
            ("GATEWAY_ADMIN_LISTEN", "127.0.0.1:8080"),
        ],
        "GATEWAY_ADMIN_LISTEN",
        "127.0.0.1:8080",
    );
    assert!(err.allowed.contains("other than GATEWAY_LISTEN"), "{err}");
    assert_refused(&[("GATEWAY_ADMIN_LISTEN", "admin")], "GATEWAY_ADMIN_LISTEN", "admin");
    assert_refused(&[("GATEWAY_LOG_FORMAT", "xml")], "GATEWAY_LOG_FORMAT", "xml");
    let err = assert_refused(
        &[("GATEWAY_LOG", "info,ws_gateway=loud")],
        "GATEWAY_LOG",
        "info,ws_gateway=loud",
    );
    assert!(err.allowed.contains("RUST_LOG syntax"), "{err}");
}

#[test]
fn features_display_as_the_shortest_list_that_parses_back() {
    for (list, shown) in [
        ("all", "all"),
        ("none", "none"),
        ("all,-compression", "all,-compression"),
        ("dedup,batching", "none,dedup,batching"),
        ("-dedup,-batching,-compression", "none,adaptive_heartbeat,cache"),
    ] {
        let features = Features::parse(list).unwrap();
        assert_eq!(features.to_string(), shown, "{list}");
        assert_eq!(Features::parse(shown).unwrap(), features, "{shown}");
    }
}

#[test]
fn every_variable_is_described_for_reload_logs() {
    let s = settings(&[]).unwrap();
    let mut described = super::describe::described_variables(&s);
    described.sort();
    let mut known: Vec<&str> = KNOWN_VARIABLES.to_vec();
    known.push("DATABASE_URL");
    known.sort();
    assert_eq!(described, known);
}

#[test]
fn changes_name_each_variable_with_its_values_and_hide_secrets() {
    let before = settings(&[
        ("GATEWAY_AUTH", "jwt"),
        ("GATEWAY_JWT_SECRET", SECRET),
        ("DATABASE_URL", "postgres://gw:hunter2@db/ct"),
    ])
    .unwrap();
    let after = settings(&[
        ("GATEWAY_AUTH", "jwt"),
        ("GATEWAY_JWT_SECRET", "fedcba9876543210fedcba9876543210"),
        ("DATABASE_URL", "postgres://gw:hunter3@db/ct"),
        ("GATEWAY_BATCH_SIZE", "20"),
        ("GATEWAY_FEATURES", "-compression"),
        ("GATEWAY_HISTORY_RETENTION", "2h"),
    ])
    .unwrap();
    let shown: Vec<String> = changes(&before, &after).iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        [
            "DATABASE_URL changed (postgres://gw:***@db/ct)",
            "GATEWAY_JWT_SECRET changed (<1 secrets, hidden>)",
            "GATEWAY_BATCH_SIZE 10 -> 20",
            "GATEWAY_HISTORY_RETENTION 1d -> 2h",
            "GATEWAY_FEATURES all -> all,-compression",
        ]
    );
    assert!(changes(&before, &before).is_empty());
    assert!(!format!("{:?}", changes(&before, &after)).contains("hunter"));
}

#[test]
fn a_reload_applies_new_keys_but_not_a_new_auth_mode() {
    let jwt = |secrets: &str, more: &[(&str, &str)]| {
        let mut pairs = vec![("GATEWAY_AUTH", "jwt"), ("GATEWAY_JWT_SECRET", secrets)];
        pairs.extend_from_slice(more);
        settings(&pairs).unwrap()
    };
    let current = jwt(SECRET, &[]);
    let rotated = jwt(&format!("fedcba9876543210fedcba9876543210,{SECRET}"), &[]);
    let (next, ignored) = for_reload(&current, rotated.clone());
    assert!(ignored.is_empty(), "{ignored:?}");
    assert_eq!(next.auth, rotated.auth);
    let (next, ignored) = for_reload(&current, settings(&[]).unwrap());
    assert_eq!(next.auth, current.auth, "the mode is restart-only");
    assert_eq!(
        ignored.iter().map(|c| c.variable).collect::<Vec<_>>(),
        ["GATEWAY_AUTH", "GATEWAY_JWT_SECRET"]
    );
    let fresh = jwt(
        SECRET,
        &[("GATEWAY_LOG_FORMAT", "json"), ("GATEWAY_ADMIN_LISTEN", "127.0.0.1:9")],
    );
    let (next, ignored) = for_reload(&current, fresh);
    assert_eq!(next.log, current.log);
    assert_eq!(next.admin_listen, None);
    assert_eq!(
        ignored.iter().map(|c| c.variable).collect::<Vec<_>>(),
        ["GATEWAY_ADMIN_LISTEN", "GATEWAY_LOG_FORMAT"]
    );
}
