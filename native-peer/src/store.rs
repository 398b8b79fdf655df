//! What the native peer keeps on disk: its long-term identity key and, per network, the
//! trust store (pinned keys by peer name).
//!
//! The directory is `--config-dir`, or `WEFT_CONFIG_DIR`, or the user's config directory
//! (`~/.config/weft` on Linux). The key file is created with mode 0600 (never chmod-ed
//! afterwards) and refused if group or others can read it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use weft_core::identity::{IDENTITY_SECRET_LEN, IdentityKeyPair};
use weft_core::rand_core::CryptoRng;
use weft_core::signal::RoomId;
use weft_core::trust::TrustStore;
use zeroize::Zeroizing;

/// The identity key's file name inside the config directory.
pub const IDENTITY_FILE: &str = "identity.key";

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No config directory was given and the system has none.
    #[error("no config directory: pass --config-dir or set WEFT_CONFIG_DIR")]
    NoConfigDir,
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which one.
        path: PathBuf,
        /// What went wrong.
        source: io::Error,
    },
    /// The key file is readable by group or others.
    #[error(
        "refusing to use the identity key {path}: it is readable by group or others \
         (mode {mode:03o}); make it private with `chmod 600 {path}` if nobody else could \
         have read it, or delete it to make a new identity"
    )]
    #[cfg_attr(not(unix), allow(dead_code))]
    KeyFileExposed {
        /// The file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold a key.
    #[error("the identity key {path} is damaged: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The trust store does not parse.
    #[error("the trust store {path} is damaged: {reason}")]
    BadTrustStore {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

/// The config directory and what is in it.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The directory `explicit` (from `--config-dir` / `WEFT_CONFIG_DIR`), or the user's
    /// config directory's `weft` folder. Created (mode 0700) if missing.
    pub fn open(explicit: Option<PathBuf>) -> Result<Self, StoreError> {
        let dir = match explicit {
            Some(dir) => dir,
            None => dirs::config_dir().ok_or(StoreError::NoConfigDir)?.join("weft"),
        };
        create_private_dir(&dir)?;
        Ok(Self { dir })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Our identity: loaded, or created on first use.
    pub fn load_or_create_identity(
        &self,
        rng: &mut impl CryptoRng,
    ) -> Result<IdentityKeyPair, StoreError> {
        let path = self.dir.join(IDENTITY_FILE);
        match load_identity(&path) {
            Err(StoreError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            other => return other,
        }
        let identity = IdentityKeyPair::generate(rng);
        match create_private_file(&path) {
            Ok(mut file) => {
                let hex = Zeroizing::new(to_hex(identity.secret_bytes().as_ref()));
                file.write_all(hex.as_bytes())
                    .and_then(|()| file.write_all(b"\n"))
                    .and_then(|()| file.sync_all())
                    .map_err(io_error(&path))?;
                tracing::info!("created a new identity key in {}", path.display());
                Ok(identity)
            }
            // Another weft-peer made it at the same moment: use that one.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => load_identity(&path),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    fn trust_path(&self, room: &RoomId) -> PathBuf {
        self.dir.join("trust").join(format!("{room}.json"))
    }

    /// The trust store of the network whose room is `room` (empty if none yet).
    pub fn load_trust(&self, room: &RoomId) -> Result<TrustStore, StoreError> {
        let path = self.trust_path(room);
        match fs::read_to_string(&path) {
            Ok(json) => TrustStore::from_json(&json)
                .map_err(|e| StoreError::BadTrustStore { path, reason: e.to_string() }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(TrustStore::new()),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    /// Saves the trust store of `room` (written to a new file, then renamed over the old).
    pub fn save_trust(&self, room: &RoomId, trust: &TrustStore) -> Result<(), StoreError> {
        let path = self.trust_path(room);
        if let Some(parent) = path.parent() {
            create_private_dir(parent)?;
        }
        let tmp = path.with_extension(format!("json.{}.tmp", std::process::id()));
        let _ = fs::remove_file(&tmp);
        let mut file = create_private_file(&tmp).map_err(io_error(&tmp))?;
        file.write_all(trust.to_json().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error(&tmp))?;
        fs::rename(&tmp, &path).map_err(io_error(&path))
    }
}

fn load_identity(path: &Path) -> Result<IdentityKeyPair, StoreError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    check_private(&file, path)?;
    let mut text = Zeroizing::new(String::new());
    file.read_to_string(&mut text).map_err(io_error(path))?;
    let bad = |reason| StoreError::BadKeyFile { path: path.to_path_buf(), reason };
    let hex = text.trim();
    if hex.len() != 2 * IDENTITY_SECRET_LEN {
        return Err(bad("expected 64 hexadecimal digits"));
    }
    let mut secret = Zeroizing::new([0u8; IDENTITY_SECRET_LEN]);
    for (i, byte) in secret.iter_mut().enumerate() {
        let pair = hex.get(2 * i..2 * i + 2).ok_or_else(|| bad("not hexadecimal"))?;
        *byte = u8::from_str_radix(pair, 16).map_err(|_| bad("not hexadecimal"))?;
    }
    Ok(IdentityKeyPair::from_secret_bytes(&secret))
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(unix)]
fn check_private(file: &File, path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = file.metadata().map_err(io_error(path))?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(StoreError::KeyFileExposed { path: path.to_path_buf(), mode });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_file: &File, _path: &Path) -> Result<(), StoreError> {
    Ok(())
}

/// Creates `path` (which must not exist) readable and writable by its owner only.
fn create_private_file(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    options.open(path)
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_error(dir))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("weft-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn rng() -> getrandom::rand_core::UnwrapErr<getrandom::SysRng> {
        getrandom::rand_core::UnwrapErr(getrandom::SysRng)
    }

    #[cfg(unix)]
    #[test]
    fn the_key_is_created_private_kept_and_refused_when_exposed() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = temp_dir("key");
        let store = Store::open(Some(dir.clone())).unwrap();
        let first = store.load_or_create_identity(&mut rng()).unwrap();
        let path = dir.join(IDENTITY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = store.load_or_create_identity(&mut rng()).unwrap();
        assert_eq!(first.public(), again.public());

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = store.load_or_create_identity(&mut rng()).unwrap_err();
        assert!(matches!(err, StoreError::KeyFileExposed { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");

        fs::write(&path, "not a key").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = store.load_or_create_identity(&mut rng()).unwrap_err();
        assert!(matches!(err, StoreError::BadKeyFile { .. }), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn trust_stores_are_kept_per_network() {
        let dir = temp_dir("trust");
        let store = Store::open(Some(dir.clone())).unwrap();
        let room = RoomId::new("room-1").unwrap();
        let mut trust = store.load_trust(&room).unwrap();
        let fp = IdentityKeyPair::generate(&mut rng()).public().fingerprint();
        trust.observe("Alice", &fp);
        store.save_trust(&room, &trust).unwrap();
        let loaded = store.load_trust(&room).unwrap();
        assert!(loaded.check("Alice", &fp).is_some());
        let other = store.load_trust(&RoomId::new("room-2").unwrap()).unwrap();
        assert!(other.check("Alice", &fp).is_none());
        fs::remove_dir_all(&dir).unwrap();
    }
}
