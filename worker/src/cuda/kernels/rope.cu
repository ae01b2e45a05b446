// Interleaved (GPT-J) rotary embedding with the reference's f32 angles: angle = f32(pos) · θ_i,
// rounded to f32, and its cos/sin taken in f64 and rounded once, as the CPU table does. Rotates
// x [rows, heads · head_dim] in place, row r by positions[r]. Grid: one block per row.

extern "C" __global__ void rope_interleaved(float* x, const unsigned* positions, const float* inv_freq, int heads,
                                            int head_dim) {
    int half = head_dim / 2;
    float pos = (float)positions[blockIdx.x];
    float* row = x + (yoco_size)blockIdx.x * heads * head_dim;
    for (int p = threadIdx.x; p < heads * half; p += blockDim.x) {
        int h = p / half, i = p % half;
        double angle = (double)(pos * inv_freq[i]);
        float c = (float)cos(angle), s = (float)sin(angle);
        float* pair = row + h * head_dim + 2 * i;
        float x0 = pair[0], x1 = pair[1];
        pair[0] = x0 * c - x1 * s;
        pair[1] = x0 * s + x1 * c;
    }
}
