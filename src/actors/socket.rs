//! A native socket's two directions, without a task or a channel of their own: the outbound
//! queue a [`Session`](super::session::Session) pushes frames into, which the connection's HTTP
//! dispatcher drains as the upgrade's response body ([`OutBody`]), and the inbound stream of
//! WebSocket messages ([`InStream`]) decoded from the request's bytes.
//!
//! Why not `actix_ws::handle`: it puts a 32-slot channel between its `Session` handle and the
//! response body, so parley needed a writer task moving frames from its own bounded queue into
//! that channel: per idle socket a task, two channels (each allocating a 32-slot block up front)
//! and three small allocations, ~4.5 KiB of the ~12.8 KiB an idle socket held (heaptrack,
//! BENCHMARKS.md, issue 11 tenth round). Here the body takes frames straight from the queue and
//! encodes them with actix-http's RFC 6455 codec (`actix_http::ws::Codec`, the one actix-ws
//! uses), so a frame is one push and one wake of the dispatcher's task. The XMPP-over-WebSocket
//! front end (`xmpp/ws.rs`) still uses actix-ws.
//!
//! Bounds are the same as before: the queue holds at most `frames` frames, and the session also
//! counts their bytes ([`OutQueue::queued_bytes`]); the dispatcher polls the body only while its
//! write buffer holds less than 32 KiB, so a reader that does not read leaves the frames here,
//! where the session sees them as a slow consumer.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use actix_http::ws::{CloseCode, CloseReason, Codec, Frame, Message, ProtocolError};
use actix_web::error::PayloadError;
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use parking_lot::Mutex;
use tokio::sync::Notify;
use actix_codec::{Decoder as _, Encoder as _};

use crate::protocol::Encoded;

/// What the body writes on the socket, in queue order.
pub enum Outbound {
    /// A protocol frame.
    Frame(Encoded),
    /// Answer a ping.
    Pong(Bytes),
    /// Our heartbeat.
    Ping,
    /// Close in order, after the frames queued before it.
    Close(u16, String),
}

/// Why a push was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds its `frames` already.
    Full,
    /// The socket is closing or gone: nothing more will be written.
    Closed,
}

/// The queue both ends share.
struct Queue {
    frames: VecDeque<Outbound>,
    /// Most frames queued at once.
    cap: usize,
    /// Bytes of the queued `Frame`s (payload bytes, as [`Encoded::len`]).
    bytes: usize,
    /// An urgent close: the body writes it before anything queued, which it drops.
    urgent: Option<(u16, String)>,
    /// A close is queued or urgent, or the session's end was dropped: no more pushes.
    closing: bool,
    /// The session's end was dropped: a close frame (no reason) follows what is queued.
    session_gone: bool,
    /// The body has encoded its close frame, its last.
    close_taken: bool,
    /// The body ended or was dropped with its connection.
    body_done: bool,
    /// The body was dropped (its connection is gone).
    body_gone: bool,
    /// The body's task, waiting for a frame.
    waker: Option<Waker>,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Notified when the body takes frames: there may be room now.
    room: Notify,
    /// Notified once the body is done (it wrote its close frame and ended, or was dropped).
    done: Notify,
}

/// Put into each TCP connection's data by `on_connect` and dropped with the connection's HTTP
/// dispatcher, which owns the descriptor: while it lives, the descriptor is this connection's.
pub struct ConnGuard {
    fd: std::os::fd::RawFd,
    open: Arc<AtomicBool>,
}

impl ConnGuard {
    /// The guard of the connection on descriptor `fd`.
    pub fn new(fd: std::os::fd::RawFd) -> Self {
        ConnGuard { fd, open: Arc::new(AtomicBool::new(true)) }
    }

    /// A handle that can abort the connection while it is still open.
    pub fn handle(&self) -> ConnFd {
        ConnFd { fd: self.fd, open: self.open.clone() }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.open.store(false, Ordering::Release);
    }
}

/// The connection's socket descriptor, so that a socket whose session has ended can be forced
/// down when its peer never reads again: otherwise actix keeps trying to write its buffered
/// bytes (a close frame, what was queued) forever, and the connection, its kernel send buffer and
/// its dispatcher stay.
///
/// Only the number is kept (a duplicate would double the descriptors per connection). It is used
/// only while provably still this connection's: [`ConnFd::abort_if_open`] runs on the
/// connection's own single-threaded worker (sessions and dispatchers of a worker share its
/// thread) and checks the flag that the connection's [`ConnGuard`] clears when the dispatcher is
/// dropped; nothing else runs on the thread between that check and the abort, and a dropped
/// dispatcher has cleared the flag before the thread runs anything else.
#[derive(Debug, Clone)]
pub struct ConnFd {
    fd: std::os::fd::RawFd,
    open: Arc<AtomicBool>,
}

impl ConnFd {
    /// Whether the connection's dispatcher still runs.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Aborts the connection if it is still open: `SO_LINGER` 0 (the last close sends RST and
    /// frees the buffers at once, instead of an orphan socket waiting on a peer that never
    /// reads), then `shutdown(SHUT_RDWR)` so actix's next read or write fails and it drops the
    /// connection. Must run on the connection's worker thread (see the type's docs).
    pub fn abort_if_open(&self) -> bool {
        if !self.is_open() {
            return false;
        }
        let fd = self.fd;
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: setsockopt/shutdown on a descriptor this connection owns (checked just above,
        // on the connection's own thread), with a correctly sized option value.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            );
            libc::shutdown(fd, libc::SHUT_RDWR);
        }
        true
    }
}

/// The session's end of the outbound queue. Dropping it (the session ended) closes the socket
/// after what is queued, and aborts the connection if it is still open `close_wait` later.
pub struct OutQueue {
    inner: Arc<Inner>,
    /// The socket, to force it down once the session has ended.
    conn: Option<ConnFd>,
    /// How long a connection may outlive its session before it is aborted.
    close_wait: Duration,
}

/// The upgrade's response body: the queue's frames, encoded as RFC 6455 server frames.
pub struct OutBody {
    inner: Arc<Inner>,
    codec: Codec,
}

/// Largest chunk the body hands the dispatcher at once, in bytes (more frames wait in the queue).
const CHUNK_BYTES: usize = 64 * 1024;

/// A queue of at most `frames` frames for the connection `conn`, and the body that drains it; a
/// connection still open `close_wait` after its session ended is aborted.
pub fn outbound(frames: usize, conn: Option<ConnFd>, close_wait: Duration) -> (OutQueue, OutBody) {
    let inner = Arc::new(Inner {
        queue: Mutex::new(Queue {
            frames: VecDeque::new(),
            cap: frames.max(1),
            bytes: 0,
            urgent: None,
            closing: false,
            session_gone: false,
            close_taken: false,
            body_done: false,
            body_gone: false,
            waker: None,
        }),
        room: Notify::new(),
        done: Notify::new(),
    });
    (OutQueue { inner: inner.clone(), conn, close_wait }, OutBody { inner, codec: Codec::new() })
}

impl OutQueue {
    /// Queues `o` after everything queued; a `Close` is the last thing accepted.
    pub fn push(&self, o: Outbound) -> Result<(), PushError> {
        let waker = {
            let mut q = self.inner.queue.lock();
            if q.closing || q.body_gone {
                return Err(PushError::Closed);
            }
            if q.frames.len() >= q.cap {
                return Err(PushError::Full);
            }
            match &o {
                Outbound::Frame(e) => q.bytes += e.len(),
                Outbound::Close(..) => q.closing = true,
                Outbound::Pong(_) | Outbound::Ping => {}
            }
            q.frames.push_back(o);
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }

    /// Frames that fit now.
    pub fn free(&self) -> usize {
        let q = self.inner.queue.lock();
        q.cap.saturating_sub(q.frames.len())
    }

    /// Bytes of frames queued and not yet taken by the body.
    pub fn queued_bytes(&self) -> usize {
        self.inner.queue.lock().bytes
    }

    /// Resolves when the body may have taken frames (a permit is kept if nobody waits yet).
    pub fn room(&self) -> impl std::future::Future<Output = ()> + 'static {
        let inner = self.inner.clone();
        async move { inner.room.notified().await }
    }

    /// Resolves when the body is done: its close frame is handed to the connection and the body
    /// ended, or the connection is gone.
    pub fn done(&self) -> impl std::future::Future<Output = ()> + 'static {
        let inner = self.inner.clone();
        async move {
            loop {
                let n = inner.done.notified();
                if inner.queue.lock().body_done {
                    return;
                }
                n.await;
            }
        }
    }

    /// Closes at once with `code`: the body drops what is queued and writes the close frame
    /// next. (A peer that never reads it is aborted once the session has ended: see
    /// [`OutQueue`].)
    pub fn close_urgent(&self, code: u16, reason: &str) {
        let waker = {
            let mut q = self.inner.queue.lock();
            if q.body_gone || q.close_taken {
                return;
            }
            q.urgent = Some((code, reason.to_owned()));
            q.closing = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Drop for OutQueue {
    fn drop(&mut self) {
        let waker = {
            let mut q = self.inner.queue.lock();
            q.session_gone = true;
            q.closing = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        // The session has ended, whichever way (a close it sent, the peer's close frame or end
        // of input, a slow consumer, a shutdown): nothing more is wanted from the connection. A
        // peer that reads closes it within `close_wait`; one that does not is cut off then.
        if let Some(fd) = self.conn.take() {
            let wait = self.close_wait;
            actix_rt::spawn(async move {
                tokio::time::sleep(wait).await;
                if fd.abort_if_open() {
                    metrics::counter!("parley_connections_aborted_total").increment(1);
                    tracing::info!("connection still open {} ms after its session ended: aborted", wait.as_millis());
                }
            });
        }
    }
}

impl OutBody {
    fn encode(&mut self, m: Message, buf: &mut BytesMut) -> Result<(), ProtocolError> {
        self.codec.encode(m, buf)
    }
}

fn close_message(code: u16, reason: String) -> Message {
    Message::Close(Some(CloseReason { code: CloseCode::from(code), description: Some(reason) }))
}

impl Stream for OutBody {
    type Item = Result<Bytes, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let inner = this.inner.clone();
        let mut q = inner.queue.lock();
        if q.close_taken {
            q.body_done = true;
            drop(q);
            inner.done.notify_one();
            return Poll::Ready(None);
        }
        let mut buf = BytesMut::new();
        let mut took = false;
        if let Some((code, reason)) = q.urgent.take() {
            q.frames = VecDeque::new();
            q.bytes = 0;
            q.close_taken = true;
            took = true;
            if let Err(e) = this.encode(close_message(code, reason), &mut buf) {
                return Poll::Ready(Some(Err(e)));
            }
        }
        while !q.close_taken && buf.len() < CHUNK_BYTES {
            let Some(o) = q.frames.pop_front() else { break };
            took = true;
            let m = match o {
                Outbound::Frame(e) => {
                    q.bytes -= e.len();
                    match e {
                        Encoded::Text(s) => Message::Text(ByteString::from(s)),
                        Encoded::Binary(b) => Message::Binary(b),
                    }
                }
                Outbound::Pong(b) => Message::Pong(b),
                Outbound::Ping => Message::Ping(Bytes::new()),
                Outbound::Close(code, reason) => {
                    q.close_taken = true;
                    close_message(code, reason)
                }
            };
            if let Err(e) = this.encode(m, &mut buf) {
                return Poll::Ready(Some(Err(e)));
            }
        }
        if q.frames.is_empty() && q.session_gone && !q.close_taken {
            q.close_taken = true;
            if let Err(e) = this.encode(Message::Close(None), &mut buf) {
                return Poll::Ready(Some(Err(e)));
            }
        }
        if q.frames.is_empty() && q.frames.capacity() > 64 {
            q.frames = VecDeque::new();
        }
        if buf.is_empty() {
            q.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        drop(q);
        if took {
            inner.room.notify_one();
        }
        Poll::Ready(Some(Ok(buf.freeze())))
    }
}

impl Drop for OutBody {
    fn drop(&mut self) {
        {
            let mut q = self.inner.queue.lock();
            q.body_gone = true;
            q.body_done = true;
            q.frames = VecDeque::new();
            q.bytes = 0;
            q.waker = None;
        }
        self.inner.done.notify_one();
        // A pump waiting for room wakes, finds the queue closed and stops the session.
        self.inner.room.notify_one();
    }
}

/// The WebSocket messages of a request's bytes (RFC 6455 §5), as actix-ws's `MessageStream`
/// yields them: a text frame that is not UTF-8 is `ProtocolError::Io` of kind `InvalidData`
/// wrapping the `Utf8Error`; frames over `max_frame_bytes` are `ProtocolError::Overflow`. The
/// buffer is released whenever it is empty, so an idle socket holds none.
pub struct InStream<S> {
    payload: S,
    buf: BytesMut,
    codec: Codec,
    ended: bool,
}

impl<S> InStream<S> {
    /// Decodes `payload`, refusing frames over `max_frame_bytes` (bytes).
    pub fn new(payload: S, max_frame_bytes: usize) -> Self {
        InStream { payload, buf: BytesMut::new(), codec: Codec::new().max_size(max_frame_bytes), ended: false }
    }
}

impl<S> Stream for InStream<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Message, ProtocolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match this.codec.decode(&mut this.buf) {
                Ok(Some(frame)) => {
                    if this.buf.is_empty() {
                        this.buf = BytesMut::new();
                    }
                    let m = match frame {
                        Frame::Text(b) => match ByteString::try_from(b) {
                            Ok(s) => Message::Text(s),
                            Err(e) => return Poll::Ready(Some(Err(ProtocolError::Io(io::Error::new(io::ErrorKind::InvalidData, e))))),
                        },
                        Frame::Binary(b) => Message::Binary(b),
                        Frame::Ping(b) => Message::Ping(b),
                        Frame::Pong(b) => Message::Pong(b),
                        Frame::Close(r) => Message::Close(r),
                        Frame::Continuation(item) => Message::Continuation(item),
                    };
                    return Poll::Ready(Some(Ok(m)));
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e))),
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.payload).poll_next(cx) {
                Poll::Ready(Some(Ok(b))) => this.buf.extend_from_slice(&b),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(ProtocolError::Io(io::Error::other(e))))),
                Poll::Ready(None) => this.ended = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    fn text(s: &str) -> Outbound {
        Outbound::Frame(Encoded::Text(s.to_owned()))
    }

    /// Decodes server frames as a client would (no masking on this side).
    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut codec = Codec::new().client_mode();
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(f) = codec.decode(&mut buf).expect("valid frames") {
            out.push(f);
        }
        assert!(buf.is_empty(), "a partial frame left");
        out
    }

    #[actix_rt::test]
    async fn frames_go_out_in_order_and_the_close_is_last() {
        let (q, mut body) = outbound(8, None, Duration::from_secs(1));
        q.push(text("a")).unwrap();
        q.push(Outbound::Ping).unwrap();
        q.push(text("bc")).unwrap();
        assert_eq!(q.queued_bytes(), 3);
        assert_eq!(q.free(), 5);
        q.push(Outbound::Close(4000, "bye".into())).unwrap();
        assert_eq!(q.push(text("late")), Err(PushError::Closed));
        let chunk = body.next().await.unwrap().unwrap();
        let got = frames(&chunk);
        assert_eq!(got.len(), 4);
        assert!(matches!(&got[0], Frame::Text(b) if &b[..] == b"a"));
        assert!(matches!(&got[1], Frame::Ping(_)));
        assert!(matches!(&got[2], Frame::Text(b) if &b[..] == b"bc"));
        match &got[3] {
            Frame::Close(Some(r)) => {
                assert_eq!(u16::from(r.code), 4000);
                assert_eq!(r.description.as_deref(), Some("bye"));
            }
            other => panic!("expected a close, got {other:?}"),
        }
        assert_eq!(q.queued_bytes(), 0);
        assert!(body.next().await.is_none());
        tokio::time::timeout(Duration::from_secs(5), q.done()).await.expect("done after the close");
    }

    #[actix_rt::test]
    async fn a_full_queue_refuses_and_the_body_makes_room() {
        let (q, mut body) = outbound(2, None, Duration::from_secs(1));
        q.push(text("1")).unwrap();
        q.push(text("2")).unwrap();
        assert_eq!(q.push(text("3")), Err(PushError::Full));
        assert_eq!(q.free(), 0);
        let room = q.room();
        let chunk = body.next().await.unwrap().unwrap();
        assert_eq!(frames(&chunk).len(), 2);
        tokio::time::timeout(Duration::from_secs(5), room).await.expect("room after the body took frames");
        assert_eq!(q.free(), 2);
        q.push(text("3")).unwrap();
    }

    #[actix_rt::test]
    async fn an_urgent_close_drops_what_is_queued_and_goes_first() {
        let (q, mut body) = outbound(8, None, Duration::from_secs(1));
        q.push(text("stale")).unwrap();
        q.close_urgent(4008, "slow consumer");
        assert_eq!(q.push(text("more")), Err(PushError::Closed));
        let got = frames(&body.next().await.unwrap().unwrap());
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], Frame::Close(Some(r)) if u16::from(r.code) == 4008));
        assert!(body.next().await.is_none());
    }

    #[actix_rt::test]
    async fn dropping_the_session_end_closes_after_what_is_queued() {
        let (q, mut body) = outbound(8, None, Duration::from_secs(1));
        q.push(text("last words")).unwrap();
        drop(q);
        let got = frames(&body.next().await.unwrap().unwrap());
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0], Frame::Text(_)));
        assert!(matches!(&got[1], Frame::Close(None)));
        assert!(body.next().await.is_none());
    }

    #[actix_rt::test]
    async fn a_gone_body_refuses_pushes_and_counts_as_done() {
        let (q, body) = outbound(8, None, Duration::from_secs(1));
        q.push(text("x")).unwrap();
        drop(body);
        assert_eq!(q.push(text("y")), Err(PushError::Closed));
        assert_eq!(q.queued_bytes(), 0);
        tokio::time::timeout(Duration::from_secs(5), q.done()).await.expect("done once the body is gone");
    }

    #[actix_rt::test]
    async fn the_in_stream_decodes_frames_split_anywhere_and_refuses_bad_utf8() {
        // Masked client frames: "hi" as text, then a binary [1, 2, 3], then text 0xff (not UTF-8).
        let mut client = Codec::new().client_mode();
        let mut wire = BytesMut::new();
        client.encode(Message::Text("hi".into()), &mut wire).unwrap();
        client.encode(Message::Binary(Bytes::from_static(&[1, 2, 3])), &mut wire).unwrap();
        let mut raw = BytesMut::new();
        actix_http::ws::Parser::write_message(&mut raw, &[0xffu8][..], actix_http::ws::OpCode::Text, true, true);
        wire.extend_from_slice(&raw);
        // One byte per chunk: every header and payload split.
        let chunks: Vec<Result<Bytes, PayloadError>> = wire.iter().map(|b| Ok(Bytes::copy_from_slice(&[*b]))).collect();
        let mut s = InStream::new(futures_util::stream::iter(chunks), 1024);
        assert!(matches!(s.next().await, Some(Ok(Message::Text(t))) if &*t == "hi"));
        assert!(matches!(s.next().await, Some(Ok(Message::Binary(b))) if &b[..] == [1, 2, 3]));
        match s.next().await {
            Some(Err(ProtocolError::Io(e))) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                assert!(e.get_ref().is_some_and(|e| e.is::<std::str::Utf8Error>()));
            }
            other => panic!("expected invalid UTF-8, got {other:?}"),
        }
    }

    #[actix_rt::test]
    async fn the_in_stream_refuses_a_frame_over_its_cap() {
        let mut client = Codec::new().client_mode();
        let mut wire = BytesMut::new();
        client.encode(Message::Binary(Bytes::from(vec![0u8; 100])), &mut wire).unwrap();
        let mut s = InStream::new(futures_util::stream::iter(vec![Ok::<_, PayloadError>(wire.freeze())]), 64);
        assert!(matches!(s.next().await, Some(Err(ProtocolError::Overflow))));
    }
}
