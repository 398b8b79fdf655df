//! The host's network configuration that `up --tun` changes beyond its own device: routes
//! to peers' subnets and to an exit node, the policy rules that keep Weft's own traffic on
//! the underlay, forwarding and masquerading for a node that serves a subnet or an exit.
//!
//! Only mechanism: which routes to install (which peer's subnets were accepted, whether an
//! exit node is in use) is the node's decision (`core/ROUTING.md`); this module applies it.
//!
//! Everything is done with the system's own tools, `ip` (iproute2) and `nft` (nftables,
//! given a JSON ruleset, never a hand-built rule string), rather than with netlink written
//! here: they are on every Linux host that has nftables, their commands are the same ones a
//! person would type to inspect or undo what Weft did, and each change is one command
//! whose inverse is recorded before anything else happens.
//!
//! Every change is recorded in a state file in the config directory (`netconf.json`)
//! *before* it is made, with the command that undoes it; [`NetConf::restore`] undoes
//! them in reverse order and removes the file. `up` restores on a clean exit; after a crash
//! (`kill -9`), the next `up` or `weft-peer down` finds the file and restores it.
//!
//! The layout (Tailscale's table 52 and NetBird's rules, see `core/ROUTING.md`):
//! - routing table [`TABLE`] holds the routes into the TUN device: accepted subnets, and
//!   a default route while an exit node is in use;
//! - rule [`PRIO_MARK`]: packets marked [`FWMARK`] (Weft's signaling and WebRTC sockets,
//!   `SO_MARK`) use the main table; rule [`PRIO_UNDERLAY`]: so do packets from the host's
//!   underlay addresses (programs bound to them; not for IPv6 with the kill switch, see
//!   `rules`);
//! - rule [`PRIO_MAIN`]: the main table, except its default route (`suppress_prefixlength
//!   0`), so the host's own LAN routes win over a peer's subnet; with an exit node this
//!   rule is there only with LAN access;
//! - rule [`PRIO_TABLE`]: everything else looks in [`TABLE`];
//! - with `--exit-node-required`, [`TABLE`] also holds an `unreachable` default route of
//!   the lowest preference: if the device goes (weft-peer crashed), nothing leaks to the
//!   underlay until `weft-peer down` or the next `up`.
//!
//! A node that serves a subnet or an exit gets an nftables table `inet weft` (removed
//! whole): TCP MSS clamped to the route's MTU on the forwarding path (the TUN's MTU is
//! 1280, a LAN's 1500), and masquerading of what it forwards from the TUN.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};
use serde_json::json;
use weft_core::node::{IpNet, RESOLVER_V4};

/// The routing table of routes into the TUN device ("WF").
pub const TABLE: u32 = 0x5746;
/// The firewall mark of Weft's own sockets that must stay on the underlay.
pub const FWMARK: u32 = 0x5746;
/// Rule priorities (lower is first).
pub const PRIO_MARK: u32 = 5210;
/// See the module docs.
pub const PRIO_UNDERLAY: u32 = 5220;
/// See the module docs.
pub const PRIO_MAIN: u32 = 5230;
/// See the module docs.
pub const PRIO_TABLE: u32 = 5250;
/// The state file's name in the config directory.
pub const STATE_FILE: &str = "netconf.json";
/// The nftables table of a node that forwards.
const NFT_TABLE: &str = "weft";
/// The firewall mark bit of packets from the TUN device, which a forwarding node
/// masquerades when iptables does it (nftables matches the input interface instead). Not
/// [`FWMARK`]'s bits: the policy rules match that mark exactly.
pub const MASQ_MARK: u32 = 0x0002_0000;
/// The host's resolver configuration.
const RESOLV_CONF: &str = "/etc/resolv.conf";
/// Where systemd-resolved's stub configuration is, when it runs.
const RESOLVED_STUB: &str = "/run/systemd/resolve/stub-resolv.conf";

/// Why the network configuration could not be changed or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetConfError {
    /// A tool is not installed.
    #[error("`{program}` is missing: install {package} (it is needed to {why})")]
    Missing {
        /// The program.
        program: &'static str,
        /// Its Debian package.
        package: &'static str,
        /// What it is needed for.
        why: &'static str,
    },
    /// Not root.
    #[error("cannot {what}: not permitted (run as root, or give weft-peer CAP_NET_ADMIN)")]
    NotPermitted {
        /// What was being done.
        what: String,
    },
    /// A command failed.
    #[error("cannot {what}: {message}")]
    Failed {
        /// What was being done.
        what: String,
        /// What the tool said.
        message: String,
    },
    /// Not done on this system: routes, rules, forwarding and the resolver are set up
    /// only on Linux so far (the device itself works on macOS and Windows).
    #[error("cannot {what}: the TUN bridge is not supported on this platform yet")]
    #[cfg_attr(target_os = "linux", allow(dead_code))]
    Unsupported {
        /// What was asked for.
        what: &'static str,
    },
    /// The state file cannot be written or read.
    #[error("cannot use the state file {path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// One change, as the way to undo it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "undo", rename_all = "snake_case")]
enum Undo {
    /// Run `ip ARGS`.
    Ip { args: Vec<String> },
    /// Write `value` back to the sysctl file `path`.
    Sysctl { path: String, value: String },
    /// Delete the nftables table.
    NftTable { family: String, name: String },
    /// Put `contents` back into the file `path` (the host's resolver configuration).
    File { path: String, contents: String },
    /// Run `resolvectl ARGS` (systemd-resolved's per-link settings).
    Resolvectl { args: Vec<String> },
    /// Run `PROGRAM ARGS` (`iptables` or `ip6tables`, where `nft` is missing).
    Iptables { program: String, args: Vec<String> },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct State {
    undo: Vec<Undo>,
}

/// What a forwarding node sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarding {
    /// Forward IPv4 (a v4 subnet, or an exit).
    pub ipv4: bool,
    /// Forward IPv6.
    pub ipv6: bool,
    /// Masquerade what comes from the TUN and leaves by another interface.
    pub masquerade: bool,
    /// ... except what goes to these (subnets whose hosts route the overlay back to us,
    /// `--snat-subnet-routes=false` on an exit node).
    pub keep_source_to: Vec<IpNet>,
}

/// The `postrouting` rules of a forwarding node: masquerade what comes from the TUN `tun`
/// and leaves by another interface, except to `keep` (one rule per family then, each with
/// the set of its family's prefixes left alone).
fn masquerade_rules(tun: &str, keep: &[IpNet]) -> Vec<serde_json::Value> {
    let rule = |extra: Option<serde_json::Value>| {
        let mut expr = vec![
            json!({"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": tun}}),
            json!({"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": tun}}),
        ];
        expr.extend(extra);
        expr.push(json!({"masquerade": null}));
        json!({"add": {"rule": {"family": "inet", "table": NFT_TABLE, "chain": "postrouting",
            "expr": expr}}})
    };
    if keep.is_empty() {
        return vec![rule(None)];
    }
    [("ip", "ipv4", 4), ("ip6", "ipv6", 6)]
        .into_iter()
        .map(|(protocol, nfproto, family_of)| {
            let set: Vec<serde_json::Value> = keep
                .iter()
                .filter(|n| family(n) == family_of)
                .map(|n| json!({"prefix": {"addr": n.network().to_string(), "len": n.prefix_len()}}))
                .collect();
            let only = if set.is_empty() {
                json!({"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": nfproto}})
            } else {
                json!({"match": {"op": "!=",
                    "left": {"payload": {"protocol": protocol, "field": "daddr"}},
                    "right": {"set": set}}})
            };
            rule(Some(only))
        })
        .collect()
}

/// How the exit node is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitUse {
    /// The kill switch: the default route into the TUN from the start, and an unreachable
    /// one behind it that outlives a crash.
    pub required: bool,
    /// Leave the host's LAN (the main table's non-default routes) reachable directly.
    pub lan_access: bool,
}

/// The host's network configuration as Weft changed it, recorded in the state file.
#[derive(Debug)]
pub struct NetConf {
    path: PathBuf,
    tun: String,
    state: State,
    /// The routes in [`TABLE`] now, by prefix.
    routes: BTreeSet<IpNet>,
    /// Families whose policy rules are in place.
    rules: BTreeSet<u8>,
    exit: Option<ExitUse>,
}

impl NetConf {
    /// Starts recording in `dir` for the device `tun`. A state file left by a crashed `up`
    /// is restored first (the caller made sure no `up` runs with this directory).
    pub fn open(dir: &Path, tun: &str) -> Result<Self, NetConfError> {
        let restored = restore(dir)?;
        if restored > 0 {
            tracing::warn!("undid {restored} network changes left by a weft-peer that crashed");
        }
        Ok(Self {
            path: dir.join(STATE_FILE),
            tun: tun.to_string(),
            state: State::default(),
            routes: BTreeSet::new(),
            rules: BTreeSet::new(),
            exit: None,
        })
    }

    /// Forwarding for a node that serves subnets or an exit: `ip_forward`, and the
    /// nftables table (MSS clamping, masquerading).
    pub fn forward(&mut self, forwarding: &Forwarding) -> Result<(), NetConfError> {
        let why = "forward packets for peers (--advertise-routes, --advertise-exit-node)";
        linux_only(why)?;
        let nft = which("nft", "nftables", why);
        if nft.is_err() && which_exists("iptables") {
            return self.forward_iptables(forwarding);
        }
        nft?;
        self.forwarding_sysctls(forwarding)?;
        let tun = self.tun.as_str();
        let clamp = |dir: &str| {
            json!({"rule": {"family": "inet", "table": NFT_TABLE, "chain": "forward", "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": dir}}, "right": tun}},
                {"match": {"op": "==",
                    "left": {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "rst"]]},
                    "right": "syn"}},
                {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}},
                            "value": {"rt": {"key": "mtu"}}}},
            ]}})
        };
        let mut commands = vec![
            json!({"add": {"table": {"family": "inet", "name": NFT_TABLE}}}),
            // Replaces a table of that name left by someone else: it is ours by name.
            json!({"delete": {"table": {"family": "inet", "name": NFT_TABLE}}}),
            json!({"add": {"table": {"family": "inet", "name": NFT_TABLE}}}),
            json!({"add": {"chain": {"family": "inet", "table": NFT_TABLE, "name": "forward",
                "type": "filter", "hook": "forward", "prio": -150, "policy": "accept"}}}),
            json!({"add": clamp("iifname")}),
            json!({"add": clamp("oifname")}),
        ];
        if forwarding.masquerade {
            commands.push(json!({"add": {"chain": {"family": "inet", "table": NFT_TABLE,
                "name": "postrouting", "type": "nat", "hook": "postrouting", "prio": 100,
                "policy": "accept"}}}));
            commands.extend(masquerade_rules(tun, &forwarding.keep_source_to));
        }
        self.record(Undo::NftTable { family: "inet".into(), name: NFT_TABLE.into() })?;
        let ruleset = json!({ "nftables": commands }).to_string();
        run("nft", &["-j", "-f", "-"], Some(&ruleset), "load the nftables table inet weft")
    }

    /// Uses an exit node: the policy rules now, and with the kill switch the default
    /// routes (the one into the TUN, and the unreachable one behind it). IPv6 is set up
    /// where the host has it.
    pub fn use_exit(&mut self, exit: ExitUse) -> Result<(), NetConfError> {
        linux_only("use an exit node (--exit-node)")?;
        self.exit = Some(exit);
        for family in [4, 6] {
            let result = self.rules(family).and_then(|()| {
                if !exit.required {
                    return Ok(());
                }
                let any = if family == 4 { "0.0.0.0/0" } else { "::/0" };
                // The highest metric: behind the device's route, and kept when the device
                // goes.
                let table = TABLE.to_string();
                let route = ["unreachable", any, "metric", "4294967295", "table", &table];
                self.ip_add(family, "route", &route, "add the kill switch's unreachable route")
            });
            match result {
                Err(e) if family == 6 => tracing::warn!("no IPv6 through the exit node: {e}"),
                r => r?,
            }
        }
        Ok(())
    }

    /// Makes [`TABLE`]'s routes into the TUN these: the accepted subnets, and the default
    /// routes if `exit` (an exit node is in use, or required).
    pub fn set_routes(&mut self, subnets: &[IpNet], exit: bool) -> Result<(), NetConfError> {
        let mut want: BTreeSet<IpNet> = subnets.iter().copied().collect();
        let required = self.exit.is_some_and(|e| e.required);
        if (exit && self.exit.is_some()) || required {
            for any in ["0.0.0.0/0", "::/0"] {
                if let Ok(net) = any.parse() {
                    want.insert(net);
                }
            }
        }
        if !want.is_empty() {
            linux_only("route peers' subnets into the TUN device (--accept-routes)")?;
        }
        let gone: Vec<IpNet> = self.routes.difference(&want).copied().collect();
        for net in gone {
            self.routes.remove(&net);
            let (family, net_s) = (family(&net), net.to_string());
            let table = TABLE.to_string();
            let args = ["route", "del", &net_s, "dev", &self.tun, "table", &table];
            if let Err(e) = run_ip(family, &args, "remove a route") {
                tracing::debug!("{e}");
            }
        }
        let new: Vec<IpNet> = want.difference(&self.routes).copied().collect();
        for net in new {
            let family = family(&net);
            if let Err(e) = self.rules(family) {
                // IPv6 may be off on this host: the IPv4 routes still work.
                tracing::warn!("{e}");
                continue;
            }
            let (net_s, table, tun) = (net.to_string(), TABLE.to_string(), self.tun.clone());
            let route = [net_s.as_str(), "dev", &tun, "table", &table];
            match self.ip_add(family, "route", &route, &format!("route {net_s} into {tun}")) {
                Ok(()) => {
                    self.routes.insert(net);
                }
                Err(e) => tracing::warn!("{e}"),
            }
        }
        Ok(())
    }

    /// The policy rules of one family, once.
    fn rules(&mut self, family: u8) -> Result<(), NetConfError> {
        if self.rules.contains(&family) {
            return Ok(());
        }
        let prio = |p: u32| p.to_string();
        let (mark, table) = (format!("{FWMARK:#x}"), TABLE.to_string());
        let mut rules: Vec<Vec<String>> = Vec::new();
        let words = |w: &[&str]| w.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        rules.push(words(&["priority", &prio(PRIO_MARK), "fwmark", &mark, "lookup", "main"]));
        // Also without an exit node: a peer's subnet may hold the address of a peer or of
        // the signaling server, and Weft's own packets must never enter the tunnel.
        let exit = self.exit;
        // Not for IPv6 behind the kill switch: when the route a connection first finds is
        // an error (the `unreachable` one, once the device is gone), Linux picks a source
        // address anyway and looks again with it (`ip6_dst_lookup_tail`), and a `from` rule
        // would then send that connection out by the underlay: a leak after a crash. Weft's
        // own sockets carry [`FWMARK`] (rule [`PRIO_MARK`]) and need no such rule.
        let kill_switch = exit.is_some_and(|e| e.required);
        let underlay = if family == 6 && kill_switch {
            Vec::new()
        } else {
            underlay_addresses(family, &self.tun)?
        };
        for addr in underlay {
            let from = addr.to_string();
            rules.push(words(&["priority", &prio(PRIO_UNDERLAY), "from", &from, "lookup", "main"]));
        }
        if exit.is_none_or(|e| e.lan_access) {
            rules.push(words(&[
                "priority",
                &prio(PRIO_MAIN),
                "lookup",
                "main",
                "suppress_prefixlength",
                "0",
            ]));
        }
        rules.push(words(&["priority", &prio(PRIO_TABLE), "lookup", &table]));
        for rule in rules {
            let rule: Vec<&str> = rule.iter().map(String::as_str).collect();
            self.ip_add(family, "rule", &rule, "add a routing policy rule")?;
        }
        self.rules.insert(family);
        Ok(())
    }

    /// Sets a sysctl, recording its old value.
    fn sysctl(&mut self, path: &str, value: &str) -> Result<(), NetConfError> {
        let old = std::fs::read_to_string(path).map_err(|e| state_error(path, e))?;
        let old = old.trim().to_string();
        if old == value {
            return Ok(());
        }
        self.record(Undo::Sysctl { path: path.into(), value: old })?;
        std::fs::write(path, value).map_err(|e| classify(&format!("set {path}"), &e.to_string()))
    }

    /// Records `ip -FAMILY OBJECT del ARGS`, then runs `ip -FAMILY OBJECT add ARGS`.
    fn ip_add(
        &mut self,
        family: u8,
        object: &str,
        args: &[&str],
        what: &str,
    ) -> Result<(), NetConfError> {
        let words = |verb: &str| {
            let mut all = vec![object.to_string(), verb.to_string()];
            all.extend(args.iter().map(|s| s.to_string()));
            all
        };
        let mut undo = vec![format!("-{family}")];
        undo.extend(words("del"));
        self.record(Undo::Ip { args: undo })?;
        let add = words("add");
        let add: Vec<&str> = add.iter().map(String::as_str).collect();
        run_ip(family, &add, what)
    }

    fn forwarding_sysctls(&mut self, forwarding: &Forwarding) -> Result<(), NetConfError> {
        if forwarding.ipv4 {
            self.sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        }
        let v6 = "/proc/sys/net/ipv6/conf/all/forwarding";
        // A host without IPv6 has no such file: it forwards IPv4 only.
        if forwarding.ipv6 && Path::new(v6).exists() {
            self.sysctl(v6, "1")?;
        }
        Ok(())
    }

    /// [`Self::forward`] on a host without `nft` but with `iptables` (and `ip6tables`
    /// for IPv6): the same MSS clamping and masquerading, in chains of Weft's own
    /// (`WEFT-FORWARD` in `mangle`, `WEFT-PREROUTING` in `mangle` marking what comes from
    /// the TUN with [`MASQ_MARK`], `WEFT-POSTROUTING` in `nat`), each jumped to from its
    /// hook and removed whole on undo. iptables cannot match the input interface after
    /// routing, hence the mark where nftables says `iifname`.
    fn forward_iptables(&mut self, forwarding: &Forwarding) -> Result<(), NetConfError> {
        self.forwarding_sysctls(forwarding)?;
        let tun = self.tun.clone();
        let mark = format!("{MASQ_MARK:#x}/{MASQ_MARK:#x}");
        for (program, fam, on) in
            [("iptables", 4, forwarding.ipv4), ("ip6tables", 6, forwarding.ipv6)]
        {
            if !on || (fam == 6 && !which_exists(program)) {
                continue;
            }
            let chain = self.ipt_chain(program, "mangle", "FORWARD")?;
            for dir in ["-i", "-o"] {
                let clamp = ["-p", "tcp", "--tcp-flags", "SYN,RST", "SYN"];
                let rule: Vec<&str> = [dir, &tun].into_iter().chain(clamp).collect();
                let target = ["-j", "TCPMSS", "--clamp-mss-to-pmtu"];
                ipt(program, "mangle", &chain, &[&rule[..], &target].concat())?;
            }
            if !forwarding.masquerade {
                continue;
            }
            let chain = self.ipt_chain(program, "mangle", "PREROUTING")?;
            let bit = format!("{MASQ_MARK:#x}");
            ipt(program, "mangle", &chain, &["-i", &tun, "-j", "MARK", "--or-mark", &bit])?;
            let chain = self.ipt_chain(program, "nat", "POSTROUTING")?;
            for keep in forwarding.keep_source_to.iter().filter(|n| family(n) == fam) {
                ipt(program, "nat", &chain, &["-d", &keep.to_string(), "-j", "RETURN"])?;
            }
            let masquerade = ["-m", "mark", "--mark", &mark, "!", "-o", &tun, "-j", "MASQUERADE"];
            ipt(program, "nat", &chain, &masquerade)?;
        }
        Ok(())
    }

    /// Makes Weft's chain for `hook` in `table` (emptied if it is there) and jumps to it
    /// first from `hook`, recording the undo (jump, flush, chain) first.
    fn ipt_chain(
        &mut self,
        program: &'static str,
        table: &str,
        hook: &str,
    ) -> Result<String, NetConfError> {
        let chain = format!("WEFT-{hook}");
        let undo = |args: &[&str]| Undo::Iptables {
            program: program.into(),
            args: ["-w", "-t", table].iter().chain(args).map(|a| a.to_string()).collect(),
        };
        self.record(undo(&["-X", &chain]))?;
        self.record(undo(&["-F", &chain]))?;
        self.record(undo(&["-D", hook, "-j", &chain]))?;
        let what = format!("make the {table} chain {chain}");
        match run(program, &["-w", "-t", table, "-N", &chain], None, &what) {
            Err(NetConfError::Failed { message, .. }) if message.contains("exists") => {
                run(program, &["-w", "-t", table, "-F", &chain], None, &what)?;
            }
            r => r?,
        }
        run(program, &["-w", "-t", table, "-I", hook, "1", "-j", &chain], None, &what)?;
        Ok(chain)
    }

    /// Points the host's resolver at the `.weft` resolver ([`RESOLVER_V4`]), returning
    /// the resolvers to forward other names to:
    /// - with systemd-resolved (`/etc/resolv.conf` is its stub), only `.weft` names go
    ///   there (`resolvectl dns/domain` on the TUN device, a routing-only domain `~weft`),
    ///   and nothing needs forwarding: the link's settings go with the device;
    /// - otherwise `/etc/resolv.conf` names only it (its other lines kept), the old
    ///   nameservers become the forwarders, and the old file comes back on exit (or, after
    ///   a crash, on the next `up` or `weft-peer down`). The file is rewritten in place,
    ///   never replaced: it may be a bind mount (`ip netns exec` makes one) or a symlink
    ///   whose target another program owns.
    pub fn use_resolver(&mut self) -> Result<Vec<SocketAddr>, NetConfError> {
        linux_only("point the host's resolver at the .weft resolver")?;
        let resolver = RESOLVER_V4.to_string();
        if uses_systemd_resolved() {
            self.record(Undo::Resolvectl { args: vec!["revert".into(), self.tun.clone()] })?;
            let tun = self.tun.clone();
            run("resolvectl", &["dns", &tun, &resolver], None, "set the device's resolver")?;
            run("resolvectl", &["domain", &tun, "~weft"], None, "route .weft names to it")?;
            return Ok(Vec::new());
        }
        let path = RESOLV_CONF;
        let old = std::fs::read_to_string(path).or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => Ok(String::new()),
            _ => Err(state_error(path, e)),
        })?;
        let (upstreams, rest) = split_resolv_conf(&old);
        self.record(Undo::File { path: path.into(), contents: old })?;
        let mut new = format!(
            "# weft-peer up: .weft names and the rest through its resolver; the previous \
             file comes back when it stops\nnameserver {resolver}\n"
        );
        new.push_str(&rest);
        std::fs::write(path, new)
            .map_err(|e| classify(&format!("write {path}"), &e.to_string()))?;
        Ok(upstreams)
    }

    fn record(&mut self, undo: Undo) -> Result<(), NetConfError> {
        self.state.undo.push(undo);
        save(&self.path, &self.state)
    }

    /// Undoes every change, in reverse order, and removes the state file.
    pub fn restore(mut self) -> Result<usize, NetConfError> {
        self.restore_now()
    }

    fn restore_now(&mut self) -> Result<usize, NetConfError> {
        if self.state.undo.is_empty() {
            return Ok(0);
        }
        self.state.undo.clear();
        let dir = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        restore(&dir)
    }
}

/// However `up` ends short of a crash (an error, a panic), what it changed is undone.
impl Drop for NetConf {
    fn drop(&mut self) {
        if let Err(e) = self.restore_now() {
            tracing::warn!("cannot undo every network change: {e}");
        }
    }
}

/// `Ok` on Linux; elsewhere the error that says `what` is not supported there yet.
#[cfg(target_os = "linux")]
#[allow(clippy::unnecessary_wraps)]
fn linux_only(_what: &'static str) -> Result<(), NetConfError> {
    Ok(())
}

/// `Ok` on Linux; elsewhere the error that says `what` is not supported there yet.
#[cfg(not(target_os = "linux"))]
fn linux_only(what: &'static str) -> Result<(), NetConfError> {
    Err(NetConfError::Unsupported { what })
}

fn family(net: &IpNet) -> u8 {
    match net {
        IpNet::V4(_) => 4,
        IpNet::V6(_) => 6,
    }
}

fn state_error(path: impl Into<PathBuf>, source: io::Error) -> NetConfError {
    NetConfError::State { path: path.into(), source }
}

fn save(path: &Path, state: &State) -> Result<(), NetConfError> {
    let text = serde_json::to_string_pretty(state).map_err(|e| state_error(path, e.into()))?;
    // Written aside and renamed: a crash leaves the old file or the new one, never half.
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(|e| state_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| state_error(path, e))
}

/// Undoes what the state file in `dir` records (if there is one), newest first, and
/// removes it: how many changes were undone. Undoing a change that is already gone (a
/// route that went with its device) is fine.
pub fn restore(dir: &Path) -> Result<usize, NetConfError> {
    let path = dir.join(STATE_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(state_error(&path, e)),
    };
    let state: State = serde_json::from_str(&text).map_err(|e| state_error(&path, e.into()))?;
    let mut failed = None;
    for undo in state.undo.iter().rev() {
        let result = match undo {
            Undo::Ip { args } => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                match run("ip", &args, None, "undo a route or rule") {
                    // Gone already (with the device, or never made).
                    Err(NetConfError::Failed { message, .. })
                        if message.contains("No such")
                            || message.contains("not exist")
                            || message.contains("Cannot find device") =>
                    {
                        Ok(())
                    }
                    r => r,
                }
            }
            Undo::Sysctl { path, value } | Undo::File { path, contents: value } => {
                std::fs::write(path, value)
                    .map_err(|e| classify(&format!("restore {path}"), &e.to_string()))
            }
            Undo::Iptables { program, args } => {
                let program = if program == "ip6tables" { "ip6tables" } else { "iptables" };
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                match run(program, &args, None, "undo a firewall rule") {
                    // Never made, or gone already.
                    Err(NetConfError::Failed { message, .. })
                        if message.contains("No chain")
                            || message.contains("does a matching rule exist")
                            || message.contains("not exist")
                            || message.contains("No such") =>
                    {
                        Ok(())
                    }
                    r => r,
                }
            }
            Undo::Resolvectl { args } => {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                match run("resolvectl", &args, None, "undo the device's resolver") {
                    // The link went with the device.
                    Err(NetConfError::Failed { message, .. })
                        if message.contains("No such") || message.contains("Failed to resolve") =>
                    {
                        Ok(())
                    }
                    r => r,
                }
            }
            Undo::NftTable { family, name } => {
                let delete = json!({"nftables": [
                    {"add": {"table": {"family": family, "name": name}}},
                    {"delete": {"table": {"family": family, "name": name}}},
                ]});
                run(
                    "nft",
                    &["-j", "-f", "-"],
                    Some(&delete.to_string()),
                    "delete the nftables table",
                )
            }
        };
        if let Err(e) = result {
            tracing::warn!("{e}");
            failed.get_or_insert(e);
        }
    }
    if let Some(e) = failed {
        return Err(e);
    }
    std::fs::remove_file(&path).map_err(|e| state_error(&path, e))?;
    Ok(state.undo.len())
}

/// Whether the host's resolver is systemd-resolved: `/etc/resolv.conf` leads to its files
/// and `resolvectl` is there to configure it.
fn uses_systemd_resolved() -> bool {
    let via_resolved = std::fs::canonicalize(RESOLV_CONF)
        .is_ok_and(|p| p.starts_with("/run/systemd/resolve"))
        && Path::new(RESOLVED_STUB).exists();
    via_resolved && which_exists("resolvectl")
}

/// `program -w -t table -A chain ARGS`.
fn ipt(program: &'static str, table: &str, chain: &str, args: &[&str]) -> Result<(), NetConfError> {
    let head = ["-w", "-t", table, "-A", chain];
    let all: Vec<&str> = head.iter().copied().chain(args.iter().copied()).collect();
    run(program, &all, None, &format!("add a rule to the {table} chain {chain}"))
}

fn which_exists(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// A `resolv.conf`'s nameservers (as resolver addresses, never our own) and its other
/// lines.
fn split_resolv_conf(text: &str) -> (Vec<SocketAddr>, String) {
    let mut servers = Vec::new();
    let mut rest = String::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            // A link-local IPv6 server's zone (`fe80::1%eth0`) is dropped: its socket
            // would need the interface's index, and such servers are rare.
            let addr = words.next().and_then(|w| w.split('%').next()?.parse::<IpAddr>().ok());
            if let Some(addr) = addr.filter(|a| *a != IpAddr::V4(RESOLVER_V4)) {
                servers.push(SocketAddr::new(addr, 53));
            }
        } else {
            rest.push_str(line);
            rest.push('\n');
        }
    }
    (servers, rest)
}

/// The host's addresses of `family` on every interface but loopback and the TUN.
fn underlay_addresses(family: u8, tun: &str) -> Result<Vec<IpAddr>, NetConfError> {
    let out =
        output("ip", &[&format!("-{family}"), "-j", "addr", "show"], "list the host's addresses")?;
    let links: serde_json::Value = serde_json::from_str(&out).map_err(|e| {
        NetConfError::Failed { what: "read `ip -j addr show`".into(), message: e.to_string() }
    })?;
    let mut addrs = Vec::new();
    for link in links.as_array().map(Vec::as_slice).unwrap_or_default() {
        if link["ifname"] == tun || link["ifname"] == "lo" {
            continue;
        }
        for info in link["addr_info"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if let Some(Ok(addr)) = info["local"].as_str().map(str::parse::<IpAddr>) {
                if !addr.is_loopback() {
                    addrs.push(addr);
                }
            }
        }
    }
    Ok(addrs)
}

fn run_ip(family: u8, args: &[&str], what: &str) -> Result<(), NetConfError> {
    let mut all = vec![format!("-{family}")];
    all.extend(args.iter().map(|s| s.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    run("ip", &all, None, what)
}

fn which(
    program: &'static str,
    package: &'static str,
    why: &'static str,
) -> Result<(), NetConfError> {
    let found = Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if found { Ok(()) } else { Err(NetConfError::Missing { program, package, why }) }
}

fn classify(what: &str, message: &str) -> NetConfError {
    if message.contains("Operation not permitted") || message.contains("Permission denied") {
        NetConfError::NotPermitted { what: what.into() }
    } else {
        NetConfError::Failed { what: what.into(), message: message.trim().into() }
    }
}

/// Runs `program args` with `stdin`; its stdout, or an error saying `what` failed.
fn output(program: &'static str, args: &[&str], what: &str) -> Result<String, NetConfError> {
    run_with(program, args, None, what)
}

fn run(
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
    what: &str,
) -> Result<(), NetConfError> {
    run_with(program, args, stdin, what).map(drop)
}

// These commands take milliseconds; the mesh task runs them inline so that they happen in
// the order the node asked for them.
fn run_with(
    program: &'static str,
    args: &[&str],
    stdin: Option<&str>,
    what: &str,
) -> Result<String, NetConfError> {
    use std::io::Write as _;
    let package = match program {
        "nft" => "nftables",
        "iptables" | "ip6tables" => "iptables",
        "resolvectl" => "systemd-resolved",
        _ => "iproute2",
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                NetConfError::Missing { program, package, why: "configure routes" }
            }
            _ => classify(what, &e.to_string()),
        })?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        input.write_all(text.as_bytes()).map_err(|e| classify(what, &e.to_string()))?;
    }
    let out = child.wait_with_output().map_err(|e| classify(what, &e.to_string()))?;
    if !out.status.success() {
        return Err(classify(what, &String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resolv_conf_gives_its_servers_and_keeps_its_other_lines() {
        let text = "# a comment\nnameserver 192.0.2.1\nsearch lan\nnameserver fe80::1%eth0\n\
                    nameserver 100.100.100.100\nnameserver bogus\noptions ndots:2\n";
        let (servers, rest) = split_resolv_conf(text);
        assert_eq!(
            servers,
            ["192.0.2.1:53".parse::<SocketAddr>().unwrap(), "[fe80::1]:53".parse().unwrap()]
        );
        assert_eq!(rest, "# a comment\nsearch lan\noptions ndots:2\n");
    }

    #[test]
    fn the_state_file_round_trips_and_errors_say_what_to_do() {
        let state = State {
            undo: vec![
                Undo::Ip { args: vec!["-4".into(), "rule".into(), "del".into()] },
                Undo::Sysctl { path: "/proc/sys/net/ipv4/ip_forward".into(), value: "0".into() },
                Undo::NftTable { family: "inet".into(), name: "weft".into() },
                Undo::File {
                    path: "/etc/resolv.conf".into(),
                    contents: "nameserver 1.1.1.1\n".into(),
                },
                Undo::Resolvectl { args: vec!["revert".into(), "weft0".into()] },
            ],
        };
        let text = serde_json::to_string(&state).unwrap_or_default();
        let back: State = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(back.undo, state.undo);
        let e = NetConfError::Unsupported { what: "use an exit node (--exit-node)" };
        assert_eq!(
            e.to_string(),
            "cannot use an exit node (--exit-node): the TUN bridge is not supported on this \
             platform yet"
        );
        let e = classify("add a rule", "RTNETLINK answers: Operation not permitted\n");
        assert_eq!(
            e.to_string(),
            "cannot add a rule: not permitted (run as root, or give weft-peer CAP_NET_ADMIN)"
        );
    }
}
