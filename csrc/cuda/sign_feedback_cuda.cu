// CUDA kernels of the sign-symmetric feedback family (bpdl/sign_feedback.h); same draws as the
// CPU kernels (uniform magnitudes bit for bit; half-normal ones up to the device's libm).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "bpdl/sign_feedback.h"

namespace bpdl {
namespace {

template <typename scalar_t>
__global__ void sign_feedback_kernel(const scalar_t* __restrict__ w, const scalar_t* __restrict__ m,
                                     bool scalar, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    using op_t = at::opmath_type<scalar_t>;
    out[i] = static_cast<scalar_t>(static_cast<op_t>(sign_of(w[i])) *
                                   static_cast<op_t>(scalar ? m[0] : m[i]));
  }
}

template <typename scalar_t>
__global__ void sign_random_feedback_kernel(const scalar_t* __restrict__ w,
                                            scalar_t* __restrict__ out, int64_t n, uint64_t seed,
                                            uint64_t stream, uint64_t step, int64_t distribution,
                                            float scale) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    float u[4];
    philox_uniform4_f24(seed, step, stream, static_cast<uint64_t>(g), u);
    const int64_t base = 4 * g;
    const int count = static_cast<int>(n - base < 4 ? n - base : 4);
    for (int i = 0; i < count; ++i) {
      const scalar_t mag = static_cast<scalar_t>(magnitude_from_uniforms(u, i, distribution,
                                                                         scale));
      using op_t = at::opmath_type<scalar_t>;
      out[base + i] = static_cast<scalar_t>(static_cast<op_t>(sign_of(w[base + i])) *
                                            static_cast<op_t>(mag));
    }
  }
}

int blocks_for(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>((n + threads - 1) / threads, 1),
                                            65535 * 8));
}

at::Tensor sign_feedback_cuda(const at::Tensor& weight, const at::Tensor& magnitude) {
  check_sign_feedback_args(weight, &magnitude, 0, 0, 0, 0, 1.0);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  const bool scalar = magnitude.dim() == 0;
  const at::Tensor m = magnitude.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel();
  if (n == 0) return out;
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sign_feedback_cuda",
                                  [&] {
    sign_feedback_kernel<scalar_t><<<blocks_for(n, threads), threads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), m.const_data_ptr<scalar_t>(), scalar,
        out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor sign_random_feedback_cuda(const at::Tensor& weight, int64_t seed, int64_t stream_key,
                                     int64_t step, int64_t distribution, double scale) {
  check_sign_feedback_args(weight, nullptr, seed, stream_key, step, distribution, scale);
  const c10::cuda::CUDAGuard guard(weight.device());
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel();
  if (n == 0) return out;
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                  "sign_random_feedback_cuda", [&] {
    sign_random_feedback_kernel<scalar_t><<<blocks_for((n + 3) / 4, threads), threads, 0, stream>>>(
        w.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
        static_cast<uint64_t>(seed), static_cast<uint64_t>(stream_key),
        static_cast<uint64_t>(step), distribution, static_cast<float>(scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CUDA, m) {
  m.impl("sign_feedback", &sign_feedback_cuda);
  m.impl("sign_random_feedback", &sign_random_feedback_cuda);
}

}  // namespace bpdl
