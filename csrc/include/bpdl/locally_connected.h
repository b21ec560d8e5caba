// Geometry and argument checks of the locally connected (unshared convolution) family, shared by
// csrc/cpu/locally_connected_cpu.cpp and csrc/cuda/locally_connected_cuda.cu.
//
//   y[n, o, i, j] = sum_{c,u,v} W[i, j, o, c, u, v] * x[n, c, sh*i + u - pt, sw*j + v - pl]
//
// The weight is (OH, OW, O, C, KH, KW), i.e. the (P, O, K) matrix with P = OH*OW locations and
// K = C*KH*KW patch entries. Padding is (top, left); the output size comes from the weight and
// patch entries outside the input read zero (this covers TensorFlow's asymmetric "SAME").
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace bpdl {

struct LCGeometry {
  int64_t N, C, H, W;      // input
  int64_t O, OH, OW;       // output channels and size
  int64_t KH, KW;          // kernel
  int64_t SH, SW, PT, PL;  // stride, padding (top, left)
  int64_t K() const { return C * KH * KW; }
  int64_t P() const { return OH * OW; }
};

inline void lc_check_pairs(at::IntArrayRef stride, at::IntArrayRef padding, const char* op) {
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "bpdl.", op,
              ": stride must be two integers >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "bpdl.", op,
              ": padding must be two integers >= 0 (top, left), got ", padding);
}

inline void lc_check_float(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "bpdl.", op, ": ",
              name, " must be float32 or float64, got ", t.scalar_type(),
              "; convert it with .float()");
}

inline void lc_check_output_fits(const LCGeometry& g, const char* op) {
  // every patch must start inside the padded input, or the location would see only padding
  TORCH_CHECK((g.OH - 1) * g.SH - g.PT < g.H && (g.OW - 1) * g.SW - g.PL < g.W, "bpdl.", op,
              ": an output of ", g.OH, "x", g.OW, " locations with stride (", g.SH, ", ", g.SW,
              ") and padding (", g.PT, ", ", g.PL, ") does not fit an input of ", g.H, "x", g.W,
              "; the weight's first two dimensions must be the output size");
}

// Forward: input (N, C, H, W), weight (OH, OW, O, C, KH, KW).
inline LCGeometry lc_forward_geometry(const at::Tensor& input, const at::Tensor& weight,
                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                      const char* op = "locally_connected2d") {
  lc_check_pairs(stride, padding, op);
  TORCH_CHECK(input.dim() == 4, "bpdl.", op, ": input must be (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(weight.dim() == 6, "bpdl.", op, ": weight must be (H_out, W_out, O, C, k_h, k_w), "
              "got shape ", weight.sizes());
  TORCH_CHECK(input.size(1) == weight.size(3), "bpdl.", op, ": input has ", input.size(1),
              " channels but the weight expects ", weight.size(3));
  TORCH_CHECK(input.device() == weight.device(), "bpdl.", op, ": input on ", input.device(),
              " but weight on ", weight.device());
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "bpdl.", op, ": input is ",
              input.scalar_type(), " but weight is ", weight.scalar_type());
  lc_check_float(input, "input", op);
  LCGeometry g{input.size(0), input.size(1), input.size(2), input.size(3),
               weight.size(2), weight.size(0), weight.size(1), weight.size(4), weight.size(5),
               stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(g.OH > 0 && g.OW > 0 && g.KH > 0 && g.KW > 0, "bpdl.", op,
              ": weight dimensions must be positive, got ", weight.sizes());
  lc_check_output_fits(g, op);
  return g;
}

// Input gradient: grad_output (N, O, OH, OW), weight (OH, OW, O, C, KH, KW), input size (H, W).
inline LCGeometry lc_grad_input_geometry(const at::Tensor& grad_output, const at::Tensor& weight,
                                         at::IntArrayRef input_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding) {
  const char* op = "locally_connected2d_grad_input";
  lc_check_pairs(stride, padding, op);
  TORCH_CHECK(input_size.size() == 2 && input_size[0] > 0 && input_size[1] > 0, "bpdl.", op,
              ": input_size must be two positive integers (H, W), got ", input_size);
  TORCH_CHECK(weight.dim() == 6, "bpdl.", op, ": weight must be (H_out, W_out, O, C, k_h, k_w), "
              "got shape ", weight.sizes());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(1) == weight.size(2) &&
                  grad_output.size(2) == weight.size(0) && grad_output.size(3) == weight.size(1),
              "bpdl.", op, ": grad_output must be (N, ", weight.size(2), ", ", weight.size(0), ", ",
              weight.size(1), ") for this weight, got shape ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == weight.device(), "bpdl.", op, ": grad_output on ",
              grad_output.device(), " but weight on ", weight.device());
  TORCH_CHECK(grad_output.scalar_type() == weight.scalar_type(), "bpdl.", op, ": grad_output is ",
              grad_output.scalar_type(), " but weight is ", weight.scalar_type());
  lc_check_float(weight, "weight", op);
  LCGeometry g{grad_output.size(0), weight.size(3), input_size[0], input_size[1],
               weight.size(2), weight.size(0), weight.size(1), weight.size(4), weight.size(5),
               stride[0], stride[1], padding[0], padding[1]};
  lc_check_output_fits(g, op);
  return g;
}

// Weight gradient: grad_output (N, O, OH, OW), input (N, C, H, W), kernel size (KH, KW).
inline LCGeometry lc_grad_weight_geometry(const at::Tensor& grad_output, const at::Tensor& input,
                                          at::IntArrayRef kernel_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding) {
  const char* op = "locally_connected2d_grad_weight";
  lc_check_pairs(stride, padding, op);
  TORCH_CHECK(kernel_size.size() == 2 && kernel_size[0] > 0 && kernel_size[1] > 0, "bpdl.", op,
              ": kernel_size must be two positive integers, got ", kernel_size);
  TORCH_CHECK(input.dim() == 4, "bpdl.", op, ": input must be (N, C, H, W), got shape ",
              input.sizes());
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == input.size(0), "bpdl.", op,
              ": grad_output must be (N, O, H_out, W_out) with the input's batch size ",
              input.size(0), ", got shape ", grad_output.sizes());
  TORCH_CHECK(grad_output.device() == input.device(), "bpdl.", op, ": grad_output on ",
              grad_output.device(), " but input on ", input.device());
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "bpdl.", op, ": grad_output is ",
              grad_output.scalar_type(), " but input is ", input.scalar_type());
  lc_check_float(input, "input", op);
  LCGeometry g{input.size(0), input.size(1), input.size(2), input.size(3),
               grad_output.size(1), grad_output.size(2), grad_output.size(3), kernel_size[0],
               kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  TORCH_CHECK(g.OH > 0 && g.OW > 0, "bpdl.", op, ": grad_output has no locations: ",
              grad_output.sizes());
  lc_check_output_fits(g, op);
  return g;
}

}  // namespace bpdl
