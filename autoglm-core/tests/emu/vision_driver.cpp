// Runs the kernels of vision.cu on the CPU emulator (cuda_emu.h), launched as cuda/vision.rs
// launches them. Usage: vision_driver IN OUT. IN starts with a u32 op code; what follows and what
// OUT holds is listed at each op below (little-endian, arrays back to back).
#include "cuda_emu.h"
#include "common.cuh"
#include "vision.cu"

static FILE* in_file;
template <class T> static std::vector<T> get(size_t n) {
    std::vector<T> v(n);
    if (n && std::fread(v.data(), sizeof(T), n, in_file) != n) {
        std::fprintf(stderr, "vision_driver: input too short\n");
        std::exit(2);
    }
    return v;
}
template <class T> static T one() { return get<T>(1)[0]; }
static std::vector<unsigned char> out_bytes;
template <class T> static void put(const std::vector<T>& v) {
    const auto* p = reinterpret_cast<const unsigned char*>(v.data());
    out_bytes.insert(out_bytes.end(), p, p + v.size() * sizeof(T));
}

static const unsigned ROW_THREADS = 256, ROPE_THREADS = 128, VISION_THREADS = 256;
// ops.rs grid_for: a grid-stride launch over n elements.
static dim3 grid_for(u64 n) {
    u64 blocks = (n + ROW_THREADS - 1) / ROW_THREADS;
    blocks = blocks < 1 ? 1 : (blocks > 65535ull * 8 ? 65535ull * 8 : blocks);
    return dim3{(unsigned)blocks, 1, 1};
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    in_file = std::fopen(argv[1], "rb");
    if (!in_file) return 2;
    const u32 op = one<u32>();
    const dim3 row_block{ROW_THREADS, 1, 1};
    const float nan = __uint_as_float(0x7fc00000u);
    switch (op) {
    case 0: {  // layer_norm: u32 rows, width, f32 eps, x, w, b -> out
        const u32 rows = one<u32>(), width = one<u32>();
        const float eps = one<float>();
        auto x = get<float>((size_t)rows * width);
        auto w = get<float>(width);
        auto b = get<float>(width);
        std::vector<float> out(x.size(), nan);
        emu_launch(dim3{rows, 1, 1}, row_block,
                   [&] { layer_norm(x.data(), w.data(), b.data(), out.data(), width, eps); });
        put(out);
        break;
    }
    case 1: {  // gelu: u64 n, x -> out, out_bf16
        const u64 n = one<u64>();
        auto x = get<float>(n);
        std::vector<float> out(n, nan);
        std::vector<bf16_t> ob(n, 0x7fc0);
        emu_launch(grid_for(n), row_block, [&] { gelu(x.data(), out.data(), ob.data(), n); });
        put(out);
        put(ob);
        break;
    }
    case 2: {  // interpolate_pos_embed: u32 rows, images, side, width, bf16 table [side^2 * width],
               // u32 hw [rows * 2], img [rows], grids [images * 2] -> out
        const u32 rows = one<u32>(), images = one<u32>(), side = one<u32>(), width = one<u32>();
        auto table = get<bf16_t>((size_t)side * side * width);
        auto hw = get<u32>((size_t)rows * 2);
        auto img = get<u32>(rows);
        auto grids = get<u32>((size_t)images * 2);
        std::vector<float> out((size_t)rows * width, nan);
        emu_launch(dim3{rows, 1, 1}, row_block, [&] {
            interpolate_pos_embed(table.data(), hw.data(), img.data(), grids.data(), side, width, out.data());
        });
        put(out);
        break;
    }
    case 3: {  // vision_rope + vision_attention: u32 rows, images, heads, head_dim, tile, qt,
               // f32 scale, qkv [rows * 3 * heads * head_dim], u32 hw [rows * 2],
               // cu_seqlens [images + 1], f32 inv_freq [head_dim / 4] -> qk, out, out_bf16
        const u32 rows = one<u32>(), images = one<u32>(), nh = one<u32>(), hd = one<u32>();
        const u32 tile = one<u32>(), qt = one<u32>();
        const float scale = one<float>();
        const size_t w = (size_t)nh * hd;
        auto qkv = get<float>(rows * 3 * w);
        auto hw = get<u32>((size_t)rows * 2);
        auto cu = get<u32>((size_t)images + 1);
        auto inv_freq = get<float>(hd / 4);
        if (4 * (2 * qt * hd + tile * (hd + 1) + qt * tile + 3 * qt) > sizeof emu_dynamic_smem) {
            std::fprintf(stderr, "vision_driver: shared memory too small\n");
            return 2;
        }
        std::vector<float> qk(rows * 2 * w, nan), out(rows * w, nan);
        std::vector<bf16_t> ob(rows * w, 0x7fc0);
        emu_launch(dim3{rows, 1, 1}, dim3{ROPE_THREADS, 1, 1},
                   [&] { vision_rope(qkv.data(), hw.data(), inv_freq.data(), qk.data(), nh, hd); });
        u32 longest = 0;
        for (u32 i = 0; i < images; ++i) longest = max(longest, cu[i + 1] - cu[i]);
        emu_launch(dim3{images, (longest + qt - 1) / qt, nh}, dim3{VISION_THREADS, 1, 1}, [&] {
            vision_attention(qkv.data(), qk.data(), cu.data(), nh, hd, scale, tile, qt, out.data(), ob.data());
        });
        put(qk);
        put(out);
        put(ob);
        break;
    }
    default:
        std::fprintf(stderr, "vision_driver: unknown op %u\n", op);
        return 2;
    }
    std::fclose(in_file);
    FILE* o = std::fopen(argv[2], "wb");
    if (!o) return 2;
    std::fwrite(out_bytes.data(), 1, out_bytes.size(), o);
    std::fclose(o);
    return 0;
}
