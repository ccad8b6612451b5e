//! The client-to-server TCP transport (RFC 6120 §4): an accept loop on `xmpp.listen`, and per
//! connection one task that owns the socket (reads: bytes → [`StreamParser`] → the session
//! actor; writes: the session's bounded queue → the socket) and the session actor. STARTTLS
//! (RFC 6120 §5) with rustls swaps the socket for a TLS stream inside that task, where
//! `xmpp.tls_cert` and `xmpp.tls_key` are configured.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix::Actor;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::parser::{StreamEvent, StreamParser};
use super::session::{In, Link, Out, XmppSession};
use crate::limits::FrameLimit;
use crate::shared::Shared;

/// Read buffer per connection, in bytes: small, since it is held by every idle session (a larger
/// stanza simply takes several reads; the parser keeps its state between them).
const READ_BUF: usize = 4 * 1024;

/// The TLS acceptor of `xmpp.tls_cert` / `xmpp.tls_key` (PEM), or None when they are empty.
pub fn tls_acceptor(cert: &str, key: &str) -> anyhow::Result<Option<TlsAcceptor>> {
    use anyhow::Context as _;
    if cert.is_empty() {
        return Ok(None);
    }
    let certs = rustls_pemfile::certs(&mut std::io::BufReader::new(std::fs::File::open(cert).with_context(|| format!("xmpp.tls_cert {cert}"))?))
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("xmpp.tls_cert {cert}: not PEM certificates"))?;
    let key = rustls_pemfile::private_key(&mut std::io::BufReader::new(std::fs::File::open(key).with_context(|| format!("xmpp.tls_key {key}"))?))
        .with_context(|| format!("xmpp.tls_key {key}: not a PEM key"))?
        .with_context(|| format!("xmpp.tls_key {key}: no private key in it"))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("xmpp.tls_cert / xmpp.tls_key do not match")?;
    Ok(Some(TlsAcceptor::from(Arc::new(cfg))))
}

/// Accepts XMPP connections on `listener` until the server drains.
pub async fn serve(shared: Arc<Shared>, listener: std::net::TcpListener, tls: Option<TlsAcceptor>) {
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
        connection(shared.clone(), sock, peer, plaintext_ok, tls.clone());
    }
}

/// The connection's socket: plain TCP, then TLS after STARTTLS.
enum Sock {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// During the handshake (never read or written).
    Gone,
}

fn gone() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::NotConnected, "socket in handshake")
}

impl AsyncRead for Sock {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Sock::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Sock::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Sock {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_write(cx, b),
            Sock::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, b),
            Sock::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_flush(cx),
            Sock::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Sock::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Sock::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Sock::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Sock::Gone => Poll::Ready(Ok(())),
        }
    }
}

fn connection(shared: Arc<Shared>, sock: TcpStream, peer: SocketAddr, plaintext_ok: bool, tls: Option<TlsAcceptor>) {
    let (tx, mut rx) = mpsc::channel::<Out>(shared.cfg.session.outbound_queue_frames);
    let written = Arc::new(AtomicU64::new(0));
    let restart = Arc::new(AtomicBool::new(false));
    let limit = Arc::new(FrameLimit { cap: AtomicUsize::new(shared.cfg.session.unauth_max_frame_bytes), tripped: AtomicBool::new(false) });
    let stall = Duration::from_millis(shared.cfg.session.slow_consumer_timeout_ms);
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let link = Link {
        tx,
        ws: false,
        restart: restart.clone(),
        limit: limit.clone(),
        written: written.clone(),
        peer: peer.ip(),
        plaintext_ok,
        tls: tls.is_some(),
    };
    let s2 = shared.clone();
    let addr = XmppSession::create(move |_| XmppSession::new(id, s2, link));
    shared.sockets.fetch_add(1, Ordering::Relaxed);
    shared.sessions.insert(id, addr.clone().recipient());
    actix_rt::spawn(async move {
        let mut io = Sock::Plain(sock);
        let mut parser = StreamParser::new();
        let mut buf = vec![0u8; READ_BUF];
        let mut events = Vec::new();
        // After a parse error nothing more is read into the parser: the session sends the stream
        // error and closes the queue, which ends this loop.
        let mut broken = false;
        loop {
            tokio::select! {
                r = io.read(&mut buf) => {
                    let n = match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    if broken {
                        continue;
                    }
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
                            // Bytes after <success/> or <proceed/> in the same read would be a
                            // client pipelining past a stream restart (RFC 6120 §6.4.6): dropped.
                            break;
                        }
                    }
                    if let Err(e) = r {
                        broken = true;
                        addr.do_send(In::Error(e));
                    }
                }
                o = rx.recv() => match o {
                    Some(Out::Data(s, ev)) => {
                        if !s.is_empty() {
                            // A reader that takes nothing for this long is a slow consumer: the
                            // connection goes; nothing is lost (the cursor only covers what was
                            // written or acked).
                            match tokio::time::timeout(stall, io.write_all(s.as_bytes())).await {
                                Ok(Ok(())) => {}
                                _ => break,
                            }
                        }
                        if ev > 0 {
                            written.fetch_max(ev, Ordering::AcqRel);
                        }
                    }
                    Some(Out::StartTls) => {
                        let Some(acc) = tls.clone() else { break };
                        let _ = io.flush().await;
                        // RFC 6120 §5.4.3.3: the TLS handshake, then a new stream over it.
                        let Sock::Plain(tcp) = std::mem::replace(&mut io, Sock::Gone) else { break };
                        match tokio::time::timeout(Duration::from_secs(10), acc.accept(tcp)).await {
                            Ok(Ok(t)) => io = Sock::Tls(Box::new(t)),
                            _ => break,
                        }
                        parser = StreamParser::new();
                        restart.store(false, Ordering::SeqCst);
                        addr.do_send(In::Secured);
                    }
                    Some(Out::Close(_)) | None => break,
                },
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), io.shutdown()).await;
        addr.do_send(In::Gone);
    });
}
