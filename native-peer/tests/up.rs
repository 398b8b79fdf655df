//! `weft-peer up` as a real process against an in-process signaling server: membership,
//! a clean leave, and rejoining after a server restart.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use weft_signal::{Config, Limits, Server, TurnConfig};

const STEP: Duration = Duration::from_secs(10);

async fn server_on(listen: &str) -> Server {
    let config = Config {
        listen: listen.parse().unwrap(),
        web_root: std::env::temp_dir(),
        tls: None,
        limits: Limits::default(),
        turn: TurnConfig { port: 0, ..TurnConfig::default() },
        cluster: None,
    };
    Server::start(config).await.unwrap()
}

struct Peer {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
}

const INVITE: &str = "QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ";

fn config_dir(label: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("weft-up-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

impl Peer {
    fn start(server: &str, label: &str) -> Self {
        let dir = config_dir(label);
        let mut child = Command::new(env!("CARGO_BIN_EXE_weft-peer"))
            .args(["--server", server, "--json", "--invite", INVITE, "--bind", "127.0.0.1"])
            .arg("--config-dir")
            .arg(&dir)
            .arg("up")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self { child, lines }
    }

    /// The next event of kind `event`, skipping others.
    async fn expect(&mut self, event: &str) -> Value {
        loop {
            let line = tokio::time::timeout(STEP, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {event}"))
                .unwrap()
                .unwrap_or_else(|| panic!("weft-peer exited before {event}"));
            let value: Value = serde_json::from_str(&line).unwrap();
            if value["event"] == event {
                return value;
            }
        }
    }

    fn terminate(&self) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    }
}

#[tokio::test]
async fn peers_see_each_other_come_and_go_and_rejoin_after_a_server_restart() {
    let server = server_on("127.0.0.1:0").await;
    let addr = server.local_addr();
    let url = server.ws_url();
    let mut alice = Peer::start(&url, "alice");
    let joined = alice.expect("joined").await;
    let alice_id = joined["peer_id"].as_str().unwrap().to_string();
    assert_eq!(joined["peers"], serde_json::json!([]));

    let mut bob = Peer::start(&url, "bob");
    let joined = bob.expect("joined").await;
    assert_eq!(joined["peers"], serde_json::json!([alice_id]));
    let bob_id = joined["peer_id"].as_str().unwrap().to_string();
    assert_eq!(alice.expect("peer_joined").await["peer_id"], bob_id.as_str());

    // Bob quits cleanly on SIGTERM; Alice sees him leave.
    bob.terminate();
    let status = tokio::time::timeout(STEP, bob.child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(alice.expect("peer_left").await["peer_id"], bob_id.as_str());

    // The server restarts on the same address: Alice notices, retries, rejoins.
    server.shutdown(Duration::from_secs(2)).await;
    let gone = alice.expect("disconnected").await;
    assert!(gone["reason"].as_str().unwrap().contains("shutting down"), "{gone}");
    let server = server_on(&addr.to_string()).await;
    let again = alice.expect("joined").await;
    assert_ne!(again["peer_id"], alice_id.as_str());
    alice.terminate();
    assert!(tokio::time::timeout(STEP, alice.child.wait()).await.unwrap().unwrap().success());
    server.shutdown(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_bad_url_or_room_fails_at_once_with_a_clear_message() {
    let dir = config_dir("bad");
    let dir = dir.to_str().unwrap();
    for (args, expected) in [
        (
            vec![
                "--config-dir",
                dir,
                "--server",
                "http://example.invalid/ws",
                "--invite",
                INVITE,
                "up",
            ],
            "ws:// or wss://",
        ),
        (vec!["--config-dir", dir, "--invite", "bad invite", "up"], "bad invite"),
    ] {
        let out = tokio::time::timeout(
            STEP,
            Command::new(env!("CARGO_BIN_EXE_weft-peer")).args(&args).output(),
        )
        .await
        .unwrap()
        .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_server_that_refuses_our_protocol_version_stops_the_peer_plainly() {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use weft_core::signal::{ErrorCode, ServerMessage, encode};

    // A server from the future: it refuses the join and closes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/ws", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let join = ws.next().await.unwrap().unwrap();
        assert!(join.to_text().unwrap().contains("\"join\""), "{join}");
        let refusal = ServerMessage::error(ErrorCode::UnsupportedVersion, "this server speaks 99");
        ws.send(Message::text(encode(&refusal))).await.unwrap();
        let _ = ws.close(None).await;
    });
    let dir = config_dir("future");
    let out = tokio::time::timeout(
        STEP,
        Command::new(env!("CARGO_BIN_EXE_weft-peer"))
            .args(["--server", &url, "--json", "--invite", INVITE, "--bind", "127.0.0.1"])
            .arg("--config-dir")
            .arg(&dir)
            .arg("up")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    server.await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("error: the server refused our protocol version: this server speaks 99"),
        "{stderr}"
    );
    // Refused for good: no reconnecting.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("\"attempt\":2"), "{stdout}");
}
