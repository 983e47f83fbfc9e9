// Lets grid-stride CUDA kernels compile unchanged as C++ for the CPU.
//
// A kernel written as
//     __global__ void f(...) { for (int64_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n;
//                                   i += blockDim.x * gridDim.x) { ... } }
// runs here once per (block, thread) pair of the launch grid (see the generated launchers), so a
// small grid exercises the grid-stride loop exactly as a GPU with few resident threads would.
// Only what such kernels use is defined: no __shared__, __syncthreads or warp intrinsics.
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)

struct san_dim3 {
    unsigned int x, y, z;
};
static thread_local san_dim3 threadIdx = {0, 0, 0};
static thread_local san_dim3 blockIdx = {0, 0, 0};
static thread_local san_dim3 blockDim = {1, 1, 1};
static thread_local san_dim3 gridDim = {1, 1, 1};

// The generated launchers hold one san_flush_denormals per OpenMP thread while the kernels run:
// denormal (subnormal) results are flushed to 0 and denormal operands read as 0 (x86 FTZ and DAZ,
// AArch64 FPCR.FZ), and the thread's previous mode is restored on return. A denormal operand or
// result costs an x86 core a microcode assist of about a hundred cycles: attention probabilities
// far below the window's largest and the products of them in the backward are denormal in real
// training, and took the attentional RetinaNet's step 1.7x as long (docs/SASA_CPU_PROFILE.md).
#if defined(__x86_64__) || defined(__i386__)
#include <xmmintrin.h>
struct san_flush_denormals {
    static constexpr unsigned int kFtzDaz = 0x8040;  // MXCSR bits 15 (FTZ) and 6 (DAZ)
    unsigned int saved = _mm_getcsr();
    san_flush_denormals() { _mm_setcsr(saved | kFtzDaz); }
    ~san_flush_denormals() { _mm_setcsr(saved); }
};
#elif defined(__aarch64__)
struct san_flush_denormals {
    uint64_t saved;
    san_flush_denormals() {
        __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved));
        __asm__ __volatile__("msr fpcr, %0" : : "r"(saved | (uint64_t(1) << 24)));  // FZ
    }
    ~san_flush_denormals() { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved)); }
};
#else
struct san_flush_denormals {};  // IEEE denormals: slower on such hosts, never wrong
#endif

// Kernels use exp/fmax/fmin/floor on acc_t (float or double): the <cmath> overloads cover both.
using std::exp;
using std::fmax;
using std::fmin;
