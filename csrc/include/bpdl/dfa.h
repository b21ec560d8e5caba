// Direct feedback alignment with regenerated feedback: the entries of the feedback matrix D and
// the argument checks, shared by csrc/cpu/dfa_cpu.cpp and csrc/cuda/dfa_cuda.cu.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

#include "bpdl/philox.h"

namespace bpdl {

// D[k, j] = scale * (2 u - 1) with u the Philox uniform of element k * num_features + j, step 0:
// uniform on (-scale, scale). 2u is exact, so a fused multiply-add gives the same double.
BPDL_HOST_DEVICE double dfa_feedback_value(uint64_t seed, uint64_t stream, uint64_t element,
                                           double scale) {
  const double u = philox_uniform(seed, 0, stream, element);
  return mul_rn(add_rn(mul_rn(2.0, u), -1.0), scale);
}

inline void check_dfa_project_args(const at::Tensor& error, int64_t num_features, int64_t seed,
                                   int64_t stream, double scale) {
  TORCH_CHECK(error.dim() == 2, "bpdl.dfa_project: error must be (N, num_outputs), got shape ",
              error.sizes());
  TORCH_CHECK(error.scalar_type() == at::kFloat || error.scalar_type() == at::kDouble,
              "bpdl.dfa_project: error must be float32 or float64, got ", error.scalar_type());
  TORCH_CHECK(num_features >= 0, "bpdl.dfa_project: num_features must be >= 0, got ",
              num_features);
  TORCH_CHECK(seed >= 0, "bpdl.dfa_project: seed must be >= 0, got ", seed);
  TORCH_CHECK(stream >= 0 && stream <= static_cast<int64_t>(UINT32_MAX),
              "bpdl.dfa_project: stream must be in [0, 2^32), got ", stream);
  TORCH_CHECK(std::isfinite(scale), "bpdl.dfa_project: scale must be finite, got ", scale);
}

}  // namespace bpdl
