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
    remote.wait_for_health_probe();
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

fn crashing_on(path: &str) -> FakeOdoo {
    FakeOdoo::start_with(FakeOptions {
        crash_path: Some(path.to_string()),
        ..FakeOptions::default()
    })
}

/// The `X-Request-Id` of every request (health probes left out) that reached these servers.
fn request_ids(servers: &[&FakeOdoo]) -> Vec<String> {
    servers
        .iter()
        .flat_map(|s| s.requests())
        .filter_map(|r| r.header("x-request-id").map(str::to_string))
        .collect()
}

#[test]
fn a_post_whose_server_dies_before_answering_gets_502_and_reaches_no_other_server() {
    let dying = crashing_on("/web/dataset/call_kw");
    let healthy = FakeOdoo::start();
    let servers = format!(
        "{}, {}",
        server(dying.web_addr(), "a", ""),
        server(healthy.web_addr(), "a", "")
    );
    // Even a class that retries GETs never sends a POST twice.
    let cfg =
        config(&servers, "").replace("pool = \"web\"", "pool = \"web\"\nretry_idempotent = true");
    let gw = Erpgate::start(&cfg);
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = request(
            gw.http,
            "POST",
            "/web/dataset/call_kw",
            &[("Content-Type", "application/json")],
            Some(format!("{{\"params\":{{\"n\":{i}}}}}").as_bytes()),
        );
        statuses.push(r.status);
    }
    // The POST that reached the dying server failed; every other one succeeded (after the
    // death, on the healthy server: connection refused is retried, nothing was sent).
    assert_eq!(
        statuses.iter().filter(|s| **s == 502).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
    assert_eq!(dying.requests().len(), 1);
    assert_eq!(healthy.requests().len(), 7);
    // Each request id reached Odoo at most once: nothing was posted twice.
    let mut ids = request_ids(&[&dying, &healthy]);
    assert_eq!(ids.len(), 8);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 8, "a request reached Odoo twice");
    let line = gw.wait_log_line(&["status=502"]);
    assert!(line.contains("method=POST"), "{line}");
}

#[test]
fn a_get_is_tried_again_after_a_failure_only_where_its_class_says_so() {
    for retry in [true, false] {
        let dying = crashing_on("/report");
        let healthy = FakeOdoo::start();
        // The dying server is first: round robin starts with it.
        let servers = format!(
            "{}, {}",
            server(dying.web_addr(), "a", ""),
            server(healthy.web_addr(), "a", "")
        );
        let cfg = config(&servers, "").replace(
            "pool = \"web\"",
            &format!("pool = \"web\"\nretry_idempotent = {retry}"),
        );
        let gw = Erpgate::start(&cfg);
        let r = get(gw.http, "/report");
        assert_eq!(dying.requests().len(), 1, "retry_idempotent = {retry}");
        if retry {
            assert_eq!(r.status, 200, "{}", r.body_str());
            // The same request (one id) was tried on the second server.
            assert_eq!(healthy.requests().len(), 1);
            let ids = request_ids(&[&dying, &healthy]);
            assert_eq!(ids[0], ids[1]);
        } else {
            assert_eq!(r.status, 502);
            assert_eq!(healthy.requests().len(), 0);
        }
    }
}

#[test]
fn attempts_per_request_are_bounded_by_max_attempts() {
    // Five servers that die after erpgate found them healthy (its next probe is an hour
    // away), one that works, all in the local zone: with max_attempts = 2 a request gives up
    // after two refused connections (502) instead of walking the whole pool.
    let doomed: Vec<FakeOdoo> = (0..5).map(|_| FakeOdoo::start()).collect();
    let ok = FakeOdoo::start();
    let mut list: Vec<String> = doomed
        .iter()
        .map(|f| server(f.web_addr(), "a", ""))
        .collect();
    list.push(server(ok.web_addr(), "a", ""));
    let cfg = config(&list.join(", "), "max_attempts = 2")
        .replace("interval = \"200ms\"", "interval = \"1h\"");
    let gw = Erpgate::start(&cfg);
    for f in &doomed {
        f.wait_for_health_probe();
    }
    drop(doomed);
    let r = get(gw.http, "/odoo");
    assert_eq!(r.status, 502, "{}", r.body_str());
    assert_eq!(ok.requests().len(), 0);
    // Each refusal marked its server down, so later requests skip those: within three more
    // requests (at most two tries each) the working server is reached.
    let mut codes = Vec::new();
    for _ in 0..3 {
        codes.push(get(gw.http, "/odoo").status);
    }
    assert_eq!(codes.last(), Some(&200), "{codes:?}");
}

/// A pool of gevent servers carrying WebSockets, spread by open connections.
fn ws_config(servers: &str) -> String {
    format!(
        r#"
[network]
zone = "a"

[pools.longpoll]
servers = [{servers}]
balance = "least_conn"
health_check = {{ path = "/websocket/health", interval = "200ms", timeout = "500ms", healthy_after = 1, unhealthy_after = 1 }}

[[class]]
name = "longpoll"
match = {{ path_prefix = "/websocket" }}
pool = "longpoll"
timeouts = {{ read = "1h", idle = "1h" }}
"#
    )
}

fn open_sockets(gw: &Erpgate, n: usize) -> Vec<WsClient> {
    (0..n)
        .map(|i| {
            let mut ws = ws_connect(gw.http, "/websocket", Some("http://localhost"))
                .expect("handshake through erpgate");
            let msg = format!("hello {i}");
            ws.send_text(&msg);
            assert_eq!(ws.recv_text(Duration::from_secs(5)), msg);
            ws
        })
        .collect()
}

fn all_echo(sockets: &mut [WsClient]) {
    for (i, ws) in sockets.iter_mut().enumerate() {
        let msg = format!("still there {i}");
        ws.send_text(&msg);
        assert_eq!(ws.recv_text(Duration::from_secs(5)), msg);
    }
}

#[test]
fn websockets_spread_by_open_connections_and_drained_or_removed_servers_keep_theirs() {
    let s1 = FakeOdoo::start();
    let s2 = FakeOdoo::start();
    let one = |drain: &str| server(s1.gevent_addr(), "a", drain);
    let two = |drain: &str| server(s2.gevent_addr(), "a", drain);
    // s2 starts drained: every socket goes to s1.
    let gw = Erpgate::start(&ws_config(&format!(
        "{}, {}",
        one(""),
        two(", drain = true")
    )));
    let mut first = open_sockets(&gw, 4);
    assert_eq!((s1.ws_open(), s2.ws_open()), (4, 0));

    // s2 back in service: new sockets go to the server with fewer open (round robin would
    // have put half of them on s1 again).
    gw.reload_with(&ws_config(&format!("{}, {}", one(""), two(""))));
    let mut second = open_sockets(&gw, 4);
    assert_eq!((s1.ws_open(), s2.ws_open()), (4, 4));

    // s1 drained: new sockets and requests go to s2 only; s1's sockets keep echoing.
    gw.reload_with(&ws_config(&format!(
        "{}, {}",
        one(", drain = true"),
        two("")
    )));
    let mut third = open_sockets(&gw, 2);
    assert_eq!((s1.ws_open(), s2.ws_open()), (4, 6));
    all_echo(&mut first);
    all_echo(&mut second);

    // s1 removed from the config: the same, its open sockets live on.
    gw.reload_with(&ws_config(&two("")));
    let _fourth = open_sockets(&gw, 2);
    assert_eq!((s1.ws_open(), s2.ws_open()), (4, 8));
    all_echo(&mut first);
    all_echo(&mut third);
    let handshakes = |f: &FakeOdoo| {
        f.requests()
            .iter()
            .filter(|r| r.path.starts_with("/websocket"))
            .count()
    };
    assert_eq!((handshakes(&s1), handshakes(&s2)), (4, 8));
}

#[test]
fn traffic_moves_back_to_the_local_zone_after_healthy_after_good_probes() {
    let local = FakeOdoo::start();
    let remote = FakeOdoo::start();
    let (web, gevent) = (local.web_addr(), local.gevent_addr());
    let servers = format!(
        "{}, {}",
        server(local.web_addr(), "a", ""),
        server(remote.web_addr(), "b", "")
    );
    let cfg = config(&servers, "").replace("healthy_after = 1", "healthy_after = 3");
    let gw = Erpgate::start(&cfg);
    assert_eq!(get(gw.http, "/odoo").status, 200);
    assert_eq!(local.requests().len(), 1);

    // The local zone goes down under a steady request loop: nothing fails.
    drop(local);
    for i in 0..10 {
        assert_eq!(get(gw.http, &format!("/odoo?down={i}")).status, 200);
    }
    assert_eq!(remote.requests().len(), 10);

    // It comes back on the same address: traffic returns once three probes in a row passed,
    // and not before.
    let back = FakeOdoo::start_at(web, gevent, FakeOptions::default());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut sent = 0;
    while back.requests().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "traffic never came back"
        );
        assert_eq!(get(gw.http, &format!("/odoo?back={sent}")).status, 200);
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = back.all_requests();
    let first_real = seen
        .iter()
        .position(|r| !r.is_health_probe())
        .expect("a request");
    assert!(
        first_real >= 3,
        "traffic came back after {first_real} probes: {seen:#?}"
    );
    gw.wait_log_line(&["healthy again"]);
    // From then on it stays local.
    back.clear();
    for i in 0..5 {
        assert_eq!(get(gw.http, &format!("/odoo?local={i}")).status, 200);
    }
    assert_eq!(back.requests().len(), 5);
}

/// Which of `fakes` received requests whose path contains `needle`.
fn receivers(fakes: &[&FakeOdoo], needle: &str) -> Vec<usize> {
    fakes
        .iter()
        .enumerate()
        .filter(|(_, f)| f.requests().iter().any(|r| r.path.contains(needle)))
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn session_affinity_keeps_each_session_on_one_server_and_yields_to_health() {
    let f: Vec<FakeOdoo> = (0..3).map(|_| FakeOdoo::start()).collect();
    let fakes: Vec<&FakeOdoo> = f.iter().collect();
    let list: Vec<String> = f.iter().map(|x| server(x.web_addr(), "a", "")).collect();
    let cfg = config(&list.join(", "), r#"affinity = "cookie:session_id""#);
    let gw = Erpgate::start(&cfg);
    let replica = Erpgate::start(&cfg);

    // Each session, three requests, through either replica: one server.
    for sid in 0..24 {
        for (i, gate) in [&gw, &replica, &gw].iter().enumerate() {
            let cookie = format!("frontend_lang=en_US; session_id=s{sid:04}");
            let path = format!("/odoo?sid={sid:04}&i={i}");
            let r = request(gate.http, "GET", &path, &[("Cookie", &cookie)], None);
            assert_eq!(r.status, 200);
        }
        let got = receivers(&fakes, &format!("sid={sid:04}&"));
        assert_eq!(got.len(), 1, "session {sid} reached servers {got:?}");
    }
    assert!(
        f.iter().all(|x| !x.requests().is_empty()),
        "sessions spread over every server"
    );

    // A new session is pinned to the server that created it.
    let login = get(gw.http, "/web/login");
    let pin = login
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("set-cookie"))
        .find_map(|(_, v)| v.strip_prefix("erpgate_affinity="))
        .and_then(|v| v.split(';').next())
        .expect("erpgate_affinity cookie")
        .to_string();
    let born = receivers(&fakes, "/web/login");
    assert_eq!(born.len(), 1);
    let cookie =
        format!("session_id=0123456789abcdef0123456789abcdef01234567; erpgate_affinity={pin}");
    for i in 0..6 {
        let gate = if i % 2 == 0 { &gw } else { &replica };
        let path = format!("/web/action?pinned={i}");
        let r = request(gate.http, "GET", &path, &[("Cookie", &cookie)], None);
        assert_eq!(r.status, 200);
    }
    assert_eq!(receivers(&fakes, "pinned="), born);

    // That server dies: its users move to a healthy one (and stay there); nobody fails.
    let mut f = f;
    drop(f.remove(born[0]));
    let fakes: Vec<&FakeOdoo> = f.iter().collect();
    for i in 0..6 {
        let path = format!("/web/action?moved={i}");
        let r = request(gw.http, "GET", &path, &[("Cookie", &cookie)], None);
        assert_eq!(r.status, 200, "{}", r.body_str());
    }
    assert_eq!(receivers(&fakes, "moved=").len(), 1);
}

#[test]
fn servers_given_by_host_name_are_resolved() {
    let odoo = FakeOdoo::start();
    let name = format!("localhost:{}", odoo.web_addr().port());
    let servers = format!(r#"{{ address = "{name}", zone = "a" }}"#);
    let gw = Erpgate::start(&config(&servers, r#"resolve_interval = "200ms""#));
    for i in 0..5 {
        let r = get(gw.http, &format!("/odoo?i={i}"));
        assert_eq!(r.status, 200, "{}", r.body_str());
    }
    assert_eq!(odoo.requests().len(), 5);
    // The pool lists what the name resolved to, and the name it came from.
    let (_, body) = support::erpgate::admin_get(gw.admin, "/config").expect("admin");
    assert!(body.contains("\"address\":\"127.0.0.1:"), "{body}");
    assert!(body.contains(&format!("\"from\":\"{name}\"")), "{body}");
}

#[test]
fn stopping_the_local_zone_under_a_steady_request_loop_fails_no_get() {
    let local = FakeOdoo::start();
    let remote = FakeOdoo::start();
    let servers = format!(
        "{}, {}",
        server(local.web_addr(), "a", ""),
        server(remote.web_addr(), "b", "")
    );
    // GETs of this class may be tried again: one cut off when its server stops goes to the
    // other zone instead of failing.
    let cfg = config(&servers, "")
        .replace("interval = \"200ms\"", "interval = \"1s\"")
        .replace("pool = \"web\"", "pool = \"web\"\nretry_idempotent = true");
    let gw = Erpgate::start(&cfg);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|t| {
            let (addr, stop) = (gw.http, stop.clone());
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    codes.push(get(addr, &format!("/slow?ms=20&t={t}&i={i}")).status);
                    i += 1;
                }
                codes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let before = local.requests().len();
    assert!(before > 0, "the local zone served first");
    assert_eq!(remote.requests().len(), 0);
    drop(local);
    let stopped = std::time::Instant::now();
    // Within one health interval the other zone carries the load.
    while remote.requests().len() < 20 {
        assert!(
            stopped.elapsed() < Duration::from_secs(1),
            "traffic did not move within one health interval"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes: Vec<u16> = loops
        .into_iter()
        .flat_map(|l| l.join().expect("loop"))
        .collect();
    assert!(codes.len() > 40, "{}", codes.len());
    let failed: Vec<_> = codes.iter().filter(|c| **c != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        codes.len()
    );
    // Requests were cut mid-flight by the stop (four loops, 20 ms each) and went again.
    gw.wait_log_line(&["retry: true"]);
}
