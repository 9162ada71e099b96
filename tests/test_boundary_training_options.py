"""Training options that steer the boundary detectors or the carried state, none changing the forward:
`boundary_peaks` (targets at the model's own entropy peaks), `boundary_nesting`, `state_reset`
(hmlstm.boundary_options, hmlstm.training; docs/results.md, "Boundaries at the entropy peaks")."""

import csv
import math
import warnings

import pytest
import torch
from pytorch_lightning.loggers import CSVLogger

from hmlstm.boundary_options import entropy_peaks
from hmlstm.training import HMLSTMLanguageModel

from test_training import one_thread, tiny_data, trainer  # noqa: F401  (one_thread: an autouse fixture)

TINY = dict(hidden_sizes=(8, 8, 6), embed_size=8, output_size=16, layer_norm=False, backend="reference")


def logits_with_entropies(bits: list[list[float]], vocab: int = 8) -> torch.Tensor:
    """(B, T, V) logits whose rows have (about) the given entropies: one favoured class, the rest level, the
    favoured logit found by bisection."""
    out = torch.zeros(len(bits), len(bits[0]), vocab, dtype=torch.float64)
    for b, row in enumerate(bits):
        for t, target in enumerate(row):
            lo, hi = 0.0, 60.0
            for _ in range(80):
                mid = (lo + hi) / 2
                logp = torch.tensor([mid] + [0.0] * (vocab - 1), dtype=torch.float64).log_softmax(0)
                h = float(-(logp.exp() * logp).sum()) / 0.6931471805599453
                lo, hi = (mid, hi) if h > target else (lo, mid)
            out[b, t, 0] = lo
    return out


def test_entropy_peaks_are_local_maxima_above_the_batch_mean():
    # mean of the 14 entropies: 0.664 bits
    bits = [[0.1, 2.0, 0.1, 0.9, 1.5, 1.5, 0.2],   # 0.9: above the mean, below the step after; of the two 1.5s
            [1.4, 0.1, 0.0, 0.3, 1.2, 0.0, 0.0]]  # the first is the peak; the first and last steps have one side
    got = entropy_peaks(logits_with_entropies(bits))
    want = torch.tensor([[0, 1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(got, want)
    flat = entropy_peaks(logits_with_entropies([[1.0, 1.0, 1.0, 1.0]]))
    assert not flat.any()  # no step is above the mean


def test_peak_charge_in_the_training_step_moves_the_loss_and_the_boundary_gradient():
    """The loss moves by the balanced charge for the layer given a weight; the gradient reaching its boundaries (the
    probe's, dL/dz) moves toward firing on every peak and away from it everywhere else (directly by w/2 (-1/p on a
    peak, 1/(1-p) elsewhere) per character, plus what each z passes on to the later ones); layer 2's only through
    layer 1."""
    dm = tiny_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    B, T = batch["target"].shape
    results = {}
    for w in (0.0, 0.3):
        torch.manual_seed(0)
        model = HMLSTMLanguageModel(**TINY, vocab=dm.vocab.chars, boundary_peaks=[w, 0.0], boundary_bias=0.2,
                                    loss_reduction="sum_time").double()
        model.log = lambda *a, **k: None
        loss = model._shared_step(batch, "train")
        probe = model._probe  # made by the shared step; its gradient is dL/dz
        loss.backward()
        with torch.no_grad():
            out = model(batch["input"])
        results[w] = (float(loss.detach()), probe.grad.double(), out)
    (l0, g0, out), (l3, g3, _) = results[0.0], results[0.3]
    peaks = entropy_peaks(out.logits).double()
    p = float(peaks.mean())
    assert 0 < p < 1
    sign = (1 - peaks) / (1 - p) - peaks / p  # balanced: on target -1/p, off it +1/(1-p)
    # sum_time: the loss and its gradient are T times the per-character mean
    direct = 0.3 / 2 * sign / (B * T) * T
    assert ((g3[0] - g0[0]) * sign > 0).all()
    assert torch.allclose(g3[0] - g0[0], direct, atol=0.1 * float(direct.abs().max()))
    # layer 2 has weight 0: its gradient moves only through what its z passes on to layer 1's later boundaries
    assert float((g3[1] - g0[1]).abs().max()) < 0.1 * float(direct.abs().max())
    assert l3 - l0 == pytest.approx(0.3 / 2 * float((out.rnn.z[0] * sign).mean()) * T, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_recomputed_preactivations_have_the_sign_of_the_boundaries(backend, layer_norm):
    """detector_preactivations from a run's outputs: s > 0 exactly where the run fired (z = 1), from zeros and
    from a carried state, with and without layer norm, for the op the training uses."""
    from hmlstm.backends import unavailable_reason
    from hmlstm.boundary_options import detector_preactivations
    from hmlstm.model import HMLSTM

    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:  # cpp: the extension is not built
        pytest.skip(reason)
    torch.manual_seed(0)
    rnn = HMLSTM(5, [7, 6, 4], layer_norm=layer_norm, backend=backend).double()
    with torch.no_grad():
        for layer, bias in zip(rnn.layers[:-1], (0.0, 0.3)):
            layer.bias[4 * layer.hidden_size] = bias  # both signs of s at every layer, and COPY steps in layer 2
    x = 3 * torch.randn(3, 40, 5, dtype=torch.float64)
    first = rnn(x[:, :20])
    for out, xs, state in ((first, x[:, :20], None), (rnn(x[:, 20:], first.state), x[:, 20:], first.state)):
        preacts = detector_preactivations(rnn, xs, out, state)
        assert len(preacts) == 2
        z_below = torch.ones_like(out.z[0])
        for k, (s, z) in enumerate(zip(preacts, out.z)):
            assert s.shape == z.shape
            assert 0 < float(z.mean()) < 1
            z_prev = torch.cat([(state.z[k] if state is not None else torch.zeros_like(z[:, 0]))[:, None],
                                z[:, :-1]], 1)
            copy = (z_prev == 0) & (z_below == 0)  # hold: a COPY step's z is 0 whatever s is
            assert torch.equal((s > 0).to(z.dtype)[~copy], z[~copy])
            assert not z[copy].any()
            z_below = z
        assert copy.any() and (preacts[1][copy] > 0).any()  # the COPY rule was exercised


@pytest.mark.parametrize("hold", [True, False])
def test_reach_saturated_keeps_the_value_and_adds_gradient_only_where_it_is_missing_and_wrong(hold):
    """Same values; d/dz passes unchanged; d/ds is a/2 (times the hold gate) on the steps outside the window
    whose boundary disagrees with the target, and 0 elsewhere (inside the window the op's own estimator acts)."""
    from hmlstm.boundary_options import reach_saturated

    a = torch.tensor(2.0, dtype=torch.float64)  # window |s| < 0.5
    s1 = torch.tensor([[-3.0, 3.0, -3.0, 3.0, 0.2, -0.2]], dtype=torch.float64, requires_grad=True)
    z1 = (s1.detach() > 0).double().requires_grad_()
    y1 = torch.tensor([[True, False, False, True, False, True]])
    s2 = torch.tensor([[-3.0, -3.0, -3.0, 3.0, 0.2, -3.0]], dtype=torch.float64, requires_grad=True)
    z2 = (s2.detach() > 0).double().requires_grad_()
    y2 = torch.tensor([[True, True, True, False, True, True]])
    out = reach_saturated([z1, z2], [s1, s2], a, [y1, y2], hold=hold)
    assert torch.equal(out[0], z1) and torch.equal(out[1], z2)
    g = [torch.randn(1, 6, dtype=torch.float64) for _ in range(2)]
    sum((o * gi).sum() for o, gi in zip(out, g)).backward()
    assert torch.equal(z1.grad, g[0]) and torch.equal(z2.grad, g[1])
    # layer 1: wrong and outside at 0 (target, s = -3) and 1 (fired, no target); right at 2, 3; inside at 4, 5
    assert torch.equal(s1.grad, g[0] * torch.tensor([[1.0, 1.0, 0, 0, 0, 0]], dtype=torch.float64))
    # layer 2: wrong and outside at 0, 1, 2, 3 and 5; under hold only where z_{t-1} or layer 1 fired (t = 1, 3, 5)
    gate = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]], dtype=torch.float64) if hold else torch.ones(1, 6).double()
    wrong_outside = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0, 1.0]], dtype=torch.float64)
    assert torch.equal(s2.grad, g[1] * wrong_outside * gate)
    # a carried state whose layer 2 had fired before the first step: under hold its first step is no COPY step
    s2.grad = None
    z0 = [torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]
    (reach_saturated([z1, z2], [s1, s2], a, [y1, y2], hold=hold, z0=z0)[1] * g[1]).sum().backward()
    gate[0, 0] = 1.0
    assert torch.equal(s2.grad, g[1] * wrong_outside * gate)


def test_boundary_peaks_reach_moves_a_saturated_detector_and_leaves_the_loss_alone():
    """Layer 1's detector held far below its window (bias -6): the paper's estimator gives its bias no gradient;
    with boundary_peaks_reach the peak charge pulls it up (toward the targets it misses). The loss is the same."""
    dm = tiny_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    got = {}
    for reach in (False, True):
        torch.manual_seed(0)
        model = HMLSTMLanguageModel(**TINY, vocab=dm.vocab.chars, boundary_bias=[-6.0, 0.2], boundary_peaks=[0.3, 0.0],
                                    boundary_peaks_reach=reach).double()
        model.log = lambda *a, **k: None
        loss = model._shared_step(batch, "train")
        loss.backward()
        layer = model.net.rnn.layers[0]
        got[reach] = (float(loss.detach()), float(layer.bias.grad[4 * layer.hidden_size]))
    assert got[True][0] == pytest.approx(got[False][0], rel=1e-12)
    assert got[False][1] == 0.0
    assert got[True][1] < 0  # descending it raises the bias: toward firing on the targets


def test_peak_charge_is_off_during_its_warmup_and_on_from_its_last_step(monkeypatch):
    """boundary_peaks_warmup=5: the training loss and dL/dz at global steps 0 and 4 are those of no peak charge; at
    step 5 those of the charge with no warmup."""
    dm = tiny_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    def run(step: int, **options) -> tuple[float, torch.Tensor]:
        monkeypatch.setattr(HMLSTMLanguageModel, "global_step", property(lambda self: step))
        torch.manual_seed(0)
        model = HMLSTMLanguageModel(**TINY, vocab=dm.vocab.chars, boundary_bias=0.2, **options).double()
        model.log = lambda *a, **k: None
        loss = model._shared_step(batch, "train")
        probe = model._probe
        loss.backward()
        return float(loss.detach()), probe.grad.clone()

    off = run(0, boundary_peaks=[0.0, 0.0])
    on = run(0, boundary_peaks=[0.3, 0.0])
    assert abs(on[0] - off[0]) > 1e-6 and not torch.allclose(on[1], off[1])  # the charge moves both
    for step, expected in ((0, off), (4, off), (5, on)):
        got = run(step, boundary_peaks=[0.3, 0.0], boundary_peaks_warmup=5)
        assert got[0] == pytest.approx(expected[0], rel=1e-12), step
        assert torch.allclose(got[1], expected[1], rtol=1e-10, atol=1e-14), step


def test_boundary_peaks_warmup_refuses_bad_values_and_warns_for_the_lstm():
    for bad in (-1, 2.5):
        with pytest.raises(ValueError, match="boundary_peaks_warmup must be an int >= 0"):
            HMLSTMLanguageModel(**TINY, boundary_peaks=1.0, boundary_peaks_warmup=bad)
    with pytest.warns(UserWarning, match="boundary_peaks_warmup=60 is unused"):
        HMLSTMLanguageModel(cell="lstm", boundary_peaks_warmup=60)


def test_boundary_peaks_reach_warns_for_the_lstm_and_without_the_peaks():
    with pytest.warns(UserWarning, match="boundary_peaks_reach=True is unused") as said:
        HMLSTMLanguageModel(cell="lstm", boundary_peaks_reach=True)
    assert len([w for w in said if "boundary_peaks_reach" in str(w.message)]) == 1
    for option in ({"boundary_peaks_reach": True}, {"boundary_peaks_warmup": 5}):
        with pytest.warns(UserWarning, match="which boundary_peaks=0.0 turns off") as said:
            model = HMLSTMLanguageModel(**TINY, **option)
        assert model._peaks == []  # said, not fatal: the model builds with the charge off
    with warnings.catch_warnings():  # with the peaks on, neither option is unused
        warnings.simplefilter("error")
        HMLSTMLanguageModel(**TINY, boundary_peaks=1.0, boundary_peaks_reach=True, boundary_peaks_warmup=5)


def test_boundary_peaks_refuses_bad_values_and_warns_for_the_lstm():
    with pytest.raises(ValueError, match="boundary_peaks must be >= 0"):
        HMLSTMLanguageModel(**TINY, boundary_peaks=-0.1)
    with pytest.raises(ValueError, match=r"boundary_peaks as a list needs one value per boundary layer"):
        HMLSTMLanguageModel(**TINY, boundary_peaks=[0.1, 0.1, 0.1])
    with pytest.warns(UserWarning, match="boundary_peaks=0.2 is unused"):
        HMLSTMLanguageModel(cell="lstm", boundary_peaks=0.2)


def test_peak_charge_is_balanced_between_targets_and_the_rest():
    from hmlstm.boundary_options import peak_charge

    z1 = torch.tensor([[1.0, 0.0, 1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([[True, False, False, False]])  # a quarter of the steps are targets
    charge = peak_charge([z1, z2], [0.4, 0.0], [y, ~y])
    # 0.4 / 2 * (off-target boundaries 2/4 / (3/4) - on-target 1/4 / (1/4))
    assert float(charge) == pytest.approx(0.2 * (2 / 3 - 1))
    charge.backward()
    assert torch.allclose(z1.grad, torch.tensor([[-0.2, 0.2 / 3, 0.2 / 3, 0.2 / 3]], dtype=torch.float64))
    assert z2.grad is None  # weight 0: not in the graph
    for always in (torch.ones(1, 4), torch.zeros(1, 4)):  # firing everywhere or nowhere: no charge
        assert float(peak_charge([always, always], [0.4, 0.4], [y, ~y])) == pytest.approx(0.0, abs=1e-12)


def test_upper_layer_targets_are_the_larger_entropy_peaks_among_the_boundaries_below():
    from hmlstm.boundary_options import next_char_entropy, peak_targets

    logits = logits_with_entropies([[0.1, 2.0, 0.1, 1.2, 0.2, 1.6, 0.1, 0.4]])
    z1 = torch.tensor([[0, 1, 0, 1, 0, 1, 0, 1]], dtype=torch.float64)
    z2 = torch.zeros_like(z1)
    t1, t2 = peak_targets(logits, [z1, z2])
    assert torch.equal(t1, entropy_peaks(logits))
    # layer 1 fired on entropies 2.0, 1.2, 1.6, 0.4 (mean 1.3): layer 2's targets are the 2.0 and the 1.6
    assert torch.equal(t2, torch.tensor([[False, True, False, False, False, True, False, False]]))
    h = next_char_entropy(logits) / 0.6931471805599453
    assert torch.allclose(h, torch.tensor([[0.1, 2.0, 0.1, 1.2, 0.2, 1.6, 0.1, 0.4]], dtype=torch.float32), atol=1e-4)
    assert not peak_targets(logits, [torch.zeros_like(z1), z2])[1].any()  # nothing below: no target


def test_nesting_charge_costs_only_boundaries_above_none():
    from hmlstm.boundary_options import nesting_charge

    z1 = torch.tensor([[1.0, 0.0, 1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    z2 = torch.tensor([[1.0, 1.0, 0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    charge = nesting_charge([z1, z2], 0.8)
    assert float(charge) == pytest.approx(0.8 * 2 / 4)  # steps 1 and 3: layer 2 fired, layer 1 did not
    charge.backward()
    assert torch.equal(z2.grad, torch.tensor([[0.0, 0.2, 0.0, 0.2]], dtype=torch.float64))
    assert z1.grad is None  # the layer below is the reference, not pushed
    with pytest.raises(ValueError, match="boundary_nesting must be >= 0"):
        HMLSTMLanguageModel(**TINY, boundary_nesting=-1.0)


def test_state_reset_zeros_whole_streams_at_its_rate():
    from hmlstm.state import HMLSTMState
    from hmlstm.training import reset_streams

    g = torch.Generator().manual_seed(0)
    state = HMLSTMState(h=(torch.rand(4000, 3, generator=g) + 1, torch.rand(4000, 2, generator=g) + 1),
                        c=(torch.rand(4000, 3, generator=g) + 1, torch.rand(4000, 2, generator=g) + 1),
                        z=(torch.ones(4000),))
    torch.manual_seed(1)
    out = reset_streams(state, 0.25)
    zeroed = out.h[0][:, 0] == 0
    assert 0.22 < float(zeroed.float().mean()) < 0.28
    for part in (out.h, out.c):
        for old, new in zip(state.h if part is out.h else state.c, part):
            assert (new[zeroed] == 0).all() and torch.equal(new[~zeroed], old[~zeroed])  # whole rows, all layers
    assert torch.equal(out.z[0], (~zeroed).float())
    with pytest.raises(ValueError, match=r"state_reset must be in \[0, 1\)"):
        HMLSTMLanguageModel(**TINY, state_reset=1.0)


def test_state_reset_applies_to_training_streams_only():
    dm = tiny_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    model = HMLSTMLanguageModel(**TINY, vocab=dm.vocab.chars, state_reset=0.999999).double()
    model.log = lambda *a, **k: None
    with torch.no_grad():
        warm = model(batch["input"]).rnn.state  # a state some batch left
        fresh = float(model._shared_step(batch, "val"))  # val starts from zeros
        model._states["val"] = warm
        carried = float(model._shared_step(batch, "val"))  # val carries its state: no reset there
        model._states["train"] = warm
        trained = float(model._shared_step(batch, "train"))  # every stream reset (p ~ 1): the zero-state loss
    assert carried != fresh
    assert trained == pytest.approx(fresh, rel=1e-12)


def test_boundary_bias_per_layer():
    torch.manual_seed(0)
    uniform = HMLSTMLanguageModel(**TINY, vocab="ab .")
    torch.manual_seed(0)
    model = HMLSTMLanguageModel(**TINY, vocab="ab .", boundary_bias=[None, -0.5])
    biases = [(layer, float(layer.bias[4 * layer.hidden_size])) for layer in model.net.rnn.layers if layer.has_boundary]
    first = uniform.net.rnn.layers[0]
    assert biases[0][1] == float(first.bias[4 * first.hidden_size])  # null: the uniform init, untouched
    assert biases[1][1] == -0.5
    with pytest.raises(ValueError, match=r"boundary_bias as a list needs one value \(or null\) per boundary layer"):
        HMLSTMLanguageModel(**TINY, vocab="ab .", boundary_bias=[0.5])


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_a_short_fit_with_every_option_logs_its_charges(tmp_path, backend):
    from hmlstm.backends import unavailable_reason

    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:  # cpp: the extension is not built
        pytest.skip(reason)
    model = HMLSTMLanguageModel(**(TINY | {"backend": backend}), boundary_peaks=[1.0, 0.5], boundary_nesting=0.1,
                                boundary_cost=[0.05, 0.0], state_reset=0.2, boundary_peaks_reach=True,
                                boundary_peaks_warmup=1)
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer(tmp_path, logger=logger, log_every_n_steps=1).fit(model, tiny_data())
    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    for name in ("train/peak_charge", "train/nesting_charge", "train/boundary_cost"):
        values = [float(r[name]) for r in rows if r.get(name)]
        assert values and all(math.isfinite(v) for v in values), name
    assert any(float(r["val/bpc"]) > 0 for r in rows if r.get("val/bpc"))


def test_rate_bands_refuse_bad_values_and_warn_for_the_lstm():
    with pytest.raises(ValueError, match=r"boundary_rates needs one \[lo, hi\] \(or null\) per boundary layer"):
        HMLSTMLanguageModel(**TINY, vocab="ab .", boundary_rates=[[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"0 <= lo <= hi <= 1"):
        HMLSTMLanguageModel(**TINY, vocab="ab .", boundary_rates=[None, [0.3, 0.2]])
    with pytest.raises(ValueError, match="boundary_rate_step must be > 0"):
        HMLSTMLanguageModel(**TINY, vocab="ab .", boundary_rates=[None, [0.1, 0.2]], boundary_rate_step=0.0)
    with pytest.warns(UserWarning, match="boundary_rates=.* is unused: cell='lstm'"):
        HMLSTMLanguageModel(hidden_sizes=(8, 8), vocab="ab .", cell="lstm", boundary_rates=[[0.1, 0.2]])


def test_steer_detector_rates_moves_each_bias_toward_its_band():
    from hmlstm.boundary_options import steer_detector_rates

    model = HMLSTMLanguageModel(**TINY, vocab="ab .", boundary_bias=0.0)
    rnn = model.net.rnn
    rows = [4 * layer.hidden_size for layer in rnn.layers]
    before = [rnn.layers[k].bias.detach().clone() for k in range(3)]
    # layer 1 below its band, layer 2 above it
    steer_detector_rates(rnn, [0.01, 0.9], [(0.05, 0.5), (0.05, 0.5)], 0.25)
    assert float(rnn.layers[0].bias[rows[0]]) == 0.25 and float(rnn.layers[1].bias[rows[1]]) == -0.25
    steer_detector_rates(rnn, [0.3, 0.3], [(0.05, 0.5), None], 0.25)  # inside the band, and no band: unchanged
    assert float(rnn.layers[0].bias[rows[0]]) == 0.25 and float(rnn.layers[1].bias[rows[1]]) == -0.25
    for k in range(3):  # nothing but the boundary units' biases moved
        changed = (rnn.layers[k].bias.detach() != before[k]).nonzero().flatten().tolist()
        assert changed == ([rows[k]] if k < 2 else [])


def test_a_dead_layer_comes_back_into_its_band_during_a_fit(tmp_path):
    """Layer 2's detector starts far below firing (bias -6): no gradient reaches a saturated hard sigmoid, and
    without the band it stays dead; with the band its bias rises every step its rate is below 0.2."""
    biases = {}
    for bands in (None, [None, [0.2, 0.6]]):
        torch.manual_seed(0)
        model = HMLSTMLanguageModel(**TINY, boundary_bias=[None, -6.0], boundary_rates=bands, boundary_rate_step=0.5)
        trainer(tmp_path, max_epochs=2, limit_train_batches=8).fit(model, tiny_data())
        layer = model.net.rnn.layers[1]
        biases[bands is not None] = float(layer.bias[4 * layer.hidden_size])
    assert biases[False] == pytest.approx(-6.0, abs=0.05)  # dead: Adam barely moves it
    assert biases[True] > -6.0 + 0.5 * 8  # at least 8 of the 16 steps raised it
