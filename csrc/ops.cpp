// The op schemas of the fused HM-LSTM layer-step, declared once for every device.
//
// Kernels: cell_cpu.cpp (CPU). A CUDA kernel would add a .cu with TORCH_LIBRARY_IMPL(hmlstm, CUDA, m).
// Fake (shape-only) kernels and the autograd formula are registered in Python (hmlstm/ops/cpp.py).
//
// The Triton backend adds Python ops to the same namespace (hmlstm::triton_*) as a torch.library
// FRAGMENT; a FRAGMENT coexists with this TORCH_LIBRARY whichever is loaded first (tests/test_cpp.py).

#include <Python.h>
#include <torch/library.h>

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
  // Its backward: the gradient of the reference's dense formula (PAPER.md, "the reference gradient").
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
