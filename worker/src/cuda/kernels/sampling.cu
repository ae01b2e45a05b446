// Logits to tokens on the device: the greedy argmax (the lowest index among equal maxima, as
// the CPU) and the log-softmax with its normaliser accumulated in f64. Sampling with
// temperature, top-k/p and penalties stays on the host, from the per-request seeded generator,
// so every rank and backend draws the same token. Grid: one block per row; block: a multiple of
// 32, at most 1024.

extern "C" __global__ void argmax_rows(const float* logits, unsigned* out, int vocab) {
    __shared__ float best_v[1024];
    __shared__ unsigned best_i[1024];
    const float* row = logits + (yoco_size)blockIdx.x * vocab;
    float bv = YOCO_NEG_INF;
    unsigned bi = 0xffffffffu;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) {
        float v = row[c];
        if (bi == 0xffffffffu || v > bv) {
            bv = v;
            bi = (unsigned)c;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            float ov = best_v[threadIdx.x + stride];
            unsigned oi = best_i[threadIdx.x + stride];
            float mv = best_v[threadIdx.x];
            unsigned mi = best_i[threadIdx.x];
            bool take = oi != 0xffffffffu && (mi == 0xffffffffu || ov > mv || (ov == mv && oi < mi));
            if (take) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0];
}

extern "C" __global__ void log_softmax_rows(const float* logits, float* out, int vocab) {
    __shared__ float scratch[32];
    __shared__ double sums[1024];
    const float* row = logits + (yoco_size)blockIdx.x * vocab;
    float mx = YOCO_NEG_INF;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) mx = fmaxf(mx, row[c]);
    mx = block_max(mx, scratch);
    double s = 0.0;
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) s += exp((double)(row[c] - mx));
    sums[threadIdx.x] = s;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) sums[threadIdx.x] += sums[threadIdx.x + stride];
        __syncthreads();
    }
    double lse = (double)mx + log(sums[0]);
    for (int c = threadIdx.x; c < vocab; c += blockDim.x) out[(yoco_size)blockIdx.x * vocab + c] = (float)((double)row[c] - lse);
}
