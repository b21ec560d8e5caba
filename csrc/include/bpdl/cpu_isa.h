#pragma once
// Build-time and run-time choice of the instruction set of bpdl's vectorised CPU kernels. A source
// with such paths compiles them under `#pragma GCC target(...)` regions (AVX2 + FMA when
// BPDL_HAVE_AVX2_BUILD is defined, AVX-512 when BPDL_HAVE_AVX512_BUILD is) and takes the widest one
// the running CPU supports; the portable path runs otherwise. Every path computes the same
// quantities with the same random numbers (the kernels' tests compare each one with the reference).
//
// The environment variable BPDL_CPU_ISA caps the choice: "base" (portable code only), "avx2" or
// "avx512" (the default: the widest available). It is read at every kernel call, so tests can
// exercise each path in one process.

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BPDL_HAVE_AVX2_BUILD 1
#define BPDL_HAVE_AVX512_BUILD 1
#endif

namespace bpdl {

// The cap from BPDL_CPU_ISA: 0 base, 1 AVX2, 2 AVX-512 (unset or unknown: 2).
inline int cpu_isa_cap() {
  const char* v = std::getenv("BPDL_CPU_ISA");
  if (v == nullptr) return 2;
  if (std::strcmp(v, "base") == 0) return 0;
  if (std::strcmp(v, "avx2") == 0) return 1;
  return 2;
}

inline bool cpu_has_avx2_fma() {
#if defined(BPDL_HAVE_AVX2_BUILD)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok && cpu_isa_cap() >= 1;
#else
  return false;
#endif
}

// AVX-512 Foundation with the VL, BW and DQ extensions (every AVX-512 server CPU since
// Skylake-SP), with AVX2, FMA and POPCNT.
inline bool cpu_has_avx512() {
#if defined(BPDL_HAVE_AVX512_BUILD)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
                         __builtin_cpu_supports("popcnt") &&
                         __builtin_cpu_supports("fma");
  return ok && cpu_isa_cap() >= 2;
#else
  return false;
#endif
}

}  // namespace bpdl
