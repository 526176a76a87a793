// Decode-sized products: y[j, r] = sum_c x[j, c] * w[r, c] for the m <= GEMV_MAX_ROWS rows of a
// decode batch, w an nn.Linear weight [n, k] in bf16, x the bf16 activations [m, k], y f32 [m, n].
// Memory-bound: every weight byte is read once per step, so the kernel's only job is to keep
// enough loads in flight. One warp per weight row streams it with 16-byte loads (8 bf16 a lane,
// GEMV_DEPTH loads in flight a lane), multiplies each chunk with the same chunk of every x
// row (read through the cache: x is at most 8 x k bf16) and reduces with shuffles. The host
// checks k % 8 == 0, 16-byte-aligned rows, m <= GEMV_MAX_ROWS (ops.rs `gemm_bf16`).
// grid = ceil(n / (block / 32)), block = GEMV_THREADS.

#define GEMV_MAX_ROWS 8
#define GEMV_DEPTH 4

__device__ __forceinline__ void bf16x8_to_f32(const uint4 v, float* f) {
    f[0] = __uint_as_float(v.x << 16);
    f[1] = __uint_as_float(v.x & 0xffff0000u);
    f[2] = __uint_as_float(v.y << 16);
    f[3] = __uint_as_float(v.y & 0xffff0000u);
    f[4] = __uint_as_float(v.z << 16);
    f[5] = __uint_as_float(v.z & 0xffff0000u);
    f[6] = __uint_as_float(v.w << 16);
    f[7] = __uint_as_float(v.w & 0xffff0000u);
}

extern "C" __global__ void __launch_bounds__(256) gemv_bf16(const bf16_t* __restrict__ w,
                                                            const bf16_t* __restrict__ x,
                                                            float* __restrict__ y, u32 m, u32 n,
                                                            u32 k) {
    const u32 lane = threadIdx.x & 31;
    const u64 r = (u64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (r >= n) return;  // the whole warp: r is the warp's
    const u32 chunks = k >> 3;
    const uint4* wr = reinterpret_cast<const uint4*>(w + r * k);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    float acc[GEMV_MAX_ROWS];
#pragma unroll
    for (int j = 0; j < GEMV_MAX_ROWS; ++j) acc[j] = 0.0f;
    // GEMV_DEPTH chunks a lane are loaded before any is used, so a warp keeps 2 KiB of weight
    // loads in flight (a warp-per-row GEMV with one load at a time reached about a third of the
    // H200's bandwidth).
    for (u32 c0 = lane; c0 < chunks; c0 += 32 * GEMV_DEPTH) {
        uint4 wv[GEMV_DEPTH];
#pragma unroll
        for (int u = 0; u < GEMV_DEPTH; ++u) {
            const u32 c = c0 + 32 * u;
            wv[u] = c < chunks ? __ldg(wr + c) : uint4{0u, 0u, 0u, 0u};
        }
#pragma unroll
        for (int u = 0; u < GEMV_DEPTH; ++u) {
            const u32 c = c0 + 32 * u;
            if (c >= chunks) break;
            float wf[8];
            bf16x8_to_f32(wv[u], wf);
#pragma unroll
            for (int j = 0; j < GEMV_MAX_ROWS; ++j) {
                if (j < (int)m) {
                    float xf[8];
                    bf16x8_to_f32(__ldg(xr + (u64)j * chunks + c), xf);
                    float s = acc[j];
#pragma unroll
                    for (int i = 0; i < 8; ++i) s = fmaf(wf[i], xf[i], s);
                    acc[j] = s;
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < GEMV_MAX_ROWS; ++j) {
        if (j < (int)m) {
            float v = acc[j];
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0) y[(u64)j * n + r] = v;
        }
    }
}
