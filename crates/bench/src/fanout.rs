//! The fan-out floor (`--fanout-floor`): the least a server can do to push
//! the same changes to the same clients, run in the gateway's place so a
//! report can give the gateway's CPU per delivery as a ratio to it.
//!
//! One thread (a current-thread tokio runtime: epoll underneath), one
//! LISTEN connection, each change's frame built once per room, and one
//! `send()` of it per delivery straight from the notification: no queue, no
//! task per connection woken per change, no batching, no compression, no
//! telemetry. A frame a socket cannot take whole (a client that stalls) is
//! kept for it and finished when the socket is writable; at the loads the
//! floor is run at, that never happens. It speaks as much of the protocol as
//! the bench's clients use: the upgrade, `subscribe` -> `subscribed`,
//! `change` messages built by the gateway's own code, close; and
//! `/healthz` for the bench's start-up check.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use ws_gateway::change::Notification;

/// The longest request head (the upgrade) a client may send.
const MAX_HEAD: usize = 8192;
/// The longest frame a client may send (a `subscribe`).
const MAX_CLIENT_FRAME: usize = 64 * 1024;

/// Runs the floor on `addr` until SIGTERM or ctrl-c: its work on a thread
/// of its own, so that this process's CPU is that thread's.
pub async fn serve(addr: &str, db_url: &str, channel: &str) -> Result<()> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("fan-out floor: binding {addr}"))?;
    listener.set_nonblocking(true)?;
    let (db_url, channel) = (db_url.to_owned(), channel.to_owned());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("fanout-floor".into())
        .spawn(move || -> Result<()> {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&runtime, run(listener, db_url, channel, stop_rx))
        })
        .context("starting the fan-out floor's thread")?;
    let mut outcome = tokio::task::spawn_blocking(move || thread.join());
    tokio::select! {
        () = ws_gateway::shutdown_signal() => {
            let _ = stop_tx.send(());
            (&mut outcome).await?.map_err(|_| anyhow!("the fan-out floor's thread panicked"))?
        }
        ended = &mut outcome => ended?.map_err(|_| anyhow!("the fan-out floor's thread panicked"))?,
    }
}

/// What the floor's tasks share (one thread: no locks).
struct Floor {
    /// Each room's subscribers, in subscription order.
    rooms: RefCell<HashMap<String, Vec<Rc<Connection>>>>,
    /// The last position notified (for `/healthz` and `subscribed`).
    position: Cell<i64>,
}

struct Connection {
    stream: TcpStream,
    /// What the socket could not take at once, written when it can.
    pending: RefCell<Vec<u8>>,
    /// Something was left in `pending`.
    stalled: Notify,
}

async fn run(
    listener: std::net::TcpListener,
    db_url: String,
    channel: String,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let floor = Rc::new(Floor {
        rooms: RefCell::new(HashMap::new()),
        position: Cell::new(0),
    });
    let (client, mut connection) = tokio_postgres::connect(&db_url, NoTls)
        .await
        .context("fan-out floor: connecting its LISTEN connection")?;
    let feed = tokio::task::spawn_local({
        let floor = Rc::clone(&floor);
        async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => floor.dispatch(n.payload()),
                    Ok(_) => {}
                    Err(e) => return Err(anyhow!("fan-out floor: the LISTEN connection failed: {e}")),
                }
            }
            Err(anyhow!("fan-out floor: the LISTEN connection closed"))
        }
    });
    client
        .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
        .await
        .context("fan-out floor: LISTEN")?;
    let accept = async {
        loop {
            let (stream, _) = listener.accept().await?;
            stream.set_nodelay(true)?;
            tokio::task::spawn_local(Rc::clone(&floor).serve_connection(stream));
        }
    };
    tokio::select! {
        _ = stop => Ok(()),
        failed = accept => failed,
        ended = feed => ended.map_err(|e| anyhow!("fan-out floor feed task: {e}"))?,
    }
}

impl Floor {
    /// One notification: its frame built once per room, one write of it to
    /// each subscriber.
    fn dispatch(&self, payload: &str) {
        let Ok(Notification::Change(change)) = Notification::parse(payload) else {
            // References (rows too large for a NOTIFY) are not read back:
            // the floor's clients count them as lost.
            return;
        };
        self.position.set(self.position.get().max(change.position.0));
        let rooms = self.rooms.borrow();
        for room in &change.rooms {
            if let Some(members) = rooms.get(room.as_str()) {
                let frame = text_frame(change.message_for(room).as_bytes());
                for member in members {
                    member.deliver(&frame);
                }
            }
        }
    }

    async fn serve_connection(self: Rc<Self>, mut stream: TcpStream) {
        let Ok(Some((path, key, rest))) = read_head(&mut stream).await else {
            return;
        };
        if path == "/healthz" {
            let body = format!(
                "{{\"status\":\"ok\",\"feed\":{{\"state\":\"live\",\"position\":\"{}\"}}}}",
                self.position.get()
            );
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            return;
        }
        let Some(key) = key else {
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .await;
            return;
        };
        let response = format!(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {}\r\n\r\n",
            derive_accept_key(key.as_bytes())
        );
        if stream.write_all(response.as_bytes()).await.is_err() {
            return;
        }
        let connection = Rc::new(Connection {
            stream,
            pending: RefCell::new(Vec::new()),
            stalled: Notify::new(),
        });
        let mut joined = Vec::new();
        let _ = self.read_frames(&connection, rest, &mut joined).await;
        let mut rooms = self.rooms.borrow_mut();
        for room in joined {
            if let Some(members) = rooms.get_mut(&room) {
                members.retain(|m| !Rc::ptr_eq(m, &connection));
            }
        }
    }

    /// Reads the client's frames until it closes: a `subscribe` joins a
    /// room (`joined`), a close is answered; everything else is dropped.
    async fn read_frames(
        &self,
        connection: &Rc<Connection>,
        mut buffer: Vec<u8>,
        joined: &mut Vec<String>,
    ) -> Result<()> {
        let mut chunk = vec![0u8; 4096];
        loop {
            while let Some((opcode, payload, used)) = parse_client_frame(&buffer)? {
                buffer.drain(..used);
                match opcode {
                    0x1 => {
                        let message: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
                        if message["type"] == "subscribe"
                            && let Some(room) = message["room"].as_str()
                        {
                            let subscribed = format!(
                                "{{\"type\":\"subscribed\",\"room\":{},\"position\":\"{}\"}}",
                                serde_json::Value::from(room),
                                self.position.get()
                            );
                            // Queued before it joins: no change can go first.
                            connection.deliver(&text_frame(subscribed.as_bytes()));
                            self.rooms
                                .borrow_mut()
                                .entry(room.to_owned())
                                .or_default()
                                .push(Rc::clone(connection));
                            joined.push(room.to_owned());
                        }
                    }
                    0x8 => {
                        connection.deliver(&[0x88, 0x00]);
                        connection.flush().await?;
                        return Ok(());
                    }
                    0x9 => {
                        let mut pong = frame_header(0xA, payload.len());
                        pong.extend_from_slice(&payload);
                        connection.deliver(&pong);
                    }
                    _ => {}
                }
            }
            tokio::select! {
                readable = connection.stream.readable() => {
                    readable?;
                    match connection.stream.try_read(&mut chunk) {
                        Ok(0) => return Ok(()),
                        Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                () = connection.stalled.notified() => connection.flush().await?,
            }
        }
    }
}

impl Connection {
    /// One `send()` of the whole frame; what the socket cannot take waits
    /// in `pending` (and so does everything after it, to keep the order).
    fn deliver(&self, frame: &[u8]) {
        let mut pending = self.pending.borrow_mut();
        if !pending.is_empty() {
            pending.extend_from_slice(frame);
            return;
        }
        match self.stream.try_write(frame) {
            Ok(n) if n == frame.len() => {}
            Ok(n) => {
                pending.extend_from_slice(&frame[n..]);
                self.stalled.notify_one();
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                pending.extend_from_slice(frame);
                self.stalled.notify_one();
            }
            // A broken socket: its reader sees it end.
            Err(_) => {}
        }
    }

    /// Writes what is pending, waiting for the socket as needed.
    async fn flush(&self) -> Result<()> {
        loop {
            if self.pending.borrow().is_empty() {
                return Ok(());
            }
            self.stream.writable().await?;
            let mut pending = self.pending.borrow_mut();
            match self.stream.try_write(&pending) {
                Ok(n) => {
                    pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Reads an HTTP request head: its path, its `Sec-WebSocket-Key`, and
/// whatever came after the head.
async fn read_head(stream: &mut TcpStream) -> Result<Option<(String, Option<String>, Vec<u8>)>> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let end = loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        if buffer.len() > MAX_HEAD {
            return Ok(None);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await??;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .split('?')
        .next()
        .unwrap_or("/")
        .to_owned();
    let key = lines.find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_owned())
    });
    Ok(Some((path, key, buffer[end..].to_vec())))
}

/// A server's (unmasked) frame header for `len` bytes of `opcode`, FIN set.
fn frame_header(opcode: u8, len: usize) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len + 10);
    frame.push(0x80 | opcode);
    if len < 126 {
        frame.push(len as u8);
    } else if len <= usize::from(u16::MAX) {
        frame.push(126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame
}

/// A whole text frame, built once per change and room.
fn text_frame(text: &[u8]) -> Vec<u8> {
    let mut frame = frame_header(0x1, text.len());
    frame.extend_from_slice(text);
    frame
}

/// One client frame (masked, unfragmented) from the front of `buffer`: its
/// opcode, unmasked payload and length in the buffer; None until it is whole.
fn parse_client_frame(buffer: &[u8]) -> Result<Option<(u8, Vec<u8>, usize)>> {
    if buffer.len() < 2 {
        return Ok(None);
    }
    let opcode = buffer[0] & 0x0F;
    let masked = buffer[1] & 0x80 != 0;
    let (len, mut at) = match buffer[1] & 0x7F {
        126 if buffer.len() >= 4 => (usize::from(u16::from_be_bytes([buffer[2], buffer[3]])), 4),
        127 if buffer.len() >= 10 => {
            let len = u64::from_be_bytes(buffer[2..10].try_into().expect("8 bytes"));
            (usize::try_from(len).unwrap_or(usize::MAX), 10)
        }
        126 | 127 => return Ok(None),
        len => (usize::from(len), 2),
    };
    if len > MAX_CLIENT_FRAME {
        return Err(anyhow!("fan-out floor: a client frame of {len} bytes"));
    }
    let mask = if masked {
        if buffer.len() < at + 4 {
            return Ok(None);
        }
        at += 4;
        Some([buffer[at - 4], buffer[at - 3], buffer[at - 2], buffer[at - 1]])
    } else {
        None
    };
    if buffer.len() < at + len {
        return Ok(None);
    }
    let mut payload = buffer[at..at + len].to_vec();
    if let Some(mask) = mask {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= mask[i % 4];
        }
    }
    Ok(Some((opcode, payload, at + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_have_the_three_length_forms() {
        assert_eq!(text_frame(b"hi"), [0x81, 2, b'h', b'i']);
        assert_eq!(&text_frame(&[b'x'; 300])[..4], [0x81, 126, 1, 44]);
        assert_eq!(
            &text_frame(&vec![b'x'; 70_000])[..10],
            [0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]
        );
    }

    #[test]
    fn client_frames_are_unmasked_and_wait_until_whole() {
        let mask = [1, 2, 3, 4];
        let text = b"{\"type\":\"subscribe\"}";
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame.extend_from_slice(&[0x88, 0x80, 0, 0, 0, 0]);
        assert_eq!(parse_client_frame(&frame[..5]).unwrap(), None);
        let (opcode, payload, used) = parse_client_frame(&frame).unwrap().unwrap();
        assert_eq!((opcode, payload.as_slice()), (1, &text[..]));
        let (opcode, payload, _) = parse_client_frame(&frame[used..]).unwrap().unwrap();
        assert_eq!((opcode, payload.len()), (8, 0));
    }
}
