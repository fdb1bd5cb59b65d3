//! Upstream pools through the real binary: zone-first selection, failover on connect
//! failures and health checks, draining, and a pool with nothing healthy.

mod support;

use std::time::Duration;
use support::erpgate::Erpgate;
use support::*;

fn config(servers: &str, pool_extra: &str) -> String {
    format!(
        r#"
[network]
zone = "a"

[pools.web]
servers = [{servers}]
health_check = {{ path = "/web/health", interval = "200ms", timeout = "500ms", healthy_after = 1, unhealthy_after = 1 }}
host = "erp.internal"
{pool_extra}

[[class]]
name = "user"
pool = "web"
"#
    )
}

fn server(addr: std::net::SocketAddr, zone: &str, extra: &str) -> String {
    format!(r#"{{ address = "{addr}", zone = "{zone}"{extra} }}"#)
}

#[test]
fn traffic_stays_in_the_local_zone_and_fails_over_when_it_dies() {
    let local = FakeOdoo::start();
    let remote = FakeOdoo::start();
    let servers = format!(
        "{}, {}",
        server(remote.web_addr(), "b", ""),
        server(local.web_addr(), "a", "")
    );
    let gw = Erpgate::start(&config(&servers, ""));
    for i in 0..10 {
        assert_eq!(get(gw.http, &format!("/odoo?i={i}")).status, 200);
    }
    assert_eq!(local.requests().len(), 10);
    assert_eq!(remote.requests().len(), 0);
    // Health probes carry the pool's Host.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while remote.health_probes() == 0 {
        assert!(std::time::Instant::now() < deadline, "no health probe");
        std::thread::sleep(Duration::from_millis(20));
    }
    let probe = remote
        .all_requests()
        .into_iter()
        .find(|r| r.is_health_probe())
        .expect("probe");
    assert_eq!(probe.path, "/web/health");
    assert_eq!(probe.header("host"), Some("erp.internal"));

    // The local zone dies: every request still succeeds, on the other zone.
    drop(local);
    for i in 0..20 {
        let r = get(gw.http, &format!("/odoo?after={i}"));
        assert_eq!(r.status, 200, "request {i} after the local zone died");
    }
    assert_eq!(remote.requests().len(), 20);
    // The dead server was marked down (passively, or by its probe).
    gw.wait_log_line(&["marked down"]);
}

#[test]
fn a_draining_server_gets_no_new_requests() {
    let a1 = FakeOdoo::start();
    let a2 = FakeOdoo::start();
    let servers = format!(
        "{}, {}",
        server(a1.web_addr(), "a", ", drain = true"),
        server(a2.web_addr(), "a", "")
    );
    let gw = Erpgate::start(&config(&servers, ""));
    for _ in 0..8 {
        assert_eq!(get(gw.http, "/odoo").status, 200);
    }
    assert_eq!(a1.requests().len(), 0);
    assert_eq!(a2.requests().len(), 8);
}

#[test]
fn failover_zones_order_and_nothing_healthy_answers_503() {
    let b = FakeOdoo::start();
    let c = FakeOdoo::start();
    let servers = format!(
        "{}, {}, {}",
        server(refused_addr(), "a", ""),
        server(b.web_addr(), "b", ""),
        server(c.web_addr(), "c", "")
    );
    let gw = Erpgate::start(&config(&servers, r#"failover_zones = ["c", "b"]"#));
    for _ in 0..6 {
        assert_eq!(get(gw.http, "/odoo").status, 200);
    }
    assert_eq!(c.requests().len(), 6);
    assert_eq!(b.requests().len(), 0);

    // Every server refuses: 503 with Retry-After, at once.
    let dead = format!(
        "{}, {}",
        server(refused_addr(), "a", ""),
        server(refused_addr(), "b", "")
    );
    let gw2 = Erpgate::start(&config(&dead, ""));
    for _ in 0..3 {
        let r = get(gw2.http, "/odoo");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("retry-after"), Some("1"));
    }
}
