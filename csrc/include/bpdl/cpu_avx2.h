#pragma once
// Build-time and run-time detection of the AVX2 + FMA paths of bpdl's CPU kernels. A source that
// has such a path compiles it under `#pragma GCC target("avx2,fma")` when BPDL_HAVE_AVX2_BUILD is
// defined and takes it only when cpu_has_avx2_fma() says the running CPU has both extensions;
// otherwise the portable path runs (same numbers, bit for bit).

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BPDL_HAVE_AVX2_BUILD 1
#endif

namespace bpdl {

inline bool cpu_has_avx2_fma() {
#if defined(BPDL_HAVE_AVX2_BUILD)
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

}  // namespace bpdl
