// Gated retention (layouts as the CPU kernels: q, k, v, out [T, H·d]; gamma [T, H]; state
// [H, d, d], key × value), in its two serving forms:
// - recurrent (decode): S ← exp(γ)·S + (k/√d)ᵀ v, o = q S, for a batch of sequences whose states
//   live in a pool of slots;
// - chunkwise (prefill): the parallel form inside blocks of RETENTION_BLOCK tokens, the state
//   carried across them, with the CPU kernel's order of operations.
// head_dim is at most RETENTION_MAX_DIM.

#define RETENTION_BLOCK 64
#define RETENTION_MAX_DIM 256
#define RETENTION_COLS 64

// Grid: (heads, sequences); block: RETENTION_COLS threads, each owning value columns
// j ≡ threadIdx.x (mod blockDim.x). q, k, v, out are [sequences, H·d], gamma [sequences, H];
// slots[s] is the state slot of sequence s in states [slots, H, d, d].
extern "C" __global__ void retention_recurrent(const float* q, const float* k, const float* v, const float* gamma,
                                               const unsigned* slots, float* states, float* out, int heads,
                                               int head_dim) {
    __shared__ float qs[RETENTION_MAX_DIM], ks[RETENTION_MAX_DIM];
    int h = blockIdx.x, seq = blockIdx.y, d = head_dim;
    yoco_size row = (yoco_size)seq * heads * d + (yoco_size)h * d;
    float scale = 1.0f / sqrtf((float)d);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        qs[i] = q[row + i];
        ks[i] = k[row + i] * scale;
    }
    __syncthreads();
    float decay = expf(gamma[(yoco_size)seq * heads + h]);
    float* s = states + ((yoco_size)slots[seq] * heads + h) * d * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float vj = v[row + j], acc = 0.0f;
        for (int i = 0; i < d; i++) {
            float sij = s[(yoco_size)i * d + j] * decay + ks[i] * vj;
            s[(yoco_size)i * d + j] = sij;
            acc += qs[i] * sij;
        }
        out[row + j] = acc;
    }
}

// Grid: (heads, ceil(d / RETENTION_COLS)); block: RETENTION_COLS threads. Block (h, c) computes
// value columns c·RETENTION_COLS + threadIdx.x of head h for all T tokens, block after block; the
// state of those columns is read from and left in state [H, d, d].
extern "C" __global__ void retention_chunkwise(const float* q, const float* k, const float* v, const float* gamma,
                                               float* state, float* out, int tokens, int heads, int head_dim) {
    __shared__ float w[RETENTION_BLOCK][RETENTION_BLOCK + 1];  // decayed scores, [t][u]
    __shared__ float gcum[RETENTION_BLOCK];
    int h = blockIdx.x, d = head_dim, width = heads * head_dim;
    int j = blockIdx.y * RETENTION_COLS + threadIdx.x;
    bool col = j < d;
    float scale = 1.0f / sqrtf((float)d);
    float* s = state + (yoco_size)h * d * d;
    for (int b0 = 0; b0 < tokens; b0 += RETENTION_BLOCK) {
        int n = min(RETENTION_BLOCK, tokens - b0);
        __syncthreads();  // the previous block is done with w and gcum
        if (threadIdx.x == 0) {
            float acc = 0.0f;
            for (int t = 0; t < n; t++) {
                acc += gamma[(yoco_size)(b0 + t) * heads + h];
                gcum[t] = acc;
            }
        }
        __syncthreads();
        // w[t][u] = (q_t · k_u) · scale · exp(G_t − G_u) for u ≤ t: thread x fills rows t ≡ x.
        for (int t = threadIdx.x; t < n; t += blockDim.x) {
            const float* qt = q + (yoco_size)(b0 + t) * width + h * d;
            for (int u = 0; u <= t; u++) {
                const float* ku = k + (yoco_size)(b0 + u) * width + h * d;
                float dot = 0.0f;
                for (int i = 0; i < d; i++) dot += qt[i] * ku[i];
                w[t][u] = dot * scale * expf(gcum[t] - gcum[u]);
            }
        }
        __syncthreads();
        if (col) {
            // o_t = exp(G_t) · (q_t S) + Σ_{u≤t} w[t][u] v_u, for this column.
            for (int t = 0; t < n; t++) {
                const float* qt = q + (yoco_size)(b0 + t) * width + h * d;
                float acc = 0.0f;
                for (int i = 0; i < d; i++) acc += qt[i] * s[(yoco_size)i * d + j];
                acc *= expf(gcum[t]);
                for (int u = 0; u <= t; u++) acc += w[t][u] * v[(yoco_size)(b0 + u) * width + h * d + j];
                out[(yoco_size)(b0 + t) * width + h * d + j] = acc;
            }
            // S ← exp(G_last) · S + Σ_u scale · exp(G_last − G_u) · k_uᵀ v_u.
            float last = gcum[n - 1], keep = expf(last);
            for (int i = 0; i < d; i++) {
                float sij = s[(yoco_size)i * d + j] * keep;
                for (int u = 0; u < n; u++) {
                    float c = scale * expf(last - gcum[u]);
                    sij += c * k[(yoco_size)(b0 + u) * width + h * d + i] * v[(yoco_size)(b0 + u) * width + h * d + j];
                }
                s[(yoco_size)i * d + j] = sij;
            }
        }
    }
}

// Adds exp(G_t) · q_t S_in to outputs computed from a zero state: how a rank of a
// context-parallel group corrects its chunk once it knows the state that precedes it. decay
// [T, H] holds exp(G_t), G accumulated from the chunk start (in double, on the host, as the CPU
// kernel does); s_in is [H, d, d]. Grid: (tokens, heads); block: a multiple of 32, each thread
// owning value columns j ≡ threadIdx.x (mod blockDim.x). Sums over i in order, as the CPU kernel.
extern "C" __global__ void retention_add_incoming(const float* q, const float* decay, const float* s_in, float* out,
                                                  int heads, int head_dim) {
    __shared__ float qs[RETENTION_MAX_DIM];
    int t = blockIdx.x, h = blockIdx.y, d = head_dim;
    float g = decay[(yoco_size)t * heads + h];
    if (g == 0.0f) return;  // the same for every thread of the block, before any barrier
    yoco_size row = (yoco_size)t * heads * d + (yoco_size)h * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) qs[i] = q[row + i];
    __syncthreads();
    const float* s = s_in + (yoco_size)h * d * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) {
        float acc = 0.0f;
        for (int i = 0; i < d; i++) acc += qs[i] * s[(yoco_size)i * d + j];
        out[row + j] += g * acc;
    }
}
