"""Gradient norm of an initialized character LM under each boundary rule: where the explosion comes from.

    python benchmarks/grad_norms.py --ptb-dir ../shared/data/ptb --out benchmarks/results/grad-norms.json

The paper's PTB model (3 x 512, layer norm, embedding 128, output 512) at its initialization (seed 1234), on
the first training batch (64 streams x 100 characters, zero state), reference backend in float32. For each
boundary rule (the revised one, which every backend implements, and the pre-2026-12-01 one, rebuilt here for
the comparison), each `copy_boundary`, with and without the straight-through gradient (without: the boundaries
are treated as constants in the backward pass only), and for the first 10 / 40 / 70 / 100 characters, it
records the 2-norm over all parameters of the gradient of the mean NLL, before any clipping. Without PTB the
Python documentation text is used (`--ptb-dir ''`).

`--ablations` adds where the remaining growth comes from (revised rule, all characters): without layer norm,
with only the gate or only the cell layer norm, the LN-LSTM baseline, and boundary-unit biases that set the
initial FLUSH rate.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
from datetime import date
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from hmlstm.boundary import boundary
from hmlstm.data import PTBDataModule, PydocDataModule
from hmlstm.lm import CharLM
from hmlstm.reference import naive_cell_step
from hmlstm.sequence import stepwise_forward


def old_rule_step(x, z_below, h, c, z, h_above, p, slope, noise, cfg):
    """The reference cell with the boundary rule before 2026-12-01:
    z_t = z_{t-1} z~ + (1 - z_{t-1})(z^{l-1} z~ + (1 - z^{l-1}) z_copy), z_copy = z_{t-1} (hold) or z~(U h + b)."""
    h_new, c_new, _ = naive_cell_step(x, z_below, h, c, z, h_above, p, slope, noise, cfg)
    if not cfg.has_boundary:
        return h_new, c_new, None
    r = 4 * h.shape[-1]
    s = h @ p.U[r] + z * (h_above @ p.V[r]) + z_below * (x @ p.W[r]) + p.b[r]
    z_hat = boundary(s, slope, cfg.boundary, noise)
    z_copy = z if cfg.copy_boundary == "hold" else boundary(h @ p.U[r] + p.b[r], slope, cfg.boundary, noise)
    return h_new, c_new, z * z_hat + (1 - z) * (z_below * z_hat + (1 - z_below) * z_copy)


def constant_boundaries(step, *args):
    """`step` with its boundary returned as a constant: no straight-through gradient anywhere."""
    h, c, z = step(*args)
    return h, c, (z.detach() if z is not None else None)


def grad_norm(net: CharLM, tokens, targets, step, copy_boundary: str) -> float:
    net.zero_grad(set_to_none=True)
    rnn_model = net.rnn
    cfgs = [cfg.__class__(cfg.boundary, copy_boundary, cfg.layer_norm, cfg.has_boundary) for cfg in rnn_model.cfgs]
    x = net.embed(tokens)
    state = rnn_model.initial_state(tokens.shape[0])
    out = stepwise_forward(step, x, [l.params() for l in rnn_model.layers], cfgs, state, torch.tensor(1.0), None)
    logits = net.head(net.output(out.h))
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters() if p.grad is not None))


def ablations(dm, batch, hidden: int, T: int) -> list[dict]:
    """Gradient norms of the revised rule under layer-norm and boundary-bias variants (see the docstring)."""
    import hmlstm.reference as reference

    rows = []

    def one(name, copy_boundary="hold", cell="hmlstm", layer_norm=True, gate_ln=True, cell_ln=True, bias=None):
        torch.manual_seed(1234)
        opts = {"copy_boundary": copy_boundary} if cell == "hmlstm" else {}
        net = CharLM(len(dm.vocab), (hidden,) * 3, embed_size=128, output_size=512, layer_norm=layer_norm,
                     backend="reference", cell=cell, **opts)
        if cell == "hmlstm":
            with torch.no_grad():
                for layer in net.rnn.layers:
                    if not gate_ln:
                        layer.ln_gates = None
                    if bias is not None and layer.has_boundary:
                        layer.bias[4 * layer.hidden_size] = bias
        act = reference._cell_act
        if not cell_ln:  # the cell's tanh without its layer norm
            reference._cell_act = lambda c, p: torch.tanh(c)
        try:
            out = net(batch["input"][:, :T])
            F.cross_entropy(out.logits.flatten(0, 1), batch["target"][:, :T].flatten()).backward()
        finally:
            reference._cell_act = act
        norm = math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in net.parameters() if p.grad is not None))
        rates = [float(z.detach().mean()) for z in out.rnn.z]
        rows.append({"variant": name, "copy_boundary": copy_boundary if cell == "hmlstm" else None, "chars": T,
                     "grad_norm": norm, "boundary_rates": rates})
        print(f"{name:28s} {copy_boundary if cell == 'hmlstm' else '':9s} {norm:.4g}  rates {rates}", flush=True)

    for cb in ("hold", "recompute"):
        one("layer norm (gates, cell)", cb)
        one("no layer norm", cb, layer_norm=False)
        one("gate layer norm only", cb, cell_ln=False)
        one("cell layer norm only", cb, gate_ln=False)
    one("LN-LSTM baseline", cell="lstm")
    for bias in (-1.0, -0.3, 0.3, 1.0):
        one(f"boundary bias {bias:+.1f}", "hold", bias=bias)
    for bias in (-1.0, 1.0):
        one(f"boundary bias {bias:+.1f}", "recompute", bias=bias)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ptb-dir", default="../shared/data/ptb", help="folder of ptb.char.*.txt ('' for pydoc text)")
    p.add_argument("--lengths", type=int, nargs="+", default=[10, 40, 70, 100])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--out", help="JSON file to write")
    p.add_argument("--ablations", action="store_true", help="also the layer-norm and boundary-bias variants")
    a = p.parse_args(argv)
    use_ptb = bool(a.ptb_dir) and Path(a.ptb_dir, "ptb.char.train.txt").is_file()
    dm = (PTBDataModule(data_dir=a.ptb_dir, download=False, batch_size=64, seq_len=max(a.lengths)) if use_ptb
          else PydocDataModule(batch_size=64, seq_len=max(a.lengths)))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(1234)
    net = CharLM(len(dm.vocab), (a.hidden,) * 3, embed_size=128, output_size=512, layer_norm=True,
                 backend="reference")
    rows = []
    for rule, base in (("revised", naive_cell_step), ("pre-2026-12-01", old_rule_step)):
        for copy_boundary in ("hold", "recompute"):
            for st in (True, False):
                step = base if st else partial(constant_boundaries, base)
                for n in a.lengths:
                    norm = grad_norm(net, batch["input"][:, :n], batch["target"][:, :n], step, copy_boundary)
                    rows.append({"rule": rule, "copy_boundary": copy_boundary, "straight_through": st,
                                 "chars": n, "grad_norm": norm})
                    print(f"{rule:15s} {copy_boundary:9s} straight-through={st!s:5s} {n:4d} chars: {norm:.4g}",
                          flush=True)
    extra = ablations(dm, batch, a.hidden, max(a.lengths)) if a.ablations else []
    if a.out:
        header = {"date": date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                  "torch": torch.__version__, "data": "ptb" if use_ptb else "pydoc", "hidden": a.hidden}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"header": header, "rows": rows, "ablations": extra}, indent=1))


if __name__ == "__main__":
    main()
