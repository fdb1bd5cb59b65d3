//! Security response headers: the `session_id` cookie flags Odoo's deployment guide sets in
//! nginx (`secure; samesite=lax`).

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
