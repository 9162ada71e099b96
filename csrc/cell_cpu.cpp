// CPU kernels of the fused HM-LSTM layer-step: hmlstm::cell_fwd and hmlstm::cell_bwd (schemas in ops.cpp).
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

namespace hmlstm {
namespace {

// exp for float without a libm call, so that the loops over a row's gates vectorize (SSE2 and up): the
// gate and cell non-linearities were most of the kernels' own time (the rest is GEMMs). Cephes' expf
// polynomial after the range reduction x = n ln2 + r, |r| <= ln2 / 2; relative error about 2e-7.
// Branch-free so that GCC vectorizes it (with -fno-trapping-math, set in setup.py): 1.6x std::exp per
// element for sigmoid with SSE2, and tanh through it 4.7x std::tanh (one core of the 2-core CI machine).
// double keeps std::exp (the reference-precision path).
inline float exp_poly(float x) {
  x = x < -87.0f ? -87.0f : x;  // 2^n stays a normal float
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const float fn = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
  const int n = static_cast<int>(fn);
  const float r = (x - fn * 0.693359375f) + fn * 2.12194440e-4f;  // x - n ln2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline T exp_(T v) {
  return std::exp(v);
}
template <>
inline float exp_<float>(float v) {
  return exp_poly(v);
}

template <typename T>
inline T sigm(T v) {
  return T(1) / (T(1) + exp_(-v));
}

// tanh through exp: 1 - 2 / (1 + e^{2v}); absolute error about 1e-7 in float (std::tanh for double).
template <typename T>
inline T tanh_(T v) {
  return std::tanh(v);
}
template <>
inline float tanh_<float>(float v) {
  return 1.0f - 2.0f / (1.0f + exp_poly(2.0f * v));
}

// sum_{j < n} f(j), accumulated in A over eight lanes. Why: a single running sum is a chain of dependent adds
// (about 4 cycles an element) that GCC does not vectorize without -ffast-math; eight independent sums it does.
// Used for the layer norm statistics and backward, the boundary gradients' inner products and dot: with layer
// norm on, the PTB-size training step went from 1922 to 1855 ms (2 cores, interleaved runs).
template <typename A, typename F>
inline A sum8(int64_t n, F f) {
  A acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    for (int k = 0; k < 8; ++k) acc[k] += f(j + k);
  }
  A s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; j < n; ++j) s += f(j);
  return s;
}

template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  return sum8<T>(n, [&](int64_t j) { return a[j] * b[j]; });
}

// Mean and 1/sqrt(var + eps) of v[0:n] (biased variance, as F.layer_norm), accumulated in double.
template <typename T>
inline void ln_stats(const T* v, int64_t n, T& mean, T& rstd) {
  const double m = sum8<double>(n, [&](int64_t j) { return double(v[j]); }) / n;
  const double q = sum8<double>(n, [&](int64_t j) {
    const double d = v[j] - m;
    return d * d;
  });
  mean = T(m);
  rstd = T(1.0 / std::sqrt(q / n + kLnEps));
}

// Row-local part of the LN backward: dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)).
template <typename T>
inline void ln_backward(const T* dxh, const T* xh, T rstd, int64_t n, T* dx) {
  const double s1 = sum8<double>(n, [&](int64_t j) { return double(dxh[j]); });
  const double s2 = sum8<double>(n, [&](int64_t j) { return double(dxh[j]) * xh[j]; });
  const T m1 = T(s1 / n), m2 = T(s2 / n);
  for (int64_t j = 0; j < n; ++j) dx[j] = rstd * (dxh[j] - m1 - xh[j] * m2);
}

// act = tanh(c) or tanh(LN(c) * w + bb) over H; with LN also the normalized c (xh) and its rstd.
template <typename T>
inline void cell_act(const Cell<T>& L, const T* cv, T* act, T* xh, T& rstd) {
  const int64_t H = L.H;
  if (!L.ln) {
    for (int64_t j = 0; j < H; ++j) act[j] = tanh_(cv[j]);
    return;
  }
  T mean;
  ln_stats(cv, H, mean, rstd);
  for (int64_t j = 0; j < H; ++j) {
    xh[j] = (cv[j] - mean) * rstd;
    act[j] = tanh_(xh[j] * L.lcw[j] + L.lcb[j]);
  }
}

// Backward of cell_act: d_act -> dcv (overwrites), accumulating the cell-LN parameter gradients.
template <typename T>
inline void cell_act_backward(const Cell<T>& L, const T* d_act, const T* act, const T* xh, T rstd, T* dcv,
                              T* dlcw, T* dlcb, T* scratch) {
  const int64_t H = L.H;
  if (!L.ln) {
    for (int64_t j = 0; j < H; ++j) dcv[j] = d_act[j] * (T(1) - act[j] * act[j]);
    return;
  }
  for (int64_t j = 0; j < H; ++j) {
    const T dy = d_act[j] * (T(1) - act[j] * act[j]);
    dlcw[j] += dy * xh[j];
    dlcb[j] += dy;
    scratch[j] = dy * L.lcw[j];
  }
  ln_backward(scratch, xh, rstd, H, dcv);
}

// The branches' cells, cf = i g (FLUSH) and cu = f c + i g (UPDATE), and their activations, for those asked
// for. gate: f, i, o, g (4H). xf and xu may be one buffer when only af and au are read afterwards (the forward).
template <typename T>
inline void cell_branches(const Cell<T>& L, const T* gate, const T* cr, bool doF, bool doU, T* cf, T* af, T* xf,
                          T& rf, T* cu, T* au, T* xu, T& ru) {
  const int64_t H = L.H;
  const T *f = gate, *i = gate + H, *g = gate + 3 * H;
  if (doF) {
    for (int64_t j = 0; j < H; ++j) cf[j] = i[j] * g[j];
    cell_act(L, cf, af, xf, rf);
  }
  if (doU) {
    for (int64_t j = 0; j < H; ++j) cu[j] = f[j] * cr[j] + i[j] * g[j];
    cell_act(L, cu, au, xu, ru);
  }
}

// Backward of one branch's share w * (h = o act, c): adds to dob (the output gate's gradient) and writes dcv,
// the branch cell's gradient, accumulating the cell-LN parameter gradients. tmp, tmp2: H scratch each.
template <typename T>
inline void branch_backward(const Cell<T>& L, T w, const T* dh, const T* dc, const T* og, const T* act, const T* xn,
                            T rn, T* dob, T* dcv, T* dlcw, T* dlcb, T* tmp, T* tmp2) {
  for (int64_t j = 0; j < L.H; ++j) {
    const T dhw = w * dh[j];
    dob[j] += dhw * act[j];
    tmp[j] = dhw * og[j];
  }
  cell_act_backward(L, tmp, act, xn, rn, dcv, dlcw, dlcb, tmp2);
  for (int64_t j = 0; j < L.H; ++j) dcv[j] += w * dc[j];
}

// Activated gates f, i, o, g (4H) from the bias-free pre-activation s.
template <typename T>
inline void gates_from_pre(const Cell<T>& L, const T* s, T* gate, T& mean, T& rstd) {
  const int64_t H4 = 4 * L.H, H3 = 3 * L.H;
  if (L.ln) {
    ln_stats(s, H4, mean, rstd);
    for (int64_t j = 0; j < H4; ++j) gate[j] = (s[j] - mean) * rstd * L.lng[j] + L.b[j];
  } else {
    for (int64_t j = 0; j < H4; ++j) gate[j] = s[j] + L.b[j];
  }
  for (int64_t j = 0; j < H3; ++j) gate[j] = sigm(gate[j]);
  for (int64_t j = H3; j < H4; ++j) gate[j] = tanh_(gate[j]);
}

// The boundary unit's share of U h at row r: row 4H of U against h (the forward's GEMMs stop at row 4H).
template <typename T>
inline T boundary_uh(const Cell<T>& L, int64_t r) {
  return dot(L.h + r * L.H, L.U + 4 * L.H * L.H, L.H);
}

// z_copy under `recompute`: the boundary unit from U h + b alone.
template <typename T>
inline T recompute_pre(const Cell<T>& L, int64_t r) {
  return boundary_uh(L, r) + L.b[4 * L.H];
}

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

template <typename T>
void forward_rows(const Cell<T>& L, const Rows& rs, const T* preU, const std::vector<int64_t>& mapU,
                  const T* tV, const std::vector<int64_t>& mapV, const T* tW, const std::vector<int64_t>& mapW,
                  T* pre_out, T* h_out, T* c_out, T* z_out) {
  // preU, tV, tW: (rows, 4H) products (gate_products); the boundary unit's column comes from dots here.
  const int64_t H = L.H, G = L.G, H4 = 4 * H;
  at::parallel_for(0, L.B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> sbuf(G), gate(H4), cf(H), cu(H), af(H), au(H), xh(H);
    for (int64_t r = r0; r < r1; ++r) {
      const T zb = L.zb[r], zu = L.zu[r];
      const T *hr = L.h + r * H, *cr = L.c + r * H;
      T *ho = h_out + r * H, *co = c_out + r * H;
      const T* pu = mapU[r] >= 0 ? preU + mapU[r] * H4 : nullptr;
      const T noise = L.noise != nullptr ? L.noise[r] : T(0);
      if (rs.pos[r] < 0) {  // COPY: no gate work
        std::copy(hr, hr + H, ho);
        std::copy(cr, cr + H, co);
        // U h's boundary unit, when the saved pre or recompute's z_copy reads it
        const T uz = L.has_z && (pu != nullptr || L.recompute) ? boundary_uh(L, r) : T(0);
        if (pre_out != nullptr) {  // U h when a z gradient needs it, else zeros the backward never reads
          T* pr = pre_out + r * G;
          if (pu != nullptr) {
            std::copy(pu, pu + H4, pr);
            if (L.has_z) pr[H4] = uz;
          } else {
            std::fill(pr, pr + G, T(0));
          }
        }
        if (L.has_z) z_out[r] = L.recompute ? boundary_value(uz + L.b[H4], L.slope, L.mode, noise) : zb;
        continue;
      }
      T* s = pre_out != nullptr ? pre_out + r * G : sbuf.data();
      const T* pv = mapV[r] >= 0 ? tV + mapV[r] * H4 : nullptr;
      const T* pw = mapW[r] >= 0 ? tW + mapW[r] * H4 : nullptr;
      for (int64_t j = 0; j < H4; ++j) {
        T v = pu[j];
        if (pv != nullptr) v += zb * pv[j];
        if (pw != nullptr) v += zu * pw[j];
        s[j] = v;
      }
      T uz = 0;
      if (L.has_z) {
        uz = boundary_uh(L, r);
        T v = uz;
        if (pv != nullptr) v += zb * dot(L.ha + r * L.Ha, L.V + H4 * L.Ha, L.Ha);
        if (pw != nullptr) v += zu * dot(L.x + r * L.I, L.W + H4 * L.I, L.I);
        s[H4] = v;
      }
      T mean, rstd;
      gates_from_pre(L, s, gate.data(), mean, rstd);
      const T* o = gate.data() + 2 * H;
      // Which branches of c = zb cf + (1 - zb)(zu cu + (1 - zu) c) have a non-zero weight.
      const bool flush = zb != T(0), update = zb != T(1) && zu != T(0), keep = zb != T(1) && zu != T(1);
      T rf = 0, ru = 0;
      cell_branches(L, gate.data(), cr, flush, update, cf.data(), af.data(), xh.data(), rf, cu.data(), au.data(),
                    xh.data(), ru);
      for (int64_t j = 0; j < H; ++j) {
        T cn = flush ? zb * cf[j] : T(0), hn = flush ? zb * (o[j] * af[j]) : T(0);
        if (zb != T(1)) {
          const T ci = (update ? zu * cu[j] : T(0)) + (keep ? (T(1) - zu) * cr[j] : T(0));
          const T hi = (update ? zu * (o[j] * au[j]) : T(0)) + (keep ? (T(1) - zu) * hr[j] : T(0));
          cn += (T(1) - zb) * ci;
          hn += (T(1) - zb) * hi;
        }
        co[j] = cn;
        ho[j] = hn;
      }
      if (L.has_z) {
        const T zhat = boundary_value(s[H4] + L.b[H4], L.slope, L.mode, noise);
        T zc = 0;
        if (keep) zc = L.recompute ? boundary_value(uz + L.b[H4], L.slope, L.mode, noise) : zb;
        z_out[r] = zb * zhat + (T(1) - zb) * (zu * zhat + (keep ? (T(1) - zu) * zc : T(0)));
      }
    }
  });
}

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
  const bool sample = boundary_mode == kSample && L > 1;
  if (sample) {
    TORCH_CHECK(noise.has_value() && noise->dim() == 3 && noise->size(0) == T && noise->size(1) == int64_t(L - 1) &&
                    noise->size(2) == B,
                "hmlstm::seq_fwd: boundary_mode 1 (sample) needs noise of shape (T, L - 1, B) = (", T, ", ", L - 1,
                ", ", B, "), got ", noise.has_value() ? noise->sizes() : at::IntArrayRef{});
  }
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
    hs[l] = new_output({T + 1, B, H}, opts, poison);
    cs[l] = new_output({T + 1, B, H}, opts, poison);
    hs[l].select(0, 0).copy_(h0[l]);
    cs[l].select(0, 0).copy_(c0[l]);
    if (l + 1 < L) {
      checked(z0[l], "z0", 1, x);
      TORCH_CHECK(z0[l].size(0) == B, "hmlstm::seq_fwd: z0[", l, "] must be (B,) with B = ", B,
                  ", got ", z0[l].sizes());
      zs[l] = new_output({T + 1, B}, opts, poison);
      zs[l].select(0, 0).copy_(z0[l]);
    }
    pres[l] = save ? new_output({T, B, U[l].size(0)}, opts, poison) : at::empty({0}, opts);
  }
  const at::Tensor ones = at::ones({B}, opts), zeros = at::zeros({B}, opts), empty = at::empty({0}, opts);
  const at::Tensor no_above = at::empty({B, 0}, opts);
  const bool any_packed = !packed.empty();
  for (int64_t t = 0; t < T; ++t) {
    at::Tensor below = x.select(0, t), z_below = ones;
    for (size_t l = 0; l < L; ++l) {
      const bool top = l + 1 == L;
      const at::Tensor ha = top ? no_above : hs[l + 1].select(0, t);
      std::optional<at::Tensor> n;
      if (sample && !top) n = noise->select(0, t).select(0, l);
      const Inputs in(below, z_below, hs[l].select(0, t), cs[l].select(0, t), top ? zeros : zs[l].select(0, t), ha,
                      W[l], U[l], V[l], b[l], ln_gates[l], ln_cell_w[l], ln_cell_b[l], n, boundary_mode);
      const at::Tensor h_t = hs[l].select(0, t + 1), c_t = cs[l].select(0, t + 1);
      const at::Tensor z_t = top ? empty : zs[l].select(0, t + 1);
      const at::Tensor pre = save ? pres[l].select(0, t) : empty;
      forward_step(in, boundary_mode, recompute, slope, save, dense_copy, packed, any_packed ? 3 * l : packed.size(),
                   h_t, c_t, z_t, pre);
      below = h_t;
      z_below = top ? ones : z_t;
    }
  }
  return {hs, cs, zs, pres};
}

// ---------------------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BwdBuffers {
  const T *pre, *gh, *gc, *gz;
  T *ds, *dh, *dc, *dzb, *dzu, *ds_copy;  // ds: (n_active, G); dzb, dzu: (B,) row-local parts
  T *da, *dgain, *dlcw, *dlcb;            // with LN: per active row (n_active, 4H | H)
};

template <typename T>
void backward_rows(const Cell<T>& L, const Rows& rs, bool zgrad, const BwdBuffers<T>& o) {
  const int64_t H = L.H, G = L.G, H4 = 4 * H;
  at::parallel_for(0, L.B, 1, [&](int64_t r0, int64_t r1) {
    std::vector<T> gate(H4), cf(H), cu(H), af(H), au(H), xf(H), xu(H), dcf(H), dcu(H), dob(H), tmp(H), tmp2(H),
        da(H4), xg(H4);
    for (int64_t r = r0; r < r1; ++r) {
      const T zb = L.zb[r], zu = L.zu[r];
      const T wF = zb, wU = (T(1) - zb) * zu, wC = (T(1) - zb) * (T(1) - zu);
      const T *hr = L.h + r * H, *cr = L.c + r * H;
      const T *dh = o.gh + r * H, *dc = o.gc + r * H;
      const T dz = L.has_z ? o.gz[r] : T(0);
      const T noise = L.noise != nullptr ? L.noise[r] : T(0);
      T *dhp = o.dh + r * H, *dcp = o.dc + r * H;
      const int64_t k = rs.pos[r];
      // z_copy and, under `recompute`, its own straight-through path into U[4H], h and b[4H].
      T zc = zb, s_copy = 0;
      const bool need_zc = L.has_z && L.recompute && (wC != T(0) || zgrad);
      if (need_zc) {
        s_copy = recompute_pre<T>(L, r);
        zc = boundary_value(s_copy, L.slope, L.mode, noise);
      }
      for (int64_t j = 0; j < H; ++j) {
        dcp[j] = wC * dc[j];
        dhp[j] = wC * dh[j];
      }
      if (L.has_z && L.recompute) {
        const T d = wC != T(0) ? dz * wC * boundary_grad(s_copy, L.slope, L.mode) : T(0);
        o.ds_copy[r] = d;
        if (d != T(0)) {
          const T* u4 = L.U + H4 * H;
          for (int64_t j = 0; j < H; ++j) dhp[j] += d * u4[j];
        }
      }
      if (k < 0 && !zgrad) continue;  // COPY, nothing else wanted: h and c gradients pass through

      // Recompute the gates and the branches (all of them when the z gradients need them).
      const T* s = o.pre + r * G;
      T gmean = 0, grstd = 0;
      gates_from_pre(L, s, gate.data(), gmean, grstd);
      const T *f = gate.data(), *i = f + H, *og = f + 2 * H, *g = f + 3 * H;
      const bool doF = wF != T(0) || zgrad, doU = wU != T(0) || zgrad;
      T rf = 0, ru = 0;
      cell_branches(L, gate.data(), cr, doF, doU, cf.data(), af.data(), xf.data(), rf, cu.data(), au.data(),
                    xu.data(), ru);
      T zhat = 0, s_z = 0;
      if (L.has_z) {
        s_z = s[H4] + L.b[H4];
        zhat = boundary_value(s_z, L.slope, L.mode, noise);
      }
      if (zgrad) {
        // d/dz_{t-1} and d/dz_below of the dense selection (PAPER.md, the reference gradient)
        T acc_b = sum8<T>(H, [&](int64_t j) {
          const T hf = og[j] * af[j], hu = og[j] * au[j];
          return dc[j] * (cf[j] - (zu * cu[j] + (T(1) - zu) * cr[j])) +
                 dh[j] * (hf - (zu * hu + (T(1) - zu) * hr[j]));
        });
        T acc_u = sum8<T>(H, [&](int64_t j) { return dc[j] * (cu[j] - cr[j]) + dh[j] * (og[j] * au[j] - hr[j]); });
        if (L.has_z) {
          acc_b += dz * (zhat - (zu * zhat + (T(1) - zu) * zc));
          if (!L.recompute) acc_b += dz * wC;  // hold: z_copy is z_{t-1} itself
          acc_u += dz * (zhat - zc);
        }
        o.dzb[r] = acc_b;
        o.dzu[r] = (T(1) - zb) * acc_u;
      }
      if (k < 0) continue;  // COPY: the gates do not reach any output

      T* dlcw = L.ln ? o.dlcw + k * H : nullptr;
      T* dlcb = L.ln ? o.dlcb + k * H : nullptr;
      if (L.ln) {
        std::fill(dlcw, dlcw + H, T(0));
        std::fill(dlcb, dlcb + H, T(0));
      }
      std::fill(dob.begin(), dob.end(), T(0));
      std::fill(dcf.begin(), dcf.end(), T(0));
      std::fill(dcu.begin(), dcu.end(), T(0));
      if (wF != T(0))
        branch_backward(L, wF, dh, dc, og, af.data(), xf.data(), rf, dob.data(), dcf.data(), dlcw, dlcb, tmp.data(),
                        tmp2.data());
      if (wU != T(0))
        branch_backward(L, wU, dh, dc, og, au.data(), xu.data(), ru, dob.data(), dcu.data(), dlcw, dlcb, tmp.data(),
                        tmp2.data());
      for (int64_t j = 0; j < H; ++j) {
        const T dcs = dcf[j] + dcu[j];
        dcp[j] += dcu[j] * f[j];
        da[j] = dcu[j] * cr[j] * f[j] * (T(1) - f[j]);
        da[H + j] = dcs * g[j] * i[j] * (T(1) - i[j]);
        da[2 * H + j] = dob[j] * og[j] * (T(1) - og[j]);
        da[3 * H + j] = dcs * i[j] * (T(1) - g[j] * g[j]);
      }
      T* ds = o.ds + k * G;
      if (L.ln) {
        T* dgain = o.dgain + k * H4;
        std::copy(da.begin(), da.end(), o.da + k * H4);
        for (int64_t j = 0; j < H4; ++j) {
          xg[j] = (s[j] - gmean) * grstd;
          dgain[j] = da[j] * xg[j];
          da[j] *= L.lng[j];
        }
        ln_backward(da.data(), xg.data(), grstd, H4, ds);
      } else {
        std::copy(da.begin(), da.end(), ds);
      }
      if (L.has_z) ds[H4] = dz * (zb + (T(1) - zb) * zu) * boundary_grad(s_z, L.slope, L.mode);
    }
  });
}

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
  // Every row of d_inp is written below when the written rows (the active ones, or the `on` ones) are all of
  // them; zero-filling it first cost about 20 ms of a PTB-size training step.
  const size_t written = need_gate ? rs.active.size() : on.size();
  if (need_inp) d_inp = any && written == static_cast<size_t>(B) ? new_output({B, K}, inp.options(), poison)
                                                                  : at::zeros({B, K}, inp.options());
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
        io.ds_full = ds_into != nullptr ? ds_into->zero_() : at::zeros({B, G}, opts);
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
      : dW(at::zeros_like(W)), dU(at::zeros_like(U)), dV(at::zeros_like(V)),
        buf(at::empty({steps, B, U.size(0)}, U.options())), buf_copy(at::empty({steps, B}, U.options())),
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
  const bool sample = boundary_mode == kSample && L > 1;
  const bool any_packed = !packed.empty();
  const at::Tensor ones = at::ones({B}, opts), zeros = at::zeros({B}, opts), empty = at::empty({0}, opts);
  const at::Tensor no_above = at::empty({B, 0}, opts);
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
  at::Tensor dx = needs[0] != 0 ? new_output({T, B, x.size(2)}, opts, poison) : at::empty({0}, opts);
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
    for (size_t li = L; li-- > 0;) {
      const size_t l = li;
      const bool top = l + 1 == L;
      const at::Tensor below = l == 0 ? x.select(0, t) : hs[l - 1].select(0, t + 1);
      const at::Tensor z_below = l == 0 ? ones : zs[l - 1].select(0, t + 1);
      std::optional<at::Tensor> nz;
      if (sample && !top) nz = noise->select(0, t).select(0, l);
      const Inputs in(below, z_below, hs[l].select(0, t), cs[l].select(0, t), top ? zeros : zs[l].select(0, t),
                      top ? no_above : hs[l + 1].select(0, t), W[l], U[l], V[l], b[l], ln_gates[l], ln_cell_w[l],
                      ln_cell_b[l], nz, boundary_mode);
      const at::Tensor g_h = grad_h[l].has_value() ? gh[l] + grad_h[l]->select(0, t) : gh[l];
      const at::Tensor g_c = grad_c[l].has_value() ? gc[l] + grad_c[l]->select(0, t) : gc[l];
      at::Tensor g_z = empty;
      if (!top) g_z = grad_z[l].has_value() ? gz[l] + grad_z[l]->select(0, t) : gz[l];
      std::array<bool, 13> mask{l > 0 || needs[0] != 0, l > 0, true, true, !top, !top, false, false, false};
      for (size_t k = 3; k < kP; ++k) {
        const bool present = k == 3 || (k == 4 ? ln_gates[l].has_value() : k == 5 ? ln_cell_w[l].has_value()
                                                                                    : ln_cell_b[l].has_value());
        mask[9 + k - 3] = need_p(l, k) && present;
      }
      const bool want_ds = wg[l].has_value();
      at::Tensor slot;
      if (want_ds) slot = wg[l]->slot(t);
      const std::vector<at::Tensor> out =
          backward_step(in, g_h, g_c, g_z, slope, pres[l].select(0, t), boundary_mode, recompute, dense_copy, mask,
                        want_ds, packed, any_packed ? 3 * l : packed.size(), poison, want_ds ? &slot : nullptr);
      for (size_t k = 3; k < kP; ++k) {
        if (mask[9 + k - 3]) small[l][k].add_(out[6 + k]);
      }
      if (want_ds) {
        if (!out[13].is_same(slot)) slot.copy_(out[13]);
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
