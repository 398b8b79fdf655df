//! The command line: options, and turning them into a network, an identity and a WebRTC
//! configuration.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use weft_core::network::{Network, PassphraseParams};
use weft_core::node::{IpNet, PeerFilter, PeerRef, RoutePolicy, RoutingConfig};
use weft_core::signal::IceServer;
use zeroize::Zeroizing;

use crate::rtc::{RtcConfig, Tuning};

/// Weft native peer: joins an encrypted Weft overlay from a terminal.
///
/// Join by invite (the 43-character invite or a link with `#invite=…`, from
/// `--invite-file PATH`, `-` for standard input, or the `WEFT_INVITE` environment
/// variable), or by network name and passphrase (`--network NAME` with
/// `--passphrase-file PATH` or the `WEFT_PASSPHRASE` environment variable).
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// The signaling server's WebSocket URL. Several (repeated, or separated by commas),
    /// say the processes of one cluster: the first is used, and each time a connection is
    /// lost or cannot be made, the next.
    #[arg(
        long,
        env = "WEFT_SERVER",
        default_value = "ws://127.0.0.1:8080/ws",
        global = true,
        value_delimiter = ',',
        num_args = 1
    )]
    pub server: Vec<String>,

    /// The network's name (with a passphrase).
    #[arg(long, global = true, value_name = "NAME")]
    pub network: Option<String>,

    /// A file holding the network's passphrase (else `WEFT_PASSPHRASE`).
    #[arg(long, global = true, value_name = "PATH")]
    pub passphrase_file: Option<PathBuf>,

    /// An invite link, or the invite itself. Other users of this machine can read it (in
    /// `ps`) and it stays in the shell's history: prefer `--invite-file` or `WEFT_INVITE`.
    /// An invite is base64url, so one in 64 starts with `-`: it is still a value, not a flag.
    #[arg(
        long,
        global = true,
        value_name = "LINK",
        conflicts_with = "invite_file",
        allow_hyphen_values = true
    )]
    pub invite: Option<String>,

    /// A file holding the invite link (or the invite), `-` for standard input (else
    /// `WEFT_INVITE`).
    #[arg(long, global = true, value_name = "PATH")]
    pub invite_file: Option<PathBuf>,

    /// Our display name (default: "Native" and 4 hex digits of our key).
    #[arg(long, global = true)]
    pub name: Option<String>,

    /// Where the identity key and trust stores live (default: the user's config dir).
    #[arg(long, env = "WEFT_CONFIG_DIR", global = true, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,

    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// A STUN or TURN server (`stun:host:port`, `turn:host:port`); repeatable.
    #[arg(long = "ice-server", global = true, value_name = "URL")]
    pub ice_servers: Vec<String>,

    /// Username for the TURN servers.
    #[arg(long, global = true, requires = "ice_credential")]
    pub ice_username: Option<String>,

    /// Credential for the TURN servers.
    #[arg(long, global = true, requires = "ice_username")]
    pub ice_credential: Option<String>,

    /// Also trust the CA certificate(s) in this PEM file (a private CA, or a server's
    /// self-signed certificate) for the signaling server (wss://) and TURN over TLS
    /// (turns:), besides the usual root certificates.
    #[arg(long, env = "WEFT_CA_CERT", global = true, value_name = "PATH",
          value_parser = crate::tls::parse_extra_trust)]
    pub ca_cert: Option<crate::tls::ExtraTrust>,

    /// Use only relayed (TURN) paths.
    #[arg(long, global = true)]
    pub relay_only: bool,

    /// The local address for WebRTC (default: every non-loopback interface).
    #[arg(long, global = true, value_name = "IP")]
    pub bind: Option<IpAddr>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// What `trust` does.
#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Mark PEER's key verified: its safety code must be the one PEER's owner sees. Give
    /// that code with --code, or confirm it when asked (in a terminal).
    Verify {
        /// The peer's display name or peer id.
        peer: String,
        /// The safety code PEER's owner sees (spaces optional).
        #[arg(long)]
        code: Option<String>,
        /// Seconds to wait for the peer at most.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Accept PEER's changed key (its name was pinned to another one, say after a
    /// reinstall); with --code, also verify it.
    Accept {
        /// The peer's display name or peer id.
        peer: String,
        /// The safety code PEER's owner sees: verify the new key too.
        #[arg(long)]
        code: Option<String>,
        /// Seconds to wait for the peer at most.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

/// `up`'s options.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Create a TUN device with our overlay addresses (IPv4 in 100.64.0.0/10, IPv6 in the
    /// network's ULA /48), so that programs reach the other members by IP. Needs root or
    /// CAP_NET_ADMIN; the device goes when weft-peer exits.
    #[arg(long)]
    pub tun: bool,
    /// The TUN device's name.
    #[arg(long, value_name = "NAME", default_value = crate::tun::DEFAULT_NAME, requires = "tun")]
    pub tun_name: String,
    /// The TUN device's MTU (1280 lets every sealed packet travel as one SCTP packet).
    #[arg(
        long,
        default_value_t = crate::tun::DEFAULT_MTU,
        requires = "tun",
        value_parser = clap::value_parser!(u16).range(
            i64::from(crate::tun::MIN_MTU)..=i64::from(crate::tun::MAX_MTU)
        ),
    )]
    pub mtu: u16,
    /// Offer the subnets behind this host to peers (`CIDR,...`): the host forwards what
    /// allowed peers send to them, masquerading it as its own (nftables table `inet weft`,
    /// removed on exit).
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',', requires = "tun")]
    pub advertise_routes: Vec<IpNet>,
    /// Masquerade what peers send to the advertised subnets as this host's own address
    /// (the LAN's hosts need no route back to the overlay). With `false` they see the
    /// peers' overlay addresses, and must route 100.64.0.0/10 (and the network's IPv6
    /// /48) back through this host.
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        action = clap::ArgAction::Set,
        requires = "advertise_routes"
    )]
    pub snat_subnet_routes: bool,
    /// Install the subnet routes peers offer: from peers whose key you verified, and with
    /// `=PEER,...` also from those (a pinned name, safety code or key fingerprint).
    #[arg(
        long,
        value_name = "PEER,...",
        num_args = 0..,
        require_equals = true,
        value_delimiter = ',',
        requires = "tun"
    )]
    pub accept_routes: Option<Vec<String>>,
    /// Offer to be an exit node: allowed peers may send all their traffic through this
    /// host, which forwards and masquerades it.
    #[arg(long, requires = "tun")]
    pub advertise_exit_node: bool,
    /// Who may use this host's subnets and exit node, and reach its own overlay address:
    /// peers whose key you verified and these (a pinned name, safety code or key
    /// fingerprint). Without it, verified peers use subnets and exit and every member
    /// reaches the address.
    #[arg(long, value_name = "PEER,...", value_delimiter = ',')]
    pub allow: Vec<String>,
    /// Send all traffic through PEER (a pinned name, safety code or key fingerprint), an
    /// exit node; Weft's own connections stay on the underlay.
    #[arg(long, value_name = "PEER", requires = "tun")]
    pub exit_node: Option<String>,
    /// Kill switch: traffic never leaves by the underlay while an exit node is chosen,
    /// even while it is unreachable or after weft-peer crashed (until `weft-peer down`).
    #[arg(long, requires = "exit_node")]
    pub exit_node_required: bool,
    /// Leave the host's resolver alone. Without it, `up --tun` points the host at Weft's
    /// resolver (100.100.100.100): members' names resolve as `NAME.weft` (and by safety
    /// code, `12345-67890-....weft`), other names go to the host's own resolvers (through
    /// the exit node, when one is used). With systemd-resolved only `.weft` goes there;
    /// otherwise `/etc/resolv.conf` is rewritten, and restored when weft-peer stops (after
    /// a crash: by the next `up` or `weft-peer down`).
    #[arg(long, requires = "tun")]
    pub no_dns: bool,
    /// Reach this host's own LAN directly while using an exit node.
    #[arg(long, requires = "exit_node")]
    pub exit_node_allow_lan_access: bool,
    /// Keep IP packets on the WebRTC data channel. Without it, between two native peers
    /// on a direct (not relayed) path they go as plain UDP datagrams on the path ICE
    /// chose, once a probe there was answered, and back on the data channel whenever
    /// that stops answering (`status` says which).
    #[arg(long, requires = "tun")]
    pub no_fast_path: bool,
}

impl UpArgs {
    /// The TUN device asked for, if any.
    pub fn tun_config(&self) -> Option<crate::tun::TunConfig> {
        self.tun.then(|| crate::tun::TunConfig { name: self.tun_name.clone(), mtu: self.mtu })
    }

    /// What the node advertises and its policy, from the options (the node applies it).
    pub fn routing(&self) -> anyhow::Result<RoutingConfig> {
        let refs = |words: &[String]| -> anyhow::Result<Vec<PeerRef>> {
            words.iter().map(|w| PeerRef::new(w).with_context(|| format!("{w:?}"))).collect()
        };
        let subnets_from = match &self.accept_routes {
            Some(named) => PeerFilter { named: refs(named)?, ..PeerFilter::verified() },
            None => PeerFilter::nobody(),
        };
        let exit_from = match &self.exit_node {
            Some(peer) => {
                PeerFilter { named: refs(std::slice::from_ref(peer))?, ..PeerFilter::nobody() }
            }
            None => PeerFilter::nobody(),
        };
        let serve_to = PeerFilter { named: refs(&self.allow)?, ..PeerFilter::verified() };
        let own_to = if self.allow.is_empty() { PeerFilter::members() } else { serve_to.clone() };
        Ok(RoutingConfig {
            tun: self.tun,
            advertise_subnets: self.advertise_routes.iter().map(IpNet::trunc).collect(),
            advertise_exit: self.advertise_exit_node,
            policy: RoutePolicy { subnets_from, exit_from, serve_to, own_to },
            fast_path: !self.no_fast_path,
        })
    }

    /// Whether this host forwards for peers, and what.
    pub fn forwarding(&self) -> Option<crate::netconf::Forwarding> {
        let v4 = self.advertise_routes.iter().any(|n| matches!(n, IpNet::V4(_)));
        let v6 = self.advertise_routes.iter().any(|n| matches!(n, IpNet::V6(_)));
        // An exit node always masquerades what leaves for the internet; its subnets keep
        // the peers' addresses only if asked.
        let keep_source_to = match (self.snat_subnet_routes, self.advertise_exit_node) {
            (false, true) => self.advertise_routes.iter().map(IpNet::trunc).collect(),
            _ => Vec::new(),
        };
        (self.advertise_exit_node || v4 || v6).then_some(crate::netconf::Forwarding {
            ipv4: self.advertise_exit_node || v4,
            ipv6: self.advertise_exit_node || v6,
            masquerade: self.snat_subnet_routes || self.advertise_exit_node,
            keep_source_to,
        })
    }

    /// How an exit node is used, if one is chosen.
    pub fn exit_use(&self) -> Option<crate::netconf::ExitUse> {
        self.exit_node.as_ref().map(|_| crate::netconf::ExitUse {
            required: self.exit_node_required,
            lan_access: self.exit_node_allow_lan_access,
        })
    }
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Join and stay, printing events (peers, messages) until Ctrl-C; with --tun, also
    /// reach the other members by IP through a TUN device.
    Up(UpArgs),
    /// Join, wait for sessions, print the peers (fingerprint, direct/relayed, RTT), exit.
    Peers {
        /// Seconds to wait for sessions at most.
        #[arg(long, default_value_t = 5)]
        wait: u64,
    },
    /// As `peers`, with our own identity and the signaling state.
    Status {
        /// Seconds to wait for sessions at most.
        #[arg(long, default_value_t = 5)]
        wait: u64,
    },
    /// Keys and trust: with no action, join, wait for sessions and list every peer's
    /// safety code and trust (new, known, verified, changed) and the names pinned in this
    /// network's trust store. Compare a peer's safety code with the one its owner sees
    /// (in person or on a call), then `trust verify`.
    Trust {
        /// What to do (omit to list).
        #[command(subcommand)]
        action: Option<TrustCommand>,
        /// Seconds to wait for sessions at most (listing).
        #[arg(long, default_value_t = 5)]
        wait: u64,
    },
    /// Join, wait for PEER's encrypted session, send TEXT, make sure it arrived, exit.
    Msg {
        /// The peer's display name or peer id.
        peer: String,
        /// The message.
        text: String,
        /// Seconds to wait for the peer at most.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Join, offer files and folders (recursively) to peers, serve them until every
    /// recipient has verified every file, exit. Fails if a recipient declines, cancels or
    /// does not connect in time.
    Send {
        /// Files or folders (a folder's files keep their paths, under the folder's name).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<PathBuf>,
        /// A recipient's display name or peer id; repeatable. Default: every peer
        /// connected once sessions have settled.
        #[arg(long = "to", value_name = "PEER")]
        to: Vec<String>,
        /// Seconds to wait for the recipients to connect (or to come back) at most.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Join and store files offered by peers in DIR (resuming unfinished downloads saved
    /// there), until Ctrl-C.
    Receive {
        /// Where files go (partial downloads wait in DIR/.weft-partial).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Whose offers to accept: a display name (the key pinned for it), peer id, key
        /// fingerprint or safety code, or `any` (any member whose key did not change);
        /// repeatable. Other offers are declined. Without it, each offer is asked about on
        /// the terminal, and declined where there is none.
        #[arg(long = "accept-from", value_name = "PEER|any")]
        accept_from: Vec<String>,
        /// Exit once the first accepted offer is complete.
        #[arg(long)]
        once: bool,
        /// Most bytes that downloads taken from one peer by --accept-from may still have
        /// to write: its further offers are refused (and it is told why) until they
        /// finish. A size in bytes, or with K, M, G or T (binary: 4G is 4 GiB). Offers a
        /// person accepts at the terminal are not counted against it. [default: 4G]
        #[arg(long = "max-pending", value_name = "SIZE", value_parser = parse_size)]
        max_pending: Option<u64>,
        /// The same over all peers, and never more than the download disk's free space
        /// less 1 GiB. [default: 16G]
        #[arg(long = "max-pending-total", value_name = "SIZE", value_parser = parse_size)]
        max_pending_total: Option<u64>,
    },
    /// Benchmark baseline (hidden): a plain webrtc-rs data channel to PEER, signaled over
    /// the encrypted session's messages; `--bytes N` sends N bytes, else receives.
    #[command(hide = true)]
    BenchRaw {
        /// The other peer's display name.
        #[arg(long, value_name = "PEER")]
        peer: String,
        /// Send this many bytes (the sender); without it, receive.
        #[arg(long)]
        bytes: Option<u64>,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Build every connection with webrtc-rs's defaults instead of Weft's tuning.
        #[arg(long)]
        untuned: bool,
    },
    /// ICMP echo to PEER's overlay address through the TUN device of the `up --tun`
    /// running with this config dir (which tells where PEER is); prints each round trip.
    Ping {
        /// The peer's display name, peer id or key fingerprint (8 or more hex digits), or
        /// an overlay address.
        peer: String,
        /// How many echo requests (one every 0.5 s).
        #[arg(long, short = 'c', default_value_t = 4)]
        count: u16,
        /// ICMP data bytes in each (56 as `ping`; 1252 fills an IPv4 packet of MTU 1280).
        #[arg(long, short = 's', default_value_t = 56, value_parser = clap::value_parser!(u16).range(0..=9000))]
        size: u16,
        /// Ping its IPv6 address.
        #[arg(short = '6', long)]
        ipv6: bool,
    },
    /// Print a new invite (a new network) and exit.
    Invite,
    /// Undo the network changes (routes, rules, firewall, forwarding) of an `up` with
    /// this config dir: ask a running one to leave, or clean up after one that crashed.
    Down,
}

/// The invite in `link`: the part after `invite=` if there is one, else all of it.
pub fn invite_of(link: &str) -> &str {
    let link = link.trim();
    match link.find("invite=") {
        Some(i) => {
            let rest = &link[i + "invite=".len()..];
            rest.split(['&', '#', '/', '?']).next().unwrap_or(rest)
        }
        None => link,
    }
}

impl Cli {
    /// The network from `--invite`, or `--network` and the passphrase (Argon2id: takes a
    /// moment, so it runs off the async threads).
    pub async fn network(&self) -> anyhow::Result<Network> {
        if let Some(link) = self.invite_text()? {
            return Network::from_invite(invite_of(&link)).context("bad invite");
        }
        let passphrase = match &self.passphrase_file {
            Some(path) => {
                let text = Zeroizing::new(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                );
                Zeroizing::new(text.trim_end_matches(['\n', '\r']).to_string())
            }
            None => match std::env::var("WEFT_PASSPHRASE") {
                Ok(p) => Zeroizing::new(p),
                Err(_) => bail!(
                    "to join, give --invite-file PATH (or WEFT_INVITE), or --network NAME with \
                     --passphrase-file PATH (or WEFT_PASSPHRASE)"
                ),
            },
        };
        let Some(name) = self.network.clone() else {
            bail!("a passphrase needs the network's name: --network NAME");
        };
        let network = tokio::task::spawn_blocking(move || {
            Network::from_passphrase(&name, &passphrase, &PassphraseParams::INTERACTIVE)
        })
        .await
        .context("key derivation stopped")?
        .context("cannot use this passphrase")?;
        Ok(network)
    }

    /// The invite, if one is given: `--invite` (with a warning: it leaks through `ps` and
    /// the shell's history), `--invite-file` (`-`: standard input), or `WEFT_INVITE`.
    fn invite_text(&self) -> anyhow::Result<Option<Zeroizing<String>>> {
        if let Some(link) = &self.invite {
            eprintln!(
                "warning: an invite on the command line can be read by other users of this machine \
                 (ps) and stays in your shell's history; use --invite-file PATH (or - for \
                 standard input) or WEFT_INVITE"
            );
            return Ok(Some(Zeroizing::new(link.clone())));
        }
        if let Some(path) = &self.invite_file {
            let text = if path.as_os_str() == "-" {
                let mut text = Zeroizing::new(String::new());
                std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut text)
                    .context("cannot read the invite from standard input")?;
                text
            } else {
                Zeroizing::new(
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                )
            };
            if text.trim().is_empty() {
                bail!(
                    "{} holds no invite",
                    if path.as_os_str() == "-" {
                        "standard input".into()
                    } else {
                        path.display().to_string()
                    }
                );
            }
            return Ok(Some(text));
        }
        Ok(std::env::var("WEFT_INVITE").ok().filter(|v| !v.trim().is_empty()).map(Zeroizing::new))
    }

    /// The WebRTC configuration.
    pub fn rtc_config(&self) -> RtcConfig {
        let ice_servers = self
            .ice_servers
            .iter()
            .map(|url| IceServer {
                urls: vec![url.clone()],
                username: self.ice_username.clone(),
                credential: self.ice_credential.clone(),
            })
            .collect();
        let untuned = matches!(self.command, Command::BenchRaw { untuned: true, .. });
        let tuning = if untuned { Tuning::UNTUNED } else { Tuning::WEFT };
        RtcConfig {
            ice_servers,
            relay_only: self.relay_only,
            tls: self.ca_cert.as_ref().map(|trust| trust.0.clone()),
            bind: self.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            tuning,
            mark: None,
        }
    }
}

/// A size: bytes, or a number with K, M, G or T (binary units; an optional `iB` or `B`
/// after it). Hand-written: ten lines, and a size crate would bring decimal units that
/// make `4G` mean something else than `4 GiB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (digits, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 =
        digits.trim().parse().map_err(|_| format!("not a size: {s:?} (say 4G or 500M)"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("too large: {s:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("12 k"), Ok(12 << 10));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert!(parse_size("4X").is_err() && parse_size("").is_err());
        assert!(parse_size("99999999T").is_err());
    }

    #[test]
    fn invites_are_found_in_links() {
        let invite = "Q".repeat(43);
        assert_eq!(invite_of(&invite), invite);
        assert_eq!(invite_of(&format!(" https://host/#invite={invite}\n")), invite);
        assert_eq!(invite_of(&format!("https://host/?x=1#invite={invite}&y")), invite);
    }

    /// One invite in 64 starts with `-` (base64url): `--invite -F…` once failed as
    /// "unexpected argument '-F'", in CI and for the users who drew such an invite.
    #[test]
    fn an_invite_that_starts_with_a_hyphen_is_a_value() {
        use clap::Parser;
        let invite = format!("-F{}", "Q".repeat(41));
        let cli = Cli::try_parse_from(["weft-peer", "--invite", &invite, "status"]).unwrap();
        assert_eq!(cli.invite.as_deref(), Some(invite.as_str()));
        let cli = Cli::try_parse_from(["weft-peer", "status", "--invite", &invite]).unwrap();
        assert_eq!(cli.invite.as_deref(), Some(invite.as_str()));
    }
}
