//! Choosing the Odoo server for a request: healthy servers of this proxy's zone first, then
//! of the failover zones, never a draining one; round robin, or least open connections for
//! pools that carry WebSockets. Pure, apart from reading each server's live counters.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

/// How a pool spreads requests within a zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The server with the fewest open requests and sockets: for WebSocket pools, where a
    /// connection lives for an hour.
    LeastConn,
}

/// A pool's active health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// HTTP GET of this path; `None`: a TCP connect is the check.
    pub path: Option<String>,
    pub status: u16,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_after: u32,
    pub unhealthy_after: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: Some("/web/health".to_string()),
            status: 200,
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            healthy_after: 2,
            unhealthy_after: 3,
        }
    }
}

/// Live state of one server; kept across config reloads for servers that did not change.
#[derive(Debug)]
pub struct ServerState {
    healthy: AtomicBool,
    /// Requests and sockets open to it now.
    open: AtomicUsize,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    last_probe: std::sync::Mutex<Option<Probe>>,
}

/// The result of the last active health check of a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub at: std::time::SystemTime,
    pub ok: bool,
    /// Why it failed (empty when it passed).
    pub detail: String,
}

impl Default for ServerState {
    /// A new server is taken as healthy until a check or a connection says otherwise, so a
    /// fresh start serves at once.
    fn default() -> Self {
        ServerState {
            healthy: AtomicBool::new(true),
            open: AtomicUsize::new(0),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            last_probe: std::sync::Mutex::new(None),
        }
    }
}

impl ServerState {
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::AcqRel);
    }
    pub fn closed(&self) {
        let _ = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
    }
    pub fn last_probe(&self) -> Option<Probe> {
        crate::lock(&self.last_probe).clone()
    }
    pub fn set_last_probe(&self, probe: Probe) {
        *crate::lock(&self.last_probe) = Some(probe);
    }
    /// A connection to it failed: down at once (passive check); probes bring it back.
    /// Returns whether this changed its state.
    pub fn connect_failed(&self) -> bool {
        self.ok_streak.store(0, Ordering::Release);
        self.healthy.swap(false, Ordering::AcqRel)
    }
    /// An active probe's result. Returns the new health when it changed.
    pub fn probed(&self, ok: bool, check: &HealthCheck) -> Option<bool> {
        if ok {
            self.fail_streak.store(0, Ordering::Release);
            let n = self
                .ok_streak
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            if n >= check.healthy_after && !self.healthy.swap(true, Ordering::AcqRel) {
                return Some(true);
            }
        } else {
            self.ok_streak.store(0, Ordering::Release);
            let n = self
                .fail_streak
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            if n >= check.unhealthy_after && self.healthy.swap(false, Ordering::AcqRel) {
                return Some(false);
            }
        }
        None
    }
}

/// A server's stable identity: a hash of its `ip:port`, the same in every erpgate process
/// (replicas in other zones agree on it; the affinity cookie carries it).
pub fn server_id(address: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(address.as_bytes())
}

/// What selection needs to know of a server.
pub trait Candidate {
    fn id(&self) -> u64;
    fn zone(&self) -> &str;
    fn healthy(&self) -> bool;
    fn drain(&self) -> bool;
    fn open(&self) -> usize;
}

impl Candidate for std::sync::Arc<crate::config::Upstream> {
    fn id(&self) -> u64 {
        self.id
    }
    fn zone(&self) -> &str {
        &self.zone
    }
    fn healthy(&self) -> bool {
        self.state.is_healthy()
    }
    fn drain(&self) -> bool {
        self.drain
    }
    fn open(&self) -> usize {
        self.state.open()
    }
}

/// Session affinity for one request: the server its affinity cookie names, and the hash
/// of its session cookie.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sticky {
    /// A server id (`erpgate_affinity` cookie): taken when usable, in any zone.
    pub pin: Option<u64>,
    /// Consistent hashing key (the session cookie's value, hashed).
    pub key: Option<u64>,
}

/// How a request is placed: the selection inputs beyond the servers themselves.
#[derive(Debug, Clone, Copy)]
pub struct Placement<'a> {
    pub own_zone: &'a str,
    pub failover: &'a [String],
    pub balance: Balance,
    /// Rotates round robin and breaks ties.
    pub cursor: usize,
    pub sticky: Sticky,
}

/// Rendezvous (highest random weight) score of `server` for `key`: each key ranks all
/// servers the same way everywhere, and losing a server moves only the keys it had.
fn score(key: u64, server: u64) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(&server.to_le_bytes(), key)
}

/// The server for the next attempt of a request (an index into `servers`): among healthy,
/// non-draining servers whose id is not in `tried`, the pinned one if any; else those of
/// `own_zone`; if none, those of the `failover` zones in order (each zone a step), or of
/// every other zone when `failover` is empty. Within a zone: the session key's highest
/// rendezvous score, else the pool's balance. `None`: no server can take it (the caller
/// answers 503 at once).
pub fn select<S: Candidate>(servers: &[S], how: &Placement<'_>, tried: &[u64]) -> Option<usize> {
    let usable = |s: &S| s.healthy() && !s.drain() && !tried.contains(&s.id());
    if let Some(pin) = how.sticky.pin {
        if let Some(i) = servers.iter().position(|s| s.id() == pin && usable(s)) {
            return Some(i);
        }
    }
    let cursor = how.cursor;
    let pick = |in_tier: &dyn Fn(&str) -> bool| -> Option<usize> {
        let n = servers.len();
        let eligible = |i: &usize| usable(&servers[*i]) && in_tier(servers[*i].zone());
        if let Some(key) = how.sticky.key {
            return (0..n)
                .filter(eligible)
                .max_by_key(|&i| score(key, servers[i].id()));
        }
        match how.balance {
            // The cursor-th of the eligible servers: an even spread whatever the others do.
            Balance::RoundRobin => {
                let m = (0..n).filter(eligible).count();
                // (A server's health may change between the two passes: then any eligible.)
                (m > 0).then(|| {
                    (0..n)
                        .filter(eligible)
                        .nth(cursor % m)
                        .or_else(|| (0..n).find(eligible))
                })?
            }
            // Ties go round, starting at the cursor.
            Balance::LeastConn => (0..n)
                .map(|k| (cursor + k) % n)
                .filter(eligible)
                .min_by_key(|&i| servers[i].open()),
        }
    };
    if let Some(i) = pick(&|z| z == how.own_zone) {
        return Some(i);
    }
    if how.failover.is_empty() {
        return pick(&|z| z != how.own_zone);
    }
    how.failover
        .iter()
        .filter(|z| z.as_str() != how.own_zone)
        .find_map(|zone| pick(&|z| z == zone))
}

/// A pool's servers from its entries: an IP entry as it is, a host-name entry as the
/// addresses `resolved` gives for it (by entry index). Each server keeps the live state of
/// the server in `old` with the same address and zone; a new one starts healthy.
pub fn build_servers(
    specs: &[crate::config::ServerSpec],
    resolved: &dyn Fn(usize) -> Vec<std::net::SocketAddr>,
    old: &[std::sync::Arc<crate::config::Upstream>],
) -> Vec<std::sync::Arc<crate::config::Upstream>> {
    let mut out: Vec<std::sync::Arc<crate::config::Upstream>> = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let addrs = match spec.socket {
            Some(a) => vec![a],
            None => resolved(i),
        };
        for a in addrs {
            // Two names may resolve to one address: one server.
            if out.iter().any(|u| u.socket == a) {
                continue;
            }
            let state = old
                .iter()
                .find(|u| u.socket == a && u.zone == spec.zone)
                .map(|u| u.state.clone())
                .unwrap_or_default();
            out.push(std::sync::Arc::new(crate::config::Upstream::new(
                spec, a, state,
            )));
        }
    }
    out
}

#[cfg(test)]
mod tests;
