//! Many sockets at once, for `idle` and `storm` (native or, for `idle`, XMPP): connecting from a spread of loopback source
//! addresses, with retries, and holding each socket in a small task that only reads (which also
//! answers the server's pings) until told to close or drop it.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use rand::Rng;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::http::Target;
use super::ws::{self, ConnectError, Ws};
use crate::protocol::Encoding;

/// Sockets per source address: under the ~28,000 ephemeral ports of one address, with room for
/// sockets still in TIME_WAIT.
pub const PER_SOURCE: usize = 20_000;

/// The source address of socket `i` when spreading over `sources` addresses (127.0.1.1,
/// 127.0.1.2, ...); `None` (the kernel's choice) for one source.
pub fn source_ip(i: usize, sources: usize) -> Option<IpAddr> {
    if sources <= 1 {
        return None;
    }
    source_ip_from(i, sources, 0)
}

/// The same over the `sources` addresses that start `first` addresses after 127.0.1.1 (a
/// storm's reconnections use fresh addresses: the old ports sit in TIME_WAIT).
pub fn source_ip_from(i: usize, sources: usize, first: usize) -> Option<IpAddr> {
    let base = u32::from(Ipv4Addr::new(127, 0, 1, 1));
    Some(IpAddr::V4(Ipv4Addr::from(base + (first + i % sources.max(1)) as u32)))
}

/// How a connection attempt series ended.
pub struct Connected {
    pub ws: Ws,
    /// Attempts it took (1: first try).
    pub attempts: u32,
    /// Failed attempts' codes (`connect`, `http_503`, `hello`).
    pub failures: Vec<String>,
}

/// Connects and says `hello`, retrying with jittered exponential backoff (honouring
/// `Retry-After`) until `deadline`.
pub async fn connect(target: &Target, source: Option<IpAddr>, token: &str, enc: Encoding, deadline: Instant) -> Result<Connected, Vec<String>> {
    retrying(deadline, || async {
        let mut w = ws::connect(target, source, true).await?;
        match ws::hello(&mut w, token, None, enc, false).await {
            Ok(_) => Ok(Ok(w)),
            Err(_) => Ok(Err("hello".to_owned())),
        }
    })
    .await
}

/// The same over XMPP (`--protocol xmpp`): an RFC 7395 WebSocket, SASL PLAIN, bind `resource`
/// and initial presence ([`super::xmpp::login`]), without stream management.
pub async fn connect_xmpp(target: &Target, source: Option<IpAddr>, user: &str, password: &str, domain: &str, deadline: Instant) -> Result<Connected, Vec<String>> {
    retrying(deadline, || async {
        let mut w = super::xmpp::connect(target, source, true).await?;
        match super::xmpp::login(&mut w, domain, user, password, "idle", false).await {
            Ok(_) => Ok(Ok(w)),
            Err(_) => Ok(Err("xmpp_login".to_owned())),
        }
    })
    .await
}

/// Runs `attempt` until it gives a socket: `Err` is a refused connection (backoff, honouring
/// `Retry-After`), `Ok(Err(code))` a failed login (backoff); both are counted by code.
async fn retrying<F, Fut>(deadline: Instant, mut attempt: F) -> Result<Connected, Vec<String>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Result<Ws, String>, ConnectError>>,
{
    let mut failures = Vec::new();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let wait = match attempt().await {
            Ok(Ok(ws)) => return Ok(Connected { ws, attempts, failures }),
            Ok(Err(code)) => {
                failures.push(code);
                None
            }
            Err(e) => {
                failures.push(e.code());
                match e {
                    ConnectError::Status { retry_after: Some(s), .. } => Some(Duration::from_secs(s)),
                    _ => None,
                }
            }
        };
        let backoff = wait.unwrap_or_else(|| Duration::from_millis(100u64 << attempts.min(5)));
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..=backoff.as_millis() as u64 / 2 + 1));
        if Instant::now() + backoff + jitter >= deadline {
            return Err(failures);
        }
        tokio::time::sleep(backoff + jitter).await;
    }
}

/// How a held socket should end.
#[derive(Debug, Clone, Copy)]
pub enum End {
    /// A WebSocket close, in order.
    Close,
    /// Drop the TCP connection without a close frame, as a client whose network went away.
    Drop,
}

/// A socket held open by its task.
pub struct Held {
    stop: Option<oneshot::Sender<End>>,
    task: JoinHandle<Option<String>>,
}

impl Held {
    /// Holds `ws`: reads until told to end, or until the server closes it.
    pub fn new(mut ws: Ws) -> Held {
        let (tx, mut rx) = oneshot::channel::<End>();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    m = ws.next() => match m {
                        Some(Ok(m)) => {
                            if let Some(code) = ws::close_code(&m) {
                                return Some(code);
                            }
                        }
                        Some(Err(_)) => return Some("socket_error".into()),
                        None => return Some("socket_eof".into()),
                    },
                    end = &mut rx => {
                        if let Ok(End::Close) = end {
                            let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
                        }
                        return None;
                    }
                }
            }
        });
        Held { stop: Some(tx), task }
    }

    /// Asks the task to end this way.
    pub fn end(&mut self, how: End) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(how);
        }
    }

    /// Whether the server closed it (and with what).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Waits for the task; `Some(code)` when the server ended it first.
    pub async fn join(self) -> Option<String> {
        self.task.await.unwrap_or(Some("task_failed".into()))
    }
}

/// Ends every held socket the same way and waits for all of them (at most `limit`).
pub async fn end_all(held: Vec<Held>, how: End, limit: Duration) {
    let mut held = held;
    for h in held.iter_mut() {
        h.end(how);
    }
    let _ = tokio::time::timeout(limit, async {
        for h in held {
            let _ = h.join().await;
        }
    })
    .await;
}

/// Prints `LABEL: K/N WHAT (S s)` each second, from `count`, until aborted (unless `quiet`).
pub fn ticker(label: &'static str, what: &'static str, count: Arc<AtomicU64>, n: usize, quiet: bool, t0: Instant) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if !quiet {
                eprintln!("{label}: {}/{n} {what} ({:.0} s)", count.load(Ordering::Relaxed), t0.elapsed().as_secs_f64());
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_spread_over_loopback() {
        assert_eq!(source_ip(5, 1), None);
        assert_eq!(source_ip(0, 3), Some("127.0.1.1".parse().unwrap()));
        assert_eq!(source_ip(4, 3), Some("127.0.1.2".parse().unwrap()));
        assert_eq!(source_ip(255, 300), Some("127.0.2.0".parse().unwrap()));
        assert_eq!(source_ip_from(3, 2, 2), Some("127.0.1.4".parse().unwrap()));
    }
}
