// Runs the sampling kernels of sampling.cu on the CPU emulator (cuda_emu.h) the way ops.rs
// launches them. Usage: sampling_driver IN OUT. IN (little-endian): u32 rows, cols, kernel
// (0: argmax_rows with 256 threads a block, 1: sample_rows with SAMPLE_THREADS, 2: the two-pass
// argmax, argmax_partial over chunks of 64 columns with 256 threads then argmax_combine with 32),
// f32 logits
// [rows * cols], then for sample_rows f64 params[rows * 5] (temperature, top_k, top_p, min_p, u).
// OUT: u32 token per row.
#include "cuda_emu.h"
#include "common.cuh"
#include "sampling.cu"

template <class T> static bool get(FILE* f, std::vector<T>& v, size_t n) {
    v.resize(n);
    return n == 0 || std::fread(v.data(), sizeof(T), n, f) == n;
}

int main(int argc, char** argv) {
    if (argc != 3) return 2;
    FILE* in = std::fopen(argv[1], "rb");
    std::vector<u32> h;
    std::vector<float> logits;
    std::vector<double> params;
    if (!in || !get(in, h, 3)) return 2;
    const u32 rows = h[0], cols = h[1], kernel = h[2];
    if (!get(in, logits, (size_t)rows * cols) || (kernel == 1 && !get(in, params, (size_t)rows * 5))) {
        std::fprintf(stderr, "sampling_driver: input too short\n");
        return 2;
    }
    std::fclose(in);
    std::vector<u32> out(rows, 0xdeadbeefu);
    if (kernel == 0) {
        emu_launch(dim3{rows, 1, 1}, dim3{256, 1, 1}, [&] { argmax_rows(logits.data(), out.data(), cols); });
    } else if (kernel == 2) {
        const u32 chunk = 64, parts = (cols + chunk - 1) / chunk;
        std::vector<float> part_v((size_t)rows * parts, __uint_as_float(0x7fc00000u));
        std::vector<u32> part_i((size_t)rows * parts, 0xdeadbeefu);
        emu_launch(dim3{parts, rows, 1}, dim3{256, 1, 1},
                   [&] { argmax_partial(logits.data(), part_v.data(), part_i.data(), cols, chunk); });
        emu_launch(dim3{rows, 1, 1}, dim3{32, 1, 1},
                   [&] { argmax_combine(part_v.data(), part_i.data(), out.data(), parts); });
    } else {
        emu_launch(dim3{rows, 1, 1}, dim3{SAMPLE_THREADS, 1, 1},
                   [&] { sample_rows(logits.data(), params.data(), out.data(), cols); });
    }
    FILE* o = std::fopen(argv[2], "wb");
    if (!o) return 2;
    std::fwrite(out.data(), 4, out.size(), o);
    std::fclose(o);
    return 0;
}
