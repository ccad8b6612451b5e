//! A TCP fault proxy for one directed link between two cluster nodes (issue 12's harness): it
//! listens on `127.0.0.1:0` and forwards every connection to a target that can change at run time
//! (the node behind it restarts on a new port), and it can cut, delay or black-hole the link.
//!
//! One proxy carries one direction of node-to-node traffic, i → j: node i dials j at the proxy's
//! address (its `cluster.peers` says so), so faults are per directed link. A Raft RPC is a
//! request and its answer on the connection i opened, so both byte directions of that connection
//! go through the same proxy (and the same fault).
//!
//! Modes ([`Mode`]):
//! - `Pass`: bytes go through as they come.
//! - `Cut`: a partition. Every open connection is closed at once and every new one is closed as
//!   soon as it is accepted, without dialing the target.
//! - `Delay(d)`: every chunk is written `d` after it was read, in order, in both directions
//!   (latency, not a bandwidth limit).
//! - `Drop`: a black hole. Connections stay open and everything read is thrown away, in both
//!   directions; a new connection is accepted and never dialed through. Leaving `Drop` closes the
//!   connections that lost bytes (their streams have holes).
//!
//! Nothing here sleeps to synchronise: tasks wait for bytes, for a mode change (a `watch`), or
//! for the due time of a delayed chunk.

#![allow(dead_code)] // not every test uses every mode

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// What the proxy does to the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    Delay(Duration),
    Drop,
}

/// The mode and the generation of connections allowed to live: a connection accepted in
/// generation g ends when `kill_gen` passes g.
#[derive(Clone, Copy, Debug)]
struct Control {
    mode: Mode,
    kill_gen: u64,
}

/// Counters, for tests of the proxy and for post-mortems.
#[derive(Default, Debug)]
pub struct Counters {
    /// Connections accepted (in any mode).
    pub accepted: AtomicU64,
    /// Connections dialed through to the target and forwarding.
    pub forwarded: AtomicU64,
    /// Connections closed at accept because the link was cut or had no reachable target.
    pub refused: AtomicU64,
    /// Bytes written on to the other side (both directions).
    pub bytes: AtomicU64,
    /// Bytes read and thrown away in `Drop` mode (both directions).
    pub dropped: AtomicU64,
}

/// Shared by the proxy handle, its accept loop and its connections.
struct Inner {
    /// Where connections go; `None`: nowhere (the node behind is not running), connections are
    /// closed at once. Read by the accept loop for each new connection.
    target: Mutex<Option<SocketAddr>>,
    /// Sent by [`Proxy::set_mode`] and [`Proxy::kill_connections`]; every connection task
    /// holds a receiver and reacts to each change.
    control: watch::Sender<Control>,
    counters: Counters,
}

/// One directed link's proxy. The accept loop and every connection end when it is dropped.
pub struct Proxy {
    /// The address to dial instead of the target.
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    /// The accept loop; aborted on drop (its connections see the `watch` sender go and end).
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Proxy {
    /// A proxy on `127.0.0.1:0` forwarding to `target` (none yet: connections are closed).
    pub async fn start(target: Option<SocketAddr>) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("proxy bind");
        let addr = listener.local_addr().expect("proxy address");
        let (control, _) = watch::channel(Control { mode: Mode::Pass, kill_gen: 0 });
        let inner = Arc::new(Inner { target: Mutex::new(target), control, counters: Counters::default() });
        let accept = tokio::spawn(accept_loop(listener, inner.clone()));
        Proxy { addr, inner, accept }
    }

    /// New connections go to `target` from now on; open ones are closed when it changed (they
    /// lead to the previous run of the node, which is gone).
    pub fn set_target(&self, target: Option<SocketAddr>) {
        self.retarget_handle().set(target);
    }

    /// A handle that retargets this proxy from elsewhere (a callback that sees the node's new
    /// address before the test does).
    pub fn retarget_handle(&self) -> Retarget {
        Retarget(self.inner.clone())
    }

    pub fn target(&self) -> Option<SocketAddr> {
        *self.inner.target.lock().unwrap()
    }

    /// Changes the mode. Into `Cut`, and out of `Drop`, closes every open connection.
    pub fn set_mode(&self, mode: Mode) {
        self.inner.control.send_modify(|c| {
            let kill = mode == Mode::Cut || (c.mode == Mode::Drop && mode != Mode::Drop);
            c.mode = mode;
            if kill {
                c.kill_gen += 1;
            }
        });
    }

    pub fn mode(&self) -> Mode {
        self.inner.control.borrow().mode
    }

    /// Closes every open connection (new ones are accepted as the mode says).
    pub fn kill_connections(&self) {
        self.inner.control.send_modify(|c| c.kill_gen += 1);
    }

    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }
}

/// Retargets one proxy ([`Proxy::retarget_handle`]).
#[derive(Clone)]
pub struct Retarget(Arc<Inner>);

impl Retarget {
    /// See [`Proxy::set_target`].
    pub fn set(&self, target: Option<SocketAddr>) {
        let changed = std::mem::replace(&mut *self.0.target.lock().unwrap(), target) != target;
        if changed {
            self.0.control.send_modify(|c| c.kill_gen += 1);
        }
    }
}

async fn accept_loop(listener: TcpListener, inner: Arc<Inner>) {
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        inner.counters.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = client.set_nodelay(true);
        let ctl = inner.control.subscribe();
        let gen = ctl.borrow().kill_gen;
        tokio::spawn(connection(client, inner.clone(), ctl, gen));
    }
}

/// Closes `s` with a reset, as a dead link or a refusing host does (no lingering FIN handshake):
/// `SO_LINGER` with a zero timeout, then close (which then does not block).
fn reset(s: TcpStream) {
    use std::os::fd::AsRawFd;
    let lin = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: a valid socket fd and a pointer to a linger struct of the given length.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&lin as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    drop(s);
}

/// One accepted connection, from dial to its end.
async fn connection(client: TcpStream, inner: Arc<Inner>, mut ctl: watch::Receiver<Control>, gen: u64) {
    let mode = ctl.borrow().mode;
    match mode {
        Mode::Cut => {
            inner.counters.refused.fetch_add(1, Ordering::Relaxed);
            return reset(client);
        }
        Mode::Drop => return blackhole(client, inner, ctl, gen).await,
        Mode::Pass | Mode::Delay(_) => {}
    }
    let target = *inner.target.lock().unwrap();
    let dialed = match target {
        Some(t) => tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(t)) => r.ok().and_then(Result::ok),
            _ = killed(&mut ctl, gen) => None,
        },
        None => None,
    };
    let Some(server) = dialed else {
        inner.counters.refused.fetch_add(1, Ordering::Relaxed);
        return reset(client);
    };
    let _ = server.set_nodelay(true);
    inner.counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = pipe(cr, sw, inner.clone(), ctl.clone(), gen);
    let down = pipe(sr, cw, inner.clone(), ctl.clone(), gen);
    // The connection lives until both directions ended (each passes its EOF on as a shutdown)
    // or it is killed: dropping the halves closes both sockets.
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = killed(&mut ctl, gen) => {}
    }
}

/// Resolves once connections of generation `gen` must end (or the proxy is gone).
async fn killed(ctl: &mut watch::Receiver<Control>, gen: u64) {
    loop {
        if ctl.borrow_and_update().kill_gen != gen {
            return;
        }
        if ctl.changed().await.is_err() {
            return;
        }
    }
}

/// A connection accepted in `Drop` mode: read and discard until it ends or is killed.
async fn blackhole(mut client: TcpStream, inner: Arc<Inner>, mut ctl: watch::Receiver<Control>, gen: u64) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = client.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => { inner.counters.dropped.fetch_add(n as u64, Ordering::Relaxed); }
            },
            _ = killed(&mut ctl, gen) => return reset(client),
        }
    }
}

/// One byte direction of a forwarded connection, under the current mode: `Pass` writes at once,
/// `Delay(d)` writes each chunk `d` after it was read (a writer task keeps the order), `Drop`
/// discards. Returns when the source ends or a write fails.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, inner: Arc<Inner>, ctl: watch::Receiver<Control>, gen: u64) {
    // The writer: chunks with their due time, in read order. It ends when the reader drops the
    // sender (after the last chunk) or a write fails.
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let inner_w = inner.clone();
    let writer = async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            inner_w.counters.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let c = *ctl.borrow();
            if c.kill_gen != gen {
                return;
            }
            let due = match c.mode {
                Mode::Pass => Instant::now(),
                Mode::Delay(d) => Instant::now() + d,
                Mode::Drop => {
                    inner.counters.dropped.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                Mode::Cut => return,
            };
            if tx.send((due, buf[..n].to_vec())).is_err() {
                return;
            }
        }
    };
    // The writer must finish the delayed chunks after the reader saw EOF; the connection ends
    // when both are done (or a kill ends the whole connection in `connection`).
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    //! The proxy's own tests, against an echo server that counts what reaches it.

    use super::*;
    use crate::common::{within, T};

    /// An echo server on `127.0.0.1:0` that prefixes nothing and counts connections and bytes.
    struct Echo {
        addr: SocketAddr,
        conns: Arc<AtomicU64>,
        bytes: Arc<AtomicU64>,
        task: JoinHandle<()>,
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Echo {
        async fn start() -> Echo {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr");
            let (conns, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
            let (c, b) = (conns.clone(), bytes.clone());
            let task = tokio::spawn(async move {
                while let Ok((mut s, _)) = l.accept().await {
                    c.fetch_add(1, Ordering::SeqCst);
                    let b = b.clone();
                    tokio::spawn(async move {
                        let mut buf = [0u8; 4096];
                        while let Ok(n) = s.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            b.fetch_add(n as u64, Ordering::SeqCst);
                            if s.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                }
            });
            Echo { addr, conns, bytes, task }
        }
    }

    /// Writes `msg` and reads exactly as many bytes back.
    async fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        within(T, "the echo", s.read_exact(&mut back)).await.expect("read the echo");
        back
    }

    /// Whether the peer closed `s` (EOF or reset) within [`T`]; bytes before the close fail.
    async fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 64];
        match tokio::time::timeout(T, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => panic!("{n} bytes from a link that should be closed"),
            Err(_) => false,
        }
    }

    /// Waits (bounded) until `cond` holds, polling every 5 ms.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        within(T, what, async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
    }

    #[tokio::test]
    async fn proxy_passes_bytes_both_ways_and_follows_a_new_target() {
        let (a, b) = (Echo::start().await, Echo::start().await);
        let p = Proxy::start(Some(a.addr)).await;
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&mut s, &msg).await, msg);
        assert_eq!(a.bytes.load(Ordering::SeqCst), msg.len() as u64);
        assert_eq!(p.counters().bytes.load(Ordering::Relaxed), 2 * msg.len() as u64);

        // Retarget: the open connection (to the old run) is closed, a new one reaches `b`.
        p.set_target(Some(b.addr));
        assert!(closed(&mut s).await, "the connection to the old target stays open");
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        assert_eq!(round_trip(&mut s, b"to b").await, b"to b");
        assert_eq!((a.conns.load(Ordering::SeqCst), b.conns.load(Ordering::SeqCst)), (1, 1));

        // No target: accepted and closed at once.
        p.set_target(None);
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        assert!(closed(&mut s).await, "a connection with no target stays open");
        assert_eq!(b.conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn proxy_cut_closes_open_and_new_connections_until_healed() {
        let e = Echo::start().await;
        let p = Proxy::start(Some(e.addr)).await;
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        assert_eq!(round_trip(&mut s, b"before").await, b"before");

        p.set_mode(Mode::Cut);
        assert!(closed(&mut s).await, "an open connection survived the cut");
        for _ in 0..3 {
            let mut s = TcpStream::connect(p.addr).await.expect("connect (accepted, then closed)");
            let _ = s.write_all(b"while cut").await;
            assert!(closed(&mut s).await, "a new connection through a cut link stays open");
        }
        assert_eq!(e.conns.load(Ordering::SeqCst), 1, "the cut link dialed the target");
        assert_eq!(e.bytes.load(Ordering::SeqCst), 6, "bytes crossed the cut link");

        p.set_mode(Mode::Pass);
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        assert_eq!(round_trip(&mut s, b"healed").await, b"healed");
    }

    #[tokio::test]
    async fn proxy_delay_holds_each_direction_back_in_order() {
        let e = Echo::start().await;
        let p = Proxy::start(Some(e.addr)).await;
        let d = Duration::from_millis(150);
        p.set_mode(Mode::Delay(d));
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        let t0 = Instant::now();
        // Several writes in a row come back whole and in order, each at least 2 d later (d
        // there, d back): the delay is a lower bound, whatever the machine's speed.
        let mut sent = Vec::new();
        for i in 0..5u8 {
            let chunk = vec![i; 1000];
            s.write_all(&chunk).await.expect("write");
            sent.extend(chunk);
        }
        let mut back = vec![0u8; sent.len()];
        within(T, "the delayed echo", s.read_exact(&mut back)).await.expect("read");
        assert_eq!(back, sent, "the delayed bytes came back altered or out of order");
        assert!(t0.elapsed() >= 2 * d, "a round trip through Delay({d:?}) took {:?}", t0.elapsed());

        p.set_mode(Mode::Pass);
        assert_eq!(round_trip(&mut s, b"undelayed").await, b"undelayed", "the connection survives the mode change");
    }

    #[tokio::test]
    async fn proxy_drop_blackholes_and_leaving_it_closes_the_holed_connections() {
        let e = Echo::start().await;
        let p = Proxy::start(Some(e.addr)).await;
        let mut open = TcpStream::connect(p.addr).await.expect("connect");
        assert_eq!(round_trip(&mut open, b"first").await, b"first");

        p.set_mode(Mode::Drop);
        open.write_all(b"into the hole").await.expect("write");
        let mut fresh = TcpStream::connect(p.addr).await.expect("a black hole accepts");
        fresh.write_all(b"also into the hole").await.expect("write");
        // Both chunks reach the proxy and are thrown away; the echo server sees neither and no
        // new connection.
        let want = (b"into the hole".len() + b"also into the hole".len()) as u64;
        until("the proxy to swallow both chunks", || p.counters().dropped.load(Ordering::Relaxed) >= want).await;
        assert_eq!(p.counters().dropped.load(Ordering::Relaxed), want);
        assert_eq!((e.conns.load(Ordering::SeqCst), e.bytes.load(Ordering::SeqCst)), (1, 5), "bytes escaped the black hole");

        // Leaving Drop closes both (their streams lost bytes); new connections pass again.
        p.set_mode(Mode::Pass);
        assert!(closed(&mut open).await, "a connection that lost bytes stays open after the drop");
        assert!(closed(&mut fresh).await, "a black-holed connection stays open after the drop");
        let mut s = TcpStream::connect(p.addr).await.expect("connect");
        assert_eq!(round_trip(&mut s, b"after").await, b"after");
    }
}
