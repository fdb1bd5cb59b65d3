//! Host names in a pool's `servers` (a Kubernetes headless Service gives one address per
//! pod): each is looked up at start, at every reload, and every `resolve_interval`; every
//! address it gives is a server of its own, with its own health and connection count. A
//! failed or empty lookup keeps the last good addresses and is logged (once, when the
//! failures start; again when the name resolves).

use crate::config::{Config, Pool};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// What one lookup gave: addresses, or why not.
pub type Answer = Result<Vec<SocketAddr>, String>;

/// Longest wait for one lookup in the periodic refresh.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Takes a pool's lookup answers (entry index, answer) in: replaces its servers when the
/// addresses changed. Returns whether they did.
pub fn apply(pool: &Pool, answers: &[(usize, Answer)]) -> bool {
    let current = pool.servers.load_full();
    let kept = |i: usize| -> Vec<SocketAddr> {
        let spec = &pool.specs[i];
        current
            .iter()
            .filter(|u| u.from == spec.address && u.zone == spec.zone)
            .map(|u| u.socket)
            .collect()
    };
    let mut resolved: Vec<Option<Vec<SocketAddr>>> = vec![None; pool.specs.len()];
    for (i, answer) in answers {
        let Some(spec) = pool.specs.get(*i) else {
            continue;
        };
        let failing = &pool.resolve_failing[*i];
        match answer {
            Ok(addrs) if !addrs.is_empty() => {
                let mut addrs = addrs.clone();
                addrs.sort();
                addrs.dedup();
                if failing.swap(false, Ordering::AcqRel) {
                    tracing::info!(pool = %pool.name, server = %spec.address, "resolves again");
                }
                resolved[*i] = Some(addrs);
            }
            other => {
                let why = match other {
                    Err(e) => e.clone(),
                    Ok(_) => "no addresses".to_string(),
                };
                let last = kept(*i);
                if !failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        pool = %pool.name,
                        server = %spec.address,
                        "lookup failed: {why}; keeping the last {} address(es)",
                        last.len()
                    );
                }
                resolved[*i] = Some(last);
            }
        }
    }
    let servers = crate::upstream::build_servers(
        &pool.specs,
        &|i| resolved[i].clone().unwrap_or_else(|| kept(i)),
        &current,
    );
    let changed = servers.len() != current.len()
        || servers
            .iter()
            .zip(current.iter())
            .any(|(a, b)| a.socket != b.socket || a.zone != b.zone);
    if changed {
        let list: Vec<&str> = servers.iter().map(|u| u.address.as_str()).collect();
        tracing::info!(pool = %pool.name, servers = ?list, "pool servers changed by DNS");
        pool.servers.store(Arc::new(servers));
    }
    changed
}

/// The host-name entries of a pool (index, `host:port`).
fn names(pool: &Pool) -> impl Iterator<Item = (usize, &str)> {
    pool.specs
        .iter()
        .enumerate()
        .filter(|(_, s)| s.socket.is_none())
        .map(|(i, s)| (i, s.address.as_str()))
}

/// Looks up every host name of `cfg` now (at start and on reload, off the request path).
pub fn resolve_blocking(cfg: &Config) {
    use std::net::ToSocketAddrs;
    for pool in cfg.pools.iter().filter(|p| p.has_host_names()) {
        let answers: Vec<(usize, Answer)> = names(pool)
            .map(|(i, name)| {
                let answer = name
                    .to_socket_addrs()
                    .map(|a| a.collect())
                    .map_err(|e| e.to_string());
                (i, answer)
            })
            .collect();
        apply(pool, &answers);
    }
}

/// Looks up a pool's host names again (the periodic refresh).
pub async fn refresh(pool: &Pool) {
    let mut answers = Vec::new();
    for (i, name) in names(pool) {
        let answer = match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host(name)).await
        {
            Ok(Ok(a)) => Ok(a.collect()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
        };
        answers.push((i, answer));
    }
    apply(pool, &answers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(servers: &str) -> Arc<Config> {
        let text = format!(
            "[listen]\nhttp = [\"127.0.0.1:8080\"]\n[pools.web]\nservers = [{servers}]\n\
             [[class]]\nname = \"user\"\npool = \"web\"\n"
        );
        Arc::new(crate::config::parse(&text, "t.toml", None).expect("valid"))
    }

    fn addrs(p: &Pool) -> Vec<String> {
        p.servers.load().iter().map(|u| u.address.clone()).collect()
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[test]
    fn each_address_of_a_name_is_a_server_and_a_failed_lookup_keeps_the_last_ones() {
        let cfg = pool(
            r#"{ address = "10.0.0.9:8069" }, { address = "odoo-web.odoo.svc:8069", zone = "b" }"#,
        );
        let p = &cfg.pools[0];
        // Before any lookup: the IP entry only.
        assert_eq!(addrs(p), vec!["10.0.0.9:8069"]);
        let first = vec![
            sa("10.1.0.2:8069"),
            sa("10.1.0.1:8069"),
            sa("10.1.0.2:8069"),
        ];
        assert!(apply(p, &[(1, Ok(first))]));
        assert_eq!(
            addrs(p),
            vec!["10.0.0.9:8069", "10.1.0.1:8069", "10.1.0.2:8069"]
        );
        let servers = p.servers.load();
        assert_eq!(servers[1].zone, "b");
        assert_eq!(servers[1].from, "odoo-web.odoo.svc:8069");
        // A pod's health survives a new answer that still has it.
        servers[1].state.connect_failed();
        let again = vec![sa("10.1.0.1:8069"), sa("10.1.0.3:8069")];
        assert!(apply(p, &[(1, Ok(again))]));
        assert_eq!(
            addrs(p),
            vec!["10.0.0.9:8069", "10.1.0.1:8069", "10.1.0.3:8069"]
        );
        assert!(!p.servers.load()[1].state.is_healthy());
        assert!(p.servers.load()[2].state.is_healthy());
        // Failures and empty answers keep the last good set.
        assert!(!apply(p, &[(1, Err("SERVFAIL".into()))]));
        assert!(!apply(p, &[(1, Ok(vec![]))]));
        assert_eq!(addrs(p).len(), 3);
        assert!(p.resolve_failing[1].load(Ordering::Acquire));
        // The same answer changes nothing.
        assert!(!apply(
            p,
            &[(1, Ok(vec![sa("10.1.0.3:8069"), sa("10.1.0.1:8069")]))]
        ));
        assert!(!p.resolve_failing[1].load(Ordering::Acquire));
    }

    #[test]
    fn a_reload_keeps_the_last_answer_and_the_servers_state() {
        let text = r#"{ address = "odoo-web.odoo.svc:8069" }"#;
        let old = pool(text);
        apply(&old.pools[0], &[(0, Ok(vec![sa("10.1.0.1:8069")]))]);
        old.pools[0].servers.load()[0].state.connect_failed();
        let mut new = Arc::try_unwrap(pool(text)).expect("sole owner");
        new.adopt_state(&old);
        let servers = new.pools[0].servers.load();
        assert_eq!(servers.len(), 1);
        assert_eq!(servers[0].address, "10.1.0.1:8069");
        assert!(!servers[0].state.is_healthy());
    }

    #[test]
    fn localhost_resolves() {
        let cfg = pool(r#"{ address = "localhost:8069" }"#);
        resolve_blocking(&cfg);
        let list = addrs(&cfg.pools[0]);
        assert!(list.iter().any(|a| a == "127.0.0.1:8069"), "{list:?}");
    }
}
