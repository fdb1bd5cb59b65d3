//! The audit log: one JSON line per request of an audited class (the database manager and
//! the `db` service), allowed or denied. Never credentials, cookies or bodies.
//!
//! Lines go through a bounded queue to one writer thread, so a slow or failing disk never
//! blocks traffic: a write failure (or a full queue) is logged and counted, and the file is
//! opened again for the next line.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

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
    tx: SyncSender<String>,
    failures: Arc<AtomicU64>,
}

impl AuditLog {
    pub fn open(path: PathBuf) -> AuditLog {
        let (tx, rx) = sync_channel::<String>(10_000);
        let failures = Arc::new(AtomicU64::new(0));
        let counted = failures.clone();
        let spawned = std::thread::Builder::new().name("erpgate-audit".into()).spawn(move || {
            let mut file: Option<std::fs::File> = None;
            for line in rx {
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
        AuditLog { tx, failures }
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
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(line)) | Err(TrySendError::Disconnected(line)) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    "audit log: queue full or writer gone; the line is lost: {}",
                    line.trim_end()
                );
            }
        }
    }

    /// Lines that could not be written since start.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }
}
