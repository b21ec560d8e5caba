// CPU kernels of the spike-generation family.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "bpdl/philox.h"
#include "bpdl/checks.h"

namespace bpdl {
namespace {

at::Tensor poisson_spikes_cpu(const at::Tensor& rate, int64_t seed, int64_t step, int64_t stream,
                              double dt) {
  check_poisson_args(rate, seed, step, stream, dt);
  const at::Tensor r = rate.contiguous();
  at::Tensor out = at::empty_like(r, at::MemoryFormat::Contiguous);
  const int64_t n = r.numel();
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint64_t ustep = static_cast<uint64_t>(step);
  const uint64_t ustream = static_cast<uint64_t>(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.scalar_type(), "poisson_spikes_cpu", [&] {
    const scalar_t* rp = r.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const double u = philox_uniform(useed, ustep, ustream, static_cast<uint64_t>(i));
        const double lambda = static_cast<double>(rp[i]) * dt;
        op[i] = static_cast<scalar_t>(poisson_from_uniform(u, lambda));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CPU, m) {
  m.impl("poisson_spikes", &poisson_spikes_cpu);
}

}  // namespace bpdl
