// SAN's subtraction, subtraction2 and aggregation: forward and backward kernels.
//
// Compiled per dtype by san_det/layers/kernel_runtime.py: with CuPy/NVRTC for the GPU and with g++
// for the CPU (see cpu_prelude.h), so every kernel is a grid-stride loop with one thread per
// output element, no shared memory and no atomics. Backward passes are gathers: each thread sums
// every output that read its input pixel. With reflection padding a pixel is read through itself
// and through its mirror images in the padding (up to 3 padded coordinates per axis).
//
// Geometry (both axes alike): output row i, tap a reads padded row i * stride - pad + a * dil; the
// centre tap is a = k / 2. A padded row r maps to input row r when 0 <= r < H, else to nothing
// (zeros) or to its mirror (-r or 2 * (H - 1) - r; pad < H keeps one reflection enough).
// Tensors are contiguous: x (N, C, H, W), taps (N, C, k*k, Ho*Wo), w (N, Cw, k*k, Ho*Wo).

// Input row read at padded row r, or -1 when it reads zero.
__device__ __forceinline__ int san_source(int r, int size, int reflect) {
  if (r >= 0 && r < size) return r;
  if (!reflect) return -1;
  if (r < 0) r = -r;
  if (r >= size) r = 2 * (size - 1) - r;
  return r;
}

// The padded rows that read input row i (i itself and, with reflection, its mirror images).
__device__ __forceinline__ int san_aliases(int i, int size, int pad, int reflect, int* out) {
  int count = 0;
  out[count++] = i;
  if (reflect) {
    if (i > 0 && i <= pad) out[count++] = -i;
    const int mirror = 2 * (size - 1) - i;
    if (i < size - 1 && mirror <= size - 1 + pad) out[count++] = mirror;
  }
  return count;
}

// Output row whose tap a reads padded row r, or -1 when there is none.
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

// out[n, c, t, p] = x1[n, c, centre(p)] - x2[n, c, tap_t(p)]. One thread per (n, c, p) writes
// all k * k taps; total = N * C * Ho * Wo.
__global__ void san_subtraction2_forward(const scalar_t* __restrict__ x1,
                                         const scalar_t* __restrict__ x2,
                                         scalar_t* __restrict__ out, int64_t total, int height,
                                         int width, int out_h, int out_w, int ksize, int stride,
                                         int pad, int dil, int reflect) {
  const int taps = ksize * ksize;
  const int64_t positions = (int64_t)out_h * out_w;
  const int centre = ksize / 2;
  for (int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = index % positions;
    const int64_t nc = index / positions;
    const int i = (int)(p / out_w), j = (int)(p % out_w);
    const scalar_t* a_plane = x1 + nc * height * width;
    const scalar_t* b_plane = x2 + nc * height * width;
    scalar_t* o = out + nc * taps * positions + p;
    const int ch = san_source(i * stride - pad + centre * dil, height, reflect);
    const int cc = san_source(j * stride - pad + centre * dil, width, reflect);
    const acc_t c_value = (ch >= 0 && cc >= 0) ? TO_ACC(a_plane[ch * width + cc]) : (acc_t)0;
    for (int a = 0; a < ksize; ++a) {
      const int r = san_source(i * stride - pad + a * dil, height, reflect);
      for (int b = 0; b < ksize; ++b) {
        const int s = san_source(j * stride - pad + b * dil, width, reflect);
        acc_t value = c_value;
        if (r >= 0 && s >= 0) value -= TO_ACC(b_plane[r * width + s]);
        o[(a * ksize + b) * positions] = FROM_ACC(value);
      }
    }
  }
}

// Gradient of subtraction/subtraction2 with respect to an input (N, C, H, W):
// grad_in = centre_sign * sum(grad_out over outputs whose centre reads the pixel, all taps)
//         - tap_sign * sum(grad_out over (output, tap) pairs that read the pixel).
// subtraction: (1, 1); subtraction2: (1, 0) for x1 and (0, 1) for x2. total = N * C * H * W.
__global__ void san_subtraction_backward(const scalar_t* __restrict__ grad_out,
                                         scalar_t* __restrict__ grad_in, int64_t total,
                                         int height, int width, int out_h, int out_w, int ksize,
                                         int stride, int pad, int dil, int reflect,
                                         int centre_sign, int tap_sign) {
  const int taps = ksize * ksize;
  const int64_t positions = (int64_t)out_h * out_w;
  const int centre = ksize / 2;
  for (int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int w = (int)(index % width);
    const int h = (int)((index / width) % height);
    const int64_t nc = index / width / height;
    const scalar_t* g = grad_out + nc * taps * positions;
    int rows[3], cols[3];
    const int nrows = san_aliases(h, height, pad, reflect, rows);
    const int ncols = san_aliases(w, width, pad, reflect, cols);
    acc_t value = 0;
    for (int ar = 0; ar < nrows; ++ar) {
      for (int ac = 0; ac < ncols; ++ac) {
        if (centre_sign) {
          const int i = san_output_of(rows[ar], centre, out_h, stride, pad, dil);
          const int j = san_output_of(cols[ac], centre, out_w, stride, pad, dil);
          if (i >= 0 && j >= 0) {
            const int64_t p = (int64_t)i * out_w + j;
            for (int t = 0; t < taps; ++t) value += TO_ACC(g[t * positions + p]);
          }
        }
        if (tap_sign) {
          for (int a = 0; a < ksize; ++a) {
            const int i = san_output_of(rows[ar], a, out_h, stride, pad, dil);
            if (i < 0) continue;
            for (int b = 0; b < ksize; ++b) {
              const int j = san_output_of(cols[ac], b, out_w, stride, pad, dil);
              if (j < 0) continue;
              value -= TO_ACC(g[(a * ksize + b) * positions + (int64_t)i * out_w + j]);
            }
          }
        }
      }
    }
    grad_in[index] = FROM_ACC(value);
  }
}

// out[n, c, i, j] = sum_t w[n, c % Cw, t, p] * x[n, c, tap_t(p)]; total = N * C * Ho * Wo.
__global__ void san_aggregation_forward(const scalar_t* __restrict__ x,
                                        const scalar_t* __restrict__ weight,
                                        scalar_t* __restrict__ out, int64_t total, int channels,
                                        int weight_channels, int height, int width, int out_h,
                                        int out_w, int ksize, int stride, int pad, int dil,
                                        int reflect) {
  const int taps = ksize * ksize;
  const int64_t positions = (int64_t)out_h * out_w;
  for (int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = index % positions;
    const int64_t nc = index / positions;
    const int c = (int)(nc % channels);
    const int64_t n = nc / channels;
    const int i = (int)(p / out_w), j = (int)(p % out_w);
    const scalar_t* xp = x + nc * height * width;
    const scalar_t* wp =
        weight + (n * weight_channels + c % weight_channels) * taps * positions + p;
    acc_t value = 0;
    for (int a = 0; a < ksize; ++a) {
      const int r = san_source(i * stride - pad + a * dil, height, reflect);
      if (r < 0) continue;
      for (int b = 0; b < ksize; ++b) {
        const int s = san_source(j * stride - pad + b * dil, width, reflect);
        if (s < 0) continue;
        value += TO_ACC(wp[(a * ksize + b) * positions]) * TO_ACC(xp[(int64_t)r * width + s]);
      }
    }
    out[index] = FROM_ACC(value);
  }
}

// grad_x[n, c, h, w] = sum over (output p, tap t) reading (h, w) of
//                      w[n, c % Cw, t, p] * g[n, c, p]; total = N * C * H * W.
__global__ void san_aggregation_input_backward(const scalar_t* __restrict__ grad_out,
                                               const scalar_t* __restrict__ weight,
                                               scalar_t* __restrict__ grad_x, int64_t total,
                                               int channels, int weight_channels, int height,
                                               int width, int out_h, int out_w, int ksize,
                                               int stride, int pad, int dil, int reflect) {
  const int taps = ksize * ksize;
  const int64_t positions = (int64_t)out_h * out_w;
  for (int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int w = (int)(index % width);
    const int h = (int)((index / width) % height);
    const int64_t nc = index / width / height;
    const int c = (int)(nc % channels);
    const int64_t n = nc / channels;
    const scalar_t* g = grad_out + nc * positions;
    const scalar_t* wp = weight + (n * weight_channels + c % weight_channels) * taps * positions;
    int rows[3], cols[3];
    const int nrows = san_aliases(h, height, pad, reflect, rows);
    const int ncols = san_aliases(w, width, pad, reflect, cols);
    acc_t value = 0;
    for (int ar = 0; ar < nrows; ++ar) {
      for (int a = 0; a < ksize; ++a) {
        const int i = san_output_of(rows[ar], a, out_h, stride, pad, dil);
        if (i < 0) continue;
        for (int ac = 0; ac < ncols; ++ac) {
          for (int b = 0; b < ksize; ++b) {
            const int j = san_output_of(cols[ac], b, out_w, stride, pad, dil);
            if (j < 0) continue;
            const int64_t p = (int64_t)i * out_w + j;
            value += TO_ACC(wp[(a * ksize + b) * positions + p]) * TO_ACC(g[p]);
          }
        }
      }
    }
    grad_x[index] = FROM_ACC(value);
  }
}

// grad_w[n, cw, t, p] = sum over c = cw (mod Cw) of g[n, c, p] * x[n, c, tap_t(p)]. One thread per
// (n, cw, p) writes all k * k taps; total = N * Cw * Ho * Wo.
__global__ void san_aggregation_weight_backward(const scalar_t* __restrict__ grad_out,
                                                const scalar_t* __restrict__ x,
                                                scalar_t* __restrict__ grad_w, int64_t total,
                                                int channels, int weight_channels, int height,
                                                int width, int out_h, int out_w, int ksize,
                                                int stride, int pad, int dil, int reflect) {
  const int taps = ksize * ksize;
  const int64_t positions = (int64_t)out_h * out_w;
  const int64_t plane = (int64_t)height * width;
  for (int64_t index = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; index < total;
       index += (int64_t)blockDim.x * gridDim.x) {
    const int64_t p = index % positions;
    const int64_t ncw = index / positions;
    const int cw = (int)(ncw % weight_channels);
    const int64_t n = ncw / weight_channels;
    const int i = (int)(p / out_w), j = (int)(p % out_w);
    const int64_t first = n * channels + cw;  // first (n, c) plane of this weight channel
    scalar_t* gw = grad_w + ncw * taps * positions + p;
    for (int a = 0; a < ksize; ++a) {
      const int r = san_source(i * stride - pad + a * dil, height, reflect);
      for (int b = 0; b < ksize; ++b) {
        const int s = san_source(j * stride - pad + b * dil, width, reflect);
        acc_t value = 0;
        if (r >= 0 && s >= 0) {
          const int64_t pixel = (int64_t)r * width + s;
          for (int c = cw; c < channels; c += weight_channels) {
            const int64_t nc = first + (c - cw);
            value += TO_ACC(grad_out[nc * positions + p]) * TO_ACC(x[nc * plane + pixel]);
          }
        }
        gw[(a * ksize + b) * positions] = FROM_ACC(value);
      }
    }
  }
}
