//! Active health checks: every server of every pool is probed each `interval` (HTTP GET of
//! the check path, or a TCP connect), on a thread of its own, so a slow or dead server never
//! delays traffic. `healthy_after` good probes in a row bring a server back,
//! `unhealthy_after` bad ones take it out (a failed connection takes it out at once: see
//! `proxy::fail_to_connect`). The checker reads the live config on every round, so a reload
//! or a new DNS answer changes what it probes. The same thread looks host names up again
//! every `resolve_interval` (see `dns`).

use crate::config::{Config, Pool, Upstream};
use crate::upstream::HealthCheck;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Starts the checker thread.
pub fn spawn(store: Arc<ArcSwap<Config>>) {
    let started = std::thread::Builder::new()
        .name("erpgate-health".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!("health checks cannot start: {e}");
                    return;
                }
            };
            rt.block_on(run(store));
        });
    if let Err(e) = started {
        tracing::error!("health checks cannot start: {e}");
    }
}

async fn run(store: Arc<ArcSwap<Config>>) {
    let mut due: HashMap<(String, String), Instant> = HashMap::new();
    let mut lookups: HashMap<String, Instant> = HashMap::new();
    loop {
        let cfg = store.load_full();
        let now = Instant::now();
        due.retain(|(pool, addr), _| {
            cfg.pools
                .iter()
                .any(|p| &p.name == pool && p.servers.load().iter().any(|s| &s.address == addr))
        });
        for pool in &cfg.pools {
            if pool.has_host_names() {
                let next = lookups
                    .entry(pool.name.clone())
                    .or_insert(now + pool.resolve_interval);
                if *next <= now {
                    *next = now + pool.resolve_interval;
                    let cfg = cfg.clone();
                    let name = pool.name.clone();
                    tokio::spawn(async move {
                        if let Some(pool) = cfg.pools.iter().find(|p| p.name == name) {
                            crate::dns::refresh(pool).await;
                        }
                    });
                }
            }
            for server in pool.servers.load().iter() {
                let next = due
                    .entry((pool.name.clone(), server.address.clone()))
                    .or_insert(now);
                if *next <= now {
                    *next = now + pool.health.interval;
                    tokio::spawn(probe_and_record(pool_view(pool), server.clone()));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a probe needs of its pool.
struct PoolView {
    name: String,
    check: HealthCheck,
    host: Option<String>,
}

fn pool_view(p: &Pool) -> PoolView {
    PoolView {
        name: p.name.clone(),
        check: p.health.clone(),
        host: p.host.clone(),
    }
}

async fn probe_and_record(pool: PoolView, server: Arc<Upstream>) {
    let check = &pool.check;
    let result = tokio::time::timeout(check.timeout, probe(&pool, &server)).await;
    let (ok, why) = match result {
        Ok(Ok(())) => (true, String::new()),
        Ok(Err(why)) => (false, why),
        Err(_) => (false, format!("no answer within {:?}", check.timeout)),
    };
    server.state.set_last_probe(crate::upstream::Probe {
        at: std::time::SystemTime::now(),
        ok,
        detail: why.clone(),
    });
    match server.state.probed(ok, check) {
        Some(true) => tracing::info!(
            pool = %pool.name,
            server = %server.address,
            "Odoo server healthy again"
        ),
        Some(false) => tracing::warn!(
            pool = %pool.name,
            server = %server.address,
            "Odoo server marked down by health checks: {why}"
        ),
        None => {}
    }
}

/// One probe: connect, and with a check path, `GET` it and compare the status.
async fn probe(pool: &PoolView, server: &Upstream) -> Result<(), String> {
    let mut s = tokio::net::TcpStream::connect(server.socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let Some(path) = &pool.check.path else {
        return Ok(());
    };
    let host = pool.host.as_deref().unwrap_or(server.from.as_str());
    let req = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: erpgate-health-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 256];
    while !buf.windows(2).any(|w| w == b"\r\n") && buf.len() < 1024 {
        let n = s.read(&mut chunk).await.map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf);
    let status = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.get(..3))
        .and_then(|c| c.parse::<u16>().ok());
    match status {
        Some(code) if code == pool.check.status => Ok(()),
        Some(code) => Err(format!("{path} answered {code}")),
        None => Err(format!("{path}: no HTTP answer")),
    }
}
