//! Reading the server's memory and the kernel's socket memory from /proc (Linux only).

use std::path::Path;

/// The pid of the process listening on TCP `port`, found through /proc/net/tcp{,6} and the
/// processes' open file descriptors. `None` when not found (or not permitted to look).
pub fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else { continue };
        for l in text.lines().skip(1) {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 10 || cols[3] != "0A" {
                continue; // not LISTEN
            }
            let p = cols[1].rsplit(':').next().and_then(|h| u16::from_str_radix(h, 16).ok());
            if p == Some(port) {
                inodes.push(format!("socket:[{}]", cols[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let me = std::process::id();
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(e.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            if let Ok(l) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| Path::new(i) == l) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// A `kB` field of /proc/PID/status (`VmRSS`, `VmHWM`), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&text, field)
}

/// The resident set of `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS")
}

/// This process's resident set, in KiB.
pub fn self_rss_kib() -> Option<u64> {
    rss_kib(std::process::id())
}

/// Memory of the kernel's TCP sockets (`TCP: ... mem N` of /proc/net/sockstat, in pages), in KiB.
pub fn tcp_mem_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let l = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut it = l.split_whitespace();
    while let Some(w) = it.next() {
        if w == "mem" {
            return it.next()?.parse::<u64>().ok().map(|p| p * page_kib());
        }
    }
    None
}

/// The kernel's slab memory (`Slab:` of /proc/meminfo), in KiB: socket structures live there.
pub fn slab_kib() -> Option<u64> {
    kib_field(&std::fs::read_to_string("/proc/meminfo").ok()?, "Slab")
}

fn kib_field(text: &str, field: &str) -> Option<u64> {
    text.lines()
        .find(|l| l.split(':').next() == Some(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn page_kib() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64 / 1024
    } else {
        4
    }
}

/// Raises this process's open-file limit as far as allowed (to the hard limit, and past it to
/// `want` when privileged). Returns the soft limit in force afterwards.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur >= want {
            return lim.rlim_cur;
        }
        let raised = libc::rlimit { rlim_cur: want.max(lim.rlim_cur), rlim_max: want.max(lim.rlim_max) };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            return raised.rlim_cur;
        }
        let soft = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &soft) == 0 {
            return soft.rlim_cur;
        }
        lim.rlim_cur
    }
}

/// CPU time of a process (user + system), in clock ticks.
pub fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Busy CPU time of the whole machine (all CPUs, neither idle nor waiting for I/O), in ticks.
pub fn machine_busy_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let l = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = l.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let total: u64 = v.iter().take(8).sum();
    Some(total - v.get(3)? - v.get(4)?)
}

/// Where the CPU went between two [`CpuSample`]s.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSample {
    at: Option<std::time::Instant>,
    machine: Option<u64>,
    me: Option<u64>,
    server: Option<u64>,
}

impl CpuSample {
    /// Reads the machine's, this process's and the server's (when known) CPU time now.
    pub fn now(server: Option<u32>) -> CpuSample {
        CpuSample {
            at: Some(std::time::Instant::now()),
            machine: machine_busy_ticks(),
            me: proc_cpu_ticks(std::process::id()),
            server: server.and_then(proc_cpu_ticks),
        }
    }

    /// Cores used since `earlier`: (server, this client, everything else on the machine).
    pub fn since(&self, earlier: &CpuSample) -> (Option<f64>, Option<f64>, Option<f64>) {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let secs = match (self.at, earlier.at) {
            (Some(a), Some(b)) => a.duration_since(b).as_secs_f64().max(1e-3),
            _ => return (None, None, None),
        };
        let d = |a: Option<u64>, b: Option<u64>| Some(a?.saturating_sub(b?) as f64 / hz / secs);
        let (server, me, all) = (d(self.server, earlier.server), d(self.me, earlier.me), d(self.machine, earlier.machine));
        let other = all.map(|a| (a - server.unwrap_or(0.0) - me.unwrap_or(0.0)).max(0.0));
        (server, me, other)
    }
}

/// `server 1.20, this client 0.60, other processes 0.05 cores` and its JSON.
pub fn cpu_report(used: (Option<f64>, Option<f64>, Option<f64>)) -> (String, serde_json::Value) {
    let f = |v: Option<f64>| v.map_or("?".to_owned(), |v| format!("{v:.2}"));
    (
        format!("server {}, this client {}, other processes {} (cores)", f(used.0), f(used.1), f(used.2)),
        serde_json::json!({ "server_cores": used.0, "client_cores": used.1, "other_cores": used.2 }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kib_fields() {
        let t = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(kib_field(t, "VmRSS"), Some(1024));
        assert_eq!(kib_field(t, "VmHWM"), Some(2048));
        assert_eq!(kib_field(t, "Vm"), None);
    }

    #[test]
    fn reads_cpu_times() {
        assert!(proc_cpu_ticks(std::process::id()).is_some());
        assert!(machine_busy_ticks().is_some());
        let a = CpuSample::now(None);
        let b = CpuSample::now(None);
        let (server, me, other) = b.since(&a);
        assert!(server.is_none() && me.is_some() && other.is_some());
    }

    #[test]
    fn finds_its_own_rss() {
        assert!(self_rss_kib().unwrap_or(0) > 0);
    }
}
