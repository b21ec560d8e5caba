// CPU kernels of the locally connected (unshared convolution) family; geometry in
// bpdl/locally_connected.h, reference in python/bpdl/functional/locally_connected.py.
//
// The reference unfolds the whole input into (N, K, P) and runs one batched matrix product.
// These kernels hold the patches of a small block of locations at a time: for each output
// location p they gather the (N, K) patch matrix into a per-thread buffer and run one small
// GEMM against that location's (O, K) filter bank (one batched call per block), so the extra memory is a capped per-thread
// buffer instead of O(N * K * P), and each location's filters (the bulk of an LC layer's
// bytes) are read once.
//
//   forward      parallel over locations:  Y_p (N, O)  = X_p (N, K) @ W_p^T
//   grad_weight  parallel over locations:  dW_p (O, K) = G_p^T (O, N) @ X_p (N, K)
//   grad_input   parallel over batch rows: dX_p (n, K) = G_p (n, O) @ W_p, scatter-added into
//                the input gradient; batch rows never overlap, so no two threads write one
//                element (patches of neighbouring locations do overlap).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "bpdl/locally_connected.h"

namespace bpdl {
namespace {

// Valid kernel offsets [lo, hi) along one axis for output index `out_index`: the offsets whose
// input coordinate out_index*stride + offset - pad lies in [0, size).
inline void valid_range(int64_t out_index, int64_t stride, int64_t pad, int64_t kernel,
                        int64_t size, int64_t& lo, int64_t& hi) {
  const int64_t start = out_index * stride - pad;
  lo = std::max<int64_t>(0, -start);
  hi = std::min<int64_t>(kernel, size - start);
  if (hi < lo) hi = lo;
}

// Where the patch of one location lies: its valid kernel rows/columns and its input origin.
struct PatchWindow {
  int64_t u0, u1, v0, v1, h0, w0;
  bool full;
};

inline PatchWindow window(const LCGeometry& g, int64_t p) {
  const int64_t i = p / g.OW, j = p % g.OW;
  PatchWindow win;
  valid_range(i, g.SH, g.PT, g.KH, g.H, win.u0, win.u1);
  valid_range(j, g.SW, g.PL, g.KW, g.W, win.v0, win.v1);
  win.h0 = i * g.SH - g.PT;
  win.w0 = j * g.SW - g.PL;
  win.full = win.u0 == 0 && win.u1 == g.KH && win.v0 == 0 && win.v1 == g.KW;
  return win;
}

// One channel's full KH x KW patch (KW known at compile time) from the input plane at origin.
template <int KW, typename scalar_t>
inline void copy_patch(scalar_t* __restrict__ dst, const scalar_t* __restrict__ origin,
                       int64_t KH, int64_t W) {
  for (int64_t u = 0; u < KH; ++u)
    for (int v = 0; v < KW; ++v) dst[u * KW + v] = origin[u * W + v];
}

// patches[q, n - n0, (c*KH + u)*KW + v] = x[n, c, h0_q + u, w0_q + v] (0 outside the input) for
// the nb locations p0 .. p0+nb-1. The loop visits each input plane once for the whole block
// (neighbouring locations share most of their input rows), instead of once per location.
template <typename scalar_t>
void gather_block(const scalar_t* x, scalar_t* patches, const LCGeometry& g,
                  const PatchWindow* wins, int64_t nb, int64_t n0, int64_t n1) {
  const int64_t K = g.K(), rows = n1 - n0, plane_size = g.H * g.W;
  for (int64_t q = 0; q < nb; ++q)
    if (!wins[q].full) std::fill(patches + q * rows * K, patches + (q + 1) * rows * K, scalar_t(0));
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      const scalar_t* plane = x + (n * g.C + c) * plane_size;
      for (int64_t q = 0; q < nb; ++q) {
        const PatchWindow& win = wins[q];
        scalar_t* dst = patches + (q * rows + (n - n0)) * K + c * g.KH * g.KW;
        const scalar_t* origin = plane + win.h0 * g.W + win.w0;
        // full windows of the common kernel widths: fixed-length rows the compiler unrolls
        if (win.full && (g.KW == 3 || g.KW == 5)) {
          if (g.KW == 3) copy_patch<3>(dst, origin, g.KH, g.W);
          else copy_patch<5>(dst, origin, g.KH, g.W);
          continue;
        }
        for (int64_t u = win.u0; u < win.u1; ++u) {
          const scalar_t* src = origin + u * g.W;
          scalar_t* d = dst + u * g.KW;
          for (int64_t v = win.v0; v < win.v1; ++v) d[v] = src[v];
        }
      }
    }
  }
}

// The adjoint of gather_block: x[n, c, h0_q + u, w0_q + v] += patches[q, n - n0, (c*KH+u)*KW+v].
template <typename scalar_t>
void scatter_add_block(scalar_t* x, const scalar_t* patches, const LCGeometry& g,
                       const PatchWindow* wins, int64_t nb, int64_t n0, int64_t n1) {
  const int64_t K = g.K(), rows = n1 - n0, plane_size = g.H * g.W;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < g.C; ++c) {
      scalar_t* plane = x + (n * g.C + c) * plane_size;
      for (int64_t q = 0; q < nb; ++q) {
        const PatchWindow& win = wins[q];
        const scalar_t* src = patches + (q * rows + (n - n0)) * K + c * g.KH * g.KW;
        for (int64_t u = win.u0; u < win.u1; ++u) {
          scalar_t* dst = plane + (win.h0 + u) * g.W + win.w0;
          const scalar_t* s = src + u * g.KW;
          for (int64_t v = win.v0; v < win.v1; ++v) dst[v] += s[v];
        }
      }
    }
  }
}

// gl[q, r - r0] = go[r, p0 + q] for rows r in [r0, r1) of the (N*O, P) output gradient
template <typename scalar_t>
void gather_grad_block(const scalar_t* go, scalar_t* gl, int64_t P, int64_t p0, int64_t nb,
                       int64_t r0, int64_t r1) {
  const int64_t rows = r1 - r0;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* src = go + r * P + p0;
    for (int64_t q = 0; q < nb; ++q) gl[q * rows + (r - r0)] = src[q];
  }
}

// Locations are processed in blocks of consecutive p. The output and the output gradient are
// (N, O, P) with p fastest, so a block reads or writes runs of a cache line instead of one
// element per line, and the patch gather visits each input plane once per block. The block's
// patch buffer is capped (kPatchBudget elements per thread), far below the reference's N*K*P.
constexpr int64_t kMaxBlock = 16;
constexpr int64_t kPatchBudget = int64_t(1) << 20;

int64_t location_block(const LCGeometry& g, int64_t rows, bool split_locations) {
  int64_t block = kMaxBlock;
  if (split_locations) {  // leave every thread a block of its own
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    block = std::min(block, std::max<int64_t>(1, g.P() / threads));
  }
  const int64_t per_location = std::max<int64_t>(1, rows * g.K());
  return std::clamp<int64_t>(kPatchBudget / per_location, 1, block);
}

at::Tensor lc_forward_cpu(const at::Tensor& input, const at::Tensor& weight,
                          at::IntArrayRef stride, at::IntArrayRef padding) {
  // the per-location GEMMs are internal: keep autograd out of them
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LCGeometry g = lc_forward_geometry(input, weight, stride, padding);
  const at::Tensor x = input.contiguous();
  const at::Tensor w = weight.contiguous().view({g.P(), g.O, g.K()});
  at::Tensor out = at::empty({g.N, g.O, g.OH, g.OW}, x.options());
  if (out.numel() == 0) return out;
  const int64_t N = g.N, O = g.O, P = g.P(), PB = location_block(g, N, true);
  const int64_t blocks = (P + PB - 1) / PB;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "locally_connected2d_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor patches = at::empty({PB, N, g.K()}, x.options());
      at::Tensor res = at::empty({PB, N, O}, x.options());
      PatchWindow wins[kMaxBlock];
      const scalar_t* rp = res.const_data_ptr<scalar_t>();
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p0 = b * PB, nb = std::min(PB, P - p0);
        for (int64_t q = 0; q < nb; ++q) wins[q] = window(g, p0 + q);
        gather_block(xp, patches.mutable_data_ptr<scalar_t>(), g, wins, nb, 0, N);
        at::Tensor dst = res.narrow(0, 0, nb);
        at::bmm_out(dst, patches.narrow(0, 0, nb), w.narrow(0, p0, nb).transpose(1, 2));
        for (int64_t r = 0; r < N * O; ++r) {
          scalar_t* yrow = yp + r * P + p0;
          for (int64_t q = 0; q < nb; ++q) yrow[q] = rp[q * N * O + r];
        }
      }
    });
  });
  return out;
}

at::Tensor lc_grad_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride,
                              at::IntArrayRef padding) {
  // the per-location GEMMs are internal: keep autograd out of them
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LCGeometry g = lc_grad_weight_geometry(grad_output, input, kernel_size, stride, padding);
  const at::Tensor x = input.contiguous();
  const at::Tensor go = grad_output.contiguous();
  at::Tensor grad = at::empty({g.OH, g.OW, g.O, g.C, g.KH, g.KW}, x.options());
  if (grad.numel() == 0) return grad;
  if (g.N == 0) return grad.zero_();
  at::Tensor gw = grad.view({g.P(), g.O, g.K()});
  const int64_t N = g.N, O = g.O, P = g.P(), PB = location_block(g, N, true);
  const int64_t blocks = (P + PB - 1) / PB;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "locally_connected2d_grad_weight_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::Tensor patches = at::empty({PB, N, g.K()}, x.options());
      at::Tensor gloc = at::empty({PB, N, O}, x.options());
      PatchWindow wins[kMaxBlock];
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t p0 = b * PB, nb = std::min(PB, P - p0);
        for (int64_t q = 0; q < nb; ++q) wins[q] = window(g, p0 + q);
        gather_grad_block(gp, gloc.mutable_data_ptr<scalar_t>(), P, p0, nb, 0, N * O);
        gather_block(xp, patches.mutable_data_ptr<scalar_t>(), g, wins, nb, 0, N);
        at::Tensor dst = gw.narrow(0, p0, nb);
        at::bmm_out(dst, gloc.narrow(0, 0, nb).transpose(1, 2), patches.narrow(0, 0, nb));
      }
    });
  });
  return grad;
}

at::Tensor lc_grad_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                             at::IntArrayRef input_size, at::IntArrayRef stride,
                             at::IntArrayRef padding) {
  // the per-location GEMMs are internal: keep autograd out of them
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const LCGeometry g = lc_grad_input_geometry(grad_output, weight, input_size, stride, padding);
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor w = weight.contiguous().view({g.P(), g.O, g.K()});
  at::Tensor grad = at::zeros({g.N, g.C, g.H, g.W}, go.options());
  if (grad.numel() == 0) return grad;
  const int64_t O = g.O, P = g.P();
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, (g.N + threads - 1) / threads);
  AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "locally_connected2d_grad_input_cpu", [&] {
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* xp = grad.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, g.N, grain, [&](int64_t n0, int64_t n1) {
      const int64_t rows = n1 - n0, PB = location_block(g, rows, false);
      at::Tensor gloc = at::empty({PB, rows, O}, go.options());
      at::Tensor res = at::empty({PB, rows, g.K()}, go.options());
      PatchWindow wins[kMaxBlock];
      for (int64_t p0 = 0; p0 < P; p0 += PB) {
        const int64_t nb = std::min(PB, P - p0);
        for (int64_t q = 0; q < nb; ++q) wins[q] = window(g, p0 + q);
        gather_grad_block(gp, gloc.mutable_data_ptr<scalar_t>(), P, p0, nb, n0 * O, n1 * O);
        at::Tensor dst = res.narrow(0, 0, nb);
        at::bmm_out(dst, gloc.narrow(0, 0, nb), w.narrow(0, p0, nb));
        scatter_add_block(xp, res.const_data_ptr<scalar_t>(), g, wins, nb, n0, n1);
      }
    });
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(bpdl, CPU, m) {
  m.impl("locally_connected2d", &lc_forward_cpu);
  m.impl("locally_connected2d_grad_input", &lc_grad_input_cpu);
  m.impl("locally_connected2d_grad_weight", &lc_grad_weight_cpu);
}

}  // namespace bpdl
