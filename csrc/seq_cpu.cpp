// The CPU kernels of the sequence ops hmlstm::seq_fwd / seq_bwd: the forward and backward time loops over
// L layers and T steps, around the per-step kernels of cell_cpu.cpp (forward_step, backward_step, declared in
// cell_cpu.h), with every step's outputs in (T + 1, B, .) buffers allocated once and each weight gradient
// formed as one GEMM over a chunk of steps. Schemas: ops.cpp; Python side: hmlstm/ops/cpp_sequence.py.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "cell_common.h"
#include "cell_cpu.h"
#include "host_cache.h"

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace hmlstm {
namespace {

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
// and each chunk of steps is one GEMM per weight over views of the forward's buffers (docs/spec.md's dense
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
  m.impl("seq_fwd", &seq_fwd_cpu);
  m.impl("seq_bwd", &seq_bwd_cpu);
}

// Calls with oneDNN-packed weights dispatch on the MkldnnCPU key: the same kernels.
TORCH_LIBRARY_IMPL(hmlstm, MkldnnCPU, m) {
  m.impl("seq_fwd", &seq_fwd_cpu);
  m.impl("seq_bwd", &seq_bwd_cpu);
}

}  // namespace hmlstm
