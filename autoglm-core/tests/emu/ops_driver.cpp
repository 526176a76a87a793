// Runs one of the small kernels of elementwise.cu / random.cu on the CPU emulator (cuda_emu.h),
// launched as ops.rs launches it. Usage: ops_driver IN OUT. IN starts with a u32 op code; what
// follows and what OUT holds is listed at each op below (little-endian, arrays back to back).
#include "cuda_emu.h"
#include "common.cuh"
#include "elementwise.cu"
#include "random.cu"
#include "gemv.cu"

static FILE* in_file;
template <class T> static std::vector<T> get(size_t n) {
    std::vector<T> v(n);
    if (n && std::fread(v.data(), sizeof(T), n, in_file) != n) {
        std::fprintf(stderr, "ops_driver: input too short\n");
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

static const unsigned ROW_THREADS = 256;
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
    switch (op) {
    case 0: {  // rms_norm: u32 rows, width, f32 eps, x, w -> out, out_bf16
        const u32 rows = one<u32>(), width = one<u32>();
        const float eps = one<float>();
        auto x = get<float>((size_t)rows * width);
        auto w = get<float>(width);
        std::vector<float> out(x.size());
        std::vector<bf16_t> ob(x.size());
        emu_launch(dim3{rows, 1, 1}, row_block, [&] { rms_norm(x.data(), w.data(), out.data(), ob.data(), width, eps); });
        put(out);
        put(ob);
        break;
    }
    case 1: {  // add_rms_norm: u32 rows, width, f32 eps, residual, x, w -> residual, out, out_bf16
        const u32 rows = one<u32>(), width = one<u32>();
        const float eps = one<float>();
        auto r = get<float>((size_t)rows * width);
        auto x = get<float>(r.size());
        auto w = get<float>(width);
        std::vector<float> out(x.size());
        std::vector<bf16_t> ob(x.size());
        emu_launch(dim3{rows, 1, 1}, row_block,
                   [&] { add_rms_norm(r.data(), x.data(), w.data(), out.data(), ob.data(), width, eps); });
        put(r);
        put(out);
        put(ob);
        break;
    }
    case 2: {  // silu_mul: u32 rows, half, gate_up -> out, out_bf16
        const u32 rows = one<u32>(), half = one<u32>();
        auto gu = get<float>((size_t)rows * 2 * half);
        std::vector<float> out((size_t)rows * half);
        std::vector<bf16_t> ob(out.size());
        emu_launch(grid_for((u64)rows * half), row_block,
                   [&] { silu_mul(gu.data(), out.data(), ob.data(), rows, half); });
        put(out);
        put(ob);
        break;
    }
    case 3: {  // embedding_bf16: u32 vocab, width, rows, bf16 table, u32 ids -> out
        const u32 vocab = one<u32>(), width = one<u32>(), rows = one<u32>();
        auto table = get<bf16_t>((size_t)vocab * width);
        auto ids = get<u32>(rows);
        std::vector<float> out((size_t)rows * width);
        emu_launch(dim3{rows, 1, 1}, row_block, [&] { embedding_bf16(table.data(), ids.data(), out.data(), width); });
        put(out);
        break;
    }
    case 4: {  // random_uniform_{f32,bf16}: u32 bf16?, u64 n, stream, f32 scale -> out
        const u32 as_bf16 = one<u32>();
        const u64 n = one<u64>(), stream = one<u64>();
        const float scale = one<float>();
        const u64 chunks = (n + 4095) / 4096;
        const dim3 grid{(unsigned)((chunks + 127) / 128), 1, 1}, block{128, 1, 1};
        if (as_bf16) {
            std::vector<bf16_t> out(n);
            emu_launch(grid, block, [&] { random_uniform_bf16(out.data(), n, stream, scale); });
            put(out);
        } else {
            std::vector<float> out(n);
            emu_launch(grid, block, [&] { random_uniform_f32(out.data(), n, stream, scale); });
            put(out);
        }
        break;
    }
    case 5: {  // gather_rows: u32 rows, cols, n, x, u32 picks -> out
        const u32 rows = one<u32>(), cols = one<u32>(), n = one<u32>();
        auto x = get<float>((size_t)rows * cols);
        auto picks = get<u32>(n);
        std::vector<float> out((size_t)n * cols);
        emu_launch(dim3{n, 1, 1}, row_block, [&] { gather_rows(x.data(), picks.data(), out.data(), cols); });
        put(out);
        break;
    }
    case 6: {  // add_bias: u32 rows, cols, y, b -> y
        const u32 rows = one<u32>(), cols = one<u32>();
        auto y = get<float>((size_t)rows * cols);
        auto b = get<float>(cols);
        emu_launch(grid_for((u64)rows * cols), row_block, [&] { add_bias(y.data(), b.data(), rows, cols); });
        put(y);
        break;
    }
    case 7: {  // f32_to_bf16: u64 n, src -> dst
        const u64 n = one<u64>();
        auto src = get<float>(n);
        std::vector<bf16_t> dst(n);
        emu_launch(grid_for(n), row_block, [&] { f32_to_bf16(src.data(), dst.data(), n); });
        put(dst);
        break;
    }
    case 8: {  // gemv_bf16: u32 m, n, k, bf16 w [n, k], bf16 x [m, k] -> y [m, n]
        const u32 m = one<u32>(), n = one<u32>(), k = one<u32>();
        auto w = get<bf16_t>((size_t)n * k);
        auto x = get<bf16_t>((size_t)m * k);
        // The device reads 16-byte chunks: give the emulated kernel 16-byte-aligned copies.
        std::vector<uint4> wa(((size_t)n * k + 7) / 8), xa(((size_t)m * k + 7) / 8);
        std::memcpy(wa.data(), w.data(), w.size() * 2);
        std::memcpy(xa.data(), x.data(), x.size() * 2);
        std::vector<float> y((size_t)m * n, NAN);
        const u32 threads = 256, warps = threads / 32;
        emu_launch(dim3{(n + warps - 1) / warps, 1, 1}, dim3{threads, 1, 1}, [&] {
            gemv_bf16(reinterpret_cast<const bf16_t*>(wa.data()), reinterpret_cast<const bf16_t*>(xa.data()),
                      y.data(), m, n, k);
        });
        put(y);
        break;
    }
    default:
        std::fprintf(stderr, "ops_driver: unknown op %u\n", op);
        return 2;
    }
    std::fclose(in_file);
    FILE* o = std::fopen(argv[2], "wb");
    if (!o) return 2;
    std::fwrite(out_bytes.data(), 1, out_bytes.size(), o);
    std::fclose(o);
    return 0;
}
