// CUDA kernels of the fused HM-LSTM layer-step: hmlstm::cell_fwd and hmlstm::cell_bwd (schemas in ops.cpp).
//
// The algorithm of cell_cpu.cpp (read its header first), on the GPU:
//   - the rows are classified on the host from a copy of z_{t-1} and z_below: the GEMM sizes depend on the
//     classes, so each call waits for the GPU once (that copy; the row lists then go back in one copy); a
//     time loop inside one kernel, as the Triton backend aims for, is the way past it;
//   - each gated term is one cuBLAS GEMM over exactly the rows whose gate is on (COPY rows: no products);
//   - one launch does the row work: one thread block per row, its threads over the row's units, block
//     reductions (accumulated in double, as the CPU kernel's) for the layer norms and the boundary gradients.
// Per-row scratch lives in a global workspace: H can exceed what shared memory holds.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "cell_common.h"

namespace hmlstm {
namespace {

constexpr int kThreads = 256;

template <typename T>
__device__ inline T dev_exp(T v);
template <>
__device__ inline float dev_exp<float>(float v) {
  return expf(v);
}
template <>
__device__ inline double dev_exp<double>(double v) {
  return exp(v);
}
template <typename T>
__device__ inline T dev_sigm(T v) {
  return T(1) / (T(1) + dev_exp(-v));
}
template <typename T>
__device__ inline T dev_tanh(T v) {
  return tanh(v);
}

// The sum of every thread's v, returned to every thread. shm: 32 doubles of shared memory. Starts with a
// barrier, so that a previous call's result in shm[0] is read by every thread before it is overwritten.
__device__ double block_sum(double v, double* shm) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = (blockDim.x + 31) >> 5;
  __syncthreads();
  if (lane == 0) shm[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < n_warps ? shm[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) shm[0] = v;
  }
  __syncthreads();
  return shm[0];
}

#define ROW_LOOP(j, n) for (int64_t j = threadIdx.x; j < (n); j += blockDim.x)

// Mean and 1/sqrt(var + eps) of v[0:n] (biased variance, as F.layer_norm), accumulated in double.
template <typename T>
__device__ void ln_stats(const T* v, int64_t n, T& mean, T& rstd, double* shm) {
  __syncthreads();  // v may have been written by other threads
  double s = 0;
  ROW_LOOP(j, n) s += v[j];
  const double m = block_sum(s, shm) / n;
  double q = 0;
  ROW_LOOP(j, n) q += (v[j] - m) * (v[j] - m);
  mean = T(m);
  rstd = T(1.0 / sqrt(block_sum(q, shm) / n + kLnEps));
}

// Row-local part of the LN backward: dx = rstd * (dxh - mean(dxh) - xh * mean(dxh * xh)).
template <typename T>
__device__ void ln_backward(const T* dxh, const T* xh, T rstd, int64_t n, T* dx, double* shm) {
  __syncthreads();
  double s1 = 0, s2 = 0;
  ROW_LOOP(j, n) {
    s1 += dxh[j];
    s2 += dxh[j] * xh[j];
  }
  const T m1 = T(block_sum(s1, shm) / n), m2 = T(block_sum(s2, shm) / n);
  ROW_LOOP(j, n) dx[j] = rstd * (dxh[j] - m1 - xh[j] * m2);
}

// act = tanh(c) or tanh(LN(c) * w + bb) over H; with LN also the normalized c (xh) and its rstd.
template <typename T>
__device__ void cell_act(const Cell<T>& L, const T* cv, T* act, T* xh, T& rstd, double* shm) {
  if (!L.ln) {
    ROW_LOOP(j, L.H) act[j] = dev_tanh(cv[j]);
    return;
  }
  T mean;
  ln_stats(cv, L.H, mean, rstd, shm);
  ROW_LOOP(j, L.H) {
    xh[j] = (cv[j] - mean) * rstd;
    act[j] = dev_tanh(xh[j] * L.lcw[j] + L.lcb[j]);
  }
}

// Backward of cell_act: d_act -> dcv, accumulating the cell-LN parameter gradients.
template <typename T>
__device__ void cell_act_backward(const Cell<T>& L, const T* d_act, const T* act, const T* xh, T rstd, T* dcv,
                                  T* dlcw, T* dlcb, T* scratch, double* shm) {
  if (!L.ln) {
    ROW_LOOP(j, L.H) dcv[j] = d_act[j] * (T(1) - act[j] * act[j]);
    return;
  }
  ROW_LOOP(j, L.H) {
    const T dy = d_act[j] * (T(1) - act[j] * act[j]);
    dlcw[j] += dy * xh[j];
    dlcb[j] += dy;
    scratch[j] = dy * L.lcw[j];
  }
  ln_backward(scratch, xh, rstd, L.H, dcv, shm);
}

// Activated gates f, i, o, g (4H) from the bias-free pre-activation s; ends with a barrier (the gates are
// written in 4H-indexing and read in H-indexing).
template <typename T>
__device__ void gates_from_pre(const Cell<T>& L, const T* s, T* gate, T& mean, T& rstd, double* shm) {
  const int64_t H4 = 4 * L.H, H3 = 3 * L.H;
  if (L.ln) ln_stats(s, H4, mean, rstd, shm);
  __syncthreads();
  ROW_LOOP(j, H4) {
    const T v = L.ln ? (s[j] - mean) * rstd * L.lng[j] + L.b[j] : s[j] + L.b[j];
    gate[j] = j < H3 ? dev_sigm(v) : dev_tanh(v);
  }
  __syncthreads();
}

// The branches' cells, cf = i g (FLUSH) and cu = f c + i g (UPDATE), and their activations (for those asked
// for). gate: f, i, o, g (4H) after gates_from_pre's barrier; xf, xu may be one buffer when only af, au are
// read afterwards (the forward).
template <typename T>
__device__ void cell_branches(const Cell<T>& L, const T* gate, const T* cr, bool doF, bool doU, T* cf, T* af, T* xf,
                              T& rf, T* cu, T* au, T* xu, T& ru, double* shm) {
  const int64_t H = L.H;
  const T *f = gate, *i = gate + H, *g = gate + 3 * H;
  if (doF) {
    ROW_LOOP(j, H) cf[j] = i[j] * g[j];
    cell_act(L, cf, af, xf, rf, shm);
  }
  if (doU) {
    ROW_LOOP(j, H) cu[j] = f[j] * cr[j] + i[j] * g[j];
    cell_act(L, cu, au, xu, ru, shm);
  }
}

// Backward of one branch's share w * (h = o act, c): adds to dob (the output gate's gradient) and writes dcv,
// the branch cell's gradient, accumulating the cell-LN parameter gradients. tmp, tmp2: H scratch each.
template <typename T>
__device__ void branch_backward(const Cell<T>& L, T w, const T* dh, const T* dc, const T* og, const T* act,
                                const T* xn, T rn, T* dob, T* dcv, T* dlcw, T* dlcb, T* tmp, T* tmp2, double* shm) {
  ROW_LOOP(j, L.H) {
    const T dhw = w * dh[j];
    dob[j] += dhw * act[j];
    tmp[j] = dhw * og[j];
  }
  cell_act_backward(L, tmp, act, xn, rn, dcv, dlcw, dlcb, tmp2, shm);
  ROW_LOOP(j, L.H) dcv[j] += w * dc[j];
}

// a[0:n] . b[0:n], accumulated in double; every thread gets it.
template <typename T>
__device__ T block_dot(const T* a, const T* b, int64_t n, double* shm) {
  double acc = 0;
  ROW_LOOP(j, n) acc += a[j] * b[j];
  return T(block_sum(acc, shm));
}

// The boundary unit's pre-activation on a COPY row under `recompute`: U h + b (both gated terms off);
// every thread gets it.
template <typename T>
__device__ T recompute_pre(const Cell<T>& L, int64_t r, const T* pu, double* shm) {
  const int64_t H4 = 4 * L.H;
  if (pu != nullptr) return pu[H4] + L.b[H4];
  return block_dot(L.h + r * L.H, L.U + H4 * L.H, L.H, shm) + L.b[H4];
}

// ---------------------------------------------------------------------------------------------------
// Forward

template <typename T>
struct FwdRows {
  const int64_t *pos, *mapU, *mapV, *mapW;  // (B,) each: positions in active / the GEMM outputs, -1: none
  const T *preU, *tV, *tW;                  // the GEMM outputs (rows, G)
  T *pre_out, *h_out, *c_out, *z_out, *work;
};

__host__ __device__ inline int64_t forward_work(int64_t G, int64_t H) {
  return G + 9 * H;  // s, gate (4H), cf, cu, af, au, xh
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_rows_kernel(const Cell<T> L, const FwdRows<T> o) {
  __shared__ double shm[32];
  const int64_t r = blockIdx.x, H = L.H, G = L.G, H4 = 4 * H;
  T* sbuf = o.work + r * forward_work(G, H);
  T *gate = sbuf + G, *cf = gate + H4, *cu = cf + H, *af = cu + H, *au = af + H, *xh = au + H;
  const T zb = L.zb[r], zu = L.zu[r];
  const T *hr = L.h + r * H, *cr = L.c + r * H;
  T *ho = o.h_out + r * H, *co = o.c_out + r * H;
  const T* pu = o.mapU[r] >= 0 ? o.preU + o.mapU[r] * G : nullptr;
  const T noise = L.noise != nullptr ? L.noise[r] : T(0);
  if (o.pos[r] < 0) {  // COPY: no gate work (the branch is uniform over the block)
    ROW_LOOP(j, H) {
      ho[j] = hr[j];
      co[j] = cr[j];
    }
    if (o.pre_out != nullptr) {  // U h when a z gradient needs it, else zeros the backward never reads
      T* pr = o.pre_out + r * G;
      ROW_LOOP(j, G) pr[j] = pu != nullptr ? pu[j] : T(0);
    }
    if (L.has_z) {  // recompute: z~ of s = U h + b (both gated terms off); hold: the COPY branch's z is 0
      const T zn = L.recompute ? boundary_value(recompute_pre(L, r, pu, shm), L.slope, L.mode, noise) : T(0);
      if (threadIdx.x == 0) o.z_out[r] = zn;
    }
    return;
  }
  T* s = o.pre_out != nullptr ? o.pre_out + r * G : sbuf;
  const T* pv = o.mapV[r] >= 0 ? o.tV + o.mapV[r] * G : nullptr;
  const T* pw = o.mapW[r] >= 0 ? o.tW + o.mapW[r] * G : nullptr;
  ROW_LOOP(j, G) {
    T v = pu[j];
    if (pv != nullptr) v += zb * pv[j];
    if (pw != nullptr) v += zu * pw[j];
    s[j] = v;
  }
  T mean = 0, rstd = 0;
  gates_from_pre(L, s, gate, mean, rstd, shm);
  const T* og = gate + 2 * H;
  // Which branches of c = zb cf + (1 - zb)(zu cu + (1 - zu) c) have a non-zero weight.
  const bool flush = zb != T(0), update = zb != T(1) && zu != T(0), keep = zb != T(1) && zu != T(1);
  T rf = 0, ru = 0;
  cell_branches(L, gate, cr, flush, update, cf, af, xh, rf, cu, au, xh, ru, shm);
  ROW_LOOP(j, H) {  // af, au, cf, cu at j were written by this thread
    T cn = flush ? zb * cf[j] : T(0), hn = flush ? zb * (og[j] * af[j]) : T(0);
    if (zb != T(1)) {
      const T ci = (update ? zu * cu[j] : T(0)) + (keep ? (T(1) - zu) * cr[j] : T(0));
      const T hi = (update ? zu * (og[j] * au[j]) : T(0)) + (keep ? (T(1) - zu) * hr[j] : T(0));
      cn += (T(1) - zb) * ci;
      hn += (T(1) - zb) * hi;
    }
    co[j] = cn;
    ho[j] = hn;
  }
  if (L.has_z && threadIdx.x == 0) {
    // docs/spec.md, the boundary rule: recompute z = z~; hold z = z~ (1 - (1 - zb)(1 - zu))
    const T zhat = boundary_value(s[H4] + L.b[H4], L.slope, L.mode, noise);
    o.z_out[r] = L.recompute ? zhat : zhat * (T(1) - (T(1) - zb) * (T(1) - zu));
  }
}

// Host index vectors moved to the device in one copy; tensor k views vs[k].
std::vector<at::Tensor> to_device(const std::vector<const std::vector<int64_t>*>& vs, const at::Device& dev) {
  std::vector<int64_t> flat;
  for (const auto* v : vs) flat.insert(flat.end(), v->begin(), v->end());
  // A blocking copy from pageable memory: `flat` may go away as soon as it returns.
  const at::Tensor all =
      at::from_blob(flat.data(), {static_cast<int64_t>(flat.size())}, at::kLong).to(dev, /*non_blocking=*/false);
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const auto* v : vs) {
    const auto n = static_cast<int64_t>(v->size());
    out.push_back(all.narrow(0, offset, n));
    offset += n;
  }
  return out;
}

// Rows idx (device indices, n of them) of a (B, K) matrix; a itself when idx lists every row in order.
at::Tensor take_rows(const at::Tensor& a, const at::Tensor& idx, bool all_rows) {
  return all_rows ? a : a.index_select(0, idx);
}

void check_no_packed(const std::vector<std::optional<at::Tensor>>& packed) {
  for (const auto& p : packed)
    TORCH_CHECK(!p.has_value(), "hmlstm::cell (CUDA kernel): packed weights are a CPU (oneDNN) feature; pass []");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cell_fwd_cuda(
    const at::Tensor& x, const at::Tensor& z_below, const at::Tensor& h, const at::Tensor& c, const at::Tensor& z,
    const at::Tensor& h_above, const at::Tensor& W, const at::Tensor& U, const at::Tensor& V, const at::Tensor& b,
    const std::optional<at::Tensor>& ln_gates, const std::optional<at::Tensor>& ln_cell_w,
    const std::optional<at::Tensor>& ln_cell_b, const at::Tensor& slope, const std::optional<at::Tensor>& noise,
    int64_t boundary_mode, bool recompute, bool save, bool dense_copy,
    const std::vector<std::optional<at::Tensor>>& packed, bool poison) {
  check_no_packed(packed);
  const c10::cuda::CUDAGuard guard(x.device());
  const Inputs in(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, noise, boundary_mode);
  const auto opts = in.x.options();
  const int64_t B = in.B, H = in.H, G = in.G;
  at::Tensor h_out = new_output({B, H}, opts, poison);
  at::Tensor c_out = new_output({B, H}, opts, poison);
  at::Tensor z_out = new_output({in.has_z ? B : 0}, opts, poison);
  at::Tensor pre = new_output({save ? B : 0, G}, opts, poison);
  if (!save) pre = pre.view({0});
  if (B == 0) return {h_out, c_out, z_out, pre};
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "hmlstm_cell_fwd_cuda", [&] {
    using T = scalar_t;
    const Cell<T> L = in.view<T>(boundary_mode, recompute, slope);
    // The row classes on the host: one device-to-host copy of (z_{t-1}, z_below), which waits for the GPU.
    const at::Tensor zz = at::stack({in.zb, in.zu}).cpu();
    const Rows rs = classify(zz.data_ptr<T>(), zz.data_ptr<T>() + B, B);
    std::vector<int64_t> all_rows(B);
    for (int64_t r = 0; r < B; ++r) all_rows[r] = r;
    const bool u_all = save && dense_copy;  // U h for every row: the z gradients need it on COPY rows too
    const std::vector<int64_t>& u_rows = u_all ? all_rows : rs.active;
    const std::vector<int64_t> none(B, -1);
    const bool do_v = !rs.td.empty() && in.Ha > 0, do_w = !rs.bu.empty() && in.I > 0;
    const std::vector<int64_t> mapU = position_map(u_rows, B);
    const std::vector<int64_t> mapV = do_v ? position_map(rs.td, B) : none;
    const std::vector<int64_t> mapW = do_w ? position_map(rs.bu, B) : none;
    const auto d = to_device({&rs.pos, &mapU, &mapV, &mapW, &u_rows, &rs.td, &rs.bu}, in.x.device());
    // rows @ M^T over the listed rows (no gather when they are every row, in order)
    auto products = [&](const at::Tensor& a, const at::Tensor& idx, size_t n, const at::Tensor& M) {
      return at::mm(take_rows(a, idx, static_cast<int64_t>(n) == B), M.t()).contiguous();
    };
    at::Tensor preU, tV, tW;
    if (!u_rows.empty()) preU = products(in.h, d[4], u_rows.size(), in.U);
    if (do_v) tV = products(in.ha, d[5], rs.td.size(), in.V);
    if (do_w) tW = products(in.x, d[6], rs.bu.size(), in.W);
    at::Tensor work = at::empty({B, forward_work(G, H)}, opts);
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const FwdRows<T> o{d[0].data_ptr<int64_t>(), d[1].data_ptr<int64_t>(), d[2].data_ptr<int64_t>(),
                       d[3].data_ptr<int64_t>(), ptr(preU), ptr(tV), ptr(tW),
                       save ? pre.data_ptr<T>() : nullptr, h_out.data_ptr<T>(), c_out.data_ptr<T>(),
                       in.has_z ? z_out.data_ptr<T>() : nullptr, work.data_ptr<T>()};
    forward_rows_kernel<T><<<B, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(L, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {h_out, c_out, z_out, pre};
}

// ---------------------------------------------------------------------------------------------------
// Backward

template <typename T>
struct BwdRows {
  const int64_t* pos;
  const T *pre, *gh, *gc, *gz;
  T *ds, *dh, *dc, *dzb, *dzu, *ds_copy;  // ds: (n_active, G); dzb, dzu: (B,) row-local parts
  T *da, *dgain, *dlcw, *dlcb;            // with LN: per active row (n_active, 4H | H)
  T* work;
};

__host__ __device__ inline int64_t backward_work(int64_t H) {
  return 23 * H;  // gate, da, xg (4H each); cf cu af au xf xu dcf dcu dob tmp tmp2 (H each)
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_rows_kernel(const Cell<T> L, const BwdRows<T> o, bool zgrad) {
  __shared__ double shm[32];
  const int64_t r = blockIdx.x, H = L.H, G = L.G, H4 = 4 * H;
  T* gate = o.work + r * backward_work(H);
  T *da = gate + H4, *xg = da + H4, *cf = xg + H4, *cu = cf + H, *af = cu + H, *au = af + H, *xf = au + H;
  T *xu = xf + H, *dcf = xu + H, *dcu = dcf + H, *dob = dcu + H, *tmp = dob + H, *tmp2 = tmp + H;
  const T zb = L.zb[r], zu = L.zu[r];
  const T wF = zb, wU = (T(1) - zb) * zu, wC = (T(1) - zb) * (T(1) - zu);
  const T *hr = L.h + r * H, *cr = L.c + r * H;
  const T *dh = o.gh + r * H, *dc = o.gc + r * H;
  const T dz = L.has_z ? o.gz[r] : T(0);
  const T noise = L.noise != nullptr ? L.noise[r] : T(0);
  T *dhp = o.dh + r * H, *dcp = o.dc + r * H;
  const int64_t k = o.pos[r];
  ROW_LOOP(j, H) {
    dcp[j] = wC * dc[j];
    dhp[j] = wC * dh[j];
  }
  // recompute on a COPY row (no ds row): z = z~(U h + z_{t-1} V h' + z^{l-1} W x + b) with both gates 0,
  // so its straight-through gradient ds_copy reaches U[4H], h and b[4H], and z_{t-1} and z^{l-1} through
  // the gated products (V h')[4H] and (W x)[4H]. k is uniform over the block, and so is ds_copy.
  T ds_copy = 0;
  if (L.has_z && L.recompute) {
    if (k < 0) ds_copy = dz * boundary_grad(recompute_pre<T>(L, r, nullptr, shm), L.slope, L.mode);
    if (threadIdx.x == 0) o.ds_copy[r] = ds_copy;
    if (ds_copy != T(0)) {
      const T* u4 = L.U + H4 * H;
      ROW_LOOP(j, H) dhp[j] += ds_copy * u4[j];
    }
  }
  if (k < 0 && !zgrad) return;  // COPY, nothing else wanted: h and c gradients pass through

  // Recompute the gates and the branches (all of them when the z gradients need them).
  const T* s = o.pre + r * G;
  T gmean = 0, grstd = 0;
  gates_from_pre(L, s, gate, gmean, grstd, shm);
  const T *f = gate, *i = f + H, *og = f + 2 * H, *g = f + 3 * H;
  const bool doF = wF != T(0) || zgrad, doU = wU != T(0) || zgrad;
  T rf = 0, ru = 0;
  cell_branches(L, gate, cr, doF, doU, cf, af, xf, rf, cu, au, xu, ru, shm);
  T zhat = 0, s_z = 0;
  if (L.has_z) {
    s_z = s[H4] + L.b[H4];
    zhat = boundary_value(s_z, L.slope, L.mode, noise);
  }
  if (zgrad) {
    // d/dz_{t-1} and d/dz_below of the dense selection (docs/spec.md, "The gradient")
    double pb = 0, pu_ = 0;
    ROW_LOOP(j, H) {
      const T hf = og[j] * af[j], hu = og[j] * au[j];
      pb += dc[j] * (cf[j] - (zu * cu[j] + (T(1) - zu) * cr[j])) + dh[j] * (hf - (zu * hu + (T(1) - zu) * hr[j]));
      pu_ += dc[j] * (cu[j] - cr[j]) + dh[j] * (hu - hr[j]);
    }
    T acc_b = T(block_sum(pb, shm)), acc_u = (T(1) - zb) * T(block_sum(pu_, shm));
    if (L.has_z && !L.recompute) {  // hold: z = z~ (1 - (1 - zb)(1 - zu))
      acc_b += dz * zhat * (T(1) - zu);
      acc_u += dz * zhat * (T(1) - zb);
    }
    if (ds_copy != T(0)) {  // recompute on a COPY row: the gated products (active rows: gated_term_backward)
      acc_b += ds_copy * block_dot(L.ha + r * L.Ha, L.V + H4 * L.Ha, L.Ha, shm);
      acc_u += ds_copy * block_dot(L.x + r * L.I, L.W + H4 * L.I, L.I, shm);
    }
    if (threadIdx.x == 0) {
      o.dzb[r] = acc_b;
      o.dzu[r] = acc_u;
    }
  }
  if (k < 0) return;  // COPY: the gates do not reach any output

  T* dlcw = L.ln ? o.dlcw + k * H : nullptr;
  T* dlcb = L.ln ? o.dlcb + k * H : nullptr;
  ROW_LOOP(j, H) {
    if (L.ln) dlcw[j] = dlcb[j] = T(0);
    dob[j] = dcf[j] = dcu[j] = T(0);
  }
  if (wF != T(0)) branch_backward(L, wF, dh, dc, og, af, xf, rf, dob, dcf, dlcw, dlcb, tmp, tmp2, shm);
  if (wU != T(0)) branch_backward(L, wU, dh, dc, og, au, xu, ru, dob, dcu, dlcw, dlcb, tmp, tmp2, shm);
  ROW_LOOP(j, H) {
    const T dcs = dcf[j] + dcu[j];
    dcp[j] += dcu[j] * f[j];
    da[j] = dcu[j] * cr[j] * f[j] * (T(1) - f[j]);
    da[H + j] = dcs * g[j] * i[j] * (T(1) - i[j]);
    da[2 * H + j] = dob[j] * og[j] * (T(1) - og[j]);
    da[3 * H + j] = dcs * i[j] * (T(1) - g[j] * g[j]);
  }
  __syncthreads();  // da is read in 4H-indexing below
  T* ds = o.ds + k * G;
  if (L.ln) {
    T *dgain = o.dgain + k * H4, *da_out = o.da + k * H4;
    ROW_LOOP(j, H4) {
      da_out[j] = da[j];
      xg[j] = (s[j] - gmean) * grstd;
      dgain[j] = da[j] * xg[j];
      da[j] *= L.lng[j];
    }
    ln_backward(da, xg, grstd, H4, ds, shm);
  } else {
    ROW_LOOP(j, H4) ds[j] = da[j];
  }
  if (L.has_z && threadIdx.x == 0)
    ds[H4] = dz * (L.recompute ? T(1) : T(1) - wC) * boundary_grad(s_z, L.slope, L.mode);
}

// One gated term  gate * (inp @ M^T): the gradients of inp, M and the gate from ds (n_active, G); as
// gated_term_backward in cell_cpu.cpp. on / on_pos: the rows whose gate is on and their positions in ds.
void gated_term_backward(const at::Tensor& ds, const at::Tensor& active, const at::Tensor& on,
                         const at::Tensor& on_pos, const at::Tensor& gate, const at::Tensor& inp,
                         const at::Tensor& M, bool need_inp, bool need_gate, bool need_M, at::Tensor& d_inp,
                         at::Tensor& d_gate, at::Tensor& dM) {
  const int64_t B = inp.size(0), K = inp.size(1), nA = ds.size(0), n_on = on.size(0);
  if (need_inp) d_inp = at::zeros({B, K}, inp.options());
  const bool any = K > 0 && nA > 0;
  if (need_M && (!any || n_on == 0)) dM = at::zeros_like(M);
  if (!any) return;
  if (need_M && n_on > 0)
    dM = at::mm(ds.index_select(0, on_pos).t(), inp.index_select(0, on) * gate.index_select(0, on).unsqueeze(1));
  if (need_gate) {
    const at::Tensor t = at::mm(ds, M);  // (n_active, K)
    d_gate.index_add_(0, active, (t * inp.index_select(0, active)).sum(1));
    if (need_inp) d_inp.index_copy_(0, active, t * gate.index_select(0, active).unsqueeze(1));
  } else if (need_inp && n_on > 0) {
    d_inp.index_copy_(0, on, at::mm(ds.index_select(0, on_pos), M) * gate.index_select(0, on).unsqueeze(1));
  }
}

std::vector<at::Tensor> cell_bwd_cuda(
    const at::Tensor& grad_h, const at::Tensor& grad_c, const at::Tensor& grad_z, const at::Tensor& x,
    const at::Tensor& z_below, const at::Tensor& h, const at::Tensor& c, const at::Tensor& z,
    const at::Tensor& h_above, const at::Tensor& W, const at::Tensor& U, const at::Tensor& V, const at::Tensor& b,
    const std::optional<at::Tensor>& ln_gates, const std::optional<at::Tensor>& ln_cell_w,
    const std::optional<at::Tensor>& ln_cell_b, const at::Tensor& slope, const std::optional<at::Tensor>& noise,
    const at::Tensor& pre_, int64_t boundary_mode, bool recompute, bool dense_copy, std::array<bool, 13> mask,
    bool return_ds, const std::vector<std::optional<at::Tensor>>& packed, bool poison) {
  check_no_packed(packed);
  const c10::cuda::CUDAGuard guard(x.device());
  const Inputs in(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, noise, boundary_mode);
  const auto opts = in.x.options();
  const int64_t B = in.B, G = in.G;
  const bool zgrad = mask[kZ] || mask[kZBelow];
  BwdIO io(in, grad_h, grad_c, grad_z, pre_, zgrad, poison);
  AT_DISPATCH_FLOATING_TYPES(in.x.scalar_type(), "hmlstm_cell_bwd_cuda", [&] {
    using T = scalar_t;
    const Cell<T> L = in.view<T>(boundary_mode, recompute, slope);
    // The row classes on the host: one device-to-host copy of (z_{t-1}, z_below), which waits for the GPU.
    const at::Tensor zz = at::stack({in.zb, in.zu}).cpu();
    const Rows rs = classify(zz.data_ptr<T>(), zz.data_ptr<T>() + B, B);
    const int64_t nA = static_cast<int64_t>(rs.active.size());
    TORCH_CHECK(!zgrad || dense_copy || nA == B,
                "hmlstm::cell_bwd: gradients for z or z_below need cell_fwd(dense_copy=True)");
    std::vector<int64_t> td_pos, bu_pos;  // positions of the gated rows in ds (all of them are active)
    for (int64_t r : rs.td) td_pos.push_back(rs.pos[r]);
    for (int64_t r : rs.bu) bu_pos.push_back(rs.pos[r]);
    const auto d = to_device({&rs.pos, &rs.active, &rs.td, &td_pos, &rs.bu, &bu_pos}, in.x.device());
    const at::Tensor &pos_d = d[0], &active_d = d[1];
    io.alloc_active(in, nA, poison);
    const at::Tensor& ds = io.ds;
    at::Tensor work = at::empty({B, backward_work(in.H)}, opts);
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const BwdRows<T> o{pos_d.data_ptr<int64_t>(), io.pre.data_ptr<T>(), io.gh.data_ptr<T>(), io.gc.data_ptr<T>(),
                       in.has_z ? io.gz.data_ptr<T>() : nullptr, ptr(ds), io.dh.data_ptr<T>(), io.dc.data_ptr<T>(),
                       ptr(io.dzb), ptr(io.dzu), io.ds_copy.data_ptr<T>(), ptr(io.da), ptr(io.dgain), ptr(io.dlcw),
                       ptr(io.dlcb), work.data_ptr<T>()};
    if (B > 0) {
      backward_rows_kernel<T><<<B, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(L, o, zgrad);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (return_ds) io.ds_full = nA == B ? ds : at::zeros({B, G}, opts).index_copy_(0, active_d, ds);

    // The recurrent term U h, never gated: a GEMM over the active rows.
    if (nA > 0 && mask[kH]) {
      if (nA == B) {
        io.dh.addmm_(ds, in.U);
      } else {
        io.dh.index_add_(0, active_d, at::mm(ds, in.U));
      }
    }
    io.param_grads(in, mask, recompute, [&] { return in.h.index_select(0, active_d); });
    gated_term_backward(ds, active_d, d[2], d[3], in.zb, in.ha, in.V, mask[kHAbove], mask[kZ], mask[kV],
                        io.out[kHAbove], io.dzb, io.out[kV]);
    gated_term_backward(ds, active_d, d[4], d[5], in.zu, in.x, in.W, mask[kX], mask[kZBelow], mask[kW],
                        io.out[kX], io.dzu, io.out[kW]);
  });
  return io.finish(in, mask, return_ds);
}

}  // namespace

TORCH_LIBRARY_IMPL(hmlstm, CUDA, m) {
  m.impl("cell_fwd", &cell_fwd_cuda);
  m.impl("cell_bwd", &cell_bwd_cuda);
}

}  // namespace hmlstm
