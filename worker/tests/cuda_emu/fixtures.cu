// Kernels that exist only for the emulator's own tests (cuda_emulated.rs), built after the
// program: a race the emulator must expose, and the same kernel with the barrier that fixes it.

// Each thread reads its right neighbour's shared word, then overwrites its own, in one phase:
// on a GPU the neighbour may already have overwritten the word it reads (a write-after-read
// race). out[t] = t + 1 when every read comes first, as when threads run in order.
extern "C" __global__ void emu_fixture_racy_shift(float* out) {
    __shared__ float sh[1024];
    unsigned t = threadIdx.x, n = blockDim.x;
    sh[t] = (float)t;
    __syncthreads();
    float right = t + 1 < n ? sh[t + 1] : (float)n;
    sh[t] = -1.0f;
    out[t] = right;
}

// The same with a barrier between the reads and the writes: no race, out[t] = t + 1.
extern "C" __global__ void emu_fixture_fenced_shift(float* out) {
    __shared__ float sh[1024];
    unsigned t = threadIdx.x, n = blockDim.x;
    sh[t] = (float)t;
    __syncthreads();
    float right = t + 1 < n ? sh[t + 1] : (float)n;
    __syncthreads();
    sh[t] = -1.0f;
    out[t] = right;
}
