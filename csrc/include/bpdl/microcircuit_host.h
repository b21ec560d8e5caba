// Host-side set-up shared by the CPU and CUDA implementations of bpdl::microcircuit_run. Their
// network and layer descriptors (McNet / McLayer in csrc/cpu/microcircuit_cpu.cpp, DevNet /
// DevLayer in csrc/cuda/microcircuit_cuda.cu) use the same field names, so the scalar constants
// and each layer's pointers, rates and buffers are filled here once for both. Math:
// docs/algorithms/microcircuits.md.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "bpdl/microcircuit.h"

namespace bpdl {
namespace micro {

// The per-call constants of a network descriptor, in the descriptor's precision.
template <typename Net>
void set_constants(Net& net, at::ArrayRef<double> c) {
  using T = decltype(net.g_lk);
  net.g_lk = static_cast<T>(c[kGLk]);
  net.g_B = static_cast<T>(c[kGB]);
  net.g_A = static_cast<T>(c[kGA]);
  net.g_D = static_cast<T>(c[kGD]);
  net.g_som = static_cast<T>(c[kGSom]);
  net.g_som_I = static_cast<T>(c[kGSomI]);
  net.dt = static_cast<T>(c[kDt]);
  const double a = c[kDt] / c[kTauW];
  net.keep = static_cast<T>(1.0 - a);  // the weight traces' low-pass filter
  net.a = static_cast<T>(a);
  net.in_rate = static_cast<T>(c[kDt] / c[kTauIn]);
  net.int_factor = static_cast<T>(c[kGD] / (c[kGLk] + c[kGD]));
  const double sq = c[kSigma] * std::sqrt(c[kDt]);
  net.sq = static_cast<T>(sq);
  net.noise = sq != 0.0;
  net.theta = static_cast<T>(c[kTheta]);
  net.gamma = static_cast<T>(c[kGamma]);
  net.beta = c[kBeta];
}

// Layer k's (1 <= k <= N) sizes, pointers into the op's weight, trace and state lists (null for
// an empty tensor: not plastic), learning rates dt eta, rate buffers (R[k], the two buffers of
// layer k's rates; RI[k], of layer k's interneurons), basal factor and noise streams.
template <typename T, typename Layer>
void set_layer(Layer& ly, int64_t k, const Layout& Lo, const std::vector<int64_t>& n,
               at::TensorList weights, at::TensorList traces, at::TensorList state,
               at::ArrayRef<double> etas, at::ArrayRef<double> c,
               const std::optional<at::Tensor>& u_trgt, const std::vector<std::array<T*, 2>>& R,
               const std::vector<std::array<T*, 2>>& RI) {
  const int64_t N = Lo.N;
  auto ptr = [&](at::TensorList list, int64_t i) -> T* {
    return list[i].numel() ? list[i].mutable_data_ptr<T>() : nullptr;
  };
  auto rate = [&](int64_t i) { return static_cast<T>(c[kDt] * etas[i]); };
  ly.n = n[k];
  ly.n_in = n[k - 1];
  ly.n_up = k < N ? n[k + 1] : 0;
  ly.W = ptr(weights, Lo.W(k));
  ly.b = ptr(weights, Lo.b(k));
  ly.T_W = ptr(traces, Lo.W(k));
  ly.T_b = ptr(traces, Lo.b(k));
  ly.c_W = rate(Lo.W(k));
  ly.c_b = rate(Lo.b(k));
  if (k < N) {
    ly.W_td = ptr(weights, Lo.W_td(k));
    ly.W_pi = ptr(weights, Lo.W_pi(k));
    ly.T_pi = ptr(traces, Lo.W_pi(k));
    ly.c_pi = rate(Lo.W_pi(k));
    for (int s = 0; s < 2; ++s) {
      ly.R_up[s] = R[k + 1][s];
      ly.RI_k[s] = RI[k][s];
    }
  }
  if (k >= 2) {
    ly.W_ip = ptr(weights, Lo.W_ip(k - 1));
    ly.b_ip = ptr(weights, Lo.b_ip(k - 1));
    ly.T_ip = ptr(traces, Lo.W_ip(k - 1));
    ly.T_bip = ptr(traces, Lo.b_ip(k - 1));
    ly.c_ip = rate(Lo.W_ip(k - 1));
    ly.c_bip = rate(Lo.b_ip(k - 1));
    ly.u_I = ptr(state, Lo.u_I(k - 1));
    for (int s = 0; s < 2; ++s) ly.RI_own[s] = RI[k - 1][s];
    ly.stream_I = interneuron_stream(k - 1);
  }
  ly.u = ptr(state, Lo.u(k));
  ly.u_trgt = (k == N && u_trgt.has_value()) ? u_trgt->const_data_ptr<T>() : nullptr;
  for (int s = 0; s < 2; ++s) {
    ly.R[s] = R[k][s];
    ly.R_in[s] = R[k - 1][s];
  }
  const double g_A = k < N ? c[kGA] : 0.0;
  ly.basal_factor = static_cast<T>(c[kGB] / (c[kGLk] + c[kGB] + g_A));
  ly.stream_P = pyramidal_stream(k);
}

}  // namespace micro
}  // namespace bpdl
