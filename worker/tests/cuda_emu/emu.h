// A CPU emulator of the CUDA execution model, just enough to run yoco's kernel sources as they
// are. The blocks of a launch run one after another; the threads of a block are fibers
// (ucontext) that one OS thread switches between, so __syncthreads is a switch back to the
// scheduler, which resumes every thread once all have reached the barrier (in an order that
// changes from phase to phase: registry.cpp's `order`, a race detector), and __shared__
// memory is static storage in a section of its own, filled with a poison (all bits set: a NaN,
// or -1) at the start of every block, so that a kernel reading shared memory before writing it
// gets garbage here as it would on a GPU, not the zeros of static storage. Warp shuffles go through a block-wide exchange, which is
// exact when the whole block reaches every shuffle together (the kernels keep their control flow
// block-uniform around reductions, see prelude.cuh). A thread that leaves the kernel while others
// wait at a barrier is reported: on a GPU that is a hang or undefined behaviour.
#pragma once
#include <math.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstring>
#include <vector>

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace emu {
struct Fiber {
    ucontext_t ctx;  // to start the fiber
    jmp_buf at;      // where it waits
    std::vector<char> stack;
    bool started = false, done = false;
};
// Switches are _setjmp/_longjmp (no signal-mask system call, unlike swapcontext); ucontext only
// starts a fiber on its own stack.
inline ucontext_t scheduler;
inline jmp_buf scheduler_at;
inline std::vector<Fiber>* fibers = nullptr;
inline unsigned current = 0;
inline unsigned long long exchange[1024];
inline bool diverged = false;

// The bounds of the `emu_shared` section, from the linker.
extern "C" char __start_emu_shared[], __stop_emu_shared[];

// Every block starts with its shared memory poisoned.
inline void poison_shared() { std::memset(__start_emu_shared, 0xFF, __stop_emu_shared - __start_emu_shared); }

// Back to the scheduler until every thread of the block has reached this barrier.
inline void barrier() {
    if (_setjmp((*fibers)[current].at) == 0) _longjmp(scheduler_at, 1);
}
}  // namespace emu

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static __attribute__((section("emu_shared")))

inline void __syncthreads() { emu::barrier(); }

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
inline int max(int a, int b) { return a > b ? a : b; }
