// Argument checks shared by the CPU and CUDA kernels. Messages say what was wrong and how to fix it.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>

namespace bpdl {

inline void check_poisson_args(const at::Tensor& rate, int64_t seed, int64_t step, int64_t stream,
                               double dt) {
  TORCH_CHECK(rate.is_floating_point(),
              "bpdl.poisson_spikes: rate must be a floating-point tensor of expected spikes per "
              "unit time, got dtype ", rate.scalar_type(), "; convert it with rate.float()");
  TORCH_CHECK(seed >= 0, "bpdl.poisson_spikes: seed must be >= 0, got ", seed);
  TORCH_CHECK(step >= 0 && step <= static_cast<int64_t>(UINT32_MAX),
              "bpdl.poisson_spikes: step must be in [0, 2^32), got ", step);
  TORCH_CHECK(stream >= 0 && stream <= static_cast<int64_t>(UINT32_MAX),
              "bpdl.poisson_spikes: stream must be in [0, 2^32), got ", stream);
  TORCH_CHECK(std::isfinite(dt) && dt > 0,
              "bpdl.poisson_spikes: dt must be a positive finite number, got ", dt);
}

}  // namespace bpdl
