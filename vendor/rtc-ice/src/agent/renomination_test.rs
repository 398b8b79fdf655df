//! Weft: renomination, in virtual time. Two agents on a simulated network, each with a host
//! and a relay candidate; the network drops everything between the two hosts at first, so
//! the agents select a pair through a relay. Then the direct path opens (a NAT's mapping
//! appears, a firewall's rule goes): both agents move to the host pair, with no restart.
//! Upstream they stayed on the relay for the whole session.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use sansio::Protocol;
use shared::{TaggedBytesMut, TransportContext};

use super::Agent;
use super::agent_config::AgentConfig;
use crate::candidate::candidate_host::CandidateHostConfig;
use crate::candidate::candidate_relay::CandidateRelayConfig;
use crate::candidate::{Candidate, CandidateConfig, CandidateType};

const CHECK_INTERVAL: Duration = Duration::from_millis(50);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("a test address")
}

fn host(a: SocketAddr) -> Candidate {
    CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: a.ip().to_string(),
            port: a.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .expect("a host candidate")
}

fn relay(a: SocketAddr, base: SocketAddr) -> Candidate {
    CandidateRelayConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: a.ip().to_string(),
            port: a.port(),
            component: 1,
            ..Default::default()
        },
        rel_addr: base.ip().to_string(),
        rel_port: base.port(),
        ..Default::default()
    }
    .new_candidate_relay()
    .expect("a relay candidate")
}

/// Weft's settings (`native-peer/src/rtc.rs`): checks every 50 ms, 40 of them; but a relay
/// pair nominatable as early as a pair through a NAT (Weft's relays wait 400 ms), so that
/// sessions start relayed and renominate as often as they can.
fn agent(now: Instant, controlling: bool) -> Agent {
    let config = AgentConfig {
        check_interval: CHECK_INTERVAL,
        max_binding_requests: Some(40),
        is_controlling: controlling,
        srflx_acceptance_min_wait: Some(Duration::from_millis(100)),
        prflx_acceptance_min_wait: Some(Duration::from_millis(100)),
        relay_acceptance_min_wait: Some(Duration::from_millis(100)),
        ..Default::default()
    };
    let crypto = crypto::default_provider().expect("a crypto provider");
    Agent::new(now, Arc::new(config), crypto).expect("an agent")
}

struct Net {
    now: Instant,
    agents: [Agent; 2],
    /// Each agent's addresses (host, relay).
    addrs: [[SocketAddr; 2]; 2],
    direct_open: bool,
}

impl Net {
    fn new() -> Self {
        let now = Instant::now();
        let addrs = [
            [addr("10.0.1.2:5000"), addr("198.51.100.1:40000")],
            [addr("10.0.2.2:5000"), addr("198.51.100.1:40001")],
        ];
        let mut agents = [agent(now, true), agent(now, false)];
        for (i, a) in agents.iter_mut().enumerate() {
            a.add_local_candidate(host(addrs[i][0])).expect("local host");
            a.add_local_candidate(relay(addrs[i][1], addrs[i][0])).expect("local relay");
            let other = addrs[1 - i];
            a.add_remote_candidate(host(other[0])).expect("remote host");
            a.add_remote_candidate(relay(other[1], other[0])).expect("remote relay");
        }
        let creds: Vec<(String, String)> = agents
            .iter()
            .map(|a| {
                let c = a.get_local_credentials();
                (c.ufrag.clone(), c.pwd.clone())
            })
            .collect();
        for (i, a) in agents.iter_mut().enumerate() {
            let (ufrag, pwd) = creds[1 - i].clone();
            a.start_connectivity_checks(now, i == 0, ufrag, pwd).expect("checks start");
        }
        Self { now, agents, addrs, direct_open: false }
    }

    /// Who owns `a`, and whether it is a host address.
    fn owner(&self, a: SocketAddr) -> Option<(usize, bool)> {
        (0..2).find_map(|i| self.addrs[i].iter().position(|x| *x == a).map(|k| (i, k == 0)))
    }

    /// Delivers what the agents sent (host to host only while the direct path is open),
    /// then advances time to the next timer.
    fn step(&mut self) {
        for _ in 0..16 {
            let mut moved = false;
            for i in 0..2 {
                while let Some(out) = self.agents[i].poll_write() {
                    let from = self.owner(out.transport.local_addr);
                    let to = self.owner(out.transport.peer_addr);
                    let (Some((_, from_host)), Some((j, to_host))) = (from, to) else { continue };
                    if from_host && to_host && !self.direct_open {
                        continue;
                    }
                    let msg = TaggedBytesMut {
                        now: self.now,
                        transport: TransportContext {
                            local_addr: out.transport.peer_addr,
                            peer_addr: out.transport.local_addr,
                            ..out.transport
                        },
                        message: BytesMut::from(&out.message[..]),
                    };
                    let _ = self.agents[j].handle_read(msg);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        let next = self
            .agents
            .iter_mut()
            .filter_map(|a| a.poll_timeout())
            .min()
            .unwrap_or(self.now + CHECK_INTERVAL)
            .max(self.now + Duration::from_millis(1));
        self.now = next;
        for a in &mut self.agents {
            let _ = a.handle_timeout(self.now);
            while a.poll_event().is_some() {}
        }
    }

    fn run_until(&mut self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let end = self.now + limit;
        while !done(self) {
            assert!(self.now < end, "{what}: not within {limit:?}");
            self.step();
        }
    }

    /// The types of agent `i`'s selected pair (local, remote).
    fn selected(&self, i: usize) -> Option<(CandidateType, CandidateType)> {
        let (l, r) = self.agents[i].get_selected_candidate_pair()?;
        Some((l.candidate_type(), r.candidate_type()))
    }
}

fn relayed(p: Option<(CandidateType, CandidateType)>) -> bool {
    p.is_some_and(|(l, r)| l == CandidateType::Relay || r == CandidateType::Relay)
}

#[test]
fn a_session_selected_through_a_relay_moves_to_a_direct_pair_that_answers_later() {
    let mut net = Net::new();
    net.run_until(Duration::from_secs(2), "a pair through the relay", |n| {
        relayed(n.selected(0)) && relayed(n.selected(1))
    });
    // Still within the checks' 2 s: the host pair has not failed yet.
    net.direct_open = true;
    net.run_until(Duration::from_millis(1500), "the direct pair on both sides", |n| {
        let host = Some((CandidateType::Host, CandidateType::Host));
        n.selected(0) == host && n.selected(1) == host
    });
}

#[test]
fn a_session_that_stays_relayed_keeps_its_pair_and_stops_checking() {
    let mut net = Net::new();
    net.run_until(Duration::from_secs(2), "a pair through the relay", |n| {
        relayed(n.selected(0)) && relayed(n.selected(1))
    });
    let chosen = [net.selected(0), net.selected(1)];
    // The host pair fails after its 40 checks; nothing changes, and once it has failed
    // only keepalives are sent.
    net.run_until(Duration::from_secs(5), "five seconds", |n| {
        n.now >= n.agents[0].start_time + Duration::from_secs(5)
    });
    assert_eq!([net.selected(0), net.selected(1)], chosen);
    let direct = |a: &Agent| {
        a.candidate_pairs.iter().any(|p| {
            a.local_candidates[p.local_index].candidate_type() == CandidateType::Host
                && a.remote_candidates[p.remote_index].candidate_type() == CandidateType::Host
                && p.state == crate::candidate::candidate_pair::CandidatePairState::Failed
        })
    };
    assert!(net.agents.iter().all(direct), "the host pair should have failed");
}

// Weft: the same, behind two NATs, as `cargo xtask bench relay` has it: each agent's own
// candidates are its host (a private address), a server reflexive one (its NAT's mapping of
// that host address) and a relayed one; the other side knows it by the last two. So an
// agent sends its checks from its host address, and the peer sees them come from the NAT's
// mapping: the two agents do not compute the same pair priorities.

fn srflx(a: SocketAddr, base: SocketAddr) -> Candidate {
    use crate::candidate::candidate_server_reflexive::CandidateServerReflexiveConfig;
    CandidateServerReflexiveConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: a.ip().to_string(),
            port: a.port(),
            component: 1,
            ..Default::default()
        },
        rel_addr: base.ip().to_string(),
        rel_port: base.port(),
        ..Default::default()
    }
    .new_candidate_server_reflexive()
    .expect("a srflx candidate")
}

struct NatNet {
    now: Instant,
    agents: [Agent; 2],
    /// Each agent's addresses (host, NAT mapping, relay).
    addrs: [[SocketAddr; 3]; 2],
    direct_open: bool,
    /// Whether each agent's relay is reachable yet (its allocation may come late).
    relay_open: [bool; 2],
    /// Drops one datagram in `loss` (0: none), by a fixed sequence.
    loss: u64,
    rng: u64,
    /// Non-STUN "data" each agent sent, by the pair it went on: (local, remote) address.
    log: Vec<String>,
}

impl NatNet {
    fn new() -> Self {
        Self::signaled(true)
    }

    /// With `relays_known` false, agent 0 (controlling) is not told agent 1's relay
    /// candidate: it meets that address first through agent 1's checks (peer reflexive).
    fn signaled(relays_known: bool) -> Self {
        let now = Instant::now();
        let addrs = [
            [addr("10.0.1.2:5000"), addr("203.0.113.1:6000"), addr("198.51.100.1:40000")],
            [addr("10.0.2.2:5000"), addr("203.0.113.2:6000"), addr("198.51.100.1:40001")],
        ];
        let mut agents = [agent(now, true), agent(now, false)];
        for (i, a) in agents.iter_mut().enumerate() {
            let [h, n, r] = addrs[i];
            a.add_local_candidate(host(h)).expect("local host");
            a.add_local_candidate(srflx(n, h)).expect("local srflx");
            a.add_local_candidate(relay(r, h)).expect("local relay");
            let [oh, on, or] = addrs[1 - i];
            a.add_remote_candidate(srflx(on, oh)).expect("remote srflx");
            if relays_known || i == 1 {
                a.add_remote_candidate(relay(or, oh)).expect("remote relay");
            }
        }
        let creds: Vec<(String, String)> = agents
            .iter()
            .map(|a| {
                let c = a.get_local_credentials();
                (c.ufrag.clone(), c.pwd.clone())
            })
            .collect();
        for (i, a) in agents.iter_mut().enumerate() {
            let (ufrag, pwd) = creds[1 - i].clone();
            a.start_connectivity_checks(now, i == 0, ufrag, pwd).expect("checks start");
        }
        Self {
            now,
            agents,
            addrs,
            direct_open: false,
            relay_open: [true; 2],
            loss: 0,
            rng: 1,
            log: vec![],
        }
    }

    /// Where a datagram from agent `i`'s `local` to `peer` arrives: (agent, its local
    /// address, the source it sees), or `None` if it is lost.
    fn route(
        &self,
        i: usize,
        local: SocketAddr,
        peer: SocketAddr,
    ) -> Option<(usize, SocketAddr, SocketAddr)> {
        let j = 1 - i;
        let [h, n, r] = self.addrs[i];
        let [oh, on, or] = self.addrs[j];
        // What leaves our side: from the NAT's mapping, or from our relay.
        let src = if local == h {
            n
        } else if local == r {
            if !self.relay_open[i] {
                return None;
            }
            r
        } else {
            return None;
        };
        if peer == on {
            // Into the other NAT, to its host: the hole punch (only from the relay before
            // the direct path opens).
            if src == n && !self.direct_open {
                return None;
            }
            Some((j, oh, src))
        } else if peer == or {
            if !self.relay_open[j] {
                return None;
            }
            Some((j, or, src))
        } else {
            None
        }
    }

    fn step(&mut self) {
        for _ in 0..16 {
            let mut moved = false;
            for i in 0..2 {
                while let Some(out) = self.agents[i].poll_write() {
                    let Some((j, to, from)) =
                        self.route(i, out.transport.local_addr, out.transport.peer_addr)
                    else {
                        continue;
                    };
                    self.rng = self
                        .rng
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if self.loss > 0 && (self.rng >> 33) % self.loss == 0 {
                        continue;
                    }
                    let msg = TaggedBytesMut {
                        now: self.now,
                        transport: TransportContext {
                            local_addr: to,
                            peer_addr: from,
                            ..out.transport
                        },
                        message: BytesMut::from(&out.message[..]),
                    };
                    let _ = self.agents[j].handle_read(msg);
                    moved = true;
                }
            }
            if !moved {
                break;
            }
        }
        let next = self
            .agents
            .iter_mut()
            .filter_map(|a| a.poll_timeout())
            .min()
            .unwrap_or(self.now + CHECK_INTERVAL)
            .max(self.now + Duration::from_millis(1))
            .min(self.now + Duration::from_millis(10));
        self.now = next;
        for a in &mut self.agents {
            let _ = a.handle_timeout(self.now);
            while a.poll_event().is_some() {}
        }
    }

    /// Where agent `i` sends data: its selected pair's (local base, remote) addresses.
    fn path(&self, i: usize) -> Option<(SocketAddr, SocketAddr)> {
        let (l, r) = self.agents[i].get_selected_candidate_pair()?;
        Some((l.base_addr(), r.addr()))
    }

    /// The relays data from agent `i` goes through now (agent 0's, agent 1's).
    fn via(&self, i: usize) -> Option<[bool; 2]> {
        let (l, r) = self.path(i)?;
        let mut v = [false; 2];
        v[i] = l == self.addrs[i][2];
        v[1 - i] = r == self.addrs[1 - i][2];
        Some(v)
    }

    /// Whether data agent `i` sends now reaches the other agent.
    fn delivers(&self, i: usize) -> bool {
        self.path(i).is_some_and(|(l, r)| self.route(i, l, r).is_some())
    }

    fn run_until(&mut self, limit: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let end = self.now + limit;
        while !done(self) {
            let line = format!(
                "{:>6} ms: 0 {:?} {:?} / 1 {:?} {:?}",
                (self.now - self.agents[0].start_time).as_millis(),
                self.path(0),
                self.agents[0].state(),
                self.path(1),
                self.agents[1].state()
            );
            if self.log.last().map(|l| &l[10..]) != Some(&line[10..]) {
                self.log.push(line);
            }
            assert!(self.now < end, "{what}: not within {limit:?}\n{}", self.log.join("\n"));
            self.step();
        }
    }
}

#[test]
fn behind_two_nats_both_sides_move_to_the_direct_pair_and_stay_connected() {
    let mut net = NatNet::new();
    net.run_until(Duration::from_secs(2), "a relayed pair on both sides", |n| {
        n.path(0).is_some() && n.path(1).is_some()
    });
    net.direct_open = true;
    let direct = |n: &NatNet, i: usize| n.path(i) == Some((n.addrs[i][0], n.addrs[1 - i][1]));
    net.run_until(Duration::from_secs(3), "the direct pair on both sides", |n| {
        direct(n, 0) && direct(n, 1)
    });
    // A minute more: both keep delivering, the agents stay connected.
    let end = net.now + Duration::from_secs(60);
    net.run_until(Duration::from_secs(61), "a minute", |n| {
        assert!(n.delivers(0) && n.delivers(1), "data lost\n{}", n.log.join("\n"));
        assert!(
            n.agents.iter().all(|a| a.state() == crate::state::ConnectionState::Connected),
            "not connected\n{}",
            n.log.join("\n")
        );
        n.now >= end
    });
}

#[test]
fn behind_two_nats_without_a_direct_path_both_sides_stay_on_working_relayed_pairs() {
    let mut net = NatNet::new();
    let end = net.now + Duration::from_secs(60);
    net.run_until(Duration::from_secs(61), "a minute", |n| {
        if n.now > n.agents[0].start_time + Duration::from_secs(1) {
            assert!(n.delivers(0) && n.delivers(1), "data lost\n{}", n.log.join("\n"));
            assert!(
                n.agents.iter().all(|a| a.state() == crate::state::ConnectionState::Connected),
                "not connected\n{}",
                n.log.join("\n")
            );
        }
        n.now >= end
    });
}

/// Both agents select a pair through the controlling agent's relay (the controlled one's
/// does not answer yet). Then the other relay answers: by the controlling agent's
/// candidates the pair through it ranks higher (its own host candidate), by the controlled
/// agent's lower (the controlling one's server reflexive candidate). Before the fix the
/// controlled agent declined the renomination but answered it, the controlling agent
/// selected the pair, and each sent through a different relay from then on.
#[test]
fn behind_two_nats_both_agents_send_through_the_same_relay() {
    let mut net = NatNet::new();
    net.relay_open[1] = false;
    net.run_until(Duration::from_secs(2), "a relayed pair on both sides", |n| {
        n.path(0).is_some() && n.path(1).is_some()
    });
    net.relay_open[1] = true;
    let end = net.now + Duration::from_secs(60);
    net.run_until(Duration::from_secs(61), "a minute", |n| {
        assert_eq!(n.via(0), n.via(1), "the agents use different paths\n{}", n.log.join("\n"));
        assert!(n.delivers(0) && n.delivers(1), "data lost\n{}", n.log.join("\n"));
        assert!(
            n.agents.iter().all(|a| a.state() == crate::state::ConnectionState::Connected),
            "not connected\n{}",
            n.log.join("\n")
        );
        n.now >= end
    });
}

/// Many runs with a third of all datagrams lost until a second after the direct path opens
/// (at a different time in each, while its checks still run), and sometimes one relay
/// answering late: data always reaches the other agent on whatever pair each selected, and
/// in the end both send on the direct pair.
#[test]
fn behind_two_nats_with_loss_both_agents_end_on_the_direct_pair() {
    let mut bad = vec![];
    for seed in 0..200u64 {
        let mut net = NatNet::new();
        net.rng = seed;
        net.loss = 3;
        net.relay_open[(seed % 2) as usize] = seed % 3 != 0;
        let open_at = Duration::from_millis(100 + (seed * 37) % 1500);
        let start = net.now;
        let mut lost = None;
        while net.now < start + Duration::from_secs(20) {
            if net.now >= start + open_at {
                net.direct_open = true;
                net.relay_open = [true; 2];
                if net.now >= start + open_at + Duration::from_secs(1) {
                    net.loss = 0;
                }
            }
            net.step();
            let connected = net.path(0).is_some() && net.path(1).is_some();
            if net.now > start + Duration::from_secs(3)
                && lost.is_none()
                && !(connected && net.delivers(0) && net.delivers(1))
            {
                lost = Some(format!(
                    "at {:?}: {:?} / {:?}",
                    net.now - start,
                    net.path(0),
                    net.path(1)
                ));
            }
        }
        let direct = (0..2).all(|i| net.path(i) == Some((net.addrs[i][0], net.addrs[1 - i][1])));
        if lost.is_some() || !direct {
            bad.push(format!(
                "seed {seed}: lost {lost:?}, end {:?} / {:?}",
                net.path(0),
                net.path(1)
            ));
        }
    }
    assert!(bad.is_empty(), "{} bad:\n{}", bad.len(), bad.join("\n"));
}

/// The peer's relay met through its checks before its candidate is signaled (TURN
/// allocations and their signaling come late; `nat.rs`'s endpoint-independent test once
/// ended relayed this way): the pair through it must not rank above the direct pair. Before
/// the fix the controlling agent ranked that address as peer reflexive (type preference
/// 110, above the NAT mapping's 100) and moved the direct session onto the relay for good.
/// Once the relay candidate is signaled it takes the peer-reflexive one's place.
#[test]
fn the_peers_relay_met_before_it_is_signaled_does_not_outrank_the_direct_pair() {
    let mut net = NatNet::signaled(false);
    net.direct_open = true;
    let direct = |n: &NatNet, i: usize| n.path(i) == Some((n.addrs[i][0], n.addrs[1 - i][1]));
    net.run_until(Duration::from_secs(2), "the direct pair on both sides", |n| {
        direct(n, 0) && direct(n, 1)
    });
    let relay_addr = net.addrs[1][2];
    let met = |n: &NatNet| {
        n.agents[0]
            .remote_candidates
            .iter()
            .filter(|c| c.addr() == relay_addr)
            .map(|c| c.candidate_type())
            .collect::<Vec<_>>()
    };
    assert_eq!(met(&net), [CandidateType::PeerReflexive], "its checks came through the relay");
    // Three seconds more: it stays direct (renomination would move it to a better pair).
    let end = net.now + Duration::from_secs(3);
    net.run_until(Duration::from_secs(4), "three seconds", |n| {
        assert!(direct(n, 0) && direct(n, 1), "moved\n{}", n.log.join("\n"));
        n.now >= end
    });
    let (oh, or) = (net.addrs[1][0], net.addrs[1][2]);
    net.agents[0].add_remote_candidate(relay(or, oh)).expect("remote relay, late");
    assert_eq!(met(&net), [CandidateType::Relay], "the signaled relay replaces it");
    let end = net.now + Duration::from_secs(3);
    net.run_until(Duration::from_secs(4), "three seconds more", |n| {
        assert!(direct(n, 0) && direct(n, 1), "moved\n{}", n.log.join("\n"));
        assert!(n.delivers(0) && n.delivers(1), "data lost\n{}", n.log.join("\n"));
        n.now >= end
    });
}
