//! The per-request decision path without a server: path normalization, host extraction,
//! classification against the default config's classes, the forwarded-header resolution,
//! the allowlist and the rate-limit check with the default config's limits (one client, so
//! after the burst the limiter answers "limited": that is the path measured in steady state).
//! Also: compiling the default config. Run: `cargo bench --bench decision`.

use criterion::{criterion_group, criterion_main, Criterion};
use erpgate::classify::{classify, normalize_path, request_host, RequestFacts};
use erpgate::forwarded;
use http::{HeaderMap, HeaderValue, Method};
use std::hint::black_box;
use std::net::IpAddr;

const DEFAULT_CONFIG: &str = include_str!("../config/erpgate.toml");

fn decide(
    cfg: &erpgate::config::Config,
    method: &Method,
    raw_path: &str,
    headers: &HeaderMap,
    peer: IpAddr,
) -> (Option<(usize, Option<usize>)>, IpAddr) {
    let path = normalize_path(raw_path);
    let host = request_host(None, headers.get("host").map(|v| v.as_bytes()));
    let facts = RequestFacts {
        method,
        path: &path,
        host: host.as_deref(),
        headers,
        jsonrpc: None,
    };
    let class = classify(
        cfg.classes.iter().map(|c| c.alternatives.as_slice()),
        &facts,
    );
    let fwd = forwarded::resolve(
        peer,
        headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes()),
        &cfg.network.trusted_proxies,
    );
    // The class's policy: allowlist, then its rate limit.
    if let Some((ix, _)) = class {
        let c = &cfg.classes[ix];
        let allowed = c
            .allow
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&fwd.client)));
        if allowed {
            if let Some(limit) = &c.rate_limit {
                black_box(limit.check(&limit.spec.key(fwd.client, host.as_deref(), headers, None)));
            }
        }
    }
    (class, fwd.client)
}

fn bench(c: &mut Criterion) {
    let cfg = erpgate::config::parse(DEFAULT_CONFIG, "erpgate.toml", None)
        .expect("default config compiles");
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("erp.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("Mozilla/5.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert(
        "cookie",
        HeaderValue::from_static("session_id=abcdef0123456789"),
    );
    let peer: IpAddr = "203.0.113.9".parse().expect("ip");

    c.bench_function("decide: user GET /odoo/action-1", |b| {
        b.iter(|| {
            decide(
                &cfg,
                &Method::GET,
                black_box("/odoo/action-1"),
                &headers,
                peer,
            )
        })
    });
    c.bench_function("decide: integration POST /xmlrpc/2/object", |b| {
        b.iter(|| {
            decide(
                &cfg,
                &Method::POST,
                black_box("/xmlrpc/2/object"),
                &headers,
                peer,
            )
        })
    });
    c.bench_function("decide: encoded admin path", |b| {
        b.iter(|| {
            decide(
                &cfg,
                &Method::GET,
                black_box("/web/%64atabase/manager"),
                &headers,
                peer,
            )
        })
    });
    c.bench_function("compile default config", |b| {
        b.iter(|| erpgate::config::parse(black_box(DEFAULT_CONFIG), "erpgate.toml", None))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
