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
    let hop: Vec<HeaderName> = up
        .headers
        .keys()
        .filter(|name| is_hop_by_hop(name.as_str(), from))
        .cloned()
        .collect();
    for name in &hop {
        up.remove_header(name);
    }
}

/// Whether the field `name` (lower case) concerns the client's connection only: a standard
/// one, or one the client's `Connection` (in `from`) names, unless it is protected.
pub fn is_hop_by_hop(name: &str, from: &RequestHeader) -> bool {
    HOP_BY_HOP.contains(&name)
        || (!PROTECTED.contains(&name)
            && tokens(from, http::header::CONNECTION)
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes())))
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
