"""The Triton backend, one package: kernels (`cell_fwd.py`, `cell_bwd.py`), their shared @triton.jit helpers
(`jit.py`), and the launchers registered as `torch.library` ops with their autograd (`op.py`).

`hmlstm.backends` uses `fused_cell_step` and `unavailable_reason` from here.
"""

from .op import fused_cell_step, unavailable_reason
from .seq_op import sequence_forward

__all__ = ["fused_cell_step", "sequence_forward", "unavailable_reason"]
