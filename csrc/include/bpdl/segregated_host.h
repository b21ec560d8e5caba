// Host-side preparation shared by the CPU and CUDA segregated-dendrite ops (after the argument
// checks of segregated_checks.h): the network's tensors made contiguous, the constant first-layer
// drive of a rate-coded input, the zero-filled outputs of a training example, and the weight
// updates the plasticity op forms from its per-neuron errors. The kernels themselves, and W's
// transposes (a reused workspace on the CPU, a fresh copy on the GPU), stay with each backend.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "bpdl/segregated.h"

namespace bpdl {
namespace seg {

inline std::vector<at::Tensor> contiguous_all(at::TensorList list) {
  std::vector<at::Tensor> out;
  out.reserve(list.size());
  for (const auto& t : list) out.push_back(t.contiguous());
  return out;
}

// The tensors the simulation reads, contiguous, plus what follows from them.
struct HostNet {
  std::vector<at::Tensor> W, b, Y, c;
  at::Tensor x_rate, lane_key;
  // b_0 + x_rate W_0^T when the feedforward input is rates, not spikes (then the first layer's
  // basal drive is the same at every step); undefined in spiking mode, and when the caller
  // computes the drive itself (with_rate_drive false: the CPU training paths, which compute it
  // per lane from W_0^T).
  at::Tensor B0const;
  int M = 0;        // layers
  int64_t B = 0;    // lanes
};

inline HostNet host_net(at::TensorList W, at::TensorList b, at::TensorList Y, at::TensorList c,
                        const at::Tensor& x_rate, const at::Tensor& lane_key,
                        at::IntArrayRef flags, bool with_rate_drive = true) {
  HostNet net;
  net.W = contiguous_all(W);
  net.b = contiguous_all(b);
  net.Y = contiguous_all(Y);
  net.c = contiguous_all(c);
  net.x_rate = x_rate.contiguous();
  net.lane_key = lane_key.contiguous();
  net.M = static_cast<int>(net.W.size());
  net.B = net.x_rate.size(0);
  if (flags[kSpikingFF] == 0 && with_rate_drive)
    net.B0const = at::addmm(net.b[0], net.x_rate, net.W[0].t()).contiguous();
  return net;
}

// The outputs of segregated_train_example, zero-filled, in the schema's order: C_f, C_t, lam_f,
// lam_t (B, n_m) for every layer m; P_f (B, n_{m-1}) for every layer; A_f, A_t (B, n_m) for every
// hidden layer; Q_f (B, n_fb) for every hidden layer.
inline std::vector<at::Tensor> train_outputs(const HostNet& net) {
  const int M = net.M, H = M - 1;
  const int64_t B = net.B;
  const auto opts = net.x_rate.options();
  std::vector<at::Tensor> out;
  for (int k = 0; k < 4; ++k)
    for (int m = 0; m < M; ++m) out.push_back(at::zeros({B, net.W[m].size(0)}, opts));
  for (int m = 0; m < M; ++m) out.push_back(at::zeros({B, net.W[m].size(1)}, opts));
  for (int k = 0; k < 2; ++k)
    for (int m = 0; m < H; ++m) out.push_back(at::zeros({B, net.W[m].size(0)}, opts));
  for (int m = 0; m < H; ++m) out.push_back(at::zeros({B, net.Y[m].size(1)}, opts));
  return out;
}

// segregated_plasticity's results from the per-neuron errors e (and e_fb when the feedback
// weights learn): (e, scale * e^T P_f, scale * sum_lanes e, fb_scale * e_fb^T Q_f,
// fb_scale * sum_lanes e_fb); the last two are empty when the feedback is fixed.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plasticity_results(
    const at::Tensor& e, const at::Tensor& e_fb, const at::Tensor& P_f,
    const std::optional<at::Tensor>& Q_f, double scale, double fb_scale) {
  const bool learn_fb = Q_f.has_value();
  // the scale rides on the product (alpha), not on a second pass over the largest result
  at::Tensor gW = at::empty({e.size(1), P_f.size(1)}, e.options());
  at::addmm_out(gW, gW, e.t(), P_f, /*beta=*/0, /*alpha=*/scale);
  at::Tensor gb = e.sum(0).mul_(scale);
  at::Tensor gY = learn_fb ? at::mm(e_fb.t(), *Q_f).mul_(fb_scale) : at::empty({0}, e.options());
  at::Tensor gc = learn_fb ? e_fb.sum(0).mul_(fb_scale) : at::empty({0}, e.options());
  return {e, gW, gb, gY, gc};
}

// G17's symmetric feedback from the updated forward weights, with the ATen operations of
// SegregatedDendriteNet.make_feedback_symmetric_ (broadcast: Y_{M-2} = W_{M-1}^T and
// Y_m = W_{m+1}^T Y_{m+1}; else Y_m = W_{m+1}^T), the sparse mask and gain re-applied.
inline void online_symmetric_feedback(const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& Y,
                               at::TensorList masks, bool broadcast, double sparse_gain) {
  at::Tensor above;
  for (int m = static_cast<int>(W.size()) - 2; m >= 0; --m) {
    at::Tensor factor = W[m + 1].t().to(at::kDouble).clone();
    at::Tensor y = (!broadcast || !above.defined()) ? factor : at::mm(factor, above);
    above = y;
    if (!masks.empty()) y = at::mul(at::mul(y, masks[m]), sparse_gain);
    Y[m].copy_(y);
  }
}

}  // namespace seg
}  // namespace bpdl
