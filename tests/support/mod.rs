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
