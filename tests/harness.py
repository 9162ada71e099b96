"""Comparing a backend with the reference: every output and every gradient, random upstream gradients.

Used by the tests of every fused backend:

    case = make_case(B=3, T=7, hidden_sizes=(16, 20, 12), pattern="random")
    assert_matches_reference("cpp", case)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from hmlstm import HMLSTM, HMLSTMState, LayerParams

PATTERNS = ("random", "all_copy", "all_flush", "alternating")


@dataclass
class Case:
    B: int
    T: int
    input_size: int
    hidden_sizes: tuple[int, ...]
    boundary: str = "step"
    copy_boundary: str = "hold"
    layer_norm: bool = False
    pattern: str = "random"
    dtype: torch.dtype = torch.float64
    seed: int = 0
    slope: float = 1.0
    state_dict: dict = field(default_factory=dict)
    x: Optional[torch.Tensor] = None
    state: Optional[HMLSTMState] = None

    @property
    def id(self) -> str:
        hs = "x".join(map(str, self.hidden_sizes))
        return (f"B{self.B}-T{self.T}-I{self.input_size}-H{hs}-{self.boundary}-{self.copy_boundary}"
                f"-{'ln' if self.layer_norm else 'noln'}-{self.pattern}-{str(self.dtype).split('.')[-1]}")


def case_id(case: Case) -> str:
    return case.id


def _force(model: HMLSTM, x: torch.Tensor, pattern: str) -> None:
    """Fix the boundary rows so that every layer's z follows `pattern` (weights zeroed, bias saturated)."""
    if pattern == "random":
        return
    with torch.no_grad():
        for k, layer in enumerate(model.layers):
            if not layer.has_boundary:
                continue
            row = 4 * layer.hidden_size
            for w in (layer.weight_ih, layer.weight_hh, layer.weight_td):
                w[row].zero_()
            if pattern == "all_copy":  # z = 0 everywhere: layer 1 UPDATEs, layers 2.. COPY
                layer.bias[row] = -4.0
            elif pattern == "all_flush":  # z = 1 everywhere: every layer with a boundary FLUSHes from t = 1
                layer.bias[row] = 4.0
            elif pattern == "alternating":
                # layer 1's boundary follows the sign of x[..., 0], which alternates in time;
                # the layers above stay at z = 0, so layer 2 alternates UPDATE and COPY.
                if k == 0:
                    layer.weight_ih[row, 0] = 4.0
                    layer.bias[row] = 0.0
                else:
                    layer.bias[row] = -4.0
            else:
                raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
        if pattern == "alternating":
            sign = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(x.shape[1])], dtype=x.dtype)
            x[:, :, 0] = sign.to(x.device) * (0.5 + x[:, :, 0].abs())


def make_case(B: int, T: int, hidden_sizes: tuple[int, ...], input_size: int = 10, *, boundary: str = "step",
              copy_boundary: str = "hold", layer_norm: bool = False, pattern: str = "random",
              dtype: torch.dtype = torch.float64, seed: int = 0, device: str = "cpu") -> Case:
    """A random model, input, initial state and slope; weights scaled so that boundaries flip often."""
    g = torch.Generator().manual_seed(seed)
    case = Case(B, T, input_size, tuple(hidden_sizes), boundary, copy_boundary, layer_norm, pattern, dtype, seed)
    model = HMLSTM(input_size, hidden_sizes, boundary=boundary, copy_boundary=copy_boundary,
                   layer_norm=layer_norm, backend="reference").to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
        for layer in model.layers:
            if layer.ln_gates is not None:
                layer.ln_gates.add_(1.0)
                layer.ln_cell_weight.add_(1.0)
    x = torch.randn(B, T, input_size, generator=g, dtype=dtype)
    _force(model, x, pattern)
    L = len(hidden_sizes)
    state = HMLSTMState(
        tuple(torch.randn(B, h, generator=g, dtype=dtype) * 0.5 for h in hidden_sizes),
        tuple(torch.randn(B, h, generator=g, dtype=dtype) for h in hidden_sizes),
        # a random 0/1 start (soft mode: values in [0, 1]) so FLUSH happens at t = 0 too
        tuple((torch.rand(B, generator=g, dtype=dtype) if boundary == "soft"
               else (torch.rand(B, generator=g) < 0.3).to(dtype)) for _ in range(L - 1)),
    )
    if pattern in ("all_copy", "alternating"):
        state = HMLSTMState(state.h, state.c, tuple(torch.zeros_like(z) for z in state.z))
    if pattern == "all_flush":
        state = HMLSTMState(state.h, state.c, tuple(torch.ones_like(z) for z in state.z))
    case.slope = float(0.5 + 1.5 * torch.rand((), generator=g))
    case.state_dict = {k: v.to(device) for k, v in model.state_dict().items()}
    case.x = x.to(device)
    case.state = HMLSTMState(*(tuple(t.to(device) for t in grp) for grp in state))
    return case


def run_case(case: Case, backend: str, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Forward and backward of `case` on `backend`; returns every output and every gradient by name.

    dtype: run in this dtype (weights, input and state cast), default the case's own.
    """
    dtype = dtype or case.dtype
    device = case.x.device
    model = HMLSTM(case.input_size, case.hidden_sizes, boundary=case.boundary, copy_boundary=case.copy_boundary,
                   layer_norm=case.layer_norm, backend=backend).to(device=device, dtype=dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in case.state_dict.items()})
    x = case.x.detach().to(dtype).requires_grad_(True)
    s0 = [t.detach().to(dtype).requires_grad_(True) for grp in case.state for t in grp]
    L = len(case.hidden_sizes)
    state = HMLSTMState(tuple(s0[:L]), tuple(s0[L:2 * L]), tuple(s0[2 * L:]))
    gen = torch.Generator(device=device).manual_seed(case.seed + 1)
    out = model(x, state=state, slope=case.slope, generator=gen)
    outputs = {f"h{l}": t for l, t in enumerate(out.h)}
    outputs |= {f"c{l}": t for l, t in enumerate(out.c)}
    outputs |= {f"z{l}": t for l, t in enumerate(out.z)}
    outputs |= {f"final_h{l}": t for l, t in enumerate(out.state.h)}
    outputs |= {f"final_c{l}": t for l, t in enumerate(out.state.c)}
    outputs |= {f"final_z{l}": t for l, t in enumerate(out.state.z)}
    # random upstream gradients, drawn the same for every backend
    g = torch.Generator().manual_seed(case.seed + 2)
    loss = sum((t.float() * torch.randn(t.shape, generator=g).to(device)).sum() for t in outputs.values())
    inputs = {"x": x} | {f"state{k}": t for k, t in enumerate(s0)} | dict(model.named_parameters())
    grads = torch.autograd.grad(loss, list(inputs.values()), allow_unused=True)
    result = {k: v.detach() for k, v in outputs.items()}
    for name, gr in zip(inputs, grads):
        result[f"grad_{name}"] = gr if gr is not None else torch.zeros_like(inputs[name])
    return result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (an absolute norm when b is zero); NaN anywhere gives inf."""
    a, b = a.double().cpu(), b.double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    den = b.norm().item()
    return (a - b).norm().item() / (den if den > 0 else 1.0)


def reference_errors(backend: str, case: Case) -> dict[str, float]:
    """Relative error of every output and gradient of `backend` against the reference, by name."""
    ref = run_case(case, "reference")
    got = run_case(case, backend)
    assert ref.keys() == got.keys()
    return {k: rel_err(got[k], ref[k]) for k in ref}


def assert_matches_reference(backend: str, case: Case, tol: Optional[float] = None) -> None:
    """Every output and gradient of `backend` within `tol` relative error of the reference."""
    tol = tol if tol is not None else (1e-10 if case.dtype == torch.float64 else 1e-4)
    bad = {k: e for k, e in reference_errors(backend, case).items() if e > tol}
    assert not bad, f"{backend} differs from the reference on {case.id}: {bad}"


def bf16_errors_beyond_2x(backend: str, case: Case) -> dict[str, tuple[float, float]]:
    """bf16 inputs on `backend` (fp32 accumulation inside) against the fp32 reference: the outputs and gradients
    whose error exceeds 2x that of the same computation in bf16 PyTorch (+1e-3 absolute slack for quantities
    whose bf16 PyTorch error is ~0), as name -> (backend's error, PyTorch's)."""
    ref = run_case(case, "reference")
    ref_bf16 = run_case(case, "reference", dtype=torch.bfloat16)
    got = run_case(case, backend, dtype=torch.bfloat16)
    errs = {k: (rel_err(got[k], ref[k]), rel_err(ref_bf16[k], ref[k])) for k in ref}
    return {k: e for k, e in errs.items() if e[0] > 2 * e[1] + 1e-3}


def assert_bf16_within_2x(backend: str, case: Case) -> None:
    """Every bf16 output's and gradient's error within 2x that of bf16 PyTorch (see bf16_errors_beyond_2x)."""
    bad = bf16_errors_beyond_2x(backend, case)
    assert not bad, f"bf16 errors ({backend}, torch) beyond 2x on {case.id}: {bad}"


def random_step(seed: int, has_boundary: bool = True, layer_norm: bool = False, B: int = 6, I: int = 5, H: int = 7,
                Ha: int = 4, dtype: torch.dtype = torch.float64, device: str = "cpu") -> dict:
    """Inputs of one layer-step (`naive_cell_step`'s arguments by name) whose batch holds every
    combination of (z_{t-1}, z_below): FLUSH, UPDATE and COPY rows."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device)  # noqa: E731
    Ha = Ha if has_boundary else 0
    G = 4 * H + int(has_boundary)
    p = LayerParams(r(G, I), r(G, H), r(G, Ha), r(G))
    if layer_norm:
        p = p._replace(ln_gates=1 + 0.1 * r(4 * H), ln_cell_w=1 + 0.1 * r(H), ln_cell_b=0.1 * r(H))
    z = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=dtype)[:B] if has_boundary else torch.zeros(B, dtype=dtype)
    zu = torch.tensor([1.0, 1, 0, 0, 0, 1], dtype=dtype)[:B]
    return dict(x=r(B, I), z_below=zu.to(device), h=r(B, H), c=r(B, H), z=z.to(device), h_above=r(B, Ha), p=p,
                slope=torch.tensor(1.3, dtype=dtype, device=device), noise=None)


def op_args(dtype: torch.dtype, has_boundary: bool, layer_norm: bool, mode: int, recompute: bool,
            requires_grad: bool, device: str = "cpu") -> list:
    """The arguments of `hmlstm::cell_fwd` for one random step (see `random_step`); the trailing ones are
    boundary_mode, recompute, save, dense_copy, packed ([]) and poison (False)."""
    d = random_step(11, has_boundary=has_boundary, layer_norm=layer_norm, dtype=dtype, device=device)
    p = d["p"]
    noise = torch.rand(6, dtype=dtype).to(device) if mode == 1 else None
    args = [d["x"], d["z_below"], d["h"], d["c"], d["z"], d["h_above"], *p, d["slope"], noise]
    if requires_grad:
        args = [a.requires_grad_(True) if (a is not None and k not in (13, 14)) else a for k, a in enumerate(args)]
    return args + [mode, recompute, requires_grad, requires_grad, [], False]
