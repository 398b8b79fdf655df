//! `weft-peer`: the native Weft peer. So far it joins a room through the signaling
//! server and reports who is there; encrypted sessions, file transfer and the TUN bridge
//! build on this.

mod signaling;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio::sync::{mpsc, watch};
use tracing_subscriber::EnvFilter;
use weft_core::signal::{MembershipEvent, RoomId};

use crate::signaling::Report;

/// Weft native peer.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// The signaling server's WebSocket URL.
    #[arg(long, env = "WEFT_SERVER", default_value = "ws://127.0.0.1:8080/ws", global = true)]
    server: String,

    /// Print one JSON object per line instead of text.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join a room and stay, reporting peers as they come and go.
    Up {
        /// The room id (letters, digits, - and _).
        #[arg(long)]
        room: String,
    },
}

fn print(json: bool, report: &Report) {
    if json {
        let value = match report {
            Report::Connecting { attempt } => {
                serde_json::json!({"event": "connecting", "attempt": attempt})
            }
            Report::Disconnected { reason, retry_in } => serde_json::json!({
                "event": "disconnected", "reason": reason, "retry_in_ms": retry_in.as_millis()
            }),
            Report::Membership(MembershipEvent::Joined { peer_id, peers }) => {
                serde_json::json!({"event": "joined", "peer_id": peer_id, "peers": peers})
            }
            Report::Membership(MembershipEvent::PeerJoined(p)) => {
                serde_json::json!({"event": "peer_joined", "peer_id": p})
            }
            Report::Membership(MembershipEvent::PeerLeft(p)) => {
                serde_json::json!({"event": "peer_left", "peer_id": p})
            }
            Report::Membership(MembershipEvent::Error { code, message }) => {
                serde_json::json!({"event": "error", "code": code, "message": message})
            }
            Report::Membership(MembershipEvent::Signal { .. } | MembershipEvent::Pong) => return,
        };
        println!("{value}");
        return;
    }
    match report {
        Report::Connecting { attempt: 1 } => println!("connecting…"),
        Report::Connecting { attempt } => println!("reconnecting (attempt {attempt})…"),
        Report::Disconnected { reason, retry_in } => {
            println!("disconnected: {reason}; retrying in {:.1} s", retry_in.as_secs_f64());
        }
        Report::Membership(MembershipEvent::Joined { peer_id, peers }) => {
            println!("joined as {peer_id}; {} other peer(s)", peers.len());
            for p in peers {
                println!("  peer {p}");
            }
        }
        Report::Membership(MembershipEvent::PeerJoined(p)) => println!("peer {p} joined"),
        Report::Membership(MembershipEvent::PeerLeft(p)) => println!("peer {p} left"),
        Report::Membership(MembershipEvent::Error { code, message }) => {
            println!("server refused: {code}: {message}");
        }
        Report::Membership(MembershipEvent::Signal { .. } | MembershipEvent::Pong) => {}
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Up { room } => {
            let room = RoomId::new(room).context("bad --room")?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let (stop_tx, stop_rx) = watch::channel(false);
            let mut driver = tokio::spawn(signaling::run(cli.server, room, tx, stop_rx));
            let json = cli.json;
            let printer = tokio::spawn(async move {
                while let Some(report) = rx.recv().await {
                    print(json, &report);
                }
            });
            let result = tokio::select! {
                r = &mut driver => r,
                r = tokio::signal::ctrl_c() => {
                    r.context("cannot listen for Ctrl-C")?;
                    let _ = stop_tx.send(true);
                    driver.await
                }
                () = terminated() => {
                    let _ = stop_tx.send(true);
                    driver.await
                }
            };
            let _ = printer.await;
            result.context("signaling task failed")??;
        }
    }
    Ok(())
}

#[cfg(unix)]
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn terminated() {
    std::future::pending().await
}
