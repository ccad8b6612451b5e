//! A parley cluster of real `parley` processes on 127.0.0.1 for the cluster tests (issue 12):
//! one [`TestDir`] and one [`Server`] per node, node ids 1..=N, every node on ports chosen by the
//! kernel (`--listen 127.0.0.1:0`, `cluster.listen = 127.0.0.1:0`).
//!
//! Node-to-node traffic goes through fault proxies ([`Proxy`]), one per directed link: node i's
//! `cluster.peers` names, for every other node j, the address of the proxy i → j (its own entry
//! is `127.0.0.1:0`, never dialed). So a link can be cut, delayed or black-holed in one
//! direction, and a node that restarts on a new port is reached again by retargeting the proxies
//! that lead to it. Client traffic (HTTP, WebSocket) goes to the nodes directly.
//!
//! Nothing here sleeps to synchronise: [`Cluster::wait_leader`] and the other waits poll a
//! condition (`GET /v1/cluster/status`) every [`POLL`] under a deadline of [`DEADLINE`].

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::proxy::{Mode, Proxy};
use super::{try_http, Server, TestDir};

/// The admin token of every node (`cluster add|remove`).
pub const ADMIN_TOKEN: &str = "it-cluster-admin-token";

/// The longest any cluster-wide condition is awaited (an election, a catch-up). Generous:
/// a condition that holds ends the wait at once.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// How often a condition is polled.
pub const POLL: Duration = Duration::from_millis(50);

/// One node: its directory (kept across restarts, wiped by [`Cluster::wipe`]) and its process.
pub struct Node {
    /// The Raft node id (index + 1).
    pub id: u64,
    pub srv: Server,
    pub dir: TestDir,
}

/// One directed link's proxy: `from` (None: every node, for a node added later, whose address
/// the members learn from `cluster add`) dials `to` through it.
struct Link {
    from: Option<usize>,
    to: usize,
    proxy: Proxy,
}

/// N nodes and their links. Every process is killed when it is dropped.
pub struct Cluster {
    /// By index: node id = index + 1.
    pub nodes: Vec<Node>,
    links: Vec<Link>,
    /// Extra environment of every node (the test's settings).
    extra: Vec<(String, String)>,
}

/// A node's `GET /v1/cluster/status`, the fields the tests look at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    pub node_id: u64,
    pub role: String,
    pub term: u64,
    pub leader: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub members: Vec<u64>,
}

impl Status {
    fn parse(v: &Value) -> Option<Status> {
        let idx = |k: &str| v[k].as_u64().or(v[k].is_null().then_some(0));
        let mut members: Vec<u64> = v["members"].as_array()?.iter().map(|m| m.as_u64()).collect::<Option<_>>()?;
        members.sort();
        Some(Status {
            node_id: v["node_id"].as_u64()?,
            role: v["role"].as_str()?.to_owned(),
            term: v["term"].as_u64()?,
            leader: v["leader"].as_u64(),
            commit_index: idx("commit_index")?,
            applied_index: idx("applied_index")?,
            last_log_index: idx("last_log_index")?,
            members,
        })
    }
}

impl Cluster {
    /// Starts `n` nodes at once, each with `extra` in its environment, and points the proxies
    /// at their node-to-node listeners. Returns once every node printed its listening lines
    /// (the cluster may not have a leader yet: see [`Cluster::wait_leader`]).
    pub async fn start(n: usize, extra: &[(&str, &str)]) -> Cluster {
        let mut links = Vec::new();
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                links.push(Link { from: Some(from), to, proxy: Proxy::start(None).await });
            }
        }
        let mut c = Cluster { nodes: Vec::new(), links, extra: extra.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let dirs: Vec<TestDir> = (0..n).map(|_| TestDir::new()).collect();
        let mut servers: Vec<Server> = (0..n).map(|i| c.prepare(i, n, &dirs[i])).collect();
        futures_util::future::join_all(servers.iter_mut().map(|s| s.restart())).await;
        for (i, (srv, dir)) in servers.into_iter().zip(dirs).enumerate() {
            c.nodes.push(Node { id: i as u64 + 1, srv, dir });
        }
        for i in 0..n {
            c.retarget(i);
        }
        c
    }

    /// Node `i`'s server on `dir`, not started, whose links are retargeted the moment it prints
    /// its node-to-node address (a node may wait for its peers before its HTTP listener is up).
    fn prepare(&self, i: usize, peers: usize, dir: &TestDir) -> Server {
        let env = self.env_of(i, peers);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut srv = Server::prepared(dir, &env);
        let into: Vec<_> = self.links.iter().filter(|l| l.to == i).map(|l| l.proxy.retarget_handle()).collect();
        srv.on_cluster_addr = Some(Box::new(move |a| into.iter().for_each(|r| r.set(Some(a)))));
        srv
    }

    /// The environment of node `i` in a cluster whose peers are nodes `0..peers`: its id, its
    /// listener, and its peers list (the proxies `i → j`, itself as `127.0.0.1:0`).
    fn env_of(&self, i: usize, peers: usize) -> Vec<(String, String)> {
        let list: Vec<String> = (0..peers)
            .map(|j| {
                let addr = if j == i { "127.0.0.1:0".to_owned() } else { self.link(i, j).proxy.addr.to_string() };
                format!("{}={addr}", j + 1)
            })
            .collect();
        let mut env = vec![
            ("PARLEY__CLUSTER__NODE_ID".to_owned(), (i + 1).to_string()),
            ("PARLEY__CLUSTER__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("PARLEY__CLUSTER__PEERS".to_owned(), list.join(",")),
            ("PARLEY__ADMIN__TOKEN".to_owned(), ADMIN_TOKEN.to_owned()),
        ];
        env.extend(self.extra.iter().cloned());
        env
    }

    /// The link `from → to`: its own proxy, or the shared one of a node added later.
    fn link(&self, from: usize, to: usize) -> &Link {
        self.links
            .iter()
            .find(|l| l.to == to && l.from == Some(from))
            .or_else(|| self.links.iter().find(|l| l.to == to && l.from.is_none()))
            .unwrap_or_else(|| panic!("no link {from} -> {to}"))
    }

    /// Points every link into node `i` at its current node-to-node address (none while stopped).
    fn retarget(&self, i: usize) {
        let target = if self.nodes[i].srv.is_running() {
            Some(self.nodes[i].srv.cluster.unwrap_or_else(|| panic!("node {} printed no `parley cluster listening on` line", i + 1)))
        } else {
            None
        };
        for l in self.links.iter().filter(|l| l.to == i) {
            l.proxy.set_target(target);
        }
    }

    /// Node `i`'s HTTP address.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.nodes[i].srv.addr
    }

    /// `http://ADDR` of node `i`.
    pub fn url(&self, i: usize) -> String {
        format!("http://{}", self.addr(i))
    }

    /// Indices of the nodes whose process runs.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].srv.is_running()).collect()
    }

    /// Node `i`'s `GET /v1/cluster/status`; `None` when it does not answer 200 with the fields.
    pub async fn status(&self, i: usize) -> Option<Status> {
        let call = try_http(self.addr(i), "GET", "/v1/cluster/status", None, None);
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(Ok((200, v))) => Some(Status::parse(&v).unwrap_or_else(|| panic!("node {}: a cluster status without its fields: {v}", i + 1))),
            _ => None,
        }
    }

    /// Node `i`'s `GET /v1/healthz` (status, body).
    pub async fn healthz(&self, i: usize) -> (u16, Value) {
        super::http(self.addr(i), "GET", "/v1/healthz", None, None).await
    }

    /// Polls `check` over the statuses of `among` until it returns `Some`, within [`DEADLINE`].
    /// A node that does not answer gives `None` in its place.
    pub async fn poll<R>(&self, what: &str, among: &[usize], mut check: impl FnMut(&[Option<Status>]) -> Option<R>) -> R {
        let t0 = Instant::now();
        let mut last = Vec::new();
        while t0.elapsed() < DEADLINE {
            last.clear();
            for &i in among {
                last.push(self.status(i).await);
            }
            if let Some(r) = check(&last) {
                return r;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("no {what} within {DEADLINE:?} among nodes {:?}; last statuses: {last:#?}", among.iter().map(|i| i + 1).collect::<Vec<_>>());
    }

    /// Waits until the nodes `among` agree on one leader among them: it says it is the leader,
    /// every other one says it is a follower of it, all in the same term. Returns its index.
    pub async fn wait_leader_among(&self, among: &[usize]) -> usize {
        let ids: Vec<u64> = among.iter().map(|&i| self.nodes[i].id).collect();
        self.poll("agreed leader", among, |st| {
            let st: Vec<&Status> = st.iter().map(Option::as_ref).collect::<Option<_>>()?;
            let l = st[0].leader?;
            let leader = st.iter().find(|s| s.node_id == l)?;
            let agreed = st.iter().all(|s| s.leader == Some(l) && s.term == leader.term)
                && leader.role == "leader"
                && st.iter().filter(|s| s.node_id != l).all(|s| s.role == "follower");
            (agreed && ids.contains(&l)).then(|| (l - 1) as usize)
        })
        .await
    }

    /// [`Cluster::wait_leader_among`] the live nodes.
    pub async fn wait_leader(&self) -> usize {
        self.wait_leader_among(&self.live()).await
    }

    /// Waits until every node of `among` has applied at least what the leader had committed
    /// when the wait began, with the leader's members, and names that leader. Returns the
    /// leader's status from the start of the wait.
    pub async fn wait_converged(&self, among: &[usize]) -> Status {
        let l = self.wait_leader_among(among).await;
        let target = self.poll("leader status", &[l], |st| st[0].clone()).await;
        self.poll("converged cluster", among, |st| {
            let st: Vec<&Status> = st.iter().map(Option::as_ref).collect::<Option<_>>()?;
            st.iter()
                .all(|s| s.applied_index >= target.commit_index && s.members == target.members && s.leader.is_some())
                .then_some(())
        })
        .await;
        target
    }

    /// Indices of every node but `i`.
    pub fn others(&self, i: usize) -> Vec<usize> {
        (0..self.nodes.len()).filter(|&j| j != i).collect()
    }

    /// Cuts node `i` off: every link from and to it refuses and closes connections.
    pub fn partition(&self, i: usize) {
        self.isolate(i, Mode::Cut);
    }

    /// Puts every link from and to node `i` in `mode` (`Cut`: a partition that resets
    /// connections; `Drop`: one that silently swallows everything).
    pub fn isolate(&self, i: usize, mode: Mode) {
        for l in self.links.iter().filter(|l| l.to == i || l.from == Some(i)) {
            l.proxy.set_mode(mode);
        }
    }

    /// Sets the mode of the one link `from → to`.
    pub fn set_link(&self, from: usize, to: usize, mode: Mode) {
        self.link(from, to).proxy.set_mode(mode);
    }

    /// Every link back to `Pass`.
    pub fn heal(&self) {
        self.set_all(Mode::Pass);
    }

    /// Every link in `mode`.
    pub fn set_all(&self, mode: Mode) {
        for l in &self.links {
            l.proxy.set_mode(mode);
        }
    }

    /// `kill -9` node `i`; the links into it lead nowhere until it restarts.
    pub async fn kill9(&mut self, i: usize) {
        self.nodes[i].srv.kill9().await;
        self.retarget(i);
    }

    /// Stops node `i` gracefully (SIGTERM) and waits for its exit, which must be 0; the links
    /// into it lead nowhere until it restarts.
    pub async fn stop(&mut self, i: usize) {
        self.nodes[i].srv.sigterm();
        let st = self.nodes[i].srv.wait_exit().await;
        assert!(st.success(), "node {} exited {st} after SIGTERM; log:\n{}", i + 1, self.nodes[i].srv.log());
        self.retarget(i);
    }

    /// Starts node `i` again on its data directory (new ports) and retargets the links into it.
    pub async fn restart(&mut self, i: usize) {
        self.nodes[i].srv.restart().await;
        self.retarget(i);
    }

    /// Restarts the stopped nodes `which` at once (a node may wait for its peers at start-up).
    pub async fn restart_all(&mut self, which: &[usize]) {
        let starts = self.nodes.iter_mut().enumerate().filter(|(i, _)| which.contains(i)).map(|(_, n)| n.srv.restart());
        futures_util::future::join_all(starts).await;
        for &i in which {
            self.retarget(i);
        }
    }

    /// Deletes node `i`'s whole data directory; the node must be stopped.
    pub fn wipe(&self, i: usize) {
        assert!(!self.nodes[i].srv.is_running(), "wipe of running node {}", i + 1);
        let d = self.nodes[i].dir.data();
        std::fs::remove_dir_all(&d).unwrap_or_else(|e| panic!("wipe {}: {e}", d.display()));
    }

    /// Starts one more node (id N+1) that knows every node (its peers list holds all of them
    /// and itself) but is no member yet; the others will reach it through one shared proxy,
    /// whose address [`Cluster::join_addr`] gives for `cluster add --addr`. Returns its index.
    pub async fn start_extra(&mut self) -> usize {
        self.start_extra_with(&[]).await
    }

    /// [`Cluster::start_extra`] with `extra` in that node's environment too (after the
    /// cluster's own, so it wins).
    pub async fn start_extra_with(&mut self, extra: &[(&str, &str)]) -> usize {
        let k = self.nodes.len();
        for to in 0..k {
            let target = self.nodes[to].srv.is_running().then_some(self.nodes[to].srv.cluster).flatten();
            self.links.push(Link { from: Some(k), to, proxy: Proxy::start(target).await });
        }
        self.links.push(Link { from: None, to: k, proxy: Proxy::start(None).await });
        let dir = TestDir::new();
        let mut srv = self.prepare(k, k + 1, &dir);
        if !extra.is_empty() {
            srv.set_env(extra);
        }
        srv.restart().await;
        self.nodes.push(Node { id: k as u64 + 1, srv, dir });
        self.retarget(k);
        k
    }

    /// The node-to-node address the members should dial to reach node `k` (started by
    /// [`Cluster::start_extra`]).
    pub fn join_addr(&self, k: usize) -> SocketAddr {
        self.links.iter().find(|l| l.to == k && l.from.is_none()).expect("a node added with start_extra").proxy.addr
    }

    /// The body of `POST /v1/cluster/members` for node `k`.
    pub fn member_body(&self, k: usize) -> Value {
        json!({"id": self.nodes[k].id, "addr": self.join_addr(k).to_string()})
    }

    /// Bytes that went through any proxy (a check that node-to-node traffic really goes through
    /// the proxies).
    pub fn proxied_bytes(&self) -> u64 {
        self.links.iter().map(|l| l.proxy.counters().bytes.load(std::sync::atomic::Ordering::Relaxed)).sum()
    }
}
