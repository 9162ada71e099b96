// The op schemas of the fused HM-LSTM layer-step, declared once for every device.
//
// Kernels: cell_cpu.cpp (CPU: cell_fwd, cell_bwd), seq_cpu.cpp (CPU: seq_fwd, seq_bwd), cell_cuda.cu (CUDA:
// cell_fwd and cell_bwd), host_cache.cpp (cpu_cache_info, cpu_cache_clear: the CPU ops' buffer cache).
// Fake (shape-only) kernels and the autograd formula are registered in Python (hmlstm/ops/extension.py).
//
// The Triton backend adds Python ops to the same namespace (hmlstm::triton_*) as a torch.library
// FRAGMENT; a FRAGMENT coexists with this TORCH_LIBRARY whichever is loaded first (tests/test_cpp.py).

#include <Python.h>
#include <torch/library.h>

#include "host_cache.h"

TORCH_LIBRARY(hmlstm, m) {
  // One layer-step, the forward of hmlstm.reference.naive_cell_step. Returns h_t, c_t (B, H), z_t (B,)
  // ((0,) for a layer without boundary row) and `pre` (B, G): the bias-free pre-activations the backward
  // needs, when save is true ((0,) otherwise). boundary_mode: 0 step, 1 sample, 2 soft. dense_copy: the
  // caller wants gradients for z or z_below, so COPY rows also get their recurrent product U h in `pre`.
  // packed: [] or [W, U, V] (entries may be None), each weight's first 4H rows (the gates; the boundary
  // unit's row is a dot) reordered by mkldnn::_reorder_linear_weight, float32 only: the products then use
  // oneDNN's pre-packed weights (a caller packs once per sequence).
  m.def(
      "cell_fwd(Tensor x, Tensor z_below, Tensor h, Tensor c, Tensor z, Tensor h_above, Tensor W, Tensor U, "
      "Tensor V, Tensor b, Tensor? ln_gates, Tensor? ln_cell_w, Tensor? ln_cell_b, Tensor slope, "
      "Tensor? noise, int boundary_mode, bool recompute, bool save, bool dense_copy, Tensor?[] packed, "
      "bool poison) -> (Tensor, Tensor, Tensor, Tensor)");
  // Its backward: the gradient of the reference's dense formula (docs/spec.md, "The gradient").
  // Returns 15 tensors: the gradients of x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w,
  // ln_cell_b (output_mask selects which to compute; the others are (0,)), then, when return_ds is true,
  // ds (B, G): the gradient of the pre-activation s (zero on COPY rows), and ds_copy (B,): that of the
  // recomputed COPY boundary's pre-activation U[4H] h + b[4H] (zero under `hold`); (0,) otherwise.
  // With ds a caller can form the weight gradients itself, e.g. as one GEMM over many steps:
  //   dU = ds^T h (+ ds_copy^T h in row 4H),  dV = (z * ds)^T h_above,  dW = (z_below * ds)^T x.
  // packed: [] or the transposes [W^T, U^T, V^T] reordered as for cell_fwd (for ds @ W, ds @ U, ds @ V).
  m.def(
      "cell_bwd(Tensor grad_h, Tensor grad_c, Tensor grad_z, Tensor x, Tensor z_below, Tensor h, Tensor c, "
      "Tensor z, Tensor h_above, Tensor W, Tensor U, Tensor V, Tensor b, Tensor? ln_gates, "
      "Tensor? ln_cell_w, Tensor? ln_cell_b, Tensor slope, Tensor? noise, Tensor pre, int boundary_mode, "
      "bool recompute, bool dense_copy, bool[13] output_mask, bool return_ds, Tensor?[] packed, bool poison) "
      "-> Tensor[]");
  // cell_fwd over a whole sequence: L layers, T steps, bottom to top within a step (the loop of
  // hmlstm.sequence.stepwise_forward), writing into buffers allocated once. Not differentiable by itself:
  // hmlstm/ops/cpp_sequence.py wraps it in an autograd.Function whose backward is seq_bwd.
  // x: (T, B, I) time first; h0, c0: L x (B, H_l); z0: L-1 x (B,); W, U, V, b, ln_*: one per layer (the
  // top layer's V is (4H, 0)); noise: (T, L-1, B) for boundary_mode 1; packed: [] or [W, U, V] per layer
  // as for cell_fwd. Returns hs, cs: L x (T + 1, B, H_l) and zs: L-1 x (T + 1, B), whose slot 0 is the
  // initial state and slot t + 1 step t's output; pres: L x (T, B, G_l) when save, else L x (0,).
  m.def(
      "seq_fwd(Tensor x, Tensor[] h0, Tensor[] c0, Tensor[] z0, Tensor[] W, Tensor[] U, Tensor[] V, Tensor[] b, "
      "Tensor?[] ln_gates, Tensor?[] ln_cell_w, Tensor?[] ln_cell_b, Tensor slope, Tensor? noise, "
      "int boundary_mode, bool recompute, bool save, bool dense_copy, Tensor?[] packed, bool poison) "
      "-> (Tensor[], Tensor[], Tensor[], Tensor[])");
  // The gradient of seq_fwd(save=True): cell_bwd's per-step gradients in reverse time, and each weight
  // gradient as one GEMM per chunk of about chunk_rows rows of steps (dU = sum_t ds_t^T h_{t-1}, ...).
  // grad_h, grad_c: L x (T, B, H_l) or None; grad_z: L-1 x (T, B) or None (the outputs' gradients, time
  // first); grad_hT, grad_cT, grad_zT: the final state's. x, hs, cs, zs, pres: seq_fwd's x and outputs.
  // needs: 1 + (3L - 1) + 7L flags: x, then h0, c0, z0, then each layer's W, U, V, b, ln_gates, ln_cell_w,
  // ln_cell_b. packed: [] or [W^T, U^T, V^T] per layer, reordered as for cell_bwd. Returns dx (T, B, I),
  // dh0, dc0 (L), dz0 (L-1), then the 7L parameter gradients; (0,) where not needed; then L-1 x (T, B), the
  // whole gradient dL/dz_t^l reaching each boundary (for the training diagnostics). The initial state's
  // gradients are always computed.
  m.def(
      "seq_bwd(Tensor?[] grad_h, Tensor?[] grad_c, Tensor?[] grad_z, Tensor[] grad_hT, Tensor[] grad_cT, "
      "Tensor[] grad_zT, Tensor x, Tensor[] hs, Tensor[] cs, Tensor[] zs, Tensor[] pres, Tensor[] W, "
      "Tensor[] U, Tensor[] V, Tensor[] b, Tensor?[] ln_gates, Tensor?[] ln_cell_w, Tensor?[] ln_cell_b, "
      "Tensor slope, Tensor? noise, int boundary_mode, bool recompute, bool dense_copy, int[] needs, "
      "Tensor?[] packed, int chunk_rows, bool poison) -> Tensor[]");
  // The CPU sequence ops' buffer cache (host_cache.h): [bytes in free blocks, bytes in use, reuses, fresh
  // allocations, limit in bytes], and freeing the blocks not in use.
  m.def("cpu_cache_info() -> int[]", &hmlstm::cpu_cache_info);
  m.def("cpu_cache_clear() -> ()", &hmlstm::cpu_cache_clear);
}

// `import hmlstm._C` only has to load this library so that the registrations above run; the module
// itself is empty (no pybind11: the ops are reached through torch.ops.hmlstm).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // doc
      -1,  // per-interpreter state size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}
}
