// SASA local self-attention: forward and backward kernels.
//
// Compiled by san_det/layers/kernel_runtime.py for CUDA (CuPy / NVRTC) and, unchanged, as C++ for
// the CPU; so only grid-stride loops, no __shared__, __syncthreads, atomics or warp intrinsics.
// The runtime prepends the typedefs scalar_t (storage) and acc_t (arithmetic) and the TO_ACC /
// FROM_ACC conversions.
//
// Layouts (all contiguous): q, k, v, out, grad_* are (N, C, H, W); rel is (C, K, K); attn and
// dlogit are acc_t buffers (N, heads, K*K, H, W). Heads are contiguous channel groups of
// d = C / heads channels. Neighbour (a, b) of pixel (i, j) is (i + (a - r) * dil, j + (b - r) * dil)
// with r = K / 2; neighbours outside the image are masked: their probability and logit gradient
// are exactly 0. The thread index runs fastest over the image column so neighbouring GPU threads
// read neighbouring addresses.

#define SAN_GRID_LOOP(idx, total)                                                   \
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (int64_t)blockDim.x * gridDim.x)

// Attention probabilities. One thread per (n, head, i, j): the K*K logits
// sum_{c in head} q[c, i, j] * (k[c, i', j'] + rel[c, a, b]) are written to attn, then turned
// into a softmax over the in-image neighbours in place (max, exp and sum, normalise).
__global__ void sasa_attention_forward(const scalar_t* __restrict__ q,
                                       const scalar_t* __restrict__ k,
                                       const scalar_t* __restrict__ rel,
                                       acc_t* __restrict__ attn, int N, int C, int H, int W,
                                       int heads, int K, int dil, int has_rel) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    SAN_GRID_LOOP(idx, (int64_t)N * heads * HW) {
        const int64_t pix = idx % HW;
        const int64_t nh = idx / HW;  // n * heads + h
        const int i = (int)(pix / W), j = (int)(pix % W);
        const int h = (int)(nh % heads);
        const int64_t n = nh / heads;
        const int64_t qbase = (n * C + (int64_t)h * d) * HW;
        acc_t* a_ptr = attn + nh * KK * HW + pix;

        acc_t vmax = 0;
        bool seen = false;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            for (int b = 0; b < K; ++b) {
                const int jj = j + (b - r) * dil;
                if (ii < 0 || ii >= H || jj < 0 || jj >= W) continue;
                const int64_t nbr = (int64_t)ii * W + jj;
                acc_t logit = 0;
                for (int c = 0; c < d; ++c) {
                    acc_t key = TO_ACC(k[qbase + c * HW + nbr]);
                    if (has_rel) key += TO_ACC(rel[((int64_t)h * d + c) * KK + a * K + b]);
                    logit += TO_ACC(q[qbase + c * HW + pix]) * key;
                }
                a_ptr[(a * K + b) * HW] = logit;
                if (!seen || logit > vmax) vmax = logit;
                seen = true;
            }
        }
        acc_t total = 0;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            for (int b = 0; b < K; ++b) {
                const int jj = j + (b - r) * dil;
                acc_t* p = a_ptr + (a * K + b) * HW;
                if (ii < 0 || ii >= H || jj < 0 || jj >= W) {
                    *p = 0;
                } else {
                    const acc_t e = exp(*p - vmax);
                    *p = e;
                    total += e;
                }
            }
        }
        const acc_t inv = (acc_t)1 / total;
        for (int ab = 0; ab < KK; ++ab) a_ptr[ab * HW] *= inv;
    }
}

// out[n, c, i, j] = sum_{a, b} attn[n, h(c), a, b, i, j] * v[n, c, i', j']; one thread per output.
__global__ void sasa_output_forward(const acc_t* __restrict__ attn,
                                    const scalar_t* __restrict__ v, scalar_t* __restrict__ out,
                                    int N, int C, int H, int W, int heads, int K, int dil) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    SAN_GRID_LOOP(idx, (int64_t)N * C * HW) {
        const int64_t pix = idx % HW;
        const int64_t nc = idx / HW;  // n * C + c
        const int i = (int)(pix / W), j = (int)(pix % W);
        const int64_t n = nc / C;
        const int h = (int)(nc % C) / d;
        const acc_t* a_ptr = attn + (n * heads + h) * KK * HW + pix;
        const scalar_t* v_ptr = v + nc * HW;
        acc_t acc = 0;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            if (ii < 0 || ii >= H) continue;
            for (int b = 0; b < K; ++b) {
                const int jj = j + (b - r) * dil;
                if (jj < 0 || jj >= W) continue;
                acc += a_ptr[(a * K + b) * HW] * TO_ACC(v_ptr[(int64_t)ii * W + jj]);
            }
        }
        out[idx] = FROM_ACC(acc);
    }
}

// Gradient of the logits. One thread per (n, head, i, j):
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
    SAN_GRID_LOOP(idx, (int64_t)N * heads * HW) {
        const int64_t pix = idx % HW;
        const int64_t nh = idx / HW;
        const int i = (int)(pix / W), j = (int)(pix % W);
        const int h = (int)(nh % heads);
        const int64_t n = nh / heads;
        const int64_t base = (n * C + (int64_t)h * d) * HW;
        const acc_t* p_ptr = attn + nh * KK * HW + pix;
        acc_t* g_ptr = dlogit + nh * KK * HW + pix;

        acc_t weighted = 0;
        for (int a = 0; a < K; ++a) {
            const int ii = i + (a - r) * dil;
            for (int b = 0; b < K; ++b) {
                const int jj = j + (b - r) * dil;
                const int ab = a * K + b;
                if (ii < 0 || ii >= H || jj < 0 || jj >= W) {
                    g_ptr[ab * HW] = 0;
                    continue;
                }
                const int64_t nbr = (int64_t)ii * W + jj;
                acc_t gv = 0;
                for (int c = 0; c < d; ++c)
                    gv += TO_ACC(grad_out[base + c * HW + pix]) * TO_ACC(v[base + c * HW + nbr]);
                g_ptr[ab * HW] = gv;
                weighted += p_ptr[ab * HW] * gv;
            }
        }
        for (int ab = 0; ab < KK; ++ab) {
            const acc_t p = p_ptr[ab * HW];
            g_ptr[ab * HW] = p * (g_ptr[ab * HW] - weighted);
        }
    }
}

// Gradients of q, k and v; one thread per (n, c, i, j), no atomics:
// grad_q[c, i, j] = sum_ab dlogit[ab, i, j] * (k[c, i', j'] + rel[c, a, b]) over the neighbours of
// (i, j); grad_k and grad_v gather over the pixels (s, t) that see (i, j) as their neighbour (a, b),
// (s, t) = (i - (a - r) * dil, j - (b - r) * dil):
// grad_k[c, i, j] = sum dlogit[ab, s, t] * q[c, s, t], grad_v[c, i, j] = sum p[ab, s, t] * g[c, s, t].
__global__ void sasa_qkv_backward(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                  const scalar_t* __restrict__ rel,
                                  const scalar_t* __restrict__ grad_out,
                                  const acc_t* __restrict__ attn,
                                  const acc_t* __restrict__ dlogit,
                                  scalar_t* __restrict__ grad_q, scalar_t* __restrict__ grad_k,
                                  scalar_t* __restrict__ grad_v, int N, int C, int H, int W,
                                  int heads, int K, int dil, int has_rel) {
    const int64_t HW = (int64_t)H * W;
    const int d = C / heads;
    const int r = K / 2;
    const int KK = K * K;
    SAN_GRID_LOOP(idx, (int64_t)N * C * HW) {
        const int64_t pix = idx % HW;
        const int64_t nc = idx / HW;
        const int i = (int)(pix / W), j = (int)(pix % W);
        const int64_t n = nc / C;
        const int c = (int)(nc % C);
        const int h = c / d;
        const int64_t hbase = (n * heads + h) * KK * HW;
        const scalar_t* chan_q = q + nc * HW;
        const scalar_t* chan_k = k + nc * HW;
        const scalar_t* chan_g = grad_out + nc * HW;
        const scalar_t* chan_rel = rel + (int64_t)c * KK;
        acc_t gq = 0, gk = 0, gv = 0;
        for (int a = 0; a < K; ++a) {
            const int off_i = (a - r) * dil;
            const int ii = i + off_i;  // row of the neighbour of (i, j)
            const int si = i - off_i;  // row of the pixel that has (i, j) as neighbour (a, .)
            for (int b = 0; b < K; ++b) {
                const int off_j = (b - r) * dil;
                const int ab = a * K + b;
                const int jj = j + off_j;
                if (ii >= 0 && ii < H && jj >= 0 && jj < W) {
                    acc_t key = TO_ACC(chan_k[(int64_t)ii * W + jj]);
                    if (has_rel) key += TO_ACC(chan_rel[ab]);
                    gq += dlogit[hbase + ab * HW + pix] * key;
                }
                const int sj = j - off_j;
                if (si >= 0 && si < H && sj >= 0 && sj < W) {
                    const int64_t src = (int64_t)si * W + sj;
                    gk += dlogit[hbase + ab * HW + src] * TO_ACC(chan_q[src]);
                    gv += attn[hbase + ab * HW + src] * TO_ACC(chan_g[src]);
                }
            }
        }
        grad_q[idx] = FROM_ACC(gq);
        grad_k[idx] = FROM_ACC(gk);
        grad_v[idx] = FROM_ACC(gv);
    }
}
