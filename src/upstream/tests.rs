use super::*;

struct Server<'a> {
    zone: &'a str,
    healthy: bool,
    drain: bool,
    open: usize,
}

impl Candidate for Server<'_> {
    fn zone(&self) -> &str {
        self.zone
    }
    fn healthy(&self) -> bool {
        self.healthy
    }
    fn drain(&self) -> bool {
        self.drain
    }
    fn open(&self) -> usize {
        self.open
    }
}

fn c(zone: &str, healthy: bool, drain: bool, open: usize) -> Server<'_> {
    Server {
        zone,
        healthy,
        drain,
        open,
    }
}

fn picks(servers: &[Server<'_>], failover: &[String], balance: Balance) -> Vec<usize> {
    (0..6)
        .filter_map(|cursor| select(servers, "a", failover, balance, cursor, &[]))
        .collect()
}

#[test]
fn own_zone_first_round_robin() {
    let s = [
        c("a", true, false, 0),
        c("b", true, false, 0),
        c("a", true, false, 0),
    ];
    assert_eq!(picks(&s, &[], Balance::RoundRobin), vec![0, 2, 0, 2, 0, 2]);
}

#[test]
fn other_zones_when_own_zone_is_down_or_draining() {
    let s = [
        c("a", false, false, 0),
        c("b", true, false, 0),
        c("a", true, true, 0),
        c("c", true, false, 0),
    ];
    let got = picks(&s, &[], Balance::RoundRobin);
    assert!(got.iter().all(|i| *i == 1 || *i == 3), "{got:?}");
    assert!(got.contains(&1) && got.contains(&3));
    // With failover_zones, in that order only.
    let order = vec!["c".to_string(), "b".to_string()];
    assert_eq!(picks(&s, &order, Balance::RoundRobin), vec![3; 6]);
    let only_d = vec!["d".to_string()];
    assert_eq!(select(&s, "a", &only_d, Balance::RoundRobin, 0, &[]), None);
}

#[test]
fn nothing_usable_is_none() {
    let s = [c("a", false, false, 0), c("b", true, true, 0)];
    assert_eq!(select(&s, "a", &[], Balance::RoundRobin, 0, &[]), None);
    assert_eq!(
        select::<Server>(&[], "a", &[], Balance::LeastConn, 0, &[]),
        None
    );
}

#[test]
fn tried_servers_are_skipped_then_other_zones() {
    let s = [
        c("a", true, false, 0),
        c("a", true, false, 0),
        c("b", true, false, 0),
    ];
    assert_eq!(select(&s, "a", &[], Balance::RoundRobin, 0, &[0]), Some(1));
    assert_eq!(
        select(&s, "a", &[], Balance::RoundRobin, 0, &[0, 1]),
        Some(2)
    );
    assert_eq!(
        select(&s, "a", &[], Balance::RoundRobin, 0, &[0, 1, 2]),
        None
    );
}

#[test]
fn least_connections_within_the_zone() {
    let s = [
        c("a", true, false, 5),
        c("a", true, false, 1),
        c("a", true, false, 3),
        c("b", true, false, 0),
    ];
    assert_eq!(picks(&s, &[], Balance::LeastConn), vec![1; 6]);
    // Ties rotate with the cursor.
    let t = [c("a", true, false, 2), c("a", true, false, 2)];
    assert_eq!(picks(&t, &[], Balance::LeastConn), vec![0, 1, 0, 1, 0, 1]);
}

#[test]
fn passive_down_and_active_recovery() {
    let check = HealthCheck::default();
    let s = ServerState::default();
    assert!(s.is_healthy());
    assert!(s.connect_failed());
    assert!(!s.connect_failed());
    assert!(!s.is_healthy());
    assert_eq!(s.probed(true, &check), None);
    assert_eq!(s.probed(true, &check), Some(true));
    assert!(s.is_healthy());
    // Down after `unhealthy_after` failed probes in a row; a success resets the count.
    assert_eq!(s.probed(false, &check), None);
    assert_eq!(s.probed(false, &check), None);
    assert_eq!(s.probed(true, &check), None);
    assert_eq!(s.probed(false, &check), None);
    assert_eq!(s.probed(false, &check), None);
    assert_eq!(s.probed(false, &check), Some(false));
    s.opened();
    s.opened();
    s.closed();
    assert_eq!(s.open(), 1);
    s.closed();
    s.closed();
    assert_eq!(s.open(), 0);
}
