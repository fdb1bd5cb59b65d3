//! Most requests (a page load's `GET`s and `HEAD`s, and Odoo's JSON-RPC calls, `POST`s of a
//! few hundred bytes), proxied by erpgate's own HTTP/1 loop instead of Pingora's proxy task.
//!
//! Pingora's proxy runs every request through its whole machinery: a boxed proxy future with
//! its phases, cache and module checks, request and response pumps exchanging tasks over
//! channels, a session object on each side, and a pool of Odoo connections that asks the
//! kernel for the peer address of each connection it hands out. Measured here, that machinery
//! costs more CPU per request than nginx spends on the whole request. For a request whose
//! whole head came in the first read, without upgrade or `Expect`, with no body or one of a
//! known length up to 64 KiB ([`MAX_BODY`]), erpgate does the same steps itself, on the bytes: the
//! request head as the client sent it (parsed once, into the same [`RequestHeader`]
//! erpgate's policy reads), the body read whole before Odoo gets any of it, the policy and
//! headers of [`crate::proxy`] (`admit`, the server choice, `forward_headers`,
//! `answer_headers`, the failure and retry rules, the access log, audit and metrics: the
//! code every other request goes through), Odoo's answer framed as HTTP/1.1 says
//! (`Content-Length`, chunked, or up to the close, which goes to the client chunked so its
//! connection stays open), and a pool of kept-alive connections to Odoo. Anything else (a
//! longer or chunked body, an upgrade, `Expect`, HTTP/1.0, absolute URIs, a head not whole in
//! the first read, pipelined requests) goes to Pingora's proxy as before.

use crate::config::Timeouts;
// Each wait on the client or on Odoo has a limit: a limit of seconds (all of the defaults)
// is kept on the thread's one-second tick rather than in the runtime's timer.
use crate::deadline::within;
use crate::headers::{Looked, Present};
use crate::proxy::{self, Client, Ctx, ErpGate, Prefix, Sent};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::protocols::Stream;
use pingora::proxy::ProxyHttp;
use pingora::{Error, ErrorType, Result, RetryType};
use std::borrow::Cow;
use std::cell::RefCell;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most header fields a request or an answer may have on this path (a request with more
/// goes to Pingora's proxy; an answer with more is a bad answer, as for Pingora).
const MAX_HEADERS: usize = 64;

/// Most attempts at one request: the bound erpgate gives Pingora's proxy (a pool's
/// `max_attempts` ends them sooner, through erpgate's failure rules).
const MAX_TRIES: usize = crate::config::MAX_ATTEMPTS_LIMIT;

/// Largest head of an answer from Odoo.
const MAX_ANSWER_HEAD: usize = 64 * 1024;

/// How long each read of a request body may wait (Pingora's own limit for the client).
const BODY_READ: Duration = Duration::from_secs(60);

/// Largest request body this path takes (a longer one goes to Pingora's proxy, which
/// streams it): what erpgate reads of a body before choosing its class anyway.
pub const MAX_BODY: u64 = crate::proxy::PREFIX_MAX;

/// A request this path serves, as the client sent it.
pub struct Request {
    /// Boxed: the request moves from the parse to the connection's loop, into the request's
    /// state and into the client's side of it, and a head inline (352 bytes) was copied at
    /// each move. Boxed, wrk's GET took 294 fewer instructions (callgrind: 19,337 -> 19,043),
    /// and the boxed request state is 688 bytes smaller (it held the head twice).
    req: Box<RequestHeader>,
    /// The length of its body (`Content-Length`, 0 without).
    body_len: u64,
    /// The start of the body: what came after the head.
    body: Bytes,
    /// Which of the fields erpgate looks up it has.
    present: Present,
}

/// The request in `head`, all that a client has sent so far, when it is one this path
/// serves: a whole HTTP/1.1 head in origin form, without upgrade or expectation, and a body,
/// if any, of a `Content-Length` of at most [`MAX_BODY`] (what was sent after the head is
/// its start, not a second request). `None` for anything else: Pingora's proxy serves it.
pub fn request(head: &Bytes) -> Option<Request> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut fields);
    let len = match parsed.parse(head) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return None;
    };
    if !path.starts_with('/') || parsed.version != Some(1) || method == "CONNECT" {
        return None;
    }
    let mut present = Present::NONE;
    for h in parsed.headers.iter() {
        if ["transfer-encoding", "upgrade", "expect"]
            .iter()
            .any(|n| h.name.eq_ignore_ascii_case(n))
        {
            return None;
        }
        present.note(h.name.as_bytes());
    }
    let body_len = body_length(parsed.headers)?;
    if body_len > MAX_BODY || (head.len() - len) as u64 > body_len {
        return None;
    }
    // Built as `http` parts, without the fields' case (Odoo reads them in any case), on the
    // bytes of `head` (Pingora's builder copies the path and converts each name twice).
    let uri = http::Uri::from_maybe_shared(head.slice_ref(path.as_bytes())).ok()?;
    // The target goes to Odoo as the URI gives it back: it must be the client's, byte for byte.
    if uri.path_and_query().map(|p| p.as_str()) != Some(path) {
        return None;
    }
    let mut headers = http::HeaderMap::with_capacity(parsed.headers.len());
    for h in parsed.headers.iter() {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_maybe_shared(head.slice_ref(h.value)).ok()?;
        headers.append(name, value);
    }
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = http::Method::from_bytes(method.as_bytes()).ok()?;
    parts.uri = uri;
    parts.headers = headers;
    let req = Box::new(RequestHeader::from(parts));
    Some(Request {
        req,
        body_len,
        body: head.slice(len..),
        present,
    })
}

/// The length of a request's body: its one `Content-Length` (the same value repeated counts
/// as one), 0 without; `None` when invalid.
fn body_length(fields: &[httparse::Header]) -> Option<u64> {
    let mut length = None;
    for h in fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
    {
        let v = std::str::from_utf8(h.value).ok()?;
        if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let n = v.parse::<u64>().ok()?;
        if length.is_some_and(|l| l != n) {
            return None;
        }
        length = Some(n);
    }
    Some(length.unwrap_or(0))
}

/// Serves one request; the connection back when it may carry another.
///
/// Not an `async fn`: an async function keeps its arguments for its whole run, so the stream
/// and the request would be held twice, as given and in the client's side made of them
/// (the request's state, boxed and copied for each request, was 3,024 bytes; 2,696 with
/// the policy's rare answers and the failure answer boxed; 2,376 like this; 1,696 now, with
/// the request's head boxed).
pub fn serve(
    gate: &ErpGate,
    stream: Stream,
    request: Request,
) -> impl Future<Output = Option<Stream>> + Send + '_ {
    let Request {
        req,
        body_len,
        body,
        present,
    } = request;
    let keepalive = !present
        .get_all(&req.headers, Looked::Connection)
        .flat_map(crate::headers::tokens_in)
        .any(|t| t.eq_ignore_ascii_case(b"close"));
    let client = Downstream {
        stream,
        req,
        present,
        answered: None,
        keepalive,
        body: BytesMut::from(body),
        body_len,
        bytes_out: 0,
        write_timeout: None,
    };
    serve_client(gate, client)
}

async fn serve_client(gate: &ErpGate, mut client: Downstream) -> Option<Stream> {
    let mut ctx = gate.new_ctx();
    ctx.fields = client.present;
    let (result, tries) = proxy(gate, &mut client, &mut ctx).await;
    let failure = result.err();
    if let Some(e) = &failure {
        let answered = client.answered.is_some();
        // Boxed: rare, and its state would take room in every request's.
        let code = Box::pin(proxy::answer_failure(&mut client, answered, e, &mut ctx)).await;
        client.keepalive = false;
        if !matches!(e.etype(), ErrorType::HTTPStatus(c) if *c < 500) {
            tracing::error!(
                "Fail to proxy: {e}, status: {code}, tries: {tries}, retry: false, {}",
                client.summary()
            );
        }
    }
    let req = &client.req;
    let line = crate::access::Line {
        method: req.method.as_str(),
        path: req.uri.path(),
        status: client.answered.or(ctx.own_status()).unwrap_or(0),
        bytes_in: client.body.len(),
        bytes_out: client.bytes_out,
    };
    gate.record(
        &line,
        || proxy::forwarded_for(req),
        failure.as_deref(),
        &ctx,
    );
    if client.keepalive {
        Some(client.stream)
    } else {
        let _ = client.stream.shutdown().await;
        None
    }
}

/// The client's side of a request on this path.
struct Downstream {
    stream: Stream,
    req: Box<RequestHeader>,
    /// Which of the fields erpgate looks up `req` has.
    present: Present,
    /// The status of the answer whose head the client got.
    answered: Option<u16>,
    /// The connection may carry another request after this one.
    keepalive: bool,
    /// The request body, as much of it as was read.
    body: BytesMut,
    /// Its length (`Content-Length`).
    body_len: u64,
    /// Bytes of answer bodies sent (payload, without chunk framing).
    bytes_out: usize,
    /// How long a write to the client may wait (the class's idle time, once known).
    write_timeout: Option<Duration>,
}

impl Downstream {
    /// Reads the rest of the request body, within [`BODY_READ`] for each read.
    async fn read_body(&mut self) -> Result<()> {
        while (self.body.len() as u64) < self.body_len {
            let want = usize::try_from(self.body_len).unwrap_or(usize::MAX) - self.body.len();
            self.body.reserve(want);
            // Never past the body: what follows is the next request's.
            let mut rest = (&mut self.stream).take(want as u64);
            let read = within(BODY_READ, rest.read_buf(&mut self.body))
                .await
                .map_err(|_| {
                    downstream(Error::explain(
                        ErrorType::ReadTimedout,
                        "request body not received in time",
                    ))
                })?
                .map_err(|e| downstream(Error::because(ErrorType::ReadError, "request body", e)))?;
            if read == 0 {
                return Err(downstream(Error::explain(
                    ErrorType::ConnectionClosed,
                    "the client closed in the middle of its request body",
                )));
            }
        }
        Ok(())
    }

    fn body_read(&self) -> bool {
        self.body.len() as u64 == self.body_len
    }

    /// As Pingora says which request a log line is about.
    fn summary(&self) -> String {
        let host = self
            .req
            .headers
            .get(header::HOST)
            .map_or(&b""[..], |h| h.as_bytes());
        format!(
            "{} {}, Host: {}",
            self.req.method,
            String::from_utf8_lossy(self.req.raw_path()),
            String::from_utf8_lossy(host)
        )
    }

    /// The fields of this connection's own, after the status line (and Odoo's fields):
    /// `Date` and `Connection` (as Pingora writes them). The client has the head of a
    /// `status` answer once it is written.
    fn own_fields(&mut self, status: http::StatusCode, out: &mut BytesMut) {
        put_field(
            out,
            b"Date",
            pingora::protocols::http::date::get_cached_date().as_bytes(),
        );
        let connection: &[u8] = if self.keepalive {
            b"keep-alive"
        } else {
            b"close"
        };
        put_field(out, b"Connection", connection);
        self.answered = Some(status.as_u16());
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        // Flushed each time: a TLS stream holds what it encrypted until then.
        let stream = &mut self.stream;
        let write = async move {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        let done = match self.write_timeout {
            Some(t) => within(t, write)
                .await
                .map_err(|_| Error::explain(ErrorType::WriteTimedout, "writing to the client"))?,
            None => write.await,
        };
        done.map_err(|e| Error::because(ErrorType::WriteError, "writing to the client", e))
            .map_err(downstream)
    }
}

impl Client for Downstream {
    fn req_header(&self) -> &RequestHeader {
        &self.req
    }

    fn peer_ip(&self) -> IpAddr {
        self.stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .map_or(
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                crate::forwarded::canonical,
            )
    }

    fn tls(&self) -> bool {
        self.stream.get_ssl_digest().is_some()
    }

    fn has_client_cert(&self) -> bool {
        self.stream
            .get_ssl_digest()
            .is_some_and(|t| !t.cert_digest.is_empty())
    }

    fn set_idle_timeout(&mut self, idle: Duration) {
        self.write_timeout = Some(idle);
    }

    async fn read_prefix(&mut self) -> Result<Prefix> {
        // The whole body: it is at most what Pingora's path reads before choosing the class.
        self.read_body().await?;
        Ok(Prefix {
            bytes: self.body.clone(),
            complete: true,
        })
    }

    async fn answer(&mut self, resp: ResponseHeader, body: Bytes, close: bool) -> Result<()> {
        // A body left unread would be read as the next request.
        if close || !self.body_read() {
            self.keepalive = false;
        }
        let mut out = BytesMut::with_capacity(512 + body.len());
        status_line(resp.status, resp.get_reason_phrase(), &mut out);
        self.own_fields(resp.status, &mut out);
        resp.header_to_h1_wire(&mut out);
        out.put_slice(b"\r\n");
        if self.req.method != http::Method::HEAD {
            out.put_slice(&body);
            self.bytes_out += body.len();
        }
        self.write(&out).await
    }
}

/// The request through erpgate's policy, then to Odoo (failing over and retrying as
/// erpgate's rules say, at most [`MAX_TRIES`] attempts), and Odoo's answer back. Also says
/// how many attempts were made.
async fn proxy(gate: &ErpGate, client: &mut Downstream, ctx: &mut Ctx) -> (Result<()>, usize) {
    match gate.admit(client, ctx).await {
        // erpgate answered itself.
        Ok(true) => return (Ok(()), 0),
        Ok(false) => {}
        Err(e) => return (Err(e), 0),
    }
    // The whole body before Odoo gets any of it (and it stays for another attempt).
    if let Err(e) = client.read_body().await {
        return (Err(e), 0);
    }
    let mut tries = 0;
    loop {
        tries += 1;
        let e = match attempt(client, ctx).await {
            Ok(()) => return (Ok(()), tries),
            Err(e) => e,
        };
        if !e.retry() || tries >= MAX_TRIES {
            return (Err(e), tries);
        }
        tracing::warn!(
            "Fail to proxy: {e}, tries: {tries}, retry: true, {}",
            client.summary()
        );
    }
}

/// One attempt: a server, a connection to it (kept alive or new), the exchange. The error
/// says whether another attempt may follow.
async fn attempt(client: &mut Downstream, ctx: &mut Ctx) -> Result<()> {
    let (server, timeouts) = proxy::choose_server(&client.req, ctx)?;
    let addr = server.socket;
    let mut fresh = false;
    loop {
        let kept = if fresh { None } else { take(addr) };
        let reused = kept.is_some();
        let mut odoo = match kept {
            Some(conn) => conn,
            None => match connect(addr, timeouts.connect).await {
                Ok(conn) => conn,
                Err(e) => return Err(proxy::connect_error(ctx, e)),
            },
        };
        match exchange(client, &mut odoo, ctx, &timeouts).await {
            Ok(true) => {
                put(addr, odoo);
                return Ok(());
            }
            Ok(false) => return Ok(()),
            // Odoo closed this kept-alive connection before any answer (after it was last
            // used): the request goes again to the same server on a new connection.
            Err(e)
                if reused
                    && matches!(e.retry, RetryType::ReusedOnly)
                    && client.answered.is_none() =>
            {
                tracing::debug!("kept-alive connection to Odoo found closed: {e}");
                fresh = true;
            }
            Err(e) => {
                let sent = Sent {
                    method: &client.req.method,
                    answered: client.answered.is_some(),
                    body_lost: false,
                    reused,
                };
                let e = e.more_context(format!("Peer: {addr}"));
                return Err(proxy::error_after_send(sent, e, ctx));
            }
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

/// A new connection to an Odoo server, within `limit` (the WebSocket relay's too), with
/// Nagle's algorithm on (see [`send_request`]).
pub(crate) async fn connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream> {
    let conn = match within(limit, TcpStream::connect(addr)).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            let kind = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                _ => ErrorType::ConnectError,
            };
            return Err(upstream(Error::because(
                kind,
                format!("connect to {addr}"),
                e,
            )));
        }
        Err(_) => {
            return Err(upstream(Error::explain(
                ErrorType::ConnectTimedout,
                format!("connect to {addr}"),
            )))
        }
    };
    Ok(conn)
}

/// The request to Odoo. Sent in one write, as all but large bodies are, it leaves at once
/// whether Nagle's algorithm is on or not: nothing sent on the connection before is still
/// unacknowledged (Odoo's answer to the previous request acknowledged it). So the connection
/// keeps Nagle's algorithm, as nginx's connections to upstreams do, and a new connection to
/// Odoo (one per request to Odoo's HTTP workers) needs no `setsockopt`. A request that takes
/// more than one write turns it off before the rest, whose last part then does not wait for
/// Odoo to acknowledge the part before.
async fn send_request(odoo: &mut TcpStream, out: &[u8]) -> std::io::Result<()> {
    let sent = match odoo.try_write(out) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if sent < out.len() {
        odoo.set_nodelay(true)?;
        odoo.write_all(&out[sent..]).await?;
    }
    Ok(())
}

/// How Odoo's answer body ends (RFC 9112, 6.3).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Up to the close of the connection (Odoo's HTTP/1.0 workers). Sent on chunked, so the
    /// client's connection stays open (as Pingora's proxy does).
    Close,
    /// Up to the close, with a transfer coding other than chunked: sent on as it is, and the
    /// client's connection closes after it.
    CloseCoded,
}

/// One request to Odoo on `odoo` and its answer to the client. `Ok(true)`: the connection
/// to Odoo may carry another request.
async fn exchange(
    client: &mut Downstream,
    odoo: &mut TcpStream,
    ctx: &mut Ctx,
    t: &Timeouts,
) -> Result<bool> {
    // The request as it goes to Odoo: the fields erpgate sets (the forwarded headers and the
    // request id), then the client's, less those of its connection only and those set.
    let req = &client.req;
    let mut out = buffer();
    out.put_slice(req.method.as_str().as_bytes());
    out.put_u8(b' ');
    out.put_slice(req.raw_path());
    out.put_slice(b" HTTP/1.1\r\n");
    let local = || {
        client
            .stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())
    };
    let mut set = Fields {
        out: &mut out,
        names: [""; SET_FIELDS],
        count: 0,
    };
    proxy::forward_headers(req, local, &mut set, ctx)?;
    let Fields { names, count, .. } = set;
    put_client_fields(&mut out, req, client.present, &names[..count]);
    out.put_slice(b"\r\n");
    out.put_slice(&client.body);
    match within(t.read, send_request(odoo, &out)).await {
        Ok(Ok(())) => {}
        // A kept-alive connection Odoo had closed: nothing of the request went anywhere.
        Ok(Err(e)) => {
            let mut e = Error::because(ErrorType::WriteError, "writing to Odoo", e);
            e.retry = RetryType::ReusedOnly;
            return Err(upstream(e));
        }
        Err(_) => {
            return Err(upstream(Error::explain(
                ErrorType::WriteTimedout,
                "writing to Odoo",
            )))
        }
    }

    let mut buf = buffer();
    out.clear();
    let (framing, keep) = read_answer_head(odoo, &mut buf, t.read, client, ctx, &mut out).await?;
    relay_body(client, odoo, &mut buf, &mut out, framing, t.read).await?;
    put_back(buf);
    put_back(out);
    Ok(keep)
}

/// The fields erpgate sets on a request to Odoo, written as they are set, and the names of
/// the client's fields that do not go on (those set, and those removed).
struct Fields<'a> {
    out: &'a mut BytesMut,
    names: [&'static str; SET_FIELDS],
    count: usize,
}

/// Most fields erpgate sets or removes on a request to Odoo ([`proxy::forward_headers`] sets
/// five and removes up to four).
const SET_FIELDS: usize = 12;

impl Fields<'_> {
    /// The client's `name` field does not go on.
    fn skip(&mut self, name: &'static str) -> Result<()> {
        let Some(slot) = self.names.get_mut(self.count) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "more fields set or removed than the request to Odoo holds",
            ));
        };
        *slot = name;
        self.count += 1;
        Ok(())
    }
}

impl proxy::UpstreamFields for Fields<'_> {
    // The client's fields are written after these, less the skipped ones.
    fn remove(&mut self, name: &'static str) -> Result<()> {
        self.skip(name)
    }

    fn set(
        &mut self,
        name: &'static str,
        value: impl FnOnce(&mut dyn std::io::Write) -> std::io::Result<()>,
    ) -> Result<()> {
        self.skip(name)?;
        self.out.put_slice(name.as_bytes());
        self.out.put_slice(b": ");
        value(&mut (&mut *self.out).writer())
            .map_err(|e| Error::because(ErrorType::InternalError, "header value", e))?;
        self.out.put_slice(b"\r\n");
        Ok(())
    }
}

/// The client's fields that go on to Odoo: all but those of its connection only and the
/// `skipped` ones (set by erpgate). A function of its own, so that what it keeps is not part
/// of the request's state.
fn put_client_fields(out: &mut BytesMut, req: &RequestHeader, present: Present, skipped: &[&str]) {
    let hop_by_hop = crate::headers::HopByHop::noted(req, present);
    for (name, value) in req.headers.iter() {
        let n = name.as_str();
        if skipped.contains(&n) || hop_by_hop.is(n) {
            continue;
        }
        put_field(out, n.as_bytes(), value.as_bytes());
    }
}

/// `name: value` and its line end.
fn put_field(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_slice(name);
    out.put_slice(b": ");
    out.put_slice(value);
    out.put_slice(b"\r\n");
}

/// Whether `v` is a valid field value (as `http::HeaderValue::from_bytes` says, without
/// making one).
fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b == b'\t' || (b >= b' ' && b != 0x7f))
}

/// `HTTP/1.1 <status> <reason>` and its line end: the reason given, else the status's own.
fn status_line(status: http::StatusCode, reason: Option<&str>, out: &mut BytesMut) {
    out.put_slice(b"HTTP/1.1 ");
    out.put_slice(status.as_str().as_bytes());
    out.put_u8(b' ');
    let reason = reason.or(status.canonical_reason()).unwrap_or("");
    out.put_slice(reason.as_bytes());
    out.put_slice(b"\r\n");
}

/// Odoo's answer's head as [`proxy::answer_headers`] changes it: erpgate's fields are written
/// to `ours` as they are set, and their names kept, so that Odoo's of the same names are left
/// out; the `Set-Cookie` values are Odoo's (borrowed from the parse) and erpgate's.
struct Answer<'a> {
    status: http::StatusCode,
    ours: &'a mut BytesMut,
    names: [Option<http::HeaderName>; SET_ANSWER_FIELDS],
    /// The lengths of `names` (bit `len % 64`): a field of another length is none of them,
    /// without comparing names (each of Odoo's fields is checked against them).
    lengths: u64,
    cookies: Vec<Cow<'a, [u8]>>,
}

/// The bit of a name of `len` bytes in [`Answer::lengths`].
fn length_bit(len: usize) -> u64 {
    1 << (len % 64)
}

/// Most fields erpgate sets on an answer ([`proxy::answer_headers`] sets up to four).
const SET_ANSWER_FIELDS: usize = 8;

impl<'a> Answer<'a> {
    /// An answer with `status` whose fields erpgate sets go to `ours`, with Odoo's
    /// `cookies`; none set yet.
    fn new(status: http::StatusCode, ours: &'a mut BytesMut, cookies: Vec<Cow<'a, [u8]>>) -> Self {
        Answer {
            status,
            ours,
            names: Default::default(),
            lengths: 0,
            cookies,
        }
    }

    /// Whether erpgate set the field `name`.
    fn sets(&self, name: &str) -> bool {
        self.lengths & length_bit(name.len()) != 0
            && self
                .names
                .iter()
                .flatten()
                .any(|n| name.eq_ignore_ascii_case(n.as_str()))
    }

    fn put(&mut self, name: http::HeaderName, value: &[u8]) -> Result<()> {
        if self.sets(name.as_str()) {
            // Set again: the new value replaces the old, as in a header map.
            let prefix = name.as_str().as_bytes();
            let mut kept = BytesMut::with_capacity(self.ours.len());
            for line in self.ours.split_inclusive(|&b| b == b'\n') {
                let named = line.len() > prefix.len()
                    && line[..prefix.len()].eq_ignore_ascii_case(prefix)
                    && line[prefix.len()] == b':';
                if !named {
                    kept.put_slice(line);
                }
            }
            *self.ours = kept;
        } else {
            let Some(slot) = self.names.iter_mut().find(|n| n.is_none()) else {
                return Err(Error::explain(
                    ErrorType::InternalError,
                    "more fields set than an answer holds",
                ));
            };
            self.lengths |= length_bit(name.as_str().len());
            *slot = Some(name.clone());
        }
        put_field(self.ours, name.as_str().as_bytes(), value);
        Ok(())
    }
}

impl proxy::AnswerFields for Answer<'_> {
    fn status(&self) -> http::StatusCode {
        self.status
    }

    fn set(&mut self, name: http::HeaderName, value: &http::HeaderValue) -> Result<()> {
        self.put(name, value.as_bytes())
    }

    fn set_bytes(&mut self, name: http::HeaderName, value: &[u8]) -> Result<()> {
        // As a header map would refuse it.
        if !valid_value(value) {
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "invalid header value",
            ));
        }
        self.put(name, value)
    }

    fn cookies(&self) -> impl Iterator<Item = &[u8]> {
        self.cookies.iter().map(|c| &**c)
    }

    fn add_cookie(&mut self, value: String) -> Result<()> {
        self.cookies.push(Cow::Owned(value.into_bytes()));
        Ok(())
    }

    fn change_cookies(&mut self, changed: Vec<Option<Vec<u8>>>) -> Result<()> {
        for (cookie, new) in self.cookies.iter_mut().zip(changed) {
            if let Some(new) = new.filter(|v| valid_value(v)) {
                *cookie = Cow::Owned(new);
            }
        }
        Ok(())
    }
}

/// Reads the head of Odoo's answer, past any interim `1xx`, and puts the head the client gets
/// in `out`: HTTP/1.1, Odoo's fields as they came (in their case) except those erpgate sets
/// ([`proxy::answer_headers`], the framing's, `Date` and `Connection`), then erpgate's. What
/// follows the head is left in `buf`. Returns how the body is framed and whether the
/// connection to Odoo may carry another request.
async fn read_answer_head(
    odoo: &mut TcpStream,
    buf: &mut BytesMut,
    limit: Duration,
    client: &mut Downstream,
    ctx: &mut Ctx,
    out: &mut BytesMut,
) -> Result<(Framing, bool)> {
    let head_request = client.req.method == http::Method::HEAD;
    let bad = |what: &'static str| upstream(Error::explain(ErrorType::InvalidHTTPHeader, what));
    loop {
        let read = within(limit, odoo.read_buf(buf))
            .await
            .map_err(|_| upstream(Error::explain(ErrorType::ReadTimedout, "Odoo's answer")))?;
        match read {
            Ok(0) | Err(_) if buf.is_empty() => {
                // Closed before answering: on a kept-alive connection Odoo closed it while
                // idle, and the request may go again.
                let mut e =
                    Error::explain(ErrorType::ConnectionClosed, "Odoo closed before answering");
                e.retry = RetryType::ReusedOnly;
                return Err(upstream(e));
            }
            Ok(0) => return Err(bad("Odoo closed in the middle of its answer's head")),
            Err(e) => {
                return Err(upstream(Error::because(
                    ErrorType::ReadError,
                    "reading Odoo's answer",
                    e,
                )))
            }
            Ok(_) => {}
        }
        loop {
            let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut parsed = httparse::Response::new(&mut fields);
            let len = match parsed.parse(buf) {
                Ok(httparse::Status::Complete(len)) => len,
                Ok(httparse::Status::Partial) if buf.len() < MAX_ANSWER_HEAD => break,
                Ok(httparse::Status::Partial) => return Err(bad("answer head too large")),
                Err(_) => return Err(bad("invalid answer head")),
            };
            let code = parsed.code.unwrap_or(0);
            if (100..200).contains(&code) {
                // An interim answer (103 Early Hints, 100 Continue): the final one follows.
                buf.advance(len);
                continue;
            }
            let framing = framing(code, head_request, parsed.headers)?;
            let keep = !matches!(framing, Framing::Close | Framing::CloseCoded)
                && keeps_alive(parsed.version, parsed.headers);
            // Odoo's fields are written from the parse, in their case; erpgate's as they are
            // set (no header map: building one was 12 % of the instructions of a request).
            let mut ours = buffer();
            let status = http::StatusCode::from_u16(code).map_err(|_| bad("status"))?;
            let mut answer = Answer::new(status, &mut ours, Vec::new());
            for h in parsed.headers.iter() {
                if h.name.eq_ignore_ascii_case("set-cookie") {
                    answer.cookies.push(Cow::Borrowed(h.value));
                }
            }
            if framing == Framing::CloseCoded {
                client.keepalive = false;
            }
            proxy::answer_headers(&mut answer, ctx)?;
            status_line(answer.status, parsed.reason, out);
            let rechunked = framing == Framing::Close;
            for h in parsed.headers.iter() {
                let skip = ["set-cookie", "date", "connection"]
                    .iter()
                    .any(|n| h.name.eq_ignore_ascii_case(n))
                    || (rechunked && h.name.eq_ignore_ascii_case("transfer-encoding"))
                    || answer.sets(h.name);
                if !skip {
                    put_field(out, h.name.as_bytes(), h.value);
                }
            }
            client.own_fields(answer.status, out);
            if rechunked {
                // Sent on chunked, so the client's connection stays open.
                put_field(out, b"Transfer-Encoding", b"chunked");
            }
            for cookie in &answer.cookies {
                put_field(out, b"Set-Cookie", cookie);
            }
            drop(answer);
            out.put_slice(&ours);
            out.put_slice(b"\r\n");
            put_back(ours);
            buf.advance(len);
            return Ok((framing, keep));
        }
    }
}

/// How the body of an answer with status `code` and these fields is framed (`head_request`:
/// it answers a `HEAD`).
fn framing(code: u16, head_request: bool, fields: &[httparse::Header]) -> Result<Framing> {
    if head_request || code == 204 || code == 304 {
        return Ok(Framing::Empty);
    }
    let named = |name: &'static str| {
        fields
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    if named("transfer-encoding").next().is_some() {
        let last = named("transfer-encoding")
            .flat_map(|v| v.split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        return Ok(match last {
            Some(t) if t.eq_ignore_ascii_case(b"chunked") => Framing::Chunked,
            _ => Framing::CloseCoded,
        });
    }
    let parse = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let mut lengths = named("content-length");
    match lengths.next() {
        None => Ok(Framing::Close),
        Some(first) => {
            let n = parse(first);
            match n {
                Some(n) if lengths.all(|v| parse(v) == Some(n)) => Ok(Framing::Length(n)),
                _ => Err(upstream(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    "invalid Content-Length from Odoo",
                ))),
            }
        }
    }
}

/// Whether Odoo keeps the connection open after an answer of this HTTP version (`0`: 1.0)
/// and these fields.
fn keeps_alive(version: Option<u8>, fields: &[httparse::Header]) -> bool {
    let mut tokens = fields
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("connection"))
        .flat_map(|h| h.value.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    if version == Some(0) {
        tokens.any(|t| t.eq_ignore_ascii_case(b"keep-alive"))
    } else {
        !tokens.any(|t| t.eq_ignore_ascii_case(b"close"))
    }
}

/// Sends `head` and the body after it to the client: the bytes in `buf` first, then what
/// Odoo sends, until the framing says the body ended.
async fn relay_body(
    client: &mut Downstream,
    odoo: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut BytesMut,
    framing: Framing,
    limit: Duration,
) -> Result<()> {
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = Chunks::default();
    let mut done = matches!(framing, Framing::Empty | Framing::Length(0));
    loop {
        // What `buf` holds of the body, onto `out`.
        match framing {
            Framing::Empty => {}
            Framing::Length(_) => {
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                out.put_slice(&buf[..n]);
                client.bytes_out += n;
                left -= n as u64;
                done = left == 0;
            }
            Framing::Chunked => {
                let (used, ended, payload) = chunks
                    .feed(buf)
                    .map_err(|what| upstream(Error::explain(ErrorType::InvalidHTTPHeader, what)))?;
                out.put_slice(&buf[..used]);
                client.bytes_out += payload;
                done = ended;
            }
            Framing::Close if !buf.is_empty() => {
                out.put_slice(format!("{:x}\r\n", buf.len()).as_bytes());
                out.put_slice(buf);
                out.put_slice(b"\r\n");
                client.bytes_out += buf.len();
            }
            Framing::Close => {}
            Framing::CloseCoded => {
                out.put_slice(buf);
                client.bytes_out += buf.len();
            }
        }
        buf.clear();
        if !out.is_empty() {
            client.write(out).await?;
            out.clear();
        }
        if done {
            return Ok(());
        }
        let read = within(limit, odoo.read_buf(buf))
            .await
            .map_err(|_| upstream(Error::explain(ErrorType::ReadTimedout, "Odoo's answer")))?
            .map_err(|e| upstream(Error::because(ErrorType::ReadError, "Odoo's answer", e)))?;
        if read == 0 {
            match framing {
                Framing::Close => return client.write(b"0\r\n\r\n").await,
                Framing::CloseCoded => return Ok(()),
                _ => {}
            }
            return Err(upstream(Error::explain(
                ErrorType::ConnectionClosed,
                "Odoo closed in the middle of its answer's body",
            )));
        }
    }
}

/// Where a chunked body (RFC 9112, 7.1) is: its bytes go through unchanged, this finds the
/// end.
#[derive(Debug, Default)]
struct Chunks {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    /// Reading a chunk size (its value so far, whether any digit came).
    #[default]
    Size,
    SizeDigits(u64),
    /// A chunk extension, up to the end of the line.
    Extension(u64),
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    /// Trailer fields; `true` at the start of a line.
    Trailer(bool),
    TrailerLine,
    EndLf,
    Done,
}

impl Chunks {
    /// Reads `data`: how many of its bytes belong to the body, whether the body ended there,
    /// and how many of them are payload.
    fn feed(&mut self, data: &[u8]) -> std::result::Result<(usize, bool, usize), &'static str> {
        use ChunkState::*;
        let mut i = 0;
        let mut payload = 0;
        while i < data.len() {
            if self.state == Done {
                break;
            }
            let b = data[i];
            if let Data(n) = self.state {
                let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() - i);
                i += take;
                payload += take;
                let rest = n - take as u64;
                self.state = if rest == 0 { DataCr } else { Data(rest) };
                continue;
            }
            self.state = match (self.state, b) {
                (Size, _) => SizeDigits(hex(b).ok_or("bad chunk size")?),
                (SizeDigits(n), _) if hex(b).is_some() => {
                    if n >> 56 != 0 {
                        return Err("chunk size too large");
                    }
                    SizeDigits(n << 4 | hex(b).unwrap_or(0))
                }
                (SizeDigits(n), b';' | b' ' | b'\t') => Extension(n),
                (SizeDigits(n), b'\r') | (Extension(n), b'\r') => SizeLf(n),
                (Extension(n), _) => Extension(n),
                (SizeLf(0), b'\n') => Trailer(true),
                (SizeLf(n), b'\n') => Data(n),
                (DataCr, b'\r') => DataLf,
                (DataLf, b'\n') => Size,
                (Trailer(true), b'\r') => EndLf,
                (Trailer(_), b'\n') | (TrailerLine, b'\n') => Trailer(true),
                (Trailer(_), _) | (TrailerLine, _) => TrailerLine,
                (EndLf, b'\n') => Done,
                _ => return Err("bad chunked framing"),
            };
            i += 1;
        }
        Ok((i, self.state == Done, payload))
    }
}

fn hex(b: u8) -> Option<u64> {
    (b as char).to_digit(16).map(u64::from)
}

/// The size of the buffers a request on this path reads and writes through: the client's
/// head ([`crate::conn`]), the request to Odoo and the answer to the client, and Odoo's answer
/// as read.
pub(crate) const BUFFER: usize = 4096;

/// Most buffers a thread keeps for its next requests (256 KiB). Under wrk with 64
/// connections 64 took the page faults as low as 256 did (0.025-0.028 a request against
/// 0.031-0.033), and after a burst of 500 connections held less: RSS 16.8 MiB against 18.3
/// (14.4 without kept buffers).
const SPARE_BUFFERS: usize = 64;

/// A buffer given back is kept only up to this size (an answer body may have grown it).
const SPARE_MAX: usize = 64 * 1024;

thread_local! {
    /// Buffers of requests served on this thread, for its next requests. Allocated for each
    /// request, 4 KiB buffers made mimalloc take pages and give them back all the time (a
    /// page fault every ten requests under wrk, and its allocations of them were 4 % of
    /// erpgate's user time).
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// An empty buffer of at least [`BUFFER`] bytes: one this thread kept, or a new one.
pub(crate) fn buffer() -> BytesMut {
    match SPARE.with_borrow_mut(Vec::pop) {
        Some(mut b) => {
            // Back to the start of its memory (it was cleared; this does not allocate).
            b.reserve(BUFFER);
            b
        }
        None => BytesMut::with_capacity(BUFFER),
    }
}

/// Keeps `b` for another request on this thread, if it is not too large and the thread does
/// not have its fill.
pub(crate) fn put_back(mut b: BytesMut) {
    b.clear();
    if b.capacity() > SPARE_MAX {
        return;
    }
    SPARE.with_borrow_mut(|spare| {
        if spare.len() < SPARE_BUFFERS {
            spare.push(b);
        }
    });
}

thread_local! {
    /// Kept-alive connections to Odoo servers, by address, the newest last; one pool per
    /// thread. erpgate's threads each run a runtime of their own, and a socket's readiness
    /// comes from the runtime it was opened on: a connection opened on one thread and used
    /// on the other made every wake-up of its request a wake-up of the other thread too (an
    /// `eventfd` write and a thread switch; measured, about one per request).
    ///
    /// A list, not a map: a pool has a few servers, and comparing addresses costs less than
    /// hashing one (SipHash, in a `HashMap`, was 0.5 % of erpgate's user time).
    static POOL: RefCell<Vec<(SocketAddr, Vec<Idle>)>> = const { RefCell::new(Vec::new()) };
}

/// Where `pool` lists the idle connections to `addr`, if it has had any.
fn server_at(pool: &[(SocketAddr, Vec<Idle>)], addr: SocketAddr) -> Option<usize> {
    pool.iter().position(|(a, _)| *a == addr)
}

/// Most idle connections kept per Odoo server, per thread.
const POOL_PER_SERVER: usize = 128;

/// An idle connection is closed after this long, to within a second (Pingora's pool keeps
/// them 60 s too).
const POOL_IDLE: Duration = Duration::from_secs(60);

struct Idle {
    conn: TcpStream,
    /// When it went idle, to within a second ([`crate::conn::about_now`]: reading the clock
    /// for it on each request was 2 % of erpgate's user time).
    since: Instant,
}

/// A kept-alive connection to `addr` that Odoo has not closed, if this thread has one.
fn take(addr: SocketAddr) -> Option<TcpStream> {
    POOL.with_borrow_mut(|pool| {
        let at = server_at(pool, addr)?;
        let idle = &mut pool[at].1;
        let now = crate::conn::about_now();
        while let Some(i) = idle.pop() {
            if now.saturating_duration_since(i.since) < POOL_IDLE && open(&i.conn) {
                return Some(i.conn);
            }
        }
        None
    })
}

/// Back into this thread's pool (the oldest is closed when `addr` has its fill).
fn put(addr: SocketAddr, conn: TcpStream) {
    POOL.with_borrow_mut(|pool| {
        let at = server_at(pool, addr).unwrap_or_else(|| {
            pool.push((addr, Vec::new()));
            pool.len() - 1
        });
        let idle = &mut pool[at].1;
        let now = crate::conn::about_now();
        let stale = idle
            .iter()
            .take_while(|i| now.saturating_duration_since(i.since) >= POOL_IDLE)
            .count();
        idle.drain(..stale);
        if idle.len() >= POOL_PER_SERVER {
            idle.remove(0);
        }
        idle.push(Idle { conn, since: now });
    });
}

/// Whether an idle connection is still open: nothing to read (a closed one reads 0 bytes;
/// one with bytes Odoo sent unasked cannot be used either). No system call unless the
/// socket became readable.
fn open(conn: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(conn.try_read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy::AnswerFields;

    #[test]
    fn an_answers_fields_are_written_as_set_and_replace_odoos() {
        let odoo = [&b"session_id=1; Path=/"[..], b"lang=en"];
        let mut ours = BytesMut::new();
        let cookies = odoo.iter().map(|c| Cow::Borrowed(*c)).collect();
        let mut answer = Answer::new(http::StatusCode::OK, &mut ours, cookies);
        answer
            .set_bytes(http::HeaderName::from_static("x-request-id"), b"0123")
            .expect("request id");
        let policy = http::HeaderValue::from_static("same-origin");
        answer
            .set(header::REFERRER_POLICY, &policy)
            .expect("policy");
        // A field set again has its new value only, where a header map would.
        answer
            .set_bytes(http::HeaderName::from_static("x-request-id"), b"4567")
            .expect("again");
        assert!(answer.sets("Referrer-Policy") && answer.sets("x-request-id"));
        assert!(!answer.sets("referrer"));
        // A value no header map takes is refused, and nothing of it written.
        assert!(answer.set_bytes(header::SERVER, b"a\r\nb").is_err());
        answer.add_cookie("pin=2".into()).expect("pin");
        answer
            .change_cookies(vec![
                Some(b"session_id=1; Path=/; Secure".to_vec()),
                Some(b"bad\n".to_vec()),
                None,
            ])
            .expect("cookies");
        let cookies: Vec<&[u8]> = answer.cookies().collect();
        assert_eq!(
            cookies,
            [&b"session_id=1; Path=/; Secure"[..], b"lang=en", b"pin=2"]
        );
        drop(answer);
        assert_eq!(
            &ours[..],
            b"referrer-policy: same-origin\r\nx-request-id: 4567\r\n"
        );
        // More fields than an answer holds: an error, not a lost field.
        let mut ours = BytesMut::new();
        let mut answer = Answer::new(http::StatusCode::OK, &mut ours, Vec::new());
        for i in 0..SET_ANSWER_FIELDS {
            let name = http::HeaderName::from_bytes(format!("x-{i}").as_bytes()).expect("name");
            answer.set_bytes(name, b"v").expect("room");
        }
        assert!(answer.set_bytes(header::SERVER, b"v").is_err());
    }

    #[test]
    fn whole_http11_heads_with_short_bodies_take_this_path() {
        let ok = |h: &str| request(&Bytes::copy_from_slice(h.as_bytes())).is_some();
        assert!(ok("GET /odoo HTTP/1.1\r\nHost: erp\r\n\r\n"));
        assert!(ok(
            "HEAD /web/login HTTP/1.1\r\nHost: erp\r\nCookie: a=b\r\n\r\n"
        ));
        // Not whole yet, or a second request after it: Pingora's proxy reads and serves.
        assert!(!ok("GET /odoo HTTP/1.1\r\nHost: erp\r\n"));
        assert!(!ok(
            "GET /a HTTP/1.1\r\nHost: erp\r\n\r\nGET /b HTTP/1.1\r\nHost: erp\r\n\r\n"
        ));
        // A body of a known length up to what is read before choosing the class anyway:
        // whole, in part (the rest is read), or not yet.
        let call = "POST /web/dataset/call_kw HTTP/1.1\r\nHost: erp\r\nContent-Length: 2\r\n\r\n";
        assert!(ok(call));
        assert!(ok(&format!("{call}{{")));
        assert!(ok(&format!("{call}{{}}")));
        // More than the body: a second request follows, Pingora's proxy serves both.
        assert!(!ok(&format!("{call}{{}}GET / HTTP/1.1\r\n\r\n")));
        assert!(ok("GET /odoo HTTP/1.1\r\nContent-Length: 0\r\n\r\n"));
        assert!(ok(
            "DELETE /odoo HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n"
        ));
        assert!(ok(&format!(
            "POST /jsonrpc HTTP/1.1\r\nContent-Length: {MAX_BODY}\r\n\r\n"
        )));
        assert!(!ok(&format!(
            "POST /jsonrpc HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        )));
        assert!(!ok(
            "POST /jsonrpc HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
        ));
        assert!(!ok("POST /jsonrpc HTTP/1.1\r\nContent-Length: +1\r\n\r\n"));
        assert!(!ok("CONNECT erp:443 HTTP/1.1\r\n\r\n"));
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
    fn an_eligible_head_becomes_the_request_the_policy_reads() {
        let head = Bytes::from_static(
            b"GET /web/login?db=x HTTP/1.1\r\nHost: erp.example\r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n\r\n",
        );
        let r = request(&head).expect("request");
        assert_eq!((r.body_len, r.body.len()), (0, 0));
        let req = r.req;
        assert_eq!(req.method, http::Method::GET);
        assert_eq!(req.uri.path(), "/web/login");
        assert_eq!(req.raw_path(), b"/web/login?db=x");
        assert_eq!(
            req.headers.get("host").map(|v| v.as_bytes()),
            Some(&b"erp.example"[..])
        );
        assert_eq!(req.headers.get_all("x-forwarded-for").iter().count(), 2);
        let head = Bytes::from_static(
            b"POST /jsonrpc HTTP/1.1\r\nHost: erp\r\nContent-Length: 10\r\n\r\n{\"id\":",
        );
        let r = request(&head).expect("request");
        assert_eq!(r.req.method, http::Method::POST);
        assert_eq!((r.body_len, &r.body[..]), (10, &b"{\"id\":"[..]));
    }

    /// `framing` and `keeps_alive` of an answer head.
    fn judge(head: &str, head_request: bool) -> (Option<Framing>, bool) {
        let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Response::new(&mut fields);
        parsed.parse(head.as_bytes()).expect("head");
        let code = parsed.code.unwrap_or(0);
        (
            framing(code, head_request, parsed.headers).ok(),
            keeps_alive(parsed.version, parsed.headers),
        )
    }

    #[test]
    fn odoos_answers_are_framed_as_http_1_1_says() {
        let f = |h: &str| judge(h, false).0;
        let length = "HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(f(length), Some(Framing::Length(12)));
        assert_eq!(judge(length, true).0, Some(Framing::Empty));
        assert_eq!(
            f("HTTP/1.1 304 Not Modified\r\nContent-Length: 12\r\n\r\n"),
            Some(Framing::Empty)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n"),
            Some(Framing::Chunked)
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
            Some(Framing::CloseCoded)
        );
        assert_eq!(f("HTTP/1.0 200 OK\r\n\r\n"), Some(Framing::Close));
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"),
            Some(Framing::Length(3))
        );
        assert_eq!(
            f("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n"),
            None
        );
        assert_eq!(f("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), None);
    }

    #[test]
    fn kept_alive_as_the_version_and_connection_say() {
        let k = |h: &str| judge(h, false).1;
        assert!(k("HTTP/1.1 200 OK\r\n\r\n"));
        assert!(!k("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"));
        assert!(!k("HTTP/1.1 200 OK\r\nConnection: x, Close\r\n\r\n"));
        assert!(!k("HTTP/1.0 200 OK\r\n\r\n"));
        assert!(k("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n"));
    }

    #[test]
    fn a_chunked_body_ends_where_its_last_chunk_and_trailers_do() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        // Whole, and one byte at a time: the same end.
        let mut c = Chunks::default();
        assert_eq!(c.feed(body), Ok((body.len() - 4, true, 21)));
        let mut c = Chunks::default();
        let mut payload = 0;
        for (i, b) in body.iter().enumerate() {
            let (used, ended, p) = c.feed(std::slice::from_ref(b)).expect("valid");
            payload += p;
            if ended {
                assert_eq!((i, used, payload), (body.len() - 5, 1, 21));
                break;
            }
        }
        let mut c = Chunks::default();
        assert_eq!(c.feed(b"0\r\n\r\n"), Ok((5, true, 0)));
        let mut c = Chunks::default();
        assert!(c.feed(b"zz\r\n").is_err());
        let mut c = Chunks::default();
        assert!(c.feed(b"3\r\nabcX").is_err());
        let mut c = Chunks::default();
        assert!(c.feed(b"ffffffffffffffffff\r\n").is_err());
    }

    /// A buffer given back serves a later request of the thread, from the start of its
    /// memory; a thread keeps at most [`SPARE_BUFFERS`], none larger than [`SPARE_MAX`].
    #[test]
    fn buffers_given_back_serve_the_threads_next_requests() {
        let mut b = buffer();
        assert!(b.is_empty() && b.capacity() >= BUFFER);
        let start = b.as_ptr() as usize;
        b.extend_from_slice(&[b'x'; 100]);
        // As an answer's head leaves it: its parsed part advanced over.
        b.advance(60);
        put_back(b);
        let again = buffer();
        assert!(again.is_empty() && again.capacity() >= BUFFER);
        assert_eq!(
            again.as_ptr() as usize,
            start,
            "the same memory, from its start"
        );

        put_back(BytesMut::with_capacity(SPARE_MAX + 1));
        assert_eq!(SPARE.with_borrow(Vec::len), 0);

        for _ in 0..SPARE_BUFFERS + 10 {
            put_back(BytesMut::with_capacity(BUFFER));
        }
        assert_eq!(SPARE.with_borrow(Vec::len), SPARE_BUFFERS);
    }

    /// A request's state, boxed and copied for each request, holds the client's side once
    /// (not also the stream and request it was made of) and no room for the policy's rare
    /// answers, and the request's head boxed: 1,696 bytes (1,712 in a debug build; 2,384 with
    /// the head inline, 2,448 before its limits were kept to the second, 3,024 before it held
    /// its client once).
    #[tokio::test]
    async fn a_requests_state_holds_its_client_once() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/erpgate.toml");
        let cfg = crate::config::load(std::path::Path::new(path)).expect("default config");
        let gate = ErpGate::new(std::sync::Arc::new(arc_swap::ArcSwap::from_pointee(cfg)));
        let head = Bytes::from_static(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let stream: Stream = Box::new(std::io::Cursor::new(Vec::new()));
        let serving = serve(&gate, stream, request(&head).expect("request"));
        let size = std::mem::size_of_val(&serving);
        assert!(size < 1800, "request state of {size} bytes");
    }

    /// The fields erpgate looks up are noted as the request is parsed, in any case.
    #[test]
    fn a_parsed_request_notes_which_looked_up_fields_it_has() {
        let head = Bytes::from_static(
            b"GET /web HTTP/1.1\r\nHost: x\r\nx-FORWARDED-for: 10.0.0.1\r\nConnection: close\r\n\r\n",
        );
        let r = request(&head).expect("request");
        for (l, has) in [
            (Looked::XForwardedFor, true),
            (Looked::Connection, true),
            (Looked::XRequestId, false),
            (Looked::ContentLength, false),
            (Looked::XForwardedProto, false),
            (Looked::XForwardedHost, false),
        ] {
            assert_eq!(r.present.may_have(l), has, "{l:?}");
        }
        let head = Bytes::from_static(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}");
        let r = request(&head).expect("request");
        assert!(r.present.may_have(Looked::ContentLength));
    }

    /// A request sent in one write leaves Nagle's algorithm on; one the socket has no room
    /// for turns it off before the rest, and arrives whole.
    #[tokio::test]
    async fn a_request_in_one_write_keeps_nagle_and_a_longer_one_turns_it_off() {
        let server = tokio::net::TcpSocket::new_v4().expect("socket");
        server.set_recv_buffer_size(4096).expect("rcvbuf");
        server
            .bind("127.0.0.1:0".parse().expect("addr"))
            .expect("bind");
        let listener = server.listen(8).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let small = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let large: Vec<u8> = (0..2_000_000u32).map(|n| (n % 251) as u8).collect();
        let expected = [small.clone(), large.clone()].concat();
        let reader = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.expect("accept");
            // Nothing read for a while: the large request finds no room at first.
            tokio::time::sleep(Duration::from_millis(100)).await;
            let mut got = Vec::new();
            conn.read_to_end(&mut got).await.expect("read");
            got
        });
        let client = tokio::net::TcpSocket::new_v4().expect("socket");
        client.set_send_buffer_size(4096).expect("sndbuf");
        let mut odoo = client.connect(addr).await.expect("connect");
        send_request(&mut odoo, &small)
            .await
            .expect("small request");
        assert!(
            !odoo.nodelay().expect("nodelay"),
            "one write turned Nagle off"
        );
        send_request(&mut odoo, &large)
            .await
            .expect("large request");
        assert!(
            odoo.nodelay().expect("nodelay"),
            "a long request kept Nagle on"
        );
        odoo.shutdown().await.expect("shutdown");
        let got = reader.await.expect("reader");
        assert!(
            got == expected,
            "{} bytes arrived of {}",
            got.len(),
            expected.len()
        );
    }
}
