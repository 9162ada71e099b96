"""The @triton.jit helpers that the forward and backward kernels share: gate non-linearities, the boundary
and its straight-through derivative, and the layer-norm passes over a row of pre-activations.

Public names on purpose: seq_fwd.py and seq_bwd.py both import them from here.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # tanh from exp(-2|x|): no overflow, and no libdevice call that would tie the kernel to one backend
    t = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(x < 0, -y, y)


@triton.jit
def boundary(s, slope, noise, MODE: tl.constexpr):
    """z from the boundary pre-activation s (see hmlstm.boundary): step, sample or soft."""
    if MODE == 0:
        z = tl.where(s > 0, 1.0, 0.0).to(s.dtype)
    else:
        hs = tl.minimum(tl.maximum((slope * s + 1.0) * 0.5, 0.0), 1.0)
        if MODE == 1:
            z = tl.where(noise < hs, 1.0, 0.0).to(s.dtype)
        else:
            z = hs
    return z


@triton.jit
def boundary_grad(s, slope, MODE: tl.constexpr):
    """d z / d s: the straight-through a/2 where |a s| < 1 (step, sample), the clamp's gradient (soft)."""
    if MODE == 2:
        v = (slope * s + 1.0) * 0.5
        inside = (v >= 0.0) & (v <= 1.0)
    else:
        inside = tl.abs(slope * s) < 1.0
    return tl.where(inside, 0.5 * slope, 0.0).to(s.dtype)


@triton.jit
def load_gates(PRE, Bias, LNG, rows, rmask, cols, cmask, HD, G, mean, rstd, LN: tl.constexpr, CT: tl.constexpr):
    """f, i, o, g for one column block, from the saved `pre` (gate LN with the row's mean/rstd if LN)."""
    m2 = rmask[:, None] & cmask[None, :]
    base = PRE + rows[:, None] * G + cols[None, :]
    pf = tl.load(base, mask=m2, other=0.0).to(CT)
    pi = tl.load(base + HD, mask=m2, other=0.0).to(CT)
    po = tl.load(base + 2 * HD, mask=m2, other=0.0).to(CT)
    pg = tl.load(base + 3 * HD, mask=m2, other=0.0).to(CT)
    if LN:
        pf = (pf - mean[:, None]) * rstd[:, None] * tl.load(LNG + cols, mask=cmask, other=0.0).to(CT)[None, :]
        pi = (pi - mean[:, None]) * rstd[:, None] * tl.load(LNG + HD + cols, mask=cmask, other=0.0).to(CT)[None, :]
        po = (po - mean[:, None]) * rstd[:, None] * tl.load(LNG + 2 * HD + cols, mask=cmask, other=0.0).to(CT)[None, :]
        pg = (pg - mean[:, None]) * rstd[:, None] * tl.load(LNG + 3 * HD + cols, mask=cmask, other=0.0).to(CT)[None, :]
    f = sigmoid(pf + tl.load(Bias + cols, mask=cmask, other=0.0).to(CT)[None, :])
    i = sigmoid(pi + tl.load(Bias + HD + cols, mask=cmask, other=0.0).to(CT)[None, :])
    o = sigmoid(po + tl.load(Bias + 2 * HD + cols, mask=cmask, other=0.0).to(CT)[None, :])
    g = tanh(pg + tl.load(Bias + 3 * HD + cols, mask=cmask, other=0.0).to(CT)[None, :])
    return f, i, o, g


@triton.jit
def gate_moments(PRE, rows, rmask, HD, G, eps, CT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Mean and 1/std over the 4H gate pre-activations of each row (two passes, as F.layer_norm)."""
    s = tl.zeros([BLOCK_B], dtype=CT)
    for c0 in range(0, 4 * HD, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        m2 = rmask[:, None] & (cols < 4 * HD)[None, :]
        s += tl.sum(tl.load(PRE + rows[:, None] * G + cols[None, :], mask=m2, other=0.0).to(CT), axis=1)
    mean = s / (4 * HD)
    v = tl.zeros([BLOCK_B], dtype=CT)
    for c0 in range(0, 4 * HD, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        m2 = rmask[:, None] & (cols < 4 * HD)[None, :]
        d = tl.load(PRE + rows[:, None] * G + cols[None, :], mask=m2, other=0.0).to(CT) - mean[:, None]
        d = tl.where(m2, d, 0.0)
        v += tl.sum(d * d, axis=1)
    rstd = 1.0 / tl.sqrt(v / (4 * HD) + eps)
    return mean, rstd


@triton.jit
def cell_moments(PRE, Bias, LNG, Cp, rows, rmask, HD, G, mean, rstd, eps,
                 CT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """Mean and 1/std over H of both candidate cells, c_flush = i g and c_update = f c + i g."""
    s_fl = tl.zeros([BLOCK_B], dtype=CT)
    s_up = tl.zeros([BLOCK_B], dtype=CT)
    for c0 in range(0, HD, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        cmask = cols < HD
        m2 = rmask[:, None] & cmask[None, :]
        f, i, o, g = load_gates(PRE, Bias, LNG, rows, rmask, cols, cmask, HD, G, mean, rstd, True, CT)
        c = tl.load(Cp + rows[:, None] * HD + cols[None, :], mask=m2, other=0.0).to(CT)
        s_fl += tl.sum(tl.where(m2, i * g, 0.0), axis=1)
        s_up += tl.sum(tl.where(m2, f * c + i * g, 0.0), axis=1)
    mu_fl = s_fl / HD
    mu_up = s_up / HD
    v_fl = tl.zeros([BLOCK_B], dtype=CT)
    v_up = tl.zeros([BLOCK_B], dtype=CT)
    for c0 in range(0, HD, BLOCK_H):
        cols = c0 + tl.arange(0, BLOCK_H)
        cmask = cols < HD
        m2 = rmask[:, None] & cmask[None, :]
        f, i, o, g = load_gates(PRE, Bias, LNG, rows, rmask, cols, cmask, HD, G, mean, rstd, True, CT)
        c = tl.load(Cp + rows[:, None] * HD + cols[None, :], mask=m2, other=0.0).to(CT)
        d_fl = tl.where(m2, i * g - mu_fl[:, None], 0.0)
        d_up = tl.where(m2, f * c + i * g - mu_up[:, None], 0.0)
        v_fl += tl.sum(d_fl * d_fl, axis=1)
        v_up += tl.sum(d_up * d_up, axis=1)
    rs_fl = 1.0 / tl.sqrt(v_fl / HD + eps)
    rs_up = 1.0 / tl.sqrt(v_up / HD + eps)
    return mu_fl, rs_fl, mu_up, rs_up


@triton.jit
def cell_branches(PRE, Bias, LNG, LNCW, LNCB, Cp, Hp, rows, rmask, cols, cmask, HD, G, mean, rstd,
                  mu_fl, rs_fl, mu_up, rs_up, LN: tl.constexpr, CT: tl.constexpr):
    """For one column block: the gates, c_{t-1} and h_{t-1}, both candidate cells c_flush = i g and
    c_update = f c + i g, what their tanh takes (x: the cell-LN-normalized cell with LN, the cell without) and
    the activations a = tanh(x * gain + bias) (tanh(c) without LN), and the cell LN gain (zeros without LN)."""
    m2 = rmask[:, None] & cmask[None, :]
    hc = rows[:, None] * HD + cols[None, :]
    f, i, o, g = load_gates(PRE, Bias, LNG, rows, rmask, cols, cmask, HD, G, mean, rstd, LN, CT)
    c = tl.load(Cp + hc, mask=m2, other=0.0).to(CT)
    h = tl.load(Hp + hc, mask=m2, other=0.0).to(CT)
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
    return f, i, o, g, c, h, c_fl, c_up, x_fl, x_up, a_fl, a_up, cw
