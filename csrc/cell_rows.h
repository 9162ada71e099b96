// The row kernels of the CPU op: gates, layer norm, cell and boundary for each row of one layer-step
// (forward_rows) and their backward (backward_rows), with the scalar helpers they use. The math is
// hmlstm/reference.py's naive_cell_step; csrc/cell_cpu.cpp holds the GEMMs and the ops around them.
//
// Included twice, each time into its own namespace HMLSTM_ROWS_NS: by cell_cpu.cpp for any x86-64 CPU
// (hmlstm::base) and by cell_rows_avx2.cpp under `#pragma GCC target("avx2,fma")` (hmlstm::avx2), and
// cell_cpu.cpp picks one at run time. Why: the wheel-less source build must run on the CPU it was built for
// and on older ones, and with SSE only the exp of the sigmoids was the hottest instruction; AVX2 made the
// PTB-size forward 4% faster (2-core AMD EPYC, interleaved runs against an SSE build).
// Include it after every standard and ATen header: those must keep the default target.

#ifndef HMLSTM_ROWS_NS
#error "define HMLSTM_ROWS_NS (the namespace of this copy of the row kernels) before including cell_rows.h"
#endif

#ifndef HMLSTM_BWD_BUFFERS
#define HMLSTM_BWD_BUFFERS
namespace hmlstm {
// What backward_rows reads and writes (one type for both builds of the kernels).
template <typename T>
struct BwdBuffers {
  const T *pre, *gh, *gc, *gz;
  T *ds, *dh, *dc, *dzb, *dzu, *ds_copy;  // ds: (n_active, G); dzb, dzu: (B,) row-local parts
  T *da, *dgain, *dlcw, *dlcb;            // with LN: per active row (n_active, 4H | H)
};
}  // namespace hmlstm
#endif

namespace hmlstm {
namespace HMLSTM_ROWS_NS {

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
        // recompute: z~ of s = U h + b (both gated terms off); hold: the COPY branch's z is the constant 0
        if (L.has_z) z_out[r] = L.recompute ? boundary_value(uz + L.b[H4], L.slope, L.mode, noise) : T(0);
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
        // docs/spec.md, the boundary rule: recompute z = z~; hold z = z~ (1 - (1 - zb)(1 - zu))
        const T zhat = boundary_value(s[H4] + L.b[H4], L.slope, L.mode, noise);
        z_out[r] = L.recompute ? zhat : zhat * (T(1) - (T(1) - zb) * (T(1) - zu));
      }
    }
  });
}

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
      for (int64_t j = 0; j < H; ++j) {
        dcp[j] = wC * dc[j];
        dhp[j] = wC * dh[j];
      }
      // recompute on a COPY row (no ds row): z = z~(U h + z_{t-1} V h' + z^{l-1} W x + b) with both gates 0,
      // so its straight-through gradient ds_copy reaches U[4H], h and b[4H], and z_{t-1} and z^{l-1} through
      // the gated products (V h')[4H] and (W x)[4H].
      T ds_copy = 0;
      if (L.has_z && L.recompute) {
        if (k < 0) ds_copy = dz * boundary_grad(recompute_pre<T>(L, r), L.slope, L.mode);
        o.ds_copy[r] = ds_copy;
        if (ds_copy != T(0)) {
          const T* u4 = L.U + H4 * H;
          for (int64_t j = 0; j < H; ++j) dhp[j] += ds_copy * u4[j];
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
        // d/dz_{t-1} and d/dz_below of the dense selection (docs/spec.md, "The gradient")
        T acc_b = sum8<T>(H, [&](int64_t j) {
          const T hf = og[j] * af[j], hu = og[j] * au[j];
          return dc[j] * (cf[j] - (zu * cu[j] + (T(1) - zu) * cr[j])) +
                 dh[j] * (hf - (zu * hu + (T(1) - zu) * hr[j]));
        });
        T acc_u = sum8<T>(H, [&](int64_t j) { return dc[j] * (cu[j] - cr[j]) + dh[j] * (og[j] * au[j] - hr[j]); });
        acc_u *= T(1) - zb;
        if (L.has_z && !L.recompute) {  // hold: z = z~ (1 - (1 - zb)(1 - zu))
          acc_b += dz * zhat * (T(1) - zu);
          acc_u += dz * zhat * (T(1) - zb);
        }
        if (ds_copy != T(0)) {  // recompute on a COPY row: the gated products (active rows: gated_term_backward)
          acc_b += ds_copy * dot(L.ha + r * L.Ha, L.V + H4 * L.Ha, L.Ha);
          acc_u += ds_copy * dot(L.x + r * L.I, L.W + H4 * L.I, L.I);
        }
        o.dzb[r] = acc_b;
        o.dzu[r] = acc_u;
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
      if (L.has_z) ds[H4] = dz * (L.recompute ? T(1) : T(1) - wC) * boundary_grad(s_z, L.slope, L.mode);
    }
  });
}

}  // namespace HMLSTM_ROWS_NS
}  // namespace hmlstm
