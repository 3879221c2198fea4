// Gated top-k sparse tile dispatch: one gated PRISM pipe in one kernel launch.
//
// Contract (issue 5, section 1):
//   hidden [T, in_dim]      HIDDEN_T (float or half)
//   scores [T, R*C]         float  (the gate's MatMul+Add output)
//   tiles  [R*C, TR, TC]    TILE_T (float, half or int8)
//   scales [R*C, TR]        float  (read only for int8 tiles; any 1-element tensor otherwise)
//   out    [T, OUT_DIM]     HIDDEN_T
// Semantics: worker w = r*C + c; the top TOP_K scores of a token (ties toward the lower
// index) get weights GATE_SCALE * softmax(selected scores); out rows [r*TR, (r+1)*TR) receive
// sum over selected c of g * (x[:, c*TC:(c+1)*TC] @ tiles[w]^T), x zero-padded past in_dim.
//
// Design (plugins/tile_dispatch/README.md says why):
//   block (blockIdx.x) = one row-block r and a slab of WARPS*ROWS_PER_WARP output rows of it;
//   blockIdx.y         = a chunk of TOKENS_PER_BLOCK tokens.
//   1. Each warp routes some tokens of the chunk (bitwise threshold search over the R*C
//      scores, held in registers) and writes the gate weights of row-block r's C workers to
//      shared memory.
//   2. Each warp owns ROWS_PER_WARP output rows, one after the other. For every column block
//      c that some token of the chunk selected, it loads that tile row once into registers and reuses it for every token
//      that selected the worker (grouping by worker). Dots are reduced across the warp with
//      a fixed shuffle tree; the token's owner lane accumulates in float32.
//   3. Owner lanes write the outputs. Every output element is written by exactly one lane:
//      no atomics, bit-identical results run after run, and a token's result does not
//      depend on which other tokens share its batch (the arithmetic per token is fixed by
//      the compile-time shapes only).
//
// Compile-time constants (NVRTC -D; the TensorRT AOT plugin gets no attributes at run time):
//   PRISM_HIDDEN_DTYPE 0=float 1=half; PRISM_TILE_DTYPE 0=float 1=half 2=int8;
//   PRISM_R, PRISM_C, PRISM_TR, PRISM_TC, PRISM_TOP_K, PRISM_GATE_SCALE (a float literal),
//   PRISM_OUT_DIM, PRISM_TOKENS_PER_BLOCK (a multiple of 32), PRISM_WARPS (warps per block),
//   PRISM_ROWS_PER_WARP (output rows each warp owns).
// Run-time int32 arguments: T (tokens) and in_dim.

#if !defined(PRISM_HIDDEN_DTYPE) || !defined(PRISM_TILE_DTYPE) || !defined(PRISM_R) || \
    !defined(PRISM_C) || !defined(PRISM_TR) || !defined(PRISM_TC) || !defined(PRISM_TOP_K) || \
    !defined(PRISM_GATE_SCALE) || !defined(PRISM_OUT_DIM) || !defined(PRISM_TOKENS_PER_BLOCK) || \
    !defined(PRISM_WARPS) || !defined(PRISM_ROWS_PER_WARP)
#error "define PRISM_HIDDEN_DTYPE, PRISM_TILE_DTYPE, PRISM_R, PRISM_C, PRISM_TR, PRISM_TC, PRISM_TOP_K, PRISM_GATE_SCALE, PRISM_OUT_DIM, PRISM_TOKENS_PER_BLOCK, PRISM_WARPS and PRISM_ROWS_PER_WARP"
#endif

// No #include at all: the kernel compiles with NVRTC alone (the nvidia-cuda-nvrtc wheel ships
// no CUDA headers), so half precision is handled as raw 16-bit values converted by PTX cvt.
// The -D names carry a PRISM_ prefix so they cannot collide with NVRTC's built-in names.
// The dynamic shared memory; host/cuda_host.h (the CPU test harness) defines its own.
#ifndef PRISM_DYNAMIC_SHARED
#define PRISM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#define HIDDEN_DTYPE PRISM_HIDDEN_DTYPE
#define TILE_DTYPE PRISM_TILE_DTYPE
#define R PRISM_R
#define C PRISM_C
#define TR PRISM_TR
#define TC PRISM_TC
#define TOP_K PRISM_TOP_K
#define GATE_SCALE PRISM_GATE_SCALE
#define OUT_DIM PRISM_OUT_DIM
#define TOKENS_PER_BLOCK PRISM_TOKENS_PER_BLOCK
#define WARPS PRISM_WARPS
#define ROWS_PER_WARP PRISM_ROWS_PER_WARP

#if HIDDEN_DTYPE == 0
typedef float hidden_t;
#elif HIDDEN_DTYPE == 1
typedef unsigned short hidden_t;  // IEEE half bits
#else
#error "PRISM_HIDDEN_DTYPE must be 0 (float) or 1 (half)"
#endif

#if TILE_DTYPE == 0
typedef float tile_t;
#define TILE_BYTES 4
#elif TILE_DTYPE == 1
typedef unsigned short tile_t;  // IEEE half bits
#define TILE_BYTES 2
#elif TILE_DTYPE == 2
typedef signed char tile_t;
#define TILE_BYTES 1
#else
#error "PRISM_TILE_DTYPE must be 0 (float), 1 (half) or 2 (int8)"
#endif

#define WORKERS (R * C)
#define NEG_INF __int_as_float(0xff800000)
#define FULL_MASK 0xffffffffu
// Scores per lane in the routing step.
#define SCORES_PER_LANE ((WORKERS + 31) / 32)
// Token slots per lane: lane l owns tokens l, l+32, ... of the chunk.
#define TOKEN_SLOTS (TOKENS_PER_BLOCK / 32)
// Row stride of the gate-weight table in shared memory: odd, so the lanes of a warp reading
// one column of it (32 tokens, same worker) hit 32 different banks.
#define GW_STRIDE ((C % 2 == 0) ? C + 1 : C)
// Tile elements per 16-byte load, and loads per lane per segment of a tile row.
#define VEC (16 / TILE_BYTES)
// 64 tile elements per lane per segment whatever the dtype: bounded registers.
#define LOADS_PER_LANE (64 / VEC)
#define SEGMENT (32 * VEC * LOADS_PER_LANE)
#define SEGMENTS ((TC + SEGMENT - 1) / SEGMENT)
// 16-byte loads need every tile row to start on a 16-byte boundary.
#define VECTOR_LOADS ((TC % VEC) == 0)

#if TOKENS_PER_BLOCK % 32 != 0 || TOKENS_PER_BLOCK < 32
#error "TOKENS_PER_BLOCK must be a positive multiple of 32"
#endif
#if TOP_K < 1 || TOP_K > WORKERS
#error "TOP_K must be in [1, R*C]"
#endif

#ifndef PRISM_HOST_EMULATION
__device__ __forceinline__ float half_bits_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ unsigned short float_to_half_bits(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#else
// host/cuda_host.h runs this source on a CPU (tests without a GPU): same conversions, no PTX.
#define half_bits_to_float prism_half_bits_to_float
#define float_to_half_bits prism_float_to_half_bits
#endif

__device__ __forceinline__ float hidden_to_float(hidden_t v) {
#if HIDDEN_DTYPE == 0
    return v;
#else
    return half_bits_to_float(v);
#endif
}

__device__ __forceinline__ hidden_t float_to_hidden(float v) {
#if HIDDEN_DTYPE == 0
    return v;
#else
    return float_to_half_bits(v);
#endif
}

__device__ __forceinline__ float tile_to_float(tile_t v) {
#if TILE_DTYPE == 1
    return half_bits_to_float(v);
#else
    return (float)v;
#endif
}

// A float's bits mapped to an unsigned key with the same order; -0 and +0 compare equal in
// ONNX TopK and torch.sort, so -0 is folded onto +0 first.
__device__ __forceinline__ unsigned order_key(float f) {
    unsigned u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ int warp_sum_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// Fixed butterfly: every lane ends with the same sum, computed in the same order each run.
__device__ __forceinline__ float warp_sum_float(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max_float(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Route one token with one warp; write the gate weights of row-block r's C workers to gw[C].
__device__ void route_token(const float* __restrict__ srow, int r, float* gw, int lane) {
    float s[SCORES_PER_LANE];
    unsigned key[SCORES_PER_LANE];
#pragma unroll
    for (int i = 0; i < SCORES_PER_LANE; ++i) {
        const int w = lane + 32 * i;
        s[i] = w < WORKERS ? srow[w] : NEG_INF;
        key[i] = w < WORKERS ? order_key(s[i]) : 0u;  // 0 sorts below every real score
    }
    // tau = the largest key with at least TOP_K keys >= tau: the TOP_K-th largest key.
    unsigned tau = 0u;
    for (int bit = 31; bit >= 0; --bit) {
        const unsigned cand = tau | (1u << bit);
        int n = 0;
#pragma unroll
        for (int i = 0; i < SCORES_PER_LANE; ++i) n += (lane + 32 * i < WORKERS && key[i] >= cand);
        if (warp_sum_int(n) >= TOP_K) tau = cand;
    }
    int above = 0;
#pragma unroll
    for (int i = 0; i < SCORES_PER_LANE; ++i) above += (lane + 32 * i < WORKERS && key[i] > tau);
    above = warp_sum_int(above);
    // Of the workers tied at tau, the (TOP_K - above) lowest indices are selected:
    // find the index of the last one taken (cutoff), scanning in index order.
    int need = TOP_K - above;
    int cutoff = -1;
#pragma unroll
    for (int i = 0; i < SCORES_PER_LANE; ++i) {
        const bool tied = lane + 32 * i < WORKERS && key[i] == tau;
        const unsigned m = __ballot_sync(FULL_MASK, tied);
        const int cnt = __popc(m);
        if (cutoff < 0) {
            if (need <= cnt) {
                const bool is_it = tied && (__popc(m & ((1u << lane) - 1u)) + 1 == need);
                const unsigned which = __ballot_sync(FULL_MASK, is_it);
                cutoff = 32 * i + (__ffs(which) - 1);
            } else {
                need -= cnt;
            }
        }
    }
    float smax = NEG_INF;
#pragma unroll
    for (int i = 0; i < SCORES_PER_LANE; ++i) smax = fmaxf(smax, s[i]);
    smax = warp_max_float(smax);
    float part = 0.0f;
#pragma unroll
    for (int i = 0; i < SCORES_PER_LANE; ++i) {
        const int w = lane + 32 * i;
        const bool sel = w < WORKERS && (key[i] > tau || (key[i] == tau && w <= cutoff));
        if (sel) part += expf(s[i] - smax);
    }
    const float denom = warp_sum_float(part);
    for (int c = lane; c < C; c += 32) {
        const int w = r * C + c;
        const float sw = srow[w];
        const unsigned kw = order_key(sw);
        const bool sel = kw > tau || (kw == tau && w <= cutoff);
        gw[c] = sel ? (float)(GATE_SCALE) * (expf(sw - smax) / denom) : 0.0f;
    }
}

// Load this lane's part of segment `seg` of one tile row (columns past kvalid read as 0:
// they multiply the zero padding of x, so they are never fetched).
__device__ __forceinline__ void load_segment(const tile_t* __restrict__ row, int seg, int kvalid,
                                                    int lane, float (&wv)[LOADS_PER_LANE][VEC]) {
#pragma unroll
    for (int v = 0; v < LOADS_PER_LANE; ++v) {
        const int col0 = seg * SEGMENT + (v * 32 + lane) * VEC;
#if VECTOR_LOADS
        if (col0 + VEC <= kvalid) {
            const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + col0));
            const tile_t* e = reinterpret_cast<const tile_t*>(&raw);
#pragma unroll
            for (int j = 0; j < VEC; ++j) wv[v][j] = tile_to_float(e[j]);
            continue;
        }
#endif
#pragma unroll
        for (int j = 0; j < VEC; ++j) wv[v][j] = (col0 + j < kvalid) ? tile_to_float(row[col0 + j]) : 0.0f;
    }
}

// One output row for one token chunk: worker by worker, the tile row is loaded once and used
// for every token of the chunk that selected the worker; the token's owner lane accumulates.
__device__ void compute_row(const hidden_t* __restrict__ hidden, const tile_t* __restrict__ tiles,
                            const float* __restrict__ scales, const float* gw, int r, int local_row, int row,
                            int t0, int nt, int in_dim, hidden_t* __restrict__ out, int lane) {
    float acc[TOKEN_SLOTS];
#pragma unroll
    for (int j = 0; j < TOKEN_SLOTS; ++j) acc[j] = 0.0f;

    for (int c = 0; c < C; ++c) {
        const int kvalid = min(TC, in_dim - c * TC);
        if (kvalid <= 0) break;  // this and later column blocks read only padding
        unsigned sel[TOKEN_SLOTS];
        unsigned any = 0u;
#pragma unroll
        for (int j = 0; j < TOKEN_SLOTS; ++j) {
            const int tl = 32 * j + lane;
            sel[j] = __ballot_sync(FULL_MASK, tl < nt && gw[tl * GW_STRIDE + c] != 0.0f);
            any |= sel[j];
        }
        if (any == 0u) continue;  // no token of the chunk selected worker (r, c): not read

        const int w = r * C + c;
        const tile_t* trow = tiles + ((size_t)w * TR + local_row) * TC;
        const hidden_t* xcol = hidden + (size_t)c * TC;
        float dot[TOKEN_SLOTS];
#pragma unroll
        for (int j = 0; j < TOKEN_SLOTS; ++j) dot[j] = 0.0f;

        for (int seg = 0; seg < SEGMENTS; ++seg) {
            if (seg * SEGMENT >= kvalid) break;
            float wv[LOADS_PER_LANE][VEC];
            load_segment(trow, seg, kvalid, lane, wv);
#pragma unroll
            for (int j = 0; j < TOKEN_SLOTS; ++j) {
                unsigned m = sel[j];
                while (m) {
                    const int b = __ffs(m) - 1;
                    m &= m - 1u;
                    const hidden_t* x = xcol + (size_t)(t0 + 32 * j + b) * in_dim;
                    float p = 0.0f;
#pragma unroll
                    for (int v = 0; v < LOADS_PER_LANE; ++v) {
                        const int col0 = seg * SEGMENT + (v * 32 + lane) * VEC;
#pragma unroll
                        for (int e = 0; e < VEC; ++e) {
                            if (col0 + e < kvalid) p = fmaf(wv[v][e], hidden_to_float(x[col0 + e]), p);
                        }
                    }
                    p = warp_sum_float(p);
                    if (lane == b) dot[j] += p;
                }
            }
        }
#if TILE_DTYPE == 2
        const float scale = scales[(size_t)w * TR + local_row];
#else
        const float scale = 1.0f;
#endif
#pragma unroll
        for (int j = 0; j < TOKEN_SLOTS; ++j) {
            if ((sel[j] >> lane) & 1u) acc[j] = fmaf(gw[(32 * j + lane) * GW_STRIDE + c], dot[j] * scale, acc[j]);
        }
    }

    // 3. Each output element has exactly one writer.
#pragma unroll
    for (int j = 0; j < TOKEN_SLOTS; ++j) {
        const int tl = 32 * j + lane;
        if (tl < nt) out[(size_t)(t0 + tl) * OUT_DIM + row] = float_to_hidden(acc[j]);
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
tile_dispatch_kernel(const hidden_t* __restrict__ hidden, const float* __restrict__ scores,
                     const tile_t* __restrict__ tiles, const float* __restrict__ scales, int T, int in_dim,
                     hidden_t* __restrict__ out) {
    PRISM_DYNAMIC_SHARED(float, gw);  // [TOKENS_PER_BLOCK][GW_STRIDE] gate weights of row-block r
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int rows_per_block = WARPS * ROWS_PER_WARP;
    const int slabs = (TR + rows_per_block - 1) / rows_per_block;
    const int r = blockIdx.x / slabs;
    const int slab_row0 = (blockIdx.x % slabs) * rows_per_block;
    const int t0 = blockIdx.y * TOKENS_PER_BLOCK;
    const int nt = min(TOKENS_PER_BLOCK, T - t0);
    if (nt <= 0 || r * TR >= OUT_DIM) return;  // whole block in the padding: nothing to write

    // 1. Routing: warps take the chunk's tokens round-robin. Every block of the chunk routes
    //    the same tokens again: the price of one launch with no grid-wide synchronisation.
    for (int tl = warp; tl < nt; tl += WARPS) {
        route_token(scores + (size_t)(t0 + tl) * WORKERS, r, gw + tl * GW_STRIDE, lane);
    }
    __syncthreads();  // the last barrier: below, warps work on their own rows

    // 2-3. Warp `warp` owns rows slab_row0 + warp, + WARPS, ... (ROWS_PER_WARP of them).
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const int local_row = slab_row0 + i * WARPS + warp;
        const int row = r * TR + local_row;
        if (local_row >= TR || row >= OUT_DIM) break;
        compute_row(hidden, tiles, scales, gw, r, local_row, row, t0, nt, in_dim, out, lane);
    }
}
