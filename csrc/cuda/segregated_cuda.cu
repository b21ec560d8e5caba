// CUDA kernels of the segregated-dendrite family (Guerguiev, Lillicrap & Richards 2017). Same
// ops, arguments and random numbers as csrc/cpu/segregated_cpu.cpp; the reference is
// python/bpdl/functional/segregated.py.
//
// The fused training example and test procedure run one thread block per lane: the block
// loops over the lane's own time steps (so lanes with different random phase lengths never
// wait for each other), its threads share the neurons of each layer, and spikes are collected
// into per-population event lists in neuron order (a deterministic block-wide scan), from which
// the event-driven basal input is summed: R(t) = sum_events count * W^T[i, :],
// B(t) = b + sum_k kappa(k) R(t - k + 1).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "bpdl/segregated.h"
#include "bpdl/segregated_checks.h"
#include "bpdl/segregated_host.h"

namespace bpdl {
namespace {

using namespace ::bpdl::seg;

constexpr int kThreads = 256;
constexpr int kMaxLayers = 8;   // hidden layers + output
constexpr int kMaxTaps = 128;

template <typename T>
struct DevNet {
  int M;
  int taps;
  int offsets_count;
  int64_t n[kMaxLayers + 1];
  const T* W[kMaxLayers];
  const T* WT[kMaxLayers];
  const T* b[kMaxLayers];
  const T* Y[kMaxLayers];
  const T* c[kMaxLayers];
  int64_t nfb[kMaxLayers];
  int src[kMaxLayers];
  T kappa[kMaxTaps];
  T prm[kNumParams];
  bool conductances, spiking_ff, spiking_fb, apical_soma, original_quirks;
  bool need_train[kMaxLayers + 1];
  bool need_test[kMaxLayers + 1];
  uint64_t seed;
};

// Per-lane pointers into the batched state, inputs and outputs (train) or scratch (test).
template <typename T>
struct DevLanes {
  int8_t* in_ring;
  int8_t* rings[kMaxLayers];
  T* C[kMaxLayers];
  T* lam[kMaxLayers];
  T* A[kMaxLayers];
  int64_t* step;
  const int64_t* lane_key;
  const int64_t* lengths;
  const int64_t* windows;
  const int64_t* offsets[kMaxLayers];
  const T* x;
  const T* target;
  const T* B0const;
  T* out[8 * kMaxLayers];
};

// Offsets (in elements) of each lane's scratch arrays.
struct DevScratch {
  int64_t f_stride;   // floats per lane
  int64_t i_stride;   // int32 per lane
  int64_t b_stride;   // int8 per lane (test-lane state)
  int64_t R[kMaxLayers], Csum[kMaxLayers], lamsum[kMaxLayers], Psum[kMaxLayers], q[kMaxLayers],
      qlast[kMaxLayers], Qsum[kMaxLayers], cw;
  int64_t C[kMaxLayers], lam[kMaxLayers], A[kMaxLayers];  // test-lane state (floats)
  int64_t ev[kMaxLayers + 1], evc[kMaxLayers + 1];          // event lists (int32)
  int64_t in_ring, rings[kMaxLayers];                      // test-lane rings (int8)
};

// ---- block-wide helpers ---------------------------------------------------------------------------

// Exclusive prefix sum of v over the block (all threads must call it); returns the prefix and
// writes the block total to *total.
__device__ int block_exclusive_scan(int v, int* warp_sums, int* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  int x = v;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int y = __shfl_up_sync(0xffffffffu, x, d);
    if (lane >= d) x += y;
  }
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (threadIdx.x == 0) {
    int acc = 0;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) {
      const int s = warp_sums[w];
      warp_sums[w] = acc;
      acc += s;
    }
    *total = acc;
  }
  __syncthreads();
  const int result = warp_sums[warp] + x - v;
  __syncthreads();
  return result;
}

// Poisson counts of a population at lane step t, written to the ring slot, appended in neuron
// order to the event list (idx, cnt) after `*count` events. x: rates; groups with all rates zero
// draw nothing (as on the CPU: their counts are zero whatever the uniform).
template <typename T>
__device__ void draw_population(const T* lam, int64_t n, uint64_t seed, int64_t lane_key,
                                uint64_t t, uint32_t stream, int8_t* slot, int32_t* ev_idx,
                                int32_t* ev_cnt, int* count, int* warp_sums, int* total,
                                bool skip_zero_groups) {
  const int64_t groups = (n + 3) / 4;
  for (int64_t g0 = 0; g0 < groups; g0 += blockDim.x) {
    const int64_t g = g0 + threadIdx.x;
    int k[4] = {0, 0, 0, 0};
    int spikes = 0;
    if (g < groups) {
      bool any = true;
      if (skip_zero_groups) {
        any = false;
        for (int w = 0; w < 4; ++w)
          if (4 * g + w < n && lam[4 * g + w] > T(0)) any = true;
      }
      if (any) {
        const Philox4 r = spike_block(seed, lane_key, g, t, stream);
        for (int w = 0; w < 4; ++w) {
          const int64_t j = 4 * g + w;
          if (j < n) k[w] = spike_count(unit_u32(r.v[w]), static_cast<double>(lam[j]));
        }
      }
      for (int w = 0; w < 4; ++w) {
        const int64_t j = 4 * g + w;
        if (j < n) slot[j] = static_cast<int8_t>(k[w]);
        spikes += k[w] > 0;
      }
    }
    const int base = block_exclusive_scan(spikes, warp_sums, total);
    int pos = *count + base;
    for (int w = 0; w < 4; ++w) {
      if (k[w] > 0) {
        ev_idx[pos] = static_cast<int32_t>(4 * g + w);
        ev_cnt[pos] = k[w];
        ++pos;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) *count += *total;
    __syncthreads();
  }
}

// Events of one ring slot, in neuron order.
__device__ void slot_events(const int8_t* slot, int64_t n, int32_t* ev_idx, int32_t* ev_cnt,
                            int* count, int* warp_sums, int* total) {
  if (threadIdx.x == 0) *count = 0;
  __syncthreads();
  for (int64_t j0 = 0; j0 < n; j0 += blockDim.x) {
    const int64_t j = j0 + threadIdx.x;
    const int k = j < n ? slot[j] : 0;
    const int base = block_exclusive_scan(k > 0, warp_sums, total);
    if (k > 0) {
      ev_idx[*count + base] = static_cast<int32_t>(j);
      ev_cnt[*count + base] = k;
    }
    __syncthreads();
    if (threadIdx.x == 0) *count += *total;
    __syncthreads();
  }
}

// R = sum_e cnt_e W^T[idx_e, :] (thread per output unit).
template <typename T>
__device__ void gather_rows(T* R, const T* WT, const int32_t* ev_idx, const int32_t* ev_cnt,
                            int events, int64_t n) {
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    T acc = T(0);
    for (int e = 0; e < events; ++e) acc += static_cast<T>(ev_cnt[e]) * WT[ev_idx[e] * n + j];
    R[j] = acc;
  }
}

__device__ __forceinline__ int64_t ring_slot(int64_t t, int64_t back, int taps) {
  return ((t - back) % taps + taps) % taps;
}

// ---- one phase of one lane ---------------------------------------------------------------------------

template <typename T>
__device__ void run_phase(const DevNet<T>& net, const DevScratch& sc, T* fs, int32_t* is,
                          int8_t* in_ring, int8_t* const* rings, T* const* C, T* const* lam,
                          T* const* A, int64_t* step_ptr, int64_t lane_key, const T* x,
                          const T* teach, const T* B0const, int64_t length, int64_t window,
                          int phase, int* ev_count, int* warp_sums, int* total) {
  const int M = net.M;
  const int taps = net.taps;
  const bool training = phase != 2;
  const bool forward = phase == 0;
  const bool target = phase == 1;
  const int64_t ws = length - window;
  const int64_t pw0 = ws - (taps - 1);
  const int n_off = training ? net.offsets_count : 1;
  const bool need_q = training || net.apical_soma;
  const bool sparse_psp = forward && net.spiking_ff;
  for (int m = 0; m < M; ++m) {
    for (int64_t j = threadIdx.x; j < net.n[m + 1]; j += blockDim.x) {
      fs[sc.Csum[m] + j] = T(0);
      fs[sc.lamsum[m] + j] = T(0);
    }
    if (forward)
      for (int64_t i = threadIdx.x; i < net.n[m]; i += blockDim.x) fs[sc.Psum[m] + i] = T(0);
    if (m < M - 1)
      for (int64_t i = threadIdx.x; i < n_off * net.nfb[m]; i += blockDim.x) fs[sc.Qsum[m] + i] = T(0);
  }
  T* cw = fs + sc.cw;
  if (sparse_psp) {
    for (int64_t r = pw0 + threadIdx.x; r < length; r += blockDim.x) {
      T acc = T(0);
      for (int k = 1; k <= taps; ++k) {
        const int64_t when = r + k - 1;
        if (when >= ws && when <= length - 1) acc += net.kappa[k - 1];
      }
      cw[r - pw0] = acc;
    }
    __syncthreads();
    const int64_t t0 = *step_ptr;
    for (int64_t r = (pw0 > -(taps - 1) ? pw0 : -(taps - 1)); r < 0; ++r) {
      const int64_t slot = ring_slot(t0, -r, taps);
      const T w = cw[r - pw0];
      for (int m = 0; m < M; ++m) {
        const int8_t* srcp = (m == 0 ? in_ring : rings[m - 1]) + slot * net.n[m];
        for (int64_t i = threadIdx.x; i < net.n[m]; i += blockDim.x)
          if (srcp[i]) fs[sc.Psum[m] + i] += w * static_cast<T>(srcp[i]);
      }
    }
  }
  __syncthreads();
  for (int64_t t_rel = 0; t_rel < length; ++t_rel) {
    const int64_t t = *step_ptr;
    const int64_t slot = t % taps;
    const bool in_win = t_rel >= ws;
    const bool psp_due = sparse_psp && t_rel >= pw0;
    const T cwt = psp_due ? cw[t_rel - pw0] : T(0);
    if (net.spiking_ff) {
      if (threadIdx.x == 0) ev_count[0] = 0;
      __syncthreads();
      draw_population(x, net.n[0], net.seed, lane_key, static_cast<uint64_t>(t), kSpikeStream,
                      in_ring + slot * net.n[0], is + sc.ev[0], is + sc.evc[0], &ev_count[0],
                      warp_sums, total, true);
      gather_rows(fs + sc.R[0] + slot * net.n[1], net.WT[0], is + sc.ev[0], is + sc.evc[0],
                  ev_count[0], net.n[1]);
      if (psp_due)
        for (int e = threadIdx.x; e < ev_count[0]; e += blockDim.x)
          fs[sc.Psum[0] + is[sc.ev[0] + e]] += cwt * static_cast<T>(is[sc.evc[0] + e]);
    } else if (forward && in_win) {
      for (int64_t i = threadIdx.x; i < net.n[0]; i += blockDim.x) fs[sc.Psum[0] + i] += x[i];
    }
    __syncthreads();
    for (int m = 0; m < M; ++m) {
      const int64_t nm = net.n[m + 1];
      if (m < M - 1) {
        // feedback input q (one step stale), needed in the windows and for an apical soma
        const int src = net.src[m];
        const int64_t nfb = net.nfb[m];
        const bool q_due = need_q && (net.apical_soma || (training && t_rel >= ws - net.offsets_count)
                                      || (target && t_rel == length - 1));
        if (q_due) {
          T* q = fs + sc.q[m];
          for (int64_t i = threadIdx.x; i < nfb; i += blockDim.x) {
            T acc = T(0);
            if (net.spiking_fb) {
              for (int k = 1; k <= taps; ++k) {
                const int8_t s = rings[src][ring_slot(t, k, taps) * nfb + i];
                if (s) acc += net.kappa[k - 1] * static_cast<T>(s);
              }
            } else {
              acc = lam[src][i];
            }
            q[i] = acc;
            if (training) {
              for (int o = 0; o < n_off; ++o) {
                const int64_t end = length - 1 - o;
                if (t_rel <= end && t_rel > end - window) fs[sc.Qsum[m] + o * nfb + i] += acc;
              }
            }
            if (target && t_rel == length - 1) fs[sc.qlast[m] + i] = acc;
          }
          __syncthreads();
        }
        for (int64_t j = threadIdx.x; j < nm; j += blockDim.x) {
          T basal;
          if (net.spiking_ff) {
            basal = net.b[m][j];
            for (int k = 1; k <= taps; ++k)
              basal += net.kappa[k - 1] * fs[sc.R[m] + ring_slot(t, k - 1, taps) * nm + j];
          } else if (m == 0) {
            basal = B0const[j];
          } else {
            basal = net.b[m][j];
            for (int64_t i = 0; i < net.n[m]; ++i) basal += net.WT[m][i * nm + j] * lam[m - 1][i];
          }
          T a = T(0);
          if (net.apical_soma) {
            const T* row = net.Y[m] + j * nfb;
            for (int64_t i = 0; i < nfb; ++i) a += row[i] * fs[sc.q[m] + i];
            if (net.c[m]) a += net.c[m][j];
            A[m][j] = a;
          }
          const T Cj = soma_hidden<T>(C[m][j], basal, a, net.prm, net.conductances,
                                      net.apical_soma, net.original_quirks);
          C[m][j] = Cj;
        }
      } else {
        for (int64_t j = threadIdx.x; j < nm; j += blockDim.x) {
          T basal;
          if (net.spiking_ff) {
            basal = net.b[m][j];
            for (int k = 1; k <= taps; ++k)
              basal += net.kappa[k - 1] * fs[sc.R[m] + ring_slot(t, k - 1, taps) * nm + j];
          } else if (m == 0) {
            basal = B0const[j];
          } else {
            basal = net.b[m][j];
            for (int64_t i = 0; i < net.n[m]; ++i) basal += net.WT[m][i * nm + j] * lam[m - 1][i];
          }
          C[m][j] = soma_output<T>(C[m][j], basal, target ? teach[j] : T(0), target, net.prm,
                                   net.conductances);
        }
      }
      for (int64_t j = threadIdx.x; j < nm; j += blockDim.x) {
        const T l = net.prm[kLambdaMax] * sigmoid_exact<T>(C[m][j]);
        lam[m][j] = l;
        if (in_win) {
          fs[sc.Csum[m] + j] += C[m][j];
          if (training) fs[sc.lamsum[m] + j] += l;
        }
      }
      __syncthreads();
      const bool draw = training ? net.need_train[m + 1] : net.need_test[m + 1];
      if (threadIdx.x == 0) ev_count[m + 1] = 0;
      __syncthreads();
      if (draw) {
        draw_population(lam[m], nm, net.seed, lane_key, static_cast<uint64_t>(t),
                        kSpikeStream + static_cast<uint32_t>(m + 1), rings[m] + slot * nm,
                        is + sc.ev[m + 1], is + sc.evc[m + 1], &ev_count[m + 1], warp_sums, total,
                        false);
      }
      if (m < M - 1) {
        if (net.spiking_ff) {
          gather_rows(fs + sc.R[m + 1] + slot * net.n[m + 2], net.WT[m + 1], is + sc.ev[m + 1],
                      is + sc.evc[m + 1], ev_count[m + 1], net.n[m + 2]);
          if (psp_due)
            for (int e = threadIdx.x; e < ev_count[m + 1]; e += blockDim.x)
              fs[sc.Psum[m + 1] + is[sc.ev[m + 1] + e]] += cwt * static_cast<T>(is[sc.evc[m + 1] + e]);
        } else if (forward && in_win) {
          for (int64_t i = threadIdx.x; i < nm; i += blockDim.x) fs[sc.Psum[m + 1] + i] += lam[m][i];
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) *step_ptr += 1;
    __syncthreads();
  }
}

// A_i = Y_i . Qsum[off_i] / W + c_i.
template <typename T>
__device__ void apical_average(const DevNet<T>& net, const DevScratch& sc, const T* fs, int m,
                               int64_t window, const int64_t* off, T* out) {
  const int64_t nm = net.n[m + 1];
  const int64_t nfb = net.nfb[m];
  const T inv = T(1) / static_cast<T>(window);
  for (int64_t j = threadIdx.x; j < nm; j += blockDim.x) {
    const int o = off ? static_cast<int>(off[j]) : 0;
    const T* row = net.Y[m] + j * nfb;
    T acc = T(0);
    for (int64_t i = 0; i < nfb; ++i) acc += row[i] * fs[sc.Qsum[m] + o * nfb + i];
    out[j] = acc * inv + (net.c[m] ? net.c[m][j] : T(0));
  }
}

template <typename T>
__global__ void train_kernel(DevNet<T> net, DevLanes<T> L, DevScratch sc, T* fscratch,
                             int32_t* iscratch) {
  __shared__ int ev_count[kMaxLayers + 1];
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int total;
  const int64_t bl = blockIdx.x;
  const int M = net.M;
  const int H = M - 1;
  const int taps = net.taps;
  T* fs = fscratch + bl * sc.f_stride;
  int32_t* is = iscratch + bl * sc.i_stride;
  int8_t* in_ring = L.in_ring + bl * taps * net.n[0];
  int8_t* rings[kMaxLayers];
  T* C[kMaxLayers];
  T* lam[kMaxLayers];
  T* A[kMaxLayers];
  for (int m = 0; m < M; ++m) {
    rings[m] = L.rings[m] + bl * taps * net.n[m + 1];
    C[m] = L.C[m] + bl * net.n[m + 1];
    lam[m] = L.lam[m] + bl * net.n[m + 1];
    A[m] = m < H ? L.A[m] + bl * net.n[m + 1] : nullptr;
  }
  int64_t* step = L.step + bl;
  const int64_t key = L.lane_key[bl];
  const T* x = L.x + bl * net.n[0];
  const T* teach = L.target + bl * net.n[M];
  const T* b0 = L.B0const ? L.B0const + bl * net.n[1] : nullptr;
  // rebuild the event-driven rings R from the spike rings with the current weights
  if (net.spiking_ff) {
    for (int m = 0; m < M; ++m) {
      const int8_t* ring = m == 0 ? in_ring : rings[m - 1];
      for (int s = 0; s < taps; ++s) {
        slot_events(ring + s * net.n[m], net.n[m], is + sc.ev[m], is + sc.evc[m], &ev_count[m],
                    warp_sums, &total);
        gather_rows(fs + sc.R[m] + s * net.n[m + 1], net.WT[m], is + sc.ev[m], is + sc.evc[m],
                    ev_count[m], net.n[m + 1]);
        __syncthreads();
      }
    }
  }
  for (int phase = 0; phase < 2; ++phase) {
    const int64_t length = L.lengths[2 * bl + phase];
    const int64_t window = L.windows[2 * bl + phase];
    run_phase(net, sc, fs, is, in_ring, rings, C, lam, A, step, key, x, teach, b0, length, window,
              phase, ev_count, warp_sums, &total);
    const T inv = T(1) / static_cast<T>(window);
    for (int m = 0; m < M; ++m) {
      const int64_t nm = net.n[m + 1];
      T* Cout = L.out[(phase == 0 ? 0 : 1) * M + m] + bl * nm;
      T* Lout = L.out[(phase == 0 ? 2 : 3) * M + m] + bl * nm;
      for (int64_t j = threadIdx.x; j < nm; j += blockDim.x) {
        Cout[j] = fs[sc.Csum[m] + j] * inv;
        Lout[j] = fs[sc.lamsum[m] + j] * inv;
      }
      if (phase == 0) {
        T* Pout = L.out[4 * M + m] + bl * net.n[m];
        for (int64_t i = threadIdx.x; i < net.n[m]; i += blockDim.x) Pout[i] = fs[sc.Psum[m] + i] * inv;
      }
    }
    for (int m = 0; m < H; ++m) {
      const int64_t nm = net.n[m + 1];
      const int64_t* off = L.offsets[m] ? L.offsets[m] + (2 * bl + phase) * nm : nullptr;
      apical_average(net, sc, fs, m, window, off, L.out[5 * M + (phase == 0 ? 0 : H) + m] + bl * nm);
      if (phase == 0) {
        T* Qout = L.out[5 * M + 2 * H + m] + bl * net.nfb[m];
        for (int64_t i = threadIdx.x; i < net.nfb[m]; i += blockDim.x) Qout[i] = fs[sc.Qsum[m] + i] * inv;
      }
    }
    __syncthreads();
  }
  if (!net.apical_soma) {
    for (int m = 0; m < H; ++m) {
      const int64_t nm = net.n[m + 1];
      const int64_t nfb = net.nfb[m];
      for (int64_t j = threadIdx.x; j < nm; j += blockDim.x) {
        const T* row = net.Y[m] + j * nfb;
        T acc = T(0);
        for (int64_t i = 0; i < nfb; ++i) acc += row[i] * fs[sc.qlast[m] + i];
        A[m][j] = net.c[m] ? acc + net.c[m][j] : acc;
      }
    }
  }
}

template <typename T>
__global__ void test_kernel(DevNet<T> net, DevLanes<T> L, DevScratch sc, T* fscratch,
                            int32_t* iscratch, int8_t* bscratch, int64_t steps, int64_t window,
                            T* out) {
  __shared__ int ev_count[kMaxLayers + 1];
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int total;
  __shared__ int64_t step;
  const int64_t bl = blockIdx.x;
  const int M = net.M;
  T* fs = fscratch + bl * sc.f_stride;
  int32_t* is = iscratch + bl * sc.i_stride;
  int8_t* bs = bscratch + bl * sc.b_stride;
  for (int64_t i = threadIdx.x; i < sc.b_stride; i += blockDim.x) bs[i] = 0;
  int8_t* rings[kMaxLayers];
  T* C[kMaxLayers];
  T* lam[kMaxLayers];
  T* A[kMaxLayers];
  for (int m = 0; m < M; ++m) {
    rings[m] = bs + sc.rings[m];
    C[m] = fs + sc.C[m];
    lam[m] = fs + sc.lam[m];
    A[m] = fs + sc.A[m];
    for (int64_t j = threadIdx.x; j < net.n[m + 1]; j += blockDim.x) {
      C[m][j] = T(0);
      lam[m][j] = T(0);
      A[m][j] = T(0);
    }
    if (net.spiking_ff)
      for (int64_t j = threadIdx.x; j < net.taps * net.n[m + 1]; j += blockDim.x) fs[sc.R[m] + j] = T(0);
  }
  if (threadIdx.x == 0) step = 0;
  __syncthreads();
  const T* x = L.x + bl * net.n[0];
  const T* b0 = L.B0const ? L.B0const + bl * net.n[1] : nullptr;
  run_phase(net, sc, fs, is, bs + sc.in_ring, rings, C, lam, A, &step, L.lane_key[bl], x,
            static_cast<const T*>(nullptr), b0, steps, window, 2, ev_count, warp_sums, &total);
  const int64_t n_out = net.n[M];
  const T inv = T(1) / static_cast<T>(window);
  for (int64_t j = threadIdx.x; j < n_out; j += blockDim.x) out[bl * n_out + j] = fs[sc.Csum[M - 1] + j] * inv;
}

// ---- host side -----------------------------------------------------------------------------------

template <typename T>
DevNet<T> make_dev_net(const std::vector<at::Tensor>& W, const std::vector<at::Tensor>& WT,
                       const std::vector<at::Tensor>& b, const std::vector<at::Tensor>& Y,
                       const std::vector<at::Tensor>& c, const at::Tensor& kappa, int64_t n_in,
                       int64_t seed, at::ArrayRef<double> params, at::IntArrayRef flags,
                       at::IntArrayRef need_train, at::IntArrayRef need_test) {
  DevNet<T> net{};
  net.M = static_cast<int>(W.size());
  TORCH_CHECK(net.M <= kMaxLayers, "bpdl.segregated (CUDA): at most ", kMaxLayers,
              " layers are supported, got ", net.M);
  net.taps = static_cast<int>(kappa.numel());
  TORCH_CHECK(net.taps <= kMaxTaps, "bpdl.segregated (CUDA): at most ", kMaxTaps,
              " PSP taps are supported, got ", net.taps);
  net.n[0] = n_in;
  const bool broadcast = flags[kBroadcast] != 0;
  for (int m = 0; m < net.M; ++m) {
    net.n[m + 1] = W[m].size(0);
    net.W[m] = W[m].const_data_ptr<T>();
    net.WT[m] = WT[m].const_data_ptr<T>();
    net.b[m] = b[m].const_data_ptr<T>();
  }
  for (int m = 0; m + 1 < net.M; ++m) {
    net.Y[m] = Y[m].const_data_ptr<T>();
    net.c[m] = c.empty() ? nullptr : c[m].const_data_ptr<T>();
    net.src[m] = broadcast ? net.M - 1 : m + 1;
    net.nfb[m] = Y[m].size(1);
  }
  const at::Tensor k = kappa.to(at::kDouble).cpu().contiguous();
  for (int i = 0; i < net.taps; ++i) net.kappa[i] = static_cast<T>(k.const_data_ptr<double>()[i]);
  for (int i = 0; i < kNumParams; ++i) net.prm[i] = static_cast<T>(params[i]);
  net.conductances = flags[kConductances] != 0;
  net.spiking_ff = flags[kSpikingFF] != 0;
  net.spiking_fb = flags[kSpikingFB] != 0;
  net.apical_soma = flags[kApicalSoma] != 0;
  net.original_quirks = flags[kOriginalQuirks] != 0;
  net.offsets_count = flags[kRandomPlateaus] ? static_cast<int>(flags[kPlateauMax]) + 1 : 1;
  for (int p = 0; p <= net.M; ++p) {
    net.need_train[p] = need_train[p] != 0;
    net.need_test[p] = need_test[p] != 0;
  }
  net.seed = static_cast<uint64_t>(seed);
  return net;
}

template <typename T>
DevScratch plan_scratch(const DevNet<T>& net, int64_t max_length, bool test_state) {
  DevScratch sc{};
  int64_t f = 0, i = 0, b = 0;
  for (int m = 0; m < net.M; ++m) {
    const int64_t nm = net.n[m + 1];
    sc.R[m] = f;
    f += net.spiking_ff ? net.taps * nm : 0;
    sc.Csum[m] = f;
    f += nm;
    sc.lamsum[m] = f;
    f += nm;
    sc.Psum[m] = f;
    f += net.n[m];
    if (m + 1 < net.M) {
      sc.q[m] = f;
      f += net.nfb[m];
      sc.qlast[m] = f;
      f += net.nfb[m];
      sc.Qsum[m] = f;
      f += net.offsets_count * net.nfb[m];
    }
    if (test_state) {
      sc.C[m] = f;
      f += nm;
      sc.lam[m] = f;
      f += nm;
      sc.A[m] = f;
      f += nm;
      sc.rings[m] = b;
      b += net.taps * nm;
    }
  }
  sc.cw = f;
  f += max_length + net.taps;
  for (int p = 0; p <= net.M; ++p) {
    sc.ev[p] = i;
    i += net.n[p];
    sc.evc[p] = i;
    i += net.n[p];
  }
  if (test_state) {
    sc.in_ring = b;
    b += net.taps * net.n[0];
  }
  sc.f_stride = f;
  sc.i_stride = i;
  sc.b_stride = b;
  return sc;
}

std::vector<at::Tensor> train_example_cuda(
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
  const c10::cuda::CUDAGuard guard(x_rate_.device());
  const HostNet h = host_net(W_, b_, Y_, c_, x_rate_, lane_key_, flags);
  const auto& [W, b, Y, c, x_rate, lane_key, B0const, M, B] = h;
  const auto offsets = contiguous_all(offsets_);
  const at::Tensor target = target_.contiguous();
  const at::Tensor lengths = lengths_.contiguous();
  const at::Tensor windows = windows_.contiguous();
  std::vector<at::Tensor> WT;
  for (const auto& w : W) WT.push_back(w.t().contiguous());
  std::vector<at::Tensor> out = train_outputs(h);
  if (B == 0) return out;
  const int H = M - 1;
  const auto opts = x_rate.options();
  const int64_t max_length = lengths.max().item<int64_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x_rate.scalar_type(), "segregated_train_example_cuda", [&] {
    using T = scalar_t;
    const DevNet<T> net = make_dev_net<T>(W, WT, b, Y, c, kappa, x_rate.size(1), seed, params,
                                          flags, need_train, need_test);
    const DevScratch sc = plan_scratch(net, max_length, false);
    at::Tensor fscratch = at::zeros({B, sc.f_stride}, opts);
    at::Tensor iscratch = at::zeros({B, sc.i_stride}, opts.dtype(at::kInt));
    DevLanes<T> L{};
    L.in_ring = in_ring.mutable_data_ptr<int8_t>();
    for (int m = 0; m < M; ++m) {
      L.rings[m] = rings[m].mutable_data_ptr<int8_t>();
      L.C[m] = C[m].mutable_data_ptr<T>();
      L.lam[m] = lam[m].mutable_data_ptr<T>();
      L.A[m] = m < H ? A[m].mutable_data_ptr<T>() : nullptr;
      L.offsets[m] = (m < H && !offsets.empty()) ? offsets[m].const_data_ptr<int64_t>() : nullptr;
    }
    L.step = step.mutable_data_ptr<int64_t>();
    L.lane_key = lane_key.const_data_ptr<int64_t>();
    L.lengths = lengths.const_data_ptr<int64_t>();
    L.windows = windows.const_data_ptr<int64_t>();
    L.x = x_rate.const_data_ptr<T>();
    L.target = target.const_data_ptr<T>();
    L.B0const = B0const.defined() ? B0const.const_data_ptr<T>() : nullptr;
    for (size_t k = 0; k < out.size(); ++k) L.out[k] = out[k].mutable_data_ptr<T>();
    train_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        net, L, sc, fscratch.mutable_data_ptr<T>(), iscratch.mutable_data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor test_cuda(at::TensorList W_, at::TensorList b_, at::TensorList Y_, at::TensorList c_,
                     const at::Tensor& x_rate_, const at::Tensor& kappa,
                     const at::Tensor& lane_key_, int64_t seed, int64_t steps, int64_t window,
                     at::ArrayRef<double> params, at::IntArrayRef flags,
                     at::IntArrayRef need_test) {
  check_test_args(W_, b_, Y_, c_, x_rate_, kappa, lane_key_, seed, steps, window, params, flags,
                  need_test);
  const c10::cuda::CUDAGuard guard(x_rate_.device());
  const HostNet h = host_net(W_, b_, Y_, c_, x_rate_, lane_key_, flags);
  const auto& [W, b, Y, c, x_rate, lane_key, B0const, M, B] = h;
  std::vector<at::Tensor> WT;
  for (const auto& w : W) WT.push_back(w.t().contiguous());
  at::Tensor out = at::zeros({B, W[M - 1].size(0)}, x_rate.options());
  if (B == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x_rate.scalar_type(), "segregated_test_cuda", [&] {
    using T = scalar_t;
    const DevNet<T> net = make_dev_net<T>(W, WT, b, Y, c, kappa, x_rate.size(1), seed, params,
                                          flags, need_test, need_test);
    const DevScratch sc = plan_scratch(net, steps, true);
    at::Tensor fscratch = at::zeros({B, sc.f_stride}, x_rate.options());
    at::Tensor iscratch = at::zeros({B, sc.i_stride}, x_rate.options().dtype(at::kInt));
    at::Tensor bscratch = at::zeros({B, sc.b_stride}, x_rate.options().dtype(at::kChar));
    DevLanes<T> L{};
    L.lane_key = lane_key.const_data_ptr<int64_t>();
    L.x = x_rate.const_data_ptr<T>();
    L.B0const = B0const.defined() ? B0const.const_data_ptr<T>() : nullptr;
    test_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        net, L, sc, fscratch.mutable_data_ptr<T>(), iscratch.mutable_data_ptr<int32_t>(),
        bscratch.mutable_data_ptr<int8_t>(), steps, window, out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- one time step of one layer (building block) ---------------------------------------------------

template <typename T>
__global__ void layer_step_kernel(int64_t B, int64_t n, int taps, const T* basal, const T* apical,
                                  const T* teach, T* C, T* lam, T* A, int8_t* ring, T* sums,
                                  int n_rows, const int64_t* step, const int64_t* lane_key,
                                  const bool* acc, uint64_t seed, uint32_t stream,
                                  DevNet<T> prm_holder, bool hidden, bool draw) {
  const int64_t groups = (n + 3) / 4;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * groups) return;
  const int64_t bl = idx / groups;
  const int64_t g = idx % groups;
  const T* prm = prm_holder.prm;
  const int64_t t = step[bl];
  Philox4 r{};
  if (draw) r = spike_block(seed, lane_key[bl], g, static_cast<uint64_t>(t), stream);
  for (int w = 0; w < 4; ++w) {
    const int64_t j = 4 * g + w;
    if (j >= n) break;
    const int64_t e = bl * n + j;
    if (hidden) {
      const T a = apical[e];
      A[e] = a;
      C[e] = soma_hidden<T>(C[e], basal[e], a, prm, prm_holder.conductances,
                            prm_holder.apical_soma, prm_holder.original_quirks);
    } else {
      const bool tgt = teach != nullptr;
      C[e] = soma_output<T>(C[e], basal[e], tgt ? teach[e] : T(0), tgt, prm, prm_holder.conductances);
    }
    const T l = prm[kLambdaMax] * sigmoid_exact<T>(C[e]);
    lam[e] = l;
    if (draw)
      ring[(bl * taps + t % taps) * n + j] =
          static_cast<int8_t>(spike_count(unit_u32(r.v[w]), static_cast<double>(l)));
    if (acc[bl]) {
      T* srow = sums + bl * n_rows * n;
      srow[j] += C[e];
      srow[n + j] += l;
      if (hidden) srow[2 * n + j] += A[e];
    }
  }
}

at::Tensor layer_step_cuda(const at::Tensor& W, const at::Tensor& b,
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
  const c10::cuda::CUDAGuard guard(C.device());
  const bool hidden = Y.has_value();
  const int64_t B = C.size(0);
  const int64_t n = C.size(1);
  const int taps = static_cast<int>(ring.size(1));
  const at::Tensor step = step_.contiguous();
  const at::Tensor lane_key = lane_key_.contiguous();
  const at::Tensor accumulate = accumulate_.to(at::kBool).contiguous();
  const LayerStepInputs in = layer_step_inputs(W, b, Y, c, ff, fb, kappa, step, C.scalar_type());
  const at::Tensor &p = in.p, &basal = in.basal, &q = in.q, &apical = in.apical;
  const at::Tensor w_acc = accumulate.to(C.scalar_type()).unsqueeze(1);
  psp_sum.add_(p * w_acc);
  if (hidden && fb_sum.numel()) fb_sum.add_(q * w_acc);
  const at::Tensor teach_c = teach.has_value() ? teach->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t work = B * ((n + 3) / 4);
  if (work == 0) return basal;
  AT_DISPATCH_FLOATING_TYPES(C.scalar_type(), "segregated_layer_step_cuda", [&] {
    using T = scalar_t;
    DevNet<T> holder{};
    for (int i = 0; i < kNumParams; ++i) holder.prm[i] = static_cast<T>(params[i]);
    holder.conductances = flags[kConductances] != 0;
    holder.apical_soma = flags[kApicalSoma] != 0;
    holder.original_quirks = flags[kOriginalQuirks] != 0;
    const int threads = 256;
    const unsigned blocks = static_cast<unsigned>((work + threads - 1) / threads);
    layer_step_kernel<T><<<blocks, threads, 0, stream>>>(
        B, n, taps, basal.const_data_ptr<T>(), hidden ? apical.const_data_ptr<T>() : nullptr,
        teach_c.defined() ? teach_c.const_data_ptr<T>() : nullptr, C.mutable_data_ptr<T>(),
        lam.mutable_data_ptr<T>(), hidden ? A.mutable_data_ptr<T>() : nullptr,
        ring.mutable_data_ptr<int8_t>(), sums.mutable_data_ptr<T>(), static_cast<int>(sums.size(1)),
        step.const_data_ptr<int64_t>(), lane_key.const_data_ptr<int64_t>(),
        accumulate.const_data_ptr<bool>(), static_cast<uint64_t>(seed),
        kSpikeStream + static_cast<uint32_t>(pop), holder, hidden, flags[kNumFlags] != 0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return basal;
}

// ---- event-driven basal input (building block) -------------------------------------------------------

template <typename T>
__global__ void sparse_basal_kernel(const T* W_t, const T* b, const int8_t* ring,
                                    const int64_t* step, DevNet<T> kap, int taps, int64_t n_in,
                                    int64_t n, int32_t* ev_scratch, T* out) {
  __shared__ int count;
  __shared__ int warp_sums[kThreads / 32];
  __shared__ int total;
  const int64_t bl = blockIdx.x;
  int32_t* ev_idx = ev_scratch + bl * 2 * n_in;
  int32_t* ev_cnt = ev_idx + n_in;
  T* o = out + bl * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] = T(0);
  for (int k = 1; k <= taps; ++k) {
    const int64_t slot = ring_slot(step[bl], k - 1, taps);
    slot_events(ring + (bl * taps + slot) * n_in, n_in, ev_idx, ev_cnt, &count, warp_sums, &total);
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      T R = T(0);
      for (int e = 0; e < count; ++e) R += static_cast<T>(ev_cnt[e]) * W_t[ev_idx[e] * n + j];
      o[j] += kap.kappa[k - 1] * R;
    }
    __syncthreads();
  }
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) o[j] += b[j];
}

at::Tensor sparse_basal_cuda(const at::Tensor& W_t_, const at::Tensor& b_, const at::Tensor& ring_,
                             const at::Tensor& step_, const at::Tensor& kappa) {
  check_sparse_basal_args(W_t_, b_, ring_, step_, kappa);
  const c10::cuda::CUDAGuard guard(W_t_.device());
  const at::Tensor W_t = W_t_.contiguous();
  const at::Tensor b = b_.contiguous();
  const at::Tensor ring = ring_.contiguous();
  const at::Tensor step = step_.contiguous();
  const int64_t B = ring.size(0);
  const int taps = static_cast<int>(ring.size(1));
  TORCH_CHECK(taps <= kMaxTaps, "bpdl.segregated_sparse_basal (CUDA): at most ", kMaxTaps, " taps");
  const int64_t n_in = ring.size(2);
  const int64_t n = W_t.size(1);
  at::Tensor out = at::empty({B, n}, W_t.options());
  if (B == 0) return out;
  at::Tensor ev = at::empty({B, 2 * n_in}, W_t.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(W_t.scalar_type(), "segregated_sparse_basal_cuda", [&] {
    using T = scalar_t;
    DevNet<T> kap{};
    const at::Tensor k = kappa.to(at::kDouble).cpu().contiguous();
    for (int i = 0; i < taps; ++i) kap.kappa[i] = static_cast<T>(k.const_data_ptr<double>()[i]);
    sparse_basal_kernel<T><<<static_cast<unsigned>(B), kThreads, 0, stream>>>(
        W_t.const_data_ptr<T>(), b.const_data_ptr<T>(), ring.const_data_ptr<int8_t>(),
        step.const_data_ptr<int64_t>(), kap, taps, n_in, n, ev.mutable_data_ptr<int32_t>(),
        out.mutable_data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- plasticity ---------------------------------------------------------------------------------------

template <typename T>
__global__ void plasticity_kernel(int64_t total, int64_t kind, const T* C_f, const T* a,
                                  const T* b, const T* A_f, T lmax, T coef, T fgain, T* e, T* e_fb) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  e[i] = plasticity_error<T>(kind, C_f[i], a[i], b ? b[i] : T(0), lmax, coef);
  if (e_fb) e_fb[i] = feedback_error<T>(C_f[i], A_f[i], lmax, fgain);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> plasticity_cuda(
    int64_t kind, const at::Tensor& C_f_, const at::Tensor& P_f, const at::Tensor& a_,
    const std::optional<at::Tensor>& b_opt, const std::optional<at::Tensor>& A_f_opt,
    const std::optional<at::Tensor>& Q_f, double lambda_max, double gain, double scale,
    double fb_gain, double fb_scale) {
  check_plasticity_args(kind, C_f_, P_f, a_, b_opt, A_f_opt, Q_f);
  const c10::cuda::CUDAGuard guard(C_f_.device());
  const at::Tensor C_f = C_f_.contiguous();
  const at::Tensor a = a_.contiguous();
  const at::Tensor b = b_opt.has_value() ? b_opt->contiguous() : at::Tensor();
  const bool learn_fb = Q_f.has_value();
  const at::Tensor A_f = learn_fb ? A_f_opt->contiguous() : at::Tensor();
  at::Tensor e = at::empty_like(C_f);
  at::Tensor e_fb = learn_fb ? at::empty_like(C_f) : at::Tensor();
  const int64_t total = C_f.numel();
  if (total > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(C_f.scalar_type(), "segregated_plasticity_cuda", [&] {
      using T = scalar_t;
      const int threads = 256;
      const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
      plasticity_kernel<T><<<blocks, threads, 0, stream>>>(
          total, kind, C_f.const_data_ptr<T>(), a.const_data_ptr<T>(),
          b.defined() ? b.const_data_ptr<T>() : nullptr,
          learn_fb ? A_f.const_data_ptr<T>() : nullptr, static_cast<T>(lambda_max),
          static_cast<T>(gain * lambda_max), static_cast<T>(fb_gain), e.mutable_data_ptr<T>(),
          learn_fb ? e_fb.mutable_data_ptr<T>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return plasticity_results(e, e_fb, P_f, Q_f, scale, fb_scale);
}

// ---- online training: consecutive examples in one lane, SGD after each ----------------------------
// On the GPU one lane is one block, so online training is a host loop over the fused example
// kernel and the plasticity kernel, with the SGD step taken as torch.optim.SGD takes it on CUDA
// (its foreach add over each parameter group): the same as batch-1 steps through the optimiser.

std::vector<at::Tensor> train_online_cuda(
    at::TensorList W, at::TensorList b, at::TensorList Y, at::TensorList c, at::TensorList masks,
    const at::Tensor& x_rate, const at::Tensor& target, const at::Tensor& kappa,
    const at::Tensor& in_ring, at::TensorList rings, at::TensorList C, at::TensorList lam,
    at::TensorList A, const at::Tensor& step, const at::Tensor& lane_key,
    const at::Tensor& lengths, const at::Tensor& windows, at::TensorList offsets, int64_t seed,
    at::ArrayRef<double> params, at::IntArrayRef flags, at::IntArrayRef need_train,
    at::IntArrayRef need_test, at::IntArrayRef kinds, at::ArrayRef<double> lrs,
    at::ArrayRef<double> scales, at::ArrayRef<double> gains, at::ArrayRef<double> fb_lrs,
    double fb_gain, double fb_scale, bool symmetric, double sparse_gain) {
  const char* op = "bpdl.segregated_train_online";
  check_train_args(W, b, Y, c, x_rate, target, kappa, in_ring, rings, C, lam, A, step, lane_key,
                   lengths, windows, offsets, seed, params, flags, need_train, need_test,
                   /*state_lanes=*/1, op);
  check_online_args(W, b, Y, c, masks, kinds, lrs, scales, gains, fb_lrs, symmetric, op);
  const c10::cuda::CUDAGuard guard(x_rate.device());
  const int M = static_cast<int>(W.size()), H = M - 1;
  const int64_t K = x_rate.size(0);
  const bool learn_fb = !fb_lrs.empty();
  const std::vector<at::Tensor> Wv(W.begin(), W.end()), Yv(Y.begin(), Y.end());
  std::vector<at::Tensor> avg, lam_out, C_out;
  for (int64_t k = 0; k < K; ++k) {
    std::vector<at::Tensor> off;
    for (const auto& o : offsets) off.push_back(o.narrow(0, k, 1));
    avg = train_example_cuda(W, b, Y, c, x_rate.narrow(0, k, 1), target.narrow(0, k, 1), kappa,
                             in_ring, rings, C, lam, A, step, lane_key, lengths.narrow(0, k, 1),
                             windows.narrow(0, k, 1), off, seed, params, flags, need_train,
                             need_test);
    lam_out.push_back(avg[3 * M + M - 1]);
    C_out.push_back(avg[M - 1]);
    if (k == K - 1) break;
    // plasticity from the output down (the backprop kind reads the pre-update W above)
    std::vector<at::Tensor> e(M);
    std::vector<std::array<at::Tensor, 4>> g(M);
    for (int m = M - 1; m >= 0; --m) {
      const bool fb = learn_fb && m < H;
      std::optional<at::Tensor> bb, A_f, Q_f;
      at::Tensor a;
      if (kinds[m] == kKindOutput) {
        a = avg[3 * M + m];
      } else if (kinds[m] == kKindHidden) {
        a = avg[5 * M + H + m];
        bb = avg[5 * M + m];
      } else {
        a = at::mm(e[m + 1], W[m + 1]);
      }
      if (fb) {
        A_f = avg[5 * M + m];
        Q_f = avg[5 * M + 2 * H + m];
      }
      auto [e_m, gW, gb, gY, gc] = plasticity_cuda(kinds[m], avg[m], avg[4 * M + m], a, bb, A_f,
                                                   Q_f, params[kLambdaMax], gains[m], scales[m],
                                                   fb_gain, fb_scale);
      e[m] = e_m;
      g[m] = {gW, gb, gY, gc};
    }
    for (int m = 0; m < M; ++m) {
      at::_foreach_add_(at::TensorList({W[m], b[m]}), at::TensorList({g[m][0], g[m][1]}), -lrs[m]);
      if (learn_fb && m < H) {
        if (!c.empty()) {
          at::_foreach_add_(at::TensorList({Y[m], c[m]}), at::TensorList({g[m][2], g[m][3]}),
                            -fb_lrs[m]);
        } else {
          at::_foreach_add_(at::TensorList({Y[m]}), at::TensorList({g[m][2]}), -fb_lrs[m]);
        }
      }
    }
    if (symmetric) {
      online_symmetric_feedback(Wv, Yv, masks, flags[kBroadcast] != 0, sparse_gain);
    } else if (learn_fb && !masks.empty()) {
      for (int m = 0; m < H; ++m) Y[m].mul_(masks[m]);
    }
  }
  std::vector<at::Tensor> result = avg;
  result.push_back(at::cat(lam_out));
  result.push_back(at::cat(C_out));
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CUDA, m) {
  m.impl("segregated_layer_step", &layer_step_cuda);
  m.impl("segregated_sparse_basal", &sparse_basal_cuda);
  m.impl("segregated_plasticity", &plasticity_cuda);
  m.impl("segregated_train_example", &train_example_cuda);
  m.impl("segregated_test", &test_cuda);
  m.impl("segregated_train_online", &train_online_cuda);
}

}  // namespace bpdl
