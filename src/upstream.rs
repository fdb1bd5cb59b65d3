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

/// What selection needs to know of a server.
pub trait Candidate {
    fn zone(&self) -> &str;
    fn healthy(&self) -> bool;
    fn drain(&self) -> bool;
    fn open(&self) -> usize;
}

impl Candidate for crate::config::Upstream {
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

/// The server for the next attempt of a request: among healthy, non-draining servers not
/// tried yet, those of `own_zone`; if none, those of the `failover` zones in order (each
/// zone a step), or of every other zone when `failover` is empty. `None`: no server can
/// take it (the caller answers 503 at once). `cursor` rotates the choice.
pub fn select<S: Candidate>(
    servers: &[S],
    own_zone: &str,
    failover: &[String],
    balance: Balance,
    cursor: usize,
    tried: &[usize],
) -> Option<usize> {
    let usable = |i: usize, s: &S| s.healthy() && !s.drain() && !tried.contains(&i);
    let pick = |in_tier: &dyn Fn(&str) -> bool| -> Option<usize> {
        let n = servers.len();
        let eligible = |i: &usize| usable(*i, &servers[*i]) && in_tier(servers[*i].zone());
        match balance {
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
    if let Some(i) = pick(&|z| z == own_zone) {
        return Some(i);
    }
    if failover.is_empty() {
        return pick(&|z| z != own_zone);
    }
    failover
        .iter()
        .filter(|z| z.as_str() != own_zone)
        .find_map(|zone| pick(&|z| z == zone))
}

#[cfg(test)]
mod tests;
