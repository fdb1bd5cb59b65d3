use super::*;

const MINIMAL: &str = r#"
[listen]
http = ["127.0.0.1:8080"]

[pools.web]
servers = [{ address = "127.0.0.1:8069" }]

[[class]]
name = "user"
pool = "web"
"#;

fn errors(text: &str) -> Vec<String> {
    match parse(text, "t.toml", None) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
    }
}

fn has(errs: &[String], needle: &str) -> bool {
    errs.iter().any(|e| e.contains(needle))
}

#[test]
fn minimal_config_compiles_with_defaults() {
    let cfg = parse(MINIMAL, "t.toml", None).expect("valid");
    assert_eq!(cfg.network.zone, "local");
    assert_eq!(cfg.pools[0].specs[0].zone, "local");
    assert_eq!(
        cfg.pools[0].specs[0].socket,
        Some("127.0.0.1:8069".parse().expect("addr"))
    );
    let servers = cfg.pools[0].servers.load();
    assert_eq!(servers[0].address, "127.0.0.1:8069");
    assert_eq!(servers[0].from, "127.0.0.1:8069");
    assert_eq!(cfg.pools[0].resolve_interval, DEFAULT_RESOLVE_INTERVAL);
    assert_eq!(cfg.pools[0].affinity, None);
    let c = &cfg.classes[0];
    assert!(c.alternatives.is_empty());
    assert_eq!(c.max_body, Some(DEFAULT_MAX_BODY));
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(cfg.server.max_request_header, 64 * 1024);
    assert_eq!(cfg.server.keepalive_timeout, DEFAULT_KEEPALIVE_TIMEOUT);
    assert_eq!(cfg.log.format, LogFormat::Human);
}

#[test]
fn keepalive_timeout_is_a_duration_longer_than_zero() {
    let cfg = parse(
        &format!("{MINIMAL}\n[server]\nkeepalive_timeout = \"15s\"\n"),
        "t.toml",
        None,
    )
    .expect("valid");
    assert_eq!(cfg.server.keepalive_timeout, Duration::from_secs(15));
    for bad in ["0s", "soon"] {
        let errs = errors(&format!(
            "{MINIMAL}\n[server]\nkeepalive_timeout = \"{bad}\"\n"
        ));
        assert!(
            has(&errs, "t.toml:13:21: server.keepalive_timeout: "),
            "{errs:?}"
        );
    }
}

#[test]
fn zone_override_wins() {
    let cfg = parse(MINIMAL, "t.toml", Some("eu-1b")).expect("valid");
    assert_eq!(cfg.network.zone, "eu-1b");
}

#[test]
fn host_names_are_kept_for_resolution() {
    let t = MINIMAL.replace("127.0.0.1:8069", "odoo-web.odoo.svc:8069");
    let cfg = parse(&t, "t.toml", None).expect("valid");
    assert_eq!(cfg.pools[0].specs[0].address, "odoo-web.odoo.svc:8069");
    assert_eq!(cfg.pools[0].specs[0].socket, None);
    // Resolved later (DNS refresh), not while compiling.
    assert!(cfg.pools[0].servers.load().is_empty());
    assert!(cfg.pools[0].has_host_names());
}

#[test]
fn every_error_has_file_line_col_and_path() {
    let t = r#"[listen]
http = ["nope"]
colour = "blue"

[pools.web]
servers = []

[[class]]
name = "a"
pool = "missing"
timeouts = { connect = "soon" }
"#;
    let errs = errors(t);
    assert_eq!(errs.len(), 5, "{errs:#?}");
    assert_eq!(errs[0], "t.toml:2:9: listen.http[0]: `nope` is not an IP:port address (e.g. \"0.0.0.0:8080\" or \"[::]:8080\")");
    assert!(
        errs[1].starts_with("t.toml:3:1: listen.colour: unknown field `colour`"),
        "{}",
        errs[1]
    );
    assert!(
        errs[2].starts_with("t.toml:6:11: pools.web.servers: "),
        "{}",
        errs[2]
    );
    assert!(
        errs[3].starts_with("t.toml:10:8: class[0].pool: unknown pool `missing`"),
        "{}",
        errs[3]
    );
    assert!(
        errs[4].starts_with("t.toml:11:24: class[0].timeouts.connect: `soon` is not a duration"),
        "{}",
        errs[4]
    );
}

#[test]
fn type_errors_do_not_hide_later_errors() {
    let t = format!(
        "{MINIMAL}\n[server]\nthreads = \"many\"\n[log]\nformat = \"xml\"\nlevle = \"info\"\n"
    );
    let errs = errors(&t);
    assert!(
        has(&errs, "server.threads: invalid type: string \"many\""),
        "{errs:#?}"
    );
    assert!(has(&errs, "log.format: `xml` is not one of"), "{errs:#?}");
    assert!(has(&errs, "log.levle: unknown field `levle`"), "{errs:#?}");
}

#[test]
fn syntax_errors_are_located() {
    let errs = errors("[listen\nhttp = [\"127.0.0.1:1\"]\n");
    assert!(!errs.is_empty());
    assert!(errs[0].starts_with("t.toml:1:"), "{errs:#?}");
}

#[test]
fn duplicate_names_unknown_pools_and_shadowed_classes() {
    let t = format!(
        r#"{MINIMAL}
[[class]]
name = "api"
pool = "web"
match = {{ path_prefix = "/xmlrpc/" }}

[[class]]
name = "api"
pool = "nowhere"
match = [{{ path = "/jsonrpc" }}]
"#
    );
    let errs = errors(&t);
    // `user` has no match: it takes everything, so both later classes can never match.
    assert!(
        has(
            &errs,
            "class[1]: class `api` can never match: class `user` before it takes all its requests"
        ),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            "class[2].name: duplicate class name `api` (first used by class[1])"
        ),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "class[2].pool: unknown pool `nowhere`"),
        "{errs:#?}"
    );
}

#[test]
fn prefix_shadowing_is_detected_and_narrower_rules_are_not() {
    let base = r#"
[listen]
http = ["127.0.0.1:8080"]
[pools.web]
servers = [{ address = "127.0.0.1:8069" }]
[[class]]
name = "integration"
pool = "web"
match = [{ path_prefix = "/xmlrpc/" }, { path = "/jsonrpc" }]
[[class]]
name = "admin"
pool = "web"
match = [{ path_prefix = "/xmlrpc/2/db" }, { path = "/jsonrpc", method = "POST" }]
"#;
    let errs = errors(base);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].contains("class[1]: class `admin` can never match: class `integration`"),
        "{errs:#?}"
    );
    // One alternative the earlier class does not cover: no error.
    let ok = base.replace(
        "{ path = \"/jsonrpc\", method = \"POST\" }",
        "{ path_prefix = \"/web/database/\" }",
    );
    assert_eq!(errors(&ok), Vec::<String>::new());
}

#[test]
fn match_conditions_are_validated() {
    let t = format!(
        r#"{}
[[class]]
name = "x"
pool = "web"
match = [{{ path = "nope" }}, {{ value_prefix = "a" }}, {{ method = "G ET" }}, {{ host = "a b" }}, {{ header = "bad header" }}, {{}},
         {{ jsonrpc_service = "db" }}, {{ path = "/jsonrpc", jsonrpc_service = "d b" }}]
security_headers = {{ hsts = "forever", referrer_policy = "sometimes", nosniff = "yes" }}
[[class]]
name = "user"
pool = "web"
"#,
        MINIMAL.replace("[[class]]\nname = \"user\"\npool = \"web\"\n", "")
    );
    let errs = errors(&t);
    for needle in [
        "class[0].match[0].path: must start with '/'",
        "class[0].match[1].value_prefix: needs `header`",
        "class[0].match[2].method: `G ET` is not an HTTP method",
        "class[0].match[3].host: `a b` is not a host name",
        "class[0].match[4].header: `bad header` is not a header name",
        "class[0].match[5]: an empty alternative matches every request",
        "class[0].match[6].jsonrpc_service: needs `path`",
        "class[0].match[7].jsonrpc_service: must be an Odoo service name",
        "class[0].security_headers.hsts: `forever` is not a Strict-Transport-Security value",
        "class[0].security_headers.referrer_policy: `sometimes` is not a Referrer-Policy",
        "class[0].security_headers.nosniff: ",
    ] {
        assert!(has(&errs, needle), "missing {needle}: {errs:#?}");
    }
}

#[test]
fn missing_sections_are_reported() {
    let errs = errors("");
    assert!(
        has(&errs, "t.toml:1:1: listen: missing section"),
        "{errs:#?}"
    );
    assert!(has(&errs, "pools: missing"), "{errs:#?}");
    assert!(has(&errs, "class: missing"), "{errs:#?}");
}

#[test]
fn sizes_and_limits() {
    assert_eq!(parse_size("128MiB"), Some(128 << 20));
    assert_eq!(parse_size("10 KB"), Some(10_000));
    assert_eq!(parse_size("7"), Some(7));
    assert_eq!(parse_size("1TiB"), None);
    assert_eq!(parse_size("99999999999999999999GiB"), None);
    let t = MINIMAL.replace("pool = \"web\"", "pool = \"web\"\nmax_body = \"unlimited\"");
    assert_eq!(
        parse(&t, "t", None).expect("valid").classes[0].max_body,
        None
    );
}

#[test]
fn hostile_input_never_panics() {
    for t in [
        "\u{0}",
        "[[[",
        "listen = 5",
        "[listen]\nhttp = 5",
        "[pools]\nweb = 1",
        "[pools.web]\nservers = [1, \"x\", {}]",
        "class = \"x\"",
        "[[class]]\nmatch = 5",
        "[[class]]\nmatch = [5]",
        "[[class]]\nmatch = [{ method = 5 }]",
        "[server]\nthreads = -1",
        "[server]\nthreads = 99999999999",
        "[server]\nmax_request_header = \"1B\"",
    ] {
        let _ = parse(t, "t", None);
    }
}

#[test]
fn allowlists_caps_and_audit_are_compiled_and_checked() {
    let t = MINIMAL.replace(
        "pool = \"web\"",
        "pool = \"web\"\nallow = [\"10.0.0.0/8\", \"::1\", \"nope\"]\nmax_in_flight = 0\naudit = true",
    );
    let errs = errors(&t);
    assert!(
        has(&errs, "class[0].allow[2]: `nope` is not an IP network"),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            "class[0].max_in_flight: must be between 1 and 1000000"
        ),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "audit.path: a class has `audit = true`"),
        "{errs:#?}"
    );
    let ok = t
        .replace(", \"nope\"", "")
        .replace("max_in_flight = 0", "max_in_flight = 16")
        + "\n[audit]\npath = \"audit.jsonl\"\n";
    let cfg = parse(&ok, "t", None).expect("valid");
    let c = &cfg.classes[0];
    assert_eq!(c.allow.as_ref().map(Vec::len), Some(2));
    assert_eq!(c.max_in_flight, Some(16));
    assert!(c.audit);
    assert_eq!(
        cfg.audit_path.as_deref(),
        Some(std::path::Path::new("audit.jsonl"))
    );
}

#[test]
fn rate_limits_are_compiled_and_checked() {
    let with = |rl: &str| {
        MINIMAL.replace(
            "pool = \"web\"",
            &format!("pool = \"web\"\nrate_limit = {rl}"),
        )
    };
    let cfg = parse(
        &with("{ key = \"client_ip\", rate = \"100/s\", burst = 200 }"),
        "t",
        None,
    )
    .expect("valid");
    let l = cfg.classes[0].rate_limit.as_ref().expect("limit");
    assert_eq!(
        (l.rate, l.period, l.burst),
        (100, Duration::from_secs(1), 200)
    );
    let cfg = parse(&with("{ key = \"global\", rate = \"10/min\" }"), "t", None).expect("valid");
    assert_eq!(
        cfg.classes[0].rate_limit.as_ref().map(|l| l.burst),
        Some(10)
    );
    let errs = errors(&with("{ key = \"ip\", rate = \"fast\", burst = 0 }"));
    assert!(
        has(&errs, "class[0].rate_limit.key: `ip` is not one of"),
        "{errs:#?}"
    );
    assert!(
        has(&errs, "class[0].rate_limit.rate: `fast` is not a rate"),
        "{errs:#?}"
    );
    assert!(
        has(
            &errs,
            "class[0].rate_limit.burst: must be between 1 and 1000000"
        ),
        "{errs:#?}"
    );
    let errs = errors(&with("{ rate = \"1/s\" }"));
    assert!(
        has(&errs, "class[0].rate_limit.key: missing key"),
        "{errs:#?}"
    );
}

#[test]
fn body_conditions_and_security_headers_compile() {
    let t = MINIMAL.replace(
        "[[class]]\nname = \"user\"\npool = \"web\"\n",
        r#"[[class]]
name = "admin"
match = [{ path = "/jsonrpc", jsonrpc_service = "db" }]
pool = "web"
[[class]]
name = "user"
pool = "web"
rate_limit = { key = "integration_client", rate = "5/s" }
security_headers = { hsts = "max-age=63072000; includeSubDomains; preload", nosniff = true, referrer_policy = "no-referrer, strict-origin-when-cross-origin", secure_session_cookie = true }
"#,
    );
    let cfg = parse(&t, "t.toml", None).expect("valid");
    assert_eq!(
        cfg.classes[0].alternatives[0].to_string(),
        "path=/jsonrpc jsonrpc_service=db"
    );
    let user = &cfg.classes[1];
    assert_eq!(
        user.rate_limit.as_ref().map(|l| l.spec.clone()),
        Some(crate::policy::ratelimit::KeySpec::IntegrationClient)
    );
    let h = &user.security_headers;
    assert!(h.nosniff && h.secure_session_cookie);
    assert_eq!(
        h.hsts.as_ref().map(|v| v.to_str().unwrap_or("")),
        Some("max-age=63072000; includeSubDomains; preload")
    );
    assert!(cfg.classes[0].security_headers.is_empty());
}

#[test]
fn live_state_carries_over_to_a_new_config_by_name() {
    use crate::policy::ratelimit::{Key, Verdict};
    use std::sync::atomic::Ordering;
    let limited = |rate: &str| {
        MINIMAL.replace(
            "[[class]]\nname = \"user\"\npool = \"web\"\n",
            &format!(
                "[[class]]\nname = \"user\"\npool = \"web\"\nrate_limit = {{ key = \"client_ip\", rate = \"{rate}\", burst = 2 }}\n"
            ),
        )
    };
    let old = parse(&limited("10/min"), "t.toml", None).expect("valid");
    let client = Key::Ip("192.0.2.7".parse().expect("ip"));
    let limit = old.classes[0].rate_limit.clone().expect("limit");
    assert_eq!(limit.check(&client), Verdict::Allowed);
    assert_eq!(limit.check(&client), Verdict::Allowed);
    assert!(matches!(limit.check(&client), Verdict::Limited { .. }));
    old.classes[0].in_flight.store(3, Ordering::SeqCst);
    old.pools[0].next.store(41, Ordering::SeqCst);

    // Same limit: the same buckets, still empty for this client.
    let mut same = parse(&limited("10/min"), "t.toml", None).expect("valid");
    same.adopt_state(&old);
    let l = same.classes[0].rate_limit.as_ref().expect("limit");
    assert!(matches!(l.check(&client), Verdict::Limited { .. }));
    assert_eq!(same.classes[0].in_flight.load(Ordering::SeqCst), 3);
    assert_eq!(same.pools[0].next.load(Ordering::SeqCst), 41);

    // A changed limit starts afresh.
    let mut changed = parse(&limited("20/min"), "t.toml", None).expect("valid");
    changed.adopt_state(&old);
    let l = changed.classes[0].rate_limit.as_ref().expect("limit");
    assert_eq!(l.check(&client), Verdict::Allowed);
    // A renamed class has nothing to take over.
    let mut renamed = parse(
        &limited("10/min").replace("name = \"user\"", "name = \"users\""),
        "t.toml",
        None,
    )
    .expect("valid");
    renamed.adopt_state(&old);
    assert_eq!(renamed.classes[0].in_flight.load(Ordering::SeqCst), 0);
}

#[test]
fn pool_balancing_and_health_checks() {
    use crate::upstream::Balance;
    let good = MINIMAL.replace(
        "servers = [{ address = \"127.0.0.1:8069\" }]",
        r#"servers = [{ address = "127.0.0.1:8069", zone = "b", drain = true }]
balance = "least_conn"
failover_zones = ["b", "c"]
host = "erp.internal"
health_check = { tcp = true, interval = "1s", timeout = "300ms", healthy_after = 1, unhealthy_after = 5 }"#,
    );
    let cfg = parse(&good, "t.toml", None).expect("valid");
    let p = &cfg.pools[0];
    assert_eq!(p.balance, Balance::LeastConn);
    assert_eq!(p.failover_zones, vec!["b".to_string(), "c".to_string()]);
    assert_eq!(p.host.as_deref(), Some("erp.internal"));
    assert_eq!(p.health.path, None);
    assert_eq!(p.health.interval, std::time::Duration::from_secs(1));
    assert_eq!((p.health.healthy_after, p.health.unhealthy_after), (1, 5));
    assert!(p.specs[0].drain);
    assert!(p.servers.load()[0].drain);
    // Defaults fit Odoo's HTTP workers.
    let d = &parse(MINIMAL, "t.toml", None).expect("valid").pools[0];
    assert_eq!(d.balance, Balance::RoundRobin);
    assert_eq!(d.health.path.as_deref(), Some("/web/health"));
    assert_eq!(d.health.status, 200);

    let bad = MINIMAL.replace(
        "servers = [{ address = \"127.0.0.1:8069\" }]",
        r#"servers = [{ address = "127.0.0.1:8069", drain = "yes" }]
balance = "random"
failover_zones = ["b c"]
health_check = { path = "/web/health", tcp = true, status = 999, healthy_after = 0, interval = "soon" }"#,
    );
    let errs = errors(&bad);
    for needle in [
        "pools.web.servers[0].drain: ",
        "pools.web.balance: `random` is not one of",
        "pools.web.failover_zones[0]: ",
        "pools.web.health_check.path: `path` and `tcp = true` exclude each other",
        "pools.web.health_check.status: must be an HTTP status",
        "pools.web.health_check.healthy_after: must be between 1 and 100",
        "pools.web.health_check.interval: ",
    ] {
        assert!(has(&errs, needle), "missing {needle}: {errs:#?}");
    }
}

#[test]
fn retries_are_off_and_attempts_bounded_by_default_and_checked() {
    let cfg = parse(MINIMAL, "t.toml", None).expect("valid");
    assert!(!cfg.classes[0].retry_idempotent);
    assert_eq!(cfg.pools[0].max_attempts, DEFAULT_MAX_ATTEMPTS);
    let t = MINIMAL
        .replace("pool = \"web\"", "pool = \"web\"\nretry_idempotent = true")
        .replace("servers = [{", "max_attempts = 5\nservers = [{");
    let cfg = parse(&t, "t.toml", None).expect("valid");
    assert!(cfg.classes[0].retry_idempotent);
    assert_eq!(cfg.pools[0].max_attempts, 5);
    for bad in ["0", "17", "-1"] {
        let errs = errors(&t.replace("max_attempts = 5", &format!("max_attempts = {bad}")));
        assert!(
            has(
                &errs,
                "t.toml:6:16: pools.web.max_attempts: must be between 1 and 16"
            ),
            "{errs:#?}"
        );
    }
}

#[test]
fn affinity_and_resolve_interval_are_compiled_and_checked() {
    let t = MINIMAL.replace(
        "servers = [{",
        "affinity = \"cookie:session_id\"\nresolve_interval = \"30s\"\nservers = [{",
    );
    let cfg = parse(&t, "t.toml", None).expect("valid");
    assert_eq!(cfg.pools[0].affinity.as_deref(), Some("session_id"));
    assert_eq!(cfg.pools[0].resolve_interval, Duration::from_secs(30));
    let bad = t
        .replace("cookie:session_id", "session_id")
        .replace("\"30s\"", "\"soon\"");
    let errs = errors(&bad);
    assert!(
        has(
            &errs,
            "t.toml:6:12: pools.web.affinity: `session_id` is not `cookie:NAME`"
        ),
        "{errs:#?}"
    );
    assert!(has(&errs, "pools.web.resolve_interval:"), "{errs:#?}");
    assert!(has(
        &errors(&t.replace("cookie:session_id", "cookie:a b")),
        "pools.web.affinity"
    ));
}

#[test]
fn maintenance_windows_are_compiled_and_switch_on_and_off_by_time() {
    assert_eq!(parse_time("2026-12-31T18:00Z"), Some(1_798_740_000));
    assert_eq!(parse_time("2026-12-31T18:00:00Z"), Some(1_798_740_000));
    assert_eq!(parse_time("2026-12-31T19:00+01:00"), Some(1_798_740_000));
    assert_eq!(parse_time("2026-12-31 18:00"), None);
    assert_eq!(parse_time("tomorrow"), None);
    let t = format!(
        "{MINIMAL}\n[maintenance]\nwindows = [{{ start = \"2026-12-31T18:00Z\", end = \"2027-01-01T02:00Z\" }}]\nallow = [\"10.10.0.0/16\"]\n"
    );
    let cfg = parse(&t, "t.toml", None).expect("valid");
    let m = cfg.maintenance.as_ref().expect("maintenance");
    assert_eq!(m.active_at(1_798_739_999), None);
    assert_eq!(m.active_at(1_798_740_000), Some(Some(1_798_768_800)));
    assert_eq!(m.active_at(1_798_768_800), None);
    // With windows it may be on: the time decides.
    assert!(m.may_be_on());
    assert!(m.allows("10.10.1.1".parse().expect("ip")));
    assert!(!m.allows("10.11.1.1".parse().expect("ip")));
    // The user class is blocked by default, others pass unless marked.
    assert!(cfg.classes[0].maintenance_block);
    let on = MINIMAL.replace(
        "name = \"user\"",
        "name = \"reports\"\nmaintenance = \"block\"",
    ) + "\n[maintenance]\nenabled = true\n";
    let cfg = parse(&on, "t.toml", None).expect("valid");
    assert!(cfg.classes[0].maintenance_block);
    assert_eq!(
        cfg.maintenance.as_ref().and_then(|m| m.active_at(0)),
        Some(None)
    );
    assert!(cfg.maintenance.as_ref().is_some_and(|m| m.may_be_on()));
    // Switched off, without windows: never on, whatever the time (no clock read for it).
    let off = format!("{MINIMAL}\n[maintenance]\nenabled = false\n");
    let cfg = parse(&off, "t.toml", None).expect("valid");
    let m = cfg.maintenance.as_ref().expect("maintenance");
    assert!(!m.may_be_on());
    assert_eq!(m.active_at(0), None);
    assert_eq!(m.active_at(1_798_740_000), None);
    let bad = format!(
        "{}\n[maintenance]\nwindows = [{{ start = \"2027-01-01T02:00Z\", end = \"2026-12-31T18:00Z\" }}, {{ start = \"soon\", end = \"2027-01-01T02:00Z\" }}]\npage = \"/nonexistent/page.html\"\n",
        MINIMAL.replace("pool = \"web\"", "pool = \"web\"\nmaintenance = \"maybe\"")
    );
    let errs = errors(&bad);
    for needle in [
        "maintenance.windows[0]: `end` must be after `start`",
        "maintenance.windows[1].start: `soon` is not a time",
        "maintenance.page: cannot read /nonexistent/page.html",
        "class[0].maintenance: `maybe` is not \"block\" or \"pass\"",
    ] {
        assert!(has(&errs, needle), "{needle}: {errs:#?}");
    }
}

#[test]
fn a_host_condition_in_any_class_makes_classification_read_the_host() {
    let plain = parse(MINIMAL, "t.toml", None).expect("valid");
    assert!(!plain.classes_match_host);
    let default = parse(
        include_str!("../../../config/erpgate.toml"),
        "erpgate.toml",
        None,
    )
    .expect("valid");
    assert!(!default.classes_match_host);
    let by_host = MINIMAL.replace(
        "[[class]]\nname = \"user\"",
        "[[class]]\nname = \"portal\"\npool = \"web\"\nmatch = [{ path_prefix = \"/my\" }, { host = \"portal.example.com\" }]\n\n[[class]]\nname = \"user\"",
    );
    let cfg = parse(&by_host, "t.toml", None).expect("valid");
    assert!(cfg.classes_match_host);
}
