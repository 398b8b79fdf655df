//! The `weft-signal` binary: prints where it listens, serves, and stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};

/// `weft-signal` with `args`, serving an empty web root, killed on drop; its output lines.
fn spawn(args: &[&str]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft-signal"))
        .args(args)
        .env("WEFT_WEB_ROOT", std::env::temp_dir())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    (child, lines)
}

#[tokio::test]
async fn prints_its_url_serves_and_stops_on_sigterm() {
    let (mut child, mut lines) = spawn(&["--listen", "127.0.0.1:0", "--turn-port", "0"]);
    let mut next = async || {
        tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    };
    let turn = next().await;
    assert!(
        turn.starts_with("STUN/TURN on UDP ") && turn.ends_with("reached at 127.0.0.1"),
        "{turn}"
    );
    let line = next().await;
    let url = line.strip_prefix("Weft is running: open ").expect(&line);
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    assert!(!authority.ends_with(":0"), "{line}");

    let mut tcp = TcpStream::connect(authority).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut response = String::new();
    tcp.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");

    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status =
        tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "{status}");
}

/// A SIGTERM as soon as the server says anything (a supervisor stopping it right after
/// start) still stops it cleanly: the handler is in place before the server starts.
#[tokio::test]
async fn a_sigterm_right_after_start_stops_it_cleanly() {
    for _ in 0..5 {
        let (mut child, mut lines) = spawn(&["--listen", "127.0.0.1:0", "--turn-port", "0"]);
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line()).await;
        assert!(first.unwrap().unwrap().is_some());
        let pid = child.id().unwrap().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status =
            tokio::time::timeout(Duration::from_secs(10), child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "{status}");
    }
}

#[tokio::test]
async fn a_half_given_tls_configuration_is_refused() {
    for (given, missing) in [("--tls-cert", "--tls-key"), ("--turn-tls-cert", "--turn-tls-key")] {
        let out = Command::new(env!("CARGO_BIN_EXE_weft-signal"))
            .args([given, "/nonexistent.pem"])
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(missing), "{out:?}");
    }
}

#[tokio::test]
async fn with_a_certificate_it_says_where_turn_over_tls_listens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let port = port.to_string();
    let listen = format!("127.0.0.1:{port}");
    for (tls_port, says) in [("0", "TLS "), (port.as_str(), " (shared with HTTPS)")] {
        let args = ["--listen", &listen, "--self-signed", "--turn-port", "0"];
        let (mut child, mut lines) = spawn(&[&args[..], &["--turn-tls-port", tls_port]].concat());
        let turn = loop {
            let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line());
            let line = line.await.unwrap().unwrap().unwrap();
            if line.starts_with("STUN/TURN") {
                break line;
            }
        };
        assert!(turn.contains(says), "{turn}");
        child.kill().await.unwrap();
    }
}
