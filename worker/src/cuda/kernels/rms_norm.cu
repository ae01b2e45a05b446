// RMSNorm: out = x · 1/sqrt(mean(x²) + eps) · weight, row by row; weight null means no affine
// scale (the subln of gated retention). Grid: one block per row; block: a multiple of 32.

extern "C" __global__ void rms_norm(const float* x, const float* weight, float* out, int dim, float eps) {
    __shared__ float scratch[32];
    const float* row = x + (yoco_size)blockIdx.x * dim;
    float* dst = out + (yoco_size)blockIdx.x * dim;
    float ss = 0.0f;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) ss += row[c] * row[c];
    ss = block_sum(ss, scratch);
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float v = row[c] * inv;
        dst[c] = weight ? v * weight[c] : v;
    }
}
