// Device-side sampling support: greedy decoding without copying logits to the host.

// Reduces each thread's (value, index) candidate to the block's: the largest value, then the
// smallest index; index 0xffffffff marks an empty candidate, which never wins (blockDim a power
// of two <= 1024; best_v/best_i hold blockDim entries). Every thread gets the result.
__device__ __forceinline__ void block_argmax(float bv, u32 bi, float* best_v, u32* best_i, float* v_out,
                                             u32* i_out) {
    best_v[threadIdx.x] = bv;
    best_i[threadIdx.x] = bi;
    __syncthreads();
    for (u32 s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) {
            const float ov = best_v[threadIdx.x + s];
            const u32 oi = best_i[threadIdx.x + s];
            const float mv = best_v[threadIdx.x];
            const u32 mi = best_i[threadIdx.x];
            const bool take = oi != 0xffffffffu &&
                              (mi == 0xffffffffu || ov > mv || (ov == mv && oi < mi));
            if (take) {
                best_v[threadIdx.x] = ov;
                best_i[threadIdx.x] = oi;
            }
        }
        __syncthreads();
    }
    *v_out = best_v[0];
    *i_out = best_i[0];
}

// The first maximum of x[begin..end) over the block (index 0xffffffff when empty).
__device__ __forceinline__ void range_argmax(const float* __restrict__ x, u32 begin, u32 end, float* best_v,
                                             u32* best_i, float* v_out, u32* i_out) {
    float bv = -INFINITY;
    u32 bi = 0xffffffffu;
    for (u32 c = begin + threadIdx.x; c < end; c += blockDim.x) {
        const float v = x[c];
        // Strictly greater: within one thread indices rise, so the first maximum is kept.
        if (v > bv || bi == 0xffffffffu) {
            bv = v;
            bi = c;
        }
    }
    block_argmax(bv, bi, best_v, best_i, v_out, i_out);
}

// out[r] = index of the largest logit of row r; the first one on ties (as the host sampler and
// torch.argmax). One block per row, blockDim a power of two <= 1024.
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, u32* __restrict__ out, u32 cols) {
    SHARED_ARRAY(float, best_v, 1024);
    SHARED_ARRAY(u32, best_i, 1024);
    float v;
    u32 i;
    range_argmax(logits + (u64)blockIdx.x * cols, 0, cols, best_v, best_i, &v, &i);
    if (threadIdx.x == 0) out[blockIdx.x] = i == 0xffffffffu ? 0u : i;
}

// argmax_rows for wide rows (a vocabulary), in two passes so that a row is read by many blocks:
// block (p, r) of grid (parts, rows) reduces columns [p * chunk, (p + 1) * chunk) of row r to
// part_v/part_i[r * parts + p] (index 0xffffffff for an empty chunk), then argmax_combine (one
// block per row) picks the largest value, then the smallest index, as argmax_rows does.
extern "C" __global__ void argmax_partial(const float* __restrict__ logits, float* __restrict__ part_v,
                                          u32* __restrict__ part_i, u32 cols, u32 chunk) {
    SHARED_ARRAY(float, best_v, 1024);
    SHARED_ARRAY(u32, best_i, 1024);
    const u32 begin = blockIdx.x * chunk;
    const u32 end = min(cols, begin + chunk);
    float v;
    u32 i;
    range_argmax(logits + (u64)blockIdx.y * cols, min(begin, cols), end, best_v, best_i, &v, &i);
    if (threadIdx.x == 0) {
        part_v[(u64)blockIdx.y * gridDim.x + blockIdx.x] = v;
        part_i[(u64)blockIdx.y * gridDim.x + blockIdx.x] = i;
    }
}

extern "C" __global__ void argmax_combine(const float* __restrict__ part_v, const u32* __restrict__ part_i,
                                          u32* __restrict__ out, u32 parts) {
    SHARED_ARRAY(float, best_v, 1024);
    SHARED_ARRAY(u32, best_i, 1024);
    const u64 base = (u64)blockIdx.x * parts;
    // The partial maxima in chunk order; an empty chunk's index (~0) never wins.
    float bv = -INFINITY;
    u32 bi = 0xffffffffu;
    for (u32 p = threadIdx.x; p < parts; p += blockDim.x) {
        const float v = part_v[base + p];
        const u32 i = part_i[base + p];
        if (i != 0xffffffffu && (bi == 0xffffffffu || v > bv)) {
            bv = v;
            bi = i;
        }
    }
    float v;
    u32 i;
    block_argmax(bv, bi, best_v, best_i, &v, &i);
    if (threadIdx.x == 0) out[blockIdx.x] = i == 0xffffffffu ? 0u : i;
}

// ---------------------------------------------------------------------------------------------
// Temperature / top-k / min-p / top-p sampling on the device (the host reference:
// sampling.rs `sample`; no penalties, no logprobs: the engine sends those rows to the host).
//
// One block of SAMPLE_THREADS per row. params[5 * r ..] = temperature, top_k (0: off), top_p
// (1: off), min_p (0: off), u (a uniform in [0, 1) from the sequence's RNG, drawn on the host).
// Temperature 0 is greedy: the first maximum, as argmax_rows.
//
// Candidates are the finite logits, weighted w = exp(l / T - max / T) (the largest has weight 1).
// top-k keeps the k largest logits, min-p those with w >= min_p, top-p the smallest set of the
// largest reaching top_p of the remaining mass; ties at a cut are broken by the smaller index, as
// the host's sort by (logit desc, index asc) does. No sort: each cut is a radix select on the
// logit's order-preserving 32-bit key, 8 bits per pass, counting (top-k) or summing weights
// (top-p) per digit. The token is then the first kept index (in index order) at which the running
// mass passes u * (kept mass): every kept token is drawn with probability w / mass.
//
// Each thread owns a contiguous chunk of the row, so tie ranks and the final walk follow index
// order; shared memory: 8 KiB of scan buffer plus small tables.

#define SAMPLE_THREADS 1024

// Maps floats to unsigned keys with the same order (-0 < +0 aside, which never matters here).
__device__ __forceinline__ u32 order_key(float f) {
    const u32 u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

__device__ __forceinline__ bool finite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Inclusive prefix sum over the block of one double per thread; *total gets the block's sum.
__device__ double block_scan(double v, double* buf, double* total) {
    buf[threadIdx.x] = v;
    __syncthreads();
    for (u32 o = 1; o < blockDim.x; o <<= 1) {
        const double add = threadIdx.x >= o ? buf[threadIdx.x - o] : 0.0;
        __syncthreads();
        buf[threadIdx.x] += add;
        __syncthreads();
    }
    const double incl = buf[threadIdx.x];
    *total = buf[blockDim.x - 1];
    __syncthreads();
    return incl;
}

// Replaces (v, idx) by (ov, oi) when that is larger, or equal at a smaller index; index
// 0xffffffff is "none" and never wins.
__device__ __forceinline__ void keep_better(float& v, u32& idx, float ov, u32 oi) {
    if (oi != 0xffffffffu && (idx == 0xffffffffu || ov > v || (ov == v && oi < idx))) {
        v = ov;
        idx = oi;
    }
}

// The block's (largest value, smallest index among equals); idx 0xffffffff is "none".
__device__ u32 block_argmax(float v, u32 idx, float* sv, u32* si) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
        keep_better(v, idx, ov, oi);
    }
    const u32 lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = idx;
    }
    __syncthreads();
    if (warp == 0) {
        const u32 warps = (blockDim.x + 31) >> 5;
        v = lane < warps ? sv[lane] : -INFINITY;
        idx = lane < warps ? si[lane] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const u32 oi = __shfl_xor_sync(0xffffffffu, idx, o);
            keep_better(v, idx, ov, oi);
        }
        if (lane == 0) si[0] = idx;
    }
    __syncthreads();
    const u32 best = si[0];
    __syncthreads();
    return best;
}

// The cut of one radix select: keys above `key` are kept, and of the keys equal to it the first
// `eq` (in index order); `active` false keeps everything.
struct Cut {
    bool active;
    u32 key;
    u32 eq;
};

__device__ __forceinline__ bool cut_keeps(const Cut& c, u32 key, u32& rank) {
    if (!c.active || key > c.key) return true;
    if (key < c.key) return false;
    return rank++ < c.eq;
}

// Whether a finite logit with key `key` and weight `w` passes top-k and min-p. Call it for every
// finite logit of the chunk in index order: it advances the top-k tie rank `rk`.
__device__ __forceinline__ bool passes_k_and_min_p(const Cut& ck, float min_p, u32 key, double w, u32& rk) {
    const bool in_k = cut_keeps(ck, key, rk);
    return in_k && (min_p <= 0.0f || w >= (double)min_p);
}

// Whether a finite logit passes top-k, min-p and top-p; advances both tie ranks.
__device__ __forceinline__ bool passes_all(const Cut& ck, const Cut& cp, float min_p, u32 key, double w, u32& rk,
                                           u32& rp) {
    return passes_k_and_min_p(ck, min_p, key, w, rk) && cut_keeps(cp, key, rp);
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(const float* __restrict__ logits, const double* __restrict__ params,
                                       u32* __restrict__ out, u32 cols) {
    SHARED_ARRAY(double, scan, SAMPLE_THREADS);
    SHARED_ARRAY(double, hist_w, 256);
    SHARED_ARRAY(u32, hist_n, 256);
    SHARED_ARRAY(float, sv, 32);
    SHARED_ARRAY(u32, si, 32);
    SHARED_VAR(u32, pick_digit);
    SHARED_VAR(double, pick_rest);
    SHARED_VAR(u32, picked);

    const float* row = logits + (u64)blockIdx.x * cols;
    const double* p = params + (u64)blockIdx.x * 5;
    const float temperature = (float)p[0];
    const u32 top_k = (u32)p[1];
    const float top_p = (float)p[2], min_p = (float)p[3];
    const double u = p[4];
    const u32 tid = threadIdx.x;
    const u32 chunk = (cols + blockDim.x - 1) / blockDim.x;
    const u32 c0 = min(cols, tid * chunk), c1 = min(cols, c0 + chunk);

    // Pass 1: the first maximum (greedy, and the host's fallback) and the number of candidates.
    float bv = -INFINITY;
    u32 bi = 0xffffffffu, n_finite = 0;
    for (u32 i = c0; i < c1; ++i) {
        const float x = row[i];
        if (bi == 0xffffffffu || x > bv) {
            bv = x;
            bi = i;
        }
        n_finite += finite(x);
    }
    const u32 best = block_argmax(bv, bi, sv, si);
    double n_total;
    block_scan((double)n_finite, scan, &n_total);
    const u32 candidates = (u32)n_total;
    if (temperature <= 0.0f || candidates == 0) {
        if (tid == 0) out[blockIdx.x] = best == 0xffffffffu ? 0u : best;
        return;
    }
    const float inv_t = 1.0f / temperature;
    const float mx = row[best] * inv_t;
    // Unnormalised probability, exactly as the host computes it.
    #define WEIGHT(x) exp((double)((x) * inv_t - mx))

    // top-k: the k-th largest key, 8 bits per pass; `want` is how many of the keys matching the
    // prefix so far are still to be kept.
    Cut ck = {false, 0u, 0u};
    if (top_k > 0 && top_k < candidates) {
        u32 prefix = 0, mask = 0, want = top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist_n[tid] = 0;
            __syncthreads();
            for (u32 i = c0; i < c1; ++i) {
                const float x = row[i];
                const u32 k = order_key(x);
                if (finite(x) && (k & mask) == prefix) atomicAdd(&hist_n[(k >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (tid == 0) {
                u32 b = 255;
                for (;; --b) {
                    if (hist_n[b] >= want || b == 0) break;
                    want -= hist_n[b];
                }
                pick_digit = b;
                picked = want;
            }
            __syncthreads();
            prefix |= pick_digit << shift;
            mask |= 255u << shift;
            want = picked;
            __syncthreads();
        }
        ck = {true, prefix, want};
    }

    // Ranks among the keys equal to the top-k cut that come before this thread's chunk.
    u32 eq_k = 0;
    if (ck.active) {
        for (u32 i = c0; i < c1; ++i) eq_k += finite(row[i]) && order_key(row[i]) == ck.key;
    }
    double tmp;
    const u32 k_base = (u32)(block_scan((double)eq_k, scan, &tmp) - eq_k);

    // After top-k and min-p: the kept mass (for top-p's target).
    double mass1 = 0.0;
    if (top_p < 1.0f) {
        u32 rk = k_base;
        for (u32 i = c0; i < c1; ++i) {
            const float x = row[i];
            if (!finite(x)) continue;
            const double w = WEIGHT(x);
            if (passes_k_and_min_p(ck, min_p, order_key(x), w, rk)) mass1 += w;
        }
    }
    double total1 = 0.0;
    if (top_p < 1.0f) block_scan(mass1, scan, &total1);

    // top-p: the key at which the mass of larger keys first reaches the target, 8 bits per pass.
    Cut cp = {false, 0u, 0u};
    if (top_p < 1.0f) {
        u32 prefix = 0, mask = 0;
        double need = (double)top_p * total1;
        for (int shift = 24; shift >= 0; shift -= 8) {
            if (tid < 256) hist_w[tid] = 0.0;
            __syncthreads();
            u32 rk = k_base;
            for (u32 i = c0; i < c1; ++i) {
                const float x = row[i];
                if (!finite(x)) continue;
                const u32 k = order_key(x);
                const double w = WEIGHT(x);
                if (passes_k_and_min_p(ck, min_p, k, w, rk) && (k & mask) == prefix)
                    atomicAdd(&hist_w[(k >> shift) & 255u], w);
            }
            __syncthreads();
            if (tid == 0) {
                // The highest digit whose mass (with the higher ones) reaches what is needed; when
                // rounding leaves the sum short, the lowest non-empty digit (keep everything).
                int chosen = -1, lowest = -1;
                for (int b = 255; b >= 0; --b) {
                    if (hist_w[b] <= 0.0) continue;
                    lowest = b;
                    if (hist_w[b] >= need) {
                        chosen = b;
                        break;
                    }
                    need -= hist_w[b];
                }
                if (chosen < 0) {
                    chosen = lowest < 0 ? 0 : lowest;
                    need = lowest < 0 ? 0.0 : hist_w[lowest];
                }
                pick_digit = (u32)chosen;
                pick_rest = need;
            }
            __syncthreads();
            prefix |= pick_digit << shift;
            mask |= 255u << shift;
            need = pick_rest;
            __syncthreads();
        }
        // Every key equal to the cut has the same weight: keep the first ceil(need / w) of them.
        const double w_eq = WEIGHT(key_value(prefix));
        double r = w_eq > 0.0 ? ceil(need / w_eq) : 1.0;
        r = fmax(r, 1.0);
        cp = {true, prefix, r >= 4294967295.0 ? 0xffffffffu : (u32)r};
    }

    // Ranks among the kept keys equal to the top-p cut before this chunk.
    u32 eq_p = 0;
    if (cp.active) {
        u32 rk = k_base;
        for (u32 i = c0; i < c1; ++i) {
            const float x = row[i];
            if (!finite(x)) continue;
            const u32 k = order_key(x);
            if (passes_k_and_min_p(ck, min_p, k, WEIGHT(x), rk) && k == cp.key) ++eq_p;
        }
    }
    const u32 p_base = (u32)(block_scan((double)eq_p, scan, &tmp) - eq_p);

    // The draw: the mass of the kept tokens of each chunk, a block scan, and the chunk holding
    // u * mass walks to its token. `last` is the highest kept index (for a rounding shortfall).
    double mass2 = 0.0;
    u32 last = 0xffffffffu;
    {
        u32 rk = k_base, rp = p_base;
        for (u32 i = c0; i < c1; ++i) {
            const float x = row[i];
            if (!finite(x)) continue;
            const double w = WEIGHT(x);
            if (!passes_all(ck, cp, min_p, order_key(x), w, rk, rp)) continue;
            mass2 += w;
            last = i;
        }
    }
    double total2;
    const double incl = block_scan(mass2, scan, &total2);
    const double target = u * total2;
    if (tid == 0) picked = 0xffffffffu;
    __syncthreads();
    if (mass2 > 0.0 && target >= incl - mass2 && target < incl) {
        double left = target - (incl - mass2);
        u32 rk = k_base, rp = p_base, choice = last;
        for (u32 i = c0; i < c1; ++i) {
            const float x = row[i];
            if (!finite(x)) continue;
            const double w = WEIGHT(x);
            if (!passes_all(ck, cp, min_p, order_key(x), w, rk, rp)) continue;
            left -= w;
            if (left < 0.0) {
                choice = i;
                break;
            }
        }
        picked = choice;  // at most one chunk holds the target
    }
    __syncthreads();
    if (picked == 0xffffffffu) {
        // u * mass rounded to the total (or past it): the last kept token, as the host.
        const u32 any = block_argmax(last == 0xffffffffu ? -INFINITY : (float)last, last, sv, si);
        if (tid == 0) out[blockIdx.x] = any == 0xffffffffu ? best : any;
    } else if (tid == 0) {
        out[blockIdx.x] = picked;
    }
    #undef WEIGHT
}
