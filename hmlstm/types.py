"""The types every tier shares: a layer's static options, its weights, and the option codes of the ops.

The reference cell, the fused backends and the kernels all import these from here (not from the oracle),
so that a fast path depends on `hmlstm.reference` only in its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from torch import Tensor

BOUNDARY_MODES = ("step", "sample", "soft")
COPY_BOUNDARY_MODES = ("hold", "recompute")
# The integer codes of the boundary modes in the ops' schemas (C++, CUDA and Triton take `int boundary_mode`).
BOUNDARY_CODES = {mode: code for code, mode in enumerate(BOUNDARY_MODES)}  # step 0, sample 1, soft 2

LN_EPS = 1e-5


@dataclass(frozen=True)
class CellConfig:
    """Static options of one layer.

    boundary: "step" | "sample" | "soft"; copy_boundary: "hold" | "recompute" (docs/spec.md, the boundary rule);
    layer_norm: LN on gates and cell; has_boundary: False for the top layer (no z row, never FLUSHes).
    """

    boundary: str = "step"
    copy_boundary: str = "hold"
    layer_norm: bool = False
    has_boundary: bool = True


class LayerParams(NamedTuple):
    """Weights of one layer l with H = H_l, I = H_{l-1} (or the input size), Ha = H_{l+1} (0 on top).

    G = 4H + 1 rows for non-top layers, 4H for the top layer, in the block order f, i, o, g, z.

    W: (G, I) bottom-up, U: (G, H) recurrent, V: (G, Ha) top-down, b: (G,) bias.
    ln_gates: (4H,) gain of the gate LN; ln_cell_w, ln_cell_b: (H,) gain and bias of the cell LN.
    The three LN tensors are None when layer normalization is off.
    """

    W: Tensor
    U: Tensor
    V: Tensor
    b: Tensor
    ln_gates: Optional[Tensor] = None
    ln_cell_w: Optional[Tensor] = None
    ln_cell_b: Optional[Tensor] = None
