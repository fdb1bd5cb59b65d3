//! erpgate: an edge ingress proxy for Odoo, on Pingora.
#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod affinity;
pub mod audit;
pub mod classify;
pub mod config;
pub mod conn;
pub mod deadline;
pub mod dns;
pub mod errors;
pub mod fast;
pub mod forwarded;
pub mod headers;
pub mod health;
pub mod jsonrpc;
pub mod logwrite;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod wsclose;
pub mod xmlrpc;

/// Locks `m`; a lock poisoned by a panic elsewhere still gives its data (every value kept
/// behind one is whole at all times: counters, last results, lists).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
