//! `weft-signal`: parses configuration, starts the server, stops it on Ctrl-C or SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;
use weft_signal::{Config, Limits, Server, TlsSource, TurnConfig};

/// Weft signaling server: introduces peers and serves the Weft web app.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on. Use 0.0.0.0:PORT to let devices on your LAN join (with
    /// --self-signed or --tls-cert, since browsers need HTTPS off localhost).
    #[arg(long, env = "WEFT_LISTEN", default_value = weft_signal::DEFAULT_LISTEN)]
    listen: SocketAddr,

    /// Directory holding the built web app (index.html and the WASM bundle).
    #[arg(long, env = "WEFT_WEB_ROOT")]
    web_root: Option<PathBuf>,

    /// TLS certificate chain (PEM). Requires --tls-key.
    #[arg(long, env = "WEFT_TLS_CERT", requires = "tls_key", conflicts_with = "self_signed")]
    tls_cert: Option<PathBuf>,

    /// TLS private key (PEM). Requires --tls-cert.
    #[arg(long, env = "WEFT_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// Serve HTTPS with a fresh self-signed certificate (for a LAN).
    #[arg(long)]
    self_signed: bool,

    /// Most peers in one room.
    #[arg(long, default_value_t = Limits::default().max_peers_per_room)]
    max_peers_per_room: usize,

    /// Most rooms at once.
    #[arg(long, default_value_t = Limits::default().max_rooms)]
    max_rooms: usize,

    /// Most WebSocket connections at once.
    #[arg(long, default_value_t = Limits::default().max_connections)]
    max_connections: usize,

    /// Most WebSocket connections from one IP address.
    #[arg(long, default_value_t = Limits::default().max_connections_per_ip)]
    max_connections_per_ip: usize,

    /// Most rooms the connections from one IP address may be in.
    #[arg(long, default_value_t = Limits::default().max_rooms_per_ip)]
    max_rooms_per_ip: usize,

    /// Behind a reverse proxy that sets X-Forwarded-For: take a client's address for the
    /// per-address limits from its last entry (never set this without such a proxy: any
    /// client could then claim any address).
    #[arg(long, env = "WEFT_TRUST_FORWARDED_FOR")]
    trust_forwarded_for: bool,

    /// Let pages from this origin (e.g. `https://app.example.org`) join, besides the
    /// server's own; repeat for several. Without it, pages from any origin may.
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Share rooms with other weft-signal processes through this NATS server (with
    /// JetStream: `nats-server -js`), e.g. nats://127.0.0.1:4222: members connected to
    /// different processes meet as in one. See signaling/CLUSTER.md.
    #[arg(long, env = "WEFT_CLUSTER", value_name = "NATS_URL")]
    cluster: Option<String>,

    /// Do not run the embedded STUN/TURN server (members then get only --turn-url ones).
    #[arg(long, env = "WEFT_NO_TURN")]
    no_turn: bool,

    /// UDP and TCP port of the embedded STUN/TURN server (0: any free port).
    #[arg(long, env = "WEFT_TURN_PORT", default_value_t = TurnConfig::default().port)]
    turn_port: u16,

    /// Serve no TURN over TCP.
    #[arg(long)]
    no_turn_tcp: bool,

    /// Port of TURN over TLS ("turns:"), served when there is a certificate (--tls-cert,
    /// --self-signed or --turn-tls-cert); 443 reaches networks that let only TLS out. The
    /// --listen port (443 on a public host) shares it with HTTPS (0: any free port).
    #[arg(long, env = "WEFT_TURN_TLS_PORT", default_value_t = TurnConfig::default().tls_port)]
    turn_tls_port: u16,

    /// Serve no TURN over TLS, even with a certificate.
    #[arg(long)]
    no_turn_tls: bool,

    /// Certificate chain (PEM) for TURN over TLS alone, say when a reverse proxy serves
    /// HTTPS. Default: the HTTPS certificate. Requires --turn-tls-key.
    #[arg(long, env = "WEFT_TURN_TLS_CERT", requires = "turn_tls_key")]
    turn_tls_cert: Option<PathBuf>,

    /// Private key (PEM) of --turn-tls-cert.
    #[arg(long, env = "WEFT_TURN_TLS_KEY", requires = "turn_tls_cert")]
    turn_tls_key: Option<PathBuf>,

    /// The host name in the turns: URL, which clients check the certificate against: the
    /// name the certificate was issued for (e.g. weft.example.com). Default: --public-ip.
    #[arg(long, env = "WEFT_TURN_TLS_HOST", value_name = "NAME")]
    turn_tls_host: Option<String>,

    /// The address peers reach this machine at, put in the STUN/TURN URLs and in relayed
    /// candidates (on a public host: its public IP). Default: the --listen address, or
    /// this machine's first non-loopback address when listening on all.
    #[arg(long, env = "WEFT_PUBLIC_IP", value_name = "IP")]
    public_ip: Option<IpAddr>,

    /// The TURN realm.
    #[arg(long, default_value_t = TurnConfig::default().realm)]
    turn_realm: String,

    /// Secret for TURN credentials (TURN REST, HMAC-SHA1): give coturn's
    /// static-auth-secret to hand out credentials for it. Default: random at each start.
    #[arg(long, env = "WEFT_TURN_SECRET", hide_env_values = true)]
    turn_secret: Option<String>,

    /// A STUN/TURN URL of another server (coturn) to hand out too; repeatable.
    #[arg(long = "turn-url", value_name = "URL")]
    turn_urls: Vec<String>,

    /// Hours a TURN credential is good for new allocations.
    #[arg(long, default_value_t = 12)]
    turn_credential_hours: u64,

    /// Most TURN allocations one member holds at once.
    #[arg(long, default_value_t = TurnConfig::default().max_allocations_per_member)]
    turn_max_allocations: usize,

    /// Most bytes per second relayed for one allocation.
    #[arg(long, default_value_t = TurnConfig::default().allocation_bytes_per_s)]
    turn_allocation_rate: u64,

    /// Most bytes per second relayed for one member, over all its allocations.
    #[arg(long, default_value_t = TurnConfig::default().member_bytes_per_s)]
    turn_member_rate: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        // The `turn` crate logs every request it refuses as an error, including the
        // routine ones (a refresh after its member left) and any client's junk, so a
        // hostile client could fill the log: refusals are counted in `/metrics` instead
        // (`weft_turn_refusals`); RUST_LOG=turn=debug shows them.
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,turn=off".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let tls = match (args.tls_cert, args.tls_key, args.self_signed) {
        (Some(cert), Some(key), _) => Some(TlsSource::Files { cert, key }),
        (_, _, true) => Some(TlsSource::SelfSigned),
        _ => None,
    };
    let config = Config {
        listen: args.listen,
        web_root: args.web_root.unwrap_or_else(weft_signal::default_web_root),
        tls,
        limits: Limits {
            max_peers_per_room: args.max_peers_per_room,
            max_rooms: args.max_rooms,
            max_connections: args.max_connections,
            max_connections_per_ip: args.max_connections_per_ip,
            max_rooms_per_ip: args.max_rooms_per_ip,
            trust_forwarded_for: args.trust_forwarded_for,
            allowed_origins: args.allowed_origins,
            ..Limits::default()
        },
        turn: TurnConfig {
            enabled: !args.no_turn,
            port: args.turn_port,
            tcp: !args.no_turn_tcp,
            tls: !args.no_turn_tls,
            tls_port: args.turn_tls_port,
            tls_certificate: args
                .turn_tls_cert
                .zip(args.turn_tls_key)
                .map(|(cert, key)| TlsSource::Files { cert, key }),
            tls_host: args.turn_tls_host,
            tls_handshake_timeout: TurnConfig::default().tls_handshake_timeout,
            public_ip: args.public_ip,
            realm: args.turn_realm,
            secret: args.turn_secret,
            credential_ttl: Duration::from_secs(args.turn_credential_hours.saturating_mul(3600)),
            max_allocations_per_member: args.turn_max_allocations,
            allocation_bytes_per_s: args.turn_allocation_rate,
            member_bytes_per_s: args.turn_member_rate,
            external_urls: args.turn_urls,
        },
        cluster: args.cluster,
    };
    if !config.web_root.join("index.html").is_file() {
        tracing::warn!(
            web_root = %config.web_root.display(),
            "no index.html in the web root; run `cargo xtask run`, or pass --web-root"
        );
    }
    let mut signals = ShutdownSignals::install();
    let mut server = Server::start(config).await.context("weft-signal could not start")?;
    if let Some(tls) = server.tls() {
        if !tls.names.is_empty() {
            println!("Self-signed certificate for {}", tls.names.join(", "));
        }
        println!("Certificate SHA-256 fingerprint: {}", tls.fingerprint);
    }
    if let Some(turn) = server.turn() {
        let tcp = turn.tcp_addr().map(|a| format!(", TCP {}", a.port())).unwrap_or_default();
        let tls = turn.tls_addr().map_or_else(String::new, |a| {
            let shared = if a == server.local_addr() { " (shared with HTTPS)" } else { "" };
            format!(", TLS {}{shared}", a.port())
        });
        println!(
            "STUN/TURN on UDP {}{tcp}{tls}, reached at {}",
            turn.udp_addr().port(),
            turn.public_ip()
        );
    }
    println!("Weft is running: open {}", server.url());
    tokio::select! {
        result = server.wait() => {
            result.context("server failed")?;
        }
        () = signals.wait() => {
            tracing::info!("shutting down");
            server.shutdown(Duration::from_secs(5)).await;
        }
    }
    Ok(())
}

/// Ctrl-C and SIGTERM, listened for from before the server starts: a signal that came
/// between printing the URL and the first wait would otherwise kill the process with the
/// default action (seen on a busy machine: a supervisor's SIGTERM right after start).
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    terminate: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("cannot listen for {name}: {e}");
                    None
                }
            };
            Self {
                interrupt: listen(SignalKind::interrupt(), "Ctrl-C"),
                terminate: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Resolves at the first Ctrl-C or SIGTERM.
    async fn wait(&mut self) {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            }
            tokio::select! {
                () = next(&mut self.interrupt) => {}
                () = next(&mut self.terminate) => {}
            }
        }
        #[cfg(not(unix))]
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    }
}
