//! `erpgate check` and start-up on bad configs: every error as file:line:col, exit 64.

mod support;

use support::erpgate::{check, check_file, BIN};

const GOOD: &str = r#"
[listen]
http = ["127.0.0.1:8080"]

[pools.web]
servers = [{ address = "127.0.0.1:8069" }]

[[class]]
name = "user"
pool = "web"
"#;

#[test]
fn a_good_config_passes() {
    let (code, out, err) = check(GOOD);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (1 classes, 1 pools)"), "{out}");
}

/// Each kind of error the issue names, in one file: all are reported, each with its place.
#[test]
fn every_kind_of_error_is_reported_with_line_and_column() {
    let bad = r#"[listen]
http = ["0.0.0.0:99999"]
admin = "127.0.0.1:9901"
colour = "blue"

[pools.web]
servers = [{ address = "127.0.0.1:8069" }]

[pools.empty]
servers = []

[[class]]
name = "api"
pool = "web"
match = [{ path_prefix = "/xmlrpc/" }]
timeouts = { connect = "five seconds" }

[[class]]
name = "api"
pool = "nowhere"
match = [{ path_prefix = "/xmlrpc/2/db" }]

[[class]]
name = "user"
pool = "web"
"#;
    let (code, out, err) = check(bad);
    assert_eq!(code, 64, "stdout: {out}\nstderr: {err}");
    let lines: Vec<&str> = err.lines().collect();
    let expect = [
        ":2:9: listen.http[0]: `0.0.0.0:99999` is not an IP:port address",
        ":4:1: listen.colour: unknown field `colour`",
        ":10:11: pools.empty.servers: a pool needs at least one server",
        ":16:24: class[0].timeouts.connect: `five seconds` is not a duration",
        ":18:1: class[1]: class `api` can never match: class `api` before it takes all its requests",
        ":19:8: class[1].name: duplicate class name `api`",
        ":20:8: class[1].pool: unknown pool `nowhere`",
    ];
    assert_eq!(lines.len(), expect.len(), "{err}");
    for (line, want) in lines.iter().zip(expect) {
        assert!(
            line.contains("erpgate.toml") && line.contains(want),
            "{line:?} should contain {want:?}\n{err}"
        );
    }
}

#[test]
fn bad_address_in_a_pool_and_a_bad_cidr() {
    let bad = GOOD.replace("127.0.0.1:8069", "odoo web:8069").replace(
        "[pools.web]",
        "[network]\ntrusted_proxies = [\"10.0.0.0/40\"]\n\n[pools.web]",
    );
    let (code, _, err) = check(&bad);
    assert_eq!(code, 64);
    assert!(
        err.contains(":6:20: network.trusted_proxies[0]: `10.0.0.0/40` is not an IP network"),
        "{err}"
    );
    assert!(
        err.contains(
            ":9:24: pools.web.servers[0].address: `odoo web:8069` is not a host:port address"
        ),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_config_with_exit_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, GOOD.replace("pool = \"web\"", "pool = \"gone\"")).expect("write");
    let out = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:10:8: class[0].pool: unknown pool `gone`"),
        "{err}"
    );
}

#[test]
fn a_missing_file_is_an_error_not_a_panic() {
    let (code, _, err) = check_file(std::path::Path::new("/nonexistent/erpgate.toml"));
    assert_eq!(code, 64);
    assert!(
        err.contains("/nonexistent/erpgate.toml:1:1: (file): cannot read"),
        "{err}"
    );
}

/// Every example config shipped in config/ passes `check` (files under `/etc/erpgate/` are
/// looked for in a stand-in directory; relative ones from the repository root).
#[test]
fn every_shipped_config_passes_check() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let etc = support::etc_erpgate();
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("config dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let text = std::fs::read_to_string(&path).expect("read");
            let text = text.replace("/etc/erpgate/", &format!("{}/", etc.path().display()));
            let copy = etc.path().join(path.file_name().expect("name"));
            std::fs::write(&copy, text).expect("write");
            let (code, out, err) = check_file(&copy);
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
            n += 1;
        }
    }
    assert!(n >= 5, "configs found in {}: {n}", dir.display());
}
