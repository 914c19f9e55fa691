//! The CPUID a vCPU sees: KVM's supported list, with per-vCPU topology and
//! the features a CPU template hides.

use clap::ValueEnum;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::Deserialize;

/// A named set of CPUID features to hide from the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// Everything KVM supports on this host.
    #[default]
    Host,
    /// Hides features with extended state or that the shadow-paging KVM of
    /// our test machines cannot run in a guest kernel: XSAVE and the AVX
    /// family, POPCNT, SMEP, SMAP, PKU, RDRAND/RDSEED. Also a portable
    /// baseline for moving a guest between hosts.
    Baseline,
}

/// The CPUID register a mask applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// Bits to clear in one register of one leaf (every subleaf, or one).
#[derive(Clone, Copy, Debug)]
pub struct FeatureMask {
    pub leaf: u32,
    pub subleaf: Option<u32>,
    pub register: Register,
    pub clear: u32,
}

const fn bit(n: u32) -> u32 {
    1 << n
}

/// What [`CpuTemplate::Baseline`] hides.
const BASELINE: &[FeatureMask] = &[
    FeatureMask {
        leaf: 1,
        subleaf: None,
        register: Register::Ecx,
        // FMA, POPCNT, XSAVE, OSXSAVE, AVX, F16C, RDRAND
        clear: bit(12) | bit(23) | bit(26) | bit(27) | bit(28) | bit(29) | bit(30),
    },
    FeatureMask {
        leaf: 7,
        subleaf: Some(0),
        register: Register::Ebx,
        // AVX2, SMEP, AVX512F, AVX512DQ, RDSEED, SMAP, AVX512IFMA, AVX512CD,
        // AVX512BW, AVX512VL
        clear: bit(5)
            | bit(7)
            | bit(16)
            | bit(17)
            | bit(18)
            | bit(20)
            | bit(21)
            | bit(28)
            | bit(30)
            | bit(31),
    },
    FeatureMask {
        leaf: 7,
        subleaf: Some(0),
        register: Register::Ecx,
        // AVX512VBMI, PKU, OSPKE, AVX512_VBMI2, AVX512_VNNI, AVX512_BITALG,
        // AVX512_VPOPCNTDQ
        clear: bit(1) | bit(3) | bit(4) | bit(6) | bit(11) | bit(12) | bit(14),
    },
    // No XSAVE state components at all.
    FeatureMask {
        leaf: 0xd,
        subleaf: None,
        register: Register::Eax,
        clear: u32::MAX,
    },
    FeatureMask {
        leaf: 0xd,
        subleaf: None,
        register: Register::Ebx,
        clear: u32::MAX,
    },
    FeatureMask {
        leaf: 0xd,
        subleaf: None,
        register: Register::Ecx,
        clear: u32::MAX,
    },
];

impl CpuTemplate {
    /// The masks this template applies.
    pub fn masks(self) -> &'static [FeatureMask] {
        match self {
            CpuTemplate::Host => &[],
            CpuTemplate::Baseline => BASELINE,
        }
    }
}

fn register(entry: &mut kvm_cpuid_entry2, reg: Register) -> &mut u32 {
    match reg {
        Register::Eax => &mut entry.eax,
        Register::Ebx => &mut entry.ebx,
        Register::Ecx => &mut entry.ecx,
        Register::Edx => &mut entry.edx,
    }
}

/// Applies `masks` to `entries`.
pub fn apply_masks(entries: &mut [kvm_cpuid_entry2], masks: &[FeatureMask]) {
    for mask in masks {
        for entry in entries
            .iter_mut()
            .filter(|e| e.function == mask.leaf && mask.subleaf.is_none_or(|sub| e.index == sub))
        {
            *register(entry, mask.register) &= !mask.clear;
        }
    }
}

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = bit(31);
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = bit(28);
/// Leaf 0xb level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits of the x2APIC ID that number `count` items.
fn id_bits(count: u8) -> u32 {
    u32::from(count.max(1)).next_power_of_two().trailing_zeros()
}

/// Sets what differs between vCPUs: APIC IDs and the topology (one package,
/// `vcpus` cores of one thread each).
pub fn set_topology(entries: &mut [kvm_cpuid_entry2], apic_id: u8, vcpus: u8) {
    for entry in entries.iter_mut() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff)
                    | (u32::from(apic_id) << 24)
                    | (u32::from(vcpus) << 16);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if vcpus > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // Cores per package - 1 in bits 31-26; caches above L2 are
                // shared by all cores.
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { u32::from(vcpus) - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((u32::from(vcpus) - 1) << 26) | (sharing << 14);
            }
            0xb | 0x1f => {
                entry.edx = u32::from(apic_id);
                let (shift, count, level_type) = match entry.index {
                    0 => (0, 1, LEVEL_TYPE_SMT),
                    1 => (id_bits(vcpus), u32::from(vcpus), LEVEL_TYPE_CORE),
                    _ => (0, 0, 0),
                };
                entry.eax = shift;
                entry.ebx = count;
                entry.ecx = (level_type << 8) | (entry.index & 0xff);
            }
            _ => {}
        }
    }
}

/// The CPUID of vCPU `apic_id` of `vcpus`, from KVM's supported list.
pub fn for_vcpu(supported: &CpuId, template: CpuTemplate, apic_id: u8, vcpus: u8) -> CpuId {
    let mut cpuid = supported.clone();
    let entries = cpuid.as_mut_slice();
    apply_masks(entries, template.masks());
    set_topology(entries, apic_id, vcpus);
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn baseline_hides_features_and_host_hides_none() {
        let mut entries = vec![entry(1, 0), entry(7, 0), entry(7, 1), entry(0xd, 1)];
        apply_masks(&mut entries, CpuTemplate::Host.masks());
        assert!(entries.iter().all(|e| e.ecx == u32::MAX));
        apply_masks(&mut entries, CpuTemplate::Baseline.masks());
        assert_eq!(entries[0].ecx & bit(26), 0, "XSAVE hidden");
        assert_eq!(entries[0].ecx & bit(23), 0, "POPCNT hidden");
        assert_eq!(entries[0].ecx & bit(0), 1, "SSE3 kept");
        assert_eq!(
            entries[1].ebx & (bit(7) | bit(20)),
            0,
            "SMEP and SMAP hidden"
        );
        assert_eq!(entries[2].ebx, u32::MAX, "leaf 7 subleaf 1 untouched");
        assert_eq!(
            (entries[3].eax, entries[3].ecx),
            (0, 0),
            "no XSAVE components"
        );
    }

    #[test]
    fn topology_numbers_each_vcpu() {
        let mut entries = vec![
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(4, 0),
        ];
        entries[4].eax = 3 << 5 | 0x1; // an L3 data cache
        set_topology(&mut entries, 2, 3);
        assert_eq!(entries[0].ebx >> 24, 2);
        assert_eq!((entries[0].ebx >> 16) & 0xff, 3);
        assert_ne!(entries[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(
            (
                entries[1].eax,
                entries[1].ebx,
                entries[1].ecx,
                entries[1].edx
            ),
            (0, 1, 0x100, 2)
        );
        assert_eq!(
            (entries[2].eax, entries[2].ebx, entries[2].ecx),
            (2, 3, 0x201)
        );
        assert_eq!((entries[3].ebx, entries[3].ecx >> 8), (0, 0));
        assert_eq!(entries[4].eax >> 26, 2);
        assert_eq!((entries[4].eax >> 14) & 0xfff, 2);

        set_topology(&mut entries, 0, 1);
        assert_eq!(entries[0].edx & LEAF1_EDX_HTT, 0);
        assert_eq!(entries[2].eax, 0);
    }
}
