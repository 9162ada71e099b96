// What the CPU (cell_cpu.cpp) and CUDA (cell_cuda.cu) kernels of hmlstm::cell_fwd / cell_bwd share: the
// boundary math (host and device), the checked raw views of one call's inputs, and the row classes.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstdint>
#include <functional>
#include <limits>
#include <optional>
#include <vector>

#ifdef __CUDACC__
#define HMLSTM_HD __host__ __device__
#else
#define HMLSTM_HD
#endif

namespace hmlstm {

constexpr int64_t kStep = 0, kSample = 1, kSoft = 2;
constexpr double kLnEps = 1e-5;  // hmlstm.reference.LN_EPS

// The boundary value of pre-activation s (hmlstm/boundary.py): step is `s > 0` exactly. Clamps written
// as comparisons (not std::min/max) so that the device compiles them too; NaN propagates either way.
template <typename T>
HMLSTM_HD inline T boundary_value(T s, T slope, int64_t mode, T noise) {
  if (mode == kStep) return s > T(0) ? T(1) : T(0);
  T hs = (slope * s + T(1)) * T(0.5);
  hs = hs < T(0) ? T(0) : (hs > T(1) ? T(1) : hs);
  if (mode == kSample) return noise < hs ? T(1) : T(0);
  return hs;
}

// dz/ds: straight-through (slope/2 where |slope s| < 1) for step and sample; for soft, the derivative
// of clamp, which autograd passes at the bounds too.
template <typename T>
HMLSTM_HD inline T boundary_grad(T s, T slope, int64_t mode) {
  if (mode == kSoft) {
    const T v = (slope * s + T(1)) * T(0.5);
    return (v >= T(0) && v <= T(1)) ? T(0.5) * slope : T(0);
  }
  const T a = slope * s;
  return (a < T(1) && a > T(-1)) ? T(0.5) * slope : T(0);
}

// Raw views of one call's inputs (all contiguous, one dtype, one device).
template <typename T>
struct Cell {
  int64_t B, I, H, Ha, G;
  bool has_z, ln, recompute;
  int64_t mode;
  T slope;
  const T *x, *zu, *h, *c, *zb, *ha, *W, *U, *V, *b, *lng, *lcw, *lcb, *noise;
};

// The rows of a batch by what they do (host vectors; the CUDA kernel classifies host copies of z).
struct Rows {
  std::vector<int64_t> active;  // not COPY
  std::vector<int64_t> pos;     // row -> its position in `active`, -1 for COPY
  std::vector<int64_t> td;      // z_{t-1} != 0: the top-down term is on
  std::vector<int64_t> bu;      // z_below != 0: the bottom-up term is on
};

template <typename T>
Rows classify(const T* zb, const T* zu, int64_t B) {
  Rows rs;
  rs.pos.assign(B, -1);
  for (int64_t r = 0; r < B; ++r) {
    if (zb[r] != T(0)) rs.td.push_back(r);
    if (zu[r] != T(0)) rs.bu.push_back(r);
    if (zb[r] != T(0) || zu[r] != T(0)) {
      rs.pos[r] = static_cast<int64_t>(rs.active.size());
      rs.active.push_back(r);
    }
  }
  return rs;
}

// row -> its position in idx, -1 where absent.
inline std::vector<int64_t> position_map(const std::vector<int64_t>& idx, int64_t B) {
  std::vector<int64_t> m(B, -1);
  for (size_t k = 0; k < idx.size(); ++k) m[idx[k]] = static_cast<int64_t>(k);
  return m;
}

// A fresh output; NaN-filled when `poison` (tests: an element the kernel forgets cannot pass as zero).
inline at::Tensor new_output(at::IntArrayRef shape, const at::TensorOptions& opts, bool poison) {
  at::Tensor t = at::empty(shape, opts);
  if (poison) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

inline const at::Tensor& checked(const at::Tensor& t, const char* name, int64_t dim, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == dim, "hmlstm::cell: ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "hmlstm::cell: ", name, " has dtype ", t.scalar_type(),
              " but x has ", like.scalar_type(), "; pass every tensor in one dtype");
  TORCH_CHECK(t.device() == like.device(), "hmlstm::cell: ", name, " is on ", t.device(), " but x is on ",
              like.device(), "; pass every tensor on one device");
  return t;
}

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

// Contiguous copies (no-ops when already contiguous) of every input, kept alive for the raw pointers.
struct Inputs {
  at::Tensor x, zu, h, c, zb, ha, W, U, V, b;
  std::optional<at::Tensor> lng, lcw, lcb, noise;
  int64_t B, I, H, Ha, G;
  bool has_z;

  Inputs(const at::Tensor& x_, const at::Tensor& zu_, const at::Tensor& h_, const at::Tensor& c_,
         const at::Tensor& zb_, const at::Tensor& ha_, const at::Tensor& W_, const at::Tensor& U_,
         const at::Tensor& V_, const at::Tensor& b_, const std::optional<at::Tensor>& lng_,
         const std::optional<at::Tensor>& lcw_, const std::optional<at::Tensor>& lcb_,
         const std::optional<at::Tensor>& noise_, int64_t mode) {
    x = checked(x_, "x", 2, x_).contiguous();
    zu = checked(zu_, "z_below", 1, x_).contiguous();
    h = checked(h_, "h", 2, x_).contiguous();
    c = checked(c_, "c", 2, x_).contiguous();
    zb = checked(zb_, "z", 1, x_).contiguous();
    ha = checked(ha_, "h_above", 2, x_).contiguous();
    W = checked(W_, "W", 2, x_).contiguous();
    U = checked(U_, "U", 2, x_).contiguous();
    V = checked(V_, "V", 2, x_).contiguous();
    b = checked(b_, "b", 1, x_).contiguous();
    B = x.size(0);
    I = x.size(1);
    H = h.size(1);
    Ha = ha.size(1);
    G = U.size(0);
    has_z = G == 4 * H + 1;
    TORCH_CHECK(G == 4 * H || has_z, "hmlstm::cell: U must have 4H or 4H+1 rows for H = ", H, ", got ",
                U.sizes());
    TORCH_CHECK(U.size(1) == H && W.size(0) == G && W.size(1) == I && V.size(0) == G && V.size(1) == Ha &&
                    b.size(0) == G,
                "hmlstm::cell: weight shapes W ", W.sizes(), " U ", U.sizes(), " V ", V.sizes(), " b ",
                b.sizes(), " do not fit x ", x.sizes(), " h ", h.sizes(), " h_above ", ha.sizes());
    TORCH_CHECK(zu.size(0) == B && zb.size(0) == B && h.size(0) == B && ha.size(0) == B &&
                    c.sizes() == h.sizes(),
                "hmlstm::cell: batch sizes differ: x ", x.sizes(), " z_below ", zu.sizes(), " h ", h.sizes(),
                " c ", c.sizes(), " z ", zb.sizes(), " h_above ", ha.sizes());
    TORCH_CHECK(lng_.has_value() == lcw_.has_value() && lcw_.has_value() == lcb_.has_value(),
                "hmlstm::cell: pass all three layer-norm tensors or none");
    if (lng_.has_value()) {
      lng = checked(*lng_, "ln_gates", 1, x_).contiguous();
      lcw = checked(*lcw_, "ln_cell_w", 1, x_).contiguous();
      lcb = checked(*lcb_, "ln_cell_b", 1, x_).contiguous();
      TORCH_CHECK(lng->size(0) == 4 * H && lcw->size(0) == H && lcb->size(0) == H,
                  "hmlstm::cell: layer-norm shapes must be (4H,), (H,), (H,) for H = ", H);
    }
    TORCH_CHECK(mode == kStep || mode == kSample || mode == kSoft,
                "hmlstm::cell: boundary_mode must be 0 (step), 1 (sample) or 2 (soft), got ", mode);
    if (mode == kSample && has_z) {
      TORCH_CHECK(noise_.has_value(), "hmlstm::cell: boundary_mode 1 (sample) needs noise");
      noise = checked(*noise_, "noise", 1, x_).contiguous();
      TORCH_CHECK(noise->size(0) == B, "hmlstm::cell: noise must have shape (B,)");
    }
  }

  template <typename T>
  Cell<T> view(int64_t mode, bool recompute, const at::Tensor& slope) const {
    Cell<T> L;
    L.B = B, L.I = I, L.H = H, L.Ha = Ha, L.G = G;
    L.has_z = has_z, L.ln = lng.has_value(), L.recompute = recompute, L.mode = mode;
    L.slope = slope.item<T>();
    L.x = x.data_ptr<T>(), L.zu = zu.data_ptr<T>(), L.h = h.data_ptr<T>(), L.c = c.data_ptr<T>();
    L.zb = zb.data_ptr<T>(), L.ha = ha.data_ptr<T>(), L.W = W.data_ptr<T>(), L.U = U.data_ptr<T>();
    L.V = V.data_ptr<T>(), L.b = b.data_ptr<T>();
    L.lng = opt_ptr<T>(lng), L.lcw = opt_ptr<T>(lcw), L.lcb = opt_ptr<T>(lcb), L.noise = opt_ptr<T>(noise);
    return L;
  }
};

// ---------------------------------------------------------------------------------------------------
// cell_bwd's host side that does not depend on the device

enum Grad { kX, kZBelow, kH, kC, kZ, kHAbove, kW, kU, kV, kB, kLnGates, kLnCellW, kLnCellB, kNumGrads };

// The upstream gradients (checked, contiguous) and the outputs of one cell_bwd call.
struct BwdIO {
  at::Tensor pre, gh, gc, gz;
  at::Tensor dh, dc, dzb, dzu, ds_copy;  // (B, H), (B, H), (B,) x 3; dzb, dzu only with z gradients
  at::Tensor ds, da, dgain, dlcw, dlcb;  // per active row: (nA, G), with LN (nA, 4H) x 2, (nA, H) x 2
  at::Tensor ds_full;                    // (B, G) when return_ds
  std::vector<at::Tensor> out = std::vector<at::Tensor>(kNumGrads);

  BwdIO(const Inputs& in, const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& grad_z,
        const at::Tensor& pre_, bool zgrad, bool poison) {
    const int64_t B = in.B;
    TORCH_CHECK(pre_.dim() == 2 && pre_.size(0) == B && pre_.size(1) == in.G,
                "hmlstm::cell_bwd: pre must be the (B, G) tensor saved by cell_fwd(save=True), got ", pre_.sizes());
    pre = checked(pre_, "pre", 2, in.x).contiguous();
    gh = checked(grad_h, "grad_h", 2, in.x).contiguous();
    gc = checked(grad_c, "grad_c", 2, in.x).contiguous();
    gz = checked(grad_z, "grad_z", 1, in.x).contiguous();
    TORCH_CHECK(!in.has_z || gz.size(0) == B, "hmlstm::cell_bwd: grad_z must have shape (B,)");
    TORCH_CHECK(gh.sizes() == in.h.sizes() && gc.sizes() == in.h.sizes(), "hmlstm::cell_bwd: grad_h ",
                gh.sizes(), " and grad_c ", gc.sizes(), " must have h's shape ", in.h.sizes());
    const auto opts = in.x.options();
    dh = new_output({B, in.H}, opts, poison);
    dc = new_output({B, in.H}, opts, poison);
    if (zgrad) {
      dzb = new_output({B}, opts, poison);
      dzu = new_output({B}, opts, poison);
    }
    ds_copy = at::zeros({B}, opts);
  }

  // ds_into: a (B, G) buffer to write ds into when every row is active (nA = B), instead of a new tensor.
  void alloc_active(const Inputs& in, int64_t nA, bool poison, const at::Tensor* ds_into = nullptr) {
    const auto opts = in.x.options();
    if (ds_into != nullptr && nA == in.B) {
      ds = *ds_into;
      if (poison) ds.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      ds = new_output({nA, in.G}, opts, poison);
    }
    if (in.lng.has_value()) {
      da = new_output({nA, 4 * in.H}, opts, poison);
      dgain = new_output({nA, 4 * in.H}, opts, poison);
      dlcw = new_output({nA, in.H}, opts, poison);
      dlcb = new_output({nA, in.H}, opts, poison);
    }
  }

  // The gradients of U, b and the LN parameters: sums over the active rows. h_active: h's active rows
  // (read only for dU).
  void param_grads(const Inputs& in, const std::array<bool, 13>& mask, bool recompute,
                   const std::function<at::Tensor()>& h_active) {
    const int64_t nA = ds.size(0), H = in.H, H4 = 4 * in.H;
    const auto opts = in.x.options();
    const bool ln = in.lng.has_value();
    if (mask[kU]) {
      out[kU] = nA > 0 ? at::mm(ds.t(), h_active()) : at::zeros_like(in.U);
      if (in.has_z && recompute) out[kU][H4].add_(at::mv(in.h.t(), ds_copy));
    }
    if (mask[kB]) {
      at::Tensor db = nA > 0 ? ds.sum(0) : at::zeros({in.G}, opts);
      if (ln && nA > 0) db.narrow(0, 0, H4).copy_(da.sum(0));
      if (in.has_z && recompute) db[H4].add_(ds_copy.sum());
      out[kB] = db;
    }
    if (ln) {
      if (mask[kLnGates]) out[kLnGates] = nA > 0 ? dgain.sum(0) : at::zeros({H4}, opts);
      if (mask[kLnCellW]) out[kLnCellW] = nA > 0 ? dlcw.sum(0) : at::zeros({H}, opts);
      if (mask[kLnCellB]) out[kLnCellB] = nA > 0 ? dlcb.sum(0) : at::zeros({H}, opts);
    }
  }

  // The 15 outputs of the schema: 13 gradients ((0,) where not asked for), ds and ds_copy.
  std::vector<at::Tensor> finish(const Inputs& in, const std::array<bool, 13>& mask, bool return_ds) {
    const auto opts = in.x.options();
    out[kH] = dh;
    out[kC] = dc;
    out[kZ] = dzb;
    out[kZBelow] = dzu;
    for (int k = 0; k < kNumGrads; ++k) {
      if (!mask[k] || !out[k].defined()) out[k] = at::empty({0}, opts);
    }
    out.push_back(return_ds ? ds_full : at::empty({0}, opts));
    out.push_back(return_ds ? ds_copy : at::empty({0}, opts));
    return out;
  }
};

}  // namespace hmlstm
