// CPU kernels of the fused HM-LSTM layer-step, hmlstm::cell_fwd and hmlstm::cell_bwd (schemas in ops.cpp). The
// per-row kernels are in cell_rows.h; this file holds the GEMMs around them and the two ops. The sequence ops
// (seq_fwd, seq_bwd) are in seq_cpu.cpp and call forward_step / backward_step (cell_cpu.h).
//
// The math is hmlstm/reference.py's naive_cell_step; read its docstring first. Row b of a batch is
//
//   COPY    z_{t-1} == 0 and z_below == 0 exactly: h, c (and z under `hold`) are copied, no gate work;
//   active  otherwise: FLUSH (z_{t-1} = 1), UPDATE (z_{t-1} = 0, z_below = 1) or, in soft mode, a mix.
//
// Forward: one GEMM per term over the rows whose gate is non-zero (U h for the active rows, V h_above for
// z_{t-1} != 0, W x for z_below != 0), then one parallel pass over the rows for gates, LN, c, h and z.
// Backward: the dense straight-through gradient of the reference (docs/spec.md), which at a row also needs
// the branches not taken and the gated-off products. The branches come from the saved bias-free
// pre-activation `pre` (for COPY rows the forward adds U h to it only when a z gradient is wanted:
// `dense_copy`); the gated-off products enter the z gradient only as <ds, V h_above> = <V^T ds, h_above>,
// and V^T ds is a GEMM the backward does anyway for the rows where the gate is on, so we extend it to the
// active rows instead of materializing V h_above in the forward.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cell_common.h"
#include "cell_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#define HMLSTM_ROWS_NS base
#include "cell_rows.h"

namespace hmlstm {

// cell_rows_avx2.cpp: the row kernels built for AVX2 + FMA (avx2_rows_built() is false where the compiler
// could not build them; the entry points then must not be called).
bool avx2_rows_built();
void forward_rows_avx2(const Cell<float>& L, const Rows& rs, const float* preU, const std::vector<int64_t>& mapU,
                       const float* tV, const std::vector<int64_t>& mapV, const float* tW,
                       const std::vector<int64_t>& mapW, float* pre_out, float* h_out, float* c_out, float* z_out);
void forward_rows_avx2(const Cell<double>& L, const Rows& rs, const double* preU, const std::vector<int64_t>& mapU,
                       const double* tV, const std::vector<int64_t>& mapV, const double* tW,
                       const std::vector<int64_t>& mapW, double* pre_out, double* h_out, double* c_out,
                       double* z_out);
void backward_rows_avx2(const Cell<float>& L, const Rows& rs, bool zgrad, const BwdBuffers<float>& o);
void backward_rows_avx2(const Cell<double>& L, const Rows& rs, bool zgrad, const BwdBuffers<double>& o);

namespace {

// The row kernels (csrc/cell_rows.h): the AVX2 + FMA build where the CPU has both, else the baseline one.
// HMLSTM_CPU_ISA=base in the environment forces the baseline (tests run both).
bool use_avx2() {
  static const bool on = [] {
    const char* isa = std::getenv("HMLSTM_CPU_ISA");
    if (isa != nullptr && std::string(isa) == "base") return false;
#if defined(__x86_64__) && defined(__GNUC__)
    return avx2_rows_built() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return on;
}

template <typename T>
void forward_rows(const Cell<T>& L, const Rows& rs, const T* preU, const std::vector<int64_t>& mapU, const T* tV,
                  const std::vector<int64_t>& mapV, const T* tW, const std::vector<int64_t>& mapW, T* pre_out,
                  T* h_out, T* c_out, T* z_out) {
  if (use_avx2()) {
    forward_rows_avx2(L, rs, preU, mapU, tV, mapV, tW, mapW, pre_out, h_out, c_out, z_out);
  } else {
    base::forward_rows<T>(L, rs, preU, mapU, tV, mapV, tW, mapW, pre_out, h_out, c_out, z_out);
  }
}

template <typename T>
void backward_rows(const Cell<T>& L, const Rows& rs, bool zgrad, const BwdBuffers<T>& o) {
  if (use_avx2()) {
    backward_rows_avx2(L, rs, zgrad, o);
  } else {
    base::backward_rows<T>(L, rs, zgrad, o);
  }
}

using base::dot;

at::Tensor index_tensor(const std::vector<int64_t>& idx) {
  return at::from_blob(const_cast<int64_t*>(idx.data()), {static_cast<int64_t>(idx.size())}, at::kLong);
}

// Rows idx of a (B, K) matrix; a itself, no copy, when idx lists every row.
at::Tensor take_rows(const at::Tensor& a, const std::vector<int64_t>& idx) {
  if (static_cast<int64_t>(idx.size()) == a.size(0)) return a;
  return a.index_select(0, index_tensor(idx));
}

// A @ M^T for M (N, K). `packed`: M reordered once by mkldnn::_reorder_linear_weight (fp32 only), or
// undefined. Why: at the batch sizes of one step (M = 64 rows or fewer after the COPY gather), a plain
// GEMM re-packs the whole weight on every call, and with 8 weights per step in turn none stays in cache;
// oneDNN's pre-packed weights ran these products 1.1x (64 rows) to 1.6x (16 rows) faster on 2 cores.
at::Tensor rows_matmul(const at::Tensor& A, const at::Tensor& M, const std::optional<at::Tensor>& packed) {
  if (!packed.has_value() || A.scalar_type() != at::kFloat || A.size(0) == 0) return at::mm(A, M.t());
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  // Boxed: the unboxed C++ types of this internal op's schema (str, Scalar?[]) vary across torch releases.
  std::vector<c10::IValue> stack{A.contiguous(), *packed, c10::IValue(), c10::IValue(std::string("none")),
                                 c10::IValue(c10::List<std::optional<at::Scalar>>()), c10::IValue()};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A @ M[:n]^T. The forward's products stop at the 4H gate rows of a (4H + 1)-row weight: the boundary unit's
// row costs one dot per row in forward_rows instead. Why: oneDNN ran (64 x 512) @ (512 x 2049) 7% slower than
// N = 2048 (1.02 against 0.95 ms, 8 weights in turn on 2 cores; N = 2056 was as slow as 2049).
at::Tensor gate_products(const at::Tensor& A, const at::Tensor& M, int64_t n, const std::optional<at::Tensor>& packed) {
  TORCH_CHECK(!packed.has_value() || packed->size(0) == n, "hmlstm::cell_fwd: packed weights must hold the ", n,
              " gate rows of the weight, got ", packed->sizes());
  return rows_matmul(A, n == M.size(0) ? M : M.narrow(0, 0, n), packed);
}

// Entry k of the ops' `packed` list (see rows_matmul), or nothing.
std::optional<at::Tensor> packed_at(const std::vector<std::optional<at::Tensor>>& packed, size_t k) {
  if (k >= packed.size() || !packed[k].has_value()) return std::nullopt;
  TORCH_CHECK(packed[k]->is_mkldnn(), "hmlstm::cell: packed[", k,
              "] must come from mkldnn::_reorder_linear_weight, got layout ", packed[k]->layout());
  return packed[k];
}

}  // namespace

// ---------------------------------------------------------------------------------------------------
// Forward

// One layer-step into outputs the caller owns: h_out, c_out (B, H), z_out (B,) (layers with a boundary) and,
// when save, pre (B, G); all contiguous. packed[off + 0..2]: W, U, V (see rows_matmul).
void forward_step(const Inputs& in, int64_t boundary_mode, bool recompute, const at::Tensor& slope, bool save,
                  bool dense_copy, const std::vector<std::optional<at::Tensor>>& packed, size_t off,
                  const at::Tensor& h_out, const at::Tensor& c_out, const at::Tensor& z_out, const at::Tensor& pre) {
  const int64_t B = in.B, H = in.H;
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "hmlstm_cell_fwd_cpu", [&] {
    using T = scalar_t;
    const Cell<T> L = in.view<T>(boundary_mode, recompute, slope);
    const Rows rs = classify(L.zb, L.zu, B);
    // U h: the active rows, and with dense_copy every row (one GEMM without a gather).
    std::vector<int64_t> all_rows;
    const bool u_all = save && dense_copy;
    if (u_all) {
      all_rows.resize(B);
      for (int64_t r = 0; r < B; ++r) all_rows[r] = r;
    }
    const std::vector<int64_t>& u_rows = u_all ? all_rows : rs.active;
    at::Tensor preU, tV, tW;
    const int64_t H4 = 4 * H;
    if (!u_rows.empty()) preU = gate_products(take_rows(in.h, u_rows), in.U, H4, packed_at(packed, off + 1));
    if (!rs.td.empty() && in.Ha > 0)
      tV = gate_products(take_rows(in.ha, rs.td), in.V, H4, packed_at(packed, off + 2));
    if (!rs.bu.empty() && in.I > 0) tW = gate_products(take_rows(in.x, rs.bu), in.W, H4, packed_at(packed, off));
    const std::vector<int64_t> none(B, -1);
    forward_rows<T>(L, rs, preU.defined() ? preU.data_ptr<T>() : nullptr, position_map(u_rows, B),
                    tV.defined() ? tV.data_ptr<T>() : nullptr, tV.defined() ? position_map(rs.td, B) : none,
                    tW.defined() ? tW.data_ptr<T>() : nullptr, tW.defined() ? position_map(rs.bu, B) : none,
                    save ? pre.data_ptr<T>() : nullptr, h_out.data_ptr<T>(), c_out.data_ptr<T>(),
                    in.has_z ? z_out.data_ptr<T>() : nullptr);
  });
}

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_fwd_cpu(
    const at::Tensor& x, const at::Tensor& z_below, const at::Tensor& h, const at::Tensor& c, const at::Tensor& z,
    const at::Tensor& h_above, const at::Tensor& W, const at::Tensor& U, const at::Tensor& V, const at::Tensor& b,
    const std::optional<at::Tensor>& ln_gates, const std::optional<at::Tensor>& ln_cell_w,
    const std::optional<at::Tensor>& ln_cell_b, const at::Tensor& slope, const std::optional<at::Tensor>& noise,
    int64_t boundary_mode, bool recompute, bool save, bool dense_copy,
    const std::vector<std::optional<at::Tensor>>& packed, bool poison) {
  const Inputs in(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, noise, boundary_mode);
  const auto opts = in.x.options();
  const int64_t B = in.B, H = in.H, G = in.G;
  at::Tensor h_out = new_output({B, H}, opts, poison);
  at::Tensor c_out = new_output({B, H}, opts, poison);
  at::Tensor z_out = new_output({in.has_z ? B : 0}, opts, poison);
  at::Tensor pre = new_output({save ? B : 0, G}, opts, poison);
  if (!save) pre = pre.view({0});
  forward_step(in, boundary_mode, recompute, slope, save, dense_copy, packed, 0, h_out, c_out, z_out, pre);
  return {h_out, c_out, z_out, pre};
}

// ---------------------------------------------------------------------------------------------------
// Backward

// rows[k] of dst (B, K) += (or =) src row k; a scatter over few rows, cheaper than index_add_ (scatter_add).
template <typename T>
void scatter_rows(at::Tensor& dst, const at::Tensor& src, const std::vector<int64_t>& rows, bool add,
                  const T* scale = nullptr) {
  const int64_t K = dst.size(1);
  T* d = dst.data_ptr<T>();
  const at::Tensor s_c = src.contiguous();
  const T* s = s_c.data_ptr<T>();
  at::parallel_for(0, static_cast<int64_t>(rows.size()), 8, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      T* dr = d + rows[k] * K;
      const T* sr = s + k * K;
      const T a = scale != nullptr ? scale[rows[k]] : T(1);
      if (add) {
        for (int64_t j = 0; j < K; ++j) dr[j] += a * sr[j];
      } else {
        for (int64_t j = 0; j < K; ++j) dr[j] = a * sr[j];
      }
    }
  });
}

// Zeros in the rows of dst (B, K) that are not in `kept` (rows a scatter then writes): cheaper than zeroing all.
template <typename T>
void zero_rows_except(at::Tensor& dst, const std::vector<int64_t>& kept) {
  const int64_t B = dst.size(0), K = dst.size(1);
  std::vector<char> on(B, 0);
  for (int64_t r : kept) on[r] = 1;
  T* d = dst.data_ptr<T>();
  for (int64_t r = 0; r < B; ++r) {
    if (!on[r]) std::fill(d + r * K, d + (r + 1) * K, T(0));
  }
}

// One gated term  gate * (inp @ M^T): the gradients of inp, M and the gate from ds.
// `on`: rows whose gate is non-zero. The gate's gradient <ds, M inp> = <M^T ds, inp> is needed on every
// active row, the input's only where the gate is on; M^T ds is computed for exactly the rows needed.
template <typename T>
void gated_term_backward(const at::Tensor& ds, const Rows& rs, const std::vector<int64_t>& on,
                         const at::Tensor& gate, const at::Tensor& inp, const at::Tensor& M,
                         const std::optional<at::Tensor>& packed_t, bool need_inp, bool need_gate, bool need_M,
                         at::Tensor& d_inp, at::Tensor& d_gate, at::Tensor& dM, bool poison) {
  const int64_t B = inp.size(0), K = inp.size(1);
  const bool any = K > 0 && !rs.active.empty();
  // Only the rows that the scatter below does not write (those outside the active or the `on` rows) are zeroed.
  if (need_inp) {
    d_inp = new_output({B, K}, inp.options(), poison);
    zero_rows_except<T>(d_inp, any ? (need_gate ? rs.active : on) : std::vector<int64_t>{});
  }
  if (need_M && (!any || on.empty())) dM = at::zeros_like(M);
  if (!any) return;
  std::vector<int64_t> on_pos;  // positions of the `on` rows in ds (all of them are active)
  on_pos.reserve(on.size());
  for (int64_t r : on) on_pos.push_back(rs.pos[r]);
  const T* gp = gate.data_ptr<T>();
  if (need_M && !on.empty()) {
    const at::Tensor inp_on = take_rows(inp, on) * take_rows(gate.unsqueeze(1), on);
    dM = at::mm(take_rows(ds, on_pos).t(), inp_on);
  }
  if (need_gate) {
    const at::Tensor t = rows_matmul(ds, M.t(), packed_t);  // ds @ M: (n_active, K)
    const T* tp = t.data_ptr<T>();
    const T* xp = inp.data_ptr<T>();
    T* dg = d_gate.data_ptr<T>();
    for (size_t k = 0; k < rs.active.size(); ++k) {
      const int64_t r = rs.active[k];
      dg[r] += dot(tp + k * K, xp + r * K, K);
    }
    if (need_inp) scatter_rows<T>(d_inp, t, rs.active, false, gp);
  } else if (need_inp && !on.empty()) {
    scatter_rows<T>(d_inp, rows_matmul(take_rows(ds, on_pos), M.t(), packed_t), on, false, gp);
  }
}

}  // namespace

// cell_bwd on checked inputs. With ds_into (a (B, G) buffer) and return_ds, ds is written there (zero on COPY
// rows) rather than into a new tensor. packed[off + 0..2]: the transposes of W, U, V (see rows_matmul).
std::vector<at::Tensor> backward_step(const Inputs& in, const at::Tensor& grad_h, const at::Tensor& grad_c,
                                      const at::Tensor& grad_z, const at::Tensor& slope, const at::Tensor& pre_,
                                      int64_t boundary_mode, bool recompute, bool dense_copy,
                                      const std::array<bool, 13>& mask, bool return_ds,
                                      const std::vector<std::optional<at::Tensor>>& packed, size_t off, bool poison,
                                      const at::Tensor* ds_into) {
  const auto opts = in.x.options();
  const int64_t B = in.B, G = in.G;
  const bool zgrad = mask[kZ] || mask[kZBelow];
  BwdIO io(in, grad_h, grad_c, grad_z, pre_, zgrad, poison);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "hmlstm_cell_bwd_cpu", [&] {
    using T = scalar_t;
    const Cell<T> L = in.view<T>(boundary_mode, recompute, slope);
    const Rows rs = classify(L.zb, L.zu, B);
    TORCH_CHECK(!zgrad || dense_copy || static_cast<int64_t>(rs.active.size()) == B,
                "hmlstm::cell_bwd: gradients for z or z_below need cell_fwd(dense_copy=True)");
    const int64_t nA = static_cast<int64_t>(rs.active.size());
    io.alloc_active(in, nA, poison, return_ds ? ds_into : nullptr);
    const at::Tensor& ds = io.ds;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    BwdBuffers<T> bufs{io.pre.data_ptr<T>(), io.gh.data_ptr<T>(), io.gc.data_ptr<T>(),
                       in.has_z ? io.gz.data_ptr<T>() : nullptr, ptr(ds), io.dh.data_ptr<T>(), io.dc.data_ptr<T>(),
                       ptr(io.dzb), ptr(io.dzu), io.ds_copy.data_ptr<T>(), ptr(io.da), ptr(io.dgain), ptr(io.dlcw),
                       ptr(io.dlcb)};
    backward_rows<T>(L, rs, zgrad, bufs);
    if (return_ds) {
      if (nA == B) {  // every row active: `ds` is already in row order (and in ds_into when given)
        io.ds_full = ds;
      } else {
        if (ds_into != nullptr) {
          io.ds_full = *ds_into;
          zero_rows_except<T>(io.ds_full, rs.active);
        } else {
          io.ds_full = at::zeros({B, G}, opts);
        }
        if (nA > 0) scatter_rows<T>(io.ds_full, ds, rs.active, false);
      }
    }

    // The recurrent term U h, never gated: a GEMM over the active rows.
    if (nA > 0 && mask[kH]) {
      const auto packed_u = packed_at(packed, off + 1);
      if (nA == B && !packed_u.has_value()) {
        io.dh.addmm_(ds, in.U);
      } else {
        scatter_rows<T>(io.dh, rows_matmul(ds, in.U.t(), packed_u), rs.active, true);
      }
    }
    io.param_grads(in, mask, recompute, [&] { return take_rows(in.h, rs.active); });
    gated_term_backward<T>(ds, rs, rs.td, in.zb, in.ha, in.V, packed_at(packed, off + 2), mask[kHAbove], mask[kZ],
                           mask[kV], io.out[kHAbove], io.dzb, io.out[kV], poison);
    gated_term_backward<T>(ds, rs, rs.bu, in.zu, in.x, in.W, packed_at(packed, off), mask[kX], mask[kZBelow],
                           mask[kW], io.out[kX], io.dzu, io.out[kW], poison);
  });
  return io.finish(in, mask, return_ds);
}

namespace {

std::vector<at::Tensor> cell_bwd_cpu(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& grad_z, const at::Tensor& x,
    const at::Tensor& z_below, const at::Tensor& h, const at::Tensor& c, const at::Tensor& z,
    const at::Tensor& h_above, const at::Tensor& W, const at::Tensor& U, const at::Tensor& V, const at::Tensor& b,
    const std::optional<at::Tensor>& ln_gates, const std::optional<at::Tensor>& ln_cell_w,
    const std::optional<at::Tensor>& ln_cell_b, const at::Tensor& slope, const std::optional<at::Tensor>& noise,
    const at::Tensor& pre, int64_t boundary_mode, bool recompute, bool dense_copy,
    std::array<bool, 13> mask, bool return_ds, const std::vector<std::optional<at::Tensor>>& packed, bool poison) {
  const Inputs in(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, noise, boundary_mode);
  return backward_step(in, grad_h, grad_c, grad_z, slope, pre, boundary_mode, recompute, dense_copy, mask, return_ds,
                       packed, 0, poison, nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(hmlstm, CPU, m) {
  m.impl("cell_fwd", &cell_fwd_cpu);
  m.impl("cell_bwd", &cell_bwd_cpu);
}

// A call with oneDNN-packed weights in `packed` dispatches on the MkldnnCPU key: the same kernels.
TORCH_LIBRARY_IMPL(hmlstm, MkldnnCPU, m) {
  m.impl("cell_fwd", &cell_fwd_cpu);
  m.impl("cell_bwd", &cell_bwd_cpu);
}

}  // namespace hmlstm
