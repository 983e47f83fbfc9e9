// SASA's attention stem: attention inside b x b blocks of a C_in-channel image with spatially-aware
// values, forward and backward (san_det/layers/ops/attention_stem.py has the algebra and the
// tensor-op reference).
//
// Compiled by san_det/layers/kernel_runtime.py for CUDA (CuPy / NVRTC) and, unchanged, as C++ for
// the CPU: grid-stride loops only, no __shared__, __syncthreads, atomics or warp intrinsics.
//
// The host passes the small derived matrices, not the projection weights:
// - qk (heads, C_in, F), F = C_in + 2 (2b - 1), acc_t: for query pixel p of head h the logit of
//   key j is sum_c x_p[c] (sum_c' qk[h, c, c'] x_j[c'] + qk[h, c, C_in + row(j) - row(p) + b - 1]
//   + qk[h, c, C_in + 2b - 1 + col(j) - col(p) + b - 1]);
// - weff (b*b, C_in, C), acc_t: the value of key j in channel c is sum_c' weff[j, c', c] x_j[c'].
// Positions inside a block are j = row * b + col; x, out, grad_out, grad_x are (N, C_in or C, H,
// W).
//
// A thread works on a tile: the same position of SAN_TJ consecutive blocks of one block row, one
// block per lane of a `san_vec` (san_lanes.h), so every per-head weight is a broadcast scalar and
// the sums over a block's queries are lane-wise adds. Pixels outside the image (H or W not a
// multiple of b; lanes past the last block) read 0, are never written, and as keys get
// probability exactly 0.

#include "san_lanes.h"

// Sizes the kernels hold per thread; the host only calls them when b <= STEM_MAX_B,
// C_in <= STEM_MAX_CIN and b*b * head width <= STEM_MAX_VALUES (ops/kernels.py).
#define STEM_MAX_B 4
#define STEM_MAX_BB (STEM_MAX_B * STEM_MAX_B)
#define STEM_MAX_CIN 4
#define STEM_MAX_VALUES 256
#define STEM_MAX_QUERY (STEM_MAX_CIN + 2 * STEM_MAX_B)
#define STEM_MAX_F (STEM_MAX_CIN + 2 * (2 * STEM_MAX_B - 1))

// The tile of one block row: batch n, block row I, first block column J0, and per position j of
// the block the lanes whose pixel is in the image (count, mask) and the offset of lane 0's pixel
// in a channel plane (lane t's pixel is t * b further).
struct stem_tile {
    int64_t n;
    int I, J0;
    int lanes[STEM_MAX_BB];
    san_mask valid[STEM_MAX_BB];
    int64_t pix[STEM_MAX_BB];
};

__device__ __forceinline__ void stem_tile_of(int64_t idx, int tiles_per_row, int nH, int b, int H,
                                             int W, stem_tile& t) {
    const int64_t row = san_div(idx, tiles_per_row);
    t.J0 = (int)(idx - row * tiles_per_row) * SAN_TJ;
    t.n = san_div(row, nH);
    t.I = (int)(row - t.n * nH);
    for (int j = 0; j < b * b; ++j) {
        const int y = t.I * b + j / b, x0 = t.J0 * b + j % b;
        int lanes = 0;
        if (y < H && x0 < W) lanes = (W - 1 - x0) / b + 1;
        if (lanes > SAN_TJ) lanes = SAN_TJ;
        t.lanes[j] = lanes;
        t.valid[j] = san_lanes(0, lanes);
        t.pix[j] = (int64_t)y * W + x0;
    }
}

// The lanes' pixels `stride` elements apart (0 past `lanes`), and the store back.
template <class T>
__device__ __forceinline__ san_vec stem_load(const T* __restrict__ p, int stride, int lanes) {
    san_vec v = san_vbcast((acc_t)0);
    for (int t = 0; t < lanes; ++t) v = san_vset(v, t, TO_ACC(p[(int64_t)t * stride]));
    return v;
}

template <class T>
__device__ __forceinline__ void stem_store(T* __restrict__ p, int stride, int lanes, san_vec v) {
    for (int t = 0; t < lanes; ++t) p[(int64_t)t * stride] = FROM_ACC(san_vget(v, t));
}

// Row a of the tile in one channel: `count` consecutive pixels of `row` (pixel t * b + bb is
// lane t of block column bb) to or from the b vectors cols[bb * step]. Whole vectors of pixels
// (the lanes permuted in registers) on the CPU; a lane is one block there, so pixel-by-pixel
// stores, or lanes inserted and extracted through memory, would stall on store forwarding.
#if SAN_TJ > 1
static inline san_ivec stem_lane_index() {
    return __builtin_convertvector(san_iota(), san_ivec);
}

static inline void stem_store_row(acc_t* __restrict__ row, int count, int b, const san_vec* cols,
                                  int step) {
    for (int k = 0; k * SAN_TJ < count; ++k) {
        const san_ivec pixel = stem_lane_index() + k * SAN_TJ;
        const san_ivec lane = pixel / b, column = pixel % b;
        san_vec chunk = san_vbcast((acc_t)0);
        for (int bb = 0; bb < b; ++bb)
            chunk = column == bb ? __builtin_shuffle(cols[bb * step], lane) : chunk;
        san_vstore(row + k * SAN_TJ, chunk, san_lanes(0, count - k * SAN_TJ));
    }
}

static inline void stem_load_row(const acc_t* __restrict__ row, int count, int b, san_vec* cols,
                                 int step) {
    san_vec chunks[STEM_MAX_B];
    for (int k = 0; k < b; ++k)
        chunks[k] = san_vload(row + k * SAN_TJ, san_lanes(0, count - k * SAN_TJ));
    for (int bb = 0; bb < b; ++bb) {
        const san_ivec pixel = stem_lane_index() * b + bb;
        const san_ivec which = pixel / SAN_TJ, lane = pixel % SAN_TJ;
        san_vec col = san_vbcast((acc_t)0);
        for (int k = 0; k < b; ++k) col = which == k ? __builtin_shuffle(chunks[k], lane) : col;
        cols[bb * step] = col;
    }
}
#else
template <class T>
__device__ __forceinline__ void stem_store_row(T* __restrict__ row, int count, int b,
                                               const san_vec* cols, int step) {
    for (int k = 0; k < count; ++k) row[k] = FROM_ACC(cols[k * step]);
}

template <class T>
__device__ __forceinline__ void stem_load_row(const T* __restrict__ row, int count, int b,
                                              san_vec* cols, int step) {
    for (int k = 0; k < b; ++k) cols[k * step] = k < count ? TO_ACC(row[k]) : (acc_t)0;
}
#endif

// The pixels of row a of the tile that are in the image (0 for a row below it).
__device__ __forceinline__ int stem_row_count(const stem_tile& t, int a, int b, int H, int W) {
    if (t.I * b + a >= H) return 0;
    const int count = W - t.J0 * b;
    return count < SAN_TJ * b ? count : SAN_TJ * b;
}

// The image of the tile, X[c * b*b + j] (channel c, position j).
__device__ __forceinline__ void stem_load_image(const scalar_t* __restrict__ x,
                                                const stem_tile& t, int C_in, int b, int64_t HW,
                                                san_vec* X) {
    const int BB = b * b;
    for (int c = 0; c < C_in; ++c)
        for (int j = 0; j < BB; ++j)
            X[c * BB + j] = stem_load(x + (t.n * C_in + c) * HW + t.pix[j], b, t.lanes[j]);
}

// Head h's values V[j * d + c] = sum_c' weff[j, c', h d + c] X[c', j].
__device__ __forceinline__ void stem_values(const san_vec* X, const acc_t* __restrict__ weff,
                                            int h, int d, int C, int C_in, int BB, san_vec* V) {
    for (int j = 0; j < BB; ++j) {
        for (int c = 0; c < d; ++c) {
            san_vec v = san_vbcast((acc_t)0);
            for (int ci = 0; ci < C_in; ++ci)
                v = v + X[ci * BB + j] * san_vbcast(weff[((int64_t)j * C_in + ci) * C + h * d + c]);
            V[j * d + c] = v;
        }
    }
}

// Column of qk (within a row of F) that query term f of query position p reads: f < C_in the key
// channel f; then the b key rows; then the b key columns.
__device__ __forceinline__ int stem_query_column(int f, int p, int b, int C_in) {
    if (f < C_in) return f;
    if (f < C_in + b) return C_in + (f - C_in) - p / b + b - 1;
    return C_in + 2 * b - 1 + (f - C_in - b) - p % b + b - 1;
}

// Query p of head h (q = qk + h C_in F): its query terms U[f] = sum_c X[c, p] q[c, column(f)]
// (C_in + 2b of them) and its probabilities P[j] over the block's keys.
__device__ __forceinline__ void stem_probs(const san_vec* X, const acc_t* __restrict__ q,
                                           const stem_tile& t, int p, int b, int C_in, int F,
                                           san_vec* U, san_vec* P) {
    const int BB = b * b;
    for (int f = 0; f < C_in + 2 * b; ++f) {
        const int col = stem_query_column(f, p, b, C_in);
        san_vec s = san_vbcast((acc_t)0);
        for (int c = 0; c < C_in; ++c) s = s + X[c * BB + p] * san_vbcast(q[c * F + col]);
        U[f] = s;
    }
    san_vec top = san_vbcast(san_lowest());
    for (int j = 0; j < BB; ++j) {
        san_vec l = U[C_in + j / b] + U[C_in + b + j % b];
        for (int c = 0; c < C_in; ++c) l = l + U[c] * X[c * BB + j];
        l = san_vselect(l, t.valid[j], san_lowest());
        P[j] = l;
        top = san_vmax(top, l);
    }
    // Keys more than 40 (float; 80 in double) below the largest logit get probability 0: less
    // than a rounding error in any sum, while their tiny probabilities would make denormal numbers
    // (100 times slower on x86) in every product. Image-scale inputs (pixels in 0..255) give
    // logits far apart, so most keys are such keys.
    const san_vec cutoff = top - (acc_t)(sizeof(acc_t) == 8 ? 80 : 40);
    san_vec sum = san_vbcast((acc_t)0);
    for (int j = 0; j < BB; ++j) {
        const san_vec e = san_vexp(P[j] - top);
        P[j] = P[j] < cutoff ? san_vbcast((acc_t)0) : e;
        P[j] = san_vselect(P[j], t.valid[j], (acc_t)0);
        sum = sum + P[j];
    }
    // A lane with an image pixel has sum >= 1 (its largest term is exp(0)); a lane without one
    // has sum 0 and keeps probabilities 0.
    const san_vec inv = (acc_t)1 / san_vmax(sum, san_vbcast((acc_t)1e-30));
    for (int j = 0; j < BB; ++j) P[j] = P[j] * inv;
}

// A kernel's sizes: compile-time where the template argument is not 0 (the stem of the SASA
// papers: b = 4, C_in = 3, head width 8, so that its loops unroll), else the runtime value.
#define STEM_SIZES(b_, C_in_, d_)                   \
    const int b = B ? B : b_;                       \
    const int C_in = CIN ? CIN : C_in_;             \
    const int d = D ? D : d_;                       \
    const int BB = b * b, F = C_in + 2 * (2 * b - 1); \
    const int nH = (H + b - 1) / b, nW = (W + b - 1) / b; \
    const int tiles_per_row = (nW + SAN_TJ - 1) / SAN_TJ; \
    const int64_t HW = (int64_t)H * W

// One tile's attention output. Without POOL it is written to out (N, C, H, W). With POOL nothing
// at full resolution is written: per channel ch = h d + c and block, pooled (N, C, nH, nW) gets
// the output y at the first position (in block order, image pixels only) where sign[ch] * y is
// largest, position (same shape) that position a * b + col, and sums[ch] / sums[C + ch] get the
// sums of y / y^2 over the tile's image pixels (a zero sign gives the block's first pixel).
template <int B, int CIN, int D, bool POOL>
__device__ __forceinline__ void stem_forward_tile(
    const stem_tile& t, const scalar_t* __restrict__ x, const acc_t* __restrict__ qk,
    const acc_t* __restrict__ weff, scalar_t* __restrict__ out, const acc_t* __restrict__ sign,
    scalar_t* __restrict__ pooled, unsigned char* __restrict__ position, double* __restrict__ sums,
    int C_in_, int H, int W, int C, int heads, int b_) {
    STEM_SIZES(b_, C_in_, C / heads);
    san_vec X[STEM_MAX_CIN * STEM_MAX_BB], V[STEM_MAX_VALUES], O[STEM_MAX_VALUES];
    san_vec U[STEM_MAX_QUERY], P[STEM_MAX_BB];
    // POOL: per channel the largest sign * y so far, its y and position, the sums of y and y^2
    san_vec best[POOL ? STEM_MAX_VALUES : 1], val[POOL ? STEM_MAX_VALUES : 1];
    san_vec pos[POOL ? STEM_MAX_VALUES : 1], s1[POOL ? STEM_MAX_VALUES : 1];
    san_vec s2[POOL ? STEM_MAX_VALUES : 1];
    stem_load_image(x, t, C_in, b, HW, X);
    for (int h = 0; h < heads; ++h) {
        stem_values(X, weff, h, d, C, C_in, BB, V);
        if (POOL)
            for (int c = 0; c < d; ++c) {
                best[c] = san_vbcast(san_lowest());
                val[c] = pos[c] = s1[c] = s2[c] = san_vbcast((acc_t)0);
            }
        for (int a = 0; a < b; ++a) {  // a row of queries, stored in memory order
            const int count = stem_row_count(t, a, b, H, W);
            if (count == 0) continue;
            for (int bb = 0; bb < b; ++bb) {
                const int p = a * b + bb;
                stem_probs(X, qk + (int64_t)h * C_in * F, t, p, b, C_in, F, U, P);
                // d independent sums, not a chain of b*b terms per channel
                san_vec o[STEM_MAX_VALUES];
                for (int c = 0; c < d; ++c) o[c] = san_vbcast((acc_t)0);
                for (int j = 0; j < BB; ++j)
                    for (int c = 0; c < d; ++c) o[c] = o[c] + P[j] * V[j * d + c];
                if (!POOL) {
                    for (int c = 0; c < d; ++c) O[bb * d + c] = o[c];
                    continue;
                }
                for (int c = 0; c < d; ++c) {
                    const san_vec y = san_vselect(o[c], t.valid[p], (acc_t)0);
                    s1[c] = s1[c] + y;
                    s2[c] = s2[c] + y * y;
                    const san_vec s =
                        san_vselect(o[c] * san_vbcast(sign[h * d + c]), t.valid[p], san_lowest());
                    const auto take = s > best[c];  // the first of equal ones stays
                    val[c] = take ? o[c] : val[c];
                    pos[c] = take ? san_vbcast((acc_t)p) : pos[c];
                    best[c] = take ? s : best[c];
                }
            }
            if (POOL) continue;
            scalar_t* row = out + (t.n * C + h * d) * HW + t.pix[a * b];
            for (int c = 0; c < d; ++c) stem_store_row(row + c * HW, count, b, O + c, d);
        }
        if (!POOL) continue;
        const int blocks = t.lanes[0];  // the tile's blocks (their first pixels are in the image)
        for (int c = 0; c < d; ++c) {
            const int ch = h * d + c;
            const int64_t at = ((t.n * C + ch) * nH + t.I) * nW + t.J0;
            san_vstore(pooled + at, val[c], san_lanes(0, blocks));
            for (int l = 0; l < blocks; ++l) position[at + l] = (unsigned char)san_vget(pos[c], l);
            sums[ch] += (double)san_vsum(s1[c]);
            sums[C + ch] += (double)san_vsum(s2[c]);
        }
    }
}

// out (N, C, H, W): one thread per tile.
__global__ void __launch_bounds__(SAN_BLOCK_THREADS)
    stem_forward(const scalar_t* __restrict__ x, const acc_t* __restrict__ qk,
                 const acc_t* __restrict__ weff, scalar_t* __restrict__ out, int N, int C_in, int H,
                 int W, int C, int heads, int b) {
    const int nH = (H + b - 1) / b, nW = (W + b - 1) / b;
    const int tiles_per_row = (nW + SAN_TJ - 1) / SAN_TJ;
    SAN_GRID_LOOP(idx, (int64_t)N * nH * tiles_per_row) {
        stem_tile t;
        stem_tile_of(idx, tiles_per_row, nH, b, H, W, t);
        if (b == 4 && C_in == 3 && C == 8 * heads)
            stem_forward_tile<4, 3, 8, false>(t, x, qk, weff, out, 0, 0, 0, 0, C_in, H, W, C,
                                              heads, b);
        else
            stem_forward_tile<0, 0, 0, false>(t, x, qk, weff, out, 0, 0, 0, 0, C_in, H, W, C,
                                              heads, b);
    }
}

// The attention output max-pooled by sign over each block, and its channel sums (see
// stem_forward_tile): thread `item` takes tiles [item * tiles_per_item, (item + 1) *
// tiles_per_item) and adds its sums into part_sums[item] (2, C) (zeros on entry; the host sums
// the items).
__global__ void __launch_bounds__(SAN_BLOCK_THREADS)
    stem_pool_forward(const scalar_t* __restrict__ x, const acc_t* __restrict__ qk,
                      const acc_t* __restrict__ weff, const acc_t* __restrict__ sign,
                      scalar_t* __restrict__ pooled, unsigned char* __restrict__ position,
                      double* __restrict__ part_sums, int N, int C_in, int H, int W, int C,
                      int heads, int b, int tiles_per_item) {
    const int nH = (H + b - 1) / b, nW = (W + b - 1) / b;
    const int tiles_per_row = (nW + SAN_TJ - 1) / SAN_TJ;
    const int64_t tiles = (int64_t)N * nH * tiles_per_row;
    SAN_GRID_LOOP(item, (tiles + tiles_per_item - 1) / tiles_per_item) {
        double* sums = part_sums + item * 2 * C;
        const int64_t end = (item + 1) * tiles_per_item, last = end < tiles ? end : tiles;
        for (int64_t idx = item * tiles_per_item; idx < last; ++idx) {
            stem_tile t;
            stem_tile_of(idx, tiles_per_row, nH, b, H, W, t);
            if (b == 4 && C_in == 3 && C == 8 * heads)
                stem_forward_tile<4, 3, 8, true>(t, x, qk, weff, 0, sign, pooled, position, sums,
                                                 C_in, H, W, C, heads, b);
            else
                stem_forward_tile<0, 0, 0, true>(t, x, qk, weff, 0, sign, pooled, position, sums,
                                                 C_in, H, W, C, heads, b);
        }
    }
}

// G[c] (c < d), the gradient of head h's output at query p of a tile from that of
// stem_pool_forward's outputs (see stem_backward_items), 0 at lanes without an image pixel.
__device__ __forceinline__ void stem_pooled_gradient(const san_vec* P, const san_vec* V,
                                                     const san_vec* GP, const san_vec* POS,
                                                     const acc_t* __restrict__ grad_sums,
                                                     int need_y, san_mask valid, int p, int h,
                                                     int d, int C, int BB, san_vec* G) {
    san_vec y[STEM_MAX_VALUES];
    for (int c = 0; c < d; ++c) y[c] = san_vbcast((acc_t)0);
    if (need_y)
        for (int j = 0; j < BB; ++j)
            for (int c = 0; c < d; ++c) y[c] = y[c] + P[j] * V[j * d + c];
    for (int c = 0; c < d; ++c) {
        const int ch = h * d + c;
        const san_vec at = POS[c] == san_vbcast((acc_t)p) ? GP[c] : san_vbcast((acc_t)0);
        const san_vec g =
            san_vbcast(grad_sums[ch]) + san_vbcast(2 * grad_sums[C + ch]) * y[c] + at;
        G[c] = san_vselect(g, valid, (acc_t)0);
    }
}

// The gradients. Thread `item` takes tiles [item * tiles_per_item, (item + 1) * tiles_per_item)
// and adds, lane by lane, its part of grad qk into part_qk[item] (heads, C_in, F, SAN_TJ) and of
// grad weff into part_weff[item] (b*b, C_in, C, SAN_TJ) (zeros on entry; the host sums items and
// lanes). With input_grad, grad_x (N, C_in, H, W) gets every image pixel (each is in one tile).
// The output's gradient: without POOL grad_out (N, C, H, W); with POOL that of stem_pool_forward's
// outputs, grad_pooled (N, C, nH, nW) at the saved positions and grad_sums (2, C) of the sums
// (the output's gradient is grad_sums[ch] + 2 grad_sums[C + ch] y + grad_pooled at the position;
// the output y is recomputed where need_y, i.e. some grad_sums[C + ch] is not 0).
template <int B, int CIN, int D, bool POOL>
__device__ __forceinline__ void stem_backward_items(
    const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
    const scalar_t* __restrict__ grad_pooled, const unsigned char* __restrict__ position,
    const acc_t* __restrict__ grad_sums, int need_y, const acc_t* __restrict__ qk,
    const acc_t* __restrict__ weff, acc_t* __restrict__ part_qk, acc_t* __restrict__ part_weff,
    scalar_t* __restrict__ grad_x, int N, int C_in_, int H, int W, int C, int heads, int b_,
    int tiles_per_item, int input_grad) {
    STEM_SIZES(b_, C_in_, C / heads);
    const int NQ = C_in + 2 * b;
    const int64_t tiles = (int64_t)N * nH * tiles_per_row;
    const san_mask all = san_lanes(0, SAN_TJ);
    SAN_GRID_LOOP(item, (tiles + tiles_per_item - 1) / tiles_per_item) {
        acc_t* pq = part_qk + item * heads * C_in * F * SAN_TJ;
        acc_t* pw = part_weff + item * BB * C_in * C * SAN_TJ;
        const int64_t end = (item + 1) * tiles_per_item, last = end < tiles ? end : tiles;
        for (int64_t idx = item * tiles_per_item; idx < last; ++idx) {
            stem_tile t;
            stem_tile_of(idx, tiles_per_row, nH, b, H, W, t);
            san_vec X[STEM_MAX_CIN * STEM_MAX_BB], GX[STEM_MAX_CIN * STEM_MAX_BB];
            san_vec V[STEM_MAX_VALUES], G[STEM_MAX_VALUES], GV[STEM_MAX_VALUES];
            san_vec U[STEM_MAX_QUERY], GU[STEM_MAX_QUERY], P[STEM_MAX_BB], DL[STEM_MAX_BB];
            san_vec GQ[STEM_MAX_CIN * STEM_MAX_F];
            san_vec GP[POOL ? STEM_MAX_VALUES : 1], POS[POOL ? STEM_MAX_VALUES : 1];
            stem_load_image(x, t, C_in, b, HW, X);
            for (int k = 0; k < C_in * BB; ++k) GX[k] = san_vbcast((acc_t)0);
            for (int h = 0; h < heads; ++h) {
                const acc_t* q = qk + (int64_t)h * C_in * F;
                stem_values(X, weff, h, d, C, C_in, BB, V);
                for (int a = 0; !POOL && a < b; ++a) {  // grad_out, G[p * d + c]
                    const int count = stem_row_count(t, a, b, H, W);
                    const scalar_t* row = grad_out + (t.n * C + h * d) * HW + t.pix[a * b];
                    for (int c = 0; c < d; ++c)
                        stem_load_row(row + c * HW, count, b, G + a * b * d + c, d);
                }
                for (int c = 0; POOL && c < d; ++c) {  // the pooled gradient and its positions
                    const int64_t at = ((t.n * C + h * d + c) * nH + t.I) * nW + t.J0;
                    GP[c] = san_vload(grad_pooled + at, san_lanes(0, t.lanes[0]));
                    POS[c] = san_vbcast((acc_t)-1);
                    for (int l = 0; l < t.lanes[0]; ++l)
                        POS[c] = san_vset(POS[c], l, (acc_t)position[at + l]);
                }
                for (int k = 0; k < BB * d; ++k) GV[k] = san_vbcast((acc_t)0);
                for (int k = 0; k < C_in * F; ++k) GQ[k] = san_vbcast((acc_t)0);
                for (int p = 0; p < BB; ++p) {
                    if (t.lanes[p] == 0) continue;  // grad_out 0: no term
                    stem_probs(X, q, t, p, b, C_in, F, U, P);
                    if (POOL) stem_pooled_gradient(P, V, GP, POS, grad_sums, need_y, t.valid[p],
                                                   p, h, d, C, BB, G + p * d);
                    // out[p] = sum_j P[j] V[j]: dP[j] = g[p] . V[j], dlogit = P (dP - sum P dP)
                    for (int j = 0; j < BB; ++j) DL[j] = san_vbcast((acc_t)0);
                    for (int c = 0; c < d; ++c) {
                        const san_vec g = G[p * d + c];
                        for (int j = 0; j < BB; ++j) {
                            DL[j] = DL[j] + g * V[j * d + c];
                            GV[j * d + c] = GV[j * d + c] + P[j] * g;
                        }
                    }
                    san_vec s = san_vbcast((acc_t)0);
                    for (int j = 0; j < BB; ++j) s = s + P[j] * DL[j];
                    for (int f = 0; f < NQ; ++f) GU[f] = san_vbcast((acc_t)0);
                    for (int j = 0; j < BB; ++j) {
                        const san_vec dl = P[j] * (DL[j] - s);
                        DL[j] = dl;
                        for (int c = 0; c < C_in; ++c) GU[c] = GU[c] + dl * X[c * BB + j];
                        GU[C_in + j / b] = GU[C_in + j / b] + dl;
                        GU[C_in + b + j % b] = GU[C_in + b + j % b] + dl;
                    }
                    for (int f = 0; f < NQ; ++f) {
                        const int col = stem_query_column(f, p, b, C_in);
                        for (int c = 0; c < C_in; ++c)
                            GQ[c * F + col] = GQ[c * F + col] + X[c * BB + p] * GU[f];
                    }
                    if (!input_grad) continue;
                    for (int c = 0; c < C_in; ++c) {  // query side
                        san_vec gx = san_vbcast((acc_t)0);
                        for (int f = 0; f < NQ; ++f) {
                            const int col = stem_query_column(f, p, b, C_in);
                            gx = gx + san_vbcast(q[c * F + col]) * GU[f];
                        }
                        GX[c * BB + p] = GX[c * BB + p] + gx;
                    }
                    for (int j = 0; j < BB; ++j)  // key side
                        for (int c = 0; c < C_in; ++c)
                            GX[c * BB + j] = GX[c * BB + j] + DL[j] * U[c];
                }
                for (int j = 0; j < BB; ++j) {
                    for (int ci = 0; ci < C_in; ++ci) {
                        const int64_t w0 = ((int64_t)j * C_in + ci) * C + h * d;
                        san_vec gx = san_vbcast((acc_t)0);
                        for (int c = 0; c < d; ++c) {
                            acc_t* w = pw + (w0 + c) * SAN_TJ;
                            san_vstore(w, san_vload(w, all) + GV[j * d + c] * X[ci * BB + j], all);
                            gx = gx + san_vbcast(weff[w0 + c]) * GV[j * d + c];
                        }
                        if (input_grad) GX[ci * BB + j] = GX[ci * BB + j] + gx;  // value side
                    }
                }
                for (int k = 0; k < C_in * F; ++k) {
                    acc_t* g = pq + ((int64_t)h * C_in * F + k) * SAN_TJ;
                    san_vstore(g, san_vload(g, all) + GQ[k], all);
                }
            }
            if (input_grad)
                for (int c = 0; c < C_in; ++c)
                    for (int j = 0; j < BB; ++j)
                        stem_store(grad_x + (t.n * C_in + c) * HW + t.pix[j], b, t.lanes[j],
                                   GX[c * BB + j]);
        }
    }
}

__global__ void __launch_bounds__(SAN_BLOCK_THREADS)
    stem_backward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_out,
                  const acc_t* __restrict__ qk, const acc_t* __restrict__ weff,
                  acc_t* __restrict__ part_qk, acc_t* __restrict__ part_weff,
                  scalar_t* __restrict__ grad_x, int N, int C_in, int H, int W, int C, int heads,
                  int b, int tiles_per_item, int input_grad) {
    if (b == 4 && C_in == 3 && C == 8 * heads)
        stem_backward_items<4, 3, 8, false>(x, grad_out, 0, 0, 0, 0, qk, weff, part_qk, part_weff,
                                            grad_x, N, C_in, H, W, C, heads, b, tiles_per_item,
                                            input_grad);
    else
        stem_backward_items<0, 0, 0, false>(x, grad_out, 0, 0, 0, 0, qk, weff, part_qk, part_weff,
                                            grad_x, N, C_in, H, W, C, heads, b, tiles_per_item,
                                            input_grad);
}

// The gradients of stem_pool_forward (see stem_backward_items).
__global__ void __launch_bounds__(SAN_BLOCK_THREADS)
    stem_pool_backward(const scalar_t* __restrict__ x, const scalar_t* __restrict__ grad_pooled,
                       const unsigned char* __restrict__ position,
                       const acc_t* __restrict__ grad_sums, int need_y,
                       const acc_t* __restrict__ qk, const acc_t* __restrict__ weff,
                       acc_t* __restrict__ part_qk, acc_t* __restrict__ part_weff,
                       scalar_t* __restrict__ grad_x, int N, int C_in, int H, int W, int C,
                       int heads, int b, int tiles_per_item, int input_grad) {
    if (b == 4 && C_in == 3 && C == 8 * heads)
        stem_backward_items<4, 3, 8, true>(x, 0, grad_pooled, position, grad_sums, need_y, qk,
                                           weff, part_qk, part_weff, grad_x, N, C_in, H, W, C,
                                           heads, b, tiles_per_item, input_grad);
    else
        stem_backward_items<0, 0, 0, true>(x, 0, grad_pooled, position, grad_sums, need_y, qk,
                                           weff, part_qk, part_weff, grad_x, N, C_in, H, W, C,
                                           heads, b, tiles_per_item, input_grad);
}
