//! Test support: fake Odoo servers that behave like Odoo 18, a raw HTTP/1.x client, a
//! WebSocket client, and a handle on the real erpgate binary.
#![allow(dead_code)]

pub mod client;
pub mod erpgate;
pub mod fake_odoo;

#[allow(unused_imports)]
pub use client::*;
#[allow(unused_imports)]
pub use fake_odoo::*;

use std::net::{SocketAddr, TcpListener};

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
