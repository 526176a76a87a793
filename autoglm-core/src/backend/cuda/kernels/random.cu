// Dummy weights generated on the device (the engine's "dummy" load mode). The generator is the
// one of model/random.rs, element for element: tensor stream `stream`, chunks of 4096 elements,
// chunk c starts from splitmix(stream ^ c) and each element advances the state once. So a model
// generated here equals RandomWeights' host model rounded to bf16.

__device__ __forceinline__ u64 splitmix(u64 x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

__device__ __forceinline__ float uniform_from(u64 state, float scale) {
    return ((float)(state >> 40) / 16777216.0f * 2.0f - 1.0f) * scale;
}

// One thread per 4096-element chunk of one tensor (or one part of a fused tensor) of n elements.
extern "C" __global__ void random_uniform_bf16(bf16_t* __restrict__ out, u64 n, u64 stream, float scale) {
    const u64 chunk = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 start = chunk * 4096;
    if (start >= n) return;
    const u64 end = start + 4096 < n ? start + 4096 : n;
    u64 state = splitmix(stream ^ chunk);
    for (u64 i = start; i < end; ++i) {
        state = splitmix(state);
        out[i] = f32_to_bf16(uniform_from(state, scale));
    }
}

extern "C" __global__ void random_uniform_f32(float* __restrict__ out, u64 n, u64 stream, float scale) {
    const u64 chunk = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 start = chunk * 4096;
    if (start >= n) return;
    const u64 end = start + 4096 < n ? start + 4096 : n;
    u64 state = splitmix(stream ^ chunk);
    for (u64 i = start; i < end; ++i) {
        state = splitmix(state);
        out[i] = uniform_from(state, scale);
    }
}

extern "C" __global__ void fill_f32(float* __restrict__ out, u64 n, float value) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = value;
}

extern "C" __global__ void fill_bf16(bf16_t* __restrict__ out, u64 n, float value) {
    const bf16_t v = f32_to_bf16(value);
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) out[i] = v;
}
