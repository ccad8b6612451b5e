//! The WebSocket side of a simulated client: connect (optionally from a chosen source address),
//! frame encoding in either of the protocol's encodings, `hello` until `synced`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::http::{tcp_connect, Target};
use crate::protocol::codec::{decode_server_json, decode_server_postcard, encode_request};
use crate::protocol::{ClientFrame, Encoded, Encoding, Request, ServerFrame};

/// A client WebSocket.
pub type Ws = WebSocketStream<TcpStream>;

/// How long `hello` may take to reach `synced`.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Socket buffers: large for the chat scenarios, small for the ones that hold many idle sockets
/// (the read buffer is allocated eagerly, 128 KiB by default).
pub fn config(small: bool) -> WebSocketConfig {
    if small {
        WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
    } else {
        WebSocketConfig::default().read_buffer_size(64 * 1024).write_buffer_size(0)
    }
}

/// Why a connection attempt failed, for retry decisions and error counts.
#[derive(Debug)]
pub enum ConnectError {
    /// The server refused the upgrade with this status (503 while overloaded or draining);
    /// `retry_after` in seconds when given.
    Status { status: u16, retry_after: Option<u64> },
    /// TCP or handshake failure.
    Io(String),
}

impl ConnectError {
    /// A short code for error tallies: `http_503`, `connect`.
    pub fn code(&self) -> String {
        match self {
            ConnectError::Status { status, .. } => format!("http_{status}"),
            ConnectError::Io(_) => "connect".into(),
        }
    }
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Status { status, .. } => write!(f, "upgrade refused with HTTP {status}"),
            ConnectError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Opens `ws://HOST:PORT/v1/ws`.
pub async fn connect(target: &Target, source: Option<IpAddr>, small: bool) -> Result<Ws, ConnectError> {
    let tcp = tcp_connect(target.addr, source).await.map_err(|e| ConnectError::Io(format!("tcp: {e}")))?;
    let url = format!("ws://{}/v1/ws", target.authority);
    match tokio_tungstenite::client_async_with_config(url, tcp, Some(config(small))).await {
        Ok((ws, _)) => Ok(ws),
        Err(tungstenite::Error::Http(resp)) => {
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse().ok());
            Err(ConnectError::Status { status: resp.status().as_u16(), retry_after })
        }
        Err(e) => Err(ConnectError::Io(format!("handshake: {e}"))),
    }
}

/// A request as a WebSocket message in `enc`.
/// A request with a `rid`, encoded for the socket.
pub fn encode_rid(rid: &str, frame: ClientFrame, enc: Encoding) -> Message {
    match encode_request(&Request { rid: Some(rid.to_owned()), frame }, enc) {
        Encoded::Text(s) => Message::text(s),
        Encoded::Binary(b) => Message::binary(b),
    }
}

pub fn encode(frame: ClientFrame, enc: Encoding) -> Message {
    match encode_request(&Request { rid: None, frame }, enc) {
        Encoded::Text(s) => Message::text(s),
        Encoded::Binary(b) => Message::binary(b),
    }
}

/// A received message: `Some(frame)` for a protocol frame, `None` for control frames.
pub fn decode(msg: &Message) -> anyhow::Result<Option<ServerFrame>> {
    match msg {
        Message::Text(t) => decode_server_json(t.as_str()).map(Some).map_err(|e| anyhow!(e.message)),
        Message::Binary(b) => decode_server_postcard(b).map(Some).map_err(|e| anyhow!(e.message)),
        Message::Close(c) => match c {
            Some(c) => bail!("closed by the server: {} {}", u16::from(c.code), c.reason),
            None => bail!("closed by the server"),
        },
        _ => Ok(None),
    }
}

/// The close code in a close message, for error tallies (`close:4008`).
pub fn close_code(msg: &Message) -> Option<String> {
    match msg {
        Message::Close(Some(c)) => Some(format!("close:{}", u16::from(c.code))),
        Message::Close(None) => Some("close:none".into()),
        _ => None,
    }
}

/// What `hello` found.
#[derive(Debug, Default, Clone)]
pub struct Synced {
    /// The user's head at `welcome`.
    pub head: u64,
    /// The backlog events received before `synced` (ev, frame).
    pub backlog: Vec<(u64, ServerFrame)>,
}

/// Sends `hello` and reads until `synced`, keeping the backlog when `keep` is set.
pub async fn hello(ws: &mut Ws, token: &str, cursor: Option<u64>, enc: Encoding, keep: bool) -> anyhow::Result<Synced> {
    ws.send(encode(ClientFrame::Hello { token: token.to_owned(), cursor }, enc)).await.context("sending hello")?;
    let mut out = Synced::default();
    let fut = async {
        loop {
            let msg = ws.next().await.ok_or_else(|| anyhow!("closed before synced"))??;
            match decode(&msg)? {
                Some(ServerFrame::Welcome { head, .. }) => out.head = head,
                Some(ServerFrame::Synced { .. }) => return Ok::<_, anyhow::Error>(()),
                Some(f @ ServerFrame::Event { ev, .. }) if keep => out.backlog.push((ev, f)),
                Some(ServerFrame::Error { code, message, .. }) => bail!("error {} during hello: {message}", code.as_str()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(HELLO_TIMEOUT, fut).await.map_err(|_| anyhow!("no synced within {HELLO_TIMEOUT:?}"))??;
    Ok(out)
}
