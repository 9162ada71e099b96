"""The backend table: which implementation runs the layer-steps, and why one is unavailable.

A backend module provides `cell_step` with the signature of `hmlstm.reference.naive_cell_step`, and may
provide `unavailable_reason(device) -> str | None` (None: usable on that device; otherwise the reason and
the exact fix) and `sequence_forward` with the signature of `hmlstm.sequence.stepwise_forward` minus
`step`, for backends that run the whole time loop themselves.
"""

from __future__ import annotations

import importlib
import warnings
from functools import partial
from typing import Callable, Optional

import torch

from .sequence import stepwise_forward

BACKENDS = ("auto", "reference", "triton", "cpp")
# Names that once existed, and what to use instead.
RETIRED = {"cuda": "the per-step CUDA op (csrc/cell_cuda.cu) was retired for the Triton backend, which runs whole "
                   "sequences on the GPU without host synchronisation (docs/history.md); use backend='triton' or "
                   "'auto'"}

# name -> module that implements it; imported lazily so a missing build only affects that backend.
_MODULES = {
    "reference": "hmlstm.reference",
    "cpp": "hmlstm.ops.cpp",
    "triton": "hmlstm.ops.triton",  # a package: kernels, jit helpers, launcher
}

# What "auto" tries, fastest first, by device type. Triton on the CPU runs only in the interpreter:
# correct but slow, so "auto" never picks it there.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpp", "reference")}


_LOADED: dict = {}
_WARNED: set = set()  # (device type, backend) pairs whose fallback was already announced


def _module(name: str):
    # Cached: after the first (eager) call, torch.compile traces a dict lookup instead of an import.
    if name not in _LOADED:
        _LOADED[name] = importlib.import_module(_MODULES[name])
    return _LOADED[name]


def unavailable_reason(name: str, device: torch.device) -> Optional[str]:
    """None if backend `name` can run on `device`, else a message that says how to get it."""
    if name in RETIRED:
        raise ValueError(f"backend={name!r} no longer exists: {RETIRED[name]}")
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    try:
        mod = _module(name)
    except ImportError as e:
        return f"backend {name!r} could not be imported ({e})"
    check = getattr(mod, "unavailable_reason", None)
    return check(device) if check is not None else None


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends usable on `device`."""
    device = torch.device(device)
    return [n for n in _MODULES if unavailable_reason(n, device) is None]


def resolve(name: str, device: torch.device) -> str:
    """The concrete backend for `name` on `device` ("auto" picks the fastest available)."""
    if name == "auto":
        reasons = []
        for cand in _AUTO_ORDER.get(device.type, ("reference",)):
            reason = unavailable_reason(cand, device)
            if reason is None:
                if reasons and cand == "reference" and (device.type, cand) not in _WARNED:
                    _WARNED.add((device.type, cand))
                    warnings.warn(f"hmlstm: backend='auto' runs on the {cand!r} backend on {device.type}, 2-3x slower "
                                  f"than the fused one, because {reasons[0]}", RuntimeWarning, stacklevel=3)
                return cand
            reasons.append(reason)
        return "reference"
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} is not available on device {device}: {reason}")
    return name


def sequence_fn(name: str) -> Callable:
    """The whole-sequence function of a concrete backend (see `stepwise_forward`)."""
    mod = _module(name)
    seq = getattr(mod, "sequence_forward", None)
    if seq is not None:
        return seq
    step = getattr(mod, "fused_cell_step", None) or getattr(mod, "naive_cell_step")
    return partial(stepwise_forward, step)
