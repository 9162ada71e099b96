"""Draw the boundaries each HM-LSTM layer detects over a text (the paper's Figure 2).

    zs = model.boundaries(text)                       # L-1 tensors (N,)
    plot_boundaries(text, zs, "boundaries.png", true=word_boundaries(text))
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import Tensor


def _shown(c: str) -> str:
    return {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}.get(c, c if c.isprintable() else "\ufffd")


def plot_boundaries(text: str, zs: Sequence[Tensor], out: str | os.PathLike, true: Optional[Tensor] = None,
                    width: int = 64, title: Optional[str] = None) -> None:
    """Save a figure: the text in rows of `width` characters, under each row one strip per layer with a
    filled cell where z = 1 (layer 1 at the bottom, as in the paper), and optionally a strip of the true
    boundaries.

    Args:
        text: N characters.
        zs: L-1 tensors (N,), each layer's boundaries (values in [0, 1]).
        out: image path; the format follows the suffix (.png, .pdf, .svg).
        true: (N,) bool reference boundaries (e.g. `hmlstm.metrics.word_boundaries(text)`), or None.
        width: characters per row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = len(text)
    if N == 0:
        raise ValueError("text must not be empty")
    for k, z in enumerate(zs):
        if z.shape != (N,):
            raise ValueError(f"zs[{k}] must have shape ({N},) like the text, got {tuple(z.shape)}")
    strips = [(f"z{k + 1}", z.float()) for k, z in enumerate(zs)][::-1]  # top layer first
    if true is not None:
        strips.append(("true", true.float()))
    rows = (N + width - 1) // width
    fig_h = max(1.5, rows * (0.35 * len(strips) + 0.5))
    fig, axes = plt.subplots(rows, 1, figsize=(max(6.0, width * 0.17), fig_h), squeeze=False)
    for r in range(rows):
        ax = axes[r, 0]
        lo, hi = r * width, min(N, (r + 1) * width)
        grid = torch.zeros(len(strips), width)
        for s, (_, z) in enumerate(strips):
            grid[s, : hi - lo] = z[lo:hi]
        ax.imshow(grid.numpy(), cmap="Greys", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(strips)), [name for name, _ in strips], fontsize=7)
        ax.set_xticks(range(hi - lo), [_shown(c) for c in text[lo:hi]], fontsize=7, fontfamily="monospace")
        ax.tick_params(length=0)
        ax.set_xlim(-0.5, width - 0.5)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
