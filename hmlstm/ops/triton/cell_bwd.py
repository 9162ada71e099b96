"""Backward of one HM-LSTM layer-step in Triton: the element-wise part, fused into one launch.

The gradient is the reference's dense straight-through gradient (docs/spec.md, "The gradient"):
the autograd of

    c_t = zb * c_flush + (1 - zb) * (zu * c_update + (1 - zu) * c)        (h_t alike)

with z as a 0/1 float, and of the boundary rule (docs/spec.md): z_t = z~ (1 - (1 - zb)(1 - zu)) under
"hold", z_t = z~ on every row under "recompute". `_cell_bwd_kernel` (grid: row blocks; one program walks
its rows' columns) recomputes the gates from the forward's saved pre-activations `pre` (B, G) (for COPY
rows the forward saved the U term alone, which is their whole pre-activation) and produces, per row:

* dpre (B, G): the gradient of the pre-activation (zero on COPY rows, but for the boundary unit's column
  under "recompute", whose z~ is computed on every row), from which the launcher gets every matmul
  gradient (dW, dU, dV, dx, dh, dh_above) and the gated-term parts of the boundary gradients,
  <dpre, V h_above> = <dpre V, h_above> for zb and <dpre W, x> for zu;
* the element-wise parts of dzb and dzu (differences of the branches, summed over the row, and under
  "hold" the rule's own z~ (1 - zu), z~ (1 - zb)),
  dc_{t-1} and the direct part of dh_{t-1};
* with layer norm: dy (the gradient of the normalized gates, for the LN bias), dy * x_hat (for the gate
  LN gain) and the cell LN's gain and bias terms, per row; the launcher sums them over the batch.

Passes over a row (all in one program): with layer norm, gate LN moments (2), cell LN moments of both
branches (2), the cell LN backward's two row sums (1); always the main pass (1); with layer norm the
gate LN backward (1), which reads back dy after a barrier.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import boundary, boundary_grad, cell_moments, gate_moments, load_gates, tanh


@triton.jit
def _branches(PRE, Bias, LNG, LNCW, LNCB, Cp, rows, rmask, cols, cmask, HD, G, mean, rstd,
              mu_fl, rs_fl, mu_up, rs_up, LN: tl.constexpr, CT: tl.constexpr):
    """Gates, both candidate cells and their activations for one column block."""
    m2 = rmask[:, None] & cmask[None, :]
    f, i, o, g = load_gates(PRE, Bias, LNG, rows, rmask, cols, cmask, HD, G, mean, rstd, LN, CT)
    c = tl.load(Cp + rows[:, None] * HD + cols[None, :], mask=m2, other=0.0).to(CT)
    c_fl = i * g
    c_up = f * c + i * g
    if LN:
        cw = tl.load(LNCW + cols, mask=cmask, other=0.0).to(CT)[None, :]
        cb = tl.load(LNCB + cols, mask=cmask, other=0.0).to(CT)[None, :]
        x_fl = (c_fl - mu_fl[:, None]) * rs_fl[:, None]
        x_up = (c_up - mu_up[:, None]) * rs_up[:, None]
        a_fl = tanh(x_fl * cw + cb)
        a_up = tanh(x_up * cw + cb)
    else:
        cw = tl.zeros_like(c)
        x_fl = c_fl
        x_up = c_up
        a_fl = tanh(c_fl)
        a_up = tanh(c_up)
    return f, i, o, g, c, c_fl, c_up, x_fl, x_up, a_fl, a_up, cw


@triton.jit
def _cell_bwd_kernel(
    PRE, Hp, Cp, ZB, ZU, NOISE, SLOPE, Bias, LNG, LNCW, LNCB, DH, DC, DZ,
    DPRE, DY, DGAM, DCW, DCB, DC_PREV, DH_DIR, DZB, DZU,
    B, HD, eps,
    BOUNDARY: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_Z: tl.constexpr, LN: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    CT = DPRE.dtype.element_ty  # compute dtype: fp64 for fp64 inputs, else fp32
    pid_b = tl.program_id(0)
    G = 4 * HD + HAS_Z
    rows = (pid_b * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    rmask = rows < B
    zb1 = tl.load(ZB + rows, mask=rmask, other=0.0).to(CT)
    zu1 = tl.load(ZU + rows, mask=rmask, other=0.0).to(CT)
    zb = zb1[:, None]
    zu = zu1[:, None]
    w_up = (1 - zb) * zu  # weight of UPDATE in the dense form
    w_cp = (1 - zb) * (1 - zu)  # weight of COPY

    zero = tl.zeros([BLOCK_B], dtype=CT)
    mean, rstd, mu_fl, rs_fl, mu_up, rs_up = zero, zero, zero, zero, zero, zero
    s1_fl, s2_fl, s1_up, s2_up = zero, zero, zero, zero
    if LN:
        mean, rstd = gate_moments(PRE, rows, rmask, HD, G, eps, CT, BLOCK_B, BLOCK_H)
        mu_fl, rs_fl, mu_up, rs_up = cell_moments(PRE, Bias, LNG, Cp, rows, rmask, HD, G, mean, rstd, eps,
                                                  CT, BLOCK_B, BLOCK_H)
        # the cell LN backward needs two row sums per branch before any dc can be formed
        for c0 in range(0, HD, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            cmask = cols < HD
            m2 = rmask[:, None] & cmask[None, :]
            f, i, o, g, c, c_fl, c_up, x_fl, x_up, a_fl, a_up, cw = _branches(
                PRE, Bias, LNG, LNCW, LNCB, Cp, rows, rmask, cols, cmask, HD, G, mean, rstd,
                mu_fl, rs_fl, mu_up, rs_up, LN, CT)
            dh = tl.load(DH + rows[:, None] * HD + cols[None, :], mask=m2, other=0.0).to(CT)
            dx_fl = tl.where(m2, zb * dh * o * (1 - a_fl * a_fl) * cw, 0.0)
            dx_up = tl.where(m2, w_up * dh * o * (1 - a_up * a_up) * cw, 0.0)
            s1_fl += tl.sum(dx_fl, axis=1)
            s2_fl += tl.sum(dx_fl * x_fl, axis=1)
            s1_up += tl.sum(dx_up, axis=1)
            s2_up += tl.sum(dx_up * x_up, axis=1)

    dzb = tl.zeros([BLOCK_B], dtype=CT)
    dzu = tl.zeros([BLOCK_B], dtype=CT)
    t1 = tl.zeros([BLOCK_B], dtype=CT)
    t2 = tl.zeros([BLOCK_B], dtype=CT)
    for c0 in range(0, HD, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        cmask = cols < HD
        m2 = rmask[:, None] & cmask[None, :]
        hc = rows[:, None] * HD + cols[None, :]
        f, i, o, g, c, c_fl, c_up, x_fl, x_up, a_fl, a_up, cw = _branches(
            PRE, Bias, LNG, LNCW, LNCB, Cp, rows, rmask, cols, cmask, HD, G, mean, rstd,
            mu_fl, rs_fl, mu_up, rs_up, LN, CT)
        h = tl.load(Hp + hc, mask=m2, other=0.0).to(CT)
        dh = tl.load(DH + hc, mask=m2, other=0.0).to(CT)
        dc = tl.load(DC + hc, mask=m2, other=0.0).to(CT)
        h_fl = o * a_fl
        h_up = o * a_up
        # through the cell activation (and the cell LN) of each branch
        g_fl = zb * dh * o * (1 - a_fl * a_fl)
        g_up = w_up * dh * o * (1 - a_up * a_up)
        if LN:
            tl.store(DCW + hc, g_fl * x_fl + g_up * x_up, mask=m2)
            tl.store(DCB + hc, g_fl + g_up, mask=m2)
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
        tl.store(DC_PREV + hc, w_cp * dc + d_up * f, mask=m2)
        tl.store(DH_DIR + hc, w_cp * dh, mask=m2)
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
            tl.store(DY + yc, y_f, mask=m2)
            tl.store(DY + yc + HD, y_i, mask=m2)
            tl.store(DY + yc + 2 * HD, y_o, mask=m2)
            tl.store(DY + yc + 3 * HD, y_g, mask=m2)
            t1, t2 = _ln_acc(PRE, LNG, DGAM, y_f, pc, yc, 0 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
            t1, t2 = _ln_acc(PRE, LNG, DGAM, y_i, pc, yc, 1 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
            t1, t2 = _ln_acc(PRE, LNG, DGAM, y_o, pc, yc, 2 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
            t1, t2 = _ln_acc(PRE, LNG, DGAM, y_g, pc, yc, 3 * HD, cols, cmask, m2, mean, rstd, t1, t2, CT)
        else:
            tl.store(DPRE + pc, y_f, mask=m2)
            tl.store(DPRE + pc + HD, y_i, mask=m2)
            tl.store(DPRE + pc + 2 * HD, y_o, mask=m2)
            tl.store(DPRE + pc + 3 * HD, y_g, mask=m2)

    if LN:
        tl.debug_barrier()  # dy was stored above by other threads of this program
        n = 4 * HD
        for c0 in range(0, n, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            cmask = cols < n
            m2 = rmask[:, None] & cmask[None, :]
            y = tl.load(DY + rows[:, None] * n + cols[None, :], mask=m2, other=0.0).to(CT)
            p = tl.load(PRE + rows[:, None] * G + cols[None, :], mask=m2, other=0.0).to(CT)
            xh = (p - mean[:, None]) * rstd[:, None]
            dxh = y * tl.load(LNG + cols, mask=cmask, other=0.0).to(CT)[None, :]
            dp = rstd[:, None] * (dxh - t1[:, None] / n - xh * (t2[:, None] / n))
            tl.store(DPRE + rows[:, None] * G + cols[None, :], dp, mask=m2)

    if HAS_Z:
        zrow = 4 * HD
        slope = tl.load(SLOPE).to(CT)
        # on COPY rows pre is the U term alone, so s_z is U h + b there: recompute's z~ on every row
        s_z = tl.load(PRE + rows * G + zrow, mask=rmask, other=0.0).to(CT) + tl.load(Bias + zrow).to(CT)
        dz = tl.load(DZ + rows, mask=rmask, other=0.0).to(CT)
        if RECOMPUTE:
            # z = z~ on every row: ds_z is unmasked, and the launcher's <dpre W, x>, <dpre V, h_above> carry it
            # to zu and zb through the gated products (COPY rows included)
            tl.store(DPRE + rows * G + zrow, dz * boundary_grad(s_z, slope, BOUNDARY), mask=rmask)
        else:
            # hold: z = z~ (1 - (1 - zb)(1 - zu)) (docs/spec.md, the boundary rule)
            noise = tl.zeros([BLOCK_B], dtype=CT)
            if BOUNDARY == 1:
                noise = tl.load(NOISE + rows, mask=rmask, other=0.0).to(CT)
            z_hat = boundary(s_z, slope, noise, BOUNDARY)
            w_z = 1 - (1 - zb1) * (1 - zu1)
            tl.store(DPRE + rows * G + zrow, dz * w_z * boundary_grad(s_z, slope, BOUNDARY), mask=rmask)
            dzb += dz * z_hat * (1 - zu1)
            dzu += dz * z_hat * (1 - zb1)
    tl.store(DZB + rows, dzb, mask=rmask)
    tl.store(DZU + rows, dzu, mask=rmask)


@triton.jit
def _ln_acc(PRE, LNG, DGAM, y, pc, yc, off, cols, cmask, m2, mean, rstd, t1, t2, CT: tl.constexpr):
    """For one gate block: store dy * x_hat (gain gradient) and accumulate the gate LN backward's sums."""
    xh = (tl.load(PRE + pc + off, mask=m2, other=0.0).to(CT) - mean[:, None]) * rstd[:, None]
    tl.store(DGAM + yc + off, y * xh, mask=m2)
    dxh = tl.where(m2, y * tl.load(LNG + off + cols, mask=cmask, other=0.0).to(CT)[None, :], 0.0)
    return t1 + tl.sum(dxh, axis=1), t2 + tl.sum(dxh * xh, axis=1)
