"""Forward of a whole HM-LSTM sequence in Triton: two kernels per wavefront phase, every layer of the phase in
each launch (the fused tier of `hmlstm.sequence.stepwise_forward` over `naive_cell_step`).

Layer l at step t needs layer l-1 at t, layer l at t-1 and layer l+1 at t-1, so every (l, t) with the same
p = 2t + l can run together: phases p = 0 .. 2T + L - 3, and the layers of phase p are l = p mod 2, p mod 2 + 2,
... (grid axis 0: one slot per such layer; a slot whose (l, t) is outside the sequence does nothing). The
launcher (seq_op.py) issues, per phase:

1. `_seq_pre_kernel`, grid (slots, row blocks, column blocks of H): the gate pre-activations without bias,

       pre = U h_{t-1}  +  zb * (V h_{t-1}^{l+1})  +  zu * (W h_t^{l-1})

   into PRE (the layer-1 term W x was computed for all steps as one GEMM beforehand: XW). A term is skipped by
   every program whose rows all have a zero gate for it (zb for V, zu for W), so COPY rows (zb = zu = 0) do
   no V and W work; without a gradient they do no gate work at all (under copy_boundary="recompute" one row
   dot for their boundary unit, U[4H] . h). With a gradient (SAVE) they keep the U term: the backward's
   boundary gradients recompute their gates from it (docs/spec.md, "The gradient").
2. `_seq_update_kernel`, grid (slots, row blocks): per row, the gate LN moments, the gates, both candidate cells
   and their cell LN, h_t, c_t and z_t by the boundary rule (docs/spec.md); an all-COPY row block copies h, c.

No program reads anything the host must know: the phase index p is a launch argument, every per-layer size
and offset comes from a small int64 table (META, one row per layer; see seq_op.py for its columns), and a row
block decides its own work from the z it loads.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import boundary, cell_branches, cell_moments, gate_moments

# META columns (one int64 row per layer); seq_op.META_COLUMNS holds the same names in the same order.
# tl.constexpr: a @triton.jit function may read a module global only if it is one.
NF = 18
(M_I, M_H, M_HA, M_G, M_HASZ, M_W, M_U, M_V, M_B, M_LNG, M_LNCW, M_LNCB,
 M_OH, M_OC, M_OZ, M_OPRE, M_ODY, M_ODC) = (tl.constexpr(k) for k in range(NF))


@triton.jit
def _meta(META, l, col):
    return tl.load(META + l * 18 + col)


@triton.jit
def step_gates(ZS, META, l, t, B, rows, rmask, has_z, CT: tl.constexpr, BLOCK_B: tl.constexpr):
    """The two boundaries that gate layer-step (l, t), per row: zb = z_{t-1}^l (0 on the top layer) and
    zu = z_t^{l-1} (1 on the first layer), and whether any row of the block has each one on."""
    zb = tl.zeros([BLOCK_B], dtype=CT)
    if has_z:
        zb = tl.load(ZS + _meta(META, l, M_OZ) + t * B + rows, mask=rmask, other=0.0).to(CT)
    zu = tl.where(rmask, 1.0, 0.0).to(CT)
    if l > 0:
        zu = tl.load(ZS + _meta(META, l - 1, M_OZ) + (t + 1) * B + rows, mask=rmask, other=0.0).to(CT)
    return zb, zu, tl.max(tl.abs(zb), axis=0) > 0, tl.max(tl.abs(zu), axis=0) > 0


@triton.jit
def _dot_acc(acc, a, w, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    # out_dtype named: Triton 3.6 (the GPU image's) defaults it to float32 whatever the accumulator, and a float64
    # accumulator then fails to compile; 3.9 takes it from the accumulator
    if DOT_F32:
        return tl.dot(a.to(acc.dtype), w.to(acc.dtype), acc, input_precision=PREC, out_dtype=acc.dtype)
    return tl.dot(a, w, acc, input_precision=PREC, out_dtype=acc.dtype)


@triton.jit
def _term(acc_f, acc_i, acc_o, acc_g, acc_z, A, Wt, rows, rmask, cols, cmask, K, HD, do_z,
          BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """acc_* += A[rows, :K] @ Wt[gate * HD + cols, :K]^T for the four gates (Wt row-major (G, K)); in column
    block 0 (do_z) also the boundary unit, row 4 HD, as a row dot."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(A + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wm = kmask[:, None] & cmask[None, :]
        wp = Wt + cols[None, :] * K + ks[:, None]
        acc_f = _dot_acc(acc_f, a, tl.load(wp, mask=wm, other=0.0), DOT_F32, PREC)
        acc_i = _dot_acc(acc_i, a, tl.load(wp + HD * K, mask=wm, other=0.0), DOT_F32, PREC)
        acc_o = _dot_acc(acc_o, a, tl.load(wp + 2 * HD * K, mask=wm, other=0.0), DOT_F32, PREC)
        acc_g = _dot_acc(acc_g, a, tl.load(wp + 3 * HD * K, mask=wm, other=0.0), DOT_F32, PREC)
        if do_z:
            wz = tl.load(Wt + 4 * HD * K + ks, mask=kmask, other=0.0)
            acc_z += tl.sum(a.to(acc_z.dtype) * wz.to(acc_z.dtype)[None, :], axis=1)
    return acc_f, acc_i, acc_o, acc_g, acc_z


@triton.jit
def _seq_pre_kernel(
    XW, HS, ZS, WALL, META, PRE,
    P, T, B, L,
    SAVE: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr, RECOMPUTE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CT = PRE.dtype.element_ty  # fp64 for fp64 inputs, else fp32
    l = P % 2 + 2 * tl.program_id(0)
    t = (P - l) // 2
    if (l < L) & (t >= 0) & (t < T):
        HD = _meta(META, l, M_H)
        if tl.program_id(2) * BLOCK_H < HD:
            I = _meta(META, l, M_I)
            HA = _meta(META, l, M_HA)
            G = _meta(META, l, M_G)
            has_z = _meta(META, l, M_HASZ) != 0
            r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
            rmask = r < B
            rows = r.to(tl.int64)
            cols = tl.program_id(2) * BLOCK_H + tl.arange(0, BLOCK_H)
            cmask = cols < HD
            m2 = rmask[:, None] & cmask[None, :]
            do_z = has_z & (tl.program_id(2) == 0)
            zb, zu, any_b, any_u = step_gates(ZS, META, l, t, B, rows, rmask, has_z, CT, BLOCK_B)
            Hp = HS + _meta(META, l, M_OH) + t * B * HD
            Wb = WALL + _meta(META, l, M_W)
            Ub = WALL + _meta(META, l, M_U)
            slot = t
            if not SAVE:
                slot = t * 0  # without a gradient one (B, G) scratch per layer serves every step
            Pp = PRE + _meta(META, l, M_OPRE) + slot * B * G
            pc = rows[:, None] * G + cols[None, :]
            if (any_b | any_u) | SAVE:
                acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                s_z = tl.zeros([BLOCK_B], dtype=CT)
                if any_b & (HA > 0):  # top-down, gated by zb
                    Ha_p = HS + _meta(META, l + 1, M_OH) + t * B * HA
                    Vb = WALL + _meta(META, l, M_V)
                    v_z = tl.zeros([BLOCK_B], dtype=CT)
                    acc_f, acc_i, acc_o, acc_g, v_z = _term(acc_f, acc_i, acc_o, acc_g, v_z, Ha_p, Vb, rows, rmask,
                                                            cols, cmask, HA, HD, do_z, BLOCK_K, DOT_F32, PREC)
                    acc_f *= zb[:, None]
                    acc_i *= zb[:, None]
                    acc_o *= zb[:, None]
                    acc_g *= zb[:, None]
                    s_z += zb * v_z
                if any_u:  # bottom-up, gated by zu
                    if l == 0:
                        # layer 1's W x, all steps in one GEMM before the loop: XW (T, B, G)
                        xp = XW + t * B * G + pc
                        acc_f += tl.load(xp, mask=m2, other=0.0).to(CT)
                        acc_i += tl.load(xp + HD, mask=m2, other=0.0).to(CT)
                        acc_o += tl.load(xp + 2 * HD, mask=m2, other=0.0).to(CT)
                        acc_g += tl.load(xp + 3 * HD, mask=m2, other=0.0).to(CT)
                        if do_z:
                            s_z += tl.load(XW + t * B * G + rows * G + 4 * HD, mask=rmask, other=0.0).to(CT)
                    else:
                        Xp = HS + _meta(META, l - 1, M_OH) + (t + 1) * B * I
                        t_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                        t_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                        t_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                        t_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
                        w_z = tl.zeros([BLOCK_B], dtype=CT)
                        t_f, t_i, t_o, t_g, w_z = _term(t_f, t_i, t_o, t_g, w_z, Xp, Wb, rows, rmask, cols, cmask,
                                                        I, HD, do_z, BLOCK_K, DOT_F32, PREC)
                        acc_f += zu[:, None] * t_f
                        acc_i += zu[:, None] * t_i
                        acc_o += zu[:, None] * t_o
                        acc_g += zu[:, None] * t_g
                        s_z += zu * w_z
                u_z = tl.zeros([BLOCK_B], dtype=CT)
                acc_f, acc_i, acc_o, acc_g, u_z = _term(acc_f, acc_i, acc_o, acc_g, u_z, Hp, Ub, rows, rmask, cols,
                                                        cmask, HD, HD, do_z, BLOCK_K, DOT_F32, PREC)
                tl.store(Pp + pc, acc_f, mask=m2)
                tl.store(Pp + pc + HD, acc_i, mask=m2)
                tl.store(Pp + pc + 2 * HD, acc_o, mask=m2)
                tl.store(Pp + pc + 3 * HD, acc_g, mask=m2)
                if do_z:
                    tl.store(Pp + rows * G + 4 * HD, s_z + u_z, mask=rmask)
            else:
                # an all-COPY block without a gradient: no gate work; under "recompute" the boundary unit's
                # pre-activation is U[4H] . h (both gated terms are off)
                if RECOMPUTE & do_z:
                    s = tl.zeros([BLOCK_B], dtype=CT)
                    for k0 in range(0, HD, BLOCK_K):
                        ks = k0 + tl.arange(0, BLOCK_K)
                        kmask = ks < HD
                        a = tl.load(Hp + rows[:, None] * HD + ks[None, :], mask=rmask[:, None] & kmask[None, :],
                                    other=0.0)
                        wz = tl.load(Ub + 4 * HD * HD + ks, mask=kmask, other=0.0)
                        s += tl.sum(a.to(CT) * wz.to(CT)[None, :], axis=1)
                    tl.store(Pp + rows * G + 4 * HD, s, mask=rmask)


@triton.jit
def _seq_update_kernel(
    HS, CS, ZS, WALL, META, PRE, SLOPE, NOISE,
    P, T, B, L, eps,
    SAVE: tl.constexpr, LN: tl.constexpr, RECOMPUTE: tl.constexpr, BOUNDARY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    CT = PRE.dtype.element_ty
    l = P % 2 + 2 * tl.program_id(0)
    t = (P - l) // 2
    if (l < L) & (t >= 0) & (t < T):
        HD = _meta(META, l, M_H)
        G = _meta(META, l, M_G)
        has_z = _meta(META, l, M_HASZ) != 0
        r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = r < B
        rows = r.to(tl.int64)
        zb1, zu1, any_b, any_u = step_gates(ZS, META, l, t, B, rows, rmask, has_z, CT, BLOCK_B)
        active = any_b | any_u
        oh = _meta(META, l, M_OH)
        oc = _meta(META, l, M_OC)
        Hp = HS + oh + t * B * HD
        Cp = CS + oc + t * B * HD
        Hn = HS + oh + (t + 1) * B * HD
        Cn = CS + oc + (t + 1) * B * HD
        slot = t
        if not SAVE:
            slot = t * 0
        Pp = PRE + _meta(META, l, M_OPRE) + slot * B * G
        Bias = WALL + _meta(META, l, M_B)
        LNG = WALL + _meta(META, l, M_LNG)
        if active:
            zero = tl.zeros([BLOCK_B], dtype=CT)
            mean, rstd, mu_fl, rs_fl, mu_up, rs_up = zero, zero, zero, zero, zero, zero
            if LN:
                mean, rstd = gate_moments(Pp, rows, rmask, HD, G, eps, CT, BLOCK_B, BLOCK_H)
                mu_fl, rs_fl, mu_up, rs_up = cell_moments(Pp, Bias, LNG, Cp, rows, rmask, HD, G, mean, rstd, eps,
                                                          CT, BLOCK_B, BLOCK_H)
            zb = zb1[:, None]
            zu = zu1[:, None]
            LNCW = WALL + _meta(META, l, M_LNCW)
            LNCB = WALL + _meta(META, l, M_LNCB)
            for c0 in range(0, HD, BLOCK_H):
                cols = c0 + tl.arange(0, BLOCK_H)
                cmask = cols < HD
                m2 = rmask[:, None] & cmask[None, :]
                hc = rows[:, None] * HD + cols[None, :]
                f, i, o, g, c, h, c_flush, c_update, _, _, a_fl, a_up, _ = cell_branches(
                    Pp, Bias, LNG, LNCW, LNCB, Cp, Hp, rows, rmask, cols, cmask, HD, G, mean, rstd,
                    mu_fl, rs_fl, mu_up, rs_up, LN, CT)
                # the dense form of the reference: COPY rows of a mixed block come out exact
                c_new = zb * c_flush + (1 - zb) * (zu * c_update + (1 - zu) * c)
                h_new = zb * (o * a_fl) + (1 - zb) * (zu * (o * a_up) + (1 - zu) * h)
                tl.store(Cn + hc, c_new.to(Cn.dtype.element_ty), mask=m2)
                tl.store(Hn + hc, h_new.to(Hn.dtype.element_ty), mask=m2)
        else:
            for c0 in range(0, HD, BLOCK_H):
                cols = c0 + tl.arange(0, BLOCK_H)
                m2 = rmask[:, None] & (cols < HD)[None, :]
                hc = rows[:, None] * HD + cols[None, :]
                tl.store(Cn + hc, tl.load(Cp + hc, mask=m2, other=0.0), mask=m2)
                tl.store(Hn + hc, tl.load(Hp + hc, mask=m2, other=0.0), mask=m2)
        if has_z:
            # docs/spec.md, the boundary rule: recompute z = z~ on every row (on COPY rows PRE's boundary
            # column is U h alone); hold z = z~ (1 - (1 - zb)(1 - zu)), 0 on COPY rows
            s = tl.load(Pp + rows * G + 4 * HD, mask=rmask, other=0.0).to(CT) + tl.load(Bias + 4 * HD).to(CT)
            slope = tl.load(SLOPE).to(CT)
            noise = tl.zeros([BLOCK_B], dtype=CT)
            if BOUNDARY == 1:
                noise = tl.load(NOISE + (rows * T + t) * (L - 1) + l, mask=rmask, other=0.0).to(CT)
            if RECOMPUTE:
                z_new = boundary(s, slope, noise, BOUNDARY)
            elif active:
                z_new = boundary(s, slope, noise, BOUNDARY) * (1 - (1 - zb1) * (1 - zu1))
            else:
                z_new = tl.zeros([BLOCK_B], dtype=CT)
            tl.store(ZS + _meta(META, l, M_OZ) + (t + 1) * B + rows, z_new.to(ZS.dtype.element_ty), mask=rmask)
