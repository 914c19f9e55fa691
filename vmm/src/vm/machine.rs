//! What a VM is (its [`Layout`]: memory, vCPUs, devices, CPU identity) and
//! what a paused VM holds besides memory (its [`MachineState`]). Both are
//! shared by the snapshot file and the checkpoint stream to a peer, and
//! both come from outside on a restore or a load: a layout is compared
//! against the VM's own, field by field, and a mismatch is refused by name.

use devices::legacy::{I8042Snapshot, SerialSnapshot};
use devices::virtio::mmio::TransportSnapshot;
use serde::{Deserialize, Serialize};

use super::state::{VcpuState, VmState};

/// What a VM must look like to take a state: the guest's view of the
/// machine, which no restore or load may change under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    pub mem_size: u64,
    pub vcpus: u8,
    /// (name, kind) of each virtio device, in bus order.
    pub devices: Vec<(String, String)>,
    /// The CPU template's name (`host`, `baseline`).
    pub cpu_template: String,
    /// Hash of every vCPU's CPUID, in vCPU order (see [`cpuid_hash`]).
    pub cpuid_hash: u64,
    /// The guest TSC's frequency; 0 when KVM cannot tell.
    pub tsc_khz: u32,
}

impl Layout {
    /// Ok when a state of `self` can go into a VM of layout `vm`; otherwise
    /// the first difference, named ("the snapshot's CPU template is
    /// baseline, this VM's is host"). `what` names where `self` came from.
    pub fn check_fits(&self, vm: &Layout, what: &str) -> Result<(), String> {
        if self.mem_size != vm.mem_size {
            return Err(format!(
                "{what} has {} MiB of memory, this VM {} MiB",
                self.mem_size >> 20,
                vm.mem_size >> 20
            ));
        }
        if self.vcpus != vm.vcpus {
            return Err(format!(
                "{what} has {} vCPUs, this VM {}",
                self.vcpus, vm.vcpus
            ));
        }
        if self.devices != vm.devices {
            return Err(format!(
                "{what} has devices {:?}, this VM {:?}",
                self.devices, vm.devices
            ));
        }
        if self.cpu_template != vm.cpu_template {
            return Err(format!(
                "{what}'s CPU template is {}, this VM's is {}",
                self.cpu_template, vm.cpu_template
            ));
        }
        if self.cpuid_hash != vm.cpuid_hash {
            return Err(format!(
                "{what}'s CPUID (template {}) differs from this VM's: another host or KVM",
                self.cpu_template
            ));
        }
        if self.tsc_khz != vm.tsc_khz {
            return Err(format!(
                "{what}'s TSC runs at {} kHz, this VM's at {} kHz",
                self.tsc_khz, vm.tsc_khz
            ));
        }
        Ok(())
    }
}

/// The name a CPU template has on the command line.
pub fn template_name(template: super::cpuid::CpuTemplate) -> String {
    use clap::ValueEnum;
    template
        .to_possible_value()
        .map_or_else(|| format!("{template:?}"), |v| v.get_name().to_string())
}

/// Hash of the CPUID entries of every vCPU, in vCPU order.
pub fn cpuid_hash<'a>(
    vcpus: impl IntoIterator<Item = &'a [kvm_bindings::kvm_cpuid_entry2]>,
) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for entries in vcpus {
        h.update(&(entries.len() as u64).to_le_bytes());
        for e in entries {
            for word in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                h.update(&word.to_le_bytes());
            }
        }
    }
    h.digest()
}

/// Every vCPU, VM-wide and device state of a paused VM.
#[derive(Clone, Serialize, Deserialize)]
pub struct MachineState {
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialSnapshot,
    pub i8042: I8042Snapshot,
    pub virtio: Vec<TransportSnapshot>,
}

impl MachineState {
    /// Checks the state against the layout it claims: one vCPU state per
    /// vCPU, each with the layout's CPUID, one device state per device.
    pub fn check_consistent(&self, layout: &Layout) -> Result<(), String> {
        if self.vcpus.len() != usize::from(layout.vcpus) {
            return Err(format!(
                "{} vCPU states for {} vCPUs",
                self.vcpus.len(),
                layout.vcpus
            ));
        }
        if self.virtio.len() != layout.devices.len() {
            return Err(format!(
                "{} device states for {} devices",
                self.virtio.len(),
                layout.devices.len()
            ));
        }
        if cpuid_hash(self.vcpus.iter().map(|v| v.cpuid.as_slice())) != layout.cpuid_hash {
            return Err("the vCPUs' CPUID does not match the layout's CPUID hash".into());
        }
        if let Some(v) = self.vcpus.iter().find(|v| v.tsc_khz != layout.tsc_khz) {
            return Err(format!(
                "a vCPU's TSC runs at {} kHz, the layout says {} kHz",
                v.tsc_khz, layout.tsc_khz
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> Layout {
        Layout {
            mem_size: 128 << 20,
            vcpus: 1,
            devices: vec![],
            cpu_template: "host".into(),
            cpuid_hash: 1,
            tsc_khz: 2_000_000,
        }
    }

    #[test]
    fn a_mismatch_is_named() {
        let vm = layout();
        assert_eq!(layout().check_fits(&vm, "the snapshot"), Ok(()));
        let other = Layout {
            cpu_template: "baseline".into(),
            ..layout()
        };
        assert_eq!(
            other.check_fits(&vm, "the snapshot"),
            Err("the snapshot's CPU template is baseline, this VM's is host".into())
        );
        let other = Layout {
            tsc_khz: 1_000_000,
            ..layout()
        };
        assert!(other
            .check_fits(&vm, "the snapshot")
            .unwrap_err()
            .contains("1000000 kHz, this VM's at 2000000 kHz"));
        let other = Layout {
            cpuid_hash: 2,
            ..layout()
        };
        assert!(other
            .check_fits(&vm, "the snapshot")
            .unwrap_err()
            .contains("CPUID"));
    }
}
