// Counter-based random numbers shared by the CPU and CUDA kernels.
//
// Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2,
// 3"), the generator torch uses on CUDA. Every draw is a pure function of (seed, step, stream,
// element), so a kernel on any device, any thread layout, and the pure-PyTorch reference in
// python/bpdl/functional/random.py produce the same numbers.
//
//   key     = (seed & 0xffffffff, seed >> 32)
//   counter = (element & 0xffffffff, element >> 32, step, stream)
#pragma once

#include <cstdint>
#include <cmath>

#if defined(__CUDACC__)
#define BPDL_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BPDL_HOST_DEVICE inline
#endif

namespace bpdl {

struct Philox4 {
  uint32_t v[4];
};

BPDL_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

BPDL_HOST_DEVICE Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                       uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kM0, c0, &hi0, &lo0);
    philox_mulhilo(kM1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// A double in the open interval (0, 1) with 53 random bits, from the first two Philox words.
BPDL_HOST_DEVICE double philox_uniform(uint64_t seed, uint64_t step, uint64_t stream,
                                       uint64_t element) {
  const Philox4 r = philox4x32_10(
      static_cast<uint32_t>(element), static_cast<uint32_t>(element >> 32),
      static_cast<uint32_t>(step), static_cast<uint32_t>(stream),
      static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const uint64_t bits = (static_cast<uint64_t>(r.v[0] >> 5) << 26) | (r.v[1] >> 6);
  return (static_cast<double>(bits) + 0.5) * 1.1102230246251565e-16;  // 2^-53
}

// Round-to-nearest multiply and add that the CUDA compiler may not fuse into an FMA, so the
// device computes exactly what the host and the reference compute.
BPDL_HOST_DEVICE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
BPDL_HOST_DEVICE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// Largest count the inversion sampler returns; P(count > 256) is below 1e-100 for every mean
// the wrappers accept (<= 64).
constexpr int kPoissonMaxCount = 256;

// Poisson count with mean `lambda` by sequential CDF inversion of one uniform `u`:
// smallest k with u <= sum_{i<=k} e^-lambda lambda^i / i!.
BPDL_HOST_DEVICE int poisson_from_uniform(double u, double lambda) {
  double p = exp(-lambda);
  double cdf = p;
  int k = 0;
  while (u > cdf && k < kPoissonMaxCount) {
    ++k;
    p = mul_rn(p, lambda / static_cast<double>(k));
    cdf = add_rn(cdf, p);
  }
  return k;
}

}  // namespace bpdl
