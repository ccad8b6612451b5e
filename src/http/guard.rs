//! A guard on the raw bytes of a WebSocket connection (client → server) that refuses a frame as
//! soon as its header declares a payload above the socket's current cap.
//!
//! Why: actix-http's frame parser checks a frame's size only once the whole frame is buffered,
//! so a header claiming a terabyte makes the server buffer everything the client sends after it,
//! before any authentication. This guard reads the frame headers as the bytes stream past (RFC
//! 6455 §5.2 framing: 2 bytes, then 2 or 8 bytes of extended length, then the 4-byte mask) and
//! ends the stream with an error at the first oversized header; the session then closes with
//! 1009. It never copies payload bytes.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::error::PayloadError;
use bytes::Bytes;
use futures_util::Stream;

use crate::limits::FrameLimit;

/// Where the guard is in the byte stream.
#[derive(Debug)]
enum At {
    /// Reading a frame header: the bytes so far (at most 14).
    Header { buf: [u8; 14], have: usize },
    /// Skipping this many payload bytes.
    Payload(u64),
    /// Refused; the stream is over.
    Done,
}

/// The guarded payload stream.
pub struct FrameGuard<S> {
    inner: S,
    limit: Arc<FrameLimit>,
    at: At,
}

impl<S> FrameGuard<S> {
    /// Guards `inner` with `limit`.
    pub fn new(inner: S, limit: Arc<FrameLimit>) -> Self {
        FrameGuard { inner, limit, at: At::Header { buf: [0; 14], have: 0 } }
    }

    /// Walks `chunk`; false when a header declares more than the cap.
    fn scan(&mut self, chunk: &[u8]) -> bool {
        let cap = self.limit.cap.load(Ordering::Relaxed) as u64;
        let mut pos = 0;
        while pos < chunk.len() {
            match &mut self.at {
                At::Done => return false,
                At::Payload(left) => {
                    let n = (*left).min((chunk.len() - pos) as u64);
                    pos += n as usize;
                    *left -= n;
                    if *left == 0 {
                        self.at = At::Header { buf: [0; 14], have: 0 };
                    }
                }
                At::Header { buf, have } => {
                    buf[*have] = chunk[pos];
                    *have += 1;
                    pos += 1;
                    if *have < 2 {
                        continue;
                    }
                    let len7 = buf[1] & 0x7f;
                    let ext = match len7 {
                        126 => 2,
                        127 => 8,
                        _ => 0,
                    };
                    let mask = if buf[1] & 0x80 != 0 { 4 } else { 0 };
                    if *have < 2 + ext + mask {
                        continue;
                    }
                    let len = match ext {
                        2 => u64::from(u16::from_be_bytes([buf[2], buf[3]])),
                        8 => u64::from_be_bytes([buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], buf[8], buf[9]]),
                        _ => u64::from(len7),
                    };
                    if len > cap {
                        self.at = At::Done;
                        return false;
                    }
                    self.at = if len == 0 { At::Header { buf: [0; 14], have: 0 } } else { At::Payload(len) };
                }
            }
        }
        true
    }
}

impl<S> Stream for FrameGuard<S>
where
    S: Stream<Item = Result<Bytes, PayloadError>> + Unpin,
{
    type Item = Result<Bytes, PayloadError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if matches!(this.at, At::Done) {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                if this.scan(&chunk) {
                    Poll::Ready(Some(Ok(chunk)))
                } else {
                    this.limit.tripped.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(PayloadError::Overflow)))
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use super::*;

    fn header(len: u64) -> Vec<u8> {
        let mut h = vec![0x81];
        if len < 126 {
            h.push(0x80 | len as u8);
        } else if len < 65_536 {
            h.push(0x80 | 126);
            h.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            h.push(0x80 | 127);
            h.extend_from_slice(&len.to_be_bytes());
        }
        h.extend_from_slice(&[1, 2, 3, 4]);
        h
    }

    fn guard(cap: usize) -> FrameGuard<futures_util::stream::Empty<Result<Bytes, PayloadError>>> {
        let limit = Arc::new(FrameLimit { cap: AtomicUsize::new(cap), tripped: AtomicBool::new(false) });
        FrameGuard::new(futures_util::stream::empty(), limit)
    }

    #[test]
    fn frames_within_the_cap_pass_byte_by_byte() {
        let mut g = guard(1000);
        let mut bytes = Vec::new();
        for len in [0u64, 5, 125, 126, 1000] {
            bytes.extend(header(len));
            bytes.extend(std::iter::repeat(7u8).take(len as usize));
        }
        for b in &bytes {
            assert!(g.scan(std::slice::from_ref(b)));
        }
        assert!(matches!(g.at, At::Header { have: 0, .. }));
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_payload() {
        let mut g = guard(16 * 1024);
        let mut bytes = header(10);
        bytes.extend([0u8; 10]);
        bytes.extend(header(1 << 40));
        assert!(!g.scan(&bytes));
        assert!(!g.scan(b"more"));
        let mut g = guard(16 * 1024);
        assert!(!g.scan(&header(16 * 1024 + 1)));
        let mut g = guard(16 * 1024);
        assert!(g.scan(&header(16 * 1024)));
    }
}
