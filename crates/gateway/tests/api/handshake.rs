//! No connection without a deadline (issue 14, fault 2), against the
//! gateway as a process (its file descriptors and memory are its own):
//! every accepted TCP connection counts against `GATEWAY_MAX_CONNECTIONS`,
//! one that has not sent its request headers by
//! `GATEWAY_HANDSHAKE_TIMEOUT_MS` is closed, headers are capped at 16 KiB,
//! and `accept` failures back off.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::bystander::Bystander;
use crate::fault_kit::{GatewayProcess, free_port};
use crate::helpers::{DEADLINE, eventually, fresh_database, http_get, metric};

fn open_fds(gateway: &GatewayProcess) -> usize {
    let pid = gateway.child.id().expect("running");
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn rss_kb(gateway: &GatewayProcess) -> u64 {
    let pid = gateway.child.id().expect("running");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Reads until the server closes; what it sent.
async fn read_to_close(mut socket: TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(DEADLINE, socket.read_to_end(&mut out))
        .await
        .expect("the gateway closes the connection within the deadline");
    String::from_utf8_lossy(&out).into_owned()
}

/// The WebSocket upgrade's status line, as a raw request sees it.
async fn upgrade_status(gateway: &GatewayProcess) -> String {
    let mut socket = TcpStream::connect(gateway.address).await.unwrap();
    socket
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 12];
    tokio::time::timeout(DEADLINE, socket.read_exact(&mut head))
        .await
        .expect("an answer")
        .unwrap();
    String::from_utf8_lossy(&head).into_owned()
}

/// 30 connections that send nothing and 9 that send their headers a byte
/// every 100 ms fill a 40-connection gateway (with the bystander): a new
/// client is refused 503 while `/healthz` still answers, then the handshake
/// timeout closes all 39 and the gateway's descriptors are back to where
/// they were. Before the fix nothing closed them and they were not counted.
///
/// The test scrapes the admin port: a scrape of the client port holds a slot
/// there until the gateway has read its close, and one still held while
/// the 39 arrive pushes the last of them onto a reserved slot, leaving an
/// ordinary one free once it goes (CI saw a new client get in: a 101).
#[tokio::test]
async fn silent_and_slow_connections_count_and_are_closed_by_the_handshake_timeout() {
    let db = fresh_database().await;
    // 5 s, not less: the 39 connections must all still be open when the
    // test counts them and is refused, also on a loaded machine (at 1.5 s the
    // first ones were sometimes closed before the last one was counted).
    let admin_listen = format!("127.0.0.1:{}", free_port().await);
    let env = [
        ("GATEWAY_HANDSHAKE_TIMEOUT_MS", "5000"),
        ("GATEWAY_MAX_CONNECTIONS", "40"),
        ("GATEWAY_ADMIN_LISTEN", admin_listen.as_str()),
    ];
    let gateway = GatewayProcess::start(&db.url, free_port().await, &env).await;
    let admin = gateway.admin;
    let bystander = Bystander::start(&gateway.ws_url(), &db.pool, 1, 200).await;
    eventually("the probe to connect", || async {
        (metric(admin, "ws_gateway_probes_received_total").await > 0.0).then_some(())
    })
    .await;
    // Nothing but the bystander on the client port (the start's health
    // checks closed), so the 39 take the 39 ordinary slots left.
    eventually("the bystander alone on the client port", || async {
        (metric(admin, "ws_gateway_tcp_connections").await == 1.0).then_some(())
    })
    .await;
    let baseline = open_fds(&gateway);

    let mut held = JoinSet::new();
    for i in 0..39 {
        let mut socket = TcpStream::connect(gateway.address).await.unwrap();
        held.spawn(async move {
            if i >= 30 {
                // Slow headers: the request line, then a byte at a time.
                let _ = socket.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ").await;
                let mut buf = [0u8; 64];
                loop {
                    tokio::select! {
                        read = socket.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) { break },
                        () = tokio::time::sleep(Duration::from_millis(100)) => {
                            if socket.write_all(b"a").await.is_err() { break }
                        }
                    }
                }
            } else {
                let mut out = Vec::new();
                let _ = socket.read_to_end(&mut out).await;
            }
        });
    }
    eventually("the 39 connections and the bystander to fill the gateway", || async {
        (metric(admin, "ws_gateway_tcp_connections").await >= 40.0).then_some(())
    })
    .await;
    // Full: a client is refused (on a reserved slot), health still answers.
    let status = upgrade_status(&gateway).await;
    let timeouts = metric(admin, "ws_gateway_handshake_timeouts_total").await;
    assert!(
        status.contains("503"),
        "a new client is refused while the gateway is full: {status} ({timeouts} handshake timeouts so far)"
    );
    let (health, _) = http_get(gateway.address, "/healthz").await;
    assert_eq!(health, 200);

    tokio::time::timeout(DEADLINE, async { while held.join_next().await.is_some() {} })
        .await
        .expect("the handshake timeout closes every silent and slow connection");
    assert!(metric(admin, "ws_gateway_handshake_timeouts_total").await >= 39.0);
    eventually("the gateway's descriptors to be back to their baseline", || async {
        (open_fds(&gateway) <= baseline).then_some(())
    })
    .await;
    let status = upgrade_status(&gateway).await;
    assert!(status.contains("101"), "a client gets in again: {status}");
    let seen = bystander.check(&db.pool).await;
    println!("bystander beside 39 silent connections: {seen}");
}

/// 200 connections each sending 64 KiB of headers that never end: every
/// one is answered 431 at 16 KiB and closed, and the gateway's memory does
/// not grow by their buffers (before the fix each held all 64 KiB, with no
/// deadline).
#[tokio::test]
async fn oversized_headers_are_refused_without_memory_growth() {
    let db = fresh_database().await;
    let gateway = GatewayProcess::start(&db.url, free_port().await, &[]).await;
    let bystander = Bystander::start(&gateway.ws_url(), &db.pool, 1, 200).await;
    let before = rss_kb(&gateway);
    let mut sockets = JoinSet::new();
    let header = format!("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: {}", "a".repeat(64 * 1024));
    for _ in 0..200 {
        let header = header.clone();
        let mut socket = TcpStream::connect(gateway.address).await.unwrap();
        sockets.spawn(async move {
            // The gateway may close before all of it is written.
            let _ = socket.write_all(header.as_bytes()).await;
            read_to_close(socket).await
        });
    }
    let mut answers = Vec::new();
    while let Some(answer) = sockets.join_next().await {
        answers.push(answer.unwrap());
    }
    let after = rss_kb(&gateway);
    let refused = answers.iter().filter(|a| a.starts_with("HTTP/1.1 431")).count();
    // A reset can overtake the 431 on a socket whose unread bytes the
    // gateway dropped; none may be served.
    assert!(
        answers.iter().all(|a| a.is_empty() || a.starts_with("HTTP/1.1 431")),
        "{answers:?}"
    );
    assert!(refused >= 100, "{refused} of 200 saw their 431");
    let grew_kb = after.saturating_sub(before);
    assert!(
        grew_kb < 8 * 1024,
        "RSS grew by {grew_kb} KiB for 200 refused connections"
    );
    let seen = bystander.check(&db.pool).await;
    println!("RSS {before} -> {after} KiB; bystander: {seen}");
}

/// With its open-file limit at 128 and 150 silent connections, `accept`
/// fails (EMFILE): the gateway backs off instead of spinning, counts the
/// failures, says so once, and once the handshake timeout has closed the
/// silent ones it answers `/healthz` and takes clients again.
#[tokio::test]
async fn accept_failures_back_off_and_are_counted() {
    let db = fresh_database().await;
    let env = [("GATEWAY_HANDSHAKE_TIMEOUT_MS", "1500")];
    let gateway = GatewayProcess::start_with_file_limit(&db.url, free_port().await, &env, Some(128)).await;
    let bystander = Bystander::start(&gateway.ws_url(), &db.pool, 1, 200).await;
    let mut silent = Vec::new();
    for _ in 0..150 {
        silent.push(TcpStream::connect(gateway.address).await.unwrap());
    }
    let mut closed = JoinSet::new();
    for socket in silent {
        closed.spawn(read_to_close(socket));
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while closed.join_next().await.is_some() {}
    })
    .await
    .expect("every silent connection is accepted in turn and timed out");
    let (health, _) = http_get(gateway.address, "/healthz").await;
    assert_eq!(health, 200);
    let errors = metric(gateway.address, "ws_gateway_accept_errors_total").await;
    // A busy loop fails accept hundreds of thousands of times a second;
    // the backoff (5 ms doubling to 1 s) a few dozen times in all.
    assert!((1.0..200.0).contains(&errors), "{errors} accept errors");
    let log = gateway.log_text();
    assert!(
        log.contains("open-file limit is below GATEWAY_MAX_CONNECTIONS"),
        "{log}"
    );
    // Said once (then at most every 10 s), not once per failure.
    let warned = log.matches("accept failed").count();
    assert!((1..=2).contains(&warned), "warned {warned} times:\n{log}");
    let seen = bystander.check(&db.pool).await;
    println!("{errors} accept errors, {warned} warnings; bystander: {seen}");
}
