//! Fake Odoo: the web port answers like Odoo's prefork HTTP workers (HTTP/1.0,
//! `Connection: close`), the gevent port like its gevent worker (HTTP/1.1 keep-alive,
//! WebSocket needing `Origin` and version 13, long-polling held for a while).

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    Web,
    Gevent,
}

/// One request as Odoo received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub port: Port,
    pub method: String,
    pub path: String,
    pub version: String,
    /// Names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub peer: SocketAddr,
}

impl Recorded {
    /// A probe of erpgate's health checker (by its User-Agent).
    pub fn is_health_probe(&self) -> bool {
        self.header("user-agent") == Some("erpgate-health-check")
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        super::headers_all(&self.headers, name).into_iter().next()
    }
    pub fn headers_all(&self, name: &str) -> Vec<&str> {
        super::headers_all(&self.headers, name)
    }
}

#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// How long `/longpolling/poll` holds a request (Odoo: 50 s); `?hold_ms=N` overrides.
    pub longpoll_hold: Duration,
    /// Send a WebSocket ping after this much idle time (Odoo: 45 s).
    pub ws_ping_after: Option<Duration>,
    /// A request to this path (any method) is recorded, then this Odoo dies before answering:
    /// the connection drops without a response and both ports stop listening (a worker
    /// killed mid-request, a pod evicted).
    pub crash_path: Option<String>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        FakeOptions {
            longpoll_hold: Duration::from_secs(50),
            ws_ping_after: None,
            crash_path: None,
        }
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    ws_open: AtomicUsize,
    ws_messages: AtomicUsize,
    /// Set when this Odoo died (`crash_path`): the listeners close.
    crashed: tokio::sync::watch::Sender<bool>,
}

pub struct FakeOdoo {
    web: SocketAddr,
    gevent: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl FakeOdoo {
    pub fn start() -> FakeOdoo {
        Self::start_with(FakeOptions::default())
    }

    pub fn start_with(opts: FakeOptions) -> FakeOdoo {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        Self::start_at(any, any, opts)
    }

    /// Starts on these ports (port 0: any free one); a restarted server takes its old ports.
    pub fn start_at(web: SocketAddr, gevent: SocketAddr, opts: FakeOptions) -> FakeOdoo {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fake odoo runtime");
        let shared = Arc::new(Shared {
            requests: Mutex::default(),
            ws_open: AtomicUsize::default(),
            ws_messages: AtomicUsize::default(),
            crashed: tokio::sync::watch::Sender::new(false),
        });
        let opts = Arc::new(opts);
        super::release(web.port());
        super::release(gevent.port());
        let (web, gevent) = runtime.block_on(async {
            let web = TcpListener::bind(web).await.expect("bind web");
            let gevent = TcpListener::bind(gevent).await.expect("bind gevent");
            (web, gevent)
        });
        let web_addr = web.local_addr().expect("addr");
        let gevent_addr = gevent.local_addr().expect("addr");
        for (listener, port) in [(web, Port::Web), (gevent, Port::Gevent)] {
            let shared = shared.clone();
            let opts = opts.clone();
            let mut crashed = shared.crashed.subscribe();
            runtime.spawn(async move {
                loop {
                    let accepted = tokio::select! {
                        a = listener.accept() => a,
                        _ = crashed.wait_for(|c| *c) => {
                            // Dead: its port refuses connections and stays this test's.
                            let port = listener.local_addr().map(|a| a.port());
                            drop(listener);
                            if let Ok(port) = port {
                                super::reserve(port);
                            }
                            return;
                        }
                    };
                    let Ok((stream, peer)) = accepted else {
                        continue;
                    };
                    let shared = shared.clone();
                    let opts = opts.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve(stream, peer, port, shared, opts).await {
                            eprintln!("fake odoo ({port:?}): {e}");
                        }
                    });
                }
            });
        }
        FakeOdoo {
            web: web_addr,
            gevent: gevent_addr,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn web_addr(&self) -> SocketAddr {
        self.web
    }
    pub fn gevent_addr(&self) -> SocketAddr {
        self.gevent
    }
    /// The requests that reached this Odoo, erpgate's health probes left out.
    pub fn requests(&self) -> Vec<Recorded> {
        self.all_requests()
            .into_iter()
            .filter(|r| !r.is_health_probe())
            .collect()
    }
    /// Every request, health probes included.
    pub fn all_requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().expect("lock").clone()
    }
    /// How many health probes reached this Odoo.
    pub fn health_probes(&self) -> usize {
        self.all_requests()
            .iter()
            .filter(|r| r.is_health_probe())
            .count()
    }
    pub fn clear(&self) {
        self.shared.requests.lock().expect("lock").clear();
    }
    /// Waits until at least `n` requests were recorded; returns them all.
    pub fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n {
                return r;
            }
            if Instant::now() > deadline {
                panic!(
                    "fake odoo: {} requests after {timeout:?}, wanted {n}: {r:#?}",
                    r.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    /// Waits until erpgate's health checker has probed this Odoo at least once.
    pub fn wait_for_health_probe(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.health_probes() == 0 {
            assert!(
                Instant::now() < deadline,
                "fake odoo: no health probe in 10 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    pub fn ws_open(&self) -> usize {
        self.shared.ws_open.load(Ordering::SeqCst)
    }
    pub fn ws_messages(&self) -> usize {
        self.shared.ws_messages.load(Ordering::SeqCst)
    }
}

impl Drop for FakeOdoo {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
        // A stopped Odoo's ports refuse connections until a test restarts it there.
        super::reserve(self.web.port());
        super::reserve(self.gevent.port());
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Reads one request head; `Ok(None)` on a clean close before any byte.
async fn read_head<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Option<(usize, Vec<u8>)>, BoxError> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = buf[..end + 4].to_vec();
            return Ok(Some((end + 4, head)));
        }
        if buf.len() > 64 * 1024 {
            return Err("head over 64 KiB".into());
        }
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err("closed mid-head".into())
            };
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

async fn fill<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
    want: usize,
) -> Result<(), BoxError> {
    while buf.len() < want {
        let mut tmp = [0u8; 8192];
        let n = s.read(&mut tmp).await?;
        if n == 0 {
            return Err("closed mid-body".into());
        }
        buf.extend_from_slice(&tmp[..n]);
    }
    Ok(())
}

/// Where the first CRLF-terminated line of `buf` ends (refilled from `s` until it has one).
async fn crlf_at<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<usize, BoxError> {
    loop {
        if let Some(p) = buf.windows(2).position(|w| w == b"\r\n") {
            return Ok(p);
        }
        let want = buf.len() + 1;
        fill(s, buf, want).await?;
    }
}

/// Reads a chunked body from `buf` (refilled from `s`); returns the decoded body and
/// leaves the bytes after it in `buf`.
async fn read_chunked<S: AsyncRead + Unpin>(
    s: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Vec<u8>, BoxError> {
    let mut body = Vec::new();
    loop {
        let line_end = crlf_at(s, buf).await?;
        let line = String::from_utf8_lossy(&buf[..line_end]).to_string();
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)?;
        buf.drain(..line_end + 2);
        if size == 0 {
            // trailers until an empty line
            loop {
                let end = crlf_at(s, buf).await?;
                buf.drain(..end + 2);
                if end == 0 {
                    return Ok(body);
                }
            }
        }
        fill(s, buf, size + 2).await?;
        body.extend_from_slice(&buf[..size]);
        buf.drain(..size + 2);
    }
}

/// Method, request-target, version, headers.
type Head = (String, String, String, Vec<(String, String)>);

fn parse_head(head: &[u8]) -> Result<Head, BoxError> {
    let text = std::str::from_utf8(head)?;
    let mut lines = text.split("\r\n");
    let first = lines.next().ok_or("empty head")?;
    let mut parts = first.split(' ');
    let method = parts.next().ok_or("no method")?.to_string();
    let path = parts.next().ok_or("no path")?.to_string();
    let version = parts.next().ok_or("no version")?.to_string();
    let mut headers = Vec::new();
    for l in lines.filter(|l| !l.is_empty()) {
        let (k, v) = l.split_once(':').ok_or("bad header line")?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    Ok((method, path, version, headers))
}

fn query_param(path: &str, key: &str) -> Option<String> {
    let q = path.split_once('?')?.1;
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

async fn serve(
    mut s: TcpStream,
    peer: SocketAddr,
    port: Port,
    shared: Arc<Shared>,
    opts: Arc<FakeOptions>,
) -> Result<(), BoxError> {
    let mut buf = Vec::new();
    loop {
        let Some((head_len, head)) = (match read_head(&mut s, &mut buf).await {
            Ok(h) => h,
            Err(e) if e.to_string().contains("64 KiB") => {
                s.write_all(b"HTTP/1.0 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                return Ok(());
            }
            Err(e) => return Err(e),
        }) else {
            return Ok(());
        };
        buf.drain(..head_len);
        let (method, path, version, headers) = parse_head(&head)?;
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let body = if get("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
        {
            read_chunked(&mut s, &mut buf).await?
        } else {
            let len: usize = get("content-length")
                .map(|v| v.parse())
                .transpose()?
                .unwrap_or(0);
            fill(&mut s, &mut buf, len).await?;
            buf.drain(..len).collect()
        };
        let rec = Recorded {
            port,
            method: method.clone(),
            path: path.clone(),
            version,
            headers: headers.clone(),
            body,
            peer,
        };
        let route = path.split('?').next().unwrap_or("").to_string();
        let upgrade = get("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));

        if port == Port::Gevent && route == "/websocket" && upgrade {
            shared.requests.lock().expect("lock").push(rec);
            if get("origin").is_none() {
                respond(&mut s, port, 400, "text/plain", b"Empty Origin", false).await?;
                return Ok(());
            }
            if get("sec-websocket-version").as_deref() != Some("13") {
                respond(
                    &mut s,
                    port,
                    400,
                    "text/plain",
                    b"Unsupported WebSocket version",
                    false,
                )
                .await?;
                return Ok(());
            }
            let key = get("sec-websocket-key").ok_or("no key")?;
            let accept = derive_accept_key(key.as_bytes());
            s.write_all(
                format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
            return websocket(s, shared, opts).await;
        }
        shared.requests.lock().expect("lock").push(rec);
        if opts.crash_path.as_deref() == Some(route.as_str()) {
            shared.crashed.send_replace(true);
            return Ok(());
        }
        let close =
            port == Port::Web || get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let status = query_param(&path, "status")
            .and_then(|v| v.parse().ok())
            .unwrap_or(200u16);
        match route.as_str() {
            "/web/health" | "/websocket/health" => {
                respond(
                    &mut s,
                    port,
                    200,
                    "application/json",
                    br#"{"status": "pass"}"#,
                    close,
                )
                .await?;
            }
            "/web/login" => {
                // Odoo starts a session: its cookie as Odoo 18 sets it, and another one.
                let cookies = "Set-Cookie: session_id=0123456789abcdef0123456789abcdef01234567; Expires=Wed, 24 Feb 2027 10:00:00 GMT; Max-Age=7776000; HttpOnly; Path=/\r\nSet-Cookie: frontend_lang=en_US; Path=/\r\n";
                respond_with(
                    &mut s,
                    port,
                    200,
                    "text/html",
                    b"<html>login</html>",
                    close,
                    cookies,
                )
                .await?;
            }
            "/websocket" if port == Port::Web => {
                let msg = b"Couldn't bind the websocket. Is the connection opened on the evented port (8072)?";
                respond(&mut s, port, 500, "text/plain", msg, close).await?;
            }
            "/longpolling/poll" => {
                let hold = query_param(&path, "hold_ms")
                    .and_then(|v| v.parse().ok())
                    .map_or(opts.longpoll_hold, Duration::from_millis);
                tokio::time::sleep(hold).await;
                respond(&mut s, port, 200, "application/json", b"[]", close).await?;
            }
            _ => {
                if route == "/slow" {
                    let ms = query_param(&path, "ms")
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1000);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let port_name = if port == Port::Web { "web" } else { "gevent" };
                let body = serde_json::json!({"port": port_name, "method": method, "path": path})
                    .to_string();
                respond(
                    &mut s,
                    port,
                    status,
                    "application/json",
                    body.as_bytes(),
                    close,
                )
                .await?;
            }
        }
        if close {
            let _ = s.shutdown().await;
            return Ok(());
        }
    }
}

async fn respond(
    s: &mut TcpStream,
    port: Port,
    code: u16,
    ctype: &str,
    body: &[u8],
    close: bool,
) -> Result<(), BoxError> {
    respond_with(s, port, code, ctype, body, close, "").await
}

/// `extra`: more header lines, each ending with CRLF.
async fn respond_with(
    s: &mut TcpStream,
    port: Port,
    code: u16,
    ctype: &str,
    body: &[u8],
    close: bool,
    extra: &str,
) -> Result<(), BoxError> {
    let (version, name) = match port {
        Port::Web => ("HTTP/1.0", "web"),
        Port::Gevent => ("HTTP/1.1", "gevent"),
    };
    let mut head = format!(
        "{version} {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nX-Odoo-Port: {name}\r\nServer: Werkzeug/3.0.1 Python/3.11\r\n",
        reason(code),
        body.len()
    );
    if ctype == "application/json" && body.starts_with(b"{\"status\"") {
        head.push_str("Cache-Control: no-store\r\n");
    }
    if close {
        head.push_str("Connection: close\r\n");
    }
    head.push_str(extra);
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    Ok(())
}

async fn websocket(
    s: TcpStream,
    shared: Arc<Shared>,
    opts: Arc<FakeOptions>,
) -> Result<(), BoxError> {
    let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
    shared.ws_open.fetch_add(1, Ordering::SeqCst);
    let result = async {
        loop {
            let next = match opts.ws_ping_after {
                Some(idle) => match tokio::time::timeout(idle, ws.next()).await {
                    Ok(m) => m,
                    Err(_) => {
                        ws.send(Message::Ping(b"odoo".to_vec().into())).await?;
                        continue;
                    }
                },
                None => ws.next().await,
            };
            match next {
                Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => {
                    shared.ws_messages.fetch_add(1, Ordering::SeqCst);
                    ws.send(m).await?;
                }
                // Like Odoo: answer a close frame with one, then close.
                Some(Ok(Message::Close(_))) => {
                    let _ = ws.flush().await;
                    return Ok::<(), BoxError>(());
                }
                None => return Ok(()),
                Some(Ok(_)) => {} // ping/pong: tungstenite answers pings itself
                Some(Err(e)) => return Err(e.into()),
            }
        }
    }
    .await;
    shared.ws_open.fetch_sub(1, Ordering::SeqCst);
    result
}

/// Accepts connections and reads, but never answers (a hung Odoo worker).
pub struct Blackhole {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Blackhole {
    pub fn start() -> Blackhole {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        Blackhole {
            addr,
            runtime: Some(runtime),
        }
    }
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Blackhole {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}
