//! Why a download failed, a shared file stopped being served, a source was dropped or an
//! offer was cancelled: typed reasons whose [`Display`](fmt::Display) is the plain words
//! the user sees.
//!
//! Two of them travel to the peer as text ([`TransferMsg::Missing`] and
//! [`TransferMsg::Cancel`] carry a `reason` string): the engine sends the `Display` text
//! and turns the text it receives back into a reason, so the wire format is unchanged.
//!
//! [`TransferMsg::Missing`]: super::TransferMsg::Missing
//! [`TransferMsg::Cancel`]: super::TransferMsg::Cancel

use std::fmt;

/// Why a download failed for good
/// ([`TransferEvent::FileFailed`](super::TransferEvent::FileFailed),
/// [`Engine::write_failed`](super::Engine::write_failed)).
///
/// The `String`s are the operating system's or the browser's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FailReason {
    /// Every chunk verified, but the root recomputed from them is not the file's:
    /// "verification failed: the file does not match its hash".
    NotVerified,
    /// A file offered before it was hashed: the hashes its sender streamed do not give
    /// the root it sent at the end, so nothing of it is kept: "the sender's file does not
    /// match the hash it sent (changed while it was sent?)".
    WrongRoot,
    /// "the disk is full".
    DiskFull,
    /// The browser's storage is full: "the disk is full (or the browser's storage quota
    /// is used up)".
    QuotaExceeded,
    /// A chunk could not be written: "cannot write the download: {0}".
    Write(String),
    /// The browser cannot store downloads at all: "cannot store downloads in this
    /// browser: {0}".
    NoStorage(String),
    /// The browser's streamed download could not be opened: "cannot start the download:
    /// {0}".
    StreamNotStarted(String),
    /// A write too large for the browser's writer (never happens with chunk-sized
    /// writes): "a write larger than the writer's batch".
    WriteTooLarge,
    /// Every chunk is stored, but the finished file could not be put in its place: "the
    /// file is complete but cannot be saved: {0}".
    NotSaved(String),
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotVerified => {
                f.write_str("verification failed: the file does not match its hash")
            }
            Self::WrongRoot => f.write_str(
                "the sender's file does not match the hash it sent (changed while it was sent?)",
            ),
            Self::DiskFull => f.write_str("the disk is full"),
            Self::QuotaExceeded => {
                f.write_str("the disk is full (or the browser's storage quota is used up)")
            }
            Self::Write(e) => write!(f, "cannot write the download: {e}"),
            Self::NoStorage(e) => write!(f, "cannot store downloads in this browser: {e}"),
            Self::StreamNotStarted(e) => write!(f, "cannot start the download: {e}"),
            Self::WriteTooLarge => f.write_str("a write larger than the writer's batch"),
            Self::NotSaved(e) => write!(f, "the file is complete but cannot be saved: {e}"),
        }
    }
}

/// Why a shared file can no longer be served
/// ([`TransferEvent::ShareFailed`](super::TransferEvent::ShareFailed),
/// [`Engine::read_failed`](super::Engine::read_failed)). Peers fetching it are told, in
/// these words.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShareFailReason {
    /// The file lost bytes since it was hashed: "cannot read the file: the file is shorter
    /// than when it was hashed".
    Shrunk,
    /// Reading failed (the operating system's or the browser's words): "cannot read the
    /// file: {0}".
    Read(String),
}

impl fmt::Display for ShareFailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Shrunk => {
                f.write_str("cannot read the file: the file is shorter than when it was hashed")
            }
            Self::Read(e) => write!(f, "cannot read the file: {e}"),
        }
    }
}

/// Why a source of a download was dropped
/// ([`TransferEvent::SourceDropped`](super::TransferEvent::SourceDropped)); its requests
/// go to the other sources.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Its session ended: "the peer left".
    PeerLeft,
    /// It said it cannot serve the file, in its own words (as they arrived, untrusted):
    /// "it no longer has the file ({0})".
    Missing(String),
    /// "it sent a malformed hash list".
    MalformedHashes,
    /// "it sent a hash list that does not match the file".
    WrongHashes,
    /// The same chunk failed verification twice: "its copy of the file is damaged (a
    /// chunk failed verification twice)".
    DamagedCopy,
    /// Too many chunks in a row failed verification: "it sent chunks that failed
    /// verification".
    BadChunks,
    /// "it did not send the hash list in time".
    HashesTimedOut,
    /// Too many requests in a row timed out: "it stopped answering".
    StoppedAnswering,
}

impl fmt::Display for DropReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PeerLeft => "the peer left",
            Self::Missing(why) => return write!(f, "it no longer has the file ({why})"),
            Self::MalformedHashes => "it sent a malformed hash list",
            Self::WrongHashes => "it sent a hash list that does not match the file",
            Self::DamagedCopy => {
                "its copy of the file is damaged (a chunk failed verification twice)"
            }
            Self::BadChunks => "it sent chunks that failed verification",
            Self::HashesTimedOut => "it did not send the hash list in time",
            Self::StoppedAnswering => "it stopped answering",
        })
    }
}

/// Why an offer was cancelled ([`Engine::cancel`](super::Engine::cancel),
/// [`TransferEvent::Cancelled`](super::TransferEvent::Cancelled)).
///
/// It travels to the peer as its text; the text received is read back with
/// [`CancelReason::from_wire`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CancelReason {
    /// Cancelled without a reason by the user named `{0}`: "cancelled by {0}".
    CancelledBy(String),
    /// A reason in the user's own words, shown as it is (for a peer's cancel, the text
    /// it sent, untrusted).
    Text(String),
}

impl CancelReason {
    const BY: &'static str = "cancelled by ";

    /// The reason a peer sent in a [`TransferMsg::Cancel`](super::TransferMsg::Cancel).
    pub fn from_wire(text: String) -> Self {
        match text.strip_prefix(Self::BY) {
            Some(name) if !name.is_empty() => Self::CancelledBy(name.to_string()),
            _ => Self::Text(text),
        }
    }
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CancelledBy(name) => write!(f, "{}{name}", Self::BY),
            Self::Text(text) => f.write_str(text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_read_as_they_always_did() {
        let fail = [
            (FailReason::NotVerified, "verification failed: the file does not match its hash"),
            (FailReason::DiskFull, "the disk is full"),
            (
                FailReason::QuotaExceeded,
                "the disk is full (or the browser's storage quota is used up)",
            ),
            (FailReason::Write("EIO".into()), "cannot write the download: EIO"),
            (FailReason::NoStorage("x".into()), "cannot store downloads in this browser: x"),
            (FailReason::StreamNotStarted("x".into()), "cannot start the download: x"),
            (FailReason::WriteTooLarge, "a write larger than the writer's batch"),
            (FailReason::NotSaved("x".into()), "the file is complete but cannot be saved: x"),
        ];
        for (reason, text) in fail {
            assert_eq!(reason.to_string(), text);
        }
        assert_eq!(
            ShareFailReason::Shrunk.to_string(),
            "cannot read the file: the file is shorter than when it was hashed"
        );
        assert_eq!(ShareFailReason::Read("gone".into()).to_string(), "cannot read the file: gone");
        let drop = [
            (DropReason::PeerLeft, "the peer left"),
            (
                DropReason::Missing("not shared with you".into()),
                "it no longer has the file (not shared with you)",
            ),
            (DropReason::MalformedHashes, "it sent a malformed hash list"),
            (DropReason::WrongHashes, "it sent a hash list that does not match the file"),
            (
                DropReason::DamagedCopy,
                "its copy of the file is damaged (a chunk failed verification twice)",
            ),
            (DropReason::BadChunks, "it sent chunks that failed verification"),
            (DropReason::HashesTimedOut, "it did not send the hash list in time"),
            (DropReason::StoppedAnswering, "it stopped answering"),
        ];
        for (reason, text) in drop {
            assert_eq!(reason.to_string(), text);
        }
        assert_eq!(CancelReason::CancelledBy("Bob".into()).to_string(), "cancelled by Bob");
        assert_eq!(CancelReason::Text("oops".into()).to_string(), "oops");
    }

    #[test]
    fn a_cancel_reason_survives_the_wire() {
        for reason in [
            CancelReason::CancelledBy("Bob".into()),
            CancelReason::Text("changed my mind".into()),
            CancelReason::Text(String::new()),
            CancelReason::Text("cancelled by ".into()),
        ] {
            assert_eq!(CancelReason::from_wire(reason.to_string()), reason);
        }
    }
}
