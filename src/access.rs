//! The access log: one structured line per request, target `erpgate::access`.
//! Never the query string (Odoo portal links carry access tokens there), `Authorization`,
//! cookies or bodies.

use crate::proxy::Ctx;
use pingora::proxy::Session;
use pingora::Error;

/// What the line says of the request and its answer.
pub struct Line<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The status the client got (0: none).
    pub status: u16,
    pub bytes_in: usize,
    pub bytes_out: usize,
}

impl<'a> Line<'a> {
    /// The line of a request Pingora's proxy handled.
    pub fn of(session: &'a Session, ctx: &Ctx) -> Line<'a> {
        let req = session.req_header();
        Line {
            method: req.method.as_str(),
            path: req.uri.path(),
            status: session
                .response_written()
                .map(|r| r.status.as_u16())
                .or(ctx.own_status())
                .unwrap_or(0),
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
        }
    }
}

/// Writes the line.
pub fn write(line: &Line, e: Option<&Error>, ctx: &Ctx) {
    let client = Client(ctx.client());
    let error = e.map(|e| e.etype().as_str()).unwrap_or("");
    tracing::info!(
        target: "erpgate::access",
        client = %client,
        method = %line.method,
        path = %line.path,
        status = line.status,
        class = ctx.class_name(),
        pool = ctx.pool_name(),
        upstream = ctx.server_address(),
        bytes_in = line.bytes_in,
        bytes_out = line.bytes_out,
        duration_ms = %format_args!("{:.3}", ctx.started().elapsed().as_secs_f64() * 1000.0),
        request_id = ctx.request_id(),
        error,
    );
}

/// The client's address as the line shows it ("-" when unknown), formatted only when the line
/// is written.
struct Client(Option<std::net::IpAddr>);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}
