// Argument checks of the segregated-dendrite kernels, shared by CPU and CUDA. The Python
// wrappers in bpdl/ops.py validate first with friendlier messages; these guard direct calls of
// torch.ops.bpdl.* so that a wrong shape is an error, never an out-of-bounds access.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <optional>

#include "bpdl/segregated.h"

namespace bpdl {
namespace seg {

inline void check_same_float(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but the state has ", ref.scalar_type(),
              "; convert all floating-point arguments to one dtype");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the state is on ", ref.device());
}

inline void check_state_tensor(const at::Tensor& t, const at::Tensor& ref, int64_t lanes,
                               const char* op, const char* name) {
  TORCH_CHECK(t.is_contiguous(), op, ": the state tensor ", name,
              " must be contiguous (it is updated in place)");
  TORCH_CHECK(t.dim() >= 1 && t.size(0) == lanes, op, ": ", name, " must have one row per lane (",
              lanes, "), got shape ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(),
              " but the inputs are on ", ref.device());
}

inline void check_params(at::ArrayRef<double> params, at::IntArrayRef flags, int64_t n_flags,
                         const char* op) {
  TORCH_CHECK(static_cast<int64_t>(params.size()) == kNumParams, op, ": params must hold ",
              kNumParams, " numbers (lambda_max, g_L, g_B, g_A, g_D, E_E, E_I, k_B, k_A, k_D), got ",
              params.size());
  TORCH_CHECK(static_cast<int64_t>(flags.size()) == n_flags, op, ": flags must hold ", n_flags,
              " integers, got ", flags.size());
  TORCH_CHECK(params[kLambdaMax] >= 0 && params[kLambdaMax] <= 64, op,
              ": lambda_max must be in [0, 64] spikes per step, got ", params[kLambdaMax]);
}

inline void check_network(at::TensorList W, at::TensorList b, at::TensorList Y, at::TensorList c,
                          const at::Tensor& x_rate, const at::Tensor& kappa, bool broadcast,
                          const char* op) {
  const int64_t M = static_cast<int64_t>(W.size());
  TORCH_CHECK(M >= 1, op, ": the network needs at least one layer");
  TORCH_CHECK(x_rate.dim() == 2 && x_rate.is_floating_point(), op,
              ": x_rate must be a floating-point (lanes, n_in) tensor, got ", x_rate.sizes());
  TORCH_CHECK(static_cast<int64_t>(b.size()) == M, op, ": one bias per layer needed (", M,
              "), got ", b.size());
  TORCH_CHECK(static_cast<int64_t>(Y.size()) == M - 1, op, ": one feedback matrix per hidden layer (",
              M - 1, ") needed, got ", Y.size());
  TORCH_CHECK(c.empty() || static_cast<int64_t>(c.size()) == M - 1, op,
              ": the feedback biases must be empty or one per hidden layer, got ", c.size());
  int64_t n_prev = x_rate.size(1);
  for (int64_t m = 0; m < M; ++m) {
    TORCH_CHECK(W[m].dim() == 2 && W[m].size(1) == n_prev, op, ": W[", m, "] must be (n_", m,
                ", ", n_prev, "), got ", W[m].sizes(), " (inconsistent layer sizes)");
    TORCH_CHECK(b[m].dim() == 1 && b[m].size(0) == W[m].size(0), op, ": b[", m, "] must have ",
                W[m].size(0), " entries, got ", b[m].sizes());
    check_same_float(W[m], x_rate, op, "W");
    check_same_float(b[m], x_rate, op, "b");
    n_prev = W[m].size(0);
  }
  TORCH_CHECK(n_prev < (int64_t(1) << (kLaneShift + 2)) && x_rate.size(1) < (int64_t(1) << (kLaneShift + 2)),
              op, ": layers are limited to 2^24 neurons");
  for (int64_t m = 0; m + 1 < M; ++m) {
    const int64_t src = broadcast ? M - 1 : m + 1;
    TORCH_CHECK(Y[m].dim() == 2 && Y[m].size(0) == W[m].size(0) && Y[m].size(1) == W[src].size(0),
                op, ": Y[", m, "] must be (", W[m].size(0), ", ", W[src].size(0),
                ") for this feedback configuration (", broadcast ? "broadcast" : "layer-wise",
                "), got ", Y[m].sizes());
    check_same_float(Y[m], x_rate, op, "Y");
    if (!c.empty()) {
      TORCH_CHECK(c[m].dim() == 1 && c[m].size(0) == W[m].size(0), op, ": c[", m,
                  "] must have ", W[m].size(0), " entries, got ", c[m].sizes());
      check_same_float(c[m], x_rate, op, "c");
    }
  }
  TORCH_CHECK(kappa.dim() == 1 && kappa.numel() >= 1 && kappa.numel() <= 4096, op,
              ": kappa must be a 1-D tensor of 1..4096 PSP taps, got ", kappa.sizes());
}

inline void check_train_args(at::TensorList W, at::TensorList b, at::TensorList Y, at::TensorList c,
                             const at::Tensor& x_rate, const at::Tensor& target,
                             const at::Tensor& kappa, const at::Tensor& in_ring,
                             at::TensorList rings, at::TensorList C, at::TensorList lam,
                             at::TensorList A, const at::Tensor& step, const at::Tensor& lane_key,
                             const at::Tensor& lengths, const at::Tensor& windows,
                             at::TensorList offsets, int64_t seed, at::ArrayRef<double> params,
                             at::IntArrayRef flags, at::IntArrayRef need_train,
                             at::IntArrayRef need_test, int64_t state_lanes = -1,
                             const char* op = "bpdl.segregated_train_example") {
  // The example tensors (x_rate, target, the phase plan) have one row per example; the state
  // and lane_key one per lane: as many lanes as examples, or `state_lanes` (online training runs
  // its examples one after another in one lane).
  check_params(params, flags, kNumFlags, op);
  check_network(W, b, Y, c, x_rate, kappa, flags[kBroadcast] != 0, op);
  const int64_t M = static_cast<int64_t>(W.size());
  const int64_t B = x_rate.size(0);
  const int64_t lanes = state_lanes < 0 ? B : state_lanes;
  const int64_t taps = kappa.numel();
  TORCH_CHECK(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(target.dim() == 2 && target.size(0) == B && target.size(1) == W[M - 1].size(0), op,
              ": target must be (lanes, n_out) = (", B, ", ", W[M - 1].size(0), "), got ",
              target.sizes());
  check_same_float(target, x_rate, op, "target");
  TORCH_CHECK(in_ring.scalar_type() == at::kChar && in_ring.dim() == 3 && in_ring.size(1) == taps &&
                  in_ring.size(2) == x_rate.size(1),
              op, ": in_ring must be int8 (lanes, taps, n_in), got ", in_ring.scalar_type(), " ",
              in_ring.sizes());
  check_state_tensor(in_ring, x_rate, lanes, op, "in_ring");
  TORCH_CHECK(static_cast<int64_t>(rings.size()) == M && static_cast<int64_t>(C.size()) == M &&
                  static_cast<int64_t>(lam.size()) == M && static_cast<int64_t>(A.size()) == M - 1,
              op, ": the state needs one ring, C and lam per layer and one A per hidden layer");
  for (int64_t m = 0; m < M; ++m) {
    const int64_t nm = W[m].size(0);
    TORCH_CHECK(rings[m].scalar_type() == at::kChar && rings[m].dim() == 3 &&
                    rings[m].size(1) == taps && rings[m].size(2) == nm,
                op, ": rings[", m, "] must be int8 (lanes, taps, ", nm, "), got ", rings[m].sizes());
    check_state_tensor(rings[m], x_rate, lanes, op, "rings");
    TORCH_CHECK(C[m].dim() == 2 && C[m].size(1) == nm && lam[m].dim() == 2 && lam[m].size(1) == nm,
                op, ": C[", m, "] and lam[", m, "] must be (lanes, ", nm, ")");
    check_state_tensor(C[m], x_rate, lanes, op, "C");
    check_state_tensor(lam[m], x_rate, lanes, op, "lam");
    check_same_float(C[m], x_rate, op, "C");
    check_same_float(lam[m], x_rate, op, "lam");
    if (m + 1 < M) {
      TORCH_CHECK(A[m].dim() == 2 && A[m].size(1) == nm, op, ": A[", m, "] must be (lanes, ", nm, ")");
      check_state_tensor(A[m], x_rate, lanes, op, "A");
      check_same_float(A[m], x_rate, op, "A");
    }
  }
  TORCH_CHECK(step.scalar_type() == at::kLong && step.dim() == 1, op, ": step must be int64 (lanes,)");
  check_state_tensor(step, x_rate, lanes, op, "step");
  TORCH_CHECK(lane_key.scalar_type() == at::kLong && lane_key.dim() == 1 &&
                  lane_key.size(0) == lanes,
              op, ": lane_key must be int64 (lanes,)");
  for (const at::Tensor* t : {&lengths, &windows}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 2 && t->size(0) == B && t->size(1) == 2,
                op, ": lengths and windows must be int64 (lanes, 2), got ", t->sizes());
    TORCH_CHECK(t->device() == x_rate.device(), op, ": lengths and windows must be on ",
                x_rate.device());
  }
  TORCH_CHECK(offsets.empty() || static_cast<int64_t>(offsets.size()) == M - 1, op,
              ": offsets must be empty or one (lanes, 2, n_m) tensor per hidden layer");
  TORCH_CHECK(offsets.empty() == (flags[kRandomPlateaus] == 0), op,
              ": random plateau offsets must be given exactly when the random_plateaus flag is set");
  TORCH_CHECK(flags[kPlateauMax] >= 0 && flags[kPlateauMax] <= kMaxPlateauOffset, op,
              ": the largest plateau offset must be in [0, ", kMaxPlateauOffset, "]");
  for (int64_t m = 0; m < static_cast<int64_t>(offsets.size()); ++m) {
    TORCH_CHECK(offsets[m].scalar_type() == at::kLong && offsets[m].dim() == 3 &&
                    offsets[m].size(0) == B && offsets[m].size(1) == 2 &&
                    offsets[m].size(2) == W[m].size(0),
                op, ": offsets[", m, "] must be int64 (lanes, 2, ", W[m].size(0), ")");
  }
  TORCH_CHECK(static_cast<int64_t>(need_train.size()) == M + 1 &&
                  static_cast<int64_t>(need_test.size()) == M + 1,
              op, ": need_train and need_test must hold one flag per population (", M + 1, ")");
  // the phase plan is small: check it on the host
  const at::Tensor L = lengths.cpu(), Wn = windows.cpu();
  if (B > 0) {
    TORCH_CHECK(Wn.min().item<int64_t>() >= 1, op, ": averaging windows must be >= 1 step");
    TORCH_CHECK((L - Wn).min().item<int64_t>() >= 0, op,
                ": every phase must be at least as long as its averaging window");
    if (!offsets.empty()) {
      TORCH_CHECK((L - Wn).min().item<int64_t>() >= flags[kPlateauMax], op,
                  ": phases must exceed the averaging window by the largest plateau offset");
      for (const auto& o : offsets) {
        if (o.numel()) {
          TORCH_CHECK(o.min().item<int64_t>() >= 0 && o.max().item<int64_t>() <= flags[kPlateauMax],
                      op, ": plateau offsets must lie in [0, ", flags[kPlateauMax], "]");
        }
      }
    }
  }
}

// The online op's own arguments (the simulation's are check_train_args').
inline void check_online_args(at::TensorList W, at::TensorList b, at::TensorList Y,
                              at::TensorList c, at::TensorList masks, at::IntArrayRef kinds,
                              at::ArrayRef<double> lrs, at::ArrayRef<double> scales,
                              at::ArrayRef<double> gains, at::ArrayRef<double> fb_lrs,
                              bool symmetric, const char* op) {
  const size_t M = W.size(), H = M - 1;
  for (at::TensorList list : {W, b, Y, c})
    for (const auto& t : list)
      TORCH_CHECK(t.is_contiguous(), op, ": the weights must be contiguous (updated in place)");
  TORCH_CHECK(kinds.size() == M && lrs.size() == M && scales.size() == M && gains.size() == M,
              op, ": kinds, lrs, scales and gains need one entry per layer (", M, ")");
  for (auto k : kinds)
    TORCH_CHECK(k == kKindOutput || k == kKindHidden || k == kKindBackprop, op,
                ": plasticity kinds must be 0, 1 or 2, got ", k);
  TORCH_CHECK(kinds[M - 1] == kKindOutput, op, ": the output layer's kind must be 0");
  TORCH_CHECK(fb_lrs.empty() || fb_lrs.size() == H, op,
              ": fb_lrs must be empty (fixed feedback) or one rate per hidden layer");
  TORCH_CHECK(!(symmetric && !fb_lrs.empty()), op,
              ": symmetric feedback and learned feedback exclude each other");
  TORCH_CHECK(masks.empty() || masks.size() == H, op,
              ": masks must be empty or one per hidden layer");
  for (size_t m = 0; m < masks.size(); ++m)
    TORCH_CHECK(masks[m].scalar_type() == at::kBool && masks[m].sizes() == Y[m].sizes(), op,
                ": masks[", m, "] must be a bool tensor shaped like Y[", m, "]");
}

inline void check_test_args(at::TensorList W, at::TensorList b, at::TensorList Y, at::TensorList c,
                            const at::Tensor& x_rate, const at::Tensor& kappa,
                            const at::Tensor& lane_key, int64_t seed, int64_t steps,
                            int64_t window, at::ArrayRef<double> params, at::IntArrayRef flags,
                            at::IntArrayRef need_test) {
  const char* op = "bpdl.segregated_test";
  check_params(params, flags, kNumFlags, op);
  check_network(W, b, Y, c, x_rate, kappa, flags[kBroadcast] != 0, op);
  TORCH_CHECK(seed >= 0, op, ": seed must be >= 0, got ", seed);
  TORCH_CHECK(steps >= 1 && window >= 1 && window <= steps, op,
              ": need 1 <= window <= steps, got window ", window, " and steps ", steps);
  TORCH_CHECK(lane_key.scalar_type() == at::kLong && lane_key.dim() == 1 &&
                  lane_key.size(0) == x_rate.size(0),
              op, ": lane_key must be int64 (lanes,)");
  TORCH_CHECK(static_cast<int64_t>(need_test.size()) == static_cast<int64_t>(W.size()) + 1, op,
              ": need_test must hold one flag per population");
}

inline void check_layer_step_args(
    const at::Tensor& W, const at::Tensor& b, const std::optional<at::Tensor>& Y,
    const std::optional<at::Tensor>& c, const at::Tensor& ff, const std::optional<at::Tensor>& fb,
    const at::Tensor& kappa, const std::optional<at::Tensor>& teach, const at::Tensor& C,
    const at::Tensor& lam, const at::Tensor& A, const at::Tensor& ring, const at::Tensor& sums,
    const at::Tensor& psp_sum, const at::Tensor& fb_sum, const at::Tensor& step,
    const at::Tensor& lane_key, const at::Tensor& accumulate, int64_t seed, int64_t pop,
    at::ArrayRef<double> params, at::IntArrayRef flags) {
  const char* op = "bpdl.segregated_layer_step";
  check_params(params, flags, kNumFlags + 1, op);
  TORCH_CHECK(C.dim() == 2 && C.is_floating_point(), op, ": C must be a floating (lanes, n) tensor");
  const int64_t B = C.size(0), n = C.size(1);
  const int64_t n_in = ff.size(-1);
  TORCH_CHECK(W.dim() == 2 && W.size(0) == n && W.size(1) == n_in, op, ": W must be (", n, ", ",
              n_in, "), got ", W.sizes());
  TORCH_CHECK(b.dim() == 1 && b.size(0) == n, op, ": b must have ", n, " entries");
  check_same_float(W, C, op, "W");
  check_same_float(b, C, op, "b");
  TORCH_CHECK((ff.scalar_type() == at::kChar && ff.dim() == 3) || (ff.is_floating_point() && ff.dim() == 2),
              op, ": ff must be an int8 spike ring (lanes, taps, n_in) or rates (lanes, n_in)");
  TORCH_CHECK(ff.size(0) == B, op, ": ff must have one row per lane");
  TORCH_CHECK(ring.scalar_type() == at::kChar && ring.dim() == 3 && ring.size(0) == B &&
                  ring.size(2) == n && ring.size(1) == kappa.numel(),
              op, ": ring must be int8 (lanes, taps, n)");
  if (ff.scalar_type() == at::kChar) {
    TORCH_CHECK(ff.size(1) == kappa.numel(), op, ": the input ring must have one slot per PSP tap");
  }
  const bool hidden = Y.has_value();
  TORCH_CHECK(hidden == fb.has_value(), op, ": a hidden layer needs both Y and fb; the output layer neither");
  TORCH_CHECK(!(hidden && teach.has_value()), op, ": teaching currents apply to the output layer only");
  if (hidden) {
    const int64_t n_fb = fb->size(-1);
    TORCH_CHECK(Y->dim() == 2 && Y->size(0) == n && Y->size(1) == n_fb, op, ": Y must be (", n, ", ",
                n_fb, ")");
    check_same_float(*Y, C, op, "Y");
    if (c.has_value()) {
      TORCH_CHECK(c->dim() == 1 && c->size(0) == n, op, ": c must have ", n, " entries");
      check_same_float(*c, C, op, "c");
    }
    TORCH_CHECK(fb->size(0) == B, op, ": fb must have one row per lane");
    if (fb->scalar_type() == at::kChar) {
      TORCH_CHECK(fb->dim() == 3 && fb->size(1) == kappa.numel(), op,
                  ": the feedback ring must have one slot per PSP tap");
    }
    TORCH_CHECK(A.dim() == 2 && A.size(0) == B && A.size(1) == n && A.is_contiguous(), op,
                ": A must be a contiguous (lanes, n) tensor for a hidden layer");
    check_same_float(A, C, op, "A");
    TORCH_CHECK(fb_sum.numel() == 0 || (fb_sum.dim() == 2 && fb_sum.size(0) == B &&
                                        fb_sum.size(1) == n_fb && fb_sum.is_contiguous()),
                op, ": fb_sum must be empty or a contiguous (lanes, n_fb) tensor");
  }
  if (teach.has_value()) {
    TORCH_CHECK(teach->sizes() == C.sizes(), op, ": teach must have C's shape");
    TORCH_CHECK(teach->is_contiguous(), op, ": teach must be contiguous");
    check_same_float(*teach, C, op, "teach");
  }
  TORCH_CHECK(C.is_contiguous() && lam.is_contiguous() && ring.is_contiguous() &&
                  sums.is_contiguous() && psp_sum.is_contiguous(),
              op, ": the state tensors (C, lam, ring, sums, psp_sum) must be contiguous");
  TORCH_CHECK(lam.sizes() == C.sizes(), op, ": lam must have C's shape");
  check_same_float(lam, C, op, "lam");
  TORCH_CHECK(sums.dim() == 3 && sums.size(0) == B && sums.size(1) == (hidden ? 3 : 2) &&
                  sums.size(2) == n,
              op, ": sums must be (lanes, ", hidden ? 3 : 2, ", n)");
  check_same_float(sums, C, op, "sums");
  TORCH_CHECK(psp_sum.dim() == 2 && psp_sum.size(0) == B && psp_sum.size(1) == n_in, op,
              ": psp_sum must be (lanes, n_in)");
  check_same_float(psp_sum, C, op, "psp_sum");
  TORCH_CHECK(step.scalar_type() == at::kLong && step.dim() == 1 && step.size(0) == B, op,
              ": step must be int64 (lanes,)");
  TORCH_CHECK(lane_key.scalar_type() == at::kLong && lane_key.dim() == 1 && lane_key.size(0) == B,
              op, ": lane_key must be int64 (lanes,)");
  TORCH_CHECK(accumulate.dim() == 1 && accumulate.size(0) == B, op, ": accumulate must be (lanes,)");
  TORCH_CHECK(seed >= 0 && pop >= 0 && pop < 65536, op, ": seed must be >= 0 and pop in [0, 65536)");
}

inline void check_sparse_basal_args(const at::Tensor& W_t, const at::Tensor& b,
                                    const at::Tensor& ring, const at::Tensor& step,
                                    const at::Tensor& kappa) {
  const char* op = "bpdl.segregated_sparse_basal";
  TORCH_CHECK(W_t.dim() == 2 && W_t.is_floating_point(), op,
              ": W_t must be W transposed, a floating (n_in, n) tensor");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == W_t.size(1) && b.scalar_type() == W_t.scalar_type(), op,
              ": b must have ", W_t.size(1), " entries of W_t's dtype");
  TORCH_CHECK(ring.scalar_type() == at::kChar && ring.dim() == 3 && ring.size(2) == W_t.size(0) &&
                  ring.size(1) == kappa.numel(),
              op, ": ring must be int8 (lanes, taps, n_in) with n_in = ", W_t.size(0));
  TORCH_CHECK(step.scalar_type() == at::kLong && step.dim() == 1 && step.size(0) == ring.size(0), op,
              ": step must be int64 (lanes,)");
  TORCH_CHECK(W_t.device() == ring.device() && b.device() == ring.device() &&
                  step.device() == ring.device(),
              op, ": all tensors must be on one device");
}

inline void check_plasticity_args(int64_t kind, const at::Tensor& C_f, const at::Tensor& P_f,
                                  const at::Tensor& a, const std::optional<at::Tensor>& b,
                                  const std::optional<at::Tensor>& A_f,
                                  const std::optional<at::Tensor>& Q_f) {
  const char* op = "bpdl.segregated_plasticity";
  TORCH_CHECK(kind == kKindOutput || kind == kKindHidden || kind == kKindBackprop, op,
              ": kind must be 0 (output), 1 (hidden) or 2 (backprop), got ", kind);
  TORCH_CHECK(C_f.dim() == 2 && C_f.is_floating_point(), op, ": C_f must be a floating (lanes, n) tensor");
  TORCH_CHECK(P_f.dim() == 2 && P_f.size(0) == C_f.size(0), op, ": P_f must be (lanes, n_in)");
  check_same_float(P_f, C_f, op, "P_f");
  TORCH_CHECK(a.sizes() == C_f.sizes(), op, ": a must have C_f's shape");
  check_same_float(a, C_f, op, "a");
  TORCH_CHECK((kind == kKindHidden) == b.has_value(), op,
              ": b (the forward apical average) is needed exactly for kind 1 (hidden)");
  if (b.has_value()) {
    TORCH_CHECK(b->sizes() == C_f.sizes(), op, ": b must have C_f's shape");
    check_same_float(*b, C_f, op, "b");
  }
  TORCH_CHECK(A_f.has_value() == Q_f.has_value(), op,
              ": learned feedback needs both A_f and Q_f (or neither)");
  if (Q_f.has_value()) {
    TORCH_CHECK(A_f->sizes() == C_f.sizes(), op, ": A_f must have C_f's shape");
    TORCH_CHECK(Q_f->dim() == 2 && Q_f->size(0) == C_f.size(0), op, ": Q_f must be (lanes, n_fb)");
    check_same_float(*A_f, C_f, op, "A_f");
    check_same_float(*Q_f, C_f, op, "Q_f");
  }
}

// The device-independent part of one layer step (ATen ops, so it runs wherever the state
// lives): the feedforward PSP (or rates) p, the basal potentials W p + b and, for a hidden
// layer, the feedback PSP (or rates) q and the apical potentials Y q (+ c), all contiguous.
// Spike-count rings (int8) are filtered with kappa; delay 1 reads the previous step's spikes.
struct LayerStepInputs {
  at::Tensor p, basal, q, apical;
};

inline LayerStepInputs layer_step_inputs(const at::Tensor& W, const at::Tensor& b,
                                         const std::optional<at::Tensor>& Y,
                                         const std::optional<at::Tensor>& c, const at::Tensor& ff,
                                         const std::optional<at::Tensor>& fb,
                                         const at::Tensor& kappa, const at::Tensor& step,
                                         at::ScalarType dtype) {
  const at::Tensor kap = kappa.to(dtype);
  auto psp_of = [&](const at::Tensor& r, int delay) {
    const int64_t T_ = r.size(1);
    const at::Tensor k_idx = at::arange(1, T_ + 1, step.options());
    const at::Tensor slots = at::remainder(step.unsqueeze(1) - (k_idx - 1 + delay).unsqueeze(0), T_);
    const at::Tensor taps_v = at::gather(r, 1, slots.unsqueeze(2).expand({-1, -1, r.size(2)}));
    return at::einsum("btn,t->bn", {taps_v.to(dtype), kap});
  };
  LayerStepInputs in;
  in.p = (ff.scalar_type() == at::kChar ? psp_of(ff, 0) : ff.to(dtype)).contiguous();
  in.basal = at::addmm(b, in.p, W.t()).contiguous();
  if (Y.has_value()) {
    in.q = (fb->scalar_type() == at::kChar ? psp_of(*fb, 1) : fb->to(dtype)).contiguous();
    in.apical = (c.has_value() ? at::addmm(*c, in.q, Y->t()) : at::mm(in.q, Y->t())).contiguous();
  }
  return in;
}

}  // namespace seg
}  // namespace bpdl
