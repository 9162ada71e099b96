"""The training changes of the fourth session's synthetic experiments (docs/results.md, "What decides a synthetic
run"), applied by patching the library before its CLI runs. Experiment only: none of this is a library option.

    ENV=... python experiments.py fit --config synthetic.yaml [flags]

Each variable switches one change on (unset: the library's training, unchanged):

    ST=identity         the straight-through derivative is a/2 everywhere (no window); reference backend only
    COSTS="0:0.05,0;5:0.15,0"
                        boundary_cost per layer from the given epochs on (a schedule)
    SURR=1              the boundary cost's gradient through u = m * relu((a s + 1) / 2) (the hard sigmoid without its
                        upper clamp, m = 0 on COPY steps): it reaches fired detectors outside the window; its value
                        is still c * mean(z)
    ISCALE=0.1          the detectors' weight rows (input, recurrent, top-down) scaled at initialization
    INPUT_ONLY=1        the detectors' recurrent and top-down rows zeroed at initialization
    REACH=all|flip      after each backward, the detectors' own weights also get dL/dz * a/2 at the steps outside the
                        window (flip: only where it pulls s toward the window); the gradient along the sequence is
                        unchanged
    WARM=126            no update of the detectors' weights for the first 126 steps
    DLR=0.1             the detectors' weights move DLR x the optimizer's step (a learning-rate factor under Adam)
    SHIFT=-1            with --model.oracle_boundaries true: the true boundaries one character earlier

s, the boundary unit's pre-activation, is recomputed from the returned hidden states (the unit is outside the
layer norm): s_t = z_t^{l-1} W h_t^{l-1} + U h_{t-1}^l + z_{t-1}^l V h_{t-1}^{l+1} + b, its row 4H of each
matrix; it agrees with the step (z = [s > 0] on every step that is not COPY).
"""

import os
import sys

import torch
import torch.nn.functional as F

import hmlstm.boundary as boundary_module
import hmlstm.boundary_options as bo
import hmlstm.training as tr
from hmlstm.training import HMLSTMLanguageModel

CURRENT = {}  # the last forward's inputs and output, for the patches that recompute s
_forward = HMLSTMLanguageModel.forward


def _remember(self, tokens, state=None, **kw):
    out = _forward(self, tokens, state, **kw)
    CURRENT.update(tokens=tokens, state=state, out=out)
    return out


HMLSTMLanguageModel.forward = _remember


def preactivations(model, tokens, state, out, detach_inputs=False):
    """[(s, m)] per boundary layer, each (B, T): the boundary pre-activation and 1 where the step is not COPY."""
    rnn = model.net.rnn
    zs = [z.detach() if detach_inputs else z for z in out.rnn.z]
    hs = [h.detach() if detach_inputs else h for h in out.rnn.h]
    with torch.set_grad_enabled(not detach_inputs):
        x = model.net.embed(tokens)
    B, T = tokens.shape
    state = state if state is not None else rnn.initial_state(B, tokens.device, x.dtype)
    result = []
    for k in range(rnn.num_layers - 1):
        p, H = rnn.layers[k].params(), hs[k].shape[-1]
        below = x if k == 0 else hs[k - 1]
        zu = torch.ones(B, T, dtype=x.dtype) if k == 0 else zs[k - 1]
        hprev = torch.cat([state.h[k][:, None], hs[k][:, :-1]], 1)
        zprev = torch.cat([state.z[k][:, None], zs[k][:, :-1]], 1)
        aprev = torch.cat([state.h[k + 1][:, None], hs[k + 1][:, :-1]], 1)
        s = zu * (below @ p.W[4 * H]) + hprev @ p.U[4 * H] + zprev * (aprev @ p.V[4 * H]) + p.b[4 * H]
        result.append((s, (1 - (1 - zprev) * (1 - zu)).detach()))
    return result


def _detector_rows(model):
    for layer, row in bo._detectors(model.net.rnn):
        for w in (layer.weight_ih, layer.weight_hh, layer.weight_td, layer.bias):
            yield w, row


if os.environ.get("ST") == "identity":
    boundary_module.straight_through_grad = lambda x, slope: 0.5 * slope * torch.ones_like(x)

if os.environ.get("SURR"):
    def _charge(zs, costs):
        a = float(CURRENT["model"].slope)
        total = 0.0
        pre = preactivations(CURRENT["model"], CURRENT["tokens"], CURRENT["state"], CURRENT["out"])
        for (s, m), z, c in zip(pre, zs, costs):
            u = m * F.relu((a * s + 1) * 0.5)
            total = total + c * (z.detach() + u - u.detach()).mean()
        return total

    _shared = HMLSTMLanguageModel._shared_step

    def _shared_step(self, batch, stage, batch_idx=0):
        CURRENT["model"] = self
        return _shared(self, batch, stage, batch_idx)

    HMLSTMLanguageModel._shared_step = _shared_step
    tr.boundary_charge = _charge

if os.environ.get("COSTS"):
    plan = {}
    for part in os.environ["COSTS"].split(";"):
        epoch, values = part.split(":")
        plan[int(epoch)] = [float(v) for v in values.split(",")]
    _epoch_start = HMLSTMLanguageModel.on_train_epoch_start

    def _schedule(self):
        _epoch_start(self)
        due = max((e for e in plan if e <= self.current_epoch), default=None)
        if due is not None:
            self._costs = plan[due]

    HMLSTMLanguageModel.on_train_epoch_start = _schedule

if os.environ.get("ISCALE") or os.environ.get("INPUT_ONLY"):
    _init = bo.init_detectors

    def _init_detectors(rnn, bias, zero):
        _init(rnn, bias, zero)
        with torch.no_grad():
            for layer, row in bo._detectors(rnn):
                if os.environ.get("ISCALE"):
                    for w in (layer.weight_ih, layer.weight_hh, layer.weight_td):
                        w[row].mul_(float(os.environ["ISCALE"]))
                if os.environ.get("INPUT_ONLY"):
                    layer.weight_hh[row].zero_()
                    layer.weight_td[row].zero_()

    tr.init_detectors = _init_detectors

if os.environ.get("REACH") or os.environ.get("WARM"):
    _after_backward = HMLSTMLanguageModel.on_after_backward

    def _on_after_backward(self):
        probe = getattr(self, "_probe", None)
        if os.environ.get("REACH") and probe is not None and probe.grad is not None:
            a = float(self.slope)
            with torch.enable_grad():
                total = 0.0
                pre = preactivations(self, CURRENT["tokens"], CURRENT["state"], CURRENT["out"], detach_inputs=True)
                for k, (s, m) in enumerate(pre):
                    gz = probe.grad[k]  # dL/dz
                    outside = ((a * s.detach()).abs() >= 1.0).to(s.dtype)
                    gs = gz * 0.5 * a * outside * m
                    if os.environ["REACH"] == "flip":
                        fired = (s.detach() > 0).to(s.dtype)
                        gs = gs * ((1 - fired) * (gz < 0) + fired * (gz > 0)).to(s.dtype)
                    total = total + (s * gs).sum()
                if torch.is_tensor(total):
                    total.backward()
        _after_backward(self)
        if os.environ.get("WARM") and self.global_step < int(os.environ["WARM"]):
            for w, row in _detector_rows(self):
                if w.grad is not None:
                    w.grad[row] = 0

    HMLSTMLanguageModel.on_after_backward = _on_after_backward

if os.environ.get("DLR"):
    factor = float(os.environ["DLR"])
    _optimizer_step = HMLSTMLanguageModel.optimizer_step

    def _slow_detectors(self, *args, **kwargs):
        before = [(w, row, w.detach()[row].clone()) for w, row in _detector_rows(self)]
        _optimizer_step(self, *args, **kwargs)
        with torch.no_grad():
            for w, row, old in before:
                w[row] = old + factor * (w[row] - old)

    HMLSTMLanguageModel.optimizer_step = _slow_detectors

if os.environ.get("SHIFT"):
    shift = int(os.environ["SHIFT"])
    _oracle = tr.oracle_boundaries

    def _shifted(batch, num_layers):
        z = _oracle(batch, num_layers)
        out = torch.zeros_like(z)
        if shift < 0:
            out[..., :shift] = z[..., -shift:]
        else:
            out[..., shift:] = z[..., :-shift]
        return out

    tr.oracle_boundaries = _shifted

if __name__ == "__main__":
    from hmlstm.cli import main

    main(sys.argv[1:])
