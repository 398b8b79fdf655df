//! `weft-peer` on other systems: `cargo check -p weft-peer` for macOS and Windows, so that
//! Linux-only code (netlink, nftables, Unix sockets, tun-rs's offloads) stays behind its
//! `cfg` and those builds keep compiling. A check, not a build: a few seconds once the
//! targets' dependencies are checked, and nothing is linked.
//!
//! rustup adds each target's standard library (a download; skipped, saying why, when it
//! cannot). Dependencies with C in them (`ring`) compile it in their build scripts even for
//! a check, which needs the target's C headers: Apple's SDK is not installable here, so the
//! C compiler for these targets is a stub that compiles nothing ([`STUB_CC`]); `cargo
//! check` links nothing, so every line of Rust is still checked for the target.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result};

use crate::{have, output_of, run_cmd, status_within};

/// The targets checked besides this machine's.
pub const TARGETS: [&str; 2] = ["x86_64-apple-darwin", "x86_64-pc-windows-gnu"];

/// A C compiler for a `cargo check`: answers cc-rs's family probe as clang (`-E` prints
/// `"clang"`, the MSVC probe `-?` fails) and writes an empty object for `-o FILE`.
const STUB_CC: &str = r#"#!/bin/sh
# Written by cargo xtask (xtask/src/platforms.rs): compiles nothing, for `cargo check`.
for a in "$@"; do
  [ "$a" = "-?" ] && exit 1
  [ "$a" = "-E" ] && { echo '"clang"'; exit 0; }
done
out=""
while [ $# -gt 0 ]; do
  [ "$1" = "-o" ] && { out="$2"; shift; }
  shift
done
[ -n "$out" ] && : > "$out"
exit 0
"#;

/// Checks `weft-peer` for each of [`TARGETS`] that can be had; says why it skips one.
pub fn check(root: &Path) -> Result<()> {
    if !have("ar") {
        println!(
            "xtask: SKIP the macOS and Windows checks: `ar` is missing (apt-get install binutils)"
        );
        return Ok(());
    }
    let stub = write_stub(root)?;
    for target in TARGETS {
        if let Some(why) = missing_target(target)? {
            println!("xtask: SKIP the {target} check: {why}");
            continue;
        }
        let var = target.replace('-', "_");
        run_cmd(
            Command::new("cargo")
                .args(["check", "-p", "weft-peer", "--target", target])
                .env(format!("CC_{var}"), &stub)
                .env(format!("AR_{var}"), "ar")
                // Warnings there are errors as they are on Linux (clippy's -D warnings);
                // with --target, RUSTFLAGS leave the host's build scripts alone.
                .env("RUSTFLAGS", "-D warnings")
                .env("CARGO_INCREMENTAL", "0"),
        )?;
    }
    Ok(())
}

/// Why `target` cannot be checked (`None`: it can): rustup adds it if it is missing.
fn missing_target(target: &str) -> Result<Option<String>> {
    let installed = || {
        output_of("rustup", &["target", "list", "--installed"])
            .is_some_and(|s| s.lines().any(|l| l.trim() == target))
    };
    if installed() {
        return Ok(None);
    }
    if !have("rustup") {
        return Ok(Some("no rustup to add the target with".into()));
    }
    println!("xtask: adding the {target} target with rustup (120 s at most)");
    let mut cmd = Command::new("rustup");
    cmd.args(["target", "add", target]);
    Ok(match status_within(&mut cmd, Duration::from_secs(120))? {
        Some(s) if s.success() && installed() => None,
        Some(s) => Some(format!("rustup could not add it ({s}; offline?)")),
        None => Some("rustup timed out (offline?)".into()),
    })
}

/// Writes [`STUB_CC`] into the target directory, executable; its path.
fn write_stub(root: &Path) -> Result<PathBuf> {
    let dir = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("xtask");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("stub-cc");
    std::fs::write(&path, STUB_CC).with_context(|| format!("writing {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(path)
}
