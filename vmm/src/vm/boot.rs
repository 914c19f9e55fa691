//! Loading a kernel by the Linux x86-64 boot protocol: kernel image,
//! initrd, command line, zero page, and the structures the CPU needs to
//! start in long mode (GDT, TSS, identity map), and the MP table and ACPI
//! tables that describe its CPUs and interrupt wiring.
//!
//! Never through real mode: the boot vCPU starts at the kernel's 64-bit
//! entry point with paging on.

use std::fs::File;
use std::path::Path;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::memory::GuestMemory;
use crate::arch::layout::{
    ACPI_START, BASE_MEMORY_END, CMDLINE_MAX_SIZE, CMDLINE_START, GDT_START, HIMEM_START,
    MMIO_HOLE_START, MPTABLE_START, PDPT_START, PD_START, PML4_START, TSS_LIMIT, TSS_START,
    ZERO_PAGE_START,
};
use crate::arch::{acpi, bootparams, gdt, mptable, paging::IdentityMap};
use crate::config::{kernel_format, ConfigError, KernelFormat, VmConfig};

/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_ENTRY_64_OFFSET: u64 = 0x200;
/// `xloadflags` bit: the kernel has a 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Pages are 4 KiB.
const PAGE_SIZE: u64 = 0x1000;

/// Errors loading the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot load kernel {path}")]
    LoadKernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("bzImage {0} has no 64-bit entry point")]
    No64BitEntry(String),
    #[error("cannot read initrd {path}")]
    ReadInitrd {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd of {size} bytes does not fit in guest RAM between the kernel end {kernel_end:#x} and {ram_end:#x}")]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        ram_end: u64,
    },
    #[error("kernel command line of {0} bytes is too long")]
    CmdlineTooLong(usize),
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
    #[error("cannot write {what} to guest memory")]
    WriteMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

fn write_err(what: &'static str) -> impl FnOnce(vm_memory::GuestMemoryError) -> BootError {
    move |source| BootError::WriteMemory { what, source }
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootEntry(pub u64);

/// Loads everything the kernel needs into `mem` and returns its entry point.
pub fn load(mem: &GuestMemory, config: &VmConfig) -> Result<BootEntry, BootError> {
    let (loaded, entry) = load_kernel(mem, &config.kernel)?;

    let cmdline = config.cmdline.as_bytes();
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    mem.write_slice(cmdline, GuestAddress(CMDLINE_START))
        .and_then(|()| mem.write_obj(0u8, GuestAddress(CMDLINE_START + cmdline.len() as u64)))
        .map_err(write_err("the command line"))?;

    let initrd = match &config.initrd {
        Some(path) => Some(load_initrd(mem, path, loaded.kernel_end)?),
        None => None,
    };

    let params: boot_params = bootparams::build(&bootparams::BootParamsInput {
        setup_header: loaded.setup_header,
        cmdline: (CMDLINE_START, cmdline.len()),
        initrd,
        mem_size: config.mem_size(),
    });
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(write_err("the zero page"))?;

    write_cpu_structures(mem)?;
    let table = mptable::build(
        MPTABLE_START as u32,
        config.vcpus,
        (BASE_MEMORY_END - MPTABLE_START) as usize,
    )?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(write_err("the MP table"))?;
    let tables = acpi::build(
        ACPI_START,
        config.vcpus,
        (HIMEM_START - ACPI_START) as usize,
    )?;
    mem.write_slice(&tables, GuestAddress(ACPI_START))
        .map_err(write_err("the ACPI tables"))?;
    Ok(entry)
}

fn load_kernel(
    mem: &GuestMemory,
    path: &Path,
) -> Result<(KernelLoaderResult, BootEntry), BootError> {
    let format = kernel_format(path)?;
    let name = || path.display().to_string();
    let mut file = File::open(path).map_err(|source| ConfigError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |source| BootError::LoadKernel {
        path: name(),
        source,
    };
    match format {
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            // The ELF loader reports the entry point as `kernel_load`.
            Ok((loaded, BootEntry(loaded.kernel_load.raw_value())))
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            let xloadflags = loaded.setup_header.map(|h| h.xloadflags).unwrap_or(0);
            if xloadflags & XLF_KERNEL_64 == 0 {
                return Err(BootError::No64BitEntry(name()));
            }
            let entry = loaded.kernel_load.raw_value() + BZIMAGE_ENTRY_64_OFFSET;
            Ok((loaded, BootEntry(entry)))
        }
    }
}

/// Places the initrd page-aligned at the top of RAM below the MMIO hole,
/// above the kernel.
fn load_initrd(mem: &GuestMemory, path: &Path, kernel_end: u64) -> Result<(u64, u64), BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.display().to_string(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let ram_end = (mem.last_addr().raw_value() + 1).min(MMIO_HOLE_START);
    let start = ram_end
        .checked_sub(size)
        .map(|s| s & !(PAGE_SIZE - 1))
        .filter(|&s| s >= kernel_end.max(HIMEM_START));
    let start = start.ok_or(BootError::InitrdTooLarge {
        size,
        kernel_end,
        ram_end,
    })?;
    mem.read_exact_volatile_from(GuestAddress(start), &mut file, size as usize)
        .map_err(|e| match e {
            vm_memory::GuestMemoryError::IOError(source) => read_err(source),
            other => BootError::WriteMemory {
                what: "the initrd",
                source: other,
            },
        })?;
    Ok((start, size))
}

/// GDT, TSS and the identity map.
fn write_cpu_structures(mem: &GuestMemory) -> Result<(), BootError> {
    let table = gdt::boot_gdt(TSS_START as u32, TSS_LIMIT);
    mem.write_slice(&le_bytes(&table), GuestAddress(GDT_START))
        .map_err(write_err("the GDT"))?;
    mem.write_slice(&[0; TSS_LIMIT as usize + 1], GuestAddress(TSS_START))
        .map_err(write_err("the TSS"))?;

    let map = IdentityMap::new();
    let pages = [(PML4_START, &map.pml4), (PDPT_START, &map.pdpt)]
        .into_iter()
        .chain(
            map.pds
                .iter()
                .enumerate()
                .map(|(i, pd)| (PD_START + i as u64 * PAGE_SIZE, pd)),
        );
    for (addr, page) in pages {
        mem.write_slice(&le_bytes(page), GuestAddress(addr))
            .map_err(write_err("the page tables"))?;
    }
    Ok(())
}

/// Little-endian bytes of a table of 64-bit entries.
fn le_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::GuestMemoryBackend;

    /// A minimal static ELF64 executable: one PT_LOAD of `code` at `paddr`,
    /// entry at its start.
    fn tiny_elf(paddr: u64, code: &[u8]) -> tempfile::NamedTempFile {
        let mut image = Vec::new();
        let phoff = 64u64;
        let data_off = 64 + 56;
        // ELF header
        image.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
        image.extend_from_slice(&[0; 8]);
        image.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        image.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
        image.extend_from_slice(&1u32.to_le_bytes());
        image.extend_from_slice(&paddr.to_le_bytes()); // entry
        image.extend_from_slice(&phoff.to_le_bytes());
        image.extend_from_slice(&0u64.to_le_bytes()); // no sections
        image.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        // Program header: PT_LOAD, R+X
        image.extend_from_slice(&1u32.to_le_bytes());
        image.extend_from_slice(&5u32.to_le_bytes());
        for v in [
            data_off as u64,
            paddr,
            paddr,
            code.len() as u64,
            code.len() as u64,
            0x1000,
        ] {
            image.extend_from_slice(&v.to_le_bytes());
        }
        image.extend_from_slice(code);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&image).unwrap();
        file
    }

    fn config(kernel: &Path, initrd: Option<&Path>, vcpus: u8) -> VmConfig {
        VmConfig {
            initrd: initrd.map(Path::to_path_buf),
            cmdline: "console=ttyS0 hello".into(),
            mem_mib: 32,
            vcpus,
            ..VmConfig::new(kernel.to_path_buf())
        }
    }

    #[test]
    fn loads_kernel_initrd_cmdline_and_boot_structures() {
        let code = [0xf4u8, 0xeb, 0xfd]; // hlt; jmp .-1
        let kernel = tiny_elf(0x20_0000, &code);
        let mut initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.write_all(&[0x5a; 5000]).unwrap();
        let mem = super::super::memory::create(32 << 20).unwrap();

        let entry = load(&mem, &config(kernel.path(), Some(initrd.path()), 2)).unwrap();
        assert_eq!(entry, BootEntry(0x20_0000));

        let mut loaded = [0u8; 3];
        mem.read_slice(&mut loaded, GuestAddress(0x20_0000))
            .unwrap();
        assert_eq!(loaded, code);

        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let cmd_ptr = params.hdr.cmd_line_ptr;
        let mut cmdline = [0u8; 20];
        mem.read_slice(&mut cmdline, GuestAddress(u64::from(cmd_ptr)))
            .unwrap();
        assert_eq!(&cmdline, b"console=ttyS0 hello\0");

        // initrd: page-aligned, at the top of RAM, intact.
        let (image, size) = (params.hdr.ramdisk_image, params.hdr.ramdisk_size);
        assert_eq!(size, 5000);
        assert_eq!(u64::from(image) % PAGE_SIZE, 0);
        assert!(
            u64::from(image) + 5000 <= 32 << 20 && u64::from(image) + 5000 + PAGE_SIZE > 32 << 20
        );
        let mut bytes = vec![0u8; 5000];
        mem.read_slice(&mut bytes, GuestAddress(u64::from(image)))
            .unwrap();
        assert!(bytes.iter().all(|&b| b == 0x5a));

        // MP table signature, and the identity map's root entry.
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
        let mut rsdp = [0u8; 8];
        mem.read_slice(&mut rsdp, GuestAddress(ACPI_START)).unwrap();
        assert_eq!(&rsdp, b"RSD PTR ");
        let pml4e: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4e & !0xfff, PDPT_START);
        let code_desc: u64 = mem.read_obj(GuestAddress(GDT_START + 0x10)).unwrap();
        assert_eq!(code_desc, 0x00af_9b00_0000_ffff);
        assert_eq!(mem.num_regions(), 1);
    }

    #[test]
    fn refuses_an_initrd_larger_than_ram() {
        let kernel = tiny_elf(0x20_0000, &[0xf4]);
        let initrd = tempfile::NamedTempFile::new().unwrap();
        initrd.as_file().set_len(40 << 20).unwrap();
        let mem = super::super::memory::create(32 << 20).unwrap();
        let err = load(&mem, &config(kernel.path(), Some(initrd.path()), 1)).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }), "{err}");
    }

    #[test]
    fn refuses_a_kernel_outside_guest_memory() {
        let kernel = tiny_elf(0x4000_0000, &[0xf4]);
        let mem = super::super::memory::create(32 << 20).unwrap();
        let err = load(&mem, &config(kernel.path(), None, 1)).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err}");
    }
}
