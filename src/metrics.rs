//! Prometheus metrics, served on the admin listener's `/metrics`.
//!
//! Counters and histograms are updated where things happen (one line per request in the
//! logging phase, reloads where they run); gauges of live state (server health, open
//! connections, in-flight requests, certificate expiry, config generation) are read from
//! that state when scraped, so they are never stale.

use crate::config::Config;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
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
