// A host (CPU) execution model for the CUDA subset tile_dispatch.cu uses, so the kernel's own
// source runs on machines without a GPU (CI). Not a general CUDA emulator: it covers exactly
// the built-ins the kernel calls, and checks the rules it relies on as it goes.
//
// Model: the blocks of the grid run one after another; the threads of a block run as
// cooperative fibers in one OS thread (started with makecontext, switched with _setjmp /
// _longjmp, which skip the signal-mask system call that swapcontext makes). A fiber runs until
// it reaches a barrier: __syncthreads() (all threads of the block) or a warp collective
// (__shfl_xor_sync, __shfl_sync, __ballot_sync, __reduce_add_sync, __reduce_min_sync: the 32
// lanes of its warp publish a value in one of two slot arrays, alternating, then pass a warp
// barrier and read; alternating means a lane that runs ahead to the next collective never
// overwrites values a slower lane has still to read). Warp collectives therefore see exactly
// the values the lanes hold at that point, as on the GPU, and the xor-butterfly adds in the
// GPU's order. A barrier that some threads can never reach (a lane exited or took a path
// without the collective) is reported as a deadlock, where a GPU would hang or be undefined.
//
// Checked as it runs: full-mask collectives only; 16-byte loads (__ldg of uint4) 16-byte
// aligned; the dynamic shared memory is exactly the launch's size, followed by an inaccessible
// page, and starts out as NaN (a read of a gate weight nobody wrote shows up in the result).
// The driver (host_main.cpp) places every buffer against an inaccessible page as well.
//
// Differences from a GPU: expf/fmaxf/fmaf are the host C library's (fmaf is a true fused
// multiply-add on both; CUDA's expf is within 2 ulp, glibc's within 1), so results agree with a
// GPU's to a few float32 ulps, not bit for bit. Timing means nothing here.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <csetjmp>
#include <ucontext.h>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define PRISM_HOST_EMULATION 1
// `extern __shared__ T name[];` in the kernel: the host gives the block's buffer instead.
#define PRISM_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(prism_host::dynamic_shared())

struct prism_dim3 {
    unsigned x, y, z;
};

struct uint4 {
    unsigned x, y, z, w;
};

namespace prism_host {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "tile_dispatch host run: %s\n", what);
    std::fflush(stderr);
    std::_Exit(3);
}

struct Barrier {
    int expected = 0;
    int arrived = 0;
    unsigned generation = 0;
};

struct Fiber {
    ucontext_t boot;  // the fiber's first entry
    std::jmp_buf resume;  // where it continues after yielding
    bool started = false;
    std::vector<char> stack;
    prism_dim3 thread_idx{0, 0, 0};
    bool done = false;
};

// The state of the block being run (blocks run one at a time).
struct Block {
    prism_dim3 block_idx{0, 0, 0};
    prism_dim3 block_dim{0, 0, 0};
    prism_dim3 grid_dim{0, 0, 0};
    void* shared = nullptr;
    std::vector<Fiber> fibers;
    std::vector<Barrier> warp_barriers;
    std::vector<std::uint32_t> warp_slots;  // 2 x 32 per warp: the values lanes exchange
    Barrier block_barrier;
    std::jmp_buf scheduler;
    Fiber* current = nullptr;
    unsigned long long progress = 0;  // barrier arrivals, releases and thread exits
};

inline Block& block() {
    static Block b;
    return b;
}

inline void* dynamic_shared() { return block().shared; }

// Called with the address and size of every __ldg (the kernel's 16-byte tile loads) when set.
inline void (*load_hook)(const void*, std::size_t) = nullptr;

inline void yield_to_scheduler() {
    Block& b = block();
    if (!_setjmp(b.current->resume)) _longjmp(b.scheduler, 1);
}

inline void wait(Barrier& bar) {
    Block& b = block();
    const unsigned gen = bar.generation;
    ++b.progress;
    if (++bar.arrived == bar.expected) {
        bar.arrived = 0;
        ++bar.generation;
        return;
    }
    while (bar.generation == gen) yield_to_scheduler();
    ++b.progress;
}

inline unsigned lane_id() { return block().current->thread_idx.x & 31u; }
inline unsigned warp_id() { return block().current->thread_idx.x >> 5; }

inline void check_full_mask(unsigned mask) {
    if (mask != 0xffffffffu) fail("a warp collective with a partial mask (the kernel uses full masks only)");
}

// All 32 lanes publish a 32-bit value, then each reads the one it asks for. The slot array is
// picked by the warp barrier's generation, which is the same for every lane of a collective.
inline std::uint32_t* publish(std::uint32_t bits) {
    Block& b = block();
    const unsigned w = warp_id();
    Barrier& bar = b.warp_barriers[w];
    const unsigned parity = bar.generation & 1u;
    std::uint32_t* slots = &b.warp_slots[64 * w + 32 * parity];
    slots[lane_id()] = bits;
    wait(bar);  // every lane has written
    return slots;
}

}  // namespace prism_host

#define threadIdx (prism_host::block().current->thread_idx)
#define blockIdx (prism_host::block().block_idx)
#define blockDim (prism_host::block().block_dim)
#define gridDim (prism_host::block().grid_dim)

inline void __syncthreads() { prism_host::wait(prism_host::block().block_barrier); }

namespace prism_host {

// Every lane publishes `value`; each gets the value of lane `src` (a shuffle).
template <typename V>
inline V shuffle(unsigned mask, V value, unsigned src) {
    static_assert(sizeof(V) == 4, "32-bit shuffles only");
    check_full_mask(mask);
    std::uint32_t bits;
    std::memcpy(&bits, &value, 4);
    const std::uint32_t got = publish(bits)[src & 31u];
    V out;
    std::memcpy(&out, &got, 4);
    return out;
}

}  // namespace prism_host

template <typename V>
inline V __shfl_xor_sync(unsigned mask, V value, int lane_mask) {
    return prism_host::shuffle(mask, value, prism_host::lane_id() ^ static_cast<unsigned>(lane_mask));
}

template <typename V>
inline V __shfl_sync(unsigned mask, V value, int src_lane) {
    return prism_host::shuffle(mask, value, static_cast<unsigned>(src_lane));
}

inline int __reduce_add_sync(unsigned mask, int value) {
    prism_host::check_full_mask(mask);
    const std::uint32_t* slots = prism_host::publish(static_cast<std::uint32_t>(value));
    std::uint32_t sum = 0;  // wraps like the 32-bit hardware adder
    for (unsigned l = 0; l < 32; ++l) sum += slots[l];
    return static_cast<int>(sum);
}

inline unsigned __reduce_min_sync(unsigned mask, unsigned value) {
    prism_host::check_full_mask(mask);
    const std::uint32_t* slots = prism_host::publish(value);
    std::uint32_t least = slots[0];
    for (unsigned l = 1; l < 32; ++l) least = slots[l] < least ? slots[l] : least;
    return least;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
    prism_host::check_full_mask(mask);
    const std::uint32_t* slots = prism_host::publish(predicate ? 1u : 0u);
    unsigned m = 0;
    for (unsigned l = 0; l < 32; ++l) m |= (slots[l] & 1u) << l;
    return m;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(unsigned v) { return __builtin_ffs(static_cast<int>(v)); }

inline float __int_as_float(unsigned bits) {
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline float __uint_as_float(unsigned bits) { return __int_as_float(bits); }

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline int min(int a, int b) { return a < b ? a : b; }

template <typename V>
inline V __ldg(const V* p) {
    if (reinterpret_cast<std::uintptr_t>(p) % alignof(V) != 0 ||
        (sizeof(V) == 16 && reinterpret_cast<std::uintptr_t>(p) % 16 != 0))
        prism_host::fail("misaligned vector load (__ldg)");
    if (prism_host::load_hook) prism_host::load_hook(p, sizeof(V));
    return *p;
}

// PTX cvt.f32.f16 / cvt.rn.f16.f32: exact widening, round-to-nearest-even narrowing.
inline float prism_half_bits_to_float(unsigned short h) {
    _Float16 v;
    std::memcpy(&v, &h, 2);
    return static_cast<float>(v);
}

inline unsigned short prism_float_to_half_bits(float f) {
    const _Float16 v = static_cast<_Float16>(f);
    unsigned short h;
    std::memcpy(&h, &v, 2);
    return h;
}
