//! What an operator does and sees: deploy commands that need only the
//! database, database errors in one line, a least-privileged role, the
//! admin port, logs that read well, unknown variables, and a shutdown that
//! works whatever stderr is.

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

use crate::fault_kit::{GatewayProcess, KillSwitch, free_port, redirect};
use crate::helpers::{
    Client, DEADLINE, barrier, empty_database, eventually, fresh_database, gateway_binary, http_get, http_get_json,
    spawn_app_with, with_database,
};

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        % 100_000
}

/// A pipe: its read end and its write end, as files.
fn pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills both descriptors, which the files then own.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) }
}

/// `url` logging in as `user`, no password (the test cluster trusts local users).
fn as_user(url: &str, user: &str) -> String {
    let scheme_end = url.find("://").unwrap() + 3;
    let at = url.find('@').unwrap();
    format!("{}{user}{}", &url[..scheme_end], &url[at..])
}

/// `ws-gateway serve` on 127.0.0.1:`port` against `database_url`, no auth,
/// nothing else from this environment, stdout discarded: a test adds its
/// variables and its stderr, then spawns it.
fn serve_command(database_url: &str, port: u16) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(gateway_binary());
    command
        .arg("serve")
        .env_clear()
        .env("DATABASE_URL", database_url)
        .env("GATEWAY_AUTH", "none")
        .env("GATEWAY_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

/// Runs `ws-gateway ARGS` with only `env` (and PATH) set; its output.
async fn command(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = tokio::process::Command::new(gateway_binary());
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (name, value) in env {
        command.env(name, value);
    }
    tokio::time::timeout(DEADLINE, command.output())
        .await
        .unwrap_or_else(|_| panic!("ws-gateway {args:?} finishes in time"))
        .unwrap()
}

/// The embedded migrations as `migrate` names them ("0002 probe"), in order,
/// from the files in crates/gateway/migrations.
fn migration_names() -> Vec<String> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let file = e.unwrap().file_name().into_string().unwrap();
            let stem = file.strip_suffix(".sql")?;
            let (version, description) = stem.split_once('_')?;
            Some(format!("{version} {}", description.replace('_', " ")))
        })
        .collect();
    names.sort();
    names
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Before: `migrate` refused without GATEWAY_JWT_SECRET, and said "realtime
/// schema is up to date" after applying three migrations.
#[tokio::test]
async fn migrate_and_track_need_the_database_alone_and_migrate_says_what_it_applied() {
    let (url, pool) = empty_database().await;
    // What a deploy step has: the database, and whatever else the
    // environment holds (a bad value of serve's is not migrate's business).
    let env = [("DATABASE_URL", url.as_str()), ("GATEWAY_BATCH_SIZE", "lots")];
    let first = command(&["migrate"], &env).await;
    let stdout = text(&first.stdout);
    assert!(first.status.success(), "{stdout}{}", text(&first.stderr));
    // Every embedded migration, listed, then the latest named.
    let embedded = migration_names();
    assert!(
        stdout.starts_with(&format!("applied {} migrations:\n", embedded.len())),
        "{stdout}"
    );
    for name in &embedded {
        assert!(stdout.contains(&format!("\n  {name}\n")), "{name}: {stdout}");
    }
    let latest = embedded.last().unwrap();
    assert!(
        stdout.contains(&format!(
            "the realtime schema is at {latest} (channel realtime_changes)"
        )),
        "{stdout}"
    );
    let again = command(&["migrate"], &env).await;
    assert_eq!(
        text(&again.stdout).trim(),
        format!("nothing to apply: the realtime schema is at {latest} (channel realtime_changes)")
    );
    sqlx::query("create table jobs (id bigint primary key, site int)")
        .execute(&pool)
        .await
        .unwrap();
    let track = command(&["track", "jobs", "--room", "site:{site}"], &env).await;
    assert!(track.status.success(), "{}", text(&track.stderr));
    assert_eq!(text(&track.stdout).trim(), "tracking jobs into rooms site:{site}");
    // Without the database it says what is missing.
    let missing = command(&["migrate"], &[("GATEWAY_AUTH", "jwt")]).await;
    assert!(!missing.status.success());
    let stderr = text(&missing.stderr);
    assert!(
        stderr.contains("DATABASE_URL=\"\" is not allowed: required"),
        "{stderr}"
    );
    assert!(!stderr.contains("JWT"), "{stderr}");
}

/// Before: a wrong port waited 30 s and said "pool timed out while waiting
/// for an open connection"; an unknown database was named twice.
#[tokio::test]
async fn database_errors_are_one_line_naming_where_and_why() {
    let db = fresh_database().await;
    let closed = free_port().await;
    let refused_url = format!("postgres://gw@127.0.0.1:{closed}/ct");
    let nodb_url = with_database(&db.url, "nodb");
    let norole_url = as_user(&db.url, "nobody_here");
    for (url, cause) in [
        (refused_url.as_str(), "connection refused"),
        (nodb_url.as_str(), "database \"nodb\" does not exist"),
        (norole_url.as_str(), "role \"nobody_here\" does not exist"),
    ] {
        for args in [&["migrate"][..], &["serve"][..]] {
            let started = Instant::now();
            let out = command(
                args,
                &[
                    ("DATABASE_URL", url),
                    ("GATEWAY_AUTH", "none"),
                    ("GATEWAY_LISTEN", "127.0.0.1:0"),
                ],
            )
            .await;
            let took = started.elapsed();
            assert!(!out.status.success(), "{args:?} {url}");
            let stderr = text(&out.stderr);
            let last = stderr.lines().last().unwrap_or_default();
            assert!(
                last.starts_with("ws-gateway: cannot connect to PostgreSQL at 127.0.0.1:"),
                "{last}"
            );
            assert!(last.contains(cause), "{args:?}: {last}");
            assert_eq!(stderr.matches(cause).count(), 1, "said once: {stderr}");
            // The connect timeout is 5 s; a refusal is immediate.
            assert!(took < Duration::from_secs(15), "{args:?} took {took:?}");
        }
    }
    let last = |out: &std::process::Output| text(&out.stderr).lines().last().unwrap_or_default().to_owned();
    let out = command(&["migrate"], &[("DATABASE_URL", &refused_url)]).await;
    assert!(
        last(&out).contains(&format!("127.0.0.1:{closed}, database \"ct\" as user \"gw\"")),
        "{}",
        last(&out)
    );
}

/// Before: the privileges a least-privileged role needs were undocumented;
/// the gateway failed with "permission denied for schema realtime", then
/// "... for table probe".
#[tokio::test]
async fn the_gateway_runs_as_a_role_with_only_the_printed_grants() {
    let db = fresh_database().await;
    let role = format!("gw_{}_{}", std::process::id(), rand_suffix());
    sqlx::query(&format!("create role {role} login"))
        .execute(&db.pool)
        .await
        .unwrap();
    let printed = command(&["grants", &role], &[]).await;
    let sql = text(&printed.stdout);
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    assert!(
        sql.contains(&format!("grant usage on schema realtime to \"{role}\";")),
        "{sql}"
    );
    assert!(sql.contains("GATEWAY_AUTO_MIGRATE=false"), "{sql}");

    let as_role = as_user(&db.url, &role);
    // Without the grants: refused, in one line that says what to do.
    let out = command(
        &["serve"],
        &[
            ("DATABASE_URL", &as_role),
            ("GATEWAY_AUTH", "none"),
            ("GATEWAY_AUTO_MIGRATE", "false"),
            ("GATEWAY_LISTEN", "127.0.0.1:0"),
        ],
    )
    .await;
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("permission denied for schema realtime"), "{stderr}");
    assert!(
        stderr.contains("`ws-gateway grants ROLE` prints the ones it needs"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("permission denied").count(), 1, "{stderr}");

    let applied = command(&["grants", &role, "--apply"], &[("DATABASE_URL", &db.url)]).await;
    assert!(applied.status.success(), "{}", text(&applied.stderr));
    assert!(
        text(&applied.stdout).contains(&format!("granted role \"{role}\"")),
        "{}",
        text(&applied.stdout)
    );
    // Idempotent: a second deploy runs it again.
    assert!(
        command(&["grants", &role, "--apply"], &[("DATABASE_URL", &db.url)])
            .await
            .status
            .success()
    );

    // A change older than the retention, for the pruner to delete as the role.
    sqlx::query("insert into items (id, project_id) values (1, 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    sqlx::query("update realtime.changes set committed_at = now() - interval '2 hours'")
        .execute(&db.pool)
        .await
        .unwrap();
    let owner_pool = db.pool.clone();
    let app = spawn_app_with(db.at_url(as_role.clone()), |s| {
        s.auto_migrate = false;
        s.history.retention = Duration::from_secs(3600);
        s.history.probe_interval = Some(Duration::from_millis(100));
    })
    .await;
    // The probe commits its row and receives it back: as the role.
    eventually("the probe measures as the least-privileged role", || async {
        let (_, body) = http_get_json(app.address, "/latency?source=probe").await;
        (body["count"].as_u64()? >= 3).then_some(())
    })
    .await;
    // The pruner deletes as the role.
    eventually("the old change pruned", || async {
        let left: i64 =
            sqlx::query_scalar("select count(*) from realtime.changes where committed_at < now() - interval '1 hour'")
                .fetch_one(&owner_pool)
                .await
                .unwrap();
        (left == 0).then_some(())
    })
    .await;
    // Live changes and a resume from history (the outbox, read as the role).
    let mut client = app.connect().await;
    let position = client.subscribe("project:2").await;
    client.subscribe("markers").await;
    sqlx::query("insert into items (id, project_id) values (2, 2), (3, 2)")
        .execute(&owner_pool)
        .await
        .unwrap();
    barrier(&owner_pool, "live").await;
    assert_eq!(client.changes_until_marker("live").await.len(), 2);
    let mut resumed = Client::connect(&app.ws_url()).await;
    resumed.subscribe_since("project:2", Some(&position)).await;
    assert_eq!(resumed.changes(2).await.len(), 2);
    let (_, health) = app.health().await;
    assert_eq!(health["status"], "healthy", "{health}");
    app.stop().await.expect("a clean stop");
}

/// Before: every metric, the dashboard and the full health document were
/// on the clients' port, readable without a token.
#[tokio::test]
async fn the_admin_endpoints_move_to_the_admin_port() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    assert_ne!(app.admin, app.address);
    // The clients' port: WebSocket, and a health check for a load balancer.
    let mut client = app.connect().await;
    client.subscribe("project:1").await;
    let (status, health) = http_get_json(app.address, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(health, serde_json::json!({"status": "healthy"}));
    for path in ["/metrics", "/latency", "/api/stats", "/", "/favicon.ico"] {
        let (status, _) = http_get(app.address, path).await;
        assert_eq!(status, 404, "{path} on the clients' port");
    }
    // The admin port: everything, and /ws for the dashboard's live panel.
    for path in ["/metrics", "/latency", "/api/stats", "/", "/favicon.ico"] {
        let (status, _) = http_get(app.admin, path).await;
        assert_eq!(status, 200, "{path} on the admin port");
    }
    let (_, full) = http_get_json(app.admin, "/healthz").await;
    assert_eq!(full["connections"], 1, "{full}");
    let mut panel = Client::connect(&format!("ws://{}/ws", app.admin)).await;
    panel.subscribe("project:1").await;
    app.stop().await.expect("a clean stop");
}

/// Reads `stderr` line by line into a shared log until it ends.
fn collect_lines(stderr: tokio::process::ChildStderr) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&lines);
    tokio::spawn(async move {
        let mut reader = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

async fn wait_for_line(lines: &std::sync::Mutex<Vec<String>>, what: &str) -> String {
    eventually(&format!("a log line with {what:?}"), || async {
        lines.lock().unwrap().iter().find(|l| l.contains(what)).cloned()
    })
    .await
}

/// Before: `serve 2>&1 | head -3` ignored SIGTERM and SIGINT (the log
/// writer's error report panicked the task handling the signal).
#[tokio::test]
async fn shutdown_works_whatever_stderr_is() {
    let db = fresh_database().await;
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // stderr a pipe whose reader read three lines and went away.
        let port = free_port().await;
        let mut child = serve_command(&db.url, port).stderr(Stdio::piped()).spawn().unwrap();
        let mut reader = BufReader::new(child.stderr.take().unwrap()).lines();
        for _ in 0..3 {
            reader.next_line().await.unwrap().expect("three lines");
        }
        drop(reader);
        let address = format!("127.0.0.1:{port}").parse().unwrap();
        eventually("the gateway serving", || async {
            tokio::net::TcpStream::connect(address).await.ok().map(|_| ())
        })
        .await;
        // Something to log into the closed pipe (the feed going live, the
        // requests), then the signal.
        eventually("the gateway healthy with stderr closed", || async {
            (http_get(address, "/healthz").await.0 == 200).then_some(())
        })
        .await;
        unsafe { libc::kill(child.id().unwrap() as i32, signal) };
        let exit = tokio::time::timeout(DEADLINE, child.wait())
            .await
            .expect("the gateway exits on the signal with stderr closed")
            .unwrap();
        assert!(exit.success(), "{exit:?}");
    }

    // stderr a pipe nobody reads, filled by debug logging.
    let port = free_port().await;
    let (reader, writer) = pipe();
    let mut child = serve_command(&db.url, port)
        .env("GATEWAY_LOG", "trace")
        .env("GATEWAY_PROBE_INTERVAL_MS", "100")
        .stderr(writer)
        .spawn()
        .unwrap();
    let address = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("the gateway listening with stderr full", || async {
        tokio::net::TcpStream::connect(address).await.ok().map(|_| ())
    })
    .await;
    eventually("the gateway live with stderr full", || async {
        let (status, health) = http_get_json(address, "/healthz").await;
        (status == 200 && health["feed"]["state"] == "live").then_some(())
    })
    .await;
    // Well past the 64 KiB a pipe holds: the probe logs at trace every 100 ms.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, _) = http_get(address, "/metrics").await;
    assert_eq!(status, 200, "serving with stderr full");
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    let exit = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the gateway exits with stderr full")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    drop(reader);
}

/// Before: `GATEWAY_SERVICE_HOST` (Kubernetes) stopped the gateway like a typo.
#[tokio::test]
async fn kubernetes_variables_are_warned_about_and_typos_refused() {
    let db = fresh_database().await;
    let mut gateway = GatewayProcess::start(
        &db.url,
        free_port().await,
        &[
            ("GATEWAY_SERVICE_HOST", "10.0.0.7"),
            ("GATEWAY_PORT", "tcp://10.0.0.7:8080"),
            ("GATEWAY_PORT_8080_TCP_ADDR", "10.0.0.7"),
        ],
    )
    .await;
    gateway.signal(libc::SIGTERM);
    assert!(gateway.wait_exit().await.success());
    let log = gateway.log_text();
    for name in ["GATEWAY_SERVICE_HOST", "GATEWAY_PORT", "GATEWAY_PORT_8080_TCP_ADDR"] {
        let field = format!("variable={name}");
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.split_whitespace().any(|word| word == field)),
            "{name}: {log}"
        );
    }
    let out = command(
        &["serve"],
        &[
            ("DATABASE_URL", &db.url),
            ("GATEWAY_AUTH", "none"),
            ("GATEWAY_JWT_SECRETS", "x"),
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("did you mean GATEWAY_JWT_SECRET?"),
        "{}",
        text(&out.stderr)
    );
}

/// Before: colour codes in files and pipes, `position=Some(11350)`,
/// `features=Features { dedup: false, ... }`, a reload that did not say what
/// changed, 21 identical warnings for one outage, `reconnects` 7 for it.
#[tokio::test]
async fn logs_read_well_in_text_and_json() {
    let db = fresh_database().await;
    let (upstream, _) = redirect(&db.url, 0);
    let proxy = KillSwitch::start(upstream).await;
    let (_, via_proxy) = redirect(&db.url, proxy.port);
    let config = std::env::temp_dir().join(format!("ws-gateway-logs-{}.env", std::process::id()));
    std::fs::write(&config, "GATEWAY_BATCH_SIZE=10\n").unwrap();
    let port = free_port().await;
    let mut child = serve_command(&via_proxy, port)
        .env("GATEWAY_CONFIG_FILE", &config)
        .env("GATEWAY_PROBE_INTERVAL_MS", "0")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_lines(child.stderr.take().unwrap());
    wait_for_line(&lines, "feed live").await;
    let address = format!("127.0.0.1:{port}").parse().unwrap();

    // A reload says what changed, in the variables' own terms.
    std::fs::write(
        &config,
        "GATEWAY_BATCH_SIZE=25\nGATEWAY_FEATURES=-compression\nGATEWAY_ADMIN_LISTEN=127.0.0.1:1\n",
    )
    .unwrap();
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGHUP) };
    let reloaded = wait_for_line(&lines, "configuration reloaded").await;
    assert!(
        reloaded.contains("changed=GATEWAY_BATCH_SIZE 10 -> 25, GATEWAY_FEATURES all -> all,-compression"),
        "{reloaded}"
    );
    assert!(reloaded.contains("features=all,-compression"), "{reloaded}");
    let ignored = wait_for_line(&lines, "only a restart applies it").await;
    assert!(
        ignored.contains("GATEWAY_ADMIN_LISTEN") && ignored.contains("configured=127.0.0.1:1"),
        "{ignored}"
    );

    // An outage of several reconnect attempts: one line when it starts, one
    // when it ends, and one reconnect.
    proxy.set_down(true);
    eventually("the feed down", || async {
        let (status, _) = http_get_json(address, "/healthz").await;
        (status == 503).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    proxy.set_down(false);
    wait_for_line(&lines, "feed back").await;
    let (_, health) = http_get_json(address, "/healthz").await;
    assert_eq!(health["feed"]["reconnects"], 1, "{health}");
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    assert!(
        tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
    let _ = std::fs::remove_file(&config);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = lines.lock().unwrap().join("\n");
    assert!(!log.contains('\u{1b}'), "no colour in a pipe:\n{log}");
    assert!(
        !log.contains("Some(") && !log.contains("Features {"),
        "Display forms:\n{log}"
    );
    let lost = log.lines().filter(|l| l.contains("feed down")).count();
    let summaries = log.lines().filter(|l| l.contains("feed still down")).count();
    assert_eq!(lost, 1, "{log}");
    assert!(summaries <= 1, "{log}");
    let back = log.lines().find(|l| l.contains("feed back")).unwrap();
    let failed: u64 = back
        .split("failed_sessions=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{back}"));
    assert!(failed >= 3, "several attempts failed, one line said so: {back}");

    // JSON: one object per line, fields as fields.
    let port = free_port().await;
    let mut child = serve_command(&db.url, port)
        .env("GATEWAY_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = collect_lines(child.stderr.take().unwrap());
    let live = wait_for_line(&lines, "feed live").await;
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGTERM) };
    assert!(
        tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap()
            .unwrap()
            .success()
    );
    let live: Value = serde_json::from_str(&live).unwrap();
    assert_eq!(live["level"], "INFO", "{live}");
    assert_eq!(live["message"], "feed live", "{live}");
    assert!(live["position"].is_number(), "{live}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    for line in lines.lock().unwrap().iter() {
        let object: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            object["timestamp"].is_string() && object["target"].is_string(),
            "{line}"
        );
    }
}

/// Colour on a terminal: the text format under a pseudo-terminal (`script`).
#[tokio::test]
async fn text_logs_have_colour_on_a_terminal_only() {
    let db = fresh_database().await;
    let script = ["/usr/bin/script", "/bin/script"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .expect("util-linux's `script` runs the gateway on a pseudo-terminal");
    let port = free_port().await;
    let command_line = format!(
        "DATABASE_URL='{}' GATEWAY_AUTH=none GATEWAY_LISTEN=127.0.0.1:{port} {} serve & echo \"gateway-pid=$!\"; wait",
        db.url,
        gateway_binary().display()
    );
    let mut child = tokio::process::Command::new(script)
        .args(["-qfec", &command_line, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let deadline = Instant::now() + DEADLINE;
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("feed live") {
        assert!(
            Instant::now() < deadline,
            "no 'feed live' on the terminal: {}",
            text(&seen)
        );
        let n = tokio::time::timeout(DEADLINE, out.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the terminal closed: {}", text(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    let shown = text(&seen);
    let pid: i32 = shown
        .split("gateway-pid=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no pid: {shown}"));
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let exit = tokio::time::timeout(DEADLINE, child.wait())
        .await
        .expect("the gateway stops")
        .unwrap();
    assert!(exit.success(), "{exit:?}: {shown}");
    assert!(seen.contains(&0x1b), "colour codes on a terminal: {shown}");
}
