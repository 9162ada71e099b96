"""The compiled extension `hmlstm._C`, and what torch needs on top of its ops, for every device.

The op schemas are declared once in csrc/ops.cpp (`TORCH_LIBRARY(hmlstm, ...)`) and implemented per device
(csrc/cell_cpu.cpp, csrc/seq_cpu.cpp, CPU kernels). This module loads the
extension (optional: without it the package runs on the other backends; an install without it compiles
the CPU part on first use, see `_build_on_first_use`) and registers, in one place,
the fake kernels (shapes for torch.compile and opcheck) and the autograd formula of `hmlstm::cell_fwd`.
The C++ backend (`hmlstm.ops.cpp`, `hmlstm.ops.cpp_sequence`) uses it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from ..types import BOUNDARY_CODES, COPY_BOUNDARY_MODES, CellConfig, LayerParams
from .common import poison_enabled

BUILD_COMMAND = "pip install torch==2.13.0 && pip install --no-build-isolation -e ."

# The compile flags of setup.py's build, for the build on first use. -fno-trapping-math lets GCC vectorize the
# kernels' branch-free float exp (torch itself builds with it and -fno-math-errno).
CXX_FLAGS = ["-O3", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
NO_JIT_ENV = "HMLSTM_NO_JIT"


def _sources() -> list[Path]:
    """The extension's C++ sources: csrc/ of a source checkout, or the copy an installed wheel ships."""
    here = Path(__file__).resolve()
    for folder in (here.parents[2] / "csrc", here.parents[1] / "csrc"):
        found = sorted(folder.glob("*.cpp"))
        if found:
            return found
    return []


def _build_on_first_use(why: ImportError) -> Optional[BaseException]:
    """Compile the CPU extension with torch.utils.cpp_extension.load (cached by torch, keyed by the sources and
    flags) when the installed package has none, e.g. after a plain `pip install .` whose isolated build could
    not see torch. None when it loaded, else the error (the package then runs on the other backends)."""
    if os.environ.get(NO_JIT_ENV, "0") == "1":
        return why
    sources = _sources()
    compiler = os.environ.get("CXX", "c++")
    if not sources or shutil.which(compiler) is None:
        return why
    from torch.utils import cpp_extension

    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    print(f"hmlstm: building the C++ extension for torch {torch.__version__} (once, cached in {where}) ...",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        cpp_extension.load("hmlstm_C", [str(s) for s in sources], extra_cflags=CXX_FLAGS,
                           extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False)
    except Exception as e:  # the compiler's output is in the exception; the package still works without it
        print(f"hmlstm: the build failed after {time.perf_counter() - t0:.0f} s: {str(e)[-500:]}", file=sys.stderr)
        return ImportError(f"the build on first use failed ({type(e).__name__}); {why}")
    print(f"hmlstm: built the C++ extension in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return None


try:  # the extension is optional: without it the package runs on the other backends
    from .. import _C  # noqa: F401  (loading it registers torch.ops.hmlstm.*)

    IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built, or built against another torch (undefined symbols)
    IMPORT_ERROR = _build_on_first_use(e)

HALF = (torch.float16, torch.bfloat16)
# The differentiable inputs of cell_fwd, in its argument order (and cell_bwd's output order).
GRAD_INPUTS = ("x", "z_below", "h", "c", "z", "h_above", "W", "U", "V", "b", "ln_gates", "ln_cell_w",
                "ln_cell_b")



if IMPORT_ERROR is None:

    # Why: torch.compile and opcheck trace the op with FakeTensors, which need the output shapes
    # without running the kernel.
    @torch.library.register_fake("hmlstm::cell_fwd")
    def _cell_fwd_fake(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise,
                       boundary_mode, recompute, save, dense_copy, packed, poison):
        B, H = h.shape
        G = U.shape[0]
        has_z = G == 4 * H + 1
        pre = x.new_empty(B, G) if save else x.new_empty(0)
        return h.new_empty(B, H), c.new_empty(B, H), z.new_empty(B if has_z else 0), pre

    # Why: the backward op is traced as well when torch.compile builds the joint graph.
    @torch.library.register_fake("hmlstm::cell_bwd")
    def _cell_bwd_fake(grad_h, grad_c, grad_z, x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w,
                       ln_cell_b, slope, noise, pre, boundary_mode, recompute, dense_copy, output_mask, return_ds,
                       packed, poison):
        like = (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b)
        grads = [t.new_empty(t.shape) if (need and t is not None) else x.new_empty(0)
                 for t, need in zip(like, output_mask)]
        B, G = pre.shape
        extra = [x.new_empty(B, G), x.new_empty(B)] if return_ds else [x.new_empty(0), x.new_empty(0)]
        return grads + extra

    # Why: opcheck (and any tracer) needs seq_fwd's output shapes without running the loop.
    @torch.library.register_fake("hmlstm::seq_fwd")
    def _seq_fwd_fake(x, h0, c0, z0, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise, boundary_mode,
                      recompute, save, dense_copy, packed, poison):
        T, B, _ = x.shape
        hs = [x.new_empty(T + 1, B, h.shape[1]) for h in h0]
        cs = [x.new_empty(T + 1, B, h.shape[1]) for h in h0]
        zs = [x.new_empty(T + 1, B) for _ in z0]
        pres = [x.new_empty(T, B, u.shape[0]) if save else x.new_empty(0) for u in U]
        return hs, cs, zs, pres

    @torch.library.register_fake("hmlstm::seq_bwd")
    def _seq_bwd_fake(grad_h, grad_c, grad_z, grad_hT, grad_cT, grad_zT, x, hs, cs, zs, pres, W, U, V, b, ln_gates,
                      ln_cell_w, ln_cell_b, slope, noise, boundary_mode, recompute, dense_copy, needs, packed,
                      chunk_rows, poison):
        L = len(hs)
        dx = x.new_empty(x.shape) if needs[0] else x.new_empty(0)
        state = [s.new_empty(s.shape[1:]) for s in (*hs, *cs, *zs)]
        params = [p for layer in zip(W, U, V, b, ln_gates, ln_cell_w, ln_cell_b) for p in layer]
        flags = needs[1 + 3 * L - 1:]
        grads = [p.new_empty(p.shape) if (need and p is not None) else x.new_empty(0) for p, need in zip(params, flags)]
        dz_total = [x.new_empty(x.shape[0], x.shape[1]) for _ in zs]
        return [dx, *state, *grads, *dz_total]

    def _setup_context(ctx, inputs, output):
        (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise,
         boundary_mode, recompute, save, dense_copy, packed, poison) = inputs
        if not save:
            raise RuntimeError("hmlstm::cell_fwd was called with save=False on inputs that require grad; "
                               "call it through hmlstm.ops.cpp.fused_cell_step")
        ctx.save_for_backward(x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope,
                              noise, output[3])
        ctx.boundary_mode, ctx.recompute, ctx.dense_copy = boundary_mode, recompute, dense_copy
        ctx.n_packed = len(packed)

    def _backward(ctx, grad_h, grad_c, grad_z, _grad_pre):
        (x, z_below, h, c, z, h_above, W, U, V, b, ln_gates, ln_cell_w, ln_cell_b, slope, noise,
         pre) = ctx.saved_tensors
        grad_h = grad_h if grad_h is not None else torch.zeros_like(h)
        grad_c = grad_c if grad_c is not None else torch.zeros_like(c)
        if grad_z is None:  # z_t unused downstream (always so for the top layer's empty z_t)
            grad_z = z.new_zeros(z.shape[0] if U.shape[0] == 4 * h.shape[1] + 1 else 0)
        mask = list(ctx.needs_input_grad[: len(GRAD_INPUTS)])
        grads = torch.ops.hmlstm.cell_bwd(grad_h, grad_c, grad_z, x, z_below, h, c, z, h_above, W, U, V, b,
                                          ln_gates, ln_cell_w, ln_cell_b, slope, noise, pre, ctx.boundary_mode,
                                          ctx.recompute, ctx.dense_copy, mask, False, [], poison_enabled())
        grads = tuple(g if need else None for g, need in zip(grads[: len(GRAD_INPUTS)], mask))
        # slope (annealed, not learned), noise, the static arguments, and the packed weights (a list: the
        # gradient's structure must match it)
        return grads + (None,) * 6 + ([None] * ctx.n_packed, None)

    # Why: cell_fwd is a C++ op without an Autograd kernel; this attaches the fused backward (cell_bwd)
    # so that autograd and torch.compile's AOTAutograd differentiate through it.
    torch.library.register_autograd("hmlstm::cell_fwd", _backward, setup_context=_setup_context)



def cell_step_op(x: Tensor, z_below: Tensor, h: Tensor, c: Tensor, z: Tensor, h_above: Tensor, p: LayerParams,
                 slope: Tensor, noise: Optional[Tensor], cfg: CellConfig) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """`fused_cell_step` on whichever device the tensors are (the op dispatches on it), without the
    backend check. Shapes as `fused_cell_step`."""
    if cfg.boundary not in BOUNDARY_CODES:
        raise ValueError(f"cfg.boundary must be one of {tuple(BOUNDARY_CODES)}, got {cfg.boundary!r}")
    if cfg.copy_boundary not in COPY_BOUNDARY_MODES:
        raise ValueError(f"cfg.copy_boundary must be one of {COPY_BOUNDARY_MODES}, got {cfg.copy_boundary!r}")
    in_dtype = x.dtype
    tensors = (x, z_below, h, c, z, h_above, *p, slope, noise)
    if in_dtype in HALF or c.dtype in HALF or p.U.dtype in HALF:
        # fp32 accumulation: the kernels run in float32 (cast back below, except the cell state)
        x, z_below, h, c, z, h_above, *pp, slope, noise = (None if t is None else t.float() for t in tensors)
        p = LayerParams(*pp)
    if noise is not None and cfg.boundary != "sample":
        noise = None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    # COPY rows need U h_{t-1} only for the gradients of the boundaries (docs/spec.md, the dense gradient)
    dense_copy = grad and (z.requires_grad or z_below.requires_grad)
    # Autocast off: the kernel's own matmuls must stay in the inputs' dtype (bf16 under autocast would not
    # match the kernel's fp32 buffers); half inputs were already cast to fp32 above.
    with torch.autocast(x.device.type, enabled=False):
        h_t, c_t, z_t, _ = torch.ops.hmlstm.cell_fwd(
            x, z_below, h, c, z, h_above, p.W, p.U, p.V, p.b, p.ln_gates, p.ln_cell_w, p.ln_cell_b, slope,
            noise, BOUNDARY_CODES[cfg.boundary], cfg.copy_boundary == "recompute", grad, dense_copy, [], poison_enabled())
    if in_dtype in HALF:
        h_t, z_t = h_t.to(in_dtype), z_t.to(in_dtype)
    return h_t, c_t, (z_t if cfg.has_boundary else None)
