// Every bpdl operator schema, declared once. Backends register kernels in csrc/cpu and csrc/cuda;
// python/bpdl/ops/ holds the typed wrappers, fake (meta) functions and autograd registrations.
#include <torch/library.h>

TORCH_LIBRARY(bpdl, m) {
  // ---- spike generation -----------------------------------------------------------------------
  // counts[i] ~ Poisson(rate[i] * dt), drawn from Philox4x32-10 keyed by
  // (seed, step, stream, i) where i is the row-major element index.
  m.def("poisson_spikes(Tensor rate, int seed, int step, int stream=0, float dt=1.0) -> Tensor");

  // ---- segregated dendrites (Guerguiev, Lillicrap & Richards 2017) ----------------------------
  // python/bpdl/functional/segregated.py is the reference; python/bpdl/ops/segregated.py documents the math.
  // Spike counts use Philox blocks keyed by (seed, lane_key 2^22 + neuron / 4, step,
  // 0x5E600000 + population); params/flags follow the layouts of csrc/include/bpdl/segregated.h.
  m.def("segregated_layer_step(Tensor W, Tensor b, Tensor? Y, Tensor? c, Tensor ff, Tensor? fb, "
        "Tensor kappa, Tensor? teach, Tensor(a!) C, Tensor(b!) lam, Tensor(c!) A, Tensor(d!) ring, "
        "Tensor(e!) sums, Tensor(f!) psp_sum, Tensor(g!) fb_sum, Tensor step, Tensor lane_key, "
        "Tensor accumulate, int seed, int pop, float[] params, int[] flags) -> Tensor");
  m.def("segregated_sparse_basal(Tensor W_t, Tensor b, Tensor ring, Tensor step, Tensor kappa) "
        "-> Tensor");
  m.def("segregated_plasticity(int kind, Tensor C_f, Tensor P_f, Tensor a, Tensor? b, Tensor? A_f, "
        "Tensor? Q_f, float lambda_max, float gain, float scale, float fb_gain, float fb_scale) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("segregated_train_example(Tensor[] W, Tensor[] b, Tensor[] Y, Tensor[] c, Tensor x_rate, "
        "Tensor target, Tensor kappa, Tensor(a!) in_ring, Tensor(b!)[] rings, Tensor(c!)[] C, "
        "Tensor(d!)[] lam, Tensor(e!)[] A, Tensor(f!) step, Tensor lane_key, Tensor lengths, "
        "Tensor windows, Tensor[] offsets, int seed, float[] params, int[] flags, "
        "int[] need_train, int[] need_test) -> Tensor[]");
  // Online (batch-1) training of consecutive examples in one lane: each example's forward and
  // target phase, then (for all but the last) its plasticity and a plain SGD step on W, b (and
  // learned Y, c; symmetric Y recomputed), in place. Returns the last example's phase averages
  // (as segregated_train_example, one lane) and the output layer's lam_t and C_f of every example.
  m.def("segregated_train_online(Tensor(a!)[] W, Tensor(b!)[] b, Tensor(c!)[] Y, Tensor(d!)[] c, "
        "Tensor[] masks, Tensor x_rate, Tensor target, Tensor kappa, Tensor(e!) in_ring, "
        "Tensor(f!)[] rings, Tensor(g!)[] C, Tensor(h!)[] lam, Tensor(i!)[] A, Tensor(j!) step, "
        "Tensor lane_key, Tensor lengths, Tensor windows, Tensor[] offsets, int seed, "
        "float[] params, int[] flags, int[] need_train, int[] need_test, int[] kinds, "
        "float[] lrs, float[] scales, float[] gains, float[] fb_lrs, float fb_gain, "
        "float fb_scale, bool symmetric, float sparse_gain) -> Tensor[]");
  m.def("segregated_test(Tensor[] W, Tensor[] b, Tensor[] Y, Tensor[] c, Tensor x_rate, "
        "Tensor kappa, Tensor lane_key, int seed, int steps, int window, float[] params, "
        "int[] flags, int[] need_test) -> Tensor");

  // ---- dendritic cortical microcircuits (Sacramento et al. 2018; docs/algorithms/microcircuits.md) --
  // python/bpdl/functional/microcircuit.py (full_run) is the reference; python/bpdl/ops/microcircuit.py
  // documents the math. `steps` Euler-Maruyama steps of every lane (rows of the state) with the
  // continuous, low-pass filtered plasticity of the shared weights, in place. Flat layouts
  // (csrc/include/bpdl/microcircuit.h): weights, traces and etas W_1..W_N, b_1..b_N, W_td, W_pi,
  // W_ip, b_ip (per hidden layer); a trace with no elements marks a fixed matrix; state u_1..u_N,
  // u_I_1..u_I_{N-1}, r0; constants g_lk, g_B, g_A, g_D, g_som, g_som_I, dt, tau_w, tau_in, sigma,
  // gamma, beta, theta; transfer 0 logistic, 1 soft_relu. Noise: Philox blocks keyed by seed and
  // counted by (neuron pair, example, step, 0x3C100000 + population). apply_last = false leaves
  // the last step's weight change to the caller (its trace is updated).
  m.def("microcircuit_run(Tensor(a!)[] weights, Tensor(b!)[] traces, Tensor(c!)[] state, "
        "Tensor x, Tensor? u_trgt, Tensor example, float[] etas, int step0, int steps, int seed, "
        "float[] constants, int transfer, bool apply_last) -> ()");

  // ---- locally connected layers (unshared convolution; docs/algorithms/baselines.md §2.3) ----------------------
  // y[n,o,i,j] = sum_{c,u,v} W[i,j,o,c,u,v] x[n,c,s0*i+u-p0,s1*j+v-p1]; weight (OH,OW,O,C,KH,KW),
  // padding (top, left), output size read from the weight, zeros outside the input.
  m.def("locally_connected2d(Tensor input, Tensor weight, int[2] stride, int[2] padding) -> Tensor");
  // dL/dx of the above (the transposed LC map; with a feedback tensor in place of W, the
  // feedback-alignment signal). input_size is (H, W).
  m.def("locally_connected2d_grad_input(Tensor grad_output, Tensor weight, int[2] input_size, "
        "int[2] stride, int[2] padding) -> Tensor");
  // dL/dW of the above, shaped like the weight.
  m.def("locally_connected2d_grad_weight(Tensor grad_output, Tensor input, int[2] kernel_size, "
        "int[2] stride, int[2] padding) -> Tensor");

  // ---- direct feedback alignment with regenerated feedback (docs/algorithms/feedback_alignment.md §3.3) ------------------
  // out = error @ D with D[k, j] = scale * (2 u - 1), u = Philox uniform keyed by seed and
  // counted by (element k * num_features + j, step 0, stream): D is never stored.
  m.def("dfa_project(Tensor error, int num_features, int seed, int stream, float scale) -> Tensor");

  // ---- sign-symmetric feedback (docs/algorithms/feedback_alignment.md §3.4) ----------------------------------------------
  // B = sign(W) * M with M a 0-dim tensor (uSF) or shaped like W (frSF); sign(0) = 0.
  m.def("sign_feedback(Tensor weight, Tensor magnitude) -> Tensor");
  // brSF: B = sign(W) * |R|, |R| drawn per element from Philox keyed by seed and counted by
  // (element // 4, step, stream): scale * u (distribution 0, uniform) or half-normal (1).
  m.def("sign_random_feedback(Tensor weight, int seed, int stream, int step, int distribution, "
        "float scale) -> Tensor");
}
