//! Header rules: the fields that concern one connection only (never passed on), and the
//! `session_id` cookie flags Odoo's deployment guide sets in nginx (`secure; samesite=lax`).

use http::header::HeaderName;
use pingora::http::RequestHeader;

/// Request fields erpgate looks up in every request: most requests have none of them but
/// `Connection` (a browser) or `Content-Length` (a body). `Authorization` is the default
/// config's header condition (a bearer key makes a request an integration's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Looked {
    Authorization,
    Connection,
    ContentLength,
    XForwardedFor,
    XForwardedHost,
    XForwardedProto,
    XRequestId,
}

impl Looked {
    pub const fn name(self) -> HeaderName {
        match self {
            Looked::Authorization => http::header::AUTHORIZATION,
            Looked::Connection => http::header::CONNECTION,
            Looked::ContentLength => http::header::CONTENT_LENGTH,
            Looked::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
            Looked::XForwardedHost => HeaderName::from_static("x-forwarded-host"),
            Looked::XForwardedProto => HeaderName::from_static("x-forwarded-proto"),
            Looked::XRequestId => HeaderName::from_static("x-request-id"),
        }
    }

    /// The one whose name this is, in any case.
    pub fn named(name: &[u8]) -> Option<Looked> {
        // Their lengths all differ: the length says which it can be.
        let l = match name.len() {
            10 => Looked::Connection,
            12 => Looked::XRequestId,
            13 => Looked::Authorization,
            14 => Looked::ContentLength,
            15 => Looked::XForwardedFor,
            16 => Looked::XForwardedHost,
            17 => Looked::XForwardedProto,
            _ => return None,
        };
        l.name()
            .as_str()
            .as_bytes()
            .eq_ignore_ascii_case(name)
            .then_some(l)
    }
}

/// Which of the [`Looked`] fields a request may have. erpgate's own path notes them in its one
/// pass over the request's fields as it parses them, so looking up one the request does not
/// have hashes nothing (each lookup hashed the name and probed the header map: about 130
/// instructions, 7 of them for a request without any of these fields). [`Present::ANY`]
/// where they were not noted (Pingora's path): every lookup is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Present(u8);

impl Present {
    pub const ANY: Present = Present(u8::MAX);
    pub const NONE: Present = Present(0);

    /// Notes a field of the request by its name (in any case).
    pub fn note(&mut self, name: &[u8]) {
        if let Some(l) = Looked::named(name) {
            self.0 |= 1 << l as u8;
        }
    }

    pub fn may_have(self, l: Looked) -> bool {
        self.0 & (1 << l as u8) != 0
    }

    /// The fields `headers` has, noted one by one as erpgate's parser notes them (for
    /// requests made some other way: tests and benches).
    pub fn of(headers: &http::HeaderMap) -> Present {
        let mut present = Present::NONE;
        for name in headers.keys() {
            present.note(name.as_str().as_bytes());
        }
        present
    }

    /// The first `l` field of `headers` (a request's, noted in `self`).
    pub fn get(self, headers: &http::HeaderMap, l: Looked) -> Option<&http::HeaderValue> {
        if self.may_have(l) {
            headers.get(l.name())
        } else {
            None
        }
    }

    /// The `l` fields of `headers` (a request's, noted in `self`).
    pub fn get_all(
        self,
        headers: &http::HeaderMap,
        l: Looked,
    ) -> impl DoubleEndedIterator<Item = &[u8]> {
        self.may_have(l)
            .then(|| headers.get_all(l.name()))
            .into_iter()
            .flatten()
            .map(|v| v.as_bytes())
    }
}

/// Fields that concern one connection only, never passed on (RFC 9110, 7.6.1), besides those
/// the client's `Connection` names.
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
];

/// Fields a client's `Connection` may not take away.
const PROTECTED: [&str; 4] = [
    "host",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// The comma-separated tokens of every `name` field, trimmed.
pub fn tokens(req: &RequestHeader, name: HeaderName) -> impl Iterator<Item = &[u8]> {
    tokens_of(req.headers.get_all(name))
}

/// The comma-separated tokens of these field values, trimmed.
pub fn tokens_of(
    values: http::header::GetAll<'_, http::HeaderValue>,
) -> impl Iterator<Item = &[u8]> {
    values.into_iter().flat_map(|v| tokens_in(v.as_bytes()))
}

/// The comma-separated tokens of one field value, trimmed.
pub fn tokens_in(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|b| *b == b',').map(<[u8]>::trim_ascii)
}

/// Removes from `up`, the request as it goes to Odoo, the fields that concern the client's
/// connection only: the standard ones and those `from` (the client's request) names in its
/// `Connection`.
pub fn strip_hop_by_hop(up: &mut RequestHeader, from: &RequestHeader) {
    let hop_by_hop = HopByHop::of(from);
    let hop: Vec<HeaderName> = up
        .headers
        .keys()
        .filter(|name| hop_by_hop.is(name.as_str()))
        .cloned()
        .collect();
    for name in &hop {
        up.remove_header(name);
    }
}

/// Most `Connection` tokens [`HopByHop`] keeps (more are read again for each field).
const CONNECTION_TOKENS: usize = 8;

/// Which fields of a request concern the client's connection only, for a check of each of
/// its fields: its `Connection` is read once, when a field is not decided by its name alone
/// (a lookup for each field was 5 % of the instructions of a browser's request).
pub struct HopByHop<'a> {
    from: &'a RequestHeader,
    present: Present,
    /// The `Connection` tokens once read; `None` inside when there are more than
    /// [`CONNECTION_TOKENS`] (read again for each field then).
    named: std::cell::OnceCell<Option<Tokens<'a>>>,
}

type Tokens<'a> = ([&'a [u8]; CONNECTION_TOKENS], usize);

impl<'a> HopByHop<'a> {
    pub fn of(from: &'a RequestHeader) -> Self {
        Self::noted(from, Present::ANY)
    }

    /// As [`HopByHop::of`], for a request whose [`Looked`] fields are noted in `present`.
    pub fn noted(from: &'a RequestHeader, present: Present) -> Self {
        HopByHop {
            from,
            present,
            named: std::cell::OnceCell::new(),
        }
    }

    /// Whether the field `name` (lower case) is one of them: a standard one, or one the
    /// client's `Connection` names, unless it is protected.
    pub fn is(&self, name: &str) -> bool {
        if HOP_BY_HOP.contains(&name) {
            return true;
        }
        if PROTECTED.contains(&name) {
            return false;
        }
        let named = |t: &[u8]| t.eq_ignore_ascii_case(name.as_bytes());
        match self.named.get_or_init(|| self.read()) {
            Some((tokens, n)) => tokens[..*n].iter().any(|t| named(t)),
            None => tokens(self.from, http::header::CONNECTION).any(named),
        }
    }

    fn read(&self) -> Option<Tokens<'a>> {
        let mut named = ([&b""[..]; CONNECTION_TOKENS], 0);
        if !self.present.may_have(Looked::Connection) {
            return Some(named);
        }
        for t in tokens(self.from, http::header::CONNECTION) {
            *named.0.get_mut(named.1)? = t;
            named.1 += 1;
        }
        Some(named)
    }
}

/// The `Set-Cookie` value with `Secure` and `SameSite=Lax` added, when it sets Odoo's
/// `session_id` cookie and lacks them; `None` when nothing changes. An existing `SameSite`
/// attribute is kept as Odoo set it.
pub fn secure_session_cookie(value: &[u8]) -> Option<Vec<u8>> {
    let text = std::str::from_utf8(value).ok()?;
    let mut parts = text.split(';');
    let (name, _) = parts.next()?.split_once('=')?;
    if name.trim() != "session_id" {
        return None;
    }
    let (mut secure, mut samesite) = (false, false);
    for attr in parts {
        let key = attr.split('=').next().unwrap_or("").trim();
        secure |= key.eq_ignore_ascii_case("secure");
        samesite |= key.eq_ignore_ascii_case("samesite");
    }
    if secure && samesite {
        return None;
    }
    let mut out = text.trim_end().trim_end_matches(';').to_string();
    if !secure {
        out.push_str("; Secure");
    }
    if !samesite {
        out.push_str("; SameSite=Lax");
    }
    Some(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOOKED: [Looked; 7] = [
        Looked::Authorization,
        Looked::Connection,
        Looked::ContentLength,
        Looked::XForwardedFor,
        Looked::XForwardedHost,
        Looked::XForwardedProto,
        Looked::XRequestId,
    ];

    #[test]
    fn looked_fields_are_noted_by_name_in_any_case_and_no_other_field_is() {
        for (i, l) in LOOKED.iter().enumerate() {
            let mut present = Present::NONE;
            present.note(l.name().as_str().to_ascii_uppercase().as_bytes());
            for (j, other) in LOOKED.iter().enumerate() {
                assert_eq!(present.may_have(*other), i == j, "{l:?} noted as {other:?}");
            }
        }
        // Fields of the same lengths, and others.
        let mut present = Present::NONE;
        for name in [
            "user-agent",
            "x-requestid",
            "cache-control",
            "sec-fetch-dest",
            "accept-language",
            "x-forwarded-fo",
            "x-forwarded-hostx",
            "x-forwarded-proto2",
            "host",
            "",
        ] {
            present.note(name.as_bytes());
        }
        assert_eq!(present, Present::NONE);
        assert!(LOOKED.iter().all(|l| Present::ANY.may_have(*l)));
    }

    /// A lookup through what was noted finds what the header map finds, for requests with
    /// none, some and all of the fields, repeated or not.
    #[test]
    fn a_lookup_through_the_noted_fields_finds_what_the_map_finds() {
        let fields: [&[(&str, &str)]; 4] = [
            &[("Host", "erp"), ("User-Agent", "x")],
            &[
                ("Host", "erp"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("Connection", "close"),
            ],
            &[
                ("X-Forwarded-For", "10.0.0.1"),
                ("x-forwarded-for", "10.0.0.2, 10.0.0.3"),
                ("X-FORWARDED-HOST", "erp.example.com"),
                ("X-Forwarded-Proto", "https"),
                ("X-Request-Id", "0123456789abcdef0123456789abcdef"),
                ("Content-Length", "12"),
                ("Connection", "keep-alive, x-custom"),
            ],
            &[],
        ];
        for set in fields {
            let mut req = RequestHeader::build("GET", b"/", None).expect("request");
            for (n, v) in set {
                req.append_header(n.to_string(), *v).expect("field");
            }
            let present = Present::of(&req.headers);
            for l in LOOKED {
                let name = l.name();
                for p in [present, Present::ANY] {
                    assert_eq!(
                        p.get(&req.headers, l),
                        req.headers.get(&name),
                        "{l:?} in {set:?}"
                    );
                    let all: Vec<&[u8]> = p.get_all(&req.headers, l).collect();
                    let map: Vec<&[u8]> = req
                        .headers
                        .get_all(&name)
                        .iter()
                        .map(|v| v.as_bytes())
                        .collect();
                    assert_eq!(all, map, "{l:?} in {set:?}");
                }
            }
            // The connection's own fields are the same either way.
            let (noted, any) = (HopByHop::noted(&req, present), HopByHop::of(&req));
            for name in ["x-custom", "user-agent", "keep-alive", "host"] {
                assert_eq!(noted.is(name), any.is(name), "{name} in {set:?}");
            }
        }
    }

    #[test]
    fn hop_by_hop_fields_are_the_standard_ones_and_those_connection_names() {
        let req = |connection: &[&str]| {
            let mut r = RequestHeader::build("GET", b"/web", None).expect("request");
            for c in connection {
                r.append_header("connection", *c).expect("header");
            }
            r
        };
        let plain = req(&[]);
        let h = HopByHop::of(&plain);
        assert!(h.is("keep-alive") && h.is("transfer-encoding") && h.is("upgrade"));
        // Decided by their names alone: the `Connection` is not read yet.
        assert!(!h.is("host") && h.named.get().is_none());
        assert!(!h.is("x-trace") && !h.is("cookie"));
        let named = req(&["keep-alive, X-Trace", "x-forwarded-for,  X-Other "]);
        let h = HopByHop::of(&named);
        assert!(h.is("x-trace") && h.is("x-other"));
        // Named but protected: still goes to Odoo.
        assert!(!h.is("x-forwarded-for") && !h.is("host"));
        assert!(!h.is("cookie"));
        // More tokens than kept: read again for each field, with the same answers.
        let many: Vec<String> = (0..CONNECTION_TOKENS + 2)
            .map(|i| format!("x-{i}"))
            .collect();
        let many = req(&[&many.join(",")]);
        let h = HopByHop::of(&many);
        assert!(h.is("x-0") && h.is(&format!("x-{}", CONNECTION_TOKENS + 1)));
        assert_eq!(h.named.get(), Some(&None));
        assert!(!h.is("x-99") && !h.is("host"));
    }

    fn s(v: &str) -> Option<String> {
        secure_session_cookie(v.as_bytes()).map(|v| String::from_utf8(v).expect("utf8"))
    }

    #[test]
    fn odoo_session_cookie_gets_both_flags() {
        assert_eq!(
            s("session_id=abc123; Expires=Wed, 24 Feb 2027 10:00:00 GMT; Max-Age=7776000; HttpOnly; Path=/"),
            Some("session_id=abc123; Expires=Wed, 24 Feb 2027 10:00:00 GMT; Max-Age=7776000; HttpOnly; Path=/; Secure; SameSite=Lax".into())
        );
        assert_eq!(
            s("session_id=x; HttpOnly; SameSite=Strict; Path=/;"),
            Some("session_id=x; HttpOnly; SameSite=Strict; Path=/; Secure".into())
        );
        assert_eq!(
            s("session_id=x; secure; HttpOnly"),
            Some("session_id=x; secure; HttpOnly; SameSite=Lax".into())
        );
    }

    #[test]
    fn other_cookies_and_complete_ones_are_left_alone() {
        assert_eq!(s("session_id=x; Secure; SameSite=Lax"), None);
        assert_eq!(s("frontend_lang=en_US; Path=/"), None);
        assert_eq!(s("my_session_id=x; Path=/"), None);
        assert_eq!(s("tz=Europe/Brussels; Path=/; session_id=1"), None);
        assert_eq!(secure_session_cookie(b"session_id=\xff"), None);
        assert_eq!(s("garbage"), None);
    }
}
