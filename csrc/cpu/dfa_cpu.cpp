// CPU kernel of direct feedback alignment with regenerated feedback (dfa_storage="regenerate",
// docs/algorithms/feedback_alignment.md §3.3): out = error @ D, where D (num_outputs x num_features) is produced tile by
// tile from the counter-based Philox generator and never stored. The stored variant draws the
// same numbers (python/bpdl/functional/feedback.py), so both give the same training run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "bpdl/dfa.h"

namespace bpdl {
namespace {

at::Tensor dfa_project_cpu(const at::Tensor& error, int64_t num_features, int64_t seed,
                           int64_t stream, double scale) {
  check_dfa_project_args(error, num_features, seed, stream, scale);
  const at::Tensor e = error.contiguous();
  const int64_t N = e.size(0), L = e.size(1), M = num_features;
  at::Tensor out = at::zeros({N, M}, e.options());
  if (out.numel() == 0 || L == 0) return out;
  constexpr int64_t kTile = 256;
  const int64_t tiles = (M + kTile - 1) / kTile;
  AT_DISPATCH_FLOATING_TYPES(e.scalar_type(), "dfa_project_cpu", [&] {
    const scalar_t* ep = e.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<scalar_t> tile(static_cast<size_t>(L * kTile));
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t j0 = t * kTile, width = std::min(kTile, M - j0);
        for (int64_t k = 0; k < L; ++k)
          for (int64_t j = 0; j < width; ++j)
            tile[k * kTile + j] = static_cast<scalar_t>(dfa_feedback_value(
                static_cast<uint64_t>(seed), static_cast<uint64_t>(stream),
                static_cast<uint64_t>(k * M + j0 + j), scale));
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* row = op + n * M + j0;
          for (int64_t k = 0; k < L; ++k) {
            const scalar_t a = ep[n * L + k];
            const scalar_t* d = tile.data() + k * kTile;
            for (int64_t j = 0; j < width; ++j) row[j] += a * d[j];
          }
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CPU, m) {
  m.impl("dfa_project", &dfa_project_cpu);
}

}  // namespace bpdl
