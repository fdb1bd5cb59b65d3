//! A measurement, not a product: the least an HTTP/1.1 keep-alive reverse proxy does, on
//! tokio and httparse alone, to see what this machine allows without Pingora's HTTP/1 path
//! (README, Performance). No policy, no TLS, no chunked bodies, no pipelining, no
//! WebSockets: each client connection gets its own upstream connection per route, a request
//! and its response are read whole (Content-Length) and written on.
//!
//!   cargo build --release --example lean_h1_proxy
//!   ../shared/bench/peers.sh --candidate target/release/examples/lean_h1_proxy \
//!       --candidate-name lean-h1 --peers nginx --no-logs
//!
//! Listens on 127.0.0.1:18080; `/websocket*` and `/longpolling/*` go to 127.0.0.1:18072,
//! everything else to 127.0.0.1:18069 (the addresses peers.sh expects).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Length of a complete message (head and Content-Length body) at the start of `buf`, and
/// where its head ends; `None` while the head is incomplete or invalid.
fn message_len(buf: &[u8], request: bool) -> Option<(usize, usize)> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let head = if request {
        match httparse::Request::new(&mut headers).parse(buf).ok()? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => return None,
        }
    } else {
        match httparse::Response::new(&mut headers).parse(buf).ok()? {
            httparse::Status::Complete(n) => n,
            httparse::Status::Partial => return None,
        }
    };
    let body = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
        .unwrap_or(0);
    Some((head, head + body))
}

/// Reads one whole message into `buf` (cleared first): its length, `None` on close or error.
async fn read_message(s: &mut TcpStream, buf: &mut Vec<u8>, request: bool) -> Option<usize> {
    buf.clear();
    let mut want = None;
    loop {
        if want.is_none() {
            want = message_len(buf, request).map(|(_, total)| total);
        }
        if let Some(total) = want {
            if buf.len() >= total {
                return Some(total);
            }
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if s.read_buf(buf).await.ok()? == 0 {
            return None;
        }
    }
}

async fn serve(mut client: TcpStream) -> Option<()> {
    client.set_nodelay(true).ok()?;
    let mut upstreams: [Option<TcpStream>; 2] = [None, None];
    let mut req = Vec::with_capacity(4096);
    let mut resp = Vec::with_capacity(4096);
    loop {
        let n = read_message(&mut client, &mut req, true).await?;
        let path = req.split(|b| *b == b' ').nth(1).unwrap_or_default();
        let gevent = path.starts_with(b"/websocket") || path.starts_with(b"/longpolling/");
        let up = &mut upstreams[usize::from(gevent)];
        if up.is_none() {
            let addr = if gevent {
                "127.0.0.1:18072"
            } else {
                "127.0.0.1:18069"
            };
            let s = TcpStream::connect(addr).await.ok()?;
            s.set_nodelay(true).ok()?;
            *up = Some(s);
        }
        let up = up.as_mut()?;
        up.write_all(&req[..n]).await.ok()?;
        let m = read_message(up, &mut resp, false).await?;
        client.write_all(&resp[..m]).await.ok()?;
    }
}

fn main() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()?;
    rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:18080").await?;
        loop {
            // Out of descriptors and the like: the next accept may work.
            if let Ok((s, _)) = listener.accept().await {
                tokio::spawn(serve(s));
            }
        }
    })
}
