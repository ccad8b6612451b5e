//! The client-to-server TCP transport (RFC 6120 §4): an accept loop on `xmpp.listen`; per
//! connection a reader task (bytes → [`StreamParser`] → the session), the session actor, and a
//! writer task (the session's bounded queue → the socket).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::parser::{StreamEvent, StreamParser};
use super::session::{In, Link, Out, XmppSession};
use crate::http::guard::FrameLimit;
use crate::server::Shared;

/// Read buffer per connection, in bytes.
const READ_BUF: usize = 16 * 1024;

/// Accepts XMPP connections on `listener` until the server drains.
pub async fn serve(shared: Arc<Shared>, listener: std::net::TcpListener) {
    let plaintext_ok = listener.local_addr().map(|a| shared.cfg.xmpp.allow_plaintext.allowed(a.ip())).unwrap_or(false);
    let listener = match listener.set_nonblocking(true).and_then(|_| TcpListener::from_std(listener)) {
        Ok(l) => l,
        Err(e) => return tracing::error!(error = %e, "xmpp listener"),
    };
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "xmpp accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.draining.load(Ordering::Relaxed) {
            return;
        }
        if shared.sockets.load(Ordering::Relaxed) >= shared.cfg.admission.max_sockets || !shared.upgrade_limiter.allow("") {
            metrics::counter!("parley_admission_rejections_total", "why" => "xmpp").increment(1);
            drop(sock);
            continue;
        }
        let _ = sock.set_nodelay(true);
        connection(shared.clone(), sock, peer, plaintext_ok);
    }
}

fn connection(shared: Arc<Shared>, sock: TcpStream, peer: SocketAddr, plaintext_ok: bool) {
    let (mut rd, mut wr) = sock.into_split();
    let (tx, mut rx) = mpsc::channel::<Out>(shared.cfg.session.outbound_queue_frames);
    let written = Arc::new(AtomicU64::new(0));
    let restart = Arc::new(AtomicBool::new(false));
    let limit = Arc::new(FrameLimit {
        cap: AtomicUsize::new(shared.cfg.session.unauth_max_frame_bytes),
        tripped: AtomicBool::new(false),
    });
    let stall = Duration::from_millis(shared.cfg.session.slow_consumer_timeout_ms);
    let w2 = written.clone();
    actix_rt::spawn(async move {
        while let Some(o) = rx.recv().await {
            match o {
                Out::Data(s, ev) => {
                    if !s.is_empty() {
                        // A reader that takes nothing for this long is a slow consumer: the
                        // connection goes; nothing is lost (the cursor only covers what was written).
                        match tokio::time::timeout(stall, wr.write_all(s.as_bytes())).await {
                            Ok(Ok(())) => {}
                            _ => break,
                        }
                    }
                    if ev > 0 {
                        w2.fetch_max(ev, Ordering::AcqRel);
                    }
                }
                Out::Close => break,
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
    });
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let link = Link { tx, ws: false, restart: restart.clone(), limit: limit.clone(), written, peer: peer.ip(), plaintext_ok };
    let s2 = shared.clone();
    let addr = XmppSession::create(move |_| XmppSession::new(id, s2, link));
    shared.sockets.fetch_add(1, Ordering::Relaxed);
    shared.sessions.insert(id, addr.clone().recipient());
    actix_rt::spawn(async move {
        let mut parser = StreamParser::new();
        let mut buf = vec![0u8; READ_BUF];
        let mut events = Vec::new();
        loop {
            let n = match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    addr.do_send(In::Gone);
                    return;
                }
                Ok(n) => n,
            };
            if restart.swap(false, Ordering::SeqCst) {
                parser = StreamParser::new();
            }
            let r = parser.feed(&buf[..n], limit.cap.load(Ordering::Relaxed), &mut events);
            for ev in events.drain(..) {
                let m = match ev {
                    StreamEvent::Open(el) => In::Open(el),
                    StreamEvent::Stanza(el) => In::Stanza(el),
                    StreamEvent::Close => In::Close,
                };
                // Waiting for the session keeps a fast sender from queueing without bound.
                if addr.send(m).await.is_err() {
                    return;
                }
                if restart.load(Ordering::SeqCst) {
                    // The rest of this read belongs to the old stream only if the client
                    // pipelined past <success/>, which RFC 6120 §6.4.6 forbids.
                    break;
                }
            }
            if let Err(e) = r {
                addr.do_send(In::Error(e));
                return;
            }
        }
    });
}
