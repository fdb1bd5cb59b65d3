//! The per-request decision without a server, shared by `benches/decision.rs` and
//! `tests/alloc.rs`: path normalization, host extraction, classification, the
//! forwarded-header resolution, the allowlist and the rate-limit check, as erpgate's
//! `request_filter` runs them for a request whose class does not depend on its body. The
//! callers note the request's fields as erpgate's parser does (`Present::of`), so lookups of
//! fields the request lacks are skipped as on the real path.

use erpgate::classify::{classify_head, normalize_path, request_host, OnHead, RequestFacts};
use erpgate::forwarded;
use erpgate::headers::{Looked, Present};
use http::{HeaderMap, HeaderValue, Method};
use std::hint::black_box;
use std::net::IpAddr;

pub const DEFAULT_CONFIG: &str = include_str!("../../config/erpgate.toml");

pub fn decide(
    cfg: &erpgate::config::Config,
    method: &Method,
    raw_path: &str,
    headers: &HeaderMap,
    present: Present,
    peer: IpAddr,
) -> (Option<(usize, Option<usize>)>, IpAddr) {
    let path = normalize_path(raw_path);
    let host = request_host(None, headers.get("host").map(|v| v.as_bytes()));
    let facts = RequestFacts {
        method,
        path: &path,
        host: host.as_deref(),
        headers,
        present,
        jsonrpc: None,
    };
    let class = match classify_head(
        cfg.classes.iter().map(|c| c.alternatives.as_slice()),
        &facts,
    ) {
        OnHead::Class(class) => class,
        OnHead::NeedsBody => None,
    };
    let fwd = forwarded::resolve(
        peer,
        present.get_all(headers, Looked::XForwardedFor),
        &cfg.network.trusted_proxies,
    );
    // The class's policy: allowlist, then its rate limit.
    if let Some((ix, _)) = class {
        let c = &cfg.classes[ix];
        if c.allows(fwd.client) {
            if let Some(limit) = &c.rate_limit {
                black_box(limit.check(&limit.spec.key(fwd.client, host.as_deref(), headers, None)));
            }
        }
    }
    (class, fwd.client)
}

/// The headers of a browser's request to Odoo.
pub fn browser_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("erp.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("Mozilla/5.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert(
        "cookie",
        HeaderValue::from_static("session_id=abcdef0123456789"),
    );
    headers
}
