//! Configuration: one struct, layered and validated before anything starts.
//!
//! Layers, later wins: the embedded `config/default.toml`, the `--config FILE`, environment
//! variables `PARLEY__SECTION__KEY`, then command-line flags. Unknown keys are errors, so a typo
//! does not silently fall back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::Deserialize;

/// The embedded defaults (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// A configuration that cannot be used; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value could not be read (wrong type, unknown key, unreadable file). The message names
    /// the key as `section.key`, where it came from, and for an unknown key the nearest known one.
    #[error("configuration error: {}", describe(.0))]
    Load(#[from] Box<figment::Error>),
    /// A value was read but is out of range.
    #[error("configuration error: key `{key}`: {reason}")]
    Invalid {
        /// `section.key`.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// All settings. See `config/default.toml` for units and defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub auth: AuthConfig,
    pub session: SessionConfig,
    pub limits: LimitsConfig,
    pub admission: AdmissionConfig,
    pub admin: AdminConfig,
    pub retention: RetentionConfig,
    pub log: LogConfig,
    pub xmpp: XmppConfig,
    pub cluster: ClusterConfig,
}

/// `[cluster]`: the 3-node Raft cluster (issue 12). With `node_id = 0`, the default, there is no
/// cluster at all and nothing else here is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This server's Raft node id; 0 = a single node (no cluster), the default.
    pub node_id: u64,
    /// Node-to-node listener, `IP:port`; required when `node_id` is not 0.
    pub listen: String,
    /// Every node of the cluster, itself included, as `"ID=HOST:PORT"` (its node-to-node
    /// address). From the environment (`PARLEY__CLUSTER__PEERS`) a comma-separated string.
    pub peers: Peers,
    /// How often the leader sends heartbeats (Raft paper §5.2), ms. openraft 0.9 also gives each
    /// AppendEntries and each read-index round this long to be answered, so it must exceed the
    /// node-to-node round trip plus a follower's fsync (a WAN link needs more than the default).
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in `[t, 1.5t)` ms starts an election
    /// (Raft paper §5.2: randomized election timeouts); one that heard the leader within 1.5t
    /// refuses to vote (openraft's leader lease). At least 3 × `heartbeat_ms`.
    pub election_timeout_ms: u64,
    /// A write not committed on a quorum and applied on this node within this many ms is
    /// answered `unavailable` (the client resends with the same id; never a false ack).
    pub commit_timeout_ms: u64,
    /// A snapshot of the state every this many log entries (openraft's
    /// `SnapshotPolicy::LogsSinceLast`); the log below it may then be purged.
    pub snapshot_entries: u64,
    /// Log entries kept below the newest snapshot (openraft's `max_in_snapshot_log_to_keep`), so a
    /// follower that is a little behind, or that catches up while a long snapshot transfer runs,
    /// is served from the log rather than sent another snapshot (openraft issue #1706).
    pub keep_entries: u64,
}

/// `cluster.peers`: a TOML list of strings, or one comma-separated string (the environment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Peers(pub Vec<String>);

impl<'de> Deserialize<'de> for Peers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            List(Vec<String>),
            Csv(String),
        }
        Ok(Peers(match Form::deserialize(d)? {
            Form::List(v) => v,
            Form::Csv(s) => s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(str::to_owned).collect(),
        }))
    }
}

impl ClusterConfig {
    /// `peers` parsed: node id → `HOST:PORT`. The error says which entry is wrong and why
    /// (an id that is not a u64 above 0, a repeated id, an address without `HOST:PORT`, or a
    /// list that does not name `node_id` itself).
    pub fn peer_map(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let out = self.parse_peers()?;
        if !out.contains_key(&self.node_id) {
            return Err(format!("must list this node itself (cluster.node_id = {})", self.node_id));
        }
        Ok(out)
    }

    /// `peers` parsed entry by entry, without asking that `node_id` be among them (so a bad
    /// entry is reported as such even while `node_id` is unset).
    fn parse_peers(&self) -> Result<std::collections::BTreeMap<u64, String>, String> {
        let mut out = std::collections::BTreeMap::new();
        for p in &self.peers.0 {
            let Some((id, addr)) = p.split_once('=') else {
                return Err(format!("`{p}` is not \"ID=HOST:PORT\""));
            };
            let id: u64 = match id.trim().parse() {
                Ok(id) if id > 0 => id,
                _ => return Err(format!("`{p}`: the id must be a whole number above 0")),
            };
            let addr = addr.trim();
            // Port 0 only for the node itself (whose own entry is never dialed).
            let port_ok = addr.rsplit_once(':').is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok_and(|n| n > 0 || id == self.node_id));
            if !port_ok {
                return Err(format!("`{p}`: `{addr}` is not HOST:PORT"));
            }
            if out.insert(id, addr.to_owned()).is_some() {
                return Err(format!("node id {id} is listed twice"));
            }
        }
        Ok(out)
    }
}

/// `[xmpp]`: the XMPP gateway (RFC 6120 client-to-server TCP, RFC 7395 WebSocket at
/// `/xmpp-websocket` on the HTTP listener).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct XmppConfig {
    /// TCP listener for client-to-server streams (RFC 6120), `IP:port`; empty turns it off.
    pub listen: String,
    /// The XMPP domain: JIDs are `user@domain/device`.
    pub domain: String,
    /// Whether SASL (PLAIN and SCRAM) and XEP-0077 registration are offered on a stream without
    /// TLS: `true`, `false`, or `"auto"` (true only when the listener is a loopback address).
    pub allow_plaintext: Plaintext,
    /// PEM certificate chain for STARTTLS; empty: no STARTTLS.
    pub tls_cert: String,
    /// PEM private key for STARTTLS; empty: no STARTTLS.
    pub tls_key: String,
}

/// `xmpp.allow_plaintext`: a boolean, or `"auto"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Plaintext {
    /// Explicitly on or off.
    Set(bool),
    /// A word: only `"auto"` is valid (checked by `validate`); figment reads `true`/`false` from
    /// the environment as strings too, so those are accepted here.
    Word(String),
}

impl Plaintext {
    /// Whether plain-text authentication is allowed on a listener bound to `addr`.
    pub fn allowed(&self, addr: std::net::IpAddr) -> bool {
        match self {
            Plaintext::Set(b) => *b,
            Plaintext::Word(w) if w.eq_ignore_ascii_case("true") => true,
            Plaintext::Word(w) if w.eq_ignore_ascii_case("false") => false,
            Plaintext::Word(_) => addr.is_loopback(),
        }
    }
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Bearer token of the HTTP admin endpoints; empty disables them.
    pub token: String,
}

/// `[retention]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// `forever`, `days` or `delivered`.
    pub mode: String,
    /// Days to keep, for `days`.
    pub days: u64,
    /// Job interval, ms.
    pub interval_ms: u64,
    /// Messages per purge entry.
    pub batch: u32,
}

/// `[admission]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Upgrades per second.
    pub upgrades_per_s: f64,
    /// Upgrade burst.
    pub upgrade_burst: f64,
    /// Open socket cap.
    pub max_sockets: usize,
    /// Retry-After upper bound, s.
    pub retry_after_max_s: u64,
}

/// `[limits]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most members of a group.
    pub group_max_members: u32,
    /// Send rate per user, messages per second.
    pub send_rate_per_s: f64,
    /// Send burst per user, messages.
    pub send_burst: f64,
    /// Failed logins per IP in a burst.
    pub failed_login_burst: f64,
    /// Failed logins per IP per minute (refill).
    pub failed_logins_per_min: f64,
    /// Bad frames per socket per minute before close 4003.
    pub bad_frames_per_min: u32,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address, host:port.
    pub listen: String,
    /// Data directory.
    pub data_dir: PathBuf,
    /// HTTP worker threads; 0 = one per core.
    pub workers: usize,
    /// Whether registration is open.
    pub registration_open: bool,
    /// Graceful shutdown deadline, ms.
    pub shutdown_timeout_ms: u64,
    /// Longest an HTTP request body (register, login, backup) may take to arrive, ms; then
    /// `408` (actix's `client_request_timeout` covers only the head).
    pub body_timeout_ms: u64,
    /// Listen backlog of every listening socket (HTTP, XMPP, cluster), in connections: how
    /// many completed connections the kernel queues until parley accepts them (`listen(2)`;
    /// Linux caps it at `net.core.somaxconn`). Rust's standard library listens with 128, which
    /// a reconnect storm overflows: the kernel then drops the handshakes and the clients
    /// retransmit their SYN after 1, 3 and 7 s.
    pub listen_backlog: u32,
}

/// `[storage]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// Log segment size, bytes.
    pub segment_bytes: u64,
    /// Group commit window, µs.
    pub batch_window_us: u64,
    /// Most commands per batch.
    pub batch_max_commands: usize,
    /// Pipeline queue capacity, commands.
    pub queue_capacity: usize,
    /// Checkpoint interval, ms.
    pub checkpoint_interval_ms: u64,
    /// Checkpoint after this much log growth, bytes.
    pub checkpoint_log_bytes: u64,
    /// Least time between two snapshots (taken at checkpoints), ms.
    pub snapshot_interval_ms: u64,
    /// How often the materializer writes applied state from memory to sled, ms.
    pub materialize_interval_ms: u64,
    /// Whether the materializer's sled writes run at the lowest CPU priority (Linux
    /// `SCHED_IDLE`; see [`IdleWriter`](crate::storage::store::IdleWriter)).
    pub materialize_idle_priority: bool,
    /// sled cache, bytes.
    pub cache_bytes: u64,
}

/// `[auth]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// argon2id memory, KiB.
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    pub argon2_iterations: u32,
    /// argon2id lanes.
    pub argon2_parallelism: u32,
    /// Password hashes and verifications (argon2id, `argon2_memory_kib` each) running at once,
    /// server-wide; 0 = one per CPU core. Bounds the memory that logins and registrations can
    /// take: at most this × `argon2_memory_kib`.
    pub max_concurrent_hashes: u32,
    /// How long a login or registration waits for a free hash slot, ms; past that it gets
    /// `503 overloaded` with `Retry-After` (XMPP: `<temporary-auth-failure/>`).
    pub hash_wait_ms: u64,
}

/// `[session]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    /// Hello timeout, ms.
    pub hello_timeout_ms: u64,
    /// Frame cap after hello, bytes.
    pub max_frame_bytes: usize,
    /// Frame cap before hello, bytes.
    pub unauth_max_frame_bytes: usize,
    /// Outbound queue, frames.
    pub outbound_queue_frames: usize,
    /// Outbound queue, bytes.
    pub outbound_queue_bytes: usize,
    /// Slow-consumer timeout, ms.
    pub slow_consumer_timeout_ms: u64,
    /// How long a connection may outlive its session before it is aborted, ms.
    pub slow_close_wait_ms: u64,
    /// Ping interval, ms.
    pub ping_interval_ms: u64,
    /// Pong timeout, ms.
    pub ping_timeout_ms: u64,
    /// Supervision intensity, restarts.
    pub restart_intensity: u32,
    /// Supervision period, ms.
    pub restart_period_ms: u64,
    /// Resync page, events.
    pub sync_page_events: usize,
    /// Typing expiry, ms.
    pub typing_timeout_ms: u64,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// EnvFilter directive.
    pub level: String,
    /// `text` or `json`.
    pub format: String,
}

/// The `PARLEY__SECTION__KEY` variables as figment's [`Env`] reads them, except that a scalar
/// stays the string it is. `Env` parses `1234567890123456` as a number and `true` as a boolean,
/// so a string setting (`admin.token`, `xmpp.domain`) could not be all digits (Figment issues
/// #42 and #70); numeric and boolean settings still get theirs through
/// [`Figment::extract_lossy`]. A value that starts with `[` or `{` is parsed as `Env` does.
pub struct EnvStrings(pub Env);

impl figment::Provider for EnvStrings {
    fn metadata(&self) -> figment::Metadata {
        self.0.metadata()
    }

    fn data(&self) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        use figment::value::{Dict, Value};
        fn merge(into: &mut Dict, from: Dict) {
            for (k, v) in from {
                match (into.get_mut(&k), v) {
                    (Some(Value::Dict(_, a)), Value::Dict(_, b)) => merge(a, b),
                    (_, v) => {
                        into.insert(k, v);
                    }
                }
            }
        }
        let mut dict = Dict::new();
        for (key, raw) in self.0.iter() {
            let value = if raw.trim_start().starts_with(['[', '{']) { raw.parse().unwrap_or_else(|_| Value::from(raw)) } else { Value::from(raw) };
            if let Some(nested) = figment::util::nest(key.as_str(), value).into_dict() {
                merge(&mut dict, nested);
            }
        }
        Ok(figment::Profile::Default.collect(dict))
    }
}

impl Config {
    /// Loads defaults, then `file` (if any), then `PARLEY__SECTION__KEY` variables; validates.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        Self::load_from(file, EnvStrings(Env::prefixed("PARLEY__").split("__")))
    }

    /// The embedded defaults alone (for tests and tools), validated.
    pub fn defaults() -> Result<Config, ConfigError> {
        let c: Config = Figment::from(Toml::string(DEFAULT_TOML)).extract().map_err(Box::new)?;
        c.validate()?;
        Ok(c)
    }

    fn load_from(file: Option<&Path>, env: EnvStrings) -> Result<Config, ConfigError> {
        let mut fig = Figment::from(Toml::string(DEFAULT_TOML));
        if let Some(f) = file {
            if !f.exists() {
                return Err(ConfigError::Invalid { key: "--config", reason: format!("{} does not exist", f.display()) });
            }
            // `file_exact`: the file named, not one of the same name in a parent directory.
            fig = fig.merge(Toml::file_exact(f));
        }
        // The file strictly: in TOML a number is a number, so `send_burst = "10"` is a type
        // error naming the key, as the variables' `"soon"` is below.
        if file.is_some() {
            fig.extract::<Config>().map_err(Box::new)?;
        }
        let fig = fig.merge(env);
        // Lossy: a number or a boolean from the environment arrives as a string (`EnvStrings`).
        let c: Config = fig.extract_lossy().map_err(Box::new)?;
        // A range error says where the value came from, as a type error does (figment knows
        // which layer gave each key).
        c.validate().map_err(|e| match e {
            ConfigError::Invalid { key, reason } => {
                let from = |k: &str| fig.find_metadata(k).map(|m| origin(m, k)).unwrap_or_default();
                let mut full = format!("{reason}{}", from(key));
                // A check across keys (`ping_timeout_ms` > `ping_interval_ms`) also says where
                // the other key it names was set, which may be the one the user changed.
                let words = reason.split(|c: char| !(c.is_ascii_lowercase() || c == '_' || c == '.'));
                let others: std::collections::BTreeSet<&str> = words.filter(|w| w.contains('.') && *w != key).collect();
                for other in others {
                    let o = from(other);
                    if !o.is_empty() {
                        full.push_str(&format!("; {other} was set{o}"));
                    }
                }
                ConfigError::Invalid { key, reason: full }
            }
            e => e,
        })?;
        Ok(c)
    }

    /// Checks ranges; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn bad(key: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError::Invalid { key, reason: reason.into() })
        }
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return bad("server.listen", format!("`{}` is not an address like 127.0.0.1:8080", self.server.listen));
        }
        if self.server.workers > 512 {
            return bad("server.workers", "must be at most 512 (0 = one per CPU core)");
        }
        if self.storage.segment_bytes < 4096 {
            return bad("storage.segment_bytes", "must be at least 4096");
        }
        if self.storage.batch_max_commands == 0 {
            return bad("storage.batch_max_commands", "must be at least 1");
        }
        if self.storage.batch_window_us > 100_000 {
            return bad("storage.batch_window_us", "must be at most 100000 (100 ms)");
        }
        if self.storage.queue_capacity == 0 {
            return bad("storage.queue_capacity", "must be at least 1");
        }
        if self.storage.checkpoint_interval_ms == 0 {
            return bad("storage.checkpoint_interval_ms", "must be at least 1");
        }
        if self.storage.snapshot_interval_ms == 0 {
            return bad("storage.snapshot_interval_ms", "must be at least 1");
        }
        if !(1..=10_000).contains(&self.storage.materialize_interval_ms) {
            return bad("storage.materialize_interval_ms", "must be from 1 to 10000 (10 s)");
        }
        if self.storage.cache_bytes < 1 << 20 {
            // sled panics below 256 bytes; a cache this small is a typo anyway.
            return bad("storage.cache_bytes", "must be at least 1048576 (1 MiB)");
        }
        if !(1..=255).contains(&self.auth.argon2_parallelism) {
            return bad("auth.argon2_parallelism", "must be from 1 to 255");
        }
        if !(8 * self.auth.argon2_parallelism..=1 << 20).contains(&self.auth.argon2_memory_kib) {
            return bad("auth.argon2_memory_kib", "must be from 8 × argon2_parallelism to 1048576 (1 GiB)");
        }
        if !(1..=1000).contains(&self.auth.argon2_iterations) {
            return bad("auth.argon2_iterations", "must be from 1 to 1000");
        }
        if let Err(e) = argon2::Params::new(self.auth.argon2_memory_kib, self.auth.argon2_iterations, self.auth.argon2_parallelism, None) {
            // Hashing would otherwise fall back to the library's defaults without a word.
            return bad("auth.argon2_memory_kib", format!("the argon2 parameters are refused: {e}"));
        }
        if self.auth.max_concurrent_hashes > 1024 {
            return bad("auth.max_concurrent_hashes", "must be from 0 (one per CPU core) to 1024");
        }
        if self.auth.hash_wait_ms > 600_000 {
            return bad("auth.hash_wait_ms", "must be at most 600000 (10 min)");
        }
        if self.session.hello_timeout_ms == 0 {
            return bad("session.hello_timeout_ms", "must be at least 1");
        }
        if self.session.max_frame_bytes < 1024 {
            return bad("session.max_frame_bytes", "must be at least 1024");
        }
        if self.session.unauth_max_frame_bytes < 256 {
            return bad("session.unauth_max_frame_bytes", "must be at least 256");
        }
        if self.session.outbound_queue_frames < 16 {
            return bad("session.outbound_queue_frames", "must be at least 16");
        }
        if !(1..=65_535).contains(&self.server.listen_backlog) {
            return bad("server.listen_backlog", "must be from 1 to 65535");
        }
        if !(1..=600_000).contains(&self.server.body_timeout_ms) {
            return bad("server.body_timeout_ms", "must be from 1 to 600000 (10 min)");
        }
        if self.session.ping_interval_ms == 0 {
            return bad("session.ping_interval_ms", "must be at least 1");
        }
        if self.session.ping_timeout_ms <= self.session.ping_interval_ms {
            return bad("session.ping_timeout_ms", "must be greater than session.ping_interval_ms (> 0)");
        }
        if self.session.sync_page_events == 0 {
            return bad("session.sync_page_events", "must be at least 1");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return bad("log.level", &format!("`{}` is not a tracing filter (e.g. `info`, `parley=debug,warn`): {e}", self.log.level));
        }
        if self.session.typing_timeout_ms == 0 {
            return bad("session.typing_timeout_ms", "must be at least 1");
        }
        if self.limits.group_max_members < 2 {
            return bad("limits.group_max_members", "must be at least 2");
        }
        if !(self.limits.send_rate_per_s > 0.0) {
            return bad("limits.send_rate_per_s", "must be greater than 0");
        }
        if !(self.limits.send_burst >= 1.0) {
            return bad("limits.send_burst", "must be at least 1");
        }
        if self.session.slow_consumer_timeout_ms == 0 {
            return bad("session.slow_consumer_timeout_ms", "must be at least 1");
        }
        if self.session.outbound_queue_bytes < self.session.max_frame_bytes {
            return bad("session.outbound_queue_bytes", "must be at least session.max_frame_bytes");
        }
        if !(self.limits.failed_login_burst >= 1.0) {
            return bad("limits.failed_login_burst", "must be at least 1");
        }
        if !(self.limits.failed_logins_per_min > 0.0) {
            return bad("limits.failed_logins_per_min", "must be greater than 0");
        }
        if self.limits.bad_frames_per_min == 0 {
            return bad("limits.bad_frames_per_min", "must be at least 1");
        }
        if !(0.01..=1e9).contains(&self.admission.upgrades_per_s) {
            return bad("admission.upgrades_per_s", "must be from 0.01 to 1000000000");
        }
        if !(self.admission.upgrade_burst >= 1.0) {
            return bad("admission.upgrade_burst", "must be at least 1");
        }
        if self.admission.max_sockets == 0 {
            return bad("admission.max_sockets", "must be at least 1");
        }
        if !(1..=3600).contains(&self.admission.retry_after_max_s) {
            return bad("admission.retry_after_max_s", "must be from 1 to 3600 (1 h)");
        }
        if !matches!(self.retention.mode.as_str(), "forever" | "days" | "delivered") {
            return bad("retention.mode", format!("`{}` is not one of \"forever\", \"days\", \"delivered\"", self.retention.mode));
        }
        if self.retention.mode == "days" && self.retention.days == 0 {
            return bad("retention.days", "must be at least 1");
        }
        if self.retention.interval_ms == 0 {
            return bad("retention.interval_ms", "must be at least 1");
        }
        if self.retention.batch == 0 {
            return bad("retention.batch", "must be at least 1");
        }
        if !self.admin.token.is_empty() && self.admin.token.len() < 16 {
            return bad("admin.token", "must be empty (disabled) or at least 16 characters");
        }
        if !self.xmpp.listen.is_empty() && self.xmpp.listen.parse::<SocketAddr>().is_err() {
            return bad("xmpp.listen", format!("`{}` is not an address like 127.0.0.1:5222 (empty: off)", self.xmpp.listen));
        }
        if jid::BareJid::new(&self.xmpp.domain).map_or(true, |j| j.node().is_some()) {
            return bad("xmpp.domain", format!("`{}` is not a domain", self.xmpp.domain));
        }
        if let Plaintext::Word(w) = &self.xmpp.allow_plaintext {
            if !["auto", "true", "false"].contains(&w.to_ascii_lowercase().as_str()) {
                return bad("xmpp.allow_plaintext", format!("`{w}` is not true, false or \"auto\""));
            }
        }
        if self.xmpp.tls_cert.is_empty() != self.xmpp.tls_key.is_empty() {
            return bad("xmpp.tls_key", "xmpp.tls_cert and xmpp.tls_key are set together or not at all");
        }
        let c = &self.cluster;
        if c.node_id == 0 {
            if !c.peers.0.is_empty() {
                // A garbled list is named first: it is what the user got wrong.
                if let Err(why) = c.parse_peers() {
                    return bad("cluster.peers", why);
                }
                return bad("cluster.node_id", "must be set (above 0) when cluster.peers is set; 0 means a single node");
            }
        } else {
            if c.listen.parse::<SocketAddr>().is_err() {
                return bad("cluster.listen", format!("`{}` is not an address like 127.0.0.1:7001 (required when cluster.node_id is set)", c.listen));
            }
            if let Err(why) = c.peer_map() {
                return bad("cluster.peers", why);
            }
            if !(1..=60_000).contains(&c.heartbeat_ms) {
                return bad("cluster.heartbeat_ms", "must be 1 to 60000 (ms)");
            }
            if c.election_timeout_ms > 600_000 {
                return bad("cluster.election_timeout_ms", "must be at most 600000 (ms)");
            }
            if c.election_timeout_ms < 3 * c.heartbeat_ms {
                return bad("cluster.election_timeout_ms", format!("must be at least 3 times cluster.heartbeat_ms ({} ms)", c.heartbeat_ms));
            }
            if !(1..=3_600_000).contains(&c.commit_timeout_ms) {
                return bad("cluster.commit_timeout_ms", "must be 1 to 3600000 (ms)");
            }
            if c.snapshot_entries == 0 {
                return bad("cluster.snapshot_entries", "must be above 0");
            }
        }
        if !matches!(self.log.format.as_str(), "text" | "json") {
            return bad("log.format", format!("`{}` is neither \"text\" nor \"json\"", self.log.format));
        }
        Ok(())
    }

    /// Every setting as `section.key`, from the embedded defaults (which list them all).
    pub fn keys() -> &'static [String] {
        static KEYS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
        KEYS.get_or_init(|| {
            type Sections = std::collections::BTreeMap<String, std::collections::BTreeMap<String, figment::value::Value>>;
            let sections: Sections = Figment::from(Toml::string(DEFAULT_TOML)).extract().unwrap_or_default();
            sections.iter().flat_map(|(s, keys)| keys.keys().map(move |k| format!("{s}.{k}"))).collect()
        })
    }

    /// Warnings about `PARLEY_…` variables in `vars` that set nothing: a single underscore
    /// (`PARLEY_SESSION_HELLO_TIMEOUT_MS`) or an unknown name. Each names the nearest setting's
    /// variable. Variables of parley's tests and tools ([`NON_CONFIG_VARS`]) are not warned
    /// about; `PARLEY__SECTION__KEY` variables are checked by [`Config::load`], which refuses an
    /// unknown key.
    pub fn env_warnings(vars: impl IntoIterator<Item = (String, String)>) -> Vec<String> {
        let env_names: Vec<String> = Self::keys().iter().map(|k| env_name(k)).collect();
        let mut out = Vec::new();
        for (name, _) in vars {
            if !name.starts_with("PARLEY_") || name.starts_with("PARLEY__") || NON_CONFIG_VARS.contains(&name.as_str()) {
                continue;
            }
            let mut msg = format!("environment variable {name} is not a parley setting and is ignored");
            // Compared with `__` read as `_`: a single-underscore spelling of a key is at distance 0.
            let flat = name.to_ascii_uppercase().replace("__", "_");
            if let Some(near) = env_names.iter().min_by_key(|n| edit_distance(&flat, &n.replace("__", "_"))) {
                msg.push_str(&format!("; did you mean {near}?"));
            }
            out.push(msg);
        }
        out
    }

    /// `server.listen` parsed (validated already).
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        self.server.listen.parse().map_err(|_| ConfigError::Invalid {
            key: "server.listen",
            reason: format!("`{}` is not an address", self.server.listen),
        })
    }

    /// `limits.group_max_members`.
    pub fn limits_group_members(&self) -> u32 {
        self.limits.group_max_members
    }

    /// `session.hello_timeout_ms` as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_millis(self.session.hello_timeout_ms)
    }
}

/// `PARLEY_…` variables that are not settings: they belong to parley's tests and tools, and
/// [`Config::env_warnings`] leaves them alone.
pub const NON_CONFIG_VARS: &[&str] = &[
    // tests/browser.rs: where the browser and its driver are; whether to update docs/*.png.
    "PARLEY_CHROMIUM",
    "PARLEY_CHROMEDRIVER",
    "PARLEY_UPDATE_SCREENSHOTS",
    // tests/it: the children's log filter, the crash test's seed.
    "PARLEY_IT_LOG",
    "PARLEY_CRASH_SEED",
    // .ci/run: the conformance suite's Python environment.
    "PARLEY_CONFORMANCE_VENV",
    // tests/it/xmpp.rs and .ci/run: the Python with slixmpp for the XMPP client tests.
    "PARLEY_SLIXMPP_PYTHON",
    // src/failpoint.rs (feature `failpoints`): the fail points to arm.
    "PARLEY_FAILPOINTS",
    // src/storage/sim_tests.rs: the SimDisk crash rounds' count, seed, base seed, trace.
    "PARLEY_SIM_ROUNDS",
    "PARLEY_SIM_SEED",
    "PARLEY_SIM_BASE",
    "PARLEY_SIM_TRACE",
    // tests/powerloss.rs: the power-loss rounds' count and seed; the sled test's rounds, seed and
    // its child process's database.
    "PARLEY_POWERLOSS_ROUNDS",
    "PARLEY_POWERLOSS_SEED",
    "PARLEY_SLED_CUT_ROUNDS",
    "PARLEY_SLED_CUT_SEED",
    "PARLEY_SLED_CUT_CHILD",
];

/// The environment variable of a `section.key` setting: `PARLEY__SECTION__KEY`.
pub fn env_name(key: &str) -> String {
    format!("PARLEY__{}", key.to_ascii_uppercase().replace('.', "__"))
}

/// The candidate closest to `word` by edit distance (ties: the first), if any.
fn nearest<'a>(word: &str, candidates: &'a [String]) -> Option<&'a str> {
    if !word.contains('.') {
        // An unknown section: the nearest section (`[sesion]` → `session`), not a whole key.
        let sections = candidates.iter().filter_map(|c| c.split_once('.').map(|(s, _)| s));
        return sections.min_by_key(|c| edit_distance(word, c)).filter(|c| close_enough(word, c));
    }
    candidates.iter().min_by_key(|c| edit_distance(word, c)).map(String::as_str).filter(|c| close_enough(word, c))
}

/// Whether `near` is a plausible typo of `word`: at most a third of its characters differ
/// (at least 2), so an unrelated name gets no "did you mean".
fn close_enough(word: &str, near: &str) -> bool {
    edit_distance(word, near) <= (word.chars().count() / 3).max(2)
}

/// Levenshtein distance, in characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let up = row[j + 1];
            row[j + 1] = (diag + usize::from(ca != *cb)).min(row[j] + 1).min(up + 1);
            diag = up;
        }
    }
    row[b.len()]
}

/// Where `key`'s value came from, as a suffix of an error message: ` in FILE`, ` (environment
/// variable PARLEY__...)`, or nothing for the embedded defaults.
fn origin(m: &figment::Metadata, key: &str) -> String {
    match &m.source {
        Some(figment::Source::File(f)) => format!(" in {}", f.display()),
        _ if m.name.contains("environment") && !key.contains('.') => format!(" (environment variables {}__*)", env_name(key)),
        _ if m.name.contains("environment") => {
            // `PARLEY__SESSION__HELLO_TIMEOUT_MS__X` makes the key a table ("found map"): name
            // the variables that did, not the one that is not set.
            let name = env_name(key);
            let under = format!("{name}__");
            let deeper: Vec<String> = std::env::vars_os()
                .filter_map(|(k, _)| k.into_string().ok())
                .filter(|k| k.len() > under.len() && k.get(..under.len()).is_some_and(|p| p.eq_ignore_ascii_case(&under)))
                .collect();
            if std::env::var_os(&name).is_none() && !deeper.is_empty() {
                format!(" (environment variable {}: {key} has no keys under it)", deeper.join(", "))
            } else {
                format!(" (environment variable {name})")
            }
        }
        _ => String::new(),
    }
}

/// One line for a figment error: what is wrong, the key as `section.key` (no profile, no nested
/// quoting), where the value came from (the file, or the environment variable), and for an
/// unknown key the nearest known one.
fn describe(e: &figment::Error) -> String {
    use figment::error::Kind;
    let mut path: Vec<String> = e.path.iter().map(|p| p.to_ascii_lowercase()).collect();
    if path.len() > 1 && e.profile.as_ref().is_some_and(|p| p.as_str().as_str().eq_ignore_ascii_case(&path[0])) {
        path.remove(0);
    }
    if let Kind::UnknownField(found, _) = &e.kind {
        if path.last().map(String::as_str) != Some(found.to_ascii_lowercase().as_str()) {
            path.push(found.to_ascii_lowercase());
        }
    }
    let key = path.join(".");
    let from = e.metadata.as_ref().map(|m| origin(m, &key)).unwrap_or_default();
    match &e.kind {
        Kind::UnknownField(..) => {
            let near = nearest(&key, Config::keys()).map(|k| format!("; did you mean `{k}`?")).unwrap_or_default();
            format!("unknown key `{key}`{from}{near}")
        }
        // A TOML syntax error spans several lines (the line quoted, a caret): keep it one.
        Kind::Message(m) if key.is_empty() => format!("{}{from}", m.split_whitespace().collect::<Vec<_>>().join(" ")),
        kind => format!("{kind} for key `{key}`{from}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let c = Config::defaults().unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:8080");
        assert_eq!(c.session.outbound_queue_frames, 1024);
    }

    #[test]
    fn env_overrides_and_errors_name_the_key() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS", "1234");
            let c = Config::load(None).unwrap();
            assert_eq!(c.session.hello_timeout_ms, 1234);
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS", "soon");
            let e = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(e.contains("session.hello_timeout_ms"), "{e}");
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS", "0");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("session.hello_timeout_ms") && e.contains("(environment variable PARLEY__SESSION__HELLO_TIMEOUT_MS)"), "a range error says where the value came from: {e}");
            jail.clear_env();
            jail.create_file("range.toml", "[server]\nlisten_backlog = 0\n")?;
            let e = Config::load(Some(Path::new("range.toml"))).unwrap_err().to_string();
            assert!(e.contains("server.listen_backlog") && e.contains("in range.toml"), "a range error names the file: {e}");
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS", "1000");
            jail.set_env("PARLEY__SESSION__NO_SUCH_KEY", "1");
            let e = Config::load(None).unwrap_err().to_string().to_lowercase();
            assert!(e.contains("no_such_key"), "{e}");
            Ok(())
        });
    }

    /// A string setting may be all digits or a word like `true` in the environment, as in a file;
    /// numbers and booleans still reach numeric and boolean settings.
    #[test]
    fn env_strings_stay_strings() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PARLEY__ADMIN__TOKEN", "1234567890123456");
            jail.set_env("PARLEY__XMPP__DOMAIN", "true");
            jail.set_env("PARLEY__SERVER__LISTEN_BACKLOG", "512");
            jail.set_env("PARLEY__SERVER__REGISTRATION_OPEN", "false");
            jail.set_env("PARLEY__ADMISSION__UPGRADES_PER_S", "2.5");
            jail.set_env("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:7001, 2=127.0.0.1:7002");
            jail.set_env("PARLEY__CLUSTER__NODE_ID", "1");
            jail.set_env("PARLEY__CLUSTER__LISTEN", "127.0.0.1:7001");
            let c = Config::load(None).unwrap();
            assert_eq!((c.admin.token.as_str(), c.xmpp.domain.as_str()), ("1234567890123456", "true"));
            assert_eq!((c.server.listen_backlog, c.server.registration_open, c.admission.upgrades_per_s), (512, false, 2.5));
            assert_eq!(c.cluster.peers.0, ["1=127.0.0.1:7001", "2=127.0.0.1:7002"]);
            jail.set_env("PARLEY__CLUSTER__PEERS", r#"["1=127.0.0.1:7001"]"#);
            assert_eq!(Config::load(None).unwrap().cluster.peers.0, ["1=127.0.0.1:7001"], "a list as figment's Env reads it");
            jail.set_env("PARLEY__SERVER__LISTEN_BACKLOG", "many");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("server.listen_backlog") && e.contains("PARLEY__SERVER__LISTEN_BACKLOG"), "{e}");
            Ok(())
        });
    }

    /// Values sled or argon2 would refuse (a panic, or hashes silently made with the library's
    /// defaults) are config errors naming the key.
    #[test]
    fn storage_and_argon2_values_the_libraries_refuse_are_config_errors() {
        figment::Jail::expect_with(|jail| {
            for (var, value, key) in [
                ("PARLEY__STORAGE__CACHE_BYTES", "0", "storage.cache_bytes"),
                ("PARLEY__STORAGE__CACHE_BYTES", "255", "storage.cache_bytes"),
                ("PARLEY__AUTH__ARGON2_PARALLELISM", "16777216", "auth.argon2_parallelism"),
                ("PARLEY__AUTH__ARGON2_PARALLELISM", "536870912", "auth.argon2_parallelism"),
                ("PARLEY__AUTH__ARGON2_PARALLELISM", "0", "auth.argon2_parallelism"),
                ("PARLEY__AUTH__ARGON2_MEMORY_KIB", "134217728", "auth.argon2_memory_kib"),
                ("PARLEY__AUTH__ARGON2_MEMORY_KIB", "7", "auth.argon2_memory_kib"),
                ("PARLEY__AUTH__ARGON2_ITERATIONS", "0", "auth.argon2_iterations"),
            ] {
                jail.clear_env();
                jail.set_env(var, value);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains(key) && e.contains(var), "{var}={value}: {e}");
            }
            jail.clear_env();
            jail.set_env("PARLEY__STORAGE__CACHE_BYTES", "1048576");
            jail.set_env("PARLEY__AUTH__ARGON2_PARALLELISM", "4");
            jail.set_env("PARLEY__AUTH__ARGON2_MEMORY_KIB", "32");
            Config::load(None).unwrap();
            Ok(())
        });
    }

    #[test]
    fn admission_values_that_would_overflow_are_config_errors() {
        figment::Jail::expect_with(|jail| {
            for (var, value, key) in [
                ("PARLEY__ADMISSION__UPGRADES_PER_S", "1e-20", "admission.upgrades_per_s"),
                ("PARLEY__ADMISSION__UPGRADES_PER_S", "0", "admission.upgrades_per_s"),
                ("PARLEY__ADMISSION__RETRY_AFTER_MAX_S", "18446744073709551615", "admission.retry_after_max_s"),
                ("PARLEY__ADMISSION__RETRY_AFTER_MAX_S", "0", "admission.retry_after_max_s"),
            ] {
                jail.clear_env();
                jail.set_env(var, value);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains(key), "{var}={value}: {e}");
            }
            Ok(())
        });
    }

    #[test]
    fn a_variable_below_a_key_is_named_itself() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS__X", "5");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("session.hello_timeout_ms") && e.contains("PARLEY__SESSION__HELLO_TIMEOUT_MS__X: session.hello_timeout_ms has no keys under it"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_check_across_keys_says_where_the_other_key_was_set() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("PARLEY__SESSION__PING_INTERVAL_MS", "70000");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("session.ping_timeout_ms") && e.contains("session.ping_interval_ms was set (environment variable PARLEY__SESSION__PING_INTERVAL_MS)"), "{e}");
            jail.create_file("p.toml", "[session]\nping_interval_ms = 70000\n")?;
            jail.clear_env();
            let e = Config::load(Some(Path::new("p.toml"))).unwrap_err().to_string();
            assert!(e.contains("session.ping_interval_ms was set in") && e.contains("p.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn a_file_gives_numbers_as_numbers_while_variables_give_them_as_text() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("quoted.toml", "[limits]\nsend_burst = \"10\"\n")?;
            let e = Config::load(Some(Path::new("quoted.toml"))).unwrap_err().to_string();
            assert!(e.contains("limits.send_burst") && e.contains("quoted.toml") && e.contains("string"), "{e}");
            jail.create_file("fine.toml", "[limits]\nsend_burst = 10\n")?;
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS", "5000");
            let c = Config::load(Some(Path::new("fine.toml"))).unwrap();
            assert_eq!((c.limits.send_burst, c.session.hello_timeout_ms), (10.0, 5000));
            Ok(())
        });
    }

    #[test]
    fn a_typo_in_a_file_names_the_key_the_file_and_the_nearest_key() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "[session]\nhello_timout_ms = 5\n")?;
            let e = Config::load(Some(Path::new("typo.toml"))).unwrap_err().to_string();
            assert!(e.contains("unknown key `session.hello_timout_ms`"), "{e}");
            assert!(e.contains("typo.toml") && e.contains("did you mean `session.hello_timeout_ms`?"), "{e}");
            assert!(!e.contains("default.") && !e.contains("``") && !e.contains("`one of"), "{e}");
            jail.create_file("section.toml", "[sesion]\nhello_timeout_ms = 5\n")?;
            let e = Config::load(Some(Path::new("section.toml"))).unwrap_err().to_string();
            assert!(e.contains("unknown key `sesion`") && e.contains("section.toml") && e.contains("did you mean `session`?"), "{e}");
            jail.create_file("broken.toml", "garbage = = =\n")?;
            let e = Config::load(Some(Path::new("broken.toml"))).unwrap_err().to_string();
            assert!(!e.contains('\n') && e.contains("broken.toml"), "a TOML syntax error is one line: {e}");
            jail.set_env("PARLEY__BOGUS__KEY", "1");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("unknown key `bogus`") && e.contains("PARLEY__BOGUS__*") && !e.contains("did you mean"), "{e}");
            jail.clear_env();
            jail.set_env("PARLEY__LOG__LEVEL", "foo[[[");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("log.level"), "{e}");
            jail.clear_env();
            jail.set_env("PARLEY__SESSION__PING_INTERVAL_MS", "0");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("session.ping_interval_ms"), "{e}");
            jail.clear_env();
            jail.set_env("PARLEY__SESSION__HELLO_TIMEOUT_MS", "soon");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("for key `session.hello_timeout_ms`") && e.contains("PARLEY__SESSION__HELLO_TIMEOUT_MS"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn cluster_keys_from_a_file_and_the_environment_and_their_errors() {
        let c = Config::defaults().unwrap();
        assert_eq!((c.cluster.node_id, c.cluster.peers.0.len()), (0, 0), "single node by default");
        figment::Jail::expect_with(|jail| {
            jail.create_file("c.toml", "[cluster]\nnode_id = 2\nlisten = \"127.0.0.1:7002\"\npeers = [\"1=127.0.0.1:7001\", \"2=127.0.0.1:7002\", \"3=node3:7003\"]\n")?;
            let c = Config::load(Some(Path::new("c.toml"))).unwrap();
            let m = c.cluster.peer_map().unwrap();
            assert_eq!((c.cluster.node_id, m.len(), m[&3].as_str()), (2, 3, "node3:7003"));
            jail.set_env("PARLEY__CLUSTER__NODE_ID", "1");
            jail.set_env("PARLEY__CLUSTER__LISTEN", "127.0.0.1:7001");
            jail.set_env("PARLEY__CLUSTER__LISTEN", "127.0.0.1:7101");
            jail.set_env("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:7101, 2=127.0.0.1:7102,3=127.0.0.1:7103");
            let c = Config::load(None).unwrap();
            let m = c.cluster.peer_map().unwrap();
            assert_eq!((c.cluster.node_id, c.cluster.listen.as_str()), (1, "127.0.0.1:7101"));
            assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(1, "127.0.0.1:7101".into()), (2, "127.0.0.1:7102".into()), (3, "127.0.0.1:7103".into())]);
            jail.set_env("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:7101");
            assert_eq!(Config::load(None).unwrap().cluster.peers.0, vec!["1=127.0.0.1:7101".to_string()], "a single entry");
            for (peers, says) in [
                ("2=127.0.0.1:7102,3=127.0.0.1:7103", "must list this node itself"),
                ("1=127.0.0.1:7101,1=127.0.0.1:7102", "listed twice"),
                ("1=127.0.0.1", "is not HOST:PORT"),
                ("one=127.0.0.1:7101", "whole number above 0"),
                ("127.0.0.1:7101", "ID=HOST:PORT"),
            ] {
                jail.set_env("PARLEY__CLUSTER__PEERS", peers);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains("cluster.peers") && e.contains(says), "{peers}: {e}");
            }
            jail.set_env("PARLEY__CLUSTER__PEERS", "1=127.0.0.1:7101");
            jail.set_env("PARLEY__CLUSTER__LISTEN", "");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("cluster.listen"), "{e}");
            jail.set_env("PARLEY__CLUSTER__LISTEN", "127.0.0.1:7101");
            // Huge timeouts are refused by name (3 x heartbeat_ms once overflowed and passed).
            for (k, v) in [("PARLEY__CLUSTER__HEARTBEAT_MS", "6148914691236517206"), ("PARLEY__CLUSTER__ELECTION_TIMEOUT_MS", "18446744073709551615"), ("PARLEY__CLUSTER__COMMIT_TIMEOUT_MS", "0")] {
                jail.set_env(k, v);
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains(&k["PARLEY__".len()..].to_lowercase().replace("__", ".")), "{k}={v}: {e}");
                jail.set_env(k, if k.ends_with("COMMIT_TIMEOUT_MS") { "3000" } else if k.ends_with("HEARTBEAT_MS") { "100" } else { "400" });
            }
            jail.set_env("PARLEY__CLUSTER__NODE_ID", "first");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("cluster.node_id") && e.contains("PARLEY__CLUSTER__NODE_ID"), "{e}");
            jail.set_env("PARLEY__CLUSTER__NODE_ID", "0");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("cluster.node_id") && e.contains("cluster.peers"), "{e}");
            // With node_id unset, a garbled list is reported as the list's fault.
            jail.set_env("PARLEY__CLUSTER__PEERS", "garbage");
            let e = Config::load(None).unwrap_err().to_string();
            assert!(e.contains("cluster.peers") && e.contains("ID=HOST:PORT") && !e.contains("cluster.node_id"), "{e}");
            Ok(())
        });
    }

    #[test]
    fn unknown_double_underscore_variables_are_refused() {
        figment::Jail::expect_with(|jail| {
            for (var, word) in [("PARLEY__NO_SECTION__KEY", "no_section"), ("PARLEY__SESSION__HELLO__TIMEOUT_MS", "hello")] {
                jail.set_env(var, "1");
                let e = Config::load(None).unwrap_err().to_string();
                assert!(e.contains(word), "{var}: {e}");
                jail.clear_env();
            }
            Ok(())
        });
    }

    #[test]
    fn single_underscore_and_unknown_variables_get_a_warning_naming_the_nearest_key() {
        let vars = |v: &[&str]| v.iter().map(|n| (n.to_string(), "1".to_string())).collect::<Vec<_>>();
        let w = Config::env_warnings(vars(&["PARLEY_SESSION_HELLO_TIMEOUT_MS", "PARLEY_SERVER_LISTN", "HOME", "PARLEY__SERVER__LISTEN"]));
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("PARLEY_SESSION_HELLO_TIMEOUT_MS") && w[0].contains("did you mean PARLEY__SESSION__HELLO_TIMEOUT_MS?"), "{w:?}");
        assert!(w[1].contains("did you mean PARLEY__SERVER__LISTEN?"), "{w:?}");
        assert!(Config::env_warnings(vars(NON_CONFIG_VARS)).is_empty(), "the tests' and tools' variables");
        assert_eq!(Config::keys().len(), 65, "{:?}", Config::keys());
    }
}
