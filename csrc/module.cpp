// The bpdl._C Python module: build information only. Tensor operators live in torch.ops.bpdl and
// are registered by the static initialisers of csrc/ops.cpp and the backend files when this
// shared library is loaded.
#include <pybind11/pybind11.h>

#include <string>

#include "bpdl/cpu_isa.h"

#ifndef BPDL_WITH_CUDA
#define BPDL_WITH_CUDA 0
#endif
#ifndef BPDL_WITH_OPENMP
#define BPDL_WITH_OPENMP 0
#endif

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "bpdl native extension: build information (operators are in torch.ops.bpdl)";
  m.def("torch_version", [] { return std::string(BPDL_TORCH_VERSION); },
        "Version of torch this extension was compiled against.");
  m.def("torch_cuda_version", [] { return std::string(BPDL_TORCH_CUDA_VERSION); },
        "CUDA version of that torch build ('none' for a CPU build).");
  m.def("with_cuda", [] { return static_cast<bool>(BPDL_WITH_CUDA); },
        "Whether CUDA kernels were compiled into this extension.");
  m.def("cuda_kernels", [] { return std::string(BPDL_CUDA_KERNELS); },
        "Comma-separated CUDA kernel files compiled in.");
  m.def("cuda_architectures", [] { return std::string(BPDL_CUDA_ARCHS); },
        "CUDA architectures the kernels were compiled for.");
  m.def("with_openmp", [] { return static_cast<bool>(BPDL_WITH_OPENMP); },
        "Whether CPU kernels were compiled with OpenMP (at::parallel_for runs in parallel).");
  m.def("cpu_isa", [] {
    if (bpdl::cpu_has_avx512()) return std::string("avx512");
    if (bpdl::cpu_has_avx2_fma()) return std::string("avx2");
    return std::string("base");
  }, "Instruction set the vectorised CPU kernels use on this CPU (BPDL_CPU_ISA caps it).");
  m.def("compiler", [] {
#if defined(__clang__)
    return std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    return std::string("gcc ") + __VERSION__;
#else
    return std::string("unknown");
#endif
  });
}
