"""What the Triton backend's launchers share: whether it can run on a device (and the fix when not), how a
kernel is launched so that torch.compile and fake tracing see it, and the compute dtype and tile helpers.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

try:
    import triton
    from . import seq_fwd

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # the other backends keep working without triton
    _IMPORT_ERROR = e

def _interpreted() -> bool:
    """True when the kernels were built for Triton's interpreter (TRITON_INTERPRET=1 at import time)."""
    kernel = seq_fwd._seq_pre_kernel
    return not hasattr(kernel, "run") or type(kernel).__name__ == "InterpretedFunction"


def unavailable_reason(device: torch.device | str) -> Optional[str]:
    """None if the Triton backend can run on `device`, else why not and how to fix it."""
    if _IMPORT_ERROR is not None:
        return f"triton could not be imported ({_IMPORT_ERROR}); install it with `pip install triton`"
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1" and _interpreted():
            return None
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after hmlstm's Triton kernels were imported; set it before "
                    "importing hmlstm")
        return ("Triton kernels run on CUDA devices; use a CUDA device, or set TRITON_INTERPRET=1 before "
                "importing hmlstm to run them on the CPU in Triton's (slow) interpreter")
    return f"the Triton backend runs on cuda (or cpu with TRITON_INTERPRET=1), not {device.type}"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch through wrap_triton, which makes the kernel visible to torch.compile and to fake tracing.

    Under TRITON_INTERPRET=1 torch cannot trace interpreted kernels (wrap_triton hands them back as
    plain callables), so when the op is traced with fake tensors there (opcheck, make_fx) the launch is
    skipped: the op's outputs are allocated before the launch, which is all a shape-only run needs.
    """
    if _interpreted() and any(isinstance(a, Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
