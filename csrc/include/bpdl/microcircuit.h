// Layouts and keys of the dendritic-microcircuit kernels (Sacramento, Costa, Bengio & Senn 2018,
// "S18"; docs/algorithms/microcircuits.md §6.1-6.2), shared by the CPU and CUDA kernels.
// python/bpdl/functional/microcircuit.py is the reference; python/bpdl/ops/microcircuit.py builds
// the flat lists described here.
#pragma once

#include <cstdint>

#include "bpdl/philox.h"

namespace bpdl {
namespace micro {

// Philox stream of the somatic noise (MICRO_STREAM of the reference); the population adds to it:
// pyramidal layer k: 2k, the interneurons of hidden layer k: 2k + 1.
constexpr uint32_t kNoiseStream = 0x3C100000u;

// Layout of the `constants` float list.
enum Constant : int {
  kGLk = 0, kGB, kGA, kGD, kGSom, kGSomI, kDt, kTauW, kTauIn, kSigma, kGamma, kBeta, kTheta,
  kNumConstants
};

// The `transfer` argument: phi(u) = 1 / (1 + e^-u), or gamma softplus_beta(u - theta) with
// softplus_beta(z) = log(1 + e^(beta z)) / beta (z itself where beta z > 20, as torch's softplus).
enum Transfer : int { kLogistic = 0, kSoftRelu = 1 };

// torch.nn.functional.softplus's default threshold: above it softplus returns its argument.
constexpr double kSoftplusThreshold = 20.0;

// Positions in the flat lists of a network with output layer N (N >= 2), layers k = 1..N:
//   weights / traces / etas: W_1..W_N, b_1..b_N, W_td_1..W_td_{N-1}, W_pi_1..W_pi_{N-1},
//                            W_ip_1..W_ip_{N-1}, b_ip_1..b_ip_{N-1}    (6N - 4 entries)
//   state:                   u_1..u_N, u_I_1..u_I_{N-1}, r0          (2N entries)
struct Layout {
  int64_t N;
  BPDL_HOST_DEVICE int64_t W(int64_t k) const { return k - 1; }
  BPDL_HOST_DEVICE int64_t b(int64_t k) const { return N + k - 1; }
  BPDL_HOST_DEVICE int64_t W_td(int64_t k) const { return 2 * N + k - 1; }
  BPDL_HOST_DEVICE int64_t W_pi(int64_t k) const { return 3 * N - 1 + k - 1; }
  BPDL_HOST_DEVICE int64_t W_ip(int64_t k) const { return 4 * N - 2 + k - 1; }
  BPDL_HOST_DEVICE int64_t b_ip(int64_t k) const { return 5 * N - 3 + k - 1; }
  BPDL_HOST_DEVICE int64_t num_weights() const { return 6 * N - 4; }
  BPDL_HOST_DEVICE int64_t u(int64_t k) const { return k - 1; }
  BPDL_HOST_DEVICE int64_t u_I(int64_t k) const { return N + k - 1; }
  BPDL_HOST_DEVICE int64_t r0() const { return 2 * N - 1; }
  BPDL_HOST_DEVICE int64_t num_state() const { return 2 * N; }
};

BPDL_HOST_DEVICE uint32_t pyramidal_stream(int64_t k) {
  return kNoiseStream + static_cast<uint32_t>(2 * k);
}
BPDL_HOST_DEVICE uint32_t interneuron_stream(int64_t k) {
  return kNoiseStream + static_cast<uint32_t>(2 * k + 1);
}

// The Philox block of neuron pair `pair` (neurons 2 pair and 2 pair + 1) of a population in the
// lane presenting `example` at step `step`: counter (pair, example mod 2^32, step, stream), key
// seed. Words 0, 1 give the first neuron's normal and words 2, 3 the second's (Box-Muller).
BPDL_HOST_DEVICE Philox4 noise_block(uint64_t seed, int64_t pair, int64_t example, uint32_t step,
                                     uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(pair), static_cast<uint32_t>(example), step, stream,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

}  // namespace micro
}  // namespace bpdl
