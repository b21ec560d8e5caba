// CPU kernels of the locally connected (unshared convolution) family; geometry in
// bpdl/locally_connected.h, reference in python/bpdl/functional/locally_connected.py.
//
// The reference unfolds the whole input into (N, K, P) and runs one batched matrix product.
// These kernels hold the patches of a small block of locations at a time: for each output
// location p they gather the (N, K) patch matrix into a per-thread buffer and run one small
// GEMM against that location's (O, K) filter bank (one batched call per block), so the extra
// memory is a capped per-thread buffer instead of O(N * K * P), and each location's filters
// (the bulk of an LC layer's bytes) are read once.
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

// Moves one location's patch of one example, all channels, between a patch row and the input.
// Gather (Scatter = false): patch[(c*KH + u)*KW + v] = xn[c, h0 + u, w0 + v], 0 outside the
// input. Scatter, its adjoint: xn[c, h0 + u, w0 + v] += patch[(c*KH + u)*KW + v] inside the
// input. KH_/KW_ > 0 fix a full window's size at compile time (the common 3x3 and 5x5 kernels),
// so its rows move in fixed-length, unrolled loops. Patch and Input are pointer types (const on
// the side that is only read).
template <bool Scatter, int KH_, int KW_, typename Patch, typename Input>
inline void move_patch(Patch __restrict__ patch, Input __restrict__ xn, const LCGeometry& g,
                       const PatchWindow& win) {
  const int64_t KH = KH_ > 0 ? KH_ : g.KH, KW = KW_ > 0 ? KW_ : g.KW;
  const int64_t kk = KH * KW, plane = g.H * g.W, W = g.W;
  auto move = [](auto& p, auto& x) {
    if constexpr (Scatter) x += p;
    else p = x;
  };
  Input origin = xn + win.h0 * W + win.w0;
  if (win.full) {
    for (int64_t c = 0; c < g.C; ++c, patch += kk, origin += plane)
      for (int64_t u = 0; u < KH; ++u)
        for (int64_t v = 0; v < KW; ++v) move(patch[u * KW + v], origin[u * W + v]);
    return;
  }
  if constexpr (!Scatter) std::fill(patch, patch + g.C * kk, 0);
  for (int64_t c = 0; c < g.C; ++c, patch += kk, origin += plane)
    for (int64_t u = win.u0; u < win.u1; ++u)
      for (int64_t v = win.v0; v < win.v1; ++v) move(patch[u * KW + v], origin[u * W + v]);
}

// Runs body.template operator()<KH, KW>() with the kernel size fixed at compile time where it is
// 3x3 or 5x5, and with <0, 0> (sizes read at run time) otherwise.
template <typename Body>
inline void with_kernel_size(const LCGeometry& g, Body&& body) {
  if (g.KH == 3 && g.KW == 3) body.template operator()<3, 3>();
  else if (g.KH == 5 && g.KW == 5) body.template operator()<5, 5>();
  else body.template operator()<0, 0>();
}

// Gather: patches[q, n - n0, (c*KH + u)*KW + v] = x[n, c, h0_q + u, w0_q + v] (0 outside the
// input) for the nb locations p0 .. p0+nb-1 of examples n0 .. n1-1; Scatter, its adjoint:
// x[n, c, h0_q + u, w0_q + v] += patches[q, n - n0, (c*KH+u)*KW+v]. Examples are outermost, so
// one example's input (C*H*W values) stays in cache while all nb locations use it, and the
// channel loop is innermost, so its trip count and window are the same for C iterations (a
// location's window changes at the borders, and a loop over locations inside would mispredict
// there).
template <bool Scatter, typename Patch, typename Input>
void move_block(Patch patches, Input x, const LCGeometry& g, const PatchWindow* wins, int64_t nb,
                int64_t n0, int64_t n1) {
  const int64_t K = g.K(), rows = n1 - n0, sample = g.C * g.H * g.W;
  with_kernel_size(g, [&]<int KH, int KW>() {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t q = 0; q < nb; ++q)
        move_patch<Scatter, KH, KW>(patches + (q * rows + (n - n0)) * K, x + n * sample, g,
                                    wins[q]);
  });
}

template <typename scalar_t>
void gather_block(const scalar_t* x, scalar_t* patches, const LCGeometry& g,
                  const PatchWindow* wins, int64_t nb, int64_t n0, int64_t n1) {
  move_block<false>(patches, x, g, wins, nb, n0, n1);
}

template <typename scalar_t>
void scatter_add_block(scalar_t* x, const scalar_t* patches, const LCGeometry& g,
                       const PatchWindow* wins, int64_t nb, int64_t n0, int64_t n1) {
  move_block<true>(patches, x, g, wins, nb, n0, n1);
}

// dst[j * dst_ld + i] = src[i * src_ld + j] for a rows x cols block, in 16 x 16 tiles: both
// sides are strided by whole rows of large matrices (the output gradient's N*O rows of P, the
// block result's nb rows of N*O), and an untiled loop over one side's stride would stream 16
// lines at a power-of-two distance through the same cache sets.
template <typename scalar_t>
void transpose_into(const scalar_t* __restrict__ src, int64_t src_ld, scalar_t* __restrict__ dst,
                    int64_t dst_ld, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 16;
  for (int64_t i0 = 0; i0 < rows; i0 += kTile) {
    const int64_t i1 = std::min(rows, i0 + kTile);
    for (int64_t j0 = 0; j0 < cols; j0 += kTile) {
      const int64_t j1 = std::min(cols, j0 + kTile);
      for (int64_t j = j0; j < j1; ++j)
        for (int64_t i = i0; i < i1; ++i) dst[j * dst_ld + i] = src[i * src_ld + j];
    }
  }
}

// gl[q, r - r0] = go[r, p0 + q] for rows r in [r0, r1) of the (N*O, P) output gradient
template <typename scalar_t>
void gather_grad_block(const scalar_t* go, scalar_t* gl, int64_t P, int64_t p0, int64_t nb,
                       int64_t r0, int64_t r1) {
  transpose_into(go + r0 * P + p0, P, gl, r1 - r0, r1 - r0, nb);
}

// Locations are processed in blocks of consecutive p. The output and the output gradient are
// (N, O, P) with p fastest, so a block reads or writes runs of a cache line instead of one
// element per line, and the patch gather reads each example's input once per block. The block's
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
        transpose_into(rp, N * O, yp + p0, P, nb, N * O);  // y[r, p0 + q] = res[q, r]
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
