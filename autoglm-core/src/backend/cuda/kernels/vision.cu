// The vision tower's own kernels (the CPU reference: backend/cpu/mod.rs layer_norm / gelu and
// backend/cpu/vision.rs): LayerNorm, exact GELU, the bicubic resampling of the learned position
// table, and the 2-D-rope attention of every patch over the patches of its own image.
//
// Vision batch metadata (ops.rs / vision.rs pack it into one u32 buffer, copied once per batch):
// hw [rows * 2] (the patch's row and column in its image's grid), img [rows] (its image),
// cu_seqlens [images + 1] (image i owns rows cu_seqlens[i] .. cu_seqlens[i + 1]), grids
// [images * 2] (gh, gw). The host checked that every row lies in its image's grid.

// out = (x - mean) / sqrt(var + eps) * w + b over each row, mean and (biased) variance in f32 by
// two passes over the row. One block per row (blockDim a multiple of 32, at most 1024).
extern "C" __global__ void layer_norm(const float* __restrict__ x, const float* __restrict__ w,
                                      const float* __restrict__ b, float* __restrict__ out, u32 width,
                                      float eps) {
    SHARED_ARRAY(float, scratch, 32);
    const u64 r = blockIdx.x;
    const float* xr = x + r * width;
    float s = 0.0f;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) s += xr[c];
    const float mean = block_sum(s, scratch) / (float)width;
    float ss = 0.0f;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        const float d = xr[c] - mean;
        ss += d * d;
    }
    const float var = block_sum(ss, scratch) / (float)width;
    const float inv = 1.0f / sqrtf(var + eps);
    float* o = out + r * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) o[c] = (xr[c] - mean) * inv * w[c] + b[c];
}

// out = x * (1 + erf(x / sqrt(2))) / 2 (and out_bf16 = bf16(out), the next GEMM's operand), n
// elements, grid-stride.
extern "C" __global__ void gelu(const float* __restrict__ x, float* __restrict__ out,
                                bf16_t* __restrict__ out_bf16, u64 n) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = x[i];
        const float g = 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        out[i] = g;
        out_bf16[i] = f32_to_bf16(g);
    }
}

// The cubic convolution weights of PyTorch's bicubic kernel (A = -0.75) at distance d: near for
// |d| <= 1, far for 1 < |d| < 2, each operation rounded in the host's order (see pos_taps).
__device__ __forceinline__ float cubic_near(float d) {
    const float a = -0.75f;
    // ((a + 2) d - (a + 3)) d d + 1
    return __fadd_rn(__fmul_rn(__fmul_rn(__fsub_rn(__fmul_rn(a + 2.0f, d), a + 3.0f), d), d), 1.0f);
}
__device__ __forceinline__ float cubic_far(float d) {
    const float a = -0.75f;
    // ((a d - 5 a) d + 8 a) d - 4 a
    return __fsub_rn(__fmul_rn(__fadd_rn(__fmul_rn(__fsub_rn(__fmul_rn(a, d), 5.0f * a), d), 8.0f * a), d),
                     4.0f * a);
}

// The four bicubic taps of coordinate `pos` of an n-long grid axis over a side-long table axis,
// exactly as pos_embed_taps (backend/mod.rs) computes them in f32: grid_sample with
// align_corners=False, border padding. The _rn intrinsics keep NVRTC from fusing multiplies and
// adds (--fmad=true), so indices and weights are the host's to the bit.
__device__ __forceinline__ void pos_taps(u32 pos, u32 n, u32 side, u32 idx[4], float wt[4]) {
    const float g = __fsub_rn(__fmul_rn(__fdiv_rn(__fadd_rn((float)pos, 0.5f), (float)n), 2.0f), 1.0f);
    const float x = __fdiv_rn(__fsub_rn(__fmul_rn(__fadd_rn(g, 1.0f), (float)side), 1.0f), 2.0f);
    const float x0 = floorf(x);
    const float t = __fsub_rn(x, x0);
    wt[0] = cubic_far(__fadd_rn(t, 1.0f));
    wt[1] = cubic_near(t);
    wt[2] = cubic_near(__fsub_rn(1.0f, t));
    wt[3] = cubic_far(__fsub_rn(2.0f, t));
    const int base = (int)x0, top = (int)side - 1;
    for (int k = 0; k < 4; ++k) {
        const int i = base - 1 + k;
        idx[k] = (u32)(i < 0 ? 0 : (i > top ? top : i));
    }
}

// out[r, :] = the learned [side * side, width] position table (bf16, as the backend stores
// matrices) sampled bicubically at row r's patch: the taps of its row (y) and column (x) in its
// image's grid; along x within each of the 4 table rows, then along y, each product rounded
// and added in the CPU's order (so the result is the CPU's for the same table values).
// grid = rows, block = 256 (threads over the columns).
extern "C" __global__ void interpolate_pos_embed(const bf16_t* __restrict__ table, const u32* __restrict__ hw,
                                                 const u32* __restrict__ img, const u32* __restrict__ grids,
                                                 u32 side, u32 width, float* __restrict__ out) {
    const u64 r = blockIdx.x;
    const u32 image = img[r];
    u32 yi[4], xi[4];
    float yw[4], xw[4];
    pos_taps(hw[2 * r], grids[2 * image], side, yi, yw);
    pos_taps(hw[2 * r + 1], grids[2 * image + 1], side, xi, xw);
    float* o = out + r * width;
    for (u32 c = threadIdx.x; c < width; c += blockDim.x) {
        float acc = 0.0f;
        for (int y = 0; y < 4; ++y) {
            float line = 0.0f;
            for (int x = 0; x < 4; ++x) {
                const float v = bf16_to_f32(table[((u64)yi[y] * side + xi[x]) * width + c]);
                line = __fadd_rn(line, __fmul_rn(xw[x], v));
            }
            acc = __fadd_rn(acc, __fmul_rn(yw[y], line));
        }
        o[c] = acc;
    }
}

// 2-D rope of the vision tower on the q and k parts of qkv ([rows, 3 * H * D]: q heads, k heads,
// v heads), written to qk ([rows, 2 * H * D]: rotated q heads, then rotated k heads). NeoX halves:
// dims d and d + D/2 of a head turn together, by angle h * inv_freq[d] for d < D/4 and
// w * inv_freq[d - D/4] for D/4 <= d < D/2 ((h, w) the row's patch; inv_freq has D/4 entries,
// rope_inv_freq(D / 2, theta) on the host). grid = rows, block = 128.
extern "C" __global__ void vision_rope(const float* __restrict__ qkv, const u32* __restrict__ hw,
                                       const float* __restrict__ inv_freq, float* __restrict__ qk,
                                       u32 num_heads, u32 head_dim) {
    const u64 r = blockIdx.x;
    const u32 D = head_dim, half = D / 2, quarter = D / 4;
    const u32 w2 = 2 * num_heads * D;
    const float* src = qkv + r * (u64)(3 * num_heads * D);
    float* dst = qk + r * (u64)w2;
    const float ph = (float)hw[2 * r], pw = (float)hw[2 * r + 1];
    // The q and k heads are adjacent in both rows: head j (0 <= j < 2H) starts at j * D.
    for (u32 i = threadIdx.x; i < 2 * num_heads * half; i += blockDim.x) {
        const u32 j = i / half, d = i % half;
        const float angle = d < quarter ? ph * inv_freq[d] : pw * inv_freq[d - quarter];
        float s, c;
        sincosf(angle, &s, &c);
        const float a = src[j * D + d], b = src[j * D + d + half];
        dst[j * D + d] = a * c - b * s;
        dst[j * D + d + half] = b * c + a * s;
    }
}

// Unmasked softmax attention of every patch over the patches of its own image, query-tiled: a
// block serves up to `qt` consecutive patches of one image with one head, so each K/V tile staged
// in shared memory serves all of them. f32 throughout (q and k from vision_rope's qk, v from qkv).
//
// grid = (images, ceil(largest image / qt), H); block = 256 threads. Block (i, y, h) takes rows
// cu_seqlens[i] + y * qt .. min(+ qt, cu_seqlens[i + 1]) and exits when that is empty; it walks
// the image's rows in tiles of `tile`.
//
// Dynamic shared memory (floats): q [qt*D] | acc [qt*D] | kv tile [tile*(D+1)] | scores [qt*tile] |
// m [qt] | l [qt] | alpha [qt] (ops.rs, vision_smem_bytes). out[r, h*D + d] (and its bf16 copy, the
// output projection's GEMM operand).
extern "C" __global__ void vision_attention(const float* __restrict__ qkv, const float* __restrict__ qk,
                                            const u32* __restrict__ cu_seqlens, u32 num_heads, u32 head_dim,
                                            float scale, u32 tile, u32 qt, float* __restrict__ out,
                                            bf16_t* __restrict__ out_bf16) {
    DYNAMIC_SMEM(float, smem);
    const u32 image = blockIdx.x, h = blockIdx.z;
    const u32 begin = cu_seqlens[image], end = cu_seqlens[image + 1];
    const u32 t0 = begin + blockIdx.y * qt;
    if (t0 >= end) return;  // the whole block: no barrier is skipped by part of it
    const u32 R = min(qt, end - t0);
    const u32 D = head_dim, KS = head_dim + 1;
    const u32 w = num_heads * D;
    float* q = smem;
    float* acc = q + qt * D;
    float* kv = acc + qt * D;
    float* sc = kv + tile * KS;
    float* m = sc + qt * tile;
    float* l = m + qt;
    float* alpha = l + qt;

    for (u32 i = threadIdx.x; i < R * D; i += blockDim.x) {
        const u32 r = i / D, d = i % D;
        q[i] = qk[(u64)(t0 + r) * 2 * w + h * D + d];
        acc[i] = 0.0f;
    }
    for (u32 r = threadIdx.x; r < R; r += blockDim.x) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    __syncthreads();

    for (u32 j0 = begin; j0 < end; j0 += tile) {
        const u32 n = min(tile, end - j0);
        // Rotated keys of rows j0 .. j0 + n.
        for (u32 i = threadIdx.x; i < n * D; i += blockDim.x) {
            const u32 j = i / D, d = i % D;
            kv[j * KS + d] = qk[(u64)(j0 + j) * 2 * w + w + h * D + d];
        }
        __syncthreads();
        for (u32 i = threadIdx.x; i < R * n; i += blockDim.x) {
            const u32 r = i / n, j = i % n;
            const float* qr = q + r * D;
            const float* kj = kv + j * KS;
            float s = 0.0f;
            for (u32 d = 0; d < D; ++d) s += qr[d] * kj[d];
            sc[r * tile + j] = s * scale;
        }
        __syncthreads();
        online_softmax(sc, m, l, alpha, R, n, tile);
        // Values (the key tile is no longer needed once the scores exist).
        for (u32 i = threadIdx.x; i < n * D; i += blockDim.x) {
            const u32 j = i / D, d = i % D;
            kv[j * KS + d] = qkv[(u64)(j0 + j) * 3 * w + 2 * w + h * D + d];
        }
        __syncthreads();
        accumulate_pv(acc, sc, kv, alpha, R, n, D, tile);
        __syncthreads();
    }

    for (u32 i = threadIdx.x; i < R * D; i += blockDim.x) {
        const u32 r = i / D, d = i % D;
        const u64 o = (u64)(t0 + r) * w + h * D + d;
        // The image has at least the block's own rows, so l[r] >= 1.
        const float v = acc[i] / l[r];
        out[o] = v;
        out_bf16[o] = f32_to_bf16(v);
    }
}
