use super::*;

fn read(body: &[u8]) -> Service {
    let mut s = Scanner::new();
    s.feed(body);
    let whole = s.finish();
    // Fed in pieces of every small size, and byte by byte, the verdict is the same.
    for size in 1..=7 {
        let mut p = Scanner::new();
        for piece in body.chunks(size) {
            p.feed(piece);
        }
        assert_eq!(p.finish(), whole, "pieces of {size} bytes");
    }
    whole
}

fn db() -> Service {
    Service::Name(b"db".to_vec(), false)
}

fn object() -> Service {
    Service::Name(b"object".to_vec(), false)
}

#[test]
fn plain_calls() {
    let list = br#"{"jsonrpc":"2.0","method":"call","params":{"service":"db","method":"list","args":[]},"id":1}"#;
    assert_eq!(read(list), db());
    let kw = br#"{"jsonrpc": "2.0", "method": "call", "params": {"service": "object", "method": "execute_kw", "args": ["erp", 2, "pw", "res.partner", "search", [[]]]}, "id": null}"#;
    assert_eq!(read(kw), object());
    assert!(read(list).may_be("db"));
    assert!(!read(kw).may_be("db"));
}

#[test]
fn whitespace_and_key_order() {
    let body = b"\r\n\t {\n\t\"id\" : 7 ,\"params\"\n:\n{ \"args\" : [ \"x\" , 1.5e3 , true , null ] ,\r\"method\":\"drop\" , \"service\"\t:\t\"db\" } , \"method\" : \"call\" }  \n";
    assert_eq!(read(body), db());
}

#[test]
fn unicode_escapes_in_keys_and_values() {
    assert_eq!(read(br#"{"params":{"service":"\u0064b"}}"#), db());
    assert_eq!(read(br#"{"params":{"service":"\u0064\u0062"}}"#), db());
    assert_eq!(read(br#"{"params":{"\u0073ervice":"db"}}"#), db());
    assert_eq!(read(br#"{"\u0070arams":{"service":"d\u0062"}}"#), db());
    assert!(!read(br#"{"params":{"service":"\u0044B"}}"#).may_be("db"));
    // Upper-case hex digits decode too.
    assert_eq!(
        read(br#"{"params":{"service":"\u006F\u0062ject"}}"#),
        object()
    );
}

#[test]
fn the_last_duplicate_wins_like_python() {
    assert_eq!(
        read(br#"{"params":{"service":"object","service":"db"}}"#),
        db()
    );
    assert_eq!(
        read(br#"{"params":{"service":"db","service":"object"}}"#),
        object()
    );
    assert_eq!(
        read(br#"{"params":{"service":"object"},"params":{"service":"db"}}"#),
        db()
    );
    assert_eq!(
        read(br#"{"params":{"service":"db"},"params":{"service":"object"}}"#),
        object()
    );
    // A later params without service: Odoo calls nothing.
    assert_eq!(
        read(br#"{"params":{"service":"db"},"params":{}}"#),
        Service::Absent
    );
}

#[test]
fn service_inside_other_values_does_not_count() {
    let body = br#"{"params":{"args":[{"service":"db"},"{\"service\":\"db\"}"],"x":{"params":{"service":"db"}},"service":"object"}}"#;
    assert_eq!(read(body), object());
    let quoted = br#"{"params":{"note":"\"service\": \"db\" \\","service":"common"}}"#;
    assert_eq!(read(quoted), Service::Name(b"common".to_vec(), false));
}

#[test]
fn padding_before_the_service_key() {
    let mut body = br#"{"params":{"args":[""#.to_vec();
    body.extend(std::iter::repeat_n(b'a', 300_000));
    body.extend_from_slice(br#""],"service":"db"}}"#);
    assert_eq!(read(&body), db());
}

#[test]
fn shapes_python_would_turn_into_a_call_are_doubts() {
    // dict([["service","db"]]) is {"service": "db"} in Python.
    assert_eq!(
        read(br#"{"params":[["service","db"],["method","list"],["args",[]]]}"#),
        Service::Doubt
    );
    assert_eq!(read(br#"{"params":{"service":["db"]}}"#), Service::Doubt);
    assert_eq!(read(br#"{"params":{"service":null}}"#), Service::Doubt);
    assert_eq!(read(br#"["db"]"#), Service::Doubt);
    assert_eq!(read(br#""db""#), Service::Doubt);
    assert_eq!(read(b"12"), Service::Doubt);
}

#[test]
fn anything_unreadable_is_a_doubt() {
    for body in [
        &b""[..],
        b"   ",
        b"{",
        br#"{"params":{"service":"db"}"#,
        br#"{"params":{"service":"db"}} x"#,
        br#"{"params":{"service":"db"}},"#,
        b"\xef\xbb\xbf{\"params\":{\"service\":\"object\"}}",
        br#"{'params':{'service':'object'}}"#,
        br#"{"params":{"service":"obj\ect"}}"#,
        br#"{"params":{"service":"ob\u00jject"}}"#,
        b"{\"params\":{\"service\":\"obj\nect\"}}",
        br#"{"params":{"service":"object",}}"#,
        br#"{"params" {"service":"object"}}"#,
        br#"{"params":{"service":"object"]}"#,
        br#"{"params":{"n":tru,"service":"object"}}"#,
        br#"{"params":{"n":1"x","service":"object"}}"#,
        b"\xff\xfe{\x00}\x00",
        b"\x1f\x8b\x08\x00",
    ] {
        assert_eq!(
            read(body),
            Service::Doubt,
            "{:?}",
            String::from_utf8_lossy(body)
        );
    }
}

#[test]
fn python_literals_and_numbers_are_read() {
    let body = br#"{"params":{"a":[NaN,Infinity,-Infinity,-0.5E+3,0,true,false,null,123456789012345678901234567890],"service":"object"}}"#;
    assert_eq!(read(body), object());
}

#[test]
fn nesting_is_bounded() {
    let mut body = b"{\"params\":{\"a\":".to_vec();
    body.extend(std::iter::repeat_n(b'[', 100_000));
    assert_eq!(read(&body), Service::Doubt);
    let mut s = Scanner::new();
    s.feed(&body);
    assert!(s.stack.len() <= MAX_DEPTH);
}

#[test]
fn so_far_reports_a_partial_body() {
    let mut s = Scanner::new();
    s.feed(br#"{"params":{"service":"db","args":["#);
    assert_eq!(s.so_far(), db());
    assert_eq!(s.finish(), Service::Doubt);
    s.feed(br#"1]}}"#);
    assert_eq!(s.finish(), db());
    assert_eq!(s.fed(), 38);
}

#[test]
fn long_service_names_match_nothing() {
    let long = format!(r#"{{"params":{{"service":"db{}"}}}}"#, "x".repeat(100));
    let s = read(long.as_bytes());
    assert!(matches!(s, Service::Name(_, true)));
    assert!(!s.may_be("db"));
}

#[test]
fn identity_is_database_and_user_never_the_password() {
    let id = |body: &str| {
        let mut s = Scanner::new();
        s.feed(body.as_bytes());
        s.identity()
    };
    let a = id(
        r#"{"params":{"service":"object","method":"execute_kw","args":["erp",2,"secret","res.partner","read",[]]}}"#,
    );
    let same_other_password = id(
        r#"{"params":{"service":"object","method":"execute_kw","args":["erp",2,"other","res.partner","read",[]]}}"#,
    );
    let other_user = id(
        r#"{"params":{"service":"object","method":"execute_kw","args":["erp",7,"secret","res.partner","read",[]]}}"#,
    );
    let other_db = id(
        r#"{"params":{"service":"object","method":"execute_kw","args":["erp2",2,"secret","res.partner","read",[]]}}"#,
    );
    let login = id(
        r#"{"params":{"service":"common","method":"login","args":["erp","ap@example.com","secret"]}}"#,
    );
    assert!(a.is_some() && login.is_some());
    assert_eq!(a, same_other_password);
    assert_ne!(a, other_user);
    assert_ne!(a, other_db);
    assert_ne!(a, login);
    assert_eq!(
        id(r#"{"params":{"service":"object","args":["erp"]}}"#),
        None
    );
    assert_eq!(id(r#"{"params":{"service":"db","method":"list"}}"#), None);
    // Read from a prefix: the first arguments come early.
    assert_eq!(
        id(r#"{"params":{"service":"object","method":"execute_kw","args":["erp",2,"sec"#),
        a
    );
}
