// A small CPU emulator for the CUDA C subset the cupy backend's kernels use, so their logic
// is tested on machines without a GPU (see cuda_emulator.py).
//
// Each CUDA thread of a block is a fiber (own stack) run by one OS thread; blocks run one
// after another. __syncthreads and the warp collectives (shuffles, ballots, __syncwarp, the
// int8 mma) suspend the fiber until every still-running thread of the block (or warp) has
// reached them, which is how the hardware behaves for the well-formed kernels we write, and
// a barrier some threads never reach is reported as a deadlock instead of hanging.
// `__shared__` becomes `static`, which is right because only one block runs at a time.
// Float arithmetic is the host's (no fused multiply-add), so results match a GPU to rounding.
#pragma once
#define CUDA_EMULATOR 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <ucontext.h>

#include <functional>
#include <vector>

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(8) int2 { int x, y; };
struct alignas(8) float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

// On x86-64 a fiber switch is six register pushes and a stack swap (ucontext's switch makes a
// signal-mask system call each time, ten times slower); elsewhere ucontext does it.
#if defined(__x86_64__)
#define EMU_FAST_SWITCH 1
extern "C" void emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .text
    .globl emu_switch_stack
    .type emu_switch_stack, @function
emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch_stack, .-emu_switch_stack
)");
#else
#define EMU_FAST_SWITCH 0
#endif

namespace emu {
enum State { RUNNING, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
#if EMU_FAST_SWITCH
    void* sp;  // saved stack pointer while suspended
#else
    ucontext_t ctx;
#endif
    dim3 tid;
    int warp, lane;
    State state;
};

constexpr size_t kStackBytes = 64 * 1024;

inline dim3 block_idx, block_dim, grid_dim;
inline Fiber* cur = nullptr;
inline std::vector<Fiber> fibers;
inline std::vector<char> stacks;
#if EMU_FAST_SWITCH
inline void* scheduler_sp = nullptr;
#else
inline ucontext_t scheduler;
#endif
inline std::function<void()> body;
inline std::vector<unsigned char> dynamic_shared;
inline std::vector<uint64_t> warp_slots;  // 32 lanes x 8 words per warp, for warp collectives
inline char error[256] = "";
// How the scheduler interleaves threads: 0 resumes every runnable thread by index, so warps
// advance in step from one collective to the next; 1 the same in reverse; 2 runs one warp
// as far as it can go (to a __syncthreads() or its end) before the next warp starts. A
// missing __syncthreads() lets a thread read shared memory another has not written yet, or
// overwrite what another has not read yet; which of these go wrong depends on the
// interleaving, so the tests run all three.
inline int schedule = 0;

// From a fiber back to the scheduler, and from the scheduler into fiber f.
inline void to_scheduler() {
#if EMU_FAST_SWITCH
    emu_switch_stack(&cur->sp, scheduler_sp);
#else
    swapcontext(&cur->ctx, &scheduler);
#endif
}

inline void run_fiber(Fiber& f) {
    cur = &f;
#if EMU_FAST_SWITCH
    emu_switch_stack(&scheduler_sp, f.sp);
#else
    swapcontext(&scheduler, &f.ctx);
#endif
}

inline void wait(State s) {
    cur->state = s;
    to_scheduler();
}

inline void warp_sync() { wait(AT_WARP_BARRIER); }

inline uint64_t* slot(int warp, int lane) { return &warp_slots[((size_t)warp * 32 + lane) * 8]; }

inline int warp_size(int warp) {
    int n = (int)(block_dim.x * block_dim.y * block_dim.z);
    return n - warp * 32 < 32 ? n - warp * 32 : 32;
}

inline void trampoline() {
    body();
    cur->state = DONE;
    to_scheduler();  // never resumed
    abort();
}

inline void start_fiber(Fiber& f, char* stack) {
#if EMU_FAST_SWITCH
    // The first switch pops six zero registers and "returns" into trampoline with the stack
    // aligned as after a call.
    uintptr_t top = ((uintptr_t)(stack + kStackBytes)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = nullptr;                      // trampoline's own return address (never used)
    *--sp = (void*)&trampoline;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.sp = sp;
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
#endif
}

// Release a barrier when every thread that has not finished waits at it; 0 when no
// thread can move (a deadlock), else 1.
inline int release_barriers() {
    int n = (int)fibers.size(), warps = (n + 31) / 32;
    bool released = false;
    for (int w = 0; w < warps && !(released && schedule == 2); ++w) {
        int waiting = 0, alive = 0;
        for (int i = w * 32; i < n && i < w * 32 + 32; ++i) {
            if (fibers[i].state != DONE) ++alive;
            if (fibers[i].state == AT_WARP_BARRIER) ++waiting;
        }
        if (waiting && waiting == alive) {
            for (int i = w * 32; i < n && i < w * 32 + 32; ++i) fibers[i].state = RUNNING;
            released = true;
        }
    }
    if (released) return 1;
    int waiting = 0, alive = 0;
    for (auto& f : fibers) {
        if (f.state != DONE) ++alive;
        if (f.state == AT_BLOCK_BARRIER) ++waiting;
    }
    if (waiting && waiting == alive) {
        for (auto& f : fibers) f.state = RUNNING;
        return 1;
    }
    return alive == 0 ? 1 : 0;
}

// Runs fn as a kernel over the grid; returns 0, or 1 with `error` set.
inline int launch(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> fn) {
    size_t n = (size_t)block.x * block.y * block.z;
    if (n == 0 || n > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        snprintf(error, sizeof error, "invalid launch: grid (%u, %u, %u), block (%u, %u, %u)",
                 grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return 1;
    }
    grid_dim = grid;
    block_dim = block;
    body = fn;
    fibers.assign(n, Fiber{});
    if (stacks.size() < n * kStackBytes) stacks.resize(n * kStackBytes);
    warp_slots.assign(((n + 31) / 32) * 32 * 8, 0);
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                block_idx = dim3(bx, by, bz);
                dynamic_shared.assign(shared_bytes + 16, 0xA5);  // uninitialised on a GPU: poison it
                for (size_t i = 0; i < n; ++i) {
                    Fiber& f = fibers[i];
                    f.tid = dim3(i % block.x, (i / block.x) % block.y, i / ((size_t)block.x * block.y));
                    f.warp = (int)(i / 32);
                    f.lane = (int)(i % 32);
                    f.state = RUNNING;
                    start_fiber(f, &stacks[i * kStackBytes]);
                }
                for (;;) {
                    bool all_done = true;
                    size_t lo = 0, hi = n;  // the threads this pass may run
                    if (schedule == 2) {
                        size_t first = 0;
                        while (first < n && fibers[first].state != RUNNING) ++first;
                        if (first < n) lo = first / 32 * 32, hi = lo + 32 < n ? lo + 32 : n;
                    }
                    for (size_t j = lo; j < hi; ++j) {
                        Fiber& f = fibers[schedule == 1 ? n - 1 - j : j];
                        if (f.state == RUNNING) run_fiber(f);
                    }
                    for (auto& f : fibers) {
                        if (f.state == RUNNING) { all_done = false; break; }
                        if (f.state != DONE) all_done = false;
                    }
                    if (all_done) break;
                    bool runnable = false;
                    for (auto& f : fibers) runnable = runnable || f.state == RUNNING;
                    if (runnable) continue;
                    if (!release_barriers()) {
                        snprintf(error, sizeof error,
                                 "deadlock in block (%u, %u, %u): some threads wait at a barrier that others never reach",
                                 bx, by, bz);
                        return 1;
                    }
                }
            }
    cur = nullptr;
    return 0;
}

template <class T>
inline T exchange(T v, int src_lane, bool valid) {
    int w = cur->warp, lane = cur->lane;
    memcpy(slot(w, lane), &v, sizeof(T));
    warp_sync();
    T out = v;
    if (valid && src_lane >= 0 && src_lane < warp_size(w)) memcpy(&out, slot(w, src_lane), sizeof(T));
    warp_sync();
    return out;
}
}  // namespace emu

#define threadIdx (emu::cur->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)
#define warpSize 32
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))

inline void __syncthreads() { emu::wait(emu::AT_BLOCK_BARRIER); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_sync(); }
inline void __threadfence() {}
inline void __threadfence_block() {}

template <class T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
    int lane = emu::cur->lane;
    return emu::exchange(v, (lane / width) * width + (src % width), true);
}
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
    int lane = emu::cur->lane;
    return emu::exchange(v, lane ^ mask, ((lane ^ mask) / width) == (lane / width));
}
template <class T> inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = emu::cur->lane;
    return emu::exchange(v, lane + (int)delta, (lane % width) + (int)delta < width);
}
template <class T> inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    int lane = emu::cur->lane;
    return emu::exchange(v, lane - (int)delta, (lane % width) >= (int)delta);
}
inline unsigned __ballot_sync(unsigned, int pred) {
    int w = emu::cur->warp;
    *emu::slot(w, emu::cur->lane) = pred != 0;
    emu::warp_sync();
    unsigned bits = 0;
    for (int l = 0; l < emu::warp_size(w); ++l) bits |= (unsigned)(*emu::slot(w, l) & 1) << l;
    emu::warp_sync();
    return bits;
}
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) {
    return __ballot_sync(m, pred) == (emu::warp_size(emu::cur->warp) == 32 ? 0xffffffffu : (1u << emu::warp_size(emu::cur->warp)) - 1);
}

// --- integer and float intrinsics -------------------------------------------------------
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; ++i) c += (int)(signed char)(a >> (8 * i)) * (int)(signed char)(b >> (8 * i));
    return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    for (int i = 0; i < 4; ++i) c += ((a >> (8 * i)) & 0xffu) * ((b >> (8 * i)) & 0xffu);
    return c;
}
inline float __int_as_float(int v) { float f; memcpy(&f, &v, 4); return f; }
inline int __float_as_int(float f) { int v; memcpy(&v, &f, 4); return v; }
inline float __uint_as_float(unsigned v) { float f; memcpy(&f, &v, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned v; memcpy(&v, &f, 4); return v; }
inline float rsqrtf(float v) { return 1.0f / sqrtf(v); }
inline double rsqrt(double v) { return 1.0 / sqrt(v); }
inline float __expf(float v) { return expf(v); }
inline float __logf(float v) { return logf(v); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __clz(int v) { return v == 0 ? 32 : __builtin_clz((unsigned)v); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline size_t min(size_t a, size_t b) { return a < b ? a : b; }
inline size_t max(size_t a, size_t b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
template <class T> inline T __ldg(const T* p) { return *p; }

// Atomics: one OS thread runs every fiber, so plain read-modify-writes are atomic.
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <class T> inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <class T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <class T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }

// --- warp-level int8 tensor-core MMA (PTX mma.sync.m16n8k32.row.col.s32.s8.s8.s32) -------
// Lane l holds, with g = l / 4 and t = l % 4: a[0..3] = A rows g, g+8, g, g+8 at columns
// 4t..4t+3, 4t..4t+3, 16+4t.., 16+4t..; b[0..1] = B column g at rows 4t..4t+3 and 16+4t..;
// c/d[0..3] = C rows g, g, g+8, g+8 at columns 2t, 2t+1, 2t, 2t+1. The emulation gathers
// every lane's registers and rebuilds the tiles from exactly that layout.
inline void emu_mma_m16n8k32_s8(int (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const int (&c)[4]) {
    int w = emu::cur->warp, lane = emu::cur->lane;
    uint64_t* mine = emu::slot(w, lane);
    for (int i = 0; i < 4; ++i) mine[i] = a[i];
    for (int i = 0; i < 2; ++i) mine[4 + i] = b[i];
    emu::warp_sync();
    if (emu::warp_size(w) != 32) {
        snprintf(emu::error, sizeof emu::error, "mma.sync needs a full warp");
        abort();
    }
    auto A = [&](int row, int k) {
        int src = (row % 8) * 4 + (k % 16) / 4, reg = (row >= 8 ? 1 : 0) + (k >= 16 ? 2 : 0);
        return (int)(signed char)(emu::slot(w, src)[reg] >> (8 * (k % 4)));
    };
    auto B = [&](int k, int col) {
        int src = col * 4 + (k % 16) / 4, reg = k >= 16 ? 1 : 0;
        return (int)(signed char)(emu::slot(w, src)[4 + reg] >> (8 * (k % 4)));
    };
    int g = lane / 4, t = lane % 4, out[4];
    for (int i = 0; i < 4; ++i) {
        int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1), acc = c[i];
        for (int k = 0; k < 32; ++k) acc += A(row, k) * B(k, col);
        out[i] = acc;
    }
    emu::warp_sync();
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// cp.async copies synchronously here; commit/wait have nothing left to wait for.
inline void emu_cp_async_16(void* shared_dst, const void* global_src, int src_bytes) {
    memcpy(shared_dst, global_src, (size_t)src_bytes);
    memset((char*)shared_dst + src_bytes, 0, (size_t)(16 - src_bytes));
}
