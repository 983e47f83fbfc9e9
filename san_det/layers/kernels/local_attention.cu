// SASA local self-attention: forward and backward kernels.
//
// Compiled by san_det/layers/kernel_runtime.py for CUDA (CuPy / NVRTC) and, unchanged, as C++ for
// the CPU; so only grid-stride loops, no __shared__, __syncthreads, atomics or warp intrinsics.
// The runtime prepends the typedefs scalar_t (storage) and acc_t (arithmetic) and the TO_ACC /
// FROM_ACC conversions.
//
// Layouts (all contiguous): q, k, v, out, grad_* are (N, C, H, W); relT is rel transposed to
// (heads, K*K, d) (zeros when there is none); attn and dlogit are acc_t buffers
// (N, heads, H, K*K, W): the K*K taps of an image row are one block, so a tile reads its own
// probabilities, and the sources' ones in the backward gather, from a few contiguous blocks
// rather than from K*K planes far apart; psum (N, heads, H, W) is the per-pixel
// sum_ab p[ab] * (grad_out . v)[ab] of the backward. Heads are contiguous
// channel groups of d = C / heads channels. Neighbour (a, b) of pixel (i, j) is
// (i + (a - r) * dil, j + (b - r) * dil) with r = K / 2; neighbours outside the image are masked:
// their probability and logit gradient are exactly 0.
//
// A thread works on a tile of SAN_TJ consecutive pixels of one image row, held in the lanes of a
// `san_vec` (san_lanes.h: one pixel per thread on the GPU, a SIMD register on the CPU). Every
// load of a neighbour names the lanes whose neighbour is inside the image, so border tiles run
// the same branch-free code as inner ones. Sums over channels run SAN_UT taps at once (SAN_UT
// independent accumulators, up to SAN_UT rows of a window column); sums over taps run SAN_CG
// channels at once, so a probability or
// logit gradient read from memory serves SAN_CG channels. The kernels that produce per-channel
// gradients of the neighbours (sasa_kv_backward) take a group of SAN_CG channels per thread; the
// others take the whole head and loop over its channel groups.

#ifndef SAN_UT
#define SAN_UT 4
#endif

#include "san_lanes.h"

// The sizes a SASA kernel derives from its arguments (C, H, W, heads, K): pixels per plane HW,
// head width d, window radius r and taps KK, row tiles WT of SAN_TJ pixels.
#define SASA_SIZES                            \
    const int64_t HW = (int64_t)H * W;        \
    const int d = C / heads;                  \
    const int r = K / 2;                      \
    const int KK = K * K;                     \
    const int WT = (W + SAN_TJ - 1) / SAN_TJ

// The tile of thread `idx` of a kernel over (n, head, i, row tile), after SASA_SIZES: t, its row
// i, first column j0, its hi0 pixels and their mask m0, the offsets of pixel (i, j0) and of the
// head's first channel.
#define SASA_TILE(idx)                                         \
    const sasa_tile t = sasa_tile_of(idx, WT, H, heads);       \
    const int i = t.i, j0 = t.j0;                              \
    const int hi0 = san_tile_lanes(W, j0);                     \
    const san_mask m0 = san_lanes(0, hi0);                     \
    const int64_t pix0 = (int64_t)i * W + j0;                  \
    const int64_t chan0 = (t.n * C + (int64_t)t.h * d) * HW

// The lanes of the tile at column j0 whose neighbour at column offset `off` is inside a row of W
// pixels (hi0 = min(SAN_TJ, W - j0) lanes are pixels of the row at all), as a range [lo, hi).
__device__ __forceinline__ void sasa_tap_range(int j0, int off, int W, int hi0, int& lo,
                                               int& hi) {
    lo = j0 + off < 0 ? -(j0 + off) : 0;
    hi = W - j0 - off < hi0 ? W - j0 - off : hi0;
}

// [lo, hi): the window indices t in [0, K) with 0 <= base + sign * (t - r) * dil < size (an
// interval, since the coordinate is monotonic in t). Rows of the neighbours of row i: base i,
// sign 1; rows of the pixels that see row i as a neighbour: base i, sign -1.
__device__ __forceinline__ void sasa_window_range(int base, int sign, int size, int K, int r,
                                                  int dil, int& lo, int& hi) {
    lo = 0;
    while (lo < K && (unsigned)(base + sign * (lo - r) * dil) >= (unsigned)size) ++lo;
    hi = lo;
    while (hi < K && (unsigned)(base + sign * (hi - r) * dil) < (unsigned)size) ++hi;
}

// The part of a tile's window that touches the image: rows [a_lo, a_hi) and columns [b_lo, b_hi)
// (sign 1: the tile's neighbours; sign -1: the pixels that see the tile). All other taps are
// outside the image for every lane.
struct sasa_window {
    int a_lo, a_hi, b_lo, b_hi;
};

__device__ __forceinline__ sasa_window sasa_window_of(int i, int j0, int hi0, int sign, int H,
                                                      int W, int K, int r, int dil) {
    sasa_window w;
    sasa_window_range(i, sign, H, K, r, dil, w.a_lo, w.a_hi);
    int lo, hi;
    for (w.b_lo = 0; w.b_lo < K; ++w.b_lo) {
        sasa_tap_range(j0, sign * (w.b_lo - r) * dil, W, hi0, lo, hi);
        if (lo < hi) break;
    }
    for (w.b_hi = w.b_lo; w.b_hi < K; ++w.b_hi) {
        sasa_tap_range(j0, sign * (w.b_hi - r) * dil, W, hi0, lo, hi);
        if (lo >= hi) break;
    }
    return w;
}

// The in-image lanes of window column b (sign as in sasa_window_of).
__device__ __forceinline__ san_mask sasa_column_mask(int j0, int b, int sign, int W, int hi0,
                                                     int r, int dil) {
    int lo, hi;
    sasa_tap_range(j0, sign * (b - r) * dil, W, hi0, lo, hi);
    return san_lanes(lo, hi);
}

// What the dot-product loops also reduce, in registers, while they store the dots: nothing, the
// running maximum (the forward's logits) or sum_ab p[ab] * dot[ab] (the backward's weighted sum).
enum { SASA_NONE = 0, SASA_MAX = 1, SASA_PSUM = 2 };

// For the U taps (a0 + u, b) of one window column: dst[u] = sum_{c < d} x_c * (y_c + rel_c),
// x_c the tile in channel c, y_c its neighbour (a0 + u, b), rel_c = rel[c, a0 + u, b] (REL) or 0.
// x points at the tile in channel 0, y at the neighbour row of a0 in channel 0 (in-image lanes
// `m`), relT at relT[h, a0 * K + b, 0]; channels are HW apart in x and y, rows rowstep apart in y;
// dst at tap a0 * K + b of the tile (taps W apart). Lanes outside `m` are stored as `fill`.
// EXTRA: `red` takes the maximum of the stored values (SASA_MAX) or adds p * value, p read at
// the same tap offsets from `p` (SASA_PSUM).
template <int U, bool REL, int EXTRA>
__device__ __forceinline__ void sasa_col_dots(const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ y,
                                              const scalar_t* __restrict__ relT,
                                              acc_t* __restrict__ dst,
                                              const acc_t* __restrict__ p, int64_t HW, int W,
                                              int64_t rowstep, int K, int d, san_mask m,
                                              san_mask m0, acc_t fill, san_vec& red) {
    san_vec s[U];
    SAN_UNROLL for (int u = 0; u < U; ++u) s[u] = san_vbcast((acc_t)0);
    const int64_t relstep = (int64_t)K * d;  // relT rows of taps (a, b) and (a + 1, b)
    for (int c = 0; c < d; ++c) {
        const san_vec xc = san_vload(x + c * HW, m0);
        const scalar_t* yc = y + c * HW;
        SAN_UNROLL for (int u = 0; u < U; ++u) {
            san_vec yv = san_vload(yc + u * rowstep, m);
            if (REL) yv = yv + san_vbcast(TO_ACC(relT[u * relstep + c]));
            s[u] = s[u] + xc * yv;
        }
    }
    const int64_t rowtaps = (int64_t)K * W;  // taps (a, b) and (a + 1, b) in the buffer
    SAN_UNROLL for (int u = 0; u < U; ++u) {
        const san_vec value = san_vselect(s[u], m, fill);
        san_vstore(dst + u * rowtaps, value, m0);
        if (EXTRA == SASA_MAX) red = san_vmax(red, value);
        if (EXTRA == SASA_PSUM) red = red + san_vload(p + u * rowtaps, m0) * value;
    }
}

// sasa_col_dots for `rows` (1 <= rows <= U) taps: the instance with exactly that many sums.
template <int U, bool REL, int EXTRA>
__device__ __forceinline__ void sasa_col_dots_upto(int rows, const scalar_t* x, const scalar_t* y,
                                                   const scalar_t* relT, acc_t* dst,
                                                   const acc_t* p, int64_t HW, int W,
                                                   int64_t rowstep, int K, int d, san_mask m,
                                                   san_mask m0, acc_t fill, san_vec& red) {
    if constexpr (U > 1) {
        if (rows < U) {
            sasa_col_dots_upto<U - 1, REL, EXTRA>(rows, x, y, relT, dst, p, HW, W, rowstep, K, d,
                                                  m, m0, fill, red);
            return;
        }
    }
    sasa_col_dots<U, REL, EXTRA>(x, y, relT, dst, p, HW, W, rowstep, K, d, m, m0, fill, red);
}

// dst[ab] = sum_{c < d} x_c * (y_c(neighbour ab) + rel[c, ab]) for the taps of `win` (fill where
// the neighbour is outside; taps outside `win` are not written). x at the tile in channel 0, y at
// channel 0, row 0, column j0; dst (and p) at tap 0 of the tile (taps W apart); m0: the tile's
// lanes. Returns the EXTRA reduction (see sasa_col_dots), started from `init`.
template <bool REL, int EXTRA>
__device__ __forceinline__ san_vec sasa_window_dots(const scalar_t* x, const scalar_t* y,
                                                    const scalar_t* relT, acc_t* dst,
                                                    const acc_t* p, int64_t HW,
                                                    const sasa_window& win, int i, int j0, int K,
                                                    int d, int r, int dil, int W, int hi0,
                                                    san_mask m0, acc_t fill, acc_t init) {
    const int64_t rowstep = (int64_t)dil * W;
    san_vec red = san_vbcast(init);
    for (int b = win.b_lo; b < win.b_hi; ++b) {
        const int off = (b - r) * dil;
        const san_mask m = sasa_column_mask(j0, b, 1, W, hi0, r, dil);
        for (int a = win.a_lo; a < win.a_hi; a += SAN_UT) {
            const int ab = a * K + b;
            const int rows = win.a_hi - a < SAN_UT ? win.a_hi - a : SAN_UT;
            sasa_col_dots_upto<SAN_UT, REL, EXTRA>(
                rows, x, y + (int64_t)(i + (a - r) * dil) * W + off, relT + (int64_t)ab * d,
                dst + ab * W, p + ab * W, HW, W, rowstep, K, d, m, m0, fill, red);
        }
    }
    return red;
}

// Stores 0 at every tap of the tile outside `win` (dst at tap 0, taps W apart).
__device__ __forceinline__ void sasa_zero_outside(acc_t* dst, const sasa_window& win, int K,
                                                  int W, san_mask m0) {
    const san_vec zero = san_vbcast((acc_t)0);
    for (int a = 0; a < K; ++a) {
        const bool row_in = a >= win.a_lo && a < win.a_hi;
        for (int b = 0; b < K; ++b) {
            if (row_in && b == win.b_lo) b = win.b_hi;  // skip the window's columns
            if (b < K) san_vstore(dst + (a * K + b) * W, zero, m0);
        }
    }
}

// How a gather finishes the tap weights w it reads before using them (and stores them back):
// not at all, w * scale (the forward's normalisation) or p * (w - shift) (the logit gradient from
// the dots gv in w and the probabilities p).
enum { SASA_AS_IS = 0, SASA_SCALE = 1, SASA_DLOGIT = 2 };

// For G channels g: dst_g = sum_{a, b} w[ab] * (y_g(neighbour ab) + rel[c0 + g, ab]) over the
// in-image neighbours of the tile at (i, j0); w (and p) at tap 0 of the tile in an acc_t buffer
// (taps W apart), y at channel c0, row 0, column j0, relT at relT[h, 0, c0 - h * d] (REL).
// FINISH (not SASA_AS_IS): w[ab] is first replaced by its finished value (see above, with
// `scale` or `shift`), which is what the sum uses.
template <int G, bool REL, int FINISH>
__device__ __forceinline__ void sasa_gather_taps(acc_t* __restrict__ w,
                                                 const acc_t* __restrict__ p,
                                                 const scalar_t* __restrict__ y,
                                                 const scalar_t* __restrict__ relT,
                                                 scalar_t* __restrict__ dst, int64_t HW,
                                                 const sasa_window& win, int i, int j0, int K,
                                                 int d, int r, int dil, int W, int hi0,
                                                 san_mask m0, san_vec scale_or_shift) {
    san_vec s[G];
    SAN_UNROLL for (int g = 0; g < G; ++g) s[g] = san_vbcast((acc_t)0);
    for (int b = win.b_lo; b < win.b_hi; ++b) {
        const int off = (b - r) * dil;
        const san_mask m = sasa_column_mask(j0, b, 1, W, hi0, r, dil);
        const scalar_t* yp = y + (int64_t)(i + (win.a_lo - r) * dil) * W + off;
        for (int a = win.a_lo; a < win.a_hi; ++a, yp += (int64_t)dil * W) {
            const int ab = a * K + b;
            san_vec wv;
            if (FINISH == SASA_AS_IS) {
                wv = san_vload(w + ab * W, m);
            } else {
                // Lanes outside m hold 0 in w (and p): they stay 0.
                wv = san_vload(w + ab * W, m0);
                if (FINISH == SASA_SCALE) wv = wv * scale_or_shift;
                if (FINISH == SASA_DLOGIT) wv = san_vload(p + ab * W, m0) * (wv - scale_or_shift);
                san_vstore(w + ab * W, wv, m0);
            }
            SAN_UNROLL for (int g = 0; g < G; ++g) {
                san_vec yv = san_vload(yp + g * HW, m);
                if (REL) yv = yv + san_vbcast(TO_ACC(relT[(int64_t)ab * d + g]));
                s[g] = s[g] + wv * yv;
            }
        }
    }
    SAN_UNROLL for (int g = 0; g < G; ++g) san_vstore(dst + g * HW, s[g], m0);
}

// sasa_gather_taps over all d channels of a head: groups of SAN_CG channels, then one at a time;
// the first group finishes w (FINISH), the others read the finished weights.
template <bool REL, int FINISH>
__device__ __forceinline__ void sasa_gather_head(acc_t* w, const acc_t* p, const scalar_t* y,
                                                 const scalar_t* relT, scalar_t* dst,
                                                 int64_t HW, const sasa_window& win, int i,
                                                 int j0, int K, int d, int r, int dil, int W,
                                                 int hi0, san_mask m0, san_vec scale_or_shift) {
    int c = 0;
    if (d >= SAN_CG) {
        sasa_gather_taps<SAN_CG, REL, FINISH>(w, p, y, relT, dst, HW, win, i, j0, K, d, r, dil, W,
                                              hi0, m0, scale_or_shift);
        c = SAN_CG;
    } else {
        sasa_gather_taps<1, REL, FINISH>(w, p, y, relT, dst, HW, win, i, j0, K, d, r, dil, W, hi0,
                                         m0, scale_or_shift);
        c = 1;
    }
    for (; c + SAN_CG <= d; c += SAN_CG) {
        sasa_gather_taps<SAN_CG, REL, SASA_AS_IS>(w, p, y + c * HW, relT + c, dst + c * HW, HW,
                                                  win, i, j0, K, d, r, dil, W, hi0, m0,
                                                  scale_or_shift);
    }
    for (; c < d; ++c) {
        sasa_gather_taps<1, REL, SASA_AS_IS>(w, p, y + c * HW, relT + c, dst + c * HW, HW, win,
                                             i, j0, K, d, r, dil, W, hi0, m0, scale_or_shift);
    }
}

// The tile of thread `idx` over (n, head, i, row tile): its batch-head index nh = n * heads + h,
// head h, row i and first column j0.
struct sasa_tile {
    int64_t n, nh;
    int h, i, j0;
};

__device__ __forceinline__ sasa_tile sasa_tile_of(int64_t idx, int WT, int H, int heads) {
    sasa_tile t;
    const int64_t nhi = san_div(idx, WT);  // (n * heads + h) * H + i
    t.j0 = (int)(idx - nhi * WT) * SAN_TJ;
    t.nh = san_div(nhi, H);
    t.i = (int)(nhi - t.nh * H);
    t.n = san_div(t.nh, heads);
    t.h = (int)(t.nh - t.n * heads);
    return t;
}

// Forward. One thread per (n, head, i, row tile): the K*K logits
// sum_{c in head} q[c, i, j] * (k[c, i', j'] + rel[c, a, b]) go to attn and become the softmax
// over the in-image neighbours there (max, exp and sum, normalise); then
// out[c, i, j] = sum_{a, b} attn[i, a, b, j] * v[c, i', j'] for every channel of the head.
// Bounded to 2 blocks per SM: unbounded, the double build takes 168 registers (sm_80) since the
// logits' running maximum is kept in registers.
__global__ void __launch_bounds__(SAN_BLOCK_THREADS, 2)
    sasa_forward(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                 const scalar_t* __restrict__ v, const scalar_t* __restrict__ relT,
                 acc_t* __restrict__ attn, scalar_t* __restrict__ out, int N, int C, int H, int W,
                 int heads, int K, int dil) {
    SASA_SIZES;
    const acc_t lowest = san_lowest();
    SAN_GRID_LOOP(idx, (int64_t)N * heads * H * WT) {
        SASA_TILE(idx);
        const scalar_t* relT_h = relT + (int64_t)t.h * KK * d;
        acc_t* a_ptr = attn + (t.nh * H + i) * KK * W + j0;
        const sasa_window win = sasa_window_of(i, j0, hi0, 1, H, W, K, r, dil);

        // Logits (masked lanes hold `lowest`) and their maximum; 0 outside the window.
        const san_vec vmax = sasa_window_dots<true, SASA_MAX>(
            q + chan0 + pix0, k + chan0 + j0, relT_h, a_ptr, a_ptr, HW, win, i, j0, K, d, r, dil,
            W, hi0, m0, lowest, lowest);
        sasa_zero_outside(a_ptr, win, K, W, m0);
        // exp and sum (out-of-image neighbours get probability 0); the gather normalises.
        san_vec total = san_vbcast((acc_t)0);
        for (int b = win.b_lo; b < win.b_hi; ++b) {
            const san_mask m = sasa_column_mask(j0, b, 1, W, hi0, r, dil);
            for (int a = win.a_lo; a < win.a_hi; ++a) {
                acc_t* p = a_ptr + (a * K + b) * W;
                const san_vec e = san_vselect(san_vexp(san_vload(p, m0) - vmax), m, (acc_t)0);
                total = total + e;
                san_vstore(p, e, m0);
            }
        }
        const san_vec inv = (acc_t)1 / san_vselect(total, m0, (acc_t)1);
        sasa_gather_head<false, SASA_SCALE>(a_ptr, a_ptr, v + chan0 + j0, relT_h,
                                            out + chan0 + pix0, HW, win, i, j0, K, d, r, dil, W,
                                            hi0, m0, inv);
    }
}

// Gradient of the logits and of q. One thread per (n, head, i, row tile):
// gv[ab] = sum_{c in head} grad_out[c, i, j] * v[c, i', j'],
// dlogit[ab] = p[ab] * (gv[ab] - psum) (0 for out-of-image neighbours) with the per-pixel
// psum = sum_ab' p[ab'] gv[ab'] (stored to psum, (N, heads, H, W)), then
// grad_q[c, i, j] = sum_ab dlogit[ab, i, j] * (k[c, i', j'] + rel[c, a, b]).
// Bounded to 2 blocks per SM: unbounded, the float build takes 167 registers (sm_90), which holds
// an SM to one 256-thread block.
__global__ void __launch_bounds__(SAN_BLOCK_THREADS, 2)
    sasa_logit_q_backward(const scalar_t* __restrict__ grad_out,
                          const scalar_t* __restrict__ k,
                          const scalar_t* __restrict__ v,
                          const scalar_t* __restrict__ relT,
                          const acc_t* __restrict__ attn, acc_t* __restrict__ dlogit,
                          acc_t* __restrict__ psum, scalar_t* __restrict__ grad_q, int N, int C,
                          int H, int W, int heads, int K, int dil) {
    SASA_SIZES;
    SAN_GRID_LOOP(idx, (int64_t)N * heads * H * WT) {
        SASA_TILE(idx);
        const acc_t* p_ptr = attn + (t.nh * H + i) * KK * W + j0;
        acc_t* dl_ptr = dlogit + (t.nh * H + i) * KK * W + j0;
        const sasa_window win = sasa_window_of(i, j0, hi0, 1, H, W, K, r, dil);

        // gv into dlogit (0 where the neighbour is outside: p is 0 there too) and
        // weighted = sum_ab p[ab] gv[ab]; the gather turns gv into dlogit = p * (gv - weighted).
        const san_vec weighted = sasa_window_dots<false, SASA_PSUM>(
            grad_out + chan0 + pix0, v + chan0 + j0, relT, dl_ptr, p_ptr, HW, win, i, j0, K, d, r,
            dil, W, hi0, m0, (acc_t)0, (acc_t)0);
        san_vstore(psum + t.nh * HW + pix0, weighted, m0);
        sasa_zero_outside(dl_ptr, win, K, W, m0);
        sasa_gather_head<true, SASA_DLOGIT>(dl_ptr, p_ptr, k + chan0 + j0,
                                            relT + (int64_t)t.h * KK * d, grad_q + chan0 + pix0,
                                            HW, win, i, j0, K, d, r, dil, W, hi0, m0, weighted);
    }
}

// Gradients of k and v for G channels of one head, gathered over the pixels (s, u) that see the
// tile's pixels (i, j) as their neighbour (a, b), (s, u) = (i - (a - r) * dil, j - (b - r) * dil):
// grad_k[c, i, j] = sum dlogit[s, ab, u] * q[c, s, u],
// grad_v[c, i, j] = sum p[s, ab, u] * grad_out[c, s, u].
// p and dl point at the head's (H, K*K, W) buffers, q, g, gk, gv at channel c0, pixel 0; `win`
// is the window of the sources (sign -1).
template <int G>
__device__ __forceinline__ void sasa_gather_kv(const acc_t* __restrict__ p,
                                               const acc_t* __restrict__ dl,
                                               const scalar_t* __restrict__ q,
                                               const scalar_t* __restrict__ g,
                                               scalar_t* __restrict__ gk,
                                               scalar_t* __restrict__ gv, int64_t HW,
                                               const sasa_window& win, int i, int j0, int K,
                                               int r, int dil, int W, int hi0, san_mask m0) {
    san_vec sk[G], sv[G];
    SAN_UNROLL for (int c = 0; c < G; ++c) sk[c] = sv[c] = san_vbcast((acc_t)0);
    const int64_t tap_step = (int64_t)(K - dil * K * K) * W;  // tap (a, b) -> (a + 1, b)
    for (int b = win.b_lo; b < win.b_hi; ++b) {
        const int off = -(b - r) * dil;
        const san_mask m = sasa_column_mask(j0, b, -1, W, hi0, r, dil);
        // Source row of window row a: si = i - (a - r) * dil, falling by dil per row.
        const int si0 = i - (win.a_lo - r) * dil;
        int64_t src = (int64_t)si0 * W + j0 + off;
        int64_t tap = ((int64_t)si0 * K * K + win.a_lo * K + b) * W + j0 + off;
        for (int a = win.a_lo; a < win.a_hi; ++a, src -= (int64_t)dil * W, tap += tap_step) {
            const san_vec dlv = san_vload(dl + tap, m);
            const san_vec pv = san_vload(p + tap, m);
            SAN_UNROLL for (int c = 0; c < G; ++c) {
                sk[c] = sk[c] + dlv * san_vload(q + c * HW + src, m);
                sv[c] = sv[c] + pv * san_vload(g + c * HW + src, m);
            }
        }
    }
    const int64_t pix0 = (int64_t)i * W + j0;
    SAN_UNROLL for (int c = 0; c < G; ++c) {
        san_vstore(gk + c * HW + pix0, sk[c], m0);
        san_vstore(gv + c * HW + pix0, sv[c], m0);
    }
}

// sasa_gather_kv for a head of exactly G channels (all of them in one thread), recomputing the
// logit gradient of each source instead of reading it: dlogit[s, ab, u] = p[s, ab, u] *
// (gv - psum[s, u]), gv = sum_{c in head} grad_out[c, s, u] * v[c, i, j] (the tile's values are
// the sources' neighbours ab), with the grad_out loads grad_v needs anyway. The (H, K*K, W)
// logit-gradient buffer is then read by the rel gradient only. p and ps (psum) point at the
// head's buffers, v, q, g, gk, gv at its channel 0, pixel 0.
template <int G>
__device__ __forceinline__ void sasa_gather_kv_recompute(const acc_t* __restrict__ p,
                                                         const acc_t* __restrict__ ps,
                                                         const scalar_t* __restrict__ v,
                                                         const scalar_t* __restrict__ q,
                                                         const scalar_t* __restrict__ g,
                                                         scalar_t* __restrict__ gk,
                                                         scalar_t* __restrict__ gv, int64_t HW,
                                                         const sasa_window& win, int i, int j0,
                                                         int K, int r, int dil, int W, int hi0,
                                                         san_mask m0) {
    const int64_t pix0 = (int64_t)i * W + j0;
    san_vec sk[G], sv[G], vt[G];
    SAN_UNROLL for (int c = 0; c < G; ++c) {
        sk[c] = sv[c] = san_vbcast((acc_t)0);
        vt[c] = san_vload(v + c * HW + pix0, m0);
    }
    for (int a = win.a_lo; a < win.a_hi; ++a) {
        const int si = i - (a - r) * dil;  // the source row of window row a
        for (int b = win.b_lo; b < win.b_hi; ++b) {
            const int off = -(b - r) * dil;
            const san_mask m = sasa_column_mask(j0, b, -1, W, hi0, r, dil);
            const int64_t src = (int64_t)si * W + j0 + off;
            const int64_t tap = ((int64_t)si * K * K + a * K + b) * W + j0 + off;
            const san_vec pv = san_vload(p + tap, m);
            san_vec dots = san_vbcast((acc_t)0);
            SAN_UNROLL for (int c = 0; c < G; ++c) {
                const san_vec gc = san_vload(g + c * HW + src, m);
                dots = dots + gc * vt[c];
                sv[c] = sv[c] + pv * gc;
            }
            const san_vec dlv = pv * (dots - san_vload(ps + src, m));
            SAN_UNROLL for (int c = 0; c < G; ++c) {
                sk[c] = sk[c] + dlv * san_vload(q + c * HW + src, m);
            }
        }
    }
    SAN_UNROLL for (int c = 0; c < G; ++c) {
        san_vstore(gk + c * HW + pix0, sk[c], m0);
        san_vstore(gv + c * HW + pix0, sv[c], m0);
    }
}

// Gradients of k and v; one thread per (n, head, channel group of SAN_CG, i, row tile), no
// atomics (see sasa_gather_kv). A head of exactly SAN_CG channels recomputes the logit gradients
// from p, grad_out, v and psum (sasa_gather_kv_recompute); wider heads read dlogit.
__global__ void sasa_kv_backward(const scalar_t* __restrict__ q,
                                 const scalar_t* __restrict__ v,
                                 const scalar_t* __restrict__ grad_out,
                                 const acc_t* __restrict__ attn,
                                 const acc_t* __restrict__ dlogit,
                                 const acc_t* __restrict__ psum, scalar_t* __restrict__ grad_k,
                                 scalar_t* __restrict__ grad_v, int N, int C, int H, int W,
                                 int heads, int K, int dil) {
    SASA_SIZES;
    const int G = (d + SAN_CG - 1) / SAN_CG;
    SAN_GRID_LOOP(idx, (int64_t)N * heads * G * H * WT) {
        const int64_t rowid = san_div(idx, WT);  // ((n * heads + h) * G + grp) * H + i
        const int j0 = (int)(idx - rowid * WT) * SAN_TJ;
        const int64_t nhg = san_div(rowid, H);
        const int i = (int)(rowid - nhg * H);
        const int64_t nh = san_div(nhg, G);
        const int grp = (int)(nhg - nh * G);
        const int64_t n = san_div(nh, heads);
        const int h = (int)(nh - n * heads);
        const int hi0 = san_tile_lanes(W, j0);
        const san_mask m0 = san_lanes(0, hi0);
        const int c0 = h * d + grp * SAN_CG;  // first channel of the group
        const int cg = san_group_channels(d, grp);
        const int64_t chan0 = (n * C + c0) * HW;
        const acc_t* p = attn + nh * H * KK * W;
        const acc_t* dl = dlogit + nh * H * KK * W;
        const sasa_window win = sasa_window_of(i, j0, hi0, -1, H, W, K, r, dil);
        if (d == SAN_CG) {
            sasa_gather_kv_recompute<SAN_CG>(p, psum + nh * HW, v + chan0, q + chan0,
                                             grad_out + chan0, grad_k + chan0, grad_v + chan0,
                                             HW, win, i, j0, K, r, dil, W, hi0, m0);
        } else if (cg == SAN_CG) {
            sasa_gather_kv<SAN_CG>(p, dl, q + chan0, grad_out + chan0, grad_k + chan0,
                                   grad_v + chan0, HW, win, i, j0, K, r, dil, W, hi0, m0);
        } else {
            for (int c = 0; c < cg; ++c) {
                const int64_t o = chan0 + c * HW;
                sasa_gather_kv<1>(p, dl, q + o, grad_out + o, grad_k + o, grad_v + o, HW, win, i,
                                  j0, K, r, dil, W, hi0, m0);
            }
        }
    }
}

// Gradient of rel, per image: grad_rel[n, c, ab] = sum_{i, j} dlogit[n, h(c), i, ab, j] * q[n, c, i, j]
// (the caller sums over n); one thread per (n, head, channel group of SAN_CG, chunk of SAN_UT
// taps): the taps' rows of dlogit are neighbours in memory and each q read serves all of them.
#ifndef SASA_REL_PREFETCH
#define SASA_REL_PREFETCH 2
#endif
template <int G, int T>
__device__ __forceinline__ void sasa_rel_sums(const acc_t* __restrict__ dl,
                                              const scalar_t* __restrict__ q,
                                              acc_t* __restrict__ dst, int64_t HW, int H, int W,
                                              int KK) {
    san_vec s[T][G];
    SAN_UNROLL for (int u = 0; u < T; ++u) {
        SAN_UNROLL for (int c = 0; c < G; ++c) s[u][c] = san_vbcast((acc_t)0);
    }
    for (int i = 0; i < H; ++i) {
        const acc_t* dl_row = dl + (int64_t)i * KK * W;
        const scalar_t* q_row = q + (int64_t)i * W;
        // The taps' rows a few image rows on (KK * W apart: too far for the hardware's
        // prefetchers), so their loads do not wait for memory.
        for (int o = 0; o < T * W; o += 64 / (int)sizeof(acc_t)) {
            san_prefetch(dl_row + SASA_REL_PREFETCH * KK * W + o);
        }
        for (int j0 = 0; j0 < W; j0 += SAN_TJ) {
            const san_mask m = san_lanes(0, W - j0);
            san_vec dlv[T];
            SAN_UNROLL for (int u = 0; u < T; ++u) dlv[u] = san_vload(dl_row + u * W + j0, m);
            SAN_UNROLL for (int c = 0; c < G; ++c) {
                const san_vec qv = san_vload(q_row + c * HW + j0, m);
                SAN_UNROLL for (int u = 0; u < T; ++u) s[u][c] = s[u][c] + dlv[u] * qv;
            }
        }
    }
    SAN_UNROLL for (int u = 0; u < T; ++u) {
        SAN_UNROLL for (int c = 0; c < G; ++c) dst[(int64_t)c * KK + u] = san_vsum(s[u][c]);
    }
}

template <int T>
__device__ __forceinline__ void sasa_rel_group(const acc_t* dl, const scalar_t* q, acc_t* dst,
                                               int cg, int64_t HW, int H, int W, int KK) {
    if (cg == SAN_CG) {
        sasa_rel_sums<SAN_CG, T>(dl, q, dst, HW, H, W, KK);
    } else {
        for (int c = 0; c < cg; ++c) sasa_rel_sums<1, T>(dl, q + c * HW, dst + c * KK, HW, H, W, KK);
    }
}

// sasa_rel_group for `taps` (1 <= taps <= T) taps: the instance with exactly that many sums.
template <int T>
__device__ __forceinline__ void sasa_rel_upto(int taps, const acc_t* dl, const scalar_t* q,
                                              acc_t* dst, int cg, int64_t HW, int H, int W,
                                              int KK) {
    if constexpr (T > 1) {
        if (taps < T) {
            sasa_rel_upto<T - 1>(taps, dl, q, dst, cg, HW, H, W, KK);
            return;
        }
    }
    sasa_rel_group<T>(dl, q, dst, cg, HW, H, W, KK);
}

__global__ void sasa_rel_backward(const scalar_t* __restrict__ q,
                                  const acc_t* __restrict__ dlogit, acc_t* __restrict__ grad_rel,
                                  int N, int C, int H, int W, int heads, int K, int dil) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int KK = K * K;
    const int G = (d + SAN_CG - 1) / SAN_CG;
    const int chunks = (KK + SAN_UT - 1) / SAN_UT;
    SAN_GRID_LOOP(idx, (int64_t)N * heads * G * chunks) {
        const int64_t nhg = san_div(idx, chunks);  // (n * heads + h) * G + grp
        const int ab = SAN_UT * (int)(idx - nhg * chunks);
        const int64_t nh = san_div(nhg, G);
        const int grp = (int)(nhg - nh * G);
        const int64_t n = san_div(nh, heads);
        const int h = (int)(nh - n * heads);
        const int c0 = h * d + grp * SAN_CG;
        const int cg = san_group_channels(d, grp);
        const acc_t* dl = dlogit + nh * H * KK * W + (int64_t)ab * W;
        const scalar_t* qc = q + (n * C + c0) * HW;
        acc_t* dst = grad_rel + (n * C + c0) * KK + ab;
        const int taps = KK - ab < SAN_UT ? KK - ab : SAN_UT;
        sasa_rel_upto<SAN_UT>(taps, dl, qc, dst, cg, HW, H, W, KK);
    }
}
