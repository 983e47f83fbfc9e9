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
// others take the whole head and loop over its channel groups. The forward and the logit
// backward take SAN_UR tiles of one column, rows i, i + dil, ..., per thread: their windows
// overlap in all but SAN_UR - 1 neighbour rows, and a neighbour loaded once serves every row that
// sees it (sasa_rows_window).

#ifndef SAN_UT
#define SAN_UT 4
#endif
#ifndef SAN_UR
#define SAN_UR 1
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

// The window of a thread's rows. A thread works on the R rows i + t * dil (t < R) of a tile;
// row t's neighbour (a, b) lies in image row i + (a + t - r) * dil, so the rows share the
// neighbour rows e = a + t in [0, K + R - 1): a neighbour row loaded once serves up to R taps.
// cols: the columns [b_lo, b_hi) of the window (the same for every row; its a range is row 0's);
// [e_lo, e_hi): the neighbour rows in the image; [a_lo[t], a_hi[t]): the window rows of row t,
// the taps a with a + t in [e_lo, e_hi).
struct sasa_rows_window {
    sasa_window cols;
    int e_lo, e_hi;
    int a_lo[SAN_UR], a_hi[SAN_UR];
};

template <int R>
__device__ __forceinline__ sasa_rows_window sasa_rows_window_of(int i, int j0, int hi0, int H,
                                                                int W, int K, int r, int dil) {
    sasa_rows_window rw;
    rw.cols = sasa_window_of(i, j0, hi0, 1, H, W, K, r, dil);
    sasa_window_range(i, 1, H, K + R - 1, r, dil, rw.e_lo, rw.e_hi);
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        rw.a_lo[t] = rw.e_lo - t > 0 ? rw.e_lo - t : 0;
        rw.a_hi[t] = rw.e_hi - t < K ? rw.e_hi - t : K;
    }
    return rw;
}

// Row t's window as a sasa_window.
__device__ __forceinline__ sasa_window sasa_row_window(const sasa_rows_window& rw, int t) {
    sasa_window win = rw.cols;
    win.a_lo = rw.a_lo[t];
    win.a_hi = rw.a_hi[t];
    return win;
}

// For the R rows of a tile and the U taps (a0 + u, b) of one window column:
// dst_t[u] = sum_{c < d} x_{t,c} * (y_c(a0 + u + t) + rel_c(a0 + u)), x_{t,c} the tile's row t in
// channel c, y_c(e) its neighbour row e (see sasa_rows_window) at column b, rel_c(a) =
// rel[c, a, b] (REL) or 0. x points at row 0 of the tile in channel 0, y at neighbour row a0 in
// channel 0 (in-image lanes `m`), relT at relT[h, a0 * K + b, 0]; channels are HW apart in x and
// y, rows (t, and e) rowstep apart; dst at tap a0 * K + b of row 0 (taps (a, b) and (a + 1, b)
// rowtaps apart, rows bufstep apart). Only the taps of each row's window are stored, lanes
// outside `m` as `fill`. MASKED: only the neighbour rows a0 + e in [rw.e_lo, rw.e_hi) are read
// (the others are outside the image and count as 0); otherwise all are in the image.
// EXTRA: red[t] takes the maximum of row t's stored values (SASA_MAX) or adds p * value, p read
// at the same tap offsets from `p` (SASA_PSUM).
template <int R, int U, bool REL, int EXTRA, bool MASKED>
__device__ __forceinline__ void sasa_col_dots(const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ y,
                                              const scalar_t* __restrict__ relT,
                                              acc_t* __restrict__ dst,
                                              const acc_t* __restrict__ p, int64_t HW,
                                              int64_t rowstep, int64_t rowtaps, int64_t bufstep,
                                              int K, int d, int a0, const sasa_rows_window& rw,
                                              san_mask m, san_mask m0, acc_t fill, san_vec* red) {
    constexpr int E = U + R - 1;  // neighbour rows of the chunk
    san_vec s[R][U];
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        SAN_UNROLL for (int u = 0; u < U; ++u) s[t][u] = san_vbcast((acc_t)0);
    }
    san_mask me[E];
    SAN_UNROLL for (int e = 0; e < E; ++e) {
        me[e] = !MASKED || (a0 + e >= rw.e_lo && a0 + e < rw.e_hi) ? m : san_lanes(0, 0);
    }
    const int64_t relstep = (int64_t)K * d;  // relT rows of taps (a, b) and (a + 1, b)
    for (int c = 0; c < d; ++c) {
        san_vec xc[R];
        SAN_UNROLL for (int t = 0; t < R; ++t) xc[t] = san_vload(x + c * HW + t * rowstep, m0);
        const scalar_t* yc = y + c * HW;
        SAN_UNROLL for (int e = 0; e < E; ++e) {
            san_vec yv = san_vload(yc + e * rowstep, MASKED ? me[e] : m);
            // One row: the embedding added to the neighbour (one add per tap, as many operations
            // as a second multiply-add and one register fewer).
            if (R == 1 && REL) yv = yv + san_vbcast(TO_ACC(relT[e * relstep + c]));
            SAN_UNROLL for (int t = 0; t < R; ++t) {
                if (e - t >= 0 && e - t < U) s[t][e - t] = s[t][e - t] + xc[t] * yv;
            }
        }
        if (R > 1 && REL) {
            SAN_UNROLL for (int u = 0; u < U; ++u) {
                const san_vec rv = san_vbcast(TO_ACC(relT[u * relstep + c]));
                SAN_UNROLL for (int t = 0; t < R; ++t) s[t][u] = s[t][u] + xc[t] * rv;
            }
        }
    }
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        SAN_UNROLL for (int u = 0; u < U; ++u) {
            // Not in row t's window (one row: the chunks are inside it).
            if (R > 1 && (a0 + u < rw.a_lo[t] || a0 + u >= rw.a_hi[t])) continue;
            const san_vec value = san_vselect(s[t][u], m, fill);
            san_vstore(dst + t * bufstep + u * rowtaps, value, m0);
            if (EXTRA == SASA_MAX) red[t] = san_vmax(red[t], value);
            if (EXTRA == SASA_PSUM) {
                red[t] = red[t] + san_vload(p + t * bufstep + u * rowtaps, m0) * value;
            }
        }
    }
}

// sasa_col_dots for `taps` (1 <= taps <= U) taps: the instance with exactly that many sums.
template <int R, int U, bool REL, int EXTRA, bool MASKED>
__device__ __forceinline__ void sasa_col_dots_upto(int taps, const scalar_t* x, const scalar_t* y,
                                                   const scalar_t* relT, acc_t* dst,
                                                   const acc_t* p, int64_t HW, int64_t rowstep,
                                                   int64_t rowtaps, int64_t bufstep, int K, int d,
                                                   int a0, const sasa_rows_window& rw,
                                                   san_mask m, san_mask m0, acc_t fill,
                                                   san_vec* red) {
    if constexpr (U > 1) {
        if (taps < U) {
            sasa_col_dots_upto<R, U - 1, REL, EXTRA, MASKED>(taps, x, y, relT, dst, p, HW,
                                                             rowstep, rowtaps, bufstep, K, d, a0,
                                                             rw, m, m0, fill, red);
            return;
        }
    }
    sasa_col_dots<R, U, REL, EXTRA, MASKED>(x, y, relT, dst, p, HW, rowstep, rowtaps, bufstep, K,
                                            d, a0, rw, m, m0, fill, red);
}

// dst_t[ab] = sum_{c < d} x_{t,c} * (y_c(neighbour ab of row t) + rel[c, ab]) for the taps of
// each row's window (fill where the neighbour is outside the image; other taps are not
// written). x at row 0 of the tile in channel 0, y at channel 0, image row 0, column j0; dst
// (and p) at tap 0 of row 0 (taps W apart, rows dil * K * K * W apart); m0: the tile's lanes.
// red[t]: row t's EXTRA reduction (see sasa_col_dots), started by the caller.
template <int R, bool REL, int EXTRA>
__device__ __forceinline__ void sasa_window_dots(const scalar_t* x, const scalar_t* y,
                                                 const scalar_t* relT, acc_t* dst,
                                                 const acc_t* p, int64_t HW,
                                                 const sasa_rows_window& rw, int i, int j0, int K,
                                                 int d, int r, int dil, int W, int hi0,
                                                 san_mask m0, acc_t fill, san_vec* red) {
    const int64_t rowstep = (int64_t)dil * W;
    const int64_t rowtaps = (int64_t)K * W;
    const int64_t bufstep = (int64_t)dil * K * K * W;
    // The union of the rows' windows (a_lo and a_hi fall with t).
    const int u_lo = rw.a_lo[R - 1], u_hi = rw.a_hi[0];
    for (int b = rw.cols.b_lo; b < rw.cols.b_hi; ++b) {
        const int off = (b - r) * dil;
        const san_mask m = sasa_column_mask(j0, b, 1, W, hi0, r, dil);
        for (int a = u_lo; a < u_hi; a += SAN_UT) {
            const int ab = a * K + b;
            const int taps = u_hi - a < SAN_UT ? u_hi - a : SAN_UT;
            const scalar_t* ya = y + (int64_t)(i + (a - r) * dil) * W + off;
            // (One row: its window's neighbour rows are all in the image.)
            if (R == 1 || (a >= rw.e_lo && a + taps + R - 1 <= rw.e_hi)) {
                sasa_col_dots_upto<R, SAN_UT, REL, EXTRA, false>(
                    taps, x, ya, relT + (int64_t)ab * d, dst + ab * W, p + ab * W, HW, rowstep,
                    rowtaps, bufstep, K, d, a, rw, m, m0, fill, red);
            } else {
                sasa_col_dots_upto<R, SAN_UT, REL, EXTRA, true>(
                    taps, x, ya, relT + (int64_t)ab * d, dst + ab * W, p + ab * W, HW, rowstep,
                    rowtaps, bufstep, K, d, a, rw, m, m0, fill, red);
            }
        }
    }
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

// For the R rows t of a tile and G channels g: dst_{t,g} = sum_{a, b} w_t[ab] *
// (y_g(neighbour ab of row t) + rel[c0 + g, ab]) over the in-image neighbours; w (and p) at tap
// 0 of row 0 in an acc_t buffer (taps W apart, rows dil * K * K * W apart), holding 0 at the taps
// outside each row's window; y at channel c0, image row 0, column j0; relT at
// relT[h, 0, c0 - h * d] (REL); dst at row 0 of the tile in channel c0. A neighbour row e is
// loaded once for all rows t that use it (tap a = e - t). FINISH (not SASA_AS_IS): w_t[ab] is
// first replaced by its finished value (see above, with sos[t] as scale or shift), which is what
// the sum uses. With several rows the embedding term is a second pass over the finished weights,
// where one broadcast of rel[c, ab] serves every row; with one it is added to the neighbour.
template <int R, int G, bool REL, int FINISH>
__device__ __forceinline__ void sasa_gather_taps(acc_t* __restrict__ w,
                                                 const acc_t* __restrict__ p,
                                                 const scalar_t* __restrict__ y,
                                                 const scalar_t* __restrict__ relT,
                                                 scalar_t* __restrict__ dst, int64_t HW,
                                                 const sasa_rows_window& rw, int i, int j0, int K,
                                                 int d, int r, int dil, int W, int hi0,
                                                 san_mask m0, const san_vec* sos) {
    const int64_t rowstep = (int64_t)dil * W;
    const int64_t bufstep = (int64_t)dil * K * K * W;
    san_vec s[R][G];
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        SAN_UNROLL for (int g = 0; g < G; ++g) s[t][g] = san_vbcast((acc_t)0);
    }
    for (int b = rw.cols.b_lo; b < rw.cols.b_hi; ++b) {
        const int off = (b - r) * dil;
        const san_mask m = sasa_column_mask(j0, b, 1, W, hi0, r, dil);
        const scalar_t* yp = y + (int64_t)(i + (rw.e_lo - r) * dil) * W + off;
        for (int e = rw.e_lo; e < rw.e_hi; ++e, yp += rowstep) {
            san_vec wv[R];
            SAN_UNROLL for (int t = 0; t < R; ++t) {
                const int a = e - t;  // row t's tap (in its window, since row e is in the image)
                if (R > 1 && (a < 0 || a >= K)) {
                    wv[t] = san_vbcast((acc_t)0);
                    continue;
                }
                acc_t* wt = w + t * bufstep + (a * K + b) * W;
                if (FINISH == SASA_AS_IS) {
                    wv[t] = san_vload(wt, m);
                } else {
                    // Lanes outside m hold 0 in w (and p): they stay 0.
                    wv[t] = san_vload(wt, m0);
                    if (FINISH == SASA_SCALE) wv[t] = wv[t] * sos[t];
                    if (FINISH == SASA_DLOGIT) {
                        wv[t] = san_vload(p + t * bufstep + (a * K + b) * W, m0) * (wv[t] - sos[t]);
                    }
                    san_vstore(wt, wv[t], m0);
                }
            }
            SAN_UNROLL for (int g = 0; g < G; ++g) {
                san_vec yv = san_vload(yp + g * HW, m);
                if (R == 1 && REL) yv = yv + san_vbcast(TO_ACC(relT[(int64_t)(e * K + b) * d + g]));
                SAN_UNROLL for (int t = 0; t < R; ++t) s[t][g] = s[t][g] + wv[t] * yv;
            }
        }
    }
    if (R > 1 && REL) {
        // sum_ab w_t[ab] rel[c, ab] over the union of the rows' windows (w is 0 outside each).
        for (int a = rw.a_lo[R - 1]; a < rw.a_hi[0]; ++a) {
            for (int b = rw.cols.b_lo; b < rw.cols.b_hi; ++b) {
                const int ab = a * K + b;
                san_vec wv[R];
                SAN_UNROLL for (int t = 0; t < R; ++t) {
                    wv[t] = san_vload(w + t * bufstep + ab * W, m0);
                }
                SAN_UNROLL for (int g = 0; g < G; ++g) {
                    const san_vec rv = san_vbcast(TO_ACC(relT[(int64_t)ab * d + g]));
                    SAN_UNROLL for (int t = 0; t < R; ++t) s[t][g] = s[t][g] + wv[t] * rv;
                }
            }
        }
    }
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        SAN_UNROLL for (int g = 0; g < G; ++g) san_vstore(dst + t * rowstep + g * HW, s[t][g], m0);
    }
}

// sasa_gather_taps over all d channels of a head: groups of SAN_CG channels, then one at a time;
// the first group finishes w (FINISH), the others read the finished weights.
template <int R, bool REL, int FINISH>
__device__ __forceinline__ void sasa_gather_head(acc_t* w, const acc_t* p, const scalar_t* y,
                                                 const scalar_t* relT, scalar_t* dst,
                                                 int64_t HW, const sasa_rows_window& rw, int i,
                                                 int j0, int K, int d, int r, int dil, int W,
                                                 int hi0, san_mask m0, const san_vec* sos) {
    int c = 0;
    if (d >= SAN_CG) {
        sasa_gather_taps<R, SAN_CG, REL, FINISH>(w, p, y, relT, dst, HW, rw, i, j0, K, d, r, dil,
                                                 W, hi0, m0, sos);
        c = SAN_CG;
    } else {
        sasa_gather_taps<R, 1, REL, FINISH>(w, p, y, relT, dst, HW, rw, i, j0, K, d, r, dil, W,
                                            hi0, m0, sos);
        c = 1;
    }
    for (; c + SAN_CG <= d; c += SAN_CG) {
        sasa_gather_taps<R, SAN_CG, REL, SASA_AS_IS>(w, p, y + c * HW, relT + c, dst + c * HW, HW,
                                                     rw, i, j0, K, d, r, dil, W, hi0, m0, sos);
    }
    for (; c < d; ++c) {
        sasa_gather_taps<R, 1, REL, SASA_AS_IS>(w, p, y + c * HW, relT + c, dst + c * HW, HW, rw,
                                                i, j0, K, d, r, dil, W, hi0, m0, sos);
    }
}

// Row groups of a kernel over (n, head, row group, row tile): the rows i0 + t * dil (t < SAN_UR)
// of group g, i0 = (g / dil) * SAN_UR * dil + g % dil, are its rows inside the image (all SAN_UR
// but at the image's bottom, where a group may have fewer or none); groups = dil *
// ceil(H / (SAN_UR * dil)), H with one row per group (ops/kernels.py sizes the grids alike).
__device__ __forceinline__ int sasa_row_groups(int H, int dil) {
    return SAN_UR == 1 ? H : dil * ((H + SAN_UR * dil - 1) / (SAN_UR * dil));
}

// The tile of thread `idx` over (n, head, row group, row tile): its batch-head index
// nh = n * heads + h, head h, first row i, rows inside the image and first column j0.
struct sasa_tile {
    int64_t n, nh;
    int h, i, rows, j0;
};

__device__ __forceinline__ sasa_tile sasa_tile_of(int64_t idx, int WT, int H, int heads,
                                                  int dil) {
    const int groups = sasa_row_groups(H, dil);
    sasa_tile t;
    const int64_t nhg = san_div(idx, WT);  // (n * heads + h) * groups + g
    t.j0 = (int)(idx - nhg * WT) * SAN_TJ;
    t.nh = san_div(nhg, groups);
    const int g = (int)(nhg - t.nh * groups);
    t.n = san_div(t.nh, heads);
    t.h = (int)(t.nh - t.n * heads);
    if (SAN_UR == 1) {
        t.i = g;
        t.rows = 1;
    } else {
        t.i = (g / dil) * SAN_UR * dil + g % dil;
        const int left = t.i < H ? (H - t.i + dil - 1) / dil : 0;
        t.rows = left < SAN_UR ? left : SAN_UR;
    }
    return t;
}

// The forward for the R rows i + t * dil of the tile at column j0 (see sasa_forward); q, k, v,
// out and attn at channel 0 of the head (attn: row 0, tap 0, column 0), relT at the head's.
template <int R>
__device__ __forceinline__ void sasa_forward_rows(const scalar_t* q, const scalar_t* k,
                                                  const scalar_t* v, const scalar_t* relT,
                                                  acc_t* attn, scalar_t* out, int64_t HW, int i,
                                                  int j0, int H, int W, int K, int d, int r,
                                                  int dil, acc_t lowest) {
    const int KK = K * K;
    const int hi0 = san_tile_lanes(W, j0);
    const san_mask m0 = san_lanes(0, hi0);
    const int64_t pix0 = (int64_t)i * W + j0;
    const int64_t bufstep = (int64_t)dil * KK * W;
    acc_t* a_ptr = attn + (int64_t)i * KK * W + j0;
    const sasa_rows_window rw = sasa_rows_window_of<R>(i, j0, hi0, H, W, K, r, dil);

    // Logits (masked lanes hold `lowest`) and each row's maximum; 0 outside the rows' windows.
    san_vec vmax[R];
    SAN_UNROLL for (int t = 0; t < R; ++t) vmax[t] = san_vbcast(lowest);
    sasa_window_dots<R, true, SASA_MAX>(q + pix0, k + j0, relT, a_ptr, a_ptr, HW, rw, i, j0, K, d,
                                        r, dil, W, hi0, m0, lowest, vmax);
    // exp and sum per row (out-of-image neighbours get probability 0); the gather normalises.
    san_vec inv[R];
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        const sasa_window win = sasa_row_window(rw, t);
        acc_t* at = a_ptr + t * bufstep;
        sasa_zero_outside(at, win, K, W, m0);
        san_vec total = san_vbcast((acc_t)0);
        for (int b = win.b_lo; b < win.b_hi; ++b) {
            const san_mask m = sasa_column_mask(j0, b, 1, W, hi0, r, dil);
            for (int a = win.a_lo; a < win.a_hi; ++a) {
                acc_t* pa = at + (a * K + b) * W;
                const san_vec e = san_vselect(san_vexp(san_vload(pa, m0) - vmax[t]), m, (acc_t)0);
                total = total + e;
                san_vstore(pa, e, m0);
            }
        }
        inv[t] = (acc_t)1 / san_vselect(total, m0, (acc_t)1);
    }
    sasa_gather_head<R, false, SASA_SCALE>(a_ptr, a_ptr, v + j0, relT, out + pix0, HW, rw, i, j0,
                                           K, d, r, dil, W, hi0, m0, inv);
}

// Forward. One thread per (n, head, row group, row tile) (see sasa_tile_of): the K*K logits
// sum_{c in head} q[c, i, j] * (k[c, i', j'] + rel[c, a, b]) go to attn and become the softmax
// over the in-image neighbours there (max, exp and sum, normalise); then
// out[c, i, j] = sum_{a, b} attn[i, a, b, j] * v[c, i', j'] for every channel of the head. A
// group with fewer than SAN_UR rows (at the image's bottom) does its rows one at a time.
// Bounded to 2 blocks per SM: unbounded, the double build takes 168 registers (sm_80) since the
// logits' running maximum is kept in registers.
__global__ void __launch_bounds__(SAN_BLOCK_THREADS, 2)
    sasa_forward(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                 const scalar_t* __restrict__ v, const scalar_t* __restrict__ relT,
                 acc_t* __restrict__ attn, scalar_t* __restrict__ out, int N, int C, int H, int W,
                 int heads, int K, int dil) {
    SASA_SIZES;
    const acc_t lowest = san_lowest();
    SAN_GRID_LOOP(idx, (int64_t)N * heads * sasa_row_groups(H, dil) * WT) {
        const sasa_tile t = sasa_tile_of(idx, WT, H, heads, dil);
        const int64_t chan0 = (t.n * C + (int64_t)t.h * d) * HW;
        const scalar_t* relT_h = relT + (int64_t)t.h * KK * d;
        acc_t* a_h = attn + t.nh * H * KK * W;
        if (SAN_UR == 1 || t.rows == SAN_UR) {  // (one call site where SAN_UR is 1)
            sasa_forward_rows<SAN_UR>(q + chan0, k + chan0, v + chan0, relT_h, a_h, out + chan0,
                                      HW, t.i, t.j0, H, W, K, d, r, dil, lowest);
        } else {
            for (int s = 0; s < t.rows; ++s) {
                sasa_forward_rows<1>(q + chan0, k + chan0, v + chan0, relT_h, a_h, out + chan0,
                                     HW, t.i + s * dil, t.j0, H, W, K, d, r, dil, lowest);
            }
        }
    }
}

// The logit and q gradients for the R rows i + t * dil of the tile at column j0 (see
// sasa_logit_q_backward); grad_out, k, v, grad_q at channel 0 of the head, attn, dlogit at its
// row 0, tap 0, column 0, psum at its pixel 0, relT at the head's.
template <int R>
__device__ __forceinline__ void sasa_logit_q_rows(const scalar_t* grad_out, const scalar_t* k,
                                                  const scalar_t* v, const scalar_t* relT,
                                                  const acc_t* attn, acc_t* dlogit, acc_t* psum,
                                                  scalar_t* grad_q, int64_t HW, int i, int j0,
                                                  int H, int W, int K, int d, int r, int dil) {
    const int KK = K * K;
    const int hi0 = san_tile_lanes(W, j0);
    const san_mask m0 = san_lanes(0, hi0);
    const int64_t pix0 = (int64_t)i * W + j0;
    const int64_t bufstep = (int64_t)dil * KK * W;
    const acc_t* p_ptr = attn + (int64_t)i * KK * W + j0;
    acc_t* dl_ptr = dlogit + (int64_t)i * KK * W + j0;
    const sasa_rows_window rw = sasa_rows_window_of<R>(i, j0, hi0, H, W, K, r, dil);

    // gv into dlogit (0 where the neighbour is outside: p is 0 there too) and
    // weighted = sum_ab p[ab] gv[ab] per row; the gather turns gv into dlogit = p (gv - weighted).
    san_vec weighted[R];
    SAN_UNROLL for (int t = 0; t < R; ++t) weighted[t] = san_vbcast((acc_t)0);
    sasa_window_dots<R, false, SASA_PSUM>(grad_out + pix0, v + j0, relT, dl_ptr, p_ptr, HW, rw, i,
                                          j0, K, d, r, dil, W, hi0, m0, (acc_t)0, weighted);
    SAN_UNROLL for (int t = 0; t < R; ++t) {
        san_vstore(psum + pix0 + t * dil * W, weighted[t], m0);
        sasa_zero_outside(dl_ptr + t * bufstep, sasa_row_window(rw, t), K, W, m0);
    }
    sasa_gather_head<R, true, SASA_DLOGIT>(dl_ptr, p_ptr, k + j0, relT, grad_q + pix0, HW, rw, i,
                                           j0, K, d, r, dil, W, hi0, m0, weighted);
}

// Gradient of the logits and of q. One thread per (n, head, row group, row tile):
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
    SAN_GRID_LOOP(idx, (int64_t)N * heads * sasa_row_groups(H, dil) * WT) {
        const sasa_tile t = sasa_tile_of(idx, WT, H, heads, dil);
        const int64_t chan0 = (t.n * C + (int64_t)t.h * d) * HW;
        const scalar_t* relT_h = relT + (int64_t)t.h * KK * d;
        const int64_t buf = t.nh * H * KK * W;
        if (SAN_UR == 1 || t.rows == SAN_UR) {  // (one call site where SAN_UR is 1)
            sasa_logit_q_rows<SAN_UR>(grad_out + chan0, k + chan0, v + chan0, relT_h, attn + buf,
                                      dlogit + buf, psum + t.nh * HW, grad_q + chan0, HW, t.i,
                                      t.j0, H, W, K, d, r, dil);
        } else {
            for (int s = 0; s < t.rows; ++s) {
                sasa_logit_q_rows<1>(grad_out + chan0, k + chan0, v + chan0, relT_h, attn + buf,
                                     dlogit + buf, psum + t.nh * HW, grad_q + chan0, HW,
                                     t.i + s * dil, t.j0, H, W, K, d, r, dil);
            }
        }
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
