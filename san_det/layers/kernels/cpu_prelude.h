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

// Kernels use exp/fmax/fmin/floor on acc_t (float or double): the <cmath> overloads cover both.
using std::exp;
using std::fmax;
using std::fmin;
