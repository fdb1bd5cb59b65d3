//! The packaging under deploy/ agrees with erpgate and its configs: the Kubernetes manifests
//! parse, their ports, probes, zones and mounts match the ConfigMap's config (which passes
//! `erpgate check` and is config/kubernetes.toml), the Dockerfile runs that config as a
//! non-root user, and the systemd unit runs config/vm.toml's path with one capability.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every YAML document of deploy/kubernetes/, by `kind/name`.
fn manifests() -> BTreeMap<String, Yaml> {
    let mut out = BTreeMap::new();
    let dir = root().join("deploy/kubernetes");
    for entry in std::fs::read_dir(&dir).expect("deploy/kubernetes") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let docs =
            YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for d in docs {
            let kind = d["kind"].as_str().expect("kind").to_string();
            let name = d["metadata"]["name"].as_str().expect("name").to_string();
            assert_eq!(
                d["metadata"]["namespace"].as_str(),
                Some("odoo"),
                "{kind}/{name}"
            );
            out.insert(format!("{kind}/{name}"), d);
        }
    }
    out
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], |v| v.as_slice())
}

/// The port a `listen` address of the config uses.
fn port_of(config: &toml::Table, key: &str) -> i64 {
    let v = &config["listen"][key];
    let addr = v
        .as_array()
        .and_then(|a| a.first())
        .unwrap_or(v)
        .as_str()
        .expect("address");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port")
}

#[test]
fn kubernetes_manifests_match_the_config_they_run() {
    let m = manifests();
    // The ConfigMap is config/kubernetes.toml, and erpgate accepts it.
    let cm = &m["ConfigMap/erpgate"];
    let text = cm["data"]["erpgate.toml"].as_str().expect("erpgate.toml");
    assert_eq!(
        text,
        read("config/kubernetes.toml"),
        "ConfigMap and config/kubernetes.toml differ"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("erpgate.toml");
    std::fs::write(&file, text).expect("write");
    let (code, out, err) = support::erpgate::check_file(&file);
    assert_eq!(code, 0, "{out}{err}");
    let config: toml::Table = text.parse().expect("toml");
    let (http, admin) = (port_of(&config, "http"), port_of(&config, "admin"));
    assert!(
        config["listen"]["admin"]
            .as_str()
            .is_some_and(|a| a.starts_with("0.0.0.0:")),
        "the kubelet probes the admin port from outside the pod"
    );
    let zones: BTreeSet<String> = config["pools"]
        .as_table()
        .expect("pools")
        .values()
        .flat_map(|p| p["servers"].as_array().expect("servers").iter())
        .map(|s| s["zone"].as_str().expect("zone").to_string())
        .collect();

    // One Deployment per zone of the pools, each telling erpgate its zone.
    let deployments: Vec<&Yaml> = m
        .iter()
        .filter(|(k, _)| k.starts_with("Deployment/"))
        .map(|(_, v)| v)
        .collect();
    let mut deployed_zones = BTreeSet::new();
    let mut pod_labels = Vec::new();
    let dockerfile = read("deploy/Dockerfile");
    for d in &deployments {
        let spec = &d["spec"]["template"]["spec"];
        let labels = &d["spec"]["template"]["metadata"]["labels"];
        assert_eq!(&d["spec"]["selector"]["matchLabels"], labels);
        pod_labels.push(labels.clone());
        let node_zone = list(
            &spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchExpressions"],
        )
        .iter()
        .find(|e| e["key"].as_str() == Some("topology.kubernetes.io/zone"))
        .and_then(|e| e["values"][0].as_str())
        .expect("pinned to a zone")
        .to_string();
        let c = &spec["containers"][0];
        let env_zone = list(&c["env"])
            .iter()
            .find(|e| e["name"].as_str() == Some("ERPGATE_ZONE"))
            .and_then(|e| e["value"].as_str())
            .expect("ERPGATE_ZONE");
        assert_eq!(env_zone, node_zone);
        assert!(
            zones.contains(env_zone),
            "{env_zone} is not a zone of the pools {zones:?}"
        );
        deployed_zones.insert(env_zone.to_string());
        // Ports and probes are the config's.
        let ports: BTreeMap<&str, i64> = list(&c["ports"])
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().expect("port name"),
                    p["containerPort"].as_i64().expect("port"),
                )
            })
            .collect();
        assert_eq!(ports.get("http"), Some(&http));
        assert_eq!(ports.get("admin"), Some(&admin));
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            assert_eq!(c[probe]["httpGet"]["path"].as_str(), Some(path), "{probe}");
            assert_eq!(
                c[probe]["httpGet"]["port"].as_str(),
                Some("admin"),
                "{probe}"
            );
        }
        let scrape = &d["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(
            scrape["prometheus.io/port"].as_str(),
            Some(admin.to_string().as_str())
        );
        assert_eq!(scrape["prometheus.io/path"].as_str(), Some("/metrics"));
        // The ConfigMap is mounted as a directory (a subPath mount would never update), where
        // the image's command reads it.
        let mount = list(&c["volumeMounts"])
            .iter()
            .find(|v| v["name"].as_str() == Some("config"))
            .expect("config mount");
        assert!(
            mount["subPath"].is_badvalue(),
            "subPath mounts do not reload"
        );
        let path = format!(
            "{}/erpgate.toml",
            mount["mountPath"].as_str().expect("mountPath")
        );
        assert!(
            dockerfile.contains(&format!("\"--config\", \"{path}\"")),
            "{path}"
        );
        let vol = list(&spec["volumes"])
            .iter()
            .find(|v| v["name"].as_str() == Some("config"))
            .expect("config volume");
        assert_eq!(vol["configMap"]["name"].as_str(), Some("erpgate"));
        // The audit log's directory is writable on a read-only root.
        let audit = config["audit"]["path"].as_str().expect("audit path");
        assert!(list(&c["volumeMounts"]).iter().any(|v| {
            v["mountPath"]
                .as_str()
                .is_some_and(|p| Path::new(audit).starts_with(p))
        }));
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"].as_bool(),
            Some(true)
        );
        assert_eq!(
            spec["securityContext"]["runAsNonRoot"].as_bool(),
            Some(true)
        );
        assert!(c["resources"]["requests"]["memory"].as_str().is_some());
        // erpgate finishes in-flight requests before the kubelet kills it.
        let grace = config["server"]["grace_period"].as_str().expect("grace");
        let grace = humantime::parse_duration(grace)
            .expect("duration")
            .as_secs() as i64;
        assert!(
            grace
                < spec["terminationGracePeriodSeconds"]
                    .as_i64()
                    .expect("tgps")
        );
    }
    assert_eq!(deployed_zones, zones, "a Deployment for every zone");

    // The Service sends public traffic to the HTTP port only.
    let svc = &m["Service/erpgate"];
    let targets: Vec<&str> = list(&svc["spec"]["ports"])
        .iter()
        .map(|p| p["targetPort"].as_str().expect("named targetPort"))
        .collect();
    assert_eq!(targets, vec!["http"]);
    let selector = svc["spec"]["selector"].as_hash().expect("selector");
    for labels in &pod_labels {
        let labels = labels.as_hash().expect("labels");
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    }
    // A PodDisruptionBudget keeps each zone's erpgate up.
    let pdbs: Vec<&Yaml> = m
        .iter()
        .filter(|(k, _)| k.starts_with("PodDisruptionBudget/"))
        .map(|(_, v)| v)
        .collect();
    for labels in &pod_labels {
        assert!(
            pdbs.iter()
                .any(|p| &p["spec"]["selector"]["matchLabels"] == labels),
            "no PodDisruptionBudget for {labels:?}"
        );
    }
}

#[test]
fn the_dockerfile_builds_a_small_non_root_image() {
    let d = read("deploy/Dockerfile");
    assert!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")) >= 2,
        "multi-stage"
    );
    assert!(
        d.contains("cmake"),
        "zlib-ng needs cmake in the build stage"
    );
    assert!(d.contains("--release") && d.contains("--locked"));
    assert!(d.contains("USER 65532"), "non-root");
    assert!(d.contains("distroless"), "small runtime image");
    let config: toml::Table = read("config/kubernetes.toml").parse().expect("toml");
    let expose = d
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .expect("EXPOSE");
    for key in ["http", "admin"] {
        let port = port_of(&config, key).to_string();
        assert!(
            expose.split_whitespace().any(|p| p == port),
            "{key} {port} not exposed"
        );
    }
    // What it copies exists, so the build works from a clean clone.
    for line in d
        .lines()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let parts: Vec<&str> = line.split_whitespace().collect();
        for src in &parts[1..parts.len() - 1] {
            assert!(root().join(src).exists(), "{line}");
        }
    }
}

#[test]
fn the_systemd_unit_runs_the_vm_config_with_one_capability() {
    let unit = read("deploy/systemd/erpgate.service");
    let mut keys: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with('[') {
            continue;
        }
        let (k, v) = line.split_once('=').unwrap_or_else(|| panic!("{line}"));
        keys.entry(k).or_default().push(v);
    }
    let one = |k: &str| -> &str {
        let v = keys.get(k).unwrap_or_else(|| panic!("no {k}"));
        assert_eq!(v.len(), 1, "{k}");
        v[0]
    };
    let start = one("ExecStart");
    let config = start
        .split_once("--config ")
        .map(|(_, p)| p.trim())
        .expect("--config");
    assert!(start.contains(" run "), "{start}");
    assert!(one("ExecStartPre").contains(&format!("check --config {config}")));
    let reload = &keys["ExecReload"];
    assert!(reload
        .iter()
        .any(|r| r.contains(&format!("check --config {config}"))));
    assert!(reload.iter().any(|r| r.contains("kill -HUP $MAINPID")));
    assert_eq!(one("User"), "erpgate");
    assert_eq!(one("AmbientCapabilities"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("CapabilityBoundingSet"), "CAP_NET_BIND_SERVICE");
    assert_eq!(one("NoNewPrivileges"), "yes");
    assert_eq!(one("ProtectSystem"), "strict");
    assert_eq!(one("Restart"), "on-failure");
    assert_eq!(one("KillSignal"), "SIGTERM");

    // The VM config is what the unit runs: its grace fits the stop timeout, its audit log is
    // in the unit's LogsDirectory, its upgrade socket in its RuntimeDirectory, and it passes
    // `check` on a machine laid out as it says.
    let text = read("config/vm.toml");
    let vm: toml::Table = text.parse().expect("toml");
    let grace = humantime::parse_duration(vm["server"]["grace_period"].as_str().expect("grace"))
        .expect("duration");
    let stop = humantime::parse_duration(one("TimeoutStopSec")).expect("TimeoutStopSec");
    assert!(grace < stop);
    let logs = format!("/var/log/{}/", one("LogsDirectory"));
    assert!(vm["audit"]["path"]
        .as_str()
        .is_some_and(|p| p.starts_with(&logs)));
    let run = format!("/run/{}/", one("RuntimeDirectory"));
    assert!(vm["server"]["upgrade_sock"]
        .as_str()
        .is_some_and(|p| p.starts_with(&run)));
    assert!(config.starts_with(one("WorkingDirectory")));
    let etc = support::etc_erpgate();
    let file = etc.path().join("erpgate.toml");
    std::fs::write(
        &file,
        text.replace("/etc/erpgate/", &format!("{}/", etc.path().display())),
    )
    .expect("write");
    let (code, out, err) = support::erpgate::check_file(&file);
    assert_eq!(code, 0, "{out}{err}");
}
