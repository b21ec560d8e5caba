// The per-step loops of the microcircuit CPU kernel (docs/algorithms/microcircuits.md §6.1-6.2;
// reference python/bpdl/functional/microcircuit.py, full_step).
//
// Deliberately without include guard: csrc/cpu/microcircuit_cpu.cpp includes this file three
// times, once per instruction set (namespace BPDL_MC_IMPL_NS is impl_base, impl_avx2 or
// impl_avx512, the last two inside `#pragma GCC target` regions), so that the same source is
// compiled for the baseline x86-64, AVX2/FMA and AVX-512 and chosen at run time
// (bpdl/cpu_isa.h). Everything here has internal linkage and calls only code defined before the
// inclusion or inside this namespace, so the builds never mix.
//
// The unit of work is a block of up to kBlock pyramidal neurons of one layer k (j0 .. j0 + L - 1)
// together with everything only they need: their basal rows of W_k and b_k, their apical rows
// of W_td_k and W_pi_k (hidden layers), and their partner interneurons of layer k - 1 (rows of
// W_ip_{k-1}, b_ip_{k-1}; k >= 2), whose somata read these neurons' potentials. A block runs the
// reference's step for its neurons in the reference's order: dendrites from the rates of step t,
// the induction terms, the traces and weights of its rows (each row of T and W read and written
// once), the somata with their noise, and the new rates, written to the other of two rate
// buffers so that no block reads a rate another block has already advanced.

namespace BPDL_MC_IMPL_NS {

using ::bpdl::micro::kSoftRelu;
using ::bpdl::micro::kSoftplusThreshold;

// ---- vectors ------------------------------------------------------------------------------------
// GCC vector extensions of the native width of this build: the same source becomes SSE2, AVX2 or
// AVX-512 code.

#if defined(BPDL_MC_IMPL_AVX512)
constexpr int kVecBytes = 64;
#elif defined(BPDL_MC_IMPL_AVX2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kWidth = kVecBytes / static_cast<int>(sizeof(T));

// Lanes per tile of the dendritic products: R = 4 rows x kTileLanes lanes accumulators (16
// registers of AVX-512's 32; 8 of the 16 of AVX2 and SSE2).
#if defined(BPDL_MC_IMPL_AVX512)
constexpr int kTileLanes = 4;
#else
constexpr int kTileLanes = 2;
#endif

template <typename T>
inline Vec<T> vload(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void vstore(T* p, Vec<T> v) {
  __builtin_memcpy(p, &v, sizeof(v));
}
// Elements [0, n) of p, n < width, zeros beyond; masked loads never touch the rest (the rows of
// the short apical matrices are shorter than one vector).
inline Vec<float> vload_first(const float* p, int n) {
#if defined(BPDL_MC_IMPL_AVX512)
  return (Vec<float>)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#elif defined(BPDL_MC_IMPL_AVX2)
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return (Vec<float>)_mm256_maskload_ps(p, m);
#else
  Vec<float> v = Vec<float>{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
inline Vec<double> vload_first(const double* p, int n) {
#if defined(BPDL_MC_IMPL_AVX512)
  return (Vec<double>)_mm512_maskz_loadu_pd(static_cast<__mmask8>((1u << n) - 1), p);
#elif defined(BPDL_MC_IMPL_AVX2)
  const __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  return (Vec<double>)_mm256_maskload_pd(p, m);
#else
  Vec<double> v = Vec<double>{};
  for (int i = 0; i < n; ++i) v[i] = p[i];
  return v;
#endif
}
// Stores elements [0, n) of v, n < width.
inline void vstore_first(float* p, Vec<float> v, int n) {
#if defined(BPDL_MC_IMPL_AVX512)
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
#elif defined(BPDL_MC_IMPL_AVX2)
  const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  _mm256_maskstore_ps(p, m, (__m256)v);
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}
inline void vstore_first(double* p, Vec<double> v, int n) {
#if defined(BPDL_MC_IMPL_AVX512)
  _mm512_mask_storeu_pd(p, static_cast<__mmask8>((1u << n) - 1), (__m512d)v);
#elif defined(BPDL_MC_IMPL_AVX2)
  const __m256i m = _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  _mm256_maskstore_pd(p, m, (__m256d)v);
#else
  for (int i = 0; i < n; ++i) p[i] = v[i];
#endif
}

// Integer vectors of the same shape, for shuffle masks.
template <typename T>
struct MaskOf;
template <>
struct MaskOf<float> {
  typedef int32_t type __attribute__((vector_size(kVecBytes)));
};
template <>
struct MaskOf<double> {
  typedef int64_t type __attribute__((vector_size(kVecBytes)));
};

// v[i] + v[i ^ H] in every element.
template <typename T, int H>
inline Vec<T> add_swapped(Vec<T> v) {
  typename MaskOf<T>::type m;
  for (int i = 0; i < kWidth<T>; ++i) m[i] = i ^ H;
  return v + __builtin_shuffle(v, m);
}

// a and b each hold G groups of S = width / G partial sums; the result holds a's groups and
// then b's, each folded to S / 2 (its lower half plus its upper half).
template <typename T, int G>
inline Vec<T> fold_pair(Vec<T> a, Vec<T> b) {
  constexpr int W = kWidth<T>, S = W / G, H = S / 2;
  typename MaskOf<T>::type lo, hi;
  for (int p = 0; p < W; ++p) {
    const int j = p / H, o = p % H;
    const int idx = j < G ? j * S + o : W + (j - G) * S + o;
    lo[p] = idx;
    hi[p] = idx + H;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// s[r] = the element sum of acc[r] for four vectors at once: two levels of pairwise folds put
// the four partial sums side by side, and in-group folds finish them (a dozen shuffles and
// additions instead of four separate trees whose single used lane compilers scalarise).
template <typename T>
inline void hsum4(const Vec<T>* acc, T* s) {
  constexpr int W = kWidth<T>;
  const Vec<T> x01 = fold_pair<T, 1>(acc[0], acc[1]);
  const Vec<T> x23 = fold_pair<T, 1>(acc[2], acc[3]);
  if constexpr (W == 2) {
    s[0] = x01[0];
    s[1] = x01[1];
    s[2] = x23[0];
    s[3] = x23[1];
  } else {
    Vec<T> y = fold_pair<T, 2>(x01, x23);  // four groups of W / 4
    if constexpr (W / 4 >= 4) y = add_swapped<T, 2>(y);
    if constexpr (W / 4 >= 2) y = add_swapped<T, 1>(y);
    for (int r = 0; r < 4; ++r) s[r] = y[r * (W / 4)];
  }
}

// ---- scalar math in double, written without library calls so that loops over it vectorise -----

inline double as_double(uint64_t b) {
  double d;
  __builtin_memcpy(&d, &b, sizeof(d));
  return d;
}
inline uint64_t as_bits(double d) {
  uint64_t b;
  __builtin_memcpy(&b, &d, sizeof(b));
  return b;
}

constexpr double kTwo52 = 4503599627370496.0;          // 2^52
constexpr double kRoundShift = 6755399441055744.0;     // 1.5 * 2^52: x + it rounds x to an integer
constexpr double kLn2Hi = 6.93147180369123816490e-01;  // ln 2 in two parts (fdlibm)
constexpr double kLn2Lo = 1.90821492927058770002e-10;

// e^x for x in [-708, 709] (clamped outside), about 1 ulp: x = n ln2 + r, |r| <= ln2 / 2, and
// the Taylor series of e^r to degree 13 (remainder below 4e-18).
inline double exp_d(double x) {
  x = x > 709.0 ? 709.0 : (x < -708.0 ? -708.0 : x);
  const double shifted = x * 1.4426950408889634 + kRoundShift;
  const double n = shifted - kRoundShift;
  const double r = (x - n * kLn2Hi) - n * kLn2Lo;
  double p = 1.6059043836821613e-10;  // 1/13!
  p = p * r + 2.0876756987868099e-09;
  p = p * r + 2.5052108385441720e-08;
  p = p * r + 2.7557319223985893e-07;
  p = p * r + 2.7557319223985888e-06;
  p = p * r + 2.4801587301587302e-05;
  p = p * r + 1.9841269841269841e-04;
  p = p * r + 1.3888888888888889e-03;
  p = p * r + 8.3333333333333332e-03;
  p = p * r + 4.1666666666666664e-02;
  p = p * r + 1.6666666666666666e-01;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  // the integer n sits in the low bits of `shifted`
  const int64_t ni = static_cast<int64_t>(as_bits(shifted) - as_bits(kRoundShift));
  return p * as_double(static_cast<uint64_t>(ni + 1023) << 52);
}

// log x for a positive normal x, about 1 ulp: x = 2^e m with m in [sqrt(1/2), sqrt(2)), and
// log m = 2 atanh(s), s = (m - 1) / (m + 1), by its series to s^23 (|s| <= 0.1716).
inline double log_d(double x) {
  const uint64_t bits = as_bits(x);
  double e = as_double(0x4330000000000000ull | (bits >> 52)) - kTwo52 - 1023.0;
  double m = as_double((bits & 0x000FFFFFFFFFFFFFull) | 0x3FF0000000000000ull);
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  e = big ? e + 1.0 : e;
  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double z = s * s;
  double p = 1.0 / 23.0;
  p = p * z + 1.0 / 21.0;
  p = p * z + 1.0 / 19.0;
  p = p * z + 1.0 / 17.0;
  p = p * z + 1.0 / 15.0;
  p = p * z + 1.0 / 13.0;
  p = p * z + 1.0 / 11.0;
  p = p * z + 1.0 / 9.0;
  p = p * z + 1.0 / 7.0;
  p = p * z + 1.0 / 5.0;
  p = p * z + 1.0 / 3.0;
  const double log_m = 2.0 * s + 2.0 * s * (z * p);
  return e * kLn2Hi + (log_m + e * kLn2Lo);
}

// log(1 + y) for y >= 0, a few ulp: log(w) y / (w - 1) with w = 1 + y corrects w's rounding.
inline double log1p_d(double y) {
  const double w = 1.0 + y;
  const double wm1 = w - 1.0;
  const double safe = wm1 == 0.0 ? 1.0 : wm1;
  return wm1 == 0.0 ? y : log_d(w) * (y / safe);
}

// cos(2 pi u) for u in (0, 1): reduced exactly in u to |2 pi f| <= pi / 4 (f = |t|, 1/4 - |t| or
// 1/2 - |t| with t = u - round(u), all exact by Sterbenz' lemma), then Taylor series of cos
// (to x^16) or sin (to x^17).
inline double cos_2pi(double u) {
  const double t = u > 0.5 ? u - 1.0 : u;
  const double a = t < 0.0 ? -t : t;  // [0, 1/2]
  const bool use_sin = a > 0.125 && a < 0.375;
  const bool negate = a >= 0.375;
  const double f = use_sin ? 0.25 - a : (negate ? 0.5 - a : a);
  const double x = f * 6.283185307179586;
  const double z = x * x;
  double c = 4.7794773323873853e-14;  // 1/16!
  c = c * z - 1.1470745597729725e-11;
  c = c * z + 2.0876756987868099e-09;
  c = c * z - 2.7557319223985888e-07;
  c = c * z + 2.4801587301587302e-05;
  c = c * z - 1.3888888888888889e-03;
  c = c * z + 4.1666666666666664e-02;
  c = c * z - 0.5;
  c = c * z + 1.0;
  double s = 2.8114572543455206e-15;  // 1/17!
  s = s * z - 7.6471637318198164e-13;
  s = s * z + 1.6059043836821613e-10;
  s = s * z - 2.5052108385441720e-08;
  s = s * z + 2.7557319223985893e-06;
  s = s * z - 1.9841269841269841e-04;
  s = s * z + 8.3333333333333332e-03;
  s = s * z - 1.6666666666666666e-01;
  s = s * z + 1.0;
  s = s * x;
  const double v = use_sin ? s : c;
  return negate ? -v : v;
}

// A 32-bit word as a double, exactly (2^52 + w - 2^52), without an int-to-double conversion
// that AVX2 lacks.
inline double word_to_double(uint32_t w) {
  return as_double(0x4330000000000000ull | static_cast<uint64_t>(w)) - kTwo52;
}

// The Box-Muller factors of the reference's noise(): z = sqrt(-2 log u0) cos(2 pi u1) with
// u = (w + 0.5) 2^-32; the square root is taken by vsqrt below (GCC keeps a branch for errno
// around a scalar sqrt, which stops the loops from vectorising).
inline double unit_of(uint32_t w) {
  return (word_to_double(w) + 0.5) * 2.3283064365386962890625e-10;
}

// out[i] = sqrt(rad[i]) c[i], with the vector square root of this instruction set.
inline void vsqrt_mul(const double* rad, const double* c, double* out, int64_t n) {
  int64_t i = 0;
#if defined(BPDL_MC_IMPL_AVX512)
  for (; i + 8 <= n; i += 8)
    _mm512_storeu_pd(out + i, _mm512_mul_pd(_mm512_sqrt_pd(_mm512_loadu_pd(rad + i)),
                                            _mm512_loadu_pd(c + i)));
#elif defined(BPDL_MC_IMPL_AVX2)
  for (; i + 4 <= n; i += 4)
    _mm256_storeu_pd(out + i, _mm256_mul_pd(_mm256_sqrt_pd(_mm256_loadu_pd(rad + i)),
                                            _mm256_loadu_pd(c + i)));
#elif defined(__SSE2__)
  for (; i + 2 <= n; i += 2)
    _mm_storeu_pd(out + i, _mm_mul_pd(_mm_sqrt_pd(_mm_loadu_pd(rad + i)), _mm_loadu_pd(c + i)));
#endif
  for (; i < n; ++i) out[i] = __builtin_sqrt(rad[i]) * c[i];
}

// The transfer function phi in the precision of T as the reference rounds it: the logistic of x,
// or gamma softplus_beta(x - theta) with x - theta and the product by gamma rounded to T.
template <typename T, int Transfer>
inline T phi(T x, T theta, T gamma, double beta) {
  if constexpr (Transfer == kSoftRelu) {
    const T xt = x - theta;
    const double z = static_cast<double>(xt) * beta;
    const double sp = z > kSoftplusThreshold ? static_cast<double>(xt) : log1p_d(exp_d(z)) / beta;
    return gamma * static_cast<T>(sp);
  } else {
    return static_cast<T>(1.0 / (1.0 + exp_d(-static_cast<double>(x))));
  }
}

// ---- Philox blocks of neuron pairs ------------------------------------------------------------

#if defined(BPDL_MC_IMPL_AVX2)
#include "bpdl/philox_avx2.inc"
#endif
#if defined(BPDL_MC_IMPL_AVX512)
#include "bpdl/philox_avx512.inc"
#endif

#if defined(BPDL_MC_IMPL_AVX512)
constexpr int kPhiloxBatch = 32;  // blocks per call of the vector generator
#else
constexpr int kPhiloxBatch = 16;
#endif

// out[4 q + w] = word w of the block with counter (lo[q], hi[q], step, stream), q < n. `lo`, `hi`
// and `out` must have room for n rounded up to kPhiloxBatch blocks (the padding repeats the last).
inline void philox_blocks(uint32_t* lo, uint32_t* hi, int64_t n, uint32_t step, uint32_t stream,
                          uint64_t seed, uint32_t* out) {
  int64_t q = 0;
#if defined(BPDL_MC_IMPL_AVX2)
  if (n > 0) {
    const int64_t padded = (n + kPhiloxBatch - 1) / kPhiloxBatch * kPhiloxBatch;
    for (int64_t i = n; i < padded; ++i) {
      lo[i] = lo[n - 1];
      hi[i] = hi[n - 1];
    }
    for (; q < padded; q += kPhiloxBatch) {
#if defined(BPDL_MC_IMPL_AVX512)
      philox32(_mm512_loadu_si512(lo + q), _mm512_loadu_si512(hi + q),
               _mm512_loadu_si512(lo + q + 16), _mm512_loadu_si512(hi + q + 16), step, stream,
               seed, out + 4 * q);
#else
      philox16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + q)),
               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + q)),
               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + q + 8)),
               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + q + 8)), step, stream,
               seed, out + 4 * q);
#endif
    }
  }
#endif
  for (; q < n; ++q) {
    const ::bpdl::Philox4 r = ::bpdl::philox4x32_10(lo[q], hi[q], step, stream,
                                                    static_cast<uint32_t>(seed),
                                                    static_cast<uint32_t>(seed >> 32));
    out[4 * q] = r.v[0];
    out[4 * q + 1] = r.v[1];
    out[4 * q + 2] = r.v[2];
    out[4 * q + 3] = r.v[3];
  }
}

// ---- the dendritic products ---------------------------------------------------------------------

// s[l][r] = sum_i M[r][i] P[l][i] for four rows M and L lanes P, in one pass over i with 4 L
// vector accumulators (the rows are loaded once for all lanes of the tile).
template <typename T, int L>
inline void dot_tile(const T* const* M, const T* const* P, int64_t K, T (*s)[4]) {
  constexpr int W = kWidth<T>;
  Vec<T> acc[L][4];
  for (int l = 0; l < L; ++l)
    for (int r = 0; r < 4; ++r) acc[l][r] = Vec<T>{};
  int64_t i = 0;
  for (; i + W <= K; i += W) {
    const Vec<T> m0 = vload(M[0] + i), m1 = vload(M[1] + i), m2 = vload(M[2] + i),
                 m3 = vload(M[3] + i);
    for (int l = 0; l < L; ++l) {
      const Vec<T> p = vload(P[l] + i);
      acc[l][0] += m0 * p;
      acc[l][1] += m1 * p;
      acc[l][2] += m2 * p;
      acc[l][3] += m3 * p;
    }
  }
  if (i < K) {  // the last, partial vector of columns
    const int rem = static_cast<int>(K - i);
    const Vec<T> m0 = vload_first(M[0] + i, rem), m1 = vload_first(M[1] + i, rem),
                 m2 = vload_first(M[2] + i, rem), m3 = vload_first(M[3] + i, rem);
    for (int l = 0; l < L; ++l) {
      const Vec<T> p = vload_first(P[l] + i, rem);
      acc[l][0] += m0 * p;
      acc[l][1] += m1 * p;
      acc[l][2] += m2 * p;
      acc[l][3] += m3 * p;
    }
  }
  for (int l = 0; l < L; ++l) hsum4<T>(acc[l], s[l]);
}

// v[b][r] (row stride kBlock) = sum_i M[j0 + r][i] pre[b][i] + (bias[j0 + r], or v[b][r] itself
// when `accumulate`, or nothing), for the block's L rows (M and bias already offset to j0) and
// all lanes. A matmul then an addition, as the reference's r @ W.t() + b.
template <typename T, int kBlock>
inline void dendrites(const T* M, int64_t K, const T* pre, int64_t B, int L, const T* bias,
                      bool accumulate, T* v) {
  for (int r0 = 0; r0 < L; r0 += 4) {
    const int R = L - r0 < 4 ? L - r0 : 4;
    const T* rows[4];
    for (int r = 0; r < 4; ++r) rows[r] = M + static_cast<int64_t>(r0 + (r < R ? r : R - 1)) * K;
    for (int64_t b0 = 0; b0 < B; b0 += kTileLanes) {
      const int lanes = B - b0 < kTileLanes ? static_cast<int>(B - b0) : kTileLanes;
      const T* P[kTileLanes];
      for (int l = 0; l < kTileLanes; ++l) P[l] = pre + (b0 + (l < lanes ? l : lanes - 1)) * K;
      T s[kTileLanes][4];
      switch (lanes) {
        case 1: dot_tile<T, 1>(rows, P, K, s); break;
#if defined(BPDL_MC_IMPL_AVX512)
        case 2: dot_tile<T, 2>(rows, P, K, s); break;
        case 3: dot_tile<T, 3>(rows, P, K, s); break;
#endif
        default: dot_tile<T, kTileLanes>(rows, P, K, s); break;
      }
      for (int l = 0; l < lanes; ++l) {
        T* out = v + (b0 + l) * kBlock + r0;
        for (int r = 0; r < R; ++r)
          out[r] = bias ? s[l][r] + bias[r0 + r] : (accumulate ? out[r] + s[l][r] : s[l][r]);
      }
    }
  }
}

// ---- the traces and weights ---------------------------------------------------------------------

// Column vectors per trace-update tile: R = 4 rows x kTileCols vectors of accumulators, so that
// each lane's four broadcast induction terms serve kTileCols loaded input vectors.
#if defined(BPDL_MC_IMPL_AVX512)
constexpr int kTileCols = 4;
#else
constexpr int kTileCols = 2;
#endif

// T <- (1 - a) T + a g and, when Apply, W <- W + c T on C vectors of columns from i, with g the
// accumulated induction terms of the tile.
template <typename T, int R, int C, bool Apply>
inline void trace_epilogue(T* const* W, T* const* Tr, int64_t i, const Vec<T> (*g)[C], T keep,
                           T a, T c) {
  constexpr int Wd = kWidth<T>;
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < C; ++q) {
      const Vec<T> t = vload(Tr[r] + i + q * Wd) * keep + g[r][q] * a;
      vstore(Tr[r] + i + q * Wd, t);
      if constexpr (Apply) vstore(W[r] + i + q * Wd, vload(W[r] + i + q * Wd) + t * c);
    }
}

// For R rows: g = sum_b e[b][r] pre[b] (the lanes' summed induction term), then
// T <- (1 - a) T + a g and, when Apply, W <- W + c T: each element of T and W read and written
// once. `e` has row stride kBlock and is offset to the first of the R rows.
template <typename T, int R, bool Apply, int kBlock>
inline void update_tile(T* const* W, T* const* Tr, const T* e, const T* pre, int64_t B,
                        int64_t K, T keep, T a, T c) {
  constexpr int Wd = kWidth<T>;
  constexpr int C = kTileCols;
  int64_t i = 0;
  for (; i + C * Wd <= K; i += C * Wd) {
    Vec<T> g[R][C];
    for (int r = 0; r < R; ++r)
      for (int q = 0; q < C; ++q) g[r][q] = Vec<T>{};
    const T* p = pre + i;
    const T* eb = e;
    for (int64_t b = 0; b < B; ++b, p += K, eb += kBlock) {
      Vec<T> pv[C];
      for (int q = 0; q < C; ++q) pv[q] = vload(p + q * Wd);
      for (int r = 0; r < R; ++r) {
        const T er = eb[r];
        for (int q = 0; q < C; ++q) g[r][q] += er * pv[q];
      }
    }
    trace_epilogue<T, R, C, Apply>(W, Tr, i, g, keep, a, c);
  }
  for (; i + Wd <= K; i += Wd) {
    Vec<T> g[R][1];
    for (int r = 0; r < R; ++r) g[r][0] = Vec<T>{};
    const T* p = pre + i;
    const T* eb = e;
    for (int64_t b = 0; b < B; ++b, p += K, eb += kBlock) {
      const Vec<T> pv = vload(p);
      for (int r = 0; r < R; ++r) g[r][0] += eb[r] * pv;
    }
    trace_epilogue<T, R, 1, Apply>(W, Tr, i, g, keep, a, c);
  }
  if (i < K) {  // the last, partial vector of columns
    const int rem = static_cast<int>(K - i);
    Vec<T> g[R];
    for (int r = 0; r < R; ++r) g[r] = Vec<T>{};
    const T* p = pre + i;
    const T* eb = e;
    for (int64_t b = 0; b < B; ++b, p += K, eb += kBlock) {
      const Vec<T> pv = vload_first(p, rem);
      for (int r = 0; r < R; ++r) g[r] += eb[r] * pv;
    }
    for (int r = 0; r < R; ++r) {
      const Vec<T> t = vload_first(Tr[r] + i, rem) * keep + g[r] * a;
      vstore_first(Tr[r] + i, t, rem);
      if constexpr (Apply) vstore_first(W[r] + i, vload_first(W[r] + i, rem) + t * c, rem);
    }
  }
}

// The trace and weight update of the block's L rows of one matrix (M, Tm offset to row j0).
template <typename T, bool Apply, int kBlock>
inline void update_rows(T* M, T* Tm, int64_t K, const T* e, const T* pre, int64_t B, int L,
                        T keep, T a, T c) {
  for (int r0 = 0; r0 < L; r0 += 4) {
    const int R = L - r0 < 4 ? L - r0 : 4;
    T* Wr[4];
    T* Tr[4];
    for (int r = 0; r < R; ++r) {
      Wr[r] = M + static_cast<int64_t>(r0 + r) * K;
      Tr[r] = Tm + static_cast<int64_t>(r0 + r) * K;
    }
    const T* er = e + r0;
    switch (R) {
      case 1: update_tile<T, 1, Apply, kBlock>(Wr, Tr, er, pre, B, K, keep, a, c); break;
      case 2: update_tile<T, 2, Apply, kBlock>(Wr, Tr, er, pre, B, K, keep, a, c); break;
      case 3: update_tile<T, 3, Apply, kBlock>(Wr, Tr, er, pre, B, K, keep, a, c); break;
      default: update_tile<T, 4, Apply, kBlock>(Wr, Tr, er, pre, B, K, keep, a, c); break;
    }
  }
}

// The thresholds' traces (constant-1 input): g = sum_b e[b][r].
template <typename T, bool Apply, int kBlock>
inline void update_bias(T* bias, T* Tb, const T* e, int64_t B, int L, T keep, T a, T c) {
  for (int r = 0; r < L; ++r) {
    T g = T(0);
    for (int64_t b = 0; b < B; ++b) g += e[b * kBlock + r];
    const T t = Tb[r] * keep + g * a;
    Tb[r] = t;
    if constexpr (Apply) bias[r] = bias[r] + t * c;
  }
}

// ---- one block of one step --------------------------------------------------------------------

// z[b][r] (row stride kBlock) for the block's L neurons (j0 even) of one population: pair
// j0 / 2 + p gives neurons 2 p (words 0, 1) and 2 p + 1 (words 2, 3) of the block.
template <typename T, int kBlock>
inline void normals(const McNet<T>& net, McScratch<T>& sc, int64_t j0, int L, uint32_t step,
                    uint32_t stream, T* z) {
  const int64_t B = net.B;
  const int npairs = (L + 1) / 2;
  const int64_t n = B * npairs;
  uint32_t* lo = sc.lo.data();
  uint32_t* hi = sc.hi.data();
  for (int64_t b = 0; b < B; ++b) {
    const uint32_t ex = static_cast<uint32_t>(net.example[b]);
    for (int p = 0; p < npairs; ++p) {
      lo[b * npairs + p] = static_cast<uint32_t>(j0 / 2 + p);
      hi[b * npairs + p] = ex;
    }
  }
  uint32_t* words = sc.words.data();
  philox_blocks(lo, hi, n, step, stream, net.seed, words);
  double* rad = sc.rad.data();
  double* cs = sc.cs.data();
  for (int64_t q = 0; q < n; ++q) {
    rad[2 * q] = -2.0 * log_d(unit_of(words[4 * q]));
    cs[2 * q] = cos_2pi(unit_of(words[4 * q + 1]));
    rad[2 * q + 1] = -2.0 * log_d(unit_of(words[4 * q + 2]));
    cs[2 * q + 1] = cos_2pi(unit_of(words[4 * q + 3]));
  }
  double* zz = sc.z2.data();
  vsqrt_mul(rad, cs, zz, 2 * n);
  for (int64_t b = 0; b < B; ++b)
    for (int r = 0; r < L; ++r) z[b * kBlock + r] = static_cast<T>(zz[b * 2 * npairs + r]);
}

template <typename T, int Transfer, bool Apply, int kBlock>
void run_block(const McNet<T>& net, const McLayer<T>& ly, int64_t j0, int L, McScratch<T>& sc,
               int s, uint32_t step) {
  const int64_t B = net.B;
  const int64_t n = ly.n, n_in = ly.n_in, n_up = ly.n_up;
  const bool hidden = n_up > 0;
  const bool inter = ly.W_ip != nullptr;
  T* vB = sc.vB.data();
  T* vA = sc.vA.data();
  T* vI = sc.vI.data();
  T* eW = sc.eW.data();
  T* eI = sc.eI.data();
  T* eA = sc.eA.data();
  const T* pre = ly.R_in[s];

  // dendrites from the rates of step t (reference: v_B, v_A, v_I)
  dendrites<T, kBlock>(ly.W + j0 * n_in, n_in, pre, B, L, ly.b + j0, false, vB);
  if (inter) dendrites<T, kBlock>(ly.W_ip + j0 * n_in, n_in, pre, B, L, ly.b_ip + j0, false, vI);
  if (hidden) {
    dendrites<T, kBlock>(ly.W_td + j0 * n_up, n_up, ly.R_up[s], B, L, nullptr, false, vA);
    dendrites<T, kBlock>(ly.W_pi + j0 * n_up, n_up, ly.RI_k[s], B, L, nullptr, true, vA);
  }

  // induction terms: phi(u) - phi(a_k v_B), phi(u^I) - phi(d v^I), -v_A
  const T theta = net.theta, gamma = net.gamma;
  const double beta = net.beta;
  for (int64_t b = 0; b < B; ++b) {
    const T* r_own = ly.R[s] + b * n + j0;
    for (int r = 0; r < L; ++r)
      eW[b * kBlock + r] = r_own[r] - phi<T, Transfer>(ly.basal_factor * vB[b * kBlock + r],
                                                       theta, gamma, beta);
    if (inter) {
      const T* ri_own = ly.RI_own[s] + b * n + j0;
      for (int r = 0; r < L; ++r)
        eI[b * kBlock + r] = ri_own[r] - phi<T, Transfer>(net.int_factor * vI[b * kBlock + r],
                                                          theta, gamma, beta);
    }
    if (hidden && ly.T_pi)
      for (int r = 0; r < L; ++r) eA[b * kBlock + r] = -vA[b * kBlock + r];
  }

  // traces and weights of the block's rows
  const T keep = net.keep, a = net.a;
  if (ly.T_W) update_rows<T, Apply, kBlock>(ly.W + j0 * n_in, ly.T_W + j0 * n_in, n_in, eW, pre,
                                            B, L, keep, a, ly.c_W);
  if (ly.T_b) update_bias<T, Apply, kBlock>(ly.b + j0, ly.T_b + j0, eW, B, L, keep, a, ly.c_b);
  if (inter && ly.T_ip)
    update_rows<T, Apply, kBlock>(ly.W_ip + j0 * n_in, ly.T_ip + j0 * n_in, n_in, eI, pre, B, L,
                                  keep, a, ly.c_ip);
  if (inter && ly.T_bip)
    update_bias<T, Apply, kBlock>(ly.b_ip + j0, ly.T_bip + j0, eI, B, L, keep, a, ly.c_bip);
  if (hidden && ly.T_pi)
    update_rows<T, Apply, kBlock>(ly.W_pi + j0 * n_up, ly.T_pi + j0 * n_up, n_up, eA,
                                  ly.RI_k[s], B, L, keep, a, ly.c_pi);

  // somata: u <- u + dt du/dt, then + sigma sqrt(dt) xi
  T* zP = sc.zP.data();
  T* zI = sc.zI.data();
  if (net.noise) {
    normals<T, kBlock>(net, sc, j0, L, step, ly.stream_P, zP);
    if (inter) normals<T, kBlock>(net, sc, j0, L, step, ly.stream_I, zI);
  }
  const T g_lk = net.g_lk, g_B = net.g_B, g_A = net.g_A, g_D = net.g_D, g_som = net.g_som,
          g_som_I = net.g_som_I, dt = net.dt, sq = net.sq;
  const int nxt = 1 - s;
  for (int64_t b = 0; b < B; ++b) {
    T* u = ly.u + b * n + j0;
    const T* vb = vB + b * kBlock;
    if (inter) {
      // the interneurons first: they read their partners' potentials of step t
      T* ui = ly.u_I + b * n + j0;
      const T* vi = vI + b * kBlock;
      for (int r = 0; r < L; ++r) {
        const T x = ui[r];
        const T d = -g_lk * x + g_D * (vi[r] - x) + g_som_I * (u[r] - x);
        ui[r] = x + dt * d;
      }
      if (net.noise)
        for (int r = 0; r < L; ++r) ui[r] = ui[r] + sq * zI[b * kBlock + r];
      T* ri_next = ly.RI_own[nxt] + b * n + j0;
      for (int r = 0; r < L; ++r) ri_next[r] = phi<T, Transfer>(ui[r], theta, gamma, beta);
    }
    if (hidden) {
      const T* va = vA + b * kBlock;
      for (int r = 0; r < L; ++r) {
        const T x = u[r];
        const T d = -g_lk * x + g_B * (vb[r] - x);
        u[r] = x + dt * (d + g_A * (va[r] - x));
      }
    } else if (ly.u_trgt) {
      const T* ut = ly.u_trgt + b * n + j0;
      for (int r = 0; r < L; ++r) {
        const T x = u[r];
        const T d = -g_lk * x + g_B * (vb[r] - x);
        u[r] = x + dt * (d + g_som * (ut[r] - x));
      }
    } else {
      for (int r = 0; r < L; ++r) {
        const T x = u[r];
        u[r] = x + dt * (-g_lk * x + g_B * (vb[r] - x));
      }
    }
    if (net.noise)
      for (int r = 0; r < L; ++r) u[r] = u[r] + sq * zP[b * kBlock + r];
    T* r_next = ly.R[nxt] + b * n + j0;
    for (int r = 0; r < L; ++r) r_next[r] = phi<T, Transfer>(u[r], theta, gamma, beta);
  }
}

// One work item of a step: a block of neurons, or a slice of the input filter
// r0 <- r0 + (dt / tau_in)(x - r0), written to the other buffer.
template <typename T, int Transfer>
void run_item(const McNet<T>& net, int64_t item, McScratch<T>& sc, int s, uint32_t step,
              bool apply) {
  const McBlock& blk = net.blocks[item];
  if (blk.layer < 0) {
    const T* r0 = net.R0[s];
    T* r0_next = net.R0[1 - s];
    const T f = net.in_rate;
    for (int64_t i = blk.j0; i < blk.j0 + blk.L; ++i) r0_next[i] = r0[i] + f * (net.x[i] - r0[i]);
    return;
  }
  const McLayer<T>& ly = net.layers[blk.layer];
  const int L = static_cast<int>(blk.L);
  if (apply)
    run_block<T, Transfer, true, kMcBlock>(net, ly, blk.j0, L, sc, s, step);
  else
    run_block<T, Transfer, false, kMcBlock>(net, ly, blk.j0, L, sc, s, step);
}

// The rates of the initial state for one work item: phi(u), phi(u^I) of a block, or a slice of
// r0 copied.
template <typename T, int Transfer>
void initial_rates(const McNet<T>& net, int64_t item) {
  const McBlock& blk = net.blocks[item];
  if (blk.layer < 0) {
    for (int64_t i = blk.j0; i < blk.j0 + blk.L; ++i) net.R0[0][i] = net.r0[i];
    return;
  }
  const T theta = net.theta, gamma = net.gamma;
  const double beta = net.beta;
  const McLayer<T>& ly = net.layers[blk.layer];
  for (int64_t b = 0; b < net.B; ++b) {
    const int64_t o = b * ly.n + blk.j0;
    for (int64_t r = 0; r < blk.L; ++r)
      ly.R[0][o + r] = phi<T, Transfer>(ly.u[o + r], theta, gamma, beta);
    if (ly.u_I)
      for (int64_t r = 0; r < blk.L; ++r)
        ly.RI_own[0][o + r] = phi<T, Transfer>(ly.u_I[o + r], theta, gamma, beta);
  }
}

}  // namespace BPDL_MC_IMPL_NS
