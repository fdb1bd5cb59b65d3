//! Allocations on the per-request decision path, counted with dhat's heap profiler (a count,
//! not a timing: the same on any machine).

#[path = "../benches/support/decide.rs"]
mod decide;

use decide::{browser_headers, decide, DEFAULT_CONFIG};
use erpgate::headers::Present;
use http::{HeaderValue, Method};
use std::net::IpAddr;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

#[test]
fn deciding_a_plain_get_allocates_nothing() {
    let _profiler = dhat::Profiler::builder().testing().build();
    let cfg = erpgate::config::parse(DEFAULT_CONFIG, "erpgate.toml", None).expect("compiles");
    let headers = browser_headers();
    let peer: IpAddr = "203.0.113.9".parse().expect("ip");
    let present = Present::of(&headers);
    // The first request of a client creates its rate-limit bucket: that allocates.
    let first = decide(
        &cfg,
        &Method::GET,
        "/odoo/action-1",
        &headers,
        present,
        peer,
    );
    assert_eq!(
        first.0.map(|(c, _)| cfg.classes[c].name.as_str()),
        Some("user")
    );
    let before = dhat::HeapStats::get();
    for path in [
        "/odoo/action-1",
        "/web/assets/1/web.assets_web.min.js",
        "/web/image/res.partner/7/avatar_128",
    ] {
        for _ in 0..100 {
            std::hint::black_box(decide(&cfg, &Method::GET, path, &headers, present, peer));
        }
    }
    let after = dhat::HeapStats::get();
    assert_eq!(
        after.total_blocks - before.total_blocks,
        0,
        "allocations on the decision path of a plain GET"
    );
    // Behind a trusted load balancer (the default config trusts 127.0.0.1).
    let mut behind_lb = headers.clone();
    behind_lb.insert(
        "x-forwarded-for",
        HeaderValue::from_static("198.51.100.7, 127.0.0.1"),
    );
    let lb: IpAddr = "127.0.0.1".parse().expect("ip");
    let lb_present = Present::of(&behind_lb);
    let first = decide(&cfg, &Method::GET, "/odoo", &behind_lb, lb_present, lb);
    assert_eq!(first.1, "198.51.100.7".parse::<IpAddr>().expect("ip"));
    let before_lb = dhat::HeapStats::get();
    for _ in 0..100 {
        std::hint::black_box(decide(
            &cfg,
            &Method::GET,
            "/odoo",
            &behind_lb,
            lb_present,
            lb,
        ));
    }
    let after_lb = dhat::HeapStats::get();
    assert_eq!(
        after_lb.total_blocks - before_lb.total_blocks,
        0,
        "behind a load balancer"
    );
}
