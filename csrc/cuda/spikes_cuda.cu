// CUDA kernels of the spike-generation family. Same counter-based draws as csrc/cpu/spikes_cpu.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "bpdl/checks.h"
#include "bpdl/philox.h"

namespace bpdl {
namespace {

template <typename scalar_t>
__global__ void poisson_spikes_kernel(const scalar_t* __restrict__ rate, scalar_t* __restrict__ out,
                                      int64_t n, uint64_t seed, uint64_t step, uint64_t stream,
                                      double dt) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const double u = philox_uniform(seed, step, stream, static_cast<uint64_t>(i));
    const double lambda = __dmul_rn(static_cast<double>(rate[i]), dt);
    out[i] = static_cast<scalar_t>(poisson_from_uniform(u, lambda));
  }
}

at::Tensor poisson_spikes_cuda(const at::Tensor& rate, int64_t seed, int64_t step, int64_t stream,
                               double dt) {
  check_poisson_args(rate, seed, step, stream, dt);
  const c10::cuda::CUDAGuard guard(rate.device());
  const at::Tensor r = rate.contiguous();
  at::Tensor out = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t n = r.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks64 = (n + threads - 1) / threads;
  const int blocks = static_cast<int>(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
  auto cuda_stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "poisson_spikes_cuda", [&] {
    poisson_spikes_kernel<scalar_t><<<blocks, threads, 0, cuda_stream>>>(
        r.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(step), static_cast<uint64_t>(stream), dt);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CUDA, m) {
  m.impl("poisson_spikes", &poisson_spikes_cuda);
}

}  // namespace bpdl
