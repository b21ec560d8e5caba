// Sign-symmetric feedback B = sign(W) * M (Liao, Leibo & Poggio 2016; Xiao et al. 2018), shared
// by csrc/cpu/sign_feedback_cpu.cpp and csrc/cuda/sign_feedback_cuda.cu. brSF's magnitude
// M = |R| with R redrawn from the initialiser at every update is drawn here, element by
// element, from the counter-based Philox generator: one pass over W, nothing stored.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "bpdl/philox.h"

namespace bpdl {

// 0: |U(-b, b)| = U(0, b); 1: |N(0, b)| (half-normal), b the scale.
enum class MagnitudeDistribution : int64_t { kUniform = 0, kHalfNormal = 1 };

// A 24-bit uniform in (0, 1] from one 32-bit word: (w >> 8) * 2^-24 + 2^-25.
BPDL_HOST_DEVICE float uniform_f24(uint32_t word) {
  return static_cast<float>(word >> 8) * 5.9604644775390625e-08f + 2.98023223876953125e-08f;
}

// Four 24-bit uniforms in (0, 1) from one Philox call keyed by (seed, step, stream) and
// counted by the group index g (elements 4g .. 4g+3): u = (w >> 8) * 2^-24 + 2^-25.
BPDL_HOST_DEVICE void philox_uniform4_f24(uint64_t seed, uint64_t step, uint64_t stream,
                                          uint64_t group, float u[4]) {
  const Philox4 r = philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32),
                                  static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  for (int i = 0; i < 4; ++i) u[i] = uniform_f24(r.v[i]);
}

// The magnitude of element 4g + i given the four uniforms of its group: uniform, u_i * b; or
// half-normal by Box-Muller on the pairs (u0, u1) and (u2, u3):
// |N| = b sqrt(-2 ln u_{2k}) |cos(2 pi u_{2k+1})| for i = 2k, |sin(...)| for i = 2k + 1.
BPDL_HOST_DEVICE float magnitude_from_uniforms(const float u[4], int i, int64_t distribution,
                                               float scale) {
  if (distribution == static_cast<int64_t>(MagnitudeDistribution::kUniform)) return u[i] * scale;
  const int k = i & ~1;
  const float radius = sqrtf(-2.0f * logf(u[k]));
  const float angle = 6.283185307179586f * u[k + 1];
  return scale * radius * fabsf((i & 1) ? sinf(angle) : cosf(angle));
}

// sign(w) in {-1, 0, 1}, compared in the op-math type (float for half and bfloat16, whose
// comparison operators are ambiguous in device code; double stays double, so that a tiny
// nonzero double is not flushed to a zero sign).
template <typename scalar_t>
BPDL_HOST_DEVICE scalar_t sign_of(scalar_t w) {
  using op_t = at::opmath_type<scalar_t>;
  const op_t v = static_cast<op_t>(w);
  // branch-free: the signs of trained weights are random, a branch would mispredict half the time
  return static_cast<scalar_t>(static_cast<op_t>(v > op_t(0)) - static_cast<op_t>(v < op_t(0)));
}

inline void check_sign_feedback_args(const at::Tensor& weight, const at::Tensor* magnitude,
                                     int64_t seed, int64_t stream, int64_t step,
                                     int64_t distribution, double scale) {
  TORCH_CHECK(weight.is_floating_point(), "bpdl.sign_feedback: weight must be floating point, "
              "got ", weight.scalar_type());
  if (magnitude != nullptr) {
    TORCH_CHECK(magnitude->sizes() == weight.sizes() || magnitude->dim() == 0,
                "bpdl.sign_feedback: magnitude must be a scalar or shaped like the weight ",
                weight.sizes(), ", got ", magnitude->sizes());
    TORCH_CHECK(magnitude->device() == weight.device() &&
                    magnitude->scalar_type() == weight.scalar_type(),
                "bpdl.sign_feedback: magnitude must have the weight's device and dtype");
    return;
  }
  TORCH_CHECK(seed >= 0, "bpdl.sign_random_feedback: seed must be >= 0, got ", seed);
  TORCH_CHECK(stream >= 0 && stream <= static_cast<int64_t>(UINT32_MAX) && step >= 0 &&
                  step <= static_cast<int64_t>(UINT32_MAX),
              "bpdl.sign_random_feedback: stream and step must be in [0, 2^32), got ", stream,
              " and ", step);
  TORCH_CHECK(distribution == 0 || distribution == 1, "bpdl.sign_random_feedback: distribution "
              "must be 0 (uniform) or 1 (half-normal), got ", distribution);
  TORCH_CHECK(std::isfinite(scale) && scale > 0, "bpdl.sign_random_feedback: scale must be "
              "positive and finite, got ", scale);
}

}  // namespace bpdl
