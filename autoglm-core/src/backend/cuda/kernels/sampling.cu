// Device-side sampling support: greedy decoding without copying logits to the host.

// out[r] = index of the largest logit of row r; the first one on ties (as the host sampler and
// torch.argmax). One block per row, blockDim a power of two <= 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, u32* __restrict__ out, u32 cols) {
    __shared__ float best_v[1024];
    __shared__ u32 best_i[1024];
    const float* row = logits + (u64)blockIdx.x * cols;
    float bv = -INFINITY;
    u32 bi = 0xffffffffu;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) {
        const float v = row[c];
        // Strictly greater: within one thread indices rise, so the first maximum is kept.
        if (v > bv || bi == 0xffffffffu) {
            bv = v;
            bi = c;
        }
    }
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const u32 oi = best_i[threadIdx.x + s];
            const float mv = best_v[threadIdx.x];
            const u32 mi = best_i[threadIdx.x];
            // An empty slot (index ~0) never wins; otherwise larger value, then smaller index.
            const bool take = oi != 0xffffffffu &&
                              (mi == 0xffffffffu || ov > mv || (ov == mv && oi < mi));
            if (take) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = best_i[0] == 0xffffffffu ? 0u : best_i[0];
}
