//! WebSockets, relayed by erpgate itself.
//!
//! Pingora's proxy keeps a WebSocket in its whole proxy task for as long as it is open: the
//! task, the session and a 64 KiB body buffer for each direction, about 53 KiB per socket,
//! idle or not. At month-end every open Odoo tab holds one. So once the handshake request
//! has passed its class's policy (`request_filter` in [`crate::proxy`]), erpgate takes it out
//! of Pingora's proxy, with the request's session and state, and:
//! - connects to a server of the class's pool, the same choice as for any request (zone
//!   first, least connections, failing over to the next server while nothing was sent);
//! - passes the handshake on with the same forwarded headers, and Odoo's answer back with
//!   the same response headers;
//! - once Odoo has switched protocols, relays bytes both ways holding only the two sockets
//!   while the WebSocket is idle: a read buffer exists only while bytes move (a TLS client
//!   connection keeps a small one for its decrypted bytes). Each direction ends after its
//!   idle time (the browser's: the class's `idle`; Odoo's: the longer of `read` and `idle`).
//!
//! The access line, the audit record and the metrics come when the WebSocket closes, as for
//! any request. On SIGTERM each relay closes its WebSocket properly ([`crate::wsclose`]).

use crate::access::Line;
use crate::fast::upstream;
use crate::proxy::{Ctx, ErpGate};
use crate::wsclose::{self, FrameTracker, CLOSING, FORCED, RUNNING, SERVER_CLOSE};
use bytes::Bytes;
use futures_util::FutureExt;
use http::header::{self, HeaderName};
use pingora::http::RequestHeader;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::HttpSession as OdooSession;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::Stream;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::Peer;
use pingora::{Error, ErrorType, Result};
use std::os::fd::AsFd;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Most bytes read at a time.
const CHUNK: usize = 16 * 1024;

/// The read buffer a TLS client connection keeps.
const TLS_BUF: usize = 4096;

/// Whether the request (HTTP/1) asks for a WebSocket. Other `Upgrade` requests stay with
/// Pingora, which passes them on as plain requests without the upgrade.
pub fn is_websocket(session: &Session) -> bool {
    matches!(*session.downstream_session, ServerSession::H1(_))
        && is_websocket_request(session.req_header())
}

/// HTTP/1.1, `Upgrade: websocket` and a `Connection` naming `upgrade`.
pub fn is_websocket_request(req: &RequestHeader) -> bool {
    req.version == http::Version::HTTP_11
        && has_token(req, header::UPGRADE, "websocket")
        && has_token(req, header::CONNECTION, "upgrade")
}

fn has_token(req: &RequestHeader, name: HeaderName, token: &str) -> bool {
    crate::headers::tokens(req, name).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// A handshake has no body, and only `GET` opens a WebSocket (RFC 6455, 4.1).
fn well_formed(req: &RequestHeader) -> bool {
    let empty = req
        .headers
        .get(header::CONTENT_LENGTH)
        .is_none_or(|v| v.as_bytes().trim_ascii() == b"0");
    req.method == http::Method::GET && empty && !req.headers.contains_key(header::TRANSFER_ENCODING)
}

/// The handshake as it goes to Odoo (before the forwarded headers): without the fields that
/// concern the client's connection only, asking for the upgrade again.
fn odoo_request(req: &RequestHeader) -> Result<RequestHeader> {
    let mut up = req.clone();
    crate::headers::strip_hop_by_hop(&mut up, req);
    up.insert_header(header::CONNECTION, "Upgrade")?;
    up.insert_header(header::UPGRADE, "websocket")?;
    Ok(up)
}

/// Serves a WebSocket handshake that passed its class's policy, and then the WebSocket.
pub async fn serve(gate: ErpGate, mut session: Session, mut ctx: Ctx) {
    if !well_formed(session.req_header()) {
        ctx.decision = "bad_upgrade";
        let e = Error::explain(
            ErrorType::HTTPStatus(400),
            "a WebSocket handshake is a GET without a body",
        );
        gate.fail_to_proxy(&mut session, &e, &mut ctx).await;
        gate.logging(&mut session, Some(&e), &mut ctx).await;
        return;
    }
    // Boxed: the handshake's state is let go once it is done, not kept in the task for as
    // long as the WebSocket stays open.
    let (mut odoo, socket) = match Box::pin(handshake(&gate, &mut session, &mut ctx)).await {
        Ok(Some(odoo)) => odoo,
        // Odoo refused the upgrade; its answer went to the client.
        Ok(None) => {
            gate.logging(&mut session, None, &mut ctx).await;
            return;
        }
        Err(e) => {
            if !gate.suppress_error_log(&session, &ctx, &e) {
                tracing::error!("WebSocket handshake failed: {e}");
            }
            gate.fail_to_proxy(&mut session, &e, &mut ctx).await;
            gate.logging(&mut session, Some(&e), &mut ctx).await;
            return;
        }
    };
    // Bytes already read past either head (a browser should wait for the 101, Odoo may
    // send at once): whatever is buffered is taken now, without waiting.
    let early_client = early(
        session
            .downstream_session
            .read_request_body()
            .now_or_never(),
    );
    let early_odoo = early(odoo.read_body_bytes().now_or_never());
    // What the log needs of the request; the rest of it is let go.
    let req = session.req_header();
    let method = req.method.clone();
    let path = req.uri.path().to_string();
    let audited = ctx.own_class().is_some_and(|c| c.audit);
    let forwarded_for = if audited {
        crate::proxy::forwarded_for(req)
    } else {
        String::new()
    };
    let Session {
        downstream_session, ..
    } = session;
    let ServerSession::H1(client) = *downstream_session else {
        return;
    };
    let timeouts = ctx.own_class().map(|c| c.timeouts);
    let Some(t) = timeouts else {
        return;
    };
    let plain = client.stream().as_any().is::<L4Stream>();
    let (client_rx, client_tx) = tokio::io::split(client.into_inner());
    // Pingora's session (and its stream, about 0.45 KiB) goes; the relay holds the socket.
    drop(odoo);
    let odoo = match TcpStream::from_std(socket) {
        Ok(odoo) => odoo,
        Err(e) => {
            let e = Error::because(ErrorType::ConnectError, "WebSocket to Odoo", e);
            tracing::error!("WebSocket relay failed: {e}");
            return;
        }
    };
    let (odoo_rx, odoo_tx) = odoo.into_split();
    let tunnel = Box::new(Tunnel {
        up: Half::new(client_rx, odoo_tx, plain, t.idle),
        down: Half::new(odoo_rx, client_tx, true, t.read.max(t.idle)),
        gate,
        ctx,
        method,
        path,
        forwarded_for,
    });
    // A task of its own, as small as the relay: this one (room for every step of the
    // handshake) ends here.
    tokio::spawn(tunnel.run(early_client, early_odoo));
}

/// Bytes a session had buffered: `Some(Ok(Some(_)))` from a read that did not wait.
fn early(read: Option<Result<Option<Bytes>>>) -> Bytes {
    match read {
        Some(Ok(Some(b))) => b,
        _ => Bytes::new(),
    }
}

/// Connects to Odoo (failing over while nothing was sent) and passes the handshake on.
/// `Some`: Odoo switched protocols and the client has its 101; the session (for the bytes it
/// read past the answer) and a second descriptor of its socket, which the relay keeps once
/// the session is let go. `None`: Odoo refused, and its answer went to the client, whose
/// connection then closes.
async fn handshake(
    gate: &ErpGate,
    session: &mut Session,
    ctx: &mut Ctx,
) -> Result<Option<(OdooSession, std::net::TcpStream)>> {
    // A connection of its own (never a pooled one: it becomes the WebSocket), to the server
    // `upstream_peer` picks, with its timeouts; failing over as `fail_to_connect` says.
    let (tcp, peer) = loop {
        let peer = gate.upstream_peer(session, ctx).await?;
        match connect(&peer).await {
            Ok(tcp) => break (tcp, peer),
            Err(e) => {
                let mut e = gate.fail_to_connect(session, &peer, ctx, e);
                e.as_up();
                if !e.retry() {
                    return Err(e);
                }
            }
        }
    };
    let socket = tcp
        .as_fd()
        .try_clone_to_owned()
        .map(std::net::TcpStream::from)
        .or_else(|e| Error::e_because(ErrorType::ConnectError, "WebSocket to Odoo", e))?;
    let mut up = odoo_request(session.req_header())?;
    gate.upstream_request_filter(session, &mut up, ctx).await?;
    let stream: Stream = Box::new(L4Stream::from(tcp));
    let mut odoo = OdooSession::new_with_options(stream, &*peer);
    odoo.write_request_header(Box::new(up))
        .await
        .map_err(upstream)?;
    odoo.read_response().await.map_err(upstream)?;
    let Some(mut resp) = odoo.resp_header().cloned() else {
        return Err(upstream(Error::explain(
            ErrorType::InvalidHTTPHeader,
            "no answer to the WebSocket handshake",
        )));
    };
    gate.response_filter(session, &mut resp, ctx).await?;
    let upgraded = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
    if !upgraded {
        session.set_keepalive(None);
    }
    session
        .downstream_session
        .write_response_header(Box::new(resp))
        .await?;
    if upgraded {
        return Ok(Some((odoo, socket)));
    }
    while let Some(body) = odoo.read_body_bytes().await.map_err(upstream)? {
        session
            .downstream_session
            .write_response_body(body, false)
            .await?;
    }
    session.downstream_session.finish_body().await?;
    Ok(None)
}

/// A plain TCP connection to `peer` within its connect timeout. Not Pingora's connector: the
/// stream it builds carries a socket digest and more, about 0.4 KiB per WebSocket (idle_memory,
/// 6,000 WebSockets: 6.59 against 6.16 KiB); Pingora's client session, which passes the
/// handshake on, gets it wrapped as Pingora's stream only while the handshake lasts.
async fn connect(peer: &HttpPeer) -> Result<TcpStream> {
    let Some(addr) = peer.address().as_inet().copied() else {
        return Error::e_explain(ErrorType::ConnectError, "WebSockets go to TCP servers");
    };
    let limit = peer
        .options
        .connection_timeout
        .unwrap_or(Duration::from_secs(10));
    let conn = crate::fast::connect(addr, limit).await?;
    // Small frames both ways, each to go at once.
    let _ = conn.set_nodelay(true);
    Ok(conn)
}

/// An open WebSocket: its two directions, and what is left of the request for its log.
/// Kept in one allocation, which the relay's task only points to.
struct Tunnel {
    /// The browser's bytes, to Odoo.
    up: Half<ReadHalf<Stream>, OwnedWriteHalf>,
    /// Odoo's bytes, to the browser.
    down: Half<OwnedReadHalf, WriteHalf<Stream>>,
    gate: ErpGate,
    ctx: Ctx,
    method: http::Method,
    path: String,
    forwarded_for: String,
}

impl Tunnel {
    /// Relays (bytes read past the heads first), then logs the WebSocket.
    async fn run(mut self: Box<Self>, early_client: Bytes, early_odoo: Bytes) {
        let _open = wsclose::Open::new();
        let end = self.relay(early_client, early_odoo).await.err();
        let line = Line {
            method: self.method.as_str(),
            path: &self.path,
            status: 101,
            bytes_in: self.up.bytes,
            bytes_out: self.down.bytes,
        };
        let forwarded_for = || std::mem::take(&mut self.forwarded_for);
        self.gate
            .record(&line, forwarded_for, end.as_deref(), &self.ctx);
    }

    /// Relays until both sides closed, either side stayed idle too long or broke, or erpgate
    /// ended the WebSocket on stopping. An error says what ended it when that was not a close.
    async fn relay(&mut self, early_client: Bytes, early_odoo: Bytes) -> Result<()> {
        self.up.pass(&early_client).await?;
        self.down.pass(&early_odoo).await?;
        // They may hold a session's read buffer.
        drop((early_client, early_odoo));
        let mut phase = wsclose::phase();
        let mut phase2 = phase.clone();
        tokio::try_join!(
            to_odoo(&mut self.up, &mut phase),
            to_client(&mut self.down, &mut phase2)
        )?;
        Ok(())
    }
}

/// One direction of a WebSocket: from one socket (the client's as Pingora's stream, Odoo's
/// as a plain socket) to the other.
struct Half<R, W> {
    from: R,
    to: W,
    /// `from` is a plain socket: wait until it is readable holding no buffer.
    plain: bool,
    /// `from` is a TLS stream: its read buffer.
    buf: Vec<u8>,
    idle: Duration,
    frames: FrameTracker,
    bytes: usize,
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Half<R, W> {
    fn new(from: R, to: W, plain: bool, idle: Duration) -> Self {
        Half {
            from,
            to,
            plain,
            buf: if plain { Vec::new() } else { vec![0; TLS_BUF] },
            idle,
            frames: FrameTracker::default(),
            bytes: 0,
        }
    }

    /// The next bytes (`None`: the other side closed), waiting at most `idle`.
    async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        match tokio::time::timeout(self.idle, self.read()).await {
            Ok(Ok(got)) => Ok(got),
            Ok(Err(e)) => Error::e_because(ErrorType::ReadError, "reading a WebSocket", e),
            Err(_) => Error::e_explain(ErrorType::ReadTimedout, "WebSocket idle too long"),
        }
    }

    async fn read(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if !self.plain {
            let n = self.from.read(&mut self.buf).await?;
            return Ok((n > 0).then(|| self.buf[..n].to_vec()));
        }
        loop {
            // An empty read of a socket waits until it is readable (or closed) and takes
            // nothing; the buffer exists only from then on.
            let _nothing: usize = self.from.read(&mut []).await?;
            let mut buf = vec![0; CHUNK];
            match self.from.read(&mut buf).now_or_never() {
                Some(Ok(0)) => return Ok(None),
                Some(Ok(n)) => {
                    buf.truncate(n);
                    return Ok(Some(buf));
                }
                Some(Err(e)) => return Err(e),
                // The readiness was left from bytes already read; this read cleared it.
                None => continue,
            }
        }
    }

    /// Passes `data` on (following its frames), within `idle`.
    async fn pass(&mut self, data: &[u8]) -> Result<()> {
        self.frames.feed(data);
        self.send(data).await
    }

    async fn send(&mut self, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let write = async {
            self.to.write_all(data).await?;
            self.to.flush().await
        };
        match tokio::time::timeout(self.idle, write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Error::e_because(ErrorType::WriteError, "relaying a WebSocket", e),
            Err(_) => Error::e_explain(ErrorType::WriteTimedout, "relaying a WebSocket"),
        }
    }

    /// No more bytes this way.
    async fn close(&mut self) {
        let _ = tokio::time::timeout(self.idle, self.to.shutdown()).await;
    }
}

/// The browser's frames on their way to Odoo. When erpgate stops, Odoo gets a close frame
/// at the next frame boundary, and what the browser sends after that is dropped.
async fn to_odoo<R, W>(h: &mut Half<R, W>, phase: &mut watch::Receiver<u8>) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut asked = false;
    loop {
        let now = *phase.borrow_and_update();
        if now == FORCED {
            return Ok(());
        }
        if now == CLOSING && !asked && h.frames.at_boundary() {
            h.send(&wsclose::client_close()).await?;
            asked = true;
        }
        let got = tokio::select! {
            _ = phase.changed() => continue,
            got = h.next() => got?,
        };
        let Some(data) = got else {
            h.close().await;
            return Ok(());
        };
        h.bytes += data.len();
        let pass = match (now, asked) {
            (RUNNING, _) => {
                h.frames.feed(&data);
                data.len()
            }
            (_, false) => h.frames.feed_to_boundary(&data),
            (_, true) => 0,
        };
        h.send(&data[..pass]).await?;
    }
}

/// Odoo's frames on their way to the browser. When erpgate ended the WebSocket (asked Odoo
/// to close, or gave up waiting) and the browser got no close frame from Odoo, it gets
/// erpgate's own at the end, if the end falls between two frames.
async fn to_client<R, W>(h: &mut Half<R, W>, phase: &mut watch::Receiver<u8>) -> Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    loop {
        let now = *phase.borrow_and_update();
        if now == FORCED {
            end_to_client(h, true).await;
            return Ok(());
        }
        let got = tokio::select! {
            _ = phase.changed() => continue,
            got = h.next() => got?,
        };
        let Some(data) = got else {
            end_to_client(h, now == CLOSING).await;
            return Ok(());
        };
        h.bytes += data.len();
        h.pass(&data).await?;
    }
}

async fn end_to_client<R, W>(h: &mut Half<R, W>, ours: bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if ours && !h.frames.saw_close() && h.frames.at_boundary() {
        let _ = h.send(&SERVER_CLOSE).await;
    }
    h.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(head: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/websocket", None).expect("head");
        for (k, v) in head {
            r.append_header(k.to_string(), *v).expect("header");
        }
        r
    }

    #[test]
    fn only_websocket_upgrades_are_relayed_by_erpgate() {
        let ws = [
            ("Upgrade", "websocket"),
            ("Connection", "keep-alive, Upgrade"),
        ];
        assert!(is_websocket_request(&req(&ws)));
        assert!(is_websocket_request(&req(&[
            ("upgrade", "WebSocket"),
            ("connection", "upgrade")
        ])));
        assert!(!is_websocket_request(&req(&[
            ("Upgrade", "h2c"),
            ("Connection", "Upgrade")
        ])));
        assert!(!is_websocket_request(&req(&[("Upgrade", "websocket")])));
        let mut old = req(&ws);
        old.set_version(http::Version::HTTP_10);
        assert!(!is_websocket_request(&old));
    }

    #[test]
    fn a_handshake_is_a_get_without_body() {
        assert!(well_formed(&req(&[])));
        assert!(well_formed(&req(&[("Content-Length", "0")])));
        assert!(!well_formed(&req(&[("Content-Length", "5")])));
        assert!(!well_formed(&req(&[("Transfer-Encoding", "chunked")])));
        let mut post = req(&[]);
        post.set_method(http::Method::POST);
        assert!(!well_formed(&post));
    }

    #[test]
    fn odoo_gets_the_upgrade_without_hop_by_hop_fields() {
        let up = odoo_request(&req(&[
            ("Upgrade", "websocket"),
            ("Connection", "Upgrade, X-Secret, Host"),
            ("X-Secret", "1"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic eA=="),
            ("Host", "erp.example.com"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]))
        .expect("request");
        let h = |n: &str| {
            up.headers
                .get(n)
                .map(|v| v.to_str().unwrap_or("?").to_string())
        };
        assert_eq!(h("connection").as_deref(), Some("Upgrade"));
        assert_eq!(h("upgrade").as_deref(), Some("websocket"));
        assert_eq!(h("host").as_deref(), Some("erp.example.com"));
        assert_eq!(
            h("sec-websocket-key").as_deref(),
            Some("dGhlIHNhbXBsZSBub25jZQ==")
        );
        for gone in ["x-secret", "keep-alive", "proxy-authorization"] {
            assert_eq!(h(gone), None, "{gone}");
        }
    }
}
