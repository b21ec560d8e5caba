// Argument checks of bpdl::microcircuit_run, shared by the CPU and CUDA kernels. The Python
// wrapper (python/bpdl/ops/microcircuit.py) checks first with friendlier messages; these guard
// direct calls of torch.ops.bpdl.microcircuit_run so that a wrong shape is an error, never an
// out-of-bounds access.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <vector>

#include "bpdl/microcircuit.h"

namespace bpdl {
namespace micro {

inline void check_tensor(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape,
                         bool in_place, const char* group, int64_t index) {
  constexpr const char* op = "bpdl.microcircuit_run";
  TORCH_CHECK(t.sizes() == shape, op, ": ", group, "[", index, "] must have shape ", shape,
              ", got ", t.sizes(), " (inconsistent layer sizes)");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", group, "[", index, "] has dtype ",
              t.scalar_type(), " but x has ", ref.scalar_type(),
              "; convert all floating-point arguments to one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", group, "[", index, "] is on ", t.device(),
              " but x is on ", ref.device());
  TORCH_CHECK(!in_place || t.is_contiguous(), op, ": ", group, "[", index,
              "] must be contiguous (it is updated in place)");
}

// Checks every argument and returns the layer sizes n_0 .. n_N.
inline std::vector<int64_t> check_run_args(at::TensorList weights, at::TensorList traces,
                                           at::TensorList state, const at::Tensor& x,
                                           const std::optional<at::Tensor>& u_trgt,
                                           const at::Tensor& example, at::ArrayRef<double> etas,
                                           int64_t step0, int64_t steps, int64_t seed,
                                           at::ArrayRef<double> constants, int64_t transfer) {
  constexpr const char* op = "bpdl.microcircuit_run";
  const int64_t n_state = static_cast<int64_t>(state.size());
  TORCH_CHECK(n_state >= 4 && n_state % 2 == 0, op,
              ": state must hold u_1..u_N, u_I_1..u_I_{N-1} and r0 (2N tensors, N >= 2: at "
              "least one hidden layer), got ", n_state, " tensors");
  const Layout L{n_state / 2};
  const int64_t N = L.N;
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == L.num_weights(), op, ": a network with ",
              N, " weight layers needs ", L.num_weights(),
              " weights (W, b per layer; W_td, W_pi, W_ip, b_ip per hidden layer), got ",
              weights.size());
  TORCH_CHECK(traces.size() == weights.size(), op, ": traces must have one entry per weight (",
              weights.size(), "; an empty tensor for a fixed one), got ", traces.size());
  TORCH_CHECK(etas.size() == weights.size(), op, ": etas must have one learning rate per weight (",
              weights.size(), "), got ", etas.size());
  TORCH_CHECK(static_cast<int64_t>(constants.size()) == kNumConstants, op, ": constants must hold ",
              static_cast<int>(kNumConstants),
              " numbers (g_lk, g_B, g_A, g_D, g_som, g_som_I, dt, tau_w, tau_in, sigma, gamma, "
              "beta, theta), got ", constants.size());
  for (int64_t i = 0; i < kNumConstants; ++i)
    TORCH_CHECK(std::isfinite(constants[i]), op, ": constants[", i, "] is not finite (",
                constants[i], ")");
  TORCH_CHECK(constants[kDt] > 0 && constants[kTauW] > 0 && constants[kTauIn] > 0, op,
              ": dt, tau_w and tau_in must be positive, got ", constants[kDt], ", ",
              constants[kTauW], ", ", constants[kTauIn]);
  TORCH_CHECK(constants[kSigma] >= 0, op, ": sigma must be >= 0, got ", constants[kSigma]);
  TORCH_CHECK(transfer == kLogistic || transfer == kSoftRelu, op,
              ": transfer must be 0 (logistic) or 1 (soft_relu), got ", transfer);
  TORCH_CHECK(transfer != kSoftRelu || constants[kBeta] > 0, op,
              ": the soft rectifier needs beta > 0, got ", constants[kBeta]);
  TORCH_CHECK(steps >= 0 && step0 >= 0 && step0 + steps <= (int64_t(1) << 32), op,
              ": steps step0 .. step0 + steps - 1 must lie in [0, 2^32), got step0 = ", step0,
              ", steps = ", steps);
  TORCH_CHECK(seed >= 0, op, ": seed must be >= 0, got ", seed);

  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              op, ": x must be a float32 or float64 (lanes, n_0) tensor, got ", x.scalar_type(),
              " of shape ", x.sizes());
  const int64_t B = x.size(0);
  std::vector<int64_t> n{x.size(1)};
  for (int64_t k = 1; k <= N; ++k) {
    const at::Tensor& W = weights[L.W(k)];
    TORCH_CHECK(W.dim() == 2, op, ": W[", k - 1, "] must be a matrix, got shape ", W.sizes());
    n.push_back(W.size(0));
  }
  for (int64_t k = 1; k <= N; ++k) {
    TORCH_CHECK(n[k] > 0, op, ": layer ", k, " has no neurons");
    check_tensor(weights[L.W(k)], x, {n[k], n[k - 1]}, true, "W", k - 1);
    check_tensor(weights[L.b(k)], x, {n[k]}, true, "b", k - 1);
    check_tensor(state[L.u(k)], x, {B, n[k]}, true, "state.u", k - 1);
  }
  TORCH_CHECK(n[0] > 0, op, ": x has no input neurons");
  for (int64_t k = 1; k < N; ++k) {
    check_tensor(weights[L.W_td(k)], x, {n[k], n[k + 1]}, true, "W_td", k - 1);
    check_tensor(weights[L.W_pi(k)], x, {n[k], n[k + 1]}, true, "W_pi", k - 1);
    check_tensor(weights[L.W_ip(k)], x, {n[k + 1], n[k]}, true, "W_ip", k - 1);
    check_tensor(weights[L.b_ip(k)], x, {n[k + 1]}, true, "b_ip", k - 1);
    check_tensor(state[L.u_I(k)], x, {B, n[k + 1]}, true, "state.u_I", k - 1);
    TORCH_CHECK(traces[L.W_td(k)].numel() == 0, op,
                ": the top-down weights W_td are not plastic in these dynamics "
                "(docs/algorithms/microcircuits.md §6.2); pass an empty trace for W_td[", k - 1,
                "]");
  }
  check_tensor(state[L.r0()], x, {B, n[0]}, true, "state.r0", 0);
  for (int64_t i = 0; i < L.num_weights(); ++i) {
    if (traces[i].numel() == 0) continue;
    check_tensor(traces[i], x, weights[i].sizes(), true, "traces", i);
    TORCH_CHECK(std::isfinite(etas[i]), op, ": etas[", i, "] is not finite (", etas[i], ")");
  }
  if (u_trgt.has_value())
    check_tensor(*u_trgt, x, {B, n[N]}, false, "u_trgt", 0);
  TORCH_CHECK(example.scalar_type() == at::kLong && example.dim() == 1 && example.size(0) == B,
              op, ": example must be an int64 tensor with one entry per lane (", B, "), got ",
              example.scalar_type(), " of shape ", example.sizes());
  TORCH_CHECK(example.device() == x.device(), op, ": example is on ", example.device(),
              " but x is on ", x.device());
  return n;
}

}  // namespace micro
}  // namespace bpdl
