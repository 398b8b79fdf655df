//! `cargo xtask`: one entry point for setting up, building, running, testing and
//! benchmarking Weft on a fresh machine. Every step checks what is already there and
//! installs only what is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

mod fuzz;
mod platforms;

const WASM_TARGET: &str = "wasm32-unknown-unknown";
const WASM_CRATE: &str = "weft-wasm";
const WASM_PROFILE: &str = "wasm-release";
/// Debian's packages that give a wasm32 build without rustup's target (see
/// shared/TOOLCHAIN.md): rustc 1.96 with std sources, and lld as the linker.
const DEBIAN_WASM_PACKAGES: &[&str] = &["rustc-web", "cargo-web", "rust-web-src", "lld-22"];
const DEBIAN_BROWSER_PACKAGES: &[&str] = &["chromium", "chromium-driver"];
/// What the network namespace tests (tests/src/netns.rs) run: (program, its version flag,
/// Debian package).
/// `iptables` is for the test of a subnet router whose host has no `nft`.
const NETNS_TOOLS: &[(&str, &str, &str)] = &[
    ("ip", "-V", "iproute2"),
    ("nft", "--version", "nftables"),
    ("iptables", "--version", "iptables"),
];
/// What `bench tun` compares Weft's TUN with, from Debian: (program, its version flag,
/// package). wireguard-go 0.0.20220316 and wireguard-tools are Debian 12's; `ping` measures
/// ICMP echo through every tunnel alike.
const TUN_BENCH_TOOLS: &[(&str, &str, &str)] = &[
    ("iperf3", "--version", "iperf3"),
    ("wireguard-go", "--version", "wireguard-go"),
    ("wg", "--version", "wireguard-tools"),
    ("ping", "-V", "iputils-ping"),
];
/// What the cluster tests and `bench signal` run beside `weft-signal --cluster`: Debian's
/// `nats-server` (2.9.10 in Debian 12, with JetStream). The install does not start it (no
/// systemd here); tests and benches start their own on a free loopback port.
const NATS_TOOLS: &[(&str, &str, &str)] = &[("nats-server", "--version", "nats-server")];
/// boringtun's command line (a current Rust userspace WireGuard), built from crates.io
/// into `target/tools` at this version: the one the anchors in issue #12 were measured with.
const BORINGTUN_CLI_VERSION: &str = "0.7.1";

#[derive(Debug, Parser)]
#[command(about = "Weft's build, run, test and bench tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what is missing, build the web app and the server, and run the server.
    Run {
        /// Arguments for weft-signal, e.g. `-- --listen 0.0.0.0:8443 --self-signed`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Install what is missing and run every check and test (fmt, clippy, unit,
    /// integration and browser tests).
    Test {
        /// Only run tests whose names contain this (passed to the test runner).
        filter: Option<String>,
    },
    /// Run a benchmark; each prints lines `BENCH <metric> <value> <unit>`.
    Bench {
        /// Which benchmark (omit to list them).
        name: Option<String>,
    },
    /// Install cargo-fuzz if missing and fuzz weft-core's parsers (targets in fuzz/).
    Fuzz {
        /// Only this target (omit for all of them).
        target: Option<String>,
        /// How long to fuzz each target, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Check that weft-peer compiles for macOS and Windows (`cargo check`; adds the
    /// targets with rustup, or says why it skips one). `test` runs it too.
    CheckPlatforms,
    /// Install what is missing and build the web app bundle into target/web-dist.
    Bundle,
    /// Build the npm package (the module, its workers, types) into target/npm/weft and
    /// pack it (`npm pack`) into target/npm/weft-<version>.tgz.
    Package,
    /// Only install what is missing (wasm toolchain, wasm-bindgen, Chromium, nftables, npm,
    /// nats-server).
    Setup,
}

/// Benchmarks by name: (name, what it measures).
const BENCHES: &[(&str, &str)] = &[
    (
        "signal",
        "relay throughput vs. a raw forwarder; 10,000 peers, churn; 3 processes on NATS vs. 1",
    ),
    ("session", "encrypted sessions in Chromium: join to first message, KDF, WASM vs native AEAD"),
    ("transfer", "file transfer in Chromium vs. a raw data channel, two seeders, receiver RSS"),
    ("native", "weft-peer file transfer vs. a raw webrtc-rs data channel; Chromium to weft-peer"),
    ("transport", "native transport AEAD: seal GB/s on ring vs. RustCrypto, seal+open MB/s"),
    (
        "relay",
        "across real NATs (netns, root): NAT matrix, connect time, relayed vs. direct, TURN/TCP",
    ),
    (
        "tun",
        "IP through weft-peer's TUN vs. wireguard-go, boringtun and the raw veth (netns, root)",
    ),
];

/// Benchmarks that drive Chromium and so need the browser and the built bundle.
const BROWSER_BENCHES: &[&str] = &["session", "transfer", "native"];

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.task {
        Task::Setup => {
            let wasm = ensure_wasm_toolchain()?;
            ensure_wasm_bindgen(&root)?;
            ensure_npm()?;
            ensure_browser()?;
            ensure_netns_tools()?;
            ensure_nats()?;
            println!("xtask: ready ({wasm:?} wasm toolchain)");
        }
        Task::CheckPlatforms => platforms::check(&root)?,
        Task::Bundle => {
            build_bundle(&root, Hooks::Shipped)?;
        }
        Task::Package => {
            build_package(&root)?;
        }
        Task::Run { args } => run(&root, &args)?,
        Task::Test { filter } => test(&root, filter.as_deref())?,
        Task::Bench { name } => bench(&root, name.as_deref())?,
        Task::Fuzz { target, seconds } => fuzz::run_targets(&root, target.as_deref(), seconds)?,
    }
    Ok(())
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(Path::to_path_buf).context("xtask is not inside the workspace")
}

fn web_dist(root: &Path, hooks: Hooks) -> PathBuf {
    let dir = match hooks {
        Hooks::Shipped => "target/web-dist",
        Hooks::Bench => "target/web-dist-bench",
    };
    if keep_names() { root.join(format!("{dir}-names")) } else { root.join(dir) }
}

/// Whether the module carries the exports only a benchmark calls (weft-wasm's
/// `bench-hooks` feature: `benchTransferCpu`, an in-page transfer between two engines,
/// 3 KB of the module as brotli). `cargo xtask bench transfer` builds that variant into
/// `target/web-dist-bench`; everything else, the shipped app included, goes without.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hooks {
    Shipped,
    Bench,
}

/// A profiling variant of the bundle: `WEFT_BUNDLE_NAMES=1` (or a profiled bench,
/// `WEFT_BENCH_PROFILE=1`) keeps the module's function names, so a DevTools CPU profile
/// shows Rust functions instead of `wasm-function[1234]`; it goes to
/// `target/web-dist-names`, never to the shipped `target/web-dist`.
fn keep_names() -> bool {
    ["WEFT_BUNDLE_NAMES", "WEFT_BENCH_PROFILE"]
        .iter()
        .any(|k| std::env::var(k).is_ok_and(|v| v == "1"))
}

// ---------------------------------------------------------------------------------------
// Running commands

fn show(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().to_string();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    println!("xtask: $ {}", show(cmd));
    let status = cmd.status().with_context(|| format!("cannot start `{}`", show(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", show(cmd));
    }
    Ok(())
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).to_string())
}

fn have(program: &str) -> bool {
    have_with(program, "--version")
}

/// `program version_flag` runs and succeeds.
fn have_with(program: &str, version_flag: &str) -> bool {
    Command::new(program)
        .arg(version_flag)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd`, killing it after `limit`. `Ok(None)` means it timed out.
fn status_within(cmd: &mut Command, limit: Duration) -> Result<Option<ExitStatus>> {
    let mut child = cmd.spawn().with_context(|| format!("cannot start `{}`", show(cmd)))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn apt_install(packages: &[&str]) -> Result<()> {
    apt_install_with(packages, &[])
}

/// [`apt_install`] with extra `apt-get install` options.
fn apt_install_with(packages: &[&str], options: &[&str]) -> Result<()> {
    if !have("apt-get") {
        bail!("missing {}: install them with your system's package manager", packages.join(", "));
    }
    println!("xtask: installing Debian packages: {}", packages.join(" "));
    let env = [("DEBIAN_FRONTEND", "noninteractive")];
    run_cmd(Command::new("apt-get").args(["update", "-q"]).envs(env))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(options)
            .args(packages)
            .envs(env),
    )
}

// ---------------------------------------------------------------------------------------
// Toolchain

/// How to build for wasm32 on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WasmToolchain {
    /// rustup's `wasm32-unknown-unknown` target.
    Rustup,
    /// Debian's rustc with `-Zbuild-std` (no rustup target available).
    DebianBuildStd,
}

fn rustup_has_wasm() -> bool {
    output_of("rustup", &["target", "list", "--installed"])
        .is_some_and(|s| s.lines().any(|l| l.trim() == WASM_TARGET))
}

fn debian_wasm_ready() -> bool {
    Path::new("/usr/bin/rustc").exists()
        && Path::new("/usr/bin/cargo").exists()
        && Path::new("/usr/bin/rust-lld").exists()
        && Path::new("/usr/lib/rustlib/src/rust/library/Cargo.lock").exists()
}

fn ensure_wasm_toolchain() -> Result<WasmToolchain> {
    if rustup_has_wasm() {
        return Ok(WasmToolchain::Rustup);
    }
    if debian_wasm_ready() {
        return Ok(WasmToolchain::DebianBuildStd);
    }
    if have("rustup") {
        println!("xtask: adding the {WASM_TARGET} target with rustup (60 s at most)");
        let mut cmd = Command::new("rustup");
        cmd.args(["target", "add", WASM_TARGET]);
        match status_within(&mut cmd, Duration::from_secs(60))? {
            Some(s) if s.success() && rustup_has_wasm() => return Ok(WasmToolchain::Rustup),
            Some(s) => println!("xtask: rustup could not add the target ({s})"),
            None => println!("xtask: rustup timed out (no download server?)"),
        }
    }
    println!("xtask: falling back to Debian's rustc with build-std");
    apt_install(DEBIAN_WASM_PACKAGES)?;
    if !debian_wasm_ready() {
        bail!("Debian's wasm toolchain is still incomplete after installing it");
    }
    Ok(WasmToolchain::DebianBuildStd)
}

/// The version of a package in Cargo.lock.
fn locked_version(root: &Path, package: &str) -> Result<String> {
    let lock = std::fs::read_to_string(root.join("Cargo.lock")).context("reading Cargo.lock")?;
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == format!("name = \"{package}\"") {
            if let Some(v) = lines.next().and_then(|l| l.strip_prefix("version = \"")) {
                return Ok(v.trim_end_matches('"').to_string());
            }
        }
    }
    bail!("{package} is not in Cargo.lock")
}

fn ensure_wasm_bindgen(root: &Path) -> Result<()> {
    let version = locked_version(root, "wasm-bindgen")?;
    let installed = output_of("wasm-bindgen", &["--version"]).unwrap_or_default();
    if installed.split_whitespace().nth(1) == Some(version.as_str()) {
        return Ok(());
    }
    println!("xtask: installing wasm-bindgen-cli {version} (once; a few minutes)");
    let locked = run_cmd(Command::new("cargo").args([
        "install",
        "wasm-bindgen-cli",
        "--version",
        &version,
        "--locked",
    ]));
    if let Err(e) = locked {
        // Its lock file can name a crate version the registry no longer serves.
        println!("xtask: --locked install failed ({e}); retrying with fresh dependencies");
        run_cmd(Command::new("cargo").args([
            "install",
            "wasm-bindgen-cli",
            "--version",
            &version,
        ]))?;
    }
    Ok(())
}

/// Node.js and npm, to pack the npm package (and install it in tests): Debian's.
fn ensure_npm() -> Result<()> {
    if have("npm") && have("node") {
        return Ok(());
    }
    apt_install(&["nodejs", "npm"])
}

fn ensure_browser() -> Result<()> {
    if Path::new("/usr/bin/chromium").exists() && Path::new("/usr/bin/chromedriver").exists() {
        return Ok(());
    }
    apt_install(DEBIAN_BROWSER_PACKAGES)
}

fn ensure_nats() -> Result<()> {
    let missing = missing_packages(NATS_TOOLS);
    if missing.is_empty() {
        return Ok(());
    }
    apt_install_with(&missing, &["--no-install-recommends"])
        .context("the cluster tests and bench signal need nats-server (Debian package)")
}

fn ensure_netns_tools() -> Result<()> {
    let missing = missing_packages(NETNS_TOOLS);
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing)
}

/// The packages of `tools` whose program does not run.
fn missing_packages<'a>(tools: &[(&str, &str, &'a str)]) -> Vec<&'a str> {
    tools
        .iter()
        .filter(|(program, flag, _)| !have_with(program, flag))
        .map(|(_, _, package)| *package)
        .collect()
}

/// What `bench tun` runs besides Weft: the Debian tools ([`TUN_BENCH_TOOLS`]) and
/// `boringtun-cli` built into `<target>/tools`; the path of `boringtun-cli`.
fn ensure_tun_bench_tools(target: &Path) -> Result<PathBuf> {
    ensure_netns_tools()?;
    let missing = missing_packages(TUN_BENCH_TOOLS);
    if !missing.is_empty() {
        // Without recommends: wireguard-tools recommends a kernel image (there is no
        // kernel WireGuard here anyway; the bench runs both userspace implementations).
        apt_install_with(&missing, &["--no-install-recommends"])
            .with_context(|| format!("bench tun needs {} (Debian packages)", missing.join(", ")))?;
        let still = missing_packages(TUN_BENCH_TOOLS);
        if !still.is_empty() {
            bail!("bench tun needs {}, still missing after apt-get install", still.join(", "));
        }
    }
    let root = target.join("tools");
    let boringtun = root.join("bin/boringtun-cli");
    let installed = Command::new(&boringtun)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    if installed.split_whitespace().nth(1) != Some(BORINGTUN_CLI_VERSION) {
        println!("xtask: building boringtun-cli {BORINGTUN_CLI_VERSION} from crates.io (once)");
        run_cmd(
            Command::new("cargo")
                .args(["install", "--locked", "boringtun-cli", "--version"])
                .arg(BORINGTUN_CLI_VERSION)
                .arg("--root")
                .arg(&root),
        )
        .with_context(|| format!("bench tun needs boringtun-cli {BORINGTUN_CLI_VERSION}"))?;
    }
    Ok(boringtun)
}

// ---------------------------------------------------------------------------------------
// Building

/// Where the app's content-hashed files go inside the bundle: `a/<hash>/` (served as
/// immutable by the server; the server knows this prefix too).
const VERSIONED_DIR: &str = "a";
/// The web/ files that belong to the wasm module rather than to the page: they travel with
/// it (in the bundle's `pkg/` and in the npm package), located relative to the module.
const MODULE_ASSETS: &[&str] = &["download-writer.js", "sw.js", "stream-download.js"];

/// Builds the wasm module and its JavaScript (wasm-bindgen) into
/// `target/wasm/pkg`, with the workers beside it; returns that folder.
fn build_module(root: &Path, hooks: Hooks) -> Result<PathBuf> {
    let toolchain = ensure_wasm_toolchain()?;
    ensure_wasm_bindgen(root)?;
    let target_dir = root.join("target/wasm");
    let mut cmd = match toolchain {
        WasmToolchain::Rustup => Command::new("cargo"),
        WasmToolchain::DebianBuildStd => {
            let mut cmd = Command::new("/usr/bin/cargo");
            cmd.env("RUSTC", "/usr/bin/rustc").env("RUSTC_BOOTSTRAP", "1");
            cmd
        }
    };
    cmd.args(["build", "--profile", WASM_PROFILE, "--target", WASM_TARGET, "-p", WASM_CRATE])
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS");
    if toolchain == WasmToolchain::DebianBuildStd {
        cmd.arg("-Zbuild-std=std,panic_abort");
    }
    if hooks == Hooks::Bench {
        cmd.args(["--features", "weft-wasm/bench-hooks"]);
    }
    // A variant for a measurement, never shipped: say
    // `WEFT_BUNDLE_CARGO_CONFIG='profile.wasm-release.package.weft-core.opt-level=3'`
    // (cargo reads no environment variable for a package's profile).
    if let Some(config) = std::env::var_os("WEFT_BUNDLE_CARGO_CONFIG") {
        cmd.arg("--config").arg(config);
    }
    run_cmd(&mut cmd)?;
    let wasm = target_dir.join(WASM_TARGET).join(WASM_PROFILE).join("weft_wasm.wasm");

    let pkg = target_dir.join("pkg");
    // Start empty: a file removed from web/ must not linger in the app.
    if pkg.exists() {
        std::fs::remove_dir_all(&pkg)?;
    }
    // Function names (a sixth of the module) only help a debugger: not shipped (but kept
    // in the profiling variant, `keep_names`).
    let mut bindgen = Command::new("wasm-bindgen");
    bindgen.args(["--target", "web"]);
    if !keep_names() {
        bindgen.arg("--remove-name-section");
    }
    run_cmd(bindgen.arg("--remove-producers-section").arg("--out-dir").arg(&pkg).arg(&wasm))?;
    // No wasm-opt pass: binaryen 108 (Debian 12's) took 2.4 % off this module after
    // wasm-bindgen but pointed the `__wbindgen_externrefs` export at the funcref table (the
    // page failed with "WebAssembly.Table.set(): Argument 1 is invalid"). binaryen 132
    // (npm's `binaryen`, with every feature rustc emits enabled) shrank it uncompressed but
    // not on the wire, which is what counts: at opt-level 3, -O3/-Os/-Oz took 1503 KB to
    // 1456/1410/1438 KB and brotli 381.7 KB to 382.8/383.2/383.5 KB; on today's "z" build,
    // -Oz took 1129 to 1127 KB and brotli 301.3 to 323.1 KB (worse).
    let bg = pkg.join("weft_wasm_bg.wasm");
    check_wasm_imports(&bg)?;
    for asset in MODULE_ASSETS {
        std::fs::copy(root.join("web").join(asset), pkg.join(asset))?;
    }
    let size = std::fs::metadata(&bg)?.len();
    println!("xtask: wasm module in {} ({} KiB)", pkg.display(), size / 1024);
    Ok(pkg)
}

/// The web app in `target/web-dist`: `index.html` (generated: it names the current
/// version), and everything else under `a/<content hash>/`, each text file also
/// precompressed (`.br`, `.gz`) for the server to pick by `Accept-Encoding`.
fn build_bundle(root: &Path, hooks: Hooks) -> Result<PathBuf> {
    ensure_npm()?;
    let pkg = build_module(root, hooks)?;
    let dist = web_dist(root, hooks);
    if dist.exists() {
        std::fs::remove_dir_all(&dist)?;
    }
    let staging = dist.join(".staging");
    copy_dir(&root.join("web"), &staging)?;
    for asset in MODULE_ASSETS {
        std::fs::remove_file(staging.join(asset))?;
    }
    std::fs::remove_file(staging.join("index.html"))?;
    copy_dir(&pkg, &staging.join("pkg"))?;
    minify(&ensure_npm_tools(root)?, &staging)?;
    let hash = tree_hash(&staging)?;
    let versioned = format!("{VERSIONED_DIR}/{hash}");
    std::fs::create_dir_all(dist.join(VERSIONED_DIR))?;
    std::fs::rename(&staging, dist.join(&versioned))?;
    let html = std::fs::read_to_string(root.join("web/index.html"))?;
    std::fs::write(dist.join("index.html"), versioned_html(&html, &versioned)?)?;
    let (raw, br) = precompress_dir(&dist)?;
    println!(
        "xtask: web app in {} (version {hash}; {} KiB, {} KiB as brotli)",
        dist.display(),
        raw / 1024,
        br / 1024
    );
    Ok(dist)
}

/// Minifies every `.js` and `.css` under `dir` in place (esbuild, no bundling: each file
/// stays a module of its own, imports and exports untouched). The first visit downloads
/// them all: brotli of the app's JavaScript and CSS 38.4 -> 26.9 KB.
fn minify(tools: &Path, dir: &Path) -> Result<()> {
    let mut files = Vec::new();
    list_files(dir, &mut files)?;
    files.retain(|f| f.extension().is_some_and(|e| e == "js" || e == "css"));
    run_cmd(
        Command::new(tools.join("node_modules/.bin/esbuild"))
            .args(&files)
            .args(["--minify", "--allow-overwrite", "--log-level=warning"])
            .arg(format!("--outdir={}", dir.display()))
            .arg(format!("--outbase={}", dir.display())),
    )
}

/// `index.html` with its references to the app (`style.css`, `app.js`, the module) pointing into
/// the versioned folder. Fails if they are not there, so a changed page cannot silently
/// load an unversioned (and so stale-cached) file.
fn versioned_html(html: &str, versioned: &str) -> Result<String> {
    let mut out = html.to_string();
    for attr in ["href=\"style.css\"", "href=\"pkg/weft_wasm.js\"", "src=\"app.js\""] {
        if !out.contains(attr) {
            bail!("web/index.html no longer has {attr}: update xtask's versioned_html");
        }
        let (name, file) = attr.split_once('=').context("attribute")?;
        let file = file.trim_matches('"');
        out = out.replace(attr, &format!("{name}=\"{versioned}/{file}\""));
    }
    Ok(out)
}

/// The first 16 hex digits of SHA-256 over every file's path and bytes, in path order.
fn tree_hash(dir: &Path) -> Result<String> {
    use sha2::Digest;
    let mut files = Vec::new();
    list_files(dir, &mut files)?;
    files.sort();
    let mut hasher = sha2::Sha256::new();
    for file in &files {
        let rel = file.strip_prefix(dir)?.to_string_lossy().to_string();
        let bytes = std::fs::read(file)?;
        hasher.update((rel.len() as u64).to_le_bytes());
        hasher.update(rel.as_bytes());
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

fn list_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            list_files(&entry.path(), out)?;
        } else {
            out.push(entry.path());
        }
    }
    Ok(())
}

/// Extensions worth compressing (the rest, say images, already are).
const COMPRESSIBLE: &[&str] = &["html", "js", "css", "wasm", "json", "svg"];

/// Writes `F.br` (brotli, quality 11) and `F.gz` (gzip, level 9) beside every compressible
/// file under `dir`; returns the total size of those files and of their brotli forms.
fn precompress_dir(dir: &Path) -> Result<(u64, u64)> {
    let mut files = Vec::new();
    list_files(dir, &mut files)?;
    let (mut raw, mut br) = (0, 0);
    for file in files {
        let ext = file.extension().and_then(|e| e.to_str()).unwrap_or_default();
        if !COMPRESSIBLE.contains(&ext) {
            continue;
        }
        let bytes = std::fs::read(&file)?;
        raw += bytes.len() as u64;
        let mut brotli_bytes = Vec::new();
        let params =
            brotli::enc::BrotliEncoderParams { quality: 11, lgwin: 24, ..Default::default() };
        brotli::BrotliCompress(&mut bytes.as_slice(), &mut brotli_bytes, &params)?;
        br += brotli_bytes.len() as u64;
        std::fs::write(append_ext(&file, "br"), brotli_bytes)?;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut gz, &bytes)?;
        std::fs::write(append_ext(&file, "gz"), gz.finish()?)?;
    }
    Ok((raw, br))
}

/// `a/b.js` + `br` → `a/b.js.br`.
fn append_ext(file: &Path, ext: &str) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".");
    name.push(ext);
    PathBuf::from(name)
}

/// Where `cargo xtask package` puts the package folder and its tarball.
fn npm_dir(root: &Path) -> PathBuf {
    root.join("target/npm")
}

/// The npm package: the module (`weft_wasm.js`, its `.wasm`, its snippets and types) and
/// the two workers beside it, with a `package.json` whose `exports` name each; packed by
/// `npm pack`. Returns the tarball.
fn build_package(root: &Path) -> Result<PathBuf> {
    ensure_npm()?;
    let pkg = build_module(root, Hooks::Shipped)?;
    let out = npm_dir(root);
    let dir = out.join("weft");
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    copy_dir(&pkg, &dir)?;
    std::fs::copy(root.join("wasm/NPM-README.md"), dir.join("README.md"))?;
    let version = env!("CARGO_PKG_VERSION");
    let manifest = serde_json::json!({
        "name": "weft",
        "version": version,
        "description": "Encrypted peer-to-peer messaging and file transfer in the browser (WebRTC, HPKE), through a Weft signaling server.",
        "license": env!("CARGO_PKG_LICENSE"),
        "type": "module",
        "main": "./weft_wasm.js",
        "types": "./weft_wasm.d.ts",
        "exports": {
            ".": { "types": "./weft_wasm.d.ts", "default": "./weft_wasm.js" },
            "./weft_wasm_bg.wasm": "./weft_wasm_bg.wasm",
            "./download-writer.js": "./download-writer.js",
            "./sw.js": "./sw.js",
            "./stream-download.js": "./stream-download.js",
            "./package.json": "./package.json"
        },
        // The workers and snippets are loaded by URL or imported on demand: keep them.
        "sideEffects": ["./snippets/*", "./download-writer.js", "./sw.js", "./stream-download.js"],
        "files": [
            "weft_wasm.js", "weft_wasm.d.ts", "weft_wasm_bg.wasm", "weft_wasm_bg.wasm.d.ts",
            "snippets/", "download-writer.js", "sw.js", "stream-download.js", "README.md"
        ]
    });
    std::fs::write(dir.join("package.json"), serde_json::to_string_pretty(&manifest)? + "\n")?;
    run_cmd(
        Command::new("npm")
            .args(["pack", "--silent", "--pack-destination"])
            .arg(&out)
            .current_dir(&dir),
    )?;
    let tarball = out.join(format!("weft-{version}.tgz"));
    if !tarball.is_file() {
        bail!("npm pack did not write {}", tarball.display());
    }
    println!("xtask: npm package in {} and {}", dir.display(), tarball.display());
    let tools = ensure_npm_tools(root)?;
    api_reference(&tools, &dir, &out)?;
    typecheck_examples(root, &tools, &tarball)?;
    Ok(tarball)
}

/// The npm tools the package step runs, pinned, installed into `target/npm-tools`:
/// TypeScript checks the examples against the package's types, TypeDoc turns those types
/// into the API reference.
/// esbuild minifies the web app's JavaScript and CSS.
const NPM_TOOLS: &[(&str, &str)] =
    &[("typescript", "5.9.3"), ("typedoc", "0.28.20"), ("esbuild", "0.28.2")];
/// The examples whose JavaScript `tsc` checks (`// @ts-check`, their `tsconfig.json`).
const TYPED_EXAMPLES: &[&str] = &["examples/plain"];

/// Installs [`NPM_TOOLS`] into `target/npm-tools` unless each is there at its version;
/// returns that folder.
fn ensure_npm_tools(root: &Path) -> Result<PathBuf> {
    let tools = root.join("target/npm-tools");
    let installed = |name: &str| -> Option<String> {
        let manifest = tools.join("node_modules").join(name).join("package.json");
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(manifest).ok()?).ok()?;
        json["version"].as_str().map(str::to_string)
    };
    if NPM_TOOLS.iter().any(|(name, version)| installed(name).as_deref() != Some(*version)) {
        std::fs::create_dir_all(&tools)?;
        run_cmd(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--prefix"])
                .arg(&tools)
                .args(NPM_TOOLS.iter().map(|(name, version)| format!("{name}@{version}"))),
        )?;
    }
    Ok(tools)
}

/// Where `cargo xtask package` writes the API reference: HTML, and the same as JSON (what
/// the tests read).
fn api_dir(out: &Path) -> (PathBuf, PathBuf) {
    (out.join("api"), out.join("api.json"))
}

/// The API reference, by TypeDoc from the package's `weft_wasm.d.ts` (the declarations
/// wasm-bindgen and tsify generate from the Rust code, doc comments included), with the
/// package README (the guide) as its first page, into [`api_dir`]. Fails on any TypeDoc
/// warning, and unless every declaration the module exports is in it.
fn api_reference(tools: &Path, package: &Path, out: &Path) -> Result<()> {
    let (html, json) = api_dir(out);
    let tsconfig = out.join("tsconfig.api.json");
    let config = serde_json::json!({
        "compilerOptions": {
            "strict": true, "target": "es2022", "module": "es2022",
            "moduleResolution": "bundler", "lib": ["esnext", "dom"]
        },
        "files": [package.join("weft_wasm.d.ts")]
    });
    std::fs::write(&tsconfig, serde_json::to_string_pretty(&config)?)?;
    run_cmd(
        Command::new(tools.join("node_modules/.bin/typedoc"))
            .arg("--entryPoints")
            .arg(package.join("weft_wasm.d.ts"))
            .arg("--tsconfig")
            .arg(&tsconfig)
            .arg("--readme")
            .arg(package.join("README.md"))
            .args(["--name", "weft", "--treatWarningsAsErrors", "--disableSources"])
            .arg("--out")
            .arg(&html)
            .arg("--json")
            .arg(&json),
    )?;
    let declared = std::fs::read_to_string(package.join("weft_wasm.d.ts"))?;
    let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(&json)?)?;
    let documented: Vec<&str> = reference["children"]
        .as_array()
        .context("the API reference lists nothing")?
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    let missing: Vec<&str> = exported_names(&declared)
        .into_iter()
        .filter(|name| !documented.contains(name) && *name != "__wbg_init")
        .collect();
    if !missing.is_empty() {
        bail!("the API reference leaves out {missing:?}");
    }
    println!("xtask: API reference in {} ({} declarations)", html.display(), documented.len());
    Ok(())
}

/// The names a `.d.ts` exports at its top level (`export class|interface|type|function N`).
fn exported_names(declarations: &str) -> Vec<&str> {
    declarations
        .lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|rest| {
            let rest = rest.strip_prefix("default ").unwrap_or(rest);
            let (_, rest) = rest.split_once(' ')?;
            let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
            Some(&rest[..end])
        })
        .collect()
}

/// Installs the package from `tarball` into each example and runs `tsc --noEmit` on it:
/// the types wasm-bindgen and tsify generate from the Rust API must fit how it is used.
fn typecheck_examples(root: &Path, tools: &Path, tarball: &Path) -> Result<()> {
    let tsc = tools.join("node_modules/.bin/tsc");
    for example in TYPED_EXAMPLES {
        let dir = root.join(example);
        // A package of the same version but new bytes must replace the old one.
        let old = dir.join("node_modules/weft");
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        run_cmd(
            Command::new("npm")
                .args(["install", "--no-audit", "--no-fund", "--offline", "--no-package-lock"])
                .arg(tarball)
                .current_dir(&dir),
        )?;
        run_cmd(Command::new(&tsc).args(["--noEmit", "-p"]).arg(&dir))?;
    }
    build_vite_example(root)?;
    Ok(())
}

/// Builds `examples/vite` (the package through a bundler) into `examples/vite/dist`; its
/// `package.json` names the package's tarball and a pinned Vite. Returns `dist`.
fn build_vite_example(root: &Path) -> Result<PathBuf> {
    let dir = root.join("examples/vite");
    let old = dir.join("node_modules/weft");
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    run_cmd(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--no-package-lock"])
            .current_dir(&dir),
    )?;
    run_cmd(Command::new("npx").args(["--no-install", "vite", "build"]).current_dir(&dir))?;
    Ok(dir.join("dist"))
}

/// Fails when the module imports from `env`: the sign of native-only code in the bundle.
fn check_wasm_imports(wasm: &Path) -> Result<()> {
    let bytes = std::fs::read(wasm)?;
    let mut modules = std::collections::BTreeSet::new();
    for payload in wasmparser::Parser::new(0).parse_all(&bytes) {
        if let wasmparser::Payload::ImportSection(reader) = payload? {
            for import in reader.into_imports() {
                modules.insert(import?.module.to_string());
            }
        }
    }
    if modules.contains("env") {
        bail!("{} imports from `env`: native-only code leaked into the wasm build", wasm.display());
    }
    println!("xtask: wasm imports only from {modules:?}");
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let dest = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &dest)?;
        } else {
            std::fs::copy(entry.path(), &dest)?;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Tasks

fn run(root: &Path, args: &[String]) -> Result<()> {
    let dist = build_bundle(root, Hooks::Shipped)?;
    run_cmd(Command::new("cargo").args(["build", "--release", "-p", "weft-signal"]))?;
    let mut server = Command::new(root.join("target/release/weft-signal"));
    server.arg("--web-root").arg(&dist).args(args);
    println!("xtask: $ {}", show(&server));
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Replace this process, so Ctrl-C and SIGTERM reach the server directly.
        let err = server.exec();
        bail!("cannot start weft-signal: {err}");
    }
    #[cfg(not(unix))]
    run_cmd(&mut server)
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    let started = Instant::now();
    ensure_browser()?;
    ensure_netns_tools()?;
    ensure_nats()?;
    let dist = build_bundle(root, Hooks::Shipped)?;
    // The npm package, installed from its tarball by a browser test.
    let package = build_package(root)?;
    if have("rustfmt") {
        run_cmd(Command::new("cargo").args(["fmt", "--all", "--check"]))?;
    }
    // No incremental caches: a one-shot run gains nothing from them and they were a third of
    // the target directory (disk, not time, is what a CI machine runs out of).
    run_cmd(
        Command::new("cargo")
            .args(["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])
            .env("CARGO_INCREMENTAL", "0"),
    )?;
    platforms::check(root)?;
    let nextest = Command::new("cargo")
        .args(["nextest", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut cmd = Command::new("cargo");
    cmd.env("CARGO_INCREMENTAL", "0");
    if nextest {
        cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
    } else {
        cmd.args(["test", "--workspace", "--no-fail-fast"]);
    }
    if let Some(filter) = filter {
        cmd.arg(filter);
    }
    // The binaries the end-to-end tests run as processes, built once here (tests would
    // otherwise each run cargo for them).
    run_cmd(
        Command::new("cargo")
            .args(["build", "-p", "weft-peer", "--bin", "weft-peer"])
            .args(["-p", "weft-signal", "--bin", "weft-signal"])
            .env("CARGO_INCREMENTAL", "0"),
    )?;
    let bins = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("debug");
    cmd.env("WEFT_PEER_BIN", bins.join("weft-peer"))
        .env("WEFT_SIGNAL_BIN", bins.join("weft-signal"));
    // Browser and network namespace tests must run here, not skip: the browser, the bundle,
    // iproute2 and nftables are installed (and CI runs as root).
    cmd.env("WEFT_REQUIRE_BROWSER", "1")
        .env("WEFT_REQUIRE_NETNS", "1")
        .env("WEFT_REQUIRE_NATS", "1")
        .env("WEFT_WEB_ROOT", &dist);
    cmd.env("WEFT_NPM_PACKAGE", &package);
    if nextest && filter.is_none() {
        // nextest does not run doctests; run them first so the summary comes last.
        run_cmd(
            Command::new("cargo")
                .args(["test", "--workspace", "--doc"])
                .env("CARGO_INCREMENTAL", "0"),
        )?;
    }
    run_cmd(&mut cmd)?;
    if filter.is_none() {
        // The vendored webrtc and rtc-ice are no workspace members, so `--workspace` skips
        // their tests; run those of what Weft patched there (webrtc's TURN relayer, whose
        // TCP/TLS framing is the workspace's `weft-turn-framing`, tested with the workspace;
        // and the ICE agent, all of its unit tests: renomination and upstream's). Builds of
        // their own (their features unify apart from the workspace's): minutes, once.
        run_cmd(
            Command::new("cargo")
                .args(["test", "-p", "webrtc", "--lib", "transport::turn_"])
                .env("CARGO_INCREMENTAL", "0"),
        )?;
        run_cmd(
            Command::new("cargo")
                .args(["test", "-p", "rtc-ice", "--lib"])
                .env("CARGO_INCREMENTAL", "0"),
        )?;
        fuzz::run_fuzz(root, 15)?;
    }
    println!("xtask: all checks passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn bench(root: &Path, name: Option<&str>) -> Result<()> {
    let Some(name) = name else {
        println!("Benchmarks (cargo xtask bench <name>):");
        for (name, what) in BENCHES {
            println!("  {name:10} {what}");
        }
        return Ok(());
    };
    if !BENCHES.iter().any(|(n, _)| *n == name) {
        let names: Vec<&str> = BENCHES.iter().map(|(n, _)| *n).collect();
        bail!("no benchmark {name:?}; there are: {}", names.join(", "));
    }
    // The bench and the binaries it runs as processes, built in one cargo invocation: built
    // apart (the bench's own `cargo build` of weft-peer), cargo unified features differently
    // and rebuilt webrtc and its kin for each, about 5 minutes per bench.
    run_cmd(
        Command::new("cargo")
            .args(["build", "--release", "-p", "weft-tests", "--bin", "weft-bench"])
            .args(["-p", "weft-peer", "--bin", "weft-peer"])
            .args(["-p", "weft-signal", "--bin", "weft-signal"]),
    )?;
    let release = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| root.join("target"), PathBuf::from)
        .join("release");
    let mut cmd = Command::new(release.join("weft-bench"));
    cmd.arg(name)
        .env("WEFT_PEER_BIN", release.join("weft-peer"))
        .env("WEFT_SIGNAL_BIN", release.join("weft-signal"));
    if BROWSER_BENCHES.contains(&name) {
        ensure_browser()?;
        // The transfer bench calls `benchTransferCpu`, which the shipped module leaves out.
        let hooks = if name == "transfer" { Hooks::Bench } else { Hooks::Shipped };
        let dist = build_bundle(root, hooks)?;
        cmd.env("WEFT_WEB_ROOT", dist);
    }
    if name == "relay" {
        ensure_netns_tools()?;
    }
    if name == "signal" {
        ensure_nats()?;
    }
    if name == "tun" {
        let target = release.parent().context("no target directory")?;
        cmd.env("WEFT_BORINGTUN_BIN", ensure_tun_bench_tools(target)?);
    }
    run_cmd(&mut cmd)
}
