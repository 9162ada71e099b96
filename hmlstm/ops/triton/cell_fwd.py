"""Forward of one HM-LSTM layer-step in Triton (the fused tier of `hmlstm.reference.naive_cell_step`).

Rows (batch entries) arrive through a permutation `perm` that the launcher sorts by operation, so that
programs see blocks of rows that need the same terms, and a device scalar `n_act`, the number of rows
that are not COPY (COPY rows come last). No host synchronisation is needed: a program reads `n_act`
and decides what to do for its whole row block.

`_cell_pre_kernel`, grid (row blocks, column blocks of H). For its rows and columns a program
accumulates the four gate pre-activations in fp32 (fp64 for fp64 inputs) with `tl.dot`:

    pre = U h  +  zb * (V h_above)  +  zu * (W x)         (no bias; the reference's `pre`)

* A block of COPY rows (zb = zu = 0) does no gate work: it copies h and c (and, under
  copy_boundary="recompute", computes the single boundary dot U[4H] . h). With SAVE (a gradient is
  required) it also computes the U term alone, which is all the backward needs for those rows.
* The top-down and bottom-up terms are skipped by every program whose rows all have zb = 0 (resp.
  zu = 0): those products are never multiplied.
* Without layer norm every column is independent, so the same program finishes the step: gate
  non-linearities, c/h update in the dense form of the reference, writing h_t and c_t once.
* Column block 0 also computes the boundary unit (a row dot product, not a tile) and writes z_t by the
  boundary rule (docs/spec.md): z~ under "recompute", z~ (1 - (1 - zb)(1 - zu)) under "hold".

With layer norm the gates need statistics over the full 4H row, and the cell LN over the full H row;
`_cell_ln_update_kernel` (grid: row blocks) then reads `pre` back and makes three passes over the row
(gate LN moments, cell LN moments of both branches, update). Launches per layer-step: one without
layer norm, two with it.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .jit import boundary, cell_moments, gate_moments, load_gates, sigmoid, tanh


@triton.jit
def _gate_dot(acc, a, Wt, wrow0, cols, cmask, ks, kmask, K, DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """acc += a @ Wt[wrow0 + cols, ks]^T for one gate block: a (BB, BK), result (BB, BH)."""
    w = tl.load(Wt + (wrow0 + cols)[None, :] * K + ks[:, None], mask=kmask[:, None] & cmask[None, :], other=0.0)
    if DOT_F32:
        return tl.dot(a.to(acc.dtype), w.to(acc.dtype), acc, input_precision=PREC)
    return tl.dot(a, w, acc, input_precision=PREC)


@triton.jit
def _term(acc_f, acc_i, acc_o, acc_g, acc_z, A, Wt, rows, rmask, cols, cmask, K, HD, zrow,
          do_z, HAS_Z: tl.constexpr, BLOCK_K: tl.constexpr,
          DOT_F32: tl.constexpr, PREC: tl.constexpr):
    """The four gate blocks (and, in column block 0, the boundary unit) of A @ Wt^T, accumulated onto acc_*."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(A + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc_f = _gate_dot(acc_f, a, Wt, 0 * HD, cols, cmask, ks, kmask, K, DOT_F32, PREC)
        acc_i = _gate_dot(acc_i, a, Wt, 1 * HD, cols, cmask, ks, kmask, K, DOT_F32, PREC)
        acc_o = _gate_dot(acc_o, a, Wt, 2 * HD, cols, cmask, ks, kmask, K, DOT_F32, PREC)
        acc_g = _gate_dot(acc_g, a, Wt, 3 * HD, cols, cmask, ks, kmask, K, DOT_F32, PREC)
        if HAS_Z:
            if do_z:  # column block 0 only
                wz = tl.load(Wt + zrow * K + ks, mask=kmask, other=0.0)
                acc_z += tl.sum(a.to(acc_z.dtype) * wz.to(acc_z.dtype)[None, :], axis=1)
    return acc_f, acc_i, acc_o, acc_g, acc_z


@triton.jit
def _row_dot(A, w, rows, rmask, K, acc, BLOCK_K: tl.constexpr):
    """acc + A[rows] . w (a (BB,) vector), without tiles: the boundary unit of one term."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        a = tl.load(A + rows[:, None] * K + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        wz = tl.load(w + ks, mask=kmask, other=0.0)
        acc += tl.sum(a.to(acc.dtype) * wz.to(acc.dtype)[None, :], axis=1)
    return acc


@triton.jit
def _cell_pre_kernel(
    X, ZU, Hp, Cp, ZB, HA, W, U, V, Bias, SLOPE, NOISE, PERM, NACT,
    H_OUT, C_OUT, Z_OUT, PRE,
    B, I, HD, HAD,
    BOUNDARY: tl.constexpr, RECOMPUTE: tl.constexpr, HAS_Z: tl.constexpr, LN: tl.constexpr,
    SAVE: tl.constexpr, DOT_F32: tl.constexpr, PREC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    CT = PRE.dtype.element_ty  # compute dtype: fp64 for fp64 inputs, else fp32
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    G = 4 * HD + HAS_Z
    r = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = r < B
    rows = tl.load(PERM + r, mask=rmask, other=0).to(tl.int64)
    cols = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    cmask = cols < HD
    m2 = rmask[:, None] & cmask[None, :]
    n_act = tl.load(NACT)
    row0 = pid_b * BLOCK_B
    is_active = row0 < n_act  # sorted: a block starting past n_act holds COPY rows only
    zb = tl.load(ZB + rows, mask=rmask, other=0.0).to(CT)
    zu = tl.load(ZU + rows, mask=rmask, other=0.0).to(CT)
    hc = rows[:, None] * HD + cols[None, :]
    do_z = pid_h == 0  # the boundary unit is computed by column block 0 (and only when HAS_Z)
    if SAVE:
        gate_rows = B  # every block: COPY rows need the U term for their boundary gradients
    else:
        gate_rows = n_act

    if row0 < gate_rows:
        acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
        acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
        acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
        acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
        z_v = tl.zeros([BLOCK_B], dtype=CT)
        z_w = tl.zeros([BLOCK_B], dtype=CT)
        zrow = 4 * HD
        # top-down term, only if some row of the block has zb != 0 (never on COPY blocks)
        if tl.max(tl.abs(zb), axis=0) > 0:
            acc_f, acc_i, acc_o, acc_g, z_v = _term(acc_f, acc_i, acc_o, acc_g, z_v, HA, V, rows, rmask, cols,
                                                    cmask, HAD, HD, zrow, do_z, HAS_Z, BLOCK_K, DOT_F32, PREC)
            acc_f *= zb[:, None]
            acc_i *= zb[:, None]
            acc_o *= zb[:, None]
            acc_g *= zb[:, None]
        # bottom-up term, only if some row has zu != 0
        if tl.max(tl.abs(zu), axis=0) > 0:
            t_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
            t_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
            t_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
            t_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=CT)
            t_f, t_i, t_o, t_g, z_w = _term(t_f, t_i, t_o, t_g, z_w, X, W, rows, rmask, cols,
                                            cmask, I, HD, zrow, do_z, HAS_Z, BLOCK_K, DOT_F32, PREC)
            acc_f += zu[:, None] * t_f
            acc_i += zu[:, None] * t_i
            acc_o += zu[:, None] * t_o
            acc_g += zu[:, None] * t_g
        # recurrent term, always
        z_u = tl.zeros([BLOCK_B], dtype=CT)
        acc_f, acc_i, acc_o, acc_g, z_u = _term(acc_f, acc_i, acc_o, acc_g, z_u, Hp, U, rows, rmask, cols,
                                                cmask, HD, HD, zrow, do_z, HAS_Z, BLOCK_K, DOT_F32, PREC)
        if SAVE or LN:
            pc = rows[:, None] * G + cols[None, :]
            tl.store(PRE + pc, acc_f, mask=m2)
            tl.store(PRE + pc + HD, acc_i, mask=m2)
            tl.store(PRE + pc + 2 * HD, acc_o, mask=m2)
            tl.store(PRE + pc + 3 * HD, acc_g, mask=m2)
        if not LN:
            if is_active:
                # gates and the dense update of the reference (COPY rows of a mixed block come out exact)
                f = sigmoid(acc_f + tl.load(Bias + cols, mask=cmask, other=0.0).to(CT)[None, :])
                i = sigmoid(acc_i + tl.load(Bias + HD + cols, mask=cmask, other=0.0).to(CT)[None, :])
                o = sigmoid(acc_o + tl.load(Bias + 2 * HD + cols, mask=cmask, other=0.0).to(CT)[None, :])
                g = tanh(acc_g + tl.load(Bias + 3 * HD + cols, mask=cmask, other=0.0).to(CT)[None, :])
                c = tl.load(Cp + hc, mask=m2, other=0.0).to(CT)
                h = tl.load(Hp + hc, mask=m2, other=0.0).to(CT)
                c_flush = i * g
                c_update = f * c + i * g
                h_flush = o * tanh(c_flush)
                h_update = o * tanh(c_update)
                zb2 = zb[:, None]
                zu2 = zu[:, None]
                c_new = zb2 * c_flush + (1 - zb2) * (zu2 * c_update + (1 - zu2) * c)
                h_new = zb2 * h_flush + (1 - zb2) * (zu2 * h_update + (1 - zu2) * h)
                tl.store(C_OUT + hc, c_new.to(C_OUT.dtype.element_ty), mask=m2)
                tl.store(H_OUT + hc, h_new.to(H_OUT.dtype.element_ty), mask=m2)
        if HAS_Z:
            if do_z:
                bz = tl.load(Bias + zrow).to(CT)
                pre_z = z_u + zb * z_v + zu * z_w
                if SAVE or LN:
                    tl.store(PRE + rows * G + zrow, pre_z, mask=rmask)
                slope = tl.load(SLOPE).to(CT)
                noise = tl.zeros([BLOCK_B], dtype=CT)
                if BOUNDARY == 1:
                    noise = tl.load(NOISE + rows, mask=rmask, other=0.0).to(CT)
                z_hat = boundary(pre_z + bz, slope, noise, BOUNDARY)
                # docs/spec.md, the boundary rule: recompute z = z~ (on COPY rows pre_z is U h alone);
                # hold z = z~ (1 - (1 - zb)(1 - zu)), 0 on COPY rows
                if RECOMPUTE:
                    z_new = z_hat
                else:
                    z_new = z_hat * (1 - (1 - zb) * (1 - zu))
                tl.store(Z_OUT + rows, z_new.to(Z_OUT.dtype.element_ty), mask=rmask)
    if not is_active:
        # COPY block: h and c unchanged
        tl.store(C_OUT + hc, tl.load(Cp + hc, mask=m2, other=0.0), mask=m2)
        tl.store(H_OUT + hc, tl.load(Hp + hc, mask=m2, other=0.0), mask=m2)
        if not SAVE:  # (with SAVE the gate block above wrote z)
            if HAS_Z:
                if do_z:
                    # z~ of the single row U[4H] . h + b (both gated terms off), or hold's constant 0
                    if RECOMPUTE:
                        bz = tl.load(Bias + 4 * HD).to(CT)
                        slope = tl.load(SLOPE).to(CT)
                        noise = tl.zeros([BLOCK_B], dtype=CT)
                        if BOUNDARY == 1:
                            noise = tl.load(NOISE + rows, mask=rmask, other=0.0).to(CT)
                        s_copy = _row_dot(Hp, U + 4 * HD * HD, rows, rmask, HD, tl.zeros([BLOCK_B], dtype=CT),
                                          BLOCK_K) + bz
                        z_out = boundary(s_copy, slope, noise, BOUNDARY)
                    else:
                        z_out = tl.zeros([BLOCK_B], dtype=CT)
                    tl.store(Z_OUT + rows, z_out.to(Z_OUT.dtype.element_ty), mask=rmask)


@triton.jit
def _cell_ln_update_kernel(
    ZU, Hp, Cp, ZB, Bias, LNG, LNCW, LNCB, PERM, NACT, PRE, H_OUT, C_OUT,
    B, HD, eps,
    HAS_Z: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Layer-norm forward of the non-COPY row blocks: gate LN, c update, cell LN, h (the pre kernel copies
    COPY blocks)."""
    CT = PRE.dtype.element_ty
    pid_b = tl.program_id(0)
    G = 4 * HD + HAS_Z
    r = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = r < B
    rows = tl.load(PERM + r, mask=rmask, other=0).to(tl.int64)
    n_act = tl.load(NACT)
    if pid_b * BLOCK_B < n_act:
        zb = tl.load(ZB + rows, mask=rmask, other=0.0).to(CT)[:, None]
        zu = tl.load(ZU + rows, mask=rmask, other=0.0).to(CT)[:, None]
        mean, rstd = gate_moments(PRE, rows, rmask, HD, G, eps, CT, BLOCK_B, BLOCK_H)
        mu_fl, rs_fl, mu_up, rs_up = cell_moments(PRE, Bias, LNG, Cp, rows, rmask, HD, G, mean, rstd, eps,
                                                  CT, BLOCK_B, BLOCK_H)
        for c0 in range(0, HD, BLOCK_H):
            cols = c0 + tl.arange(0, BLOCK_H)
            cmask = cols < HD
            m2 = rmask[:, None] & cmask[None, :]
            hc = rows[:, None] * HD + cols[None, :]
            f, i, o, g = load_gates(PRE, Bias, LNG, rows, rmask, cols, cmask, HD, G, mean, rstd, True, CT)
            c = tl.load(Cp + hc, mask=m2, other=0.0).to(CT)
            h = tl.load(Hp + hc, mask=m2, other=0.0).to(CT)
            cw = tl.load(LNCW + cols, mask=cmask, other=0.0).to(CT)[None, :]
            cb = tl.load(LNCB + cols, mask=cmask, other=0.0).to(CT)[None, :]
            c_flush = i * g
            c_update = f * c + i * g
            h_flush = o * tanh((c_flush - mu_fl[:, None]) * rs_fl[:, None] * cw + cb)
            h_update = o * tanh((c_update - mu_up[:, None]) * rs_up[:, None] * cw + cb)
            c_new = zb * c_flush + (1 - zb) * (zu * c_update + (1 - zu) * c)
            h_new = zb * h_flush + (1 - zb) * (zu * h_update + (1 - zu) * h)
            tl.store(C_OUT + hc, c_new.to(C_OUT.dtype.element_ty), mask=m2)
            tl.store(H_OUT + hc, h_new.to(H_OUT.dtype.element_ty), mask=m2)
