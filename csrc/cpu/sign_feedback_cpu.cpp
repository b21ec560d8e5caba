// CPU kernels of the sign-symmetric feedback family (bpdl/sign_feedback.h): B = sign(W) * M in
// one pass, with brSF's random magnitude drawn inside the pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "bpdl/sign_feedback.h"

namespace bpdl {
namespace {

at::Tensor sign_feedback_cpu(const at::Tensor& weight, const at::Tensor& magnitude) {
  check_sign_feedback_args(weight, &magnitude, 0, 0, 0, 0, 1.0);
  const at::Tensor w = weight.contiguous();
  const bool scalar = magnitude.dim() == 0;
  const at::Tensor m = scalar ? magnitude : magnitude.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "sign_feedback_cpu",
                                  [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    const scalar_t* mp = m.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, n, 32768, [&](int64_t begin, int64_t end) {
      if (scalar) {
        const scalar_t c = mp[0];
        for (int64_t i = begin; i < end; ++i) op[i] = sign_of(wp[i]) * c;  // exact: sign is +-1, 0
      } else {
        for (int64_t i = begin; i < end; ++i) op[i] = sign_of(wp[i]) * mp[i];
      }
    });
  });
  return out;
}

at::Tensor sign_random_feedback_cpu(const at::Tensor& weight, int64_t seed, int64_t stream,
                                    int64_t step, int64_t distribution, double scale) {
  check_sign_feedback_args(weight, nullptr, seed, stream, step, distribution, scale);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel(), groups = (n + 3) / 4;
  const float fscale = static_cast<float>(scale);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                  "sign_random_feedback_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, 8192, [&](int64_t begin, int64_t end) {
      // Philox rounds are a serial chain; running kLanes independent counters side by side
      // lets the CPU overlap them (about 2x faster than one call at a time).
      constexpr int kLanes = 8;
      const uint32_t key0 = static_cast<uint32_t>(seed);
      const uint32_t key1 = static_cast<uint32_t>(static_cast<uint64_t>(seed) >> 32);
      int64_t g0 = begin;
      for (; g0 + kLanes <= end && 4 * (g0 + kLanes) <= n && distribution == 0; g0 += kLanes) {
        uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
        for (int l = 0; l < kLanes; ++l) {
          const uint64_t g = static_cast<uint64_t>(g0 + l);
          c0[l] = static_cast<uint32_t>(g);
          c1[l] = static_cast<uint32_t>(g >> 32);
          c2[l] = static_cast<uint32_t>(step);
          c3[l] = static_cast<uint32_t>(stream);
        }
        uint32_t k0 = key0, k1 = key1;
        for (int round = 0; round < 10; ++round) {
          for (int l = 0; l < kLanes; ++l) {
            const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0[l];
            const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2[l];
            const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
            const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
            c1[l] = static_cast<uint32_t>(p1);
            c3[l] = static_cast<uint32_t>(p0);
            c0[l] = n0;
            c2[l] = n2;
          }
          k0 += 0x9E3779B9u;
          k1 += 0xBB67AE85u;
        }
        for (int l = 0; l < kLanes; ++l) {
          const uint32_t words[4] = {c0[l], c1[l], c2[l], c3[l]};
          const int64_t base = 4 * (g0 + l);
          for (int i = 0; i < 4; ++i)
            op[base + i] = sign_of(wp[base + i]) *
                           static_cast<scalar_t>(uniform_f24(words[i]) * fscale);
        }
      }
      float u[4];
      for (int64_t g = g0; g < end; ++g) {  // the rest, and half-normal magnitudes
        philox_uniform4_f24(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                            static_cast<uint64_t>(stream), static_cast<uint64_t>(g), u);
        const int64_t base = 4 * g;
        const int count = static_cast<int>(n - base < 4 ? n - base : 4);
        for (int i = 0; i < count; ++i) {
          const scalar_t mag = static_cast<scalar_t>(
              magnitude_from_uniforms(u, i, distribution, fscale));
          op[base + i] = sign_of(wp[base + i]) * mag;
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CPU, m) {
  m.impl("sign_feedback", &sign_feedback_cpu);
  m.impl("sign_random_feedback", &sign_random_feedback_cpu);
}

}  // namespace bpdl
