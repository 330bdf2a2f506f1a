//! One `/sse` stream: the same messages as a WebSocket's, written by the
//! same send loop (`send.rs`) into a `text/event-stream` body. Each message
//! carrying positions is an event whose `id` is its last position; the
//! stream's rooms share one subscriber that is sent everything in position
//! order across them (`Subscriber::ordered`), so that one id resumes every
//! room (`Last-Event-ID`). Heartbeats are comment lines; a close is a last
//! `{"type":"close","code":..,"reason":..}` event, then the end of the body.
//!
//! What a client that stopped reading holds is what the send loop holds
//! for a WebSocket: its queue (bounded: past it the stream is closed as a
//! slow consumer, the 4008 of a WebSocket), the last write (here, until the
//! body takes it) and a few chunks in the body's channel. A client that does
//! not take even its close within the grace has its TCP connection dropped,
//! so nothing of it stays behind in hyper's buffers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use axum::body::{Body, Bytes};
use axum::extract::ws::Message;
use flate2::write::GzEncoder;
use futures_util::{Sink, Stream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::PollSender;

use super::session::{Session, until};
use super::{CLOSE_LINGER, SLOW_CLOSE_GRACE};
use crate::auth::Identity;
use crate::change::{Position, now_us};
use crate::hub::{CloseKind, CloseReason, Subscriber};
use crate::pipeline::encode::Encoding;
use crate::protocol::{self, ProtocolError};
use crate::slots::{ConnectionAbort, Slot};
use crate::state::{AppState, ConnectionHandle, Liveness};
use crate::telemetry::Counters;

/// Chunks in flight between the send loop and hyper: past them the send
/// loop's flush waits, its queue fills, and a client that does not read is
/// closed as a slow consumer.
const BODY_CHUNKS: usize = 16;
/// A message up to this size is copied into one chunk with its `id:` and
/// `data:` lines; a larger one goes as its own shared bytes between two
/// small chunks (a row of megabytes is not copied per stream).
const COPY_BELOW: usize = 4096;
/// What the browser's `EventSource` waits before it reconnects, ms.
const RETRY_MS: u64 = 1000;

/// What an `/sse` request asked for, checked by the HTTP handler.
pub struct SseRequest {
    pub identity: Identity,
    pub rooms: Vec<String>,
    /// `Last-Event-ID` (or `?since=`): resume every room after it.
    pub since: Option<Position>,
    pub slot: Option<Arc<Slot>>,
    /// Drops the request's TCP connection (None outside the accept loop).
    pub abort: Option<ConnectionAbort>,
    /// The client accepts `Content-Encoding: gzip`: the body is gzip,
    /// flushed after every write so each event arrives when it is sent.
    pub gzip: bool,
}

/// Subscribes the stream's rooms and returns its body, or the refusal (as
/// for a WebSocket `subscribe`: `forbidden`, `invalid_position`, ...).
pub async fn open(state: Arc<AppState>, request: SseRequest) -> Result<Body, ProtocolError> {
    let settings = state.settings();
    let id = state.next_connection_id.fetch_add(1, Ordering::Relaxed);
    let (subscriber, queue) = Subscriber::with_order(id, settings.limits.send_queue_bytes, true);
    let liveness = Arc::new(Liveness::new());
    let mut session = Session::new(
        Arc::clone(&state),
        Arc::clone(&subscriber),
        request.identity,
        Arc::clone(&liveness),
    );
    subscriber.push_control(protocol::welcome_message(
        &format!("{}-{id}", state.instance_id),
        settings.heartbeat.interval.as_millis() as u64,
        Encoding::None.as_str(),
    ));
    session.subscribe_rooms(request.rooms, request.since).await?;
    state.register_connection(
        id,
        ConnectionHandle {
            liveness: Arc::clone(&liveness),
            subscriber: Arc::clone(&subscriber),
        },
    );
    if state.shutdown.is_cancelled() {
        subscriber.close(CloseReason::going_away());
    }
    let (tx, rx) = mpsc::channel::<Bytes>(BODY_CHUNKS);
    let (body_done, body_dropped) = oneshot::channel::<()>();
    let gzip = request.gzip.then(|| {
        GzEncoder::new(
            Vec::new(),
            flate2::Compression::new(settings.pipeline.compression_level.min(9)),
        )
    });
    let mut sink = SseSink {
        tx: PollSender::new(tx),
        waiting: VecDeque::new(),
        gzip,
        // A fresh stream's `subscribed` carries the live position as its
        // id: a reconnect before any change then resumes from there. A
        // resumed one keeps the client's id until the replay moves it.
        subscribed_ids: request.since.is_none(),
        ended: false,
        ended_flushed: false,
        abort: request.abort.clone(),
    };
    let first = sink.encode(format!("retry: {RETRY_MS}\n\n").into_bytes());
    let body = SseBody {
        first,
        rx,
        liveness: Arc::clone(&liveness),
        _done: body_done,
    };
    let slot = request.slot;
    let abort = request.abort;
    let tracked = Arc::clone(&state);
    state.connections.spawn(async move {
        let _slot = slot;
        let state = tracked;
        let counters = &state.telemetry.counters;
        Counters::add(&counters.connections_opened, 1);
        state.active_connections.fetch_add(1, Ordering::AcqRel);
        {
            let mut send = std::pin::pin!(super::send::send_loop(
                sink,
                queue,
                &subscriber,
                &state,
                &liveness,
                Encoding::None
            ));
            tokio::select! {
                () = &mut send => {}
                () = until(session.expires_at()) => {
                    state.refusals.count("token_expired");
                    subscriber.close(CloseReason::new(
                        CloseKind::TokenExpired,
                        "token expired: reconnect with a fresh token",
                    ));
                    (&mut send).await;
                }
            }
        }
        session.leave_all();
        super::ended(&state, &subscriber, id);
        state.active_connections.fetch_sub(1, Ordering::AcqRel);
        Counters::add(&counters.connections_closed, 1);
        // hyper writes what the body still holds, then closes the
        // connection (`connection: close`). A client that has not taken
        // it within the grace is cut off: it resumes with its last id.
        // (One that did not even take its close was cut off already: see
        // `SseSink`'s drop.)
        if let Some(abort) = abort {
            tokio::spawn(async move {
                let _ = tokio::time::timeout(SLOW_CLOSE_GRACE, body_dropped).await;
                tokio::time::sleep(CLOSE_LINGER).await;
                abort.abort();
            });
        }
    });
    Ok(Body::from_stream(body))
}

/// The response body: the chunks the sink hands over, in order. Each one
/// hyper takes counts as hearing from the client (it cannot answer a ping;
/// taking bytes is all it can show).
struct SseBody {
    first: Option<Bytes>,
    rx: mpsc::Receiver<Bytes>,
    liveness: Arc<Liveness>,
    /// Dropped with the body: hyper has taken all of it, or gave up.
    _done: oneshot::Sender<()>,
}

impl Stream for SseBody {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let Some(chunk) = ready!(self.rx.poll_recv(cx)) else {
            return Poll::Ready(None);
        };
        self.liveness.last_heard_us.store(now_us(), Ordering::Relaxed);
        self.liveness.ping_outstanding.store(false, Ordering::Relaxed);
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// The send loop's sink for a stream: messages become events, queued here
/// until a flush hands them to the body (as a WebSocket's frames wait in its
/// write buffer until a flush). Only a flush waits for the body, so the
/// send loop still sees close requests while a client does not read.
struct SseSink {
    tx: PollSender<Bytes>,
    waiting: VecDeque<Bytes>,
    gzip: Option<GzEncoder<Vec<u8>>>,
    subscribed_ids: bool,
    /// A close was written: nothing more is.
    ended: bool,
    /// The close went to the body: the stream ended as it should.
    ended_flushed: bool,
    /// Drops the TCP connection: a sink dropped before its close reached
    /// the body belongs to a client that stopped reading (the send loop
    /// gave up on it), and hyper would hold its socket for ever.
    abort: Option<ConnectionAbort>,
}

impl Drop for SseSink {
    fn drop(&mut self) {
        if !self.ended_flushed
            && let Some(abort) = &self.abort
        {
            abort.abort();
        }
    }
}

fn gone() -> axum::Error {
    axum::Error::new("the client closed the stream")
}

impl SseSink {
    /// `bytes` as they go on the wire: through the gzip encoder (whose
    /// output so far is returned; the rest comes at the next flush).
    fn encode(&mut self, bytes: Vec<u8>) -> Option<Bytes> {
        match &mut self.gzip {
            None => Some(Bytes::from(bytes)),
            Some(encoder) => {
                encoder.write_all(&bytes).expect("compressing into memory cannot fail");
                let out = std::mem::take(encoder.get_mut());
                (!out.is_empty()).then(|| Bytes::from(out))
            }
        }
    }

    fn write_text(&mut self, text: axum::extract::ws::Utf8Bytes) {
        let mut head = String::with_capacity(32);
        if let Some(id) = last_position(text.as_str(), self.subscribed_ids) {
            head.push_str("id: ");
            head.push_str(&id);
            head.push('\n');
        }
        // Our JSON has no raw line breaks: one data line.
        head.push_str("data: ");
        if self.gzip.is_some() || text.len() < COPY_BELOW {
            let mut event = head.into_bytes();
            event.extend_from_slice(text.as_bytes());
            event.extend_from_slice(b"\n\n");
            if let Some(chunk) = self.encode(event) {
                self.waiting.push_back(chunk);
            }
        } else {
            self.waiting.push_back(Bytes::from(head));
            self.waiting.push_back(Bytes::from(text));
            self.waiting.push_back(Bytes::from_static(b"\n\n"));
        }
    }
}

impl Sink<Message> for SseSink {
    type Error = axum::Error;

    fn poll_ready(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        Poll::Ready(if self.tx.is_closed() { Err(gone()) } else { Ok(()) })
    }

    fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), axum::Error> {
        let this = self.get_mut();
        if this.ended {
            return Ok(());
        }
        match message {
            Message::Text(text) => this.write_text(text),
            Message::Ping(_) => {
                // A comment keeps proxies from timing the stream out. One
                // the body cannot take at once is not needed: it is busy.
                let room = this.tx.get_ref().map_or(0, |tx| tx.capacity());
                if this.waiting.is_empty() && room > 0 {
                    if let Some(chunk) = this.encode(b": heartbeat\n\n".to_vec()) {
                        this.waiting.push_back(chunk);
                    }
                }
            }
            Message::Close(frame) => {
                this.ended = true;
                let (code, reason) = frame.map_or((1000, String::new()), |f| (f.code, f.reason.to_string()));
                let close = serde_json::json!({"type": "close", "code": code, "reason": reason});
                let mut last = this.encode(format!("data: {close}\n\n").into_bytes());
                if let Some(mut encoder) = this.gzip.take() {
                    encoder.try_finish().expect("compressing into memory cannot fail");
                    let rest = std::mem::take(encoder.get_mut());
                    last = Some(Bytes::from([last.as_deref().unwrap_or_default(), &rest].concat()));
                }
                if let Some(chunk) = last {
                    this.waiting.push_back(chunk);
                }
            }
            // Binary frames are never sent to an uncompressed stream; pongs
            // are not ours to send.
            _ => {}
        }
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        let this = self.get_mut();
        if let Some(encoder) = &mut this.gzip {
            // A sync flush: everything written so far can be decoded by
            // the client now (a few bytes' cost per flush).
            encoder.flush().expect("compressing into memory cannot fail");
            let out = std::mem::take(encoder.get_mut());
            if !out.is_empty() {
                this.waiting.push_back(Bytes::from(out));
            }
        }
        while !this.waiting.is_empty() {
            ready!(this.tx.poll_reserve(cx)).map_err(|_| gone())?;
            let chunk = this.waiting.pop_front().expect("not empty");
            this.tx.send_item(chunk).map_err(|_| gone())?;
        }
        if this.ended {
            this.ended_flushed = true;
            this.tx.close();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), axum::Error>> {
        ready!(self.as_mut().poll_flush(cx))?;
        self.get_mut().tx.close();
        Poll::Ready(Ok(()))
    }
}

/// The id of a message: its (last) position, for a `change`, `event`,
/// `reset` or `batch`; for `subscribed` only when `subscribed_ids`.
fn last_position(text: &str, subscribed_ids: bool) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Item {
        position: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(rename = "type")]
        kind: Option<String>,
        position: Option<String>,
        changes: Option<Vec<Item>>,
    }
    let head: Head = serde_json::from_str(text).ok()?;
    match head.kind.as_deref()? {
        "change" | "event" | "reset" => head.position,
        "subscribed" if subscribed_ids => head.position,
        "batch" => head.changes?.into_iter().filter_map(|c| c.position).next_back(),
        _ => None,
    }
}

/// Whether an `Accept-Encoding` header value accepts gzip (`gzip`, or `*`,
/// with a quality above zero).
pub fn accepts_gzip(accept_encoding: &str) -> bool {
    let mut star = false;
    for item in accept_encoding.split(',') {
        let mut parts = item.split(';');
        let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let quality = parts
            .find_map(|p| {
                p.trim()
                    .strip_prefix("q=")
                    .map(|q| q.trim().parse::<f32>().unwrap_or(0.0))
            })
            .unwrap_or(1.0);
        match coding.as_str() {
            "gzip" | "x-gzip" => return quality > 0.0,
            "*" => star = quality > 0.0,
            _ => {}
        }
    }
    star
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_last_position_of_what_carries_positions() {
        assert_eq!(
            last_position(
                r#"{"type":"change","room":"a","position":"7","row":{"position":"x"}}"#,
                false
            )
            .as_deref(),
            Some("7")
        );
        let batch = r#"{"type":"batch","changes":[{"type":"change","position":"8","row":{}},{"type":"event","position":"9","payload":{"position":"no"}}]}"#;
        assert_eq!(last_position(batch, false).as_deref(), Some("9"));
        assert_eq!(
            last_position(r#"{"type":"subscribed","room":"a","position":"5"}"#, false),
            None
        );
        assert_eq!(
            last_position(r#"{"type":"subscribed","room":"a","position":"5"}"#, true).as_deref(),
            Some("5")
        );
        assert_eq!(last_position(r#"{"type":"welcome","connection_id":"x"}"#, true), None);
        assert_eq!(
            last_position(
                r#"{"type":"reset","room":"a","reason":"truncated","position":"6"}"#,
                false
            )
            .as_deref(),
            Some("6")
        );
    }

    #[test]
    fn gzip_is_used_only_when_the_client_accepts_it() {
        assert!(accepts_gzip("gzip, deflate, br"));
        assert!(accepts_gzip("br;q=1.0, gzip;q=0.8"));
        assert!(accepts_gzip("*"));
        assert!(!accepts_gzip("gzip;q=0"));
        assert!(!accepts_gzip("gzip;q=0, *"), "an explicit refusal wins over *");
        assert!(!accepts_gzip("br, identity"));
        assert!(!accepts_gzip(""));
    }

    fn sink(gzip: bool) -> (SseSink, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(BODY_CHUNKS);
        let sink = SseSink {
            tx: PollSender::new(tx),
            waiting: VecDeque::new(),
            gzip: gzip.then(|| GzEncoder::new(Vec::new(), flate2::Compression::new(6))),
            subscribed_ids: false,
            ended: false,
            ended_flushed: false,
            abort: None,
        };
        (sink, rx)
    }

    fn change(position: u32, size: usize) -> Message {
        Message::Text(
            format!(
                r#"{{"type":"change","room":"a","position":"{position}","row":{{"x":"{}"}}}}"#,
                "r".repeat(size)
            )
            .into(),
        )
    }

    #[tokio::test]
    async fn only_a_flush_waits_for_the_body_and_the_close_ends_it() {
        use futures_util::SinkExt;
        let (mut sink, mut rx) = sink(false);
        // The body takes nothing: writes never wait (the send loop must
        // see close requests), a flush does.
        for position in 1..=40 {
            sink.feed(change(position, 5000)).await.unwrap();
        }
        assert!(futures_util::poll!(sink.flush()).is_pending());
        sink.feed(Message::Close(Some(axum::extract::ws::CloseFrame {
            code: 4008,
            reason: "slow consumer".into(),
        })))
        .await
        .unwrap();
        sink.feed(change(41, 10)).await.unwrap();
        let flushing = tokio::spawn(async move { sink.flush().await });
        let mut text = String::new();
        while let Some(chunk) = rx.recv().await {
            text.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        flushing.await.unwrap().unwrap();
        let ids: Vec<u32> = text
            .lines()
            .filter_map(|l| l.strip_prefix("id: ")?.parse().ok())
            .collect();
        assert_eq!(ids, (1..=40).collect::<Vec<_>>(), "in order, nothing after the close");
        assert!(text.ends_with("data: {\"code\":4008,\"reason\":\"slow consumer\",\"type\":\"close\"}\n\n"));
    }

    #[tokio::test]
    async fn a_gzip_stream_can_be_decoded_after_every_flush() {
        use futures_util::SinkExt;
        let (mut sink, mut rx) = sink(true);
        let mut decoder = flate2::write::GzDecoder::new(Vec::new());
        for position in 1..=3 {
            sink.send(change(position, 3000)).await.unwrap();
            while let Ok(chunk) = rx.try_recv() {
                decoder.write_all(&chunk).unwrap();
            }
            decoder.flush().unwrap();
            let decoded = String::from_utf8(decoder.get_ref().clone()).unwrap();
            assert!(decoded.ends_with("\"}}\n\n"), "event {position} whole after its flush");
            assert!(decoded.contains(&format!("id: {position}\n")));
        }
        sink.send(Message::Close(None)).await.unwrap();
        while let Ok(chunk) = rx.try_recv() {
            decoder.write_all(&chunk).unwrap();
        }
        let all = String::from_utf8(decoder.finish().unwrap()).unwrap();
        assert!(
            all.ends_with("\"type\":\"close\"}\n\n"),
            "and the gzip stream ends properly"
        );
    }
}
