//! The XMPP gateway (`src/xmpp/`): RFC 7395 framing with a small scripted WebSocket client, bad
//! input over TCP (a stream error and a closed stream, nothing stored, other sessions fine), and
//! real XMPP clients: slixmpp 1.17 scenarios (`tests/xmpp/slix.py`) over TCP.
//!
//! The slixmpp tests need python3 with slixmpp 1.17 and websockets in a venv: `PARLEY_SLIXMPP_PYTHON`
//! names its python, else `target/xmpp-venv` is used, created (pip, from PyPI) on first use.
//! Without it they print why and pass, except under CI (`CI` set), where they fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use minidom::Element;
use parley::protocol::{ClientFrame, EventPayload, ServerFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='localhost' version='1.0'>";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

fn plain(user: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{PASSWORD}"))
}

// ------------------------------------------------------------------------ raw TCP streams

/// A raw XMPP TCP stream: writes bytes, reads until a text appears or the server closes.
struct Raw {
    s: TcpStream,
    got: String,
    eof: bool,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let s = within(T, "xmpp connect", TcpStream::connect(addr)).await.expect("connect");
        Raw { s, got: String::new(), eof: false }
    }

    async fn write(&mut self, b: &[u8]) {
        // The server may close while we write a huge stanza: that is the point of some tests.
        let _ = self.s.write_all(b).await;
    }

    /// Reads until `needle` has arrived (true) or the stream ended (false).
    async fn until(&mut self, needle: &str) -> bool {
        let mut buf = vec![0u8; 8192];
        within(T, needle, async {
            loop {
                if self.got.contains(needle) {
                    return true;
                }
                if self.eof {
                    return false;
                }
                match self.s.read(&mut buf).await {
                    Ok(0) | Err(_) => self.eof = true,
                    Ok(n) => self.got.push_str(&String::from_utf8_lossy(&buf[..n])),
                }
            }
        })
        .await
    }

    /// Reads until the server closes the connection; returns everything received.
    async fn until_closed(&mut self) -> String {
        self.until("\u{0}never").await;
        self.got.clone()
    }

    /// Header, SASL PLAIN, restart, bind `resource`, initial presence.
    async fn login(addr: SocketAddr, user: &str, resource: &str) -> Raw {
        let mut r = Raw::connect(addr).await;
        r.write(HEADER.as_bytes()).await;
        assert!(r.until("PLAIN</mechanism>").await, "features: {}", r.got);
        r.write(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>", plain(user)).as_bytes()).await;
        assert!(r.until("<success").await, "sasl: {}", r.got);
        r.got.clear();
        r.write(HEADER.as_bytes()).await;
        assert!(r.until("urn:ietf:params:xml:ns:xmpp-bind").await, "features after sasl: {}", r.got);
        r.write(format!("<iq type='set' id='b'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>").as_bytes()).await;
        assert!(r.until(&format!("{user}@localhost/{resource}</jid>")).await, "bind: {}", r.got);
        r.write(b"<presence/>").await;
        assert!(r.until("<presence").await, "presence: {}", r.got);
        // Keep what came after the echo of our presence (the backlog may be in the same read).
        let i = r.got.find("<presence").unwrap_or(0);
        let rest = r.got[i..].find("/>").map_or(String::new(), |j| r.got[i + j + 2..].to_owned());
        r.got = rest;
        r
    }
}

/// Every kind of bad input gets a stream error with its condition and a closed stream; nothing is
/// stored, and a native session of another user keeps working.
#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_a_stream_error_and_a_closed_stream() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let x = server.xmpp.expect("the server printed its xmpp address");
    let [mut alice] = server.clients(["alice"]).await;
    server.register("mallory").await;

    let header = HEADER.as_bytes();
    let huge = format!("<message to='alice@localhost'><body>{}</body></message>", "a".repeat(20_000));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed XML", [header, b"<message><body>x</bo></message>"].concat(), "not-well-formed"),
        ("an entity declaration", b"<?xml version='1.0'?><!DOCTYPE stream [<!ENTITY x 'y'>]><stream:stream/>".to_vec(), "not-well-formed"),
        ("an undefined entity", [header, b"<message><body>&x;</body></message>"].concat(), "not-well-formed"),
        ("a huge stanza", [header, huge.as_bytes()].concat(), "policy-violation"),
        ("a stanza before auth", [header, b"<message to='alice@localhost' type='chat'><body>x</body></message>"].concat(), "not-authorized"),
        ("a stanza before the header", b"<message xmlns='jabber:client'/>".to_vec(), "invalid-namespace"),
        // RFC 6120 §4.9.3.10: a client stream's content namespace is jabber:client.
        ("a jabber:server stream", HEADER.replace("jabber:client", "jabber:server").into_bytes(), "invalid-namespace"),
        // Junk that never contains '<': refused as it arrives (not after the login timeout).
        ("bytes that are not XML", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), "not-well-formed"),
        ("text between stanzas", [header, b" hello"].concat(), "not-well-formed"),
    ];
    for (what, bytes, cond) in cases {
        let mut r = Raw::connect(x).await;
        r.write(&bytes).await;
        let got = r.until_closed().await;
        assert!(got.contains(&format!("<{cond} xmlns='urn:ietf:params:xml:ns:xmpp-streams'")), "{what}: {got}");
        assert!(got.contains("</stream:stream>"), "{what}: the stream is closed: {got}");
    }

    // A `from` that claims to be another user: a stream error, and the message is not stored.
    let mut m = Raw::login(x, "mallory", "laptop").await;
    m.write(b"<message from='alice@localhost/web' to='bob@localhost' type='chat' id='spoof'><body>spoof</body></message>").await;
    let got = m.until_closed().await;
    assert!(got.contains("<invalid-from"), "{got}");
    // Also a huge stanza after auth (over the 256 KiB frame limit).
    let mut m = Raw::login(x, "mallory", "laptop").await;
    m.write(format!("<message to='alice@localhost' type='chat'><body>{}</body></message>", "b".repeat(300_000)).as_bytes()).await;
    assert!(m.until_closed().await.contains("<policy-violation"));

    // Nothing was stored, and alice's native session is unaffected.
    alice.send_acked("n1", "mallory", "still here").await;
    let h = alice.history_all("dm:alice:mallory").await;
    assert_eq!(h.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["n1"]);
    assert!(alice.history_all("dm:alice:bob").await.is_empty());
    let ServerFrame::Conversations { items, .. } = alice.request("c", ClientFrame::Conversations).await else { panic!("conversations") };
    assert_eq!(items.iter().map(|i| i.conv.as_str()).collect::<Vec<_>>(), ["dm:alice:mallory"]);
}

/// SASL PLAIN's authorization identity (RFC 4616 §2): honoured only when it is the user itself
/// (its name or bare JID); another user's is refused with `invalid-authzid` (RFC 6120 §6.5.6),
/// and the stream stays usable for a correct attempt.
#[tokio::test(flavor = "multi_thread")]
async fn plain_with_another_users_authzid_is_refused() {
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    server.register("alice").await;
    server.register("mallory").await;
    let x = server.xmpp.expect("xmpp address");
    let mut r = Raw::connect(x).await;
    r.write(HEADER.as_bytes()).await;
    assert!(r.until("</features>").await, "{}", r.got);
    for authzid in ["alice", "alice@localhost"] {
        r.got.clear();
        let creds = b64.encode(format!("{authzid}\0mallory\0{PASSWORD}"));
        r.write(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>").as_bytes()).await;
        assert!(r.until("<invalid-authzid/>").await, "{authzid}: {}", r.got);
        assert!(!r.got.contains("<success"), "{}", r.got);
    }
    // Its own bare JID as authzid is the same identity: accepted.
    r.got.clear();
    let creds = b64.encode(format!("mallory@localhost\0mallory\0{PASSWORD}"));
    r.write(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{creds}</auth>").as_bytes()).await;
    assert!(r.until("<success").await, "{}", r.got);
}

/// A message from a raw TCP XMPP client reaches a native client, and back.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_stream_chat_with_a_native_client() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let x = server.xmpp.expect("xmpp address");
    let [mut alice] = server.clients(["alice"]).await;
    server.register("bob").await;
    let mut bob = Raw::login(x, "bob", "raw").await;
    // Split across writes on purpose: the push parser reassembles it.
    bob.write(b"<message to='alice@localhost' type='chat' id='t1'><bo").await;
    bob.write("dy>héllo ".as_bytes()).await;
    bob.write(b"&amp; bye</body></message>").await;
    let (_, m) = alice.message_event().await;
    assert_eq!((m.id.as_str(), m.from.as_str(), m.body.as_str()), ("t1", "bob", "héllo & bye"));
    alice.send_acked("a1", "bob", "back <at> you").await;
    assert!(bob.until("back &lt;at&gt; you</body>").await, "{}", bob.got);
    assert!(bob.got.contains("id='dm:alice:bob/2'"), "stanza-id: {}", bob.got);

    // XEP-0198: an ack for more stanzas than were sent is refused with a stream error.
    bob.write(b"<enable xmlns='urn:xmpp:sm:3' resume='true'/>").await;
    assert!(bob.until("<enabled").await, "{}", bob.got);
    bob.write(b"<r xmlns='urn:xmpp:sm:3'/>").await;
    assert!(bob.until("<a xmlns='urn:xmpp:sm:3' h='0'/>").await, "{}", bob.got);
    bob.write(b"<a xmlns='urn:xmpp:sm:3' h='7'/>").await;
    let got = bob.until_closed().await;
    assert!(got.contains("<handled-count-too-high") && got.contains("<undefined-condition"), "{got}");

    // While bob is offline alice reads his message: the marker waits for him (an event, not a
    // message: not archived, not unread), and nothing he already had comes again.
    alice.send(ClientFrame::Read { conv: "dm:alice:bob".into(), seq: 1 }).await;
    alice.barrier().await;
    let mut bob = Raw::login(x, "bob", "raw").await;
    assert!(bob.until("<displayed xmlns='urn:xmpp:chat-markers:0' id='t1'/>").await, "{}", bob.got);
    assert!(!bob.got.contains("back &lt;at&gt; you"), "a1 was delivered before: {}", bob.got);
    let ids: Vec<String> = alice.history_all("dm:alice:bob").await.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["t1", "a1"]);
}

/// The text of the first `<name …>…</name>` in `got`.
fn inner<'a>(got: &'a str, name: &str) -> &'a str {
    let start = got.find(&format!("<{name} ")).and_then(|i| got[i..].find('>').map(|j| i + j + 1)).expect("element");
    let end = got[start..].find(&format!("</{name}>")).expect("end tag") + start;
    &got[start..end]
}

/// SCRAM-SHA-256 and SCRAM-SHA-1 (RFC 5802/7677) with the `sasl` crate's client, for both GS2
/// headers a client may send without channel binding (`n`: it cannot bind; `y`: it could), and a
/// wrong password refused.
#[tokio::test(flavor = "multi_thread")]
async fn scram_with_either_gs2_header() {
    use sasl::client::mechanisms::Scram;
    use sasl::client::Mechanism;
    use sasl::common::scram::{Sha1, Sha256};
    use sasl::common::ChannelBinding;
    let b64 = base64::engine::general_purpose::STANDARD;
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    server.register("sam").await;
    let x = server.xmpp.expect("xmpp address");
    for (name, cb, password, ok) in [
        ("SCRAM-SHA-256", ChannelBinding::None, PASSWORD, true),
        ("SCRAM-SHA-256", ChannelBinding::Unsupported, PASSWORD, true),
        ("SCRAM-SHA-1", ChannelBinding::None, PASSWORD, true),
        ("SCRAM-SHA-256", ChannelBinding::None, "not the password", false),
    ] {
        let mut m: Box<dyn Mechanism> = if name == "SCRAM-SHA-1" {
            Box::new(Scram::<Sha1>::new("sam", password, cb).expect("scram"))
        } else {
            Box::new(Scram::<Sha256>::new("sam", password, cb).expect("scram"))
        };
        let mut r = Raw::connect(x).await;
        r.write(HEADER.as_bytes()).await;
        assert!(r.until("</features>").await, "{}", r.got);
        r.got.clear();
        r.write(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{name}'>{}</auth>", b64.encode(m.initial())).as_bytes()).await;
        assert!(r.until("</challenge>").await, "{name}: {}", r.got);
        let challenge = b64.decode(inner(&r.got, "challenge")).expect("base64");
        let resp = m.response(&challenge).expect("client response");
        r.got.clear();
        r.write(format!("<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>", b64.encode(resp)).as_bytes()).await;
        if ok {
            assert!(r.until("</success>").await, "{name}: {}", r.got);
            let data = b64.decode(inner(&r.got, "success")).expect("base64");
            m.success(&data).expect("the server proved it knows the verifier");
        } else {
            assert!(r.until("<not-authorized/>").await, "{}", r.got);
        }
    }
}

// ------------------------------------------------------------------------ RFC 7395

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_send(ws: &mut Ws, s: &str) {
    ws.send(Message::Text(s.into())).await.expect("ws send");
}

/// The next text message as an element; None when the server closed.
async fn ws_next(ws: &mut Ws) -> Option<Element> {
    within(T, "an xmpp websocket message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Some(t.as_str().parse::<Element>().unwrap_or_else(|e| panic!("not XML: {t}: {e}"))),
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return None,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
}

async fn ws_until(ws: &mut Ws, name: &str) -> Element {
    for _ in 0..100 {
        match ws_next(ws).await {
            Some(e) if e.name() == name => return e,
            Some(_) => continue,
            None => panic!("closed while waiting for <{name}>"),
        }
    }
    panic!("no <{name}> in 100 messages")
}

/// RFC 7395: the `xmpp` subprotocol, `<open/>`, one element per message, SASL, bind, chat both
/// ways with a native client, `<close/>`.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_framing_rfc7395() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let [mut alice] = server.clients(["alice"]).await;
    server.register("carol").await;

    // Without the subprotocol: refused.
    let url = format!("ws://{}/xmpp-websocket", server.addr);
    assert!(tokio_tungstenite::connect_async(url.as_str()).await.is_err());

    let mut req = url.as_str().into_client_request().expect("request");
    req.headers_mut().insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
    let (mut ws, resp) = within(T, "ws connect", tokio_tungstenite::connect_async(req)).await.expect("connect");
    assert_eq!(resp.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()), Some("xmpp"));

    let open = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";
    ws_send(&mut ws, open).await;
    let o = ws_until(&mut ws, "open").await;
    assert_eq!(o.ns(), "urn:ietf:params:xml:ns:xmpp-framing");
    let f = ws_until(&mut ws, "features").await;
    assert!(parley::xmpp::stanza::to_string(&f).contains("SCRAM-SHA-256"));
    ws_send(&mut ws, &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>", plain("carol"))).await;
    ws_until(&mut ws, "success").await;
    ws_send(&mut ws, open).await;
    ws_until(&mut ws, "open").await;
    ws_until(&mut ws, "features").await;
    ws_send(&mut ws, "<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>browser</resource></bind></iq>").await;
    let iq = ws_until(&mut ws, "iq").await;
    assert!(parley::xmpp::stanza::to_string(&iq).contains("carol@localhost/browser"));
    ws_send(&mut ws, "<presence xmlns='jabber:client'/>").await;
    ws_until(&mut ws, "presence").await;
    ws_send(&mut ws, "<iq xmlns='jabber:client' type='get' id='p1'><ping xmlns='urn:xmpp:ping'/></iq>").await;
    assert_eq!(ws_until(&mut ws, "iq").await.attr(rxml::xml_ncname!("id")), Some("p1"));

    alice.send_acked("a1", "carol", "over websocket 🌐").await;
    let m = ws_until(&mut ws, "message").await;
    assert_eq!(m.get_child("body", "jabber:client").map(|b| b.text()).as_deref(), Some("over websocket 🌐"));
    ws_send(&mut ws, "<message xmlns='jabber:client' to='alice@localhost' type='chat' id='w1'><body>and back</body></message>").await;
    let back = alice.until("carol's message", |f| match f {
        ServerFrame::Event { payload: EventPayload::Message(m), .. } if m.from == "carol" => Some(m.clone()),
        _ => None,
    }).await;
    assert_eq!((back.id.as_str(), back.body.as_str()), ("w1", "and back"));

    // A malformed frame: a stream error, then <close/>.
    ws_send(&mut ws, "<message><body>").await;
    let e = ws_until(&mut ws, "error").await;
    assert!(e.has_child("not-well-formed", "urn:ietf:params:xml:ns:xmpp-streams"));
    ws_until(&mut ws, "close").await;
    assert!(ws_next(&mut ws).await.is_none(), "the server closes the socket");

    // The messages were stored once each; the receipt reached alice.
    let ids: Vec<String> = alice.history_all("dm:alice:carol").await.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["a1", "w1"]);
    let r = alice.until("a delivered receipt", |f| match f {
        ServerFrame::Event { payload: EventPayload::Receipt(r), .. } => Some(r.clone()),
        _ => None,
    }).await;
    assert_eq!((r.by.as_str(), r.up_to), ("carol", 1));
}

/// The status code of the server's close frame (skipping what comes before it); None when the
/// connection ended without one.
async fn ws_close_code(ws: &mut Ws) -> Option<u16> {
    within(T, "the server's close frame", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return None,
            }
        }
    })
    .await
}

/// An RFC 7395 connection of `user`, authenticated (PLAIN) and bound to `resource`, available.
async fn ws_bound(server: &Server, user: &str, resource: &str) -> Ws {
    let mut req = format!("ws://{}/xmpp-websocket", server.addr).into_client_request().expect("request");
    req.headers_mut().insert("Sec-WebSocket-Protocol", "xmpp".parse().expect("header"));
    let (mut ws, _) = within(T, "ws connect", tokio_tungstenite::connect_async(req)).await.expect("connect");
    let open = "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='localhost' version='1.0'/>";
    ws_send(&mut ws, open).await;
    ws_until(&mut ws, "features").await;
    ws_send(&mut ws, &format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>", plain(user))).await;
    ws_until(&mut ws, "success").await;
    ws_send(&mut ws, open).await;
    ws_until(&mut ws, "features").await;
    ws_send(&mut ws, &format!("<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'><resource>{resource}</resource></bind></iq>")).await;
    ws_until(&mut ws, "iq").await;
    ws_send(&mut ws, "<presence xmlns='jabber:client'/>").await;
    ws_until(&mut ws, "presence").await;
    ws
}

/// RFC 7395 §3.3.3: one element per message. Two stanzas, or a stanza and trailing text, in one
/// message are a `not-well-formed` stream error and `<close/>`; neither stanza is handled.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_message_with_two_elements_is_a_stream_error() {
    let two = "<message xmlns='jabber:client' to='alice@localhost' type='chat' id='one'><body>first</body></message>\
               <message xmlns='jabber:client' to='alice@localhost' type='chat' id='two'><body>second</body></message>";
    let junk = "<message xmlns='jabber:client' to='alice@localhost' type='chat' id='three'><body>third</body></message>junk";
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let [mut alice] = server.clients(["alice"]).await;
    server.register("carol").await;
    for frame in [two, junk] {
        let mut ws = ws_bound(&server, "carol", "browser").await;
        ws_send(&mut ws, frame).await;
        let e = ws_until(&mut ws, "error").await;
        assert!(e.has_child("not-well-formed", "urn:ietf:params:xml:ns:xmpp-streams"), "{frame}: {}", parley::xmpp::stanza::to_string(&e));
        ws_until(&mut ws, "close").await;
        assert!(ws_next(&mut ws).await.is_none(), "the server closes the socket");
    }
    // Neither message of a refused frame was stored.
    alice.send_acked("a1", "carol", "still here").await;
    let ids: Vec<String> = alice.history_all("dm:alice:carol").await.into_iter().map(|m| m.id).collect();
    assert_eq!(ids, ["a1"]);
}

/// The server's close frame carries a status code (RFC 6455 §7.4.1): 1000 after an orderly
/// `<close/>` exchange (RFC 7395 §3.6), 1002 (protocol error) after a `not-well-formed` stream
/// error.
#[tokio::test(flavor = "multi_thread")]
async fn websocket_close_frames_carry_a_status_code() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    server.register("carol").await;
    let mut ws = ws_bound(&server, "carol", "browser").await;
    ws_send(&mut ws, "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>").await;
    ws_until(&mut ws, "close").await;
    assert_eq!(ws_close_code(&mut ws).await, Some(1000));

    let mut ws = ws_bound(&server, "carol", "browser").await;
    ws_send(&mut ws, "<message><body>").await;
    let e = ws_until(&mut ws, "error").await;
    assert!(e.has_child("not-well-formed", "urn:ietf:params:xml:ns:xmpp-streams"));
    ws_until(&mut ws, "close").await;
    assert_eq!(ws_close_code(&mut ws).await, Some(1002));
}

// ------------------------------------------------------------------------ slixmpp

/// The python of a venv with slixmpp 1.17 and websockets, or why there is none.
fn slixmpp_python() -> Result<PathBuf, String> {
    static PY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PY.get_or_init(|| {
        let works = |p: &Path| {
            std::process::Command::new(p)
                .args(["-c", "import slixmpp, websockets; assert slixmpp.__version__.startswith('1.17')"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if let Ok(p) = std::env::var("PARLEY_SLIXMPP_PYTHON") {
            let p = PathBuf::from(p);
            return if works(&p) { Ok(p) } else { Err(format!("{} has no slixmpp 1.17", p.display())) };
        }
        let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/xmpp-venv");
        let py = venv.join("bin/python");
        if works(&py) {
            return Ok(py);
        }
        eprintln!("xmpp: installing slixmpp 1.17 into {}", venv.display());
        let made = std::process::Command::new("python3").arg("-m").arg("venv").arg(&venv).status();
        if !made.is_ok_and(|s| s.success()) {
            return Err("python3 -m venv failed (no python3?)".into());
        }
        let pip = std::process::Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "slixmpp==1.17.*", "websockets>=12"])
            .status();
        if pip.is_ok_and(|s| s.success()) && works(&py) {
            Ok(py)
        } else {
            Err("pip could not install slixmpp 1.17 (no network to PyPI?)".into())
        }
    })
    .clone()
}

/// Runs scenario `name` of `tests/xmpp/slix.py` against a fresh server.
async fn slix(name: &str) {
    slix_with(name, &[]).await
}

/// Like [`slix`], with extra server environment.
async fn slix_with(name: &str, env: &[(&str, &str)]) {
    let py = match tokio::task::spawn_blocking(slixmpp_python).await.expect("join") {
        Ok(p) => p,
        Err(why) if ci() => panic!("CI: slixmpp is needed: {why}"),
        Err(why) => {
            eprintln!("skipped: {why}");
            return;
        }
    };
    let dir = TestDir::new();
    let server = Server::start_with(&dir, env).await;
    let x = server.xmpp.expect("xmpp address");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/xmpp/slix.py");
    let out = tokio::time::timeout(
        Duration::from_secs(180),
        tokio::process::Command::new(py)
            .arg(script)
            .args([name, &x.ip().to_string(), &x.port().to_string(), &format!("http://{}", server.addr)])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("slixmpp scenario {name} timed out"))
    .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().filter(|l| !l.contains("Deprecat") && !l.contains("self.plugin")).collect();
    assert!(
        out.status.success() && stdout.contains(&format!("OK {name}")),
        "slixmpp scenario {name} failed:\n{stdout}\n{}\nserver log:\n{}",
        tail[tail.len().saturating_sub(40)..].join("\n"),
        server.log().lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
}

/// XEP-0077 in-band registration and PLAIN; a user registered over HTTP logs in with
/// SCRAM-SHA-256, SCRAM-SHA-1 and PLAIN; a wrong password fails.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_registration_and_login() {
    slix("login").await;
}

/// XEP-0198: a cut connection is resumed; what was not acked is sent again, once; nothing is lost
/// or duplicated, and the device cursor moves only with acks.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_stream_resumption() {
    slix("resume").await;
}

/// XEP-0045: a native user's group is a members-only room; a slixmpp member joins, gets the
/// group's messages as groupchat, sends one (reflected, and an event for the native member), reads
/// the room's archive; a non-member is refused.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_muc_round_trip() {
    slix("muc").await;
}

/// XEP-0045: a room created by joining it (a new parley group, the joiner its admin), an
/// instant-room configuration, a mediated invitation adding a member, a message to the room
/// received once by the invitee's XMPP and native clients, affiliations under the group admin
/// rule, and leaving the group.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_muc_creation_invite_and_affiliations() {
    slix("muc_create").await;
}

/// XEP-0313 without `with`: every direct conversation in the documented global order, paged
/// with RSM both ways (pages chronological), `start`/`end`, and no carbons of the results.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_mam_across_conversations() {
    slix("mam_all").await;
}

/// A self-signed certificate for `localhost` in `dir` (openssl): (cert, key) paths.
fn test_cert(dir: &Path) -> Option<(String, String)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let ok = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| (cert.display().to_string(), key.display().to_string()))
}

/// STARTTLS (RFC 6120 §5) with rustls: with `allow_plaintext = false` no SASL is offered before
/// TLS (auth is refused with `encryption-required`); slixmpp upgrades and logs in with SCRAM.
#[tokio::test(flavor = "multi_thread")]
async fn starttls_then_sasl() {
    let certs = tempfile::tempdir().expect("tempdir");
    let Some((cert, key)) = test_cert(certs.path()) else {
        assert!(!ci(), "CI: openssl is needed to make the test certificate");
        return eprintln!("skipped: no openssl to make a test certificate");
    };
    let env = [("PARLEY__XMPP__TLS_CERT", cert.as_str()), ("PARLEY__XMPP__TLS_KEY", key.as_str()), ("PARLEY__XMPP__ALLOW_PLAINTEXT", "false")];
    {
        let dir = TestDir::new();
        let server = Server::start_with(&dir, &env).await;
        server.register("tina").await;
        let mut r = Raw::connect(server.xmpp.expect("xmpp address")).await;
        r.write(HEADER.as_bytes()).await;
        assert!(r.until("</features>").await, "{}", r.got);
        assert!(r.got.contains("<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>") && !r.got.contains("<mechanisms"), "{}", r.got);
        r.write(format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{}</auth>", plain("tina")).as_bytes()).await;
        assert!(r.until("<encryption-required").await, "{}", r.got);
    }
    slix_with("starttls", &env).await;
}

/// XEP-0077 in-band registration follows the plaintext rule of SASL (`xmpp.allow_plaintext`; its
/// `"auto"` default decides by the listener's address, so `false` on loopback takes the path of a
/// public listener): on a plaintext stream where SASL is refused, `<register/>` is not offered and
/// a `jabber:iq:register` get or set gets `<not-authorized/>` (XEP-0077 §3.3: the channel is not
/// safe enough); nothing is registered, and the stream stays open for STARTTLS.
#[tokio::test(flavor = "multi_thread")]
async fn in_band_registration_needs_tls_where_plaintext_is_refused() {
    let dir = TestDir::new();
    let server = Server::start_with(&dir, &[("PARLEY__XMPP__ALLOW_PLAINTEXT", "false")]).await;
    let mut r = Raw::connect(server.xmpp.expect("xmpp address")).await;
    r.write(HEADER.as_bytes()).await;
    // Nothing to offer: no STARTTLS configured, no SASL, no registration.
    assert!(r.until("<features xmlns='http://etherx.jabber.org/streams'/>").await, "{}", r.got);
    r.got.clear();
    r.write(b"<iq type='get' id='g1'><query xmlns='jabber:iq:register'/></iq>").await;
    assert!(r.until("</iq>").await, "{}", r.got);
    assert!(r.got.contains("type='error'") && r.got.contains("<not-authorized") && !r.got.contains("<username"), "{}", r.got);
    r.got.clear();
    r.write(format!("<iq type='set' id='r1'><query xmlns='jabber:iq:register'><username>neo</username><password>{PASSWORD}</password></query></iq>").as_bytes()).await;
    assert!(r.until("</iq>").await, "{}", r.got);
    assert!(r.got.contains("id='r1'") && r.got.contains("type='error'") && r.got.contains("<not-authorized"), "{}", r.got);
    assert!(!r.eof, "the stream stays open");
    // Not registered: the name is still free.
    server.register("neo").await;
}

/// slixmpp and a native client chat both ways with receipts (XEP-0184), markers (XEP-0333) and
/// chat states (XEP-0085); offline delivery; MAM paging backwards (XEP-0313); carbons to a second
/// resource (XEP-0280) with no duplicate copies.
#[tokio::test(flavor = "multi_thread")]
async fn slixmpp_chat_offline_mam_carbons() {
    slix("chat").await;
}

// ------------------------------------------------------------------------ parley load --protocol xmpp

/// Runs `parley load ARGS --json --quiet` against `server`; returns its JSON summary (the run
/// must have exited 0: every promise kept).
async fn load_json(server: &Server, args: &[&str]) -> serde_json::Value {
    parley_load_json(&format!("http://{}", server.addr), args).await
}

/// The dialog workload over XMPP-over-WebSocket (RFC 7395) with XEP-0198 acks: every message
/// acked (the gateway's `<a h/>`, answered only after the commit) is delivered exactly once, in
/// order, with its id and body; nothing is left unacked.
#[tokio::test(flavor = "multi_thread")]
async fn load_chat_over_xmpp_loses_nothing() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let j = load_json(&server, &["chat", "--protocol", "xmpp", "--users", "6", "--rate", "5", "--duration", "2"]).await;
    assert_eq!(j["protocol"], "xmpp", "{j}");
    crate::common::assert_load_kept_every_promise(&j);
    // Closed loop too (each user's next message waits for the <a/> of the previous one).
    let j = load_json(&server, &["chat", "--protocol", "xmpp", "--users", "2", "--rate", "max", "--duration", "1"]).await;
    assert_eq!(j["integrity"]["ok"], true, "{j}");
    assert!(j["acked"].as_u64().is_some_and(|a| a > 0), "{j}");
}

/// `parley load idle --protocol xmpp`: authenticated, bound, available XMPP sessions held open.
#[tokio::test(flavor = "multi_thread")]
async fn load_idle_over_xmpp_holds_sessions() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let j = load_json(&server, &["idle", "--protocol", "xmpp", "--users", "4", "--duration", "0.2"]).await;
    assert_eq!((j["protocol"].as_str(), j["connected"].as_u64(), j["still_open"].as_u64()), (Some("xmpp"), Some(4), Some(4)), "{j}");
}

/// A new resource's backlog of group events is history, not news: the invitation to a room
/// the user is still in (one per add), but no occupant presences of rooms it never joined, and
/// nothing of a room it was removed from. Live group events still bring the presences.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_resource_gets_invitations_not_stale_room_presences_from_its_backlog() {
    let dir = TestDir::new();
    let server = Server::start(&dir).await;
    let x = server.xmpp.expect("xmpp address");
    let [mut alice] = server.clients(["alice"]).await;
    server.register("bob").await;
    server.register("carol").await;
    let g = alice.create_group("team", &["bob", "carol"]).await;
    let rm = ClientFrame::GroupRemove { group: g.clone(), users: vec!["carol".to_owned()] };
    alice.request("rm", rm).await;
    let room = format!("{}@conference.localhost", g.trim_start_matches("g:"));
    for (user, invited) in [("bob", true), ("carol", false)] {
        let mut r = Raw::login(x, user, "fresh").await;
        // The backlog goes out when the resource becomes available, before this ping's answer.
        r.write(b"<iq type='get' id='sentinel'><ping xmlns='urn:xmpp:ping'/></iq>").await;
        assert!(r.until("id='sentinel'").await || r.until("id=\"sentinel\"").await, "{user}: {}", r.got);
        let stale: Vec<&str> = r.got.split("<presence").skip(1).filter(|p| p.contains(&room)).collect();
        assert!(stale.is_empty(), "{user} got presences of a room it never joined: {stale:?}");
        let invites = r.got.matches("<invite").count();
        assert_eq!(invites, usize::from(invited), "{user}'s invitations: {}", r.got);
        if invited {
            assert!(r.got.contains(&room) && r.got.contains("alice@localhost"), "{}", r.got);
            // Live: alice adds dave; bob's resource sees dave come in (an occupant presence).
            server.register("dave").await;
            r.got.clear();
            let add = ClientFrame::GroupAdd { group: g.clone(), users: vec!["dave".to_owned()] };
            alice.request("add", add).await;
            assert!(r.until(&format!("{room}/dave")).await, "the live presence of dave: {}", r.got);
        }
    }
}
