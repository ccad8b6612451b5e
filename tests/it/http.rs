//! HTTP papercuts (issue 15): every error has the handlers' JSON body, also those actix makes
//! before a handler runs (413, a plain GET on /v1/ws, 426, 404, 405); `HEAD` answers like `GET`
//! without a body; the `Authorization` scheme is case-insensitive.

use std::net::SocketAddr;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{within, Server, TestDir, T};
use crate::overload::{http_full, Reply};

/// Sends `head` (a request's line and headers, without the final blank line) and reads one
/// response: its head, then as many body bytes as its Content-Length says (the server may answer
/// before it read a body the request announced).
async fn raw(addr: SocketAddr, head: &str) -> Reply {
    within(T, head.lines().next().unwrap_or(""), async {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(format!("{head}\r\n\r\n").as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let split = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the connection closed before a response head: {:?}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
        };
        let text = String::from_utf8_lossy(&buf[..split]).into_owned();
        let mut lines = text.split("\r\n");
        let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|c| c.parse().ok()).expect("status");
        let headers: Vec<(String, String)> = lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned())).collect();
        let len: usize = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
        let mut body = buf[split + 4..].to_vec();
        while body.len() < len {
            let n = s.read(&mut chunk).await.expect("read body");
            assert!(n > 0, "the body ended early");
            body.extend_from_slice(&chunk[..n]);
        }
        Reply { status, headers, body }
    })
    .await
}

/// `status` with a JSON body `{"error": code, "message": non-empty}`.
fn json_error(r: &Reply, status: u16, code: &str, what: &str) {
    let v = r.json();
    assert_eq!(r.status, status, "{what}: {}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("application/json")), "{what}: content type {:?}", r.header("content-type"));
    assert_eq!(v["error"], code, "{what}: {}", r.text());
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()), "{what}: no message: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_has_the_json_error_body() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    let a = srv.addr;
    let host = format!("Host: {a}\r\nConnection: close");

    json_error(&http_full(a, "GET", "/no/such/path", &[], "").await, 404, "not_found", "404");
    let r = http_full(a, "GET", "/v1/register", &[], "").await;
    json_error(&r, 405, "bad_request", "GET on a POST route");
    assert_eq!(r.header("allow"), Some("POST"), "a 405 names the methods the path takes (RFC 9110 §15.5.6)");
    let r = http_full(a, "DELETE", "/v1/healthz", &[], "").await;
    json_error(&r, 405, "bad_request", "DELETE /v1/healthz");
    assert_eq!(r.header("allow"), Some("GET, HEAD"), "DELETE /v1/healthz");
    // A body above the limit: refused from its Content-Length, before it is sent.
    let r = raw(a, &format!("POST /v1/register HTTP/1.1\r\n{host}\r\nContent-Type: application/json\r\nContent-Length: 10000000")).await;
    json_error(&r, 413, "too_large", "a body too large");
    // A plain GET on the WebSocket path (a browser's address bar).
    json_error(&http_full(a, "GET", "/v1/ws", &[], "").await, 400, "bad_request", "GET /v1/ws without an upgrade");
    let ws = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==";
    let r = raw(a, &format!("GET /v1/ws HTTP/1.1\r\nHost: {a}\r\n{ws}\r\nSec-WebSocket-Version: 8")).await;
    json_error(&r, 426, "bad_request", "an unsupported WebSocket version");
    assert_eq!(r.header("sec-websocket-version"), Some("13"), "426 names the version it speaks");
    let r = raw(a, &format!("GET /v1/ws HTTP/1.1\r\nHost: {a}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13")).await;
    json_error(&r, 400, "bad_request", "an upgrade without a key");
    // The handlers' own errors keep their codes.
    let r = http_full(a, "POST", "/v1/register", &[], "not json").await;
    json_error(&r, 400, "bad_request", "a body that is not JSON");
    // A JSON array is not the object it spells out: serde would read it as the fields in order.
    for (path, body) in [("/v1/register", r#"["carol","correct horse"]"#), ("/v1/login", r#"["carol","correct horse","laptop"]"#)] {
        let r = http_full(a, "POST", path, &[], body).await;
        json_error(&r, 400, "bad_request", &format!("{path} with an array body"));
        assert!(r.text().contains("JSON object"), "{path}: the message says why: {}", r.text());
    }
    let r = http_full(a, "POST", "/v1/login", &[], r#"{"user":"carol","password":"correct horse"}"#).await;
    assert_eq!(r.status, 401, "the array did not register carol: {}", r.text());
    // A key given twice is refused, not read as its last value.
    let r = http_full(a, "POST", "/v1/register", &[], r#"{"user":"carol","password":"correct horse","user":"dave"}"#).await;
    json_error(&r, 400, "bad_request", "a duplicated key");
    assert!(r.text().contains("duplicate field"), "{}", r.text());
    let r = http_full(a, "POST", "/v1/login", &[], r#"{"user":"dave","password":"correct horse"}"#).await;
    assert_eq!(r.status, 401, "the duplicated key did not register dave: {}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_like_get_without_a_body() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    for path in ["/", "/app.js", "/v1/healthz", "/metrics"] {
        let get = http_full(srv.addr, "GET", path, &[], "").await;
        let head = http_full(srv.addr, "HEAD", path, &[], "").await;
        assert_eq!(get.status, 200, "GET {path}");
        assert_eq!(head.status, 200, "HEAD {path}: {}", head.text());
        assert!(head.body.is_empty(), "HEAD {path} sent a body: {}", head.text());
        assert_eq!(head.header("content-type"), get.header("content-type"), "HEAD {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authorization_scheme_is_case_insensitive() {
    const TOKEN: &str = "http-admin-token-0123456789";
    let dir = TestDir::new();
    let srv = Server::start_with(&dir, &[("PARLEY__ADMIN__TOKEN", TOKEN)]).await;
    let token = srv.user("alice").await;
    let r = http_full(srv.addr, "POST", "/v1/logout", &[("Authorization", &format!("bearer {token}"))], "").await;
    assert_eq!(r.status, 204, "logout with `bearer`: {}", r.text());
    let body = json!({ "dir": dir.path().join("backup") }).to_string();
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("BEARER {TOKEN}"))], &body).await;
    assert_eq!(r.status, 200, "backup with `BEARER`: {}", r.text());
    let full = dir.path().join("full");
    std::fs::create_dir(&full).expect("mkdir");
    std::fs::write(full.join("notes.txt"), "x").expect("write");
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Bearer {TOKEN}"))], &json!({ "dir": full }).to_string()).await;
    assert_eq!(r.status, 400, "a backup into a directory with files: {}", r.text());
    assert!(r.json()["message"].as_str().is_some_and(|m| m.matches("not empty").count() == 1), "{}", r.text());
    let r = http_full(srv.addr, "POST", "/v1/admin/backup", &[("Authorization", &format!("Basic {TOKEN}"))], &body).await;
    assert_eq!((r.status, r.json()["error"].clone()), (401, Value::from("unauthorized")), "another scheme: {}", r.text());
}

/// A request that is not HTTP/1.1 at all gets actix-http's bare 400 and a closed connection, and
/// leaves no ERROR line in the log: a client cannot fill the error log with garbage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_requests_get_400_and_no_error_log_line() {
    let dir = TestDir::new();
    let srv = Server::start(&dir).await;
    for head in ["GARBAGE", "GET / HTTP/9.9", "POST /v1/login HTTP/1.1\r\nHost: x\r\nContent-Length: abc"] {
        let r = raw(srv.addr, head).await;
        assert_eq!((r.status, r.header("connection")), (400, Some("close")), "{head:?}");
    }
    // A request that works afterwards: the log below holds everything the server wrote so far.
    let r = http_full(srv.addr, "GET", "/v1/healthz", &[], "").await;
    assert_eq!(r.status, 200);
    let errors: Vec<String> = srv.log().lines().filter(|l| l.contains("\"ERROR\"")).map(str::to_owned).collect();
    assert!(errors.is_empty(), "error lines for the client's garbage: {errors:?}");
}
