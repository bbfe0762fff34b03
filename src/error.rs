//! One error type for the whole crate.
//!
//! Every failure on bad input is a typed variant carrying its context (byte position, key path,
//! expected vs found) so that callers can match on the kind and users get one clear line. Errors
//! raised while reading a file are wrapped once in [`Error::File`], which adds the path; use
//! [`Error::root`] to match on the underlying kind.

use std::path::PathBuf;

/// Result alias used throughout tlens.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in tlens.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An error that happened while reading or writing a particular file.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        #[source]
        /// What went wrong in it.
        source: Box<Error>,
    },

    /// Operating-system I/O failure.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The bytes do not start like any format tlens reads.
    #[error("unrecognised file format: {0}")]
    UnknownFormat(String),

    /// The zip container of a torch file is malformed or uses a feature torch never writes.
    #[error("zip container: {0}")]
    Zip(String),

    /// A required zip record or storage is missing.
    #[error("missing record '{0}' in the archive")]
    MissingRecord(String),

    /// The pickle stream ended before a complete opcode or before STOP.
    #[error("pickle truncated at byte {pos}: {what}")]
    PickleEof {
        /// Byte offset where the data ran out.
        pos: usize,
        /// What was being read.
        what: &'static str,
    },

    /// An opcode byte that is not part of pickle protocols 0-5.
    #[error("unknown pickle opcode 0x{opcode:02x} at byte {pos}")]
    PickleOpcode {
        /// Byte offset of the opcode.
        pos: usize,
        /// The byte.
        opcode: u8,
    },

    /// An opcode that tlens deliberately does not execute (out-of-band buffers, extension registry).
    #[error("unsupported pickle opcode {name} at byte {pos}")]
    PickleUnsupported {
        /// Byte offset of the opcode.
        pos: usize,
        /// The opcode's name.
        name: &'static str,
    },

    /// The stack or mark stack does not hold what the opcode needs.
    #[error("malformed pickle at byte {pos} ({opcode}): {msg}")]
    PickleStack {
        /// Byte offset of the opcode.
        pos: usize,
        /// The opcode's name.
        opcode: &'static str,
        /// What was wrong.
        msg: String,
    },

    /// A memo lookup for an index that was never stored.
    #[error("pickle memo index {index} not found (at byte {pos})")]
    PickleMemo {
        /// Byte offset of the lookup.
        pos: usize,
        /// The memo index asked for.
        index: u64,
    },

    /// A limit that protects against hostile files was exceeded (`at`: the key path inside
    /// the file, when known; empty otherwise).
    #[error("limit exceeded{}: {what} (limit {limit}, found {found})", at_path(at))]
    Limit {
        /// What was limited.
        what: &'static str,
        /// The limit.
        limit: u64,
        /// What the file asked for.
        found: u64,
        /// Where in the file (key path), when known.
        at: String,
    },

    /// A section of the file is shorter than its header says.
    #[error("truncated {what}: needs {needed} bytes, {available} available")]
    Truncated {
        /// What was cut short.
        what: String,
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },

    /// A tensor view reaches outside its storage.
    #[error(
        "tensor '{tensor}': view needs {needed} elements of storage '{storage}' but it holds {available}"
    )]
    StorageBounds {
        /// The tensor's name.
        tensor: String,
        /// The storage's key.
        storage: String,
        /// Elements the view needs.
        needed: u64,
        /// Elements the storage holds.
        available: u64,
    },

    /// A key that the layout requires is absent.
    #[error("{context}: missing key '{key}'")]
    MissingKey {
        /// Where the key was expected.
        context: String,
        /// The key.
        key: String,
    },

    /// A value has the wrong type.
    #[error("{context}: expected {expected}, found {found}")]
    Type {
        /// Where the value was found.
        context: String,
        /// The type expected.
        expected: String,
        /// The type found.
        found: String,
    },

    /// A tensor has the wrong shape.
    #[error("{name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor's name.
        name: String,
        /// The shape expected.
        expected: Vec<usize>,
        /// The shape found.
        found: Vec<usize>,
    },

    /// A value is well-typed but not acceptable (e.g. a config field out of range).
    #[error("{context}: invalid value: {msg}")]
    Invalid {
        /// Where the value was found.
        context: String,
        /// What is wrong with it.
        msg: String,
    },

    /// The requested device cannot be used (see `backend::device`).
    #[error("{0}")]
    Device(String),

    /// Drawing a figure failed.
    #[error("plot: {0}")]
    Plot(String),

    /// The file is readable but holds no single training run (a sweep, losses only, a bare
    /// tensor, …): `tlens inspect` describes it as a tree.
    #[error("not a training run: {0} (`tlens inspect` shows what it holds)")]
    NotARun(String),

    /// The model is not a modular-arithmetic model on inputs `[a, b, =]` (another task of the
    /// 2022 code, a TorchScript module, …): commands that evaluate the task refuse it.
    #[error("not a modular-arithmetic model: {0}")]
    NotModularArithmetic(String),

    /// The run's train/test split or its labels cannot be known from the file.
    #[error("train/test data unknown: {0}")]
    UnknownData(String),

    /// A hook, or a `--names` term, that matches no hook point of the model (TL raises too).
    #[error("no hook point matches '{name}' in this model (its hook points include {known})")]
    UnknownHook {
        /// The name or term given.
        name: String,
        /// Some of the model's hook points.
        known: String,
    },

    /// Something valid that tlens does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// JSON parsing or writing failed.
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),

    /// The safetensors crate rejected a file.
    #[error("safetensors: {0}")]
    Safetensors(String),
}

fn at_path(at: &str) -> String {
    if at.is_empty() {
        String::new()
    } else {
        format!(" at {at}")
    }
}

/// Longest text from a file that an error message quotes (a hostile file must not be able to
/// make an error message of gigabytes).
const MAX_QUOTE: usize = 400;

/// `s`, cut to [`MAX_QUOTE`] characters.
pub(crate) fn clip(s: impl Into<String>) -> String {
    let s = s.into();
    if s.len() <= MAX_QUOTE {
        return s;
    }
    let mut end = MAX_QUOTE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

impl Error {
    /// A limit error (no key path yet; [`Error::at`] adds one).
    pub(crate) fn limit(what: &'static str, limit: u64, found: u64) -> Error {
        Error::Limit {
            what,
            limit,
            found,
            at: String::new(),
        }
    }

    /// Prefix the key path of a limit error with `key` (other errors are returned unchanged).
    pub(crate) fn at(self, key: &str) -> Error {
        match self {
            Error::Limit {
                what,
                limit,
                found,
                at,
            } => Error::Limit {
                what,
                limit,
                found,
                at: if at.is_empty() {
                    clip(key)
                } else if key.is_empty() {
                    at
                } else {
                    format!("{}.{at}", clip(key))
                },
            },
            e => e,
        }
    }

    /// The innermost error, with any [`Error::File`] wrappers removed.
    pub fn root(&self) -> &Error {
        match self {
            Error::File { source, .. } => source.root(),
            e => e,
        }
    }

    /// Attach a path to an error (once; an error that already names a file keeps its path).
    pub fn in_file(self, path: impl Into<PathBuf>) -> Error {
        match self {
            e @ Error::File { .. } => e,
            e => Error::File {
                path: path.into(),
                source: Box::new(e),
            },
        }
    }

    pub(crate) fn type_err(
        context: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> Error {
        Error::Type {
            context: clip(context),
            expected: expected.into(),
            found: clip(found),
        }
    }

    pub(crate) fn missing(context: impl Into<String>, key: impl Into<String>) -> Error {
        Error::MissingKey {
            context: clip(context),
            key: clip(key),
        }
    }

    pub(crate) fn invalid(context: impl Into<String>, msg: impl Into<String>) -> Error {
        Error::Invalid {
            context: clip(context),
            msg: clip(msg),
        }
    }
}

/// Extension to attach a file path to any fallible result.
pub trait WithPath<T> {
    /// Attach `path` to the error, if any.
    fn with_path(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T, E: Into<Error>> WithPath<T> for std::result::Result<T, E> {
    fn with_path(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| e.into().in_file(path))
    }
}
