// Gated retention (layouts as the CPU kernels: q, k, v, out [T, H·d]; gamma [T, H]; state
// [H, d, d], key × value), in its two serving forms:
// - recurrent (decode): S ← exp(γ)·S + (k/√d)ᵀ v, o = q S, for a batch of sequences whose states
//   live in a pool of slots;
// - chunkwise (prefill): the parallel form inside blocks of RETENTION_BLOCK tokens, the state
//   carried across them, as batched matrix products over all blocks and heads at once.
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

// The chunkwise form as batched matrix products (cuBLAS), a segment of the prompt at a time:
// the kernels below move a segment's rows into head-major blocks and apply the decays, and the
// products run over every (head, block) pair at once. Block p = h·nb + b of a segment of nb
// blocks holds head h's tokens first + 64·b ..: rows [p·64, p·64 + 64) of the head-major
// buffers qh, kh, vh, kd, o ([heads·nb·64, d]); its scores are w[p] (64 × 64), its state s[p]
// (d × d), its cumulative log-decays gcum[p·64 ..] and its whole decay bdecay[p]. Rows past the
// prompt's end are zero, with no decay, so that they add nothing. Per segment:
//   retention_gather          qh, kh, vh; kd = k · scale · exp(G_last − G_u); gcum; bdecay
//   w[p] = Q Kᵀ               (product)
//   s[p] = Kdᵀ V              (product: the block's own addition to the state)
//   retention_scan            s[p] ← the state entering block p; the carried state advanced
//   o[p] = Q s[p]             (product)
//   retention_decay_terms     w ← w · scale · exp(G_t − G_u) for u ≤ t, else 0; o_t ← o_t · exp(G_t)
//   o[p] += w[p] V            (product)
//   retention_scatter         out ← o, token-major
// the CPU kernel's operations, in its order within each term.

// Grid: (nb, heads); block: RETENTION_BLOCK threads.
extern "C" __global__ void retention_gather(const float* q, const float* k, const float* v, const float* gamma,
                                            float* qh, float* kh, float* vh, float* kd, float* gcum, float* bdecay,
                                            int first, int tokens, int heads, int head_dim, int nb) {
    __shared__ float gc[RETENTION_BLOCK], coef[RETENTION_BLOCK];
    int b = blockIdx.x, h = blockIdx.y, d = head_dim;
    int t0 = first + b * RETENTION_BLOCK;
    int n = max(0, min(RETENTION_BLOCK, tokens - t0));  // the block's tokens within the prompt
    yoco_size p = (yoco_size)h * nb + b, width = (yoco_size)heads * d;
    float scale = 1.0f / sqrtf((float)d);
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int u = 0; u < RETENTION_BLOCK; u++) {
            if (u < n) acc += gamma[(yoco_size)(t0 + u) * heads + h];
            gc[u] = acc;
        }
        bdecay[p] = expf(acc);
    }
    __syncthreads();
    for (int u = threadIdx.x; u < RETENTION_BLOCK; u += blockDim.x) {
        gcum[p * RETENTION_BLOCK + u] = gc[u];
        coef[u] = scale * expf(gc[RETENTION_BLOCK - 1] - gc[u]);
    }
    __syncthreads();
    yoco_size base = p * RETENTION_BLOCK * d;
    for (int e = threadIdx.x; e < RETENTION_BLOCK * d; e += blockDim.x) {
        int u = e / d, i = e - u * d;
        float qv = 0.0f, kv = 0.0f, vv = 0.0f;
        if (u < n) {
            yoco_size src = (yoco_size)(t0 + u) * width + (yoco_size)h * d + i;
            qv = q[src];
            kv = k[src];
            vv = v[src];
        }
        qh[base + e] = qv;
        kh[base + e] = kv;
        vh[base + e] = vv;
        kd[base + e] = kv * coef[u];
    }
}

// Grid: (ceil(d² / blockDim.x), heads). Each thread walks one element of head h's state through
// the segment's blocks: s[p] (the block's addition) is replaced by the state entering it.
extern "C" __global__ void retention_scan(float* s, const float* bdecay, float* state, int nb, int head_dim) {
    int h = blockIdx.y;
    yoco_size dd = (yoco_size)head_dim * head_dim, e = (yoco_size)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= dd) return;  // no barrier in this kernel
    float acc = state[h * dd + e];
    for (int b = 0; b < nb; b++) {
        yoco_size p = (yoco_size)h * nb + b;
        float add = s[p * dd + e];
        s[p * dd + e] = acc;
        acc = acc * bdecay[p] + add;
    }
    state[h * dd + e] = acc;
}

// Grid: (heads · nb); block: any multiple of 32 threads.
extern "C" __global__ void retention_decay_terms(float* w, float* o, const float* gcum, int head_dim) {
    __shared__ float gc[RETENTION_BLOCK];
    yoco_size p = blockIdx.x;
    int d = head_dim;
    float scale = 1.0f / sqrtf((float)d);
    for (int u = threadIdx.x; u < RETENTION_BLOCK; u += blockDim.x) gc[u] = gcum[p * RETENTION_BLOCK + u];
    __syncthreads();
    float* wp = w + p * RETENTION_BLOCK * RETENTION_BLOCK;
    for (int e = threadIdx.x; e < RETENTION_BLOCK * RETENTION_BLOCK; e += blockDim.x) {
        int t = e / RETENTION_BLOCK, u = e - t * RETENTION_BLOCK;
        wp[e] = u <= t ? wp[e] * scale * expf(gc[t] - gc[u]) : 0.0f;
    }
    float* op = o + p * RETENTION_BLOCK * d;
    for (int e = threadIdx.x; e < RETENTION_BLOCK * d; e += blockDim.x) op[e] *= expf(gc[e / d]);
}

// Grid: (nb, heads); block: any multiple of 32 threads.
extern "C" __global__ void retention_scatter(const float* o, float* out, int first, int tokens, int heads,
                                             int head_dim, int nb) {
    int b = blockIdx.x, h = blockIdx.y, d = head_dim;
    int t0 = first + b * RETENTION_BLOCK;
    int n = max(0, min(RETENTION_BLOCK, tokens - t0));
    const float* op = o + ((yoco_size)h * nb + b) * RETENTION_BLOCK * d;
    for (int e = threadIdx.x; e < n * d; e += blockDim.x) {
        int u = e / d, j = e - u * d;
        out[(yoco_size)(t0 + u) * heads * d + (yoco_size)h * d + j] = op[e];
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
