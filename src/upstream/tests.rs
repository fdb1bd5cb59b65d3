use super::*;

struct Server<'a> {
    id: u64,
    zone: &'a str,
    healthy: bool,
    drain: bool,
    open: usize,
}

impl Candidate for Server<'_> {
    fn id(&self) -> u64 {
        self.id
    }
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
        id: 0,
        zone,
        healthy,
        drain,
        open,
    }
}

/// Numbers the servers: each one's id is its index.
fn ids<const N: usize>(mut s: [Server<'_>; N]) -> [Server<'_>; N] {
    for (i, x) in s.iter_mut().enumerate() {
        x.id = i as u64;
    }
    s
}

fn sel(
    servers: &[Server<'_>],
    failover: &[String],
    balance: Balance,
    cursor: usize,
    tried: &[u64],
) -> Option<usize> {
    let how = Placement {
        own_zone: "a",
        failover,
        balance,
        cursor,
        sticky: Sticky::default(),
    };
    select(servers, &how, tried)
}

fn picks(servers: &[Server<'_>], failover: &[String], balance: Balance) -> Vec<usize> {
    (0..6)
        .filter_map(|cursor| sel(servers, failover, balance, cursor, &[]))
        .collect()
}

#[test]
fn own_zone_first_round_robin() {
    let s = ids([
        c("a", true, false, 0),
        c("b", true, false, 0),
        c("a", true, false, 0),
    ]);
    assert_eq!(picks(&s, &[], Balance::RoundRobin), vec![0, 2, 0, 2, 0, 2]);
}

#[test]
fn other_zones_when_own_zone_is_down_or_draining() {
    let s = ids([
        c("a", false, false, 0),
        c("b", true, false, 0),
        c("a", true, true, 0),
        c("c", true, false, 0),
    ]);
    let got = picks(&s, &[], Balance::RoundRobin);
    assert!(got.iter().all(|i| *i == 1 || *i == 3), "{got:?}");
    assert!(got.contains(&1) && got.contains(&3));
    // With failover_zones, in that order only.
    let order = vec!["c".to_string(), "b".to_string()];
    assert_eq!(picks(&s, &order, Balance::RoundRobin), vec![3; 6]);
    let only_d = vec!["d".to_string()];
    assert_eq!(sel(&s, &only_d, Balance::RoundRobin, 0, &[]), None);
}

#[test]
fn nothing_usable_is_none() {
    let s = ids([c("a", false, false, 0), c("b", true, true, 0)]);
    assert_eq!(sel(&s, &[], Balance::RoundRobin, 0, &[]), None);
    assert_eq!(sel(&[], &[], Balance::LeastConn, 0, &[]), None);
}

#[test]
fn tried_servers_are_skipped_then_other_zones() {
    let s = ids([
        c("a", true, false, 0),
        c("a", true, false, 0),
        c("b", true, false, 0),
    ]);
    assert_eq!(sel(&s, &[], Balance::RoundRobin, 0, &[0]), Some(1));
    assert_eq!(sel(&s, &[], Balance::RoundRobin, 0, &[0, 1]), Some(2));
    assert_eq!(sel(&s, &[], Balance::RoundRobin, 0, &[0, 1, 2]), None);
}

#[test]
fn least_connections_within_the_zone() {
    let s = ids([
        c("a", true, false, 5),
        c("a", true, false, 1),
        c("a", true, false, 3),
        c("b", true, false, 0),
    ]);
    assert_eq!(picks(&s, &[], Balance::LeastConn), vec![1; 6]);
    // Ties rotate with the cursor.
    let t = ids([c("a", true, false, 2), c("a", true, false, 2)]);
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

#[test]
fn a_session_key_sticks_to_one_server_and_moves_only_when_it_is_unusable() {
    let mut s = ids([
        c("a", true, false, 0),
        c("a", true, false, 0),
        c("a", true, false, 0),
        c("b", true, false, 0),
    ]);
    let place = |s: &[Server<'_>], key: u64, cursor: usize| {
        let how = Placement {
            own_zone: "a",
            failover: &[],
            balance: Balance::RoundRobin,
            cursor,
            sticky: Sticky {
                pin: None,
                key: Some(key),
            },
        };
        select(s, &how, &[])
    };
    // The same key, the same server, whatever the cursor; keys spread over the zone.
    let mut used = [0usize; 4];
    for key in 0..300u64 {
        let first = place(&s, key, 0).expect("a server");
        for cursor in 1..4 {
            assert_eq!(place(&s, key, cursor), Some(first));
        }
        used[first] += 1;
    }
    assert_eq!(
        used[3], 0,
        "the other zone is not used while this one is healthy"
    );
    assert!(used[..3].iter().all(|n| *n > 50), "{used:?}");
    // Server 1 gets sick: its keys move, nobody else's does.
    let before: Vec<_> = (0..300u64).map(|k| place(&s, k, 0)).collect();
    s[1].healthy = false;
    for (k, was) in before.iter().enumerate() {
        let now = place(&s, k as u64, 0);
        if *was == Some(1) {
            assert!(matches!(now, Some(0) | Some(2)), "{now:?}");
        } else {
            assert_eq!(now, *was);
        }
    }
}

#[test]
fn a_pinned_server_wins_in_any_zone_while_it_is_usable() {
    let mut s = ids([c("a", true, false, 0), c("b", true, false, 0)]);
    let how = Placement {
        own_zone: "a",
        failover: &[],
        balance: Balance::RoundRobin,
        cursor: 0,
        sticky: Sticky {
            pin: Some(1),
            key: Some(7),
        },
    };
    assert_eq!(select(&s, &how, &[]), Some(1));
    // Tried already, draining, or down: the pin yields.
    assert_eq!(select(&s, &how, &[1]), Some(0));
    s[1].drain = true;
    assert_eq!(select(&s, &how, &[]), Some(0));
    s[1].drain = false;
    s[1].healthy = false;
    assert_eq!(select(&s, &how, &[]), Some(0));
    // A pin naming no server of the pool is ignored.
    let stale = Placement {
        sticky: Sticky {
            pin: Some(99),
            key: None,
        },
        ..how
    };
    assert_eq!(select(&s, &stale, &[]), Some(0));
}
