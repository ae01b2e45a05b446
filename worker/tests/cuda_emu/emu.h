// A CPU emulator of the CUDA execution model, just enough to run yoco's kernel sources as they
// are: every block of a launch runs in turn, its threads as real OS threads, so __syncthreads is
// a barrier and __shared__ memory is one static array per block. Warp shuffles go through a
// block-wide exchange, which is exact when the whole block reaches every shuffle together (the
// kernels keep their control flow block-uniform around reductions, see prelude.cuh).
#pragma once
#include <barrier>
#include <cmath>
#include <math.h>
#include <cstring>
#include <thread>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
inline std::barrier<>* block_barrier = nullptr;
inline unsigned long long exchange[1024];
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
    unsigned t = threadIdx.x;
    emu::exchange[t] = __float_as_uint(v);
    __syncthreads();
    float r = __uint_as_float((unsigned)emu::exchange[t ^ (unsigned)lane_mask]);
    __syncthreads();
    return r;
}

using std::cos;
using std::exp;
using std::log;
using std::sin;
inline int min(int a, int b) { return a < b ? a : b; }
