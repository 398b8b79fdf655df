//! `weft-peer`: the native Weft peer. Joins a network's room through the signaling server,
//! connects to every member over WebRTC (webrtc-rs), runs the same encrypted session as
//! the browser (`weft_core::peer::PeerLink`), exchanges messages and files.
//!
//! Modules: [`cli`] (options), [`control`] (the socket `status` asks a running `up`
//! on), [`store`] (identity key and trust stores on disk),
//! [`mesh`] (the driver of the core's `Node`: every decision is the node's),
//! [`signaling`] (the WebSocket to the server), [`rtc`] (one WebRTC connection), [`files`]
//! (file transfer on disk), [`tun`] (the TUN device of `up --tun`), [`transfer`] (the
//! `send` and `receive` commands),
//! [`ping`] (ICMP echo through the running `up`'s TUN device), [`bench_raw`] (a plain
//! data channel, the benchmark's baseline), [`output`] (text or
//! JSON lines).

/// `println!` for text a person reads: anything a peer chose (names, messages, file
/// names) is in it, so hidden characters are written out as escapes
/// (`weft_core::text::escape_hidden`): a peer must not drive the terminal. JSON lines need
/// no such care (serde escapes control characters).
macro_rules! say {
    ($($arg:tt)*) => {
        println!("{}", weft_core::text::escape_hidden(&format!($($arg)*)))
    };
}

mod bench_raw;
mod cli;
mod control;
mod dns;
mod files;
mod mesh;
mod netconf;
mod output;
mod ping;
mod rtc;
mod signaling;
mod store;
mod tls;
mod transfer;
mod tun;

use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use clap::Parser as _;
use tokio::sync::mpsc;
use tracing_subscriber::EnvFilter;
use weft_core::identity::IdentityKeyPair;
use weft_core::network::Network;
use weft_core::signal::PeerId;
use weft_core::transfer::PendingBudget;

use crate::cli::{Cli, Command, TrustCommand};
use crate::mesh::{MeshConfig, MeshEvent, MeshHandle, PeerInfo, PeerState, TrustAction};
use crate::output::Printer;
use crate::rtc::{RtcConfig, Tuning};
use crate::store::Store;
use weft_core::node::{Event, SignalingEvent};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        // webrtc-rs warns about much that is routine; our own warnings matter.
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "error,weft_peer=warn,weft_core=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything a joined session has.
pub(crate) struct Joined {
    mesh: MeshHandle,
    events: mpsc::UnboundedReceiver<MeshEvent>,
    identity: IdentityKeyPair,
    name: String,
    network: Network,
    /// The config directory (where a running `up` listens for `status`).
    config_dir: std::path::PathBuf,
}

async fn join(cli: &Cli, downloads: Option<std::path::PathBuf>) -> anyhow::Result<Joined> {
    join_with(cli, downloads, Routing::default()).await
}

/// What `up --tun` adds to joining: the device, what the node advertises and accepts,
/// and the host's routes and rules beyond the device.
#[derive(Default)]
struct Routing {
    tun: Option<tun::Tun>,
    config: weft_core::node::RoutingConfig,
    netconf: Option<netconf::NetConf>,
    signaling_mark: Option<u32>,
    dns: Option<dns::Forwarder>,
}

/// The device, the routing policy and the host's network configuration of `up`, in that
/// order: without root, making the device fails first, before anything is changed. A
/// crashed `up`'s changes are undone first, unless an `up` runs with this config dir.
async fn routing(cli: &Cli, args: &cli::UpArgs) -> anyhow::Result<Routing> {
    let config = args.routing()?;
    let Some(tun) = args.tun_config().map(|c| tun::Tun::open(&c)).transpose()? else {
        return Ok(Routing { config, ..Routing::default() });
    };
    let dir = Store::open(cli.config_dir.clone())?.dir().to_path_buf();
    let running = control::ask_status(&dir).await.ok().flatten().is_some();
    if running {
        bail!("a weft-peer up already runs with {}", dir.display());
    }
    let mut netconf = netconf::NetConf::open(&dir, &tun.state().name)?;
    if let Some(forwarding) = args.forwarding() {
        netconf.forward(&forwarding)?;
    }
    if let Some(exit) = args.exit_use() {
        netconf.use_exit(exit)?;
    }
    // `.weft` names: the host asks the node's resolver, which forwards the rest to the
    // resolvers the host had. A host whose resolver cannot be changed still joins.
    let dns = if args.no_dns {
        None
    } else {
        match netconf.use_resolver() {
            Ok(upstreams) => Some(dns::Forwarder::new(upstreams)),
            Err(e) => {
                tracing::warn!(
                    "{e}; .weft names will not resolve on this host (--no-dns: do not try)"
                );
                None
            }
        }
    };
    // Whatever the routes, the signaling socket stays on the underlay (see `netconf`).
    // Policy routing by mark is Linux's (`netconf`).
    let signaling_mark = cfg!(target_os = "linux").then_some(netconf::FWMARK);
    Ok(Routing { tun: Some(tun), config, netconf: Some(netconf), signaling_mark, dns })
}

/// [`join`], routing IP as `routing` says.
async fn join_with(
    cli: &Cli,
    downloads: Option<std::path::PathBuf>,
    routing: Routing,
) -> anyhow::Result<Joined> {
    for url in &cli.server {
        signaling::check_url(url)?;
    }
    let store = Store::open(cli.config_dir.clone())?;
    let config_dir = store.dir().to_path_buf();
    let mut rng = getrandom::rand_core::UnwrapErr(getrandom::SysRng);
    let device = store.load_or_create_identity(&mut rng)?;
    let network = cli.network().await?;
    let mut trust = store.load_trust(network.room_id())?;
    let identity = trust.own_identity(&device, &network);
    let name = match cli.name.as_deref().map(str::trim) {
        Some(name) if !name.is_empty() => name.to_string(),
        _ => format!("Native {}", &identity.public().fingerprint().to_hex()[..4]),
    };
    let (mesh, events) = mesh::start(MeshConfig {
        servers: cli.server.clone(),
        network: network.clone(),
        identity: identity.clone(),
        own_name: name.clone(),
        // Weft's WebRTC sockets carry the signaling socket's mark: they stay on the
        // underlay, whatever routes the TUN takes.
        rtc: {
            let rtc = cli.rtc_config();
            let tuning = if routing.tun.is_some() { Tuning::TUN } else { rtc.tuning };
            RtcConfig { mark: routing.signaling_mark, tuning, ..rtc }
        },
        store,
        trust,
        downloads,
        tun: routing.tun,
        routing: routing.config,
        netconf: routing.netconf,
        signaling_mark: routing.signaling_mark,
        dns: routing.dns,
    })?;
    Ok(Joined { mesh, events, identity, name, network, config_dir })
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let printer = Printer { json: cli.json };
    match &cli.command {
        Command::Invite => {
            let mut rng = getrandom::rand_core::UnwrapErr(getrandom::SysRng);
            let invite = Network::generate(&mut rng).invite().map(|s| s.to_string());
            let invite = invite.ok_or_else(|| anyhow!("no invite for a new network"))?;
            if cli.json {
                println!("{}", serde_json::json!({"event": "invite", "invite": invite}));
            } else {
                println!("{invite}");
            }
            Ok(())
        }
        Command::Up(args) => {
            let routing = routing(&cli, args).await?;
            up(join_with(&cli, None, routing).await?, printer).await
        }
        Command::Down => {
            let dir = Store::open(cli.config_dir.clone())?.dir().to_path_buf();
            down(&dir, printer).await
        }
        Command::Peers { wait } => {
            let joined = join(&cli, None).await?;
            let (joined, peers, _) = settle(joined, Duration::from_secs(*wait)).await?;
            printer.peers(&peers);
            joined.mesh.shutdown().await?;
            Ok(())
        }
        Command::Status { wait } => {
            // A running `up` with this config directory knows best (and joining again with
            // its key would make a second member with the same key).
            let dir = Store::open(cli.config_dir.clone())?.dir().to_path_buf();
            let asked = control::ask_status(&dir).await.with_context(|| {
                format!("cannot ask the weft-peer up running with {}", dir.display())
            })?;
            if let Some(status) = asked {
                printer.status(&status);
                return Ok(());
            }
            let joined = join(&cli, None).await?;
            let (joined, peers, own) = settle(joined, Duration::from_secs(*wait)).await?;
            let room = joined.network.room_id();
            let overlay = joined.mesh.overlay().await.map(|(status, _)| status);
            let who = (&joined.identity, joined.name.as_str(), room, own.as_deref());
            let refusals = joined.mesh.transfer_refusals().await;
            let status =
                output::status_json(who, overlay.as_ref(), None, false, &peers, &[], &refusals);
            printer.status(&status);
            joined.mesh.shutdown().await?;
            Ok(())
        }
        Command::Trust { action: None, wait } => {
            let joined = join(&cli, None).await?;
            let room = joined.network.room_id().clone();
            let (joined, peers, _) = settle(joined, Duration::from_secs(*wait)).await?;
            joined.mesh.shutdown().await?;
            // The store as the session left it (it pinned the keys it met).
            let trust = Store::open(cli.config_dir.clone())?.load_trust(&room)?;
            printer.trust(&peers, &trust);
            Ok(())
        }
        Command::Trust { action: Some(action), .. } => {
            let joined = join(&cli, None).await?;
            trust_decision(joined, printer, action).await
        }
        Command::Msg { peer, text, timeout } => {
            let joined = join(&cli, None).await?;
            msg(joined, printer, peer, text, Duration::from_secs(*timeout)).await
        }
        Command::Send { paths, to, timeout } => {
            // Missing or unreadable files fail here, before anything is sent.
            let found = files::collect(paths)?;
            printer.skipped(&found.skipped);
            let items = found.items;
            if items.is_empty() {
                bail!("nothing to send: the folders hold no file that can be sent");
            }
            let joined = join(&cli, None).await?;
            transfer::send(joined, printer, items, to, Duration::from_secs(*timeout)).await
        }
        Command::Receive { dir, accept_from, once, max_pending, max_pending_total } => {
            let joined = join(&cli, Some(dir.clone())).await?;
            let default = PendingBudget::DEFAULT;
            let budget = PendingBudget {
                per_peer: max_pending.unwrap_or(default.per_peer),
                total: max_pending_total.unwrap_or(default.total),
                ..default
            };
            let rule = transfer::ReceiveRule { accept_from, budget, dir };
            transfer::receive(joined, printer, rule, *once).await
        }
        Command::Ping { peer, count, size, ipv6 } => {
            let dir = Store::open(cli.config_dir.clone())?.dir().to_path_buf();
            let options = ping::PingOptions {
                peer: peer.clone(),
                count: *count,
                size: usize::from(*size),
                ipv6: *ipv6,
            };
            ping::run(printer, &dir, options).await
        }
        Command::BenchRaw { peer, bytes, timeout, .. } => {
            let joined = join(&cli, None).await?;
            let rtc = cli.rtc_config();
            bench_raw::run(joined, rtc, peer, *bytes, Duration::from_secs(*timeout)).await
        }
    }
}

/// `up`: print events until Ctrl-C or SIGTERM, then leave cleanly.
async fn up(joined: Joined, printer: Printer) -> anyhow::Result<()> {
    let Joined { mesh, mut events, identity, name, network, config_dir } = joined;
    let control = match control::ControlListener::bind(&config_dir) {
        Ok(Some(control)) => Some(control),
        Ok(None) => {
            printer.event(&MeshEvent::Warning(format!(
                "another weft-peer up runs with {}: `status` asks that one",
                config_dir.display()
            )));
            None
        }
        Err(e) => {
            let path = control::socket_path(&config_dir);
            printer.event(&MeshEvent::Warning(format!(
                "cannot listen on {} (`status` will join on its own): {e}",
                path.display()
            )));
            None
        }
    };
    // Listening before the first line goes out: whoever read it may stop us at once.
    let mut stop = StopSignals::new()?;
    let mut own_id: Option<String> = None;
    // Failed passphrase checks by peer id, as the node reported them, for `status`.
    let mut passphrase_failures: std::collections::BTreeMap<PeerId, u32> = Default::default();
    let fp = identity.public().fingerprint();
    if printer.json {
        println!(
            "{}",
            serde_json::json!({"event": "identity", "name": name, "fingerprint": fp.to_hex(),
                               "safety_code": fp.short_code()})
        );
    } else {
        say!("I am {name}, safety code {}", fp.short_code());
    }
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => {
                    if let MeshEvent::Node(Event::Joined { peer_id, .. }) = &event {
                        own_id = Some(peer_id.to_string());
                    }
                    if let MeshEvent::Node(Event::PassphraseFailures { peer, failures, .. }) = &event {
                        passphrase_failures.insert(peer.clone(), *failures);
                    }
                    printer.event(&event);
                }
                None => return mesh.wait().await.map_err(Into::into),
            },
            Ok(mut stream) = accept(control.as_ref()) => {
                let request = control::read_request(&mut stream).await;
                if request == Some(control::Request::Down) {
                    let answer = serde_json::json!({"event": "down"});
                    control::answer(stream, &answer).await;
                    break;
                }
                if request == Some(control::Request::Status) {
                    let peers = mesh.peers().await;
                    let (overlay, tun) = mesh.overlay().await.unzip();
                    let who = (&identity, name.as_str(), network.room_id(), own_id.as_deref());
                    let tun = tun.flatten();
                    let mut failures: Vec<(PeerId, u32)> =
                        passphrase_failures.iter().map(|(p, n)| (p.clone(), *n)).collect();
                    failures.sort_by_key(|f| std::cmp::Reverse(f.1));
                    let refusals = mesh.transfer_refusals().await;
                    let status = output::status_json(
                        who, overlay.as_ref(), tun.as_ref(), true, &peers, &failures, &refusals,
                    );
                    tokio::spawn(async move { control::answer(stream, &status).await });
                }
            }
            _ = stop.recv() => break,
        }
        if mesh.is_finished() {
            while let Ok(event) = events.try_recv() {
                printer.event(&event);
            }
            return mesh.wait().await.map_err(Into::into);
        }
    }
    mesh.shutdown().await?;
    while let Ok(event) = events.try_recv() {
        printer.event(&event);
    }
    Ok(())
}

/// `down`: asks the `up` running with config dir `dir` to leave (it undoes its network
/// changes as it goes) and waits for it; then undoes what a crashed one left.
async fn down(dir: &std::path::Path, printer: Printer) -> anyhow::Result<()> {
    let asked = control::ask(dir, control::Request::Down)
        .await
        .with_context(|| format!("cannot ask the weft-peer up running with {}", dir.display()))?;
    if asked.is_some() {
        // It answers, then leaves (at most a few seconds) and removes its socket.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while control::socket_path(dir).exists() {
            if tokio::time::Instant::now() > deadline {
                bail!("the weft-peer up running with {} did not leave", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let undone = netconf::restore(dir)?;
    if printer.json {
        let v = serde_json::json!({"event": "down", "stopped": asked.is_some(), "undone": undone});
        println!("{v}");
    } else {
        match asked {
            Some(_) => println!("the running weft-peer up left"),
            None => println!("no weft-peer up was running"),
        }
        println!("undid {undone} network change(s) left behind");
    }
    Ok(())
}

/// The next client of the control socket (never, without one).
async fn accept(
    control: Option<&control::ControlListener>,
) -> std::io::Result<control::ControlStream> {
    match control {
        Some(control) => control.accept().await,
        None => std::future::pending().await,
    }
}

/// Waits until every member has a session (or failed), or `wait` passes; returns the
/// peers and our peer id.
async fn settle(
    mut joined: Joined,
    wait: Duration,
) -> anyhow::Result<(Joined, Vec<PeerInfo>, Option<String>)> {
    let deadline = tokio::time::Instant::now() + wait;
    let mut own = None;
    let mut last_problem = None;
    loop {
        let event = tokio::select! {
            e = joined.events.recv() => e,
            () = tokio::time::sleep_until(deadline) => break,
        };
        let Some(event) = event else {
            joined.mesh.wait().await?;
            bail!("the session stopped");
        };
        match event {
            MeshEvent::Node(Event::Joined { peer_id, .. }) => own = Some(peer_id.to_string()),
            MeshEvent::Node(Event::Signaling(SignalingEvent::Lost { reason, .. })) => {
                last_problem = Some(reason)
            }
            _ => {}
        }
        if own.is_some() {
            let peers = joined.mesh.peers().await;
            let settled = peers.iter().all(|p| p.state != PeerState::Connecting)
                && peers.iter().all(|p| p.state != PeerState::Handshaking);
            if settled && peers.iter().all(|p| p.state == PeerState::Failed || p.name.is_some()) {
                return Ok((joined, peers, own));
            }
        }
    }
    if own.is_none() {
        let why = last_problem.unwrap_or_else(|| "no answer".into());
        bail!("could not join through the signaling server {}: {why}", "(see --server)");
    }
    let peers = joined.mesh.peers().await;
    Ok((joined, peers, own))
}

/// Leaves after `error`; the session's own error if it stopped by itself.
async fn leave_after(mesh: MeshHandle, error: anyhow::Error) -> anyhow::Error {
    if mesh.is_finished() {
        if let Err(e) = mesh.wait().await {
            return e.into();
        }
    } else {
        let _ = mesh.shutdown().await;
    }
    error
}

/// Waits for `target`'s (a name or peer id) encrypted session; fails if it does not come
/// within `timeout`, saying why.
async fn wait_for_peer(
    mesh: &MeshHandle,
    events: &mut mpsc::UnboundedReceiver<MeshEvent>,
    printer: Printer,
    target: &str,
    changed_ok: bool,
    timeout: Duration,
) -> anyhow::Result<PeerInfo> {
    let wanted = weft_core::node::PeerRef::new(target).context("no peer named")?;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut joined_room = false;
    let mut last_problem: Option<String> = None;
    let mut failures: Vec<String> = Vec::new();
    let peer = loop {
        let event = tokio::select! {
            e = events.recv() => e,
            () = tokio::time::sleep_until(deadline) => None,
        };
        let Some(event) = event else {
            if mesh.is_finished() {
                bail!("the session stopped");
            }
            if !joined_room {
                let why = last_problem.unwrap_or_else(|| "no answer".into());
                bail!("could not reach the signaling server: {why}");
            }
            let mut message =
                format!("peer {target:?} did not connect within {} s", timeout.as_secs());
            if !failures.is_empty() {
                message.push_str(&format!("; failed: {}", failures.join("; ")));
            }
            bail!(message);
        };
        match &event {
            MeshEvent::Node(Event::Joined { .. }) => joined_room = true,
            MeshEvent::Node(Event::Signaling(SignalingEvent::Lost { reason, .. })) => {
                last_problem = Some(reason.clone())
            }
            MeshEvent::Node(Event::KeyChanged(_)) => printer.event(&event),
            MeshEvent::Node(Event::PeerFailed(info)) => {
                failures.push(format!(
                    "{}: {}",
                    info.name.as_deref().unwrap_or(info.peer_id.as_str()),
                    info.reason.as_ref().map_or_else(|| "unknown".into(), ToString::to_string)
                ));
                // Fail early when no member is left to wait for.
                let peers = mesh.peers().await;
                if !peers.is_empty() && peers.iter().all(|p| p.state == PeerState::Failed) {
                    bail!(
                        "no encrypted session with {target:?}: every peer failed: {}",
                        failures.join("; ")
                    );
                }
            }
            MeshEvent::Node(Event::PeerConnected(info))
                if wanted.names(info) || (changed_ok && wanted.names_changed_key(info)) =>
            {
                break info.clone();
            }
            MeshEvent::Node(Event::PeerConnected(info)) if wanted.names_changed_key(info) => {
                bail!(
                    "{target}'s key changed, so the name {target:?} no longer names it: compare \
                     safety codes with its owner, then `weft-peer trust accept {target}`, or name \
                     it by its new safety code or fingerprint"
                );
            }
            _ => {}
        }
    };
    Ok(peer)
}

/// `msg`: wait for `target`'s session, send, make sure it was acknowledged, leave.
async fn msg(
    joined: Joined,
    printer: Printer,
    target: &str,
    text: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let Joined { mesh, mut events, .. } = joined;
    let peer = match wait_for_peer(&mesh, &mut events, printer, target, false, timeout).await {
        Ok(peer) => peer,
        Err(e) => return Err(leave_after(mesh, e).await),
    };
    let sent = send_and_flush(&mesh, &peer.peer_id, text).await;
    let result = match sent {
        Ok(()) => {
            let name = peer.name.clone().unwrap_or_default();
            if printer.json {
                println!(
                    "{}",
                    serde_json::json!({"event": "sent", "peer_id": peer.peer_id, "name": name})
                );
            } else {
                say!("sent to {name} ({})", peer.peer_id);
            }
            Ok(())
        }
        Err(e) => Err(e),
    };
    mesh.shutdown().await?;
    result
}

/// `trust verify` / `trust accept`: wait for the peer's session, check the safety code,
/// record the decision (the trust store is saved), leave.
async fn trust_decision(
    joined: Joined,
    printer: Printer,
    action: &TrustCommand,
) -> anyhow::Result<()> {
    let (target, code, timeout, accept) = match action {
        TrustCommand::Verify { peer, code, timeout } => (peer, code, timeout, false),
        TrustCommand::Accept { peer, code, timeout } => (peer, code, timeout, true),
    };
    let Joined { mesh, mut events, .. } = joined;
    let timeout = Duration::from_secs(*timeout);
    // Deciding about a changed key is what `trust` is for: its old name still finds it.
    let peer = match wait_for_peer(&mesh, &mut events, printer, target, true, timeout).await {
        Ok(peer) => peer,
        Err(e) => return Err(leave_after(mesh, e).await),
    };
    let result = decide(&mesh, &peer, code.as_deref(), accept).await;
    let trust = mesh.peers().await.into_iter().find(|p| p.peer_id == peer.peer_id);
    mesh.shutdown().await?;
    let done = result?;
    let trust = trust.and_then(|p| p.trust).map_or("unknown", weft_core::trust::Trust::as_str);
    let name = peer.name.clone().unwrap_or_default();
    let code = peer.fingerprint.map(|f| f.short_code()).unwrap_or_default();
    if printer.json {
        println!(
            "{}",
            serde_json::json!({"event": "trust", "peer_id": peer.peer_id, "name": name,
                               "safety_code": code, "trust": trust, "done": done})
        );
    } else {
        say!("{done} {name}'s key ({code}): now {trust}");
    }
    Ok(())
}

/// Checks `code` (or asks in a terminal) and records the decision; what was done.
async fn decide(
    mesh: &MeshHandle,
    peer: &PeerInfo,
    code: Option<&str>,
    accept: bool,
) -> anyhow::Result<&'static str> {
    let name = peer.name.clone().unwrap_or_else(|| peer.peer_id.to_string());
    let actual = peer.fingerprint.map(|f| f.short_code()).context("no key yet")?;
    let digits = |s: &str| s.chars().filter(char::is_ascii_digit).collect::<String>();
    let compared = match code {
        Some(given) if digits(given) == digits(&actual) => true,
        Some(given) => bail!(
            "the safety codes differ: {name}'s key here has {actual}, not {given}; someone \
             may be posing as {name}, or it is another device: nothing was changed"
        ),
        None if accept => false,
        None => confirm(&name, &actual)?,
    };
    if accept {
        mesh.trust(&peer.peer_id, TrustAction::AcceptNewKey).await?;
    }
    if compared {
        mesh.trust(&peer.peer_id, TrustAction::Verify).await?;
    }
    Ok(match (accept, compared) {
        (true, true) => "accepted and verified",
        (true, false) => "accepted",
        _ => "verified",
    })
}

/// Asks the user, in a terminal, whether `name`'s owner sees `code`.
fn confirm(name: &str, code: &str) -> anyhow::Result<bool> {
    use std::io::{BufRead as _, IsTerminal as _, Write as _};
    if !std::io::stdin().is_terminal() {
        bail!(
            "give --code with the safety code {name}'s owner sees (here: {code}), or run this \
             in a terminal to confirm it"
        );
    }
    print!(
        "{}",
        weft_core::text::escape_hidden(&format!(
            "Does {name}'s screen show the safety code {code}? [y/N] "
        ))
    );
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    if !matches!(answer.trim(), "y" | "Y" | "yes") {
        bail!("not verified: the codes were not confirmed to match");
    }
    Ok(true)
}

async fn send_and_flush(mesh: &MeshHandle, peer: &PeerId, text: &str) -> anyhow::Result<()> {
    mesh.send_message(peer, text).await?;
    if !mesh.flush(peer).await {
        bail!("the message to {peer} was not acknowledged within 10 s");
    }
    Ok(())
}

/// Which signal asked us to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Ctrl-C (SIGINT).
    Interrupted,
    /// SIGTERM (Unix only).
    #[cfg_attr(not(unix), allow(dead_code))]
    Terminated,
}

/// Ctrl-C and SIGTERM, listened for from creation on. A listener made anew in each turn
/// of a loop (`tokio::signal::ctrl_c()` inside a `select!`) misses a signal that arrives
/// between two turns, while the loop is busy with an event: once tokio has installed its
/// handler the process no longer dies of it either, so it would never leave. These
/// streams keep such a signal for the next [`StopSignals::recv`].
pub(crate) struct StopSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Starts listening.
    pub(crate) fn new() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    /// The next stop signal.
    pub(crate) async fn recv(&mut self) -> Stop {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => Stop::Interrupted,
                _ = self.terminate.recv() => Stop::Terminated,
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            Stop::Interrupted
        }
    }
}
