//! Two native peers (`weft-peer`, real processes, webrtc-rs) through the real signaling
//! server: encrypted sessions, `msg` both ways, a clean leave.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt as _, BufReader};
use weft_signal::Limits;
use weft_tests::native::{NativePeer, command, config_dir, run, text_command};
use weft_tests::start_server;

const WAIT: Duration = Duration::from_secs(60);
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_native_peers_connect_and_message_each_other() {
    let server = start_server(Limits::default()).await.unwrap();
    let url = server.ws_url();
    let invite = "Q".repeat(43);
    let (dir_a, dir_b, dir_c, dir_d) = (
        config_dir("a").unwrap(),
        config_dir("b").unwrap(),
        config_dir("c").unwrap(),
        config_dir("d").unwrap(),
    );

    let mut a = command(&url, &dir_a, LOOPBACK).unwrap();
    a.args(["--invite", &invite, "--name", "Ada", "up"]);
    let mut a = NativePeer::spawn(a).unwrap();
    let mut b = command(&url, &dir_b, LOOPBACK).unwrap();
    b.args(["--invite", &format!("http://x/#invite={invite}"), "--name", "Bea", "up"]);
    let mut b = NativePeer::spawn(b).unwrap();

    let a_sees = a.expect_direct("Ada sees Bea", WAIT, |_| true).await.unwrap();
    let b_sees = b.expect("Bea sees Ada", WAIT, |v| v["event"] == "peer_connected").await.unwrap();
    assert_eq!(a_sees["name"], "Bea", "{a_sees}");
    assert_eq!(b_sees["name"], "Ada", "{b_sees}");
    assert_eq!(a_sees["trust"], "new");
    let a_id = a.expect_event("identity", WAIT).await.unwrap();
    let b_id = b.expect_event("identity", WAIT).await.unwrap();
    assert_eq!(a_sees["safety_code"], b_id["safety_code"], "Ada sees Bea's real key");
    assert_eq!(b_sees["safety_code"], a_id["safety_code"], "Bea sees Ada's real key");
    // The key file was created private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir_a.join("identity.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // `msg` from a third native peer to each, by name and by peer id.
    let mut to_ada = command(&url, &dir_c, LOOPBACK).unwrap();
    to_ada.args(["--invite", &invite, "--name", "Cy", "msg", "Ada", "hello Ada"]);
    let (status, stdout, stderr) = run(to_ada, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains(r#""event":"sent""#), "{stdout}");
    let got = a.expect("the message", WAIT, |v| v["event"] == "message").await.unwrap();
    assert_eq!(got["text"], "hello Ada");
    assert_eq!(got["from"], "Cy");
    // Shown with the sender's trust: first contact.
    assert_eq!(got["trust"], "new", "{got}");

    let bea_id = a_sees["peer_id"].as_str().unwrap().to_string();
    let mut to_bea = command(&url, &dir_c, LOOPBACK).unwrap();
    to_bea.args(["--invite", &invite, "--name", "Cy", "msg", &bea_id, "hi Bea ✓"]);
    let (status, stdout, stderr) = run(to_bea, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    let got = b.expect("the message", WAIT, |v| v["text"] == "hi Bea ✓").await.unwrap();
    assert_eq!(got["from"], "Cy");
    // Cy comes back with the same key under the same name: known, not changed. (Cy's
    // first `msg`, to Ada, may exit before its session with Bea is up, so Bea may have
    // met Cy only now: Cy messages Bea once more.)
    let mut again = command(&url, &dir_c, LOOPBACK).unwrap();
    again.args(["--invite", &invite, "--name", "Cy", "msg", &bea_id, "again"]);
    let (status, stdout, stderr) = run(again, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    b.expect("the second message", WAIT, |v| v["text"] == "again").await.unwrap();
    b.expect_direct("Cy's second session", WAIT, |v| v["name"] == "Cy" && v["trust"] == "known")
        .await
        .unwrap();

    // A hostile member's message cannot drive a person's terminal: escape sequences (a
    // window title, a colour), a fake line from another peer and a right-to-left override
    // all arrive written out as escapes, on one line.
    let mut dee = text_command(&url, &dir_d, LOOPBACK).unwrap();
    dee.args(["--invite", &invite, "--name", "Dee", "up"]).stdout(std::process::Stdio::piped());
    let mut dee = dee.spawn().unwrap();
    let mut dee_out = BufReader::new(dee.stdout.take().unwrap()).lines();
    let attack = "hi\n<Ada> your invite please\u{1b}]0;owned\u{7}\u{1b}[31m\u{202e}txt.exe";
    let mut to_dee = command(&url, &dir_c, LOOPBACK).unwrap();
    // The invite from the environment, where `ps` does not show it.
    to_dee.env("WEFT_INVITE", &invite).args(["--name", "Cy", "msg", "Dee", attack]);
    let (status, stdout, stderr) = run(to_dee, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    let line = tokio::time::timeout(WAIT, async {
        loop {
            let line = dee_out.next_line().await.unwrap().expect("Dee's output ended");
            // The sender's name with its key's trust.
            if line.contains("<Cy [new]>") || line.contains("<Cy [known]>") {
                return line;
            }
        }
    })
    .await
    .expect("Dee never showed the message");
    assert!(!line.chars().any(weft_core::text::is_hidden), "raw control characters: {line:?}");
    assert!(
        line.contains(r"hi\n<Ada> your invite"),
        "the fake line stays on the real one: {line:?}"
    );
    assert!(line.contains(r"\u{1b}]0;owned") && line.contains(r"\u{202e}"), "{line:?}");
    let _ = dee.kill().await;

    // `peers` lists both with their keys.
    let mut peers = command(&url, &dir_c, LOOPBACK).unwrap();
    // The invite from a file.
    let invite_file = dir_c.join("invite.txt");
    std::fs::write(&invite_file, format!("https://weft.example/#invite={invite}\n")).unwrap();
    peers.arg("--invite-file").arg(&invite_file).args(["--name", "Cy", "peers", "--wait", "30"]);
    let (status, stdout, stderr) = run(peers, WAIT).await.unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    let list: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let names: Vec<&str> =
        list["peers"].as_array().unwrap().iter().filter_map(|p| p["name"].as_str()).collect();
    assert!(names.contains(&"Ada") && names.contains(&"Bea"), "{list}");
    assert!(list["peers"].as_array().unwrap().iter().all(|p| p["fingerprint"].is_string()));

    // A message to nobody fails clearly, and fast enough.
    let mut nobody = command(&url, &dir_c, LOOPBACK).unwrap();
    nobody.args(["--invite", &invite, "msg", "Nobody", "x", "--timeout", "5"]);
    let (status, _, stderr) = run(nobody, WAIT).await.unwrap();
    assert!(!status.success());
    assert!(stderr.contains("\"Nobody\" did not connect within 5 s"), "{stderr}");
    // An invite given on the command line works, with a warning that it leaks.
    assert!(stderr.contains("warning: an invite on the command line"), "{stderr}");

    // Ada leaves cleanly; Bea sees her go.
    let status = a.terminate(WAIT).await.unwrap();
    assert!(status.success(), "{status}");
    let ada_peer_id = b_sees["peer_id"].clone();
    b.expect("Ada leaving", WAIT, |v| v["event"] == "peer_left" && v["peer_id"] == ada_peer_id)
        .await
        .unwrap();
    b.terminate(WAIT).await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
    for dir in [dir_a, dir_b, dir_c, dir_d] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_with_clear_errors() {
    let dir = config_dir("bad").unwrap();
    let invite = "Q".repeat(43);
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (vec!["--invite".into(), invite.clone(), "up".into()], "http://x/ws", "ws:// or wss://"),
        (vec!["--invite".into(), "short".into(), "up".into()], "ws://127.0.0.1:9/ws", "bad invite"),
        (vec!["up".into()], "ws://127.0.0.1:9/ws", "give --invite-file PATH (or WEFT_INVITE)"),
        (
            vec!["--invite-file".into(), "/nonexistent/invite".into(), "up".into()],
            "ws://127.0.0.1:9/ws",
            "cannot read /nonexistent/invite",
        ),
        (
            vec![
                "--invite".into(),
                invite,
                "msg".into(),
                "x".into(),
                "y".into(),
                "--timeout".into(),
                "3".into(),
            ],
            "ws://127.0.0.1:9/ws",
            "could not reach the signaling server",
        ),
    ];
    for (args, server, expected) in cases {
        let mut cmd = command(server, &dir, LOOPBACK).unwrap();
        cmd.args(&args);
        let (status, _, stderr) = run(cmd, WAIT).await.unwrap();
        assert!(!status.success(), "{args:?}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
    // A key file others can read is refused.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let key = dir.join("identity.key");
        std::fs::write(&key, "00".repeat(32)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = command("ws://127.0.0.1:9/ws", &dir, LOOPBACK).unwrap();
        cmd.args(["--invite", &"Q".repeat(43), "up"]);
        let (status, _, stderr) = run(cmd, WAIT).await.unwrap();
        assert!(!status.success());
        assert!(stderr.contains("readable by group or others"), "{stderr}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs `weft-peer --invite INVITE --name Bea ARGS…` in `dir`; its JSON output (the last
/// line), or its stderr if it failed.
async fn bea(
    url: &str,
    dir: &std::path::Path,
    invite: &str,
    args: &[&str],
) -> Result<serde_json::Value, String> {
    let mut cmd = command(url, dir, LOOPBACK).unwrap();
    cmd.args(["--invite", invite, "--name", "Bea"]).args(args);
    let (status, stdout, stderr) = run(cmd, WAIT).await.unwrap();
    if !status.success() {
        return Err(stderr);
    }
    let last = stdout.lines().last().unwrap_or_default();
    Ok(serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {stdout}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_listed_verified_by_safety_code_and_a_changed_one_accepted() {
    let server = start_server(Limits::default()).await.unwrap();
    let url = server.ws_url();
    let invite = "Q".repeat(43);
    let (dir_a, dir_b) = (config_dir("trust-a").unwrap(), config_dir("trust-b").unwrap());
    let start_ada = |dir: &std::path::Path| {
        let mut a = command(&url, dir, LOOPBACK).unwrap();
        a.args(["--invite", &invite, "--name", "Ada", "up"]);
        NativePeer::spawn(a).unwrap()
    };
    let mut a = start_ada(&dir_a);
    let ada = a.expect_event("identity", WAIT).await.unwrap();
    let code = ada["safety_code"].as_str().unwrap().to_string();

    // First contact: Ada's key is listed as new, with her safety code.
    let list = bea(&url, &dir_b, &invite, &["trust", "--wait", "30"]).await.unwrap();
    let peer = list["peers"].as_array().unwrap().iter().find(|p| p["name"] == "Ada").cloned();
    let peer = peer.unwrap_or_else(|| panic!("{list}"));
    assert_eq!((peer["trust"].as_str(), peer["safety_code"].as_str()), (Some("new"), Some(&*code)));

    // A wrong code is refused and changes nothing; without a code (no terminal) it asks
    // for one; the right code verifies.
    let err = bea(&url, &dir_b, &invite, &["trust", "verify", "Ada", "--code", "12345"]).await;
    assert!(err.as_ref().unwrap_err().contains("the safety codes differ"), "{err:?}");
    let err = bea(&url, &dir_b, &invite, &["trust", "verify", "Ada"]).await;
    assert!(err.as_ref().unwrap_err().contains("give --code"), "{err:?}");
    let spaced: String = code.chars().filter(char::is_ascii_digit).collect();
    let done = bea(&url, &dir_b, &invite, &["trust", "verify", "Ada", "--code", &spaced]).await;
    assert_eq!(done.as_ref().map(|d| d["trust"].clone()), Ok("verified".into()), "{done:?}");
    let list = bea(&url, &dir_b, &invite, &["trust", "--wait", "30"]).await.unwrap();
    assert!(list["peers"].as_array().unwrap().iter().any(|p| p["trust"] == "verified"), "{list}");

    // Ada reinstalls: same name, new key. Bea sees it changed, cannot verify it, accepts it.
    a.terminate(WAIT).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir_a);
    let dir_a2 = config_dir("trust-a2").unwrap();
    let mut a = start_ada(&dir_a2);
    let ada2 = a.expect_event("identity", WAIT).await.unwrap();
    let code2 = ada2["safety_code"].as_str().unwrap().to_string();
    assert_ne!(code, code2);
    let list = bea(&url, &dir_b, &invite, &["trust", "--wait", "30"]).await.unwrap();
    let peer = list["peers"].as_array().unwrap().iter().find(|p| p["name"] == "Ada").cloned();
    assert_eq!(peer.map(|p| p["trust"].clone()), Some("changed".into()), "{list}");
    let err = bea(&url, &dir_b, &invite, &["trust", "verify", "Ada", "--code", &code2]).await;
    assert!(err.as_ref().unwrap_err().contains("pinned to another key"), "{err:?}");
    // The name no longer names the new key (an impostor could have taken it): a message
    // to "Ada" is refused and says why; her new safety code still reaches her.
    let err = bea(&url, &dir_b, &invite, &["msg", "Ada", "the plan", "--timeout", "30"]).await;
    assert!(err.as_ref().unwrap_err().contains("Ada's key changed"), "{err:?}");
    let by_code =
        bea(&url, &dir_b, &invite, &["msg", &code2, "hi new Ada", "--timeout", "30"]).await;
    assert_eq!(by_code.as_ref().map(|d| d["event"].clone()), Ok("sent".into()), "{by_code:?}");
    a.expect("the message sent by key", WAIT, |v| v["text"] == "hi new Ada").await.unwrap();
    assert!(!a.seen.iter().any(|v| v["text"] == "the plan"), "sent by a changed name");
    let done = bea(&url, &dir_b, &invite, &["trust", "accept", "Ada", "--code", &code2]).await;
    assert_eq!(done.as_ref().map(|d| d["trust"].clone()), Ok("verified".into()), "{done:?}");
    assert_eq!(done.unwrap()["done"], "accepted and verified");

    a.terminate(WAIT).await.unwrap();
    server.shutdown(Duration::from_secs(2)).await;
    for dir in [dir_a2, dir_b] {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// One device (one config directory, one `identity.key`) shows a key of each network's
/// own, the same one each time it comes back: a member of two networks cannot tell by key
/// that it meets the same device in both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_has_a_key_of_its_own_in_each_network() {
    let server = start_server(Limits::default()).await.unwrap();
    let url = server.ws_url();
    let dir = config_dir("per-network").unwrap();
    let identity_in = |invite: String| {
        let (url, dir) = (url.clone(), dir.clone());
        async move {
            let mut up = command(&url, &dir, LOOPBACK).unwrap();
            up.args(["--invite", &invite, "--name", "Ada", "up"]);
            let mut peer = NativePeer::spawn(up).unwrap();
            let id = peer.expect_event("identity", WAIT).await.unwrap();
            assert!(peer.terminate(WAIT).await.unwrap().success());
            id["fingerprint"].as_str().unwrap().to_string()
        }
    };
    let one = identity_in("Q".repeat(43)).await;
    let two = identity_in("g".repeat(43)).await;
    assert_ne!(one, two);
    assert_eq!(identity_in("Q".repeat(43)).await, one);
    server.shutdown(Duration::from_secs(2)).await;
    let _ = std::fs::remove_dir_all(dir);
}

/// Two native peers in a passphrase network connect (each pair checks the passphrase with
/// a PAKE before anything else); a third with a wrong passphrase is refused with a plain
/// reason, and a member counts its attempt and says so: an event, and a line in `status`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_network_connects_and_counts_a_wrong_passphrase() {
    let server = start_server(Limits::default()).await.unwrap();
    let url = server.ws_url();
    let network = format!("team-{}", std::process::id());
    let passphrase = "correct horse battery staple";
    let (dir_a, dir_b, dir_m) =
        (config_dir("pa").unwrap(), config_dir("pb").unwrap(), config_dir("pm").unwrap());
    let member = |dir: &std::path::Path, name: &str| {
        let mut c = command(&url, dir, LOOPBACK).unwrap();
        c.env("WEFT_PASSPHRASE", passphrase).args(["--network", &network, "--name", name, "up"]);
        NativePeer::spawn(c).unwrap()
    };
    let mut a = member(&dir_a, "Ada");
    let mut b = member(&dir_b, "Bea");
    let a_sees = a.expect_direct("Ada sees Bea", WAIT, |_| true).await.unwrap();
    b.expect("Bea sees Ada", WAIT, |v| v["event"] == "peer_connected").await.unwrap();
    assert_eq!(a_sees["name"], "Bea", "{a_sees}");

    let mut m = command(&url, &dir_m, LOOPBACK).unwrap();
    m.env("WEFT_PASSPHRASE", "incorrect horse");
    m.args(["--network", &network, "--name", "Mallory", "msg", "Ada", "let me in"]);
    let (status, stdout, stderr) = run(m, WAIT).await.unwrap();
    assert!(!status.success(), "{stdout}\n{stderr}");
    assert!(stderr.contains("wrong passphrase"), "{stderr}");
    let counted = a
        .expect("Ada counts the attempt", WAIT, |v| v["event"] == "passphrase_failures")
        .await
        .unwrap();
    assert_eq!(counted["failures"], 1, "{counted}");

    // `status` asks the running `up`.
    let mut status = text_command(&url, &dir_a, LOOPBACK).unwrap();
    status.env("WEFT_PASSPHRASE", passphrase).args(["--network", &network, "status"]);
    let (code, stdout, stderr) = run(status, WAIT).await.unwrap();
    assert!(code.success(), "{stdout}\n{stderr}");
    let mallory = counted["peer_id"].as_str().unwrap();
    let line = format!("1 failed passphrase attempt from peer {mallory}");
    assert!(stdout.contains(&line), "{stdout}");

    for p in [&mut a, &mut b] {
        p.terminate(WAIT).await.unwrap();
    }
    server.shutdown(Duration::from_secs(2)).await;
}
