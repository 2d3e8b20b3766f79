//! The one error type of the checkpoint library. Every variant names the file, and where it applies the
//! tensor or metadata field, so that a user can tell what is wrong with which input without a debugger.

use std::path::PathBuf;

use tessera_kernels::quant::QuantError;
use thiserror::Error;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Error)]
pub enum Error {
    /// The operating system refused an operation on a file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file's bytes do not follow its format; `msg` names the field or structure.
    #[error("{path}: {msg}")]
    Malformed { path: PathBuf, msg: String },
    /// A tensor's element type or byte size is not something Tessera can use.
    #[error("{path}: tensor `{tensor}`: {source}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        #[source]
        source: QuantError,
    },
    /// A valid file of a kind or with a feature Tessera does not read; `msg` says what to do instead.
    #[error("{path}: {msg}")]
    Unsupported { path: PathBuf, msg: String },
    /// A required metadata key or config field is absent.
    #[error("{path}: missing {key}")]
    Missing { path: PathBuf, key: String },
    /// The requested topology cannot be planned for this model.
    #[error("shard plan: {0}")]
    Plan(String),
}

impl Error {
    pub fn malformed(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Malformed {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
