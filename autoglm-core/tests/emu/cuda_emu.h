// A CPU emulation of the little of CUDA C++ that the kernels in src/backend/cuda/kernels use, so
// a kernel can run on a machine without a GPU (tests/cuda_kernels_emulated.rs). Each block runs
// alone, its threads as real threads: __syncthreads() is a barrier, dynamic shared memory one
// buffer, built-in indices thread-local. Warp shuffles are not emulated (calling one aborts).
// Compiled with g++ -std=c++20 -pthread; include it first, then common.cuh and a kernel file.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

// Dynamic shared memory (`extern __shared__ float smem[]`): the kernels' name for it.
alignas(16) float smem[48 * 1024 / 4];

inline std::barrier<>* g_block_barrier = nullptr;
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __shfl_xor_sync(unsigned, float, int) {
    std::fprintf(stderr, "cuda_emu: warp shuffles are not emulated\n");
    std::abort();
}
template <class T> inline T min(T a, T b) { return b < a ? b : a; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

// Runs `kernel` over `grid` blocks of `block` threads, one block at a time.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel) {
    gridDim = grid;
    blockDim = block;
    const unsigned n = block.x * block.y * block.z;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3{x, y, z};
                std::memset(smem, 0xff, sizeof smem);  // garbage, as on a device
                std::barrier<> bar(n);
                g_block_barrier = &bar;
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned t = 0; t < n; ++t) {
                    threads.emplace_back([&, t] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        kernel();
                    });
                }
                for (auto& th : threads) th.join();
            }
}
