// CPU kernels of the fused HM-LSTM layer-step, hmlstm::cell_fwd and hmlstm::cell_bwd, and of the same step over
// a whole sequence, hmlstm::seq_fwd and hmlstm::seq_bwd (schemas in ops.cpp). The per-row kernels are in
// cell_rows.h; this file holds the GEMMs, the time loops and the ops.
//
// The math is hmlstm/reference.py's naive_cell_step; read its docstring first. Row b of a batch is
//
//   COPY    z_{t-1} == 0 and z_below == 0 exactly: h, c (and z under `hold`) are copied, no gate work;
//   active  otherwise: FLUSH (z_{t-1} = 1), UPDATE (z_{t-1} = 0, z_below = 1) or, in soft mode, a mix.
//
// Forward: one GEMM per term over the rows whose gate is non-zero (U h for the active rows, V h_above for
// z_{t-1} != 0, W x for z_below != 0), then one parallel pass over the rows for gates, LN, c, h and z.
// Backward: the dense straight-through gradient of the reference (PAPER.md), which at a row also needs
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
#include "host_cache.h"

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

using TensorVec = std::vector<at::Tensor>;
using OptTensorVec = std::vector<std::optional<at::Tensor>>;

// The inputs of layer-step (l, t) in seq_fwd's buffers (slot 0 the initial state, slot t + 1 step t), for both
// sequence ops. noise: (T, L-1, B) or nothing.
struct SeqSteps {
  const at::Tensor& x;
  const TensorVec &hs, &cs, &zs, &W, &U, &V, &b;
  const OptTensorVec &ln_gates, &ln_cell_w, &ln_cell_b;
  const std::optional<at::Tensor>& noise;
  int64_t mode;
  at::Tensor ones, zeros, no_above;

  SeqSteps(const at::Tensor& x_, const TensorVec& hs_, const TensorVec& cs_, const TensorVec& zs_,
           const TensorVec& W_, const TensorVec& U_, const TensorVec& V_, const TensorVec& b_,
           const OptTensorVec& lng, const OptTensorVec& lcw, const OptTensorVec& lcb,
           const std::optional<at::Tensor>& noise_, int64_t mode_)
      : x(x_), hs(hs_), cs(cs_), zs(zs_), W(W_), U(U_), V(V_), b(b_), ln_gates(lng), ln_cell_w(lcw),
        ln_cell_b(lcb), noise(noise_), mode(mode_), ones(at::ones({x_.size(1)}, x_.options())),
        zeros(at::zeros({x_.size(1)}, x_.options())), no_above(at::empty({x_.size(1), 0}, x_.options())) {
    const int64_t T = x.size(0), B = x.size(1), L = static_cast<int64_t>(hs.size());
    if (mode == kSample && L > 1) {
      TORCH_CHECK(noise.has_value() && noise->dim() == 3 && noise->size(0) == T && noise->size(1) == L - 1 &&
                      noise->size(2) == B,
                  "hmlstm::seq_fwd/seq_bwd: boundary_mode 1 (sample) needs noise of shape (T, L - 1, B) = (", T, ", ",
                  L - 1, ", ", B, "), got ", noise.has_value() ? noise->sizes() : at::IntArrayRef{});
    }
  }

  Inputs at(size_t l, int64_t t) const {
    const bool top = l + 1 == hs.size();
    std::optional<at::Tensor> n;
    if (mode == kSample && !top) n = noise->select(0, t).select(0, l);
    return Inputs(l == 0 ? x.select(0, t) : hs[l - 1].select(0, t + 1), l == 0 ? ones : zs[l - 1].select(0, t + 1),
                  hs[l].select(0, t), cs[l].select(0, t), top ? zeros : zs[l].select(0, t),
                  top ? no_above : hs[l + 1].select(0, t), W[l], U[l], V[l], b[l], ln_gates[l], ln_cell_w[l],
                  ln_cell_b[l], n, mode);
  }
};

// A large per-call buffer of the sequence ops, from the cache (host_cache.h), NaN-filled when poisoning.
at::Tensor new_buffer(at::IntArrayRef shape, const at::TensorOptions& opts, bool poison) {
  at::Tensor t = cached_empty(shape, opts);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// L layers over T steps (hmlstm.sequence.stepwise_forward's loop) into (T, B, .) buffers allocated once.
// Why: with the loop in Python, the per-step outputs were stacked afterwards (a copy of every h, c and z)
// and each of the T * L steps paid the interpreter and a fresh allocation per output.
std::tuple<TensorVec, TensorVec, TensorVec, TensorVec> seq_fwd_cpu(
    const at::Tensor& x, const TensorVec& h0, const TensorVec& c0, const TensorVec& z0, const TensorVec& W,
    const TensorVec& U, const TensorVec& V, const TensorVec& b, const OptTensorVec& ln_gates,
    const OptTensorVec& ln_cell_w, const OptTensorVec& ln_cell_b, const at::Tensor& slope,
    const std::optional<at::Tensor>& noise, int64_t boundary_mode, bool recompute, bool save, bool dense_copy,
    const OptTensorVec& packed, bool poison) {
  const size_t L = h0.size();
  TORCH_CHECK(L >= 1, "hmlstm::seq_fwd: h0 must hold one (B, H) tensor per layer, got an empty list");
  TORCH_CHECK(c0.size() == L && W.size() == L && U.size() == L && V.size() == L && b.size() == L &&
                  ln_gates.size() == L && ln_cell_w.size() == L && ln_cell_b.size() == L,
              "hmlstm::seq_fwd: c0, W, U, V, b, ln_gates, ln_cell_w and ln_cell_b must have one entry per layer (",
              L, " from h0), got ", c0.size(), ", ", W.size(), ", ", U.size(), ", ", V.size(), ", ", b.size(), ", ",
              ln_gates.size(), ", ", ln_cell_w.size(), ", ", ln_cell_b.size());
  TORCH_CHECK(z0.size() == L - 1, "hmlstm::seq_fwd: z0 must have L - 1 = ", L - 1, " entries, got ", z0.size());
  TORCH_CHECK(packed.empty() || packed.size() == 3 * L, "hmlstm::seq_fwd: packed must be [] or 3 per layer ([W, U, V]",
              " of each), i.e. ", 3 * L, " entries, got ", packed.size());
  TORCH_CHECK(x.dim() == 3, "hmlstm::seq_fwd: x must be (T, B, I) (time first), got ", x.sizes());
  const int64_t T = x.size(0), B = x.size(1);
  const auto opts = x.options();
  // Slot 0 of hs, cs, zs holds the initial state, slot t + 1 step t: h_{t-1} is hs[t] for every t, and a span
  // of steps' inputs is one view (the backward's weight-gradient GEMMs read them so).
  TensorVec hs(L), cs(L), zs(L - 1), pres(L);
  for (size_t l = 0; l < L; ++l) {
    checked(h0[l], "h0", 2, x);
    checked(c0[l], "c0", 2, x);
    TORCH_CHECK(h0[l].size(0) == B && c0[l].sizes() == h0[l].sizes(), "hmlstm::seq_fwd: h0[", l,
                "] and c0[", l, "] must be (B, H) with B = ", B, " (from x), got ", h0[l].sizes(), " and ", c0[l].sizes());
    const int64_t H = h0[l].size(1);
    hs[l] = new_buffer({T + 1, B, H}, opts, poison);
    cs[l] = new_buffer({T + 1, B, H}, opts, poison);
    hs[l].select(0, 0).copy_(h0[l]);
    cs[l].select(0, 0).copy_(c0[l]);
    if (l + 1 < L) {
      checked(z0[l], "z0", 1, x);
      TORCH_CHECK(z0[l].size(0) == B, "hmlstm::seq_fwd: z0[", l, "] must be (B,) with B = ", B,
                  ", got ", z0[l].sizes());
      zs[l] = new_buffer({T + 1, B}, opts, poison);
      zs[l].select(0, 0).copy_(z0[l]);
    }
    pres[l] = save ? new_buffer({T, B, U[l].size(0)}, opts, poison) : at::empty({0}, opts);
  }
  const SeqSteps steps(x, hs, cs, zs, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, noise, boundary_mode);
  const at::Tensor empty = at::empty({0}, opts);
  for (int64_t t = 0; t < T; ++t) {
    for (size_t l = 0; l < L; ++l) {
      const at::Tensor z_t = l + 1 == L ? empty : zs[l].select(0, t + 1);
      forward_step(steps.at(l, t), boundary_mode, recompute, slope, save, dense_copy, packed, 3 * l,
                   hs[l].select(0, t + 1), cs[l].select(0, t + 1), z_t, save ? pres[l].select(0, t) : empty);
    }
  }
  return {hs, cs, zs, pres};
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

// acc += (gate * ds)^T inp over the rows where `on`: one GEMM on the gathered rows (all rows: no gather).
// gate: nullptr for an ungated term.
void gated_outer(at::Tensor& acc, const at::Tensor& ds, const at::Tensor& inp, const at::Tensor& on,
                 const at::Tensor* gate) {
  const int64_t n_on = on.sum().item<int64_t>();
  if (n_on == 0) return;
  at::Tensor d = ds, a = inp, g;
  if (gate != nullptr) g = *gate;
  if (n_on < on.numel()) {
    const at::Tensor idx = on.nonzero().squeeze(1);
    d = ds.index_select(0, idx);
    a = inp.index_select(0, idx);
    if (gate != nullptr) g = g.index_select(0, idx);
  }
  if (gate != nullptr && !g.eq(1).all().item<bool>()) a = a * g.unsqueeze(1);  // soft boundaries
  acc.addmm_(d.t(), a);
}

// One layer's dW, dU, dV, accumulated over the backward's steps: each step's ds goes into a chunk buffer,
// and each chunk of steps is one GEMM per weight over views of the forward's buffers (PAPER.md's dense
// straight-through gradient, as hmlstm.reference):
//   dU += ds^T h_{t-1} (active rows), dV += (z_{t-1} ds)^T h_{t-1}^{l+1}, dW += (z_below ds)^T h_t^{l-1}.
struct WeightGrads {
  at::Tensor dW, dU, dV, buf, buf_copy;  // buf (S, B, G), buf_copy (S, B): steps t_low + n - 1 .. t_low
  int64_t n = 0, t_low = 0;
  bool recompute_row = false;

  WeightGrads(const at::Tensor& W, const at::Tensor& U, const at::Tensor& V, int64_t steps, int64_t B, bool rr)
      : dW(cached_empty(W.sizes(), W.options()).zero_()), dU(cached_empty(U.sizes(), U.options()).zero_()),
        dV(cached_empty(V.sizes(), V.options()).zero_()), buf(cached_empty({steps, B, U.size(0)}, U.options())),
        buf_copy(cached_empty({steps, B}, U.options())),
        recompute_row(rr) {}

  // The next slot (filled from the end, so that the buffer ends up in increasing t) for step t.
  at::Tensor slot(int64_t t) {
    t_low = t;
    return buf.select(0, buf.size(0) - 1 - n);
  }
  at::Tensor slot_copy() { return buf_copy.select(0, buf.size(0) - 1 - n); }
  bool full() const { return n == buf.size(0); }

  // below, z_below: layer l-1's (or x's) steps t0..t1-1; h, z, h_above: slots t0..t1-1 (the steps' inputs).
  void flush(const at::Tensor& below, const at::Tensor& z_below, const at::Tensor& h, const at::Tensor& z,
             const at::Tensor& h_above) {
    if (n == 0) return;
    const int64_t first = buf.size(0) - n;
    const at::Tensor ds = buf.narrow(0, first, n).flatten(0, 1);
    gated_outer(dU, ds, h, z.ne(0).logical_or(z_below.ne(0)), nullptr);
    if (dV.size(1) > 0) gated_outer(dV, ds, h_above, z.ne(0), &z);
    if (dW.size(1) > 0) gated_outer(dW, ds, below, z_below.ne(0), &z_below);
    if (recompute_row) dU.select(0, dU.size(0) - 1).addmv_(h.t(), buf_copy.narrow(0, first, n).flatten());
    n = 0;
  }
};

// The backward of seq_fwd (the loop of hmlstm/ops/cpp_sequence.py's FusedSequence.backward), in reverse time.
// Why in C++: the Python loop cost about 50 ms of a 1.6 s PTB-size training step in interpreter and
// per-step allocations. Arguments and outputs: see the schema in ops.cpp.
std::vector<at::Tensor> seq_bwd_cpu(
    const OptTensorVec& grad_h, const OptTensorVec& grad_c, const OptTensorVec& grad_z, const TensorVec& grad_hT,
    const TensorVec& grad_cT, const TensorVec& grad_zT, const at::Tensor& x, const TensorVec& hs,
    const TensorVec& cs, const TensorVec& zs, const TensorVec& pres, const TensorVec& W, const TensorVec& U,
    const TensorVec& V, const TensorVec& b, const OptTensorVec& ln_gates, const OptTensorVec& ln_cell_w,
    const OptTensorVec& ln_cell_b, const at::Tensor& slope, const std::optional<at::Tensor>& noise,
    int64_t boundary_mode, bool recompute, bool dense_copy, const std::vector<int64_t>& needs,
    const OptTensorVec& packed, int64_t chunk_rows, bool poison) {
  const size_t L = hs.size();
  TORCH_CHECK(L >= 1 && cs.size() == L && zs.size() == L - 1 && pres.size() == L && W.size() == L &&
                  U.size() == L && V.size() == L && b.size() == L && ln_gates.size() == L && ln_cell_w.size() == L &&
                  ln_cell_b.size() == L,
              "hmlstm::seq_bwd: hs, cs, pres and the weights need one entry per layer and zs L - 1, got L = ", L,
              " from hs");
  TORCH_CHECK(grad_h.size() == L && grad_c.size() == L && grad_z.size() == L - 1 && grad_hT.size() == L &&
                  grad_cT.size() == L && grad_zT.size() == L - 1,
              "hmlstm::seq_bwd: grad_h, grad_c, grad_hT, grad_cT need ", L, " entries and grad_z, grad_zT ", L - 1);
  constexpr size_t kP = 7;  // W, U, V, b, ln_gates, ln_cell_w, ln_cell_b
  TORCH_CHECK(needs.size() == 1 + 3 * L - 1 + kP * L, "hmlstm::seq_bwd: needs must hold 1 + (3L - 1) + 7L = ",
              1 + 3 * L - 1 + kP * L, " flags (x, the initial state, the parameters), got ", needs.size());
  TORCH_CHECK(packed.empty() || packed.size() == 3 * L, "hmlstm::seq_bwd: packed must be [] or 3 per layer");
  TORCH_CHECK(x.dim() == 3, "hmlstm::seq_bwd: x must be (T, B, I) (time first), got ", x.sizes());
  TORCH_CHECK(chunk_rows >= 1, "hmlstm::seq_bwd: chunk_rows must be positive, got ", chunk_rows);
  const int64_t T = x.size(0), B = x.size(1);
  const auto opts = x.options();
  const SeqSteps steps_in(x, hs, cs, zs, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, noise, boundary_mode);
  const at::Tensor empty = at::empty({0}, opts);
  auto need_p = [&](size_t l, size_t k) { return needs[1 + 3 * L - 1 + kP * l + k] != 0; };
  // pending gradients of the step the loop is about to process: gh[l], gc[l] of h_t^l, c_t^l, gz[l] of z_t^l
  TensorVec gh(L), gc(L), gz(L - 1);
  for (size_t l = 0; l < L; ++l) {
    gh[l] = grad_hT[l].clone();
    gc[l] = grad_cT[l].clone();
    if (l + 1 < L) gz[l] = grad_zT[l].clone();
  }
  const int64_t steps = std::max<int64_t>(1, std::min<int64_t>(T, chunk_rows / B));
  std::vector<std::optional<WeightGrads>> wg(L);
  std::vector<std::array<at::Tensor, kP>> small(L);  // b and the LN vectors, summed over the steps
  for (size_t l = 0; l < L; ++l) {
    if (need_p(l, 0) || need_p(l, 1) || need_p(l, 2)) wg[l].emplace(W[l], U[l], V[l], steps, B, recompute && l + 1 < L);
    const std::optional<at::Tensor> vec[kP] = {std::nullopt, std::nullopt, std::nullopt, b[l], ln_gates[l],
                                               ln_cell_w[l], ln_cell_b[l]};
    for (size_t k = 3; k < kP; ++k) {
      if (need_p(l, k) && vec[k].has_value()) small[l][k] = at::zeros_like(*vec[k]);
    }
  }
  at::Tensor dx = needs[0] != 0 ? new_buffer({T, B, x.size(2)}, opts, poison) : at::empty({0}, opts);
  // dL/dz_t^l, the whole gradient reaching each boundary (every use of it): the diagnostics' input (L-1 x (T, B))
  TensorVec dz_total(L - 1);
  for (size_t l = 0; l + 1 < L; ++l) dz_total[l] = at::empty({T, B}, opts);
  // the inputs of layer l over steps t0..t1-1, flattened to rows (as seq_fwd's buffers lay them out)
  auto flush = [&](size_t l) {
    WeightGrads& w = *wg[l];
    if (w.n == 0) return;
    const int64_t t0 = w.t_low, n = w.n, rows = n * B;
    const bool top = l + 1 == L;
    const at::Tensor below = l == 0 ? x.narrow(0, t0, n).flatten(0, 1) : hs[l - 1].narrow(0, t0 + 1, n).flatten(0, 1);
    const at::Tensor z_below = l == 0 ? at::ones({rows}, opts) : zs[l - 1].narrow(0, t0 + 1, n).flatten();
    const at::Tensor z = top ? at::zeros({rows}, opts) : zs[l].narrow(0, t0, n).flatten();
    const at::Tensor ha = top ? at::empty({rows, 0}, opts) : hs[l + 1].narrow(0, t0, n).flatten(0, 1);
    w.flush(below, z_below, hs[l].narrow(0, t0, n).flatten(0, 1), z, ha);
  };
  for (int64_t t = T - 1; t >= 0; --t) {
    for (size_t l = L; l-- > 0;) {
      const bool top = l + 1 == L;
      const at::Tensor g_h = grad_h[l].has_value() ? gh[l] + grad_h[l]->select(0, t) : gh[l];
      const at::Tensor g_c = grad_c[l].has_value() ? gc[l] + grad_c[l]->select(0, t) : gc[l];
      at::Tensor g_z = empty;
      if (!top) {
        g_z = grad_z[l].has_value() ? gz[l] + grad_z[l]->select(0, t) : gz[l];
        dz_total[l].select(0, t).copy_(g_z);
      }
      std::array<bool, 13> mask{l > 0 || needs[0] != 0, l > 0, true, true, !top, !top, false, false, false};
      for (size_t k = 3; k < kP; ++k) mask[9 + k - 3] = small[l][k].defined();  // needed and present
      const bool want_ds = wg[l].has_value();
      at::Tensor slot;
      if (want_ds) slot = wg[l]->slot(t);
      const std::vector<at::Tensor> out =
          backward_step(steps_in.at(l, t), g_h, g_c, g_z, slope, pres[l].select(0, t), boundary_mode, recompute,
                        dense_copy, mask, want_ds, packed, 3 * l, poison, want_ds ? &slot : nullptr);
      for (size_t k = 3; k < kP; ++k) {
        if (mask[9 + k - 3]) small[l][k].add_(out[6 + k]);
      }
      if (want_ds) {
        TORCH_INTERNAL_ASSERT(out[13].is_same(slot), "hmlstm::seq_bwd: ds must have been written into its slot");
        wg[l]->slot_copy().copy_(out[14]);
        wg[l]->n += 1;
        if (wg[l]->full()) flush(l);
      }
      // route each gradient to the pending slot of the tensor it belongs to
      if (l == 0) {
        if (needs[0] != 0) dx.select(0, t).copy_(out[kX]);
      } else {
        gh[l - 1].add_(out[kX]);
        gz[l - 1].add_(out[kZBelow]);
      }
      gh[l] = out[kH];
      gc[l] = out[kC];
      if (!top) {
        gz[l] = out[kZ];
        gh[l + 1].add_(out[kHAbove]);
      }
    }
  }
  std::vector<at::Tensor> result{dx};
  for (size_t l = 0; l < L; ++l) result.push_back(gh[l]);
  for (size_t l = 0; l < L; ++l) result.push_back(gc[l]);
  for (size_t l = 0; l + 1 < L; ++l) result.push_back(gz[l]);
  for (size_t l = 0; l < L; ++l) {
    if (wg[l].has_value()) flush(l);
    for (size_t k = 0; k < kP; ++k) {
      at::Tensor g = at::empty({0}, opts);  // a tensor of its own: outputs must not alias each other
      if (need_p(l, k)) {
        if (k < 3) {
          g = k == 0 ? wg[l]->dW : (k == 1 ? wg[l]->dU : wg[l]->dV);
        } else if (small[l][k].defined()) {
          g = small[l][k];
        }
      }
      result.push_back(g);
    }
  }
  for (size_t l = 0; l + 1 < L; ++l) result.push_back(dz_total[l]);
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(hmlstm, CPU, m) {
  m.impl("cell_fwd", &cell_fwd_cpu);
  m.impl("cell_bwd", &cell_bwd_cpu);
  m.impl("seq_fwd", &seq_fwd_cpu);
  m.impl("seq_bwd", &seq_bwd_cpu);
}

// A call with oneDNN-packed weights in `packed` dispatches on the MkldnnCPU key: the same kernels.
TORCH_LIBRARY_IMPL(hmlstm, MkldnnCPU, m) {
  m.impl("cell_fwd", &cell_fwd_cpu);
  m.impl("cell_bwd", &cell_bwd_cpu);
  m.impl("seq_fwd", &seq_fwd_cpu);
  m.impl("seq_bwd", &seq_bwd_cpu);
}

}  // namespace hmlstm
