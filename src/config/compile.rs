//! File form -> runtime form. Collects every error with its `line:col` and key path.

use super::file::{self, Str};
use super::locate::{line_col, path_at, remove_at};
use super::*;
use crate::classify::{Alternative, Cond, HostPattern};
use crate::policy::ratelimit::{parse_rate, KeySpec, Limit};
use crate::upstream::{Balance, HealthCheck};
use http::{HeaderName, Method};
use std::collections::HashMap;
use toml::de::DeTable;
use toml::Spanned;

/// Parses and compiles one configuration text. `file_name` is used in error messages;
/// `zone_override` (from `ERPGATE_ZONE`) replaces `[network] zone`.
pub fn parse(
    text: &str,
    file_name: &str,
    zone_override: Option<&str>,
) -> Result<Config, ConfigErrors> {
    let mut c = Compiler {
        text,
        file: file_name,
        errors: Vec::new(),
        removed: Vec::new(),
    };
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        for e in syntax {
            let pos = e.span().map_or(0, |s| s.start);
            c.error_at(pos, &path_at(root.get_ref(), pos), e.message().to_string());
        }
        return Err(c.finish());
    }
    let file = c.deserialize(root);
    let config = c.compile(file, zone_override);
    match config {
        Some(cfg) if c.errors.is_empty() => Ok(cfg),
        _ => Err(c.finish()),
    }
}

struct Compiler<'a> {
    text: &'a str,
    file: &'a str,
    errors: Vec<(usize, ConfigError)>,
    /// Key paths removed after a deserialization error (their defaults are not the
    /// operator's intent, so checks that depend on them are skipped).
    removed: Vec<String>,
}

impl Compiler<'_> {
    fn error_at(&mut self, pos: usize, path: &str, message: impl Into<String>) {
        let (line, col) = line_col(self.text, pos);
        self.errors.push((
            pos,
            ConfigError {
                file: self.file.to_string(),
                line,
                col,
                path: path.to_string(),
                message: message.into(),
            },
        ));
    }

    fn error<T>(&mut self, at: &Spanned<T>, path: &str, message: impl Into<String>) {
        self.error_at(at.span().start, path, message);
    }

    fn finish(mut self) -> ConfigErrors {
        self.errors.sort_by_key(|(pos, _)| *pos);
        ConfigErrors(self.errors.into_iter().map(|(_, e)| e).collect())
    }

    /// Deserializes the file form. A value of the wrong type or an unknown key is reported,
    /// removed, and deserialization runs again, so that every such error is reported at once.
    fn deserialize(&mut self, root: Spanned<DeTable<'_>>) -> file::File {
        let span = root.span();
        let mut table = root.into_inner();
        // Each round removes one entry, so this ends; the bound is a second guard.
        for _ in 0..10_000 {
            let de = toml::de::Deserializer::from(Spanned::new(span.clone(), table.clone()));
            match <file::File as serde::Deserialize>::deserialize(de) {
                Ok(f) => return f,
                Err(e) => {
                    let pos = e.span().map_or(0, |s| s.start);
                    let path = path_at(&table, pos);
                    self.error_at(pos, &path, e.message().to_string());
                    self.removed.push(path);
                    if e.span().is_none() || !remove_at(&mut table, pos) {
                        return file::File::default();
                    }
                }
            }
        }
        file::File::default()
    }

    fn compile(&mut self, f: file::File, zone_override: Option<&str>) -> Option<Config> {
        let listen = self.listen(f.listen);
        let network = self.network(f.network, zone_override);
        let server = self.server(f.server);
        let log = self.log(f.log);
        let pools = self.pools(f.pools, &network.zone);
        let classes = self.classes(f.class, &pools);
        let tls = self.tls(f.tls, listen.as_ref());
        let maintenance = f.maintenance.map(|m| self.maintenance(m));
        if tls.as_ref().is_none_or(|t| t.client_ca.is_none()) {
            if let Some(c) = classes.iter().find(|c| c.require_client_cert) {
                self.error_at(
                    0,
                    "tls.client_ca",
                    format!(
                        "class `{}` has `require_client_cert = true`: [tls] client_ca is needed",
                        c.name
                    ),
                );
            }
        }
        let audit_path = f.audit.and_then(|a| a.path).and_then(|p| {
            if p.get_ref().trim().is_empty() {
                self.error(&p, "audit.path", "must name a file");
                None
            } else {
                Some(std::path::PathBuf::from(p.get_ref()))
            }
        });
        if audit_path.is_none() && classes.iter().any(|c| c.audit) {
            self.error_at(
                0,
                "audit.path",
                "a class has `audit = true`: [audit] path is needed",
            );
        }
        let classes_match_host = classes.iter().any(|c| {
            c.alternatives
                .iter()
                .any(|a| a.conds().iter().any(|c| matches!(c, Cond::Host(_))))
        });
        Some(Config {
            classes_match_host,
            source: self.file.to_string(),
            source_hash: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(self.text.as_bytes())),
            listen: listen?,
            network,
            server,
            log,
            pools,
            classes,
            audit_path,
            tls,
            maintenance,
        })
    }

    fn listen(&mut self, l: Option<Spanned<file::Listen>>) -> Option<Listen> {
        let Some(l) = l else {
            self.error_at(
                0,
                "listen",
                "missing section [listen] with at least one `http` address",
            );
            return None;
        };
        let span = l.span();
        let l = l.into_inner();
        let mut addrs = |list: Option<Spanned<Vec<Str>>>, key: &str| {
            let mut out = Vec::new();
            if let Some(list) = list {
                if list.get_ref().is_empty() {
                    self.error(&list, key, "needs at least one address (or leave it out)");
                }
                for (i, a) in list.into_inner().into_iter().enumerate() {
                    if let Some(addr) = self.socket_addr(&a, &format!("{key}[{i}]")) {
                        out.push(addr);
                    }
                }
            }
            out
        };
        let (had_http, had_https) = (l.http.is_some(), l.https.is_some());
        let http = addrs(l.http, "listen.http");
        let https = addrs(l.https, "listen.https");
        if !had_http && !had_https {
            self.error_at(
                span.start,
                "listen.http",
                "missing key: at least one address to listen on (`http` or `https`)",
            );
        }
        let admin = l
            .admin
            .as_ref()
            .and_then(|a| self.socket_addr(a, "listen.admin"));
        Some(Listen { http, https, admin })
    }

    fn socket_addr(&mut self, s: &Str, path: &str) -> Option<SocketAddr> {
        match s.get_ref().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                self.error(
                    s,
                    path,
                    format!(
                        "`{}` is not an IP:port address (e.g. \"0.0.0.0:8080\" or \"[::]:8080\")",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn network(&mut self, n: Option<file::Network>, zone_override: Option<&str>) -> Network {
        let n = n.unwrap_or_default();
        let mut zone = match &n.zone {
            Some(z) => self.name(z, "network.zone").unwrap_or_default(),
            None => "local".to_string(),
        };
        if let Some(z) = zone_override {
            zone = z.to_string();
        }
        let mut trusted_proxies = Vec::new();
        for (i, s) in n.trusted_proxies.unwrap_or_default().iter().enumerate() {
            if let Some(net) = self.cidr(s, &format!("network.trusted_proxies[{i}]")) {
                trusted_proxies.push(net);
            }
        }
        Network {
            zone,
            trusted_proxies,
        }
    }

    fn cidr(&mut self, s: &Str, path: &str) -> Option<IpNet> {
        let v = s.get_ref().trim();
        if let Ok(net) = v.parse::<IpNet>() {
            return Some(net.trunc());
        }
        if let Ok(ip) = v.parse::<std::net::IpAddr>() {
            return Some(IpNet::from(ip));
        }
        self.error(
            s,
            path,
            format!("`{v}` is not an IP network (e.g. \"10.0.0.0/8\" or \"::1/128\")"),
        );
        None
    }

    /// A name: zone, pool or class. Letters, digits, `-`, `_`, `.`.
    fn name(&mut self, s: &Str, path: &str) -> Option<String> {
        let v = s.get_ref();
        let ok = !v.is_empty()
            && v.len() <= 64
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Some(v.clone())
        } else {
            self.error(
                s,
                path,
                format!("`{v}` is not a valid name (1-64 of a-z, A-Z, 0-9, '-', '_', '.')"),
            );
            None
        }
    }

    fn server(&mut self, s: Option<file::Server>) -> ServerSettings {
        let s = s.unwrap_or_default();
        let threads = match &s.threads {
            Some(t) if (1..=1024).contains(t.get_ref()) => *t.get_ref() as usize,
            Some(t) => {
                self.error(t, "server.threads", "must be between 1 and 1024");
                1
            }
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        ServerSettings {
            threads,
            grace_period: self.duration_or(
                &s.grace_period,
                "server.grace_period",
                Duration::from_secs(5),
            ),
            shutdown_timeout: self.duration_or(
                &s.shutdown_timeout,
                "server.shutdown_timeout",
                Duration::from_secs(5),
            ),
            upgrade_sock: s
                .upgrade_sock
                .as_ref()
                .map(|p| std::path::PathBuf::from(p.get_ref()))
                .unwrap_or_else(|| std::env::temp_dir().join("erpgate_upgrade.sock")),
            max_request_header: match &s.max_request_header {
                Some(v) => match self.size(v, "server.max_request_header") {
                    Some(n) if (1024..=1024 * 1024).contains(&n) => n as usize,
                    Some(_) => {
                        self.error(
                            v,
                            "server.max_request_header",
                            "must be between 1KiB and 1MiB",
                        );
                        64 * 1024
                    }
                    None => 64 * 1024,
                },
                None => 64 * 1024,
            },
            keepalive_timeout: self.duration_or(
                &s.keepalive_timeout,
                "server.keepalive_timeout",
                DEFAULT_KEEPALIVE_TIMEOUT,
            ),
            pin_threads: s.pin_threads.unwrap_or(false),
        }
    }

    fn log(&mut self, l: Option<file::Log>) -> LogSettings {
        let l = l.unwrap_or_default();
        let format = match &l.format {
            None => LogFormat::Human,
            Some(f) => match f.get_ref().as_str() {
                "human" => LogFormat::Human,
                "json" => LogFormat::Json,
                other => {
                    self.error(
                        f,
                        "log.format",
                        format!("`{other}` is not one of \"human\", \"json\""),
                    );
                    LogFormat::Human
                }
            },
        };
        let level = match &l.level {
            None => "info".to_string(),
            Some(v) => {
                if tracing_subscriber::EnvFilter::try_new(v.get_ref()).is_err() {
                    self.error(
                        v,
                        "log.level",
                        format!(
                            "`{}` is not a level or filter (e.g. \"info\", \"warn,erpgate=debug\")",
                            v.get_ref()
                        ),
                    );
                }
                v.get_ref().clone()
            }
        };
        LogSettings { format, level }
    }

    fn duration(&mut self, s: &Str, path: &str) -> Option<Duration> {
        match humantime::parse_duration(s.get_ref().trim()) {
            Ok(d) if d > Duration::ZERO => Some(d),
            Ok(_) => {
                self.error(s, path, "must be longer than zero");
                None
            }
            Err(_) => {
                self.error(
                    s,
                    path,
                    format!(
                        "`{}` is not a duration (e.g. \"750ms\", \"5s\", \"1m\", \"2h\")",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn duration_or(&mut self, s: &Option<Str>, path: &str, default: Duration) -> Duration {
        s.as_ref()
            .and_then(|s| self.duration(s, path))
            .unwrap_or(default)
    }

    fn size(&mut self, s: &Str, path: &str) -> Option<u64> {
        match parse_size(s.get_ref()) {
            Some(n) => Some(n),
            None => {
                self.error(
                    s,
                    path,
                    format!(
                        "`{}` is not a size (e.g. \"512KiB\", \"128MiB\", \"1GiB\")",
                        s.get_ref()
                    ),
                );
                None
            }
        }
    }

    fn pools(
        &mut self,
        p: Option<Spanned<file::Named<Spanned<file::Pool>>>>,
        own_zone: &str,
    ) -> Vec<Pool> {
        let Some(p) = p else {
            self.error_at(
                0,
                "pools",
                "missing: at least one [pools.NAME] with servers",
            );
            return Vec::new();
        };
        let all_span = p.span();
        let mut out: Vec<Pool> = Vec::new();
        for (name, pool) in p.into_inner().0 {
            let path = format!("pools.{}", name.get_ref());
            let Some(pname) = self.name(&name, &path) else {
                continue;
            };
            let pspan = pool.span();
            let pool = pool.into_inner();
            let mut servers = Vec::new();
            match pool.servers {
                Some(list) if !list.get_ref().is_empty() => {
                    for (i, s) in list.into_inner().into_iter().enumerate() {
                        let spath = format!("{path}.servers[{i}]");
                        let sspan = s.span();
                        let s = s.into_inner();
                        let Some(addr) = s.address else {
                            self.error_at(
                                sspan.start,
                                &format!("{spath}.address"),
                                "missing key: the server's host:port",
                            );
                            continue;
                        };
                        let zone = match &s.zone {
                            Some(z) => self.name(z, &format!("{spath}.zone")),
                            None => Some(own_zone.to_string()),
                        };
                        if let (Some(u), Some(zone)) =
                            (self.upstream(&addr, &format!("{spath}.address")), zone)
                        {
                            if servers.iter().any(|o: &ServerSpec| o.address == u.0) {
                                self.error(
                                    &addr,
                                    &format!("{spath}.address"),
                                    format!("`{}` is listed twice in this pool", u.0),
                                );
                            }
                            servers.push(ServerSpec {
                                address: u.0,
                                socket: u.1,
                                zone,
                                drain: s.drain.unwrap_or(false),
                            });
                        }
                    }
                }
                Some(list) => self.error(
                    &list,
                    &format!("{path}.servers"),
                    "a pool needs at least one server",
                ),
                None => self.error_at(
                    pspan.start,
                    &format!("{path}.servers"),
                    "missing key: a pool needs at least one server",
                ),
            }
            let balance = match pool.balance.as_ref().map(|b| (b, b.get_ref().as_str())) {
                None | Some((_, "round_robin")) => Balance::RoundRobin,
                Some((_, "least_conn")) => Balance::LeastConn,
                Some((b, other)) => {
                    self.error(
                        b,
                        &format!("{path}.balance"),
                        format!("`{other}` is not one of \"round_robin\", \"least_conn\""),
                    );
                    Balance::RoundRobin
                }
            };
            let failover_zones = pool
                .failover_zones
                .iter()
                .flatten()
                .enumerate()
                .filter_map(|(i, z)| self.name(z, &format!("{path}.failover_zones[{i}]")))
                .collect();
            let health = match &pool.health_check {
                Some(h) => self.health_check(h.get_ref(), &format!("{path}.health_check")),
                None => HealthCheck::default(),
            };
            let host =
                pool.host
                    .as_ref()
                    .and_then(|h| match http::HeaderValue::from_str(h.get_ref()) {
                        Ok(_) if !h.get_ref().trim().is_empty() => {
                            Some(h.get_ref().trim().to_string())
                        }
                        _ => {
                            self.error(h, &format!("{path}.host"), "not a valid Host header value");
                            None
                        }
                    });
            let max_attempts = match &pool.max_attempts {
                None => crate::config::DEFAULT_MAX_ATTEMPTS,
                Some(n) if (1..=MAX_ATTEMPTS_LIMIT as i64).contains(n.get_ref()) => {
                    *n.get_ref() as usize
                }
                Some(n) => {
                    self.error(
                        n,
                        &format!("{path}.max_attempts"),
                        format!("must be between 1 and {MAX_ATTEMPTS_LIMIT}"),
                    );
                    crate::config::DEFAULT_MAX_ATTEMPTS
                }
            };
            let resolve_interval = pool
                .resolve_interval
                .as_ref()
                .and_then(|d| self.duration(d, &format!("{path}.resolve_interval")))
                .unwrap_or(DEFAULT_RESOLVE_INTERVAL);
            let affinity = pool
                .affinity
                .as_ref()
                .and_then(|a| self.affinity(a, &format!("{path}.affinity")));
            let initial = crate::upstream::build_servers(&servers, &|_| Vec::new(), &[]);
            out.push(Pool {
                name: pname,
                max_attempts,
                resolve_failing: servers.iter().map(|_| Default::default()).collect(),
                specs: servers,
                servers: arc_swap::ArcSwap::from_pointee(initial),
                resolve_interval,
                affinity,
                next: AtomicUsize::new(0),
                balance,
                failover_zones,
                health,
                host,
            });
        }
        if out.is_empty() {
            self.error_at(all_span.start, "pools", "at least one pool is needed");
        }
        out
    }

    fn tls(&mut self, t: Option<Spanned<file::Tls>>, listen: Option<&Listen>) -> Option<Tls> {
        let https = listen.is_some_and(|l| !l.https.is_empty());
        let Some(t) = t else {
            if https {
                self.error_at(
                    0,
                    "tls",
                    "`listen.https` needs a [tls] section with certificates",
                );
            }
            return None;
        };
        let span = t.span();
        let t = t.into_inner();
        let mut certificates = Vec::new();
        match t.certificates {
            Some(list) if !list.get_ref().is_empty() => {
                for (i, e) in list.into_inner().into_iter().enumerate() {
                    let path = format!("tls.certificates[{i}]");
                    let espan = e.span();
                    let e = e.into_inner();
                    let (Some(cert), Some(key)) = (e.cert, e.key) else {
                        self.error_at(espan.start, &path, "needs both `cert` and `key` files");
                        continue;
                    };
                    let (cp, kp) = (
                        std::path::PathBuf::from(cert.get_ref()),
                        std::path::PathBuf::from(key.get_ref()),
                    );
                    match crate::tls::load_pair(&cp, &kp) {
                        Ok(l) => certificates.push(l),
                        Err(e) => self.error(&cert, &format!("{path}.cert"), e),
                    }
                }
            }
            _ => self.error_at(
                span.start,
                "tls.certificates",
                "missing key: at least one { cert = FILE, key = FILE }",
            ),
        }
        let tls13_only = match t.min_version.as_ref().map(|v| (v, v.get_ref().trim())) {
            None | Some((_, "1.2")) => false,
            Some((_, "1.3")) => true,
            Some((v, other)) => {
                self.error(
                    v,
                    "tls.min_version",
                    format!(
                        "`{other}` is not \"1.2\" or \"1.3\" (older versions are never offered)"
                    ),
                );
                false
            }
        };
        let redirect_port = match &t.redirect_port {
            None => 443,
            Some(p) if (1..=65535).contains(p.get_ref()) => *p.get_ref() as u16,
            Some(p) => {
                self.error(p, "tls.redirect_port", "must be between 1 and 65535");
                443
            }
        };
        let mut redirect_exempt = Vec::new();
        for (i, p) in t.redirect_exempt.iter().flatten().enumerate() {
            if p.get_ref().starts_with('/') {
                redirect_exempt.push(p.get_ref().clone());
            } else {
                self.error(
                    p,
                    &format!("tls.redirect_exempt[{i}]"),
                    "a path prefix starts with `/`",
                );
            }
        }
        if t.redirect_exempt.is_none() {
            redirect_exempt.push("/web/health".to_string());
        }
        let hsts = self
            .security_headers(
                &file::SecurityHeaders {
                    hsts: t.hsts.clone(),
                    ..Default::default()
                },
                "tls",
            )
            .hsts;
        let client_ca = t.client_ca.as_ref().and_then(|c| {
            let path = std::path::PathBuf::from(c.get_ref());
            match crate::tls::load_roots(&path) {
                Ok(roots) => Some((path, std::sync::Arc::new(roots))),
                Err(e) => {
                    self.error(c, "tls.client_ca", e);
                    None
                }
            }
        });
        Some(Tls {
            certificates,
            tls13_only,
            redirect_http: t.redirect_http.unwrap_or(false),
            redirect_port,
            redirect_exempt,
            hsts,
            client_ca,
        })
    }

    fn maintenance(&mut self, m: Spanned<file::Maintenance>) -> Maintenance {
        let m = m.into_inner();
        let mut windows = Vec::new();
        for (i, w) in m.windows.unwrap_or_default().into_iter().enumerate() {
            let path = format!("maintenance.windows[{i}]");
            let span = w.span();
            let w = w.into_inner();
            let time = |c: &mut Self, v: &Option<Str>, key: &str| -> Option<i64> {
                let Some(v) = v else {
                    c.error_at(
                        span.start,
                        &format!("{path}.{key}"),
                        "missing key: a UTC time such as \"2026-12-31T18:00Z\"",
                    );
                    return None;
                };
                let t = parse_time(v.get_ref());
                if t.is_none() {
                    c.error(
                        v,
                        &format!("{path}.{key}"),
                        format!("`{}` is not a time such as \"2026-12-31T18:00Z\" or \"2026-12-31T19:00+01:00\"", v.get_ref()),
                    );
                }
                t
            };
            let (start, end) = (time(self, &w.start, "start"), time(self, &w.end, "end"));
            if let (Some(s), Some(e)) = (start, end) {
                if e <= s {
                    self.error_at(span.start, &path, "`end` must be after `start`");
                } else {
                    windows.push((s, e));
                }
            }
        }
        let page = m
            .page
            .as_ref()
            .and_then(|p| match std::fs::read(p.get_ref()) {
                Ok(b) => Some(bytes::Bytes::from(b)),
                Err(e) => {
                    self.error(
                        p,
                        "maintenance.page",
                        format!("cannot read {}: {e}", p.get_ref()),
                    );
                    None
                }
            });
        let mut allow = Vec::new();
        for (i, s) in m.allow.unwrap_or_default().iter().enumerate() {
            if let Some(net) = self.cidr(s, &format!("maintenance.allow[{i}]")) {
                allow.push(net);
            }
        }
        Maintenance {
            enabled: m.enabled.unwrap_or(false),
            windows,
            page,
            allow,
        }
    }

    /// `cookie:NAME`: the cookie whose value keys session affinity.
    fn affinity(&mut self, s: &Str, path: &str) -> Option<String> {
        let v = s.get_ref().trim();
        match v.strip_prefix("cookie:") {
            Some(name) if !name.is_empty() && name.bytes().all(is_cookie_name_byte) => {
                Some(name.to_string())
            }
            _ => {
                self.error(
                    s,
                    path,
                    format!(
                        "`{v}` is not `cookie:NAME` (Odoo's session cookie: \"cookie:session_id\")"
                    ),
                );
                None
            }
        }
    }

    /// `host:port` where host is an IP literal (IPv6 in brackets) or a DNS name.
    fn upstream(&mut self, s: &Str, path: &str) -> Option<(String, Option<SocketAddr>)> {
        let v = s.get_ref().trim();
        if let Ok(sa) = v.parse::<SocketAddr>() {
            return Some((sa.to_string(), Some(sa)));
        }
        let bad = |c: &mut Self| {
            c.error(s, path, format!("`{v}` is not a host:port address (e.g. \"127.0.0.1:8069\" or \"odoo-web:8069\")"));
            None
        };
        let Some((host, port)) = v.rsplit_once(':') else {
            return bad(self);
        };
        let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0);
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
        if port_ok && host_ok {
            Some((v.to_ascii_lowercase(), None))
        } else {
            bad(self)
        }
    }

    fn classes(&mut self, list: Option<Vec<Spanned<file::Class>>>, pools: &[Pool]) -> Vec<Class> {
        let list = list.unwrap_or_default();
        if list.is_empty() {
            self.error_at(0, "class", "missing: at least one [[class]]");
        }
        let mut out: Vec<Class> = Vec::new();
        let mut names: HashMap<String, usize> = HashMap::new();
        // (class index in `out`, alternative spans) for the shadowing check.
        let mut seen: Vec<(String, Vec<Alternative>)> = Vec::new();
        for (i, c) in list.into_iter().enumerate() {
            let path = format!("class[{i}]");
            let cspan = c.span();
            let c = c.into_inner();
            let name = match &c.name {
                Some(n) => {
                    match self.name(n, &format!("{path}.name")) {
                        Some(name) => {
                            if let Some(first) = names.get(&name) {
                                self.error(n, &format!("{path}.name"), format!("duplicate class name `{name}` (first used by class[{first}])"));
                            }
                            names.insert(name.clone(), i);
                            Some(name)
                        }
                        None => None,
                    }
                }
                None => {
                    self.error_at(
                        cspan.start,
                        &format!("{path}.name"),
                        "missing key: every class needs a name",
                    );
                    None
                }
            };
            let pool = match &c.pool {
                Some(p) => match pools.iter().position(|x| &x.name == p.get_ref()) {
                    Some(ix) => Some(ix),
                    None => {
                        let known: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
                        self.error(
                            p,
                            &format!("{path}.pool"),
                            format!(
                                "unknown pool `{}` (pools: {})",
                                p.get_ref(),
                                known.join(", ")
                            ),
                        );
                        None
                    }
                },
                None => {
                    self.error_at(
                        cspan.start,
                        &format!("{path}.pool"),
                        "missing key: the pool this class is sent to",
                    );
                    None
                }
            };
            let mut timeouts = Timeouts::default();
            if let Some(t) = &c.timeouts {
                let t = t.get_ref();
                timeouts.connect = self.duration_or(
                    &t.connect,
                    &format!("{path}.timeouts.connect"),
                    timeouts.connect,
                );
                timeouts.read =
                    self.duration_or(&t.read, &format!("{path}.timeouts.read"), timeouts.read);
                timeouts.idle =
                    self.duration_or(&t.idle, &format!("{path}.timeouts.idle"), timeouts.idle);
            }
            let max_body = match &c.max_body {
                Some(v) if v.get_ref() == "unlimited" => None,
                Some(v) => self
                    .size(v, &format!("{path}.max_body"))
                    .or(Some(DEFAULT_MAX_BODY)),
                None => Some(DEFAULT_MAX_BODY),
            };
            let allow = c.allow.as_ref().map(|list| {
                list.iter()
                    .enumerate()
                    .filter_map(|(j, s)| self.cidr(s, &format!("{path}.allow[{j}]")))
                    .collect::<Vec<_>>()
            });
            let max_in_flight = match &c.max_in_flight {
                Some(n) if *n.get_ref() >= 1 && *n.get_ref() <= 1_000_000 => {
                    Some(*n.get_ref() as usize)
                }
                Some(n) => {
                    self.error(
                        n,
                        &format!("{path}.max_in_flight"),
                        "must be between 1 and 1000000",
                    );
                    None
                }
                None => None,
            };
            let rate_limit = c
                .rate_limit
                .as_ref()
                .and_then(|r| self.rate_limit(r, &format!("{path}.rate_limit")));
            let security_headers = c
                .security_headers
                .as_ref()
                .map(|h| self.security_headers(h.get_ref(), &format!("{path}.security_headers")))
                .unwrap_or_default();
            let mut alternatives = Vec::new();
            let errors_before = self.errors.len();
            if let Some(m) = c.matches {
                if m.get_ref().0.is_empty() {
                    self.error(
                        &m,
                        &format!("{path}.match"),
                        "an empty list never matches; leave `match` out to take every request",
                    );
                }
                let whole = m.span();
                for (j, alt) in m.into_inner().0.into_iter().enumerate() {
                    let apath = format!("{path}.match[{j}]");
                    let alt = if alt.span() == (0..0) {
                        Spanned::new(whole.clone(), alt.into_inner())
                    } else {
                        alt
                    };
                    if let Some(a) = self.alternative(alt, &apath) {
                        alternatives.push(a);
                    }
                }
            }
            let match_broken = self.errors.len() > errors_before
                || self
                    .removed
                    .iter()
                    .any(|r| r.starts_with(&format!("{path}.match")));
            // Shadowing: every alternative of this class is already taken by an earlier class.
            if let (Some(name), false) = (&name, match_broken) {
                let shadow = if alternatives.is_empty() {
                    seen.iter()
                        .find(|(_, alts)| alts.is_empty())
                        .map(|(n, _)| n.clone())
                } else {
                    let mut by = None;
                    let all = alternatives.iter().all(|a| {
                        match seen.iter().find(|(_, earlier)| {
                            earlier.is_empty() || earlier.iter().any(|e| e.covers(a))
                        }) {
                            Some((n, _)) => {
                                by.get_or_insert_with(|| n.clone());
                                true
                            }
                            None => false,
                        }
                    });
                    if all {
                        by
                    } else {
                        None
                    }
                };
                if let Some(by) = shadow {
                    self.error_at(cspan.start, &path, format!("class `{name}` can never match: class `{by}` before it takes all its requests"));
                }
                seen.push((name.clone(), alternatives.clone()));
            }
            let maintenance_block = match &c.maintenance {
                // By default the classes finance users and integrations come through.
                None => name
                    .as_deref()
                    .is_some_and(|n| n == "user" || n == "integration"),
                Some(m) => match m.get_ref().as_str() {
                    "block" => true,
                    "pass" => false,
                    other => {
                        self.error(
                            m,
                            &format!("{path}.maintenance"),
                            format!("`{other}` is not \"block\" or \"pass\""),
                        );
                        false
                    }
                },
            };
            if let (Some(name), Some(pool)) = (name, pool) {
                out.push(Class {
                    name,
                    alternatives,
                    pool,
                    timeouts,
                    max_body,
                    allow,
                    max_in_flight,
                    in_flight: Default::default(),
                    audit: c.audit.unwrap_or(false),
                    rate_limit,
                    security_headers,
                    retry_idempotent: c.retry_idempotent.unwrap_or(false),
                    require_client_cert: c.require_client_cert.unwrap_or(false),
                    maintenance_block,
                });
            }
        }
        out
    }

    fn health_check(&mut self, h: &file::HealthCheck, path: &str) -> HealthCheck {
        let d = HealthCheck::default();
        let count = |c: &mut Self, v: &Option<Spanned<i64>>, key: &str, default: u32| match v {
            Some(n) if (1..=100).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                c.error(n, &format!("{path}.{key}"), "must be between 1 and 100");
                default
            }
            None => default,
        };
        let check_path = match (&h.path, h.tcp) {
            (Some(p), Some(true)) => {
                self.error(
                    p,
                    &format!("{path}.path"),
                    "`path` and `tcp = true` exclude each other",
                );
                None
            }
            (_, Some(true)) => None,
            (Some(p), _) if p.get_ref().starts_with('/') => Some(p.get_ref().clone()),
            (Some(p), _) => {
                self.error(p, &format!("{path}.path"), "must start with '/'");
                d.path.clone()
            }
            (None, _) => d.path.clone(),
        };
        let status = match &h.status {
            Some(s) if (100..=599).contains(s.get_ref()) => *s.get_ref() as u16,
            Some(s) => {
                self.error(
                    s,
                    &format!("{path}.status"),
                    "must be an HTTP status (100-599)",
                );
                d.status
            }
            None => d.status,
        };
        let interval = self.duration_or(&h.interval, &format!("{path}.interval"), d.interval);
        let timeout = self.duration_or(&h.timeout, &format!("{path}.timeout"), d.timeout);
        HealthCheck {
            path: check_path,
            status,
            interval,
            timeout,
            healthy_after: count(self, &h.healthy_after, "healthy_after", d.healthy_after),
            unhealthy_after: count(
                self,
                &h.unhealthy_after,
                "unhealthy_after",
                d.unhealthy_after,
            ),
        }
    }

    fn security_headers(
        &mut self,
        h: &file::SecurityHeaders,
        path: &str,
    ) -> crate::config::SecurityHeaders {
        let value =
            |c: &mut Self, v: &Option<Str>, key: &str, check: fn(&str) -> bool, what: &str| {
                let v = v.as_ref()?;
                match http::HeaderValue::from_str(v.get_ref().trim()) {
                    Ok(hv) if check(v.get_ref().trim()) => Some(hv),
                    _ => {
                        c.error(
                            v,
                            &format!("{path}.{key}"),
                            format!("`{}` is not {what}", v.get_ref()),
                        );
                        None
                    }
                }
            };
        let hsts = value(
            self,
            &h.hsts,
            "hsts",
            |v| {
                v.split(';')
                    .next()
                    .and_then(|d| d.trim().strip_prefix("max-age="))
                    .is_some_and(|n| n.parse::<u64>().is_ok())
            },
            "a Strict-Transport-Security value such as \"max-age=31536000; includeSubDomains\"",
        );
        let referrer_policy = value(
            self,
            &h.referrer_policy,
            "referrer_policy",
            |v| {
                v.split(',').all(|p| {
                    matches!(
                        p.trim(),
                        "no-referrer"
                            | "no-referrer-when-downgrade"
                            | "origin"
                            | "origin-when-cross-origin"
                            | "same-origin"
                            | "strict-origin"
                            | "strict-origin-when-cross-origin"
                            | "unsafe-url"
                    )
                })
            },
            "a Referrer-Policy such as \"strict-origin-when-cross-origin\" or \"same-origin\"",
        );
        crate::config::SecurityHeaders {
            hsts,
            nosniff: h.nosniff.unwrap_or(false),
            referrer_policy,
            secure_session_cookie: h.secure_session_cookie.unwrap_or(false),
        }
    }

    fn rate_limit(
        &mut self,
        r: &Spanned<file::RateLimit>,
        path: &str,
    ) -> Option<std::sync::Arc<Limit>> {
        let at = r.span().start;
        let r = r.get_ref();
        let spec = match &r.key {
            Some(k) => match KeySpec::parse(k.get_ref()) {
                Some(spec) => Some(spec),
                None => {
                    self.error(k, &format!("{path}.key"), format!("`{}` is not one of \"client_ip\", \"host\", \"global\", \"header:NAME\", \"integration_client\"", k.get_ref()));
                    None
                }
            },
            None => {
                self.error_at(
                    at,
                    &format!("{path}.key"),
                    "missing key: what requests are counted by",
                );
                None
            }
        };
        let rate = match &r.rate {
            Some(v) => match parse_rate(v.get_ref()) {
                Some(rate) => Some(rate),
                None => {
                    self.error(
                        v,
                        &format!("{path}.rate"),
                        format!(
                            "`{}` is not a rate (e.g. \"100/s\", \"10/min\", \"500/h\")",
                            v.get_ref()
                        ),
                    );
                    None
                }
            },
            None => {
                self.error_at(
                    at,
                    &format!("{path}.rate"),
                    "missing key: e.g. rate = \"100/s\"",
                );
                None
            }
        };
        let burst = match &r.burst {
            Some(b) if (1..=1_000_000).contains(b.get_ref()) => Some(*b.get_ref() as u32),
            Some(b) => {
                self.error(b, &format!("{path}.burst"), "must be between 1 and 1000000");
                None
            }
            None => rate.map(|(n, _)| n),
        };
        let (spec, (n, period), burst) = (spec?, rate?, burst?);
        match Limit::new(spec, n, period, burst) {
            Some(l) => Some(std::sync::Arc::new(l)),
            None => {
                self.error_at(
                    at,
                    path,
                    "this rate is too high to enforce (more than one request per nanosecond)",
                );
                None
            }
        }
    }

    fn alternative(&mut self, alt: Spanned<file::Match>, path: &str) -> Option<Alternative> {
        let span = alt.span();
        let m = alt.into_inner();
        let mut conds = Vec::new();
        let mut ok = true;
        let mut url_path = |c: &mut Self, s: &Option<Str>, key: &str| -> Option<String> {
            let s = s.as_ref()?;
            if s.get_ref().starts_with('/') {
                Some(s.get_ref().clone())
            } else {
                c.error(s, &format!("{path}.{key}"), "must start with '/'");
                ok = false;
                None
            }
        };
        if let Some(p) = url_path(self, &m.path, "path") {
            conds.push(Cond::Path(p));
        }
        if let Some(p) = url_path(self, &m.path_prefix, "path_prefix") {
            conds.push(Cond::PathPrefix(p));
        }
        if let Some(ms) = &m.method {
            let mut methods = Vec::new();
            for v in &ms.get_ref().0 {
                match Method::from_bytes(v.to_ascii_uppercase().as_bytes()) {
                    Ok(x) if !v.is_empty() => methods.push(x),
                    _ => {
                        self.error(
                            ms,
                            &format!("{path}.method"),
                            format!("`{v}` is not an HTTP method"),
                        );
                        ok = false;
                    }
                }
            }
            if methods.is_empty() && ok {
                self.error(ms, &format!("{path}.method"), "needs at least one method");
                ok = false;
            }
            conds.push(Cond::Method(methods));
        }
        if let Some(h) = &m.host {
            match HostPattern::parse(h.get_ref()) {
                Some(p) => conds.push(Cond::Host(p)),
                None => {
                    self.error(
                        h,
                        &format!("{path}.host"),
                        format!("`{}` is not a host name or *.wildcard", h.get_ref()),
                    );
                    ok = false;
                }
            }
        }
        match (&m.header, &m.value_prefix) {
            (Some(h), vp) => match HeaderName::from_bytes(h.get_ref().as_bytes()) {
                Ok(name) => conds.push(Cond::header(
                    name,
                    vp.as_ref().map(|v| v.get_ref().to_ascii_lowercase()),
                )),
                Err(_) => {
                    self.error(
                        h,
                        &format!("{path}.header"),
                        format!("`{}` is not a header name", h.get_ref()),
                    );
                    ok = false;
                }
            },
            (None, Some(vp)) => {
                self.error(
                    vp,
                    &format!("{path}.value_prefix"),
                    "needs `header` in the same alternative",
                );
                ok = false;
            }
            (None, None) => {}
        }
        if let Some(svc) = &m.jsonrpc_service {
            let name = svc.get_ref().trim();
            if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                self.error(
                    svc,
                    &format!("{path}.jsonrpc_service"),
                    "must be an Odoo service name such as \"db\", \"common\" or \"object\"",
                );
                ok = false;
            } else if m.path.is_none() && m.path_prefix.is_none() {
                self.error(
                    svc,
                    &format!("{path}.jsonrpc_service"),
                    "needs `path` (or `path_prefix`) in the same alternative: erpgate reads only the bodies of those paths",
                );
                ok = false;
            } else {
                conds.push(Cond::JsonRpcService(name.to_string()));
            }
        }
        if conds.is_empty() && ok {
            self.error_at(
                span.start,
                path,
                "an empty alternative matches every request; leave `match` out instead",
            );
            ok = false;
        }
        ok.then(|| Alternative::new(conds))
    }
}

/// `"512"`, `"64KiB"`, `"128MiB"`, `"1GiB"`, `"10MB"`: bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(digits);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

#[cfg(test)]
mod tests;

/// A byte of an RFC 6265 cookie name (an HTTP token).
fn is_cookie_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A time like `2026-12-31T18:00Z`, `2026-12-31T18:00:00Z` or with an offset
/// (`2026-12-31T19:00+01:00`): Unix seconds.
pub(crate) fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Some(t.timestamp());
    }
    if let Some(utc) = s.strip_suffix('Z').or_else(|| s.strip_suffix('z')) {
        return chrono::NaiveDateTime::parse_from_str(utc, "%Y-%m-%dT%H:%M")
            .ok()
            .map(|t| t.and_utc().timestamp());
    }
    chrono::DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M%:z")
        .ok()
        .map(|t| t.timestamp())
}
