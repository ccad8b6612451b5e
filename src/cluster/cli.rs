//! `parley cluster status|add|remove --url http://NODE`: the cluster's HTTP API
//! (`src/http/cluster.rs`) from the command line, over a plain HTTP/1.1 request (one
//! connection, `Connection: close`).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// The `parley cluster` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ClusterCmd {
    /// Print a node's role, term, leader, commit index, applied index and members.
    Status {
        /// The node's HTTP address, e.g. http://127.0.0.1:8080.
        #[arg(long)]
        url: String,
    },
    /// Add a node as a voter (a learner first, caught up, then a membership change).
    Add {
        /// Any node's HTTP address (the change goes through the leader).
        #[arg(long)]
        url: String,
        /// The new node's id (its cluster.node_id).
        #[arg(long)]
        id: u64,
        /// The new node's node-to-node address (its cluster.listen), HOST:PORT.
        #[arg(long)]
        addr: String,
        /// admin.token of the node at --url (or PARLEY__ADMIN__TOKEN, as the server reads it).
        #[arg(long, env = "PARLEY__ADMIN__TOKEN")]
        token: String,
    },
    /// Remove a voter.
    Remove {
        /// Any node's HTTP address (the change goes through the leader).
        #[arg(long)]
        url: String,
        /// The node id to remove.
        #[arg(long)]
        id: u64,
        /// admin.token of the node at --url (or PARLEY__ADMIN__TOKEN, as the server reads it).
        #[arg(long, env = "PARLEY__ADMIN__TOKEN")]
        token: String,
    },
}

/// Runs one subcommand; returns what to print.
///
/// # Errors
/// A bad URL, a node that cannot be reached, or an error answer (its JSON `message`).
pub fn run(cmd: ClusterCmd) -> anyhow::Result<String> {
    match cmd {
        ClusterCmd::Status { url } => {
            let v = request(&url, "GET", "/v1/cluster/status", None, None)?;
            let ids = |k: &str| v[k].as_array().map(|a| a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")).unwrap_or_default();
            let field = |k: &str| match &v[k] {
                serde_json::Value::Null => "none".to_owned(),
                serde_json::Value::String(s) => s.clone(),
                x => x.to_string(),
            };
            let mut out = String::new();
            for k in ["node_id", "role", "term", "leader", "commit_index", "applied_index", "last_log_index"] {
                out.push_str(&format!("{k} {}\n", field(k)));
            }
            out.push_str(&format!("members {}\n", ids("members")));
            out.push_str(&format!("learners {}", ids("learners")));
            Ok(out)
        }
        ClusterCmd::Add { url, id, addr, token } => {
            let body = serde_json::json!({ "id": id, "addr": addr });
            let v = request(&url, "POST", "/v1/cluster/members", Some(&body), Some(&token))?;
            Ok(format!("added node {id}; members {}", v["members"]))
        }
        ClusterCmd::Remove { url, id, token } => {
            let v = request(&url, "DELETE", &format!("/v1/cluster/members/{id}"), None, Some(&token))?;
            Ok(format!("removed node {id}; members {}", v["members"]))
        }
    }
}

fn request(url: &str, method: &str, path: &str, body: Option<&serde_json::Value>, token: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let host = url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("--url {url:?}: must start with http://"))?.trim_end_matches('/');
    let addr = host.to_socket_addrs().map_err(|e| anyhow::anyhow!("--url {url:?}: {e}"))?.next().ok_or_else(|| anyhow::anyhow!("--url {url:?}: no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(90)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow::anyhow!("{addr} answered no HTTP response"))?;
    let status: u16 = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or_else(|| anyhow::anyhow!("{addr} answered no HTTP status"))?;
    let v: serde_json::Value = serde_json::from_str(rest.trim()).map_err(|e| anyhow::anyhow!("{addr} answered {status} without JSON: {e}"))?;
    if status != 200 {
        anyhow::bail!("{addr} answered {status}: {}", v["message"].as_str().unwrap_or(&v.to_string()));
    }
    Ok(v)
}
