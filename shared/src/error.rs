//! The one error type of the shared library: each variant names the phase that failed and
//! keeps its cause.

use std::path::PathBuf;

/// Everything the shared library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model could not be found in a folder or the Hub cache.
    #[error("{0}")]
    ModelNotFound(String),
    /// A file of the model could not be read.
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A config file is malformed or describes something unsupported.
    #[error("{file}: {message}")]
    Config { file: String, message: String },
    /// Downloading from the Hub failed.
    #[error("downloading {file} of {repo}: {message}")]
    Download { repo: String, file: String, message: String },
    /// The weights could not be loaded.
    #[error("loading weights: {0}")]
    LoadWeights(String),
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A forward pass failed.
    #[error("forward pass: {0}")]
    Forward(#[source] candle_core::Error),
    /// A sequence's state is missing or inconsistent on this stage.
    #[error("{0}")]
    Sequence(String),
    /// The stage's KV pool has too few free blocks for a step.
    #[error("the KV cache is full: the step needs {needed} more blocks, {free} of {total} are free")]
    KvFull { needed: usize, free: usize, total: usize },
    /// A tensor on the wire is malformed.
    #[error("wire tensor: {0}")]
    Wire(String),
    /// Sampling parameters are out of range.
    #[error("{0}")]
    Sampling(String),
    /// Writing a generated model failed.
    #[error("writing model: {0}")]
    WriteModel(String),
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }

    pub(crate) fn config(file: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config { file: file.into(), message: message.into() }
    }
}

/// The first line of an error's message, at most 1,000 characters: what a status message or a
/// one-line CLI error carries (candle appends a backtrace on later lines when RUST_BACKTRACE
/// is set, which would not fit in a gRPC header).
pub fn brief(e: &dyn std::fmt::Display) -> String {
    let text = e.to_string();
    let line = text.lines().next().unwrap_or_default();
    match line.char_indices().nth(1000) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}
