//! Pure forwarded-header logic: who the client is, and what Odoo's `proxy_mode` is told.
//!
//! Odoo (werkzeug `ProxyFix`, one hop) believes the *last* `X-Forwarded-For` entry, and the
//! `X-Forwarded-Proto` / `X-Forwarded-Host` values, only when `X-Forwarded-Host` is present.
//! So erpgate always sets all three, and the `X-Forwarded-For` it sends ends with the client.

use ipnet::IpNet;
use std::net::IpAddr;

/// The peer as a canonical address (an IPv4-mapped IPv6 peer is its IPv4 address).
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

fn trusted(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

/// The result of reading a request's forwarding chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    pub client: IpAddr,
    /// Whether the direct peer is a trusted proxy (so its forwarded headers are believed).
    pub peer_trusted: bool,
    /// Which `X-Forwarded-For` hop is the client, counted from the right (None: the client
    /// is the peer). See [`Forwarded::chain`].
    client_hop: Option<usize>,
}

/// The hops of every `X-Forwarded-For` value, in order.
fn hops<'a, I>(values: I) -> impl DoubleEndedIterator<Item = &'a str>
where
    I: DoubleEndedIterator<Item = &'a [u8]>,
{
    values
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()))
}

impl Forwarded {
    /// Writes the `X-Forwarded-For` value to send upstream to `out`, from the same header
    /// values given to [`resolve`]: the chain up to and including the client (hops a trusted
    /// proxy vouched for, never a forged one from an untrusted peer). Written only when the
    /// request is sent on, so deciding about a request allocates nothing.
    pub fn write_chain<'a, I>(
        &self,
        xff_values: I,
        out: &mut dyn std::io::Write,
    ) -> std::io::Result<()>
    where
        I: IntoIterator<Item = &'a [u8]>,
        I::IntoIter: DoubleEndedIterator,
    {
        if let (true, Some(from_right)) = (self.peer_trusted, self.client_hop) {
            let all: Vec<&str> = hops(xff_values.into_iter()).collect();
            let before = all.len().saturating_sub(from_right + 1);
            for hop in &all[..before] {
                out.write_all(hop.as_bytes())?;
                out.write_all(b", ")?;
            }
        }
        write_ip(self.client, out)
    }
}

/// Writes an address as its `Display` does; an IPv4 address without the formatting machinery
/// (which took 2 % of erpgate's user time, twice per request).
pub fn write_ip(ip: IpAddr, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let IpAddr::V4(v4) = ip else {
        return write!(out, "{ip}");
    };
    let mut text = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            text[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            text[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            text[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        text[len] = b'0' + octet % 10;
        len += 1;
    }
    out.write_all(&text[..len])
}

/// Reads `X-Forwarded-For` (every value of the header, in order) against the trusted list.
/// From an untrusted peer the header is ignored: the client is the peer. From a trusted peer,
/// the client is the rightmost hop that is not itself a trusted proxy; an entry that is not
/// an IP address ends the walk (the hop to its right is the client).
pub fn resolve<'a, I>(peer: IpAddr, xff_values: I, trusted_proxies: &[IpNet]) -> Forwarded
where
    I: IntoIterator<Item = &'a [u8]>,
    I::IntoIter: DoubleEndedIterator,
{
    let peer = canonical(peer);
    if !trusted(trusted_proxies, peer) {
        return Forwarded {
            client: peer,
            peer_trusted: false,
            client_hop: None,
        };
    }
    let mut client = peer;
    let mut client_hop = None;
    for (j, hop) in hops(xff_values.into_iter()).rev().enumerate() {
        match parse_hop(hop) {
            Some(ip) => {
                client = ip;
                client_hop = Some(j);
                if !trusted(trusted_proxies, ip) {
                    break;
                }
            }
            None => break,
        }
    }
    Forwarded {
        client,
        peer_trusted: true,
        client_hop,
    }
}

/// One `X-Forwarded-For` hop: an IP, possibly `[v6]`, `v4:port` or `[v6]:port`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        let inner = rest.split(']').next()?;
        return inner.parse::<IpAddr>().ok().map(canonical);
    }
    let (h, p) = s.rsplit_once(':')?;
    if p.bytes().all(|c| c.is_ascii_digit()) {
        return h.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4);
    }
    None
}

/// A request id we accept from a trusted peer: 1-128 visible ASCII characters of a safe set.
pub fn valid_request_id(v: &[u8]) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.iter().all(|c| {
            c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':' | b'/' | b'+' | b'=')
        })
}

/// A request's id: one erpgate made, held in place (a `String` for it was an allocation
/// per request), or one a trusted peer sent. Either way only characters of
/// [`valid_request_id`]'s set, so it is written as it is in a log line, a header or JSON:
/// nothing in it needs an escape.
#[derive(Debug, Clone, Default)]
pub enum RequestId {
    /// None yet (erpgate answered before reading the request).
    #[default]
    None,
    /// 128 random bits as 32 lowercase hex digits.
    Made(Digits),
    /// As a trusted peer sent it, checked with [`valid_request_id`].
    Given(Box<str>),
}

/// 32 lowercase hex digits, made only by [`RequestId::fresh`].
#[derive(Debug, Clone)]
pub struct Digits([u8; 32]);

impl RequestId {
    /// A fresh request id: 128 random bits as 32 hex digits.
    pub fn fresh() -> Self {
        RequestId::Made(Digits(hex32(fastrand::u128(..))))
    }

    /// The id a trusted peer sent, if [`valid_request_id`] accepts it.
    pub fn given(v: &[u8]) -> Option<Self> {
        valid_request_id(v).then(|| RequestId::Given(String::from_utf8_lossy(v).into()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            RequestId::None => "",
            // Hex digits: always UTF-8.
            RequestId::Made(Digits(digits)) => std::str::from_utf8(digits).unwrap_or_default(),
            RequestId::Given(id) => id,
        }
    }

    /// [`RequestId::as_str`]'s bytes, without checking again that they are UTF-8.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            RequestId::None => b"",
            RequestId::Made(Digits(digits)) => digits,
            RequestId::Given(id) => id.as_bytes(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }
}

/// `n` in 32 lowercase hex digits, the most significant first (as `{:032x}` writes it,
/// without the formatting machinery).
fn hex32(n: u128) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 32];
    for (i, d) in digits.iter_mut().enumerate() {
        *d = HEX[((n >> ((31 - i) * 4)) & 0xf) as usize];
    }
    digits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.0.1",
            "192.168.100.7",
            "1.20.199.9",
            "100.99.10.0",
            "::1",
            "2001:db8::17",
            "::ffff:10.1.2.3",
        ] {
            let ip: IpAddr = ip.parse().expect("address");
            let mut out = Vec::new();
            write_ip(ip, &mut out).expect("write");
            assert_eq!(out, ip.to_string().into_bytes());
        }
    }

    impl Forwarded {
        /// [`Forwarded::write_chain`] as a string.
        fn chain<'a, I>(&self, xff_values: I) -> String
        where
            I: IntoIterator<Item = &'a [u8]>,
            I::IntoIter: DoubleEndedIterator,
        {
            let mut s = Vec::new();
            self.write_chain(xff_values, &mut s)
                .expect("a Vec takes it");
            String::from_utf8(s).expect("UTF-8")
        }
    }

    fn nets(v: &[&str]) -> Vec<IpNet> {
        v.iter().map(|s| s.parse().expect("test cidr")).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test ip")
    }

    #[test]
    fn untrusted_peer_ignores_forged_chain() {
        let xff = [b"1.2.3.4".as_slice()];
        let f = resolve(ip("203.0.113.9"), xff, &nets(&["127.0.0.1/32"]));
        assert_eq!(f.client, ip("203.0.113.9"));
        assert!(!f.peer_trusted);
        assert_eq!(f.chain(xff), "203.0.113.9");
    }

    #[test]
    fn trusted_peer_gives_rightmost_untrusted_hop() {
        let t = nets(&["10.0.0.0/8"]);
        let xff = [b"6.6.6.6, 1.2.3.4".as_slice(), b"10.0.0.5".as_slice()];
        let f = resolve(ip("10.0.0.9"), xff, &t);
        assert_eq!(f.client, ip("1.2.3.4"));
        assert_eq!(f.chain(xff), "6.6.6.6, 1.2.3.4");
        // Every hop trusted: the leftmost is the client.
        let xff = [b"10.0.0.1,10.0.0.2".as_slice()];
        let f = resolve(ip("10.0.0.9"), xff, &t);
        assert_eq!(f.client, ip("10.0.0.1"));
        assert_eq!(f.chain(xff), "10.0.0.1");
        // Hops with ports: the client as an address.
        let xff = [b" 7.7.7.7 , 1.2.3.4:5555 ".as_slice()];
        let f = resolve(ip("10.0.0.9"), xff, &t);
        assert_eq!(f.chain(xff), "7.7.7.7, 1.2.3.4");
        assert!(f.peer_trusted);
    }

    #[test]
    fn trusted_peer_without_header_is_the_client() {
        let f = resolve(ip("10.0.0.9"), std::iter::empty(), &nets(&["10.0.0.0/8"]));
        assert_eq!(f.client, ip("10.0.0.9"));
        assert_eq!(f.chain(std::iter::empty()), "10.0.0.9");
    }

    #[test]
    fn garbage_hop_stops_the_walk() {
        let xff = [b"1.2.3.4, nonsense, 10.1.1.1".as_slice()];
        let f = resolve(ip("10.0.0.9"), xff, &nets(&["10.0.0.0/8"]));
        assert_eq!(f.client, ip("10.1.1.1"));
        assert_eq!(f.chain(xff), "1.2.3.4, nonsense, 10.1.1.1");
    }

    #[test]
    fn mapped_v6_peer_counts_as_v4() {
        let f = resolve(
            ip("::ffff:127.0.0.1"),
            std::iter::empty(),
            &nets(&["127.0.0.1/32"]),
        );
        assert!(f.peer_trusted);
        assert_eq!(f.client, ip("127.0.0.1"));
    }

    #[test]
    fn hops_with_ports_and_brackets() {
        assert_eq!(parse_hop("1.2.3.4:567"), Some(ip("1.2.3.4")));
        assert_eq!(parse_hop("[2001:db8::1]:80"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop("2001:db8::1"), Some(ip("2001:db8::1")));
        assert_eq!(parse_hop("unknown"), None);
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(b"abc-123"));
        assert!(!valid_request_id(b""));
        assert!(!valid_request_id(b"a b"));
        assert!(!valid_request_id(&[b'a'; 129]));
        let id = RequestId::fresh();
        assert_eq!(id.as_str().len(), 32);
        assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(RequestId::None.is_empty());
        assert_eq!(RequestId::given(b"abc-123").unwrap().as_str(), "abc-123");
        assert!(RequestId::given(b"a\"b").is_none());
        assert!(RequestId::given(b"").is_none());
        for n in [0, 1, 0xabc, u128::MAX, u128::MAX / 3, 1 << 127] {
            assert_eq!(
                std::str::from_utf8(&hex32(n)).ok(),
                Some(format!("{n:032x}").as_str())
            );
        }
    }
}
