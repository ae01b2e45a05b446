//! `matmul_bf16`'s product on AMX tiles (Intel Sapphire Rapids and later): `tdpbf16ps`
//! multiplies a 16 × 32 bf16 tile of activations by a 32 × 16 one of weights into a 16 × 16 f32
//! tile, 8,192 multiply-adds in one instruction where `vdpbf16ps` does 32.
//!
//! Rust reaches the tiles through inline assembly: the AMX intrinsics, and even
//! `is_x86_feature_detected!("amx-bf16")`, are unstable (rust-lang/rust#126622), and no
//! well-kept crate wraps them. So [`available`] reads CPUID and XCR0 itself and asks Linux for
//! the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), without which the first tile instruction
//! faults.
//!
//! The layout is `matmul_bf16`'s. Its weight panels (32 columns, each 32-bit lane a pair of
//! adjacent k) are what a B tile loads: 16 pairs × 16 columns at a stride of one panel row
//! (128 bytes), two tiles side by side. The activation rows, rounded to bf16 pairs, are the A
//! tiles: 16 rows × 16 pairs at the row stride. Both are padded with zeros to whole tiles (k to
//! 32, rows to 32), which add nothing. One [`Block`] is 32 rows × 32 columns over all of k: two
//! A tiles by two B tiles into four accumulator tiles (all eight tile registers), stored to a
//! scratch block from which the rows and columns that exist are copied out.
//!
//! The assembly ([`block_asm`]) is one statement per block that loads its own tile
//! configuration and releases the tiles at its end, so no tile state lives between statements
//! (the compiler knows nothing of it). Its model, [`block_emulated`], performs the same
//! instructions in plain Rust on the same addresses: the tests run the whole product on the
//! model on every machine, against `matmul_t_bf16_reference`, and on the assembly as well where
//! the CPU has AMX.

use std::mem::MaybeUninit;

use super::matmul_bf16::{for_each_panel, pairs, round_row_fastest, round_rows, Job, NR};

/// Rows and pairs of an A tile (16 rows of 64 bytes); a B tile is 16 pairs × 16 columns.
const TILE: usize = 16;
/// Rows of a block: two A tiles.
const MB: usize = 2 * TILE;
/// Bytes from one pair of a panel to the next (a B tile's row stride).
const PANEL_ROW_BYTES: usize = NR * 4;
/// Rows per parallel task, whole blocks. Chosen from the cache sizes, not measured (no AMX
/// machine has run this): 64 rows × k = 4096 bf16 is 512 KiB, within Sapphire Rapids' 2 MiB L2
/// beside a panel, and prefill chunks of a few hundred rows still give every core a task.
const MC: usize = 2 * MB;

/// One block: `a` the first of 32 rows of bf16 pairs (`lda` bytes apart), `b` a panel
/// (`steps` × 16 pairs of [`NR`] lanes), `c` a 32 × 32 f32 scratch (rows 128 bytes apart).
pub(super) type Block = unsafe fn(a: *const u32, lda: usize, b: *const u32, steps: usize, c: *mut f32);

/// Whether this process may run tile instructions: the CPU has AMX-TILE and AMX-BF16, the OS
/// saves the tile state (XCR0 bits 17 and 18), and Linux granted this process the tile data.
/// Decided once.
pub fn available() -> bool {
    static AMX: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AMX.get_or_init(detect)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn detect() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    // CPUID.07H.0:EDX bit 22 is AMX-BF16, bit 24 AMX-TILE; CPUID.01H:ECX bit 27 is OSXSAVE.
    if __cpuid(0).eax < 7 {
        return false;
    }
    let edx = __cpuid_count(7, 0).edx;
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 || !osxsave {
        return false;
    }
    // XTILECFG and XTILEDATA enabled by the OS.
    // SAFETY: OSXSAVE is set, so XGETBV exists.
    let xcr0 = unsafe { xgetbv0() };
    if xcr0 & (0b11 << 17) != 0b11 << 17 {
        return false;
    }
    // Linux (5.16 and later) hands the 8 KiB tile data state only to processes that ask; the
    // grant covers every thread of the process.
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain system call with integer arguments.
    let granted = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) } == 0;
    if !granted {
        tracing::warn!(
            "the CPU has AMX, but the kernel refused its tile state ({}): bf16 products fall back",
            std::io::Error::last_os_error()
        );
    }
    granted
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn detect() -> bool {
    false
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
#[target_feature(enable = "xsave")]
unsafe fn xgetbv0() -> u64 {
    std::arch::x86_64::_xgetbv(0)
}

/// Every `(w, n, out)` of `jobs` on the tiles. The caller checked [`available`].
pub(super) fn matmul(x: &[f32], m: usize, k: usize, jobs: &mut [Job]) {
    #[cfg(target_arch = "x86_64")]
    matmul_with(x, m, k, jobs, block_asm);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, k, jobs);
        unreachable!("AMX is detected on x86_64 only");
    }
}

/// The product with `block` for each 32 × 32 block: [`block_asm`], or the model in tests.
fn matmul_with(x: &[f32], m: usize, k: usize, jobs: &mut [Job], block: Block) {
    // k = 0 is the caller's (all zeros); here it would make `steps` 0, which the block's loop
    // cannot take.
    assert!(k > 0, "matmul_amx: k = 0");
    let lanes = pairs(k).next_multiple_of(TILE);
    let steps = lanes / TILE;
    let xb = round_rows(x, m, k, m.next_multiple_of(MB), lanes, round_row_fastest());
    for_each_panel(jobs, k, lanes, MC, |t, out| {
        let mut c = [0f32; MB * NR];
        for r0 in (0..t.rows).step_by(MB) {
            // Whole blocks of rows exist: `xb` is padded to a multiple of 32 rows.
            let a = &xb[(t.i0 + r0) * lanes..(t.i0 + r0 + MB) * lanes];
            // SAFETY: `a` holds 32 rows of `lanes` pairs, `b` `steps` × 16 pairs of NR lanes, `c`
            // 32 × NR floats; `block` is the model or the CPU has AMX.
            unsafe { block(a.as_ptr(), lanes * 4, t.b.as_ptr(), steps, c.as_mut_ptr()) };
            for (r, src) in c.chunks_exact(NR).take(t.rows - r0).enumerate() {
                let dst = &mut out[(r0 + r) * t.n + t.col0..][..t.cols];
                for (d, &s) in dst.iter_mut().zip(src) {
                    *d = MaybeUninit::new(s);
                }
            }
        }
    });
}

/// The tile configuration (`ldtilecfg`'s 64 bytes, palette 1): every one of the eight tiles 16
/// rows of 64 bytes — the accumulators 16 × 16 f32, A 16 rows × 16 pairs, B 16 pairs × 16
/// columns.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
const CONFIG: TileConfig = {
    let mut colsb = [0u16; 16];
    let mut rows = [0u8; 16];
    let mut t = 0;
    while t < 8 {
        colsb[t] = 64;
        rows[t] = TILE as u8;
        t += 1;
    }
    TileConfig { palette: 1, start_row: 0, reserved: [0; 14], colsb, rows }
};

/// One block on the tiles: tmm0–3 accumulate the four 16 × 16 quarters of `c` (rows 0–15 and
/// 16–31 by columns 0–15 and 16–31), tmm4/5 hold the two A tiles of a step, tmm6/7 the two B
/// tiles. Each step is 16 pairs: A tiles 64 bytes further along their rows, B tiles 16 panel
/// rows (2,048 bytes) further down the panel.
///
/// # Safety
/// The CPU has AMX and this process was granted its state ([`available`]); `a`, `b` and `c`
/// are as [`Block`] says, `steps` ≥ 1.
#[cfg(target_arch = "x86_64")]
unsafe fn block_asm(a: *const u32, lda: usize, b: *const u32, steps: usize, c: *mut f32) {
    debug_assert!(steps >= 1);
    std::arch::asm!(
        "ldtilecfg [{cfg}]",
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        "2:",
        "tileloadd tmm4, [{a} + {lda}*1]",
        "tileloadd tmm6, [{b} + {ldb}*1]",
        "tileloadd tmm7, [{b} + {ldb}*1 + 64]",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm5, [{a16} + {lda}*1]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "add {a}, 64",
        "add {a16}, 64",
        "add {b}, 2048",
        "dec {steps}",
        "jnz 2b",
        "tilestored [{c} + {ldb}*1], tmm0",
        "tilestored [{c} + {ldb}*1 + 64], tmm1",
        "tilestored [{c} + {ldb}*1 + 2048], tmm2",
        "tilestored [{c} + {ldb}*1 + 2112], tmm3",
        "tilerelease",
        cfg = in(reg) &CONFIG as *const TileConfig,
        a = inout(reg) a => _,
        a16 = inout(reg) a.byte_add(TILE * lda) => _,
        lda = in(reg) lda,
        b = inout(reg) b => _,
        ldb = in(reg) PANEL_ROW_BYTES,
        steps = inout(reg) steps => _,
        c = in(reg) c,
        // Named for completeness: the compiler keeps nothing in tile registers.
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack),
    );
}

/// The model of [`block_asm`]: the same tile loads, `tdpbf16ps` as the Intel SDM defines it,
/// and the same stores, at the same addresses. Per instruction and row of the A tile, each
/// column keeps an even and an odd partial sum, built with f32 fused multiply-adds over the 16
/// pairs, and adds their sum to the accumulator. It does not model the instruction's flush of
/// subnormal inputs and results to zero.
///
/// # Safety
/// As [`block_asm`], but any CPU.
#[cfg(test)]
unsafe fn block_emulated(a: *const u32, lda: usize, b: *const u32, steps: usize, c: *mut f32) {
    let lo = |v: u32| f32::from_bits(v << 16);
    let hi = |v: u32| f32::from_bits(v & 0xffff_0000);
    // A tile `t` (0 or 1) at step `s`: row `r`, pair `p`.
    let a_at = |t: usize, s: usize, r: usize, p: usize| *a.byte_add((t * TILE + r) * lda + s * 64).add(p);
    // B tile `t` at step `s`: pair `p`, column `j`.
    let b_at = |t: usize, s: usize, p: usize, j: usize| *b.byte_add((s * TILE + p) * PANEL_ROW_BYTES + t * 64).add(j);
    let mut acc = [[[0f32; TILE]; TILE]; 4];
    for s in 0..steps {
        // tmm0 += A0·B0, tmm1 += A0·B1, tmm2 += A1·B0, tmm3 += A1·B1.
        for (quarter, acc) in acc.iter_mut().enumerate() {
            let (ta, tb) = (quarter / 2, quarter % 2);
            for (r, row) in acc.iter_mut().enumerate() {
                let mut even_odd = [[0f32; 2]; TILE];
                for p in 0..TILE {
                    let x = a_at(ta, s, r, p);
                    for (j, t) in even_odd.iter_mut().enumerate() {
                        let w = b_at(tb, s, p, j);
                        t[0] = lo(x).mul_add(lo(w), t[0]);
                        t[1] = hi(x).mul_add(hi(w), t[1]);
                    }
                }
                for (out, t) in row.iter_mut().zip(&even_odd) {
                    *out += t[0] + t[1];
                }
            }
        }
    }
    for (quarter, acc) in acc.iter().enumerate() {
        let (tr, tc) = (quarter / 2, quarter % 2);
        for (r, row) in acc.iter().enumerate() {
            let dst = c.byte_add((tr * TILE + r) * PANEL_ROW_BYTES + tc * 64);
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, TILE);
        }
    }
}

#[cfg(test)]
mod tests {
    use half::bf16;

    use super::*;
    use crate::kernels::matmul_bf16::check_products;

    /// The product through `block` at shape `(m, k, n)`, checked against the definition.
    fn check(block: Block, m: usize, k: usize, n: usize) {
        check_products(|x, m, k, jobs| matmul_with(x, m, k, jobs, block), m, k, &[n]);
    }

    /// Shapes at every edge: rows within, at and past a block and a task; k odd, within a tile,
    /// at and past one; no columns, and columns within, at and past a panel (and its 16-column
    /// B tile).
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (5, 7, 0),
        (5, 3, 17),
        (32, 32, 32),
        (33, 33, 33),
        (64, 64, 16),
        (65, 100, 48),
        (130, 257, 65),
        (17, 512, 100),
    ];

    /// The driver (rounding, padding, packing, blocks, tasks, copying out) on the model of the
    /// tile instructions, on any CPU.
    #[test]
    fn product_on_the_model_matches_the_definition() {
        for &(m, k, n) in SHAPES {
            check(block_emulated, m, k, n);
        }
    }

    /// Several products of one call (as `matmul_t_bf16_many` makes them), widest first, so that
    /// the narrower ones reuse the packed panels' buffer: each matches the definition alone.
    #[test]
    fn products_of_one_call_on_the_model_match_the_definition() {
        check_products(|x, m, k, jobs| matmul_with(x, m, k, jobs, block_emulated), 37, 45, &[70, 17, 0, 40]);
    }

    /// The model's addressing, pinned down element by element: a single 1 in row r of A and in
    /// column j of B, at pair p of step s (its even or its odd element in both), lands at
    /// c[r, j] alone, whichever quarter of the block r and j fall in.
    #[test]
    fn model_places_each_product() {
        let steps = 2;
        let lda_lanes = steps * TILE;
        for &(r, p, s, j, odd) in
            &[(0, 0, 0, 0, false), (17, 5, 1, 20, true), (31, 15, 1, 31, false), (3, 9, 0, 16, true)]
        {
            let mut a = vec![0u32; MB * lda_lanes];
            let mut b = vec![0u32; steps * TILE * NR];
            let one = bf16::ONE.to_bits() as u32;
            let bits = if odd { one << 16 } else { one };
            a[r * lda_lanes + s * TILE + p] = bits;
            b[(s * TILE + p) * NR + j] = bits;
            let mut c = vec![0f32; MB * NR];
            unsafe { block_emulated(a.as_ptr(), lda_lanes * 4, b.as_ptr(), steps, c.as_mut_ptr()) };
            for (at, &v) in c.iter().enumerate() {
                assert_eq!(v, if at == r * NR + j { 1.0 } else { 0.0 }, "c[{}, {}]", at / NR, at % NR);
            }
        }
    }

    /// The assembly where the CPU has AMX: the whole product against the definition, as the
    /// model is (so the two agree with each other to the same bound).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn product_on_the_tiles_matches_the_definition() {
        if !available() {
            eprintln!("no AMX on this CPU: the tile assembly is not run here");
            return;
        }
        for &(m, k, n) in SHAPES {
            check(block_asm, m, k, n);
        }
    }
}
