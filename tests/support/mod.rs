//! Test support: fake Odoo servers that behave like Odoo 18, a raw HTTP/1.x client, a
//! WebSocket client, and a handle on the real erpgate binary.
#![allow(dead_code)]

pub mod client;
pub mod erpgate;
pub mod fake_odoo;
pub mod tls;

#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use fake_odoo::*;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

/// Ports this test process keeps bound (not listening, `SO_REUSEADDR`): no other test in the
/// process gets them from the kernel for a port-0 bind, while erpgate and fakes, which bind
/// them by number with `SO_REUSEADDR`, still can (Linux refuses such a bind only next to a
/// listening socket). Without this, a port a test released (a stopped fake Odoo, an address
/// meant to refuse connections, a port picked for erpgate) could be handed to a fake Odoo of
/// a test running in parallel.
static RESERVED: Mutex<Vec<(u16, socket2::Socket)>> = Mutex::new(Vec::new());

fn reserved() -> std::sync::MutexGuard<'static, Vec<(u16, socket2::Socket)>> {
    RESERVED.lock().unwrap_or_else(|p| p.into_inner())
}

fn bound_socket(port: u16) -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    Ok(s)
}

/// A loopback port nothing listens on, kept from the kernel's port-0 binds (see
/// `RESERVED`) until `release`.
pub fn free_port() -> u16 {
    let s = bound_socket(0).expect("bind 127.0.0.1:0");
    let port = s
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .map(|a| a.port())
        .expect("port");
    reserved().push((port, s));
    port
}

/// Keeps `port` (just given up by a listener of this process) from other tests; a port that
/// cannot be bound now is left alone.
pub fn reserve(port: u16) {
    if let Ok(s) = bound_socket(port) {
        reserved().push((port, s));
    }
}

/// Gives a reserved port back (before listening on it again).
pub fn release(port: u16) {
    reserved().retain(|(p, _)| *p != port);
}

/// An address on loopback where connections are refused: a reserved port nobody listens on.
pub fn refused_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Every value of header `name` (any case) in a list whose names are lowercased.
pub fn headers_all<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    let name = name.to_ascii_lowercase();
    headers
        .iter()
        .filter(|(k, _)| *k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The audit log's lines once there are at least `n` (waits up to 10 s), each parsed.
pub fn audit_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
            .collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} audit lines, wanted {n}:\n{text}",
            lines.len()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A stand-in for `/etc/erpgate` on a machine laid out as the shipped configs say: the
/// development certificate as `tls/fullchain.pem` and `tls/privkey.pem`, a maintenance page.
pub fn etc_erpgate() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    std::fs::create_dir(dir.path().join("tls")).expect("tls dir");
    std::fs::copy(
        certs.join("localhost.crt"),
        dir.path().join("tls/fullchain.pem"),
    )
    .expect("crt");
    std::fs::copy(
        certs.join("localhost.key"),
        dir.path().join("tls/privkey.pem"),
    )
    .expect("key");
    std::fs::write(dir.path().join("maintenance.html"), "<h1>Back soon</h1>").expect("page");
    dir
}
