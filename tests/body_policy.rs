//! Policies that need a look into the request: JSON-RPC `db` calls are admin in every form,
//! integration clients are told apart by API key or RPC login, and security headers.

mod support;

use std::time::Duration;
use support::erpgate::Erpgate;
use support::*;

fn config(fake: &FakeOdoo, trusted: &str, audit: &std::path::Path, integration: &str) -> String {
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
match = [{{ path_prefix = "/web/database/" }}, {{ path = "/jsonrpc", jsonrpc_service = "db" }}]
pool = "web"
allow = ["10.0.0.0/8"]
audit = true
max_body = "unlimited"

[[class]]
name = "integration"
match = [{{ path_prefix = "/xmlrpc/" }}, {{ path = "/jsonrpc" }}, {{ header = "authorization", value_prefix = "bearer " }}]
pool = "web"
{integration}

[[class]]
name = "user"
pool = "web"
security_headers = {{ hsts = "max-age=31536000; includeSubDomains", nosniff = true, referrer_policy = "same-origin", secure_session_cookie = true }}
"#,
        web = fake.web_addr(),
        audit = audit.display(),
    )
}

fn jsonrpc_head(len: Option<usize>, extra: &str) -> String {
    let framing = match len {
        Some(n) => format!("Content-Length: {n}\r\n"),
        None => "Transfer-Encoding: chunked\r\n".to_string(),
    };
    format!(
        "POST /jsonrpc HTTP/1.1\r\nHost: erp.example.com\r\nContent-Type: application/json\r\nX-Forwarded-For: 10.1.2.3\r\n{extra}{framing}\r\n"
    )
}

fn post(addr: std::net::SocketAddr, body: &[u8], extra: &str) -> Response {
    let mut raw = jsonrpc_head(Some(body.len()), extra).into_bytes();
    raw.extend_from_slice(body);
    send_raw(addr, &raw)
}

/// Sends the head, then each piece as its own write with a pause, so erpgate reads the body
/// in several packets.
fn post_in_pieces(addr: std::net::SocketAddr, head: &str, pieces: &[&[u8]]) -> Response {
    let mut c = Conn::open(addr);
    c.write(head.as_bytes()).expect("head");
    for p in pieces {
        std::thread::sleep(Duration::from_millis(40));
        c.write(p).expect("piece");
    }
    c.read_response()
}

fn chunked(pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = pieces
        .iter()
        .map(|p| {
            let mut c = format!("{:x}\r\n", p.len()).into_bytes();
            c.extend_from_slice(p);
            c.extend_from_slice(b"\r\n");
            c
        })
        .collect();
    out.push(b"0\r\n\r\n".to_vec());
    out
}

fn padded(before: usize, service: &str) -> Vec<u8> {
    let mut body =
        br#"{"jsonrpc":"2.0","method":"call","params":{"method":"list","args":[""#.to_vec();
    body.extend(std::iter::repeat_n(b'x', before));
    body.extend_from_slice(format!(r#""],"service":"{service}"}},"id":1}}"#).as_bytes());
    body
}

#[test]
fn jsonrpc_db_calls_from_outside_are_refused_in_every_form() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    // No trusted proxy: the forged X-Forwarded-For: 10.1.2.3 counts for nothing.
    let gw = Erpgate::start(&config(&fake, "", &audit, ""));
    let plain: &[u8] =
        br#"{"jsonrpc":"2.0","method":"call","params":{"service":"db","method":"list","args":[]},"id":1}"#;
    let forms: Vec<(&str, Vec<u8>)> = vec![
        ("plain", plain.to_vec()),
        (
            "whitespace",
            b"\r\n {\n\t\"params\" :\n {\t\"service\"\r\n:\n\"db\" , \"method\" : \"drop\", \"args\": [\"m\", \"prod\"]} }\n\n".to_vec(),
        ),
        (
            "key order",
            br#"{"id":1,"params":{"args":["m","prod"],"method":"drop","service":"db"},"method":"call","jsonrpc":"2.0"}"#.to_vec(),
        ),
        ("unicode escape", br#"{"params":{"service":"\u0064b","method":"list","args":[]}}"#.to_vec()),
        ("escaped key", br#"{"\u0070arams":{"s\u0065rvice":"d\u0062","method":"list","args":[]}}"#.to_vec()),
        (
            "duplicate service",
            br#"{"params":{"service":"object","method":"list","args":[],"service":"db"}}"#.to_vec(),
        ),
        (
            "duplicate params",
            br#"{"params":{"service":"object"},"params":{"service":"db","method":"list","args":[]}}"#.to_vec(),
        ),
        ("padding", padded(60_000, "db")),
        ("params as pairs", br#"{"params":[["service","db"],["method","list"],["args",[]]]}"#.to_vec()),
        ("not JSON", b"service=db&method=list".to_vec()),
        ("truncated", br#"{"params":{"service":"object","method":"list""#.to_vec()),
        ("empty", Vec::new()),
    ];
    for (name, body) in &forms {
        assert_eq!(post(gw.http, body, "").status, 403, "{name}");
    }
    // A compressed body: Odoo would not inflate it, erpgate cannot read it: a doubt.
    assert_eq!(
        post(
            gw.http,
            b"\x1f\x8b\x08\x00\x00\x00\x00\x00",
            "Content-Encoding: gzip\r\n"
        )
        .status,
        403,
        "gzip"
    );
    // A huge body: the db service comes after 3 MiB of padding.
    let huge = padded(3 << 20, "db");
    assert_eq!(post(gw.http, &huge, "").status, 403, "huge body");
    // A body split across packets, inside the key and inside the value.
    let split: [&[u8]; 3] = [br#"{"params":{"serv"#, br#"ice":"d"#, br#"b","args":[]}}"#];
    let head = jsonrpc_head(Some(split.iter().map(|p| p.len()).sum()), "");
    let r = post_in_pieces(gw.http, &head, &split);
    assert_eq!(r.status, 403, "split across packets");
    // Chunked, all at once and chunk by chunk.
    let pieces: [&[u8]; 3] = [
        br#"{"params":{"service":"d"#,
        br#"b","method":"#,
        br#""list","args":[]}}"#,
    ];
    let body: Vec<u8> = chunked(&pieces).concat();
    let mut raw = jsonrpc_head(None, "").into_bytes();
    raw.extend_from_slice(&body);
    assert_eq!(send_raw(gw.http, &raw).status, 403, "chunked");
    let chunks = chunked(&pieces);
    let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    let r = post_in_pieces(gw.http, &jsonrpc_head(None, ""), &refs);
    assert_eq!(r.status, 403, "chunked across packets");
    // Chunked and huge.
    let big: Vec<Vec<u8>> = chunked(&[&huge[..1 << 20], &huge[1 << 20..]]);
    let refs: Vec<&[u8]> = big.iter().map(|c| c.as_slice()).collect();
    let r = post_in_pieces(gw.http, &jsonrpc_head(None, ""), &refs);
    assert_eq!(r.status, 403, "chunked huge");
    // A client that waits for 100 Continue gets it, then the verdict.
    let mut c = Conn::open(gw.http);
    c.write(jsonrpc_head(Some(plain.len()), "Expect: 100-continue\r\n").as_bytes())
        .expect("head");
    assert_eq!(c.read_status_head().expect("interim"), 100);
    c.write(plain).expect("body");
    assert_eq!(c.read_response().status, 403, "expect 100-continue");

    assert!(
        fake.requests().is_empty(),
        "a db call reached Odoo: {:?}",
        fake.requests()
            .iter()
            .map(|r| String::from_utf8_lossy(&r.body[..r.body.len().min(80)]).into_owned())
            .collect::<Vec<_>>()
    );

    // Other JSON-RPC calls pass, in the same forms, and Odoo gets their bodies intact.
    let object: &[u8] = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"object","method":"execute_kw","args":["erp",2,"pw","res.partner","search",[[]]]},"id":2}"#;
    let huge_object = padded(3 << 20, "object");
    let r = post(gw.http, object, "");
    assert_eq!(r.status, 200, "{}", r.body_str());
    assert_eq!(
        post(gw.http, &huge_object, "").status,
        200,
        "huge object call"
    );
    let mut c = Conn::open(gw.http);
    c.write(jsonrpc_head(Some(object.len()), "Expect: 100-continue\r\n").as_bytes())
        .expect("head");
    assert_eq!(c.read_status_head().expect("interim"), 100);
    c.write(object).expect("body");
    assert_eq!(c.read_response().status, 200, "expect 100-continue");
    let pieces: [&[u8]; 2] = [&object[..40], &object[40..]];
    let chunks = chunked(&pieces);
    let refs: Vec<&[u8]> = chunks.iter().map(|c| c.as_slice()).collect();
    assert_eq!(
        post_in_pieces(gw.http, &jsonrpc_head(None, ""), &refs).status,
        200,
        "chunked object call"
    );
    let seen = fake.wait_for_requests(4, Duration::from_secs(10));
    assert_eq!(seen.len(), 4);
    let bodies: Vec<&[u8]> = seen.iter().map(|r| r.body.as_slice()).collect();
    assert_eq!(bodies.iter().filter(|b| **b == object).count(), 3);
    assert!(
        bodies.contains(&huge_object.as_slice()),
        "huge body altered"
    );
    // Odoo is not asked for a second 100 Continue.
    assert!(seen.iter().all(|r| r.header("expect").is_none()));

    // Every refusal is in the audit log, with the rule that made it admin.
    let n = forms.len() + 7;
    let lines = audit_lines(&audit, n);
    assert_eq!(lines.len(), n);
    for l in &lines {
        assert_eq!(l["class"], "admin");
        assert_eq!(l["decision"], "denied_ip");
        assert_eq!(l["status"], 403);
        assert_eq!(l["path"], "/jsonrpc");
        assert_eq!(l["rule"], "path=/jsonrpc jsonrpc_service=db");
        assert_eq!(l["client_ip"], "127.0.0.1");
    }
}

#[test]
fn allowlisted_clients_reach_the_database_service() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    // The test client is a trusted load balancer vouching for 10.1.2.3, inside the allowlist.
    let gw = Erpgate::start(&config(&fake, "\"127.0.0.1/32\"", &audit, ""));
    let list: &[u8] = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"db","method":"list","args":[]},"id":1}"#;
    assert_eq!(post(gw.http, list, "").status, 200);
    // A restore-sized call: longer than erpgate reads before choosing the class.
    let restore = padded(2 << 20, "db");
    assert_eq!(post(gw.http, &restore, "").status, 200);
    let seen = fake.wait_for_requests(2, Duration::from_secs(10));
    assert!(seen.iter().any(|r| r.body == list));
    assert!(seen.iter().any(|r| r.body == restore));
    let lines = audit_lines(&audit, 2);
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["class"], "admin");
        assert_eq!(l["decision"], "allowed");
        assert_eq!(l["status"], 200);
        assert_eq!(l["client_ip"], "10.1.2.3");
        assert_eq!(l["peer_ip"], "127.0.0.1");
        assert_eq!(l["rule"], "path=/jsonrpc jsonrpc_service=db");
    }
    // The same calls from outside the allowlist are refused.
    let outside = |body: &[u8]| {
        let mut raw = jsonrpc_head(Some(body.len()), "")
            .replace("X-Forwarded-For: 10.1.2.3", "X-Forwarded-For: 203.0.113.9")
            .into_bytes();
        raw.extend_from_slice(body);
        send_raw(gw.http, &raw).status
    };
    assert_eq!(outside(list), 403);
    assert_eq!(outside(&restore), 403);
    assert_eq!(fake.requests().len(), 2);
}

fn xmlrpc_call(db: &str, uid: u32, password: &str) -> Vec<u8> {
    format!(
        "<?xml version='1.0'?>\n<methodCall>\n<methodName>execute_kw</methodName>\n<params>\n\
         <param>\n<value><string>{db}</string></value>\n</param>\n\
         <param>\n<value><int>{uid}</int></value>\n</param>\n\
         <param>\n<value><string>{password}</string></value>\n</param>\n\
         <param>\n<value><string>account.move</string></value>\n</param>\n\
         <param>\n<value><string>search_count</string></value>\n</param>\n\
         </params>\n</methodCall>\n"
    )
    .into_bytes()
}

#[test]
fn integration_clients_on_one_ip_have_their_own_limits() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let limit = r#"rate_limit = { key = "integration_client", rate = "1/min", burst = 2 }"#;
    let gw = Erpgate::start(&config(&fake, "", &audit, limit));
    let bearer = |key: &str| {
        request(
            gw.http,
            "POST",
            "/json/2/account.move/search_count",
            &[("Authorization", &format!("Bearer {key}"))],
            Some(b"{}"),
        )
    };
    assert_eq!(bearer("key-one").status, 200);
    assert_eq!(bearer("key-one").status, 200);
    let limited = bearer("key-one");
    assert_eq!(limited.status, 429);
    assert!(limited
        .header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .is_some_and(|s| (1..=60).contains(&s)));
    assert_eq!(
        limited.header("ratelimit-policy"),
        Some("\"integration\";q=2;w=60")
    );
    assert!(limited
        .header("ratelimit")
        .is_some_and(|v| v.starts_with("\"integration\";r=0;t=")));
    // Another API key from the same IP has its own bucket.
    assert_eq!(bearer("key-two").status, 200);

    // XML-RPC: the database and uid tell the callers apart, the password does not.
    let xml = |uid: u32, password: &str| {
        request(
            gw.http,
            "POST",
            "/xmlrpc/2/object",
            &[("Content-Type", "text/xml")],
            Some(&xmlrpc_call("erp", uid, password)),
        )
        .status
    };
    assert_eq!(xml(2, "pw-a"), 200);
    assert_eq!(xml(2, "pw-b"), 200);
    assert_eq!(xml(2, "pw-c"), 429);
    assert_eq!(xml(7, "pw-a"), 200);
    // The same user over JSON-RPC is the same client: its bucket is empty already.
    let json = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"object","method":"execute_kw","args":["erp",2,"pw","account.move","search_count",[[]]]}}"#;
    assert_eq!(post(gw.http, json, "").status, 429);
    let json9 = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"object","method":"execute_kw","args":["erp",9,"pw","account.move","search_count",[[]]]}}"#;
    assert_eq!(post(gw.http, json9, "").status, 200);
    // Bodies reached Odoo intact.
    let seen = fake.wait_for_requests(7, Duration::from_secs(10));
    assert!(seen.iter().any(|r| r.body == xmlrpc_call("erp", 7, "pw-a")));
    assert!(seen.iter().any(|r| r.body == json9));
    // Neither keys nor passwords are in the logs (once the last request's line is written).
    gw.wait_log_line(&[&format!("bytes_in={}", json9.len()), "status=200"]);
    let log = gw.log();
    for secret in ["key-one", "key-two", "pw-a", "pw-b"] {
        assert!(!log.contains(secret), "{secret} in the log");
    }
}

#[test]
fn security_headers_and_session_cookie_flags() {
    let fake = FakeOdoo::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let gw = Erpgate::start(&config(&fake, "\"127.0.0.1/32\"", &audit, ""));
    // HTTPS as vouched for by a trusted TLS-terminating proxy.
    let https = request(
        gw.http,
        "GET",
        "/web/login",
        &[("X-Forwarded-Proto", "https")],
        None,
    );
    assert_eq!(https.status, 200);
    assert_eq!(
        https.header("strict-transport-security"),
        Some("max-age=31536000; includeSubDomains")
    );
    assert_eq!(https.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(https.header("referrer-policy"), Some("same-origin"));
    let cookies = headers_all(&https.headers, "set-cookie");
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    let session = cookies
        .iter()
        .find(|c| c.starts_with("session_id="))
        .expect("session cookie");
    assert!(
        session.ends_with("; HttpOnly; Path=/; Secure; SameSite=Lax"),
        "{session}"
    );
    assert!(cookies.contains(&"frontend_lang=en_US; Path=/"));

    // Plain HTTP: no HSTS, the cookie as Odoo set it (a Secure cookie would not come back).
    let http = get(gw.http, "/web/login");
    assert_eq!(http.header("strict-transport-security"), None);
    assert_eq!(http.header("x-content-type-options"), Some("nosniff"));
    let session = headers_all(&http.headers, "set-cookie")
        .into_iter()
        .find(|c| c.starts_with("session_id="))
        .expect("session cookie")
        .to_string();
    assert!(session.ends_with("; HttpOnly; Path=/"), "{session}");

    // An untrusted peer cannot claim HTTPS.
    let gw2 = Erpgate::start(&config(&fake, "", &audit, ""));
    let forged = request(
        gw2.http,
        "GET",
        "/web/login",
        &[("X-Forwarded-Proto", "https")],
        None,
    );
    assert_eq!(forged.header("strict-transport-security"), None);

    // A class without security_headers gets none.
    let api = request(
        gw.http,
        "POST",
        "/xmlrpc/2/common",
        &[("X-Forwarded-Proto", "https")],
        Some(b"<methodCall/>"),
    );
    assert_eq!(api.status, 200);
    assert_eq!(api.header("strict-transport-security"), None);
    assert_eq!(api.header("x-content-type-options"), None);
}
