//! The Pingora `ProxyHttp` implementation: each phase is a short call into the pure modules.

use crate::audit::{AuditLog, Record};
use crate::classify::{classify, normalize_path, request_host, RequestFacts};
use crate::config::{Class, Config};
use crate::errors::{reason, status_for};
use crate::forwarded::{self, Forwarded};
use crate::policy::ratelimit::Verdict;
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorType, Result};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const X_REQUEST_ID: &str = "x-request-id";

/// The proxy. Holds the config store; each request takes one snapshot of it.
pub struct ErpGate {
    store: Arc<ArcSwap<Config>>,
    audit: Option<AuditLog>,
}

impl ErpGate {
    pub fn new(store: Arc<ArcSwap<Config>>) -> Self {
        let audit = store.load().audit_path.clone().map(AuditLog::open);
        spawn_pruner(store.clone());
        ErpGate { store, audit }
    }
}

/// Every 10 s, drops rate-limit buckets that are full again, so memory follows the clients
/// active now, not every client ever seen.
fn spawn_pruner(store: Arc<ArcSwap<Config>>) {
    let spawned = std::thread::Builder::new()
        .name("erpgate-prune".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_secs(10));
            for class in &store.load().classes {
                if let Some(limit) = &class.rate_limit {
                    limit.prune();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the rate-limit pruning thread: {e}");
    }
}

/// Holds one place of a class's `max_in_flight` for the request's life.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Takes a place, or None when `max` requests are in flight already.
    fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<InFlight> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InFlight(counter.clone()))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Per-request state.
pub struct Ctx {
    cfg: Arc<Config>,
    started: Instant,
    class: Option<usize>,
    /// The `match` alternative that took the request (None: class without `match`).
    rule: Option<usize>,
    peer: IpAddr,
    fwd: Option<Forwarded>,
    /// Why erpgate refused the request itself (`allowed` when it did not).
    decision: &'static str,
    in_flight: Option<InFlight>,
    request_id: String,
    /// Index in the pool of the server of the current attempt.
    server: Option<usize>,
    /// Servers already tried (indexes in the pool), for failover on connect errors.
    tried: Vec<usize>,
    body_bytes: u64,
    /// Status erpgate answered itself, when it did.
    own_status: Option<u16>,
}

impl Ctx {
    fn class<'a>(&self, cfg: &'a Config) -> Option<&'a Class> {
        self.class.and_then(|i| cfg.classes.get(i))
    }
}

fn peer_ip(session: &Session) -> IpAddr {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| {
            forwarded::canonical(a.ip())
        })
}

fn head_size(req: &RequestHeader) -> usize {
    let headers: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    req.raw_path().len() + headers
}

/// Writes a short plain-text answer of erpgate's own.
async fn respond(session: &mut Session, ctx: &mut Ctx, code: u16, close: bool) -> Result<()> {
    respond_with(session, ctx, code, close, &[]).await
}

async fn respond_with(
    session: &mut Session,
    ctx: &mut Ctx,
    code: u16,
    close: bool,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let body = Bytes::from(format!("{code} {}\n", reason(code)));
    let mut resp = ResponseHeader::build(code, Some(5 + extra.len()))?;
    if code == 503 {
        resp.insert_header(header::RETRY_AFTER, "1")?;
    }
    for (k, v) in extra {
        resp.insert_header(*k, v.as_str())?;
    }
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    resp.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    if close {
        session.set_keepalive(None);
    }
    ctx.own_status = Some(code);
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await?;
    Ok(())
}

#[async_trait]
impl ProxyHttp for ErpGate {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            cfg: self.store.load_full(),
            started: Instant::now(),
            class: None,
            rule: None,
            peer: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            fwd: None,
            decision: "allowed",
            in_flight: None,
            request_id: String::new(),
            server: None,
            tried: Vec::new(),
            body_bytes: 0,
            own_status: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let cfg = ctx.cfg.clone();
        let peer = peer_ip(session);
        let req = session.req_header();
        let fwd = forwarded::resolve(
            peer,
            req.headers
                .get_all("x-forwarded-for")
                .iter()
                .map(|v| v.as_bytes()),
            &cfg.network.trusted_proxies,
        );
        ctx.request_id = match req.headers.get(X_REQUEST_ID) {
            Some(v) if fwd.peer_trusted && forwarded::valid_request_id(v.as_bytes()) => {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            }
            _ => forwarded::new_request_id(),
        };
        let too_big = head_size(req) > cfg.server.max_request_header;
        let class = {
            let path = normalize_path(req.uri.path());
            let host = request_host(
                req.uri.host(),
                req.headers.get(header::HOST).map(|v| v.as_bytes()),
            );
            let facts = RequestFacts {
                method: &req.method,
                path: &path,
                host: host.as_deref(),
                headers: &req.headers,
            };
            classify(
                cfg.classes.iter().map(|c| c.alternatives.as_slice()),
                &facts,
            )
        };
        let content_length = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        let client = fwd.client;
        ctx.peer = peer;
        ctx.fwd = Some(fwd);
        ctx.class = class.map(|(c, _)| c);
        ctx.rule = class.and_then(|(_, r)| r);
        if too_big {
            ctx.decision = "header_too_large";
            respond(session, ctx, 431, true).await?;
            return Ok(true);
        }
        let Some(class) = ctx.class.and_then(|i| cfg.classes.get(i)) else {
            ctx.decision = "no_class";
            respond(session, ctx, 404, false).await?;
            return Ok(true);
        };
        if let Some(allow) = &class.allow {
            if !allow.iter().any(|n| n.contains(&client)) {
                ctx.decision = "denied_ip";
                respond(session, ctx, 403, false).await?;
                return Ok(true);
            }
        }
        if let Some(limit) = &class.rate_limit {
            let req = session.req_header();
            let host = request_host(
                req.uri.host(),
                req.headers.get(header::HOST).map(|v| v.as_bytes()),
            );
            let key = limit.spec.key(client, host.as_deref(), &req.headers);
            if let Verdict::Limited { retry_after } = limit.check(&key) {
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                let policy = format!(
                    "\"{}\";q={};w={}",
                    class.name,
                    limit.burst,
                    limit.period.as_secs()
                );
                let state = format!("\"{}\";r=0;t={secs}", class.name);
                ctx.decision = "rate_limited";
                let extra = [
                    ("retry-after", secs.to_string()),
                    ("ratelimit-policy", policy),
                    ("ratelimit", state),
                ];
                respond_with(session, ctx, 429, false, &extra).await?;
                return Ok(true);
            }
        }
        if let Some(max) = class.max_in_flight {
            match InFlight::take(&class.in_flight, max) {
                Some(place) => ctx.in_flight = Some(place),
                None => {
                    ctx.decision = "over_capacity";
                    respond(session, ctx, 503, false).await?;
                    return Ok(true);
                }
            }
        }
        // An idle client (between body reads, or on an upgraded socket) is cut only after the
        // class's idle timeout, not Pingora's default 60 s.
        session.set_read_timeout(Some(class.timeouts.idle));
        if let (Some(max), Some(len)) = (class.max_body, content_length) {
            if len > max {
                ctx.decision = "body_too_large";
                respond(session, ctx, 413, true).await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(b) = body {
            ctx.body_bytes += b.len() as u64;
            if let Some(max) = ctx.class(&ctx.cfg).and_then(|c| c.max_body) {
                if ctx.body_bytes > max {
                    ctx.decision = "body_too_large";
                    return Error::e_explain(
                        ErrorType::HTTPStatus(413),
                        "request body exceeds max_body",
                    );
                }
            }
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let cfg = ctx.cfg.clone();
        let Some(class) = ctx.class(&cfg) else {
            return Error::e_explain(ErrorType::HTTPStatus(404), "no class");
        };
        let pool = &cfg.pools[class.pool];
        let n = pool.servers.len();
        let start = pool.next.fetch_add(1, Ordering::Relaxed);
        let Some(ix) = (0..n)
            .map(|k| (start + k) % n)
            .find(|i| !ctx.tried.contains(i))
        else {
            return Error::e_explain(
                ErrorType::HTTPStatus(502),
                "every server of the pool failed",
            );
        };
        ctx.tried.push(ix);
        ctx.server = Some(ix);
        let server = &pool.servers[ix];
        let addr = match server.socket {
            Some(a) => a,
            None => match tokio::net::lookup_host(server.address.as_str()).await {
                Ok(mut addrs) => match addrs.next() {
                    Some(a) => a,
                    None => {
                        return Error::e_explain(
                            ErrorType::ConnectNoRoute,
                            "host name has no address",
                        )
                        .map_err(|e| e.into_up())
                    }
                },
                Err(e) => {
                    return Err(Error::because(
                        ErrorType::ConnectNoRoute,
                        format!("resolving {}", server.address),
                        e,
                    )
                    .into_up())
                }
            },
        };
        let t = class.timeouts;
        let mut peer = HttpPeer::new(addr, false, String::new());
        let upgrade = session.is_upgrade_req();
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        // On an upgraded socket the idle limit governs both directions.
        peer.options.read_timeout = Some(if upgrade { t.read.max(t.idle) } else { t.read });
        peer.options.write_timeout = Some(t.read);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing of the request was sent: another server may take it, whatever the method.
        let pool_size = ctx
            .class(&ctx.cfg)
            .map_or(0, |c| ctx.cfg.pools[c.pool].servers.len());
        if ctx.tried.len() < pool_size {
            e.set_retry(true);
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(fwd) = &ctx.fwd else {
            return Ok(());
        };
        let trusted = fwd.peer_trusted;
        let req = session.req_header();
        // The listener's scheme, unless a trusted proxy says the client came over HTTPS.
        let proto = match req.headers.get("x-forwarded-proto").map(|v| v.as_bytes()) {
            Some(p) if trusted && p.eq_ignore_ascii_case(b"https") => "https",
            _ => "http",
        };
        let fhost = match req.headers.get("x-forwarded-host") {
            Some(h) if trusted && !h.is_empty() => Some(h.clone()),
            _ => req.headers.get(header::HOST).cloned().or_else(|| {
                req.uri
                    .authority()
                    .and_then(|a| http::HeaderValue::from_str(a.as_str()).ok())
            }),
        };
        if !trusted {
            for h in [
                "forwarded",
                "x-forwarded-port",
                "x-forwarded-server",
                "x-forwarded-prefix",
            ] {
                up.remove_header(h);
            }
        }
        up.insert_header("x-forwarded-for", fwd.chain.as_str())?;
        up.insert_header("x-real-ip", fwd.client.to_string())?;
        up.insert_header("x-forwarded-proto", proto)?;
        match fhost {
            Some(h) => up.insert_header("x-forwarded-host", h)?,
            None => {
                let local = session
                    .server_addr()
                    .and_then(|a| a.as_inet())
                    .map_or_else(|| "localhost".to_string(), |a| a.to_string());
                up.insert_header("x-forwarded-host", local)?
            }
        }
        up.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Odoo's HTTP workers answer HTTP/1.0; the client is answered in its own version.
        if session.req_header().version == http::Version::HTTP_11
            && resp.version == http::Version::HTTP_10
        {
            resp.set_version(http::Version::HTTP_11);
        }
        resp.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let (code, why) = status_for(e);
        if code > 0 && session.response_written().is_none() {
            let body = Bytes::from(format!("{code} {why}\n"));
            let sent = async {
                let mut resp = ResponseHeader::build(code, Some(4))?;
                resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
                resp.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
                resp.insert_header(header::CACHE_CONTROL, "no-store")?;
                if ctx.request_id.is_empty() {
                    ctx.request_id = forwarded::new_request_id();
                }
                resp.insert_header(X_REQUEST_ID, ctx.request_id.as_str())?;
                session.set_keepalive(None);
                session.write_response_header(Box::new(resp), false).await?;
                session.write_response_body(Some(body), true).await
            };
            if let Err(err) = sent.await {
                tracing::debug!("could not send error response: {err}");
            }
        }
        ctx.own_status = Some(code);
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// A refusal of erpgate's own (413, 404...) is in the access log; it is not an error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        matches!(e.etype(), ErrorType::HTTPStatus(code) if *code < 500)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        let status = crate::access::log(session, e, ctx);
        if let (Some(audit), Some(class)) = (&self.audit, ctx.class(&ctx.cfg)) {
            if class.audit {
                let req = session.req_header();
                let xff: Vec<&str> = req
                    .headers
                    .get_all("x-forwarded-for")
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                let rule = match ctx.rule {
                    Some(i) => class
                        .alternatives
                        .get(i)
                        .map_or_else(String::new, |a| a.to_string()),
                    None => "(no match: takes every request)".to_string(),
                };
                audit.write(&Record {
                    time: humantime::format_rfc3339_millis(std::time::SystemTime::now())
                        .to_string(),
                    client_ip: ctx.client().map_or_else(String::new, |c| c.to_string()),
                    peer_ip: ctx.peer.to_string(),
                    forwarded_for: &xff.join(", "),
                    method: req.method.as_str(),
                    path: req.uri.path(),
                    class: &class.name,
                    rule: &rule,
                    decision: ctx.decision,
                    status,
                    request_id: &ctx.request_id,
                });
            }
        }
    }
}

impl Ctx {
    pub fn started(&self) -> Instant {
        self.started
    }
    pub fn request_id(&self) -> &str {
        &self.request_id
    }
    pub fn client(&self) -> Option<IpAddr> {
        self.fwd.as_ref().map(|f| f.client)
    }
    pub fn class_name(&self) -> &str {
        self.class(&self.cfg).map_or("-", |c| c.name.as_str())
    }
    pub fn pool_name(&self) -> &str {
        self.class(&self.cfg)
            .map_or("-", |c| self.cfg.pools[c.pool].name.as_str())
    }
    pub fn server_address(&self) -> &str {
        match (self.class(&self.cfg), self.server) {
            (Some(c), Some(s)) => self.cfg.pools[c.pool].servers[s].address.as_str(),
            _ => "-",
        }
    }
    pub fn own_status(&self) -> Option<u16> {
        self.own_status
    }
}
