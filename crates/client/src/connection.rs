//! The client's one task: connect (asking for a token first), run the
//! connection until it ends, and reconnect with full-jitter backoff, at
//! once after 1001, 4001 and 4008. Frames go through [`Rooms`] in arrival
//! order; timers here: the heartbeat (`ping` after a silent interval, a dead
//! connection given up after another), the welcome deadline, the in-band
//! token refresh, and refused subscribes' retries.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::client::Options;
use crate::frames::{self, Encoding};
use crate::rooms::{Out, Rooms};
use crate::token::{TokenError, refresh_delay};
use crate::update::{Position, Update};
use crate::{Backoff, ClientEvent, Stats};

/// A connection counts as healthy (the backoff starts over) once it
/// delivered a change, or stayed up this long.
const HEALTHY_AFTER: Duration = Duration::from_secs(5);
/// Used until `welcome` says otherwise (the gateway's default).
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(25);
/// When a timer fires this late, the machine probably slept: the socket is
/// suspect, and the ping after it gets a short deadline.
const LATE_TIMER: Duration = Duration::from_secs(3);
const SUSPECT_PONG_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a token refresh waits after a refused or failed one.
const REFRESH_RETRY: Duration = Duration::from_secs(1);
/// How long a close waits for the gateway's half of the handshake.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Closes after which the first reconnect goes at once: the gateway asked
/// us to come back (1001 shutdown, 4008 slow consumer) or the token ran out
/// (4001: a fresh token is asked for first).
const RECONNECT_AT_ONCE: [u16; 3] = [1001, 4001, 4008];

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the application asks of the task.
pub(crate) enum Command {
    Subscribe {
        room: String,
        since: Option<Position>,
        tx: mpsc::Sender<Update>,
    },
    Unsubscribe {
        room: String,
    },
    /// Leave the current connection and resume on the next URL at once.
    Reconnect,
}

/// How one connection ended.
enum End {
    /// Closed or broken; `code` is the close code (`None`: no close frame).
    Lost { code: Option<u16>, reason: String },
    /// A write failed: the gateway may have closed first (4008 while we
    /// were held back), its close frame still unread.
    SendFailed { reason: String },
    /// [`Command::Reconnect`].
    Asked,
    /// `close()`, or every handle dropped.
    Stopped,
}

pub(crate) struct Task {
    pub(crate) options: Options,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) events: broadcast::Sender<ClientEvent>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) stop: CancellationToken,
}

impl Task {
    pub(crate) async fn run(mut self) {
        let mut rooms = Rooms::new(Arc::clone(&self.stats));
        let mut backoff =
            Backoff::new(self.options.min_delay, self.options.max_delay, HEALTHY_AFTER).with_full_jitter();
        let mut attempt: u32 = 0;
        let mut url_index = 0usize;
        loop {
            let url = self.options.urls[url_index % self.options.urls.len()].clone();
            url_index += 1;
            self.emit(ClientEvent::Connecting {
                attempt,
                url: url.clone(),
            });
            let started = Instant::now();
            let end = match self.open(&url, &mut rooms).await {
                Ok(Some((ws, token))) => {
                    Stats::add(&self.stats.connections, 1);
                    let end = Connection::new(&mut self, &mut rooms, url, token).run(ws).await;
                    let healthy = rooms.delivered() > 0 || started.elapsed() >= HEALTHY_AFTER;
                    rooms.connection_ended();
                    if healthy {
                        attempt = 0;
                        backoff.reset();
                    }
                    end
                }
                Ok(None) => End::Stopped,
                Err(reason) => End::Lost { code: None, reason },
            };
            let (code, reason) = match end {
                End::Stopped => break,
                End::Asked => {
                    attempt = 0;
                    backoff.reset();
                    self.emit(ClientEvent::Disconnected {
                        code: None,
                        reason: "moving to the next gateway".into(),
                        reconnect_in: Some(Duration::ZERO),
                    });
                    continue;
                }
                End::Lost { code, reason } => (code, reason),
                End::SendFailed { reason } => (None, reason),
            };
            let at_once = attempt == 0 && code.is_some_and(|c| RECONNECT_AT_ONCE.contains(&c));
            let delay = if at_once {
                Duration::ZERO
            } else {
                backoff.next_delay(Instant::now())
            };
            attempt += 1;
            self.emit(ClientEvent::Disconnected {
                code,
                reason,
                reconnect_in: Some(delay),
            });
            if !self.wait(delay, &mut rooms).await {
                break;
            }
        }
        self.emit(ClientEvent::Disconnected {
            code: Some(1000),
            reason: "closed by the application".into(),
            reconnect_in: None,
        });
    }

    fn emit(&self, event: ClientEvent) {
        // Nobody listening is fine.
        let _ = self.events.send(event);
    }

    /// Applies a command that needs no connection; false: stop.
    fn apply_offline(&self, command: Option<Command>, rooms: &mut Rooms) -> bool {
        match command {
            None => false,
            Some(Command::Subscribe { room, since, tx }) => {
                rooms.subscribe(room, since, tx);
                true
            }
            Some(Command::Unsubscribe { room }) => {
                rooms.unsubscribe(&room);
                true
            }
            Some(Command::Reconnect) => true,
        }
    }

    /// Sleeps `delay`, taking commands; false: stop. A reconnect request
    /// cuts it short.
    async fn wait(&mut self, delay: Duration, rooms: &mut Rooms) -> bool {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return false,
                () = sleep_until(until) => return true,
                command = self.commands.recv() => {
                    let reconnect = matches!(command, Some(Command::Reconnect));
                    if !self.apply_offline(command, rooms) {
                        return false;
                    }
                    if reconnect {
                        return true;
                    }
                }
            }
        }
    }

    /// Asks for a token and opens the socket, taking commands meanwhile.
    /// `Ok(None)`: stop.
    async fn open(&mut self, url: &str, rooms: &mut Rooms) -> Result<Option<(Socket, Option<String>)>, String> {
        let token = self.options.token.clone();
        let connect_timeout = self.options.connect_timeout;
        let encoding = self.options.encoding;
        let url = url.to_owned();
        let attempt = async move {
            let token = token
                .get()
                .await
                .map_err(|e: TokenError| format!("the token function failed: {e}"))?;
            let request = connect_request(&url, token.as_deref(), encoding)?;
            match tokio::time::timeout(connect_timeout, tokio_tungstenite::connect_async(request)).await {
                Ok(Ok((ws, _))) => Ok((ws, token)),
                Ok(Err(error)) => Err(describe_connect_error(error)),
                Err(_) => Err(format!("no connection within {connect_timeout:?}")),
            }
        };
        tokio::pin!(attempt);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return Ok(None),
                result = &mut attempt => return result.map(Some),
                command = self.commands.recv() => {
                    if !self.apply_offline(command, rooms) {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// The upgrade request: the token as `Authorization: Bearer` (kept out of
/// URLs, which proxies log), the encoding as `?encoding=`.
fn connect_request(
    url: &str,
    token: Option<&str>,
    encoding: Encoding,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    let url = match encoding.query() {
        Some(name) => format!("{url}{}encoding={name}", if url.contains('?') { '&' } else { '?' }),
        None => url.to_owned(),
    };
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad gateway URL {url:?}: {e}"))?;
    // An empty token is none (a gateway with GATEWAY_AUTH=none).
    if let Some(token) = token.filter(|t| !t.is_empty()) {
        let value = HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the token holds characters a header cannot carry".to_owned())?;
        request.headers_mut().insert("authorization", value);
    }
    Ok(request)
}

/// A refused upgrade says its HTTP status and the gateway's reason.
fn describe_connect_error(error: tokio_tungstenite::tungstenite::Error) -> String {
    use tokio_tungstenite::tungstenite::Error;
    match error {
        Error::Http(response) => {
            let body = response
                .body()
                .as_deref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default();
            format!("upgrade refused: HTTP {} {body}", response.status().as_u16())
        }
        other => other.to_string(),
    }
}

/// After a failed write, what the gateway said last: a close frame it sent
/// before the socket broke (a 4008 that came while the application held us
/// back, whose reconnect goes at once) is still in the receive buffer.
/// Frames before it are dropped: the resume asks for them again.
async fn close_after_failed_send(ws: &mut Socket, reason: String) -> End {
    let read_close = async {
        while let Some(frame) = ws.next().await {
            match frame {
                Ok(Message::Close(Some(frame))) => return Some((u16::from(frame.code), frame.reason.to_string())),
                Ok(Message::Close(None)) => return Some((1005, String::new())),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    };
    match tokio::time::timeout(CLOSE_GRACE, read_close).await {
        Ok(Some((code, close_reason))) => End::Lost {
            code: Some(code),
            reason: close_reason,
        },
        _ => End::Lost { code: None, reason },
    }
}

/// One connection's timers and state beside [`Rooms`].
struct Connection<'a> {
    task: &'a mut Task,
    rooms: &'a mut Rooms,
    url: String,
    /// The token this connection was opened (or last refreshed) with.
    token: Option<String>,
    welcomed: bool,
    heartbeat: Duration,
    encoding: Encoding,
    last_heard: Instant,
    /// When the outstanding ping went, and how long its answer may take.
    ping: Option<(Instant, Duration)>,
    pings: u64,
    /// When the heartbeat (or, before `welcome`, the welcome deadline) is due.
    heartbeat_due: Instant,
    refresh_due: Option<Instant>,
    /// A token refresh in progress (asked off the connection's path).
    refreshing: Option<JoinHandle<Result<Option<String>, TokenError>>>,
    /// Refused subscribes to send again, and when.
    retries: Vec<(Instant, String)>,
}

impl<'a> Connection<'a> {
    fn new(task: &'a mut Task, rooms: &'a mut Rooms, url: String, token: Option<String>) -> Connection<'a> {
        let now = Instant::now();
        let encoding = task.options.encoding;
        let welcome_timeout = task.options.welcome_timeout;
        Connection {
            task,
            rooms,
            url,
            token,
            welcomed: false,
            heartbeat: DEFAULT_HEARTBEAT,
            encoding,
            last_heard: now,
            ping: None,
            pings: 0,
            heartbeat_due: now + welcome_timeout,
            refresh_due: None,
            refreshing: None,
            retries: Vec::new(),
        }
    }

    async fn run(mut self, mut ws: Socket) -> End {
        let mut end = self.serve(&mut ws).await;
        if let End::SendFailed { reason } = end {
            end = close_after_failed_send(&mut ws, reason).await;
        }
        if let Some(refreshing) = self.refreshing.take() {
            refreshing.abort();
        }
        let goodbye = CloseFrame {
            code: CloseCode::Normal,
            reason: Utf8Bytes::from_static("client: reconnecting"),
        };
        match &end {
            // The gateway closed; tungstenite has answered its close frame.
            // Read until the socket is done, briefly.
            End::Lost { code: Some(_), .. } => {
                let _ = tokio::time::timeout(CLOSE_GRACE, async { while ws.next().await.is_some() {} }).await;
            }
            // Broken, or judged dead: no waiting for a handshake.
            End::Lost { code: None, .. } | End::SendFailed { .. } => {
                let _ = futures_util::FutureExt::now_or_never(ws.close(Some(goodbye)));
            }
            End::Asked | End::Stopped => {
                let _ = tokio::time::timeout(CLOSE_GRACE, async {
                    let _ = ws.close(Some(goodbye)).await;
                    while ws.next().await.is_some() {}
                })
                .await;
            }
        }
        end
    }

    /// The connection's loop: commands first (rare; close must not wait),
    /// then frames, then timers.
    async fn serve(&mut self, ws: &mut Socket) -> End {
        loop {
            let next_timer = self.next_timer();
            let refreshing = &mut self.refreshing;
            let outs = tokio::select! {
                biased;
                () = self.task.stop.cancelled() => return End::Stopped,
                command = self.task.commands.recv() => match command {
                    None => return End::Stopped,
                    Some(Command::Reconnect) => return End::Asked,
                    Some(Command::Subscribe { room, since, tx }) => self.rooms.subscribe(room, since, tx),
                    Some(Command::Unsubscribe { room }) => self.rooms.unsubscribe(&room),
                },
                frame = ws.next() => {
                    self.last_heard = Instant::now();
                    match frame {
                        Some(Ok(Message::Text(text))) => self.rooms.on_text(&text, self.last_heard, SystemTime::now()),
                        Some(Ok(Message::Binary(bytes))) => match frames::decode(&bytes, self.encoding) {
                            Ok(text) => self.rooms.on_text(&text, self.last_heard, SystemTime::now()),
                            Err(reason) => vec![Out::Abort(reason)],
                        },
                        Some(Ok(Message::Close(frame))) => {
                            let (code, reason) = frame.map_or((None, String::new()), |f| (Some(u16::from(f.code)), f.reason.to_string()));
                            return End::Lost { code: code.or(Some(1005)), reason };
                        }
                        // Ping frames are answered by tungstenite as we read.
                        Some(Ok(_)) => Vec::new(),
                        Some(Err(error)) => return End::Lost { code: None, reason: error.to_string() },
                        None => return End::Lost { code: None, reason: "the connection ended".into() },
                    }
                }
                token = async { refreshing.as_mut().expect("guarded").await }, if refreshing.is_some() => {
                    self.refreshing = None;
                    self.refreshed(token.unwrap_or_else(|e| Err(e.to_string().into())), ws).await;
                    Vec::new()
                }
                () = sleep_until(next_timer) => match self.on_timer(ws).await {
                    Ok(outs) => outs,
                    Err(end) => return end,
                },
            };
            for out in outs {
                if let Err(end) = self.carry_out(out, ws).await {
                    return end;
                }
            }
        }
    }

    fn next_timer(&self) -> Instant {
        let mut due = self.heartbeat_due;
        if let Some(refresh) = self.refresh_due {
            due = due.min(refresh);
        }
        for (at, _) in &self.retries {
            due = due.min(*at);
        }
        due
    }

    async fn send(&self, ws: &mut Socket, text: String) -> Result<(), End> {
        ws.send(Message::text(text)).await.map_err(|e| End::SendFailed {
            reason: format!("send failed: {e}"),
        })
    }

    async fn carry_out(&mut self, out: Out, ws: &mut Socket) -> Result<(), End> {
        match out {
            Out::Send(text) => self.send(ws, text).await?,
            Out::Deliver(tx, update) => {
                // A full subscription holds the connection back (the
                // gateway then sees a slow consumer; we resume). One that
                // was dropped is being unsubscribed.
                tokio::select! {
                    _ = tx.send(update) => {}
                    () = self.task.stop.cancelled() => return Err(End::Stopped),
                }
            }
            Out::Welcomed {
                connection_id,
                heartbeat,
                encoding,
            } => {
                self.welcomed = true;
                if let Some(heartbeat) = heartbeat {
                    self.heartbeat = heartbeat;
                }
                if let Some(encoding) = encoding.as_deref().and_then(Encoding::from_welcome) {
                    self.encoding = encoding;
                }
                self.heartbeat_due = Instant::now() + self.heartbeat;
                self.schedule_refresh();
                self.task.emit(ClientEvent::Connected {
                    connection_id,
                    url: self.url.clone(),
                });
            }
            Out::RetrySubscribe { room, attempt } => {
                let mut backoff = Backoff::new(self.task.options.min_delay, self.task.options.max_delay, Duration::MAX)
                    .with_full_jitter();
                let mut delay = Duration::ZERO;
                for _ in 0..attempt.min(16) {
                    delay = backoff.next_delay(Instant::now());
                }
                self.retries.push((Instant::now() + delay, room));
            }
            Out::Authenticated => self.schedule_refresh(),
            Out::RefreshSoon => {
                if self.task.options.token.refreshable() {
                    self.refresh_due = Some(Instant::now() + REFRESH_RETRY);
                }
            }
            Out::PingDropped => {
                self.ping = None;
                self.heartbeat_due = Instant::now() + self.heartbeat;
            }
            Out::ClientError { code, message } => self.task.emit(ClientEvent::Error { code, message }),
            Out::Abort(reason) => return Err(End::Lost { code: None, reason }),
        }
        Ok(())
    }

    /// Arms the in-band refresh before the current token's `exp`.
    fn schedule_refresh(&mut self) {
        self.refresh_due = None;
        if !self.task.options.token.refreshable() {
            return; // a fixed token cannot be refreshed
        }
        if let Some(delay) = self.token.as_deref().and_then(|t| refresh_delay(t, SystemTime::now())) {
            self.refresh_due = Some(Instant::now() + delay);
        }
    }

    async fn refreshed(&mut self, token: Result<Option<String>, TokenError>, ws: &mut Socket) {
        match token {
            Ok(Some(token)) => {
                self.token = Some(token.clone());
                let auth = serde_json::json!({"type": "auth", "token": token}).to_string();
                if ws.send(Message::text(auth)).await.is_ok() {
                    Stats::add(&self.task.stats.token_refreshes, 1);
                }
                // The next refresh is armed by `authenticated`.
            }
            Ok(None) => {}
            Err(error) => {
                self.task.emit(ClientEvent::Error {
                    code: "token_refresh_failed".into(),
                    message: format!("the token function failed: {error}"),
                });
                self.refresh_due = Some(Instant::now() + REFRESH_RETRY);
            }
        }
    }

    /// Whichever timers are due. `Err`: the connection is dead.
    async fn on_timer(&mut self, ws: &mut Socket) -> Result<Vec<Out>, End> {
        let now = Instant::now();
        let mut outs = Vec::new();
        if self.refresh_due.is_some_and(|at| at <= now) {
            self.refresh_due = None;
            if self.refreshing.is_none() {
                let token = self.task.options.token.clone();
                self.refreshing = Some(tokio::spawn(async move { token.get().await }));
            }
        }
        let mut due = Vec::new();
        self.retries.retain(|(at, room)| {
            if *at <= now {
                due.push(room.clone());
                false
            } else {
                true
            }
        });
        for room in due {
            outs.extend(self.rooms.retry(&room));
        }
        if self.heartbeat_due <= now {
            self.heartbeat(now, ws).await?;
        }
        Ok(outs)
    }

    /// After a heartbeat interval without a frame, a `ping`; no frame within
    /// another interval, and the connection is presumed dead.
    async fn heartbeat(&mut self, now: Instant, ws: &mut Socket) -> Result<(), End> {
        let dead = |reason: String| End::Lost { code: None, reason };
        if !self.welcomed {
            return Err(dead(format!(
                "no welcome from the gateway within {:?}",
                self.task.options.welcome_timeout
            )));
        }
        let slept = now.duration_since(self.heartbeat_due) > LATE_TIMER;
        if let Some((sent, timeout)) = self.ping {
            if self.last_heard >= sent {
                self.ping = None;
            } else if now.duration_since(sent) >= timeout {
                return Err(dead(format!(
                    "no frame for {:?}, not even a pong: connection presumed dead",
                    now.duration_since(self.last_heard)
                )));
            } else {
                self.heartbeat_due = sent + timeout;
                return Ok(());
            }
        }
        let silent = now.duration_since(self.last_heard);
        if silent >= self.heartbeat || slept {
            let timeout = if slept {
                self.heartbeat.min(SUSPECT_PONG_TIMEOUT)
            } else {
                self.heartbeat
            };
            self.pings += 1;
            let ping = serde_json::json!({"type": "ping", "id": self.pings.to_string()}).to_string();
            self.send(ws, ping).await?;
            Stats::add(&self.task.stats.pings, 1);
            self.ping = Some((now, timeout));
            self.heartbeat_due = now + timeout;
        } else {
            self.heartbeat_due = self.last_heard + self.heartbeat;
        }
        Ok(())
    }
}
