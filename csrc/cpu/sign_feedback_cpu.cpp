// CPU kernels of the sign-symmetric feedback family (bpdl/sign_feedback.h): B = sign(W) * M in
// one pass, with brSF's random magnitude drawn inside the pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "bpdl/sign_feedback.h"

#include "bpdl/cpu_isa.h"

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

// Elements 4g .. 4g+3 of the groups [begin, end) from the Philox words of those groups (word
// i of group g at words[4 (g - begin) + i]): B = sign(W) * magnitude.
template <typename scalar_t>
inline void sign_random_from_words(const scalar_t* wp, scalar_t* op, int64_t n, int64_t begin,
                                   int64_t end, const uint32_t* words, int64_t distribution,
                                   float scale) {
  for (int64_t g = begin; g < end; ++g) {
    const uint32_t* word = words + 4 * (g - begin);
    const float u[4] = {uniform_f24(word[0]), uniform_f24(word[1]), uniform_f24(word[2]),
                        uniform_f24(word[3])};
    const int64_t base = 4 * g;
    const int count = static_cast<int>(n - base < 4 ? n - base : 4);
    if (distribution == static_cast<int64_t>(MagnitudeDistribution::kUniform)) {
      for (int i = 0; i < count; ++i)
        op[base + i] = sign_of(wp[base + i]) * static_cast<scalar_t>(u[i] * scale);
    } else {  // half-normal: one logarithm and one sine/cosine pair per pair of elements
      for (int k = 0; k < count; k += 2) {
        const float radius = scale * sqrtf(-2.0f * logf(u[k]));
        const float angle = 6.283185307179586f * u[k + 1];
        op[base + k] = sign_of(wp[base + k]) * static_cast<scalar_t>(radius * fabsf(cosf(angle)));
        if (k + 1 < count)
          op[base + k + 1] =
              sign_of(wp[base + k + 1]) * static_cast<scalar_t>(radius * fabsf(sinf(angle)));
      }
    }
  }
}

// The groups [begin, end) with the scalar Philox, kLanes counters side by side (the rounds are
// a serial chain; independent counters let the CPU overlap them).
template <typename scalar_t>
void sign_random_groups_scalar(const scalar_t* wp, scalar_t* op, int64_t n, int64_t begin,
                               int64_t end, uint64_t seed, uint32_t step, uint32_t stream,
                               int64_t distribution, float scale) {
  constexpr int kLanes = 8;
  uint32_t words[4 * kLanes];
  for (int64_t g0 = begin; g0 < end; g0 += kLanes) {
    const int lanes = static_cast<int>(end - g0 < kLanes ? end - g0 : kLanes);
    uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
    for (int l = 0; l < kLanes; ++l) {
      const uint64_t g = static_cast<uint64_t>(g0 + (l < lanes ? l : 0));
      c0[l] = static_cast<uint32_t>(g);
      c1[l] = static_cast<uint32_t>(g >> 32);
      c2[l] = step;
      c3[l] = stream;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
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
    for (int l = 0; l < lanes; ++l) {
      words[4 * l] = c0[l];
      words[4 * l + 1] = c1[l];
      words[4 * l + 2] = c2[l];
      words[4 * l + 3] = c3[l];
    }
    sign_random_from_words(wp, op, n, g0, g0 + lanes, words, distribution, scale);
  }
}

}  // namespace
}  // namespace bpdl

#if defined(BPDL_HAVE_AVX2_BUILD)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace bpdl {
namespace {
namespace avx2 {

#include "bpdl/philox_avx2.inc"

// The groups [begin, end) sixteen at a time with the AVX2 Philox (the same words as the scalar
// one); float32 uniform magnitudes and their signs eight at a time. Returns the first group not
// done (fewer than sixteen remain).
template <typename scalar_t>
int64_t sign_random_groups(const scalar_t* wp, scalar_t* op, int64_t n, int64_t begin,
                           int64_t end, uint64_t seed, uint32_t step, uint32_t stream,
                           int64_t distribution, float scale) {
  alignas(32) uint32_t words[64], lo[16], hi[16];
  const bool uniform_f32 = std::is_same_v<scalar_t, float> &&
                           distribution == static_cast<int64_t>(MagnitudeDistribution::kUniform);
  int64_t g0 = begin;
  for (; g0 + 16 <= end && 4 * (g0 + 16) <= n; g0 += 16) {
    for (int j = 0; j < 16; ++j) {
      const uint64_t g = static_cast<uint64_t>(g0 + j);
      lo[j] = static_cast<uint32_t>(g);
      hi[j] = static_cast<uint32_t>(g >> 32);
    }
    philox16(_mm256_load_si256(reinterpret_cast<const __m256i*>(lo)),
             _mm256_load_si256(reinterpret_cast<const __m256i*>(hi)),
             _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8)),
             _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8)), step, stream, seed,
             words);
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (uniform_f32) {
        // u = (w >> 8) 2^-24 + 2^-25 (the product is exact, so a fused multiply-add rounds the
        // same as uniform_f24), magnitude u * scale; sign(w) * m: m, -m or +0 as in sign_of.
        const __m256 step24 = _mm256_set1_ps(5.9604644775390625e-08f);
        const __m256 half24 = _mm256_set1_ps(2.98023223876953125e-08f);
        const __m256 vscale = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
        const __m256 sign_bit = _mm256_set1_ps(-0.0f);
        const int64_t base = 4 * g0;
        for (int j = 0; j < 64; j += 8) {
          const __m256i w = _mm256_load_si256(reinterpret_cast<const __m256i*>(words + j));
          const __m256 u = _mm256_add_ps(
              _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(w, 8)), step24), half24);
          const __m256 mag = _mm256_mul_ps(u, vscale);
          const __m256 x = _mm256_loadu_ps(wp + base + j);
          const __m256 pos = _mm256_cmp_ps(x, zero, _CMP_GT_OQ);
          const __m256 neg = _mm256_cmp_ps(x, zero, _CMP_LT_OQ);
          _mm256_storeu_ps(op + base + j,
                           _mm256_or_ps(_mm256_and_ps(pos, mag),
                                        _mm256_and_ps(neg, _mm256_xor_ps(mag, sign_bit))));
        }
        continue;
      }
    }
    sign_random_from_words(wp, op, n, g0, g0 + 16, words, distribution, scale);
  }
  return g0;
}

}  // namespace avx2
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options
#endif

namespace bpdl {
namespace {

at::Tensor sign_random_feedback_cpu(const at::Tensor& weight, int64_t seed, int64_t stream,
                                    int64_t step, int64_t distribution, double scale) {
  check_sign_feedback_args(weight, nullptr, seed, stream, step, distribution, scale);
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty_like(w);
  const int64_t n = w.numel(), groups = (n + 3) / 4;
  const float fscale = static_cast<float>(scale);
  const uint64_t useed = static_cast<uint64_t>(seed);
  const uint32_t ustep = static_cast<uint32_t>(step), ustream = static_cast<uint32_t>(stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(),
                                  "sign_random_feedback_cpu", [&] {
    const scalar_t* wp = w.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, groups, 8192, [&](int64_t begin, int64_t end) {
      int64_t g = begin;
#if defined(BPDL_HAVE_AVX2_BUILD)
      if (cpu_has_avx2_fma())
        g = avx2::sign_random_groups(wp, op, n, begin, end, useed, ustep, ustream, distribution,
                                     fscale);
#endif
      sign_random_groups_scalar(wp, op, n, g, end, useed, ustep, ustream, distribution, fscale);
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
