// SwiGLU's gate, a ← silu(a) ⊙ b (the FFN and gated retention's output gate), and gated
// retention's log-decay γ = logsigmoid(gt) / normalizer. Elementwise; any grid covering n.

extern "C" __global__ void silu_mul(float* a, const float* b, yoco_size n) {
    for (yoco_size i = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (yoco_size)gridDim.x * blockDim.x) {
        float x = a[i];
        a[i] = x / (1.0f + expf(-x)) * b[i];
    }
}

extern "C" __global__ void log_sigmoid_scaled(const float* gt, float* gamma, yoco_size n, float normalizer) {
    for (yoco_size i = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (yoco_size)gridDim.x * blockDim.x) {
        float x = gt[i];
        float ls = x >= 0.0f ? -log1pf(expf(-x)) : x - log1pf(expf(x));
        gamma[i] = ls / normalizer;
    }
}
