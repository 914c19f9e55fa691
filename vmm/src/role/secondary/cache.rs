//! The SVM's state cache in COLO mode: a second mapping of guest memory
//! holding the PVM's memory as of the last checkpoint, and the load that
//! brings a running, diverged SVM back to a checkpoint.

use crate::vm::checkpoint::{self, CheckpointError, PageBuffer};
use crate::vm::machine::{Layout, MachineState};
use crate::vm::memory::GuestMemory;
use crate::vm::{RunState, RunningVm, VmError};

/// Why a COLO load failed.
#[derive(Debug, thiserror::Error)]
pub enum ColoLoadError {
    #[error("cannot pause the SVM")]
    Pause(#[source] VmError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

/// The PVM's memory as of the last checkpoint; mapped on first use.
#[derive(Default)]
pub struct StateCache {
    mem: Option<GuestMemory>,
}

impl StateCache {
    /// The cache, mapped like `svm` the first time.
    pub fn get(&mut self, svm: &GuestMemory) -> Result<GuestMemory, CheckpointError> {
        if let Some(mem) = &self.mem {
            return Ok(mem.clone());
        }
        let mem = checkpoint::same_layout(svm)?;
        self.mem = Some(mem.clone());
        Ok(mem)
    }
}

/// Loads checkpoint (`pages`, `state`) into the SVM `vm`, running or not,
/// with `cache` the PVM's memory as of the previous checkpoint: pauses
/// the SVM; checks the state and the pages; writes the pages into the
/// cache; copies every page the PVM (`pages`) or the SVM (its dirty log)
/// wrote since the previous load from the cache into the SVM and loads
/// the state; clears the SVM's dirty log (the load's own writes are not
/// the SVM's). The SVM stays paused. Returns how many pages it copied.
/// A refusal (the state or the pages do not fit) leaves the SVM and the
/// cache as they were, the SVM running again if it ran.
pub fn load(
    vm: &mut RunningVm,
    cache: &GuestMemory,
    layout: &Layout,
    state: &MachineState,
    pages: &PageBuffer,
) -> Result<usize, ColoLoadError> {
    let was_running = vm.handle().state() == RunState::Running;
    if was_running {
        vm.pause().map_err(ColoLoadError::Pause)?;
    }
    if let Err(e) = vm.check_load(layout, state, pages.addrs()) {
        if was_running {
            if let Err(r) = vm.resume() {
                tracing::error!("cannot resume the SVM after a refused load: {r}");
            }
        }
        return Err(e.into());
    }
    checkpoint::write_pages(cache, pages.addrs(), pages.data())?;
    // The SVM's devices ran up to the pause: an interrupt they raised
    // must land before the load sets the irqchips, not after.
    vm.settle_interrupts()?;
    let svm_dirty = vm.take_dirty()?;
    let mut addrs = svm_dirty.pages();
    addrs.extend_from_slice(pages.addrs());
    addrs.sort_unstable();
    addrs.dedup();
    vm.load_from(layout, state, cache, &addrs)?;
    drop(vm.take_dirty()?);
    Ok(addrs.len())
}
