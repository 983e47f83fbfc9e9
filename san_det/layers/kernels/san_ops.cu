// SAN's subtraction, subtraction2 and aggregation: forward and backward kernels.
//
// Compiled per dtype by san_det/layers/kernel_runtime.py: with CuPy/NVRTC for the GPU and with g++
// for the CPU (see cpu_prelude.h), so every kernel is a grid-stride loop, no shared memory and no
// atomics. Backward passes are gathers: each thread sums every output that read its input pixel.
//
// Geometry (both axes alike): output row i, tap a reads input row i * stride - pad + a * dil; the
// centre tap is a = k / 2; rows outside the image read zero. (Reflection padding is done by the
// caller: it pads the input with its mirror image, runs these kernels with pad 0 and folds the
// gradient of the padded input back.) Tensors are contiguous: x (N, C, H, W),
// taps (N, C, k*k, Ho*Wo), w (N, Cw, k*k, Ho*Wo).
//
// A thread works on a tile of SAN_TJ consecutive pixels of one row (an output row for the
// forward passes and the weight gradient, an input row for the input gradients) held in a
// `san_vec` (san_lanes.h). With stride 1 the columns a tap reads (or the outputs that read a
// tile) are consecutive: one masked load; other strides go lane by lane. The aggregation kernels
// take SAN_CG channels that share one weight channel (c, c + Cw, c + 2 Cw, ...), so a weight
// read serves SAN_CG channels.

#include "san_lanes.h"

// Output row whose tap a reads input row r, or -1 when there is none.
__device__ __forceinline__ int san_output_of(int r, int a, int out_size, int stride, int pad,
                                             int dil) {
    int o = r + pad - a * dil;
    if (o < 0) return -1;
    if (stride != 1) {  // integer division is slow: skip it in the common stride-1 case
        if (o % stride != 0) return -1;
        o /= stride;
    }
    return o < out_size ? o : -1;
}

// The lanes t < hi0 with 0 <= first + t < size (first + t: a column of consecutive lanes).
__device__ __forceinline__ san_mask san_span(int first, int size, int hi0) {
    return san_lanes(-first, size - first < hi0 ? size - first : hi0);
}

// With stride 1, every tap t = a * k + b whose output row i reads input row h and whose outputs
// from column jb = w0 + pad - b * dil on read the tile at column w0: reads(t, i * out_w + jb, m)
// in that order (b, then a), `m` the tile's lanes with an output column inside the row.
template <typename Reads>
__device__ __forceinline__ void san_stride1_readers(int h, int w0, int hi0, int out_h, int out_w,
                                                    int ksize, int pad, int dil, Reads reads) {
    for (int b = 0; b < ksize; ++b) {
        const int jb = w0 + pad - b * dil;
        const san_mask m = san_span(jb, out_w, hi0);
        for (int a = 0; a < ksize; ++a) {
            const int i = san_output_of(h, a, out_h, 1, pad, dil);
            if (i < 0) continue;
            reads(a * ksize + b, (int64_t)i * out_w + jb, m);
        }
    }
}

// The output tile at column j0 (lanes t < hi0) at tap column b of input row `row`: column
// (j0 + t) * stride - pad + b * dil, zero outside the image. `m` is
// san_span(j0 - pad + b * dil, width, hi0), used with stride 1.
__device__ __forceinline__ san_vec san_row_taps(const scalar_t* __restrict__ row, san_mask m,
                                                int j0, int b, int stride, int pad, int dil,
                                                int width, int hi0) {
    if (stride == 1) return san_vload(row + (j0 - pad + b * dil), m);
    san_vec v = san_vbcast((acc_t)0);
    for (int t = 0; t < hi0; ++t) {
        const int c = (j0 + t) * stride - pad + b * dil;
        if (c >= 0 && c < width) v = san_vset(v, t, TO_ACC(row[c]));
    }
    return v;
}

// The tile of thread `idx` in a kernel over `rows_per_plane`-row planes of `width` pixels: plane
// index (e.g. n * C + c), row i, first column j0 and the hi0 <= SAN_TJ pixels it holds.
struct san_row_tile {
    int64_t plane;
    int i, j0, hi0;
};

__device__ __forceinline__ san_row_tile san_row_tile_of(int64_t idx, int rows_per_plane,
                                                        int width) {
    const int WT = (width + SAN_TJ - 1) / SAN_TJ;
    san_row_tile t;
    const int64_t row = san_div(idx, WT);
    t.j0 = (int)(idx - row * WT) * SAN_TJ;
    t.plane = san_div(row, rows_per_plane);
    t.i = (int)(row - t.plane * rows_per_plane);
    t.hi0 = san_tile_lanes(width, t.j0);
    return t;
}

// The window sizes of a subtraction kernel: taps, output positions, the centre tap's row.
#define SAN_WINDOW_SIZES                                   \
    const int taps = ksize * ksize;                        \
    const int64_t positions = (int64_t)out_h * out_w;      \
    const int centre = ksize / 2

// out[n, c, t, p] = x1[n, c, centre(p)] - x2[n, c, tap_t(p)]. One thread per (n, c, output row,
// row tile) writes all k * k taps; rows = N * C * Ho.
__global__ void san_subtraction2_forward(const scalar_t* __restrict__ x1,
                                         const scalar_t* __restrict__ x2,
                                         scalar_t* __restrict__ out, int64_t rows, int height,
                                         int width, int out_h, int out_w, int ksize, int stride,
                                         int pad, int dil) {
    SAN_WINDOW_SIZES;
    const int WT = (out_w + SAN_TJ - 1) / SAN_TJ;
    SAN_GRID_LOOP(idx, rows * WT) {
        const san_row_tile rt = san_row_tile_of(idx, out_h, out_w);
        const int64_t nc = rt.plane;
        const int i = rt.i, j0 = rt.j0, hi0 = rt.hi0;
        const san_mask m0 = san_lanes(0, hi0);
        const scalar_t* a_plane = x1 + nc * height * width;
        const scalar_t* b_plane = x2 + nc * height * width;
        scalar_t* o = out + nc * taps * positions + (int64_t)i * out_w + j0;
        const int ch = i * stride - pad + centre * dil;
        san_vec c_value = san_vbcast((acc_t)0);
        if (ch >= 0 && ch < height) {
            const san_mask mc = san_span(j0 - pad + centre * dil, width, hi0);
            c_value = san_row_taps(a_plane + (int64_t)ch * width, mc, j0, centre, stride, pad, dil,
                                   width, hi0);
        }
        for (int b = 0; b < ksize; ++b) {
            const san_mask m = san_span(j0 - pad + b * dil, width, hi0);
            for (int a = 0; a < ksize; ++a) {
                const int r = i * stride - pad + a * dil;
                san_vec value = c_value;
                if (r >= 0 && r < height) {
                    value = value - san_row_taps(b_plane + (int64_t)r * width, m, j0, b, stride,
                                                 pad, dil, width, hi0);
                }
                san_vstore(o + (a * ksize + b) * positions, value, m0);
            }
        }
    }
}

// Gradient of subtraction/subtraction2 with respect to an input (N, C, H, W):
// grad_in = centre_sign * sum(grad_out over outputs whose centre reads the pixel, all taps)
//         - tap_sign * sum(grad_out over (output, tap) pairs that read the pixel).
// subtraction: (1, 1); subtraction2: (1, 0) for x1 and (0, 1) for x2. One thread per (n, c,
// input row, row tile); rows = N * C * H.
__global__ void san_subtraction_backward(const scalar_t* __restrict__ grad_out,
                                         scalar_t* __restrict__ grad_in, int64_t rows,
                                         int height, int width, int out_h, int out_w, int ksize,
                                         int stride, int pad, int dil, int centre_sign,
                                         int tap_sign) {
    SAN_WINDOW_SIZES;
    const int WT = (width + SAN_TJ - 1) / SAN_TJ;
    SAN_GRID_LOOP(idx, rows * WT) {
        const san_row_tile rt = san_row_tile_of(idx, height, width);
        const int64_t nc = rt.plane, row = nc * height + rt.i;
        const int h = rt.i, w0 = rt.j0, hi0 = rt.hi0;
        const scalar_t* g = grad_out + nc * taps * positions;
        san_vec value = san_vbcast((acc_t)0);
        if (stride == 1) {  // output column w + pad - b * dil: consecutive over the tile
            if (centre_sign) {
                const int i = san_output_of(h, centre, out_h, 1, pad, dil);
                const int jc = w0 + pad - centre * dil;
                if (i >= 0) {
                    const san_mask m = san_span(jc, out_w, hi0);
                    const scalar_t* gp = g + (int64_t)i * out_w + jc;
                    for (int t = 0; t < taps; ++t) value = value + san_vload(gp + t * positions, m);
                }
            }
            if (tap_sign) {
                san_stride1_readers(h, w0, hi0, out_h, out_w, ksize, pad, dil,
                                    [&](int t, int64_t p, san_mask m) {
                                        value = value - san_vload(g + t * positions + p, m);
                                    });
            }
        } else {
            for (int t = 0; t < hi0; ++t) {
                const int w = w0 + t;
                acc_t sum = 0;
                if (centre_sign) {
                    const int i = san_output_of(h, centre, out_h, stride, pad, dil);
                    const int j = san_output_of(w, centre, out_w, stride, pad, dil);
                    if (i >= 0 && j >= 0) {
                        const int64_t p = (int64_t)i * out_w + j;
                        for (int tap = 0; tap < taps; ++tap) sum += TO_ACC(g[tap * positions + p]);
                    }
                }
                if (tap_sign) {
                    for (int a = 0; a < ksize; ++a) {
                        const int i = san_output_of(h, a, out_h, stride, pad, dil);
                        if (i < 0) continue;
                        for (int b = 0; b < ksize; ++b) {
                            const int j = san_output_of(w, b, out_w, stride, pad, dil);
                            if (j < 0) continue;
                            sum -= TO_ACC(g[(a * ksize + b) * positions + (int64_t)i * out_w + j]);
                        }
                    }
                }
                value = san_vset(value, t, sum);
            }
        }
        san_vstore(grad_in + row * width + w0, value, san_lanes(0, hi0));
    }
}

// The tile of thread `idx` for the aggregation kernels: (n, weight channel cw, group of SAN_CG of
// the M = C / Cw channels sharing it, row i of `rows_per_plane`, row tile at column j0).
struct san_agg_tile {
    int64_t n;
    int cw, c0, cg, i, j0;  // channels c0, c0 + Cw, ..., cg of them
};

__device__ __forceinline__ san_agg_tile san_agg_tile_of(int64_t idx, int WT, int rows_per_plane,
                                                        int channels, int weight_channels) {
    const int M = channels / weight_channels;
    const int MG = (M + SAN_CG - 1) / SAN_CG;
    san_agg_tile t;
    const san_row_tile rt = san_row_tile_of(idx, rows_per_plane, WT * SAN_TJ);
    t.j0 = rt.j0;
    t.i = rt.i;
    const int64_t ncw = san_div(rt.plane, MG);
    const int mg = (int)(rt.plane - ncw * MG);
    t.n = san_div(ncw, weight_channels);
    t.cw = (int)(ncw - t.n * weight_channels);
    t.c0 = t.cw + mg * SAN_CG * weight_channels;
    t.cg = san_group_channels(M, mg);
    return t;
}

// out[n, c, i, j] = sum_t w[n, cw, t, p] * x[n, c, tap_t(p)] for G channels c = c0 + g * Cw
// (x, out at channel c0, wp at the tile's pixel of plane t = 0, chan_step = Cw).
template <int G>
__device__ __forceinline__ void san_aggregate(const scalar_t* __restrict__ x,
                                              const scalar_t* __restrict__ wp,
                                              scalar_t* __restrict__ out, int64_t chan_step,
                                              int64_t positions, int i, int j0, int height,
                                              int width, int ksize, int stride, int pad, int dil,
                                              int hi0) {
    san_vec s[G];
    SAN_UNROLL for (int g = 0; g < G; ++g) s[g] = san_vbcast((acc_t)0);
    const san_mask m0 = san_lanes(0, hi0);
    const int64_t plane = (int64_t)height * width;
    for (int b = 0; b < ksize; ++b) {
        const san_mask m = san_span(j0 - pad + b * dil, width, hi0);
        for (int a = 0; a < ksize; ++a) {
            const int r = i * stride - pad + a * dil;
            if (r < 0 || r >= height) continue;
            const san_vec wv = san_vload(wp + (a * ksize + b) * positions, m0);
            const scalar_t* xr = x + (int64_t)r * width;
            SAN_UNROLL for (int g = 0; g < G; ++g) {
                s[g] = s[g] + wv * san_row_taps(xr + g * chan_step * plane, m, j0, b, stride, pad,
                                                dil, width, hi0);
            }
        }
    }
    SAN_UNROLL for (int g = 0; g < G; ++g) san_vstore(out + g * chan_step * positions, s[g], m0);
}

// The sizes of an aggregation kernel whose threads tile rows of `row_width` pixels: taps, output
// positions, row tiles WT, output channels per weight channel M, and the work items.
#define SAN_AGGREGATION_SIZES(row_width)                  \
    const int taps = ksize * ksize;                       \
    const int64_t positions = (int64_t)out_h * out_w;     \
    const int WT = ((row_width) + SAN_TJ - 1) / SAN_TJ;   \
    const int M = channels / weight_channels;             \
    const int64_t total = rows / M * ((M + SAN_CG - 1) / SAN_CG) * WT

// out[n, c, i, j] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]; rows = N * C * Ho.
__global__ void san_aggregation_forward(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ weight,
                                        scalar_t* __restrict__ out, int64_t rows, int channels,
                                        int weight_channels, int height, int width, int out_h,
                                        int out_w, int ksize, int stride, int pad, int dil) {
    SAN_AGGREGATION_SIZES(out_w);
    SAN_GRID_LOOP(idx, total) {
        const san_agg_tile t = san_agg_tile_of(idx, WT, out_h, channels, weight_channels);
        const int hi0 = san_tile_lanes(out_w, t.j0);
        const int64_t pix = (int64_t)t.i * out_w + t.j0;
        const scalar_t* xp = x + (t.n * channels + t.c0) * height * width;
        const scalar_t* wp = weight + (t.n * weight_channels + t.cw) * taps * positions + pix;
        scalar_t* op = out + (t.n * channels + t.c0) * positions + pix;
        if (t.cg == SAN_CG) {
            san_aggregate<SAN_CG>(xp, wp, op, weight_channels, positions, t.i, t.j0, height, width,
                                  ksize, stride, pad, dil, hi0);
        } else {
            for (int g = 0; g < t.cg; ++g) {
                const int64_t c = (int64_t)g * weight_channels;
                san_aggregate<1>(xp + c * height * width, wp, op + c * positions, weight_channels,
                                 positions, t.i, t.j0, height, width, ksize, stride, pad, dil,
                                 hi0);
            }
        }
    }
}

// grad_x[n, c, h, w] for G channels c = c0 + g * Cw (g and dst at channel c0, wp at plane t = 0
// of the weight channel; chan_step = Cw).
template <int G>
__device__ __forceinline__ void san_aggregate_grad(const scalar_t* __restrict__ g,
                                                   const scalar_t* __restrict__ wp,
                                                   scalar_t* __restrict__ dst, int64_t chan_step,
                                                   int64_t positions, int h, int w0, int height,
                                                   int width, int out_h, int out_w, int ksize,
                                                   int stride, int pad, int dil, int hi0) {
    san_vec s[G];
    SAN_UNROLL for (int c = 0; c < G; ++c) s[c] = san_vbcast((acc_t)0);
    if (stride == 1) {  // output column w + pad - b * dil: consecutive over the tile
        san_stride1_readers(h, w0, hi0, out_h, out_w, ksize, pad, dil,
                            [&](int t, int64_t p, san_mask m) {
                                const san_vec wv = san_vload(wp + t * positions + p, m);
                                SAN_UNROLL for (int c = 0; c < G; ++c) {
                                    s[c] = s[c] + wv * san_vload(g + c * chan_step * positions + p,
                                                                 m);
                                }
                            });
    } else {
        for (int t = 0; t < hi0; ++t) {
            for (int a = 0; a < ksize; ++a) {
                const int i = san_output_of(h, a, out_h, stride, pad, dil);
                if (i < 0) continue;
                for (int b = 0; b < ksize; ++b) {
                    const int j = san_output_of(w0 + t, b, out_w, stride, pad, dil);
                    if (j < 0) continue;
                    const int64_t p = (int64_t)i * out_w + j;
                    const acc_t wv = TO_ACC(wp[(a * ksize + b) * positions + p]);
                    SAN_UNROLL for (int c = 0; c < G; ++c) {
                        s[c] = san_vset(s[c], t, san_vget(s[c], t) +
                                                     wv * TO_ACC(g[c * chan_step * positions + p]));
                    }
                }
            }
        }
    }
    const san_mask m0 = san_lanes(0, hi0);
    const int64_t plane = (int64_t)height * width;
    SAN_UNROLL for (int c = 0; c < G; ++c) {
        san_vstore(dst + c * chan_step * plane + (int64_t)h * width + w0, s[c], m0);
    }
}

// grad_x[n, c, h, w] = sum over (output p, tap t) reading (h, w) of
// w[n, c % Cw, t, p] * g[n, c, p]; rows = N * C * H.
__global__ void san_aggregation_input_backward(const scalar_t* __restrict__ grad_out,
                                               const scalar_t* __restrict__ weight,
                                               scalar_t* __restrict__ grad_x, int64_t rows,
                                               int channels, int weight_channels, int height,
                                               int width, int out_h, int out_w, int ksize,
                                               int stride, int pad, int dil) {
    SAN_AGGREGATION_SIZES(width);
    SAN_GRID_LOOP(idx, total) {
        const san_agg_tile t = san_agg_tile_of(idx, WT, height, channels, weight_channels);
        const int hi0 = san_tile_lanes(width, t.j0);
        const scalar_t* g = grad_out + (t.n * channels + t.c0) * positions;
        const scalar_t* wp = weight + (t.n * weight_channels + t.cw) * taps * positions;
        scalar_t* dst = grad_x + (t.n * channels + t.c0) * height * width;
        if (t.cg == SAN_CG) {
            san_aggregate_grad<SAN_CG>(g, wp, dst, weight_channels, positions, t.i, t.j0, height,
                                       width, out_h, out_w, ksize, stride, pad, dil, hi0);
        } else {
            for (int c = 0; c < t.cg; ++c) {
                const int64_t cs = (int64_t)c * weight_channels;
                san_aggregate_grad<1>(g + cs * positions, wp, dst + cs * height * width,
                                      weight_channels, positions, t.i, t.j0, height, width, out_h,
                                      out_w, ksize, stride, pad, dil, hi0);
            }
        }
    }
}

// grad_w[n, cw, t, p] = sum over c = cw (mod Cw) of g[n, c, p] * x[n, c, tap_t(p)]. One thread per
// (n, cw, output row, row tile) writes all k * k taps; rows = N * Cw * Ho.
__global__ void san_aggregation_weight_backward(const scalar_t* __restrict__ grad_out,
                                                const scalar_t* __restrict__ x,
                                                scalar_t* __restrict__ grad_w, int64_t rows,
                                                int channels, int weight_channels, int height,
                                                int width, int out_h, int out_w, int ksize,
                                                int stride, int pad, int dil) {
    const int taps = ksize * ksize;
    const int64_t positions = (int64_t)out_h * out_w;
    const int64_t plane = (int64_t)height * width;
    const int WT = (out_w + SAN_TJ - 1) / SAN_TJ;
    SAN_GRID_LOOP(idx, rows * WT) {
        const san_row_tile rt = san_row_tile_of(idx, out_h, out_w);
        const int64_t ncw = rt.plane;
        const int i = rt.i, j0 = rt.j0, hi0 = rt.hi0;
        const int64_t n = san_div(ncw, weight_channels);
        const int cw = (int)(ncw - n * weight_channels);
        const san_mask m0 = san_lanes(0, hi0);
        const int64_t pix = (int64_t)i * out_w + j0;
        const int64_t first = n * channels + cw;  // first (n, c) plane of this weight channel
        scalar_t* gw = grad_w + ncw * taps * positions + pix;
        for (int b = 0; b < ksize; ++b) {
            const san_mask m = san_span(j0 - pad + b * dil, width, hi0);
            for (int a = 0; a < ksize; ++a) {
                const int r = i * stride - pad + a * dil;
                san_vec value = san_vbcast((acc_t)0);
                if (r >= 0 && r < height) {
                    for (int c = cw; c < channels; c += weight_channels) {
                        const int64_t nc = first + (c - cw);
                        value = value + san_vload(grad_out + nc * positions + pix, m0) *
                                            san_row_taps(x + nc * plane + (int64_t)r * width, m,
                                                         j0, b, stride, pad, dil, width, hi0);
                    }
                }
                san_vstore(gw + (a * ksize + b) * positions, value, m0);
            }
        }
    }
}
