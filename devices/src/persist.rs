//! Saving and restoring a device's guest-visible state.
//!
//! Every device implements [`Persist`]: `save` captures every register and
//! queue index at a quiescent point (vCPUs paused, device thread parked),
//! `restore` checks the whole state first and applies it only when all of
//! it is acceptable, so a bad snapshot never leaves a device half-restored.

use serde::{de::DeserializeOwned, Serialize};

/// Why a saved state cannot be applied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PersistError {
    /// The state does not fit this device (another type, queue count...).
    #[error("device state does not match the device: {0}")]
    Mismatch(String),
    /// The state is internally inconsistent.
    #[error("invalid device state: {0}")]
    Invalid(String),
}

/// Save and restore of a device's state.
pub trait Persist {
    /// The saved form.
    type State: Serialize + DeserializeOwned + Clone + std::fmt::Debug;
    /// Captures the state.
    fn save(&self) -> Self::State;
    /// Checks that `state` could be applied, changing nothing (restore
    /// checks it too).
    fn validate(&self, _state: &Self::State) -> Result<(), PersistError> {
        Ok(())
    }
    /// Applies `state`, all or nothing.
    fn restore(&mut self, state: &Self::State) -> Result<(), PersistError>;
}
