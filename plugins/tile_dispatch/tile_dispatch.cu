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
//      shared memory. Warp 0 then lists, in increasing c, the column blocks that some token of
//      the chunk selected (the only tiles of row-block r the block will read).
//   2. Each warp owns ROWS_PER_WARP output rows, one after the other. It walks the list in
//      batches of BATCH workers: the tile rows of a whole batch are requested at once (16-byte
//      loads; narrow rows side by side, LPR lanes each), so many loads are in flight before the
//      first is used; each row is loaded once and reused for every token of the chunk that
//      selected its worker (grouping by worker). A worker's dot product is reduced within its
//      LPR lanes by a fixed shuffle tree; the token's owner lane accumulates in float32, in
//      increasing c.
//   3. Owner lanes write the outputs. Every output element is written by exactly one lane:
//      no atomics, bit-identical results run after run, and a token's result does not
//      depend on which other tokens share its batch (the arithmetic per token and worker is
//      fixed by the compile-time shapes only; other tokens decide only what is loaded).

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
// Tile elements per 16-byte load, and 16-byte loads per lane per batch (64 elements whatever
// the dtype: bounded registers).
#define VEC (16 / TILE_BYTES)
#define LOADS_PER_LANE (64 / VEC)
#define VECS_PER_ROW ((TC + VEC - 1) / VEC)
// Lanes per tile row: the smallest power of two >= VECS_PER_ROW, at most 32. Narrow rows sit
// GROUPS to a warp, lanes [g*LPR, (g+1)*LPR) holding row g; vector v of a row always goes to lane
// v % LPR, whatever the batch, so a worker's dot product is summed the same way every time.
#define LPR (VECS_PER_ROW > 16 ? 32 : VECS_PER_ROW > 8 ? 16 : VECS_PER_ROW > 4 ? 8 : VECS_PER_ROW > 2 ? 4 : VECS_PER_ROW > 1 ? 2 : 1)
#define GROUPS (32 / LPR)
#define SLOTS_PER_ROW ((VECS_PER_ROW + LPR - 1) / LPR)
// A row wider than one lane's 64 elements x 32 lanes is read in SEGMENTS segments, one worker
// per batch; narrower rows are read whole, RPL of them per lane group.
#define SEG_SLOTS (SLOTS_PER_ROW < LOADS_PER_LANE ? SLOTS_PER_ROW : LOADS_PER_LANE)
#define SEGMENTS ((SLOTS_PER_ROW + SEG_SLOTS - 1) / SEG_SLOTS)
#define RPL_FIT (LOADS_PER_LANE / SEG_SLOTS)
// At most 32 workers per batch: one bounded, fully unrolled hand-off loop.
#define RPL (RPL_FIT * GROUPS > 32 ? 32 / GROUPS : RPL_FIT)
#define BATCH (RPL * GROUPS)
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

// Tile rows stay in registers as raw 16-byte vectors (16 registers for int8, 32 for half, 64
// for float per batch) and are widened to float when used. `j` is a compile-time constant
// at every call (unrolled loops), so these compile to register moves and shifts.
__device__ __forceinline__ unsigned vec_word(const uint4& v, int i) {
    return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ float vec_elem(const uint4& v, int j) {
#if TILE_DTYPE == 0
    return __uint_as_float(vec_word(v, j));
#elif TILE_DTYPE == 1
    return half_bits_to_float((unsigned short)(vec_word(v, j >> 1) >> (16 * (j & 1))));
#else
    return (float)(signed char)(vec_word(v, j >> 2) >> (8 * (j & 3)));
#endif
}

__device__ __forceinline__ unsigned tile_bits(tile_t t) {
#if TILE_DTYPE == 0
    return __float_as_uint(t);
#elif TILE_DTYPE == 1
    return (unsigned)t;
#else
    return (unsigned)(unsigned char)t;
#endif
}

__device__ __forceinline__ void vec_set(uint4& v, int j, unsigned bits) {
    const int word = j / (4 / TILE_BYTES);
    const unsigned shifted = bits << (8 * TILE_BYTES * (j % (4 / TILE_BYTES)));
    if (word == 0) v.x |= shifted;
    else if (word == 1) v.y |= shifted;
    else if (word == 2) v.z |= shifted;
    else v.w |= shifted;
}

// A float's bits mapped to an unsigned key with the same order; -0 and +0 compare equal in
// ONNX TopK and torch.sort, so -0 is folded onto +0 first.
__device__ __forceinline__ unsigned order_key(float f) {
    unsigned u = __float_as_uint(f == 0.0f ? 0.0f : f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// One instruction on sm_80+ (redux.sync): the routing search counts 32 times per token.
__device__ __forceinline__ int warp_sum_int(int v) { return __reduce_add_sync(FULL_MASK, v); }

// Fixed butterfly: every lane ends with the same sum, computed in the same order each run.
__device__ __forceinline__ float warp_sum_float(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// The same tree within each group of LPR lanes: offsets LPR/2 .. 1 never cross a group.
__device__ __forceinline__ float group_sum_float(float v) {
#pragma unroll
    for (int o = LPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
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
    // tau = the largest key with at least TOP_K keys >= tau: the TOP_K-th largest key, found
    // bit by bit. Once a candidate has exactly TOP_K keys at or above it, those keys are the
    // top TOP_K and tau is their minimum: the search stops there (about half of the 32 steps
    // for continuous scores) instead of resolving the remaining low bits one by one.
    unsigned tau = 0u;
    bool exact = false;
    for (int bit = 31; bit >= 0; --bit) {
        const unsigned cand = tau | (1u << bit);
        int n = 0;
#pragma unroll
        for (int i = 0; i < SCORES_PER_LANE; ++i) n += (lane + 32 * i < WORKERS && key[i] >= cand);
        n = warp_sum_int(n);  // the same in every lane: the loop stays warp-uniform
        if (n >= TOP_K) tau = cand;
        if (n == TOP_K) {
            exact = true;
            break;
        }
    }
    if (exact) {
        unsigned lowest = 0xffffffffu;
#pragma unroll
        for (int i = 0; i < SCORES_PER_LANE; ++i) {
            if (lane + 32 * i < WORKERS && key[i] >= tau && key[i] < lowest) lowest = key[i];
        }
        tau = __reduce_min_sync(FULL_MASK, lowest);
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

// This lane's SEG_SLOTS 16-byte vectors of one tile row in segment `seg`: slot i holds vector
// (seg * SEG_SLOTS + i) * LPR + li of the row. Columns at or past kvalid read as 0 and are
// never fetched: they multiply the zero padding of x.
__device__ __forceinline__ void load_row(const tile_t* __restrict__ row, int seg, int kvalid, int li,
                                         uint4* raw) {
#pragma unroll
    for (int i = 0; i < SEG_SLOTS; ++i) {
        const int col0 = ((seg * SEG_SLOTS + i) * LPR + li) * VEC;
        raw[i] = uint4{0u, 0u, 0u, 0u};
#if VECTOR_LOADS
        if (col0 + VEC <= kvalid) {
            raw[i] = __ldg(reinterpret_cast<const uint4*>(row + col0));
            continue;
        }
#endif
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
            if (col0 + e < kvalid) vec_set(raw[i], e, tile_bits(row[col0 + e]));
        }
    }
}

// One output row for one token chunk. The selected column blocks (clist, nsel of them) are
// taken BATCH at a time: lane group g holds the rows of batch entries g, g + GROUPS, ...; all of
// a batch's loads are issued before any is used. Each token of the chunk that selected some
// worker of the batch then gets, per worker it selected, one dot product, reduced within the
// worker's lane group and handed to the token's owner lane, which accumulates in increasing c.
__device__ void compute_row(const hidden_t* __restrict__ hidden, const tile_t* __restrict__ tiles,
                            const float* __restrict__ scales, const float* gw, const int* clist, int nsel,
                            int r, int local_row, int row, int t0, int nt, int in_dim,
                            hidden_t* __restrict__ out, int lane) {
    const int g = lane / LPR;   // this lane's group
    const int li = lane % LPR;  // and its place in the group
    float acc[TOKEN_SLOTS];
#pragma unroll
    for (int j = 0; j < TOKEN_SLOTS; ++j) acc[j] = 0.0f;

    for (int base = 0; base < nsel; base += BATCH) {
        // The column blocks of this lane's rows in the batch (-1: past the end of the list).
        int my_c[RPL];
#pragma unroll
        for (int q = 0; q < RPL; ++q) {
            const int k = base + q * GROUPS + g;
            my_c[q] = k < nsel ? clist[k] : -1;
        }
        // Tokens of the chunk that selected at least one worker of the batch.
        unsigned sel[TOKEN_SLOTS];
#pragma unroll
        for (int j = 0; j < TOKEN_SLOTS; ++j) {
            const int tl = 32 * j + lane;
            bool any = false;
            if (tl < nt) {
                for (int k = base; k < base + BATCH && k < nsel; ++k) any |= gw[tl * GW_STRIDE + clist[k]] != 0.0f;
            }
            sel[j] = __ballot_sync(FULL_MASK, any);
        }
#if SEGMENTS > 1
        // One wide row per batch (BATCH == 1): its dot product is summed over the segments.
        float dot[TOKEN_SLOTS];
#pragma unroll
        for (int j = 0; j < TOKEN_SLOTS; ++j) dot[j] = 0.0f;
#endif
        for (int seg = 0; seg < SEGMENTS; ++seg) {
#if SEGMENTS > 1
            if (seg * SEG_SLOTS * LPR * VEC >= in_dim - clist[base] * TC) break;  // the rest is padding
#endif
            uint4 raw[RPL][SEG_SLOTS];
#pragma unroll
            for (int q = 0; q < RPL; ++q) {
                if (my_c[q] >= 0) {
                    const tile_t* trow = tiles + ((size_t)(r * C + my_c[q]) * TR + local_row) * TC;
                    load_row(trow, seg, min(TC, in_dim - my_c[q] * TC), li, raw[q]);
                }
            }
#pragma unroll
            for (int j = 0; j < TOKEN_SLOTS; ++j) {
                unsigned m = sel[j];
                while (m) {
                    const int b = __ffs(m) - 1;
                    m &= m - 1u;
                    const float* gwt = gw + (32 * j + b) * GW_STRIDE;
                    const hidden_t* x = hidden + (size_t)(t0 + 32 * j + b) * in_dim;
                    float p[RPL];
#pragma unroll
                    for (int q = 0; q < RPL; ++q) {
                        p[q] = 0.0f;
                        const int c = my_c[q];
                        if (c >= 0 && gwt[c] != 0.0f) {
                            const int kvalid = min(TC, in_dim - c * TC);
                            const hidden_t* xc = x + (size_t)c * TC;
#pragma unroll
                            for (int i = 0; i < SEG_SLOTS; ++i) {
                                const int col0 = ((seg * SEG_SLOTS + i) * LPR + li) * VEC;
#pragma unroll
                                for (int e = 0; e < VEC; ++e) {
                                    if (col0 + e < kvalid) p[q] = fmaf(vec_elem(raw[q][i], e), hidden_to_float(xc[col0 + e]), p[q]);
                                }
                            }
                        }
                    }
#pragma unroll
                    for (int q = 0; q < RPL; ++q) p[q] = group_sum_float(p[q]);
                    // Hand each selected worker's dot product to the owner lane, in list order.
#pragma unroll
                    for (int k = 0; k < BATCH; ++k) {
                        if (base + k >= nsel) break;
                        const int c = clist[base + k];
                        const float gk = gwt[c];
                        if (gk == 0.0f) continue;  // the same for every lane: the token's choice
#if GROUPS == 1
                        const float d = p[k];
#else
                        const float d = __shfl_sync(FULL_MASK, p[k / GROUPS], (k % GROUPS) * LPR);
#endif
                        if (lane == b) {
#if SEGMENTS > 1
                            dot[j] += d;
#else
#if TILE_DTYPE == 2
                            const float scale = scales[(size_t)(r * C + c) * TR + local_row];
#else
                            const float scale = 1.0f;
#endif
                            acc[j] = fmaf(gk, d * scale, acc[j]);
#endif
                        }
                    }
                }
            }
        }
#if SEGMENTS > 1
        const int c = clist[base];
#if TILE_DTYPE == 2
        const float scale = scales[(size_t)(r * C + c) * TR + local_row];
#else
        const float scale = 1.0f;
#endif
#pragma unroll
        for (int j = 0; j < TOKEN_SLOTS; ++j) {
            if ((sel[j] >> lane) & 1u) acc[j] = fmaf(gw[(32 * j + lane) * GW_STRIDE + c], dot[j] * scale, acc[j]);
        }
#endif
    }

    // 3. Each output element has exactly one writer.
#pragma unroll
    for (int j = 0; j < TOKEN_SLOTS; ++j) {
        const int tl = 32 * j + lane;
        if (tl < nt) out[(size_t)(t0 + tl) * OUT_DIM + row] = float_to_hidden(acc[j]);
    }
}

// Warp 0: the column blocks of row-block r that some token of the chunk selected and that hold
// input columns (c * TC < in_dim), in increasing c, to clist; their number to clist[C].
__device__ void list_selected_columns(const float* gw, int nt, int in_dim, int* clist, int lane) {
    int count = 0;
    for (int c0 = 0; c0 < C; c0 += 32) {
        const int c = c0 + lane;
        bool any = false;
        if (c < C && c * TC < in_dim) {
            for (int tl = 0; tl < nt && !any; ++tl) any = gw[tl * GW_STRIDE + c] != 0.0f;
        }
        const unsigned m = __ballot_sync(FULL_MASK, any);
        if (any) clist[count + __popc(m & ((1u << lane) - 1u))] = c;
        count += __popc(m);
    }
    if (lane == 0) clist[C] = count;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32)
tile_dispatch_kernel(const hidden_t* __restrict__ hidden, const float* __restrict__ scores,
                     const tile_t* __restrict__ tiles, const float* __restrict__ scales, int T, int in_dim,
                     hidden_t* __restrict__ out) {
    // [TOKENS_PER_BLOCK][GW_STRIDE] gate weights of row-block r, then the column list [C + 1].
    PRISM_DYNAMIC_SHARED(float, gw);
    int* clist = reinterpret_cast<int*>(gw + TOKENS_PER_BLOCK * GW_STRIDE);
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
    __syncthreads();
    if (warp == 0) list_selected_columns(gw, nt, in_dim, clist, lane);
    __syncthreads();  // the last barrier: below, warps work on their own rows
    const int nsel = clist[C];

    // 2-3. Warp `warp` owns rows slab_row0 + warp, + WARPS, ... (ROWS_PER_WARP of them).
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const int local_row = slab_row0 + i * WARPS + warp;
        const int row = r * TR + local_row;
        if (local_row >= TR || row >= OUT_DIM) break;
        compute_row(hidden, tiles, scales, gw, clist, nsel, r, local_row, row, t0, nt, in_dim, out, lane);
    }
}
