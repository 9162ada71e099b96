"""The Triton backend's GPU budget, counted on the CPU: kernel launches per phase, no host synchronisation,
no torch op per time step.

The kernels run in Triton's interpreter here (conftest sets TRITON_INTERPRET=1 without a GPU), but what is
counted is what the launcher asks for, which is the same on a GPU: every launch goes through
`hmlstm.ops.triton.seq_op._launch`, and every torch op inside the two custom ops is seen by a
TorchDispatchMode that re-enters their implementations (a mode sees a custom op as one call otherwise).
The interpreter's own tensor traffic during a launch (it copies arguments to and from numpy) is not counted:
on a GPU a launch is one kernel (and on the CPU the launches are counted without being run, see EXECUTE).
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import make_case
from hmlstm import HMLSTM
from hmlstm.backends import unavailable_reason

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(unavailable_reason("triton", torch.device(DEVICE)) is not None,
                                reason=str(unavailable_reason("triton", torch.device(DEVICE))))

# What is counted is the launcher's work, which does not depend on the values the kernels write (a launcher that
# read them back would show up as a host read). So in the interpreter, where a launch costs seconds, the kernels
# are counted and not run (their outputs stay NaN-poisoned); on a GPU they run. Their results are checked
# against the reference in tests/test_ops_triton.py.
EXECUTE = DEVICE == "cuda"

# ops that read device memory on the host: each one is a synchronisation on a GPU
SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero", "aten.equal",
            "aten._assert_async")


class _Count(TorchDispatchMode):
    """Counts every aten op, looking inside hmlstm's Triton ops; records the host reads and device moves."""

    def __init__(self) -> None:
        super().__init__()
        from hmlstm.ops.triton import seq_op

        self.impls = {"hmlstm.triton_seq_fwd.default": seq_op.triton_seq_fwd._init_fn,
                      "hmlstm.triton_seq_bwd.default": seq_op.triton_seq_bwd._init_fn}
        self.ops: Counter = Counter()
        self.inside: Counter = Counter()  # ops run by the custom ops' implementations
        self.depth = 0
        self.in_kernel = 0  # inside a launch: the interpreter's own tensor traffic, not the launcher's
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.in_kernel:
            return func(*args, **kwargs)
        name = str(func)
        self.ops[name] += 1
        if self.depth:
            self.inside[name] += 1
        if name.startswith(SYNC_OPS):
            self.syncs.append(name)
        dev = kwargs.get("device")
        if name.startswith(("aten._to_copy", "aten.to")) and dev is not None:
            src = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            if src is not None and torch.device(dev) != src:
                self.syncs.append(f"{name} {src} -> {dev}")
        if name.startswith("aten.copy_") and args[0].device != args[1].device:
            self.syncs.append(f"copy_ {args[1].device} -> {args[0].device}")
        impl = self.impls.get(name)
        if impl is not None:
            self.depth += 1
            try:
                with self:
                    return impl(*args, **kwargs)
            finally:
                self.depth -= 1
        return func(*args, **kwargs)


def _run(T: int, L: int, layer_norm: bool, monkeypatch, copy_boundary: str = "recompute", warm: bool = False):
    from hmlstm.ops.triton import seq_op

    launches: Counter = Counter()
    real = seq_op._launch
    mode = _Count()

    def counting(kernel, grid, *args, **meta):
        launches[kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__] += 1
        if not EXECUTE:
            return None
        mode.in_kernel += 1
        try:
            return real(kernel, grid, *args, **meta)
        finally:
            mode.in_kernel -= 1

    monkeypatch.setattr(seq_op, "_launch", counting)
    sizes = (16, 20, 12, 8)[:L]
    case = make_case(3, T, sizes, layer_norm=layer_norm, copy_boundary=copy_boundary, device=DEVICE)
    model = HMLSTM(case.input_size, sizes, layer_norm=layer_norm, copy_boundary=copy_boundary,
                   backend="triton").to(device=DEVICE, dtype=torch.float64)
    model.load_state_dict(case.state_dict)
    x = case.x.clone().requires_grad_(True)
    # a warm-up call: the first call of a shape builds its offset table (one host-to-device copy per shape, as a
    # CUDA graph's warm-up does); what is counted is every call after it
    if warm:
        out = model(x, slope=case.slope)
        (sum((h * h).sum() for h in out.h) + sum(z.sum() for z in out.z)).backward()
        launches.clear()
    with mode:
        out = model(x, slope=case.slope)
        fwd = sum(launches.values())
        loss = sum((h * h).sum() for h in out.h) + sum(z.sum() for z in out.z)
        loss.backward()
    bwd = sum(launches.values()) - fwd
    return fwd, bwd, launches, mode


@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
@pytest.mark.parametrize("L", [1, 3, 4])
def test_two_launches_per_phase_forward_and_backward(L, layer_norm, monkeypatch):
    """2T + L - 2 wavefront phases, each one pre-activation and one update launch forward and one gradient
    and one product launch backward, whatever the number of layers in the phase (cuDNN: one kernel per
    layer-step, L T of them)."""
    T = 4
    fwd, bwd, launches, _ = _run(T, L, layer_norm, monkeypatch)
    phases = 2 * T + L - 2
    assert fwd == 2 * phases, launches
    assert bwd == 2 * phases, launches
    assert set(launches) == {"_seq_pre_kernel", "_seq_update_kernel", "_seq_grad_kernel", "_seq_prod_kernel"}


@pytest.mark.parametrize("copy_boundary", ["hold", "recompute"])
def test_no_host_synchronisation_and_no_torch_op_per_step(copy_boundary, monkeypatch):
    """No op of the forward or backward reads device memory on the host or moves data between devices, and
    the torch ops around the kernels are the same for T = 3 and T = 7: none runs per time step."""
    _, _, _, short = _run(3, 3, True, monkeypatch, copy_boundary, warm=True)
    _, _, _, long = _run(7, 3, True, monkeypatch, copy_boundary, warm=True)
    assert not short.syncs and not long.syncs, short.syncs + long.syncs
    assert short.inside, "the counting mode saw nothing inside the custom ops"
    assert short.inside == long.inside, (short.inside - long.inside) + (long.inside - short.inside)
    assert sum(short.ops.values()) == sum(long.ops.values())
