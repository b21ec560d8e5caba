// CUDA kernel of direct feedback alignment with regenerated feedback: out = error @ D with the
// entries of D drawn inside the kernel (bpdl/dfa.h), tile by tile, and never stored.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "bpdl/dfa.h"

namespace bpdl {
namespace {

constexpr int kCols = 32;        // columns j per block (threadIdx.x)
constexpr int kRowThreads = 8;   // threadIdx.y
constexpr int kRowsPerThread = 4;
constexpr int kRows = kRowThreads * kRowsPerThread;  // batch rows per block
constexpr int kChunk = 32;       // rows k of D generated per shared-memory tile

// grid (ceil(M / kCols), ceil(N / kRows)): each block regenerates D[k0:k0+kChunk, j0:j0+kCols]
// into shared memory and accumulates its kRows x kCols block of the output.
template <typename scalar_t>
__global__ void dfa_project_kernel(const scalar_t* __restrict__ error, scalar_t* __restrict__ out,
                                   int64_t N, int64_t L, int64_t M, uint64_t seed,
                                   uint64_t stream, double scale) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ scalar_t dtile[kChunk][kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const int64_t n_base = static_cast<int64_t>(blockIdx.y) * kRows;
  acc_t acc[kRowsPerThread];
#pragma unroll
  for (int r = 0; r < kRowsPerThread; ++r) acc[r] = 0;
  for (int64_t k0 = 0; k0 < L; k0 += kChunk) {
    for (int kk = ty; kk < kChunk; kk += kRowThreads) {
      const int64_t k = k0 + kk;
      dtile[kk][tx] = (k < L && j < M)
          ? static_cast<scalar_t>(dfa_feedback_value(seed, stream, static_cast<uint64_t>(k * M + j),
                                                     scale))
          : scalar_t(0);
    }
    __syncthreads();
    const int64_t kmax = min(static_cast<int64_t>(kChunk), L - k0);
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int64_t n = n_base + ty + r * kRowThreads;
      if (n < N) {
        const scalar_t* erow = error + n * L + k0;
        for (int64_t kk = 0; kk < kmax; ++kk)
          acc[r] += static_cast<acc_t>(erow[kk]) * static_cast<acc_t>(dtile[kk][tx]);
      }
    }
    __syncthreads();
  }
  if (j < M) {
#pragma unroll
    for (int r = 0; r < kRowsPerThread; ++r) {
      const int64_t n = n_base + ty + r * kRowThreads;
      if (n < N) out[n * M + j] = static_cast<scalar_t>(acc[r]);
    }
  }
}

at::Tensor dfa_project_cuda(const at::Tensor& error, int64_t num_features, int64_t seed,
                            int64_t stream, double scale) {
  check_dfa_project_args(error, num_features, seed, stream, scale);
  const c10::cuda::CUDAGuard guard(error.device());
  const at::Tensor e = error.contiguous();
  const int64_t N = e.size(0), L = e.size(1), M = num_features;
  at::Tensor out = at::zeros({N, M}, e.options());
  if (out.numel() == 0 || L == 0) return out;
  const int64_t gx = (M + kCols - 1) / kCols, gy = (N + kRows - 1) / kRows;
  TORCH_CHECK(gx <= INT32_MAX && gy <= 65535, "bpdl.dfa_project: problem too large for one "
              "CUDA launch (", N, " rows, ", M, " features)");
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  const dim3 block(kCols, kRowThreads);
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "dfa_project_cuda", [&] {
    dfa_project_kernel<scalar_t><<<grid, block, 0, cuda_stream>>>(
        e.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), N, L, M,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(stream), scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CUDA, m) {
  m.impl("dfa_project", &dfa_project_cuda);
}

}  // namespace bpdl
