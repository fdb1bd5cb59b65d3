//! Prometheus metrics, served on the admin listener's `/metrics`.
//!
//! Counters and histograms are updated where things happen (one line per request in the
//! logging phase, reloads where they run); gauges of live state (server health, open
//! connections, in-flight requests, certificate expiry, config generation) are read from
//! that state when scraped, so they are never stale.

use crate::config::Config;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::cell::RefCell;
use std::sync::OnceLock;

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub duration: HistogramVec,
    pub denied: IntCounterVec,
    pub rate_limited: IntCounterVec,
    pub retries: IntCounterVec,
    pub failovers: IntCounterVec,
    pub websockets: IntGaugeVec,
    pub config_reloads: IntCounterVec,
    pub cert_reloads: IntCounterVec,
    config_generation: IntGauge,
    in_flight: IntGaugeVec,
    upstream_healthy: IntGaugeVec,
    upstream_open: IntGaugeVec,
    cert_expiry: IntGaugeVec,
    maintenance: IntGauge,
}

/// Request duration buckets: a click (5 ms) to Odoo's longest report (`limit_time_real` and
/// beyond).
const BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new();
    let counter =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
    let gauge =
        |name: &str, help: &str, labels: &[&str]| -> Result<IntGaugeVec, prometheus::Error> {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
    let duration = HistogramVec::new(
        HistogramOpts::new(
            "erpgate_request_duration_seconds",
            "Time from the request head to the end of the answer (WebSockets: their lifetime)",
        )
        .buckets(BUCKETS.to_vec()),
        &["class"],
    )?;
    registry.register(Box::new(duration.clone()))?;
    let config_generation = IntGauge::new(
        "erpgate_config_generation",
        "Configs taken since start (1: the one it started with)",
    )?;
    registry.register(Box::new(config_generation.clone()))?;
    let maintenance = IntGauge::new(
        "erpgate_maintenance_active",
        "1 while a maintenance window is on",
    )?;
    registry.register(Box::new(maintenance.clone()))?;
    Ok(Metrics {
        requests: counter(
            "erpgate_requests_total",
            "Requests answered, by class, pool, zone of the Odoo server and status",
            &["class", "pool", "zone", "status"],
        )?,
        duration,
        denied: counter(
            "erpgate_denied_total",
            "Requests refused by policy (ip: allowlist, client_cert, maintenance, capacity, body_too_large)",
            &["class", "reason"],
        )?,
        rate_limited: counter(
            "erpgate_rate_limited_total",
            "Requests refused with 429 by the class's rate limit",
            &["class"],
        )?,
        retries: counter(
            "erpgate_upstream_retries_total",
            "Requests sent again to another server (connect failures, retry_idempotent)",
            &["pool"],
        )?,
        failovers: counter(
            "erpgate_failover_requests_total",
            "Requests served by a server outside this proxy's zone",
            &["pool", "zone"],
        )?,
        websockets: gauge(
            "erpgate_websockets_open",
            "Upgraded connections (WebSockets) open now",
            &["class"],
        )?,
        config_reloads: counter(
            "erpgate_config_reloads_total",
            "Config reloads, by result (ok, error)",
            &["result"],
        )?,
        cert_reloads: counter(
            "erpgate_tls_cert_reloads_total",
            "Certificate file reloads, by result (ok, error)",
            &["result"],
        )?,
        config_generation,
        in_flight: gauge(
            "erpgate_in_flight_requests",
            "Requests in flight now, by class",
            &["class"],
        )?,
        upstream_healthy: gauge(
            "erpgate_upstream_healthy",
            "1 when the Odoo server takes requests (health checks), 0 when down",
            &["pool", "server", "zone"],
        )?,
        upstream_open: gauge(
            "erpgate_upstream_open_connections",
            "Requests and sockets open to the Odoo server now",
            &["pool", "server", "zone"],
        )?,
        cert_expiry: gauge(
            "erpgate_tls_cert_expiry_seconds",
            "Seconds until the certificate expires (negative: expired)",
            &["name"],
        )?,
        maintenance,
        registry,
    })
}

static METRICS: OnceLock<Option<Metrics>> = OnceLock::new();

/// The request counters and duration histograms a thread used, by their label values: found
/// again without hashing the values and taking the family's lock, which prometheus's
/// `with_label_values` does each time (1.7 % of erpgate's user time, with the hashing).
/// Neither family is ever reset, so a handle stays the one the scrape reads.
#[derive(Default)]
struct Used {
    requests: Vec<([Box<str>; 4], IntCounter)>,
    duration: Vec<(Box<str>, Histogram)>,
}

/// At most this many of each per thread; beyond it the list starts again.
const USED_MAX: usize = 256;

thread_local! {
    static USED: RefCell<Used> = RefCell::new(Used::default());
}

/// The entry `same` finds in `list`, or the one `make` makes, added.
fn entry<K, V>(
    list: &mut Vec<(K, V)>,
    same: impl Fn(&K) -> bool,
    make: impl FnOnce() -> (K, V),
) -> &V {
    let at = match list.iter().position(|(k, _)| same(k)) {
        Some(at) => at,
        None => {
            if list.len() >= USED_MAX {
                list.clear();
            }
            list.push(make());
            list.len() - 1
        }
    };
    &list[at].1
}

impl Metrics {
    /// Counts a finished request in `erpgate_requests_total` (`labels`: class, pool, zone,
    /// status) and its duration in `erpgate_request_duration_seconds`.
    pub fn count_request(&self, labels: [&str; 4], secs: f64) {
        let counted = USED.with(|used| {
            let Ok(mut used) = used.try_borrow_mut() else {
                return false;
            };
            let Used { requests, duration } = &mut *used;
            let same = |k: &[Box<str>; 4]| k.iter().zip(labels).all(|(a, b)| **a == *b);
            entry(requests, same, || {
                let counter = self.requests.with_label_values(&labels);
                (labels.map(Box::from), counter)
            })
            .inc();
            let class = labels[0];
            entry(
                duration,
                |k| **k == *class,
                || (Box::from(class), self.duration.with_label_values(&[class])),
            )
            .observe(secs);
            true
        });
        if !counted {
            self.requests.with_label_values(&labels).inc();
            self.duration.with_label_values(&[labels[0]]).observe(secs);
        }
    }
}

/// The process's metrics (`None` only if the families could not be built, which a test
/// rules out).
pub fn get() -> Option<&'static Metrics> {
    METRICS
        .get_or_init(|| match build() {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::error!("metrics are off: {e}");
                None
            }
        })
        .as_ref()
}

/// What the scrape reads besides the registry.
pub struct Live<'a> {
    pub cfg: &'a Config,
    pub generation: u64,
    /// Certificates served now: (name, notAfter as Unix seconds).
    pub certs: Vec<(String, i64)>,
    pub maintenance: bool,
}

/// The Prometheus text exposition of everything.
pub fn render(live: &Live<'_>) -> String {
    let Some(m) = get() else {
        return String::new();
    };
    m.config_generation
        .set(i64::try_from(live.generation).unwrap_or(i64::MAX));
    m.maintenance.set(i64::from(live.maintenance));
    m.in_flight.reset();
    for c in &live.cfg.classes {
        let n = c.in_flight.load(std::sync::atomic::Ordering::Relaxed);
        m.in_flight
            .with_label_values(&[c.name.as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    m.upstream_healthy.reset();
    m.upstream_open.reset();
    for p in &live.cfg.pools {
        for s in p.servers.load().iter() {
            let labels = [p.name.as_str(), s.address.as_str(), s.zone.as_str()];
            m.upstream_healthy
                .with_label_values(&labels)
                .set(i64::from(s.state.is_healthy()));
            m.upstream_open
                .with_label_values(&labels)
                .set(i64::try_from(s.state.open()).unwrap_or(i64::MAX));
        }
    }
    m.cert_expiry.reset();
    let now = chrono::Utc::now().timestamp();
    for (name, not_after) in &live.certs {
        m.cert_expiry
            .with_label_values(&[name.as_str()])
            .set(not_after - now);
    }
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&m.registry.gather(), &mut out) {
        tracing::error!("metrics: {e}");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    /// The handles a thread keeps count into the families the scrape reads, from any thread,
    /// also past the most a thread keeps.
    #[test]
    fn requests_counted_through_kept_handles_are_all_in_the_scrape() {
        let m = super::get().expect("metrics");
        let count = |n: usize, status: &str| {
            for _ in 0..n {
                m.count_request(["kept", "web", "z", status], 0.003);
            }
        };
        std::thread::scope(|s| {
            s.spawn(|| count(3, "200"));
            s.spawn(|| count(2, "200"));
        });
        count(1, "503");
        let many: Vec<String> = (0..super::USED_MAX + 44).map(|i| format!("x{i}")).collect();
        for status in &many {
            count(1, status);
        }
        count(1, "x0");
        count(1, "200");
        let text = super::render(&super::Live {
            cfg: &crate::config::parse(
                "[listen]\nhttp = [\"127.0.0.1:1\"]\n[pools.web]\nservers = [{ address = \"127.0.0.1:2\" }]\n[[class]]\nname = \"user\"\npool = \"web\"\n",
                "t",
                None,
            )
            .expect("config"),
            generation: 1,
            certs: vec![],
            maintenance: false,
        });
        let line = |status: &str| {
            format!("erpgate_requests_total{{class=\"kept\",pool=\"web\",status=\"{status}\",zone=\"z\"}}")
        };
        assert!(text.contains(&format!("{} 6\n", line("200"))), "{text}");
        assert!(text.contains(&format!("{} 1\n", line("503"))));
        assert!(text.contains(&format!("{} 2\n", line("x0"))));
        assert!(text.contains(&format!("{} 1\n", line("x299"))));
        let total = 6 + 1 + many.len() + 1;
        assert!(text.contains(&format!(
            "erpgate_request_duration_seconds_count{{class=\"kept\"}} {total}\n"
        )));
        assert!(text.contains(&format!(
            "erpgate_request_duration_seconds_bucket{{class=\"kept\",le=\"0.005\"}} {total}\n"
        )));
    }

    #[test]
    fn the_families_build_and_render() {
        let m = super::get().expect("metrics");
        m.requests
            .with_label_values(&["user", "web", "a", "200"])
            .inc();
        let cfg = crate::config::parse(
            "[listen]\nhttp = [\"127.0.0.1:1\"]\n[pools.web]\nservers = [{ address = \"127.0.0.1:2\" }]\n[[class]]\nname = \"user\"\npool = \"web\"\n",
            "t",
            None,
        )
        .expect("config");
        let text = super::render(&super::Live {
            cfg: &cfg,
            generation: 3,
            certs: vec![("erp.test".into(), chrono::Utc::now().timestamp() + 100)],
            maintenance: false,
        });
        assert!(text.contains("erpgate_config_generation 3"), "{text}");
        assert!(text.contains(
            "erpgate_upstream_healthy{pool=\"web\",server=\"127.0.0.1:2\",zone=\"local\"} 1"
        ));
        assert!(text.contains("erpgate_in_flight_requests{class=\"user\"} 0"));
        assert!(text.contains("erpgate_tls_cert_expiry_seconds{name=\"erp.test\"}"));
        assert!(text.contains(
            "erpgate_requests_total{class=\"user\",pool=\"web\",status=\"200\",zone=\"a\"} 1"
        ));
    }
}
