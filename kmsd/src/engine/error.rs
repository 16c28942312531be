//! The engine's refusals and failures. Each maps to one wire error kind; messages name
//! keys, versions and rules, never key material, plaintext or contexts.

use crate::crypto::CryptoError;
use crate::store::StoreError;
use kms_shared::protocol::{ErrorKind, WireError};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    WrongPurpose(String),
    #[error("{0}")]
    VersionDisabled(String),
    #[error("{0}")]
    VersionLimit(String),
    #[error("decryption failed: wrong key, version or context, or a modified ciphertext")]
    DecryptFailed,
    #[error("{0}")]
    PermissionDenied(String),
    #[error("the key store could not record the change: {0}")]
    Store(Arc<StoreError>),
    #[error("cryptographic failure: {0}")]
    Crypto(CryptoError),
    /// A PKCS#11 token failed or refused (its message names the token, never the PIN).
    #[error("{0}")]
    Hsm(crate::hsm::HsmError),
    /// The store holds what this daemon cannot use (a broken reference): no request
    /// could fix it.
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::NotFound(_) => ErrorKind::NotFound,
            EngineError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            EngineError::InvalidArgument(_) => ErrorKind::InvalidArgument,
            EngineError::TooLarge(_) => ErrorKind::TooLarge,
            EngineError::InvalidState(_) => ErrorKind::InvalidState,
            EngineError::WrongPurpose(_) => ErrorKind::WrongPurpose,
            EngineError::VersionDisabled(_) => ErrorKind::VersionDisabled,
            EngineError::VersionLimit(_) => ErrorKind::VersionLimit,
            EngineError::DecryptFailed => ErrorKind::DecryptFailed,
            EngineError::PermissionDenied(_) => ErrorKind::PermissionDenied,
            EngineError::Store(_) | EngineError::Crypto(_) | EngineError::Internal(_) => {
                ErrorKind::Internal
            }
            EngineError::Hsm(e) => e.kind(),
        }
    }

    pub fn to_wire(&self) -> WireError {
        WireError::new(self.kind(), self.to_string())
    }
}

impl From<CryptoError> for EngineError {
    fn from(e: CryptoError) -> Self {
        match e {
            CryptoError::DecryptFailed => EngineError::DecryptFailed,
            other => EngineError::Crypto(other),
        }
    }
}

impl From<crate::hsm::HsmError> for EngineError {
    fn from(e: crate::hsm::HsmError) -> Self {
        match e {
            crate::hsm::HsmError::DecryptFailed => EngineError::DecryptFailed,
            crate::hsm::HsmError::Invalid(m) => EngineError::InvalidArgument(m),
            other => EngineError::Hsm(other),
        }
    }
}

impl From<StoreError> for EngineError {
    fn from(e: StoreError) -> Self {
        EngineError::Store(Arc::new(e))
    }
}

impl From<Arc<StoreError>> for EngineError {
    fn from(e: Arc<StoreError>) -> Self {
        EngineError::Store(e)
    }
}
