//! Runs the real `erpgate` binary for a test: writes the config into a temp dir, picks free
//! ports for its listeners, waits until the admin `/healthz` answers, kills it on drop.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_erpgate");

pub struct Erpgate {
    child: Option<Child>,
    pub http: SocketAddr,
    /// Listened on when started with `start_tls`.
    pub https: SocketAddr,
    pub admin: SocketAddr,
    /// The `[listen]` section written before the test's config.
    listen: String,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    log_path: PathBuf,
}

fn port() -> u16 {
    super::free_port()
}

impl Erpgate {
    /// Starts erpgate with `body` (everything but `[listen]`, which this adds).
    pub fn start(body: &str) -> Erpgate {
        Self::start_with_env(body, &[])
    }

    pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> Erpgate {
        Self::launch(body, env, false, &[])
    }

    /// Starts erpgate with an HTTPS listener too (`body` needs a `[tls]` section).
    pub fn start_tls(body: &str) -> Erpgate {
        Self::launch(body, &[], true, &[])
    }

    /// Starts `erpgate run` with more arguments (e.g. `--upgrade`) on the listeners of
    /// `like`, without waiting for readiness.
    pub fn start_like(like: &Erpgate, body: &str, args: &[&str]) -> Erpgate {
        Self::spawn(
            like.http,
            like.https,
            like.admin,
            like.listen.clone(),
            body,
            &[],
            args,
        )
    }

    fn launch(body: &str, env: &[(&str, &str)], tls: bool, args: &[&str]) -> Erpgate {
        let http: SocketAddr = format!("127.0.0.1:{}", port()).parse().expect("addr");
        let https: SocketAddr = format!("127.0.0.1:{}", port()).parse().expect("addr");
        let admin: SocketAddr = format!("127.0.0.1:{}", port()).parse().expect("addr");
        let https_line = if tls {
            format!("https = [\"{https}\"]\n")
        } else {
            String::new()
        };
        let listen = format!("[listen]\nhttp = [\"{http}\"]\n{https_line}admin = \"{admin}\"\n\n");
        let mut g = Self::spawn(http, https, admin, listen, body, env, args);
        g.wait_ready();
        g
    }

    fn spawn(
        http: SocketAddr,
        https: SocketAddr,
        admin: SocketAddr,
        listen: String,
        body: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Erpgate {
        let config = format!("{listen}{body}");
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("erpgate.toml");
        std::fs::write(&config_path, config).expect("write config");
        let log_path = dir.path().join("erpgate.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            .env_remove("RUST_LOG")
            .env_remove("ERPGATE_ZONE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log clone"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn erpgate");
        Erpgate {
            child: Some(child),
            http,
            https,
            admin,
            listen,
            dir,
            config_path,
            log_path,
        }
    }

    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("erpgate exited during start-up ({status}):\n{}", self.log());
                }
            }
            let tls_up =
                !self.listen.contains("https = ") || TcpStream::connect(self.https).is_ok();
            if admin_get(self.admin, "/healthz").is_some_and(|(s, _)| s == 200)
                && TcpStream::connect(self.http).is_ok()
                && tls_up
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("erpgate not ready after 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything erpgate wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log has a line containing every needle; returns that line.
    pub fn wait_log_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
                return line.to_string();
            }
            if Instant::now() > deadline {
                panic!("no log line with {needles:?} in:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The whole config file for `body`: this erpgate's `[listen]` section, then `body`.
    pub fn config_text(&self, body: &str) -> String {
        format!("{}{body}", self.listen)
    }

    /// Replaces the config file the way editors do (a new file renamed over the old one),
    /// keeping the `[listen]` section; erpgate's file watch picks it up.
    pub fn write_config(&self, body: &str) {
        let config = self.config_text(body);
        let tmp = self.dir.path().join("erpgate.toml.new");
        std::fs::write(&tmp, config).expect("write config");
        std::fs::rename(&tmp, &self.config_path).expect("rename config");
    }

    /// How many times erpgate has taken a new config so far.
    pub fn reloads(&self) -> usize {
        self.log().matches("config reloaded").count()
    }

    /// Writes a new config and waits until erpgate has taken it.
    pub fn reload_with(&self, body: &str) {
        let before = self.reloads();
        self.write_config(body);
        self.wait_reloads_above(before);
    }

    /// Waits (10 s at most) until erpgate has logged more than `before` reloads.
    pub fn wait_reloads_above(&self, before: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.reloads() == before {
            if Instant::now() > deadline {
                panic!("config not reloaded within 10 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends a signal (`HUP`, `QUIT`, `TERM`) to the process.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} {}", self.pid());
    }

    /// Waits for the process to end by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }
}

impl Drop for Erpgate {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- erpgate log ({}) ---\n{}", self.http, self.log());
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A tiny GET to the admin listener: (status, body), or None if it does not answer.
pub fn admin_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Runs `erpgate check --config FILE` on `text`: (exit code, stdout, stderr).
pub fn check(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("erpgate.toml");
    std::fs::write(&path, text).expect("write config");
    check_file(&path)
}

pub fn check_file(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("check")
        .arg("--config")
        .arg(path)
        .env_remove("ERPGATE_ZONE")
        .output()
        .expect("run erpgate check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
