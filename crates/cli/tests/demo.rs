//! `ws-gateway demo` (what `make run` starts) run twice: the second refuses,
//! naming the first, and leaves its database alone; a port in use is
//! refused before any database is started.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const DEADLINE: Duration = Duration::from_secs(60);

fn scratch(name: &str) -> PathBuf {
    // Under the system temp dir: the `postgres` user must reach it.
    let dir = std::env::temp_dir().join(format!("ws-gateway-demo-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn demo(data_dir: &std::path::Path, listen: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_ws-gateway"));
    command
        .args(["demo", "--rate", "2", "--board-listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("GATEWAY_LISTEN", listen)
        .env("GATEWAY_PROBE_INTERVAL_MS", "0")
        .stdin(Stdio::null());
    command
}

/// Waits for the banner; returns the dashboard's address.
fn dashboard_of(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(url) = line.trim().strip_prefix("dashboard:") {
                let _ = tx.send(
                    url.trim()
                        .trim_start_matches("http://")
                        .trim_end_matches('/')
                        .to_owned(),
                );
            }
        }
    });
    rx.recv_timeout(DEADLINE).expect("the demo prints its dashboard")
}

fn healthz(address: &str) -> serde_json::Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let response = reqwest::get(format!("http://{address}/healthz")).await.unwrap();
        response.json().await.unwrap()
    })
}

/// Before: a second `make run` stopped the first one's database ("a server
/// from an earlier run still uses this directory; stopping it"), then failed
/// on the port, and the first demo answered 503 for ever.
#[test]
fn a_second_demo_refuses_naming_the_first_and_leaves_it_running() {
    let data = scratch("shared").join("postgres");
    let mut first = demo(&data, "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let address = dashboard_of(&mut first);
    let deadline = Instant::now() + DEADLINE;
    while healthz(&address)["feed"]["state"] != "live" {
        assert!(Instant::now() < deadline, "the first demo goes live");
        std::thread::sleep(Duration::from_millis(100));
    }

    let started = Instant::now();
    let second = demo(&data, "127.0.0.1:0").output().unwrap();
    assert!(!second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(started.elapsed() < Duration::from_secs(10), "refused at once");
    assert!(
        stderr.contains(&format!(
            "another ws-gateway demo is running on {} (pid {}, dashboard http://{address}/)",
            data.display(),
            first.id()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("--data-dir"), "says how to run beside it: {stderr}");
    // The first one never noticed.
    std::thread::sleep(Duration::from_millis(1500));
    let health = healthz(&address);
    assert_eq!(health["status"], "healthy", "{health}");
    assert_eq!(health["feed"]["state"], "live", "{health}");

    // Another directory, but the first one's port: refused before a
    // database is started for nothing.
    let other = scratch("other").join("postgres");
    let taken = demo(&other, &address).output().unwrap();
    assert!(!taken.status.success());
    let stderr = String::from_utf8_lossy(&taken.stderr);
    assert!(
        stderr.contains(&format!("GATEWAY_LISTEN={address} is not free")),
        "{stderr}"
    );
    assert!(!other.join("data/PG_VERSION").exists() && !other.join("PG_VERSION").exists());

    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + DEADLINE;
    let status = loop {
        if let Some(status) = first.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the first demo stops");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_dir_all(data.parent().unwrap());
    let _ = std::fs::remove_dir_all(other.parent().unwrap());
}
