//! Errors of model loading, adapters and training: each names the file, tensor or field at
//! fault so that the person reading it can fix the input.

use std::path::PathBuf;

/// What went wrong while loading a checkpoint, an adapter or running the model.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A `config.json` or `adapter_config.json` is not what we can use.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint's `model_type` is not one this trainer implements.
    #[error(
        "unsupported model_type {0:?}: supported are llama, mistral, qwen2, smollm (Llama family) and gpt2"
    )]
    UnsupportedModel(String),
    /// A safetensors file is malformed.
    #[error("{path}: invalid safetensors: {reason}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A tensor the architecture needs is not in the checkpoint.
    #[error("tensor {name:?} is missing from {location}")]
    MissingTensor {
        /// The tensor name.
        name: String,
        /// The directory or file searched.
        location: String,
    },
    /// A tensor has another shape than the config implies.
    #[error("tensor {name:?} has shape {found:?}, but the config implies {expected:?}")]
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The shape in the file.
        found: Vec<usize>,
        /// The shape the config implies.
        expected: Vec<usize>,
    },
    /// A tensor has a dtype we cannot convert to f32.
    #[error("tensor {name:?} has dtype {dtype}, supported are F32, F16 and BF16")]
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// Input ids or other arguments do not fit the model.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A burn tensor could not be read back from the device.
    #[error("device error: {0}")]
    Device(String),
    /// The work was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
}

impl TrainerError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A config error on `path`.
    pub fn config(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Config {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Result with [`TrainerError`].
pub type Result<T, E = TrainerError> = std::result::Result<T, E>;
