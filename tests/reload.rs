//! Live reload through the real binary: many edits, valid and invalid, under a request loop
//! and an open WebSocket; a Kubernetes ConfigMap-style symlink swap; SIGHUP; and the
//! zero-downtime binary upgrade.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::erpgate::Erpgate;
use support::*;

/// Two Odoo servers as two pools; `/probe/` goes to `probe_pool`, with a rate limit of
/// `rate` per second on the `probe` class (never reached by the test's pace).
fn config(a: &FakeOdoo, b: &FakeOdoo, probe_pool: &str, rate: u32) -> String {
    format!(
        r#"
[pools.a]
servers = [{{ address = "{}" }}]

[pools.b]
servers = [{{ address = "{}" }}]

[pools.longpoll]
servers = [{{ address = "{}" }}]
balance = "least_conn"

[[class]]
name = "longpoll"
match = {{ path_prefix = "/websocket" }}
pool = "longpoll"
timeouts = {{ read = "1h", idle = "1h" }}

[[class]]
name = "probe"
match = {{ path_prefix = "/probe/" }}
pool = "{probe_pool}"
rate_limit = {{ key = "global", rate = "{rate}/s", burst = {rate} }}

[[class]]
name = "user"
pool = "a"
"#,
        a.web_addr(),
        b.web_addr(),
        a.gevent_addr()
    )
}

/// Which fake a `/probe/` request reaches now.
fn probe_target(gw: &Erpgate, a: &FakeOdoo, b: &FakeOdoo, n: usize) -> &'static str {
    let path = format!("/probe/{n}");
    let r = get(gw.http, &path);
    assert_eq!(r.status, 200, "{}", r.body_str());
    let hit = |f: &FakeOdoo| f.requests().iter().any(|r| r.path == path);
    match (hit(a), hit(b)) {
        (true, false) => "a",
        (false, true) => "b",
        other => panic!("probe {n} reached {other:?}"),
    }
}

#[test]
fn many_edits_under_load_change_what_they_should_and_drop_nothing() {
    let a = FakeOdoo::start();
    let b = FakeOdoo::start();
    let gw = Erpgate::start(&config(&a, &b, "a", 1000));
    let mut ws = ws_connect(gw.http, "/websocket", Some("http://localhost")).expect("ws");
    ws.send_text("before");
    assert_eq!(ws.recv_text(Duration::from_secs(5)), "before");

    // A client loop for the whole test: every request must succeed.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let loops: Vec<_> = (0..2)
        .map(|t| {
            let (addr, stop, sent, failed) = (gw.http, stop.clone(), sent.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let r = get(addr, &format!("/odoo?t={t}&i={i}"));
                    sent.fetch_add(1, Ordering::Relaxed);
                    if r.status != 200 {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("request failed during reloads: {}", r.status);
                    }
                    i += 1;
                }
            })
        })
        .collect();

    let mut n = 0;
    let mut expect;
    for round in 0..8 {
        // A valid edit: the probe route flips pool, and its limit changes.
        let target = if round % 2 == 0 { "b" } else { "a" };
        let reloads = gw.reloads();
        gw.write_config(&config(&a, &b, target, 1000 + round));
        let since = Instant::now();
        loop {
            n += 1;
            if probe_target(&gw, &a, &b, n) == target {
                break;
            }
            assert!(
                since.elapsed() < Duration::from_secs(2),
                "edit {round} not in effect after 2 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // Its log line follows (lines are written by a thread of their own).
        gw.wait_reloads_above(reloads);
        expect = target;

        // An invalid edit: the old config keeps serving, the errors are logged.
        let broken = config(&a, &b, "nowhere", 5).replace("[pools.b]", "[pools.b\n");
        let errors_before = gw.log().matches("config reload failed").count();
        gw.write_config(&broken);
        let since = Instant::now();
        while gw.log().matches("config reload failed").count() == errors_before {
            assert!(
                since.elapsed() < Duration::from_secs(5),
                "invalid edit not seen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        for _ in 0..3 {
            n += 1;
            assert_eq!(
                probe_target(&gw, &a, &b, n),
                expect,
                "an invalid edit changed routing"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.join().expect("loop");
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(
        sent.load(Ordering::Relaxed) > 50,
        "{}",
        sent.load(Ordering::Relaxed)
    );
    // The socket opened before the first edit still works.
    ws.send_text("after");
    assert_eq!(ws.recv_text(Duration::from_secs(5)), "after");
    // Errors were logged with their place in the file.
    let log = gw.log();
    assert!(
        log.lines()
            .any(|l| l.contains("config reload:") && l.contains("erpgate.toml:")),
        "{log}"
    );
}

/// erpgate sending the probe class to `a`; the text of its config file, and of the same
/// config sending it to `b`.
fn started_on_a(a: &FakeOdoo, b: &FakeOdoo) -> (Erpgate, String, String) {
    let gw = Erpgate::start(&config(a, b, "a", 100));
    assert_eq!(probe_target(&gw, a, b, 1), "a");
    let full = std::fs::read_to_string(&gw.config_path).expect("config");
    let on_b = gw.config_text(&config(a, b, "b", 100));
    (gw, full, on_b)
}

#[test]
fn a_configmap_symlink_swap_and_sighup_both_reload() {
    let a = FakeOdoo::start();
    let b = FakeOdoo::start();
    let (gw, full, on_b) = started_on_a(&a, &b);

    // Kubernetes mounts a ConfigMap as erpgate.toml -> ..data/erpgate.toml, ..data -> a
    // timestamped directory, and updates it by swapping ..data atomically.
    let dir = gw.dir.path();
    let v1 = dir.join("..2026_11_26_v1");
    std::fs::create_dir(&v1).expect("dir");
    std::fs::write(v1.join("erpgate.toml"), &full).expect("write");
    std::os::unix::fs::symlink("..2026_11_26_v1", dir.join("..data")).expect("link");
    let tmp = dir.join("erpgate.toml.link");
    std::os::unix::fs::symlink("..data/erpgate.toml", &tmp).expect("link");
    std::fs::rename(&tmp, &gw.config_path).expect("rename");
    let v2 = dir.join("..2026_11_26_v2");
    std::fs::create_dir(&v2).expect("dir");
    std::fs::write(v2.join("erpgate.toml"), on_b).expect("write");
    let data_tmp = dir.join("..data_tmp");
    std::os::unix::fs::symlink("..2026_11_26_v2", &data_tmp).expect("link");
    std::fs::rename(&data_tmp, dir.join("..data")).expect("swap");
    let since = Instant::now();
    let mut n = 1;
    loop {
        n += 1;
        if probe_target(&gw, &a, &b, n) == "b" {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "ConfigMap update not seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGHUP reloads even when the file did not change.
    let before = gw.reloads();
    gw.signal("HUP");
    gw.wait_reloads_above(before);
    gw.wait_log_line(&["config reloaded", "SIGHUP"]);
    assert_eq!(get(gw.http, "/odoo").status, 200);
}

/// erpgate.toml -> erpgate-live.toml in the same directory: editing the target in place (an
/// event that names only the target) reloads; the log written beside them does not matter.
#[test]
fn a_config_linked_to_a_file_beside_it_reloads_when_that_file_is_edited() {
    let a = FakeOdoo::start();
    let b = FakeOdoo::start();
    let (gw, full, on_b) = started_on_a(&a, &b);
    let dir = gw.dir.path();
    let live = dir.join("erpgate-live.toml");
    std::fs::write(&live, &full).expect("write");
    let tmp = dir.join("erpgate.toml.link");
    std::os::unix::fs::symlink("erpgate-live.toml", &tmp).expect("link");
    std::fs::rename(&tmp, &gw.config_path).expect("rename");
    // A SIGHUP's reload settles after the rename's event, so what follows is a new event.
    let before = gw.reloads();
    gw.signal("HUP");
    gw.wait_reloads_above(before);
    let before = gw.reloads();
    std::fs::write(&live, on_b).expect("edit in place");
    gw.wait_reloads_above(before);
    assert_eq!(probe_target(&gw, &a, &b, 2), "b");
}

#[test]
fn a_binary_upgrade_hands_over_the_listeners_without_failing_a_request() {
    let a = FakeOdoo::start();
    let b = FakeOdoo::start();
    let sock = tempfile::tempdir().expect("dir");
    let body = format!(
        "[server]\ngrace_period = \"1s\"\nshutdown_timeout = \"1s\"\nupgrade_sock = \"{}\"\n{}",
        sock.path().join("upgrade.sock").display(),
        config(&a, &b, "a", 100)
    );
    let mut old = Erpgate::start(&body);
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let client = {
        let (addr, stop, failed) = (old.http, stop.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                if get(addr, "/odoo").status != 200 {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            n
        })
    };
    // The new binary waits for the old one's sockets; SIGQUIT makes the old one hand them
    // over, finish what it has in flight, and exit.
    let mut new = Erpgate::start_like(&old, &body, &["--upgrade"]);
    std::thread::sleep(Duration::from_millis(300));
    old.signal("QUIT");
    assert_eq!(
        old.wait_exit(Duration::from_secs(15)),
        Some(0),
        "{}",
        old.log()
    );
    new.wait_ready();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let sent = client.join().expect("client");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {sent}:\n{}",
        new.log()
    );
    assert!(sent > 10);
    assert_eq!(get(new.http, "/odoo").status, 200);
    assert!(
        new.wait_exit(Duration::from_millis(10)).is_none(),
        "the new one serves on"
    );
}
