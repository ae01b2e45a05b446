// Elementwise pieces of the forward pass: the residual add and the narrowing of activations to
// the bf16/f16 inputs of a half-precision GEMM. Any grid covering n.

extern "C" __global__ void add_assign(float* a, const float* b, yoco_size n) {
    for (yoco_size i = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (yoco_size)gridDim.x * blockDim.x)
        a[i] += b[i];
}

extern "C" __global__ void narrow_bf16(const float* x, bf16_t* out, yoco_size n) {
    for (yoco_size i = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (yoco_size)gridDim.x * blockDim.x)
        from_f32(x[i], out + i);
}

extern "C" __global__ void narrow_f16(const float* x, f16_t* out, yoco_size n) {
    for (yoco_size i = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (yoco_size)gridDim.x * blockDim.x)
        from_f32(x[i], out + i);
}

// dst[i] = src[i] over n 16-bit elements: a bf16/f16 cache block copied (copy-on-write of a
// block a prefix-cache snapshot shares).
extern "C" __global__ void copy_u16(const unsigned short* src, unsigned short* dst, yoco_size n) {
    for (yoco_size i = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (yoco_size)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
