//! The per-request decision path without a server: path normalization, host extraction,
//! classification against the default config's classes, the forwarded-header resolution,
//! the allowlist and the rate-limit check with the default config's limits (one client, so
//! after the burst the limiter answers "limited": that is the path measured in steady state).
//! Also: compiling the default config. Run: `cargo bench --bench decision`.

use criterion::{criterion_group, criterion_main, Criterion};
use http::Method;
use std::hint::black_box;
use std::net::IpAddr;

#[path = "support/decide.rs"]
mod decide;
use decide::{browser_headers, decide, DEFAULT_CONFIG};
use erpgate::headers::Present;

fn bench(c: &mut Criterion) {
    let cfg = erpgate::config::parse(DEFAULT_CONFIG, "erpgate.toml", None)
        .expect("default config compiles");
    let headers = browser_headers();
    let present = Present::of(&headers);
    let peer: IpAddr = "203.0.113.9".parse().expect("ip");

    c.bench_function("decide: user GET /odoo/action-1", |b| {
        b.iter(|| {
            decide(
                &cfg,
                &Method::GET,
                black_box("/odoo/action-1"),
                &headers,
                present,
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
                present,
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
                present,
                peer,
            )
        })
    });
    // The body reader of `jsonrpc_service` conditions: a typical call, and a 1 MiB one.
    let call: &[u8] = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"object","method":"execute_kw","args":["erp",2,"api-key","account.move","search_read",[[["state","=","posted"]]],{"fields":["name","amount_total"],"limit":80}]},"id":7}"#;
    c.bench_function("jsonrpc: read an execute_kw call (221 B)", |b| {
        b.iter(|| {
            let mut s = erpgate::jsonrpc::Scanner::new();
            s.feed(black_box(call));
            (s.finish(), s.identity())
        })
    });
    let mut big = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"object","method":"execute_kw","args":["erp",2,"k","ir.attachment","create",[{"name":"inv.pdf","datas":""#.to_vec();
    big.extend(std::iter::repeat_n(b'A', 1 << 20));
    big.extend_from_slice(br#""}]]},"id":8}"#);
    let mut group = c.benchmark_group("jsonrpc");
    group.throughput(criterion::Throughput::Bytes(big.len() as u64));
    group.bench_function("read a 1 MiB attachment upload", |b| {
        b.iter(|| {
            let mut s = erpgate::jsonrpc::Scanner::new();
            s.feed(black_box(&big));
            s.finish()
        })
    });
    group.finish();
    c.bench_function("compile default config", |b| {
        b.iter(|| erpgate::config::parse(black_box(DEFAULT_CONFIG), "erpgate.toml", None))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
