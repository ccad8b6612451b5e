//! The XMPP side of a simulated client (`parley load --protocol xmpp`): XMPP over WebSocket
//! (RFC 7395) at `ws://HOST:PORT/xmpp-websocket`, subprotocol `xmpp`, one element per text
//! message; login with SASL PLAIN (RFC 4616; the gateway offers it on a loopback listener),
//! resource binding (RFC 6120 §7), optionally XEP-0198 stream management, initial presence.
//!
//! What the chat engine sends and reads over it, and how that maps to the native protocol:
//! - a `send` is `<message type='chat' to='PEER@DOMAIN' id='K.T'><body/></message>` followed by
//!   `<r/>` (XEP-0198 §4: "how many of my stanzas have you handled?");
//! - the `ack` is the gateway's `<a h/>` covering the message: the gateway answers an `<r/>`
//!   only once every message counted in `h` was answered by the commit pipeline (fsync'd and
//!   applied), the same moment a native `ack` is sent (ARCHITECTURE.md, "an XMPP ack is a
//!   durable ack"); a stanza error (`<message type='error' id/>`) is the refusal, always written
//!   before the `<a/>` that counts it;
//! - the native `received up_to` (every `--received-ms`) is the client's `<a h/>`: the gateway
//!   asks with `<r/>` every 100 ms while stanzas are unconfirmed, and moves the device cursor
//!   when the answer covers them; the client answers every `<r/>` at once and sends no other
//!   `<a/>`, so the cadence is the gateway's 100 ms (the native default);
//! - the recipient reads the message's seq from its XEP-0359 `<stanza-id id='CONV/SEQ'/>`.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use minidom::Element;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

use super::http::{tcp_connect, Target};
use super::ws::{config, ConnectError, Ws};
use crate::xmpp::parser::parse_frame;
use crate::xmpp::stanza::{build, ns, text_el, to_string};

/// How long the login (open, SASL, bind, stream management, presence) may take.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens `ws://HOST:PORT/xmpp-websocket` with the `xmpp` subprotocol (RFC 7395 §3.1); `small`
/// as in [`super::ws::config`].
pub async fn connect(target: &Target, source: Option<std::net::IpAddr>, small: bool) -> Result<Ws, ConnectError> {
    let tcp = tcp_connect(target.addr, source).await.map_err(|e| ConnectError::Io(format!("tcp: {e}")))?;
    let url = format!("ws://{}/xmpp-websocket", target.authority);
    let mut req = url.into_client_request().map_err(|e| ConnectError::Io(format!("request: {e}")))?;
    req.headers_mut().insert("Sec-WebSocket-Protocol", tungstenite::http::HeaderValue::from_static("xmpp"));
    match tokio_tungstenite::client_async_with_config(req, tcp, Some(config(small))).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
            Err(ConnectError::Status { status: resp.status().as_u16(), retry_after })
        }
        Err(e) => Err(ConnectError::Io(format!("handshake: {e}"))),
    }
}

/// An element as a WebSocket text message.
pub fn frame(el: &Element) -> Message {
    Message::text(to_string(el))
}

/// RFC 7395 §3.3.1 `<open/>` for `domain`.
fn open(domain: &str) -> Message {
    frame(&build!("open", ns::FRAMING, "to" => domain, "version" => "1.0").build())
}

/// RFC 7395 §3.3.3 `<close/>`.
pub fn close() -> Message {
    frame(&Element::builder("close", ns::FRAMING).build())
}

/// XEP-0198 `<r/>`.
pub fn request_ack() -> Message {
    frame(&Element::builder("r", ns::SM).build())
}

/// XEP-0198 `<a h/>`: `h` stanzas received from the server handled.
pub fn answer_ack(h: u32) -> Message {
    frame(&build!("a", ns::SM, "h" => h.to_string()).build())
}

/// A chat message (RFC 6121 §5.2.2) to the bare JID `to`, with the client's id `id`.
pub fn chat(to: &str, id: &str, body: &str) -> Message {
    frame(&build!("message", ns::CLIENT, "to" => to, "type" => "chat", "id" => id).append(text_el("body", ns::CLIENT, body)).build())
}

/// Whether `el` is a stanza XEP-0198 counts (RFC 6120 §8: message, presence, iq).
pub fn is_stanza(el: &Element) -> bool {
    el.ns() == ns::CLIENT && matches!(el.name(), "message" | "presence" | "iq")
}

/// The next element from the server; an error when the socket closed or sent a stream error.
pub async fn next(ws: &mut Ws) -> anyhow::Result<Element> {
    loop {
        let m = ws.next().await.ok_or_else(|| anyhow!("closed by the server"))??;
        match m {
            Message::Text(t) => {
                let el = parse_frame(t.as_str()).map_err(|e| anyhow!("the server sent bad XML: {}", e.text))?;
                if el.name() == "error" && el.ns() == ns::STREAMS {
                    let cond = el.children().find(|c| c.ns() == ns::STREAM_ERRORS && c.name() != "text").map(|c| c.name().to_owned());
                    bail!("stream error: {}", cond.unwrap_or_default());
                }
                return Ok(el);
            }
            Message::Close(_) => bail!("closed by the server"),
            _ => continue,
        }
    }
}

/// Reads until an element named `name` in `ns` arrives; returns it and how many XEP-0198
/// stanzas came before it (counted only when `count`).
async fn until(ws: &mut Ws, name: &str, namespace: &str, count: bool, counted: &mut u32) -> anyhow::Result<Element> {
    for _ in 0..1000 {
        let el = next(ws).await?;
        if el.name() == name && el.ns() == namespace {
            return Ok(el);
        }
        if el.name() == "failure" && el.ns() == ns::SASL {
            bail!("SASL failed: {}", to_string(&el));
        }
        if el.name() == "failed" && el.ns() == ns::SM {
            bail!("stream management refused: {}", to_string(&el));
        }
        if count && is_stanza(&el) {
            *counted = counted.wrapping_add(1);
        }
    }
    bail!("no <{name}/> in 1000 elements")
}

/// What a login established.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoggedIn {
    /// With stream management: stanzas the server sent after `<enabled/>` up to the echo of the
    /// initial presence (inclusive); the reader counts on from here.
    pub inbound: u32,
    /// With stream management: stanzas this client sent after `<enable/>` (the presence: 1).
    pub outbound: u32,
}

/// Logs `user` in on `ws`: `<open/>`, SASL PLAIN, `<open/>` again, bind `resource`, with `sm`
/// XEP-0198 `<enable/>`, then initial presence, read until its echo (RFC 6121 §4.2.2).
pub async fn login(ws: &mut Ws, domain: &str, user: &str, password: &str, resource: &str, sm: bool) -> anyhow::Result<LoggedIn> {
    let fut = async {
        let mut n = 0u32;
        ws.send(open(domain)).await.context("sending <open/>")?;
        until(ws, "features", ns::STREAMS, false, &mut n).await?;
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{password}"));
        ws.send(frame(&build!("auth", ns::SASL, "mechanism" => "PLAIN").append(creds).build())).await?;
        until(ws, "success", ns::SASL, false, &mut n).await?;
        ws.send(open(domain)).await?;
        until(ws, "features", ns::STREAMS, false, &mut n).await?;
        let bind = build!("iq", ns::CLIENT, "type" => "set", "id" => "bind")
            .append(Element::builder("bind", ns::BIND).append(text_el("resource", ns::BIND, resource)).build())
            .build();
        ws.send(frame(&bind)).await?;
        let r = until(ws, "iq", ns::CLIENT, false, &mut n).await?;
        if r.attr(rxml::xml_ncname!("type")) != Some("result") {
            bail!("bind failed: {}", to_string(&r));
        }
        let mut out = LoggedIn::default();
        if sm {
            ws.send(frame(&Element::builder("enable", ns::SM).build())).await?;
            until(ws, "enabled", ns::SM, false, &mut n).await?;
            out.outbound = 1;
        }
        ws.send(frame(&Element::builder("presence", ns::CLIENT).build())).await?;
        let mut counted = 0u32;
        until(ws, "presence", ns::CLIENT, sm, &mut counted).await?;
        if sm {
            out.inbound = counted.wrapping_add(1);
        }
        Ok::<_, anyhow::Error>(out)
    };
    tokio::time::timeout(LOGIN_TIMEOUT, fut).await.map_err(|_| anyhow!("no XMPP login within {LOGIN_TIMEOUT:?}"))?
}

/// The (conv, seq) of a message stanza's XEP-0359 `<stanza-id/>` (the gateway's `CONV/SEQ`).
pub fn stanza_seq(m: &Element) -> Option<(String, u64)> {
    let sid = m.get_child("stanza-id", ns::SID)?.attr(rxml::xml_ncname!("id"))?;
    let (c, s) = crate::xmpp::stanza::parse_archive_id(sid)?;
    Some((c.to_owned(), s))
}

/// The stanza error condition (RFC 6120 §8.3.3) and its type (`wait`, `modify`, ...) of an error
/// stanza.
pub fn stanza_error(el: &Element) -> (String, String) {
    let Some(e) = el.get_child("error", ns::CLIENT) else { return ("undefined-condition".into(), "cancel".into()) };
    let kind = e.attr(rxml::xml_ncname!("type")).unwrap_or("cancel").to_owned();
    let cond = e.children().find(|c| c.ns() == ns::STANZAS && c.name() != "text").map_or("undefined-condition".to_owned(), |c| c.name().to_owned());
    (cond, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stanzas_parse_back() {
        let Message::Text(t) = chat("b@localhost", "3.1500", "a <b> & c") else { panic!() };
        let el = parse_frame(t.as_str()).unwrap();
        assert!(is_stanza(&el));
        assert_eq!(el.get_child("body", ns::CLIENT).map(|b| b.text()).as_deref(), Some("a <b> & c"));
        let m: Element = "<message xmlns='jabber:client'><stanza-id xmlns='urn:xmpp:sid:0' id='dm:a:b/7' by='a@localhost'/></message>".parse().unwrap();
        assert_eq!(stanza_seq(&m), Some(("dm:a:b".into(), 7)));
        let e: Element = "<message xmlns='jabber:client' type='error' id='1'><error type='wait'><resource-constraint xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></message>"
            .parse()
            .unwrap();
        assert_eq!(stanza_error(&e), ("resource-constraint".into(), "wait".into()));
    }
}
