//! Builds and runs the Pingora server from a compiled config. Operators never write Pingora's
//! YAML: its settings come from the TOML `[server]` section.

use crate::admin::AdminApp;
use crate::config::{Config, LogFormat, LogSettings};
use crate::proxy::ErpGate;
use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::proxy::http_proxy_service_with_name;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use std::io::IsTerminal;
use std::sync::Arc;

/// Sets up the global tracing subscriber (`RUST_LOG` overrides `[log] level`).
pub fn init_logging(log: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let res = match log.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Human => builder
            .with_ansi(std::io::stdout().is_terminal())
            .try_init(),
    };
    if let Err(e) = res {
        eprintln!("erpgate: logging already set up: {e}");
    }
}

fn server_conf(cfg: &Config) -> ServerConf {
    let tmp = std::env::temp_dir();
    ServerConf {
        threads: cfg.server.threads,
        grace_period_seconds: Some(cfg.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.server.shutdown_timeout.as_secs().max(1)),
        pid_file: tmp.join("erpgate.pid").display().to_string(),
        upgrade_sock: tmp.join("erpgate_upgrade.sock").display().to_string(),
        // Tries per request; each pool's `max_attempts` bounds them further.
        max_retries: crate::config::MAX_ATTEMPTS_LIMIT,
        ..ServerConf::default()
    }
}

/// Checks that every listen address can be bound now (Pingora would otherwise retry
/// quietly and serve nothing). `SO_REUSEADDR` as Pingora sets it, so sockets in TIME_WAIT from
/// a previous run do not count; a live listener does.
pub fn check_listeners(cfg: &Config) -> Result<(), String> {
    use socket2::{Domain, Socket, Type};
    let addrs = cfg
        .listen
        .http
        .iter()
        .map(|a| ("listen.http", a))
        .chain(cfg.listen.admin.iter().map(|a| ("listen.admin", a)));
    for (key, addr) in addrs {
        let bind = || -> std::io::Result<()> {
            let s = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
            s.set_reuse_address(true)?;
            s.bind(&(*addr).into())?;
            s.listen(1)
        };
        bind().map_err(|e| format!("{key}: cannot listen on {addr}: {e}"))?;
    }
    Ok(())
}

/// Runs erpgate until it is stopped by a signal. Never returns.
pub fn run(cfg: Config, path: &std::path::Path, upgrade: bool) -> ! {
    let conf = server_conf(&cfg);
    let http = cfg.listen.http.clone();
    let admin = cfg.listen.admin;
    crate::dns::resolve_blocking(&cfg);
    let store = Arc::new(ArcSwap::from_pointee(cfg));
    let stats = Arc::new(crate::config::reload::ReloadStats::default());
    if let Err(e) = crate::config::reload::spawn(path.to_path_buf(), store.clone(), stats) {
        tracing::error!(
            "config reload is off (no file watch or SIGHUP): {e}; restart to change the config"
        );
    }

    let opt = Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    let mut proxy = http_proxy_service_with_name(
        &server.configuration,
        ErpGate::new(store.clone()),
        "erpgate proxy",
    );
    for addr in &http {
        proxy.add_tcp(&addr.to_string());
    }
    server.add_service(proxy);

    if let Some(addr) = admin {
        let mut svc = Service::new(
            "erpgate admin".to_string(),
            HttpServer::new_app(AdminApp::new(store.clone())),
        );
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
    }
    tracing::info!(listen = ?http, admin = ?admin, "erpgate starting");
    server.run_forever()
}
