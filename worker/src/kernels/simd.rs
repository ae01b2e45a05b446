//! Vector primitives compiled for AVX-512 and AVX2 and chosen at run time, so one binary runs on
//! any x86-64 while the hot loops use the widest units the machine has.

/// Defines `pub fn $name` whose body is compiled three times (AVX-512, AVX2+FMA, baseline) and
/// dispatched on the CPU's features.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident $(<$($g:ident: $bound:path),*>)? ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3 $(<$($g: $bound),*>)? ($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the features v4 was compiled for are present.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the features v3 was compiled for are present.
                    return unsafe { v3($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}

const LANES: usize = 32;

#[inline(always)]
pub(crate) fn dot_inline(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

#[inline(always)]
pub(crate) fn axpy_inline(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// e^x in f32 without a libm call, so that loops over it vectorise: x = n·ln 2 + r with
/// |r| ≤ ln 2 / 2, e^r by Cephes' degree-6 polynomial, 2^n put in the exponent bits. Relative
/// error ≤ 2e-7 (tested against f64) for x ≥ -87.3; below that (e^x under f32's normal range)
/// it is 0. Above 88.7 it saturates at e^88.7 ≈ 3.4e38.
#[inline(always)]
pub(crate) fn exp_inline(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let underflow = x < -87.33;
    let x = x.clamp(-87.33, 88.72);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // n (an integer in [-126, 128]) to an i32 through the float's bits: 1.5·2^23 + n has n in
    // its low mantissa bits. (A plain `as` cast saturates, which does not vectorise.) 2^n lies
    // beyond the normal exponents at both ends, so it is 2^a · 2^(n−a).
    let n = (n + 12_582_912.0).to_bits() as i32 - 0x4B40_0000;
    let a = n >> 1;
    let pow2 = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = er * pow2(a) * pow2(n - a);
    if underflow {
        0.0
    } else {
        y
    }
}

multiversion! {
    /// Σ a[i]·b[i] over the shorter length.
    pub fn dot(a: &[f32], b: &[f32]) -> f32 { dot_inline(a, b) }
}

multiversion! {
    /// y += alpha·x.
    pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) { axpy_inline(alpha, x, y) }
}

multiversion! {
    /// x *= alpha.
    pub fn scale_in_place(x: &mut [f32], alpha: f32) {
        for v in x.iter_mut() {
            *v *= alpha;
        }
    }
}

/// Sums of eight registers as one: lane r is Σ a[r] (six horizontal adds, two 128-bit
/// permutes and an add, where eight separate horizontal sums take forty operations).
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum8x8(a: [std::arch::x86_64::__m256; 8]) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let t0 = _mm256_hadd_ps(a[0], a[1]);
    let t1 = _mm256_hadd_ps(a[2], a[3]);
    let t2 = _mm256_hadd_ps(a[4], a[5]);
    let t3 = _mm256_hadd_ps(a[6], a[7]);
    let u0 = _mm256_hadd_ps(t0, t1); // lanes: a0..a3 low halves | a0..a3 high halves
    let u1 = _mm256_hadd_ps(t2, t3);
    let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
    let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
    _mm256_add_ps(lo, hi)
}

/// Sums of four registers as one 128-bit register: lane r is Σ a[r].
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum4x4(a: [std::arch::x86_64::__m256; 4]) -> std::arch::x86_64::__m128 {
    use std::arch::x86_64::*;
    let u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps::<1>(u))
}

/// The sum of one register's lanes.
///
/// # Safety
/// The CPU must have AVX.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps::<1>(s2, s2)))
}

/// Where [`hsum16x16`]'s butterfly leaves the sum of its input `e`: lane `SLOT[e]`. The map is
/// its own inverse.
#[cfg(target_arch = "x86_64")]
const SLOT: [usize; 16] = [0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15];

/// Sums of sixteen registers as one: lane r is Σ a[r]. A butterfly of 128-bit and in-lane
/// shuffles (15 additions, 30 shuffles), fed in the order that puts sum r in lane r.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) unsafe fn hsum16x16(a: [std::arch::x86_64::__m512; 16]) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Plain loops, not `array::from_fn`: a closure would not inherit the caller's target
    // features, and its intrinsics would not be inlined.
    let mut p = [_mm512_setzero_ps(); 16];
    for e in 0..16 {
        p[e] = a[SLOT[e]];
    }
    // 16 → 8: quarters 0–1 of b[i] hold p[i]'s half sums, quarters 2–3 p[i + 8]'s.
    let mut b = [_mm512_setzero_ps(); 8];
    for i in 0..8 {
        b[i] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b01_00_01_00>(p[i], p[i + 8]),
            _mm512_shuffle_f32x4::<0b11_10_11_10>(p[i], p[i + 8]),
        );
    }
    // 8 → 4: quarter q of c[i] holds input i + [0, 8, 4, 12][q], four lanes of it.
    let mut c = [_mm512_setzero_ps(); 4];
    for i in 0..4 {
        c[i] = _mm512_add_ps(
            _mm512_shuffle_f32x4::<0b10_00_10_00>(b[i], b[i + 4]),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(b[i], b[i + 4]),
        );
    }
    // 4 → 2: within each quarter, two lanes of c[i]'s input, then two of c[i + 2]'s.
    let mut d = [_mm512_setzero_ps(); 2];
    for i in 0..2 {
        d[i] = _mm512_add_ps(
            _mm512_shuffle_ps::<0b01_00_01_00>(c[i], c[i + 2]),
            _mm512_shuffle_ps::<0b11_10_11_10>(c[i], c[i + 2]),
        );
    }
    // 2 → 1: each lane one whole sum.
    _mm512_add_ps(_mm512_shuffle_ps::<0b10_00_10_00>(d[0], d[1]), _mm512_shuffle_ps::<0b11_01_11_01>(d[0], d[1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testutil::randn;

    #[test]
    fn exp_matches_f64_to_two_ulp() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let want = (x as f64).exp();
            let got = exp_inline(x) as f64;
            worst = worst.max((got - want).abs() / want);
            x += 0.00173;
        }
        for x in [0.0f32, -0.0, 1e-8, -1e-8, 0.5, -0.5, 1.0, 10.0, -10.0, -80.0, 88.0] {
            let want = (x as f64).exp();
            worst = worst.max((exp_inline(x) as f64 - want).abs() / want);
        }
        assert!(worst < 2e-7, "largest relative error {worst:e}");
        assert_eq!(exp_inline(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_inline(-100.0), 0.0);
        assert!(exp_inline(1000.0).is_finite());
    }

    #[test]
    fn dot_and_axpy_match_plain_loops() {
        for n in [0, 1, 7, 31, 32, 33, 100, 1000] {
            let a = randn(n, 1);
            let b = randn(n, 2);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((dot(&a, &b) as f64 - want).abs() < 1e-4 * (1.0 + want.abs()), "n={n}");
            let mut y = b.clone();
            axpy(0.5, &a, &mut y);
            for i in 0..n {
                assert!((y[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6);
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn eight_and_four_lane_transposing_sums_put_each_sum_in_its_lane() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx") {
            return;
        }
        let vals: Vec<[f32; 8]> =
            (0..8).map(|r| std::array::from_fn(|l| ((r * 8 + l) % 13) as f32 + r as f32 * 100.0)).collect();
        let (mut eight, mut four) = ([0f32; 8], [0f32; 4]);
        // SAFETY: AVX is present; every array holds eight floats (four for the result of four).
        unsafe {
            let regs: [__m256; 8] = std::array::from_fn(|r| _mm256_loadu_ps(vals[r].as_ptr()));
            _mm256_storeu_ps(eight.as_mut_ptr(), hsum8x8(regs));
            _mm_storeu_ps(four.as_mut_ptr(), hsum4x4([regs[0], regs[1], regs[2], regs[3]]));
            for (r, v) in vals.iter().enumerate() {
                assert_eq!(hsum(regs[r]), v.iter().sum::<f32>(), "register {r} alone");
            }
        }
        for (r, v) in vals.iter().enumerate() {
            assert_eq!(eight[r], v.iter().sum::<f32>(), "register {r} of eight");
            if r < 4 {
                assert_eq!(four[r], v.iter().sum::<f32>(), "register {r} of four");
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn transposing_sum_puts_each_registers_sum_in_its_lane() {
        use std::arch::x86_64::*;
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        // Small integers (so every sum is exact), offset by 100 per register (so each register's
        // sum is its own).
        let vals: Vec<[f32; 16]> =
            (0..16).map(|r| std::array::from_fn(|l| ((r * 16 + l) % 23) as f32 + r as f32 * 100.0)).collect();
        let mut got = [0f32; 16];
        // SAFETY: AVX-512F is present; every array holds sixteen floats.
        unsafe {
            let regs: [__m512; 16] = std::array::from_fn(|r| _mm512_loadu_ps(vals[r].as_ptr()));
            _mm512_storeu_ps(got.as_mut_ptr(), hsum16x16(regs));
        }
        for (r, v) in vals.iter().enumerate() {
            assert_eq!(got[r], v.iter().sum::<f32>(), "register {r}");
        }
    }
}
