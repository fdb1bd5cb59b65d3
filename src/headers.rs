//! Header rules: the fields that concern one connection only (never passed on), and the
//! `session_id` cookie flags Odoo's deployment guide sets in nginx (`secure; samesite=lax`).

use http::header::HeaderName;
use pingora::http::RequestHeader;

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
    values
        .into_iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b',').map(<[u8]>::trim_ascii))
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
    /// The `Connection` tokens once read; `None` inside when there are more than
    /// [`CONNECTION_TOKENS`] (read again for each field then).
    named: std::cell::OnceCell<Option<Tokens<'a>>>,
}

type Tokens<'a> = ([&'a [u8]; CONNECTION_TOKENS], usize);

impl<'a> HopByHop<'a> {
    pub fn of(from: &'a RequestHeader) -> Self {
        HopByHop {
            from,
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
