//! Every kernel source compiles with NVRTC, for the GPUs we serve on (compute_90: H100/H200)
//! and for the oldest one we support (compute_80: A100), and each entry point is in the PTX;
//! and to CUBIN (machine code, what `CudaRuntime::open` loads) for sm_90, sm_80 and sm_86.
//! Runs without a GPU: only libnvrtc is needed. `scripts/test.sh` installs it and sets
//! YOCO_REQUIRE_NVRTC, so that in CI a missing library fails instead of skipping.
#![cfg(feature = "cuda")]

use yoco_worker::cuda::compile::{compile_cubin, compile_program, nvrtc_available};
use yoco_worker::cuda::KERNELS;

#[test]
fn every_kernel_compiles_with_nvrtc() {
    if !nvrtc_available() {
        assert!(
            std::env::var_os("YOCO_REQUIRE_NVRTC").is_none(),
            "YOCO_REQUIRE_NVRTC is set but libnvrtc cannot be loaded (LD_LIBRARY_PATH={:?})",
            std::env::var("LD_LIBRARY_PATH").ok()
        );
        eprintln!("skipped: libnvrtc is not on this machine (pip install nvidia-cuda-nvrtc)");
        return;
    }
    for arch in ["compute_90", "compute_80"] {
        let ptx = compile_program(arch).unwrap_or_else(|e| panic!("{e}")).to_src();
        for &(name, _) in KERNELS {
            assert!(ptx.contains(&format!(".entry {name}(")), "{arch}: kernel {name} is not in the PTX");
        }
        let entries = ptx.matches(".entry ").count();
        assert_eq!(entries, KERNELS.len(), "{arch}: the PTX has entry points KERNELS does not list");
    }
    // What a GPU loads: machine code for its own architecture, an ELF image naming every kernel.
    for arch in ["sm_90", "sm_80", "sm_86"] {
        let cubin = compile_cubin(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: not an ELF image");
        for &(name, _) in KERNELS {
            let symbol = format!("{name}\0");
            assert!(
                cubin.windows(symbol.len()).any(|w| w == symbol.as_bytes()),
                "{arch}: kernel {name} is not in the CUBIN"
            );
        }
    }
    assert!(compile_cubin("sm_1").is_err(), "an architecture NVRTC does not know is an error");
}

/// A CUBIN (a little-endian ELF64 image) as far as the resource check needs it: each section's
/// name, type, offset, size and link, and each symbol's name by index.
struct Cubin<'a> {
    elf: &'a [u8],
    sections: Vec<(String, u32, usize, usize, usize)>,
}

impl<'a> Cubin<'a> {
    fn u16_at(&self, o: usize) -> usize {
        u16::from_le_bytes(self.elf[o..o + 2].try_into().unwrap()) as usize
    }
    fn u32_at(&self, o: usize) -> u32 {
        u32::from_le_bytes(self.elf[o..o + 4].try_into().unwrap())
    }
    fn u64_at(&self, o: usize) -> usize {
        u64::from_le_bytes(self.elf[o..o + 8].try_into().unwrap()) as usize
    }
    fn cstr(&self, at: usize) -> String {
        let end = at + self.elf[at..].iter().position(|&b| b == 0).unwrap();
        String::from_utf8_lossy(&self.elf[at..end]).into_owned()
    }

    fn parse(elf: &'a [u8]) -> Self {
        let mut c = Cubin { elf, sections: Vec::new() };
        let (shoff, entsize, count, names) = (c.u64_at(0x28), c.u16_at(0x3A), c.u16_at(0x3C), c.u16_at(0x3E));
        let strtab = c.u64_at(shoff + names * entsize + 0x18);
        for i in 0..count {
            let h = shoff + i * entsize;
            let name = c.cstr(strtab + c.u32_at(h) as usize);
            let (kind, offset, size, link) =
                (c.u32_at(h + 4), c.u64_at(h + 0x18), c.u64_at(h + 0x20), c.u32_at(h + 0x28));
            c.sections.push((name, kind, offset, size, link as usize));
        }
        c
    }

    fn section(&self, name: &str) -> Option<&(String, u32, usize, usize, usize)> {
        self.sections.iter().find(|s| s.0 == name)
    }

    /// Registers per thread of each function: the EIATTR_REGCOUNT entries (attribute 0x2f, a
    /// symbol index and a count) of `.nv.info`, whose entries are a format byte, an attribute
    /// byte and either a 16-bit value or (format 4) a 16-bit size and that many bytes.
    fn registers(&self) -> std::collections::HashMap<String, u32> {
        const SYMTAB: u32 = 2;
        let symtab = self.sections.iter().find(|s| s.1 == SYMTAB).expect("a symbol table");
        let strtab = self.sections[symtab.4].2;
        let symbol = |i: usize| self.cstr(strtab + self.u32_at(symtab.2 + i * 24) as usize);
        let (_, _, offset, size, _) = self.section(".nv.info").expect("a .nv.info section");
        let mut out = std::collections::HashMap::new();
        let mut o = *offset;
        while o + 4 <= offset + size {
            let (format, attribute) = (self.elf[o], self.elf[o + 1]);
            if format != 4 {
                o += 4;
                continue;
            }
            let len = self.u16_at(o + 2);
            if attribute == 0x2f && len == 8 {
                out.insert(symbol(self.u32_at(o + 4) as usize), self.u32_at(o + 8));
            }
            o += 4 + len;
        }
        out
    }
}

/// What only a GPU used to tell: a kernel whose block needs more registers than the register
/// file holds (64K a block on compute 8.x and 9.0, allocated per warp in units of 8 a thread)
/// or more static shared memory than 48 KiB fails to launch. The machine code says how many
/// registers each kernel takes and how much shared memory (its `.nv.shared.<name>` section),
/// and `cuda::KERNELS` the most threads each is launched with.
#[test]
fn every_kernel_fits_its_largest_launch_in_registers_and_shared_memory() {
    if !nvrtc_available() {
        assert!(std::env::var_os("YOCO_REQUIRE_NVRTC").is_none(), "YOCO_REQUIRE_NVRTC is set but libnvrtc is missing");
        eprintln!("skipped: libnvrtc is not on this machine");
        return;
    }
    for arch in ["sm_90", "sm_80", "sm_86"] {
        let image = compile_cubin(arch).unwrap_or_else(|e| panic!("{e}"));
        let cubin = Cubin::parse(&image);
        let registers = cubin.registers();
        for &(name, threads) in KERNELS {
            let regs = *registers.get(name).unwrap_or_else(|| panic!("{arch}: no register count for {name}"));
            let shared = cubin.section(&format!(".nv.shared.{name}")).map_or(0, |s| s.3);
            let per_block = regs.div_ceil(8) * 8 * threads.div_ceil(32) * 32;
            eprintln!("{arch} {name}: {regs} registers x {threads} threads, {shared} B shared");
            assert!((1..=255).contains(&regs), "{arch} {name}: {regs} registers");
            assert!(per_block <= 65536, "{arch} {name}: {per_block} registers a block of {threads}, past 65536");
            assert!(shared <= 48 << 10, "{arch} {name}: {shared} B of static shared memory, past 48 KiB");
        }
    }
}
