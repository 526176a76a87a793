// A CPU emulation of the little of CUDA C++ that the kernels in src/backend/cuda/kernels use, so
// a kernel can run on a machine without a GPU (tests/cuda_kernels_emulated.rs). Each block runs
// alone, its threads as real threads: __syncthreads() is a barrier over the block, a warp shuffle
// an exchange through a table with a barrier over the warp (so, as on the device, every lane of
// the warp must take part), shared memory (declared through common.cuh's SHARED_ARRAY /
// SHARED_VAR / DYNAMIC_SMEM) is a per-block arena refilled with NaN bytes at every block, like the
// garbage a device leaves there, built-in indices are thread-local, atomics are std::atomic_ref. Compiled with c++ -std=c++20 -pthread; include it first, then common.cuh and a
// kernel file. Blocks are one-dimensional as far as warps are concerned (threadIdx.x / 32).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <memory>
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
#define __launch_bounds__(...)
#define SHARED_ARRAY(T, name, n) T* name = emu_shared_alloc<T>(n)
#define SHARED_VAR(T, name) T& name = *emu_shared_alloc<T>(1)
#define DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(emu_dynamic_smem)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx;
inline dim3 blockIdx, blockDim, gridDim;

// Dynamic shared memory (DYNAMIC_SMEM), at most what an H100 block may opt in to.
alignas(16) inline unsigned char emu_dynamic_smem[227 * 1024];

// Static shared memory (SHARED_ARRAY, SHARED_VAR): each thread of a block walks the same
// declarations in the same order, so a per-thread bump offset into one per-block arena gives
// every thread the same address for the same variable.
alignas(16) inline unsigned char emu_static_smem[48 * 1024];
inline thread_local size_t emu_static_offset = 0;
template <class T> inline T* emu_shared_alloc(size_t n) {
    size_t at = (emu_static_offset + 15) & ~size_t(15);
    if (at + n * sizeof(T) > sizeof emu_static_smem) {
        std::fprintf(stderr, "cuda_emu: more than 48 KiB of static shared memory\n");
        std::abort();
    }
    emu_static_offset = at + n * sizeof(T);
    return reinterpret_cast<T*>(emu_static_smem + at);
}

inline std::barrier<>* g_block_barrier = nullptr;
inline void __syncthreads() { g_block_barrier->arrive_and_wait(); }

// Warp shuffles: each lane posts its value, the warp meets, each reads its partner's, the warp
// meets again before the table is reused.
inline std::vector<std::unique_ptr<std::barrier<>>> g_warp_barriers;
inline unsigned long long g_warp_slots[32][32];
template <class T> inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    std::memcpy(&g_warp_slots[warp][lane], &v, sizeof(T));
    g_warp_barriers[warp]->arrive_and_wait();
    T r;
    std::memcpy(&r, &g_warp_slots[warp][lane ^ (unsigned)lane_mask], sizeof(T));
    g_warp_barriers[warp]->arrive_and_wait();
    return r;
}

template <class T> inline T atomicAdd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v); }

struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }  // the device rounds within 2 ulp
// Single-rounding f32 arithmetic that the device compiler never fuses into an FMA (the drivers
// are built with -ffp-contract=off, so the host never fuses either).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
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
                // Shared memory starts as garbage on a device: NaN bytes here.
                std::memset(emu_dynamic_smem, 0xff, sizeof emu_dynamic_smem);
                std::memset(emu_static_smem, 0xff, sizeof emu_static_smem);
                std::barrier<> bar(n);
                g_block_barrier = &bar;
                g_warp_barriers.clear();
                for (unsigned w = 0; w < (n + 31) / 32; ++w)
                    g_warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
                std::vector<std::thread> threads;
                threads.reserve(n);
                for (unsigned t = 0; t < n; ++t) {
                    threads.emplace_back([&, t] {
                        threadIdx = dim3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
                        emu_static_offset = 0;
                        kernel();
                    });
                }
                for (auto& th : threads) th.join();
            }
}
