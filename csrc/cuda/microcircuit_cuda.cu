// CUDA kernel of the dendritic-microcircuit family (Sacramento, Costa, Bengio & Senn 2018, "S18";
// docs/algorithms/microcircuits.md §6.1-6.2). Same op, arguments and random numbers as
// csrc/cpu/microcircuit_cpu.cpp; the reference is python/bpdl/functional/microcircuit.py
// (full_run).
//
// One launch per time step. Thread block g owns kUnits pyramidal neurons of one layer with
// everything only they read and write (their rows of W, b, W_td, W_pi, of their partner
// interneurons' W_ip, b_ip, of every trace, and their somata), as the CPU blocks do: warps
// compute the dendritic products (one dot product per warp, shuffle-reduced), threads the
// induction terms, the block's rows of T and W are then read and written once, and the somata
// are advanced with their Philox noise. New rates go to the other of two rate buffers, so no
// block reads a rate that another has already advanced; the kernel boundary is the step's
// synchronisation. Every block also filters a slice of the input, r0 <- r0 + (dt/tau_in)(x - r0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#include "bpdl/microcircuit.h"
#include "bpdl/microcircuit_checks.h"
#include "bpdl/microcircuit_host.h"
#include "bpdl/philox.h"

namespace bpdl {
namespace {

using namespace ::bpdl::micro;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kUnits = 4;  // pyramidal neurons per thread block (even: noise pairs stay whole)

// Pyramidal layer k (1..N) and the partner interneurons of layer k - 1 (k >= 2); pointers are
// null where a matrix is absent or fixed. Rates: [s] of step t, [1 - s] being written.
template <typename T>
struct DevLayer {
  int64_t n, n_in, n_up;  // n_k, n_{k-1}, n_{k+1} (0 at the output)
  int64_t first_group;    // thread blocks before this layer's
  T *W, *b, *T_W, *T_b;
  const T* W_td;
  T *W_pi, *T_pi;
  T *W_ip, *b_ip, *T_ip, *T_bip;
  T c_W, c_b, c_pi, c_ip, c_bip;  // dt eta
  T *u, *u_I;
  const T* u_trgt;
  T* R[2];
  T* R_in[2];
  T* R_up[2];
  T* RI_k[2];
  T* RI_own[2];
  T *vB, *vA, *vI, *eW, *eI, *eA;  // scratch (B, n)
  T basal_factor;
  uint32_t stream_P, stream_I;
};

template <typename T>
struct DevNet {
  const DevLayer<T>* layers;
  int N;
  int64_t B, n0;
  T g_lk, g_B, g_A, g_D, g_som, g_som_I, dt, keep, a, in_rate, int_factor, sq, theta, gamma;
  double beta;
  bool noise;
  const int64_t* example;
  uint64_t seed;
  const T* x;
  const T* r0;  // the state's filtered input
  T* R0[2];
};

template <typename T, int Transfer>
__device__ __forceinline__ T phi(T x, const DevNet<T>& net) {
  if constexpr (Transfer == kSoftRelu) {
    const T xt = x - net.theta;
    const double z = static_cast<double>(xt) * net.beta;
    const double sp = z > kSoftplusThreshold ? static_cast<double>(xt) : log1p(exp(z)) / net.beta;
    return net.gamma * static_cast<T>(sp);
  } else {
    return static_cast<T>(1.0 / (1.0 + exp(-static_cast<double>(x))));
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// sum_i M[i] p[i] by the lanes of one warp (the result in lane 0).
template <typename T>
__device__ __forceinline__ T warp_dot(const T* __restrict__ M, const T* __restrict__ p,
                                      int64_t K, int lane) {
  T acc = T(0);
  for (int64_t i = lane; i < K; i += 32) acc += M[i] * p[i];
  return warp_sum(acc);
}

// Box-Muller on two Philox words, as the reference's noise(): sqrt(-2 log u0) cos(2 pi u1) with
// u = (w + 0.5) 2^-32.
__device__ __forceinline__ double box_muller(uint32_t w0, uint32_t w1) {
  const double u0 = (static_cast<double>(w0) + 0.5) * 2.3283064365386962890625e-10;
  const double u1 = (static_cast<double>(w1) + 0.5) * 2.3283064365386962890625e-10;
  return sqrt(-2.0 * log(u0)) * cospi(2.0 * u1);
}

// T <- (1 - a) T + a sum_b e[b] pre[b], W <- W + c T for row `row` of a (rows, K) matrix.
template <typename T, bool Apply>
__device__ __forceinline__ void update_row(T* __restrict__ W, T* __restrict__ Tm, int64_t K,
                                           const T* __restrict__ e, int64_t e_stride,
                                           const T* __restrict__ pre, int64_t B, T keep, T a,
                                           T c) {
  for (int64_t i = threadIdx.x; i < K; i += blockDim.x) {
    T g = T(0);
    for (int64_t b = 0; b < B; ++b) g += e[b * e_stride] * pre[b * K + i];
    const T t = Tm[i] * keep + g * a;
    Tm[i] = t;
    if (Apply) W[i] = W[i] + t * c;
  }
}

template <typename T, int Transfer, bool Apply>
__global__ void __launch_bounds__(kThreads)
microcircuit_step_kernel(DevNet<T> net, int64_t total_groups, int s, uint32_t step) {
  const int64_t B = net.B;
  // the input filter: a grid-stride slice of r0
  {
    const T* r0 = net.R0[s];
    T* r0_next = net.R0[1 - s];
    const int64_t m = B * net.n0;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < m;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x)
      r0_next[i] = r0[i] + net.in_rate * (net.x[i] - r0[i]);
  }
  const int64_t g = blockIdx.x;
  int li = 0;
  while (li + 1 < net.N && net.layers[li + 1].first_group <= g) ++li;
  const DevLayer<T>& ly = net.layers[li];
  const int64_t n = ly.n, n_in = ly.n_in, n_up = ly.n_up;
  const int64_t j0 = (g - ly.first_group) * kUnits;
  const int U = static_cast<int>(n - j0 < kUnits ? n - j0 : kUnits);
  const bool hidden = n_up > 0;
  const bool inter = ly.W_ip != nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* pre = ly.R_in[s];

  // dendrites from the rates of step t: one (segment, neuron, lane) dot product per warp
  const int segs = 1 + (inter ? 1 : 0) + (hidden ? 1 : 0);
  const int64_t tasks = static_cast<int64_t>(segs) * U * B;
  for (int64_t task = warp; task < tasks; task += kWarps) {
    const int seg = static_cast<int>(task / (U * B));
    const int64_t rb = task % (U * B);
    const int r = static_cast<int>(rb / B);
    const int64_t b = rb % B;
    const int64_t j = j0 + r;
    const int kind = seg == 0 ? 0 : (inter && seg == 1 ? 1 : 2);  // basal, interneuron, apical
    if (kind == 0) {
      const T v = warp_dot(ly.W + j * n_in, pre + b * n_in, n_in, lane);
      if (lane == 0) ly.vB[b * n + j] = v + ly.b[j];
    } else if (kind == 1) {
      const T v = warp_dot(ly.W_ip + j * n_in, pre + b * n_in, n_in, lane);
      if (lane == 0) ly.vI[b * n + j] = v + ly.b_ip[j];
    } else {
      const T td = warp_dot(ly.W_td + j * n_up, ly.R_up[s] + b * n_up, n_up, lane);
      const T pi = warp_dot(ly.W_pi + j * n_up, ly.RI_k[s] + b * n_up, n_up, lane);
      if (lane == 0) ly.vA[b * n + j] = td + pi;
    }
  }
  __syncthreads();

  // induction terms: phi(u) - phi(a_k v_B), phi(u^I) - phi(d v^I), -v_A
  for (int64_t rb = threadIdx.x; rb < U * B; rb += blockDim.x) {
    const int64_t b = rb / U;
    const int64_t o = b * n + j0 + rb % U;
    ly.eW[o] = ly.R[s][o] - phi<T, Transfer>(ly.basal_factor * ly.vB[o], net);
    if (inter) ly.eI[o] = ly.RI_own[s][o] - phi<T, Transfer>(net.int_factor * ly.vI[o], net);
    if (hidden) ly.eA[o] = -ly.vA[o];
  }
  __syncthreads();

  // traces and weights of the block's rows, each element read and written once
  for (int r = 0; r < U; ++r) {
    const int64_t j = j0 + r;
    if (ly.T_W)
      update_row<T, Apply>(ly.W + j * n_in, ly.T_W + j * n_in, n_in, ly.eW + j, n, pre, B,
                           net.keep, net.a, ly.c_W);
    if (inter && ly.T_ip)
      update_row<T, Apply>(ly.W_ip + j * n_in, ly.T_ip + j * n_in, n_in, ly.eI + j, n, pre, B,
                           net.keep, net.a, ly.c_ip);
    if (hidden && ly.T_pi)
      update_row<T, Apply>(ly.W_pi + j * n_up, ly.T_pi + j * n_up, n_up, ly.eA + j, n,
                           ly.RI_k[s], B, net.keep, net.a, ly.c_pi);
  }
  if (threadIdx.x < U) {
    const int64_t j = j0 + threadIdx.x;
    if (ly.T_b) {
      T gsum = T(0);
      for (int64_t b = 0; b < B; ++b) gsum += ly.eW[b * n + j];
      const T t = ly.T_b[j] * net.keep + gsum * net.a;
      ly.T_b[j] = t;
      if (Apply) ly.b[j] = ly.b[j] + t * ly.c_b;
    }
    if (inter && ly.T_bip) {
      T gsum = T(0);
      for (int64_t b = 0; b < B; ++b) gsum += ly.eI[b * n + j];
      const T t = ly.T_bip[j] * net.keep + gsum * net.a;
      ly.T_bip[j] = t;
      if (Apply) ly.b_ip[j] = ly.b_ip[j] + t * ly.c_bip;
    }
  }

  // somata, one thread per (neuron pair, lane): u <- u + dt du/dt, then + sigma sqrt(dt) xi
  const int npairs = (U + 1) / 2;
  const int nxt = 1 - s;
  for (int64_t pb = threadIdx.x; pb < npairs * B; pb += blockDim.x) {
    const int p = static_cast<int>(pb % npairs);
    const int64_t b = pb / npairs;
    const int64_t pair = j0 / 2 + p;
    double zP[2] = {0.0, 0.0}, zI[2] = {0.0, 0.0};
    if (net.noise) {
      const Philox4 w = noise_block(net.seed, pair, net.example[b], step, ly.stream_P);
      zP[0] = box_muller(w.v[0], w.v[1]);
      zP[1] = box_muller(w.v[2], w.v[3]);
      if (inter) {
        const Philox4 wi = noise_block(net.seed, pair, net.example[b], step, ly.stream_I);
        zI[0] = box_muller(wi.v[0], wi.v[1]);
        zI[1] = box_muller(wi.v[2], wi.v[3]);
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int r = 2 * p + h;
      if (r >= U) break;
      const int64_t o = b * n + j0 + r;
      const T x = ly.u[o];
      if (inter) {
        // the interneuron first: it reads its partner's potential of step t
        const T xi = ly.u_I[o];
        const T d = -net.g_lk * xi + net.g_D * (ly.vI[o] - xi) + net.g_som_I * (x - xi);
        T ui = xi + net.dt * d;
        if (net.noise) ui = ui + net.sq * static_cast<T>(zI[h]);
        ly.u_I[o] = ui;
        ly.RI_own[nxt][o] = phi<T, Transfer>(ui, net);
      }
      T d = -net.g_lk * x + net.g_B * (ly.vB[o] - x);
      if (hidden)
        d = d + net.g_A * (ly.vA[o] - x);
      else if (ly.u_trgt)
        d = d + net.g_som * (ly.u_trgt[o] - x);
      T u = x + net.dt * d;
      if (net.noise) u = u + net.sq * static_cast<T>(zP[h]);
      ly.u[o] = u;
      ly.R[nxt][o] = phi<T, Transfer>(u, net);
    }
  }
}

// The rates of the initial state: phi(u) and phi(u^I) into buffer 0, r0 copied.
template <typename T, int Transfer>
__global__ void microcircuit_initial_rates_kernel(DevNet<T> net) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int li = 0; li < net.N; ++li) {
    const DevLayer<T>& ly = net.layers[li];
    for (int64_t i = start; i < net.B * ly.n; i += stride) {
      ly.R[0][i] = phi<T, Transfer>(ly.u[i], net);
      if (ly.u_I) ly.RI_own[0][i] = phi<T, Transfer>(ly.u_I[i], net);
    }
  }
  for (int64_t i = start; i < net.B * net.n0; i += stride) net.R0[0][i] = net.r0[i];
}

template <typename T, int Transfer>
void run_typed(at::TensorList weights, at::TensorList traces, at::TensorList state,
               const at::Tensor& x, const std::optional<at::Tensor>& u_trgt,
               const at::Tensor& example, at::ArrayRef<double> etas, int64_t step0, int64_t steps,
               int64_t seed, at::ArrayRef<double> c, bool apply_last,
               const std::vector<int64_t>& n) {
  const Layout Lo{static_cast<int64_t>(state.size()) / 2};
  const int64_t N = Lo.N;
  const int64_t B = x.size(0);
  auto opts = x.options();
  std::vector<at::Tensor> keep_alive;
  auto buffer = [&](int64_t rows, int64_t cols) {
    keep_alive.push_back(at::empty({rows, cols}, opts));
    return keep_alive.back().mutable_data_ptr<T>();
  };
  std::vector<std::array<T*, 2>> R(N + 1), RI(N);
  for (int64_t k = 0; k <= N; ++k) R[k] = {buffer(B, n[k]), buffer(B, n[k])};
  for (int64_t k = 1; k < N; ++k) RI[k] = {buffer(B, n[k + 1]), buffer(B, n[k + 1])};
  std::vector<DevLayer<T>> layers(N);
  int64_t groups = 0;
  for (int64_t k = 1; k <= N; ++k) {
    DevLayer<T>& ly = layers[k - 1];
    std::memset(&ly, 0, sizeof(ly));
    set_layer<T>(ly, k, Lo, n, weights, traces, state, etas, c, u_trgt, R, RI);
    ly.first_group = groups;
    groups += (n[k] + kUnits - 1) / kUnits;
    ly.vB = buffer(B, n[k]);
    ly.vA = buffer(B, n[k]);
    ly.vI = buffer(B, n[k]);
    ly.eW = buffer(B, n[k]);
    ly.eI = buffer(B, n[k]);
    ly.eA = buffer(B, n[k]);
  }
  // the layer descriptors, copied to the device once per call
  const int64_t bytes = static_cast<int64_t>(sizeof(DevLayer<T>)) * N;
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.mutable_data_ptr<uint8_t>(), layers.data(), bytes);
  const at::Tensor dev = host.to(x.device());

  DevNet<T> net;
  std::memset(&net, 0, sizeof(net));
  net.layers = reinterpret_cast<const DevLayer<T>*>(dev.const_data_ptr<uint8_t>());
  net.N = static_cast<int>(N);
  net.B = B;
  net.n0 = n[0];
  set_constants(net, c);
  net.example = example.const_data_ptr<int64_t>();
  net.seed = static_cast<uint64_t>(seed);
  net.x = x.const_data_ptr<T>();
  net.R0[0] = R[0][0];
  net.R0[1] = R[0][1];

  at::Tensor r0_state = state[Lo.r0()];
  net.r0 = r0_state.const_data_ptr<T>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  microcircuit_initial_rates_kernel<T, Transfer><<<64, kThreads, 0, stream>>>(net);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t t = 0; t < steps; ++t) {
    const int s = static_cast<int>(t & 1);
    const uint32_t step = static_cast<uint32_t>(step0 + t);
    // apply_last = false: the last step's trace is the caller's pseudo-gradient, W stays
    if (apply_last || t + 1 < steps)
      microcircuit_step_kernel<T, Transfer, true>
          <<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(net, groups, s, step);
    else
      microcircuit_step_kernel<T, Transfer, false>
          <<<static_cast<unsigned>(groups), kThreads, 0, stream>>>(net, groups, s, step);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (steps > 0)
    C10_CUDA_CHECK(cudaMemcpyAsync(r0_state.mutable_data_ptr<T>(), R[0][steps & 1],
                                   sizeof(T) * static_cast<size_t>(B * n[0]),
                                   cudaMemcpyDeviceToDevice, stream));
  // the scratch buffers are freed through the caching allocator, which orders their reuse on
  // this stream after the kernels above
}

void microcircuit_run_cuda(at::TensorList weights, at::TensorList traces, at::TensorList state,
                           const at::Tensor& x_, const std::optional<at::Tensor>& u_trgt_,
                           const at::Tensor& example_, at::ArrayRef<double> etas, int64_t step0,
                           int64_t steps, int64_t seed, at::ArrayRef<double> constants,
                           int64_t transfer, bool apply_last) {
  const std::vector<int64_t> n = check_run_args(weights, traces, state, x_, u_trgt_, example_,
                                                etas, step0, steps, seed, constants, transfer);
  const c10::cuda::CUDAGuard guard(x_.device());
  const at::Tensor x = x_.contiguous();
  const std::optional<at::Tensor> u_trgt =
      u_trgt_.has_value() ? std::optional<at::Tensor>(u_trgt_->contiguous()) : std::nullopt;
  const at::Tensor example = example_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "microcircuit_run_cuda", [&] {
    if (transfer == kSoftRelu)
      run_typed<scalar_t, kSoftRelu>(weights, traces, state, x, u_trgt, example, etas, step0,
                                     steps, seed, constants, apply_last, n);
    else
      run_typed<scalar_t, kLogistic>(weights, traces, state, x, u_trgt, example, etas, step0,
                                     steps, seed, constants, apply_last, n);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CUDA, m) {
  m.impl("microcircuit_run", &microcircuit_run_cuda);
}

}  // namespace bpdl
