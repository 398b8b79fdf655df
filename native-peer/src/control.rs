//! The control socket of a running `up`: `weft-peer status` asks it for the running node's
//! view (addresses, the TUN device, counters, peers) instead of joining a second time with
//! the same key; `weft-peer down` asks it to leave.
//!
//! A Unix socket in the config directory (mode 0600 inside a 0700 directory: only the
//! owner asks). The protocol is one request line (`status`) and one JSON line back.
//!
//! Unix only for now: elsewhere `up` runs without one (it warns) and `status`, `down` and
//! `ping` say that this platform does not have it yet.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
#[cfg(unix)]
use tokio::net::UnixListener;
#[cfg(unix)]
pub use tokio::net::UnixStream as ControlStream;

/// A control connection where there is none: never made (nothing listens or connects
/// without Unix sockets), but the request and answer code stays one for every platform.
#[cfg(not(unix))]
pub type ControlStream = tokio::io::DuplexStream;

/// Why there is no control socket here.
#[cfg(not(unix))]
fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "the control socket (status, down, ping) is not supported on this platform yet",
    )
}

/// The socket's file name in the config directory.
pub const SOCKET_FILE: &str = "weft-peer.sock";
/// How long either side waits for the other.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest request line read.
const MAX_REQUEST: u64 = 256;

/// The socket of the `up` that uses config directory `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_FILE)
}

/// A listening control socket; its file goes when it is dropped.
#[derive(Debug)]
pub struct ControlListener {
    #[cfg(unix)]
    listener: UnixListener,
    path: PathBuf,
}

impl ControlListener {
    /// Listens in config directory `dir`. `None` if another `up` already answers there;
    /// a socket file nobody answers on (a crashed `up`) is replaced.
    #[cfg(unix)]
    pub fn bind(dir: &Path) -> io::Result<Option<Self>> {
        let path = socket_path(dir);
        if path.exists() {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                return Ok(None);
            }
            std::fs::remove_file(&path)?;
        }
        let listener = UnixListener::bind(&path)?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Some(Self { listener, path }))
    }

    /// Without Unix sockets: an error saying so.
    #[cfg(not(unix))]
    pub fn bind(_dir: &Path) -> io::Result<Option<Self>> {
        Err(unsupported())
    }

    /// The next client.
    #[cfg(unix)]
    pub async fn accept(&self) -> io::Result<ControlStream> {
        Ok(self.listener.accept().await?.0)
    }

    /// Never made without Unix sockets.
    #[cfg(not(unix))]
    pub async fn accept(&self) -> io::Result<ControlStream> {
        Err(unsupported())
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// What a client asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The node's status.
    Status,
    /// Leave (`weft-peer down`): the `up` answers, then leaves and undoes its changes.
    Down,
}

/// Reads a client's request (`None`: not one we know, or it said nothing in time).
pub async fn read_request(stream: &mut ControlStream) -> Option<Request> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST));
    tokio::time::timeout(TIMEOUT, reader.read_line(&mut line)).await.ok()?.ok()?;
    match line.trim() {
        "status" => Some(Request::Status),
        "down" => Some(Request::Down),
        _ => None,
    }
}

/// Sends `answer` as one JSON line, and closes.
pub async fn answer(mut stream: ControlStream, answer: &Value) {
    let line = format!("{answer}\n");
    let _ = tokio::time::timeout(TIMEOUT, stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Asks the `up` running with config directory `dir` for its status; `None` if none runs
/// there, an error if one may but cannot be asked (not our socket, no answer).
pub async fn ask_status(dir: &Path) -> io::Result<Option<Value>> {
    ask(dir, Request::Status).await
}

/// Asks the `up` running with config directory `dir`; `None` if none runs there.
pub async fn ask(dir: &Path, request: Request) -> io::Result<Option<Value>> {
    #[cfg(not(unix))]
    let connected: io::Result<ControlStream> = {
        let _ = socket_path(dir);
        Err(unsupported())
    };
    #[cfg(unix)]
    let connected = ControlStream::connect(socket_path(dir)).await;
    let mut stream = match connected {
        Ok(stream) => stream,
        Err(e)
            if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let ask = async {
        let line: &[u8] = match request {
            Request::Status => b"status\n",
            Request::Down => b"down\n",
        };
        stream.write_all(line).await?;
        let mut line = String::new();
        BufReader::new(&mut stream).read_line(&mut line).await?;
        serde_json::from_str(&line).map_err(io::Error::other)
    };
    match tokio::time::timeout(TIMEOUT, ask).await {
        Ok(answer) => answer.map(Some),
        Err(_) => {
            Err(io::Error::new(io::ErrorKind::TimedOut, "the running weft-peer up did not answer"))
        }
    }
}
