// Cross-decoder attention over the global KV cache, the flash-decoding split. The cache is a
// pool of blocks, each [K rows; V rows] of block_tokens × kv_dim elements (f32, bf16 or f16);
// a sequence's positions 0..len are its block_table entries in order. Every (sequence, head,
// split of split_tokens positions) yields a partial (o = Σ exp(s − m) v, m = max score,
// l = Σ exp(s − m)), and lse_merge combines the partials of a head, from one rank or many,
// exactly. Partials are laid out [sequences, heads, parts, …].

// Writes rows [n, kv_dim] (f32) as positions start.. of a sequence into the K (which = 0) or V
// (which = 1) half of its blocks. Grid: one block per row.
template <typename T>
__device__ void kv_write(const float* rows, T* pool, const unsigned* block_table, int start, int block_tokens,
                         int kv_dim, int which) {
    int pos = start + blockIdx.x;
    yoco_size block = block_table[pos / block_tokens];
    T* dst = pool + (block * 2 + which) * block_tokens * kv_dim + (yoco_size)(pos % block_tokens) * kv_dim;
    for (int c = threadIdx.x; c < kv_dim; c += blockDim.x) from_f32(rows[(yoco_size)blockIdx.x * kv_dim + c], dst + c);
}

// Grid: (heads, splits, sequences); block: a multiple of 32, at most ATTN_TILE. q is
// [sequences, heads · head_dim]; the block table of sequence s starts at table_offsets[s].
template <typename T>
__device__ void cross_attention_partials(const float* q, const T* pool, const unsigned* block_tables,
                                         const unsigned* table_offsets, const unsigned* lens, float* part_o,
                                         float* part_m, float* part_l, int heads, int kv_heads, int head_dim,
                                         int block_tokens, int split_tokens) {
    __shared__ float qs[ATTN_MAX_DIM];
    __shared__ float p[ATTN_TILE];
    __shared__ float scratch[32];
    int h = blockIdx.x, split = blockIdx.y, seq = blockIdx.z, d = head_dim;
    int splits = gridDim.y, kv_dim = kv_heads * head_dim;
    int col0 = (h / (heads / kv_heads)) * d;
    const unsigned* table = block_tables + table_offsets[seq];
    int len = (int)lens[seq];
    int begin = split * split_tokens, end = min(len, begin + split_tokens);
    float scale = 1.0f / sqrtf((float)d);
    for (int c = threadIdx.x; c < d; c += blockDim.x) qs[c] = q[((yoco_size)seq * heads + h) * d + c];
    __syncthreads();
    float m = YOCO_NEG_INF, l = 0.0f;
    float acc[ATTN_MAX_COLS];
    for (int r = 0; r < ATTN_MAX_COLS; r++) acc[r] = 0.0f;
    for (int t0 = begin; t0 < end; t0 += blockDim.x) {
        int j = t0 + threadIdx.x;
        float score = YOCO_NEG_INF;
        if (j < end) {
            const T* kj = pool + (yoco_size)table[j / block_tokens] * 2 * block_tokens * kv_dim +
                          (yoco_size)(j % block_tokens) * kv_dim + col0;
            float dot = 0.0f;
            for (int c = 0; c < d; c++) dot += qs[c] * to_f32(kj[c]);
            score = dot * scale;
        }
        float m_new = fmaxf(m, block_max(score, scratch));
        float e = j < end ? expf(score - m_new) : 0.0f;
        float rescale = expf(m - m_new);
        l = l * rescale + block_sum(e, scratch);
        p[threadIdx.x] = e;
        __syncthreads();
        int n = min((int)blockDim.x, end - t0);
        for (int r = 0, c = threadIdx.x; c < d; r++, c += blockDim.x) {
            float a = acc[r] * rescale;
            for (int u = 0; u < n; u++) {
                int pos = t0 + u;
                const T* vj = pool + ((yoco_size)table[pos / block_tokens] * 2 + 1) * block_tokens * kv_dim +
                              (yoco_size)(pos % block_tokens) * kv_dim + col0;
                a += p[u] * to_f32(vj[c]);
            }
            acc[r] = a;
        }
        __syncthreads();
        m = m_new;
    }
    yoco_size at = ((yoco_size)seq * heads + h) * splits + split;
    for (int r = 0, c = threadIdx.x; c < d; r++, c += blockDim.x) part_o[at * d + c] = acc[r];
    if (threadIdx.x == 0) {
        part_m[at] = m;
        part_l[at] = l;
    }
}

#define YOCO_CACHE_KERNELS(SUFFIX, T)                                                                              \
    extern "C" __global__ void kv_write_##SUFFIX(const float* rows, T* pool, const unsigned* block_table, int start, \
                                                 int block_tokens, int kv_dim, int which) {                         \
        kv_write(rows, pool, block_table, start, block_tokens, kv_dim, which);                                     \
    }                                                                                                              \
    extern "C" __global__ void cross_attention_partials_##SUFFIX(                                                  \
        const float* q, const T* pool, const unsigned* block_tables, const unsigned* table_offsets,                \
        const unsigned* lens, float* part_o, float* part_m, float* part_l, int heads, int kv_heads, int head_dim,  \
        int block_tokens, int split_tokens) {                                                                      \
        cross_attention_partials(q, pool, block_tables, table_offsets, lens, part_o, part_m, part_l, heads,        \
                                 kv_heads, head_dim, block_tokens, split_tokens);                                  \
    }

YOCO_CACHE_KERNELS(f32, float)
YOCO_CACHE_KERNELS(bf16, bf16_t)
YOCO_CACHE_KERNELS(f16, f16_t)

// Merges the `parts` partials of every (sequence, head): m = max m_p, l = Σ l_p·exp(m_p − m),
// o = Σ o_p·exp(m_p − m). With finalize, out [sequences, heads · head_dim] = o / l (zeros where
// no key was seen); otherwise out_o/out_m/out_l receive the merged partial (for a merge across
// ranks). Grid: (heads, sequences); block: any multiple of 32.
extern "C" __global__ void lse_merge(const float* part_o, const float* part_m, const float* part_l, int parts,
                                     int head_dim, int finalize, float* out_o, float* out_m, float* out_l) {
    int h = blockIdx.x, seq = blockIdx.y, heads = gridDim.x, d = head_dim;
    yoco_size base = ((yoco_size)seq * heads + h) * parts;
    float m = YOCO_NEG_INF;
    for (int p = 0; p < parts; p++) m = fmaxf(m, part_m[base + p]);
    float l = 0.0f;
    if (m != YOCO_NEG_INF)
        for (int p = 0; p < parts; p++) l += part_l[base + p] * expf(part_m[base + p] - m);
    yoco_size at = (yoco_size)seq * heads + h;
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float o = 0.0f;
        if (m != YOCO_NEG_INF)
            for (int p = 0; p < parts; p++) o += part_o[(base + p) * d + c] * expf(part_m[base + p] - m);
        if (finalize)
            out_o[at * d + c] = l > 0.0f ? o / l : 0.0f;
        else
            out_o[at * d + c] = o;
    }
    if (!finalize && threadIdx.x == 0) {
        out_m[at] = m;
        out_l[at] = l;
    }
}
