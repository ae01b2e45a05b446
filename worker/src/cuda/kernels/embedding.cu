// Token embedding: out[r] = table[ids[r] − first] · scale for the ids this rank's vocabulary part
// [first, end) holds, zeros for the others (the row of a tensor-parallel group sums the parts).
// Grid: one block per token; block: any multiple of 32.

template <typename T>
__device__ void embedding(const unsigned* ids, const T* table, float* out, int dim, float scale, unsigned first,
                          unsigned end) {
    unsigned id = ids[blockIdx.x];
    bool held = id >= first && id < end;
    float* row = out + (yoco_size)blockIdx.x * dim;
    const T* src = table + (yoco_size)(held ? id - first : 0) * dim;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) row[c] = held ? to_f32(src[c]) * scale : 0.0f;
}

extern "C" __global__ void embedding_f32(const unsigned* ids, const float* table, float* out, int dim, float scale,
                                         unsigned first, unsigned end) {
    embedding(ids, table, out, dim, scale, first, end);
}
extern "C" __global__ void embedding_bf16(const unsigned* ids, const bf16_t* table, float* out, int dim,
                                          float scale, unsigned first, unsigned end) {
    embedding(ids, table, out, dim, scale, first, end);
}
extern "C" __global__ void embedding_f16(const unsigned* ids, const f16_t* table, float* out, int dim, float scale,
                                         unsigned first, unsigned end) {
    embedding(ids, table, out, dim, scale, first, end);
}
