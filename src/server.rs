//! Builds and runs the Pingora server from a compiled config. Operators never write Pingora's
//! YAML: its settings come from the TOML `[server]` section.

use crate::admin::AdminApp;
use crate::config::{Config, LogFormat, LogSettings};
use crate::conn::Connections;
use crate::logwrite::Lines;
use crate::proxy::ErpGate;
use crate::tls::{CertSet, Resolver};
use arc_swap::ArcSwap;
use pingora::apps::http_app::HttpServer;
use pingora::listeners::ListenerConfig;
use pingora::proxy::http_proxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::listening::Service;
use std::io::IsTerminal;
use std::sync::Arc;
use tracing_subscriber::util::SubscriberInitExt;

/// The log's lines, written by a thread of their own until erpgate exits ([`flush_logs`]).
static LOG_LINES: std::sync::OnceLock<Lines> = std::sync::OnceLock::new();

/// Sets up the global tracing subscriber (`RUST_LOG` overrides `[log] level`). Lines go to
/// stdout in batches, from a thread of their own ([`crate::logwrite`]): a request's thread
/// formats its access line and goes on.
pub fn init_logging(log: &LogSettings) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let writer = LOG_LINES.get_or_init(|| Lines::start(std::io::stdout()));
    let terminal = std::io::stdout().is_terminal();
    // Colours on a terminal come from the subscriber's formatter: access lines go through it.
    if !terminal {
        let _ = ACCESS_FORMAT.set(log.format);
    }
    let res = subscriber(log.format, filter, writer, terminal).try_init();
    if let Err(e) = res {
        eprintln!("erpgate: logging already set up: {e}");
    }
}

/// The log's subscriber: lines in `format` (with colours when `ansi`) to `writer`.
pub(crate) fn subscriber<W>(
    format: LogFormat,
    filter: tracing_subscriber::EnvFilter,
    writer: W,
    ansi: bool,
) -> Box<dyn tracing::Subscriber + Send + Sync>
where
    W: for<'a> tracing_subscriber::fmt::MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => Box::new(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
        LogFormat::Human => Box::new(builder.with_ansi(ansi).finish()),
    }
}

/// How access lines are written straight to the log's lines (not on a terminal).
static ACCESS_FORMAT: std::sync::OnceLock<LogFormat> = std::sync::OnceLock::new();

/// Where and in which format [`crate::access`] writes its lines itself, when it does.
pub(crate) fn access_log() -> Option<(&'static Lines, LogFormat)> {
    Some((LOG_LINES.get()?, *ACCESS_FORMAT.get()?))
}

/// The audit log whose queue [`flush_logs`] empties.
static AUDIT: std::sync::OnceLock<crate::audit::AuditLog> = std::sync::OnceLock::new();

/// Writes out the audit lines still queued (at most [`crate::audit::FLUSH_LIMIT`]) and the log
/// lines not written yet, and stops the log writer; before erpgate exits.
pub fn flush_logs() {
    if let Some(audit) = AUDIT.get() {
        audit.flush(crate::audit::FLUSH_LIMIT);
    }
    if let Some(lines) = LOG_LINES.get() {
        lines.close();
    }
}

fn server_conf(cfg: &Config) -> ServerConf {
    let tmp = std::env::temp_dir();
    ServerConf {
        threads: cfg.server.threads,
        grace_period_seconds: Some(cfg.server.grace_period.as_secs()),
        graceful_shutdown_timeout_seconds: Some(cfg.server.shutdown_timeout.as_secs().max(1)),
        pid_file: tmp.join("erpgate.pid").display().to_string(),
        upgrade_sock: cfg.server.upgrade_sock.display().to_string(),
        // Tries per request; each pool's `max_attempts` bounds them further.
        max_retries: crate::config::MAX_ATTEMPTS_LIMIT,
        // One single-threaded runtime per thread, each connection staying on the thread it
        // was given: no work-stealing queues, atomics and cross-thread wake-ups per request
        // (measured: about 8 % more requests per second than tokio's work-stealing runtime).
        work_stealing: false,
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
        .chain(cfg.listen.https.iter().map(|a| ("listen.https", a)))
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

/// Buffers of a client connection: none. Pingora's default read buffer is 64 KiB, allocated
/// and zero-filled for every connection, idle ones too. Between requests `conn.rs` waits for
/// a plain socket to become readable without reading, and the head is then read straight
/// into the request's own buffer (one `recv`, as through a buffer); under TLS, rustls reads
/// whole records into its own buffer anyway (a read buffer there cost 1 KiB per HTTPS
/// connection for nothing). No write buffer either: erpgate's own loop writes each answer
/// (head and body as far as it has them) in one piece, and a 1,460-byte buffer held on
/// every connection, idle ones too, cost 1.5 to 1.9 KiB each (idle_memory, 10,000
/// connections: 3.63 -> 2.11 KiB silent, 4.53 -> 2.58 KiB kept alive) for the same req/s.
fn client_buffers() -> pingora::protocols::l4::stream::L4BufferSettings {
    pingora::protocols::l4::stream::L4BufferSettings::new(0, 0)
}

/// The signals that stop erpgate, for Pingora's main loop: SIGTERM (graceful stop) and SIGQUIT
/// (listeners handed to a new binary) as Pingora reads them; SIGINT ends the process here, at
/// once, after writing out the log. Pingora's own fast shutdown stops each thread's runtime
/// while the accept loops still run: an accept loop whose listening socket was registered
/// with a runtime already stopped then fails without waiting, logging each failure, and its
/// own runtime never gets to stop (seen: 2 of 10 SIGINTs after a load left erpgate spinning
/// until SIGKILL). What Pingora's fast shutdown gives requests in flight is what this gives
/// them: nothing.
struct Signals;

#[async_trait::async_trait]
impl pingora::server::ShutdownSignalWatch for Signals {
    async fn recv(&self) -> pingora::server::ShutdownSignal {
        use pingora::server::ShutdownSignal;
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut quit), Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::quit()),
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            fail_start("cannot handle SIGQUIT, SIGTERM and SIGINT");
        };
        tokio::select! {
            _ = quit.recv() => ShutdownSignal::GracefulUpgrade,
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => {
                tracing::info!("SIGINT received, exiting");
                flush_logs();
                std::process::exit(0)
            }
        }
    }
}

/// No per-handshake callbacks: erpgate reads what it needs from the session's TLS digest.
struct NoCallbacks;

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for NoCallbacks {}

/// Runs erpgate until it is stopped by a signal. Never returns.
pub fn run(cfg: Config, path: &std::path::Path, upgrade: bool) -> ! {
    let conf = server_conf(&cfg);
    crate::conn::pin_threads(cfg.server.pin_threads);
    let http = cfg.listen.http.clone();
    let https = cfg.listen.https.clone();
    let admin = cfg.listen.admin;
    let resolver = cfg.tls.as_ref().map(|t| {
        Arc::new(Resolver::new(
            CertSet::new(t.certificates.clone()),
            t.tls13_only,
        ))
    });
    let client_ca = cfg.tls.as_ref().and_then(|t| t.client_ca.clone());
    crate::dns::resolve_blocking(&cfg);
    let store = Arc::new(ArcSwap::from_pointee(cfg));
    let stats = Arc::new(crate::config::reload::ReloadStats::new());
    let on_swap: crate::config::reload::OnSwap = {
        let resolver = resolver.clone();
        Box::new(move |cfg: &Config| {
            if let (Some(r), Some(t)) = (&resolver, &cfg.tls) {
                r.set.store(Arc::new(CertSet::new(t.certificates.clone())));
                r.tls13_only
                    .store(t.tls13_only, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    if let Err(e) =
        crate::config::reload::spawn(path.to_path_buf(), store.clone(), stats.clone(), on_swap)
    {
        tracing::error!(
            "config reload is off (no file watch or SIGHUP): {e}; restart to change the config"
        );
    }
    if let Some(r) = &resolver {
        let live = store.clone();
        let files = move || {
            live.load()
                .tls
                .as_ref()
                .map(|t| t.files())
                .unwrap_or_default()
        };
        if let Err(e) = crate::tls::spawn_cert_watch(r.clone(), files) {
            tracing::error!("certificate reload is off: {e}; reload the config to renew");
        }
    }

    let opt = Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    server.bootstrap();

    let gate = ErpGate::new(store.clone());
    if let Some(audit) = gate.audit_log() {
        let _ = AUDIT.set(audit.clone());
    }
    let mut app = http_proxy(&server.configuration, gate.clone());
    // HTTP/2 connections (HTTPS with ALPN h2) run in Pingora's own loop: the same idle limit
    // for them, as it is at start.
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(store.load().server.keepalive_timeout);
    app.server_options = Some(options);
    let mut proxy = Service::new(
        "erpgate proxy".to_string(),
        Connections::new(app, gate, store.clone()),
    );
    for addr in &http {
        proxy.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(client_buffers()));
    }
    if let Some(resolver) = &resolver {
        for addr in &https {
            let mut settings =
                match pingora::listeners::tls::TlsSettings::with_callbacks(Box::new(NoCallbacks)) {
                    Ok(s) => s,
                    Err(e) => fail_start(&format!("TLS listener {addr}: {e}")),
                };
            settings.set_cert_resolver(resolver.clone());
            if let Some((_, roots)) = &client_ca {
                match crate::tls::client_verifier(roots.clone()) {
                    Ok(v) => settings.set_client_cert_verifier(v),
                    Err(e) => fail_start(&e),
                }
            }
            settings.enable_h2();
            proxy.add_listener(
                ListenerConfig::tcp(addr.to_string())
                    .tls(settings)
                    .l4_buffer(client_buffers()),
            );
        }
        proxy
            .endpoints()
            .set_pre_tls_callback(Arc::new(crate::tls::VersionGate {
                resolver: resolver.clone(),
            }));
    }
    proxy.set_connection_filter(Arc::new(crate::conn::AcceptThread));
    server.add_service(proxy);

    if let Some(addr) = admin {
        let mut svc = Service::new(
            "erpgate admin".to_string(),
            HttpServer::new_app(AdminApp::new(store.clone(), stats, resolver.clone())),
        );
        // One thread: scrapes and checks are few, and its listener and accept loop are then on
        // the same runtime.
        svc.threads = Some(1);
        svc.add_tcp(&addr.to_string());
        server.add_service(svc);
    }
    tracing::info!(listen = ?http, https = ?https, admin = ?admin, "erpgate starting");
    server.run(pingora::server::RunArgs {
        shutdown_signal: Box::new(Signals),
    });
    flush_logs();
    std::process::exit(0)
}

fn fail_start(why: &str) -> ! {
    tracing::error!("erpgate: not started: {why}");
    flush_logs();
    eprintln!("erpgate: not started: {why}");
    std::process::exit(70)
}
