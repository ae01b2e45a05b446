// Shared by every yoco kernel: warp and block reductions, and the element types of weights and
// caches. Kernels keep control flow block-uniform around every shuffle and barrier (all threads
// of a block take the same number of trips through a loop that reduces), which CUDA requires of
// __syncthreads and which lets the CPU emulator in the tests run the same source.

#define YOCO_FULL_MASK 0xffffffffu
#define YOCO_NEG_INF (-__int_as_float(0x7f800000))

typedef unsigned long long yoco_size;

// bf16 and f16 as their bits: the kernels widen them to f32 themselves, so no CUDA header is
// needed and NVRTC compiles the source as it is.
struct bf16_t {
    unsigned short bits;
};
struct f16_t {
    unsigned short bits;
};

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned)v.bits) << 16); }
__device__ __forceinline__ float to_f32(f16_t v) {
    unsigned h = v.bits;
    unsigned sign = (h & 0x8000u) << 16;
    unsigned exp = (h >> 10) & 0x1fu;
    unsigned man = h & 0x3ffu;
    if (exp == 0x1fu) return __uint_as_float(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        // Zero or subnormal: man · 2^-24, exact in f32.
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return __uint_as_float(sign | ((exp + 112u) << 23) | (man << 13));
}

// f32 → element type, rounded to nearest, ties to even (as the `half` crate rounds).
__device__ __forceinline__ void from_f32(float f, float* out) { *out = f; }
__device__ __forceinline__ void from_f32(float f, bf16_t* out) {
    unsigned x = __float_as_uint(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        out->bits = (unsigned short)((x >> 16) | 0x40u);  // NaN stays a quiet NaN
        return;
    }
    x += 0x7fffu + ((x >> 16) & 1u);
    out->bits = (unsigned short)(x >> 16);
}
__device__ __forceinline__ void from_f32(float f, f16_t* out) {
    unsigned x = __float_as_uint(f);
    unsigned sign = (x >> 16) & 0x8000u;
    unsigned ax = x & 0x7fffffffu;
    unsigned r;
    if (ax >= 0x7f800000u) {
        r = 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u);
    } else if (ax >= 0x47800000u) {
        r = 0x7c00u;  // beyond the largest finite half
    } else if (ax < 0x38800000u) {
        // A subnormal half (or zero): the value in units of 2^-24, rounded.
        unsigned e = ax >> 23;
        if (e < 102u) {
            r = 0;
        } else {
            unsigned m = (ax & 0x7fffffu) | 0x800000u;
            unsigned shift = 126u - e;
            r = m >> shift;
            unsigned rem = m & ((1u << shift) - 1u);
            unsigned halfway = 1u << (shift - 1u);
            if (rem > halfway || (rem == halfway && (r & 1u))) r += 1u;
        }
    } else {
        r = (ax - 0x38000000u) >> 13;
        unsigned rem = ax & 0x1fffu;
        if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r += 1u;  // a carry may reach infinity
    }
    out->bits = (unsigned short)(sign | r);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(YOCO_FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(YOCO_FULL_MASK, v, o));
    return v;
}

// The sum of `v` over the block, returned to every thread. `scratch` holds 32 floats of shared
// memory; blockDim.x is a multiple of 32.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // the scratch of a previous reduction has been read
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.0f);
}

// The max of `v` over the block, returned to every thread (as block_sum).
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_max(lane < warps ? scratch[lane] : YOCO_NEG_INF);
}
