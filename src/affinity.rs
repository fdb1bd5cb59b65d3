//! Session affinity (`affinity = "cookie:session_id"`), for Odoo servers that do not share
//! a session store: a request carrying the session cookie goes to the server its value
//! hashes to (rendezvous hashing over the usable servers of the zone, so a sick or drained
//! server's users move and nobody else does).
//!
//! A session is born on whatever server answered its first request, which is seldom the
//! one its new id hashes to. So whenever Odoo sets the session cookie, erpgate adds its own
//! cookie naming that server (`erpgate_affinity`: the server's id, a hash of its address,
//! never the address itself). A usable pinned server wins over the hash, in any zone:
//! another erpgate replica reading the same cookie sends the user to the same server.

use crate::upstream::Sticky;
use pingora::http::RequestHeader;

/// The cookie erpgate sets to keep a session on the server that created it.
pub const PIN_COOKIE: &str = "erpgate_affinity";

/// The request's affinity: the pinned server, and the hash of the session cookie `name`.
pub fn sticky(req: &RequestHeader, name: &str) -> Sticky {
    let mut out = Sticky::default();
    for value in req.headers.get_all(http::header::COOKIE) {
        let Ok(text) = value.to_str() else {
            continue;
        };
        for pair in text.split(';') {
            let Some((k, v)) = pair.split_once('=') else {
                continue;
            };
            let (k, v) = (k.trim(), v.trim());
            if k == name && !v.is_empty() {
                out.key = Some(xxhash_rust::xxh3::xxh3_64(v.as_bytes()));
            } else if k == PIN_COOKIE {
                out.pin = u64::from_str_radix(v, 16).ok();
            }
        }
    }
    out
}

/// The `Set-Cookie` value pinning the session to `server`, when this response from it sets
/// (or deletes) the session cookie `name`; it lives as long as Odoo's cookie does.
/// `cookies`: the answer's `Set-Cookie` values, in order.
pub fn pin_for<'a>(
    cookies: impl Iterator<Item = &'a [u8]>,
    name: &str,
    server: u64,
    https: bool,
) -> Option<String> {
    // As `HeaderValue::to_str`: visible ASCII only.
    let text = |v: &'a [u8]| {
        v.iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b))
            .then(|| std::str::from_utf8(v).ok())
            .flatten()
    };
    let set = cookies
        .filter_map(text)
        .filter(|v| v.split_once('=').is_some_and(|(k, _)| k.trim() == name))
        .last()?;
    let mut parts = set.split(';');
    let value = parts
        .next()
        .and_then(|p| p.split_once('='))
        .map_or("", |(_, v)| v.trim());
    let mut lifetime = String::new();
    for attr in parts {
        let (k, v) = attr.split_once('=').unwrap_or((attr, ""));
        let k = k.trim();
        if k.eq_ignore_ascii_case("max-age") || k.eq_ignore_ascii_case("expires") {
            lifetime.push_str("; ");
            lifetime.push_str(k);
            lifetime.push('=');
            lifetime.push_str(v.trim());
        }
    }
    if value.is_empty() {
        // Odoo deleted its session cookie: delete the pin too.
        lifetime = "; Max-Age=0".to_string();
    }
    let secure = if https { "; Secure" } else { "" };
    Some(format!(
        "{PIN_COOKIE}={server:016x}; Path=/; HttpOnly; SameSite=Lax{lifetime}{secure}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::AnswerFields;
    use pingora::http::ResponseHeader;

    fn req(cookies: &[&str]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/web", None).expect("request");
        for c in cookies {
            r.append_header("cookie", *c).expect("header");
        }
        r
    }

    #[test]
    fn the_session_cookie_is_hashed_and_the_pin_read() {
        let none = sticky(&req(&[]), "session_id");
        assert_eq!(none, Sticky::default());
        let a = sticky(&req(&["frontend_lang=en_US; session_id=abc"]), "session_id");
        let b = sticky(&req(&["session_id=abc", "tz=UTC"]), "session_id");
        let c = sticky(&req(&["session_id=abd"]), "session_id");
        assert!(a.key.is_some());
        assert_eq!(a, b);
        assert_ne!(a.key, c.key);
        assert_eq!(a.pin, None);
        let pinned = sticky(
            &req(&["session_id=abc; erpgate_affinity=00000000000000ff"]),
            "session_id",
        );
        assert_eq!(pinned.pin, Some(255));
        assert_eq!(pinned.key, a.key);
        // A forged or broken pin is no pin; an empty session cookie is no session.
        assert_eq!(
            sticky(&req(&["erpgate_affinity=zz; session_id="]), "session_id"),
            Sticky::default()
        );
    }

    fn resp(set_cookies: &[&str]) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).expect("response");
        for c in set_cookies {
            r.append_header("set-cookie", *c).expect("header");
        }
        r
    }

    #[test]
    fn a_new_session_is_pinned_for_as_long_as_it_lives() {
        let odoo = "session_id=0123; Expires=Wed, 24 Feb 2027 10:00:00 GMT; Max-Age=7776000; HttpOnly; Path=/";
        assert_eq!(
            pin_for(
                resp(&["frontend_lang=en_US; Path=/", odoo]).cookies(), "session_id", 0xab, false)
                .as_deref(),
            Some("erpgate_affinity=00000000000000ab; Path=/; HttpOnly; SameSite=Lax; Expires=Wed, 24 Feb 2027 10:00:00 GMT; Max-Age=7776000")
        );
        assert_eq!(
            pin_for(
                resp(&["session_id=x; Path=/"]).cookies(),
                "session_id",
                1,
                true
            )
            .as_deref(),
            Some("erpgate_affinity=0000000000000001; Path=/; HttpOnly; SameSite=Lax; Secure")
        );
        // Logout: Odoo deletes the session cookie, the pin goes too.
        assert_eq!(
            pin_for(
                resp(&["session_id=; Max-Age=0; Path=/"]).cookies(),
                "session_id",
                1,
                false
            )
            .as_deref(),
            Some("erpgate_affinity=0000000000000001; Path=/; HttpOnly; SameSite=Lax; Max-Age=0")
        );
        assert_eq!(
            pin_for(
                resp(&["frontend_lang=en_US"]).cookies(),
                "session_id",
                1,
                false
            ),
            None
        );
        assert_eq!(pin_for(resp(&[]).cookies(), "session_id", 1, false), None);
    }
}
