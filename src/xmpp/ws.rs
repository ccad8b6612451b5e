//! XMPP over WebSocket (RFC 7395) at `GET /xmpp-websocket` on the HTTP listener: subprotocol
//! `xmpp`, one whole element per text message, `<open/>` and `<close/>` framing. Frames are
//! size-checked at their header by the same guard as the native protocol (`http/guard.rs`).
//! The server's WebSocket close frame carries a status code ([`close_code`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix_web::{web, HttpRequest, HttpResponse};
use actix_ws::{CloseCode, CloseReason, Message as WsMessage};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use super::parser::{parse_frame, StreamError};
use super::session::{In, Link, Out, XmppSession};
use super::stanza::ns;
use crate::http::guard::FrameGuard;
use crate::limits::FrameLimit;
use crate::shared::Shared;

/// `GET /xmpp-websocket`: the RFC 7395 upgrade; starts an [`XmppSession`]. Admission control
/// as for `/v1/ws` ([`crate::http::admit`]): `503` with a `Retry-After`.
pub async fn route(s: web::Data<Arc<Shared>>, req: HttpRequest, body: web::Payload) -> Result<HttpResponse, actix_web::Error> {
    // The same admission control as the native upgrade: 503 with a Retry-After.
    if let Some(refused) = crate::http::admit(&s) {
        return Ok(refused);
    }
    let offered = req
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.split(',').any(|p| p.trim() == "xmpp"));
    if !offered {
        return Ok(crate::http::error(crate::protocol::ErrorCode::BadRequest, "the WebSocket subprotocol must be xmpp (RFC 7395)"));
    }
    let limit = Arc::new(FrameLimit { cap: AtomicUsize::new(s.cfg.session.unauth_max_frame_bytes), tripped: AtomicBool::new(false) });
    let guarded = FrameGuard::new(body.into_inner(), limit.clone());
    let stream: std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, actix_web::error::PayloadError>>>> = Box::pin(guarded);
    let mut raw = actix_web::dev::Payload::Stream { payload: stream };
    let body = <web::Payload as actix_web::FromRequest>::from_request(&req, &mut raw).await?;
    let (mut resp, ws, stream) = actix_ws::handle(&req, body)?;
    resp.headers_mut().insert(
        actix_web::http::header::SEC_WEBSOCKET_PROTOCOL,
        actix_web::http::header::HeaderValue::from_static("xmpp"),
    );
    let peer = req.peer_addr().map(|a| a.ip()).unwrap_or(std::net::Ipv4Addr::LOCALHOST.into());
    let local = req.app_config().local_addr().ip();
    let shared: Arc<Shared> = s.get_ref().clone();
    let (tx, mut rx) = mpsc::channel::<Out>(shared.cfg.session.outbound_queue_frames);
    let written = Arc::new(AtomicU64::new(0));
    let w2 = written.clone();
    let mut wsw = ws.clone();
    let stall = Duration::from_millis(shared.cfg.session.slow_consumer_timeout_ms);
    actix_rt::spawn(async move {
        // A queue that closes without `Out::Close`: the session stopped while it was full (a
        // slow consumer), a policy end rather than an orderly one.
        let mut ended_by = Some("policy-violation");
        while let Some(o) = rx.recv().await {
            match o {
                Out::Data(s, ev) => {
                    if !s.is_empty() {
                        match tokio::time::timeout(stall, wsw.text(s)).await {
                            Ok(Ok(())) => {}
                            _ => return,
                        }
                    }
                    if ev > 0 {
                        w2.fetch_max(ev, Ordering::AcqRel);
                    }
                }
                Out::Close(why) => {
                    ended_by = why;
                    break;
                }
                // No STARTTLS on WebSocket (TLS is the `wss:` URL's business).
                Out::StartTls => {}
            }
        }
        let reason = CloseReason { code: close_code(ended_by), description: ended_by.map(str::to_owned) };
        let _ = tokio::time::timeout(Duration::from_secs(1), wsw.close(Some(reason))).await;
    });
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let link = Link {
        tx,
        ws: true,
        restart: Arc::new(AtomicBool::new(false)),
        limit: limit.clone(),
        written,
        peer,
        plaintext_ok: shared.cfg.xmpp.allow_plaintext.allowed(local),
        tls: false,
    };
    let s2 = shared.clone();
    let addr = XmppSession::create(move |_| XmppSession::new(id, s2, link));
    shared.sockets.fetch_add(1, Ordering::Relaxed);
    shared.sessions.insert(id, addr.clone().recipient());
    let stream_cap = shared.cfg.session.max_frame_bytes;
    let mut pong = ws;
    actix_rt::spawn(async move {
        let mut stream = std::pin::pin!(stream.max_frame_size(stream_cap));
        while let Some(m) = stream.next().await {
            if limit.tripped.load(Ordering::Relaxed) {
                addr.do_send(In::Error(StreamError::new("policy-violation", "stanza too large")));
                return;
            }
            let m = match m {
                Ok(WsMessage::Text(t)) => {
                    if t.len() > limit.cap.load(Ordering::Relaxed) {
                        addr.do_send(In::Error(StreamError::new("policy-violation", "stanza too large")));
                        return;
                    }
                    match parse_frame(&t) {
                        Ok(el) if el.name() == "open" && el.ns() == ns::FRAMING => In::Open(el),
                        Ok(el) if el.name() == "close" && el.ns() == ns::FRAMING => In::Close,
                        Ok(el) => In::Stanza(el),
                        Err(e) => In::Error(e),
                    }
                }
                Ok(WsMessage::Binary(_)) => In::Error(StreamError::new("unsupported-encoding", "RFC 7395 uses text messages")),
                Ok(WsMessage::Ping(b)) => {
                    let _ = pong.pong(&b).await;
                    continue;
                }
                Ok(WsMessage::Close(_)) | Err(_) => In::Gone,
                Ok(_) => continue,
            };
            let end = matches!(m, In::Error(_) | In::Gone);
            if addr.send(m).await.is_err() || end {
                return;
            }
        }
        addr.do_send(In::Gone);
    });
    Ok(resp)
}

/// The WebSocket close code (RFC 6455 §7.4.1) for how the XMPP stream ended. RFC 7395 §3.6: the
/// server ends the stream with `<close/>` (after a stream error, RFC 7395 §3.6.1 and RFC 6120
/// §4.9, with the `<stream:error/>` first) and then closes the WebSocket connection. An orderly
/// end is 1000 (normal closure); a stream error gets the code nearest its condition: binary
/// messages 1003 (unsupported data), a policy (size, timeout, authentication, addressing) 1008,
/// a server fault 1011, a shutdown 1001 (going away), and malformed or misplaced XML 1002
/// (protocol error).
pub fn close_code(stream_error: Option<&str>) -> CloseCode {
    match stream_error {
        None => CloseCode::Normal,
        Some("system-shutdown") => CloseCode::Away,
        Some("unsupported-encoding") => CloseCode::Unsupported,
        Some("policy-violation" | "connection-timeout" | "not-authorized" | "host-unknown" | "invalid-from" | "conflict") => CloseCode::Policy,
        Some("internal-server-error") => CloseCode::Error,
        Some(_) => CloseCode::Protocol,
    }
}
