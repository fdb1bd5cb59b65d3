//! Odoo's answers to requests without a body, in every framing HTTP/1 allows (chunked, a
//! length, ended by closing, none for `HEAD` and 304), reach the client whole on a connection
//! that stays open; a kept-alive connection to Odoo is reused, and one Odoo closed while it
//! was idle costs the client nothing; bytes either side sends right after a WebSocket handshake
//! are passed on.
//!
//! The stand-in here is Odoo's gevent worker answering HTTP/1.1 the way werkzeug can
//! (streamed answers chunked, HTTP/1.0 ones ended by closing), scripted per path.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use support::erpgate::Erpgate;
use support::*;

/// What the stand-in sends for a request line, and whether it closes afterwards.
fn answer(request_line: &str) -> (&'static [u8], bool) {
    let path = request_line.split(' ').nth(1).unwrap_or("");
    match path {
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
            false,
        ),
        "/until-close" => (
            b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nthe whole body, ended by closing",
            true,
        ),
        "/length" if request_line.starts_with("HEAD ") => {
            (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n", false)
        }
        "/length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", false),
        "/not-modified" => (b"HTTP/1.1 304 Not Modified\r\nETag: \"v1\"\r\n\r\n", false),
        // Answers, then closes without saying so (as a server whose keep-alive time ran out
        // just after).
        "/then-close" => (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true),
        _ => (
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            false,
        ),
    }
}

/// The stand-in: counts the connections it accepted.
struct Scripted {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

fn serve(s: TcpStream) -> std::io::Result<()> {
    let mut reader = BufReader::new(s.try_clone()?);
    let mut w = s;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        // The rest of the head (these requests have no body).
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Ok(());
            }
            if h == "\r\n" {
                break;
            }
        }
        let (bytes, close) = answer(line.trim_end());
        w.write_all(bytes)?;
        if close {
            return Ok(());
        }
    }
}

fn scripted() -> Scripted {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || serve(s));
        }
    });
    Scripted { addr, connections }
}

fn gateway(up: &Scripted) -> Erpgate {
    Erpgate::start(&format!(
        "[pools.web]\nservers = [{{ address = \"{}\" }}]\n\
         health_check = {{ path = \"/length\" }}\n\
         [[class]]\nname = \"user\"\npool = \"web\"\n",
        up.addr
    ))
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: erp.example.com\r\n\r\n").into_bytes()
}

#[test]
fn answers_in_every_framing_reach_the_client_whole_on_one_connection() {
    let up = scripted();
    let gw = gateway(&up);
    let mut c = Conn::open(gw.http);
    let r = c.send(&get("/chunked"));
    assert_eq!((r.status, r.body_str().as_str()), (200, "hello world"));
    // Ended by closing: the client gets it chunked, and its connection stays open.
    let r = c.send(&get("/until-close"));
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), "the whole body, ended by closing");
    assert_eq!(r.header("transfer-encoding"), Some("chunked"));
    assert_eq!(r.version, "HTTP/1.1");
    let r = c.send(b"HEAD /length HTTP/1.1\r\nHost: erp.example.com\r\n\r\n");
    assert_eq!((r.status, r.header("content-length")), (200, Some("3")));
    assert!(r.body.is_empty());
    let r = c.send(&get("/not-modified"));
    assert_eq!((r.status, r.header("etag")), (304, Some("\"v1\"")));
    let r = c.send(&get("/length"));
    assert_eq!((r.status, r.body_str().as_str()), (200, "abc"));
    assert!(r.header("x-request-id").is_some());
    assert_eq!(r.header("connection"), Some("keep-alive"));
}

#[test]
fn a_kept_alive_odoo_connection_is_reused_and_one_closed_meanwhile_costs_nothing() {
    let up = scripted();
    let gw = gateway(&up);
    let mut c = Conn::open(gw.http);
    for _ in 0..3 {
        let r = c.send(&get("/length"));
        assert_eq!((r.status, r.body_str().as_str()), (200, "abc"));
    }
    let after_three = up.connections.load(Ordering::SeqCst);
    for _ in 0..5 {
        assert_eq!(c.send(&get("/length")).status, 200);
    }
    // Health probes open their own connections; the requests reused theirs.
    assert!(
        up.connections.load(Ordering::SeqCst) <= after_three + 1,
        "{} connections after {after_three}",
        up.connections.load(Ordering::SeqCst)
    );
    // Odoo closes a connection right after an answer; the next request, which would have
    // gone on that connection, goes on a new one.
    for _ in 0..4 {
        let r = c.send(&get("/then-close"));
        assert_eq!((r.status, r.body_str().as_str()), (200, "ok"));
        let r = c.send(&get("/length"));
        assert_eq!((r.status, r.body_str().as_str()), (200, "abc"));
    }
}

/// A gevent worker that accepts a WebSocket and at once, in the same write as its 101, sends
/// a text frame "hi"; it keeps what the browser sends after the handshake. Other requests
/// (health probes) get 200.
fn eager_gevent() -> (SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    use std::io::Read;
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got = Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = got.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let kept = kept.clone();
            std::thread::spawn(move || -> std::io::Result<()> {
                let mut reader = BufReader::new(s.try_clone()?);
                let mut w = s;
                let mut line = String::new();
                reader.read_line(&mut line)?;
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                        break;
                    }
                }
                if !line.starts_with("GET /websocket ") {
                    return w.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                }
                w.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                      Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x81\x02hi",
                )?;
                let mut buf = [0u8; 256];
                loop {
                    let n = reader.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    kept.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    (addr, got)
}

#[test]
fn bytes_sent_right_after_a_websocket_handshake_are_not_lost_either_way() {
    use std::io::Read;
    let (odoo, got) = eager_gevent();
    let gw = Erpgate::start(&format!(
        "[pools.web]\nservers = [{{ address = \"{odoo}\" }}]\n[[class]]\nname = \"user\"\npool = \"web\"\n"
    ));
    let mut s = TcpStream::connect(gw.http).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .expect("timeout");
    // A masked text frame "ok" in the same write as the handshake.
    let early = [0x81, 0x82, 1, 2, 3, 4, b'o' ^ 1, b'k' ^ 2];
    let mut hello = b"GET /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        .to_vec();
    hello.extend_from_slice(&early);
    s.write_all(&hello).expect("write");
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    let frame_from_odoo = b"\x81\x02hi";
    while !seen.ends_with(frame_from_odoo) {
        let n = s.read(&mut buf).expect("read");
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 101"),
        "{:?}",
        String::from_utf8_lossy(&seen)
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let have = got.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if have == early {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Odoo got {have:?} after the handshake"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
