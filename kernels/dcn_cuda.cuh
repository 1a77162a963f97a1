// Common definitions of the CUDA kernels in kernels/*.cu (compiled at run time by NVRTC through
// cupy, see dcnbench/ops/cuda.py; compile-checked by nvcc in tests/test_cuda_kernels.py).
//
// Conventions of every kernel here:
// - templates over the storage type T (float, double, __half, __nv_bfloat16); arithmetic in
//   Acc<T>::type (double for double, float otherwise); gradients that are accumulated are written
//   into buffers of the accumulation type, which the host casts to T afterwards;
// - integer arguments are `long long`, real arguments `double`, so the host passes one ABI for
//   every dtype;
// - one grid-stride loop over a flat index (DCN_KERNEL_LOOP), no shared memory, no warp
//   intrinsics: the tests also compile these files as host C++ (one emulated thread, see
//   tests/test_cuda_kernels.py) and run them on the CPU against the reference.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#define DCN_DEVICE __device__ __forceinline__
#else
#define DCN_DEVICE inline
#endif

#include "dcn_math.h"

namespace dcn {

typedef long long index_t;

template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

template <typename A, typename T>
DCN_DEVICE A load(const T* p, index_t i) { return static_cast<A>(p[i]); }

template <typename T, typename A>
DCN_DEVICE void store(T* p, index_t i, A v) { p[i] = static_cast<T>(v); }

}  // namespace dcn

// for (index_t i = global thread index; i < n; i += total threads)
#define DCN_KERNEL_LOOP(i, n)                                                          \
  for (::dcn::index_t i = ::dcn::index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += ::dcn::index_t(blockDim.x) * gridDim.x)
