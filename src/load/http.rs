//! A small HTTP/1.1 client for the few JSON calls the load generator makes (register, login,
//! healthz): keep-alive, `Content-Length` or chunked bodies. No TLS, no redirects.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Longest response body accepted, in bytes.
const MAX_BODY: usize = 1 << 20;
/// Longest a request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The server the load goes to: `http://HOST:PORT`.
#[derive(Debug, Clone)]
pub struct Target {
    /// `HOST:PORT` as given, for the `Host` header and the WebSocket URL.
    pub authority: String,
    pub addr: SocketAddr,
}

impl Target {
    /// Parses `http://HOST:PORT[/]` and resolves it. Unless `allow_remote`, the address must be
    /// a loopback address: a load generator must not be pointed at someone else's server by
    /// accident.
    pub async fn parse(url: &str, allow_remote: bool) -> anyhow::Result<Target> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--url must look like http://HOST:PORT (https is not supported)"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            bail!("--url must look like http://HOST:PORT, without a path");
        }
        let with_port = if authority.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addr = tokio::net::lookup_host(&with_port)
            .await
            .with_context(|| format!("cannot resolve {with_port}"))?
            .next()
            .ok_or_else(|| anyhow!("{with_port} resolves to no address"))?;
        if !allow_remote && !addr.ip().is_loopback() {
            bail!("{addr} is not a loopback address; pass --allow-remote to load a remote server");
        }
        Ok(Target { authority: with_port, addr })
    }
}

/// Parses `--url`: one `http://HOST:PORT`, or several separated by commas (the nodes of a
/// cluster; simulated user k uses the (k mod n)-th, see [`super::Ctx::target_of`]). Each is
/// checked as [`Target::parse`] checks it.
pub async fn parse_targets(urls: &str, allow_remote: bool) -> anyhow::Result<Vec<Target>> {
    let mut out = Vec::new();
    for url in urls.split(',').map(str::trim) {
        if url.is_empty() {
            bail!("--url {urls:?}: an empty entry in the list (one http://HOST:PORT per node, separated by commas)");
        }
        out.push(Target::parse(url, allow_remote).await?);
    }
    Ok(out)
}

/// Opens a TCP connection to `addr`, from `source` when given (port chosen by the kernel).
pub async fn tcp_connect(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        // Let connect() pick the port by the whole 4-tuple: bind() with port 0 alone searches
        // for a port free on that address, which gets slow (and blocks a runtime thread) once
        // most ports are in use or in TIME_WAIT.
        no_port_on_bind(&sock);
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Sets `IP_BIND_ADDRESS_NO_PORT` (Linux 4.2+); best effort.
fn no_port_on_bind(sock: &tokio::net::TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a pointer to a c_int of the given length.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A response: status and body.
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// `Retry-After` in seconds, when present.
    pub retry_after: Option<u64>,
}

impl Response {
    /// The body as JSON (`Null` when it is not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// A keep-alive client of one server; reconnects when the server closed the connection.
pub struct Client {
    target: Target,
    conn: Option<BufReader<TcpStream>>,
}

impl Client {
    pub fn new(target: Target) -> Client {
        Client { target, conn: None }
    }

    /// The server it talks to.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// `POST path` with a JSON body.
    pub async fn post(&mut self, path: &str, body: &serde_json::Value) -> anyhow::Result<Response> {
        let b = serde_json::to_vec(body)?;
        self.request("POST", path, Some(&b)).await
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> anyhow::Result<Response> {
        self.request("GET", path, None).await
    }

    /// One request, with one retry on a fresh connection if a reused one turns out closed.
    pub async fn request(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<Response> {
        let reused = self.conn.is_some();
        match tokio::time::timeout(REQUEST_TIMEOUT, self.once(method, path, body)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) if reused => {
                self.conn = None;
                let _ = e;
                tokio::time::timeout(REQUEST_TIMEOUT, self.once(method, path, body))
                    .await
                    .map_err(|_| anyhow!("{method} {path}: timed out"))?
            }
            Ok(Err(e)) => {
                self.conn = None;
                Err(e)
            }
            Err(_) => {
                self.conn = None;
                bail!("{method} {path}: timed out after {REQUEST_TIMEOUT:?}")
            }
        }
    }

    async fn once(&mut self, method: &str, path: &str, body: Option<&[u8]>) -> anyhow::Result<Response> {
        if self.conn.is_none() {
            let s = tcp_connect(self.target.addr, None)
                .await
                .with_context(|| format!("cannot connect to {}", self.target.addr))?;
            self.conn = Some(BufReader::new(s));
        }
        let conn = self.conn.as_mut().ok_or_else(|| anyhow!("no connection"))?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n", self.target.authority);
        if let Some(b) = body {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", b.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        if let Some(b) = body {
            bytes.extend_from_slice(b);
        }
        conn.get_mut().write_all(&bytes).await?;
        let (resp, keep) = read_response(conn).await?;
        if !keep {
            self.conn = None;
        }
        Ok(resp)
    }
}

/// Reads one response; also says whether the connection may be reused.
async fn read_response(r: &mut BufReader<TcpStream>) -> anyhow::Result<(Response, bool)> {
    let mut line = String::new();
    if r.read_line(&mut line).await? == 0 {
        bail!("connection closed before a response");
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    let http10 = line.starts_with("HTTP/1.0");
    let (mut len, mut chunked, mut close, mut retry_after) = (None, false, http10, None);
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("connection closed in the headers");
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "content-length" => len = v.parse::<usize>().ok(),
            "transfer-encoding" => chunked = v.to_ascii_lowercase().contains("chunked"),
            "connection" => close = v.eq_ignore_ascii_case("close"),
            "retry-after" => retry_after = v.parse().ok(),
            _ => {}
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).await?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or("0"), 16)
                .map_err(|_| anyhow!("bad chunk size {line:?}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line).await? == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            if body.len() + size > MAX_BODY {
                bail!("response body over {MAX_BODY} bytes");
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..]).await?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf).await?;
        }
    } else if let Some(n) = len {
        if n > MAX_BODY {
            bail!("response body over {MAX_BODY} bytes");
        }
        body.resize(n, 0);
        r.read_exact(&mut body).await?;
    } else if status != 204 && status != 304 && !(100..200).contains(&status) {
        // No length: the body runs to the end of the connection.
        (&mut *r).take(MAX_BODY as u64).read_to_end(&mut body).await?;
        close = true;
    }
    Ok((Response { status, body, retry_after }, !close))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn url_lists_parse_in_order_and_refuse_empty_or_remote_entries() {
        let t = parse_targets("http://127.0.0.1:7001", false).await.unwrap();
        assert_eq!(t.iter().map(|t| t.authority.as_str()).collect::<Vec<_>>(), ["127.0.0.1:7001"]);
        let t = parse_targets("http://127.0.0.1:7001, http://127.0.0.1:7002/,http://localhost:7003", false).await.unwrap();
        assert_eq!(t.iter().map(|t| t.addr.port()).collect::<Vec<_>>(), [7001, 7002, 7003]);
        for bad in ["http://127.0.0.1:7001,", ",http://127.0.0.1:7001", "http://127.0.0.1:7001,,http://127.0.0.1:7002"] {
            let e = parse_targets(bad, false).await.unwrap_err().to_string();
            assert!(e.contains("empty entry"), "{bad}: {e}");
        }
        let e = parse_targets("http://127.0.0.1:7001,https://127.0.0.1:7002", false).await.unwrap_err().to_string();
        assert!(e.contains("https is not supported"), "{e}");
        let e = parse_targets("http://127.0.0.1:7001,http://192.0.2.1:7002", false).await.unwrap_err().to_string();
        assert!(e.contains("not a loopback address"), "{e}");
    }
}
