//! Closing WebSockets properly when erpgate stops (SIGTERM).
//!
//! erpgate relays every WebSocket itself ([`crate::tunnel`]) and each relay follows a global
//! stop phase. On SIGTERM the phase becomes [`CLOSING`]: every relay sends Odoo a close frame
//! (1001, going away) at the next frame boundary of the browser's stream, and drops what the
//! browser sends after it; Odoo answers with its own close frame, which reaches the browser,
//! and closes the connection, which ends the relay. After a few seconds the phase becomes
//! [`FORCED`]: relays still open end, the browser getting a close frame of erpgate's own
//! (again only at a frame boundary, and only when Odoo's did not go through). Browsers then
//! reconnect to another erpgate at once instead of waiting out a dead connection.
//!
//! To know where frames begin, the bytes of each direction go through a [`FrameTracker`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio::sync::watch;

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

    /// Feeds `data` up to the next frame boundary; returns how many bytes that took (0 when
    /// already at one, all of `data` when the boundary is further on).
    pub fn feed_to_boundary(&mut self, data: &[u8]) -> usize {
        let mut used = 0;
        while used < data.len() && !self.at_boundary() {
            // Payload goes in one step, a header byte by byte (a header may end the frame).
            let step = if self.remaining > 0 {
                usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(data.len() - used)
            } else {
                1
            };
            self.feed(&data[used..used + step]);
            used += step;
        }
        used
    }

    /// Between two frames: a frame of erpgate's may go here.
    pub fn at_boundary(&self) -> bool {
        self.head.is_empty() && self.remaining == 0
    }

    pub fn saw_close(&self) -> bool {
        self.closed
    }
}

/// The stop phase: WebSockets relay as usual.
pub const RUNNING: u8 = 0;
/// erpgate is stopping: each relay asks Odoo to close its WebSocket.
pub const CLOSING: u8 = 1;
/// Odoo did not close in time: relays end their WebSockets themselves.
pub const FORCED: u8 = 2;

static PHASE: LazyLock<watch::Sender<u8>> = LazyLock::new(|| watch::channel(RUNNING).0);

/// WebSockets open now.
static OPEN: AtomicUsize = AtomicUsize::new(0);

/// The stop phase, for a relay to follow.
pub fn phase() -> watch::Receiver<u8> {
    PHASE.subscribe()
}

/// Counts one WebSocket as open while it lives.
pub struct Open(());

impl Open {
    pub fn new() -> Open {
        OPEN.fetch_add(1, Ordering::AcqRel);
        Open(())
    }
}

impl Default for Open {
    fn default() -> Self {
        Open::new()
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::AcqRel);
    }
}

/// SIGTERM: asks Odoo to close every WebSocket, and after `patience` (or once all are
/// closed) ends those still open.
pub async fn close_all(patience: Duration) {
    let open = OPEN.load(Ordering::Acquire);
    if open == 0 {
        return;
    }
    tracing::info!("stopping: closing {open} WebSocket(s)");
    PHASE.send_replace(CLOSING);
    let deadline = Instant::now() + patience;
    while OPEN.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    PHASE.send_replace(FORCED);
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
    fn feeding_to_a_boundary_stops_at_the_end_of_the_current_frame() {
        let mut stream = frame(1, 300, true);
        let first = stream.len();
        stream.extend(frame(1, 5, true));
        let mut t = FrameTracker::default();
        assert_eq!(t.feed_to_boundary(&stream), 0, "already at a boundary");
        t.feed(&stream[..3]);
        assert_eq!(t.feed_to_boundary(&stream[3..]), first - 3);
        assert!(t.at_boundary());
        // A frame's header split over two pieces, then an empty frame.
        let mut t = FrameTracker::default();
        let pong = frame(10, 0, true);
        t.feed(&pong[..1]);
        assert_eq!(t.feed_to_boundary(&pong[1..3]), 2);
        assert!(!t.at_boundary());
        assert_eq!(t.feed_to_boundary(&pong[3..]), pong.len() - 3);
        assert!(t.at_boundary());
    }
}
