//! HTTPS through the real binary: certificates by SNI, HTTP/2 and HTTP/1.1, refused old
//! protocols and garbage, certificate renewal on disk, client certificates per class,
//! redirects from plain HTTP.

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};
use support::erpgate::Erpgate;
use support::tls::*;
use support::*;

fn path(name: &str) -> String {
    cert_file(name).display().to_string()
}

/// Three certificates (the first the default), one pool, a `bank` class that needs a client
/// certificate when `client_ca` is set.
fn tls_config(odoo: &FakeOdoo, tls_extra: &str, first: (&str, &str)) -> String {
    format!(
        r#"
[tls]
certificates = [
  {{ cert = "{}", key = "{}" }},
  {{ cert = "{}", key = "{}" }},
  {{ cert = "{}", key = "{}" }},
]
{tls_extra}

[pools.web]
servers = [{{ address = "{}" }}]

[[class]]
name = "user"
pool = "web"
"#,
        first.0,
        first.1,
        path("erp-test.crt"),
        path("erp-test.key"),
        path("wild-test.crt"),
        path("wild-test.key"),
        odoo.web_addr()
    )
}

fn default_pair() -> (String, String) {
    (path("localhost.crt"), path("localhost.key"))
}

fn start(odoo: &FakeOdoo, tls_extra: &str) -> Erpgate {
    let (c, k) = default_pair();
    Erpgate::start_tls(&tls_config(odoo, tls_extra, (&c, &k)))
}

#[test]
fn sni_picks_the_certificate_and_both_http_versions_reach_odoo_as_https() {
    let odoo = FakeOdoo::start();
    let gw = start(&odoo, r#"hsts = "max-age=31536000""#);
    let verified = Client {
        verify: true,
        ..Client::default()
    };
    // Each name gets its certificate, which verifies against the CA.
    let erp = verified
        .connect(gw.https, Some("erp.test"))
        .expect("erp.test");
    assert_eq!(served(&erp), der_of("erp-test.crt"));
    let wild = verified
        .connect(gw.https, Some("a.wild.test"))
        .expect("wildcard");
    assert_eq!(served(&wild), der_of("wild-test.crt"));
    // No SNI, or a name no certificate has: the first certificate.
    let plain = Client::default();
    let none = plain.connect(gw.https, None).expect("no SNI");
    assert_eq!(served(&none), der_of("localhost.crt"));
    let other = plain
        .connect(gw.https, Some("other.example"))
        .expect("unknown name");
    assert_eq!(served(&other), der_of("localhost.crt"));

    // HTTP/1.1 over TLS.
    let h1 = Client {
        verify: true,
        alpn: vec![b"http/1.1".to_vec()],
        ..Client::default()
    };
    let mut s = h1.connect(gw.https, Some("localhost")).expect("h1");
    assert_eq!(s.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (status, text) = https_get(&mut s, "erp.test", "/odoo?v=1").expect("h1 get");
    assert_eq!(status, 200, "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("strict-transport-security: max-age=31536000"),
        "{text}"
    );
    // HTTP/2 over TLS.
    let (status, alpn, body) = h2_get(gw.https, "/odoo?v=2");
    assert_eq!(status, 200, "{body}");
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    assert!(body.contains("/odoo?v=2"), "{body}");
    // Odoo is told both came over HTTPS.
    let seen = odoo.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.header("x-forwarded-proto"), Some("https"), "{r:?}");
    }
    // Plain HTTP on the plain port is still plain, without HSTS.
    let r = get(gw.http, "/odoo?v=plain");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("strict-transport-security"), None);
}

#[test]
fn idle_https_connections_close_after_keepalive_timeout_in_both_http_versions() {
    let odoo = FakeOdoo::start();
    let (c, k) = default_pair();
    let body =
        "[server]\nkeepalive_timeout = \"1s\"\n".to_string() + &tls_config(&odoo, "", (&c, &k));
    let gw = Erpgate::start_tls(&body);
    // HTTP/1.1 over TLS: a keep-alive request, then silence.
    let h1 = Client {
        alpn: vec![b"http/1.1".to_vec()],
        ..Client::default()
    };
    let mut s = h1.connect(gw.https, Some("localhost")).expect("h1");
    write!(s, "GET /odoo HTTP/1.1\r\nHost: erp.test\r\n\r\n").expect("write");
    s.flush().expect("flush");
    s.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let started = Instant::now();
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            // Closed without close_notify, or reset: closed all the same.
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => break true,
            Err(_) => break false,
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        closed && started.elapsed() < Duration::from_secs(4),
        "TLS keep-alive connection closed: {closed}, after {:?}",
        started.elapsed()
    );
    // HTTP/2: the idle connection is closed too.
    let (status, closed) = h2_get_then_idle(gw.https, "/odoo?v=2", Duration::from_secs(5));
    assert_eq!(status, 200);
    assert!(closed.is_some(), "an idle HTTP/2 connection stayed open");
}

/// A TLS 1.1 ClientHello: legacy version 3.2, no supported_versions extension.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0x00, 0x2f, 0x00, 0x35]); // two CBC suites
    body.extend_from_slice(&[0x01, 0x00]); // no compression
    let mut hs = vec![0x01, 0x00, 0x00, body.len() as u8];
    hs.extend_from_slice(&body);
    let mut rec = vec![0x16, 0x03, 0x01, 0x00, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

/// What the server answers to `bytes` on a fresh connection, until it closes.
fn answer_to(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(bytes).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn old_protocols_and_garbage_are_refused_cleanly_and_min_version_holds() {
    let odoo = FakeOdoo::start();
    let gw = start(&odoo, "");
    // TLS 1.1: an alert (a record of type 21), never a ServerHello.
    let a = answer_to(gw.https, &tls11_client_hello());
    assert!(a.is_empty() || a[0] == 0x15, "{a:?}");
    // Plain HTTP, and random bytes, on the TLS port: closed without an HTTP answer.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xde, 0xad, 0xbe, 0xef, 0, 1, 2, 3],
    ] {
        let a = answer_to(gw.https, junk);
        assert!(!String::from_utf8_lossy(&a).contains("HTTP/"), "{a:?}");
    }
    // TLS 1.2 is served by default...
    let tls12 = Client {
        tls12_only: true,
        ..Client::default()
    };
    let mut s = tls12.connect(gw.https, Some("localhost")).expect("TLS 1.2");
    assert_eq!(https_get(&mut s, "localhost", "/odoo").expect("get").0, 200);
    // ...and erpgate kept serving through all of it.
    assert_eq!(get(gw.http, "/odoo").status, 200);

    // min_version = "1.3": a TLS 1.2-only client is refused, a TLS 1.3 one served.
    let gw13 = start(&odoo, r#"min_version = "1.3""#);
    assert!(tls12.connect(gw13.https, Some("localhost")).is_err());
    let s = Client::default()
        .connect(gw13.https, Some("localhost"))
        .expect("TLS 1.3");
    assert_eq!(
        s.conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
}

#[test]
fn a_certificate_replaced_on_disk_is_served_on_the_next_handshake() {
    let odoo = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("site.crt"), dir.path().join("site.key"));
    std::fs::copy(cert_file("localhost.crt"), &cert).expect("copy");
    std::fs::copy(cert_file("localhost.key"), &key).expect("copy");
    let (c, k) = (cert.display().to_string(), key.display().to_string());
    let gw = Erpgate::start_tls(&tls_config(&odoo, "", (&c, &k)));
    let client = Client::default();
    let first = client.connect(gw.https, None).expect("handshake");
    assert_eq!(served(&first), der_of("localhost.crt"));

    // A renewal writes new files (here: another certificate and its key).
    std::fs::copy(cert_file("wild-test.crt"), &cert).expect("copy");
    std::fs::copy(cert_file("wild-test.key"), &key).expect("copy");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let s = client.connect(gw.https, None).expect("handshake");
        if served(&s) == der_of("wild-test.crt") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "renewed certificate not served"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    gw.wait_log_line(&["TLS certificates reloaded"]);

    // A broken renewal (a key that is not the certificate's) keeps the old one serving.
    std::fs::copy(cert_file("erp-test.crt"), &cert).expect("copy");
    gw.wait_log_line(&["certificate reload failed", "is not the key of"]);
    let s = client.connect(gw.https, None).expect("handshake");
    assert_eq!(served(&s), der_of("wild-test.crt"));
}

#[test]
fn client_certificates_are_required_per_class() {
    let odoo = FakeOdoo::start();
    let extra = format!("client_ca = \"{}\"", path("ca.crt"));
    let (c, k) = default_pair();
    let cfg = tls_config(&odoo, &extra, (&c, &k)).replace(
        "[[class]]\nname = \"user\"",
        "[[class]]\nname = \"bank\"\nmatch = { path_prefix = \"/bank/\" }\npool = \"web\"\n\
         require_client_cert = true\n\n[[class]]\nname = \"user\"",
    );
    let gw = Erpgate::start_tls(&cfg);
    let partner = Client {
        identity: Some(("client.crt", "client.key")),
        ..Client::default()
    };
    let mut s = partner
        .connect(gw.https, Some("localhost"))
        .expect("with certificate");
    assert_eq!(
        https_get(&mut s, "localhost", "/bank/statements")
            .expect("get")
            .0,
        200
    );
    // No certificate: the bank class says 403, other classes work.
    let anyone = Client::default();
    let mut s = anyone
        .connect(gw.https, Some("localhost"))
        .expect("without");
    assert_eq!(
        https_get(&mut s, "localhost", "/bank/statements")
            .expect("get")
            .0,
        403
    );
    let mut s = anyone
        .connect(gw.https, Some("localhost"))
        .expect("without");
    assert_eq!(https_get(&mut s, "localhost", "/odoo").expect("get").0, 200);
    // A certificate from another CA: the handshake fails, nothing reaches Odoo.
    let stranger = Client {
        identity: Some(("other-client.crt", "other-client.key")),
        ..Client::default()
    };
    let refused = stranger
        .connect(gw.https, Some("localhost"))
        .and_then(|mut s| https_get(&mut s, "localhost", "/bank/statements"));
    assert!(refused.is_err(), "{refused:?}");
    let bank_requests = odoo
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/bank/"))
        .count();
    assert_eq!(bank_requests, 1);
    gw.wait_log_line(&["path=/bank/statements", "status=403"]);
}

#[test]
fn plain_http_is_redirected_to_https_except_health_probes() {
    let odoo = FakeOdoo::start();
    let gw = start(&odoo, "redirect_http = true\nredirect_port = 8443");
    let r = send_raw(
        gw.http,
        b"GET /web/login?redirect=%2Fodoo HTTP/1.1\r\nHost: erp.example.com:8080\r\n\
          Connection: close\r\n\r\n",
    );
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://erp.example.com:8443/web/login?redirect=%2Fodoo")
    );
    // The load balancer's probe path is exempt by default.
    assert_eq!(get(gw.http, "/web/health").status, 200);
    // A trusted proxy that terminated TLS is not redirected.
    let r = request(
        gw.http,
        "GET",
        "/odoo",
        &[("X-Forwarded-Proto", "https")],
        None,
    );
    assert_eq!(r.status, 308, "the test peer is not a trusted proxy");
    assert!(odoo.requests().iter().all(|r| r.path == "/web/health"));
}

#[test]
fn a_websocket_over_https_reaches_the_gevent_pool_and_carries_large_messages() {
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message};
    let odoo = FakeOdoo::start();
    let (c, k) = default_pair();
    let cfg = tls_config(&odoo, "", (&c, &k)).replace(
        &odoo.web_addr().to_string(),
        &odoo.gevent_addr().to_string(),
    );
    let gw = Erpgate::start_tls(&cfg);
    let tls = Client {
        verify: true,
        alpn: vec![b"http/1.1".to_vec()],
        ..Client::default()
    }
    .connect(gw.https, Some("localhost"))
    .expect("TLS handshake");
    let mut req = "wss://localhost/websocket"
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("Origin", "https://localhost".parse().expect("origin"));
    let (mut ws, resp) = tungstenite::client(req, tls).expect("WebSocket handshake");
    assert_eq!(resp.status().as_u16(), 101);
    let mut echo = |text: String| {
        ws.send(Message::text(text.clone())).expect("send");
        loop {
            match ws.read().expect("read") {
                Message::Text(t) => {
                    assert_eq!(t.as_str(), text);
                    break;
                }
                Message::Close(_) => panic!("closed"),
                _ => {}
            }
        }
    };
    echo("hello".into());
    // Many TLS records and reads each way.
    echo("x".repeat(200_000));
    echo("after".into());
    assert_eq!(odoo.ws_open(), 1);
    let seen = odoo
        .requests()
        .into_iter()
        .find(|r| r.path.starts_with("/websocket"))
        .expect("handshake reached Odoo");
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    let _ = ws.close(None);
}
