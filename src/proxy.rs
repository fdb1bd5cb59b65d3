//! The Pingora `ProxyHttp` implementation: each phase is a short call into the pure modules.

use crate::audit::{AuditLog, Record};
use crate::classify::{
    classify, classify_head, normalize_path, request_host, OnHead, RequestFacts,
};
use crate::config::{Class, Config};
use crate::errors::{reason, status_for};
use crate::forwarded::{self, Forwarded};
use crate::headers::{Looked, Present};
use crate::jsonrpc::{Scanner, Service};
use crate::policy::ratelimit::{KeySpec, Verdict};
use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
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

/// Field names erpgate looks up in each request, or sets in each answer, made once: a name
/// given as a string is parsed again at each use (that parsing was 1-2 % of erpgate's user
/// time).
/// The names are those of [`Looked`], where erpgate looks them up.
const X_REQUEST_ID_NAME: header::HeaderName = Looked::XRequestId.name();
const X_FORWARDED_FOR: header::HeaderName = Looked::XForwardedFor.name();

/// The proxy. Holds the config store; each request takes one snapshot of it.
#[derive(Clone)]
pub struct ErpGate {
    store: Arc<ArcSwap<Config>>,
    audit: Option<AuditLog>,
}

impl ErpGate {
    pub fn new(store: Arc<ArcSwap<Config>>) -> Self {
        let audit = store.load().audit_path.clone().map(AuditLog::open);
        spawn_pruner(store.clone());
        crate::health::spawn(store.clone());
        ErpGate { store, audit }
    }

    /// The audit log, when the config has one.
    pub fn audit_log(&self) -> Option<&AuditLog> {
        self.audit.as_ref()
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

/// One open request or socket to a server, for least-connection balancing.
struct OpenConn(Arc<crate::upstream::ServerState>);

impl OpenConn {
    fn new(state: &Arc<crate::upstream::ServerState>) -> OpenConn {
        state.opened();
        OpenConn(state.clone())
    }
}

impl Drop for OpenConn {
    fn drop(&mut self) {
        self.0.closed();
    }
}

/// The config a thread's requests run with, shared among them through a count of this
/// thread's own ([`ErpGate::new_ctx`]): each request took and gave back the config's own
/// count, which both threads change (four atomic changes of one cache line per request).
pub struct Held(Arc<Config>);

impl std::ops::Deref for Held {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0
    }
}

thread_local! {
    /// The config this thread's requests last ran with.
    static HELD: std::cell::RefCell<Option<Arc<Held>>> = const { std::cell::RefCell::new(None) };
}

/// The current config, held through this thread's [`Held`]: a new one when the config was
/// reloaded since this thread's last request.
fn held(store: &ArcSwap<Config>) -> Arc<Held> {
    let now = store.load();
    HELD.with_borrow_mut(|held| match held {
        Some(h) if Arc::ptr_eq(&h.0, &now) => h.clone(),
        _ => {
            let h = Arc::new(Held(arc_swap::Guard::into_inner(now)));
            *held = Some(h.clone());
            h
        }
    })
}

/// Per-request state.
pub struct Ctx {
    cfg: Arc<Held>,
    started: Instant,
    class: Option<usize>,
    /// The `match` alternative that took the request (None: class without `match`).
    rule: Option<usize>,
    peer: IpAddr,
    fwd: Option<Forwarded>,
    /// Why erpgate refused the request itself (`allowed` when it did not).
    pub(crate) decision: &'static str,
    in_flight: Option<InFlight>,
    request_id: forwarded::RequestId,
    /// The server of the current attempt.
    server: Option<Arc<crate::config::Upstream>>,
    /// Servers already tried (their ids), for failover.
    tried: smallvec::SmallVec<[u64; 4]>,
    /// Counts this request among the current server's open connections.
    open_on: Option<OpenConn>,
    body_bytes: u64,
    /// Status erpgate answered itself, when it did.
    own_status: Option<u16>,
    /// A JSON-RPC body still being read when the class was chosen (see [`Tail`]).
    tail: Option<Box<Tail>>,
    /// Counted among the open WebSockets (until logging).
    pub(crate) ws_open: bool,
    /// The request went on to erpgate's WebSocket relay ([`crate::tunnel`]), with the
    /// state before this one: Pingora's proxy has nothing left to do or log.
    handed_off: bool,
    /// The client reached us over HTTPS: TLS on our listener, or `X-Forwarded-Proto: https`
    /// from a trusted proxy.
    https: bool,
    /// Which of the fields erpgate looks up the request has, where its path noted them.
    pub(crate) fields: Present,
}

/// The rest of a JSON-RPC body that was longer than what erpgate reads before choosing the
/// class. It streams on to Odoo, one piece behind: the last piece is held until the whole
/// body is read. If the complete body then calls a service of a class the client may not
/// use, the request is cut before Odoo has all of it (Odoo parses nothing incomplete).
struct Tail {
    scanner: Scanner,
    /// Body bytes that went through `request_body_filter` (the first ones again: Pingora
    /// replays what was read before the class was chosen).
    seen: u64,
    held: Option<Bytes>,
}

/// At most this much of a body is read before choosing the class: Pingora keeps up to
/// 64 KiB of a request body to send it again (its retry buffer), and what erpgate reads
/// first must stay in it to reach Odoo.
pub(crate) const PREFIX_MAX: u64 = 64 * 1024;

/// The start of a request body, read before the class is chosen.
pub(crate) struct Prefix {
    pub(crate) bytes: BytesMut,
    /// The whole body was read.
    pub(crate) complete: bool,
}

impl Ctx {
    /// Whether another server may still be tried: not all of the pool tried yet, and fewer
    /// attempts than the pool's `max_attempts`.
    fn may_try_again(&self) -> bool {
        self.class(&self.cfg).is_some_and(|c| {
            let pool = &self.cfg.pools[c.pool];
            self.tried.len() < pool.servers.load().len().min(pool.max_attempts)
        })
    }

    fn class<'a>(&self, cfg: &'a Config) -> Option<&'a Class> {
        self.class.and_then(|i| cfg.classes.get(i))
    }

    /// The request's class (None before classification, or when none took it).
    pub(crate) fn own_class(&self) -> Option<&Class> {
        self.class(&self.cfg)
    }

    /// Chooses the server of the next attempt (zone first, then failover zones; never one
    /// already tried) and counts the request among its open connections. Error 503 when the
    /// pool has no server left to try.
    fn pick_server(&mut self, req: &RequestHeader) -> Result<Arc<crate::config::Upstream>> {
        let cfg = self.cfg.clone();
        let Some(class) = self.class(&cfg) else {
            return Error::e_explain(ErrorType::HTTPStatus(404), "no class");
        };
        let pool = &cfg.pools[class.pool];
        let how = crate::upstream::Placement {
            own_zone: &cfg.network.zone,
            failover: &pool.failover_zones,
            balance: pool.balance,
            cursor: pool.next.fetch_add(1, Ordering::Relaxed),
            sticky: pool
                .affinity
                .as_deref()
                .map(|cookie| crate::affinity::sticky(req, cookie))
                .unwrap_or_default(),
        };
        let servers = pool.servers.load();
        let Some(server) =
            crate::upstream::select(&servers, &how, &self.tried).and_then(|ix| servers.get(ix))
        else {
            self.open_on = None;
            return Error::e_explain(
                ErrorType::HTTPStatus(503),
                "no healthy Odoo server in the pool",
            );
        };
        self.tried.push(server.id);
        self.open_on = Some(OpenConn::new(&server.state));
        self.server = Some(server.clone());
        Ok(server.clone())
    }

    /// A connection to the current server failed (nothing of the request was sent): the
    /// server is down until its probes say otherwise (a passive check).
    fn connect_failed(&mut self, e: &Error) {
        self.open_on = None;
        if let (Some(class), Some(server)) = (self.class(&self.cfg), &self.server) {
            if server.state.connect_failed() {
                tracing::warn!(
                    pool = %self.cfg.pools[class.pool].name,
                    server = %server.address,
                    "Odoo server marked down: {e}"
                );
            }
        }
    }
}

/// The client side of a request as erpgate's policy sees it: Pingora's proxy session, or a
/// request of erpgate's own loop ([`crate::fast`]).
pub(crate) trait Client: Send {
    fn req_header(&self) -> &RequestHeader;
    /// The address the connection comes from (unspecified when unknown).
    fn peer_ip(&self) -> IpAddr;
    /// The connection is TLS on erpgate's listener.
    fn tls(&self) -> bool;
    /// The connection presented a client certificate. rustls checked it against
    /// `[tls] client_ca` during the handshake (a certificate that does not chain to it fails
    /// the handshake), so presented means verified.
    fn has_client_cert(&self) -> bool;
    /// How long the client may stay silent (between body reads, on an upgraded socket).
    fn set_idle_timeout(&mut self, idle: Duration);
    /// The start of the request body (see [`read_session_prefix`]).
    async fn read_prefix(&mut self) -> Result<Prefix>;
    /// Writes an answer of erpgate's own; `close`: the connection ends after it.
    async fn answer(&mut self, resp: ResponseHeader, body: Bytes, close: bool) -> Result<()>;
}

impl Client for Session {
    fn req_header(&self) -> &RequestHeader {
        self.downstream_session.req_header()
    }

    fn peer_ip(&self) -> IpAddr {
        self.client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |a| {
                forwarded::canonical(a.ip())
            })
    }

    fn tls(&self) -> bool {
        self.digest().is_some_and(|d| d.ssl_digest.is_some())
    }

    fn has_client_cert(&self) -> bool {
        self.digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .is_some_and(|t| !t.cert_digest.is_empty())
    }

    fn set_idle_timeout(&mut self, idle: Duration) {
        self.set_read_timeout(Some(idle));
    }

    async fn read_prefix(&mut self) -> Result<Prefix> {
        read_session_prefix(self).await
    }

    async fn answer(&mut self, resp: ResponseHeader, body: Bytes, close: bool) -> Result<()> {
        if close {
            self.set_keepalive(None);
        }
        self.write_response_header(Box::new(resp), false).await?;
        self.write_response_body(Some(body), true).await?;
        Ok(())
    }
}

fn head_size(req: &RequestHeader) -> usize {
    let headers: usize = req
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    req.raw_path().len() + headers
}

/// `https://HOST[:port]/path?query` for a plain-HTTP request, from its `Host` (or absolute
/// URI); `None` when it names no valid host.
fn https_location(req: &RequestHeader, port: u16) -> Option<String> {
    let host = match req.headers.get(header::HOST) {
        Some(h) => h.to_str().ok()?.to_string(),
        None => req.uri.authority()?.as_str().to_string(),
    };
    let authority: http::uri::Authority = host.trim().parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let name = authority.host();
    let target = req.uri.path_and_query().map_or("/", |p| p.as_str());
    Some(if port == 443 {
        format!("https://{name}{target}")
    } else {
        format!("https://{name}:{port}{target}")
    })
}

/// The 503 of a maintenance window: `Retry-After` its end, the operator's page.
async fn respond_maintenance<C: Client>(
    session: &mut C,
    ctx: &mut Ctx,
    m: &crate::config::Maintenance,
    end: Option<i64>,
    now: i64,
) -> Result<()> {
    let retry = end.map_or(crate::config::MAINTENANCE_RETRY_DEFAULT, |e| {
        (e - now).max(1)
    });
    let body = match &m.page {
        Some(p) => p.clone(),
        None => {
            let until = end
                .and_then(|e| chrono::DateTime::from_timestamp(e, 0))
                .map(|t| format!(" until {} UTC", t.format("%Y-%m-%d %H:%M")))
                .unwrap_or_default();
            Bytes::from(format!(
                "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Maintenance</title></head>\
                 <body><h1>Odoo is being updated</h1><p>Maintenance{until}. Please come back then.</p></body></html>\n"
            ))
        }
    };
    let extra = [
        ("retry-after", retry.to_string()),
        ("content-type", "text/html; charset=utf-8".to_string()),
    ];
    send_own(session, ctx, 503, false, body, &extra).await
}

/// Writes a short plain-text answer of erpgate's own.
async fn respond<C: Client>(session: &mut C, ctx: &mut Ctx, code: u16, close: bool) -> Result<()> {
    respond_with(session, ctx, code, close, &[]).await
}

/// The head of an answer of erpgate's own (`body_len` bytes), with the request id: plain text
/// unless `extra` says otherwise; a 503 says when to come back (1 s unless `extra` says).
fn own_response_head(
    code: u16,
    body_len: usize,
    request_id: &str,
    extra: &[(&'static str, String)],
) -> Result<ResponseHeader> {
    let mut resp = ResponseHeader::build(code, Some(5 + extra.len()))?;
    if code == 503 {
        resp.insert_header(header::RETRY_AFTER, "1")?;
    }
    resp.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    for (k, v) in extra {
        resp.insert_header(*k, v.as_str())?;
    }
    resp.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
    resp.insert_header(X_REQUEST_ID_NAME, request_id)?;
    resp.insert_header(header::CACHE_CONTROL, "no-store")?;
    Ok(resp)
}

/// The request's `Content-Length`, when it has a valid one (`present`: which of the looked-up
/// fields it may have).
fn content_length(req: &RequestHeader, present: Present) -> Option<u64> {
    present
        .get(&req.headers, Looked::ContentLength)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// A short plain-text answer of erpgate's own, with more headers.
async fn respond_with<C: Client>(
    session: &mut C,
    ctx: &mut Ctx,
    code: u16,
    close: bool,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let body = Bytes::from(format!("{code} {}\n", reason(code)));
    send_own(session, ctx, code, close, body, extra).await
}

/// Writes an answer of erpgate's own (see [`own_response_head`]).
async fn send_own<C: Client>(
    session: &mut C,
    ctx: &mut Ctx,
    code: u16,
    close: bool,
    body: Bytes,
    extra: &[(&'static str, String)],
) -> Result<()> {
    let resp = own_response_head(code, body.len(), ctx.request_id.as_str(), extra)?;
    ctx.own_status = Some(code);
    session.answer(resp, body, close).await
}

/// A class's `security_headers` on a response from Odoo.
fn add_security_headers(
    resp: &mut impl AnswerFields,
    h: &crate::config::SecurityHeaders,
    https: bool,
    default_hsts: Option<&http::HeaderValue>,
) -> Result<()> {
    if https && h.hsts.is_none() {
        if let Some(v) = default_hsts {
            resp.set(header::STRICT_TRANSPORT_SECURITY, v)?;
        }
    }
    if h.is_empty() {
        return Ok(());
    }
    if h.nosniff {
        resp.set(
            header::X_CONTENT_TYPE_OPTIONS,
            &http::HeaderValue::from_static("nosniff"),
        )?;
    }
    if let Some(v) = &h.referrer_policy {
        resp.set(header::REFERRER_POLICY, v)?;
    }
    if !https {
        // HSTS over plain HTTP is ignored by browsers; a Secure cookie would not come back.
        return Ok(());
    }
    if let Some(v) = &h.hsts {
        resp.set(header::STRICT_TRANSPORT_SECURITY, v)?;
    }
    if h.secure_session_cookie {
        let changed: Vec<Option<Vec<u8>>> = resp
            .cookies()
            .map(crate::headers::secure_session_cookie)
            .collect();
        if changed.iter().any(Option::is_some) {
            resp.change_cookies(changed)?;
        }
    }
    Ok(())
}

/// The head of an answer to the client as [`answer_headers`] changes it: Pingora's
/// `ResponseHeader`, or the fast path's (which writes erpgate's fields as they are set).
pub(crate) trait AnswerFields {
    fn status(&self) -> http::StatusCode;

    /// Sets erpgate's field `name`, in place of any of Odoo's.
    fn set(&mut self, name: http::HeaderName, value: &http::HeaderValue) -> Result<()>;

    /// [`AnswerFields::set`] with a value given as bytes (refused unless a valid value).
    fn set_bytes(&mut self, name: http::HeaderName, value: &[u8]) -> Result<()>;

    /// The `Set-Cookie` values, in their order.
    fn cookies(&self) -> impl Iterator<Item = &[u8]>;

    /// Adds a `Set-Cookie` after the others.
    fn add_cookie(&mut self, value: String) -> Result<()>;

    /// Replaces the `Set-Cookie` values that have a new one (`changed`, in their order). A
    /// new value that is no valid field value leaves the old one.
    fn change_cookies(&mut self, changed: Vec<Option<Vec<u8>>>) -> Result<()>;
}

impl AnswerFields for ResponseHeader {
    fn status(&self) -> http::StatusCode {
        self.status
    }

    fn set(&mut self, name: http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        self.insert_header(name, value.clone())
    }

    fn set_bytes(&mut self, name: http::HeaderName, value: &[u8]) -> Result<()> {
        let value = http::HeaderValue::from_bytes(value)
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "header value", e))?;
        self.insert_header(name, value)
    }

    fn cookies(&self) -> impl Iterator<Item = &[u8]> {
        self.headers
            .get_all(header::SET_COOKIE)
            .into_iter()
            .map(|v| v.as_bytes())
    }

    fn add_cookie(&mut self, value: String) -> Result<()> {
        self.append_header(header::SET_COOKIE, value).map(|_| ())
    }

    fn change_cookies(&mut self, changed: Vec<Option<Vec<u8>>>) -> Result<()> {
        let cookies: Vec<http::HeaderValue> = self
            .headers
            .get_all(header::SET_COOKIE)
            .iter()
            .cloned()
            .collect();
        self.remove_header(&header::SET_COOKIE);
        for (old, new) in cookies.into_iter().zip(changed) {
            let value = match new {
                Some(v) => http::HeaderValue::from_bytes(&v).unwrap_or(old),
                None => old,
            };
            self.append_header(header::SET_COOKIE, value)?;
        }
        Ok(())
    }
}

/// The class of a request (and whether its body decides it), from its head and, once read,
/// the JSON-RPC service its body calls.
fn classify_request(
    cfg: &Config,
    req: &RequestHeader,
    present: Present,
    jsonrpc: Option<&Service>,
) -> (Option<(usize, Option<usize>)>, bool) {
    let path = normalize_path(req.uri.path());
    // Found only for a `host` condition (a rate limit keyed by host finds its own).
    let host = if cfg.classes_match_host {
        request_host(
            req.uri.host(),
            req.headers.get(header::HOST).map(|v| v.as_bytes()),
        )
    } else {
        None
    };
    let facts = RequestFacts {
        method: &req.method,
        path: &path,
        host: host.as_deref(),
        headers: &req.headers,
        present,
        jsonrpc,
    };
    let classes = cfg.classes.iter().map(|c| c.alternatives.as_slice());
    match jsonrpc {
        Some(_) => (classify(classes, &facts), false),
        None => match classify_head(classes, &facts) {
            OnHead::Class(class) => (class, false),
            // Classified again once the body's start is read.
            OnHead::NeedsBody => (None, true),
        },
    }
}

/// Reads the start of the body: all of it when its Content-Length is at most
/// [`PREFIX_MAX`], else the first piece that arrives. What is read stays in Pingora's retry
/// buffer and goes to Odoo unchanged, first.
async fn read_session_prefix(session: &mut Session) -> Result<Prefix> {
    let mut bytes = BytesMut::new();
    if session.as_mut().is_body_empty() {
        return Ok(Prefix {
            bytes,
            complete: true,
        });
    }
    let req = session.req_header();
    let small = !req.headers.contains_key(header::TRANSFER_ENCODING)
        && content_length(req, Present::ANY).is_some_and(|n| n <= PREFIX_MAX);
    let expects_continue = req
        .headers
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        // The client waits for this before it sends the body; Odoo will not be asked again.
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
        session.req_header_mut().remove_header(&header::EXPECT);
    }
    session.as_mut().enable_retry_buffering();
    loop {
        match session
            .read_request_body()
            .await
            .map_err(|e| e.into_down())?
        {
            Some(chunk) => bytes.extend_from_slice(&chunk),
            None => break,
        }
        if !small || session.as_mut().is_body_done() {
            break;
        }
    }
    if session.as_ref().retry_buffer_truncated() {
        // Cannot happen with the reads above; never send Odoo a body with a hole.
        return Error::e_explain(
            ErrorType::InternalError,
            "request body prefix lost from the retry buffer",
        );
    }
    let complete = session.as_mut().is_body_done();
    Ok(Prefix { bytes, complete })
}

/// What a body prefix says about the JSON-RPC service: final when the body is complete.
fn jsonrpc_verdict(req: &RequestHeader, scanner: &Scanner, complete: bool) -> Service {
    let encoded = req
        .headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"));
    if encoded {
        // Odoo would not decompress it either; whatever it is, it is not certain.
        Service::Doubt
    } else if complete {
        scanner.finish()
    } else {
        scanner.so_far()
    }
}

/// The caller identity of an XML-RPC or JSON-RPC body (database and login or uid).
fn body_identity(prefix: &[u8], scanner: Option<&Scanner>) -> Option<u64> {
    match prefix.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => match scanner {
            Some(s) => s.identity(),
            None => {
                let mut s = Scanner::new();
                s.feed(prefix);
                s.identity()
            }
        },
        Some(b'<') => crate::xmlrpc::identity(prefix),
        _ => None,
    }
}

/// Reads a JSON-RPC body's rest (see [`Tail`]) and holds its last piece until the whole
/// body is known. Then: if it calls a service of another class, that class's allowlist
/// decides, and a refused request is cut (403) before Odoo has the whole body.
fn check_tail(
    req: &RequestHeader,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
    ctx: &mut Ctx,
) -> Result<()> {
    let Some(tail) = ctx.tail.as_mut() else {
        return Ok(());
    };
    if let Some(b) = body.as_ref() {
        let start = tail.seen;
        tail.seen += b.len() as u64;
        let fed = tail.scanner.fed();
        if tail.seen > fed {
            let from = usize::try_from(fed.saturating_sub(start)).unwrap_or(usize::MAX);
            tail.scanner.feed(b.get(from..).unwrap_or_default());
        }
    }
    if !end_of_stream {
        // Send the piece held back, hold this one.
        let this = body.take();
        *body = Some(tail.held.take().unwrap_or_default());
        tail.held = this;
        return Ok(());
    }
    let verdict = jsonrpc_verdict(req, &tail.scanner, true);
    let held = tail.held.take();
    ctx.tail = None;
    let cfg = ctx.cfg.clone();
    let (class, _) = classify_request(&cfg, req, ctx.fields, Some(&verdict));
    if class.map(|(c, _)| c) != ctx.class {
        ctx.class = class.map(|(c, _)| c);
        ctx.rule = class.and_then(|(_, r)| r);
        let allowed = ctx
            .class(&cfg)
            .zip(ctx.client())
            .is_some_and(|(c, ip)| c.allows(ip));
        if !allowed {
            ctx.decision = "denied_ip";
            return Error::e_explain(
                ErrorType::HTTPStatus(403),
                "the complete JSON-RPC body calls a service this client may not use",
            );
        }
    }
    if let Some(held) = held {
        let mut all = BytesMut::from(held.as_ref());
        if let Some(b) = body.as_ref() {
            all.extend_from_slice(b);
        }
        *body = Some(all.freeze());
    }
    Ok(())
}

impl ErpGate {
    /// The request through the policy of its class (classification, allowlist, client
    /// certificate, maintenance, body size, rate limit, in-flight cap). `true`: erpgate
    /// answered it itself (a refusal, a redirect). Those answers are boxed: rare, their
    /// state took room in every request's (this future was 1,488 bytes on erpgate's own
    /// path, 536 with them boxed).
    pub(crate) async fn admit<C: Client>(&self, session: &mut C, ctx: &mut Ctx) -> Result<bool> {
        let cfg = ctx.cfg.clone();
        let peer = session.peer_ip();
        let req = session.req_header();
        let present = ctx.fields;
        let fwd = forwarded::resolve(
            peer,
            present.get_all(&req.headers, Looked::XForwardedFor),
            &cfg.network.trusted_proxies,
        );
        ctx.request_id = present
            .get(&req.headers, Looked::XRequestId)
            .filter(|_| fwd.peer_trusted)
            .and_then(|v| forwarded::RequestId::given(v.as_bytes()))
            .unwrap_or_else(forwarded::RequestId::fresh);
        let too_big = head_size(req) > cfg.server.max_request_header;
        let (mut class, needs) = classify_request(&cfg, req, present, None);
        let content_length = content_length(req, present);
        let client = fwd.client;
        let tls = session.tls();
        ctx.https = tls
            || (fwd.peer_trusted
                && present
                    .get(&req.headers, Looked::XForwardedProto)
                    .is_some_and(|p| p.as_bytes().eq_ignore_ascii_case(b"https")));
        ctx.peer = peer;
        ctx.fwd = Some(fwd);
        if too_big {
            ctx.decision = "header_too_large";
            Box::pin(respond(session, ctx, 431, true)).await?;
            return Ok(true);
        }
        if let Some(t) = cfg
            .tls
            .as_ref()
            .filter(|t| !ctx.https && t.redirects(req.uri.path()))
        {
            let Some(location) = https_location(req, t.redirect_port) else {
                ctx.decision = "bad_host";
                Box::pin(respond(session, ctx, 400, true)).await?;
                return Ok(true);
            };
            ctx.decision = "redirect_https";
            Box::pin(respond_with(
                session,
                ctx,
                308,
                false,
                &[("location", location)],
            ))
            .await?;
            return Ok(true);
        }
        // The body decides the class (a JSON-RPC `db` call is admin): read its start.
        let mut prefix = None;
        let mut scanner = None;
        if needs {
            let p = session.read_prefix().await?;
            let mut sc = Scanner::new();
            sc.feed(&p.bytes);
            let verdict = jsonrpc_verdict(session.req_header(), &sc, p.complete);
            class = classify_request(&cfg, session.req_header(), present, Some(&verdict)).0;
            if p.complete {
                scanner = Some(sc);
            } else {
                // The rest is read on the way to Odoo; the reader of the prefix goes on.
                ctx.tail = Some(Box::new(Tail {
                    scanner: sc,
                    seen: 0,
                    held: None,
                }));
            }
            prefix = Some(p);
        }
        ctx.class = class.map(|(c, _)| c);
        ctx.rule = class.and_then(|(_, r)| r);
        let Some(class) = ctx.class.and_then(|i| cfg.classes.get(i)) else {
            ctx.decision = "no_class";
            Box::pin(respond(session, ctx, 404, false)).await?;
            return Ok(true);
        };
        if !class.allows(client) {
            ctx.decision = "denied_ip";
            Box::pin(respond(session, ctx, 403, false)).await?;
            return Ok(true);
        }
        if class.require_client_cert && !session.has_client_cert() {
            ctx.decision = "no_client_cert";
            Box::pin(respond(session, ctx, 403, false)).await?;
            return Ok(true);
        }
        if let Some(m) = cfg
            .maintenance
            .as_ref()
            .filter(|m| class.maintenance_block && m.may_be_on())
        {
            let now = chrono::Utc::now().timestamp();
            if let Some(end) = m.active_at(now) {
                if !m.allows(client) {
                    ctx.decision = "maintenance";
                    Box::pin(respond_maintenance(session, ctx, m, end, now)).await?;
                    return Ok(true);
                }
            }
        }
        // An idle client (between body reads, or on an upgraded socket) is cut only after the
        // class's idle timeout, not Pingora's default 60 s.
        session.set_idle_timeout(class.timeouts.idle);
        if let (Some(max), Some(len)) = (class.max_body, content_length) {
            if len > max {
                ctx.decision = "body_too_large";
                Box::pin(respond(session, ctx, 413, true)).await?;
                return Ok(true);
            }
        }
        if let Some(limit) = &class.rate_limit {
            let identity = if limit.spec.reads_body(&session.req_header().headers) {
                if prefix.is_none() {
                    prefix = Some(session.read_prefix().await?);
                }
                prefix.as_ref().and_then(|p| {
                    let read = scanner.as_ref().or(ctx.tail.as_ref().map(|t| &t.scanner));
                    body_identity(&p.bytes, read)
                })
            } else {
                None
            };
            let req = session.req_header();
            // Only a host-keyed limit needs the host (classification derived it already).
            let host = match limit.spec {
                KeySpec::Host => request_host(
                    req.uri.host(),
                    req.headers.get(header::HOST).map(|v| v.as_bytes()),
                ),
                _ => None,
            };
            let key = limit
                .spec
                .key(client, host.as_deref(), &req.headers, identity);
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
                Box::pin(respond_with(session, ctx, 429, false, &extra)).await?;
                return Ok(true);
            }
        }
        if let Some(max) = class.max_in_flight {
            match InFlight::take(&class.in_flight, max) {
                Some(place) => ctx.in_flight = Some(place),
                None => {
                    ctx.decision = "over_capacity";
                    Box::pin(respond(session, ctx, 503, false)).await?;
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }
}

#[async_trait]
impl ProxyHttp for ErpGate {
    type CTX = Ctx;

    /// No downstream modules. Pingora's default adds its response compression module at
    /// level 0 (off), which still builds a context and looks at the headers of every request
    /// and response; erpgate passes bodies through as Odoo sends them.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn new_ctx(&self) -> Ctx {
        Ctx {
            cfg: held(&self.store),
            started: Instant::now(),
            class: None,
            rule: None,
            peer: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            fwd: None,
            decision: "allowed",
            in_flight: None,
            request_id: forwarded::RequestId::None,
            server: None,
            tried: smallvec::SmallVec::new(),
            open_on: None,
            body_bytes: 0,
            own_status: None,
            tail: None,
            https: false,
            fields: Present::ANY,
            ws_open: false,
            handed_off: false,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        if self.admit(session, ctx).await? {
            return Ok(true);
        }
        if crate::tunnel::is_websocket(session) {
            // The WebSocket goes on in erpgate's own relay, with this request's session and
            // state; Pingora's proxy task ends here (it would hold its session and two 64 KiB
            // body buffers for as long as the socket stays open).
            let idle = Box::new(std::io::Cursor::new(Vec::new()));
            let mut taken = std::mem::replace(session, Session::new_h1(idle));
            session.set_keepalive(None);
            taken.set_keepalive(None);
            let state = std::mem::replace(ctx, self.new_ctx());
            ctx.handed_off = true;
            tokio::spawn(crate::tunnel::serve(self.clone(), taken, state));
            return Ok(true);
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
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
        if ctx.tail.is_some() {
            check_tail(session.req_header(), body, end_of_stream, ctx)?;
        }
        Ok(())
    }

    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (server, t) = choose_server(session.req_header(), ctx)?;
        let mut peer = HttpPeer::new(server.socket, false, String::new());
        peer.options.connection_timeout = Some(t.connect);
        peer.options.total_connection_timeout = Some(t.connect);
        peer.options.read_timeout = Some(t.read);
        peer.options.write_timeout = Some(t.read);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        e: Box<Error>,
    ) -> Box<Error> {
        connect_error(ctx, e)
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        client_reused: bool,
    ) -> Box<Error> {
        let e = e.more_context(format!("Peer: {peer}"));
        let sent = Sent {
            method: &session.req_header().method,
            answered: session.response_written().is_some(),
            body_lost: session.as_ref().retry_buffer_truncated(),
            reused: client_reused,
        };
        error_after_send(sent, e, ctx)
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let local = || session.server_addr().and_then(|a| a.as_inet()).copied();
        forward_headers(session.req_header(), local, up, ctx)
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
        answer_headers(resp, ctx)
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let answered = session.response_written().is_some();
        FailToProxy {
            error_code: answer_failure(session, answered, e, ctx).await,
            can_reuse_downstream: false,
        }
    }

    /// A refusal of erpgate's own (413, 404...) is in the access log; it is not an error.
    fn suppress_error_log(&self, _session: &Session, _ctx: &Ctx, e: &Error) -> bool {
        matches!(e.etype(), ErrorType::HTTPStatus(code) if *code < 500)
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if ctx.handed_off {
            return;
        }
        let req = session.req_header();
        let forwarded_for = || forwarded_for(req);
        self.record(
            &crate::access::Line::of(session, ctx),
            forwarded_for,
            e,
            ctx,
        );
    }
}

/// The `X-Forwarded-For` values a request came with, joined (for its audit record).
pub(crate) fn forwarded_for(req: &RequestHeader) -> String {
    let xff: Vec<&str> = req
        .headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    xff.join(", ")
}

/// The server of the next attempt (see [`Ctx::pick_server`]) and the class's timeouts.
pub(crate) fn choose_server(
    req: &RequestHeader,
    ctx: &mut Ctx,
) -> Result<(Arc<crate::config::Upstream>, crate::config::Timeouts)> {
    let server = ctx.pick_server(req)?;
    let Some(class) = ctx.class(&ctx.cfg) else {
        return Error::e_explain(ErrorType::HTTPStatus(404), "no class");
    };
    Ok((server, class.timeouts))
}

/// A connection to the chosen server failed: it is marked down, and another server may take
/// the request (nothing of it was sent, whatever the method) while the pool has one left.
pub(crate) fn connect_error(ctx: &mut Ctx, mut e: Box<Error>) -> Box<Error> {
    ctx.connect_failed(&e);
    if ctx.may_try_again() {
        e.set_retry(true);
    }
    e
}

/// What had happened when an attempt failed after its request went to Odoo.
pub(crate) struct Sent<'a> {
    pub method: &'a http::Method,
    /// The client has the head of an answer.
    pub answered: bool,
    /// Part of the request body can no longer be sent again.
    pub body_lost: bool,
    /// The connection to Odoo was a kept-alive one.
    pub reused: bool,
}

/// Whether a request that failed after bytes of it reached a server may go again. Only a
/// GET or HEAD may, and only while the client has seen nothing of an answer: where its class
/// says so after any failure; otherwise only when a kept-alive connection turns out to have
/// been closed by Odoo before it read anything (Pingora's reused-connection rule). A POST,
/// PUT, PATCH or DELETE is never sent twice: the client gets 502.
pub(crate) fn error_after_send(sent: Sent, mut e: Box<Error>, ctx: &Ctx) -> Box<Error> {
    let safe = *sent.method == http::Method::GET || *sent.method == http::Method::HEAD;
    if !safe || sent.answered || sent.body_lost || !ctx.may_try_again() {
        e.set_retry(false);
    } else if ctx.class(&ctx.cfg).is_some_and(|c| c.retry_idempotent) {
        e.set_retry(true);
    } else {
        e.retry.decide_reuse(sent.reused);
    }
    e
}

/// Forwarding fields a client that is not a trusted proxy may not send on.
const UNTRUSTED_FORWARDING: [&str; 4] = [
    "forwarded",
    "x-forwarded-port",
    "x-forwarded-server",
    "x-forwarded-prefix",
];

/// Where [`forward_headers`] puts the fields it sets on the request to Odoo: Pingora's request
/// header, or the head erpgate's own loop writes ([`crate::fast`]).
pub(crate) trait UpstreamFields {
    /// Removes the client's `name` field.
    fn remove(&mut self, name: &'static str) -> Result<()>;
    /// Sets `name` (lowercase) to the value `value` writes.
    fn set(
        &mut self,
        name: &'static str,
        value: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<()>;
}

impl UpstreamFields for RequestHeader {
    fn remove(&mut self, name: &'static str) -> Result<()> {
        self.remove_header(name);
        Ok(())
    }

    fn set(
        &mut self,
        name: &'static str,
        value: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<()> {
        let mut v = Vec::new();
        value(&mut v).map_err(|e| Error::because(ErrorType::InternalError, "header value", e))?;
        let v = http::HeaderValue::from_maybe_shared(Bytes::from(v))
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "header value", e))?;
        self.insert_header(name, v)
    }
}

/// The forwarded headers and the request id on `up`, the request as it goes to Odoo (`req`:
/// as the client sent it; `local`: erpgate's address, the host of last resort).
pub(crate) fn forward_headers(
    req: &RequestHeader,
    local: impl FnOnce() -> Option<std::net::SocketAddr>,
    up: &mut impl UpstreamFields,
    ctx: &Ctx,
) -> Result<()> {
    let Some(fwd) = &ctx.fwd else {
        return Ok(());
    };
    let trusted = fwd.peer_trusted;
    let proto = if ctx.https { "https" } else { "http" };
    let fhost = match ctx.fields.get(&req.headers, Looked::XForwardedHost) {
        Some(h) if trusted && !h.is_empty() => Some(h.as_bytes()),
        _ => req
            .headers
            .get(header::HOST)
            .map(|h| h.as_bytes())
            .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes())),
    };
    if !trusted {
        for h in UNTRUSTED_FORWARDING {
            up.remove(h)?;
        }
    }
    up.set("x-forwarded-for", |w| {
        fwd.write_chain(ctx.fields.get_all(&req.headers, Looked::XForwardedFor), w)
    })?;
    up.set("x-real-ip", |w| forwarded::write_ip(fwd.client, w))?;
    up.set("x-forwarded-proto", |w| w.write_all(proto.as_bytes()))?;
    up.set("x-forwarded-host", |w| match fhost {
        Some(h) => w.write_all(h),
        None => match local() {
            Some(a) => write!(w, "{a}"),
            None => w.write_all(b"localhost"),
        },
    })?;
    up.set(X_REQUEST_ID, |w| w.write_all(ctx.request_id.as_bytes()))
}

/// Odoo's answer as it goes to the client: the request id, the affinity cookie, the class's
/// security headers.
pub(crate) fn answer_headers(resp: &mut impl AnswerFields, ctx: &mut Ctx) -> Result<()> {
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS && !ctx.ws_open {
        if let Some(m) = crate::metrics::get() {
            m.websockets.with_label_values(&[ctx.class_name()]).inc();
            ctx.ws_open = true;
        }
    }
    resp.set_bytes(X_REQUEST_ID_NAME, ctx.request_id.as_bytes())?;
    if let Some(class) = ctx.class(&ctx.cfg) {
        if let (Some(cookie), Some(server)) = (&ctx.cfg.pools[class.pool].affinity, &ctx.server) {
            let pin = crate::affinity::pin_for(resp.cookies(), cookie, server.id, ctx.https);
            if let Some(pin) = pin {
                resp.add_cookie(pin)?;
            }
        }
        let default_hsts = ctx.cfg.tls.as_ref().and_then(|t| t.hsts.as_ref());
        add_security_headers(resp, &class.security_headers, ctx.https, default_hsts)?;
    }
    Ok(())
}

/// The error answer for a failed request (unless the client has the head of an answer
/// already: `answered`); the status, 0 when the client connection is gone.
pub(crate) async fn answer_failure<C: Client>(
    session: &mut C,
    answered: bool,
    e: &Error,
    ctx: &mut Ctx,
) -> u16 {
    let (code, why) = status_for(e);
    if code > 0 && !answered {
        let body = Bytes::from(format!("{code} {why}\n"));
        if ctx.request_id.is_empty() {
            ctx.request_id = forwarded::RequestId::fresh();
        }
        if let Err(err) = send_own(session, ctx, code, true, body, &[]).await {
            tracing::debug!("could not send error response: {err}");
        }
    }
    ctx.own_status = Some(code);
    code
}

impl ErpGate {
    /// The end of a request: its access log line, its metrics and, when its class is
    /// audited, its audit record (`forwarded_for`: the `X-Forwarded-For` it came with).
    pub(crate) fn record(
        &self,
        line: &crate::access::Line,
        forwarded_for: impl FnOnce() -> String,
        e: Option<&Error>,
        ctx: &Ctx,
    ) {
        crate::access::write(line, e, ctx);
        count_request(ctx, line.status);
        let (Some(audit), Some(class)) = (&self.audit, ctx.class(&ctx.cfg)) else {
            return;
        };
        if !class.audit {
            return;
        }
        let rule = match ctx.rule {
            Some(i) => class
                .alternatives
                .get(i)
                .map_or_else(String::new, |a| a.to_string()),
            None => "(no match: takes every request)".to_string(),
        };
        audit.write(&Record {
            time: humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
            client_ip: ctx.client().map_or_else(String::new, |c| c.to_string()),
            peer_ip: ctx.peer.to_string(),
            forwarded_for: &forwarded_for(),
            method: line.method,
            path: line.path,
            class: &class.name,
            rule: &rule,
            decision: ctx.decision,
            status: line.status,
            request_id: ctx.request_id.as_str(),
        });
    }
}

/// The request in the metrics: its count and duration, what policy refused, retries,
/// failovers, the end of a WebSocket.
fn count_request(ctx: &Ctx, status: u16) {
    let Some(m) = crate::metrics::get() else {
        return;
    };
    let class = ctx.class_name();
    let pool = ctx.pool_name();
    let zone = ctx.server.as_ref().map_or("-", |s| s.zone.as_str());
    let code = http::StatusCode::from_u16(status).ok();
    let status = code.as_ref().map_or("0", |c| c.as_str());
    m.count_request(
        [class, pool, zone, status],
        ctx.started.elapsed().as_secs_f64(),
    );
    let denied = match ctx.decision {
        "denied_ip" => Some("ip"),
        "no_client_cert" => Some("client_cert"),
        "maintenance" => Some("maintenance"),
        "over_capacity" => Some("capacity"),
        "body_too_large" => Some("body_too_large"),
        _ => None,
    };
    if let Some(reason) = denied {
        m.denied.with_label_values(&[class, reason]).inc();
    }
    if ctx.decision == "rate_limited" {
        m.rate_limited.with_label_values(&[class]).inc();
    }
    if ctx.tried.len() > 1 {
        m.retries
            .with_label_values(&[pool])
            .inc_by(ctx.tried.len() as u64 - 1);
    }
    if let Some(server) = &ctx.server {
        if server.zone != ctx.cfg.network.zone {
            m.failovers.with_label_values(&[pool, zone]).inc();
        }
    }
    if ctx.ws_open {
        m.websockets.with_label_values(&[class]).dec();
    }
}

impl Ctx {
    pub fn started(&self) -> Instant {
        self.started
    }
    pub fn request_id(&self) -> &forwarded::RequestId {
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
        self.server.as_ref().map_or("-", |s| s.address.as_str())
    }
    pub fn own_status(&self) -> Option<u16> {
        self.own_status
    }
}
