//! `GET /sse` (SPEC section 10): the same messages as a WebSocket, as
//! `text/event-stream`, read the way `curl -N` does (a streamed body, parsed
//! by hand) and resumed with `Last-Event-ID` across a gateway restart; a
//! stream that is not read closed as a slow consumer and its connection
//! dropped; gzip when asked for; every refusal; the public port beside an
//! admin port. (The browser's `EventSource` is in clients/js/test/sse.test.js.)

use std::time::Duration;

use serde_json::Value;

use crate::fault_kit::{GatewayProcess, Workload, committed_positions, free_port, wait_outbox_caught_up};
use crate::helpers::{DEADLINE, eventually, fresh_database, http_get, metric, spawn_app_with};
use crate::security::{jwt, now_s, token};

/// One server-sent event: its id (if any) and its data.
#[derive(Debug, Clone)]
struct Event {
    id: Option<String>,
    data: Value,
}

/// Reads an event stream chunk by chunk, as a byte-oriented client would.
struct EventStream {
    response: reqwest::Response,
    buffer: String,
    comments: usize,
}

impl EventStream {
    async fn open(address: std::net::SocketAddr, query: &str, last_id: Option<&str>) -> EventStream {
        let mut request = reqwest::Client::new().get(format!("http://{address}/sse?{query}"));
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.expect("GET /sse");
        assert_eq!(response.status(), 200, "{:?}", response.headers());
        let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        EventStream {
            response,
            buffer: String::new(),
            comments: 0,
        }
    }

    /// The next event (a comment is one with `data` null); None when the
    /// stream ended.
    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut id = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_owned());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).expect("data is JSON"));
                    } else if line.starts_with(':') {
                        self.comments += 1;
                    }
                }
                // A comment (heartbeat) is an event without data: the
                // reader gets a turn to look at the clock.
                return Some(Event {
                    id,
                    data: data.unwrap_or(Value::Null),
                });
            }
            match tokio::time::timeout(DEADLINE, self.response.chunk())
                .await
                .expect("a chunk in time")
            {
                Ok(Some(chunk)) => self.buffer.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(None) | Err(_) => return None,
            }
        }
    }
}

/// The changes an event carries (a batch unpacked), as (room, position).
fn changes_of(event: &Event) -> Vec<(String, i64)> {
    let one = |m: &Value| {
        (
            m["room"].as_str().unwrap().to_owned(),
            m["position"].as_str().unwrap().parse().unwrap(),
        )
    };
    match event.data["type"].as_str().unwrap_or_default() {
        "change" | "event" => vec![one(&event.data)],
        "batch" => event.data["changes"].as_array().unwrap().iter().map(one).collect(),
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn an_sse_stream_of_two_rooms_resumes_across_a_gateway_restart_with_nothing_missing_or_repeated() {
    let db = fresh_database().await;
    let port = free_port().await;
    let env = [("GATEWAY_HEARTBEAT_MS", "10000")];
    let mut gateway = GatewayProcess::start(&db.url, port, &env).await;
    let mut stream = EventStream::open(gateway.address, "room=project:0&room=project:1", None).await;
    let mut last_id = None;
    let mut subscribed = 0;
    while subscribed < 2 {
        let event = stream.next().await.expect("subscribed");
        if event.data["type"] == "subscribed" {
            subscribed += 1;
            last_id = event.id.clone();
        }
    }
    let start: i64 = last_id
        .clone()
        .expect("a fresh stream's subscribed has an id")
        .parse()
        .unwrap();
    let total = 600;
    let workload = Workload::start(&db.url, total, 3, 2);
    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut restarted = false;
    let mut finished = None;
    let mut resumed_from = Vec::new();
    // Done once the stream has as many changes as the outbox holds for its
    // rooms; a failure names what is missing.
    macro_rules! check_done {
        () => {
            if restarted && workload.committed.load(std::sync::atomic::Ordering::Relaxed) >= total as u64 {
                wait_outbox_caught_up(&db.pool).await;
                let mut all = committed_positions(&db.pool, "project:0", start).await;
                all.extend(committed_positions(&db.pool, "project:1", start).await);
                if seen.len() >= all.len() {
                    break;
                }
                let done_at = *finished.get_or_insert_with(tokio::time::Instant::now);
                if done_at.elapsed() > Duration::from_secs(30) {
                    all.sort();
                    let got: std::collections::HashSet<i64> = seen.iter().map(|(_, p)| *p).collect();
                    let missing: Vec<i64> = all.iter().copied().filter(|p| !got.contains(p)).collect();
                    panic!(
                        "30 s after the last commit the stream lacks {} of {} changes: {missing:?} (resumed from {resumed_from:?}; log {})",
                        missing.len(),
                        all.len(),
                        gateway.log.display()
                    );
                }
            }
        };
    }
    loop {
        // A turn at least every half second to see whether everything came
        // (the last change can arrive before its writer counts it).
        let Ok(next) = tokio::time::timeout(Duration::from_millis(500), stream.next()).await else {
            check_done!();
            continue;
        };
        let Some(event) = next else {
            // The gateway went away: come back with the last id, as a
            // browser's EventSource does.
            let _ = gateway.wait_exit().await;
            gateway = GatewayProcess::start(&db.url, port, &env).await;
            resumed_from.push(last_id.clone());
            stream = EventStream::open(gateway.address, "room=project:0&room=project:1", last_id.as_deref()).await;
            continue;
        };
        let changes = changes_of(&event);
        if !changes.is_empty() {
            let id = event.id.clone().expect("every change event has an id");
            assert_eq!(
                id.parse::<i64>().unwrap(),
                changes.last().unwrap().1,
                "the id is its last position"
            );
            last_id = Some(id);
            seen.extend(changes);
        }
        if !restarted && seen.len() > 100 {
            gateway.signal(libc::SIGKILL);
            restarted = true;
        }
        check_done!();
    }
    workload.finish().await;
    for room in ["project:0", "project:1"] {
        let got: Vec<i64> = seen.iter().filter(|(r, _)| r == room).map(|(_, p)| *p).collect();
        assert_eq!(
            got,
            committed_positions(&db.pool, room, start).await,
            "{room}: every change once, in order"
        );
    }
    let order: Vec<i64> = seen.iter().map(|(_, p)| *p).collect();
    assert!(order.windows(2).all(|w| w[0] <= w[1]), "one sequence across the rooms");
    assert!(restarted);
}

/// What a raw HTTP/1.1 client got of an `/sse` response: its chunked body
/// decoded as far as it came, and the complete events in it as (id, data).
fn complete_events(raw: &[u8]) -> Vec<(Option<String>, Value)> {
    let text = String::from_utf8_lossy(raw);
    let Some(head_end) = text.find("\r\n\r\n") else {
        return Vec::new();
    };
    let mut rest = &raw[head_end + 4..];
    let mut body = Vec::new();
    while let Some(line_end) = rest.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16).unwrap();
        let data = &rest[line_end + 2..];
        if size == 0 || data.len() < size {
            body.extend_from_slice(&data[..size.min(data.len())]);
            break;
        }
        body.extend_from_slice(&data[..size]);
        rest = &data[(size + 2).min(data.len())..];
    }
    let body = String::from_utf8_lossy(&body).into_owned();
    let complete = &body[..body.rfind("\n\n").map_or(0, |i| i + 2)];
    complete
        .split("\n\n")
        .filter_map(|block| {
            let id = block.lines().find_map(|l| l.strip_prefix("id: ")).map(str::to_owned);
            let data = block.lines().find_map(|l| l.strip_prefix("data: "))?;
            Some((id, serde_json::from_str(data).unwrap()))
        })
        .collect()
}

/// A reader that never reads, beside one that does: the first is closed as
/// a slow consumer with what it holds bounded, and its TCP connection is
/// dropped while the client still holds it open (nothing of it stays in
/// the gateway); read afterwards, it has a gap-free prefix, and resuming
/// with its last id gives the rest, nothing missing or repeated. The quick
/// reader gets everything meanwhile.
#[tokio::test]
async fn a_stream_that_is_not_read_is_closed_as_a_slow_consumer_and_resumes_with_its_last_id() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let db = fresh_database().await;
    let env = [("GATEWAY_SEND_QUEUE_BYTES", "65536"), ("GATEWAY_HEARTBEAT_MS", "10000")];
    let gateway = GatewayProcess::start(&db.url, free_port().await, &env).await;
    let address = gateway.address;
    let mut quick = EventStream::open(address, "room=project:1", None).await;
    let mut start = None;
    while start.is_none() {
        let event = quick.next().await.expect("subscribed");
        if event.data["type"] == "subscribed" {
            start = event.id.clone();
        }
    }
    let start: i64 = start.unwrap().parse().unwrap();
    let quick_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<i64>::new()));
    let reader = {
        let seen = std::sync::Arc::clone(&quick_seen);
        tokio::spawn(async move {
            while let Some(event) = quick.next().await {
                seen.lock()
                    .unwrap()
                    .extend(changes_of(&event).into_iter().map(|(_, p)| p));
            }
        })
    };
    // The stalled client: a small receive buffer, and it never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(address).await.unwrap();
    stalled
        .write_all(b"GET /sse?room=project:1 HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let body = "x".repeat(20_000);
    let mut id = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        if metric(address, "ws_gateway_slow_consumer_disconnects_total").await >= 1.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled stream was never closed"
        );
        for _ in 0..2 {
            id += 1;
            sqlx::query("insert into items (id, project_id, body) values ($1, 1, $2)")
                .bind(id)
                .bind(&body)
                .execute(&db.pool)
                .await
                .unwrap();
        }
        // The quick reader takes each round before the next: what it has
        // in flight (40 KB) stays under its send queue even when this
        // process is descheduled. Bursts of 400 KB once got it closed as a
        // slow consumer too, on a loaded machine (it then missed changes,
        // or the health check below found no stream).
        while quick_seen.lock().unwrap().len() < id as usize {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the quick reader fell behind: {} of {id}",
                quick_seen.lock().unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let written_mb = id as f64 * 20_000.0 / 1e6;
    // Its connection is gone from the gateway although the client has not
    // closed it: only the quick stream and this request remain.
    // (Within the grace it had to take its close, and a little more.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        if metric(address, "ws_gateway_tcp_connections").await <= 2.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled stream's TCP connection was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, health) = crate::helpers::http_get_json(address, "/healthz").await;
    assert_eq!(health["connections"], 1, "only the quick stream: {health}");
    // The end comes once the client has read what the gateway's kernel
    // still holds for it (3 MB here: 26 ms when idle). Once, in the full
    // suite on a loaded machine, 20 s passed without it (cause not found);
    // the fill's deadline then, and how far it got if even that passes.
    let mut raw = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(90), stalled.read_to_end(&mut raw)).await;
    assert!(
        read.is_ok(),
        "the dropped connection reads to its end (read {} bytes in 90 s)",
        raw.len()
    );
    let got = complete_events(&raw);
    assert_eq!(got[1].1["type"], "subscribed", "{:?}", &got[..2]);
    let mut seen: Vec<i64> = got
        .iter()
        .flat_map(|(id, data)| {
            changes_of(&Event {
                id: id.clone(),
                data: data.clone(),
            })
        })
        .map(|(_, p)| p)
        .collect();
    let last_id = got
        .iter()
        .rev()
        .find_map(|(id, _)| id.clone())
        .expect("an id to resume from");
    let prefix = seen.len();
    // Resumes with its last id: the rest, then live.
    let mut resumed = EventStream::open(address, "room=project:1", Some(&last_id)).await;
    let want = committed_positions(&db.pool, "project:1", start).await;
    while seen.len() < want.len() {
        let event = resumed.next().await.expect("the rest of the room");
        seen.extend(changes_of(&event).into_iter().map(|(_, p)| p));
    }
    assert_eq!(seen, want, "a gap-free prefix, then the rest once");
    eventually("the quick reader to have everything", || async {
        (quick_seen.lock().unwrap().len() >= want.len()).then_some(())
    })
    .await;
    assert_eq!(*quick_seen.lock().unwrap(), want, "the quick reader was not held back");
    reader.abort();
    println!(
        "stalled stream: {written_mb:.1} MB written to its room; it had taken {prefix} changes ({} KB) when it was dropped",
        raw.len() / 1024
    );
}

/// Every refusal a client can cause gets an HTTP status and a JSON reason
/// naming what was wrong.
#[tokio::test]
async fn sse_refusals_say_why() {
    let app = spawn_app_with(fresh_database().await, jwt).await;
    let address = app.address;
    let good = token("alice", &["project:*"], now_s() + 3600);
    let expired = token("alice", &["project:*"], now_s() - 3600);
    let client = reqwest::Client::new();
    let cases: Vec<(String, Option<&str>, u16, &str)> = vec![
        (format!("room=project:1&token={good}"), None, 200, "text/event-stream"),
        ("room=project:1".into(), None, 401, "unauthorized"),
        ("room=project:1&token=not-a-jwt".into(), None, 401, "unauthorized"),
        (format!("room=project:1&token={expired}"), None, 401, "unauthorized"),
        (format!("room=task:7&token={good}"), None, 403, "forbidden"),
        (format!("room=project:1&room=task:7&token={good}"), None, 403, "task:7"),
        (format!("room=__probe:x&token={good}"), None, 403, "forbidden"),
        (format!("token={good}"), None, 400, "room="),
        (format!("room=project:*&token={good}"), None, 400, "invalid_room"),
        (format!("room=project:1&colour=blue&token={good}"), None, 400, "colour"),
        (
            format!("room=project:1&since=abc&token={good}"),
            None,
            400,
            "invalid_position",
        ),
        (
            format!("room=project:1&token={good}"),
            Some("abc"),
            400,
            "invalid_position",
        ),
        (
            format!("room=project:1&token={good}"),
            Some("99999999999"),
            400,
            "never handed out",
        ),
    ];
    for (query, last_id, status, says) in cases {
        let mut request = client.get(format!("http://{address}/sse?{query}"));
        if let Some(id) = last_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), status, "{query} {last_id:?}");
        if status == 200 {
            let kind = response.headers()["content-type"].to_str().unwrap().to_owned();
            assert!(kind.contains(says), "{kind}");
            continue;
        }
        assert_eq!(response.headers()["content-type"], "application/json");
        let body: Value = response.json().await.unwrap();
        assert!(body.to_string().contains(says), "{query} {last_id:?}: {body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
    }
    // A cross-origin EventSource that reconnects with Last-Event-ID is
    // preflighted.
    let preflight = client
        .request(reqwest::Method::OPTIONS, format!("http://{address}/sse"))
        .header("origin", "http://app.example")
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", "last-event-id")
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), 204);
    let allowed = preflight.headers()["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("last-event-id"), "{allowed}");
    app.stop().await.unwrap();
}

/// Reads a gzip body until its decoded text contains `want`.
async fn decoded_until(
    response: &mut reqwest::Response,
    decoder: &mut flate2::write::GzDecoder<Vec<u8>>,
    want: &str,
) -> String {
    use std::io::Write;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        decoder.flush().unwrap();
        let text = String::from_utf8_lossy(decoder.get_ref()).into_owned();
        if text.contains(want) {
            return text;
        }
        let Ok(chunk) = tokio::time::timeout_at(deadline, response.chunk()).await else {
            panic!("{want:?} never decoded; got {text:?}");
        };
        decoder.write_all(&chunk.unwrap().expect("the stream goes on")).unwrap();
    }
}

/// `Accept-Encoding: gzip` gets a gzip body flushed after every write: each
/// event can be decoded as soon as it arrives, before the next is sent.
/// Without it the body is plain.
#[tokio::test]
async fn a_stream_is_gzip_only_when_the_client_asks_and_each_event_arrives_whole() {
    let app = spawn_app_with(fresh_database().await, |_| {}).await;
    let url = format!("http://{}/sse?room=project:4", app.address);
    let plain = reqwest::Client::new().get(&url).send().await.unwrap();
    assert!(plain.headers().get("content-encoding").is_none());
    drop(plain);
    let mut response = reqwest::Client::new()
        .get(&url)
        .header("accept-encoding", "br;q=1.0, gzip;q=0.5")
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["content-encoding"], "gzip");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut decoder = flate2::write::GzDecoder::new(Vec::new());
    decoded_until(&mut response, &mut decoder, "\"type\":\"subscribed\"").await;
    for id in 1..=3 {
        sqlx::query("insert into items (id, project_id, body) values ($1, 4, $2)")
            .bind(id)
            .bind("inspection passed ".repeat(100))
            .execute(&app.db.pool)
            .await
            .unwrap();
        // Decoded before the next one is even committed.
        let text = decoded_until(&mut response, &mut decoder, &format!("\"key\":{{\"id\": {id}}}")).await;
        assert!(text.ends_with("\n\n"), "whole events only");
    }
    app.stop().await.unwrap();
}

/// With `GATEWAY_ADMIN_LISTEN` set, `/sse` and `/publish` stay on the
/// clients' port (and the admin port keeps them for the dashboard).
#[tokio::test]
async fn sse_and_publish_are_on_the_public_port_when_the_admin_port_is_split_off() {
    let app = spawn_app_with(fresh_database().await, |s| {
        s.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    assert_ne!(app.admin, app.address);
    let (status, _) = http_get(app.address, "/metrics").await;
    assert_eq!(status, 404, "the admin endpoints moved");
    let mut stream = EventStream::open(app.address, "room=project:9", None).await;
    let mut subscribed = false;
    while !subscribed {
        subscribed = stream.next().await.expect("subscribed").data["type"] == "subscribed";
    }
    let published = reqwest::Client::new()
        .post(format!("http://{}/publish", app.address))
        .json(&serde_json::json!({"room": "project:9", "event": "crew_checked_in", "payload": {"crew": 4}}))
        .send()
        .await
        .unwrap();
    assert!(published.status().is_success(), "{}", published.text().await.unwrap());
    let event = loop {
        let event = stream.next().await.expect("the event");
        if event.data["type"] == "event" {
            break event;
        }
    };
    assert_eq!(event.data["event"], "crew_checked_in");
    assert_eq!(event.data["payload"]["crew"], 4);
    assert_eq!(event.id.as_deref(), event.data["position"].as_str());
    let on_admin = reqwest::Client::new()
        .get(format!("http://{}/sse?room=project:9", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(on_admin.status(), 200);
    app.stop().await.unwrap();
}
