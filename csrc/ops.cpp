// Every bpdl operator schema, declared once. Backends register kernels in csrc/cpu and csrc/cuda;
// python/bpdl/ops.py holds the typed wrappers, fake (meta) functions and autograd registrations.
#include <torch/library.h>

TORCH_LIBRARY(bpdl, m) {
  // ---- spike generation -----------------------------------------------------------------------
  // counts[i] ~ Poisson(rate[i] * dt), drawn from Philox4x32-10 keyed by
  // (seed, step, stream, i) where i is the row-major element index.
  m.def("poisson_spikes(Tensor rate, int seed, int step, int stream=0, float dt=1.0) -> Tensor");
}
