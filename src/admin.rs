//! The admin listener (`[listen] admin`, never the public port): `/metrics` (Prometheus
//! text), `/healthz` (the process serves), `/readyz` (every pool a class uses has a server
//! that takes requests), `/config` (which config serves, since when, the last reload error)
//! and `/upstreams` (every server's health and connections). No secrets in any of them.

use crate::config::reload::ReloadStats;
use crate::config::Config;
use crate::tls::Resolver;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

pub struct AdminApp {
    store: Arc<ArcSwap<Config>>,
    reload: Arc<ReloadStats>,
    resolver: Option<Arc<Resolver>>,
    started: SystemTime,
}

impl AdminApp {
    pub fn new(
        store: Arc<ArcSwap<Config>>,
        reload: Arc<ReloadStats>,
        resolver: Option<Arc<Resolver>>,
    ) -> Self {
        AdminApp {
            store,
            reload,
            resolver,
            started: SystemTime::now(),
        }
    }

    /// The certificates served now: (first name, notAfter).
    fn certs(&self) -> Vec<(String, i64)> {
        let Some(r) = &self.resolver else {
            return Vec::new();
        };
        r.set
            .load()
            .loaded
            .iter()
            .map(|l| {
                let name = l
                    .names
                    .first()
                    .cloned()
                    .unwrap_or_else(|| l.cert_path.display().to_string());
                (name, l.not_after)
            })
            .collect()
    }
}

fn reply(status: u16, content_type: &str, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    let len = body.len();
    let mut r = Response::new(body);
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    let h = r.headers_mut();
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        h.insert(http::header::CONTENT_TYPE, v);
    }
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    h.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    r
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Why erpgate is not ready: the pools used by a class that have no server taking requests.
pub fn not_ready(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for (i, pool) in cfg.pools.iter().enumerate() {
        if !cfg.classes.iter().any(|c| c.pool == i) {
            continue;
        }
        let servers = pool.servers.load();
        if !servers.iter().any(|s| s.state.is_healthy() && !s.drain) {
            out.push(format!(
                "pool `{}`: none of its {} server(s) takes requests",
                pool.name,
                servers.len()
            ));
        }
    }
    out
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let cfg = self.store.load();
        match path.as_str() {
            "/healthz" => reply(200, "text/plain", "ok\n".into()),
            "/readyz" => {
                let why = not_ready(&cfg);
                if why.is_empty() {
                    reply(200, "text/plain", "ready\n".into())
                } else {
                    reply(
                        503,
                        "text/plain",
                        format!("not ready: {}\n", why.join("; ")),
                    )
                }
            }
            "/metrics" => {
                let body = crate::metrics::render(&crate::metrics::Live {
                    cfg: &cfg,
                    generation: self.reload.generation.load(Ordering::Relaxed),
                    certs: self.certs(),
                    maintenance: cfg
                        .maintenance
                        .as_ref()
                        .is_some_and(|m| m.active_at(chrono::Utc::now().timestamp()).is_some()),
                });
                reply(200, "text/plain; version=0.0.4; charset=utf-8", body)
            }
            "/config" => {
                let st = self.reload.status();
                let body = serde_json::json!({
                    "source": cfg.source,
                    "generation": self.reload.generation.load(Ordering::Relaxed),
                    "hash": cfg.source_hash,
                    "loaded_at": rfc3339(st.loaded_at),
                    "started_at": rfc3339(self.started),
                    "started_at_unix": unix(self.started),
                    "reload_failures": self.reload.failed.load(Ordering::Relaxed),
                    "last_reload_error": st.last_error.as_ref().map(|(at, why)| serde_json::json!({
                        "at": rfc3339(*at),
                        "errors": why.lines().collect::<Vec<_>>(),
                    })),
                    "zone": cfg.network.zone,
                    "classes": cfg.classes.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
                    "pools": cfg.pools.iter().map(|p| serde_json::json!({
                        "name": p.name,
                        "servers": p.servers.load().iter().map(|s| serde_json::json!({
                            "address": s.address, "from": s.from, "zone": s.zone,
                            "healthy": s.state.is_healthy(), "drain": s.drain, "open": s.state.open(),
                        })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "certificates": self.certs().iter().map(|(name, not_after)| serde_json::json!({
                        "name": name, "not_after_unix": not_after,
                    })).collect::<Vec<_>>(),
                });
                reply(200, "application/json", format!("{body}\n"))
            }
            "/upstreams" => {
                let mut list = Vec::new();
                for p in &cfg.pools {
                    for s in p.servers.load().iter() {
                        let probe = s.state.last_probe();
                        list.push(serde_json::json!({
                            "pool": p.name,
                            "server": s.address,
                            "from": s.from,
                            "zone": s.zone,
                            "healthy": s.state.is_healthy(),
                            "drain": s.drain,
                            "open_connections": s.state.open(),
                            "last_probe": probe.map(|p| serde_json::json!({
                                "at": rfc3339(p.at),
                                "ok": p.ok,
                                "detail": p.detail,
                            })),
                        }));
                    }
                }
                let body = serde_json::json!({ "zone": cfg.network.zone, "servers": list });
                reply(200, "application/json", format!("{body}\n"))
            }
            _ => reply(
                404,
                "text/plain",
                "not found: try /metrics, /healthz, /readyz, /config, /upstreams\n".into(),
            ),
        }
    }
}
