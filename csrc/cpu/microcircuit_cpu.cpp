// CPU kernel of the dendritic-microcircuit family (Sacramento, Costa, Bengio & Senn 2018, "S18";
// docs/algorithms/microcircuits.md §6.1-6.2).
//
//   microcircuit_run   `steps` Euler-Maruyama steps of every lane of the full dynamics, with the
//                      continuous low-pass filtered plasticity of the shared weights, in place
//
// The reference is python/bpdl/functional/microcircuit.py (full_run, full_step); the kernel
// computes the same quantities in the same order with the same Philox numbers. Each step is one
// parallel pass: the neurons are cut into blocks (bpdl/microcircuit_cpu_impl.h) that carry
// everything only they read and write (their rows of every weight and trace, their somata and
// their partner interneurons), so threads never share a row and synchronise once per step. A
// block's rows are used for the dendritic products and then updated while they are still in
// cache, so each step reads and writes every plastic T and W once (§6.2: one pass with a
// read-modify-write epilogue). The blocks are partitioned over threads by work, the same way at
// every step, and nothing a block computes depends on the partition: results do not change with
// the thread count. The loops are compiled three times (baseline x86-64, AVX2/FMA and AVX-512)
// and the widest the CPU supports runs (BPDL_CPU_ISA caps it; bpdl/cpu_isa.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <optional>
#include <thread>
#include <utility>
#include <vector>

#include <xmmintrin.h>

#include "bpdl/cpu_isa.h"
#include "bpdl/microcircuit.h"
#include "bpdl/microcircuit_checks.h"
#include "bpdl/microcircuit_host.h"
#include "bpdl/philox.h"

namespace bpdl {
namespace {

using namespace ::bpdl::micro;

// Pyramidal neurons per block (even, so that a noise pair never straddles two blocks).
constexpr int kMcBlock = 16;

// Pyramidal layer k (1..N) as its blocks see it, with the interneurons of layer k - 1 that are
// its neurons' partners (k >= 2). Rates come in two buffers: [s] those of step t, [1 - s] those
// being written for step t + 1.
template <typename T>
struct McLayer {
  int64_t n = 0, n_in = 0, n_up = 0;  // n_k, n_{k-1}, n_{k+1} (0 at the output)
  T* W = nullptr;                     // W_k (n, n_in), b_k (n)
  T* b = nullptr;
  T* T_W = nullptr;                   // traces; null where not plastic
  T* T_b = nullptr;
  T c_W = 0, c_b = 0;                 // dt eta
  const T* W_td = nullptr;            // hidden layers: W_td_k, W_pi_k (n, n_up)
  T* W_pi = nullptr;
  T* T_pi = nullptr;
  T c_pi = 0;
  T* W_ip = nullptr;                  // k >= 2: W_ip_{k-1} (n, n_in), b_ip_{k-1} (n)
  T* b_ip = nullptr;
  T* T_ip = nullptr;
  T* T_bip = nullptr;
  T c_ip = 0, c_bip = 0;
  T* u = nullptr;                     // (B, n)
  T* u_I = nullptr;                   // interneurons of layer k - 1 (B, n), k >= 2
  const T* u_trgt = nullptr;          // output layer with a teacher (B, n)
  T* R[2] = {nullptr, nullptr};       // rates of this layer (B, n)
  T* R_in[2] = {nullptr, nullptr};    // rates of layer k - 1 (B, n_in); r0 for k = 1
  T* R_up[2] = {nullptr, nullptr};    // rates of layer k + 1 (B, n_up)
  T* RI_k[2] = {nullptr, nullptr};    // rates of layer k's interneurons (B, n_up)
  T* RI_own[2] = {nullptr, nullptr};  // rates of the partner interneurons (B, n)
  T basal_factor = 0;                 // a_k = g_B / (g_lk + g_B + g_A), g_A = 0 at the output
  uint32_t stream_P = 0, stream_I = 0;
};

// A work item of a step: neurons j0 .. j0 + L - 1 of layer `layer` + 1, or (layer -1) the
// elements j0 .. j0 + L - 1 of the input filter r0.
struct McBlock {
  int layer;
  int64_t j0;
  int64_t L;
};

// Subnormal numbers flushed to zero (FTZ and DAZ) while a worker runs, restored after. The input
// filter of a pixel that stays dark decays geometrically and reaches the subnormal range within a
// few presentations, as do the traces fed by it; x86 cores take a microcode assist for every
// subnormal operand (measured: 40x slower steps after three MNIST presentations). The
// reference keeps them, so kernel and reference differ only below the smallest normal number.
struct FlushSubnormals {
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040u); }
  ~FlushSubnormals() { _mm_setcsr(saved); }
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

// A thread's share of a step: the work items [first, last).
struct McPart {
  int64_t first = 0, last = 0;
};

template <typename T>
struct McNet {
  std::vector<McLayer<T>> layers;
  std::vector<McBlock> blocks;
  int64_t B = 0;
  T g_lk = 0, g_B = 0, g_A = 0, g_D = 0, g_som = 0, g_som_I = 0, dt = 0;
  T keep = 0, a = 0;   // 1 - dt / tau_w, dt / tau_w
  T in_rate = 0;       // dt / tau_in
  T int_factor = 0;    // d = g_D / (g_lk + g_D)
  T sq = 0;            // sigma sqrt(dt)
  bool noise = false;
  T theta = 0, gamma = 0;
  double beta = 1;
  const int64_t* example = nullptr;
  uint64_t seed = 0;
  const T* x = nullptr;  // (B, n_0)
  const T* r0 = nullptr;
  T* R0[2] = {nullptr, nullptr};
};

// Per-thread scratch, reused at every step: per-block dendrites, induction terms and normals
// (lanes x kMcBlock), and the Philox counters and words of a block's noise.
template <typename T>
struct McScratch {
  std::vector<T> vB, vA, vI, eW, eI, eA, zP, zI;
  std::vector<uint32_t> lo, hi, words;
  std::vector<double> z2, rad, cs;
  explicit McScratch(int64_t B) {
    const size_t m = static_cast<size_t>(B * kMcBlock);
    for (auto* v : {&vB, &vA, &vI, &eW, &eI, &eA, &zP, &zI}) v->assign(m, T(0));
    const size_t blocks = static_cast<size_t>(B * (kMcBlock / 2) + 64);
    lo.assign(blocks, 0);
    hi.assign(blocks, 0);
    words.assign(4 * blocks, 0);
    for (auto* v : {&z2, &rad, &cs}) v->assign(2 * blocks, 0.0);
  }
};

}  // namespace
}  // namespace bpdl

// ---- the step loops, once per instruction set -------------------------------------------------
// Without trapping math and errno, compilers vectorise the selects and square roots of the math.
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math", "no-math-errno")
namespace bpdl {
namespace {
#define BPDL_MC_IMPL_NS impl_base
#include "bpdl/microcircuit_cpu_impl.h"
#undef BPDL_MC_IMPL_NS
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options

#if defined(BPDL_HAVE_AVX2_BUILD)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#pragma GCC optimize("no-trapping-math", "no-math-errno")
namespace bpdl {
namespace {
#define BPDL_MC_IMPL_NS impl_avx2
#define BPDL_MC_IMPL_AVX2 1
#include "bpdl/microcircuit_cpu_impl.h"
#undef BPDL_MC_IMPL_AVX2
#undef BPDL_MC_IMPL_NS
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options
#endif

#if defined(BPDL_HAVE_AVX512_BUILD)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,popcnt,prefer-vector-width=512")
#pragma GCC optimize("no-trapping-math", "no-math-errno")
namespace bpdl {
namespace {
#define BPDL_MC_IMPL_NS impl_avx512
#define BPDL_MC_IMPL_AVX2 1
#define BPDL_MC_IMPL_AVX512 1
#include "bpdl/microcircuit_cpu_impl.h"
#undef BPDL_MC_IMPL_AVX512
#undef BPDL_MC_IMPL_AVX2
#undef BPDL_MC_IMPL_NS
}  // namespace
}  // namespace bpdl
#pragma GCC pop_options
#endif

namespace bpdl {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

template <typename T>
using ItemFn = void (*)(const McNet<T>&, int64_t, McScratch<T>&, int, uint32_t, bool);
template <typename T>
using RatesFn = void (*)(const McNet<T>&, int64_t);

// The step and initial-rates loops of the widest instruction set the CPU has.
template <typename T, int Transfer>
std::pair<ItemFn<T>, RatesFn<T>> best_isa() {
#if defined(BPDL_HAVE_AVX512_BUILD)
  if (cpu_has_avx512())
    return {&impl_avx512::run_item<T, Transfer>, &impl_avx512::initial_rates<T, Transfer>};
#endif
#if defined(BPDL_HAVE_AVX2_BUILD)
  if (cpu_has_avx2_fma())
    return {&impl_avx2::run_item<T, Transfer>, &impl_avx2::initial_rates<T, Transfer>};
#endif
  return {&impl_base::run_item<T, Transfer>, &impl_base::initial_rates<T, Transfer>};
}

// The work items (blocks of every layer, then one slice of r0 per part) and their split into
// `parts` contiguous ranges of about equal work (the dendritic products and trace updates of the
// blocks' rows, and their somata), each ending with its slice of r0.
template <typename T>
std::vector<McPart> partition(McNet<T>& net, int64_t parts, int64_t n0) {
  std::vector<McBlock> blocks;
  std::vector<double> cost;
  for (int li = 0; li < static_cast<int>(net.layers.size()); ++li) {
    const McLayer<T>& ly = net.layers[li];
    const double lanes = static_cast<double>(net.B);
    double row = lanes * static_cast<double>(ly.n_in) + (ly.T_W ? (lanes + 3) * ly.n_in : 0.0);
    if (ly.W_ip) row += lanes * ly.n_in + (ly.T_ip ? (lanes + 3) * ly.n_in : 0.0);
    if (ly.n_up) row += 2 * lanes * ly.n_up + (ly.T_pi ? (lanes + 3) * ly.n_up : 0.0);
    row += lanes * (ly.W_ip ? 120.0 : 60.0);  // somata, noise, rates
    for (int64_t j0 = 0; j0 < ly.n; j0 += kMcBlock) {
      const int64_t L = std::min<int64_t>(kMcBlock, ly.n - j0);
      blocks.push_back({li, j0, L});
      cost.push_back(row * static_cast<double>(L));
    }
  }
  const int64_t nb = static_cast<int64_t>(blocks.size());
  parts = std::max<int64_t>(1, std::min(parts, nb));
  double total = 0;
  for (double c : cost) total += c;
  std::vector<McPart> out(parts);
  int64_t i = 0;
  double done = 0;
  const int64_t m = net.B * n0;
  for (int64_t p = 0; p < parts; ++p) {
    out[p].first = static_cast<int64_t>(net.blocks.size());
    const double target = total * static_cast<double>(p + 1) / static_cast<double>(parts);
    const int64_t first = i;
    // at least one block per part, and one left for each later part
    while (i < nb - (parts - 1 - p) && (i == first || p == parts - 1 || done + 0.5 * cost[i] < target)) {
      done += cost[i];
      net.blocks.push_back(blocks[i++]);
    }
    net.blocks.push_back({-1, m * p / parts, m * (p + 1) / parts - m * p / parts});
    out[p].last = static_cast<int64_t>(net.blocks.size());
  }
  return out;
}

template <typename T, int Transfer>
void run_typed(at::TensorList weights, at::TensorList traces, at::TensorList state,
               const at::Tensor& x, const std::optional<at::Tensor>& u_trgt,
               const at::Tensor& example, at::ArrayRef<double> etas, int64_t step0, int64_t steps,
               int64_t seed, at::ArrayRef<double> c, bool apply_last,
               const std::vector<int64_t>& n) {
  const Layout Lo{static_cast<int64_t>(state.size()) / 2};
  const int64_t N = Lo.N;
  const int64_t B = x.size(0);
  McNet<T> net;
  net.B = B;
  set_constants(net, c);
  net.example = example.const_data_ptr<int64_t>();
  net.seed = static_cast<uint64_t>(seed);
  net.x = x.const_data_ptr<T>();
  net.r0 = state[Lo.r0()].const_data_ptr<T>();

  // two rate buffers per population: [0] / [1] alternate between step t and t + 1
  auto opts = x.options();
  std::vector<at::Tensor> keep_alive;
  auto buffer = [&](int64_t rows, int64_t cols) {
    keep_alive.push_back(at::empty({rows, cols}, opts));
    return keep_alive.back().mutable_data_ptr<T>();
  };
  std::vector<std::array<T*, 2>> R(N + 1), RI(N);  // R[k]: layer k; RI[k]: hidden layer k's I
  for (int64_t k = 0; k <= N; ++k) R[k] = {buffer(B, n[k]), buffer(B, n[k])};
  for (int64_t k = 1; k < N; ++k) RI[k] = {buffer(B, n[k + 1]), buffer(B, n[k + 1])};
  net.R0[0] = R[0][0];
  net.R0[1] = R[0][1];

  for (int64_t k = 1; k <= N; ++k) {
    McLayer<T> ly;
    set_layer<T>(ly, k, Lo, n, weights, traces, state, etas, c, u_trgt, R, RI);
    net.layers.push_back(ly);
  }

  const std::vector<McPart> parts = partition(net, at::get_num_threads(), n[0]);
  const int64_t P = static_cast<int64_t>(parts.size());
  std::vector<McScratch<T>> scratch;
  scratch.reserve(P);
  for (int64_t p = 0; p < P; ++p) scratch.emplace_back(B);
  const std::pair<ItemFn<T>, RatesFn<T>> fns = best_isa<T, Transfer>();
  const ItemFn<T> run_item = fns.first;
  const RatesFn<T> initial_rates = fns.second;

  // One parallel region for the whole call. Phase 0 computes the initial rates, phase t + 1 runs
  // step t. A phase is over when all its items are done, not when every worker has arrived: a
  // worker the OS has descheduled (shared machines) is not waited for, it joins the current
  // phase when it runs again, so it delays a phase by at most the item it holds. Worker p takes
  // the items of part p first (the same rows at every step: they stay in its core's cache), then
  // the remaining items of the other parts. A part's cursor carries the phase in its high half,
  // so a late worker can never take an item of the next phase for one of its own.
  const int64_t phases = steps + 1;
  const int64_t n_items = static_cast<int64_t>(net.blocks.size());
  std::vector<std::atomic<uint64_t>> cursor(P);
  for (int64_t p = 0; p < P; ++p) cursor[p].store(static_cast<uint64_t>(parts[p].first));
  std::atomic<int64_t> done{0}, phase{0};
  auto run_phase_item = [&](int64_t w, int64_t ph, int64_t i) {
    if (ph == 0) {
      initial_rates(net, i);
      return;
    }
    const int64_t t = ph - 1;
    // apply_last = false: the last step's trace is the caller's pseudo-gradient, W stays
    const bool apply = apply_last || t + 1 < steps;
    run_item(net, i, scratch[w], static_cast<int>(t & 1), static_cast<uint32_t>(step0 + t),
             apply);
  };
  auto worker = [&](int64_t w) {
    const FlushSubnormals flush;
    while (true) {
      const int64_t ph = phase.load(std::memory_order_acquire);
      if (ph >= phases) return;
      for (int64_t d = 0; d < P; ++d) {
        const int64_t q = (w + d) % P;
        uint64_t c = cursor[q].load(std::memory_order_acquire);
        while (static_cast<int64_t>(c >> 32) == ph &&
               static_cast<int64_t>(c & 0xFFFFFFFFu) < parts[q].last) {
          if (!cursor[q].compare_exchange_weak(c, c + 1, std::memory_order_acq_rel)) continue;
          run_phase_item(w, ph, static_cast<int64_t>(c & 0xFFFFFFFFu));
          if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == n_items) {
            // the last item of the phase: open the next one
            done.store(0, std::memory_order_relaxed);
            for (int64_t r = 0; r < P; ++r)
              cursor[r].store((static_cast<uint64_t>(ph + 1) << 32) |
                                  static_cast<uint64_t>(parts[r].first),
                              std::memory_order_release);
            phase.store(ph + 1, std::memory_order_release);
          }
          c = cursor[q].load(std::memory_order_acquire);
        }
      }
      for (int spins = 0; phase.load(std::memory_order_acquire) == ph; ++spins) {
        if (spins < 4096)
          cpu_relax();
        else
          std::this_thread::yield();
      }
    }
  };
  at::parallel_for(0, P, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) worker(w);
  });
  if (steps > 0) {
    T* r0 = state[Lo.r0()].mutable_data_ptr<T>();
    std::copy_n(net.R0[steps & 1], B * n[0], r0);
  }
}

void microcircuit_run_cpu(at::TensorList weights, at::TensorList traces, at::TensorList state,
                          const at::Tensor& x_, const std::optional<at::Tensor>& u_trgt_,
                          const at::Tensor& example_, at::ArrayRef<double> etas, int64_t step0,
                          int64_t steps, int64_t seed, at::ArrayRef<double> constants,
                          int64_t transfer, bool apply_last) {
  const std::vector<int64_t> n = check_run_args(weights, traces, state, x_, u_trgt_, example_,
                                                etas, step0, steps, seed, constants, transfer);
  const at::Tensor x = x_.contiguous();
  const std::optional<at::Tensor> u_trgt =
      u_trgt_.has_value() ? std::optional<at::Tensor>(u_trgt_->contiguous()) : std::nullopt;
  const at::Tensor example = example_.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "microcircuit_run_cpu", [&] {
    if (transfer == kSoftRelu)
      run_typed<scalar_t, kSoftRelu>(weights, traces, state, x, u_trgt, example, etas, step0,
                                     steps, seed, constants, apply_last, n);
    else
      run_typed<scalar_t, kLogistic>(weights, traces, state, x, u_trgt, example, etas, step0,
                                     steps, seed, constants, apply_last, n);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CPU, m) {
  m.impl("microcircuit_run", &microcircuit_run_cpu);
}

}  // namespace bpdl
