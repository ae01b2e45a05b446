//! The element types weights are stored in (f32, bf16, f16) and their widening to f32, written
//! with integer and float operations only so that loops over them vectorise (no table, no
//! branch, no conversion instruction that the baseline target lacks). Every kernel computes in
//! f32; a narrower weight type only changes the bytes read.

use half::{bf16, f16};

/// A weight tensor's elements as the kernels read them.
#[derive(Clone, Copy)]
pub enum WeightRef<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

/// Calls `$f` (a generic function's name) with the slice inside a [`WeightRef`] in place of
/// `$w` among the arguments.
#[macro_export]
macro_rules! with_weights {
    ($w:expr, |$s:ident| $body:expr) => {
        match $w {
            $crate::kernels::widen::WeightRef::F32($s) => $body,
            $crate::kernels::widen::WeightRef::Bf16($s) => $body,
            $crate::kernels::widen::WeightRef::F16($s) => $body,
        }
    };
}

/// A weight element the kernels widen to f32 as they load it.
pub trait Widen: Copy + Send + Sync + 'static {
    /// Bytes per element.
    const BYTES: usize;
    fn widen(self) -> f32;
    /// The slice itself when the type already is f32.
    fn as_f32(s: &[Self]) -> Option<&[f32]>;

    #[inline(always)]
    fn widen8(x: &[Self; 8]) -> [f32; 8] {
        std::array::from_fn(|i| x[i].widen())
    }

    /// Eight elements from `p` widened into one AVX register.
    ///
    /// # Safety
    /// `p` must be valid for reading eight elements, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8_avx2(p: *const Self) -> std::arch::x86_64::__m256;

    /// Sixteen elements at `p`, widened, in an AVX-512 register.
    ///
    /// # Safety
    /// `p` points at 16 readable elements and the CPU has AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16_avx512(p: *const Self) -> std::arch::x86_64::__m512;

    /// Widens `src` into `dst` (same length).
    #[inline(always)]
    fn widen_into(src: &[Self], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.widen();
        }
    }
}

impl Widen for f32 {
    const BYTES: usize = 4;
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
    fn as_f32(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8_avx2(p: *const f32) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx512(p: *const f32) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Widen for bf16 {
    const BYTES: usize = 2;
    /// bf16 is the top half of an f32: exact.
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    fn as_f32(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8_avx2(p: *const bf16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let halves = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(halves))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx512(p: *const bf16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let halves = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast()));
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(halves))
    }
}

impl Widen for f16 {
    const BYTES: usize = 2;
    /// Exact, including subnormals, infinities and NaNs: the exponent and mantissa are moved
    /// into f32's positions and the value rescaled by 2^112 (which also normalises f16
    /// subnormals); exponents that were all ones become f32's all ones.
    #[inline(always)]
    fn widen(self) -> f32 {
        let h = u32::from(self.to_bits());
        let magnitude = f32::from_bits((h & 0x7fff) << 13) * f32::from_bits(0x7780_0000); // 2^112
        let inf_nan = if h & 0x7c00 == 0x7c00 { 0x7f80_0000 } else { 0 };
        f32::from_bits(magnitude.to_bits() | inf_nan | ((h & 0x8000) << 16))
    }
    fn as_f32(_: &[f16]) -> Option<&[f32]> {
        None
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8_avx2(p: *const f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16_avx512(p: *const f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    #[test]
    fn every_bf16_and_f16_widens_exactly() {
        for bits in 0..=u16::MAX {
            let b = bf16::from_bits(bits);
            assert!(same(b.widen(), b.to_f32()), "bf16 {bits:#06x}");
            let h = f16::from_bits(bits);
            assert!(same(h.widen(), h.to_f32()), "f16 {bits:#06x}: {} vs {}", h.widen(), h.to_f32());
        }
    }

    #[test]
    fn eight_lane_and_slice_forms_agree_with_the_scalar_one() {
        let src: Vec<f16> = (0..19).map(|i| f16::from_f32(i as f32 * -0.37 + 2.0)).collect();
        let lanes = f16::widen8(src[3..11].try_into().unwrap());
        let mut dst = vec![0.0; src.len()];
        f16::widen_into(&src, &mut dst);
        for i in 0..8 {
            assert_eq!(lanes[i], src[3 + i].to_f32());
        }
        for (d, s) in dst.iter().zip(&src) {
            assert_eq!(*d, s.to_f32());
        }
        assert_eq!(f32::as_f32(&dst).map(<[f32]>::len), Some(dst.len()));
        assert!(bf16::as_f32(&[bf16::ONE]).is_none());
    }
}
