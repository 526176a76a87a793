// Rope, KV-cache write and paged causal attention (the CPU reference: backend/cpu/attention.rs).
//
// Layouts (as the CPU backend): qkv is [tokens, (H + 2 * KVH) * D] f32, q heads then k heads then
// v heads. The cache of one layer is two bf16 arrays [slots, KVH * D] with
// slot = block_table[pos / block_size] * block_size + pos % block_size. Token t of sequence s sees
// the positions 0..=positions[t] of s (causal; earlier chunks are already in the cache).

#define PAD_SLOT 0xFFFFFFFFu  // graph.rs PAD_SLOT

// Interleaved rope on the first rotary_dim dims of every q and k head (pairs (2i, 2i+1), angle
// inv_freq[i] * pos(i), inv_freq computed on the host exactly as the CPU does), then k and v of the
// token are written (bf16) to its slot, unless the slot is PAD_SLOT. grid = tokens, block = 128.
//
// pos(i) = rope_pos[t * rope_stride + stream(i)] with stream(i) = 0 for i < sec0, 1 for
// sec0 <= i < sec01, 2 otherwise (AttentionShape::mrope_stream). 1-D rope: rope_pos = positions,
// rope_stride = 1, sec0 = sec01 = rotary_dim / 2 (every frequency stream 0). M-RoPE: rope_pos =
// the batch's [t, h, w] triples, rope_stride = 3, sec0 = section[0], sec01 = section[0] +
// section[1]. The cache slot (slot_mapping) and, in the attention kernels, the causal mask follow
// `positions` either way.
extern "C" __global__ void rope_and_cache_write(float* __restrict__ qkv, const u32* __restrict__ rope_pos,
                                                u32 rope_stride, u32 sec0, u32 sec01,
                                                const u32* __restrict__ slot_mapping,
                                                const float* __restrict__ inv_freq, bf16_t* __restrict__ k_cache,
                                                bf16_t* __restrict__ v_cache, u32 num_heads, u32 num_kv_heads,
                                                u32 head_dim, u32 rotary_dim) {
    const u64 t = blockIdx.x;
    const u32 width = (num_heads + 2 * num_kv_heads) * head_dim;
    float* row = qkv + t * width;
    const u32* pos = rope_pos + t * rope_stride;
    const u32 pairs = rotary_dim / 2;
    const u32 rot_heads = num_heads + num_kv_heads;
    for (u32 i = threadIdx.x; i < rot_heads * pairs; i += blockDim.x) {
        const u32 h = i / pairs, p = i % pairs;
        const u32 stream = p < sec0 ? 0u : (p < sec01 ? 1u : 2u);
        float s, c;
        sincosf(inv_freq[p] * (float)pos[stream], &s, &c);
        float* x = row + h * head_dim + 2 * p;
        const float x0 = x[0], x1 = x[1];
        x[0] = x0 * c - x1 * s;
        x[1] = x1 * c + x0 * s;
    }
    __syncthreads();
    const u32 slot = slot_mapping[t];
    if (slot == PAD_SLOT) return;  // a padding token of a decode graph: nothing to cache
    const u32 kvw = num_kv_heads * head_dim;
    const u64 at = (u64)slot * kvw;
    const float* k = row + num_heads * head_dim;
    const float* v = k + kvw;
    for (u32 i = threadIdx.x; i < kvw; i += blockDim.x) {
        k_cache[at + i] = f32_to_bf16(k[i]);
        v_cache[at + i] = f32_to_bf16(v[i]);
    }
}

// Shared steps of the two attention kernels below. A block holds `rows` query rows; a tile of n
// context positions (starting at j0) is staged in shared memory as f32 rows D + 1 floats apart
// (so the threads of a warp, reading one position each, hit different banks). The online softmax
// and the value accumulation over a staged tile (online_softmax, accumulate_pv) are in common.cuh,
// shared with vision.cu.

// Stages keys or values of positions j0..j0+n of KV head `kvh` from the paged cache.
__device__ __forceinline__ void stage_tile(float* kv, const bf16_t* __restrict__ cache, const u32* table, u32 j0,
                                           u32 n, u32 block_size, u32 kvw, u32 kvh, u32 D) {
    const u32 KS = D + 1;
    for (u32 i = threadIdx.x; i < n * D; i += blockDim.x) {
        const u32 j = j0 + i / D;
        const u64 slot = (u64)table[j / block_size] * block_size + j % block_size;
        kv[(i / D) * KS + i % D] = bf16_to_f32(cache[slot * kvw + (u64)kvh * D + i % D]);
    }
}

// Paged attention with an online softmax, for prefill chunks and decodes alike.
//
// grid = (tokens, KVH * group_split, splits); block = 128 threads. A block serves
// G = H / KVH / group_split adjacent query heads of one KV head's group for one token: with
// group_split 1 each K/V element is read once per query group (GQA); small decode batches split
// the group over more blocks (a batch-1 step of a model with 2 KV heads is otherwise 2 blocks on
// a GPU of 132 multiprocessors). The token's context is cut into `splits` contiguous ranges
// (split-K for long decodes); each block walks its range in tiles of `tile` positions staged in
// shared memory.
//
// Dynamic shared memory (floats): q [G*D] | acc [G*D] | kv tile [tile*(D+1)] | scores [G*tile] |
// m [G] | l [G] | alpha [G]; the host computes the same size (ops.rs, attention_smem_bytes).
// Tile rows are D+1 floats apart so the threads of a warp, which read one position each in the
// score loop, hit different banks.
//
// With splits == 1 the block writes the normalised output out[t, h*D + d] (and its bf16 copy
// out_bf16, the operand of the output projection's GEMM). Otherwise it writes
// its partial state to part_acc[((t*H + h)*splits + split)*D + d], part_m / part_l[(t*H + h)*splits
// + split], and attention_combine merges the splits.
extern "C" __global__ void paged_attention(const float* __restrict__ qkv, const bf16_t* __restrict__ k_cache,
                                           const bf16_t* __restrict__ v_cache, const u32* __restrict__ positions,
                                           const u32* __restrict__ seq_of_token, const u32* __restrict__ block_tables,
                                           u32 max_blocks_per_seq, u32 block_size, u32 num_heads,
                                           u32 num_kv_heads, u32 head_dim, float scale, u32 tile, u32 splits,
                                           u32 group_split, float* __restrict__ out,
                                           bf16_t* __restrict__ out_bf16, float* __restrict__ part_acc,
                                           float* __restrict__ part_m, float* __restrict__ part_l) {
    DYNAMIC_SMEM(float, smem);
    const u32 t = blockIdx.x, kvh = blockIdx.y / group_split, split = blockIdx.z;
    // This block's heads: G adjacent heads of KV head kvh's group, starting at head0.
    const u32 G = num_heads / num_kv_heads / group_split, D = head_dim, KS = head_dim + 1;
    const u32 head0 = kvh * (num_heads / num_kv_heads) + (blockIdx.y % group_split) * G;
    float* q = smem;
    float* acc = q + G * D;
    float* kv = acc + G * D;
    float* sc = kv + tile * KS;
    float* m = sc + G * tile;
    float* l = m + G;
    float* alpha = l + G;

    const u32 width = (num_heads + 2 * num_kv_heads) * D;
    const float* qrow = qkv + (u64)t * width + (u64)head0 * D;  // the group's heads are adjacent
    for (u32 i = threadIdx.x; i < G * D; i += blockDim.x) {
        q[i] = qrow[i];
        acc[i] = 0.0f;
    }
    for (u32 g = threadIdx.x; g < G; g += blockDim.x) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const u32 n_ctx = positions[t] + 1;
    const u32 chunk = (n_ctx + splits - 1) / splits;
    const u32 begin = split * chunk;
    const u32 end = min(n_ctx, begin + chunk);
    const u32* table = block_tables + (u64)seq_of_token[t] * max_blocks_per_seq;
    const u32 kvw = num_kv_heads * D;
    __syncthreads();

    for (u32 j0 = begin; j0 < end; j0 += tile) {
        const u32 n = min(tile, end - j0);
        // Stage K of positions j0..j0+n.
        stage_tile(kv, k_cache, table, j0, n, block_size, kvw, kvh, D);
        __syncthreads();
        // Scores of every (head in group, position in tile).
        for (u32 i = threadIdx.x; i < G * n; i += blockDim.x) {
            const u32 g = i / n, j = i % n;
            const float* qg = q + g * D;
            const float* kj = kv + j * KS;
            float s = 0.0f;
            for (u32 d = 0; d < D; ++d) s += qg[d] * kj[d];
            sc[g * tile + j] = s * scale;
        }
        __syncthreads();
        // Online softmax: one thread per head of the group updates its running max and sum.
        online_softmax(sc, m, l, alpha, G, n, tile);
        // Stage V (the K tile is no longer needed once the scores exist).
        stage_tile(kv, v_cache, table, j0, n, block_size, kvw, kvh, D);
        __syncthreads();
        accumulate_pv(acc, sc, kv, alpha, G, n, D, tile);
        __syncthreads();
    }

    for (u32 i = threadIdx.x; i < G * D; i += blockDim.x) {
        const u32 g = i / D, d = i % D;
        const u32 h = head0 + g;
        if (splits == 1) {
            // n_ctx >= 1, so the single split saw at least one position and l[g] >= 1.
            const u64 o = ((u64)t * num_heads + h) * D + d;
            const float v = acc[i] / l[g];
            out[o] = v;
            out_bf16[o] = f32_to_bf16(v);
        } else {
            const u64 p = ((u64)t * num_heads + h) * splits + split;
            part_acc[p * D + d] = acc[i];
            if (d == 0) {
                part_m[p] = m[g];
                part_l[p] = l[g];
            }
        }
    }
}

// Merges the split-K partial states of paged_attention into out and out_bf16. grid = (tokens, H),
// block = 128.
extern "C" __global__ void attention_combine(const float* __restrict__ part_acc, const float* __restrict__ part_m,
                                             const float* __restrict__ part_l, float* __restrict__ out,
                                             bf16_t* __restrict__ out_bf16, u32 num_heads, u32 head_dim,
                                             u32 splits) {
    const u64 th = (u64)blockIdx.x * num_heads + blockIdx.y;
    float mx = -INFINITY;
    for (u32 s = 0; s < splits; ++s) mx = fmaxf(mx, part_m[th * splits + s]);
    float total = 0.0f;
    for (u32 s = 0; s < splits; ++s) {
        const float ms = part_m[th * splits + s];
        if (ms != -INFINITY) total += part_l[th * splits + s] * expf(ms - mx);
    }
    for (u32 d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (u32 s = 0; s < splits; ++s) {
            const float ms = part_m[th * splits + s];
            if (ms != -INFINITY) o += part_acc[(th * splits + s) * head_dim + d] * expf(ms - mx);
        }
        const float v = o / total;
        out[th * head_dim + d] = v;
        out_bf16[th * head_dim + d] = f32_to_bf16(v);
    }
}

// Paged causal attention for prefill chunks, tiled over queries: a block serves up to `qt`
// consecutive query tokens of one sequence with the G = H / KVH query heads of one KV head, so
// each K/V tile staged in shared memory serves R = qt * G rows instead of G. Each row sees the
// positions up to its own token's position (later ones in the tile are masked).
//
// grid = (sequences, ceil(longest query run / qt), KVH); block = 256 threads. Block (s, y, kvh)
// takes tokens query_start[s] + y * qt .. min(+ qt, query_start[s + 1]) and exits when that is
// empty. Row r is token t0 + r / G, head kvh * G + r % G.
//
// Dynamic shared memory (floats): q [R*D] | acc [R*D] | kv tile [tile*(D+1)] | scores [R*tile] |
// m [R] | l [R] | alpha [R], with R = qt * G (ops.rs, prefill_smem_bytes).
extern "C" __global__ void paged_attention_prefill(const float* __restrict__ qkv, const bf16_t* __restrict__ k_cache,
                                                   const bf16_t* __restrict__ v_cache, const u32* __restrict__ positions,
                                                   const u32* __restrict__ query_start, const u32* __restrict__ block_tables,
                                                   u32 max_blocks_per_seq, u32 block_size, u32 num_heads,
                                                   u32 num_kv_heads, u32 head_dim, float scale, u32 tile, u32 qt,
                                                   float* __restrict__ out, bf16_t* __restrict__ out_bf16) {
    DYNAMIC_SMEM(float, smem);
    const u32 seq = blockIdx.x, kvh = blockIdx.z;
    const u32 t0 = query_start[seq] + blockIdx.y * qt;
    const u32 t_end = query_start[seq + 1];
    if (t0 >= t_end) return;  // the whole block: no barrier is skipped by part of it
    const u32 nq = min(qt, t_end - t0);
    const u32 G = num_heads / num_kv_heads, D = head_dim, KS = head_dim + 1, R = nq * G, RMAX = qt * G;
    float* q = smem;
    float* acc = q + RMAX * D;
    float* kv = acc + RMAX * D;
    float* sc = kv + tile * KS;
    float* m = sc + RMAX * tile;
    float* l = m + RMAX;
    float* alpha = l + RMAX;

    const u32 width = (num_heads + 2 * num_kv_heads) * D;
    for (u32 i = threadIdx.x; i < R * D; i += blockDim.x) {
        const u32 r = i / D;
        // Row r: token t0 + r / G, whose group's heads are adjacent in its qkv row.
        q[i] = qkv[(u64)(t0 + r / G) * width + (u64)kvh * G * D + (r % G) * D + i % D];
        acc[i] = 0.0f;
    }
    for (u32 r = threadIdx.x; r < R; r += blockDim.x) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    // Positions within a chunk rise by one per token: the last token sees the most.
    const u32 n_ctx = positions[t0 + nq - 1] + 1;
    const u32* table = block_tables + (u64)seq * max_blocks_per_seq;
    const u32 kvw = num_kv_heads * D;
    __syncthreads();

    for (u32 j0 = 0; j0 < n_ctx; j0 += tile) {
        const u32 n = min(tile, n_ctx - j0);
        stage_tile(kv, k_cache, table, j0, n, block_size, kvw, kvh, D);
        __syncthreads();
        for (u32 i = threadIdx.x; i < R * n; i += blockDim.x) {
            const u32 r = i / n, j = i % n;
            float s = -INFINITY;
            if (j0 + j <= positions[t0 + r / G]) {  // causal: the row's own position and before
                const float* qr = q + r * D;
                const float* kj = kv + j * KS;
                s = 0.0f;
                for (u32 d = 0; d < D; ++d) s += qr[d] * kj[d];
                s *= scale;
            }
            sc[r * tile + j] = s;
        }
        __syncthreads();
        // Online softmax per row. Every row sees position 0 in the first tile, so m[r] is finite
        // from then on and a masked score only ever gives p = exp(-inf) = 0.
        online_softmax(sc, m, l, alpha, R, n, tile);
        stage_tile(kv, v_cache, table, j0, n, block_size, kvw, kvh, D);
        __syncthreads();
        accumulate_pv(acc, sc, kv, alpha, R, n, D, tile);
        __syncthreads();
    }

    for (u32 i = threadIdx.x; i < R * D; i += blockDim.x) {
        const u32 r = i / D, d = i % D;
        const u32 t = t0 + r / G, h = kvh * G + r % G;
        const u64 o = ((u64)t * num_heads + h) * D + d;
        const float v = acc[i] / l[r];
        out[o] = v;
        out_bf16[o] = f32_to_bf16(v);
    }
}
