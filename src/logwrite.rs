//! Where log lines go: a buffer that a thread of its own writes out in batches.
//!
//! A request's thread formats its access line, appends it to the buffer under a lock and goes
//! on; it never makes a `write` of its own. The writer thread writes what gathered in one
//! `write`, then waits [`GATHER`] before it looks again, so under load it wakes about a
//! hundred times a second whatever the request rate. A writer woken for each line, as
//! tracing-appender's is, cost a thread switch per request (thread switches were 17 % of
//! erpgate's CPU samples with the access log on; batching took local wrk from 46.7k to
//! 52.3k req/s). When idle it sleeps until the next line, which is written at once.
//!
//! No line is dropped: when the writer falls behind by [`LIMIT`] bytes, the threads that log
//! wait for it. Lines logged after [`Lines::close`] are written directly.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long the writer lets lines gather after a write.
pub const GATHER: Duration = Duration::from_millis(10);

/// Bytes waiting to be written beyond which the threads that log wait for the writer.
pub const LIMIT: usize = 1024 * 1024;

/// Capacity a batch buffer keeps between batches at least. Above it, a buffer keeps what it
/// has while that is at most four times the last batch, and gives back down to twice it
/// beyond. Under load the batches vary in size from one to the next; a buffer cut to the
/// size of the last one grew again whenever the next was larger: a copy of all it held,
/// under the lock, into pages never touched before (1,860 page faults a second at 78k
/// access lines a second, 91 % of them in that copy; `perf record -e page-faults`).
const KEEP: usize = 64 * 1024;

struct State {
    /// Lines not written yet.
    buf: Vec<u8>,
    /// The writer sleeps until a line comes.
    idle: bool,
    /// No more batches: lines are written by whoever logs them.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    /// The writer waits here for lines.
    lines: Condvar,
    /// Threads that log wait here for room.
    room: Condvar,
    /// Where lines go once the writer has stopped.
    out: Mutex<Box<dyn Write + Send>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        crate::lock(&self.state)
    }

    fn write_out(&self, bytes: &[u8]) {
        let mut out = crate::lock(&self.out);
        // Nowhere to report a failed write of the log itself.
        let _ = out.write_all(bytes).and_then(|()| out.flush());
    }
}

/// The log's line buffer and its writer thread.
pub struct Lines {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Lines {
    /// Starts the writer thread, writing to `out`. Should the thread not start, every line
    /// is written by the thread that logs it.
    pub fn start(out: impl Write + Send + 'static) -> Lines {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                buf: Vec::new(),
                idle: false,
                closed: false,
            }),
            lines: Condvar::new(),
            room: Condvar::new(),
            out: Mutex::new(Box::new(out)),
        });
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("erpgate-log".into())
                .spawn(move || write_batches(&shared))
        };
        let writer = match writer {
            Ok(writer) => Some(writer),
            Err(e) => {
                eprintln!("erpgate: no log writer thread ({e}): lines are written as logged");
                shared.lock().closed = true;
                None
            }
        };
        Lines {
            shared,
            writer: Mutex::new(writer),
        }
    }

    /// Appends `line` (one or more whole lines) for the writer.
    pub fn append(&self, line: &[u8]) {
        let mut st = self.shared.lock();
        while !st.closed && !st.buf.is_empty() && st.buf.len() + line.len() > LIMIT {
            st = self.shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.closed {
            drop(st);
            self.shared.write_out(line);
            return;
        }
        st.buf.extend_from_slice(line);
        if st.idle {
            st.idle = false;
            self.shared.lines.notify_one();
        }
    }

    /// Writes out every line appended so far and stops the writer; later lines are written
    /// as they come. Before erpgate exits.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.lines.notify_one();
        self.shared.room.notify_all();
        let writer = crate::lock(&self.writer).take();
        if let Some(writer) = writer {
            let _ = writer.join();
        }
    }
}

/// The writer thread: a batch, a pause for the next to gather, until closed.
fn write_batches(shared: &Shared) {
    let mut spare = Vec::new();
    loop {
        let (batch, closed) = {
            let mut st = shared.lock();
            while st.buf.is_empty() && !st.closed {
                st.idle = true;
                st = shared.lines.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            st.idle = false;
            (std::mem::replace(&mut st.buf, spare), st.closed)
        };
        shared.room.notify_all();
        if !batch.is_empty() {
            shared.write_out(&batch);
        }
        if closed {
            // Lines appended after the last swap went out directly (`closed` was set first).
            return;
        }
        spare = batch;
        trim(&mut spare);
        std::thread::sleep(GATHER);
    }
}

/// Empties a written batch's buffer for the next batch, keeping room as [`KEEP`] says.
fn trim(batch: &mut Vec<u8>) {
    let room = batch.len().max(KEEP);
    batch.clear();
    if batch.capacity() > 4 * room {
        batch.shrink_to(2 * room);
    }
}

/// One line's writer for `tracing_subscriber`: the formatted line goes to [`Lines::append`].
pub struct LineWriter<'a>(&'a Lines);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for &'static Lines {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_written_buffer_keeps_room_for_batches_a_little_larger_and_gives_back_the_rest() {
        // Grown by appends to hold a 200 KiB batch: kept whole for the next batch.
        let mut batch = Vec::new();
        for _ in 0..200 {
            batch.extend_from_slice(&[b'x'; 1024]);
        }
        let grown = batch.capacity();
        trim(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(batch.capacity(), grown);
        // A small batch after a burst: back to twice the least it keeps.
        let mut batch = Vec::with_capacity(2 * LIMIT);
        batch.extend_from_slice(b"one line\n");
        trim(&mut batch);
        assert!(batch.is_empty());
        assert!(batch.capacity() >= 2 * KEEP && batch.capacity() <= 4 * KEEP);
        // At most four times the batch is kept as it is.
        let mut batch = Vec::with_capacity(4 * 100 * 1024);
        batch.extend_from_slice(&[b'x'; 100 * 1024]);
        let had = batch.capacity();
        trim(&mut batch);
        assert_eq!(batch.capacity(), had);
    }

    /// An output that keeps what it got, optionally slowly.
    #[derive(Clone, Default)]
    struct Kept {
        bytes: Arc<Mutex<Vec<u8>>>,
        writes: Arc<Mutex<usize>>,
        slow: Option<Duration>,
    }

    impl Write for Kept {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if let Some(d) = self.slow {
                std::thread::sleep(d);
            }
            self.bytes.lock().unwrap().extend_from_slice(buf);
            *self.writes.lock().unwrap() += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines_of(kept: &Kept) -> Vec<String> {
        String::from_utf8(kept.bytes.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn every_line_from_every_thread_is_written_in_its_threads_order_and_in_batches() {
        let kept = Kept::default();
        let lines: &'static Lines = Box::leak(Box::new(Lines::start(kept.clone())));
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..20_000 {
                        lines.append(format!("t{t} line {i}\n").as_bytes());
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        lines.close();
        let got = lines_of(&kept);
        assert_eq!(got.len(), 80_000);
        for t in 0..4 {
            let mine: Vec<usize> = got
                .iter()
                .filter_map(|l| l.strip_prefix(&format!("t{t} line ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..20_000).collect::<Vec<_>>());
        }
        // Batches, not a write per line.
        let writes = *kept.writes.lock().unwrap();
        assert!(writes < 80_000 / 10, "{writes} writes for 80,000 lines");
    }

    #[test]
    fn an_idle_writer_writes_a_line_at_once_and_lines_after_close_still_go_out() {
        let kept = Kept::default();
        let lines: &'static Lines = Box::leak(Box::new(Lines::start(kept.clone())));
        // Let the writer go idle, then one line: written without waiting for a close.
        std::thread::sleep(GATHER * 3);
        lines.append(b"first\n");
        let deadline = Instant::now() + Duration::from_secs(10);
        while lines_of(&kept).is_empty() {
            assert!(Instant::now() < deadline, "the line was not written");
            std::thread::sleep(Duration::from_millis(1));
        }
        lines.close();
        lines.append(b"after close\n");
        assert_eq!(lines_of(&kept), ["first", "after close"]);
    }

    #[test]
    fn a_writer_that_falls_behind_holds_back_the_threads_that_log_and_loses_nothing() {
        let kept = Kept {
            slow: Some(Duration::from_millis(50)),
            ..Kept::default()
        };
        let lines: &'static Lines = Box::leak(Box::new(Lines::start(kept.clone())));
        let line = [b'x'; 1023];
        let mut line = line.to_vec();
        line.push(b'\n');
        // Four times what may wait: the thread that logs must wait for the slow writer.
        for _ in 0..(4 * LIMIT / line.len()) {
            lines.append(&line);
            assert!(lines.shared.lock().buf.len() <= LIMIT);
        }
        lines.close();
        assert_eq!(lines_of(&kept).len(), 4 * LIMIT / line.len());
    }
}
