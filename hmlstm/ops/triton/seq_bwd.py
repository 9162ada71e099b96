"""Backward of a whole HM-LSTM sequence in Triton: two kernels per wavefront phase, phases in reverse.

The gradient is the reference's dense straight-through gradient (docs/spec.md, "The gradient"), as in
`hmlstm.reference`. Layer-step (l, t) sends gradients to h_{t-1}^l, c_{t-1}^l, z_{t-1}^l (itself at t-1),
h_t^{l-1}, z_t^{l-1} (the layer below, same step) and h_{t-1}^{l+1} (the layer above): all of them belong to
layer-steps of earlier phases, so when phase p runs, every gradient reaching its layer-steps is complete.
Each of those gradients has its own buffer, written by exactly one layer-step, so no two programs ever add
into the same element (no atomics, a deterministic result):

    DHR  dh_{t-1}^l from (l, t): the direct COPY path and dpre U          (slot t of layer l, HS layout)
    DHB  dh_t^{l-1} from (l, t): z_t^{l-1} dpre W                          (slot t + 1 of layer l - 1)
    DHT  dh_{t-1}^{l+1} from (l, t): z_{t-1}^l dpre V                      (slot t of layer l + 1)
    DCR  dc_{t-1}^l from (l, t)
    DZBE, DZBP  dz_{t-1}^l from (l, t): the element-wise part and the partial sums of <dpre V, h^{l+1}>,
                one per column block of the product (ZS layout times NCB)
    DZUE, DZUP  dz_t^{l-1} from (l, t): likewise with <dpre W, h^{l-1}>

Per phase the launcher issues:

1. `_seq_grad_kernel`, grid (slots, row blocks): sums the pieces into dh_t, dc_t, dz_t of its layer-steps and
   runs the element-wise backward of the cell on them (gates recomputed from the saved pre-activations):
   dpre (kept for all steps: the weight gradients are one GEMM each after the loop), dc_{t-1}, the direct
   part of dh_{t-1}, the element-wise boundary parts, and with layer norm the per-row LN gradient terms. With
   layer norm dh_t is needed in two passes over the row: the first sums its pieces once and leaves the sum in
   DHR's slot t + 1 (read by nobody else), the second reads it back.
2. `_seq_prod_kernel`, grid (3 x slots, row blocks, column blocks): the three products dpre U, dpre W, dpre V
   and the row sums <dpre W, x>, <dpre V, h^{l+1}> of its column block. An all-COPY row block has dpre = 0
   (but for the boundary column under "recompute"), so it multiplies nothing (only that column).

Layer 1's input gradient dx = dpre W for all steps is one GEMM after the loop (z^0 = 1, no boundary below).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import boundary, boundary_grad, cell_branches, cell_moments, gate_moments
from .seq_fwd import (M_B, M_G, M_H, M_HA, M_HASZ, M_I, M_LNCB, M_LNCW, M_LNG, M_ODC, M_ODY, M_OH, M_OPRE, M_OZ,
                      M_U, M_V, M_W, _meta, step_gates)


@triton.jit
def _grad_h(GH, DHR, DHB, DHT, base, hc, m2, more_t, has_above, has_below, HAS_GH: tl.constexpr, CT: tl.constexpr):
    """dL/dh_t of one tile: the upstream gradient plus the pieces that later layer-steps left (base: the
    element offset of slot t + 1)."""
    dh = tl.zeros(hc.shape, dtype=CT)
    if HAS_GH:
        dh += tl.load(GH + base + hc, mask=m2, other=0.0).to(CT)
    if more_t:
        dh += tl.load(DHR + base + hc, mask=m2, other=0.0)
        if has_below:
            dh += tl.load(DHT + base + hc, mask=m2, other=0.0)
    if has_above:
        dh += tl.load(DHB + base + hc, mask=m2, other=0.0)
    return dh


@triton.jit
def _grad_c(GC, DCR, base, hc, m2, more_t, HAS_GC: tl.constexpr, CT: tl.constexpr):
    dc = tl.zeros(hc.shape, dtype=CT)
    if HAS_GC:
        dc += tl.load(GC + base + hc, mask=m2, other=0.0).to(CT)
    if more_t:
        dc += tl.load(DCR + base + hc, mask=m2, other=0.0)
    return dc


@triton.jit
def _partials(DZP, base, n_cb, B, rows, rmask, CT: tl.constexpr, BLOCK_B: tl.constexpr):
    """Sum of the n_cb per-column-block partial row sums at `base` ((NCB, B) per slot)."""
    s = tl.zeros([BLOCK_B], dtype=CT)
    for cb in range(0, n_cb):
        s += tl.load(DZP + base + cb * B + rows, mask=rmask, other=0.0)
    return s


@triton.jit
def _seq_grad_kernel(
    HS, CS, ZS, WALL, META, PRE, SLOPE, NOISE, GH, GC, GZ,
    DHR, DHB, DHT, DCR, DZBE, DZBP, DZUE, DZUP, DZTOT, DPRE, DY, DGAM, DCW, DCB,
    P, T, B, L, NCB, eps,
    HAS_GH: tl.constexpr, HAS_GC: tl.constexpr, HAS_GZ: tl.constexpr,
    LN: tl.constexpr, RECOMPUTE: tl.constexpr, BOUNDARY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
):
    CT = DPRE.dtype.element_ty
    l = P % 2 + 2 * tl.program_id(0)
    t = (P - l) // 2
    if (l < L) & (t >= 0) & (t < T):
        HD = _meta(META, l, M_H)
        HA = _meta(META, l, M_HA)
        G = _meta(META, l, M_G)
        has_z = _meta(META, l, M_HASZ) != 0
        more_t = t + 1 < T
        r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        rmask = r < B
        rows = r.to(tl.int64)
        oh = _meta(META, l, M_OH)
        oz = _meta(META, l, M_OZ)
        zb1, zu1, _, _ = step_gates(ZS, META, l, t, B, rows, rmask, has_z, CT, BLOCK_B)
        zb = zb1[:, None]
        zu = zu1[:, None]
        w_up = (1 - zb) * zu  # weight of UPDATE in the dense form
        w_cp = (1 - zb) * (1 - zu)  # weight of COPY
        Pp = PRE + _meta(META, l, M_OPRE) + t * B * G
        Dp = DPRE + _meta(META, l, M_OPRE) + t * B * G
        Cp = CS + oh + t * B * HD
        Hp = HS + oh + t * B * HD
        nxt = oh + (t + 1) * B * HD  # slot t + 1: h_t, c_t
        Bias = WALL + _meta(META, l, M_B)
        LNG = WALL + _meta(META, l, M_LNG)
        LNCW = WALL + _meta(META, l, M_LNCW)
        LNCB = WALL + _meta(META, l, M_LNCB)
        has_above = l + 1 < L
        has_below = l > 0

        zero = tl.zeros([BLOCK_B], dtype=CT)
        mean, rstd, mu_fl, rs_fl, mu_up, rs_up = zero, zero, zero, zero, zero, zero
        s1_fl, s2_fl, s1_up, s2_up = zero, zero, zero, zero
        if LN:
            mean, rstd = gate_moments(Pp, rows, rmask, HD, G, eps, CT, BLOCK_B, BLOCK_H)
            mu_fl, rs_fl, mu_up, rs_up = cell_moments(Pp, Bias, LNG, Cp, rows, rmask, HD, G, mean, rstd, eps,
                                                      CT, BLOCK_B, BLOCK_H)
            for c0 in range(0, HD, BLOCK_H):
                cols = c0 + tl.arange(0, BLOCK_H)
                cmask = cols < HD
                m2 = rmask[:, None] & cmask[None, :]
                hc = rows[:, None] * HD + cols[None, :]
                f, i, o, g, c, h, c_fl, c_up, x_fl, x_up, a_fl, a_up, cw = cell_branches(
                    Pp, Bias, LNG, LNCW, LNCB, Cp, Hp, rows, rmask, cols, cmask, HD, G, mean, rstd,
                    mu_fl, rs_fl, mu_up, rs_up, True, CT)
                dh = _grad_h(GH, DHR, DHB, DHT, nxt, hc, m2, more_t, has_above, has_below, HAS_GH, CT)
                # kept for the main pass: only this layer-step reads slot t + 1 of DHR (slot T is free)
                tl.store(DHR + nxt + hc, dh, mask=m2)
                dx_fl = tl.where(m2, zb * dh * o * (1 - a_fl * a_fl) * cw, 0.0)
                dx_up = tl.where(m2, w_up * dh * o * (1 - a_up * a_up) * cw, 0.0)
                s1_fl += tl.sum(dx_fl, axis=1)
                s2_fl += tl.sum(dx_fl * x_fl, axis=1)
                s1_up += tl.sum(dx_up, axis=1)
                s2_up += tl.sum(dx_up * x_up, axis=1)
            tl.debug_barrier()  # the summed dh was stored above by other threads of this program

        dzb = tl.zeros([BLOCK_B], dtype=CT)
        dzu = tl.zeros([BLOCK_B], dtype=CT)
        t1 = tl.zeros([BLOCK_B], dtype=CT)
        t2 = tl.zeros([BLOCK_B], dtype=CT)
        oy = _meta(META, l, M_ODY) + t * B * 4 * HD
        od = _meta(META, l, M_ODC) + t * B * HD
        for c0 in range(0, HD, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            cmask = cols < HD
            m2 = rmask[:, None] & cmask[None, :]
            hc = rows[:, None] * HD + cols[None, :]
            f, i, o, g, c, h, c_fl, c_up, x_fl, x_up, a_fl, a_up, cw = cell_branches(
                Pp, Bias, LNG, LNCW, LNCB, Cp, Hp, rows, rmask, cols, cmask, HD, G, mean, rstd,
                mu_fl, rs_fl, mu_up, rs_up, LN, CT)
            if LN:
                dh = tl.load(DHR + nxt + hc, mask=m2, other=0.0)  # summed by the LN pass
            else:
                dh = _grad_h(GH, DHR, DHB, DHT, nxt, hc, m2, more_t, has_above, has_below, HAS_GH, CT)
            dc = _grad_c(GC, DCR, nxt, hc, m2, more_t, HAS_GC, CT)
            h_fl = o * a_fl
            h_up = o * a_up
            g_fl = zb * dh * o * (1 - a_fl * a_fl)
            g_up = w_up * dh * o * (1 - a_up * a_up)
            if LN:
                tl.store(DCW + od + hc, g_fl * x_fl + g_up * x_up, mask=m2)
                tl.store(DCB + od + hc, g_fl + g_up, mask=m2)
                dcf_h = rs_fl[:, None] * (g_fl * cw - s1_fl[:, None] / HD - x_fl * (s2_fl[:, None] / HD))
                dcu_h = rs_up[:, None] * (g_up * cw - s1_up[:, None] / HD - x_up * (s2_up[:, None] / HD))
            else:
                dcf_h = g_fl
                dcu_h = g_up
            d_fl = zb * dc + dcf_h
            d_up = w_up * dc + dcu_h
            d_o = zb * dh * a_fl + w_up * dh * a_up
            d_i = (d_fl + d_up) * g
            d_g = (d_fl + d_up) * i
            d_f = d_up * c
            tl.store(DCR + oh + t * B * HD + hc, w_cp * dc + d_up * f, mask=m2)
            tl.store(DHR + oh + t * B * HD + hc, w_cp * dh, mask=m2)  # _seq_prod_kernel adds dpre U
            # the boundaries select between branches: their gradients are the branch differences
            dzb += tl.sum(tl.where(m2, dc * (c_fl - (zu * c_up + (1 - zu) * c))
                                   + dh * (h_fl - (zu * h_up + (1 - zu) * h)), 0.0), axis=1)
            dzu += tl.sum(tl.where(m2, (1 - zb) * (dc * (c_up - c) + dh * (h_up - h)), 0.0), axis=1)
            y_f = d_f * f * (1 - f)
            y_i = d_i * i * (1 - i)
            y_o = d_o * o * (1 - o)
            y_g = d_g * (1 - g * g)
            pc = rows[:, None] * G + cols[None, :]
            if LN:
                yc = rows[:, None] * (4 * HD) + cols[None, :]
                tl.store(DY + oy + yc, y_f, mask=m2)
                tl.store(DY + oy + yc + HD, y_i, mask=m2)
                tl.store(DY + oy + yc + 2 * HD, y_o, mask=m2)
                tl.store(DY + oy + yc + 3 * HD, y_g, mask=m2)
                t1, t2 = _ln_acc(Pp, LNG, DGAM + oy, y_f, pc, yc, 0 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
                t1, t2 = _ln_acc(Pp, LNG, DGAM + oy, y_i, pc, yc, 1 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
                t1, t2 = _ln_acc(Pp, LNG, DGAM + oy, y_o, pc, yc, 2 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
                t1, t2 = _ln_acc(Pp, LNG, DGAM + oy, y_g, pc, yc, 3 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
            else:
                tl.store(Dp + pc, y_f, mask=m2)
                tl.store(Dp + pc + HD, y_i, mask=m2)
                tl.store(Dp + pc + 2 * HD, y_o, mask=m2)
                tl.store(Dp + pc + 3 * HD, y_g, mask=m2)

        if LN:
            tl.debug_barrier()  # dy was stored above by other threads of this program
            n = 4 * HD
            for c0 in range(0, n, BLOCK_H):
                cols = c0 + tl.arange(0, BLOCK_H)
                cmask = cols < n
                m2 = rmask[:, None] & cmask[None, :]
                y = tl.load(DY + oy + rows[:, None] * n + cols[None, :], mask=m2, other=0.0).to(CT)
                p = tl.load(Pp + rows[:, None] * G + cols[None, :], mask=m2, other=0.0).to(CT)
                xh = (p - mean[:, None]) * rstd[:, None]
                dxh = y * tl.load(LNG + cols, mask=cmask, other=0.0).to(CT)[None, :]
                dp = rstd[:, None] * (dxh - t1[:, None] / n - xh * (t2[:, None] / n))
                tl.store(Dp + rows[:, None] * G + cols[None, :], dp, mask=m2)

        if has_z:
            # dL/dz_t: the upstream gradient and what (l, t + 1) and (l + 1, t) left for it
            ozn = oz + (t + 1) * B
            dz = tl.zeros([BLOCK_B], dtype=CT)
            if HAS_GZ:
                dz += tl.load(GZ + ozn + rows, mask=rmask, other=0.0).to(CT)
            if more_t:
                dz += tl.load(DZBE + ozn + rows, mask=rmask, other=0.0)
                dz += _partials(DZBP, oz * NCB + (t + 1) * NCB * B, tl.cdiv(HA, BLOCK_N), B, rows, rmask,
                                CT, BLOCK_B)
            dz += tl.load(DZUE + ozn + rows, mask=rmask, other=0.0)
            dz += _partials(DZUP, oz * NCB + (t + 1) * NCB * B, tl.cdiv(HD, BLOCK_N), B, rows, rmask, CT, BLOCK_B)
            tl.store(DZTOT + ozn + rows, dz, mask=rmask)
            slope = tl.load(SLOPE).to(CT)
            # on COPY rows pre is the U term alone, so s_z is U h + b there: recompute's z~ on every row
            s_z = tl.load(Pp + rows * G + 4 * HD, mask=rmask, other=0.0).to(CT) + tl.load(Bias + 4 * HD).to(CT)
            if RECOMPUTE:
                tl.store(Dp + rows * G + 4 * HD, dz * boundary_grad(s_z, slope, BOUNDARY), mask=rmask)
            else:
                noise = tl.zeros([BLOCK_B], dtype=CT)
                if BOUNDARY == 1:
                    noise = tl.load(NOISE + (rows * T + t) * (L - 1) + l, mask=rmask, other=0.0).to(CT)
                z_hat = boundary(s_z, slope, noise, BOUNDARY)
                w_z = 1 - (1 - zb1) * (1 - zu1)
                tl.store(Dp + rows * G + 4 * HD, dz * w_z * boundary_grad(s_z, slope, BOUNDARY), mask=rmask)
                dzb += dz * z_hat * (1 - zu1)
                dzu += dz * z_hat * (1 - zb1)
            tl.store(DZBE + oz + t * B + rows, dzb, mask=rmask)
        if has_below:
            tl.store(DZUE + _meta(META, l - 1, M_OZ) + (t + 1) * B + rows, dzu, mask=rmask)


@triton.jit
def _ln_acc(PRE, LNG, DGAM, y, pc, yc, off, cols, cmask, m2, mean, rstd, t1, t2, CT: tl.constexpr):
    """For one gate block: store dy * x_hat (gain gradient) and accumulate the gate LN backward's sums."""
    xh = (tl.load(PRE + pc + off, mask=m2, other=0.0).to(CT) - mean[:, None]) * rstd[:, None]
    tl.store(DGAM + yc + off, y * xh, mask=m2)
    dxh = tl.where(m2, y * tl.load(LNG + off + cols, mask=cmask, other=0.0).to(CT)[None, :], 0.0)
    return t1 + tl.sum(dxh, axis=1), t2 + tl.sum(dxh * xh, axis=1)


@triton.jit
def _seq_prod_kernel(
    HS, ZS, WALL, META, DPRE, DHR, DHB, DHT, DZBP, DZUP,
    P, T, B, L, NCB,
    RECOMPUTE: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CT = DPRE.dtype.element_ty
    kind = tl.program_id(0) % 3  # 0: dpre U, 1: dpre W (to the layer below), 2: dpre V (to the layer above)
    l = P % 2 + 2 * (tl.program_id(0) // 3)
    t = (P - l) // 2
    if (l < L) & (t >= 0) & (t < T):
        HD = _meta(META, l, M_H)
        G = _meta(META, l, M_G)
        has_z = _meta(META, l, M_HASZ) != 0
        N = HD
        woff = _meta(META, l, M_U)
        if kind == 1:
            N = _meta(META, l, M_I) * (l > 0)  # layer 1's dx is one GEMM after the loop
            woff = _meta(META, l, M_W)
        if kind == 2:
            N = _meta(META, l, M_HA)
            woff = _meta(META, l, M_V)
        cb = tl.program_id(2)
        if cb * BLOCK_N < N:
            r = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
            rmask = r < B
            rows = r.to(tl.int64)
            ns = cb * BLOCK_N + tl.arange(0, BLOCK_N)
            nmask = ns < N
            m2 = rmask[:, None] & nmask[None, :]
            zb, zu, any_b, any_u = step_gates(ZS, META, l, t, B, rows, rmask, has_z, CT, BLOCK_B)
            active = any_b | any_u
            # COPY rows have dpre = 0 but in the boundary column under "recompute" (docs/spec.md)
            k_lo = tl.where(active, 0, 4 * HD)
            k_hi = tl.where(active | (RECOMPUTE & has_z), G, k_lo)
            Dp = DPRE + _meta(META, l, M_OPRE) + t * B * G
            Wt = WALL + woff
            acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=CT)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < k_hi
                d = tl.load(Dp + rows[:, None] * G + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
                w = tl.load(Wt + ks[:, None] * N + ns[None, :], mask=kmask[:, None] & nmask[None, :], other=0.0)
                if DOT_F32:  # out_dtype named: see _dot_acc
                    acc = tl.dot(d.to(CT), w.to(CT), acc, input_precision=PREC, out_dtype=CT)
                else:
                    acc = tl.dot(d.to(w.dtype), w, acc, input_precision=PREC, out_dtype=CT)
            nc = rows[:, None] * N + ns[None, :]
            if kind == 0:
                o = DHR + _meta(META, l, M_OH) + t * B * HD
                tl.store(o + nc, tl.load(o + nc, mask=m2, other=0.0) + acc, mask=m2)
            elif kind == 1:
                ob = _meta(META, l - 1, M_OH) + (t + 1) * B * N
                tl.store(DHB + ob + nc, zu[:, None] * acc, mask=m2)
                x = tl.load(HS + ob + nc, mask=m2, other=0.0).to(CT)
                part = tl.sum(tl.where(m2, acc * x, 0.0), axis=1)
                tl.store(DZUP + _meta(META, l - 1, M_OZ) * NCB + ((t + 1) * NCB + cb) * B + rows, part, mask=rmask)
            else:
                oa = _meta(META, l + 1, M_OH) + t * B * N
                tl.store(DHT + oa + nc, zb[:, None] * acc, mask=m2)
                ha = tl.load(HS + oa + nc, mask=m2, other=0.0).to(CT)
                part = tl.sum(tl.where(m2, acc * ha, 0.0), axis=1)
                tl.store(DZBP + _meta(META, l, M_OZ) * NCB + (t * NCB + cb) * B + rows, part, mask=rmask)
