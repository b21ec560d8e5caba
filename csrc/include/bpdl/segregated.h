// Scalar math of the segregated-dendrite family (Guerguiev, Lillicrap & Richards 2017), shared
// by the CPU and CUDA kernels. python/bpdl/functional/segregated.py is the reference.
#pragma once

#include <cmath>
#include <cstdint>

#include "bpdl/philox.h"

namespace bpdl {
namespace seg {

// Philox stream of the spike draws (population p adds p: 0 = input, m + 1 = layer m).
constexpr uint32_t kSpikeStream = 0x5E600000u;
// A lane's neurons occupy 2^22 Philox blocks of four neurons.
constexpr int kLaneShift = 22;
// Plasticity kinds.
constexpr int64_t kKindOutput = 0, kKindHidden = 1, kKindBackprop = 2;
// Largest averaging-window offset a random plateau may have (offsets are clamped to it).
constexpr int kMaxPlateauOffset = 64;

// Layout of the `params` float list (python/bpdl/ops.py builds it in this order).
enum Param : int {
  kLambdaMax = 0, kGL, kGB, kGA, kGD, kEE, kEI, kKB, kKA, kKD, kNumParams
};
// Layout of the `flags` int list.
enum Flag : int {
  kConductances = 0,   // Euler somata (else steady state)
  kSpikingFF,          // feedforward through PSPs of spikes (else rates)
  kSpikingFB,          // feedback through PSPs of spikes (else the rates of the previous step)
  kBroadcast,          // feedback from the output layer (else from the layer above)
  kApicalSoma,         // g_A > 0: the apical potential enters the soma
  kOriginalQuirks,     // steady-state soma drops the apical term (compat="original")
  kRandomPlateaus,     // per-neuron plateau offsets are given
  kPlateauMax,         // largest plateau offset
  kNumFlags
};

// The Philox block of spike group `group` (neurons 4 group .. 4 group + 3) of a lane.
BPDL_HOST_DEVICE Philox4 spike_block(uint64_t seed, int64_t lane_key, int64_t group,
                                     uint64_t step, uint32_t stream) {
  const uint64_t g = (static_cast<uint64_t>(lane_key) << kLaneShift) + static_cast<uint64_t>(group);
  return philox4x32_10(static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                       static_cast<uint32_t>(step), stream, static_cast<uint32_t>(seed),
                       static_cast<uint32_t>(seed >> 32));
}

// A uniform double in (0, 1) from one 32-bit word: (w + 0.5) 2^-32.
BPDL_HOST_DEVICE double unit_u32(uint32_t w) {
  return (static_cast<double>(w) + 0.5) * 2.3283064365386962890625e-10;
}

// Poisson count of mean `lambda` for uniform u, saturating at 127 (int8 rings). Identical to
// sequential inversion (poisson_from_uniform); u <= 1 - lambda - 1e-12 <= e^-lambda is a zero
// count without evaluating the exponential (most draws at lambda <= 0.2).
BPDL_HOST_DEVICE int spike_count(double u, double lambda) {
  if (u <= 1.0 - lambda - 1e-12) return 0;
  const int k = poisson_from_uniform(u, lambda);
  return k > 127 ? 127 : k;
}

#include "bpdl/segregated_math.inc"

}  // namespace seg
}  // namespace bpdl
