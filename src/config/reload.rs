//! Live reload: on SIGHUP, and when the config file changes on disk, the file is read and
//! compiled on a thread of its own (never on the request path) and swapped in with one
//! `ArcSwap::store`. A request keeps the `Arc` it started with; open WebSockets and
//! long-polls are untouched. A file with errors changes nothing: the old config keeps
//! serving and every error (`file:line:col: key.path: message`) goes to the log.
//!
//! The watch is on the file's directory, not the file: editors write a new file and rename
//! it over the old one, and Kubernetes ConfigMap volumes swap a `..data` symlink, and
//! neither is seen by a watch on the old file. An event that names the file, or one of the
//! `..`-prefixed names of a ConfigMap's swap, is followed by a short settling pause and a
//! read; only a change of the file's bytes reloads. Events for other files in the directory
//! (a log written beside the config) are not looked at further.
//!
//! The watch asks the kernel (inotify) only for what can change the file: a file written and
//! closed, renamed, made or removed. Not each write (`IN_MODIFY`) nor each open: a log kept
//! open beside the config is written thousands of times a second and closed never, and
//! through the `notify` crate, whose watch asks for both, an idle erpgate spent 3.5 to 4.4
//! s of CPU in 5 s while another process wrote 700,000 lines a second into its directory.

use super::{load, Config};
use arc_swap::ArcSwap;
use inotify::{EventMask, Inotify, WatchMask};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Time for a burst of file events (write, rename, symlink swap) to settle before reading.
const SETTLE: Duration = Duration::from_millis(150);

/// What the admin endpoint tells of the config: which one serves, since when, and what went
/// wrong with the last attempt to change it.
#[derive(Debug)]
pub struct ReloadStats {
    /// 1 for the config erpgate started with, +1 for each one taken since.
    pub generation: AtomicU64,
    pub failed: AtomicU64,
    pub status: std::sync::Mutex<Status>,
}

#[derive(Debug, Clone)]
pub struct Status {
    pub loaded_at: std::time::SystemTime,
    /// When and why the last reload failed (cleared by a successful one).
    pub last_error: Option<(std::time::SystemTime, String)>,
}

impl ReloadStats {
    /// For the config loaded at start.
    pub fn new() -> ReloadStats {
        ReloadStats {
            generation: AtomicU64::new(1),
            failed: AtomicU64::new(0),
            status: std::sync::Mutex::new(Status {
                loaded_at: std::time::SystemTime::now(),
                last_error: None,
            }),
        }
    }

    pub fn status(&self) -> Status {
        crate::lock(&self.status).clone()
    }

    fn set(&self, f: impl FnOnce(&mut Status)) {
        f(&mut crate::lock(&self.status))
    }
}

impl Default for ReloadStats {
    fn default() -> Self {
        Self::new()
    }
}

fn count(result: &str) {
    if let Some(m) = crate::metrics::get() {
        m.config_reloads.with_label_values(&[result]).inc();
    }
}

/// Called with each config taken, after it serves (the TLS listeners' certificates follow it).
pub type OnSwap = Box<dyn Fn(&Config) + Send>;

/// Starts watching `path` and listening for SIGHUP. Returns once both are in place, so a
/// SIGHUP sent after this returns is never the default one (which ends the process).
pub fn spawn(
    path: PathBuf,
    store: Arc<ArcSwap<Config>>,
    stats: Arc<ReloadStats>,
    on_swap: OnSwap,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut hup, mut term) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((
            signal(SignalKind::hangup())?,
            signal(SignalKind::terminate())?,
        ))
    })?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let dir = watch_dir(&path);
    let config = path.clone();
    let canonical_dir = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    let events = tx.clone();
    // The names are looked up again (a `canonicalize`, several system calls) only for an
    // event that may have changed which file the config links to: one naming the config
    // itself or a `..` entry, or one without a name.
    let own: Vec<OsString> = config.file_name().map(OsString::from).into_iter().collect();
    let mut names = config_names(&config, &canonical_dir);
    watch(&dir, move |name| {
        if concerns(name, &own) {
            names = config_names(&config, &canonical_dir);
        } else if !concerns(name, &names) {
            return true;
        }
        events.send(()).is_ok()
    })?;
    let mut seen = std::fs::read(&path).ok();
    std::thread::Builder::new()
        .name("erpgate-reload".into())
        .spawn(move || {
            rt.block_on(async move {
                loop {
                    let forced = tokio::select! {
                        _ = hup.recv() => true,
                        _ = term.recv() => {
                            // Pingora stops the listeners and waits out the grace period;
                            // erpgate closes its WebSockets properly meanwhile.
                            let grace = store.load().server.grace_period;
                            let patience = (grace / 2).min(std::time::Duration::from_secs(5));
                            tokio::spawn(crate::wsclose::close_all(patience));
                            continue;
                        }
                        ev = rx.recv() => {
                            if ev.is_none() {
                                return;
                            }
                            false
                        }
                    };
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    let now = std::fs::read(&path).ok();
                    if !forced && now == seen {
                        continue;
                    }
                    seen = now;
                    let why = if forced { "SIGHUP" } else { "file changed" };
                    if reload(&path, &store, &stats, why) {
                        on_swap(&store.load());
                    }
                }
            });
        })?;
    Ok(())
}

/// The events in the config's directory that can change it: a file written and closed
/// (edited in place), renamed in or out (an editor's save, a ConfigMap's `..data` swap),
/// made or removed (a symlink replaced); and the directory itself removed or moved.
const WATCHED: WatchMask = WatchMask::CLOSE_WRITE
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::CREATE)
    .union(WatchMask::DELETE)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF);

/// Watches `dir` ([`WATCHED`]) on a thread of its own, which calls `on_event` with the name of
/// the entry each event is about (`None`: the directory itself, or the kernel dropped events
/// and the directory should be looked at) until it returns false. Returns once the watch is
/// in place.
fn watch(
    dir: &Path,
    mut on_event: impl FnMut(Option<&OsStr>) -> bool + Send + 'static,
) -> std::io::Result<()> {
    let mut inotify = Inotify::init()?;
    inotify.watches().add(dir, WATCHED)?;
    let dir = dir.to_path_buf();
    std::thread::Builder::new()
        .name("erpgate-watch".into())
        .spawn(move || {
            let mut buffer = [0u8; 4096];
            loop {
                let events = match inotify.read_events_blocking(&mut buffer) {
                    Ok(events) => events,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        tracing::warn!(
                            "config watch on {} stopped ({e}); SIGHUP still reloads",
                            dir.display()
                        );
                        return;
                    }
                };
                for ev in events {
                    if ev.mask.contains(EventMask::IGNORED) {
                        tracing::warn!(
                            "config watch on {} stopped (the directory is gone); SIGHUP still \
                             reloads",
                            dir.display()
                        );
                        return;
                    }
                    let name = if ev.mask.contains(EventMask::Q_OVERFLOW) {
                        None
                    } else {
                        ev.name
                    };
                    if !on_event(name) {
                        return;
                    }
                }
            }
        })?;
    Ok(())
}

/// The names in the watched directory (`dir`, canonical) under which the config at `path`
/// can change: its own, and that of the file it is a symlink to, when that file is in the
/// same directory (`erpgate.toml -> erpgate-2026.toml`, the target edited in place).
fn config_names(path: &Path, dir: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = path.file_name().map(OsString::from).into_iter().collect();
    if let Ok(target) = std::fs::canonicalize(path) {
        if target.parent() == Some(dir) {
            names.extend(target.file_name().map(OsString::from));
        }
    }
    names
}

/// Whether an event in the watched directory about the entry `name` may concern the config,
/// known there by `names` ([`config_names`]): one that names it (an edit, or a new file
/// renamed over it), one that names a `..`-prefixed entry (a Kubernetes ConfigMap volume
/// swaps its `..data` symlink, and the file is a link through it), or one that names no entry
/// (the directory itself, or lost events: look).
fn concerns(name: Option<&OsStr>, names: &[OsString]) -> bool {
    name.is_none_or(|n| {
        names.iter().any(|name| name == n) || n.as_encoded_bytes().starts_with(b"..")
    })
}

/// The directory to watch for `path` (its parent; `.` for a bare file name).
fn watch_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads, compiles and swaps in the file at `path`; on errors keeps the current config.
/// Returns whether the new config was taken.
pub fn reload(path: &Path, store: &ArcSwap<Config>, stats: &ReloadStats, why: &str) -> bool {
    match load(path) {
        Ok(mut new) => {
            let old = store.load_full();
            for what in needs_restart(&old, &new) {
                tracing::warn!(
                    "config reload: {what} changed; this takes effect at the next restart"
                );
            }
            new.adopt_state(&old);
            crate::dns::resolve_blocking(&new);
            store.store(Arc::new(new));
            stats.generation.fetch_add(1, Ordering::Relaxed);
            stats.set(|s| {
                s.loaded_at = std::time::SystemTime::now();
                s.last_error = None;
            });
            count("ok");
            tracing::info!(file = %path.display(), reason = why, "config reloaded");
            true
        }
        Err(errors) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            count("error");
            stats.set(|s| s.last_error = Some((std::time::SystemTime::now(), errors.to_string())));
            for e in &errors.0 {
                tracing::error!("config reload: {e}");
            }
            tracing::error!(
                file = %path.display(),
                reason = why,
                "config reload failed: {} error(s); the running config is unchanged",
                errors.0.len()
            );
            false
        }
    }
}

/// Settings a running process cannot change: they are read at start only.
fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    if old.listen != new.listen {
        out.push("[listen]");
    }
    if old.server.threads != new.server.threads {
        out.push("server.threads");
    }
    if old.server.pin_threads != new.server.pin_threads {
        out.push("server.pin_threads");
    }
    if old.server.grace_period != new.server.grace_period
        || old.server.shutdown_timeout != new.server.shutdown_timeout
    {
        out.push("server.grace_period / server.shutdown_timeout");
    }
    if old.log != new.log {
        out.push("[log]");
    }
    if old.server.upgrade_sock != new.server.upgrade_sock {
        out.push("server.upgrade_sock");
    }
    let ca = |c: &Config| {
        c.tls
            .as_ref()
            .and_then(|t| t.client_ca.as_ref().map(|(p, _)| p.clone()))
    };
    if ca(old) != ca(new) || old.tls.is_some() != new.tls.is_some() {
        out.push("[tls] client_ca, or [tls] added or removed");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Settings read at start only are named when a reload changes them (erpgate logs that
    /// they wait for a restart); other changes are not.
    #[test]
    fn a_reload_names_the_settings_that_wait_for_a_restart() {
        let config = |server: &str, pool: &str| {
            let text = format!(
                "[listen]\nhttp = [\"127.0.0.1:8080\"]\n[server]\n{server}\n\
                 [pools.web]\nservers = [{{ address = \"{pool}\" }}]\n\
                 [[class]]\nname = \"user\"\npool = \"web\"\n"
            );
            crate::config::compile::parse(&text, "erpgate.toml", None).expect("config")
        };
        let old = config("threads = 2", "127.0.0.1:8069");
        assert!(needs_restart(&old, &config("threads = 2", "127.0.0.1:9069")).is_empty());
        assert_eq!(
            needs_restart(
                &old,
                &config("threads = 2\npin_threads = true", "127.0.0.1:8069")
            ),
            ["server.pin_threads"]
        );
        assert_eq!(
            needs_restart(&old, &config("threads = 3", "127.0.0.1:8069")),
            ["server.threads"]
        );
    }

    #[test]
    fn only_events_naming_the_config_or_a_configmap_swap_concern_it() {
        let names = [OsString::from("erpgate.toml")];
        let concerns = |name: Option<&str>| concerns(name.map(OsStr::new), &names);
        // The file written in place, or a new one renamed over it (as editors and sed -i do).
        assert!(concerns(Some("erpgate.toml")));
        // A ConfigMap's update: ..data_tmp renamed to ..data, a new timestamped directory.
        assert!(concerns(Some("..data")));
        assert!(concerns(Some("..data_tmp")));
        assert!(concerns(Some("..2026_11_27_10_00_00.1")));
        // The directory itself, or lost events: look.
        assert!(concerns(None));
        // Other files beside the config: a log, the audit log, another config, an editor's.
        for other in [
            "erpgate.log",
            "audit.jsonl",
            "erpgate.toml.bak",
            "vm.toml",
            ".erpgate.toml.swp",
        ] {
            assert!(!concerns(Some(other)), "{other}");
        }
    }

    #[test]
    fn a_config_that_links_to_a_file_beside_it_is_known_by_both_names() {
        let dir = tempfile::tempdir().expect("dir");
        let canonical = std::fs::canonicalize(dir.path()).expect("canonical");
        let file = dir.path().join("erpgate.toml");
        std::fs::write(dir.path().join("erpgate-2026.toml"), "a").expect("write");
        std::os::unix::fs::symlink("erpgate-2026.toml", &file).expect("link");
        assert_eq!(
            config_names(&file, &canonical),
            [
                OsString::from("erpgate.toml"),
                OsString::from("erpgate-2026.toml")
            ]
        );
        // A plain file: its own name (twice is harmless).
        let plain = dir.path().join("vm.toml");
        std::fs::write(&plain, "a").expect("write");
        assert!(config_names(&plain, &canonical)
            .iter()
            .all(|n| n == "vm.toml"));
        // A link to another directory, which is not watched: only the link's name.
        let elsewhere = tempfile::tempdir().expect("dir");
        std::fs::write(elsewhere.path().join("real.toml"), "a").expect("write");
        let link = dir.path().join("linked.toml");
        std::os::unix::fs::symlink(elsewhere.path().join("real.toml"), &link).expect("link");
        assert_eq!(
            config_names(&link, &canonical),
            [OsString::from("linked.toml")]
        );
    }

    /// The events the watch gives for `dir` while `act` runs, up to the first that names
    /// `until` (the names; `None` for an event without one).
    fn events_until(dir: &Path, until: &str, act: impl FnOnce()) -> Vec<Option<OsString>> {
        let (tx, rx) = std::sync::mpsc::channel();
        watch(dir, move |name| tx.send(name.map(OsString::from)).is_ok()).expect("watch");
        act();
        let mut seen = Vec::new();
        loop {
            let name = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|_| panic!("no event naming {until} (saw {seen:?})"));
            let done = name.as_deref() == Some(OsStr::new(until));
            seen.push(name);
            if done {
                return seen;
            }
        }
    }

    /// Reading the config (as erpgate does after every event) must not be an event that
    /// makes it read again; writing it must. Events come in order, so the read's would be
    /// seen before the write's.
    #[test]
    fn reading_the_config_is_not_a_change_writing_it_is() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("erpgate.toml");
        std::fs::write(&file, "a").expect("write");
        let seen = events_until(dir.path(), "erpgate.toml", || {
            for _ in 0..3 {
                std::fs::read(&file).expect("read");
            }
            std::fs::write(&file, "b").expect("write");
        });
        assert_eq!(seen, [Some(OsString::from("erpgate.toml"))]);
    }

    /// A log kept open beside the config and written line by line gives the watch nothing:
    /// neither its writes nor its opening are asked for.
    #[test]
    fn a_log_written_beside_the_config_is_not_an_event() {
        let dir = tempfile::tempdir().expect("dir");
        let file = dir.path().join("erpgate.toml");
        std::fs::write(&file, "a").expect("write");
        let log = dir.path().join("access.log");
        std::fs::write(&log, "").expect("write");
        let seen = events_until(dir.path(), "erpgate.toml", || {
            use std::io::Write;
            let mut out = std::fs::OpenOptions::new()
                .append(true)
                .open(&log)
                .expect("open");
            for i in 0..10_000 {
                writeln!(out, "line {i}").expect("log line");
            }
            // Renamed over the config, as an editor saves it.
            let new = dir.path().join(".erpgate.toml.new");
            std::fs::write(&new, "b").expect("write");
            std::fs::rename(&new, &file).expect("rename");
            drop(out);
        });
        // The editor's new file (made, written and closed, renamed away), then the config.
        assert!(
            seen.iter()
                .all(|n| n.as_deref() != Some(OsStr::new("access.log"))),
            "{seen:?}"
        );
        assert_eq!(
            seen.last(),
            Some(&Some(OsString::from("erpgate.toml"))),
            "{seen:?}"
        );
    }
}
