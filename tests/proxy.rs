//! The real erpgate binary in front of fake Odoo servers (web port: HTTP/1.0 and
//! `Connection: close`, gevent port: HTTP/1.1, WebSocket and long-poll).

mod support;

use std::time::Duration;
use support::erpgate::Erpgate;
use support::*;

/// The default config's classes, pointed at a fake Odoo.
fn odoo_config(fake: &FakeOdoo, extra: &str) -> String {
    format!(
        r#"
[network]
trusted_proxies = ["10.9.9.9/32"]

[pools.web]
servers = [{{ address = "{web}" }}]

[pools.longpoll]
servers = [{{ address = "{gevent}" }}]

[[class]]
name = "admin"
match = [{{ path_prefix = "/web/database/" }}, {{ path_prefix = "/xmlrpc/2/db" }}, {{ path_prefix = "/xmlrpc/db" }}]
pool = "web"

[[class]]
name = "longpoll"
match = [{{ path_prefix = "/websocket" }}, {{ path_prefix = "/longpolling/" }}]
pool = "longpoll"
timeouts = {{ read = "2h", idle = "2h" }}

[[class]]
name = "integration"
match = [{{ path_prefix = "/xmlrpc/" }}, {{ path = "/jsonrpc" }}, {{ path_prefix = "/json/2/" }},
         {{ header = "authorization", value_prefix = "bearer " }}]
pool = "web"

[[class]]
name = "user"
pool = "web"
max_body = "1KiB"
{extra}
"#,
        web = fake.web_addr(),
        gevent = fake.gevent_addr(),
    )
}

fn last_request(fake: &FakeOdoo) -> Recorded {
    fake.wait_for_requests(1, Duration::from_secs(5))
        .pop()
        .expect("a request reached Odoo")
}

/// Two pools and two classes: requests under `prefix` go to `routed` (with the class settings
/// `routed_extra`), all others to `rest` (with `rest_extra`).
fn two_routes(
    prefix: &str,
    routed: impl std::fmt::Display,
    routed_extra: &str,
    rest: impl std::fmt::Display,
    rest_extra: &str,
) -> String {
    format!(
        r#"
[pools.routed]
servers = [{{ address = "{routed}" }}]
[pools.rest]
servers = [{{ address = "{rest}" }}]
[[class]]
name = "routed"
match = {{ path_prefix = "{prefix}" }}
pool = "routed"
{routed_extra}
[[class]]
name = "rest"
pool = "rest"
{rest_extra}
"#
    )
}

#[test]
fn each_class_reaches_its_pool() {
    let fake = FakeOdoo::start_with(FakeOptions {
        longpoll_hold: Duration::from_millis(200),
        ..Default::default()
    });
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let cases = [
        ("GET", "/odoo/action-1", "web", "user"),
        ("POST", "/xmlrpc/2/object", "web", "integration"),
        ("POST", "/jsonrpc", "web", "integration"),
        ("GET", "/web/database/selector", "web", "admin"),
        ("GET", "/websocket/health", "gevent", "longpoll"),
        ("POST", "/longpolling/poll", "gevent", "longpoll"),
    ];
    for (method, path, port, class) in cases {
        fake.clear();
        let body = (method == "POST").then_some(b"{}".as_slice());
        let r = request(gw.http, method, path, &[], body);
        assert_eq!(r.status, 200, "{method} {path}: {}", r.body_str());
        assert_eq!(r.header("x-odoo-port"), Some(port), "{method} {path}");
        let seen = last_request(&fake);
        assert_eq!(seen.path, path);
        let id = r.header("x-request-id").expect("request id returned");
        let line = gw.wait_log_line(&[id]);
        assert!(line.contains(&format!("class=\"{class}\"")), "{line}");
        assert!(line.contains("status=200"), "{line}");
    }
    // Odoo's HTTP worker answers HTTP/1.0 and closes; the client keeps its HTTP/1.1 connection.
    let mut conn = Conn::open(gw.http);
    for _ in 0..3 {
        let r = conn.send(b"GET /odoo HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(r.status, 200);
        assert_eq!(r.version, "HTTP/1.1");
    }
}

#[test]
fn no_class_matches_gives_404_without_reaching_odoo() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&format!(
        "[pools.web]\nservers = [{{ address = \"{}\" }}]\n[[class]]\nname = \"api\"\npool = \"web\"\nmatch = {{ path = \"/jsonrpc\" }}\n",
        fake.web_addr()
    ));
    let r = get(gw.http, "/odoo");
    assert_eq!(r.status, 404);
    assert!(fake.requests().is_empty());
    assert_eq!(get(gw.http, "/jsonrpc").status, 200);
}

#[test]
fn forged_forwarded_headers_from_an_untrusted_peer_are_replaced() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let r = send_raw(
        gw.http,
        b"GET /odoo HTTP/1.1\r\nHost: erp.example.com\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil.example\r\n\
X-Forwarded-Proto: https\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Request-Id: forged-id\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let seen = last_request(&fake);
    assert_eq!(seen.headers_all("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"));
    assert_eq!(
        seen.headers_all("x-forwarded-host"),
        vec!["erp.example.com"]
    );
    assert_eq!(seen.headers_all("x-forwarded-proto"), vec!["http"]);
    assert_eq!(seen.header("forwarded"), None);
    let id = seen
        .header("x-request-id")
        .expect("request id sent upstream");
    assert_ne!(id, "forged-id");
    assert_eq!(r.header("x-request-id"), Some(id));
}

#[test]
fn a_trusted_proxy_keeps_its_chain_and_the_client_is_the_rightmost_untrusted_hop() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(
        &odoo_config(&fake, "").replace("10.9.9.9/32", "127.0.0.1/32\", \"10.0.0.0/8"),
    );
    let r = send_raw(
        gw.http,
        b"GET /odoo HTTP/1.1\r\nHost: internal:8080\r\nX-Forwarded-For: 6.6.6.6, 203.0.113.7\r\nX-Forwarded-For: 10.1.2.3\r\n\
X-Forwarded-Host: erp.example.com\r\nX-Forwarded-Proto: https\r\nX-Request-Id: lb-1234\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 200);
    let seen = last_request(&fake);
    // Odoo's proxy_mode believes the last hop: it must be the client.
    assert_eq!(
        seen.headers_all("x-forwarded-for"),
        vec!["6.6.6.6, 203.0.113.7"]
    );
    assert_eq!(seen.header("x-real-ip"), Some("203.0.113.7"));
    assert_eq!(seen.header("x-forwarded-host"), Some("erp.example.com"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-request-id"), Some("lb-1234"));
    assert_eq!(r.header("x-request-id"), Some("lb-1234"));
    let line = gw.wait_log_line(&["lb-1234"]);
    assert!(line.contains("client=203.0.113.7"), "{line}");
}

#[test]
fn hop_by_hop_headers_are_stripped() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    // With `Upgrade` (Pingora's proxy serves it) and without (erpgate's own loop does).
    for upgrade in ["Upgrade: h2c\r\n", ""] {
        let head = format!(
            "GET /odoo HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\n\
Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n{upgrade}X-Kept: yes\r\n\
Forwarded: for=6.6.6.6\r\nX-Forwarded-Prefix: /evil\r\n\r\n"
        );
        let r = send_raw(gw.http, head.as_bytes());
        assert_eq!(r.status, 200);
        let seen = last_request(&fake);
        for h in [
            "x-hop-secret",
            "keep-alive",
            "proxy-connection",
            "upgrade",
            "te",
            "forwarded",
            "x-forwarded-prefix",
        ] {
            assert_eq!(seen.header(h), None, "{h} reached Odoo ({upgrade:?})");
        }
        assert_eq!(seen.header("x-kept"), Some("yes"));
        assert_eq!(seen.header("host"), Some("localhost"));
    }
}

/// Bodies up to 64 KiB go to Odoo in erpgate's own loop: every byte arrives, in order, on new
/// connections (the web port closes each) and on kept-alive ones (the gevent port). Here
/// each request goes in one write; a unit test in `fast` covers a socket without the room.
#[test]
fn bodies_up_to_64_kib_reach_odoo_whole_on_new_and_kept_connections() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&two_routes(
        "/kept/",
        fake.gevent_addr(),
        "",
        fake.web_addr(),
        "",
    ));
    let mut sent = Vec::new();
    for (i, path) in ["/web/dataset/call_kw", "/kept/call_kw"].iter().enumerate() {
        for size in [1000, 20_000, 65_000] {
            let body: Vec<u8> = (0..size).map(|n| b'a' + ((n * 7 + i) % 26) as u8).collect();
            let r = request(gw.http, "POST", path, &[], Some(&body));
            assert_eq!(r.status, 200, "{path} {size}: {}", r.body_str());
            sent.push(body);
        }
    }
    let got: Vec<Vec<u8>> = fake
        .requests()
        .into_iter()
        .filter(|r| !r.is_health_probe())
        .map(|r| r.body)
        .collect();
    assert_eq!(got.len(), sent.len());
    for (g, s) in got.iter().zip(&sent) {
        assert!(
            g == s,
            "a body of {} bytes arrived as {} bytes",
            s.len(),
            g.len()
        );
    }
}

#[test]
fn an_oversized_body_gets_413_and_never_reaches_odoo() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    // Content-Length says too much: refused before anything is sent upstream.
    let big = vec![b'x'; 2048];
    let r = request(
        gw.http,
        "POST",
        "/web/dataset/call_kw",
        &[("Content-Type", "application/json")],
        Some(&big),
    );
    assert_eq!(r.status, 413);
    assert!(fake.requests().is_empty());
    // A chunked body that grows past the limit is cut off with 413.
    let mut raw = b"POST /web/dataset/call_kw HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4 {
        raw.extend_from_slice(b"200\r\n");
        raw.extend_from_slice(&[b'y'; 0x200]);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    assert_eq!(send_raw(gw.http, &raw).status, 413);
    assert!(
        fake.requests().iter().all(|r| r.body.len() <= 1024),
        "Odoo got a body over the limit"
    );
    // Within the limit it passes.
    let r = request(
        gw.http,
        "POST",
        "/web/dataset/call_kw",
        &[],
        Some(&[b'z'; 1000]),
    );
    assert_eq!(r.status, 200);
    assert_eq!(last_request(&fake).body.len(), 1000);
}

#[test]
fn malformed_and_oversized_heads_get_4xx_and_erpgate_keeps_serving() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let mut huge = b"GET /odoo HTTP/1.1\r\nHost: localhost\r\n".to_vec();
    for i in 0..80 {
        huge.extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(1000)).as_bytes());
    }
    huge.extend_from_slice(b"\r\n");
    assert_eq!(send_raw(gw.http, &huge).status, 431);
    for bad in [
        b"GARBAGE\r\n\r\n".as_slice(),
        b"GET /odoo HTTP/1.1\r\nHost: localhost\r\nBad Header: x\r\n\r\n",
        b"GET /odoo HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n",
        b"GET /odoo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcde",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let r = send_raw(gw.http, bad);
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(bad));
    }
    assert!(
        fake.requests().is_empty(),
        "a malformed request reached Odoo"
    );
    assert_eq!(get(gw.http, "/odoo").status, 200);
}

#[test]
fn a_refused_upstream_gives_502_and_a_silent_one_504() {
    let hole = Blackhole::start();
    let refused = refused_addr();
    let gw = Erpgate::start(&two_routes(
        "/silent",
        hole.addr(),
        r#"timeouts = { connect = "1s", read = "300ms" }"#,
        refused,
        r#"timeouts = { connect = "1s" }"#,
    ));
    let r = get(gw.http, "/odoo");
    assert_eq!(r.status, 502);
    assert!(r.body_str().contains("refused"), "{}", r.body_str());
    assert!(r.header("x-request-id").is_some());
    let r = request(gw.http, "POST", "/silent/report", &[], Some(b"{}"));
    assert_eq!(r.status, 504);
}

/// Limits of seconds (here 5 s, as the default connect timeout) are kept on each thread's
/// one-second tick rather than in the runtime's timer: they still end, never before they are
/// due, and about a second after at most (3 s allowed here, for a busy machine).
#[test]
fn limits_of_seconds_end_on_the_tick_never_before_they_are_due() {
    let fake = FakeOdoo::start();
    let hole = Blackhole::start();
    let routes = two_routes(
        "/silent",
        hole.addr(),
        r#"timeouts = { read = "5s" }"#,
        fake.web_addr(),
        "",
    );
    let gw = Erpgate::start(&format!("[server]\nkeepalive_timeout = \"5s\"\n{routes}"));
    let http = gw.http;
    // Odoo's answer, which never comes.
    let silent = std::thread::spawn(move || {
        let asked = std::time::Instant::now();
        let r = get(http, "/silent/report");
        (r.status, asked.elapsed())
    });
    // A keep-alive connection left idle after its request.
    let mut idle = Conn::open(gw.http);
    let r = idle.send(b"GET /web/login HTTP/1.1\r\nHost: erp.example.com\r\n\r\n");
    assert_eq!(r.status, 200);
    let waited = std::time::Instant::now();
    assert!(
        idle.closed_within(Duration::from_millis(4_800)).is_none(),
        "closed before keepalive_timeout"
    );
    let closed = idle.closed_within(Duration::from_secs(4));
    assert!(closed.is_some(), "still open 8.8 s after its request");
    let idle_for = waited.elapsed();
    assert!(
        idle_for >= Duration::from_secs(5),
        "closed after {idle_for:?}"
    );
    let (status, took) = silent.join().expect("request to the silent pool");
    assert_eq!(status, 504);
    assert!(took >= Duration::from_secs(5), "504 after {took:?}");
    assert!(took < Duration::from_secs(8), "504 after {took:?}");
}

#[test]
fn a_connect_failure_moves_even_a_post_to_the_next_server() {
    let fake = FakeOdoo::start();
    let refused = refused_addr();
    let gw = Erpgate::start(&format!(
        "[pools.web]\nservers = [{{ address = \"{refused}\" }}, {{ address = \"{}\" }}]\n[[class]]\nname = \"user\"\npool = \"web\"\n",
        fake.web_addr()
    ));
    for i in 0..4 {
        let r = request(
            gw.http,
            "POST",
            "/web/dataset/call_kw",
            &[],
            Some(format!("{{\"n\":{i}}}").as_bytes()),
        );
        assert_eq!(r.status, 200, "{}", r.body_str());
    }
    // Each POST reached Odoo exactly once.
    let bodies: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    assert_eq!(
        bodies,
        vec!["{\"n\":0}", "{\"n\":1}", "{\"n\":2}", "{\"n\":3}"]
    );
}

#[test]
fn websockets_fail_over_on_connect_and_are_logged_when_they_close() {
    let fake = FakeOdoo::start();
    let refused = refused_addr();
    let gw = Erpgate::start(&format!(
        "[log]\nformat = \"json\"\n[pools.gevent]\nservers = [{{ address = \"{refused}\" }}, {{ address = \"{}\" }}]\n\
         [[class]]\nname = \"longpoll\"\npool = \"gevent\"\n",
        fake.gevent_addr()
    ));
    // Whichever server comes first, every socket opens: a refused connection sent nothing.
    let mut sockets: Vec<WsClient> = (0..3)
        .map(|i| {
            let mut ws = ws_connect(gw.http, "/websocket?version=18.0", Some("http://localhost"))
                .expect("handshake through erpgate");
            ws.send_text(&format!("hello {i}"));
            assert_eq!(ws.recv_text(Duration::from_secs(5)), format!("hello {i}"));
            ws
        })
        .collect();
    assert_eq!(fake.ws_open(), 3);
    gw.wait_log_line(&["Odoo server marked down"]);
    // Logged when it closes, with what went each way: not at the handshake.
    assert!(!gw.log().contains("\"status\":101"), "{}", gw.log());
    let last = sockets.pop().expect("a socket");
    last.close();
    let line = gw.wait_log_line(&["\"status\":101"]);
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/websocket");
    assert_eq!(v["class"], "longpoll");
    assert_eq!(v["upstream"], fake.gevent_addr().to_string());
    // "hello 2" as a masked frame (13 bytes) and a close frame; the echo (9) and Odoo's close.
    assert!(
        v["bytes_in"].as_u64().is_some_and(|n| n >= 13 + 6),
        "{line}"
    );
    assert!(
        v["bytes_out"].as_u64().is_some_and(|n| n >= 9 + 2),
        "{line}"
    );
    assert_eq!(v["error"], "", "{line}");
    // The other two are still open and carry messages.
    for (i, ws) in sockets.iter_mut().enumerate() {
        ws.send_text(&format!("again {i}"));
        assert_eq!(ws.recv_text(Duration::from_secs(5)), format!("again {i}"));
    }
}

#[test]
fn a_websocket_handshake_that_is_not_a_bodiless_get_gets_400_and_never_reaches_odoo() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let r = send_raw(
        gw.http,
        b"POST /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(r.status, 400);
    assert!(
        fake.requests()
            .iter()
            .all(|r| !r.path.starts_with("/websocket")),
        "reached Odoo"
    );
    // erpgate still serves.
    assert_eq!(get(gw.http, "/odoo").status, 200);
}

#[test]
fn a_websocket_stays_open_as_long_as_its_class_idle_timeout_says() {
    let fake = FakeOdoo::start();
    // Short timeouts stand in for Odoo's hour-long sockets: the class's idle setting, not
    // Pingora's fixed 60 s default, decides when an idle socket is cut.
    let cfg = odoo_config(&fake, "").replace(
        "timeouts = { read = \"2h\", idle = \"2h\" }",
        "timeouts = { read = \"1s\", idle = \"3s\" }",
    );
    let gw = Erpgate::start(&cfg);
    let mut ws = ws_connect(gw.http, "/websocket?version=18.0", Some("http://localhost"))
        .expect("handshake through erpgate");
    ws.send_text("hello");
    assert_eq!(ws.recv_text(Duration::from_secs(5)), "hello");
    // Idle longer than the read timeout (1 s) but less than the idle timeout (3 s): still open.
    std::thread::sleep(Duration::from_millis(1800));
    ws.send_text("still there");
    assert_eq!(ws.recv_text(Duration::from_secs(5)), "still there");
    assert_eq!(fake.ws_open(), 1);
    let seen = fake
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/websocket"))
        .expect("handshake reached gevent");
    assert_eq!(seen.port, Port::Gevent);
    assert_eq!(seen.header("origin"), Some("http://localhost"));
    drop(ws);

    // With a 1 s idle timeout an idle socket is cut.
    let cfg = odoo_config(&fake, "").replace(
        "timeouts = { read = \"2h\", idle = \"2h\" }",
        "timeouts = { read = \"1s\", idle = \"1s\" }",
    );
    let gw2 = Erpgate::start(&cfg);
    let mut ws = ws_connect(gw2.http, "/websocket", Some("http://localhost")).expect("handshake");
    ws.send_text("a");
    assert_eq!(ws.recv_text(Duration::from_secs(5)), "a");
    let mut closed = false;
    for _ in 0..50 {
        if ws.is_closed_within(Duration::from_millis(100)) {
            closed = true;
            break;
        }
    }
    assert!(closed, "idle socket not cut after its 1 s idle timeout");
}

#[test]
fn a_websocket_handshake_without_origin_is_refused_by_odoo_and_passed_on() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let err = ws_connect(gw.http, "/websocket", None)
        .err()
        .expect("refused");
    assert!(err.contains("400"), "{err}");

    // A client that keeps the connection after the refusal is told it is closed, and the
    // refusal is logged at once, not when the client lets go.
    let mut c = Conn::open(gw.http);
    let r = c.send(
        b"GET /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.header("connection"), Some("close"));
    gw.wait_log_line(&["path=/websocket", "status=400"]);
    drop(c);
}

#[test]
fn every_websocket_through_erpgate_echoes_when_odoo_answers_at_once() {
    // Pingora 0.9.1 could take the upgrade request's own (empty) end of body for the end of
    // the tunnel when Odoo's 101 was read first (cloudflare/pingora#946): the socket was cut
    // right after the handshake. A fast local Odoo hits that ordering often; every one of
    // these sockets must carry messages both ways.
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let sockets: Vec<_> = (0..4)
        .map(|t| {
            let addr = gw.http;
            std::thread::spawn(move || {
                for i in 0..15 {
                    let mut ws = ws_connect(addr, "/websocket", Some("http://localhost"))
                        .expect("handshake through erpgate");
                    let msg = format!("socket {t}/{i}");
                    ws.send_text(&msg);
                    assert_eq!(ws.recv_text(Duration::from_secs(5)), msg);
                    ws.close();
                }
            })
        })
        .collect();
    for s in sockets {
        s.join().expect("every socket echoed");
    }
}

#[test]
fn a_long_poll_held_by_odoo_completes() {
    let fake = FakeOdoo::start();
    let cfg = odoo_config(&fake, "").replace(
        "timeouts = { read = \"2h\", idle = \"2h\" }",
        "timeouts = { read = \"5s\", idle = \"5s\" }",
    );
    let gw = Erpgate::start(&cfg);
    let started = std::time::Instant::now();
    let r = request(
        gw.http,
        "POST",
        "/longpolling/poll?hold_ms=2500",
        &[("Content-Type", "application/json")],
        Some(b"{\"params\":{}}"),
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), "[]");
    assert!(started.elapsed() >= Duration::from_millis(2500));
}

/// The integration class's header condition, through erpgate's own path (which notes
/// whether a request has `Authorization` as it parses it): a bearer key alone makes a request
/// an integration's, in any case of the field's name; a request without one, or with another
/// scheme, stays a user's.
#[test]
fn a_bearer_key_alone_makes_a_request_an_integrations() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, "\n[log]\nformat = \"json\"\n"));
    let cases: [(&[(&str, &str)], &str); 5] = [
        (&[("Authorization", "Bearer KEY1")], "integration"),
        (&[("AUTHORIZATION", "bearer KEY2")], "integration"),
        (&[("authorization", "Basic c2VjcmV0")], "user"),
        (&[("X-Api-Key", "Bearer KEY3")], "user"),
        (&[], "user"),
    ];
    for (fields, class) in cases {
        let r = request(gw.http, "GET", "/odoo/action-1", fields, None);
        assert_eq!(r.status, 200, "{fields:?}");
        let id = r.header("x-request-id").expect("id").to_string();
        let line = gw.wait_log_line(&[&id]);
        let v: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert_eq!(v["class"], class, "{fields:?}: {line}");
    }
}

#[test]
fn the_access_log_has_the_fields_and_never_secrets() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, "\n[log]\nformat = \"json\"\n"));
    let r = request(
        gw.http,
        "POST",
        "/json/2/res.partner/search_read?access_token=TOKEN789",
        &[
            ("Authorization", "bearer SECRET123"),
            ("Cookie", "session_id=COOKIE456"),
        ],
        Some(b"{\"password\":\"PW000\"}"),
    );
    assert_eq!(r.status, 200);
    let id = r.header("x-request-id").expect("id").to_string();
    let line = gw.wait_log_line(&[&id]);
    let v: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["target"], "erpgate::access");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["path"], "/json/2/res.partner/search_read");
    assert_eq!(v["status"], 200);
    assert_eq!(v["class"], "integration");
    assert_eq!(v["pool"], "web");
    assert_eq!(v["upstream"], fake.web_addr().to_string());
    assert_eq!(v["bytes_in"], 20);
    assert!(v["bytes_out"].as_u64().is_some_and(|n| n > 0), "{line}");
    assert!(
        v["duration_ms"].is_string() || v["duration_ms"].is_number(),
        "{line}"
    );
    assert!(v["timestamp"].is_string(), "{line}");
    let log = gw.log();
    for secret in ["SECRET123", "COOKIE456", "PW000", "TOKEN789"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// A JSON-RPC call whose body comes after its head, in pieces (as a browser may send it),
/// reaches Odoo whole, and the connection then carries the next request; a client that
/// closes in the middle of its body sends Odoo nothing.
#[test]
fn a_body_sent_after_its_head_reaches_odoo_whole_on_a_connection_that_stays_open() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&odoo_config(&fake, ""));
    let body =
        br#"{"jsonrpc":"2.0","method":"call","params":{"model":"res.partner","method":"read"}}"#;
    let head = format!(
        "POST /web/dataset/call_kw HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let mut c = Conn::open(gw.http);
    c.write(head.as_bytes()).expect("head");
    let (a, b) = body.split_at(20);
    for piece in [a, b] {
        std::thread::sleep(Duration::from_millis(50));
        c.write(piece).expect("piece");
    }
    let r = c.try_read_response(false).expect("answer");
    assert_eq!(r.status, 200);
    let calls: Vec<Recorded> = fake
        .wait_for_requests(1, Duration::from_secs(5))
        .into_iter()
        .filter(|r| r.path == "/web/dataset/call_kw")
        .collect();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].body, body.to_vec());
    assert_eq!(
        calls[0].header("content-length"),
        Some(&*body.len().to_string())
    );
    // The same connection carries the next request.
    let r = c.send(b"GET /odoo HTTP/1.1\r\nHost: localhost\r\n\r\n");
    assert_eq!(r.status, 200);

    let mut cut = Conn::open(gw.http);
    cut.write(head.as_bytes()).expect("head");
    cut.write(a).expect("piece");
    drop(cut);
    // Its access line: nothing answered, the client's side closed.
    let line = gw.wait_log_line(&["path=/web/dataset/call_kw", "status=0"]);
    assert!(line.contains("ConnectionClosed"), "{line}");
    assert_eq!(get(gw.http, "/odoo").status, 200);
    let calls = fake
        .requests()
        .into_iter()
        .filter(|r| r.path == "/web/dataset/call_kw")
        .count();
    assert_eq!(calls, 1, "the cut request reached Odoo");
}
