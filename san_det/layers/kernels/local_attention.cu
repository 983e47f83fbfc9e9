// SASA local self-attention: forward and backward kernels.
//
// Compiled by san_det/layers/kernel_runtime.py for CUDA (CuPy / NVRTC) and, unchanged, as C++ for
// the CPU; so only grid-stride loops, no __shared__, __syncthreads, atomics or warp intrinsics.
// The runtime prepends the typedefs scalar_t (storage) and acc_t (arithmetic) and the TO_ACC /
// FROM_ACC conversions.
//
// Layouts (all contiguous): q, k, v, out, grad_* are (N, C, H, W); rel is (C, K, K) (zeros when
// there is none); attn and dlogit are acc_t buffers (N, heads, K*K, H, W). Heads are contiguous
// channel groups of d = C / heads channels. Neighbour (a, b) of pixel (i, j) is
// (i + (a - r) * dil, j + (b - r) * dil) with r = K / 2; neighbours outside the image are masked:
// their probability and logit gradient are exactly 0.
//
// Work per thread is a compile-time tile: SAN_TJ consecutive pixels of one image row and, in the
// kernels that produce one value per channel, SAN_CG consecutive channels of one head (they share
// the attention weights read for them). The defaults are the GPU's (SAN_TJ 1: neighbouring threads
// read neighbouring addresses; SAN_CG 4); the CPU build uses SAN_TJ 8, SAN_CG 1, where the tile's
// independent sums hide floating-point latency and vectorise. Pixels past the end of a row and
// channels past the end of a head are skipped. With SAN_TJ > 1 the window columns b whose
// neighbours are inside the image for the whole tile form one interval [f0, f1); SAN_FOR_TAPS runs
// those taps without per-pixel checks (`full` is a literal true there) and the others with them.

#ifndef SAN_TJ
#define SAN_TJ 1
#endif
#ifndef SAN_CG
#define SAN_CG 4
#endif

#define SAN_GRID_LOOP(idx, total)                                                   \
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (int64_t)blockDim.x * gridDim.x)

#define SAN_FOR_T for (int t = 0; t < SAN_TJ; ++t)
#define SAN_FOR_G for (int g = 0; g < SAN_CG; ++g)
// The first cg channels of the group (all of them with SAN_CG 1, without a check the CPU compiler
// would have to keep).
#if SAN_CG > 1
#define SAN_FOR_GROUP(cg) SAN_FOR_G if (g < (cg))
#else
#define SAN_FOR_GROUP(cg) for (int g = 0; g < 1; ++g)
#endif

// a / b for a non-negative index a and b > 0, in 32 bits when a fits (64-bit division is a long
// instruction sequence on the GPU).
__device__ __forceinline__ int64_t san_div(int64_t a, int b) {
    return a <= 0x7fffffff ? (int64_t)((unsigned)a / (unsigned)b) : a / b;
}

// Pixel t of the tile at column j0 exists and its neighbour at column offset off is inside.
__device__ __forceinline__ bool san_col_ok(int j0, int t, int off, int W) {
    const int j = j0 + t;
    return j < W && j + off >= 0 && j + off < W;
}

__device__ __forceinline__ bool san_tile_inside(int j0, int off, int W) {
    return j0 + SAN_TJ <= W && j0 + off >= 0 && j0 + SAN_TJ + off <= W;
}

// [f0, f1): the window columns b whose column offset sign * (b - r) * dil keeps the whole tile
// inside the image (an interval, since the offset grows with b).
__device__ __forceinline__ void san_inside_taps(int j0, int W, int K, int r, int dil, int sign,
                                                int& f0, int& f1) {
    f0 = 0;
    while (f0 < K && !san_tile_inside(j0, sign * (f0 - r) * dil, W)) ++f0;
    f1 = f0;
    while (f1 < K && san_tile_inside(j0, sign * (f1 - r) * dil, W)) ++f1;
}

// Runs BODY for every window column b: first the border taps (full == false), then the inside
// taps [f0, f1) (full == true, a constant the compiler folds away); one plain loop for SAN_TJ 1.
#if SAN_TJ > 1
#define SAN_FOR_TAPS(f0, f1, ...)                  \
    for (int b = 0; b < K; ++b) {                  \
        if (b >= (f0) && b < (f1)) continue;       \
        const bool full = false;                   \
        __VA_ARGS__                                \
    }                                              \
    for (int b = (f0); b < (f1); ++b) {            \
        const bool full = true;                    \
        __VA_ARGS__                                \
    }
#else
#define SAN_FOR_TAPS(f0, f1, ...)                  \
    for (int b = 0; b < K; ++b) {                  \
        const bool full = false;                   \
        __VA_ARGS__                                \
    }
#endif

// Attention probabilities. One thread per (n, head, i, row tile): the K*K logits
// sum_{c in head} q[c, i, j] * (k[c, i', j'] + rel[c, a, b]) are written to attn, then turned
// into a softmax over the in-image neighbours in place (max, exp and sum, normalise).
__global__ void sasa_attention_forward(const scalar_t* __restrict__ q,
                                       const scalar_t* __restrict__ k,
                                       const scalar_t* __restrict__ rel,
                                       acc_t* __restrict__ attn, int N, int C, int H, int W,
                                       int heads, int K, int dil) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    const int WT = (W + SAN_TJ - 1) / SAN_TJ;
    SAN_GRID_LOOP(idx, (int64_t)N * heads * H * WT) {
        const int64_t nhi = san_div(idx, WT);  // (n * heads + h) * H + i
        const int j0 = (int)(idx - nhi * WT) * SAN_TJ;
        const int64_t nh = san_div(nhi, H);
        const int i = (int)(nhi - nh * H);
        const int64_t n = san_div(nh, heads);
        const int h = (int)(nh - n * heads);
        const int64_t pix0 = (int64_t)i * W + j0;
        const scalar_t* q_ptr = q + (n * C + (int64_t)h * d) * HW + pix0;
        const scalar_t* k_ptr = k + (n * C + (int64_t)h * d) * HW;
        const scalar_t* rel_ptr = rel + (int64_t)h * d * KK;
        acc_t* a_ptr = attn + nh * KK * HW + pix0;
        int f0, f1;
        san_inside_taps(j0, W, K, r, dil, 1, f0, f1);

        acc_t vmax[SAN_TJ];
        bool seen[SAN_TJ];
        SAN_FOR_T {
            vmax[t] = 0;
            seen[t] = false;
        }
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            if (ii < 0 || ii >= H) continue;
            SAN_FOR_TAPS(f0, f1, {
                const int ab = a * K + b;
                const int off = (b - r) * dil;
                const scalar_t* k_row = k_ptr + (int64_t)ii * W + j0 + off;
                acc_t logit[SAN_TJ];
                SAN_FOR_T logit[t] = 0;
                for (int c = 0; c < d; ++c) {
                    const acc_t rc = TO_ACC(rel_ptr[c * KK + ab]);
                    const scalar_t* qc = q_ptr + c * HW;
                    const scalar_t* kc = k_row + c * HW;
                    SAN_FOR_T if (full || san_col_ok(j0, t, off, W)) logit[t] +=
                        TO_ACC(qc[t]) * (TO_ACC(kc[t]) + rc);
                }
                SAN_FOR_T if (full || san_col_ok(j0, t, off, W)) {
                    a_ptr[ab * HW + t] = logit[t];
                    vmax[t] = (!seen[t] || logit[t] > vmax[t]) ? logit[t] : vmax[t];
                    seen[t] = true;
                }
            })
        }
        acc_t total[SAN_TJ];
        SAN_FOR_T total[t] = 0;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            const bool row_ok = ii >= 0 && ii < H;
            for (int b = 0; b < K; ++b) {
                const int off = (b - r) * dil;
                acc_t* p = a_ptr + (a * K + b) * HW;
                SAN_FOR_T if (j0 + t < W) {
                    if (row_ok && san_col_ok(j0, t, off, W)) {
                        const acc_t e = exp(p[t] - vmax[t]);
                        p[t] = e;
                        total[t] += e;
                    } else {
                        p[t] = 0;
                    }
                }
            }
        }
        SAN_FOR_T total[t] = (acc_t)1 / total[t];
        for (int ab = 0; ab < KK; ++ab) {
            SAN_FOR_T if (j0 + t < W) a_ptr[ab * HW + t] *= total[t];
        }
    }
}

// out[n, c, i, j] = sum_{a, b} attn[n, h(c), a, b, i, j] * v[n, c, i', j'];
// one thread per (n, head, channel group, i, row tile).
__global__ void sasa_output_forward(const acc_t* __restrict__ attn,
                                    const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                    int N, int C, int H, int W, int heads, int K, int dil) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    const int WT = (W + SAN_TJ - 1) / SAN_TJ;
    const int G = (d + SAN_CG - 1) / SAN_CG;  // channel groups per head
    SAN_GRID_LOOP(idx, (int64_t)N * heads * G * H * WT) {
        const int64_t rowid = san_div(idx, WT);  // ((n * heads + h) * G + grp) * H + i
        const int j0 = (int)(idx - rowid * WT) * SAN_TJ;
        const int64_t nhg = san_div(rowid, H);
        const int i = (int)(rowid - nhg * H);
        const int64_t nh = san_div(nhg, G);
        const int grp = (int)(nhg - nh * G);
        const int64_t n = san_div(nh, heads);
        const int h = (int)(nh - n * heads);
        const int cg = d - grp * SAN_CG < SAN_CG ? d - grp * SAN_CG : SAN_CG;  // channels here
        const int64_t pix0 = (int64_t)i * W + j0;
        const acc_t* a_ptr = attn + nh * KK * HW + pix0;
        const scalar_t* v_ptr = v + (n * C + (int64_t)h * d + grp * SAN_CG) * HW;
        int f0, f1;
        san_inside_taps(j0, W, K, r, dil, 1, f0, f1);
        acc_t acc[SAN_CG][SAN_TJ];
        SAN_FOR_G SAN_FOR_T acc[g][t] = 0;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            if (ii < 0 || ii >= H) continue;
            SAN_FOR_TAPS(f0, f1, {
                const int off = (b - r) * dil;
                const acc_t* p = a_ptr + (a * K + b) * HW;
                const scalar_t* vv = v_ptr + (int64_t)ii * W + j0 + off;
                acc_t pt[SAN_TJ];
                SAN_FOR_T pt[t] = (full || san_col_ok(j0, t, off, W)) ? p[t] : (acc_t)0;
                SAN_FOR_GROUP(cg) {
                    SAN_FOR_T if (full || san_col_ok(j0, t, off, W))
                        acc[g][t] += pt[t] * TO_ACC(vv[g * HW + t]);
                }
            })
        }
        SAN_FOR_GROUP(cg) {
            SAN_FOR_T if (j0 + t < W) out[(n * C + (int64_t)h * d + grp * SAN_CG + g) * HW +
                                          pix0 + t] = FROM_ACC(acc[g][t]);
        }
    }
}

// Gradient of the logits. One thread per (n, head, i, row tile):
// gv[ab] = sum_{c in head} grad_out[c, i, j] * v[c, i', j'],
// dlogit[ab] = p[ab] * (gv[ab] - sum_ab' p[ab'] gv[ab']); 0 for out-of-image neighbours.
__global__ void sasa_logit_backward(const scalar_t* __restrict__ grad_out,
                                    const scalar_t* __restrict__ v,
                                    const acc_t* __restrict__ attn, acc_t* __restrict__ dlogit,
                                    int N, int C, int H, int W, int heads, int K, int dil) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    const int WT = (W + SAN_TJ - 1) / SAN_TJ;
    SAN_GRID_LOOP(idx, (int64_t)N * heads * H * WT) {
        const int64_t nhi = san_div(idx, WT);  // (n * heads + h) * H + i
        const int j0 = (int)(idx - nhi * WT) * SAN_TJ;
        const int64_t nh = san_div(nhi, H);
        const int i = (int)(nhi - nh * H);
        const int64_t n = san_div(nh, heads);
        const int h = (int)(nh - n * heads);
        const int64_t pix0 = (int64_t)i * W + j0;
        const scalar_t* g_ptr = grad_out + (n * C + (int64_t)h * d) * HW + pix0;
        const scalar_t* v_ptr = v + (n * C + (int64_t)h * d) * HW;
        const acc_t* p_ptr = attn + nh * KK * HW + pix0;
        acc_t* dl_ptr = dlogit + nh * KK * HW + pix0;
        int f0, f1;
        san_inside_taps(j0, W, K, r, dil, 1, f0, f1);

        // First the dot products gv (0 where the neighbour is outside: p is 0 there too).
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            if (ii < 0 || ii >= H) {
                for (int b = 0; b < K; ++b) {
                    SAN_FOR_T if (j0 + t < W) dl_ptr[(a * K + b) * HW + t] = 0;
                }
                continue;
            }
            SAN_FOR_TAPS(f0, f1, {
                const int off = (b - r) * dil;
                const scalar_t* v_row = v_ptr + (int64_t)ii * W + j0 + off;
                acc_t gv[SAN_TJ];
                SAN_FOR_T gv[t] = 0;
                for (int c = 0; c < d; ++c) {
                    const scalar_t* gc = g_ptr + c * HW;
                    const scalar_t* vc = v_row + c * HW;
                    SAN_FOR_T if (full || san_col_ok(j0, t, off, W)) gv[t] +=
                        TO_ACC(gc[t]) * TO_ACC(vc[t]);
                }
                SAN_FOR_T if (j0 + t < W) dl_ptr[(a * K + b) * HW + t] = gv[t];
            })
        }
        acc_t weighted[SAN_TJ];
        SAN_FOR_T weighted[t] = 0;
        for (int ab = 0; ab < KK; ++ab) {
            SAN_FOR_T if (j0 + t < W) weighted[t] += p_ptr[ab * HW + t] * dl_ptr[ab * HW + t];
        }
        for (int ab = 0; ab < KK; ++ab) {
            SAN_FOR_T if (j0 + t < W) {
                const acc_t p = p_ptr[ab * HW + t];
                dl_ptr[ab * HW + t] = p == 0 ? (acc_t)0 : p * (dl_ptr[ab * HW + t] - weighted[t]);
            }
        }
    }
}

// Gradients of q, k and v; one thread per (n, head, channel group, i, row tile), no atomics:
// grad_q[c, i, j] = sum_ab dlogit[ab, i, j] * (k[c, i', j'] + rel[c, a, b]) over the neighbours of
// (i, j); grad_k and grad_v gather over the pixels (s, u) that see (i, j) as their neighbour
// (a, b), (s, u) = (i - (a - r) * dil, j - (b - r) * dil):
// grad_k[c, i, j] = sum dlogit[ab, s, u] * q[c, s, u],
// grad_v[c, i, j] = sum p[ab, s, u] * grad_out[c, s, u].
__global__ void sasa_qkv_backward(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                  const scalar_t* __restrict__ rel,
                                  const scalar_t* __restrict__ grad_out,
                                  const acc_t* __restrict__ attn,
                                  const acc_t* __restrict__ dlogit,
                                  scalar_t* __restrict__ grad_q, scalar_t* __restrict__ grad_k,
                                  scalar_t* __restrict__ grad_v, int N, int C, int H, int W,
                                  int heads, int K, int dil) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    const int WT = (W + SAN_TJ - 1) / SAN_TJ;
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
        const int cg = d - grp * SAN_CG < SAN_CG ? d - grp * SAN_CG : SAN_CG;
        const int c0 = h * d + grp * SAN_CG;  // first channel of the group
        const int64_t pix0 = (int64_t)i * W + j0;
        const acc_t* p_ptr = attn + nh * KK * HW;
        const acc_t* dl_ptr = dlogit + nh * KK * HW;
        const int64_t chan0 = (n * C + c0) * HW;
        const scalar_t* chan_q = q + chan0;
        const scalar_t* chan_k = k + chan0;
        const scalar_t* chan_g = grad_out + chan0;
        const scalar_t* rel_c = rel + (int64_t)c0 * KK;
        int f0, f1, s0, s1;
        san_inside_taps(j0, W, K, r, dil, 1, f0, f1);   // neighbours (i', j') of the tile
        san_inside_taps(j0, W, K, r, dil, -1, s0, s1);  // pixels (s, u) that see the tile
        acc_t gq[SAN_CG][SAN_TJ], gk[SAN_CG][SAN_TJ], gv[SAN_CG][SAN_TJ];
        SAN_FOR_G SAN_FOR_T gq[g][t] = gk[g][t] = gv[g][t] = 0;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;  // row of the neighbours of row i
            if (ii >= 0 && ii < H) {
                SAN_FOR_TAPS(f0, f1, {
                    const int ab = a * K + b;
                    const int off = (b - r) * dil;
                    const acc_t* dl = dl_ptr + ab * HW + pix0;
                    const scalar_t* kk = chan_k + (int64_t)ii * W + j0 + off;
                    acc_t dlt[SAN_TJ];
                    SAN_FOR_T dlt[t] = (full || san_col_ok(j0, t, off, W)) ? dl[t] : (acc_t)0;
                    SAN_FOR_GROUP(cg) {
                        const acc_t rc = TO_ACC(rel_c[g * KK + ab]);
                        SAN_FOR_T if (full || san_col_ok(j0, t, off, W))
                            gq[g][t] += dlt[t] * (TO_ACC(kk[g * HW + t]) + rc);
                    }
                })
            }
            const int si = i - (a - r) * dil;  // row of the pixels that have row i as row a
            if (si >= 0 && si < H) {
                SAN_FOR_TAPS(s0, s1, {
                    const int ab = a * K + b;
                    const int off = -(b - r) * dil;
                    const int64_t src0 = (int64_t)si * W + j0 + off;
                    const acc_t* dl = dl_ptr + ab * HW + src0;
                    const acc_t* p = p_ptr + ab * HW + src0;
                    acc_t dlt[SAN_TJ], pt[SAN_TJ];
                    SAN_FOR_T {
                        const bool ok = full || san_col_ok(j0, t, off, W);
                        dlt[t] = ok ? dl[t] : (acc_t)0;
                        pt[t] = ok ? p[t] : (acc_t)0;
                    }
                    SAN_FOR_GROUP(cg) {
                        const scalar_t* qs = chan_q + g * HW + src0;
                        const scalar_t* gs = chan_g + g * HW + src0;
                        SAN_FOR_T if (full || san_col_ok(j0, t, off, W)) {
                            gk[g][t] += dlt[t] * TO_ACC(qs[t]);
                            gv[g][t] += pt[t] * TO_ACC(gs[t]);
                        }
                    }
                })
            }
        }
        SAN_FOR_GROUP(cg) {
            SAN_FOR_T if (j0 + t < W) {
                const int64_t o = chan0 + g * HW + pix0 + t;
                grad_q[o] = FROM_ACC(gq[g][t]);
                grad_k[o] = FROM_ACC(gk[g][t]);
                grad_v[o] = FROM_ACC(gv[g][t]);
            }
        }
    }
}
