//! The admin listener (`[listen] admin`, never public): liveness, readiness, config status.

use crate::config::Config;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use std::sync::Arc;
use std::time::SystemTime;

pub struct AdminApp {
    store: Arc<ArcSwap<Config>>,
    started: SystemTime,
}

impl AdminApp {
    pub fn new(store: Arc<ArcSwap<Config>>) -> Self {
        AdminApp {
            store,
            started: SystemTime::now(),
        }
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

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/healthz" => reply(200, "text/plain", "ok\n".into()),
            "/readyz" => reply(200, "text/plain", "ready\n".into()),
            "/config" => {
                let cfg = self.store.load();
                let started = self
                    .started
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let body = serde_json::json!({
                    "source": cfg.source,
                    "started_at_unix": started,
                    "zone": cfg.network.zone,
                    "classes": cfg.classes.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
                    "pools": cfg.pools.iter().map(|p| serde_json::json!({
                        "name": p.name,
                        "servers": p.servers.load().iter().map(|s| serde_json::json!({"address": s.address, "from": s.from, "zone": s.zone, "healthy": s.state.is_healthy(), "drain": s.drain, "open": s.state.open()})).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                });
                reply(200, "application/json", format!("{body}\n"))
            }
            _ => reply(
                404,
                "text/plain",
                "not found: try /healthz, /readyz, /config\n".into(),
            ),
        }
    }
}
