// CUDA kernels of the locally connected (unshared convolution) family; same math as
// csrc/cpu/locally_connected_cpu.cpp and python/bpdl/functional/locally_connected.py.
//
//   forward      one tiled GEMM per location p: Y_p (N, O) = X_p (N, K) @ W_p^T, the patch
//                matrix X_p gathered from the input on the fly (never stored)
//   grad_weight  one tiled GEMM per location:   dW_p (O, K) = G_p^T (O, N) @ X_p (N, K)
//   grad_input   one thread per input element, summing over the locations whose patch covers
//                it (no atomics, deterministic)
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "bpdl/locally_connected.h"

namespace bpdl {
namespace {

constexpr int kTile = 16;

struct DevGeometry {
  int64_t N, C, H, W, O, OH, OW, KH, KW, SH, SW, PT, PL, K, P;
};

DevGeometry to_device(const LCGeometry& g) {
  return DevGeometry{g.N,  g.C,  g.H,  g.W,  g.O,  g.OH, g.OW,  g.KH,
                     g.KW, g.SH, g.SW, g.PT, g.PL, g.K(), g.P()};
}

// X_p[n, k]: the input value under patch entry k = (c*KH + u)*KW + v of location p, or 0.
template <typename scalar_t>
__device__ __forceinline__ scalar_t patch_value(const scalar_t* __restrict__ x,
                                                const DevGeometry& g, int64_t n, int64_t k,
                                                int64_t i, int64_t j) {
  const int64_t v = k % g.KW;
  const int64_t u = (k / g.KW) % g.KH;
  const int64_t c = k / (g.KW * g.KH);
  const int64_t h = i * g.SH + u - g.PT;
  const int64_t w = j * g.SW + v - g.PL;
  if (h < 0 || h >= g.H || w < 0 || w >= g.W) return scalar_t(0);
  return x[((n * g.C + c) * g.H + h) * g.W + w];
}

// grid (ceil(O/T), ceil(N/T), P), block (T, T): thread (tx, ty) computes Y[n0+ty, o0+tx, p].
template <typename scalar_t>
__global__ void lc_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                  scalar_t* __restrict__ y, DevGeometry g) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ scalar_t xs[kTile][kTile + 1];  // [n][k]
  __shared__ scalar_t ws[kTile][kTile + 1];  // [o][k]
  const int64_t p = blockIdx.z;
  const int64_t i = p / g.OW, j = p % g.OW;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t o0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const scalar_t* wp = w + p * g.O * g.K;
  acc_t acc = 0;
  for (int64_t k0 = 0; k0 < g.K; k0 += kTile) {
    const int64_t k = k0 + tx;
    const int64_t n = n0 + ty;
    xs[ty][tx] = (n < g.N && k < g.K) ? patch_value(x, g, n, k, i, j) : scalar_t(0);
    const int64_t o = o0 + ty;
    ws[ty][tx] = (o < g.O && k < g.K) ? wp[o * g.K + k] : scalar_t(0);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTile; ++kk)
      acc += static_cast<acc_t>(xs[ty][kk]) * static_cast<acc_t>(ws[tx][kk]);
    __syncthreads();
  }
  const int64_t n = n0 + ty, o = o0 + tx;
  if (n < g.N && o < g.O) y[(n * g.O + o) * g.P + p] = static_cast<scalar_t>(acc);
}

// grid (ceil(K/T), ceil(O/T), P), block (T, T): thread (tx, ty) computes dW[p, o0+ty, k0+tx].
template <typename scalar_t>
__global__ void lc_grad_weight_kernel(const scalar_t* __restrict__ grad_out,
                                      const scalar_t* __restrict__ x,
                                      scalar_t* __restrict__ grad_w, DevGeometry g) {
  using acc_t = at::acc_type<scalar_t, true>;
  __shared__ scalar_t gs[kTile][kTile + 1];  // [n][o]
  __shared__ scalar_t xs[kTile][kTile + 1];  // [n][k]
  const int64_t p = blockIdx.z;
  const int64_t i = p / g.OW, j = p % g.OW;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  acc_t acc = 0;
  for (int64_t n0 = 0; n0 < g.N; n0 += kTile) {
    const int64_t n = n0 + ty;
    const int64_t o = o0 + tx;
    gs[ty][tx] = (n < g.N && o < g.O) ? grad_out[(n * g.O + o) * g.P + p] : scalar_t(0);
    const int64_t k = k0 + tx;
    xs[ty][tx] = (n < g.N && k < g.K) ? patch_value(x, g, n, k, i, j) : scalar_t(0);
    __syncthreads();
#pragma unroll
    for (int nn = 0; nn < kTile; ++nn)
      acc += static_cast<acc_t>(gs[nn][ty]) * static_cast<acc_t>(xs[nn][tx]);
    __syncthreads();
  }
  const int64_t o = o0 + ty, k = k0 + tx;
  if (o < g.O && k < g.K) grad_w[(p * g.O + o) * g.K + k] = static_cast<scalar_t>(acc);
}

// One thread per input element (n, c, h, w): sum over the locations (i, j) whose patch covers
// it and over the output channels o of G[n, o, i, j] * W[i, j, o, c, u, v].
template <typename scalar_t>
__global__ void lc_grad_input_kernel(const scalar_t* __restrict__ grad_out,
                                     const scalar_t* __restrict__ w,
                                     scalar_t* __restrict__ grad_x, DevGeometry g,
                                     int64_t total) {
  using acc_t = at::acc_type<scalar_t, true>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t wcol = idx % g.W;
    const int64_t h = (idx / g.W) % g.H;
    const int64_t c = (idx / (g.W * g.H)) % g.C;
    const int64_t n = idx / (g.W * g.H * g.C);
    // rows i with 0 <= h + PT - i*SH < KH, i.e. (h + PT - KH) / SH < i <= (h + PT) / SH
    const int64_t hp = h + g.PT, wp = wcol + g.PL;
    const int64_t i_hi = min(hp / g.SH, g.OH - 1);
    const int64_t j_hi = min(wp / g.SW, g.OW - 1);
    const int64_t i_lo = hp >= g.KH ? (hp - g.KH) / g.SH + 1 : 0;
    const int64_t j_lo = wp >= g.KW ? (wp - g.KW) / g.SW + 1 : 0;
    acc_t acc = 0;
    for (int64_t i = i_lo; i <= i_hi; ++i) {
      const int64_t u = hp - i * g.SH;
      for (int64_t j = j_lo; j <= j_hi; ++j) {
        const int64_t v = wp - j * g.SW;
        const int64_t p = i * g.OW + j;
        const scalar_t* wrow = w + ((p * g.O) * g.C + c) * g.KH * g.KW + u * g.KW + v;
        const scalar_t* grow = grad_out + n * g.O * g.P + p;
        for (int64_t o = 0; o < g.O; ++o)
          acc += static_cast<acc_t>(grow[o * g.P]) *
                 static_cast<acc_t>(wrow[o * g.C * g.KH * g.KW]);
      }
    }
    grad_x[idx] = static_cast<scalar_t>(acc);
  }
}

int grid_for(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535 * 8));
}

void check_grid(const LCGeometry& g, const char* op) {
  TORCH_CHECK(g.P() <= 65535, "bpdl.", op, ": at most 65535 output locations on CUDA, got ",
              g.P());
  TORCH_CHECK((g.N + kTile - 1) / kTile <= 65535 && (g.O + kTile - 1) / kTile <= 65535, "bpdl.",
              op, ": batch or channel count too large for one CUDA launch");
}

at::Tensor lc_forward_cuda(const at::Tensor& input, const at::Tensor& weight,
                           at::IntArrayRef stride, at::IntArrayRef padding) {
  const LCGeometry g = lc_forward_geometry(input, weight, stride, padding);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({g.N, g.O, g.OH, g.OW}, x.options());
  if (out.numel() == 0) return out;
  check_grid(g, "locally_connected2d");
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned>((g.O + kTile - 1) / kTile),
                  static_cast<unsigned>((g.N + kTile - 1) / kTile), static_cast<unsigned>(g.P()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "locally_connected2d_cuda", [&] {
    lc_forward_kernel<scalar_t><<<grid, block, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), to_device(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor lc_grad_weight_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                               at::IntArrayRef kernel_size, at::IntArrayRef stride,
                               at::IntArrayRef padding) {
  const LCGeometry g = lc_grad_weight_geometry(grad_output, input, kernel_size, stride, padding);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_output.contiguous();
  at::Tensor grad = at::empty({g.OH, g.OW, g.O, g.C, g.KH, g.KW}, x.options());
  if (grad.numel() == 0) return grad;
  if (g.N == 0) return grad.zero_();
  check_grid(g, "locally_connected2d_grad_weight");
  TORCH_CHECK((g.K() + kTile - 1) / kTile <= INT32_MAX, "bpdl.locally_connected2d_grad_weight: "
              "patch too large for one CUDA launch");
  const dim3 block(kTile, kTile);
  const dim3 grid(static_cast<unsigned>((g.K() + kTile - 1) / kTile),
                  static_cast<unsigned>((g.O + kTile - 1) / kTile), static_cast<unsigned>(g.P()));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "locally_connected2d_grad_weight_cuda", [&] {
    lc_grad_weight_kernel<scalar_t><<<grid, block, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
        grad.mutable_data_ptr<scalar_t>(), to_device(g));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

at::Tensor lc_grad_input_cuda(const at::Tensor& grad_output, const at::Tensor& weight,
                              at::IntArrayRef input_size, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  const LCGeometry g = lc_grad_input_geometry(grad_output, weight, input_size, stride, padding);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor grad = at::empty({g.N, g.C, g.H, g.W}, go.options());
  const int64_t total = grad.numel();
  if (total == 0) return grad;
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "locally_connected2d_grad_input_cuda", [&] {
    lc_grad_input_kernel<scalar_t><<<grid_for(total, threads), threads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
        grad.mutable_data_ptr<scalar_t>(), to_device(g), total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CUDA, m) {
  m.impl("locally_connected2d", &lc_forward_cuda);
  m.impl("locally_connected2d_grad_input", &lc_grad_input_cuda);
  m.impl("locally_connected2d_grad_weight", &lc_grad_weight_cuda);
}

}  // namespace bpdl
