//! Pure request classification: a request head -> the first class whose `match` fits.
//!
//! Paths are compared in a normal form (percent-escapes decoded, `//` merged, `.` and `..`
//! resolved), the way Odoo's router will see them, so `/web/%64atabase/` or
//! `/web/static/../database/` cannot slip past an admin class.

use crate::headers::{Looked, Present};
use crate::jsonrpc::Service;
use http::{HeaderMap, HeaderName, Method};
use std::borrow::Cow;

/// What classification looks at.
pub struct RequestFacts<'a> {
    pub method: &'a Method,
    /// The normalized path (see [`normalize_path`]).
    pub path: &'a str,
    /// Host without port, lowercased, if the request named one.
    pub host: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// Which of the fields erpgate looks up `headers` has, where they were noted
    /// ([`Present::ANY`] otherwise).
    pub present: Present,
    /// The JSON-RPC service the body calls, once read (None: the body was not read, and
    /// `jsonrpc_service` conditions do not hold; see [`classify_head`]).
    pub jsonrpc: Option<&'a Service>,
}

/// One alternative of a class's `match`: all conditions must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    conds: Vec<Cond>,
    /// One of `conds` is on the JSON-RPC body (known when made: each request asks).
    reads_body: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cond {
    Path(String),
    PathPrefix(String),
    Method(Vec<Method>),
    Host(HostPattern),
    /// Header present; with `value_prefix`, its value starts with it (ASCII case-insensitive,
    /// stored lowercased).
    /// Made by [`Cond::header`].
    Header {
        name: HeaderName,
        value_prefix: Option<String>,
        /// `name` is a field erpgate notes as it parses a request ([`Looked`]): a request
        /// noted without it is not looked up.
        looked: Option<Looked>,
    },
    /// The JSON-RPC body calls this service (`params.service`); a body that cannot be read
    /// with certainty calls every service.
    JsonRpcService(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com`: stored as `.example.com`; matches any name ending with it.
    Suffix(String),
}

impl HostPattern {
    pub fn parse(s: &str) -> Option<HostPattern> {
        let s = s.trim().to_ascii_lowercase();
        let (wild, name) = match s.strip_prefix("*.") {
            Some(rest) => (true, rest.to_string()),
            None => (false, s),
        };
        let valid = !name.is_empty()
            && name.split('.').all(|l| {
                !l.is_empty()
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if !valid {
            return None;
        }
        Some(if wild {
            HostPattern::Suffix(format!(".{name}"))
        } else {
            HostPattern::Exact(name)
        })
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
}

impl Cond {
    /// A header condition (`value_prefix` stored lowercased).
    pub fn header(name: HeaderName, value_prefix: Option<String>) -> Cond {
        let looked = Looked::named(name.as_str().as_bytes());
        Cond::Header {
            name,
            value_prefix,
            looked,
        }
    }

    #[inline]
    fn matches(&self, r: &RequestFacts<'_>) -> bool {
        match self {
            Cond::Path(p) => r.path == p,
            Cond::PathPrefix(p) => r.path.starts_with(p.as_str()),
            Cond::Method(ms) => ms.iter().any(|m| m == r.method),
            Cond::Host(h) => r.host.is_some_and(|host| h.matches(host)),
            Cond::Header {
                name,
                value_prefix,
                looked,
            } => {
                // Most requests have no `Authorization`, the default config's header
                // condition: known absent, it is not looked up.
                if looked.is_some_and(|l| !r.present.may_have(l)) {
                    return false;
                }
                let mut values = r.headers.get_all(name).iter();
                match value_prefix {
                    None => values.next().is_some(),
                    Some(prefix) => values.any(|v| {
                        let v = v.as_bytes();
                        v.len() >= prefix.len()
                            && v[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
                    }),
                }
            }
            Cond::JsonRpcService(name) => r.jsonrpc.is_some_and(|s| s.may_be(name)),
        }
    }

    /// Whether every request that satisfies `other` also satisfies `self`.
    fn implied_by(&self, other: &Cond) -> bool {
        match (self, other) {
            (Cond::Path(a), Cond::Path(b)) => a == b,
            (Cond::PathPrefix(a), Cond::Path(b) | Cond::PathPrefix(b)) => b.starts_with(a.as_str()),
            (Cond::Method(a), Cond::Method(b)) => b.iter().all(|m| a.contains(m)),
            (Cond::JsonRpcService(a), Cond::JsonRpcService(b)) => a == b,
            (Cond::Host(a), Cond::Host(b)) => match (a, b) {
                (HostPattern::Exact(x), HostPattern::Exact(y)) => x == y,
                (HostPattern::Suffix(s), HostPattern::Exact(y)) => {
                    y.len() > s.len() && y.ends_with(s.as_str())
                }
                (HostPattern::Suffix(s), HostPattern::Suffix(t)) => t.ends_with(s.as_str()),
                (HostPattern::Exact(_), HostPattern::Suffix(_)) => false,
            },
            (
                Cond::Header {
                    name: a,
                    value_prefix: pa,
                    ..
                },
                Cond::Header {
                    name: b,
                    value_prefix: pb,
                    ..
                },
            ) => {
                a == b
                    && match (pa, pb) {
                        (None, _) => true,
                        (Some(pa), Some(pb)) => pb.starts_with(pa.as_str()),
                        (Some(_), None) => false,
                    }
            }
            _ => false,
        }
    }
}

impl Alternative {
    pub fn new(conds: Vec<Cond>) -> Alternative {
        let reads_body = conds.iter().any(|c| matches!(c, Cond::JsonRpcService(_)));
        Alternative { conds, reads_body }
    }

    pub fn conds(&self) -> &[Cond] {
        &self.conds
    }

    pub fn matches(&self, r: &RequestFacts<'_>) -> bool {
        self.conds.iter().all(|c| c.matches(r))
    }

    /// Whether the conditions on the request head hold.
    fn head_matches(&self, r: &RequestFacts<'_>) -> bool {
        self.conds
            .iter()
            .all(|c| matches!(c, Cond::JsonRpcService(_)) || c.matches(r))
    }

    /// Whether every request matching `other` also matches `self` (so a class listing `self`
    /// first leaves nothing of `other` for later classes).
    pub fn covers(&self, other: &Alternative) -> bool {
        self.conds
            .iter()
            .all(|c| other.conds.iter().any(|o| c.implied_by(o)))
    }
}

/// The first class (given as its alternatives) that takes the request: its index, and the
/// index of the alternative that matched (`None` for a class without `match`).
pub fn classify<'c, I>(classes: I, r: &RequestFacts<'_>) -> Option<(usize, Option<usize>)>
where
    I: IntoIterator<Item = &'c [Alternative]>,
{
    classes.into_iter().enumerate().find_map(|(i, alts)| {
        if alts.is_empty() {
            Some((i, None))
        } else {
            alts.iter().position(|a| a.matches(r)).map(|j| (i, Some(j)))
        }
    })
}

/// What a request's head says of its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHead {
    /// The class [`classify`] finds (`None`: no class takes the request).
    Class(Option<(usize, Option<usize>)>),
    /// The body decides: an alternative with a `jsonrpc_service` condition fits the head
    /// before any class takes the request on its head alone. Then the body is read and
    /// [`classify`] called with `jsonrpc` set.
    NeedsBody,
}

/// The class of a request whose body has not been read (`r.jsonrpc` is `None`), or that its
/// body decides: one pass over the classes.
pub fn classify_head<'c, I>(classes: I, r: &RequestFacts<'_>) -> OnHead
where
    I: IntoIterator<Item = &'c [Alternative]>,
{
    for (i, alts) in classes.into_iter().enumerate() {
        if alts.is_empty() {
            return OnHead::Class(Some((i, None)));
        }
        // Without a body no `jsonrpc_service` condition holds: the first alternative that
        // matches is the first of those without one. Failing that, an alternative with one
        // whose other conditions hold leaves the class to the body.
        let mut body_decides = false;
        for (j, a) in alts.iter().enumerate() {
            if !a.reads_body {
                if a.matches(r) {
                    return OnHead::Class(Some((i, Some(j))));
                }
            } else if !body_decides {
                body_decides = a.head_matches(r);
            }
        }
        if body_decides {
            return OnHead::NeedsBody;
        }
    }
    OnHead::Class(None)
}

impl std::fmt::Display for Alternative {
    /// `path_prefix=/web/database/ method=POST`: the rule as the audit log names it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, c) in self.conds.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match c {
                Cond::Path(p) => write!(f, "path={p}")?,
                Cond::PathPrefix(p) => write!(f, "path_prefix={p}")?,
                Cond::Method(ms) => {
                    let names: Vec<&str> = ms.iter().map(|m| m.as_str()).collect();
                    write!(f, "method={}", names.join(","))?
                }
                Cond::Host(HostPattern::Exact(h)) => write!(f, "host={h}")?,
                Cond::Host(HostPattern::Suffix(s)) => write!(f, "host=*{s}")?,
                Cond::Header {
                    name,
                    value_prefix: None,
                    ..
                } => write!(f, "header={name}")?,
                Cond::Header {
                    name,
                    value_prefix: Some(p),
                    ..
                } => write!(f, "header={name} value_prefix={p:?}")?,
                Cond::JsonRpcService(name) => write!(f, "jsonrpc_service={name}")?,
            }
        }
        Ok(())
    }
}

/// The path as Odoo's router sees it: query removed by the caller, percent-escapes decoded
/// (invalid UTF-8 replaced), runs of `/` merged, `.` and `..` segments resolved.
/// Borrows when nothing needs changing (the common case).
pub fn normalize_path(raw: &str) -> Cow<'_, str> {
    // One pass: a `%`, a `\\`, or a `/` followed by `/` or `.`.
    let b = raw.as_bytes();
    let needs = b.first() != Some(&b'/')
        || b.iter().enumerate().any(|(i, &c)| match c {
            b'%' | b'\\' => true,
            b'/' => matches!(b.get(i + 1), Some(b'/' | b'.')),
            _ => false,
        });
    if !needs {
        return Cow::Borrowed(raw);
    }
    let decoded = percent_decode(raw);
    // Werkzeug treats a backslash like any byte; browsers turn it into '/'. Be strict: treat
    // it as a separator so a prefix rule cannot be dodged with it.
    let decoded = decoded.replace('\\', "/");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(decoded.len() + 1);
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty()
        || (decoded.ends_with('/') && !s.ends_with('/'))
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
    {
        s.push('/');
    }
    Cow::Owned(s)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The request's host: `Host` header or the URI authority, without port, lowercased.
pub fn request_host<'a>(
    uri_host: Option<&'a str>,
    host_header: Option<&'a [u8]>,
) -> Option<Cow<'a, str>> {
    let raw = match (uri_host, host_header) {
        (Some(h), _) => h,
        (None, Some(h)) => std::str::from_utf8(h).ok()?,
        (None, None) => return None,
    };
    let host = if let Some(rest) = raw.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, p)| {
            if p.bytes().all(|c| c.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    let host = host.trim_end_matches('.');
    if host.bytes().any(|c| c.is_ascii_uppercase()) {
        Some(Cow::Owned(host.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(host))
    }
}

#[cfg(test)]
mod tests;
