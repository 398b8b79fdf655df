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

/// Weft's settings (`native-peer/src/rtc.rs`): checks every 50 ms, 40 of them, a relay
/// pair nominatable as early as a pair through a NAT.
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
