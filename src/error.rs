//! The one error type of the library. Every variant knows its exit code, so the CLI maps
//! errors to the documented codes in one place (README "Exit codes").

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or configuration: exit code 1.
    #[error("{0}")]
    Usage(String),
    #[error("config {path}: {message}")]
    Config { path: PathBuf, message: String },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The model is malformed or uses something onnxq does not support: exit code 2.
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    /// The input data is malformed or does not fit the model: exit code 2.
    #[error("{path}: {message}")]
    Data { path: PathBuf, message: String },
    /// A graph invariant broke inside onnxq (a bug, or a pass given a graph it cannot handle).
    #[error("{0}")]
    Graph(String),
    /// tract could not load or run a model.
    #[error("tract: {0}")]
    Runtime(String),
    /// Verification thresholds were not met: exit code 3.
    #[error("verification failed: {0}")]
    Verification(String),
    /// A model breaks a target's Q/DQ rules (`onnxq lint`, or the main job's own output): exit
    /// code 3.
    #[error("lint: {0}")]
    Lint(String),
    /// onnxq's own state is inconsistent (a bug in onnxq, not in the user's model or data):
    /// exit code 4.
    #[error("internal error: {0} (this is a bug in onnxq, please report it with the command and model)")]
    Internal(String),
}

impl Error {
    pub fn model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn data(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Data {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn config(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal(message.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// The process exit code documented in the README.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Usage(_) | Error::Config { .. } => 1,
            Error::Io { .. } | Error::Model { .. } | Error::Data { .. } => 2,
            Error::Graph(_) | Error::Runtime(_) => 2,
            Error::Verification(_) | Error::Lint(_) => 3,
            Error::Internal(_) => 4,
        }
    }
}

/// Renders a tract error chain on one line ("outer: inner: root").
pub(crate) fn tract_error(e: tract_onnx::prelude::TractError) -> Error {
    let chain: Vec<String> = e.chain().map(|c| c.to_string()).collect();
    Error::Runtime(chain.join(": "))
}
