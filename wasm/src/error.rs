//! What can go wrong in the browser's own part of Weft (storage, files, the page's
//! arguments). The node's errors are `weft_core::node::NodeError`; these are the driver's.
//! `Display` gives the plain words the page shows.

use std::fmt;

use wasm_bindgen::prelude::*;
use weft_core::node::NodeError;
use weft_core::transfer::{ParseRootError, WireError};
use weft_core::trust::TrustStoreError;

/// An error of the browser driver.
#[derive(Debug)]
pub(crate) enum WebError {
    /// A browser API failed; its own message.
    Browser(String),
    /// There is no `window` (or document) to use.
    NoWindow,
    /// The browser has no IndexedDB (private mode in some browsers).
    NoIndexedDb,
    /// The saved trust store of this network cannot be read.
    BadTrustStore(TrustStoreError),
    /// A resume record cannot be written.
    BadRecord(String),
    /// The file asked for is not stored in this page.
    NotStored,
    /// A picked file shrank after it was hashed.
    FileShrank,
    /// A picked file cannot be read.
    CannotRead { path: String, reason: String },
    /// An entry of `sendFiles`/`shareFiles` is neither a `File` nor `{ file, path }`.
    NotAFile,
    /// An entry has no path and its blob no name.
    NoPath,
    /// The argument is not a `File`, a `FileList` or an array of files.
    NotFiles,
    /// A path that may not be sent.
    BadPath(WireError),
    /// Every entry was left out (hidden files, device names...; each got a `skipped`
    /// event).
    NothingSendable,
    /// A root (file hash) argument that is not one.
    BadRoot { given: String, error: ParseRootError },
    /// The node refused.
    Node(NodeError),
    /// Offering to one peer failed.
    OfferTo { peer: String, error: NodeError },
    /// The browser cannot show a folder picker.
    NoFolderPicker,
    /// Downloads went straight to the downloads folder, so none is kept in the page.
    NotKept,
}

impl fmt::Display for WebError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Browser(message) => f.write_str(message),
            Self::NoWindow => f.write_str("no window"),
            Self::NoIndexedDb => f.write_str("IndexedDB is not available"),
            Self::BadTrustStore(e) => write!(f, "the saved trust store cannot be read: {e}"),
            Self::BadRecord(e) => write!(f, "a resume record cannot be written: {e}"),
            Self::NotStored => f.write_str("that file is not stored here"),
            Self::FileShrank => f.write_str("the file is shorter than when it was hashed"),
            Self::CannotRead { path, reason } => write!(f, "cannot read {path}: {reason}"),
            Self::NotAFile => f.write_str("each entry must be a File or { file, path }"),
            Self::NoPath => f.write_str("an entry has no path"),
            Self::NotFiles => f.write_str("give a File, a FileList or an array of files"),
            Self::BadPath(e) => e.fmt(f),
            Self::NothingSendable => {
                f.write_str("nothing to send: every file was left out (see the skipped events)")
            }
            Self::BadRoot { given, error } => write!(f, "{given:?}: {error}"),
            Self::Node(e) => e.fmt(f),
            Self::OfferTo { peer, error } => write!(f, "{peer}: {error}"),
            Self::NoFolderPicker => {
                f.write_str("this browser cannot save into a folder; use Save on each file")
            }
            Self::NotKept => f.write_str(
                "this browser saved downloads straight into its downloads folder (it cannot \
                 store them in the page); open them from there",
            ),
        }
    }
}

impl std::error::Error for WebError {}

/// A rejected promise or a thrown exception: its message.
impl From<JsValue> for WebError {
    fn from(e: JsValue) -> Self {
        Self::Browser(js_err(&e))
    }
}

impl From<NodeError> for WebError {
    fn from(e: NodeError) -> Self {
        Self::Node(e)
    }
}

/// A JavaScript error's message.
pub(crate) fn js_err(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .or_else(|| e.as_string())
        .unwrap_or_else(|| format!("{e:?}"))
}

/// For promises the page awaits: rejected with an `Error` carrying the plain words.
impl From<WebError> for JsValue {
    fn from(e: WebError) -> Self {
        JsError::from(e).into()
    }
}
