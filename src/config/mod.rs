//! Configuration: the TOML file form (`file`), its compilation into the runtime form
//! (`compile`), and the runtime types the proxy reads. Runtime code never sees file types.

mod compile;
pub mod file;
mod locate;
pub mod reload;

use crate::classify::Alternative;
use ipnet::IpNet;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

pub use compile::parse;

/// One configuration error, shown to operators as `file:line:col: key.path: message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.col, self.path, self.message
        )
    }
}

/// Every error found in one configuration file, in file order.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// Reads and compiles the file at `path`. `ERPGATE_ZONE`, when set, overrides `[network] zone`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: name.clone(),
            line: 1,
            col: 1,
            path: "(file)".into(),
            message: format!("cannot read: {e}"),
        }])
    })?;
    let zone = std::env::var("ERPGATE_ZONE").ok().filter(|z| !z.is_empty());
    parse(&text, &name, zone.as_deref())
}

/// The compiled, validated configuration that one request reads from start to end.
#[derive(Debug)]
pub struct Config {
    pub source: String,
    /// xxh3 of the file's text, as hex: which edit of the file serves.
    pub source_hash: String,
    pub listen: Listen,
    pub network: Network,
    pub server: ServerSettings,
    pub log: LogSettings,
    pub pools: Vec<Pool>,
    pub classes: Vec<Class>,
    /// Some class's `match` has a `host` condition: the request's host is needed to classify.
    pub classes_match_host: bool,
    /// Where audited classes' requests are appended as JSON lines.
    pub audit_path: Option<std::path::PathBuf>,
    pub tls: Option<Tls>,
    pub maintenance: Option<Maintenance>,
}

/// `[maintenance]`: release windows during which classes with `maintenance = "block"` are
/// answered 503 with a page, except for clients in `allow`.
#[derive(Debug, Clone)]
pub struct Maintenance {
    /// On now, until switched off by a config edit.
    pub enabled: bool,
    /// (start, end), Unix seconds, end exclusive.
    pub windows: Vec<(i64, i64)>,
    /// The operator's HTML page (none: a built-in one).
    pub page: Option<bytes::Bytes>,
    pub allow: Vec<IpNet>,
}

/// `Retry-After` while maintenance is on without a known end.
pub const MAINTENANCE_RETRY_DEFAULT: i64 = 300;

impl Maintenance {
    /// `Some(end)` when maintenance is on at `now` (Unix seconds); `end` is when it ends,
    /// when a window says so.
    pub fn active_at(&self, now: i64) -> Option<Option<i64>> {
        let window = self
            .windows
            .iter()
            .filter(|(s, e)| *s <= now && now < *e)
            .map(|(_, e)| *e)
            .max();
        match (self.enabled, window) {
            (_, Some(end)) => Some(Some(end)),
            (true, None) => Some(None),
            (false, None) => None,
        }
    }
    /// Whether maintenance is on or has windows: only then is the clock read for it (a
    /// `[maintenance]` table switched off costs no clock read per request).
    pub fn may_be_on(&self) -> bool {
        self.enabled || !self.windows.is_empty()
    }
    pub fn allows(&self, ip: std::net::IpAddr) -> bool {
        self.allow.iter().any(|n| n.contains(&ip))
    }
}
/// `[tls]`: certificates and HTTPS behaviour.
#[derive(Debug)]
pub struct Tls {
    /// The first one is served to clients without SNI or with an unknown name.
    pub certificates: Vec<crate::tls::Loaded>,
    /// `min_version = "1.3"`.
    pub tls13_only: bool,
    /// Plain-HTTP requests get a 308 to HTTPS.
    pub redirect_http: bool,
    /// The port of redirect targets (443: none in the URL).
    pub redirect_port: u16,
    /// Path prefixes never redirected (a load balancer's health probe).
    pub redirect_exempt: Vec<String>,
    /// `Strict-Transport-Security` for HTTPS answers of classes that set none.
    pub hsts: Option<http::HeaderValue>,
    /// CA for client certificates (`require_client_cert` classes).
    pub client_ca: Option<(std::path::PathBuf, std::sync::Arc<rustls::RootCertStore>)>,
}

impl Tls {
    /// Whether a plain-HTTP request for `path` is sent to HTTPS.
    pub fn redirects(&self, path: &str) -> bool {
        self.redirect_http && !self.redirect_exempt.iter().any(|p| path.starts_with(p))
    }
    /// The certificate and key files, for the renewal watch.
    pub fn files(&self) -> Vec<(std::path::PathBuf, std::path::PathBuf)> {
        self.certificates
            .iter()
            .map(|l| (l.cert_path.clone(), l.key_path.clone()))
            .collect()
    }
}

impl Config {
    /// Takes over the live state of the config this one replaces (DESIGN convention 6), by
    /// stable names: a class's rate-limit buckets when its limit is unchanged (a changed
    /// limit starts with full buckets), its in-flight count (the requests still running
    /// count against the new cap), a pool's round-robin position.
    pub fn adopt_state(&mut self, old: &Config) {
        for class in &mut self.classes {
            let Some(prev) = old.classes.iter().find(|c| c.name == class.name) else {
                continue;
            };
            class.in_flight = prev.in_flight.clone();
            if let (Some(new), Some(was)) = (&class.rate_limit, &prev.rate_limit) {
                if new.same_limit(was) {
                    class.rate_limit = Some(was.clone());
                }
            }
        }
        for pool in &mut self.pools {
            let Some(prev) = old.pools.iter().find(|p| p.name == pool.name) else {
                continue;
            };
            pool.next.store(
                prev.next.load(std::sync::atomic::Ordering::Relaxed),
                std::sync::atomic::Ordering::Relaxed,
            );
            // Every server keeps its live state; a host-name entry that is still there keeps
            // its last answer until the next lookup.
            let was = prev.servers.load();
            let specs = &pool.specs;
            let servers = crate::upstream::build_servers(
                specs,
                &|i| {
                    was.iter()
                        .filter(|u| u.from == specs[i].address && u.zone == specs[i].zone)
                        .map(|u| u.socket)
                        .collect()
                },
                &was,
            );
            pool.servers.store(std::sync::Arc::new(servers));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub http: Vec<SocketAddr>,
    pub https: Vec<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub zone: String,
    pub trusted_proxies: Vec<IpNet>,
}

impl Network {
    pub fn is_trusted(&self, ip: std::net::IpAddr) -> bool {
        self.trusted_proxies.iter().any(|n| n.contains(&ip))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// Worker threads of the proxy service.
    pub threads: usize,
    /// On SIGTERM: how long in-flight requests may run before runtimes are stopped.
    pub grace_period: Duration,
    /// After the grace period: how long runtimes get to stop.
    pub shutdown_timeout: Duration,
    /// The socket a new erpgate (`run --upgrade`) takes the listeners over through.
    pub upgrade_sock: std::path::PathBuf,
    /// Largest request head (request line and headers) accepted; beyond it: 431.
    pub max_request_header: usize,
    /// How long a client connection may sit idle between requests (and how long the next
    /// request's head may take to arrive) before it is closed.
    pub keepalive_timeout: Duration,
    /// Each proxy thread runs on one CPU of those erpgate may use (read at start only).
    pub pin_threads: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    /// The servers as written in the file.
    pub specs: Vec<ServerSpec>,
    /// The servers requests go to now: one per IP entry, one per address a host name
    /// resolves to. Replaced whole when a name resolves differently; a request reads one
    /// snapshot.
    pub servers: arc_swap::ArcSwap<Vec<std::sync::Arc<Upstream>>>,
    /// Round-robin cursor.
    pub next: AtomicUsize,
    pub balance: crate::upstream::Balance,
    /// Zones to fail over to, in order, when this proxy's zone has no healthy server
    /// (empty: any other zone).
    pub failover_zones: Vec<String>,
    pub health: crate::upstream::HealthCheck,
    /// `Host` sent with health checks (default: the server's address as written).
    pub host: Option<String>,
    /// Most servers one request is tried on (connect failures, and retries of GET/HEAD
    /// where the class allows them).
    pub max_attempts: usize,
    /// How often host names are looked up again.
    pub resolve_interval: Duration,
    /// Session affinity: the cookie whose value picks the server.
    pub affinity: Option<String>,
    /// Per entry of `specs`: its last lookup failed (failures are logged when they start).
    pub resolve_failing: Vec<std::sync::atomic::AtomicBool>,
}

/// Default `max_attempts`: the first server and two more.
pub const DEFAULT_MAX_ATTEMPTS: usize = 3;
/// Largest `max_attempts` (Pingora's own cap on tries per request is set to it).
pub const MAX_ATTEMPTS_LIMIT: usize = 16;
/// Default `resolve_interval`.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);
/// Default `[server] keepalive_timeout` (Pingora's own wait for a first request).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);

impl Pool {
    /// Whether any server is given by host name (and so needs resolving).
    pub fn has_host_names(&self) -> bool {
        self.specs.iter().any(|s| s.socket.is_none())
    }
}

/// One `servers` entry of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// `host:port` as written in the file (host names lowercased).
    pub address: String,
    /// Set when the host is an IP literal; host names are resolved by the DNS refresh.
    pub socket: Option<SocketAddr>,
    pub zone: String,
    /// No new requests or sockets; those in flight finish.
    pub drain: bool,
}

/// One Odoo server requests go to.
#[derive(Debug)]
pub struct Upstream {
    /// `ip:port`.
    pub address: String,
    pub socket: SocketAddr,
    /// The entry it comes from, as written (a host name, or the same IP address).
    pub from: String,
    pub zone: String,
    /// No new requests or sockets; those in flight finish.
    pub drain: bool,
    /// Stable across processes and restarts (a hash of `address`): affinity keys on it.
    pub id: u64,
    /// Health and open connections, shared with the health checker; carried over a reload
    /// and a new DNS answer for the same address and zone.
    pub state: std::sync::Arc<crate::upstream::ServerState>,
}

impl Upstream {
    pub fn new(
        spec: &ServerSpec,
        socket: SocketAddr,
        state: std::sync::Arc<crate::upstream::ServerState>,
    ) -> Upstream {
        let address = socket.to_string();
        Upstream {
            id: crate::upstream::server_id(&address),
            address,
            socket,
            from: spec.address.clone(),
            zone: spec.zone.clone(),
            drain: spec.drain,
            state,
        }
    }
}

#[derive(Debug)]
pub struct Class {
    pub name: String,
    /// Empty: the class takes every request that reaches it.
    pub alternatives: Vec<Alternative>,
    pub pool: usize,
    pub timeouts: Timeouts,
    /// `None`: unlimited.
    pub max_body: Option<u64>,
    /// `None`: every client; otherwise only clients in these networks (others: 403).
    pub allow: Option<Vec<IpNet>>,
    /// Most requests of this class in flight at once (beyond: 503).
    pub max_in_flight: Option<usize>,
    /// Requests of this class in flight now.
    pub in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Every request of this class is written to the audit log.
    pub audit: bool,
    pub rate_limit: Option<std::sync::Arc<crate::policy::ratelimit::Limit>>,
    pub security_headers: SecurityHeaders,
    /// A GET or HEAD whose server failed after it was sent (reset, closed, read timeout)
    /// before any response reached the client is tried again on another server.
    pub retry_idempotent: bool,
    /// Requests over a connection without a client certificate from `[tls] client_ca` get
    /// 403.
    pub require_client_cert: bool,
    /// `maintenance = "block"`: answered 503 during maintenance windows.
    pub maintenance_block: bool,
}

/// Response headers added to a class's answers (`security_headers`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SecurityHeaders {
    /// `Strict-Transport-Security` value, sent on HTTPS requests only.
    pub hsts: Option<http::HeaderValue>,
    /// `X-Content-Type-Options: nosniff`.
    pub nosniff: bool,
    /// `Referrer-Policy` value.
    pub referrer_policy: Option<http::HeaderValue>,
    /// `Secure; SameSite=Lax` added to Odoo's `session_id` cookie on HTTPS requests.
    pub secure_session_cookie: bool,
}

impl SecurityHeaders {
    pub fn is_empty(&self) -> bool {
        *self == SecurityHeaders::default()
    }
}

impl Class {
    /// Whether `client` may use this class (its `allow` list, if any).
    pub fn allows(&self, client: std::net::IpAddr) -> bool {
        self.allow
            .as_ref()
            .is_none_or(|nets| nets.iter().any(|n| n.contains(&client)))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect to an Odoo server.
    pub connect: Duration,
    /// Longest wait for bytes from Odoo (the response head, each body read).
    pub read: Duration,
    /// Longest wait for bytes from the client (request body, upgraded sockets both ways).
    pub idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            read: Duration::from_secs(720),
            idle: Duration::from_secs(60),
        }
    }
}

/// Default body limit: Odoo's own default request size limit.
pub const DEFAULT_MAX_BODY: u64 = 128 * 1024 * 1024;
