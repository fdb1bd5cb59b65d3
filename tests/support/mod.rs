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

use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

/// A port nothing listens on right now (bound to 127.0.0.1:0 and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// An address on loopback where connections are refused.
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
