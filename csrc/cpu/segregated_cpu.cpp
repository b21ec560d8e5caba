// CPU kernels of the segregated-dendrite family (Guerguiev, Lillicrap & Richards 2017).
//
//   segregated_layer_step     one time step of one layer's compartments (all lanes)
//   segregated_sparse_basal   the basal input of a spiking layer without the dense product
//   segregated_plasticity     end-of-example errors and summed weight updates of one layer
//   segregated_train_example  forward + target phase of one training example in every lane
//   segregated_test           the test procedure (250 steps from zero state) in every lane
//   segregated_train_online   consecutive training examples in one lane, the weights updated by
//                             plain SGD after each (batch-1 training without a call per example)
//
// Lanes run in parallel (at::parallel_for); each lane runs its whole example in one thread, so
// lanes with different random phase lengths never wait for each other. The simulation loops are
// compiled three times (baseline x86-64, AVX2/FMA and AVX-512; segregated_cpu_impl.h) and the
// widest the CPU supports is chosen at run time (BPDL_CPU_ISA caps it; bpdl/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <numeric>
#include <type_traits>
#include <vector>

#include "bpdl/segregated.h"
#include "bpdl/segregated_checks.h"
#include "bpdl/segregated_host.h"

#include "bpdl/cpu_isa.h"

namespace bpdl {
namespace {

using namespace ::bpdl::seg;

// Weights and switches shared by every lane of one call (raw pointers into contiguous tensors).
template <typename T>
struct Net {
  int M = 0;
  int taps = 0;
  std::vector<int64_t> n;  // n[0] inputs, n[m + 1] units of layer m
  std::vector<const T*> W, WT, b, Y, c;
  std::vector<int64_t> ldWT;  // row stride of WT[m]
  std::vector<int64_t> nfb;
  std::vector<int> src;
  std::vector<T> kappa;
  T prm[kNumParams];
  bool conductances = true, spiking_ff = true, spiking_fb = true, apical_soma = false;
  bool original_quirks = false;
  int offsets_count = 1;
  std::vector<bool> need_train, need_test;
  uint64_t seed = 0;
};

}  // namespace
}  // namespace bpdl

// ---- the simulation loops, once per instruction set -----------------------------------------
// Without trapping math, compilers turn the branchy clamps of the math into vector min/max;
// the values computed are the same.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
namespace bpdl {
namespace {
#define BPDL_SEG_IMPL_NS impl_base
#include "segregated_cpu_impl.h"
#undef BPDL_SEG_IMPL_NS
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options

#if defined(BPDL_HAVE_AVX2_BUILD)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("no-trapping-math")
namespace bpdl {
namespace {
#define BPDL_SEG_IMPL_NS impl_avx2
#define BPDL_SEG_IMPL_AVX2 1
#include "segregated_cpu_impl.h"
#undef BPDL_SEG_IMPL_AVX2
#undef BPDL_SEG_IMPL_NS
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options
#endif

// AVX-512: the same source with its AVX-512 parts (Philox on 32 blocks per call, spike decisions
// on 16 draws with a register compress) and 512-bit vectors in the plain loops. Measured on a
// Zen 5 core, the hand-written parts bring the gain; the recompiled plain loops alone did not.
#if defined(BPDL_HAVE_AVX512_BUILD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt,prefer-vector-width=512")
#pragma GCC optimize("no-trapping-math")
namespace bpdl {
namespace {
#define BPDL_SEG_IMPL_NS impl_avx512
#define BPDL_SEG_IMPL_AVX2 1
#define BPDL_SEG_IMPL_AVX512 1
#include "segregated_cpu_impl.h"
#undef BPDL_SEG_IMPL_AVX512
#undef BPDL_SEG_IMPL_AVX2
#undef BPDL_SEG_IMPL_NS
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options
#endif

namespace bpdl {
namespace {

// Calls f with the Isa type (segregated_cpu_impl.h) of the widest instruction set the CPU has.
template <typename F>
void with_best_isa(F&& f) {
#if defined(BPDL_HAVE_AVX512_BUILD)
  if (cpu_has_avx512()) return f(impl_avx512::Isa{});
#endif
#if defined(BPDL_HAVE_AVX2_BUILD)
  if (cpu_has_avx2_fma()) return f(impl_avx2::Isa{});
#endif
  f(impl_base::Isa{});
}

// ---- building the shared view ---------------------------------------------------------------------

// Whether layer m has a transpose in a list that may be empty, short or hold undefined entries
// (rate mode transposes only the first layer).
inline bool has_transpose(const std::vector<at::Tensor>& WT, int m) {
  return static_cast<int>(WT.size()) > m && WT[m].defined();
}

template <typename T>
Net<T> make_net(const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& WT,
                const std::vector<at::Tensor>& b, const std::vector<at::Tensor>& Y,
                const std::vector<at::Tensor>& c, const at::Tensor& kappa, int64_t n_in,
                int64_t seed, const std::vector<double>& params, const std::vector<int64_t>& flags,
                const std::vector<int64_t>& need_train, const std::vector<int64_t>& need_test) {
  Net<T> net;
  net.M = static_cast<int>(W.size());
  net.taps = static_cast<int>(kappa.numel());
  net.n.push_back(n_in);
  for (const auto& w : W) net.n.push_back(w.size(0));
  for (int m = 0; m < net.M; ++m) {
    net.W.push_back(W[m].const_data_ptr<T>());
    const bool has_t = has_transpose(WT, m);
    net.WT.push_back(has_t ? WT[m].const_data_ptr<T>() : nullptr);
    net.ldWT.push_back(has_t ? WT[m].stride(0) : 0);
    net.b.push_back(b[m].const_data_ptr<T>());
  }
  const bool broadcast = flags[kBroadcast] != 0;
  for (int m = 0; m + 1 < net.M; ++m) {
    net.Y.push_back(Y[m].const_data_ptr<T>());
    net.c.push_back(c.empty() ? nullptr : c[m].const_data_ptr<T>());
    net.src.push_back(broadcast ? net.M - 1 : m + 1);
    net.nfb.push_back(Y[m].size(1));
  }
  const at::Tensor k = kappa.to(at::kDouble).contiguous();
  for (int64_t i = 0; i < k.numel(); ++i) net.kappa.push_back(static_cast<T>(k.const_data_ptr<double>()[i]));
  for (int i = 0; i < kNumParams; ++i) net.prm[i] = static_cast<T>(params[i]);
  net.conductances = flags[kConductances] != 0;
  net.spiking_ff = flags[kSpikingFF] != 0;
  net.spiking_fb = flags[kSpikingFB] != 0;
  net.apical_soma = flags[kApicalSoma] != 0;
  net.original_quirks = flags[kOriginalQuirks] != 0;
  net.offsets_count = flags[kRandomPlateaus] ? static_cast<int>(flags[kPlateauMax]) + 1 : 1;
  for (auto v : need_train) net.need_train.push_back(v != 0);
  for (auto v : need_test) net.need_test.push_back(v != 0);
  net.seed = static_cast<uint64_t>(seed);
  return net;
}

// o[c * ldo + r] = a[r * lda + c] for a (rows, cols) matrix a, in 32 x 32 tiles (the columns'
// tiles shared out over the threads; Isa::transpose_tile moves 8 x 8 blocks in registers).
template <typename T>
void transpose_tiles(const T* a, int64_t lda, T* o, int64_t ldo, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32;
  at::parallel_for(0, (cols + kTile - 1) / kTile, 1, [&](int64_t lo, int64_t hi) {
    with_best_isa([&](auto isa) {
      for (int64_t bj = lo; bj < hi; ++bj) {
        const int64_t j0 = bj * kTile, j1 = std::min(cols, j0 + kTile);
        for (int64_t i0 = 0; i0 < rows; i0 += kTile)
          decltype(isa)::template transpose_tile<T>(a, lda, o, ldo, i0, std::min(rows, i0 + kTile),
                                                    j0, j1);
      }
    });
  });
}

// W^T as (in, out) matrices with padded rows, so that the event-driven basal input reads W's
// columns as rows. Runs once per minibatch on the largest matrices, so two things matter: a
// tiled copy in registers (transpose_tiles; ATen's strided copy of w.t() is several times
// slower), and a destination that is not a fresh allocation each time: the pages of a new
// megabyte-sized buffer cost more to fault in than the copy itself. The transposes therefore
// live in a workspace owned by the calling thread and reused by its next call; the returned
// tensors are views of it, valid until that thread's next call (they never leave the op).
std::vector<at::Tensor> transposed_all(const std::vector<at::Tensor>& W) {
  // rows padded to whole 64-byte lines and starting on one: the event-driven gathers then read
  // no line split across two rows
  constexpr int64_t kLine = 64;
  thread_local std::vector<double> workspace;
  std::vector<int64_t> offsets, strides;  // bytes, elements
  int64_t total = 0;  // bytes
  for (const auto& w : W) {
    const int64_t esz = w.element_size();
    const int64_t ld = (w.size(0) * esz + kLine - 1) / kLine * kLine / esz;
    offsets.push_back(total);
    strides.push_back(ld);
    total += w.size(1) * ld * esz;
  }
  const int64_t doubles = (total + kLine) / 8 + 1;
  if (static_cast<int64_t>(workspace.size()) < doubles) workspace.resize(doubles);
  const auto raw = reinterpret_cast<uintptr_t>(workspace.data());
  char* base = reinterpret_cast<char*>((raw + kLine - 1) / kLine * kLine);
  std::vector<at::Tensor> out;
  for (size_t k = 0; k < W.size(); ++k) {
    const at::Tensor src = W[k].contiguous();
    const int64_t rows = src.size(0), cols = src.size(1), ld = strides[k];
    at::Tensor dst = at::from_blob(base + offsets[k], {cols, rows}, {ld, 1}, src.options());
    AT_DISPATCH_FLOATING_TYPES(src.scalar_type(), "segregated_transpose", [&] {
      const scalar_t* a = src.const_data_ptr<scalar_t>();
      scalar_t* o = dst.mutable_data_ptr<scalar_t>();
      transpose_tiles<scalar_t>(a, cols, o, ld, rows, cols);
    });
    out.push_back(dst);
  }
  return out;
}

// W (rows, cols), contiguous, from its padded transpose WT (cols, ld): transposed_all's tiled
// copy the other way round.
template <typename T>
void untranspose(const at::Tensor& WT, const at::Tensor& W) {
  const int64_t rows = W.size(0), cols = W.size(1), ld = WT.stride(0);
  transpose_tiles<T>(WT.const_data_ptr<T>(), ld, W.mutable_data_ptr<T>(), cols, cols, rows);
}

// The transposes the training kernels read: every layer's in spiking mode (the event-driven
// basal input), the first layer's in rate mode (its drive, rate_drive in segregated_cpu_impl.h).
std::vector<at::Tensor> training_transposes(const std::vector<at::Tensor>& W, bool spiking_ff) {
  if (spiking_ff) return transposed_all(W);
  return transposed_all({W[0]});
}

// ---- fused training example -----------------------------------------------------------------------

std::vector<at::Tensor> train_example_cpu(
    at::TensorList W_, at::TensorList b_, at::TensorList Y_, at::TensorList c_,
    const at::Tensor& x_rate_, const at::Tensor& target_, const at::Tensor& kappa,
    const at::Tensor& in_ring, at::TensorList rings, at::TensorList C, at::TensorList lam,
    at::TensorList A, const at::Tensor& step, const at::Tensor& lane_key_,
    const at::Tensor& lengths_, const at::Tensor& windows_, at::TensorList offsets_, int64_t seed,
    at::ArrayRef<double> params, at::IntArrayRef flags, at::IntArrayRef need_train,
    at::IntArrayRef need_test) {
  check_train_args(W_, b_, Y_, c_, x_rate_, target_, kappa, in_ring, rings, C, lam, A, step,
                   lane_key_, lengths_, windows_, offsets_, seed, params, flags, need_train,
                   need_test);
  const HostNet h = host_net(W_, b_, Y_, c_, x_rate_, lane_key_, flags, /*with_rate_drive=*/false);
  const auto& [W, b, Y, c, x_rate, lane_key, B0const, M, B] = h;
  const auto offsets = contiguous_all(offsets_);
  const at::Tensor target = target_.contiguous();
  const at::Tensor lengths = lengths_.contiguous();
  const at::Tensor windows = windows_.contiguous();
  const auto WT = training_transposes(W, flags[kSpikingFF] != 0);
  std::vector<at::Tensor> out = train_outputs(h);
  if (B == 0) return out;
  const std::vector<double> prm(params.begin(), params.end());
  const std::vector<int64_t> flg(flags.begin(), flags.end());
  const std::vector<int64_t> ntr(need_train.begin(), need_train.end());
  const std::vector<int64_t> nte(need_test.begin(), need_test.end());
  AT_DISPATCH_FLOATING_TYPES(x_rate.scalar_type(), "segregated_train_example_cpu", [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(W, WT, b, Y, c, kappa, x_rate.size(1), seed, prm, flg, ntr, nte);
    std::vector<int8_t*> ring_p;
    std::vector<T*> C_p, lam_p, A_p, out_p;
    for (const auto& t : rings) ring_p.push_back(t.mutable_data_ptr<int8_t>());
    for (const auto& t : C) C_p.push_back(t.mutable_data_ptr<T>());
    for (const auto& t : lam) lam_p.push_back(t.mutable_data_ptr<T>());
    for (const auto& t : A) A_p.push_back(t.mutable_data_ptr<T>());
    for (auto& t : out) out_p.push_back(t.mutable_data_ptr<T>());
    std::vector<const int64_t*> off_p;
    for (const auto& t : offsets) off_p.push_back(t.const_data_ptr<int64_t>());
    int8_t* in_ring_p = in_ring.mutable_data_ptr<int8_t>();
    int64_t* step_p = step.mutable_data_ptr<int64_t>();
    const T* x_p = x_rate.const_data_ptr<T>();
    const T* t_p = target.const_data_ptr<T>();
    const int64_t* key_p = lane_key.const_data_ptr<int64_t>();
    const int64_t* len_p = lengths.const_data_ptr<int64_t>();
    const int64_t* win_p = windows.const_data_ptr<int64_t>();
    // longest lanes first: whichever thread takes the last lane then waits the least
    std::vector<int64_t> order(B);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
      return len_p[2 * a] + len_p[2 * a + 1] > len_p[2 * b] + len_p[2 * b + 1];
    });
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), B);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      std::vector<int8_t*> rp = ring_p;
      std::vector<T*> cp = C_p, lp = lam_p, ap = A_p, op = out_p;
      with_best_isa([&](auto isa) {
        decltype(isa)::template train<T>(net, next, B, x_p, t_p, B0const, in_ring_p, rp, cp, lp,
                                         ap, step_p, key_p, len_p, win_p, off_p, op,
                                         order.data());
      });
    });
  });
  return out;
}

// ---- fused test procedure ---------------------------------------------------------------------------

at::Tensor test_cpu(at::TensorList W_, at::TensorList b_, at::TensorList Y_, at::TensorList c_,
                    const at::Tensor& x_rate_, const at::Tensor& kappa,
                    const at::Tensor& lane_key_, int64_t seed, int64_t steps, int64_t window,
                    at::ArrayRef<double> params, at::IntArrayRef flags,
                    at::IntArrayRef need_test) {
  check_test_args(W_, b_, Y_, c_, x_rate_, kappa, lane_key_, seed, steps, window, params, flags,
                  need_test);
  const HostNet h = host_net(W_, b_, Y_, c_, x_rate_, lane_key_, flags);
  const auto& [W, b, Y, c, x_rate, lane_key, B0const, M, B] = h;
  const auto WT = flags[kSpikingFF] != 0 ? transposed_all(W) : std::vector<at::Tensor>();
  at::Tensor out = at::zeros({B, W[M - 1].size(0)}, x_rate.options());
  if (B == 0) return out;
  const std::vector<double> prm(params.begin(), params.end());
  const std::vector<int64_t> flg(flags.begin(), flags.end());
  const std::vector<int64_t> nte(need_test.begin(), need_test.end());
  AT_DISPATCH_FLOATING_TYPES(x_rate.scalar_type(), "segregated_test_cpu", [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(W, WT, b, Y, c, kappa, x_rate.size(1), seed, prm, flg, nte, nte);
    const T* x_p = x_rate.const_data_ptr<T>();
    const int64_t* key_p = lane_key.const_data_ptr<int64_t>();
    T* out_p = out.mutable_data_ptr<T>();
    std::atomic<int64_t> next{0};
    const int64_t workers = std::min<int64_t>(at::get_num_threads(), B);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      with_best_isa([&](auto isa) {
        decltype(isa)::template test<T>(net, next, B, x_p, B0const, key_p, steps, window, out_p);
      });
    });
  });
  return out;
}

// ---- one time step of one layer (building block) ---------------------------------------------------

at::Tensor layer_step_cpu(const at::Tensor& W, const at::Tensor& b,
                          const std::optional<at::Tensor>& Y, const std::optional<at::Tensor>& c,
                          const at::Tensor& ff, const std::optional<at::Tensor>& fb,
                          const at::Tensor& kappa, const std::optional<at::Tensor>& teach,
                          const at::Tensor& C, const at::Tensor& lam, const at::Tensor& A,
                          const at::Tensor& ring, const at::Tensor& sums,
                          const at::Tensor& psp_sum, const at::Tensor& fb_sum,
                          const at::Tensor& step_, const at::Tensor& lane_key_,
                          const at::Tensor& accumulate_, int64_t seed, int64_t pop,
                          at::ArrayRef<double> params, at::IntArrayRef flags) {
  check_layer_step_args(W, b, Y, c, ff, fb, kappa, teach, C, lam, A, ring, sums, psp_sum, fb_sum,
                        step_, lane_key_, accumulate_, seed, pop, params, flags);
  const bool hidden = Y.has_value();
  const int64_t B = C.size(0);
  const int64_t n = C.size(1);
  const int taps = static_cast<int>(ring.size(1));
  const at::Tensor step = step_.contiguous();
  const at::Tensor lane_key = lane_key_.contiguous();
  const at::Tensor accumulate = accumulate_.to(at::kBool).contiguous();
  // p: the feedforward PSP (or rate) of every lane, then the dense basal product
  const LayerStepInputs in = layer_step_inputs(W, b, Y, c, ff, fb, kappa, step, C.scalar_type());
  const at::Tensor &p = in.p, &basal = in.basal, &q = in.q, &apical = in.apical;
  const bool conductances = flags[kConductances] != 0;
  const bool apical_soma = flags[kApicalSoma] != 0;
  const bool quirks = flags[kOriginalQuirks] != 0;
  const bool draw = flags[kNumFlags] != 0;
  const int n_rows = static_cast<int>(sums.size(1));
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "segregated_layer_step_cpu", [&] {
    using T = scalar_t;
    T prm[kNumParams];
    for (int i = 0; i < kNumParams; ++i) prm[i] = static_cast<T>(params[i]);
    const T* bp = basal.const_data_ptr<T>();
    const T* ap = hidden ? apical.const_data_ptr<T>() : nullptr;
    const T* tp = teach.has_value() ? teach->const_data_ptr<T>() : nullptr;
    const T* pp = p.const_data_ptr<T>();
    const at::Tensor pc = p.contiguous();
    const T* qp = hidden ? q.const_data_ptr<T>() : nullptr;
    T* Cp = C.mutable_data_ptr<T>();
    T* lp = lam.mutable_data_ptr<T>();
    T* Ap = hidden ? A.mutable_data_ptr<T>() : nullptr;
    int8_t* rp = ring.mutable_data_ptr<int8_t>();
    T* sp = sums.mutable_data_ptr<T>();
    T* psp = psp_sum.mutable_data_ptr<T>();
    T* fsp = (hidden && fb_sum.numel()) ? fb_sum.mutable_data_ptr<T>() : nullptr;
    const int64_t* stp = step.const_data_ptr<int64_t>();
    const int64_t* kp = lane_key.const_data_ptr<int64_t>();
    const bool* acc = accumulate.const_data_ptr<bool>();
    const int64_t n_in = pc.size(1);
    const int64_t n_fb = hidden ? q.size(1) : 0;
    (void)pp;
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t bl = lo; bl < hi; ++bl) {
        T* Cr = Cp + bl * n;
        T* lr = lp + bl * n;
        for (int64_t j = 0; j < n; ++j) {
          const T basal_j = bp[bl * n + j];
          if (hidden) {
            const T a = ap[bl * n + j];
            Ap[bl * n + j] = a;
            Cr[j] = soma_hidden<T>(Cr[j], basal_j, a, prm, conductances, apical_soma, quirks);
          } else {
            const bool tgt = tp != nullptr;
            Cr[j] = soma_output<T>(Cr[j], basal_j, tgt ? tp[bl * n + j] : T(0), tgt, prm,
                                   conductances);
          }
          lr[j] = prm[kLambdaMax] * sigmoid_exact<T>(Cr[j]);
        }
        if (draw) {
          const int64_t t = stp[bl];
          int8_t* slot = rp + (bl * taps + t % taps) * n;
          for (int64_t g = 0; g < (n + 3) / 4; ++g) {
            const Philox4 r = spike_block(static_cast<uint64_t>(seed), kp[bl], g,
                                          static_cast<uint64_t>(t), kSpikeStream + static_cast<uint32_t>(pop));
            for (int w = 0; w < 4 && 4 * g + w < n; ++w)
              slot[4 * g + w] = static_cast<int8_t>(spike_count(unit_u32(r.v[w]),
                                                                static_cast<double>(lr[4 * g + w])));
          }
        }
        if (acc[bl]) {
          T* srow = sp + bl * n_rows * n;
          for (int64_t j = 0; j < n; ++j) {
            srow[j] += Cr[j];
            srow[n + j] += lr[j];
            if (hidden) srow[2 * n + j] += Ap[bl * n + j];
          }
          const T* prow = pc.const_data_ptr<T>() + bl * n_in;
          for (int64_t i = 0; i < n_in; ++i) psp[bl * n_in + i] += prow[i];
          if (fsp)
            for (int64_t i = 0; i < n_fb; ++i) fsp[bl * n_fb + i] += qp[bl * n_fb + i];
        }
      }
    });
  });
  return basal;
}

// ---- event-driven basal input (building block) -------------------------------------------------------

at::Tensor sparse_basal_cpu(const at::Tensor& W_t_, const at::Tensor& b_, const at::Tensor& ring_,
                            const at::Tensor& step_, const at::Tensor& kappa) {
  check_sparse_basal_args(W_t_, b_, ring_, step_, kappa);
  const at::Tensor W_t = W_t_.contiguous();
  const at::Tensor b = b_.contiguous();
  const at::Tensor ring = ring_.contiguous();
  const at::Tensor step = step_.contiguous();
  const int64_t B = ring.size(0);
  const int taps = static_cast<int>(ring.size(1));
  const int64_t n_in = ring.size(2);
  const int64_t n = W_t.size(1);
  at::Tensor out = at::empty({B, n}, W_t.options());
  AT_DISPATCH_FLOATING_TYPES(W_t.scalar_type(), "segregated_sparse_basal_cpu", [&] {
    using T = scalar_t;
    const at::Tensor kd = kappa.to(at::kDouble).contiguous();
    std::vector<T> kap(taps);
    for (int k = 0; k < taps; ++k) kap[k] = static_cast<T>(kd.const_data_ptr<double>()[k]);
    const T* wt = W_t.const_data_ptr<T>();
    const T* bp = b.const_data_ptr<T>();
    const int8_t* rp = ring.const_data_ptr<int8_t>();
    const int64_t* sp = step.const_data_ptr<int64_t>();
    T* op = out.mutable_data_ptr<T>();
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      std::vector<T> R(n);
      for (int64_t bl = lo; bl < hi; ++bl) {
        T* o = op + bl * n;
        std::fill(o, o + n, T(0));
        for (int k = 1; k <= taps; ++k) {
          const int64_t slot = ((sp[bl] - (k - 1)) % taps + taps) % taps;
          const int8_t* s = rp + (bl * taps + slot) * n_in;
          std::fill(R.begin(), R.end(), T(0));
          for (int64_t i = 0; i < n_in; ++i) {
            if (!s[i]) continue;
            const T cnt = static_cast<T>(s[i]);
            const T* row = wt + i * n;
            for (int64_t j = 0; j < n; ++j) R[j] += cnt * row[j];
          }
          for (int64_t j = 0; j < n; ++j) o[j] += kap[k - 1] * R[j];
        }
        for (int64_t j = 0; j < n; ++j) o[j] += bp[j];
      }
    });
  });
  return out;
}

// ---- plasticity (building block and the rule's update) -------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plasticity_cpu(
    int64_t kind, const at::Tensor& C_f_, const at::Tensor& P_f, const at::Tensor& a_,
    const std::optional<at::Tensor>& b_opt, const std::optional<at::Tensor>& A_f_opt,
    const std::optional<at::Tensor>& Q_f, double lambda_max, double gain, double scale,
    double fb_gain, double fb_scale) {
  check_plasticity_args(kind, C_f_, P_f, a_, b_opt, A_f_opt, Q_f);
  const at::Tensor C_f = C_f_.contiguous();
  const at::Tensor a = a_.contiguous();
  const at::Tensor b = b_opt.has_value() ? b_opt->contiguous() : at::Tensor();
  const bool learn_fb = Q_f.has_value();
  const at::Tensor A_f = learn_fb ? A_f_opt->contiguous() : at::Tensor();
  const int64_t B = C_f.size(0);
  const int64_t n = C_f.size(1);
  at::Tensor e = at::empty_like(C_f);
  at::Tensor e_fb = learn_fb ? at::empty_like(C_f) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(C_f.scalar_type(), "segregated_plasticity_cpu", [&] {
    using T = scalar_t;
    const T* cp = C_f.const_data_ptr<T>();
    const T* ap = a.const_data_ptr<T>();
    const T* bp = b.defined() ? b.const_data_ptr<T>() : nullptr;
    const T* afp = learn_fb ? A_f.const_data_ptr<T>() : nullptr;
    T* ep = e.mutable_data_ptr<T>();
    T* efp = learn_fb ? e_fb.mutable_data_ptr<T>() : nullptr;
    const T lmax = static_cast<T>(lambda_max);
    const T coef = static_cast<T>(gain * lambda_max);
    const T fgain = static_cast<T>(fb_gain);
    // the kind as a compile-time constant, so that each loop vectorises
    auto errors = [&](auto kind_c) {
      constexpr int64_t K = decltype(kind_c)::value;
      at::parallel_for(0, B * n, 8192, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          ep[i] = plasticity_error<T>(K, cp[i], ap[i], K == kKindHidden ? bp[i] : T(0), lmax, coef);
        if (efp)
          for (int64_t i = lo; i < hi; ++i) efp[i] = feedback_error<T>(cp[i], afp[i], lmax, fgain);
      });
    };
    if (kind == kKindOutput) errors(std::integral_constant<int64_t, kKindOutput>{});
    else if (kind == kKindHidden) errors(std::integral_constant<int64_t, kKindHidden>{});
    else errors(std::integral_constant<int64_t, kKindBackprop>{});
  });
  return plasticity_results(e, e_fb, P_f, Q_f, scale, fb_scale);
}

// ---- online training: consecutive examples in one lane, SGD after each ----------------------------

// The plasticity errors of one example in one lane, as segregated_plasticity computes them (the
// same scalar functions in the same translation unit, so the same arithmetic): e[m] per layer
// (from the output down; the backprop kind reads the error above through the pre-update W) and,
// with learned feedback, e_fb[m] per hidden layer.
template <typename T>
void online_errors(const std::vector<at::Tensor>& avg, const std::vector<at::Tensor>& W, int M,
                   at::IntArrayRef kinds, at::ArrayRef<double> gains, double lambda_max,
                   bool learn_fb, double fb_gain, std::vector<at::Tensor>& e,
                   std::vector<at::Tensor>& e_fb) {
  const int H = M - 1;
  const T lmax = static_cast<T>(lambda_max);
  for (int m = M - 1; m >= 0; --m) {
    const int64_t kind = kinds[m];
    const T coef = static_cast<T>(gains[m] * lambda_max);
    const T* cf = avg[m].const_data_ptr<T>();
    at::Tensor a_t;
    const T* a = nullptr;
    const T* b = nullptr;
    if (kind == kKindOutput) {
      a = avg[3 * M + m].const_data_ptr<T>();  // lam_t
    } else if (kind == kKindHidden) {
      a = avg[5 * M + H + m].const_data_ptr<T>();  // A_t
      b = avg[5 * M + m].const_data_ptr<T>();      // A_f
    } else {
      a_t = at::mm(e[m + 1], W[m + 1]).contiguous();
      a = a_t.const_data_ptr<T>();
    }
    T* ep = e[m].mutable_data_ptr<T>();
    const int64_t n = e[m].size(1);
    auto fill = [&](auto kind_c) {
      constexpr int64_t K = decltype(kind_c)::value;
      for (int64_t j = 0; j < n; ++j)
        ep[j] = plasticity_error<T>(K, cf[j], a[j], K == kKindHidden ? b[j] : T(0), lmax, coef);
    };
    if (kind == kKindOutput) fill(std::integral_constant<int64_t, kKindOutput>{});
    else if (kind == kKindHidden) fill(std::integral_constant<int64_t, kKindHidden>{});
    else fill(std::integral_constant<int64_t, kKindBackprop>{});
    if (learn_fb && m < H) {
      const T* af = avg[5 * M + m].const_data_ptr<T>();
      T* fp = e_fb[m].mutable_data_ptr<T>();
      const T fgain = static_cast<T>(fb_gain);
      for (int64_t j = 0; j < n; ++j) fp[j] = feedback_error<T>(cf[j], af[j], lmax, fgain);
    }
  }
}

// Whether ATen's add_(g, alpha) rounds w + alpha g once (a fused multiply-add: its CPU kernels
// use FMA where the CPU has it) or twice, for dtype T: probed once on values where the two
// differ, over a length that covers both the vectorised body and the scalar tail of its loop.
// The online op's own SGD loops then compute exactly what the optimiser's add_ would.
template <typename T>
bool aten_add_is_fused() {
  static const int answer = [] {
    // find values where one rounding and two differ (plenty among random ones)
    uint64_t state = 0x9E3779B97F4A7C15ull;
    auto next = [&] {
      state = state * 6364136223846793005ull + 1442695040888963407ull;
      return static_cast<T>(static_cast<double>(state >> 11) * 0x1.0p-53 + 0.5);
    };
    T g = 0, a = 0, w = 0;
    for (int tries = 0; tries < 100000; ++tries) {
      g = next(); a = -next(); w = next();
      if (std::fma(g, a, w) != static_cast<T>(w + static_cast<T>(g * a))) break;
    }
    const int64_t n = 67;  // a few vector lengths and a tail
    at::Tensor W = at::full({n}, w, at::CPU(c10::CppTypeToScalarType<T>::value));
    const at::Tensor G = at::full({n}, g, W.options());
    W.add_(G, a);
    const T* p = W.const_data_ptr<T>();
    const T fused = std::fma(g, a, w);
    bool all_fused = true, all_unfused = true;
    for (int64_t i = 0; i < n; ++i) {
      all_fused = all_fused && p[i] == fused;
      all_unfused = all_unfused && p[i] != fused;
    }
    TORCH_CHECK(all_fused || all_unfused, "bpdl.segregated_train_online: ATen's add_ rounds "
                "differently in different parts of a tensor; online training cannot match it");
    return all_fused ? 1 : 0;
  }();
  return answer != 0;
}

template <typename T>
__attribute__((optimize("fp-contract=off"))) T add_scaled(T g, T alpha, T w, bool fused) {
  if (fused) return std::fma(g, alpha, w);
  const T p = g * alpha;
  return w + p;
}

// Learned feedback's SGD step and mask, as the optimiser and after_update_ apply them:
// gY = (e_fb^T Q_f) fb_scale, gc = e_fb fb_scale, Y <- fma(gY, -lr, Y), c likewise, then the
// sparse mask (when given) multiplies Y.
template <typename T>
void online_feedback_update(const at::Tensor& Y, const at::Tensor& c, const at::Tensor& e_fb,
                            const at::Tensor& Q_f, double fb_scale, double lr,
                            const at::Tensor& mask) {
  const T fbs = static_cast<T>(fb_scale);
  const T alpha = static_cast<T>(-lr);
  const bool fused = aten_add_is_fused<T>();
  const int64_t rows = Y.size(0), cols = Y.size(1);
  const T* e = e_fb.const_data_ptr<T>();
  const T* q = Q_f.const_data_ptr<T>();
  T* y = Y.mutable_data_ptr<T>();
  for (int64_t j = 0; j < rows; ++j)
    for (int64_t i = 0; i < cols; ++i) {
      const T g = (e[j] * q[i]) * fbs;
      y[j * cols + i] = add_scaled(g, alpha, y[j * cols + i], fused);
    }
  if (c.defined()) {
    T* cp = c.mutable_data_ptr<T>();
    for (int64_t j = 0; j < rows; ++j) cp[j] = add_scaled(e[j] * fbs, alpha, cp[j], fused);
  }
  if (mask.defined()) Y.mul_(mask);
}

std::vector<at::Tensor> train_online_cpu(
    at::TensorList W_, at::TensorList b_, at::TensorList Y_, at::TensorList c_, at::TensorList masks,
    const at::Tensor& x_rate_, const at::Tensor& target_, const at::Tensor& kappa,
    const at::Tensor& in_ring, at::TensorList rings, at::TensorList C, at::TensorList lam,
    at::TensorList A, const at::Tensor& step, const at::Tensor& lane_key_,
    const at::Tensor& lengths_, const at::Tensor& windows_, at::TensorList offsets_, int64_t seed,
    at::ArrayRef<double> params, at::IntArrayRef flags, at::IntArrayRef need_train,
    at::IntArrayRef need_test, at::IntArrayRef kinds, at::ArrayRef<double> lrs,
    at::ArrayRef<double> scales, at::ArrayRef<double> gains, at::ArrayRef<double> fb_lrs,
    double fb_gain, double fb_scale, bool symmetric, double sparse_gain) {
  const char* op = "bpdl.segregated_train_online";
  check_train_args(W_, b_, Y_, c_, x_rate_, target_, kappa, in_ring, rings, C, lam, A, step,
                   lane_key_, lengths_, windows_, offsets_, seed, params, flags, need_train,
                   need_test, /*state_lanes=*/1, op);
  check_online_args(W_, b_, Y_, c_, masks, kinds, lrs, scales, gains, fb_lrs, symmetric, op);
  const int M = static_cast<int>(W_.size()), H = M - 1;
  const int64_t K = x_rate_.size(0);
  const at::Tensor x_all = x_rate_.contiguous();
  const at::Tensor target = target_.contiguous();
  const at::Tensor lengths = lengths_.contiguous();
  const at::Tensor windows = windows_.contiguous();
  const auto offsets = contiguous_all(offsets_);
  // one lane's view of the network (the weights are contiguous: updated in place below)
  HostNet h = host_net(W_, b_, Y_, c_, x_all.narrow(0, 0, std::min<int64_t>(K, 1)), lane_key_,
                       flags, /*with_rate_drive=*/false);
  const bool spiking_ff = flags[kSpikingFF] != 0;
  const auto WT = training_transposes(h.W, spiking_ff);
  // Between examples the kernels read a layer's W only through its transpose where it has one
  // (WT[m] defined), unless an update reads W itself (the backprop kind's error, symmetric
  // feedback): otherwise only the transpose is updated and W is written from it at the end.
  bool defer = !symmetric;
  for (int m = 0; m < M; ++m) defer = defer && kinds[m] != kKindBackprop;
  auto has_t = [&](int m) { return has_transpose(WT, m); };
  std::vector<at::Tensor> avg = train_outputs(h);
  const int64_t n_out = h.W[M - 1].size(0);
  at::Tensor lam_out = at::empty({K, n_out}, x_all.options());
  at::Tensor C_out = at::empty({K, n_out}, x_all.options());
  std::vector<at::Tensor> result;
  const bool learn_fb = !fb_lrs.empty();
  std::vector<at::Tensor> e, e_fb;
  for (int m = 0; m < M; ++m) e.push_back(at::empty({1, h.W[m].size(0)}, x_all.options()));
  for (int m = 0; m < H && learn_fb; ++m) e_fb.push_back(at::empty_like(e[m]));
  const std::vector<double> prm(params.begin(), params.end());
  const std::vector<int64_t> flg(flags.begin(), flags.end());
  const std::vector<int64_t> ntr(need_train.begin(), need_train.end());
  const std::vector<int64_t> nte(need_test.begin(), need_test.end());
  AT_DISPATCH_FLOATING_TYPES(x_all.scalar_type(), "segregated_train_online_cpu", [&] {
    using T = scalar_t;
    const Net<T> net = make_net<T>(h.W, WT, h.b, h.Y, h.c, kappa, x_all.size(1), seed, prm, flg,
                                   ntr, nte);
    std::vector<int8_t*> ring_p;
    std::vector<T*> C_p, lam_p, A_p, out_p;
    for (const auto& t : rings) ring_p.push_back(t.mutable_data_ptr<int8_t>());
    for (const auto& t : C) C_p.push_back(t.mutable_data_ptr<T>());
    for (const auto& t : lam) lam_p.push_back(t.mutable_data_ptr<T>());
    for (const auto& t : A) A_p.push_back(t.mutable_data_ptr<T>());
    for (auto& t : avg) out_p.push_back(t.mutable_data_ptr<T>());
    int8_t* in_ring_p = in_ring.mutable_data_ptr<int8_t>();
    int64_t* step_p = step.mutable_data_ptr<int64_t>();
    const int64_t* key_p = lane_key_.const_data_ptr<int64_t>();
    const int64_t order = 0;
    std::vector<uint32_t> blocks;
    for (int64_t k = 0; k < K; ++k) {
      // the example: its input, target, phase plan and (rates in) first-layer drive
      const at::Tensor B0;  // rate mode: the kernels compute the drive from WT[0]
      std::vector<const int64_t*> off_p;
      for (int m = 0; m < static_cast<int>(offsets.size()); ++m)
        off_p.push_back(offsets[m].const_data_ptr<int64_t>() + k * 2 * h.W[m].size(0));
      std::atomic<int64_t> next{0};
      std::vector<int8_t*> rp = ring_p;
      std::vector<T*> cp = C_p, lp = lam_p, ap = A_p, op_ = out_p;
      with_best_isa([&](auto isa) {
        decltype(isa)::template train<T>(
            net, next, int64_t{1}, x_all.const_data_ptr<T>() + k * x_all.size(1),
            target.const_data_ptr<T>() + k * n_out, B0, in_ring_p, rp, cp, lp, ap, step_p, key_p,
            lengths.const_data_ptr<int64_t>() + 2 * k, windows.const_data_ptr<int64_t>() + 2 * k,
            off_p, op_, &order);
      });
      std::copy_n(avg[3 * M + M - 1].const_data_ptr<T>(), n_out, lam_out.mutable_data_ptr<T>() + k * n_out);
      std::copy_n(avg[M - 1].const_data_ptr<T>(), n_out, C_out.mutable_data_ptr<T>() + k * n_out);
      if (k == K - 1) break;  // the last example's update is the caller's (its optimiser step)
      online_errors<T>(avg, h.W, M, kinds, gains, prm[kLambdaMax], learn_fb, fb_gain, e, e_fb);
      for (int m = 0; m < M; ++m) {
        const int64_t rows = h.W[m].size(0), n_in = h.W[m].size(1);
        const T s_m = static_cast<T>(scales[m]);
        const T alpha = static_cast<T>(-lrs[m]);
        T* ep = e[m].mutable_data_ptr<T>();
        for (int64_t j = 0; j < rows; ++j) ep[j] = s_m * ep[j];  // scale * e: the bias gradient
        const T* P = avg[4 * M + m].const_data_ptr<T>();
        T* wt = has_t(m) ? WT[m].mutable_data_ptr<T>() : nullptr;
        const int64_t ld = has_t(m) ? WT[m].stride(0) : 0;
        T* w = defer && has_t(m) ? nullptr : h.W[m].mutable_data_ptr<T>();
        const bool fused = aten_add_is_fused<T>();
        with_best_isa([&](auto isa) {
          decltype(isa)::template sgd_columns<T>(fused, w, rows, n_in,
                                                 wt, ld, static_cast<const T*>(ep), P, alpha, blocks);
          decltype(isa)::template sgd_vector<T>(fused, h.b[m].mutable_data_ptr<T>(),
                                                static_cast<const T*>(ep), rows, alpha);
        });
        if (learn_fb && m < H) online_feedback_update<T>(h.Y[m], h.c.empty() ? at::Tensor() : h.c[m],
                                                        e_fb[m], avg[5 * M + 2 * H + m], fb_scale,
                                                        fb_lrs[m], masks.empty() ? at::Tensor() : masks[m]);
      }
      if (symmetric) online_symmetric_feedback(h.W, h.Y, masks, flags[kBroadcast] != 0, sparse_gain);
    }
    if (defer)  // W from its transpose, which alone took this call's updates (an error thrown
                // before this point leaves W as the call found it)
      for (int m = 0; m < M; ++m)
        if (has_t(m)) untranspose<T>(WT[m], h.W[m]);
  });
  result = avg;
  result.push_back(lam_out);
  result.push_back(C_out);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CPU, m) {
  m.impl("segregated_layer_step", &layer_step_cpu);
  m.impl("segregated_sparse_basal", &sparse_basal_cpu);
  m.impl("segregated_plasticity", &plasticity_cpu);
  m.impl("segregated_train_example", &train_example_cpu);
  m.impl("segregated_test", &test_cpu);
  m.impl("segregated_train_online", &train_online_cpu);
}

}  // namespace bpdl
