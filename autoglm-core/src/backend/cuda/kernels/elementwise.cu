// Row-wise kernels on the f32 residual stream. Launch shapes are set in cuda/ops.rs; every size
// was checked on the host. Rows are indexed with 64-bit offsets (a 151552 x 4096 table has
// 620M elements). The kernels whose output feeds a GEMM (the norms, silu_mul) also write it as
// bf16 (`out_bf16`, the GEMM operand), which saves a conversion kernel per GEMM.

// out[r, :] = table[ids[r], :] (bf16 -> f32). grid = rows, block = 256.
extern "C" __global__ void embedding_bf16(const bf16_t* __restrict__ table, const u32* __restrict__ ids,
                                          float* __restrict__ out, u32 width) {
    const u64 r = blockIdx.x;
    const bf16_t* src = table + (u64)ids[r] * width;
    float* dst = out + r * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) dst[c] = bf16_to_f32(src[c]);
}

// out = rmsnorm(x) * w (and out_bf16 = bf16(out)), one block per row (blockDim a multiple of 32,
// at most 1024; ops.rs launches 1024).
extern "C" __global__ void __launch_bounds__(1024) rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ out, bf16_t* __restrict__ out_bf16, u32 width,
                                    float eps) {
    SHARED_ARRAY(float, scratch, 32);
    const u64 r = blockIdx.x;
    const float* xr = x + r * width;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) ss += xr[c] * xr[c];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)width + eps);
    float* o = out + r * width;
    bf16_t* ob = out_bf16 + r * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = w[c] * (xr[c] * inv);
        o[c] = v;
        ob[c] = f32_to_bf16(v);
    }
}

// residual += x; out = rmsnorm(residual) * w (and out_bf16 = bf16(out)). One block per row.
extern "C" __global__ void __launch_bounds__(1024) add_rms_norm(float* __restrict__ residual, const float* __restrict__ x,
                                        const float* __restrict__ w, float* __restrict__ out,
                                        bf16_t* __restrict__ out_bf16, u32 width, float eps) {
    SHARED_ARRAY(float, scratch, 32);
    const u64 r = blockIdx.x;
    float* rr = residual + r * width;
    const float* xr = x + r * width;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = rr[c] + xr[c];
        rr[c] = v;
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)width + eps);
    float* o = out + r * width;
    bf16_t* ob = out_bf16 + r * width;
    // Each thread re-reads only the elements it wrote itself, so no barrier is needed.
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        const float v = w[c] * (rr[c] * inv);
        o[c] = v;
        ob[c] = f32_to_bf16(v);
    }
}

// out[r, c] = silu(g[r, c]) * u[r, c] (and out_bf16 = bf16(out)) where each input row is [g | u]
// of 2 * half columns. grid-stride over rows * half elements.
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, float* __restrict__ out,
                                    bf16_t* __restrict__ out_bf16, u32 rows, u32 half) {
    const u64 n = (u64)rows * half;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const u64 r = i / half, c = i % half;
        const float g = gate_up[r * 2 * half + c];
        const float u = gate_up[r * 2 * half + half + c];
        const float v = g / (1.0f + expf(-g)) * u;
        out[i] = v;
        out_bf16[i] = f32_to_bf16(v);
    }
}

// dst = bf16(src), n elements: the activation side of every GEMM.
extern "C" __global__ void f32_to_bf16(const float* __restrict__ src, bf16_t* __restrict__ dst, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        dst[i] = f32_to_bf16(src[i]);
    }
}

// y[r, c] += b[c], rows * cols elements.
extern "C" __global__ void add_bias(float* __restrict__ y, const float* __restrict__ b, u32 rows, u32 cols) {
    const u64 n = (u64)rows * cols;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        y[i] += b[i % cols];
    }
}

// out[i, :] = x[rows[i], :]. grid = number of gathered rows, block = 256.
extern "C" __global__ void gather_rows(const float* __restrict__ x, const u32* __restrict__ rows,
                                       float* __restrict__ out, u32 cols) {
    const u64 i = blockIdx.x;
    const float* src = x + (u64)rows[i] * cols;
    for (u32 c = threadIdx.x; c < cols; c += blockDim.x) out[i * cols + c] = src[c];
}
