//! A raw HTTP/1.x client (exact control over the bytes sent) and a WebSocket client.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest, Message, WebSocket};

const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub version: String,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        super::headers_all(&self.headers, name).into_iter().next()
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body_str()))
    }
}

/// A client connection that can carry several requests (keep-alive).
pub struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn try_open(addr: SocketAddr) -> io::Result<Conn> {
        let s = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        s.set_read_timeout(Some(TIMEOUT))?;
        s.set_write_timeout(Some(TIMEOUT))?;
        Ok(Conn { s, buf: Vec::new() })
    }
    pub fn open(addr: SocketAddr) -> Conn {
        Self::try_open(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
    }
    pub fn write(&mut self, raw: &[u8]) -> io::Result<()> {
        self.s.write_all(raw)
    }
    pub fn send(&mut self, raw: &[u8]) -> Response {
        self.write(raw).expect("write request");
        let head = raw.starts_with(b"HEAD ");
        self.try_read_response(head).expect("read response")
    }
    /// Reads one status line and its headers, an interim (1xx) answer included: its status.
    pub fn read_status_head(&mut self) -> io::Result<u16> {
        let status_line = self.line()?;
        while !self.line()?.is_empty() {}
        status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, status_line))
    }
    /// Waits up to `within` for erpgate to close the connection (end of stream or reset,
    /// nothing else received): how long it took, or `None` if it stayed open.
    pub fn closed_within(&mut self, within: Duration) -> Option<Duration> {
        let start = std::time::Instant::now();
        let mut tmp = [0u8; 512];
        while start.elapsed() < within {
            let left = within
                .saturating_sub(start.elapsed())
                .max(Duration::from_millis(1));
            self.s.set_read_timeout(Some(left)).ok()?;
            match self.s.read(&mut tmp) {
                Ok(0) => return Some(start.elapsed()),
                Ok(n) => panic!("unexpected bytes: {:?}", String::from_utf8_lossy(&tmp[..n])),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                    return Some(start.elapsed())
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("read: {e}"),
            }
        }
        None
    }
    pub fn read_response(&mut self) -> Response {
        self.try_read_response(false).expect("read response")
    }

    fn more(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.s.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    fn fill(&mut self, want: usize) -> io::Result<()> {
        while self.buf.len() < want {
            if self.more()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed mid-body",
                ));
            }
        }
        Ok(())
    }

    fn line(&mut self) -> io::Result<String> {
        loop {
            if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let l = String::from_utf8_lossy(&self.buf[..p]).into_owned();
                self.buf.drain(..p + 2);
                return Ok(l);
            }
            if self.more()? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before a full response",
                ));
            }
        }
    }

    pub fn try_read_response(&mut self, head_request: bool) -> io::Result<Response> {
        loop {
            let status_line = self.line()?;
            let mut parts = status_line.splitn(3, ' ');
            let version = parts.next().unwrap_or("").to_string();
            let status: u16 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("bad status line {status_line:?}"),
                )
            })?;
            let mut headers = Vec::new();
            loop {
                let l = self.line()?;
                if l.is_empty() {
                    break;
                }
                if let Some((k, v)) = l.split_once(':') {
                    headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
            if status == 100 {
                continue;
            }
            let mut r = Response {
                status,
                version,
                headers,
                body: Vec::new(),
            };
            if head_request
                || status == 101
                || status == 204
                || status == 304
                || (100..200).contains(&status)
            {
                return Ok(r);
            }
            if r.header("transfer-encoding")
                .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
            {
                loop {
                    let size_line = self.line()?;
                    let size =
                        usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                            .map_err(|_| {
                                io::Error::new(io::ErrorKind::InvalidData, "bad chunk size")
                            })?;
                    if size == 0 {
                        while !self.line()?.is_empty() {}
                        break;
                    }
                    self.fill(size + 2)?;
                    r.body.extend_from_slice(&self.buf[..size]);
                    self.buf.drain(..size + 2);
                }
            } else if let Some(len) = r
                .header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
            {
                self.fill(len)?;
                r.body = self.buf.drain(..len).collect();
            } else {
                while self.more()? > 0 {}
                r.body = std::mem::take(&mut self.buf);
            }
            return Ok(r);
        }
    }
}

/// Sends `raw` on a new connection and reads one response; an error if the connection
/// closes (or is reset) before a full response.
pub fn try_send_raw(addr: SocketAddr, raw: &[u8]) -> io::Result<Response> {
    let mut c = Conn::try_open(addr)?;
    c.write(raw)?;
    c.try_read_response(raw.starts_with(b"HEAD "))
}

pub fn send_raw(addr: SocketAddr, raw: &[u8]) -> Response {
    try_send_raw(addr, raw).unwrap_or_else(|e| panic!("{addr}: {e}"))
}

pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        raw.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    if let Some(b) = body {
        raw.extend_from_slice(b);
    }
    send_raw(addr, &raw)
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, &[], None)
}

/// A synchronous WebSocket client.
pub struct WsClient {
    ws: WebSocket<TcpStream>,
}

/// Opens a WebSocket at `path`; `Err("HTTP <status>")` when the handshake is refused.
pub fn ws_connect(addr: SocketAddr, path: &str, origin: Option<&str>) -> Result<WsClient, String> {
    let stream = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut req = format!("ws://localhost{path}")
        .into_client_request()
        .map_err(|e| e.to_string())?;
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", o.parse().map_err(|_| "bad origin".to_string())?);
    }
    match tungstenite::client(req, stream) {
        Ok((ws, _)) => Ok(WsClient { ws }),
        Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(resp))) => {
            Err(format!("HTTP {}", resp.status().as_u16()))
        }
        Err(e) => Err(e.to_string()),
    }
}

impl WsClient {
    pub fn send_text(&mut self, s: &str) {
        self.ws.send(Message::text(s)).expect("ws send");
    }

    /// The next message of any kind (pings included), or None when `timeout` passes.
    /// Panics if the connection closed.
    pub fn recv_any(&mut self, timeout: Duration) -> Option<Message> {
        self.ws
            .get_mut()
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        match self.ws.read() {
            Ok(m) => Some(m),
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                None
            }
            Err(e) => panic!("ws closed: {e}"),
        }
    }

    /// The next text message, answering pings on the way.
    pub fn recv_text(&mut self, timeout: Duration) -> String {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                panic!("no text message within {timeout:?}");
            }
            match self.recv_any(left) {
                Some(Message::Text(t)) => return t.to_string(),
                Some(_) => continue,
                None => panic!("no text message within {timeout:?}"),
            }
        }
    }

    /// Whether the connection is closed (by a close frame, EOF or reset) within `timeout`.
    pub fn is_closed_within(&mut self, timeout: Duration) -> bool {
        self.ws
            .get_mut()
            .set_read_timeout(Some(timeout))
            .expect("timeout");
        match self.ws.read() {
            Ok(Message::Close(_)) => true,
            Ok(_) => false,
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                false
            }
            Err(_) => true,
        }
    }

    /// The code of the close frame received within `timeout` (other messages are skipped);
    /// None when the connection ended or stayed open without one.
    pub fn close_code_within(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            self.ws.get_mut().set_read_timeout(Some(left)).ok()?;
            match self.ws.read() {
                Ok(Message::Close(frame)) => return frame.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    pub fn close(mut self) {
        let _ = self.ws.close(None);
        let _ = self.ws.flush();
    }
}
