// The per-lane simulation loops of the segregated-dendrite CPU kernels.
//
// This file is included three times by segregated_cpu.cpp, once per instruction set (the
// namespace BPDL_SEG_IMPL_NS is impl_base, impl_avx2 or impl_avx512, the last two inside
// `#pragma GCC target` regions; BPDL_SEG_IMPL_AVX2 / BPDL_SEG_IMPL_AVX512 enable the
// hand-vectorised parts), so that the same source is compiled for the baseline x86-64, AVX2/FMA
// and AVX-512 and chosen at run time. Everything here has internal linkage and calls only code
// defined before the inclusion, which keeps the builds from mixing (no one-definition-rule
// clashes).
//
// Math: docs/algorithms/segregated_dendrites.md, reference python/bpdl/functional/segregated.py. The kernels
// follow the reference step by step but compute the basal input event-driven (section 5.17 b):
// a ring R of the last `taps` vectors W s(tau) (sums of W's columns of the units that spiked)
// gives B(t) = sum_k kappa(k) R(t - k + 1) + b, and the mean input PSP of the plasticity rule
// is accumulated per spike with the closed-form weight of section 5.17 b.

namespace BPDL_SEG_IMPL_NS {

using ::bpdl::seg::kLaneShift;
using ::bpdl::seg::kSpikeStream;
using ::bpdl::seg::spike_block;
using ::bpdl::seg::unit_u32;
using namespace ::bpdl::seg;  // parameter and flag indices

// Local copies of the scalar math (exp_approx, sigmoid, soma_hidden, soma_output), compiled
// for this instruction set so that they inline into the loops below.
#include "bpdl/segregated_math.inc"

#if defined(BPDL_SEG_IMPL_AVX512)
constexpr int kPhiloxBatch = 32;  // Philox blocks per call of the vector generator
#else
constexpr int kPhiloxBatch = 16;
#endif

// ---- Philox blocks for consecutive spike groups ------------------------------------------------

#if defined(BPDL_SEG_IMPL_AVX2)
#include "bpdl/philox_avx2.inc"
#endif
#if defined(BPDL_SEG_IMPL_AVX512)
#include "bpdl/philox_avx512.inc"
#endif

// out[4 i + w] = word w of the Philox block of group `groups[i]` (or g0 + i when groups is null).
// The vector builds fill whole batches of 16 (AVX2) or 32 (AVX-512) blocks: `out` must have room
// for n rounded up to 32 blocks.
inline void philox_groups(uint64_t seed, int64_t lane_key, const int64_t* groups, int64_t g0,
                          int64_t n, uint64_t step, uint32_t stream, uint32_t* out) {
  int64_t i = 0;
#if defined(BPDL_SEG_IMPL_AVX2)
  constexpr int kBatch = kPhiloxBatch;
  const uint64_t base = (static_cast<uint64_t>(lane_key) << kLaneShift);
  alignas(64) uint32_t lo[kBatch], hi[kBatch];
  for (; i < n; i += kBatch) {
    for (int j = 0; j < kBatch; ++j) {
      const int64_t k = i + j < n ? i + j : n - 1;  // padding repeats the last block
      const uint64_t g = base + static_cast<uint64_t>(groups ? groups[k] : g0 + k);
      lo[j] = static_cast<uint32_t>(g);
      hi[j] = static_cast<uint32_t>(g >> 32);
    }
#if defined(BPDL_SEG_IMPL_AVX512)
    philox32(_mm512_load_si512(lo), _mm512_load_si512(hi), _mm512_load_si512(lo + 16),
             _mm512_load_si512(hi + 16), static_cast<uint32_t>(step), stream, seed, out + 4 * i);
#else
    philox16(_mm256_load_si256(reinterpret_cast<const __m256i*>(lo)),
             _mm256_load_si256(reinterpret_cast<const __m256i*>(hi)),
             _mm256_load_si256(reinterpret_cast<const __m256i*>(lo + 8)),
             _mm256_load_si256(reinterpret_cast<const __m256i*>(hi + 8)),
             static_cast<uint32_t>(step), stream, seed, out + 4 * i);
#endif
  }
#endif
  for (; i < n; ++i) {
    const Philox4 r = spike_block(seed, lane_key, groups ? groups[i] : g0 + i, step, stream);
    uint32_t* o = out + 4 * i;
    o[0] = r.v[0];
    o[1] = r.v[1];
    o[2] = r.v[2];
    o[3] = r.v[3];
  }
}

// ---- small vector loops --------------------------------------------------------------------------

template <typename T>
inline void axpy(T* __restrict__ y, T a, const T* __restrict__ x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += a * x[j];
}

template <typename T>
inline void add_to(T* __restrict__ y, const T* __restrict__ x, int64_t n) {
  for (int64_t j = 0; j < n; ++j) y[j] += x[j];
}

// lambda = lambda_max sigma(C), and e^-lambda in float for the spike pre-test (~1e-7 relative:
// a degree-6 Taylor series when lambda_max <= 0.25, whose remainder is below 6e-9 there).
template <typename T>
inline void rates(const T* __restrict__ C, T* __restrict__ lam, float* __restrict__ e_neg,
                  T lambda_max, int64_t n) {
  if (lambda_max <= T(0.25)) {
    for (int64_t j = 0; j < n; ++j) {
      const T l = lambda_max * BPDL_SEG_IMPL_NS::sigmoid(C[j]);
      lam[j] = l;
      const float x = -static_cast<float>(l);
      e_neg[j] = 1.0f + x * (1.0f + x * (0.5f + x * (1.6666667e-1f + x * (4.1666668e-2f +
                 x * (8.3333338e-3f + x * 1.3888889e-3f)))));
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const T l = lambda_max * BPDL_SEG_IMPL_NS::sigmoid(C[j]);
    lam[j] = l;
    e_neg[j] = exp_approx(-static_cast<float>(l));
  }
}

// FIR of a ring of T-vectors: out = bias + sum_k kappa(k) ring[(t - k + 1 - delay) mod T], in
// one pass over the outputs (each output is loaded and stored once).
template <typename T>
inline void fir(T* __restrict__ out, const T* __restrict__ bias, const T* __restrict__ ring,
                const T* kappa, int taps, int64_t t, int delay, int64_t n) {
  constexpr int kChunk = 5;  // ten taps = two passes
  for (int64_t j = 0; j < n; ++j) out[j] = bias ? bias[j] : T(0);
  for (int k0 = 1; k0 <= taps; k0 += kChunk) {
    const int kn = std::min(taps, k0 + kChunk - 1);
    const T* rows[kChunk];
    T w[kChunk];
    int used = 0;
    for (int k = k0; k <= kn; ++k, ++used) {
      const int64_t slot = ((t - k + 1 - delay) % taps + taps) % taps;
      rows[used] = ring + slot * n;
      w[used] = kappa[k - 1];
    }
    for (; used < kChunk; ++used) {  // pad with zero-weight rows
      rows[used] = rows[0];
      w[used] = T(0);
    }
    for (int64_t j = 0; j < n; ++j)
      out[j] += w[0] * rows[0][j] + w[1] * rows[1][j] + w[2] * rows[2][j] + w[3] * rows[3][j] +
                w[4] * rows[4][j];
  }
}

// PSP of an int8 spike ring: out = sum_k kappa(k) S(t - k + 1 - delay), scanning for spikes.
template <typename T>
inline void psp_int8(T* __restrict__ out, const int8_t* __restrict__ ring, const T* kappa,
                     int taps, int64_t t, int delay, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = T(0);
  for (int k = 1; k <= taps; ++k) {
    const int64_t slot = ((t - k + 1 - delay) % taps + taps) % taps;
    const int8_t* s = ring + slot * n;
    const T kk = kappa[k - 1];
    for (int64_t j = 0; j < n; ++j) {
      if (s[j]) out[j] += kk * static_cast<T>(s[j]);
    }
  }
}

// out = bias + M v for a row-major (rows, cols) matrix. Each row's dot product keeps one
// vector's worth of partial sums (column c goes to sum c mod kAcc; the columns past the last
// whole group to a separate tail sum), reduced pairwise in a fixed order: the same sums in the
// same order on every call, so a lane's result does not depend on anything else, and no long
// chain of dependent additions.
template <typename T>
inline void matvec(T* __restrict__ out, const T* bias, const T* __restrict__ M,
                   const T* __restrict__ v, int64_t rows, int64_t cols) {
  constexpr int kAcc = 64 / sizeof(T);  // 16 floats or 8 doubles
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = M + r * cols;
    T acc[kAcc] = {};
    int64_t c = 0;
    for (; c + kAcc <= cols; c += kAcc)
      for (int k = 0; k < kAcc; ++k) acc[k] += row[c + k] * v[c + k];
    T tail = T(0);
    for (; c < cols; ++c) tail += row[c] * v[c];
    for (int w = kAcc / 2; w >= 1; w /= 2)
      for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
    const T total = acc[0] + tail;
    out[r] = bias ? total + bias[r] : total;
  }
}

// Sum of W's columns weighted by spike counts: out = sum_e cnt_e WT[idx_e, :] (rows `ld` apart),
// eight events per pass over the output, then four, then one.
template <typename T>
inline void gather_rows(T* __restrict__ out, const T* __restrict__ WT, int64_t ld,
                        const int32_t* idx, const int8_t* cnt, int64_t events, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = T(0);
  int64_t e = 0;
  for (; e + 8 <= events; e += 8) {
    const T* r[8];
    T c[8];
    for (int k = 0; k < 8; ++k) {
      r[k] = WT + idx[e + k] * ld;
      c[k] = cnt[e + k];
    }
    for (int64_t j = 0; j < n; ++j)
      out[j] += ((c[0] * r[0][j] + c[1] * r[1][j]) + (c[2] * r[2][j] + c[3] * r[3][j])) +
                ((c[4] * r[4][j] + c[5] * r[5][j]) + (c[6] * r[6][j] + c[7] * r[7][j]));
  }
  for (; e + 4 <= events; e += 4) {
    const T* r0 = WT + idx[e] * ld;
    const T* r1 = WT + idx[e + 1] * ld;
    const T* r2 = WT + idx[e + 2] * ld;
    const T* r3 = WT + idx[e + 3] * ld;
    const T c0 = cnt[e], c1 = cnt[e + 1], c2 = cnt[e + 2], c3 = cnt[e + 3];
    for (int64_t j = 0; j < n; ++j) out[j] += c0 * r0[j] + c1 * r1[j] + c2 * r2[j] + c3 * r3[j];
  }
  for (; e < events; ++e) axpy(out, static_cast<T>(cnt[e]), WT + idx[e] * ld, n);
}

// The first layer's basal drive from input rates: out = b + sum_i x_i WT[i, :] over the inputs
// with x_i != 0, in increasing i, four rows per pass over the output (rows `ld` apart). The
// training paths (batched, batch-1 and online) all compute it this way, so they agree bit for
// bit; reading only the rows of the nonzero inputs is what makes it cheaper than a dense product
// for images (most MNIST pixels are zero).
template <typename T>
inline void rate_drive(T* __restrict__ out, const T* __restrict__ b, const T* __restrict__ WT,
                       int64_t ld, const T* __restrict__ x, int64_t n_in, int64_t n,
                       std::vector<int32_t>& idx) {
  idx.clear();
  for (int64_t i = 0; i < n_in; ++i)
    if (x[i] != T(0)) idx.push_back(static_cast<int32_t>(i));
  for (int64_t j = 0; j < n; ++j) out[j] = T(0);
  const int64_t events = static_cast<int64_t>(idx.size());
  int64_t e = 0;
  for (; e + 4 <= events; e += 4) {
    const T* r0 = WT + idx[e] * ld;
    const T* r1 = WT + idx[e + 1] * ld;
    const T* r2 = WT + idx[e + 2] * ld;
    const T* r3 = WT + idx[e + 3] * ld;
    const T c0 = x[idx[e]], c1 = x[idx[e + 1]], c2 = x[idx[e + 2]], c3 = x[idx[e + 3]];
    for (int64_t j = 0; j < n; ++j) out[j] += (c0 * r0[j] + c1 * r1[j]) + (c2 * r2[j] + c3 * r3[j]);
  }
  for (; e < events; ++e) axpy(out, x[idx[e]], WT + idx[e] * ld, n);
  for (int64_t j = 0; j < n; ++j) out[j] += b[j];
}

// Poisson count of mean `lambda` for the uniform of word `w`, knowing e^-lambda to ~1e-7
// relative (`e_approx`): the sequential inversion runs with the approximate CDF, which is the
// exact one times (1 + delta); whenever u falls within 1e-6 of a CDF value the exact
// double-precision inversion decides instead, so the count always equals spike_count(u, lambda).
struct Reciprocals {
  double v[129];
  Reciprocals() {
    for (int k = 1; k < 129; ++k) v[k] = 1.0 / k;
    v[0] = 0.0;
  }
};

inline int count_from_word(uint32_t w, double lambda, float e_approx) {
  static const Reciprocals inv;
  const double u = unit_u32(w);
  double p = static_cast<double>(e_approx);
  double cdf = p;
  int k = 0;
  while (true) {
    const double gap = u - cdf;
    if ((gap < 0 ? -gap : gap) <= 1e-6 * cdf + 1e-12) return spike_count(u, lambda);
    if (gap <= 0) return k;
    if (k == 127) return 127;
    ++k;
    p *= lambda * inv.v[k];
    cdf += p;
  }
}

#if defined(BPDL_SEG_IMPL_AVX2)
// For each 8-bit mask: the positions of its set bits, lowest first, as nibbles (the lane order of
// a left-packing permutation), and the number of set bits.
struct PackTable {
  uint32_t perm[256];
  uint8_t count[256];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      uint32_t packed = 0;
      int k = 0;
      for (int b = 0; b < 8; ++b)
        if (m & (1 << b)) packed |= static_cast<uint32_t>(b) << (4 * k++);
      perm[m] = packed;
      count[m] = static_cast<uint8_t>(k);
    }
  }
};
#endif

// Poisson counts for the neurons behind `words` (word i belongs to neuron idx[i], or i when idx
// is null); writes the int8 ring slot (zeroed first) and the list of (index, count) of the units
// that spiked, in increasing word order. In float, with cdf_k the approximate CDF from e^-lambda
// (`e_neg`, ~1e-7 relative): u > cdf_0 + d means at least one spike, u > cdf_1 + d at least two;
// a draw within d = 2e-6 of cdf_0, cdf_1 or cdf_2, or beyond cdf_2, takes the exact
// double-precision inversion (count_from_word / spike_count), so every count equals the
// reference's. The AVX2 build decides eight draws at a time and appends the events of a group of
// eight without branching on its individual draws (a left-packing permutation of the group's
// indices and counts); only a group with a draw that needs the exact inversion, rare, takes the
// per-draw path; the AVX-512 build does the same sixteen draws at a time with a register
// compress. `ev_idx` and `ev_cnt` need room for 16 entries beyond the last event.
template <typename T>
inline int64_t counts_from_words(const uint32_t* __restrict__ words, const T* __restrict__ lam,
                                 const float* __restrict__ e_neg, int64_t m,
                                 const int32_t* __restrict__ idx, int64_t n,
                                 int8_t* __restrict__ slot, int32_t* ev_idx, int8_t* ev_cnt,
                                 uint8_t* __restrict__ scratch) {
  (void)scratch;
  for (int64_t j = 0; j < n; ++j) slot[j] = 0;
  int64_t events = 0;
  // Without idx, draw i is neuron i: the vector paths store a group's counts straight into the
  // slot; with idx, the slot is filled from the event list at the end.
  const bool direct = idx == nullptr;
  auto emit = [&](int64_t i, int k) {
    if (!k) return;
    const int64_t j = direct ? i : idx[i];
    if (direct) slot[j] = static_cast<int8_t>(k);
    ev_idx[events] = static_cast<int32_t>(j);
    ev_cnt[events] = static_cast<int8_t>(k);
    ++events;
  };
  // A vector group with a draw in the exact-inversion zone, draw by draw: the bits of `spikes`
  // are its draws with at least one spike (or in the zone), `exact` those in the zone, `two`
  // those with at least two spikes.
  [[maybe_unused]] auto per_draw = [&](int64_t first, unsigned spikes, unsigned exact,
                                       unsigned two) {
    while (spikes) {
      const int b = __builtin_ctz(spikes);
      spikes &= spikes - 1;
      const int64_t i = first + b;
      emit(i, ((exact >> b) & 1u) ? spike_count(unit_u32(words[i]), static_cast<double>(lam[i]))
                                  : 1 + static_cast<int>((two >> b) & 1u));
    }
  };
  int64_t i0 = 0;
#if defined(BPDL_SEG_IMPL_AVX512)
  {  // sixteen draws at a time; the events of a group are packed with a register compress
    const __m512 scale = _mm512_set1_ps(4.656612873077393e-10f);
    const __m512 d = _mm512_set1_ps(2e-6f);
    const __m512 neg_d = _mm512_set1_ps(-2e-6f);
    const __m512 half = _mm512_set1_ps(0.5f);
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i one = _mm512_set1_epi32(1);
    for (; i0 + 16 <= m; i0 += 16) {
      const __m512i wv = _mm512_srli_epi32(_mm512_loadu_si512(words + i0), 1);
      const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(wv), scale);
      const __m512 e = _mm512_loadu_ps(e_neg + i0);
      __m512 l;
      if constexpr (sizeof(T) == 4) {
        l = _mm512_loadu_ps(reinterpret_cast<const float*>(lam) + i0);
      } else {
        const __m256 lo = _mm512_cvtpd_ps(_mm512_loadu_pd(reinterpret_cast<const double*>(lam) + i0));
        const __m256 hi = _mm512_cvtpd_ps(_mm512_loadu_pd(reinterpret_cast<const double*>(lam) + i0 + 8));
        l = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
      }
      const __m512 el = _mm512_mul_ps(e, l);
      const __m512 c1 = _mm512_add_ps(e, el);
      const __m512 c2 = _mm512_add_ps(c1, _mm512_mul_ps(_mm512_mul_ps(el, l), half));
      const __mmask16 gt0 = _mm512_cmp_ps_mask(u, e, _CMP_GT_OQ);
      const __mmask16 gt1 = _mm512_cmp_ps_mask(u, c1, _CMP_GT_OQ);
      const __mmask16 exact = static_cast<__mmask16>(
          _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(u, e)), d, _CMP_LE_OQ) |
          _mm512_cmp_ps_mask(_mm512_abs_ps(_mm512_sub_ps(u, c1)), d, _CMP_LE_OQ) |
          _mm512_cmp_ps_mask(_mm512_sub_ps(u, c2), neg_d, _CMP_GE_OQ));
      if (exact) [[unlikely]] {
        per_draw(i0, gt0 | exact, exact, gt1);
        continue;
      }
      const __m512i cnt = _mm512_add_epi32(_mm512_maskz_mov_epi32(gt0, one),
                                           _mm512_maskz_mov_epi32(gt1, one));
      if (direct)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(slot + i0), _mm512_cvtepi32_epi8(cnt));
      const __m512i ids = idx ? _mm512_loadu_si512(idx + i0)
                              : _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(i0)));
      _mm512_storeu_si512(ev_idx + events, _mm512_maskz_compress_epi32(gt0, ids));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(ev_cnt + events),
                       _mm512_cvtepi32_epi8(_mm512_maskz_compress_epi32(gt0, cnt)));
      events += __builtin_popcount(static_cast<unsigned>(gt0));
    }
  }
#endif
#if defined(BPDL_SEG_IMPL_AVX2)
  static const PackTable pack;
  const __m256 scale = _mm256_set1_ps(4.656612873077393e-10f);
  const __m256 d = _mm256_set1_ps(2e-6f);
  const __m256 half = _mm256_set1_ps(0.5f);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i nibble_shift = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i nibble = _mm256_set1_epi32(15);
  // byte 0 of each 32-bit lane to the lane's low four bytes (per 128-bit half)
  const __m256i low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                             -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1,
                                             -1, -1, -1, -1);
  for (; i0 + 8 <= m; i0 += 8) {
    const __m256i wv = _mm256_srli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(words + i0)), 1);
    const __m256 u = _mm256_mul_ps(_mm256_cvtepi32_ps(wv), scale);
    const __m256 e = _mm256_loadu_ps(e_neg + i0);
    __m256 l;
    if constexpr (sizeof(T) == 4) {
      l = _mm256_loadu_ps(reinterpret_cast<const float*>(lam) + i0);
    } else {
      l = _mm256_set_ps(static_cast<float>(lam[i0 + 7]), static_cast<float>(lam[i0 + 6]),
                        static_cast<float>(lam[i0 + 5]), static_cast<float>(lam[i0 + 4]),
                        static_cast<float>(lam[i0 + 3]), static_cast<float>(lam[i0 + 2]),
                        static_cast<float>(lam[i0 + 1]), static_cast<float>(lam[i0]));
    }
    const __m256 el = _mm256_mul_ps(e, l);
    const __m256 c1 = _mm256_add_ps(e, el);
    const __m256 c2 = _mm256_add_ps(c1, _mm256_mul_ps(_mm256_mul_ps(el, l), half));
    const __m256 gt0 = _mm256_cmp_ps(u, e, _CMP_GT_OQ);
    const __m256 gt1 = _mm256_cmp_ps(u, c1, _CMP_GT_OQ);
    __m256 amb = _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(u, e)), d, _CMP_LE_OQ);
    amb = _mm256_or_ps(amb, _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_sub_ps(u, c1)), d, _CMP_LE_OQ));
    amb = _mm256_or_ps(amb, _mm256_cmp_ps(_mm256_sub_ps(u, c2), _mm256_sub_ps(_mm256_setzero_ps(), d), _CMP_GE_OQ));
    const unsigned exact = static_cast<unsigned>(_mm256_movemask_ps(amb));
    if (exact) [[unlikely]] {
      per_draw(i0, static_cast<unsigned>(_mm256_movemask_ps(_mm256_or_ps(gt0, amb))), exact,
               static_cast<unsigned>(_mm256_movemask_ps(gt1)));
      continue;
    }
    // count = [u > cdf_0] + [u > cdf_1] (the comparison masks are -1 where true)
    const unsigned spikes = static_cast<unsigned>(_mm256_movemask_ps(gt0));
    const __m256i cnt = _mm256_sub_epi32(_mm256_setzero_si256(),
                                         _mm256_add_epi32(_mm256_castps_si256(gt0),
                                                          _mm256_castps_si256(gt1)));
    const __m256i perm = _mm256_and_si256(
        _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int>(pack.perm[spikes])), nibble_shift),
        nibble);
    const __m256i ids = idx ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + i0))
                            : _mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int>(i0)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(ev_idx + events),
                        _mm256_permutevar8x32_epi32(ids, perm));
    auto low_bytes_of = [&](__m256i v) {  // the low byte of each 32-bit lane, in order
      const __m256i b = _mm256_shuffle_epi8(v, low_bytes);
      return static_cast<uint64_t>(static_cast<uint32_t>(_mm256_cvtsi256_si32(b))) |
             (static_cast<uint64_t>(static_cast<uint32_t>(_mm256_extract_epi32(b, 4))) << 32);
    };
    if (direct) {
      const uint64_t counts = low_bytes_of(cnt);
      __builtin_memcpy(slot + i0, &counts, sizeof(counts));
    }
    const uint64_t bytes = low_bytes_of(_mm256_permutevar8x32_epi32(cnt, perm));
    __builtin_memcpy(ev_cnt + events, &bytes, sizeof(bytes));
    events += pack.count[spikes];
  }
#endif
  for (; i0 < m; ++i0) {
    const float u = static_cast<float>(static_cast<int32_t>(words[i0] >> 1)) * 4.656612873077393e-10f;
    if (u + 1e-6f > e_neg[i0]) emit(i0, count_from_word(words[i0], static_cast<double>(lam[i0]), e_neg[i0]));
  }
  if (!direct)
    for (int64_t k = 0; k < events; ++k) slot[ev_idx[k]] = ev_cnt[k];
  return events;
}

// Events of one ring slot (for rebuilding R and for the pre-phase PSP weights).
inline int64_t slot_events(const int8_t* slot, int64_t n, int32_t* ev_idx, int8_t* ev_cnt) {
  int64_t events = 0;
  for (int64_t j = 0; j < n; ++j) {
    if (slot[j]) {
      ev_idx[events] = static_cast<int32_t>(j);
      ev_cnt[events] = slot[j];
      ++events;
    }
  }
  return events;
}

// ---- one lane ---------------------------------------------------------------------------------------

template <typename T>
struct Scratch {
  std::vector<std::vector<T>> R, basal, q, qlast, Csum, lamsum, Psum, Qsum, Aout;
  std::vector<std::vector<int32_t>> ev_idx;
  std::vector<std::vector<int8_t>> ev_cnt;
  std::vector<int64_t> ev_n;
  std::vector<uint32_t> words;
  std::vector<int64_t> in_groups;   // 4-input groups with a nonzero rate (only those draw)
  int64_t in_groups_n = 0;
  std::vector<int32_t> in_idx;      // input index of each drawn word
  std::vector<T> in_lam;            // its rate
  std::vector<float> in_e;          // e^-rate
  std::vector<float> e_neg;         // e^-lambda of the layer being drawn
  std::vector<uint8_t> cand;
  std::vector<T> cw;
  // test lanes keep their own state here
  std::vector<int8_t> in_ring;
  std::vector<std::vector<int8_t>> rings;
  std::vector<std::vector<T>> C, lam, A;

  explicit Scratch(const Net<T>& net) {
    const int M = net.M;
    const int taps = net.taps;
    R.resize(M);
    basal.resize(M);
    Csum.resize(M);
    lamsum.resize(M);
    Psum.resize(M);
    q.resize(M);
    qlast.resize(M);
    Qsum.resize(M);
    Aout.resize(M);
    int64_t widest = net.n[0];
    for (int m = 0; m < M; ++m) {
      const int64_t nm = net.n[m + 1];
      widest = std::max(widest, nm);
      R[m].assign(net.spiking_ff ? taps * nm : 0, T(0));
      basal[m].assign(nm, T(0));
      Csum[m].assign(nm, T(0));
      lamsum[m].assign(nm, T(0));
      Psum[m].assign(net.n[m], T(0));
      if (m < M - 1) {
        q[m].assign(net.nfb[m], T(0));
        qlast[m].assign(net.nfb[m], T(0));
        Qsum[m].assign(static_cast<size_t>(net.offsets_count) * net.nfb[m], T(0));
        Aout[m].assign(nm, T(0));
      }
    }
    ev_idx.assign(M + 1, std::vector<int32_t>());
    ev_cnt.assign(M + 1, std::vector<int8_t>());
    ev_n.assign(M + 1, 0);
    for (int p = 0; p <= M; ++p) {  // + 16: counts_from_words stores whole groups of 8 or 16
      ev_idx[p].resize(net.n[p] + 16);
      ev_cnt[p].resize(net.n[p] + 16);
    }
    words.resize(4 * ((widest + 3) / 4) + 128);
    in_groups.resize((net.n[0] + 3) / 4);
    in_idx.resize(4 * in_groups.size());
    in_lam.resize(4 * in_groups.size());
    in_e.resize(4 * in_groups.size());
    e_neg.resize(widest + 4);
    cand.resize(4 * (widest + 8));
  }

  void alloc_state(const Net<T>& net) {
    const int M = net.M;
    in_ring.assign(net.taps * net.n[0], 0);
    rings.resize(M);
    C.resize(M);
    lam.resize(M);
    A.resize(M);
    for (int m = 0; m < M; ++m) {
      rings[m].assign(net.taps * net.n[m + 1], 0);
      C[m].assign(net.n[m + 1], T(0));
      lam[m].assign(net.n[m + 1], T(0));
      A[m].assign(m < M - 1 ? net.n[m + 1] : 0, T(0));
    }
  }

  void zero_state() {
    std::fill(in_ring.begin(), in_ring.end(), 0);
    for (auto& v : rings) std::fill(v.begin(), v.end(), 0);
    for (auto& v : C) std::fill(v.begin(), v.end(), T(0));
    for (auto& v : lam) std::fill(v.begin(), v.end(), T(0));
    for (auto& v : A) std::fill(v.begin(), v.end(), T(0));
  }
};

// Where one lane's state lives (rows of the batched state tensors, or a test lane's scratch).
template <typename T>
struct LanePtrs {
  int8_t* in_ring;
  std::vector<int8_t*> rings;
  std::vector<T*> C, lam, A;
  int64_t* step;
  int64_t lane_key;
};

// Simulate `length` steps of one phase in one lane. phase: 0 forward, 1 target, 2 test.
template <typename T>
void run_phase(const Net<T>& net, Scratch<T>& s, LanePtrs<T>& lp, const T* x, const T* teach,
               const T* B0const, int64_t length, int64_t window, const int64_t* offsets_row,
               int phase) {
  const int M = net.M;
  const int taps = net.taps;
  const T* kappa = net.kappa.data();
  const T* prm = net.prm;
  const bool training = phase != 2;
  const bool forward = phase == 0;
  const bool target = phase == 1;
  const int64_t ws = length - window;                  // first step of the averaging window
  const int64_t pw0 = ws - (taps - 1);                 // first step whose spikes reach it
  const int n_off = training ? net.offsets_count : 1;
  const bool need_q = training || net.apical_soma;
  for (int m = 0; m < M; ++m) {
    std::fill(s.Csum[m].begin(), s.Csum[m].end(), T(0));
    std::fill(s.lamsum[m].begin(), s.lamsum[m].end(), T(0));
    if (forward) std::fill(s.Psum[m].begin(), s.Psum[m].end(), T(0));
    if (m < M - 1) std::fill(s.Qsum[m].begin(), s.Qsum[m].end(), T(0));
  }
  // Closed-form PSP weight of a spike at step r for the window [ws, length - 1]:
  // cw(r) = sum_k kappa(k) [ws <= r + k - 1 <= length - 1]  (section 5.17 b)
  const bool sparse_psp = forward && net.spiking_ff;
  if (sparse_psp) {
    if (static_cast<int64_t>(s.cw.size()) < length + taps) s.cw.resize(length + taps);
    for (int64_t r = pw0; r < length; ++r) {
      T acc = T(0);
      for (int k = 1; k <= taps; ++k) {
        const int64_t when = r + k - 1;
        if (when >= ws && when <= length - 1) acc += kappa[k - 1];
      }
      s.cw[r - pw0] = acc;
    }
    // spikes from before the phase that still reach the window
    const int64_t t0 = *lp.step;
    for (int64_t r = std::max<int64_t>(pw0, -(taps - 1)); r < 0; ++r) {
      const int64_t slot = ((t0 + r) % taps + taps) % taps;
      const T w = s.cw[r - pw0];
      for (int m = 0; m < M; ++m) {
        const int8_t* src = (m == 0 ? lp.in_ring : lp.rings[m - 1]) + slot * net.n[m];
        for (int64_t i = 0; i < net.n[m]; ++i)
          if (src[i]) s.Psum[m][i] += w * static_cast<T>(src[i]);
      }
    }
  }
  for (int64_t t_rel = 0; t_rel < length; ++t_rel) {
    const int64_t t = *lp.step;
    const int64_t slot = t % taps;
    const bool in_win = t_rel >= ws;
    const bool psp_due = sparse_psp && t_rel >= pw0;
    const T cwt = psp_due ? s.cw[t_rel - pw0] : T(0);
    // -- input layer
    if (net.spiking_ff) {
      int8_t* ring_slot = lp.in_ring + slot * net.n[0];
      philox_groups(net.seed, lp.lane_key, s.in_groups.data(), 0, s.in_groups_n, t,
                    kSpikeStream + 0, s.words.data());
      s.ev_n[0] = counts_from_words(s.words.data(), s.in_lam.data(), s.in_e.data(),
                                    4 * s.in_groups_n, s.in_idx.data(), net.n[0], ring_slot,
                                    s.ev_idx[0].data(), s.ev_cnt[0].data(), s.cand.data());
      gather_rows(s.R[0].data() + slot * net.n[1], net.WT[0], net.ldWT[0], s.ev_idx[0].data(),
                  s.ev_cnt[0].data(), s.ev_n[0], net.n[1]);
      if (psp_due)
        for (int64_t e = 0; e < s.ev_n[0]; ++e)
          s.Psum[0][s.ev_idx[0][e]] += cwt * static_cast<T>(s.ev_cnt[0][e]);
    } else if (forward && in_win) {
      add_to(s.Psum[0].data(), x, net.n[0]);
    }
    for (int m = 0; m < M; ++m) {
      const int64_t nm = net.n[m + 1];
      T* basal = s.basal[m].data();
      T* C = lp.C[m];
      T* lam = lp.lam[m];
      // -- basal potential
      if (net.spiking_ff) {
        fir(basal, net.b[m], s.R[m].data(), kappa, taps, t, 0, nm);
      } else if (m == 0) {
        for (int64_t j = 0; j < nm; ++j) basal[j] = B0const[j];
      } else {
        matvec(basal, net.b[m], net.W[m], lp.lam[m - 1], nm, net.n[m]);
      }
      if (m < M - 1) {
        // -- feedback input q (one step stale) and apical potential
        const int src = net.src[m];
        const int64_t nfb = net.nfb[m];
        T* q = s.q[m].data();
        bool have_q = false;
        bool q_due = need_q && (net.apical_soma || (training && t_rel >= ws - net.offsets_count)
                                || (target && t_rel == length - 1));
        if (q_due) {
          if (net.spiking_fb) {
            psp_int8(q, lp.rings[src], kappa, taps, t, 1, nfb);
          } else {
            for (int64_t i = 0; i < nfb; ++i) q[i] = lp.lam[src][i];
          }
          have_q = true;
        }
        T* A = lp.A[m];
        if (net.apical_soma) {
          matvec(A, net.c[m], net.Y[m], q, nm, nfb);
          for (int64_t j = 0; j < nm; ++j)
            C[j] = soma_hidden<T>(C[j], basal[j], A[j], prm, net.conductances, true,
                                  net.original_quirks);
        } else {
          for (int64_t j = 0; j < nm; ++j)
            C[j] = soma_hidden<T>(C[j], basal[j], T(0), prm, net.conductances, false,
                                  net.original_quirks);
        }
        if (training && have_q) {
          for (int o = 0; o < n_off; ++o) {
            const int64_t end = length - 1 - o;
            if (t_rel <= end && t_rel > end - window) add_to(s.Qsum[m].data() + o * nfb, q, nfb);
          }
        }
        if (target && t_rel == length - 1 && have_q) {
          for (int64_t i = 0; i < nfb; ++i) s.qlast[m][i] = q[i];
        }
      } else {
        const bool tgt = target;
        for (int64_t j = 0; j < nm; ++j)
          C[j] = soma_output<T>(C[j], basal[j], tgt ? teach[j] : T(0), tgt, prm, net.conductances);
      }
      rates(C, lam, s.e_neg.data(), prm[kLambdaMax], nm);
      if (in_win) {
        add_to(s.Csum[m].data(), C, nm);
        if (training) add_to(s.lamsum[m].data(), lam, nm);
      }
      // -- spikes
      const bool draw = training ? net.need_train[m + 1] : net.need_test[m + 1];
      if (draw) {
        int8_t* ring_slot = lp.rings[m] + slot * nm;
        philox_groups(net.seed, lp.lane_key, static_cast<const int64_t*>(nullptr), 0,
                      (nm + 3) / 4, t, kSpikeStream + m + 1, s.words.data());
        s.ev_n[m + 1] = counts_from_words(s.words.data(), lam, s.e_neg.data(), nm,
                                          static_cast<const int32_t*>(nullptr), nm, ring_slot,
                                          s.ev_idx[m + 1].data(), s.ev_cnt[m + 1].data(),
                                          s.cand.data());
      }
      if (m < M - 1) {
        if (net.spiking_ff) {
          gather_rows(s.R[m + 1].data() + slot * net.n[m + 2], net.WT[m + 1], net.ldWT[m + 1],
                      s.ev_idx[m + 1].data(), s.ev_cnt[m + 1].data(), s.ev_n[m + 1], net.n[m + 2]);
          if (psp_due)
            for (int64_t e = 0; e < s.ev_n[m + 1]; ++e)
              s.Psum[m + 1][s.ev_idx[m + 1][e]] += cwt * static_cast<T>(s.ev_cnt[m + 1][e]);
        } else if (forward && in_win) {
          add_to(s.Psum[m + 1].data(), lam, nm);
        }
      }
    }
    *lp.step += 1;
  }
}

// Rebuild the event-driven basal rings R from the spike rings and the current weights.
template <typename T>
void rebuild_R(const Net<T>& net, Scratch<T>& s, const LanePtrs<T>& lp) {
  if (!net.spiking_ff) return;
  // the next step (t) writes R's slot t mod taps before any layer reads it
  const int64_t fresh = *lp.step % net.taps;
  for (int m = 0; m < net.M; ++m) {
    const int8_t* ring = m == 0 ? lp.in_ring : lp.rings[m - 1];
    const int64_t n_in = net.n[m];
    for (int slot = 0; slot < net.taps; ++slot) {
      if (slot == fresh) continue;
      const int64_t ev = slot_events(ring + slot * n_in, n_in, s.ev_idx[m].data(), s.ev_cnt[m].data());
      gather_rows(s.R[m].data() + slot * net.n[m + 1], net.WT[m], net.ldWT[m], s.ev_idx[m].data(),
                  s.ev_cnt[m].data(), ev, net.n[m + 1]);
    }
  }
}

template <typename T>
void input_groups(const Net<T>& net, Scratch<T>& s, const T* x) {
  int64_t k = 0;
  const int64_t groups = (net.n[0] + 3) / 4;
  for (int64_t g = 0; g < groups; ++g) {
    bool any = false;
    for (int64_t j = 4 * g; j < std::min<int64_t>(4 * g + 4, net.n[0]); ++j) any = any || x[j] > T(0);
    if (any) {
      for (int w = 0; w < 4; ++w) {
        const int64_t j = 4 * g + w;
        const T rate = j < net.n[0] ? x[j] : T(0);
        s.in_idx[4 * k + w] = static_cast<int32_t>(j);
        s.in_lam[4 * k + w] = rate;
        s.in_e[4 * k + w] = exp_approx(-static_cast<float>(rate));
      }
      s.in_groups[k++] = g;
    }
  }
  s.in_groups_n = k;
}

// Apical averages from the feedback sums: A_i = Y_i . Q[off_i] / W + c_i.
template <typename T>
void apical_average(const Net<T>& net, const Scratch<T>& s, int m, int64_t window,
                    const int64_t* offsets_row, T* out) {
  const int64_t nm = net.n[m + 1];
  const int64_t nfb = net.nfb[m];
  const T inv = T(1) / static_cast<T>(window);
  for (int64_t j = 0; j < nm; ++j) {
    const int o = offsets_row ? static_cast<int>(offsets_row[j]) : 0;
    const T* qs = s.Qsum[m].data() + o * nfb;
    const T* row = net.Y[m] + j * nfb;
    T acc = T(0);
    for (int64_t i = 0; i < nfb; ++i) acc += row[i] * qs[i];
    out[j] = acc * inv + (net.c[m] ? net.c[m][j] : T(0));
  }
}

// ---- whole lanes ----------------------------------------------------------------------------------

// Training lanes handed out one at a time in the given order (longest first, so that the threads
// finish together; their random phase lengths differ): state in the rows of the batched state
// tensors, phase averages written to the rows of `out`.
template <typename T>
void train_lanes(const Net<T>& net, std::atomic<int64_t>& next, int64_t B, const T* x_rate,
                 const T* target,
                 const at::Tensor& B0const, int8_t* in_ring, std::vector<int8_t*>& rings,
                 std::vector<T*>& C, std::vector<T*>& lam, std::vector<T*>& A, int64_t* step,
                 const int64_t* lane_key, const int64_t* lengths, const int64_t* windows,
                 const std::vector<const int64_t*>& offsets, std::vector<T*>& out,
                 const int64_t* order) {
  const int M = net.M;
  const int H = M - 1;
  Scratch<T> s(net);
  const int taps = net.taps;
  // rate mode: the first layer's drive of each lane from W_0^T (rate_drive)
  const bool own_drive = !net.spiking_ff && !B0const.defined();
  std::vector<T> drive(own_drive ? net.n[1] : 0);
  std::vector<int32_t> drive_idx;
  // lanes are handed out one at a time, in `order`
  for (int64_t k = next.fetch_add(1); k < B; k = next.fetch_add(1)) {
    const int64_t bl = order[k];
    LanePtrs<T> lp;
    lp.in_ring = in_ring + bl * taps * net.n[0];
    for (int m = 0; m < M; ++m) {
      lp.rings.push_back(rings[m] + bl * taps * net.n[m + 1]);
      lp.C.push_back(C[m] + bl * net.n[m + 1]);
      lp.lam.push_back(lam[m] + bl * net.n[m + 1]);
      lp.A.push_back(m < H ? A[m] + bl * net.n[m + 1] : nullptr);
    }
    lp.step = step + bl;
    lp.lane_key = lane_key[bl];
    const T* x = x_rate + bl * net.n[0];
    const T* teach = target + bl * net.n[M];
    const T* b0 = B0const.defined() ? B0const.const_data_ptr<T>() + bl * net.n[1] : nullptr;
    if (own_drive) {
      rate_drive(drive.data(), net.b[0], net.WT[0], net.ldWT[0], x, net.n[0], net.n[1], drive_idx);
      b0 = drive.data();
    }
    input_groups(net, s, x);
    rebuild_R(net, s, lp);
    for (int phase = 0; phase < 2; ++phase) {
      const int64_t length = lengths[2 * bl + phase];
      const int64_t window = windows[2 * bl + phase];
      run_phase(net, s, lp, x, teach, b0, length, window,
                      static_cast<const int64_t*>(nullptr), phase);
      const T inv = T(1) / static_cast<T>(window);
      // outputs: C_f C_t lam_f lam_t P_f (M each), A_f A_t Q_f (H each)
      for (int m = 0; m < M; ++m) {
        const int64_t nm = net.n[m + 1];
        T* Cout = out[(phase == 0 ? 0 : 1) * M + m] + bl * nm;
        T* Lout = out[(phase == 0 ? 2 : 3) * M + m] + bl * nm;
        for (int64_t j = 0; j < nm; ++j) {
          Cout[j] = s.Csum[m][j] * inv;
          Lout[j] = s.lamsum[m][j] * inv;
        }
        if (phase == 0) {
          T* Pout = out[4 * M + m] + bl * net.n[m];
          for (int64_t i = 0; i < net.n[m]; ++i) Pout[i] = s.Psum[m][i] * inv;
        }
      }
      for (int m = 0; m < H; ++m) {
        const int64_t nm = net.n[m + 1];
        const int64_t* off = offsets.empty() ? nullptr : offsets[m] + (2 * bl + phase) * nm;
        T* Aout = out[5 * M + (phase == 0 ? 0 : H) + m] + bl * nm;
        apical_average(net, s, m, window, off, Aout);
        if (phase == 0) {
          T* Qout = out[5 * M + 2 * H + m] + bl * net.nfb[m];
          for (int64_t i = 0; i < net.nfb[m]; ++i) Qout[i] = s.Qsum[m][i] * inv;
        }
      }
    }
    // The apical potential is state: its value at the lane's last step (computed every step
    // only when it reaches the soma).
    if (!net.apical_soma) {
      for (int m = 0; m < H; ++m)
        matvec(lp.A[m], net.c[m], net.Y[m], s.qlast[m].data(), net.n[m + 1], net.nfb[m]);
    }
  }
}

// Test lanes, each from zero state in this thread's scratch; averaged output potentials to `out`.
template <typename T>
void test_lanes(const Net<T>& net, std::atomic<int64_t>& next, int64_t B, const T* x_rate,
                const at::Tensor& B0const, const int64_t* lane_key, int64_t steps, int64_t window,
                T* out) {
  const int M = net.M;
  Scratch<T> s(net);
  s.alloc_state(net);
  const int64_t n_out = net.n[M];
  for (int64_t bl = next.fetch_add(1); bl < B; bl = next.fetch_add(1)) {
    s.zero_state();
    int64_t step = 0;
    LanePtrs<T> lp;
    lp.in_ring = s.in_ring.data();
    for (int m = 0; m < M; ++m) {
      lp.rings.push_back(s.rings[m].data());
      lp.C.push_back(s.C[m].data());
      lp.lam.push_back(s.lam[m].data());
      lp.A.push_back(s.A[m].data());
    }
    lp.step = &step;
    lp.lane_key = lane_key[bl];
    const T* x = x_rate + bl * net.n[0];
    const T* b0 = B0const.defined() ? B0const.const_data_ptr<T>() + bl * net.n[1] : nullptr;
    input_groups(net, s, x);
    if (net.spiking_ff)
      for (auto& r : s.R) std::fill(r.begin(), r.end(), T(0));
    run_phase(net, s, lp, x, static_cast<const T*>(nullptr), b0, steps, window,
                    static_cast<const int64_t*>(nullptr), 2);
    const T inv = T(1) / static_cast<T>(window);
    for (int64_t j = 0; j < n_out; ++j) out[bl * n_out + j] = s.Csum[M - 1][j] * inv;
  }
}

// w + alpha g, rounded once (Fused) or twice: the two ways ATen's add_(g, alpha) may compute it
// (a fused multiply-add where its CPU kernels have FMA); segregated_cpu.cpp probes which.
template <typename T>
inline T axpy_fused(T g, T alpha, T w) {
  // the builtin, so that it becomes one instruction where this build has FMA
  if constexpr (std::is_same_v<T, float>) return __builtin_fmaf(g, alpha, w);
  else return __builtin_fma(g, alpha, w);
}
template <typename T>
__attribute__((optimize("fp-contract=off"))) inline T axpy_unfused(T g, T alpha, T w) {
  const T p = g * alpha;
  return w + p;
}

// One example's SGD step on a weight matrix W (rows x ncols_W, row-major) and, when given, on
// its padded transpose WT (ncols_W x ldWT; either may be null, for a matrix whose copy is
// updated later): for every column i with P[i] != 0 and every row j,
//   w <- w + alpha g,  g = se[j] * P[i]  (se = scale * e),
// which is, element for element, what ATen's W.add_(g, alpha) computes for the gradient
// g = addmm(alpha=scale, e^T, P) of one lane (the scale rides on e). Columns with P[i] = 0
// have g = 0 and are skipped: W keeps its values there. W is updated row by row in blocks of
// one vector of columns: the blocks with no nonzero P are skipped and the others are loaded,
// updated and stored under the mask of their nonzero columns (the vector builds, float). WT,
// when given, is updated row by row too (a row of WT is a column of W, contiguous in j) with the
// same arithmetic, so it stays W's exact transpose. The function is compiled without
// floating-point contraction, so the unfused variant rounds g alpha and the sum separately; the
// fused one uses explicit fused multiply-adds.
template <typename T, bool Fused>
__attribute__((optimize("fp-contract=off"))) void sgd_columns_impl(
    T* W, int64_t rows, int64_t ncols_W, T* WT, int64_t ldWT, const T* se, const T* P, T alpha,
    std::vector<uint32_t>& blocks) {
  constexpr int64_t kW = 16;  // columns per block (one AVX-512 vector of floats)
  const int64_t nb = (ncols_W + kW - 1) / kW;
  blocks.clear();
  for (int64_t bk = 0; bk < nb; ++bk) {  // (block index << 16) | mask of its nonzero columns
    uint32_t mask = 0;
    const int64_t end = std::min(ncols_W, (bk + 1) * kW);
    for (int64_t i = bk * kW; i < end; ++i) mask |= static_cast<uint32_t>(P[i] != T(0)) << (i - bk * kW);
    if (mask) blocks.push_back(static_cast<uint32_t>(bk << 16) | mask);
  }
  const int64_t nblocks = static_cast<int64_t>(blocks.size());
  for (int64_t j = 0; j < rows && W; ++j) {
    T* wrow = W + j * ncols_W;
    const T sej = se[j];
    int64_t q = 0;
#if defined(BPDL_SEG_IMPL_AVX512)
    if constexpr (std::is_same_v<T, float>) {
      const __m512 sv = _mm512_set1_ps(sej), av = _mm512_set1_ps(alpha);
      for (; q < nblocks; ++q) {
        const int64_t i0 = static_cast<int64_t>(blocks[q] >> 16) * kW;
        const __mmask16 m = static_cast<__mmask16>(blocks[q] & 0xFFFFu);
        const __m512 w = _mm512_maskz_loadu_ps(m, wrow + i0);
        const __m512 g = _mm512_mul_ps(sv, _mm512_maskz_loadu_ps(m, P + i0));
        const __m512 r = Fused ? _mm512_fmadd_ps(g, av, w) : _mm512_add_ps(w, _mm512_mul_ps(g, av));
        _mm512_mask_storeu_ps(wrow + i0, m, r);
      }
    }
#elif defined(BPDL_SEG_IMPL_AVX2)
    if constexpr (std::is_same_v<T, float>) {
      const __m256 sv = _mm256_set1_ps(sej), av = _mm256_set1_ps(alpha);
      const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
      for (; q < nblocks; ++q) {
        const int64_t b0 = static_cast<int64_t>(blocks[q] >> 16) * kW;
        for (int half = 0; half < 2; ++half) {
          const int bits = static_cast<int>((blocks[q] >> (8 * half)) & 0xFFu);
          if (!bits) continue;
          const int64_t i0 = b0 + 8 * half;
          const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(bits), bit), bit);
          const __m256 w = _mm256_maskload_ps(wrow + i0, m);
          const __m256 g = _mm256_mul_ps(sv, _mm256_maskload_ps(P + i0, m));
          const __m256 r = Fused ? _mm256_fmadd_ps(g, av, w) : _mm256_add_ps(w, _mm256_mul_ps(g, av));
          _mm256_maskstore_ps(wrow + i0, m, r);
        }
      }
    }
#endif
    for (; q < nblocks; ++q) {  // scalar: the set bits of each block
      const int64_t i0 = static_cast<int64_t>(blocks[q] >> 16) * kW;
      for (uint32_t bits = blocks[q] & 0xFFFFu; bits; bits &= bits - 1) {
        const int64_t i = i0 + __builtin_ctz(bits);
        const T g = sej * P[i];
        wrow[i] = Fused ? axpy_fused(g, alpha, wrow[i]) : static_cast<T>(wrow[i] + g * alpha);
      }
    }
  }
  if (!WT) return;
  for (int64_t q = 0; q < nblocks; ++q) {
    const int64_t i0 = static_cast<int64_t>(blocks[q] >> 16) * kW;
    for (uint32_t bits = blocks[q] & 0xFFFFu; bits; bits &= bits - 1) {
      const int64_t i = i0 + __builtin_ctz(bits);
      const T p = P[i];
      T* wt = WT + i * ldWT;
      int64_t j = 0;
#if defined(BPDL_SEG_IMPL_AVX512)
      if constexpr (std::is_same_v<T, float>) {
        const __m512 pv = _mm512_set1_ps(p), av = _mm512_set1_ps(alpha);
        for (; j < rows; j += 16) {
          const __mmask16 m = rows - j >= 16 ? __mmask16(0xFFFF)
                                             : static_cast<__mmask16>((1u << (rows - j)) - 1u);
          const __m512 w = _mm512_maskz_loadu_ps(m, wt + j);
          const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, se + j), pv);
          const __m512 r = Fused ? _mm512_fmadd_ps(g, av, w) : _mm512_add_ps(w, _mm512_mul_ps(g, av));
          _mm512_mask_storeu_ps(wt + j, m, r);
        }
      }
#elif defined(BPDL_SEG_IMPL_AVX2)
      if constexpr (std::is_same_v<T, float>) {
        const __m256 pv = _mm256_set1_ps(p), av = _mm256_set1_ps(alpha);
        for (; j + 8 <= rows; j += 8) {
          const __m256 w = _mm256_loadu_ps(wt + j);
          const __m256 g = _mm256_mul_ps(_mm256_loadu_ps(se + j), pv);
          const __m256 r = Fused ? _mm256_fmadd_ps(g, av, w) : _mm256_add_ps(w, _mm256_mul_ps(g, av));
          _mm256_storeu_ps(wt + j, r);
        }
      }
#endif
      for (; j < rows; ++j) {
        const T g = se[j] * p;
        wt[j] = Fused ? axpy_fused(g, alpha, wt[j]) : static_cast<T>(wt[j] + g * alpha);
      }
    }
  }
}

template <typename T>
void sgd_columns(bool fused, T* W, int64_t rows, int64_t ncols_W, T* WT, int64_t ldWT,
                 const T* se, const T* P, T alpha, std::vector<uint32_t>& blocks) {
  if (fused) sgd_columns_impl<T, true>(W, rows, ncols_W, WT, ldWT, se, P, alpha, blocks);
  else sgd_columns_impl<T, false>(W, rows, ncols_W, WT, ldWT, se, P, alpha, blocks);
}

// v <- v + alpha g for a vector (a bias).
template <typename T>
void sgd_vector(bool fused, T* v, const T* g, int64_t n, T alpha) {
  for (int64_t j = 0; j < n; ++j)
    v[j] = fused ? axpy_fused(g[j], alpha, v[j]) : axpy_unfused(g[j], alpha, v[j]);
}

// o[c * ldo + r] = a[r * lda + c] for the rows [r0, r1) and columns [c0, c1) of a: one tile of a
// transpose. The vector builds move floats in 8 x 8 blocks (unpack, shuffle and lane permutes
// of eight rows in registers); the edges and doubles go one element at a time.
template <typename T>
void transpose_tile(const T* __restrict__ a, int64_t lda, T* __restrict__ o, int64_t ldo,
                    int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
  int64_t r = r0;
#if defined(BPDL_SEG_IMPL_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    for (; r + 8 <= r1; r += 8) {
      int64_t c = c0;
      for (; c + 8 <= c1; c += 8) {
        const float* p = a + r * lda + c;
        const __m256 x0 = _mm256_loadu_ps(p), x1 = _mm256_loadu_ps(p + lda);
        const __m256 x2 = _mm256_loadu_ps(p + 2 * lda), x3 = _mm256_loadu_ps(p + 3 * lda);
        const __m256 x4 = _mm256_loadu_ps(p + 4 * lda), x5 = _mm256_loadu_ps(p + 5 * lda);
        const __m256 x6 = _mm256_loadu_ps(p + 6 * lda), x7 = _mm256_loadu_ps(p + 7 * lda);
        const __m256 t0 = _mm256_unpacklo_ps(x0, x1), t1 = _mm256_unpackhi_ps(x0, x1);
        const __m256 t2 = _mm256_unpacklo_ps(x2, x3), t3 = _mm256_unpackhi_ps(x2, x3);
        const __m256 t4 = _mm256_unpacklo_ps(x4, x5), t5 = _mm256_unpackhi_ps(x4, x5);
        const __m256 t6 = _mm256_unpacklo_ps(x6, x7), t7 = _mm256_unpackhi_ps(x6, x7);
        // s_k holds elements k and k + 4 of rows 0-3 (low lane) or 4-7
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
        float* q = o + c * ldo + r;
        _mm256_storeu_ps(q, _mm256_permute2f128_ps(s0, s4, 0x20));
        _mm256_storeu_ps(q + ldo, _mm256_permute2f128_ps(s1, s5, 0x20));
        _mm256_storeu_ps(q + 2 * ldo, _mm256_permute2f128_ps(s2, s6, 0x20));
        _mm256_storeu_ps(q + 3 * ldo, _mm256_permute2f128_ps(s3, s7, 0x20));
        _mm256_storeu_ps(q + 4 * ldo, _mm256_permute2f128_ps(s0, s4, 0x31));
        _mm256_storeu_ps(q + 5 * ldo, _mm256_permute2f128_ps(s1, s5, 0x31));
        _mm256_storeu_ps(q + 6 * ldo, _mm256_permute2f128_ps(s2, s6, 0x31));
        _mm256_storeu_ps(q + 7 * ldo, _mm256_permute2f128_ps(s3, s7, 0x31));
      }
      for (; c < c1; ++c)
        for (int64_t k = 0; k < 8; ++k) o[c * ldo + r + k] = a[(r + k) * lda + c];
    }
  }
#endif
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t i = r; i < r1; ++i) o[c * ldo + i] = a[i * lda + c];
}

// This instruction set's entry points as one type, for the run-time choice in segregated_cpu.cpp.
struct Isa {
  template <typename T, typename... Args>
  static void transpose_tile(Args&&... args) {
    BPDL_SEG_IMPL_NS::transpose_tile<T>(std::forward<Args>(args)...);
  }
  template <typename T, typename... Args>
  static void sgd_columns(Args&&... args) {
    BPDL_SEG_IMPL_NS::sgd_columns<T>(std::forward<Args>(args)...);
  }
  template <typename T, typename... Args>
  static void sgd_vector(Args&&... args) {
    BPDL_SEG_IMPL_NS::sgd_vector<T>(std::forward<Args>(args)...);
  }
  template <typename T, typename... Args>
  static void train(Args&&... args) {
    train_lanes<T>(std::forward<Args>(args)...);
  }
  template <typename T, typename... Args>
  static void test(Args&&... args) {
    test_lanes<T>(std::forward<Args>(args)...);
  }
};

}  // namespace BPDL_SEG_IMPL_NS
