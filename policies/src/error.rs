//! The one error type of `rlhf-policies`. Every variant names the file and the field or tensor
//! at fault, so a user can fix a bad checkpoint without reading our code.

use std::path::{Path, PathBuf};

/// Errors from loading, saving and running models and tokenizers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    /// Reading or writing a file failed.
    ///
    /// The OS error is part of the message and not also a `source()`, so that an error chain
    /// (anyhow's `Caused by:`) does not print it twice.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        error: std::io::Error,
    },
    /// A config field is missing, malformed or unsupported.
    #[error("{file}: field `{field}`: {msg}")]
    Config {
        /// The file (or `<json>` before it is known).
        file: String,
        /// The offending field.
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// A weights file is malformed, or a tensor is missing, extra or of the wrong shape.
    #[error("{file}: tensor `{tensor}`: {msg}")]
    Tensor {
        /// The file.
        file: String,
        /// The tensor name.
        tensor: String,
        /// What is wrong.
        msg: String,
    },
    /// A tokenizer file could not be read, or does not fit the model.
    #[error("{file}: {field}: {msg}")]
    Tokenizer {
        /// The file.
        file: String,
        /// The field (e.g. `vocab_size`, `model`).
        field: String,
        /// What is wrong.
        msg: String,
    },
    /// Invalid arguments to a model call (shapes, ids out of range, sampling options).
    #[error("invalid input: {0}")]
    Input(String),
    /// An error from the tensor backend.
    #[error("device error: {0}")]
    Device(String),
}

impl PolicyError {
    /// An I/O error on `path`.
    pub fn io(path: &Path, error: std::io::Error) -> Self {
        PolicyError::Io { path: path.to_path_buf(), error }
    }

    /// A config error on `field` (the file is filled in by [`PolicyError::in_file`]).
    pub fn config(field: impl Into<String>, msg: String) -> Self {
        PolicyError::Config { file: "<json>".into(), field: field.into(), msg }
    }

    /// A tensor error in `file`.
    pub fn tensor(file: &Path, tensor: impl Into<String>, msg: impl Into<String>) -> Self {
        PolicyError::Tensor { file: file.display().to_string(), tensor: tensor.into(), msg: msg.into() }
    }

    /// A tokenizer error in `file`.
    pub fn tokenizer(file: impl Into<String>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        PolicyError::Tokenizer { file: file.into(), field: field.into(), msg: msg.into() }
    }

    /// Attaches the file name to a config error parsed from text.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            PolicyError::Config { field, msg, .. } => {
                PolicyError::Config { file: path.display().to_string(), field, msg }
            }
            other => other,
        }
    }
}

/// Maps dfdx's device errors (allocation failures) into ours.
pub(crate) fn dev_err<E: std::fmt::Debug>(e: E) -> PolicyError {
    PolicyError::Device(format!("{e:?}"))
}
