"""`HMLSTM`: the stacked hierarchical multiscale LSTM as an `nn.Module`."""

from __future__ import annotations

import math
from functools import partial
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from . import backends
from .reference import naive_cell_step
from .sequence import stepwise_forward
from .state import HMLSTMOutput, HMLSTMState
from .types import BOUNDARY_MODES, COPY_BOUNDARY_MODES, CellConfig, LayerParams


class HMLSTMLayer(nn.Module):
    """The weights of one layer. G = 4H + 1 rows (4H for the top layer), block order f, i, o, g, z.

    Parameters:
        weight_ih: (G, I) bottom-up W_{l-1}^l, I = H_{l-1} (the input size for the first layer).
        weight_hh: (G, H) recurrent U_l^l.
        weight_td: (G, H_{l+1}) top-down U_{l+1}^l; absent (None) on the top layer.
        bias: (G,).
        ln_gates: (4H,) gate LN gain; ln_cell_weight, ln_cell_bias: (H,) cell LN (only with layer_norm).
    """

    def __init__(self, input_size: int, hidden_size: int, above_size: int, layer_norm: bool) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.has_boundary = above_size > 0
        G = 4 * hidden_size + int(self.has_boundary)
        self.weight_ih = nn.Parameter(torch.empty(G, input_size))
        self.weight_hh = nn.Parameter(torch.empty(G, hidden_size))
        self.weight_td = nn.Parameter(torch.empty(G, above_size)) if self.has_boundary else None
        self.bias = nn.Parameter(torch.empty(G))
        if layer_norm:
            self.ln_gates = nn.Parameter(torch.empty(4 * hidden_size))
            self.ln_cell_weight = nn.Parameter(torch.empty(hidden_size))
            self.ln_cell_bias = nn.Parameter(torch.empty(hidden_size))
        else:
            self.ln_gates = self.ln_cell_weight = self.ln_cell_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's initialization: uniform(-1/sqrt(H), 1/sqrt(H)); LN gains 1, LN biases 0."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_ih, self.weight_hh, self.weight_td, self.bias):
            if p is not None:
                nn.init.uniform_(p, -bound, bound)
        if self.ln_gates is not None:
            nn.init.ones_(self.ln_gates)
            nn.init.ones_(self.ln_cell_weight)
            nn.init.zeros_(self.ln_cell_bias)

    def params(self) -> LayerParams:
        """The weights as the backends take them (an empty (G, 0) top-down weight on the top layer)."""
        V = self.weight_td if self.weight_td is not None else self.weight_hh.new_zeros(self.weight_hh.shape[0], 0)
        return LayerParams(self.weight_ih, self.weight_hh, V, self.bias,
                           self.ln_gates, self.ln_cell_weight, self.ln_cell_bias)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


class HMLSTM(nn.Module):
    """Hierarchical multiscale LSTM (Chung, Ahn & Bengio, ICLR 2017), batch first.

    Args:
        input_size: I, features of x.
        hidden_sizes: (H_1, ..., H_L), L >= 1 layers; sizes may differ. With L = 1 the only layer is the
            top layer: no boundary, always UPDATE, i.e. a plain LSTM.
        boundary: "step" (default; straight-through gradient), "sample" (Bernoulli, straight-through)
            or "soft" (z = hard sigmoid).
        copy_boundary: "hold" (default; COPY keeps z = 0) or "recompute" (z from U h + b on COPY).
        layer_norm: layer normalization of gates and cell (see `hmlstm.reference`).
        backend: "auto", "reference", "triton" or "cpp" (see `hmlstm.backends`).

    Example:
        >>> model = HMLSTM(128, (512, 512, 512))
        >>> out = model(torch.randn(64, 100, 128), slope=1.0)
        >>> out.h[0].shape, out.z[0].shape    # (64, 100, 512), (64, 100)
        >>> out2 = model(x_next, state=out.state)  # continues the sequence exactly
    """

    def __init__(
        self,
        input_size: int,
        hidden_sizes: Sequence[int],
        *,
        boundary: str = "step",
        copy_boundary: str = "hold",
        layer_norm: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if isinstance(hidden_sizes, int) or not isinstance(hidden_sizes, Sequence):
            raise TypeError(f"hidden_sizes must be a sequence of positive ints such as (512, 512, 512), "
                            f"got {hidden_sizes!r}")
        hidden_sizes = tuple(hidden_sizes)
        if len(hidden_sizes) == 0:
            raise ValueError("hidden_sizes must name at least one layer, e.g. (512,), got ()")
        for k, hsz in enumerate(hidden_sizes):
            if isinstance(hsz, bool) or not isinstance(hsz, int) or hsz <= 0:
                raise ValueError(f"hidden_sizes[{k}] must be a positive int, got {hsz!r}")
        _check_choice("boundary", boundary, BOUNDARY_MODES)
        _check_choice("copy_boundary", copy_boundary, COPY_BOUNDARY_MODES)
        if backend in backends.RETIRED:
            raise ValueError(f"backend={backend!r} no longer exists: {backends.RETIRED[backend]}")
        _check_choice("backend", backend, backends.BACKENDS)
        self.input_size = input_size
        self.hidden_sizes = hidden_sizes
        self.boundary = boundary
        self.copy_boundary = copy_boundary
        self.layer_norm = bool(layer_norm)
        self.backend = backend
        sizes_in = (input_size,) + hidden_sizes[:-1]
        sizes_above = hidden_sizes[1:] + (0,)
        self.layers = nn.ModuleList(
            HMLSTMLayer(i, h, a, self.layer_norm) for i, h, a in zip(sizes_in, hidden_sizes, sizes_above)
        )
        self.cfgs = tuple(
            CellConfig(boundary, copy_boundary, self.layer_norm, layer.has_boundary) for layer in self.layers
        )

    @property
    def num_layers(self) -> int:
        return len(self.hidden_sizes)

    def extra_repr(self) -> str:
        return (f"input_size={self.input_size}, hidden_sizes={self.hidden_sizes}, boundary={self.boundary!r}, "
                f"copy_boundary={self.copy_boundary!r}, layer_norm={self.layer_norm}, backend={self.backend!r}")

    def initial_state(self, batch_size: int, device=None, dtype=None) -> HMLSTMState:
        """Zeros: h, c (B, H_l) per layer and z (B,) for layers 1..L-1 (no FLUSH at the first step).

        With a bf16/fp16 dtype the cell state c is float32: it accumulates over many steps, and rounding it
        to 8 or 11 mantissa bits every step would drift over long sequences.
        """
        ref = self.layers[0].weight_hh
        device = device if device is not None else ref.device
        dtype = dtype if dtype is not None else ref.dtype
        c_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        zeros = [torch.zeros(batch_size, h, device=device, dtype=dtype) for h in self.hidden_sizes]
        return HMLSTMState(tuple(zeros), tuple(torch.zeros_like(t, dtype=c_dtype) for t in zeros),
                           tuple(torch.zeros(batch_size, device=device, dtype=dtype)
                                 for _ in self.hidden_sizes[:-1]))

    def forward(
        self,
        x: Tensor,
        state: Optional[HMLSTMState] = None,
        slope: float | Tensor = 1.0,
        *,
        generator: Optional[torch.Generator] = None,
        probe: Optional[Tensor] = None,
        boundaries: Optional[Tensor] = None,
    ) -> HMLSTMOutput:
        """Run the sequence.

        Args:
            x: (B, T, I) floating point input.
            state: the state to start from (an earlier `out.state`), or None for zeros.
            slope: the hard sigmoid's slope a > 0, a float or a 0-dim tensor (annealed during training).
            generator: random source for boundary="sample".
            probe: None, or an (L-1, B, T) tensor that requires grad (zeros, say): after backward its .grad is
                dL/dz_t^l, the whole gradient reaching each boundary (what the training diagnostics log). Its
                values are not read; the forward is unchanged.
            boundaries: None, or (L-1, B, T) 0/1 values that replace the boundary detectors' z (an oracle
                segmentation, e.g. the true word and phrase ends: what would this model reach if its layers found
                them?). Runs the reference loop whatever the backend; the detectors get no gradient.

        Returns:
            HMLSTMOutput with h: L x (B, T, H_l), c: L x (B, T, H_l), z: (L-1) x (B, T), state.
        """
        self._check_input(x)
        B = x.shape[0]
        slope_t = self._check_slope(slope, x)
        if state is None:
            state = self.initial_state(B, x.device, x.dtype)
        else:
            state = self._check_state(state, B, x)
        noise = None
        if self.boundary == "sample" and self.num_layers > 1:
            noise = torch.rand(B, x.shape[1], self.num_layers - 1, device=x.device, dtype=x.dtype,
                               generator=generator)
        name = backends.resolve(self.backend, x.device)
        run = backends.sequence_fn(name)
        if boundaries is not None:
            run = self._forced_run(boundaries, B, x)
        if probe is not None:
            expected = (self.num_layers - 1, B, x.shape[1])
            if tuple(probe.shape) != expected:
                raise ValueError(f"probe must have shape (L-1, B, T) = {expected}, got {tuple(probe.shape)}")
            if self.num_layers == 1:
                probe = None
        return run(x, [layer.params() for layer in self.layers], self.cfgs, state, slope_t, noise, probe=probe)

    def _forced_run(self, boundaries: Tensor, B: int, x: Tensor):
        expected = (self.num_layers - 1, B, x.shape[1])
        if not isinstance(boundaries, Tensor) or tuple(boundaries.shape) != expected:
            got = tuple(boundaries.shape) if isinstance(boundaries, Tensor) else type(boundaries).__name__
            raise ValueError(f"boundaries must be a tensor of shape (L-1, B, T) = {expected}, got {got}")
        if self.num_layers == 1:
            raise ValueError("boundaries: a 1-layer model has no boundary detector to replace")
        forced = boundaries.to(device=x.device, dtype=x.dtype)
        # the per-step reference loop: the fused backends compute z inside their kernels
        return partial(stepwise_forward, naive_cell_step, forced=forced)

    # -- argument checks: each message names the argument and what was expected --------------------

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, T, {self.input_size}), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, T, {self.input_size}) (batch first), "
                             f"got {x.dim()} dimensions: {tuple(x.shape)}")
        if x.shape[2] != self.input_size:
            raise ValueError(f"x must have shape (B, T, {self.input_size}): last dimension is {x.shape[2]}, "
                             f"expected input_size={self.input_size}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must have B >= 1 and T >= 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got dtype {x.dtype}")
        w = self.layers[0].weight_hh
        if x.device != w.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {w.device}; "
                             f"move one of them (model.to(x.device))")
        # Under autocast the matmuls pick their own precision; otherwise a mismatch would fail deep in a matmul.
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the model's parameters are {w.dtype}; cast one of them "
                            f"(x.to({w.dtype}) or model.to({x.dtype})), or run under torch.autocast")

    @staticmethod
    def _check_slope(slope: float | Tensor, x: Tensor) -> Tensor:
        if isinstance(slope, Tensor):
            if slope.numel() != 1:
                raise ValueError(f"slope must be a float or a 1-element tensor, got shape {tuple(slope.shape)}")
            s = slope.detach().reshape(())
            # checked where reading it is free: on a GPU the read would synchronise every training step
            if s.device.type == "cpu" and not bool(s > 0):
                raise ValueError(f"slope must be > 0, got {s.item()}")
            return s.to(device=x.device, dtype=x.dtype)
        if isinstance(slope, bool) or not isinstance(slope, (int, float)):
            raise TypeError(f"slope must be a float > 0 or a 1-element tensor, got {type(slope).__name__}")
        if not slope > 0 or not math.isfinite(slope):
            raise ValueError(f"slope must be a finite float > 0, got {slope}")
        return torch.tensor(float(slope), device=x.device, dtype=x.dtype)

    def _check_state(self, state: HMLSTMState, B: int, x: Tensor) -> HMLSTMState:
        L = self.num_layers
        if not isinstance(state, tuple) or len(state) != 3:
            raise TypeError("state must be an HMLSTMState (h, c, z) as returned in out.state")
        h, c, z = (tuple(part) for part in state)
        if len(h) != L or len(c) != L or len(z) != L - 1:
            raise ValueError(f"state must hold {L} h, {L} c and {L - 1} z tensors for this {L}-layer model, "
                             f"got {len(h)}, {len(c)}, {len(z)}")
        for name, group in (("h", h), ("c", c)):
            for k, (t, hsz) in enumerate(zip(group, self.hidden_sizes)):
                if tuple(t.shape) != (B, hsz):
                    raise ValueError(f"state.{name}[{k}] must have shape ({B}, {hsz}), got {tuple(t.shape)}")
        for k, t in enumerate(z):
            if tuple(t.shape) != (B,):
                raise ValueError(f"state.z[{k}] must have shape ({B},), got {tuple(t.shape)}")
        for t in h + c + z:
            if t.device != x.device:
                raise ValueError(f"state tensors must be on {x.device} like x, got one on {t.device}")
            if not t.is_floating_point():
                raise TypeError(f"state tensors must be floating point, got dtype {t.dtype}")
        return HMLSTMState(h, c, z)
