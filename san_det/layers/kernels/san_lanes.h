// Lane vectors: SAN_TJ consecutive pixels of one image row, handled by one kernel thread; and the
// grid-stride loop every kernel file shares.
//
// Kernels that include this file are written once over
// `san_vec`, a vector of SAN_TJ acc_t lanes, and `san_mask`, a set of lanes:
//
// - On the GPU SAN_TJ is 1: `san_vec` is acc_t, `san_mask` a bool and every function below is the
//   scalar operation (neighbouring threads handle neighbouring pixels, so their loads coalesce).
// - On the CPU SAN_TJ > 1 (a power of two): `san_vec` is a GCC vector of SAN_TJ lanes, lowered to
//   the instruction set the library is compiled for (SSE2, AVX2 or AVX-512). Where the vector is
//   exactly one AVX-512 or AVX2 register, masked loads and stores are single instructions and
//   `san_mask` is the ISA's mask (a k-register bit set, a vector of all-ones lanes); otherwise
//   they are lane loops over a lane range. The CPU build computes in float or double
//   (scalar_t == acc_t, SAN_ACC_BYTES == sizeof(acc_t)).
//
// san_lanes(lo, hi) is the lane range [lo, hi) (clamped to [0, SAN_TJ)); a masked load reads 0
// in the other lanes and never touches their memory, a masked store leaves it alone, so a mask
// may describe a row's border where the vector would reach outside the image or the tensor.
// Masks are meant to be built once and used for many loads.

// The tile macros' defaults (the launcher passes -DSAN_TJ=... -DSAN_CG=...): one pixel and four
// channels per thread.
#ifndef SAN_TJ
#define SAN_TJ 1
#endif
#ifndef SAN_CG
#define SAN_CG 4
#endif

// The lanes of a tile starting at column j0 that are pixels of a row of `width` (SAN_TJ but at
// the row's end), and the channels of group `grp` of SAN_CG channels among `channels`.
__device__ __forceinline__ int san_tile_lanes(int width, int j0) {
    return width - j0 < SAN_TJ ? width - j0 : SAN_TJ;
}
__device__ __forceinline__ int san_group_channels(int channels, int grp) {
    return channels - grp * SAN_CG < SAN_CG ? channels - grp * SAN_CG : SAN_CG;
}

// A grid-stride loop over `total` work items (the structure every kernel here has: see
// kernel_runtime.py for how the CPU build runs the grid).
#define SAN_GRID_LOOP(idx, total)                                                   \
    for (int64_t idx = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; idx < (total); \
         idx += (int64_t)blockDim.x * gridDim.x)

// a / b for a non-negative index a and b > 0, in 32 bits when a fits (64-bit division is a long
// instruction sequence on the GPU).
__device__ __forceinline__ int64_t san_div(int64_t a, int b) {
    return a <= 0x7fffffff ? (int64_t)((unsigned)a / (unsigned)b) : a / b;
}

// Fully unroll a loop with a compile-time trip count (tap chunks, channel groups).
#ifdef __CUDACC__
#define SAN_UNROLL _Pragma("unroll")
#else
#define SAN_UNROLL _Pragma("GCC unroll 32")
#endif

#if SAN_TJ == 1

typedef acc_t san_vec;
typedef bool san_mask;

template <class T>
struct san_convert {  // storage <-> accumulation type (half / bfloat16 on the GPU)
    static __device__ __forceinline__ acc_t load(T x) { return TO_ACC(x); }
    static __device__ __forceinline__ T store(acc_t x) { return FROM_ACC(x); }
};
template <>
struct san_convert<acc_t> {  // acc_t buffers (also scalar_t when both are float or double)
    static __device__ __forceinline__ acc_t load(acc_t x) { return x; }
    static __device__ __forceinline__ acc_t store(acc_t x) { return x; }
};

__device__ __forceinline__ san_mask san_lanes(int lo, int hi) { return lo <= 0 && 0 < hi; }
__device__ __forceinline__ san_vec san_vbcast(acc_t x) { return x; }
template <class T>
__device__ __forceinline__ san_vec san_vload(const T* p, san_mask m) {
    return m ? san_convert<T>::load(p[0]) : (acc_t)0;
}
template <class T>
__device__ __forceinline__ void san_vstore(T* p, san_vec x, san_mask m) {
    if (m) p[0] = san_convert<T>::store(x);
}
__device__ __forceinline__ san_vec san_vselect(san_vec x, san_mask m, acc_t fill) {
    return m ? x : fill;
}
__device__ __forceinline__ san_vec san_vmax(san_vec a, san_vec b) { return a > b ? a : b; }
__device__ __forceinline__ san_vec san_vexp(san_vec x) { return exp(x); }
// A hint that the line at p will be read soon: nothing on the GPU.
__device__ __forceinline__ void san_prefetch(const void*) {}
__device__ __forceinline__ acc_t san_vsum(san_vec x) { return x; }
// Lane t (0 here) of x, and x with lane t replaced by `value`.
__device__ __forceinline__ acc_t san_vget(san_vec x, int) { return x; }
__device__ __forceinline__ san_vec san_vset(san_vec, int, acc_t value) { return value; }

#else  // SAN_TJ > 1: the CPU build

#ifdef __CUDACC__
#error "SAN_TJ > 1 is a CPU tile; the CUDA build uses SAN_TJ 1"
#endif
#if (SAN_TJ & (SAN_TJ - 1)) != 0 || SAN_TJ > 32
#error "SAN_TJ must be 1 or a power of two up to 32"
#endif
#include <cstring>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

typedef acc_t san_vec __attribute__((vector_size(SAN_TJ * sizeof(acc_t))));
// Integer lanes as wide as acc_t: comparison results and exponent bits.
typedef std::conditional<sizeof(acc_t) == 4, int32_t, int64_t>::type san_lane_int;
typedef san_lane_int san_ivec __attribute__((vector_size(SAN_TJ * sizeof(acc_t))));

// x - 0 (not x + 0, which differs for x = -0) folds to a plain broadcast.
static inline san_vec san_vbcast(acc_t x) { return x - (san_vec){}; }

static inline san_vec san_iota() {
    san_vec v;
    for (int t = 0; t < SAN_TJ; ++t) v[t] = (acc_t)t;
    return v;
}

static inline int san_clamp_lane(int t) { return t < 0 ? 0 : (t > SAN_TJ ? SAN_TJ : t); }

// All-ones integer lanes for t in [lo, hi).
static inline san_ivec san_lane_vector(int lo, int hi) {
    const san_vec t = san_iota();
    return (t >= (acc_t)lo) & (t < (acc_t)hi);
}

#define SAN_VBYTES (SAN_TJ * SAN_ACC_BYTES)
#if defined(__AVX512F__) && SAN_VBYTES == 64

typedef unsigned san_mask;  // bit t: lane t
static inline san_mask san_lanes(int lo, int hi) {
    lo = san_clamp_lane(lo);
    hi = san_clamp_lane(hi);
    return ((1u << hi) - 1u) & ~((1u << lo) - 1u);  // hi <= 16
}
// The float (_ps) or double (_pd) form of an AVX-512 intrinsic, and its mask and register types.
#if SAN_ACC_BYTES == 4
#define SAN_512(op) op##_ps
typedef __mmask16 san_kmask;
typedef __m512 san_m512;
#else
#define SAN_512(op) op##_pd
typedef __mmask8 san_kmask;
typedef __m512d san_m512;
#endif
static inline san_vec san_vload(const acc_t* p, san_mask m) {
    return (san_vec)SAN_512(_mm512_maskz_loadu)((san_kmask)m, p);
}
static inline void san_vstore(acc_t* p, san_vec x, san_mask m) {
    SAN_512(_mm512_mask_storeu)(p, (san_kmask)m, (san_m512)x);
}
static inline san_vec san_vselect(san_vec x, san_mask m, acc_t fill) {
    return (san_vec)SAN_512(_mm512_mask_mov)(SAN_512(_mm512_set1)(fill), (san_kmask)m, (san_m512)x);
}

#elif defined(__AVX2__) && SAN_VBYTES == 32

typedef san_ivec san_mask;  // all-ones lanes
static inline san_mask san_lanes(int lo, int hi) { return san_lane_vector(lo, hi); }
#if SAN_ACC_BYTES == 4
static inline san_vec san_vload(const acc_t* p, san_mask m) {
    return (san_vec)_mm256_maskload_ps(p, (__m256i)m);
}
static inline void san_vstore(acc_t* p, san_vec x, san_mask m) {
    _mm256_maskstore_ps(p, (__m256i)m, (__m256)x);
}
#else
static inline san_vec san_vload(const acc_t* p, san_mask m) {
    return (san_vec)_mm256_maskload_pd(p, (__m256i)m);
}
static inline void san_vstore(acc_t* p, san_vec x, san_mask m) {
    _mm256_maskstore_pd(p, (__m256i)m, (__m256d)x);
}
#endif
static inline san_vec san_vselect(san_vec x, san_mask m, acc_t fill) {
    return m ? x : san_vbcast(fill);
}

#else  // any other width or ISA: lane loops over [lo, hi)

struct san_mask {
    int lo, hi;
    san_ivec lanes;
};
static inline san_mask san_lanes(int lo, int hi) {
    san_mask m;
    m.lo = san_clamp_lane(lo);
    m.hi = san_clamp_lane(hi);
    m.lanes = san_lane_vector(m.lo, m.hi);
    return m;
}
static inline san_vec san_vload(const acc_t* p, san_mask m) {
    san_vec v;
    if (m.lo == 0 && m.hi == SAN_TJ) {
        std::memcpy(&v, p, sizeof v);
        return v;
    }
    v = (san_vec){};
    for (int t = m.lo; t < m.hi; ++t) v[t] = p[t];
    return v;
}
static inline void san_vstore(acc_t* p, san_vec x, san_mask m) {
    if (m.lo == 0 && m.hi == SAN_TJ) {
        std::memcpy(p, &x, sizeof x);
        return;
    }
    for (int t = m.lo; t < m.hi; ++t) p[t] = x[t];
}
static inline san_vec san_vselect(san_vec x, san_mask m, acc_t fill) {
    return m.lanes ? x : san_vbcast(fill);
}

#endif

static inline san_vec san_vmax(san_vec a, san_vec b) { return a > b ? a : b; }
// A hint that the cache line at p will be read soon (it may lie outside any buffer: a prefetch
// never faults).
static inline void san_prefetch(const void* p) { __builtin_prefetch(p); }

static inline acc_t san_vget(san_vec x, int t) { return x[t]; }
static inline san_vec san_vset(san_vec x, int t, acc_t value) {
    x[t] = value;
    return x;
}

// The sum of all lanes (pairwise: halves added until one lane is left).
static inline acc_t san_vsum(san_vec x) {
    acc_t lanes[SAN_TJ];
    std::memcpy(lanes, &x, sizeof x);
    for (int width = SAN_TJ / 2; width > 0; width /= 2) {
        for (int t = 0; t < width; ++t) lanes[t] += lanes[t + width];
    }
    return lanes[0];
}

// exp on every lane: Cody-Waite reduction x = n ln2 + r, |r| <= ln2 / 2, a polynomial for e^r
// (Cephes' minimax coefficients in float, the Taylor series to r^13 in double) and 2^n built in
// the exponent bits. Arguments are clamped to the range where the result is a normal number.
static inline san_vec san_vexp(san_vec x) {
    if constexpr (sizeof(acc_t) == 4) {
        x = x < (acc_t)-87.33f ? san_vbcast(-87.33f) : x;
        x = x > (acc_t)88.37f ? san_vbcast(88.37f) : x;
        const san_vec shift = san_vbcast(12582912.0f);  // 1.5 * 2^23: adds round to integer
        const san_vec n = (x * (acc_t)1.44269504088896341f + shift) - shift;
        const san_vec r = x - n * (acc_t)0.693359375f - n * (acc_t)-2.12194440e-4f;
        san_vec y = san_vbcast(1.9875691500e-4f);
        y = y * r + (acc_t)1.3981999507e-3f;
        y = y * r + (acc_t)8.3334519073e-3f;
        y = y * r + (acc_t)4.1665795894e-2f;
        y = y * r + (acc_t)1.6666665459e-1f;
        y = y * r + (acc_t)5.0000001201e-1f;
        y = y * (r * r) + r + (acc_t)1;
        const san_ivec bits = (__builtin_convertvector(n, san_ivec) + 127) << 23;
        return y * (san_vec)bits;
    } else {
        x = x < (acc_t)-708.39 ? san_vbcast(-708.39) : x;
        x = x > (acc_t)709.78 ? san_vbcast(709.78) : x;
        const san_vec shift = san_vbcast(6755399441055744.0);  // 1.5 * 2^52
        const san_vec n = (x * (acc_t)1.4426950408889634074 + shift) - shift;
        const san_vec r =
            x - n * (acc_t)6.93147180369123816490e-01 - n * (acc_t)1.90821492927058770002e-10;
        // The Taylor series of e^r to r^13 by Horner's rule (|r| <= 0.35: truncation < 1e-17).
        san_vec y = san_vbcast((acc_t)(1.0 / 6227020800.0));
        y = y * r + (acc_t)(1.0 / 479001600.0);
        y = y * r + (acc_t)(1.0 / 39916800.0);
        y = y * r + (acc_t)(1.0 / 3628800.0);
        y = y * r + (acc_t)(1.0 / 362880.0);
        y = y * r + (acc_t)(1.0 / 40320.0);
        y = y * r + (acc_t)(1.0 / 5040.0);
        y = y * r + (acc_t)(1.0 / 720.0);
        y = y * r + (acc_t)(1.0 / 120.0);
        y = y * r + (acc_t)(1.0 / 24.0);
        y = y * r + (acc_t)(1.0 / 6.0);
        y = y * r + (acc_t)0.5;
        y = y * r + (acc_t)1;
        y = y * r + (acc_t)1;
        const san_ivec bits = (__builtin_convertvector(n, san_ivec) + 1023) << 52;
        return y * (san_vec)bits;
    }
}

#endif  // SAN_TJ

// The largest negative finite acc_t: the logit of a masked lane (its exp is 0, never NaN).
__device__ __forceinline__ acc_t san_lowest() {
    return (acc_t)(sizeof(acc_t) == 8 ? -1.7976931348623157e308 : -3.4028234663852886e38);
}
