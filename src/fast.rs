//! Requests without a body (`GET` and `HEAD`, most of what an Odoo page load asks),
//! proxied by erpgate's own loop instead of Pingora's proxy task.
//!
//! Pingora's proxy runs every request through its whole machinery: a boxed proxy future with
//! its phases, cache and module checks, and request and response pumps exchanging tasks over
//! channels. For a request without a body erpgate does the same steps itself, in order, on
//! the same parts: Pingora's connection pool to Odoo, its HTTP/1 codec on both sides (so framing, chunked bodies, `HEAD`, keep-alive and the `Date` and
//! `Connection` headers are Pingora's) and erpgate's own hooks (`request_filter`,
//! `upstream_peer`, `upstream_request_filter`, `response_filter`, the failure hooks and
//! `logging`), so the policy, the headers, the failover and retry rules, the logs and the
//! metrics are those of every other request. Anything else (a body, an upgrade, `Expect`,
//! HTTP/1.0, absolute URIs, a head not whole in the first read, pipelined requests) goes to
//! Pingora's proxy as before.

use crate::proxy::{Ctx, ErpGate};
use bytes::Bytes;
use pingora::apps::{HttpPersistentSettings, ReusedHttpStream};
use pingora::connectors::TransportConnector;
use pingora::http::ResponseHeader;
use pingora::protocols::http::v1::client::HttpSession as OdooSession;
use pingora::protocols::http::ServerSession;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorType, Result, RetryType};
use std::sync::LazyLock;

/// Most header fields a request may have to take this path (more go to Pingora's proxy).
const MAX_HEADERS: usize = 64;

/// Most attempts at one request: the bound erpgate gives Pingora's proxy (a pool's
/// `max_attempts` ends them sooner, through erpgate's failure hooks).
const MAX_TRIES: usize = crate::config::MAX_ATTEMPTS_LIMIT;

/// Whether `head`, all that a client has sent so far, is one whole request this path serves:
/// an HTTP/1.1 `GET` or `HEAD` in origin form, nothing after its head, and no body, upgrade
/// or expectation.
pub fn eligible(head: &[u8]) -> bool {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    match req.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        _ => return false,
    }
    let simple_method = matches!(req.method, Some("GET" | "HEAD"));
    let origin_form = req.path.is_some_and(|p| p.starts_with('/'));
    simple_method
        && origin_form
        && req.version == Some(1)
        && !req.headers.iter().any(|h| {
            ["content-length", "transfer-encoding", "upgrade", "expect"]
                .iter()
                .any(|n| h.name.eq_ignore_ascii_case(n))
        })
}

/// Connections to Odoo: Pingora's connector and its pool of kept-alive connections (each
/// watched while idle, so one Odoo closes is dropped, not handed out).
static CONNECTOR: LazyLock<TransportConnector> = LazyLock::new(|| TransportConnector::new(None));

/// Serves one request (its head is in the session's buffer); the connection back when it
/// may carry another.
pub async fn serve(gate: &ErpGate, downstream: ServerSession) -> Option<ReusedHttpStream> {
    // erpgate's hooks take Pingora's proxy session: one around this connection's session.
    let mut session = Session::new_h1(Box::new(std::io::Cursor::new(Vec::new())));
    *session.downstream_session = downstream;
    match session.downstream_session.read_request().await {
        Ok(true) => {}
        Ok(false) => return None,
        Err(e) => {
            if matches!(e.etype(), ErrorType::InvalidHTTPHeader) {
                let _ = session.downstream_session.respond_error(400).await;
            }
            session.downstream_session.shutdown().await;
            return None;
        }
    }
    let mut ctx = gate.new_ctx();
    let (result, tries) = proxy(gate, &mut session, &mut ctx).await;
    let reuse = match result {
        Ok(()) => {
            gate.logging(&mut session, None, &mut ctx).await;
            true
        }
        Err(e) => {
            let failed = gate.fail_to_proxy(&mut session, &e, &mut ctx).await;
            if !gate.suppress_error_log(&session, &ctx, &e) {
                tracing::error!(
                    "Fail to proxy: {e}, status: {}, tries: {tries}, retry: false, {}",
                    failed.error_code,
                    gate.request_summary(&session, &ctx)
                );
            }
            gate.logging(&mut session, Some(&e), &mut ctx).await;
            false
        }
    };
    if !reuse {
        session.downstream_session.shutdown().await;
        return None;
    }
    let settings = HttpPersistentSettings::for_session(&session.downstream_session);
    let Session {
        downstream_session, ..
    } = session;
    let stream = downstream_session.finish().await.ok().flatten()?;
    Some(ReusedHttpStream::from_reusable_stream(stream, settings))
}

/// The request through erpgate's policy, then to Odoo (failing over and retrying as
/// erpgate's hooks say, at most [`MAX_TRIES`] attempts), and Odoo's answer back. Also
/// says how many attempts were made.
async fn proxy(gate: &ErpGate, session: &mut Session, ctx: &mut Ctx) -> (Result<()>, usize) {
    match gate.request_filter(session, ctx).await {
        // erpgate answered itself.
        Ok(true) => return (Ok(()), 0),
        Ok(false) => {}
        Err(e) => return (Err(e), 0),
    }
    let mut tries = 0;
    loop {
        tries += 1;
        let e = match attempt(gate, session, ctx).await {
            Ok(()) => return (Ok(()), tries),
            Err(e) => e,
        };
        if !e.retry() || tries >= MAX_TRIES {
            return (Err(e), tries);
        }
        tracing::warn!(
            "Fail to proxy: {e}, tries: {tries}, retry: true, {}",
            gate.request_summary(session, ctx)
        );
    }
}

/// One attempt: a server, a connection to it (new or kept alive), the exchange. The
/// error says whether another attempt may follow (erpgate's failure hooks decide).
async fn attempt(gate: &ErpGate, session: &mut Session, ctx: &mut Ctx) -> Result<()> {
    let peer = gate.upstream_peer(session, ctx).await?;
    let mut fresh = false;
    loop {
        let got = if fresh {
            CONNECTOR.new_stream(&*peer).await.map(|s| (s, false))
        } else {
            CONNECTOR.get_stream(&*peer).await
        };
        let (stream, reused) = match got {
            Ok(got) => got,
            Err(e) => {
                let mut e = gate.fail_to_connect(session, &peer, ctx, e);
                e.as_up();
                return Err(e);
            }
        };
        let mut odoo = OdooSession::new_with_options(stream, &*peer);
        match exchange(gate, session, &mut odoo, ctx).await {
            Ok(()) => {
                odoo.respect_keepalive();
                if let Some(stream) = odoo.reuse().await {
                    CONNECTOR.release_stream(stream, peer.reuse_hash(), peer.idle_timeout());
                }
                return Ok(());
            }
            // Odoo closed this kept-alive connection before any answer (after the pool last
            // looked at it): the request goes again to the same server on a new connection.
            Err(e)
                if reused
                    && matches!(e.retry, RetryType::ReusedOnly)
                    && session.response_written().is_none() =>
            {
                tracing::debug!("kept-alive connection to Odoo found closed: {e}");
                fresh = true;
            }
            Err(e) => return Err(gate.error_while_proxy(&peer, session, e, ctx, reused)),
        }
    }
}

/// The error, as Odoo's side's.
pub(crate) fn upstream(mut e: Box<Error>) -> Box<Error> {
    e.as_up();
    e
}

fn downstream(mut e: Box<Error>) -> Box<Error> {
    e.as_down();
    e
}

/// One request to Odoo on `odoo` (its timeouts the peer's) and its answer to the client.
async fn exchange(
    gate: &ErpGate,
    session: &mut Session,
    odoo: &mut OdooSession,
    ctx: &mut Ctx,
) -> Result<()> {
    let mut req = session.req_header().clone();
    req.set_version(http::Version::HTTP_11);
    crate::headers::strip_hop_by_hop(&mut req, session.req_header());
    gate.upstream_request_filter(session, &mut req, ctx).await?;
    odoo.write_request_header(Box::new(req))
        .await
        .map_err(upstream)?;
    let mut resp = loop {
        odoo.read_response().await.map_err(upstream)?;
        match odoo.resp_header() {
            // An interim answer (103 Early Hints): the final one follows.
            Some(h) if h.status.is_informational() => continue,
            Some(h) => break h.clone(),
            None => {
                return Err(upstream(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "no response head",
                )))
            }
        }
    };
    let no_body = session.req_header().method == http::Method::HEAD
        || matches!(resp.status.as_u16(), 204 | 304);
    chunk_if_unframed(&mut resp, no_body)?;
    gate.response_filter(session, &mut resp, ctx).await?;
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(downstream)?;
    while let Some(piece) = odoo.read_body_bytes().await.map_err(upstream)? {
        session
            .write_response_body(Some(piece), false)
            .await
            .map_err(downstream)?;
    }
    session
        .write_response_body(Some(Bytes::new()), true)
        .await
        .map_err(downstream)
}

/// An answer without `Content-Length` or `Transfer-Encoding` (Odoo's HTTP/1.0 workers, which
/// end it by closing) goes to the client chunked, so its connection stays open (as Pingora's
/// proxy does).
fn chunk_if_unframed(resp: &mut ResponseHeader, no_body: bool) -> Result<()> {
    let framed = resp.headers.contains_key(http::header::TRANSFER_ENCODING)
        || resp.headers.contains_key(http::header::CONTENT_LENGTH);
    if !no_body && !framed {
        resp.set_version(http::Version::HTTP_11);
        resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_whole_bodiless_http11_gets_and_heads_take_this_path() {
        let ok = |h: &str| eligible(h.as_bytes());
        assert!(ok("GET /odoo HTTP/1.1\r\nHost: erp\r\n\r\n"));
        assert!(ok(
            "HEAD /web/login HTTP/1.1\r\nHost: erp\r\nCookie: a=b\r\n\r\n"
        ));
        // Not whole yet, or a second request after it: Pingora's proxy reads and serves.
        assert!(!ok("GET /odoo HTTP/1.1\r\nHost: erp\r\n"));
        assert!(!ok(
            "GET /a HTTP/1.1\r\nHost: erp\r\n\r\nGET /b HTTP/1.1\r\nHost: erp\r\n\r\n"
        ));
        assert!(!ok(
            "POST /web/dataset/call_kw HTTP/1.1\r\nHost: erp\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(!ok("GET /odoo HTTP/1.1\r\nContent-Length: 0\r\n\r\n"));
        assert!(!ok(
            "GET /odoo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ));
        assert!(!ok(
            "GET /websocket HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        ));
        assert!(!ok("GET /odoo HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"));
        assert!(!ok("GET /odoo HTTP/1.0\r\n\r\n"));
        assert!(!ok("GET http://erp/odoo HTTP/1.1\r\nHost: erp\r\n\r\n"));
        assert!(!ok("OPTIONS * HTTP/1.1\r\nHost: erp\r\n\r\n"));
        assert!(!ok("GET /odoo HTTP/1.1\r\nBad Header: x\r\n\r\n"));
        let many: String = (0..MAX_HEADERS + 1)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect();
        assert!(!ok(&format!("GET / HTTP/1.1\r\n{many}\r\n")));
    }

    #[test]
    fn an_answer_that_ends_by_closing_goes_on_chunked() {
        let mut r = ResponseHeader::build(200, None).expect("head");
        r.set_version(http::Version::HTTP_10);
        chunk_if_unframed(&mut r, false).expect("chunked");
        assert_eq!(r.version, http::Version::HTTP_11);
        assert_eq!(
            r.headers.get("transfer-encoding").map(|v| v.as_bytes()),
            Some(&b"chunked"[..])
        );
        let mut r = ResponseHeader::build(304, None).expect("head");
        chunk_if_unframed(&mut r, true).expect("as is");
        assert!(!r.headers.contains_key("transfer-encoding"));
        let mut r = ResponseHeader::build(200, None).expect("head");
        r.insert_header("content-length", "5").expect("length");
        chunk_if_unframed(&mut r, false).expect("as is");
        assert!(!r.headers.contains_key("transfer-encoding"));
    }
}
