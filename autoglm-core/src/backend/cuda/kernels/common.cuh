// Prepended to every kernel file before NVRTC compiles it (see cuda/compile.rs). No #include: the
// kernels need no CUDA headers, so NVRTC compiles them with no include path on any machine.
//
// bf16 is handled as its raw 16 bits (what cuBLAS and the host's half::bf16 store): widening is a
// shift; narrowing rounds to nearest-even exactly as __float2bfloat16 does.
typedef unsigned short bf16_t;
typedef unsigned int u32;
typedef unsigned long long u64;

// Shared memory, declared through macros so tests/emu/cuda_emu.h can give each emulated block
// fresh (poisoned) memory: an array `name` of n T, one T, and the dynamic shared memory as T[].
#ifndef SHARED_ARRAY
#define SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define SHARED_VAR(T, name) __shared__ T name
#define DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

// NVRTC has no <math.h>: +infinity as its bit pattern.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float bf16_to_f32(bf16_t h) {
    return __uint_as_float(((u32)h) << 16);
}

__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (bf16_t)0x7fc0;  // NaN stays (a quiet) NaN
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Sum over a block; `scratch` holds 32 floats. Every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    float t = lane < warps ? scratch[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// Max over a block; `scratch` holds 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = (blockDim.x + 31) >> 5;
    float t = lane < warps ? scratch[lane] : -INFINITY;
    for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
    return t;
}

// Tiled attention with an online softmax (attention.cu, vision.cu). A block holds `rows` query
// rows; a tile of n key/value positions is staged in shared memory as f32 rows D + 1 floats apart;
// sc[r * tile + j] holds the scores of the tile.

// Online softmax over the tile's scores sc[r * tile + j]: one thread per row updates its running
// max m and sum l, turns the scores into weights and leaves the rescale factor of the old
// accumulator in alpha (0 on the first tile, where m was -inf).
__device__ __forceinline__ void online_softmax(float* sc, float* m, float* l, float* alpha, u32 rows, u32 n,
                                               u32 tile) {
    for (u32 r = threadIdx.x; r < rows; r += blockDim.x) {
        float mx = m[r];
        for (u32 j = 0; j < n; ++j) mx = fmaxf(mx, sc[r * tile + j]);
        const float a = expf(m[r] - mx);
        float sum = 0.0f;
        for (u32 j = 0; j < n; ++j) {
            const float p = expf(sc[r * tile + j] - mx);
            sc[r * tile + j] = p;
            sum += p;
        }
        l[r] = l[r] * a + sum;
        m[r] = mx;
        alpha[r] = a;
    }
}

// acc[r, d] = acc[r, d] * alpha[r] + sum_j weight[r, j] * v[j, d] over the staged values.
__device__ __forceinline__ void accumulate_pv(float* acc, const float* sc, const float* kv, const float* alpha,
                                              u32 rows, u32 n, u32 D, u32 tile) {
    const u32 KS = D + 1;
    for (u32 i = threadIdx.x; i < rows * D; i += blockDim.x) {
        const u32 r = i / D, d = i % D;
        float o = acc[i] * alpha[r];
        for (u32 j = 0; j < n; ++j) o += sc[r * tile + j] * kv[j * KS + d];
        acc[i] = o;
    }
}
