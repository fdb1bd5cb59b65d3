use super::*;
use http::HeaderValue;

fn alt(conds: Vec<Cond>) -> Alternative {
    Alternative::new(conds)
}

fn facts<'a>(
    method: &'a Method,
    path: &'a str,
    host: Option<&'a str>,
    headers: &'a HeaderMap,
) -> RequestFacts<'a> {
    RequestFacts {
        method,
        path,
        host,
        headers,
        present: crate::headers::Present::ANY,
        jsonrpc: None,
    }
}

/// The default config's classes: admin, longpoll, integration, user.
fn default_classes() -> Vec<Vec<Alternative>> {
    vec![
        vec![
            alt(vec![Cond::PathPrefix("/web/database/".into())]),
            alt(vec![Cond::PathPrefix("/xmlrpc/2/db".into())]),
            alt(vec![Cond::PathPrefix("/xmlrpc/db".into())]),
            alt(vec![
                Cond::Path("/jsonrpc".into()),
                Cond::JsonRpcService("db".into()),
            ]),
        ],
        vec![
            alt(vec![Cond::PathPrefix("/websocket".into())]),
            alt(vec![Cond::PathPrefix("/longpolling/".into())]),
        ],
        vec![
            alt(vec![Cond::PathPrefix("/xmlrpc/".into())]),
            alt(vec![Cond::Path("/jsonrpc".into())]),
            alt(vec![Cond::PathPrefix("/json/2/".into())]),
            alt(vec![Cond::header(
                HeaderName::from_static("authorization"),
                Some("bearer ".into()),
            )]),
        ],
        vec![],
    ]
}

fn class_of(method: &str, raw_path: &str, headers: &HeaderMap) -> Option<usize> {
    let classes = default_classes();
    let m = Method::from_bytes(method.as_bytes()).expect("method");
    let path = normalize_path(raw_path);
    classify(
        classes.iter().map(|c| c.as_slice()),
        &facts(&m, &path, None, headers),
    )
    .map(|(class, _)| class)
}

#[test]
fn default_classes_route_odoo_paths() {
    let h = HeaderMap::new();
    assert_eq!(class_of("GET", "/web/database/manager", &h), Some(0));
    assert_eq!(class_of("POST", "/xmlrpc/2/db", &h), Some(0));
    assert_eq!(class_of("POST", "/xmlrpc/db", &h), Some(0));
    assert_eq!(class_of("GET", "/websocket", &h), Some(1));
    assert_eq!(class_of("POST", "/longpolling/poll", &h), Some(1));
    assert_eq!(class_of("POST", "/xmlrpc/2/object", &h), Some(2));
    assert_eq!(class_of("POST", "/jsonrpc", &h), Some(2));
    assert_eq!(
        class_of("POST", "/json/2/res.partner/search_read", &h),
        Some(2)
    );
    assert_eq!(class_of("GET", "/odoo/action-1", &h), Some(3));
    assert_eq!(class_of("GET", "/jsonrpcx", &h), Some(3));
    assert_eq!(class_of("GET", "/web/databases", &h), Some(3));
}

#[test]
fn bearer_header_is_integration_in_any_case() {
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_static("Bearer abc"));
    assert_eq!(class_of("GET", "/odoo", &h), Some(2));
    h.insert("authorization", HeaderValue::from_static("Basic abc"));
    assert_eq!(class_of("GET", "/odoo", &h), Some(3));
}

#[test]
fn encoded_and_dotted_paths_cannot_dodge_the_admin_class() {
    let h = HeaderMap::new();
    for p in [
        "/web/%64atabase/manager",
        "/web/%2564atabase/manager/../manager",
        "//web/database/manager",
        "/web/./database/manager",
        "/web/static/../database/manager",
        "/web/database/../database/drop",
        "/web\\database\\manager",
        "/xmlrpc/2/%64b",
        "/%78mlrpc/db",
    ] {
        let expect = if p.contains("%25") { Some(3) } else { Some(0) };
        assert_eq!(class_of("POST", p, &h), expect, "{p}");
    }
}

#[test]
fn normalize_path_forms() {
    assert!(matches!(normalize_path("/web/login"), Cow::Borrowed(_)));
    assert_eq!(normalize_path("/a//b/"), "/a/b/");
    assert_eq!(normalize_path("/a/./b/.."), "/a/");
    assert_eq!(normalize_path("/../../etc"), "/etc");
    assert_eq!(normalize_path("/%2e%2e/x"), "/x");
    assert_eq!(normalize_path("/bad%zz"), "/bad%zz");
    assert_eq!(normalize_path("/trail%"), "/trail%");
    assert_eq!(normalize_path("/%ff"), "/\u{fffd}");
    assert_eq!(normalize_path("*"), "/*");
    assert_eq!(normalize_path("/a\\..\\b"), "/b");
    assert_eq!(normalize_path("/a/."), "/a/");
    assert_eq!(normalize_path("/a/b//"), "/a/b/");
    // Paths with nothing to change are borrowed; any of the marks makes a new one.
    for clean in [
        "/",
        "/web/login",
        "/a.b/c.d",
        "/web/static/x.js",
        "/a-b_c~d",
    ] {
        assert!(matches!(normalize_path(clean), Cow::Borrowed(_)), "{clean}");
    }
    for marked in ["/a%41", "/a\\b", "/a//b", "/a/.b", "//", "a/b", ""] {
        assert!(matches!(normalize_path(marked), Cow::Owned(_)), "{marked}");
    }
}

#[test]
fn methods_hosts_and_headers() {
    let classes = [
        vec![alt(vec![
            Cond::Method(vec![Method::POST]),
            Cond::Host(HostPattern::parse("*.example.com").expect("pattern")),
        ])],
        vec![alt(vec![Cond::Host(
            HostPattern::parse("Erp.Example.com").expect("pattern"),
        )])],
        vec![alt(vec![Cond::header(
            HeaderName::from_static("x-tenant"),
            None,
        )])],
    ];
    let mut h = HeaderMap::new();
    let c = |m: &Method, host: Option<&str>, h: &HeaderMap| {
        classify(
            classes.iter().map(|c| c.as_slice()),
            &facts(m, "/", host, h),
        )
        .map(|(class, _)| class)
    };
    assert_eq!(c(&Method::POST, Some("a.example.com"), &h), Some(0));
    assert_eq!(c(&Method::GET, Some("erp.example.com"), &h), Some(1));
    assert_eq!(c(&Method::POST, Some("example.com"), &h), None);
    h.insert("x-tenant", HeaderValue::from_static("acme"));
    assert_eq!(c(&Method::GET, None, &h), Some(2));
}

#[test]
fn request_host_forms() {
    assert_eq!(
        request_host(None, Some(b"Erp.Example.com:8443")).as_deref(),
        Some("erp.example.com")
    );
    assert_eq!(
        request_host(None, Some(b"[::1]:80")).as_deref(),
        Some("::1")
    );
    assert_eq!(
        request_host(Some("h.example"), Some(b"other")).as_deref(),
        Some("h.example")
    );
    assert_eq!(request_host(None, None), None);
}

#[test]
fn coverage_between_alternatives() {
    let a = alt(vec![Cond::PathPrefix("/xmlrpc/".into())]);
    let b = alt(vec![
        Cond::PathPrefix("/xmlrpc/2/db".into()),
        Cond::Method(vec![Method::POST]),
    ]);
    assert!(a.covers(&b));
    assert!(!b.covers(&a));
    let bearer = alt(vec![Cond::header(
        HeaderName::from_static("authorization"),
        Some("bearer ".into()),
    )]);
    let any_auth = alt(vec![Cond::header(
        HeaderName::from_static("authorization"),
        None,
    )]);
    assert!(any_auth.covers(&bearer));
    assert!(!bearer.covers(&any_auth));
}

#[test]
fn the_matching_alternative_is_reported_and_printable() {
    let classes = default_classes();
    let h = HeaderMap::new();
    let m = Method::POST;
    let hit = classify(
        classes.iter().map(|c| c.as_slice()),
        &facts(&m, "/xmlrpc/db", None, &h),
    );
    assert_eq!(hit, Some((0, Some(2))));
    assert_eq!(classes[0][2].to_string(), "path_prefix=/xmlrpc/db");
    let catch_all = classify(
        classes.iter().map(|c| c.as_slice()),
        &facts(&m, "/odoo", None, &h),
    );
    assert_eq!(catch_all, Some((3, None)));
    assert_eq!(
        classes[2][3].to_string(),
        "header=authorization value_prefix=\"bearer \""
    );
}

#[test]
fn jsonrpc_db_calls_need_the_body_and_then_are_admin() {
    let classes = default_classes();
    let h = HeaderMap::new();
    let post = Method::POST;
    let class = |path: &str, body: Option<&Service>| {
        let mut f = facts(&post, path, None, &h);
        f.jsonrpc = body;
        let class = classify(classes.iter().map(|c| c.as_slice()), &f);
        let head = body
            .is_none()
            .then(|| classify_head(classes.iter().map(|c| c.as_slice()), &f));
        (head, class)
    };
    // Before the body is read: the body decides.
    assert_eq!(class("/jsonrpc", None).0, Some(OnHead::NeedsBody));
    // Other paths never wait for their body, and get the class `classify` gives them.
    for path in [
        "/xmlrpc/2/object",
        "/web/database/drop",
        "/web/login",
        "/json/2/x",
    ] {
        let (head, class) = class(path, None);
        assert_eq!(head, Some(OnHead::Class(class)), "{path}");
    }
    assert_eq!(class("/web/login", None).1, Some((3, None)));
    let db = Service::Name(b"db".to_vec(), false);
    let object = Service::Name(b"object".to_vec(), false);
    assert_eq!(class("/jsonrpc", Some(&db)).1, Some((0, Some(3))));
    assert_eq!(
        class("/jsonrpc", Some(&Service::Doubt)).1,
        Some((0, Some(3)))
    );
    assert_eq!(class("/jsonrpc", Some(&object)).1, Some((2, Some(1))));
    assert_eq!(
        class("/jsonrpc", Some(&Service::Absent)).1,
        Some((2, Some(1)))
    );
    assert_eq!(
        classes[0][3].to_string(),
        "path=/jsonrpc jsonrpc_service=db"
    );
    // A head-only alternative of an earlier class wins without the body.
    let earlier = [
        vec![alt(vec![Cond::Path("/jsonrpc".into())])],
        vec![alt(vec![
            Cond::Path("/jsonrpc".into()),
            Cond::JsonRpcService("db".into()),
        ])],
    ];
    let f = facts(&post, "/jsonrpc", None, &h);
    assert_eq!(
        classify_head(earlier.iter().map(|c| c.as_slice()), &f),
        OnHead::Class(Some((0, Some(0))))
    );
    // The body condition is part of coverage: a plain /jsonrpc alternative covers it.
    assert!(earlier[0][0].covers(&earlier[1][0]));
    assert!(!earlier[1][0].covers(&earlier[0][0]));
}

/// A header condition on a field erpgate notes while parsing is not looked up in a request
/// noted without it, and is where the fields were not noted; one on another field always is.
#[test]
fn header_conditions_on_noted_fields_skip_requests_noted_without_them() {
    use crate::headers::{Looked, Present};
    let bearer = Cond::header(
        HeaderName::from_static("authorization"),
        Some("bearer ".into()),
    );
    let tenant = Cond::header(HeaderName::from_static("x-tenant"), None);
    assert!(matches!(
        bearer,
        Cond::Header {
            looked: Some(Looked::Authorization),
            ..
        }
    ));
    assert!(matches!(tenant, Cond::Header { looked: None, .. }));
    let mut h = HeaderMap::new();
    h.insert("authorization", HeaderValue::from_static("Bearer k"));
    h.insert("x-tenant", HeaderValue::from_static("t"));
    let m = Method::GET;
    let mut noted = Present::NONE;
    noted.note(b"authorization");
    for (present, expected) in [(Present::ANY, true), (noted, true), (Present::NONE, false)] {
        let f = RequestFacts {
            present,
            ..facts(&m, "/", None, &h)
        };
        assert_eq!(bearer.matches(&f), expected, "{present:?}");
        assert!(tenant.matches(&f), "{present:?}");
    }
}
