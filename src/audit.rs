//! The audit log: one JSON line per request of an audited class (the database manager and
//! the `db` service), allowed or denied. Never credentials, cookies or bodies.
//!
//! Lines go through a bounded queue to one writer thread, so a slow or failing disk never
//! blocks traffic: a write failure (or a full queue) is logged and counted, and the file is
//! opened again for the next line. Before erpgate exits, [`AuditLog::flush`] waits for the
//! lines still queued to be written.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

/// How long erpgate waits at exit for the audit lines still queued to be written.
pub const FLUSH_LIMIT: Duration = Duration::from_secs(10);

/// What the writer thread takes from the queue.
enum Queued {
    Line(String),
    /// Answered once every line queued before it is written (or found unwritable).
    Flush(SyncSender<()>),
}

/// One audited request.
#[derive(Debug, serde::Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub client_ip: String,
    pub peer_ip: String,
    /// `X-Forwarded-For` as it arrived (believed only from a trusted peer).
    pub forwarded_for: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub class: &'a str,
    /// The `match` alternative that sorted the request into the class.
    pub rule: &'a str,
    /// `allowed`, or why not: `denied_ip`, `over_capacity`, `body_too_large`...
    pub decision: &'a str,
    pub status: u16,
    pub request_id: &'a str,
}

#[derive(Clone)]
pub struct AuditLog {
    tx: SyncSender<Queued>,
    failures: Arc<AtomicU64>,
    /// Lines queued and not yet taken by the writer.
    queued: Arc<AtomicU64>,
}

impl AuditLog {
    pub fn open(path: PathBuf) -> AuditLog {
        let (tx, rx) = sync_channel::<Queued>(10_000);
        let failures = Arc::new(AtomicU64::new(0));
        let counted = failures.clone();
        let queued = Arc::new(AtomicU64::new(0));
        let taken = queued.clone();
        let spawned = std::thread::Builder::new().name("erpgate-audit".into()).spawn(move || {
            let mut file: Option<std::fs::File> = None;
            for queued in rx {
                let line = match queued {
                    Queued::Line(line) => {
                        taken.fetch_sub(1, Ordering::Relaxed);
                        line
                    }
                    Queued::Flush(done) => {
                        let _ = done.send(());
                        continue;
                    }
                };
                if file.is_none() {
                    file = std::fs::OpenOptions::new().create(true).append(true).open(&path).ok();
                }
                let ok = match file.as_mut() {
                    Some(f) => f.write_all(line.as_bytes()).is_ok(),
                    None => false,
                };
                if !ok {
                    counted.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(path = %path.display(), "audit log: cannot write; the line is lost: {}", line.trim_end());
                    file = None;
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("audit log: cannot start the writer thread: {e}");
        }
        AuditLog {
            tx,
            failures,
            queued,
        }
    }

    pub fn write(&self, rec: &Record<'_>) {
        let mut line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("audit log: cannot encode a record: {e}");
                self.failures.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        line.push('\n');
        // Counted before it can be taken, so the count never goes below zero.
        self.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(Queued::Line(line)) {
            self.queued.fetch_sub(1, Ordering::Relaxed);
            self.failures.fetch_add(1, Ordering::Relaxed);
            let (TrySendError::Full(queued) | TrySendError::Disconnected(queued)) = e;
            if let Queued::Line(line) = queued {
                tracing::error!(
                    "audit log: queue full or writer gone; the line is lost: {}",
                    line.trim_end()
                );
            }
        }
    }

    /// Waits until every line queued so far is written (or found unwritable), at most
    /// `limit`; before erpgate exits. False if the writer did not get there in time: the
    /// lines still queued are then lost, and the log says how many.
    pub fn flush(&self, limit: Duration) -> bool {
        let waiting = self.queued.load(Ordering::Relaxed);
        if waiting == 0 {
            return true;
        }
        tracing::info!("audit log: writing {waiting} queued lines before exit");
        let deadline = std::time::Instant::now() + limit;
        let (done, written) = sync_channel(1);
        // The queue may be full: wait for room, as long as the limit allows.
        let mut flush = Queued::Flush(done);
        loop {
            match self.tx.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(back)) if std::time::Instant::now() < deadline => {
                    flush = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => return self.not_flushed(limit),
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        written.recv_timeout(left).is_ok() || self.not_flushed(limit)
    }

    fn not_flushed(&self, limit: Duration) -> bool {
        tracing::error!(
            "audit log: {} queued lines not written within {limit:?} of the stop; they are lost",
            self.queued.load(Ordering::Relaxed)
        );
        false
    }

    /// Lines that could not be written since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(request_id: &str) -> Record<'_> {
        Record {
            time: "2026-11-27T10:00:00Z".into(),
            client_ip: "203.0.113.9".into(),
            peer_ip: "203.0.113.9".into(),
            forwarded_for: "",
            method: "GET",
            path: "/web/database/manager",
            class: "admin",
            rule: "path_prefix=/web/database/",
            decision: "denied_ip",
            status: 403,
            request_id,
        }
    }

    #[test]
    fn a_flush_returns_once_every_queued_line_is_in_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(path.clone());
        let ids: Vec<String> = (0..2_000).map(|i| format!("r{i}")).collect();
        for id in &ids {
            log.write(&record(id));
        }
        assert!(log.flush(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&path).expect("the audit log");
        let got: Vec<String> = text
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).expect("JSON");
                v["request_id"].as_str().expect("request_id").to_string()
            })
            .collect();
        assert_eq!(got, ids);
        assert_eq!(log.queued.load(Ordering::Relaxed), 0);
        assert_eq!(log.failures(), 0);
        // Nothing queued: at once.
        assert!(log.flush(Duration::ZERO));
    }

    #[test]
    fn a_flush_gives_up_at_its_limit_when_the_writer_is_stuck() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("audit.fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        // No reader ever opens the FIFO: the writer waits in `open` for good.
        let log = AuditLog::open(fifo);
        for i in 0..3 {
            log.write(&record(&format!("r{i}")));
        }
        let asked = std::time::Instant::now();
        assert!(!log.flush(Duration::from_millis(200)));
        let took = asked.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
        assert!(log.queued.load(Ordering::Relaxed) >= 2);
    }
}
