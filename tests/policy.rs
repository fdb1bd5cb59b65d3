//! Access policy through the real binary: allowlists (with forged and trusted
//! `X-Forwarded-For`), in-flight caps that keep other classes working, and the audit log.

mod support;

use std::time::Duration;
use support::erpgate::Erpgate;
use support::*;

fn config(fake: &FakeOdoo, trusted: &str, audit: &std::path::Path) -> String {
    format!(
        r#"
[network]
trusted_proxies = [{trusted}]

[audit]
path = "{audit}"

[pools.web]
servers = [{{ address = "{web}" }}]

[[class]]
name = "admin"
match = [{{ path_prefix = "/web/database/" }}, {{ path_prefix = "/xmlrpc/2/db" }}]
pool = "web"
allow = ["10.0.0.0/8", "::1/128"]
audit = true

[[class]]
name = "integration"
match = [{{ path_prefix = "/xmlrpc/" }}, {{ path_prefix = "/slow" }}]
pool = "web"
max_in_flight = 2

[[class]]
name = "user"
pool = "web"
"#,
        web = fake.web_addr(),
        audit = audit.display(),
    )
}

/// `[pools.web]` with the fake's web port as its one server.
fn web_pool(fake: &FakeOdoo) -> String {
    format!(
        "\n[pools.web]\nservers = [{{ address = \"{}\" }}]\n",
        fake.web_addr()
    )
}

#[test]
fn admin_paths_are_refused_to_clients_outside_the_allowlist_even_with_a_forged_header() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    // No trusted proxies: the test client (127.0.0.1) is the client, outside 10.0.0.0/8.
    let gw = Erpgate::start(&config(&fake, "", &audit));
    for (method, path) in [
        ("GET", "/web/database/manager"),
        ("POST", "/web/database/drop"),
        ("POST", "/xmlrpc/2/db"),
        ("GET", "/web/%64atabase/selector"),
    ] {
        let body = (method == "POST").then_some(b"master_pwd=x&name=prod".as_slice());
        let r = request(
            gw.http,
            method,
            path,
            &[
                ("X-Forwarded-For", "10.1.2.3"),
                ("Authorization", "Basic c2VjcmV0"),
            ],
            body,
        );
        assert_eq!(r.status, 403, "{method} {path}");
    }
    assert!(
        fake.requests().is_empty(),
        "a denied admin request reached Odoo"
    );
    // Other classes are not affected.
    assert_eq!(get(gw.http, "/odoo").status, 200);

    let lines = audit_lines(&audit, 4);
    assert_eq!(lines.len(), 4);
    // Lines are written after each response, so two requests in quick succession may be
    // logged in either order: find the one for the first request.
    let first = lines
        .iter()
        .find(|l| l["method"] == "GET" && l["path"] == "/web/database/manager")
        .expect("a line for GET /web/database/manager");
    assert_eq!(first["decision"], "denied_ip");
    assert_eq!(first["status"], 403);
    assert_eq!(first["client_ip"], "127.0.0.1");
    assert_eq!(first["peer_ip"], "127.0.0.1");
    assert_eq!(first["forwarded_for"], "10.1.2.3");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/web/database/manager");
    assert_eq!(first["class"], "admin");
    assert_eq!(first["rule"], "path_prefix=/web/database/");
    assert!(first["request_id"].as_str().is_some_and(|s| s.len() == 32));
    assert!(first["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    let text = std::fs::read_to_string(&audit).expect("audit file");
    assert!(
        !text.contains("c2VjcmV0") && !text.contains("master_pwd"),
        "credentials in the audit log"
    );
}

#[test]
fn a_trusted_load_balancer_vouches_for_an_allowed_client() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let gw = Erpgate::start(&config(&fake, "\"127.0.0.1/32\"", &audit));
    let manager_for = |xff: &str| {
        request(
            gw.http,
            "GET",
            "/web/database/manager",
            &[("X-Forwarded-For", xff)],
            None,
        )
        .status
    };
    assert_eq!(manager_for("10.1.2.3"), 200);
    assert_eq!(
        fake.wait_for_requests(1, Duration::from_secs(5))[0].header("x-real-ip"),
        Some("10.1.2.3")
    );
    // The balancer says the client is outside: refused.
    assert_eq!(manager_for("10.1.2.3, 203.0.113.5"), 403);
    assert_eq!(fake.requests().len(), 1);
    let lines = audit_lines(&audit, 2);
    let by_client = |ip: &str| {
        lines
            .iter()
            .find(|l| l["client_ip"] == ip)
            .unwrap_or_else(|| panic!("no audit line for {ip}: {lines:#?}"))
    };
    assert_eq!(by_client("10.1.2.3")["decision"], "allowed");
    assert_eq!(by_client("10.1.2.3")["status"], 200);
    assert_eq!(by_client("203.0.113.5")["decision"], "denied_ip");
    assert_eq!(by_client("203.0.113.5")["status"], 403);
}

#[test]
fn a_saturated_class_gets_503_while_users_keep_working() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = Erpgate::start(&config(&fake, "", &dir.path().join("audit.jsonl")));
    let http = gw.http;
    let slow: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || get(http, "/slow?ms=2000").status))
        .collect();
    fake.wait_for_requests(2, Duration::from_secs(5));
    let r = request(
        gw.http,
        "POST",
        "/xmlrpc/2/object",
        &[],
        Some(b"<methodCall/>"),
    );
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));
    for _ in 0..5 {
        assert_eq!(get(gw.http, "/odoo/action-1").status, 200);
    }
    for t in slow {
        assert_eq!(t.join().expect("slow request"), 200);
    }
    // The places are given back.
    assert_eq!(
        request(
            gw.http,
            "POST",
            "/xmlrpc/2/object",
            &[],
            Some(b"<methodCall/>")
        )
        .status,
        200
    );
}

#[test]
fn an_unwritable_audit_log_does_not_block_traffic() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&config(
        &fake,
        "\"127.0.0.1/32\"",
        std::path::Path::new("/nonexistent-dir/audit.jsonl"),
    ));
    let r = request(
        gw.http,
        "GET",
        "/web/database/manager",
        &[("X-Forwarded-For", "10.1.2.3")],
        None,
    );
    assert_eq!(r.status, 200);
    gw.wait_log_line(&["audit log: cannot write"]);
    assert_eq!(get(gw.http, "/odoo").status, 200);
}

#[test]
fn rate_limits_answer_429_with_retry_after_and_ratelimit_headers() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&format!(
        r#"{pool}
[[class]]
name = "integration"
match = {{ path_prefix = "/xmlrpc/" }}
pool = "web"
rate_limit = {{ key = "header:x-api-key", rate = "2/min", burst = 3 }}

[[class]]
name = "user"
pool = "web"
rate_limit = {{ key = "client_ip", rate = "1/h", burst = 2 }}
"#,
        pool = web_pool(&fake)
    ));
    let call = |key: &str| {
        request(
            gw.http,
            "POST",
            "/xmlrpc/2/object",
            &[("X-Api-Key", key)],
            Some(b"<methodCall/>"),
        )
    };
    let statuses: Vec<u16> = (0..5).map(|_| call("key-a").status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 429]);
    let r = call("key-a");
    assert_eq!(r.status, 429);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry), "retry-after {retry}");
    assert_eq!(
        r.header("ratelimit-policy"),
        Some("\"integration\";q=3;w=60")
    );
    assert_eq!(
        r.header("ratelimit"),
        Some(format!("\"integration\";r=0;t={retry}").as_str())
    );
    // Another API key from the same IP has its own bucket.
    assert_eq!(call("key-b").status, 200);
    assert_eq!(fake.requests().len(), 4, "a limited request reached Odoo");
    // The user class counts per client IP, separately from the integration class.
    let users: Vec<u16> = (0..3).map(|_| get(gw.http, "/odoo").status).collect();
    assert_eq!(users, vec![200, 200, 429]);
    let line = gw.wait_log_line(&["status=429", "class=\"user\""]);
    assert!(line.contains("client=127.0.0.1"), "{line}");
}

/// A class chosen by the request's host (the host is found only when a class asks for it):
/// its allowlist holds for every port and letter case of that host, and other hosts go on.
#[test]
fn a_class_matched_by_host_takes_that_hosts_requests_only() {
    let fake = FakeOdoo::start();
    let gw = Erpgate::start(&format!(
        r#"{pool}
[[class]]
name = "portal"
match = [{{ host = "*.portal.example" }}]
pool = "web"
allow = ["10.0.0.0/8"]

[[class]]
name = "user"
pool = "web"
"#,
        pool = web_pool(&fake),
    ));
    let with_host = |host: &str| {
        let raw = format!("GET /my/invoices HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        send_raw(gw.http, raw.as_bytes()).status
    };
    for host in ["shop.portal.example", "Shop.Portal.Example:8080"] {
        assert_eq!(with_host(host), 403, "{host}");
    }
    assert!(fake.requests().is_empty(), "a refused request reached Odoo");
    assert_eq!(with_host("erp.example.com"), 200);
    assert_eq!(with_host("portal.example"), 200);
    assert_eq!(fake.wait_for_requests(2, Duration::from_secs(5)).len(), 2);
}
