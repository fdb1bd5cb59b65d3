//! Rate limits per class (GCRA, governor), keyed by client IP, host, a header, or one global
//! bucket. Buckets that are back to full are pruned, so memory follows the keys active now.

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};
use http::{HeaderMap, HeaderName};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// What a class's requests are counted by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySpec {
    ClientIp,
    Host,
    Global,
    Header(HeaderName),
    /// The API key of `Authorization: Bearer`, else the database and login/uid of the
    /// XML-RPC or JSON-RPC call in the body, else the client IP.
    IntegrationClient,
}

impl KeySpec {
    pub fn parse(s: &str) -> Option<KeySpec> {
        match s {
            "client_ip" => Some(KeySpec::ClientIp),
            "host" => Some(KeySpec::Host),
            "global" => Some(KeySpec::Global),
            "integration_client" => Some(KeySpec::IntegrationClient),
            _ => {
                let name = s.strip_prefix("header:")?;
                HeaderName::from_bytes(name.as_bytes())
                    .ok()
                    .map(KeySpec::Header)
            }
        }
    }

    /// The bucket of a request. A missing host or header is one shared bucket, so leaving
    /// the header out does not escape the limit. Header values (API keys) and hosts are kept
    /// only as a hash, never in clear.
    ///
    /// `body` is the caller identity read from the request body ([`KeySpec::reads_body`]).
    pub fn key(
        &self,
        client: IpAddr,
        host: Option<&str>,
        headers: &HeaderMap,
        body: Option<u64>,
    ) -> Key {
        match self {
            KeySpec::ClientIp => Key::Ip(client),
            KeySpec::Global => Key::Global,
            KeySpec::Host => Key::hashed(host.unwrap_or("").as_bytes()),
            KeySpec::Header(h) => Key::hashed(headers.get(h).map_or(&b""[..], |v| v.as_bytes())),
            KeySpec::IntegrationClient => match bearer_token(headers) {
                Some(token) => Key::hashed(token),
                None => body.map_or(Key::Ip(client), Key::Hashed),
            },
        }
    }

    /// Whether the key of a request without a bearer token is read from its body.
    pub fn reads_body(&self, headers: &HeaderMap) -> bool {
        *self == KeySpec::IntegrationClient && bearer_token(headers).is_none()
    }
}

/// The token of `Authorization: Bearer <token>` (scheme in any case).
pub fn bearer_token(headers: &HeaderMap) -> Option<&[u8]> {
    headers
        .get_all(http::header::AUTHORIZATION)
        .iter()
        .find_map(|v| {
            let v = v.as_bytes();
            (v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer "))
                .then(|| v[7..].trim_ascii())
                .filter(|t| !t.is_empty())
        })
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Global,
    Ip(IpAddr),
    Hashed(u64),
}

impl Key {
    fn hashed(v: &[u8]) -> Key {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        v.hash(&mut h);
        Key::Hashed(h.finish())
    }
}

/// `"N/s"`, `"N/min"`, `"N/h"`: (N, period).
pub fn parse_rate(s: &str) -> Option<(u32, Duration)> {
    let (n, unit) = s.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let period = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "min" | "m" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some((n, period))
}

pub struct Limit<C: Clock = DefaultClock> {
    pub spec: KeySpec,
    pub rate: u32,
    pub period: Duration,
    pub burst: u32,
    limiter: RateLimiter<Key, DashMapStateStore<Key>, C, NoOpMiddleware<<C as Clock>::Instant>>,
    clock: C,
}

impl std::fmt::Debug for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Limit({:?}, {}/{:?}, burst {})",
            self.spec, self.rate, self.period, self.burst
        )
    }
}

/// What a check says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Limited { retry_after: Duration },
}

impl Limit<DefaultClock> {
    pub fn new(spec: KeySpec, rate: u32, period: Duration, burst: u32) -> Option<Self> {
        Self::with_clock(spec, rate, period, burst, DefaultClock::default())
    }
}

impl<C: Clock> Limit<C> {
    /// Same key, rate and burst: the buckets of one can serve the other.
    pub fn same_limit<D: Clock>(&self, other: &Limit<D>) -> bool {
        self.spec == other.spec
            && self.rate == other.rate
            && self.period == other.period
            && self.burst == other.burst
    }
}

impl<C: Clock + Clone> Limit<C> {
    /// `rate` requests per `period` on average, bursts of up to `burst`.
    pub fn with_clock(
        spec: KeySpec,
        rate: u32,
        period: Duration,
        burst: u32,
        clock: C,
    ) -> Option<Self> {
        let every = period.checked_div(rate)?;
        let quota = Quota::with_period(every)?.allow_burst(NonZeroU32::new(burst)?);
        Some(Limit {
            spec,
            rate,
            period,
            burst,
            limiter: RateLimiter::dashmap_with_clock(quota, clock.clone()),
            clock,
        })
    }

    pub fn check(&self, key: &Key) -> Verdict {
        match self.limiter.check_key(key) {
            Ok(_) => Verdict::Allowed,
            Err(not_until) => Verdict::Limited {
                retry_after: not_until.wait_time_from(self.clock.now()),
            },
        }
    }

    /// Drops buckets that are full again (indistinguishable from new ones).
    pub fn prune(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Buckets held now.
    pub fn keys(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn admits_exactly_the_burst_then_the_rate() {
        let clock = FakeRelativeClock::default();
        let l = Limit::with_clock(
            KeySpec::ClientIp,
            10,
            Duration::from_secs(60),
            5,
            clock.clone(),
        )
        .expect("limit");
        let k = Key::Ip(ip("192.0.2.1"));
        let admitted = (0..100).filter(|_| l.check(&k) == Verdict::Allowed).count();
        assert_eq!(admitted, 5);
        // One request every 6 s (10/min) comes back.
        match l.check(&k) {
            Verdict::Limited { retry_after } => assert_eq!(retry_after, Duration::from_secs(6)),
            v => panic!("{v:?}"),
        }
        clock.advance(Duration::from_secs(6));
        assert_eq!(l.check(&k), Verdict::Allowed);
        assert!(matches!(l.check(&k), Verdict::Limited { .. }));
        // Over 10 minutes idle, the bucket refills to the burst, not beyond.
        clock.advance(Duration::from_secs(600));
        assert_eq!(
            (0..100).filter(|_| l.check(&k) == Verdict::Allowed).count(),
            5
        );
        // Another client has its own bucket.
        assert_eq!(l.check(&Key::Ip(ip("192.0.2.2"))), Verdict::Allowed);
    }

    #[test]
    fn full_buckets_are_pruned() {
        let clock = FakeRelativeClock::default();
        let l = Limit::with_clock(
            KeySpec::ClientIp,
            100,
            Duration::from_secs(1),
            100,
            clock.clone(),
        )
        .expect("limit");
        for i in 0..10_000u32 {
            l.check(&Key::Ip(IpAddr::from(i.to_be_bytes())));
        }
        assert_eq!(l.keys(), 10_000);
        clock.advance(Duration::from_secs(2));
        l.prune();
        assert_eq!(l.keys(), 0);
    }

    #[test]
    fn keys_and_rates_parse() {
        assert_eq!(parse_rate("100/s"), Some((100, Duration::from_secs(1))));
        assert_eq!(parse_rate("10/min"), Some((10, Duration::from_secs(60))));
        assert_eq!(parse_rate("5 / h"), Some((5, Duration::from_secs(3600))));
        assert_eq!(parse_rate("0/s"), None);
        assert_eq!(parse_rate("ten/s"), None);
        assert_eq!(parse_rate("1/week"), None);
        assert_eq!(
            KeySpec::parse("header:X-Api-Key"),
            Some(KeySpec::Header(HeaderName::from_static("x-api-key")))
        );
        assert_eq!(KeySpec::parse("header:bad header"), None);
        assert_eq!(
            KeySpec::parse("integration_client"),
            Some(KeySpec::IntegrationClient)
        );
        let mut h = HeaderMap::new();
        let spec = KeySpec::parse("header:x-api-key").expect("spec");
        let missing = spec.key(ip("::1"), None, &h, None);
        h.insert("x-api-key", http::HeaderValue::from_static("k1"));
        let k1 = spec.key(ip("::1"), None, &h, None);
        h.insert("x-api-key", http::HeaderValue::from_static("k2"));
        let k2 = spec.key(ip("::2"), None, &h, None);
        assert!(missing != k1 && k1 != k2 && matches!(k1, Key::Hashed(_)));
    }

    #[test]
    fn integration_client_keys() {
        let spec = KeySpec::IntegrationClient;
        let mut h = HeaderMap::new();
        // No token, no body identity: the client IP.
        assert_eq!(
            spec.key(ip("10.0.0.1"), None, &h, None),
            Key::Ip(ip("10.0.0.1"))
        );
        assert!(spec.reads_body(&h));
        // The body identity (database, user) when there is no token.
        assert_eq!(
            spec.key(ip("10.0.0.1"), None, &h, Some(42)),
            Key::Hashed(42)
        );
        // A bearer token wins over the body, whatever the IP; kept as a hash only.
        h.insert(
            "authorization",
            http::HeaderValue::from_static("Bearer key-one"),
        );
        assert!(!spec.reads_body(&h));
        let a = spec.key(ip("10.0.0.1"), None, &h, Some(42));
        assert_eq!(a, spec.key(ip("10.0.0.2"), None, &h, None));
        h.insert(
            "authorization",
            http::HeaderValue::from_static("bearer key-two"),
        );
        let b = spec.key(ip("10.0.0.1"), None, &h, Some(42));
        assert!(matches!(a, Key::Hashed(_)) && a != b && b != Key::Hashed(42));
        // Another scheme is no token.
        h.insert(
            "authorization",
            http::HeaderValue::from_static("Basic a2V5"),
        );
        assert!(spec.reads_body(&h));
        assert_eq!(bearer_token(&h), None);
    }
}
