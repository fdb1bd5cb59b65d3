//! The access log: one structured line per request, target `erpgate::access`.
//! Never the query string (Odoo portal links carry access tokens there), `Authorization`,
//! cookies or bodies.

use crate::proxy::Ctx;
use pingora::proxy::Session;
use pingora::Error;

/// Writes the line; returns the status the client got (0: none).
pub fn log(session: &Session, e: Option<&Error>, ctx: &Ctx) -> u16 {
    let req = session.req_header();
    let status = session
        .response_written()
        .map(|r| r.status.as_u16())
        .or(ctx.own_status())
        .unwrap_or(0);
    let client = ctx
        .client()
        .map_or_else(|| "-".to_string(), |c| c.to_string());
    let error = e.map(|e| e.etype().as_str()).unwrap_or("");
    tracing::info!(
        target: "erpgate::access",
        client = %client,
        method = %req.method,
        path = %req.uri.path(),
        status,
        class = ctx.class_name(),
        pool = ctx.pool_name(),
        upstream = ctx.server_address(),
        bytes_in = session.body_bytes_read(),
        bytes_out = session.body_bytes_sent(),
        duration_ms = %format_args!("{:.3}", ctx.started().elapsed().as_secs_f64() * 1000.0),
        request_id = ctx.request_id(),
        error,
    );
    status
}
