//! Memory of idle connections through erpgate: `cargo bench --bench idle_memory`.
//!
//! Starts a stand-in Odoo in this process (an HTTP/1.1 keep-alive server for the web pool
//! and a WebSocket server for the gevent pool), runs the release erpgate binary in front of
//! it, and reads erpgate's RSS (`/proc/PID/status`, VmRSS) when idle, then while holding N
//! connections that have sent nothing, N idle keep-alive HTTP connections, idle keep-alive
//! HTTPS connections (HTTP/1.1 over TLS 1.3, the test certificate of `certs/`) and idle
//! WebSockets (each upgraded through erpgate to the gevent pool), one set after the other.
//! Per connection: RSS above the idle RSS at start, over the count (memory a closed set freed
//! may be reused by the next). The counts: `IDLE_N` for the HTTP connections (default
//! 10,000), `IDLE_TLS` for the HTTPS ones (default 5,000: each is a full handshake) and
//! `IDLE_WS` for the WebSockets (default 9,000: erpgate holds two descriptors per WebSocket,
//! its client socket and its Odoo socket, and so does this process, which is both the browser
//! and the stand-in Odoo; this machine caps a process at 20,000 open files, hard limit, so
//! 10,000 cannot be held). Under `cargo test` it runs once with 50 of each, as a smoke test.

use futures_util::StreamExt;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// The stand-in Odoo: a tiny keep-alive HTTP server and a WebSocket server that holds.
async fn odoo() -> (SocketAddr, SocketAddr) {
    let web = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let ws = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let (web_addr, ws_addr) = (
        web.local_addr().expect("addr"),
        ws.local_addr().expect("addr"),
    );
    tokio::spawn(async move {
        while let Ok((mut s, _)) = web.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut have = Vec::new();
                loop {
                    let Ok(n) = s.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have.extend_from_slice(&buf[..n]);
                    while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                        have.drain(..end + 4);
                        // One write: head and body in one segment (no Nagle delay).
                        let answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 18\r\n\r\n{\"status\": \"pass\"}";
                        if s.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((s, _)) = ws.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(s).await {
                    while let Some(Ok(_)) = ws.next().await {}
                }
            });
        }
    });
    (web_addr, ws_addr)
}

struct Gate(Child);

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn http_get(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_whitespace().nth(1)?.parse().ok()
}

/// A TLS client that trusts the test CA of `certs/` and asks for HTTP/1.1.
fn tls_connector(certs: &str) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(format!("{certs}/ca.crt")).expect("ca.crt") {
        roots.add(c.expect("ca.crt")).expect("ca.crt");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn settle(pid: u32) -> u64 {
    // Let allocations settle: the RSS after a short quiet period.
    std::thread::sleep(Duration::from_millis(500));
    rss_kib(pid)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a smoke test with
    // a few connections.
    let measuring = std::env::args().any(|a| a == "--bench");
    let count = |var: &str, default: usize| -> usize {
        std::env::var(var)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if measuring { default } else { 50 })
    };
    let n = count("IDLE_N", 10_000);
    let n_ws = count("IDLE_WS", 9_000);
    let n_tls = count("IDLE_TLS", 5_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (web, ws) = rt.block_on(odoo());
    let listen = format!("127.0.0.1:{}", free_port());
    let https: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let admin = format!("127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("erpgate.toml");
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/erpgate.toml"))
        .expect("default config")
        .replace(
            "http = [\"0.0.0.0:8080\"]",
            &format!("http = [\"{listen}\"]\nhttps = [\"{https}\"]"),
        )
        .replace("127.0.0.1:9901", &admin)
        .replace("127.0.0.1:8069", &web.to_string())
        .replace("127.0.0.1:8072", &ws.to_string())
        .replace(
            "erpgate-audit.jsonl",
            &dir.path().join("audit.jsonl").display().to_string(),
        )
        .replace("level = \"info\"", "level = \"warn\"")
        // The stand-in WebSocket server answers handshakes only: probe it by TCP.
        .replace("path = \"/websocket/health\"", "tcp = true")
        // The user class's limit per client IP: all connections here come from one address.
        .replace(
            "rate = \"100/s\", burst = 200",
            "rate = \"1000000/s\", burst = 1000000",
        );
    let certs = concat!(env!("CARGO_MANIFEST_DIR"), "/certs");
    let text = format!(
        "{text}\n[tls]\ncertificates = [{{ cert = \"{certs}/localhost.crt\", key = \"{certs}/localhost.key\" }}]\n"
    );
    std::fs::write(&cfg, text).expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_erpgate"))
        .args(["run", "--config"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("erpgate");
    let gate = Gate(child);
    let pid = gate.0.id();
    let addr: SocketAddr = listen.parse().expect("addr");
    let deadline = Instant::now() + Duration::from_secs(20);
    while http_get(addr, "/web/health") != Some(200) {
        assert!(Instant::now() < deadline, "erpgate did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle = settle(pid);

    // N connections that have sent nothing yet: what holding a socket costs before any
    // request (Pingora's accept task and erpgate's wait for the first byte).
    let silent: Vec<std::net::TcpStream> = (0..n)
        .map(|_| std::net::TcpStream::connect(addr).expect("connect"))
        .collect();
    let with_silent = settle(pid);
    drop(silent);
    std::thread::sleep(Duration::from_secs(1));

    // N idle keep-alive HTTP connections, each after one request.
    let conns: Vec<std::net::TcpStream> = (0..n)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s.write_all(b"GET /web/health HTTP/1.1\r\nHost: x\r\n\r\n")
                .expect("write");
            let mut buf = [0u8; 512];
            let got = s.read(&mut buf).expect("read");
            assert!(
                buf[..got].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..got])
            );
            s
        })
        .collect();
    let with_http = settle(pid);
    drop(conns);
    std::thread::sleep(Duration::from_secs(1));
    let after_http = settle(pid);

    // N idle HTTPS keep-alive connections (HTTP/1.1 by ALPN, TLS 1.3), each after one request.
    let tls_conns = rt.block_on(async {
        let connector = tls_connector(certs);
        let mut v = Vec::with_capacity(n_tls);
        for _ in 0..n_tls {
            let tcp = tokio::net::TcpStream::connect(https)
                .await
                .expect("connect");
            tcp.set_nodelay(true).expect("nodelay");
            let name = ServerName::try_from("localhost").expect("name");
            let mut s = connector.connect(name, tcp).await.expect("tls");
            s.write_all(b"GET /web/health HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .expect("write");
            let mut buf = [0u8; 1024];
            let got = s.read(&mut buf).await.expect("read");
            assert!(
                buf[..got].starts_with(b"HTTP/1.1 200"),
                "{:?}",
                String::from_utf8_lossy(&buf[..got])
            );
            v.push(s);
        }
        v
    });
    let with_tls = settle(pid);
    drop(tls_conns);
    std::thread::sleep(Duration::from_secs(1));

    // N idle WebSockets through erpgate to the gevent pool.
    let sockets = rt.block_on(async {
        let mut v = Vec::with_capacity(n_ws);
        for _ in 0..n_ws {
            let req = http::Request::builder()
                .uri(format!("ws://{listen}/websocket"))
                .header("Host", "localhost")
                .header("Origin", "http://localhost")
                .header(
                    "Sec-WebSocket-Key",
                    tokio_tungstenite::tungstenite::handshake::client::generate_key(),
                )
                .header("Sec-WebSocket-Version", "13")
                .header("Connection", "Upgrade")
                .header("Upgrade", "websocket")
                .body(())
                .expect("request");
            let (s, _) = tokio_tungstenite::connect_async_with_config(req, None, true)
                .await
                .expect("websocket");
            v.push(s);
        }
        v
    });
    let with_ws = settle(pid);
    println!("erpgate idle memory (IDLE_N = {n}, IDLE_TLS = {n_tls}, IDLE_WS = {n_ws}), VmRSS of the erpgate process:");
    println!("| state | RSS | per connection |");
    println!("|---|---|---|");
    println!("| idle, after start | {:.1} MiB | |", idle as f64 / 1024.0);
    println!(
        "| {n} connections that sent nothing yet | {:.1} MiB | {:.2} KiB |",
        with_silent as f64 / 1024.0,
        (with_silent.saturating_sub(idle)) as f64 / n as f64
    );
    println!(
        "| {n} idle keep-alive HTTP connections | {:.1} MiB | {:.2} KiB |",
        with_http as f64 / 1024.0,
        (with_http.saturating_sub(idle)) as f64 / n as f64
    );
    println!(
        "| after they closed | {:.1} MiB | |",
        after_http as f64 / 1024.0
    );
    println!(
        "| {n_tls} idle keep-alive HTTPS connections (HTTP/1.1) | {:.1} MiB | {:.2} KiB |",
        with_tls as f64 / 1024.0,
        (with_tls.saturating_sub(idle)) as f64 / n_tls as f64
    );
    println!(
        "| {n_ws} idle WebSockets (two sockets each in erpgate) | {:.1} MiB | {:.2} KiB |",
        with_ws as f64 / 1024.0,
        (with_ws.saturating_sub(idle)) as f64 / n_ws as f64
    );
    drop(sockets);
}
