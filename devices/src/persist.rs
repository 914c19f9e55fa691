//! Saving and restoring a device's guest-visible state.
//!
//! Every device implements [`Persist`]: `save` captures every register and
//! queue index at a quiescent point (vCPUs paused, device thread parked),
//! `validate` checks a state without touching the device, and `restore`
//! validates first and applies only a state that passed, so a bad snapshot
//! never leaves a device half-restored.
//!
//! A saved state comes from a file or a peer: it is input, not trust. A
//! VMM that restores several devices calls `validate` on every one of them
//! before it restores any, so a load is all or nothing across devices.

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
    /// Checks that `state` is one this device could have saved and can run
    /// from; changes nothing. When it returns `Ok`, `restore` of the same
    /// state succeeds.
    fn validate(&self, state: &Self::State) -> Result<(), PersistError>;
    /// Applies `state`, all or nothing: calls [`Persist::validate`] first.
    fn restore(&mut self, state: &Self::State) -> Result<(), PersistError>;
}
