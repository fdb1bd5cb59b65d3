//! Operations through the real binary: metrics after a known mix of requests, readiness
//! following pool health, a maintenance window, graceful stop on SIGTERM.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use support::erpgate::{admin_get, Erpgate};
use support::*;

/// A Prometheus text exposition, parsed strictly: every sample line is
/// `name{label="value",...} number` with a `# TYPE` for its family. Returns
/// `name{labels}` -> value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut typed = std::collections::HashSet::new();
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut p = rest.split(' ');
            let name = p.next().expect("family");
            let kind = p.next().expect("type");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
        let name = series.split('{').next().expect("name");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(*f)))
            .unwrap_or(name);
        assert!(typed.contains(family), "no # TYPE for {line}");
        if let Some(labels) = series.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for pair in labels[1..labels.len() - 1].split("\",") {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("{line}"));
                    assert!(!k.is_empty() && !v.contains('\n'), "{line}");
                }
            }
        }
        out.insert(series.to_string(), value);
    }
    out
}

fn metrics(gw: &Erpgate) -> BTreeMap<String, f64> {
    let (status, body) = admin_get(gw.admin, "/metrics").expect("admin");
    assert_eq!(status, 200);
    parse_metrics(&body)
}

/// The metrics once `ready` holds (or after 5 s): a request is counted when it is logged,
/// just after its answer went out, so a client can be a moment ahead of the counters.
fn metrics_when(
    gw: &Erpgate,
    ready: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let m = metrics(gw);
        if ready(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn config(odoo: &FakeOdoo, extra_pool: &str) -> String {
    format!(
        r#"
[network]
zone = "a"
trusted_proxies = ["127.0.0.1/32"]

[pools.web]
servers = [{{ address = "{}", zone = "a" }}]
health_check = {{ path = "/web/health", interval = "200ms", timeout = "500ms", healthy_after = 1, unhealthy_after = 1 }}
{extra_pool}

[[class]]
name = "admin"
match = {{ path_prefix = "/web/database/" }}
pool = "web"
allow = ["10.10.0.0/16"]

[[class]]
name = "integration"
match = {{ path_prefix = "/xmlrpc/" }}
pool = "web"
rate_limit = {{ key = "global", rate = "1/min", burst = 2 }}

[[class]]
name = "user"
pool = "web"
"#,
        odoo.web_addr()
    )
}

/// A request that keeps its connection open (HTTP/1.1, no `Connection: close`).
const KEEP_ALIVE_GET: &[u8] = b"GET /web/login HTTP/1.1\r\nHost: erp.example.com\r\n\r\n";

/// erpgate on `config` with `[server] grace_period` set, for the SIGTERM tests.
fn start_with_grace(odoo: &FakeOdoo, grace: &str) -> Erpgate {
    let body = format!(
        "[server]\ngrace_period = \"{grace}\"\nshutdown_timeout = \"1s\"\n{}",
        config(odoo, "")
    );
    Erpgate::start(&body)
}

/// How many access lines of `/web/login` requests `log` has.
fn login_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("erpgate::access") && l.contains("path=/web/login"))
        .count()
}

/// After SIGTERM: erpgate exits 0 in time.
fn exits_cleanly(gw: &mut Erpgate) {
    assert_eq!(
        gw.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        gw.log()
    );
}

#[test]
fn metrics_report_exactly_the_requests_made() {
    let odoo = FakeOdoo::start();
    let gw = Erpgate::start(&config(&odoo, ""));
    for i in 0..3 {
        assert_eq!(get(gw.http, &format!("/odoo?i={i}")).status, 200);
    }
    assert_eq!(get(gw.http, "/odoo?status=404").status, 404);
    assert_eq!(get(gw.http, "/web/database/manager").status, 403);
    for expected in [200, 200, 429] {
        let r = request(gw.http, "POST", "/xmlrpc/2/common", &[], Some(b"<x/>"));
        assert_eq!(r.status, expected);
    }
    let total = |m: &BTreeMap<String, f64>| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with("erpgate_requests_total{"))
            .map(|(_, v)| v)
            .sum()
    };
    let m = metrics_when(&gw, |m| total(m) >= 8.0);
    let v = |k: &str| {
        m.get(k)
            .copied()
            .unwrap_or_else(|| panic!("no {k} in {m:#?}"))
    };
    assert_eq!(
        v(r#"erpgate_requests_total{class="user",pool="web",status="200",zone="a"}"#),
        3.0
    );
    assert_eq!(
        v(r#"erpgate_requests_total{class="user",pool="web",status="404",zone="a"}"#),
        1.0
    );
    assert_eq!(
        v(r#"erpgate_requests_total{class="admin",pool="web",status="403",zone="-"}"#),
        1.0
    );
    assert_eq!(
        v(r#"erpgate_requests_total{class="integration",pool="web",status="200",zone="a"}"#),
        2.0
    );
    assert_eq!(
        v(r#"erpgate_requests_total{class="integration",pool="web",status="429",zone="-"}"#),
        1.0
    );
    assert_eq!(total(&m), 8.0, "{m:#?}");
    assert_eq!(v(r#"erpgate_denied_total{class="admin",reason="ip"}"#), 1.0);
    assert_eq!(v(r#"erpgate_rate_limited_total{class="integration"}"#), 1.0);
    assert_eq!(
        v(r#"erpgate_request_duration_seconds_count{class="user"}"#),
        4.0
    );
    assert_eq!(
        v(r#"erpgate_request_duration_seconds_bucket{class="user",le="+Inf"}"#),
        4.0
    );
    assert_eq!(
        v(&format!(
            r#"erpgate_upstream_healthy{{pool="web",server="{}",zone="a"}}"#,
            odoo.web_addr()
        )),
        1.0
    );
    assert_eq!(v(r#"erpgate_in_flight_requests{class="user"}"#), 0.0);
    assert_eq!(v("erpgate_config_generation"), 1.0);
    assert_eq!(v("erpgate_maintenance_active"), 0.0);

    // An open WebSocket counts while it is open; a reload counts by result.
    let ws_cfg = format!(
        "{}\n[pools.longpoll]\nservers = [{{ address = \"{}\", zone = \"a\" }}]\n\
         [[class]]\nname = \"longpoll\"\nmatch = {{ path_prefix = \"/websocket\" }}\npool = \"longpoll\"\n",
        config(&odoo, ""),
        odoo.gevent_addr()
    );
    // The catch-all user class must stay last.
    let ws_cfg = ws_cfg.replacen("[[class]]\nname = \"user\"\npool = \"web\"\n", "", 1)
        + "\n[[class]]\nname = \"user\"\npool = \"web\"\n";
    gw.reload_with(&ws_cfg);
    let mut ws = ws_connect(gw.http, "/websocket", Some("http://localhost")).expect("ws");
    ws.send_text("x");
    assert_eq!(ws.recv_text(Duration::from_secs(5)), "x");
    let m = metrics(&gw);
    assert_eq!(
        m.get(r#"erpgate_websockets_open{class="longpoll"}"#),
        Some(&1.0)
    );
    assert_eq!(
        m.get(r#"erpgate_config_reloads_total{result="ok"}"#),
        Some(&1.0)
    );
    assert_eq!(m.get("erpgate_config_generation"), Some(&2.0));
    ws.close();
    let deadline = Instant::now() + Duration::from_secs(5);
    while metrics(&gw).get(r#"erpgate_websockets_open{class="longpoll"}"#) != Some(&0.0) {
        assert!(Instant::now() < deadline, "closed socket still counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // /config says which config serves; /upstreams each server's last probe.
    let (_, body) = admin_get(gw.admin, "/config").expect("config");
    let c: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(c["generation"], 2);
    assert_eq!(c["hash"].as_str().map(str::len), Some(16));
    assert!(c["last_reload_error"].is_null());
    gw.write_config("[pools.broken\n");
    gw.wait_log_line(&["config reload failed"]);
    let (_, body) = admin_get(gw.admin, "/config").expect("config");
    let c: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(c["generation"], 2);
    let err = c["last_reload_error"]["errors"][0].as_str().unwrap_or("");
    assert!(err.contains("erpgate.toml:"), "{body}");
    let (_, body) = admin_get(gw.admin, "/upstreams").expect("upstreams");
    let u: serde_json::Value = serde_json::from_str(&body).expect("json");
    let web = u["servers"]
        .as_array()
        .and_then(|l| l.iter().find(|s| s["pool"] == "web"))
        .expect("the web pool's server");
    assert_eq!(web["healthy"], true);
    assert_eq!(web["last_probe"]["ok"], true);
}

#[test]
fn readyz_follows_the_health_of_the_pools() {
    let odoo = FakeOdoo::start();
    let (web, gevent) = (odoo.web_addr(), odoo.gevent_addr());
    let gw = Erpgate::start(&config(&odoo, ""));
    let ready = || admin_get(gw.admin, "/readyz").expect("admin");
    assert_eq!(ready().0, 200);
    drop(odoo);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (status, body) = loop {
        let r = ready();
        if r.0 == 503 {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "still ready with its only server down"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503);
    assert!(body.contains("pool `web`"), "{body}");
    let _back = FakeOdoo::start_at(web, gevent, FakeOptions::default());
    let deadline = Instant::now() + Duration::from_secs(5);
    while ready().0 != 200 {
        assert!(Instant::now() < deadline, "not ready again");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn utc(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .expect("time")
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[test]
fn a_maintenance_window_blocks_users_lets_admins_through_and_lifts_at_its_end() {
    let odoo = FakeOdoo::start();
    let page = tempfile::NamedTempFile::new().expect("page");
    std::fs::write(page.path(), "<h1>Closing the books: back at 20:00</h1>").expect("write");
    let now = chrono::Utc::now().timestamp();
    let end = now + 4;
    let maintenance = format!(
        "[maintenance]\nwindows = [{{ start = \"{}\", end = \"{}\" }}]\npage = \"{}\"\nallow = [\"10.10.0.0/16\"]\n",
        utc(now - 60),
        utc(end),
        page.path().display()
    );
    let gw = Erpgate::start(&(config(&odoo, "") + &maintenance));
    let user = [("X-Forwarded-For", "203.0.113.7")];
    let admin = [("X-Forwarded-For", "10.10.4.2")];
    let r = request(gw.http, "GET", "/odoo", &user, None);
    assert_eq!(r.status, 503);
    let retry: i64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=5).contains(&retry), "{retry}");
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/html")));
    assert!(r.body_str().contains("Closing the books"));
    // Integrations are blocked too; the admin network reaches Odoo.
    let r = request(gw.http, "POST", "/xmlrpc/2/object", &user, Some(b"<x/>"));
    assert_eq!(r.status, 503);
    assert_eq!(
        request(gw.http, "GET", "/odoo?admin=1", &admin, None).status,
        200
    );
    assert_eq!(odoo.requests().len(), 1);
    let m = metrics_when(&gw, |m| {
        m.contains_key(r#"erpgate_denied_total{class="user",reason="maintenance"}"#)
    });
    assert_eq!(m.get("erpgate_maintenance_active"), Some(&1.0));
    assert_eq!(
        m.get(r#"erpgate_denied_total{class="user",reason="maintenance"}"#),
        Some(&1.0)
    );
    // At the window's end it lifts by itself, no reload.
    while chrono::Utc::now().timestamp() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        request(gw.http, "GET", "/odoo?after=1", &user, None).status,
        200
    );
    assert_eq!(gw.reloads(), 0);
}

#[test]
fn sigterm_lets_a_slow_request_finish_then_exits_0() {
    let odoo = FakeOdoo::start();
    let mut gw = start_with_grace(&odoo, "5s");
    let addr = gw.http;
    let slow = std::thread::spawn(move || get(addr, "/slow?ms=1500"));
    odoo.wait_for_requests(1, Duration::from_secs(5));
    gw.signal("TERM");
    let r = slow.join().expect("slow request");
    assert_eq!(r.status, 200, "{}", r.body_str());
    exits_cleanly(&mut gw);
}

#[test]
fn idle_keep_alive_connections_are_closed_after_keepalive_timeout() {
    let odoo = FakeOdoo::start();
    let body = "[server]\nkeepalive_timeout = \"1s\"\n".to_string() + &config(&odoo, "");
    let gw = Erpgate::start(&body);

    // Requests closer together than the limit share the connection.
    let mut conn = Conn::open(gw.http);
    for _ in 0..3 {
        assert_eq!(conn.send(KEEP_ALIVE_GET).status, 200);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert_eq!(conn.send(KEEP_ALIVE_GET).status, 200);
    let idle = conn.closed_within(Duration::from_secs(5));
    assert!(idle.is_some(), "an idle keep-alive connection stayed open");

    // A connection that never sends a byte, and one that stops in the middle of a head.
    let mut silent = Conn::open(gw.http);
    assert!(silent.closed_within(Duration::from_secs(5)).is_some());
    let mut stalled = Conn::open(gw.http);
    assert_eq!(stalled.send(KEEP_ALIVE_GET).status, 200);
    stalled
        .write(b"GET /web/login HTTP/1.1\r\nHost: erp")
        .expect("write");
    assert!(stalled.closed_within(Duration::from_secs(5)).is_some());
    // Odoo saw only the complete requests.
    let seen = odoo
        .requests()
        .iter()
        .filter(|r| !r.is_health_probe())
        .count();
    assert_eq!(seen, 5);
}

/// Between requests erpgate waits for the socket to become readable without reading, and
/// Pingora then reads the head: a head that comes in pieces, or is larger than one read, is
/// still read whole, on a new connection and on a reused one.
#[test]
fn request_heads_sent_in_pieces_or_larger_than_a_read_reach_odoo_whole() {
    let odoo = FakeOdoo::start();
    let gw = Erpgate::start(&config(&odoo, ""));
    let cookie = "c".repeat(6000);
    let big = format!(
        "GET /web/login HTTP/1.1\r\nHost: erp.example.com\r\nCookie: session_id={cookie}\r\n\r\n"
    );
    let pieces: [&[u8]; 4] = [
        b"G",
        b"ET /web/login HTTP/1.1\r\n",
        b"Host: erp.example.com\r\nX-Piece: ",
        b"last\r\n\r\n",
    ];
    let mut conn = Conn::open(gw.http);
    for _ in 0..2 {
        for piece in pieces {
            conn.write(piece).expect("write");
            std::thread::sleep(Duration::from_millis(60));
        }
        assert_eq!(conn.read_response().status, 200);
        assert_eq!(conn.send(big.as_bytes()).status, 200);
    }
    let seen: Vec<_> = odoo
        .requests()
        .into_iter()
        .filter(|r| !r.is_health_probe())
        .collect();
    assert_eq!(seen.len(), 4);
    for pair in seen.chunks(2) {
        assert_eq!(pair[0].header("x-piece"), Some("last"));
        assert_eq!(pair[1].header("cookie").map(str::len), Some(6011));
    }
}

#[test]
fn a_reloaded_keepalive_timeout_applies_to_the_next_wait() {
    let odoo = FakeOdoo::start();
    let gw = Erpgate::start(
        &("[server]\nkeepalive_timeout = \"1h\"\n".to_string() + &config(&odoo, "")),
    );
    let mut conn = Conn::open(gw.http);
    assert_eq!(conn.send(KEEP_ALIVE_GET).status, 200);
    assert!(
        conn.closed_within(Duration::from_millis(1500)).is_none(),
        "closed before the hour was up"
    );
    gw.reload_with(&("[server]\nkeepalive_timeout = \"1s\"\n".to_string() + &config(&odoo, "")));
    // The connection waiting since before the reload waits with the old limit; its next
    // request, and new connections, with the new one.
    assert_eq!(conn.send(KEEP_ALIVE_GET).status, 200);
    assert!(conn.closed_within(Duration::from_secs(5)).is_some());
    let mut fresh = Conn::open(gw.http);
    assert_eq!(fresh.send(KEEP_ALIVE_GET).status, 200);
    assert!(fresh.closed_within(Duration::from_secs(5)).is_some());
}

#[test]
fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let odoo = FakeOdoo::start();
    let mut gw = start_with_grace(&odoo, "5s");
    let mut idle: Vec<Conn> = (0..3)
        .map(|_| {
            let mut c = Conn::open(gw.http);
            let r = c.send(KEEP_ALIVE_GET);
            assert_eq!(r.status, 200);
            c
        })
        .collect();
    // Many requests just before the stop: every access line is written by the time erpgate
    // has exited (lines go out from a writer thread of their own).
    let mut busy = Conn::open(gw.http);
    for _ in 0..200 {
        assert_eq!(busy.send(KEEP_ALIVE_GET).status, 200);
    }
    gw.signal("TERM");
    for c in &mut idle {
        let took = c.closed_within(Duration::from_secs(5));
        assert!(
            took.is_some_and(|t| t < Duration::from_secs(3)),
            "idle connection closed after {took:?}, not at once (grace period 5 s)"
        );
    }
    exits_cleanly(&mut gw);
    let log = gw.log();
    assert_eq!(login_lines(&log), 203, "{log}");
    assert!(log.contains("All runtimes exited"), "{log}");
}

/// SIGINT ends erpgate at once, also with connections open and the admin port in use, every
/// time (Pingora's own fast shutdown could leave an accept loop spinning: 2 times in 10), and
/// the log is written out first.
#[test]
fn sigint_exits_at_once_with_the_log_written() {
    let odoo = FakeOdoo::start();
    for round in 0..5 {
        let mut gw = start_with_grace(&odoo, "30s");
        let mut open: Vec<Conn> = (0..4).map(|_| Conn::open(gw.http)).collect();
        for c in &mut open {
            for _ in 0..20 {
                assert_eq!(c.send(KEEP_ALIVE_GET).status, 200);
            }
        }
        assert!(admin_get(gw.admin, "/metrics").is_some_and(|(s, _)| s == 200));
        let asked = Instant::now();
        gw.signal("INT");
        assert_eq!(
            gw.wait_exit(Duration::from_secs(10)),
            Some(0),
            "round {round}: {}",
            gw.log()
        );
        // Not the 30 s grace period of a graceful stop.
        assert!(asked.elapsed() < Duration::from_secs(5), "round {round}");
        let log = gw.log();
        assert_eq!(login_lines(&log), 80, "round {round}: {log}");
        assert!(log.contains("SIGINT received, exiting"), "{log}");
    }
}

#[test]
fn a_connection_accepted_before_sigterm_gets_its_first_request_answered() {
    let odoo = FakeOdoo::start();
    let mut gw = start_with_grace(&odoo, "3s");
    let mut early = Conn::open(gw.http);
    // Let erpgate accept it, stop, then send the request on it.
    std::thread::sleep(Duration::from_millis(300));
    gw.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    let r = early.send(KEEP_ALIVE_GET);
    assert_eq!(r.status, 200, "{}", r.body_str());
    exits_cleanly(&mut gw);
}

#[test]
fn sigterm_closes_open_websockets_with_a_close_frame() {
    let odoo = FakeOdoo::start();
    let body = format!(
        "[server]\ngrace_period = \"3s\"\nshutdown_timeout = \"1s\"\n{}\n\
         [pools.longpoll]\nservers = [{{ address = \"{}\", zone = \"a\" }}]\n\
         [[class]]\nname = \"longpoll\"\nmatch = {{ path_prefix = \"/websocket\" }}\npool = \"longpoll\"\n\
         timeouts = {{ read = \"1h\", idle = \"1h\" }}\n",
        config(&odoo, ""),
        odoo.gevent_addr()
    )
    // The catch-all user class must stay last.
    .replacen("[[class]]\nname = \"user\"\npool = \"web\"\n", "", 1)
        + "\n[[class]]\nname = \"user\"\npool = \"web\"\n";
    let mut gw = Erpgate::start(&body);
    let mut sockets: Vec<WsClient> = (0..3)
        .map(|i| {
            let mut ws = ws_connect(gw.http, "/websocket", Some("http://localhost")).expect("ws");
            ws.send_text(&format!("hello {i}"));
            assert_eq!(ws.recv_text(Duration::from_secs(5)), format!("hello {i}"));
            ws
        })
        .collect();
    assert_eq!(odoo.ws_open(), 3);
    let stopped = Instant::now();
    gw.signal("TERM");
    for ws in &mut sockets {
        let code = ws.close_code_within(Duration::from_secs(2));
        assert_eq!(code, Some(1001), "a close frame saying erpgate goes away");
    }
    assert!(stopped.elapsed() < Duration::from_secs(2));
    // Odoo saw each socket closed by the handshake, not cut.
    let deadline = Instant::now() + Duration::from_secs(2);
    while odoo.ws_open() > 0 {
        assert!(
            Instant::now() < deadline,
            "Odoo still has {} sockets",
            odoo.ws_open()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    exits_cleanly(&mut gw);
    assert!(gw.log().contains("closing 3 WebSocket(s)"), "{}", gw.log());
}

/// The CPUs the threads named `name` of process `pid` may run on, as the kernel lists them.
fn threads_cpus(pid: u32, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if let Some(l) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            out.push(l["Cpus_allowed_list:".len()..].trim().to_string());
        }
    }
    out
}

#[test]
fn pin_threads_puts_each_proxy_thread_on_a_cpu_of_its_own() {
    let odoo = FakeOdoo::start();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let body = "[server]\nthreads = 2\npin_threads = true\n".to_string() + &config(&odoo, "");
    let gw = Erpgate::start(&body);
    let unpinned = Erpgate::start(&("[server]\nthreads = 2\n".to_string() + &config(&odoo, "")));
    // Each thread is pinned when it gets its first connection (a thread picked at random for
    // each): after 24, both have had one but with odds of 1 in 8 million.
    for gate in [&gw, &unpinned] {
        for _ in 0..24 {
            let mut c = Conn::open(gate.http);
            assert_eq!(c.send(KEEP_ALIVE_GET).status, 200);
        }
    }
    let pinned = threads_cpus(gw.pid(), "erpgate proxy");
    assert_eq!(pinned.len(), 2, "proxy threads: {pinned:?}");
    for set in &pinned {
        assert!(
            set.parse::<usize>().is_ok(),
            "a proxy thread may run on {set}"
        );
    }
    if cpus >= 2 {
        assert_ne!(
            pinned[0], pinned[1],
            "both proxy threads on CPU {}",
            pinned[0]
        );
    }
    gw.wait_log_line(&["proxy thread 1 pinned to CPU"]);
    // Without the setting the threads keep the whole set the process may run on.
    let free = threads_cpus(unpinned.pid(), "erpgate proxy");
    assert_eq!(free.len(), 2, "proxy threads: {free:?}");
    let process = threads_cpus(unpinned.pid(), "erpgate");
    assert!(
        free.iter().all(|set| Some(set) == process.first()),
        "{free:?} against the process's {process:?}"
    );
}

/// Audit lines still queued when erpgate is stopped are written before it exits, by SIGINT as
/// by SIGTERM. The audit log is a FIFO read only once erpgate says it is writing out the
/// queue, so the writer is held up with most lines still queued (a pipe holds 64 KiB; the
/// lines are about four times that).
#[test]
fn audit_lines_still_queued_at_a_stop_are_written_before_exit() {
    use std::io::Read;
    let odoo = FakeOdoo::start();
    for signal in ["INT", "TERM"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("audit.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo {}", fifo.display());
        // Read and write: opening a FIFO so never waits. It lets the read end below open at
        // once, and erpgate's write end too; dropped after the signal, so that the read end
        // sees its end when erpgate's write end closes.
        let keep_open = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&fifo)
            .expect("open the FIFO");
        let mut audit = std::fs::File::open(&fifo).expect("open the FIFO's read end");
        let body = format!(
            "[server]\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\n[audit]\npath = \"{}\"\n{}",
            fifo.display(),
            config(&odoo, "").replace(
                "allow = [\"10.10.0.0/16\"]",
                "allow = [\"10.10.0.0/16\"]\naudit = true"
            )
        );
        let mut gw = Erpgate::start(&body);
        let mut conn = Conn::open(gw.http);
        let n = 1000;
        for _ in 0..n {
            let r =
                conn.send(b"GET /web/database/manager HTTP/1.1\r\nHost: erp.example.com\r\n\r\n");
            assert_eq!(r.status, 403);
        }
        // The first lines are in the pipe: erpgate's writer has the FIFO open.
        let mut first = [0u8; 1];
        audit.read_exact(&mut first).expect("a first audit byte");
        gw.signal(signal);
        // erpgate is stopping, its writer still held up by the full pipe.
        gw.wait_log_line(&["audit log: writing", "queued lines before exit"]);
        assert_eq!(
            gw.wait_exit(Duration::from_millis(100)),
            None,
            "exited before its audit lines were written"
        );
        drop(keep_open);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut rest = Vec::new();
            let _ = audit.read_to_end(&mut rest);
            let _ = tx.send(rest);
        });
        let rest = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the audit FIFO's write end closed (erpgate exited)");
        let mut text = first.to_vec();
        text.extend_from_slice(&rest);
        let text = String::from_utf8(text).expect("UTF-8");
        assert!(text.len() > 2 * 65_536, "{} bytes", text.len());
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect();
        assert_eq!(lines.len(), n, "SIG{signal}: {}", gw.log());
        assert!(lines.iter().all(|l| l["decision"] == "denied_ip"));
        assert_eq!(
            gw.wait_exit(Duration::from_secs(15)),
            Some(0),
            "{}",
            gw.log()
        );
    }
}
