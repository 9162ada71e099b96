"""The Triton backend, one package: the whole-sequence kernels (`seq_fwd.py`, `seq_bwd.py`), their shared
@triton.jit helpers (`jit.py`), the launchers registered as `torch.library` ops with their autograd
(`seq_op.py`) and what the launchers share (`runtime.py`).

`hmlstm.backends` uses `sequence_forward` and `unavailable_reason` from here. Without triton installed only
`unavailable_reason` exists, and it says how to install it.
"""

from .runtime import unavailable_reason

try:
    from .seq_op import sequence_forward
except ImportError:  # no triton: unavailable_reason names the fix, and backends never calls this backend
    pass

__all__ = ["sequence_forward", "unavailable_reason"]
