// Sliding-window causal attention, flash style: query row i (absolute row prefix + i) sees keys
// max(0, row − window + 1) … row. A block streams the keys in tiles of blockDim.x, scoring one key
// per thread, and keeps the running max and sum of the online softmax; the output is normalised
// once at the end. keys/values hold prefix earlier rows and then the T rows of the queries, all
// [rows, heads · head_dim]. Grid: (T, heads); block: a multiple of 32, at most ATTN_TILE.

#define ATTN_TILE 256
#define ATTN_MAX_DIM 256
#define ATTN_MAX_COLS ((ATTN_MAX_DIM + 31) / 32)

extern "C" __global__ void window_attention(const float* q, const float* keys, const float* values, float* out,
                                            int prefix, int window, int heads, int head_dim) {
    __shared__ float qs[ATTN_MAX_DIM];
    __shared__ float p[ATTN_TILE];
    __shared__ float scratch[32];
    int i = blockIdx.x, h = blockIdx.y, d = head_dim, width = heads * head_dim;
    int row = prefix + i;
    int first = row + 1 > window ? row + 1 - window : 0;
    float scale = 1.0f / sqrtf((float)d);
    for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = q[(yoco_size)i * width + h * d + c];
    __syncthreads();
    float m = YOCO_NEG_INF, l = 0.0f;
    float acc[ATTN_MAX_COLS];
    for (int r = 0; r < ATTN_MAX_COLS; r++) acc[r] = 0.0f;
    for (int t0 = first; t0 <= row; t0 += blockDim.x) {
        int j = t0 + threadIdx.x;
        float score = YOCO_NEG_INF;
        if (j <= row) {
            const float* kj = keys + (yoco_size)j * width + h * d;
            float dot = 0.0f;
            for (int c = 0; c < d; c++) dot += qs[c] * kj[c];
            score = dot * scale;
        }
        float m_new = fmaxf(m, block_max(score, scratch));
        float e = j <= row ? expf(score - m_new) : 0.0f;
        float rescale = expf(m - m_new);
        l = l * rescale + block_sum(e, scratch);
        p[threadIdx.x] = e;
        __syncthreads();
        int n = min((int)blockDim.x, row + 1 - t0);
        for (int r = 0, c = threadIdx.x; c < d; r++, c += blockDim.x) {
            float a = acc[r] * rescale;
            for (int u = 0; u < n; u++) a += p[u] * values[(yoco_size)(t0 + u) * width + h * d + c];
            acc[r] = a;
        }
        __syncthreads();  // p is read before the next tile writes it
        m = m_new;
    }
    for (int r = 0, c = threadIdx.x; c < d; r++, c += blockDim.x)
        out[(yoco_size)i * width + h * d + c] = l > 0.0f ? acc[r] / l : 0.0f;
}
