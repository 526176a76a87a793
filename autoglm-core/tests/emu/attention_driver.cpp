// Runs the attention kernels of attention.cu on the CPU emulator (cuda_emu.h) the way ops.rs
// launches them: rope_and_cache_write, then paged_attention (and attention_combine when
// splits > 1) or, with kernel 1, paged_attention_prefill with `qt` query tokens a block.
// Usage: attention_driver IN OUT. IN (little-endian): u32 tokens, heads, kv_heads, head_dim,
// rotary_dim, block_size, slots, max_blocks_per_seq, seqs, tile, splits, f32 scale, u32 kernel,
// qt (kernel 0: the group split), rope_stride (1: 1-D rope from the positions, 3: M-RoPE), sec0, sec01 (the M-RoPE section
// bounds; rotary_dim / 2 for 1-D rope); then f32 qkv, u32 positions, slot_mapping, seq_of_token,
// block_tables, query_start (seqs + 1), with M-RoPE u32 mrope_positions (tokens * 3), then f32
// inv_freq, bf16 k_cache, v_cache.
// OUT: f32 qkv (after rope), f32 out, bf16 out_bf16, bf16 k_cache, v_cache.
#include "cuda_emu.h"
#include "common.cuh"
#include "attention.cu"

template <class T> static void get(FILE* f, std::vector<T>& v, size_t n) {
    v.resize(n);
    if (n && std::fread(v.data(), sizeof(T), n, f) != n) {
        std::fprintf(stderr, "attention_driver: input too short\n");
        std::exit(2);
    }
}
template <class T> static void put(FILE* f, const std::vector<T>& v) {
    std::fwrite(v.data(), sizeof(T), v.size(), f);
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = std::fopen(argv[1], "rb");
    if (!in) return 2;
    std::vector<u32> h;
    get(in, h, 17);
    const u32 tokens = h[0], nh = h[1], nkv = h[2], hd = h[3], rot = h[4], bs = h[5], slots = h[6],
              mbps = h[7], seqs = h[8], tile = h[9], splits = h[10];
    const float scale = __uint_as_float(h[11]);
    const u32 kernel = h[12], qt = h[13], rope_stride = h[14], sec0 = h[15], sec01 = h[16];
    const u32 width = (nh + 2 * nkv) * hd, kvw = nkv * hd, g = nh / nkv;
    std::vector<float> qkv, inv_freq;
    std::vector<u32> positions, slot_mapping, seq_of_token, tables, query_start, mrope;
    std::vector<bf16_t> k_cache, v_cache;
    get(in, qkv, (size_t)tokens * width);
    get(in, positions, tokens);
    get(in, slot_mapping, tokens);
    get(in, seq_of_token, tokens);
    get(in, tables, (size_t)seqs * mbps);
    get(in, query_start, (size_t)seqs + 1);
    if (rope_stride == 3) get(in, mrope, (size_t)tokens * 3);
    const u32* rope_pos = rope_stride == 3 ? mrope.data() : positions.data();
    get(in, inv_freq, rot / 2);
    get(in, k_cache, (size_t)slots * kvw);
    get(in, v_cache, (size_t)slots * kvw);
    std::fclose(in);

    const size_t n_out = (size_t)tokens * nh * hd;
    std::vector<float> out(n_out, __uint_as_float(0x7fc00000u));
    std::vector<bf16_t> out_bf16(n_out, 0x7fc0);
    const size_t parts = splits > 1 ? (size_t)tokens * nh * splits : 1;
    std::vector<float> part_acc(splits > 1 ? parts * hd : 1), part_m(parts), part_l(parts);
    const u32 rows = kernel == 1 ? qt * g : g / qt;
    if (4 * (2 * rows * hd + tile * (hd + 1) + rows * tile + 3 * rows) > sizeof emu_dynamic_smem) {
        std::fprintf(stderr, "attention_driver: shared memory too small\n");
        return 2;
    }

    emu_launch(dim3{tokens, 1, 1}, dim3{128, 1, 1}, [&] {
        rope_and_cache_write(qkv.data(), rope_pos, rope_stride, sec0, sec01, slot_mapping.data(), inv_freq.data(),
                             k_cache.data(), v_cache.data(), nh, nkv, hd, rot);
    });
    if (kernel == 1) {
        u32 longest = 0;
        for (u32 s = 0; s < seqs; ++s) longest = max(longest, query_start[s + 1] - query_start[s]);
        emu_launch(dim3{seqs, (longest + qt - 1) / qt, nkv}, dim3{256, 1, 1}, [&] {
            paged_attention_prefill(qkv.data(), k_cache.data(), v_cache.data(), positions.data(),
                                    query_start.data(), tables.data(), mbps, bs, nh, nkv, hd, scale, tile,
                                    qt, out.data(), out_bf16.data());
        });
    } else {
        emu_launch(dim3{tokens, nkv * qt, splits}, dim3{128, 1, 1}, [&] {
            paged_attention(qkv.data(), k_cache.data(), v_cache.data(), positions.data(),
                            seq_of_token.data(), tables.data(), mbps, bs, nh, nkv, hd, scale, tile, splits,
                            qt, out.data(), out_bf16.data(), part_acc.data(), part_m.data(), part_l.data());
        });
    }
    if (kernel == 0 && splits > 1) {
        emu_launch(dim3{tokens, nh, 1}, dim3{128, 1, 1}, [&] {
            attention_combine(part_acc.data(), part_m.data(), part_l.data(), out.data(),
                              out_bf16.data(), nh, hd, splits);
        });
    }

    FILE* o = std::fopen(argv[2], "wb");
    if (!o) return 2;
    put(o, qkv);
    put(o, out);
    put(o, out_bf16);
    put(o, k_cache);
    put(o, v_cache);
    std::fclose(o);
    return 0;
}
