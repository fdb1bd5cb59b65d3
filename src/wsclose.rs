//! Closing WebSockets properly when erpgate stops (SIGTERM).
//!
//! Pingora relays an upgraded connection as bytes and has no way to write into an idle one
//! from outside. So erpgate opens the upstream connection of every WebSocket itself (a
//! custom connector) and keeps a duplicate of its socket. On SIGTERM it sends Odoo a close
//! frame (1001, going away) on that socket, at a frame boundary of the client's stream; Odoo
//! answers with its own close frame, which reaches the browser through the tunnel, and closes
//! the connection, which ends the tunnel. If Odoo has not done so after a few seconds,
//! erpgate shuts the upstream socket and adds a close frame of its own at the end of what
//! the browser receives (again only at a frame boundary). Browsers then reconnect to another
//! erpgate at once instead of waiting out a dead connection.
//!
//! To know where frames begin, the bytes of each direction go through a [`FrameTracker`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// Code 1001 "going away", as a close frame's payload.
const GOING_AWAY: [u8; 2] = [0x03, 0xE9];

/// A close frame from a server (unmasked).
pub const SERVER_CLOSE: [u8; 4] = [0x88, 0x02, GOING_AWAY[0], GOING_AWAY[1]];

/// A close frame as a client sends it (masked; the mask need not be secret here).
pub fn client_close() -> [u8; 8] {
    let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
    [
        0x88,
        0x82,
        mask[0],
        mask[1],
        mask[2],
        mask[3],
        GOING_AWAY[0] ^ mask[0],
        GOING_AWAY[1] ^ mask[1],
    ]
}

/// Follows one direction of a WebSocket byte stream: where frames begin, and whether a close
/// frame went through.
#[derive(Debug, Default, Clone)]
pub struct FrameTracker {
    /// Bytes of the current frame's header seen so far (up to 14).
    head: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// A close frame has gone through.
    closed: bool,
}

impl FrameTracker {
    /// The header length once its first two bytes are known.
    fn head_len(head: &[u8]) -> Option<usize> {
        let (b1, b2) = (head.first()?, head.get(1)?);
        let _ = b1;
        let ext = match b2 & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if b2 & 0x80 != 0 { 4 } else { 0 };
        Some(2 + ext + mask)
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len());
                self.remaining -= n as u64;
                data = &data[n..];
                continue;
            }
            // Reading a header.
            let want = Self::head_len(&self.head).unwrap_or(2);
            let n = (want - self.head.len()).min(data.len());
            self.head.extend_from_slice(&data[..n]);
            data = &data[n..];
            let Some(full) = Self::head_len(&self.head) else {
                continue;
            };
            if self.head.len() < full {
                continue;
            }
            let len = match self.head[1] & 0x7f {
                126 => u64::from(u16::from_be_bytes([self.head[2], self.head[3]])),
                127 => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&self.head[2..10]);
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            if self.head[0] & 0x0f == 0x8 {
                self.closed = true;
            }
            self.head.clear();
            self.remaining = len;
        }
    }

    /// Between two frames: a frame of erpgate's may go here.
    pub fn at_boundary(&self) -> bool {
        self.head.is_empty() && self.remaining == 0
    }

    pub fn saw_close(&self) -> bool {
        self.closed
    }
}

/// One WebSocket through erpgate.
#[derive(Debug, Default)]
pub struct Tunnel {
    /// A duplicate of the upstream socket (set when erpgate connects to Odoo).
    upstream: Mutex<Option<std::net::TcpStream>>,
    /// The browser's frames, on their way to Odoo.
    pub to_odoo: Mutex<FrameTracker>,
    /// Odoo's frames, on their way to the browser.
    pub to_client: Mutex<FrameTracker>,
    /// erpgate has sent Odoo a close frame: the browser's further data is dropped.
    pub closing: AtomicBool,
    /// Odoo did not close in time: its socket was shut; the browser gets erpgate's close.
    pub forced: AtomicBool,
}

use crate::lock;

impl Tunnel {
    /// What the browser sent (`data`), as it should go on to Odoo.
    pub fn from_client(&self, data: &[u8]) -> bool {
        lock(&self.to_odoo).feed(data);
        !self.closing.load(Ordering::Acquire)
    }

    /// What Odoo sent; at the end of the stream (`end`), the bytes erpgate adds: its own close
    /// frame when erpgate ended the socket (asked Odoo to close, or forced it) and the browser
    /// got no close frame from Odoo.
    pub fn from_odoo(&self, data: &[u8], end: bool) -> Option<&'static [u8]> {
        let mut t = lock(&self.to_client);
        t.feed(data);
        let ours = self.closing.load(Ordering::Acquire) || self.forced.load(Ordering::Acquire);
        (end && ours && !t.saw_close() && t.at_boundary()).then_some(&SERVER_CLOSE[..])
    }

    /// Sends Odoo a close frame, when the browser's stream is at a frame boundary.
    fn send_close(&self) {
        use std::io::Write;
        let boundary = lock(&self.to_odoo).at_boundary();
        self.closing.store(true, Ordering::Release);
        if !boundary {
            return;
        }
        if let Some(s) = lock(&self.upstream).as_mut() {
            let _ = s.write_all(&client_close());
        }
    }

    /// Ends the upstream side now.
    fn force(&self) {
        self.forced.store(true, Ordering::Release);
        if let Some(s) = lock(&self.upstream).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The WebSockets open now.
static OPEN: Mutex<Vec<Weak<Tunnel>>> = Mutex::new(Vec::new());

/// Registers a new WebSocket's tunnel. Closed ones are swept out when the list is full
/// (its capacity reached), and the sweep leaves room for as many again as it kept, so a
/// registration costs O(1) on average, not a scan of every open socket (without that room,
/// a list kept just under full by one close per open would be scanned on every open).
pub fn register() -> Arc<Tunnel> {
    let t = Arc::new(Tunnel::default());
    let mut open = lock(&OPEN);
    if open.len() == open.capacity() {
        open.retain(|w| w.strong_count() > 0);
        let kept = open.len();
        open.reserve(kept.max(16));
    }
    open.push(Arc::downgrade(&t));
    t
}

fn live() -> Vec<Arc<Tunnel>> {
    lock(&OPEN).iter().filter_map(Weak::upgrade).collect()
}

/// SIGTERM: asks Odoo to close every WebSocket, and after `patience` ends those still open.
pub async fn close_all(patience: Duration) {
    let tunnels = live();
    if tunnels.is_empty() {
        return;
    }
    tracing::info!("stopping: closing {} WebSocket(s)", tunnels.len());
    for t in &tunnels {
        t.send_close();
    }
    drop(tunnels);
    tokio::time::sleep(patience).await;
    for t in live() {
        t.force();
    }
}

/// Opens the upstream connection of a WebSocket and keeps a duplicate of the socket in its
/// tunnel.
#[derive(Debug)]
pub struct Connector {
    pub tunnel: Arc<Tunnel>,
}

#[async_trait::async_trait]
impl pingora::connectors::L4Connect for Connector {
    async fn connect(
        &self,
        addr: &pingora::protocols::l4::socket::SocketAddr,
    ) -> pingora::Result<pingora::protocols::l4::stream::Stream> {
        let err = |what: &str, e: std::io::Error| {
            pingora::Error::because(pingora::ErrorType::ConnectError, what.to_string(), e)
        };
        let Some(inet) = addr.as_inet().copied() else {
            return pingora::Error::e_explain(
                pingora::ErrorType::ConnectError,
                "WebSockets go to TCP servers",
            );
        };
        let inet: SocketAddr = inet;
        let tcp = tokio::net::TcpStream::connect(inet)
            .await
            .map_err(|e| err("connect", e))?;
        tcp.set_nodelay(true).map_err(|e| err("nodelay", e))?;
        let std = tcp.into_std().map_err(|e| err("socket", e))?;
        let dup = std.try_clone().map_err(|e| err("socket", e))?;
        *lock(&self.tunnel.upstream) = Some(dup);
        let tcp = tokio::net::TcpStream::from_std(std).map_err(|e| err("socket", e))?;
        Ok(tcp.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: u8, len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x80 | opcode];
        let m = if masked { 0x80 } else { 0 };
        match len {
            0..=125 => f.push(m | len as u8),
            126..=65535 => {
                f.push(m | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(m | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    #[test]
    fn frame_boundaries_are_followed_across_any_split() {
        let mut stream = Vec::new();
        for (op, len, masked) in [
            (1, 5, true),
            (2, 300, false),
            (1, 70_000, true),
            (9, 0, false),
        ] {
            stream.extend(frame(op, len, masked));
        }
        let ends: Vec<usize> = {
            let mut at = 0;
            [(5, true), (300, false), (70_000, true), (0, false)]
                .iter()
                .map(|(len, masked)| {
                    at += frame(1, *len, *masked).len();
                    at
                })
                .collect()
        };
        for piece in [1, 2, 3, 7, 100, 4096, stream.len()] {
            let mut t = FrameTracker::default();
            let mut fed = 0;
            for chunk in stream.chunks(piece) {
                t.feed(chunk);
                fed += chunk.len();
                assert_eq!(
                    t.at_boundary(),
                    ends.contains(&fed),
                    "piece {piece}, at {fed}"
                );
            }
            assert!(!t.saw_close());
        }
        let mut t = FrameTracker::default();
        t.feed(&SERVER_CLOSE);
        assert!(t.saw_close() && t.at_boundary());
        let mut t = FrameTracker::default();
        t.feed(&client_close());
        assert!(t.saw_close() && t.at_boundary());
    }

    #[test]
    fn erpgate_adds_its_close_frame_only_when_it_forced_the_end_at_a_boundary() {
        let t = Tunnel::default();
        assert_eq!(
            t.from_odoo(&frame(1, 3, false), true),
            None,
            "Odoo ended it"
        );
        t.forced.store(true, Ordering::Release);
        assert_eq!(t.from_odoo(&[], true), Some(&SERVER_CLOSE[..]));
        let mid = Tunnel::default();
        mid.forced.store(true, Ordering::Release);
        assert_eq!(
            mid.from_odoo(&frame(1, 10, false)[..5], true),
            None,
            "mid-frame"
        );
        let closed = Tunnel::default();
        closed.forced.store(true, Ordering::Release);
        assert_eq!(
            closed.from_odoo(&SERVER_CLOSE, true),
            None,
            "Odoo closed already"
        );
        // After erpgate asked Odoo to close, the browser's data is held back.
        assert!(t.from_client(&frame(1, 2, true)));
        t.send_close();
        assert!(!t.from_client(&frame(1, 2, true)));
    }
}
