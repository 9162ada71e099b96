"""`hmlstm.options`: every bad argument of the language model fails by name before anything is built, and the
LSTM baseline refuses or warns about each HM-LSTM option."""

import inspect
import warnings

import pytest

from hmlstm.options import HM_ONLY, HM_TRAINING
from hmlstm.training import HMLSTMLanguageModel

BAD = [
    ("nonfinite", "ignore"), ("cell", "gru"), ("loss_reduction", "sum"), ("boundary_norm_cap", 0.0),
    ("adam_beta2", 1.0), ("weight_decay", -1e-4), ("boundary_cost", -0.1), ("boundary_cost", [0.1]),
    ("state_reset", 1.0), ("lr", 0.0), ("lr_factor", 1.5), ("lr_milestones", [5, 3]), ("lr_milestones", []),
    ("boundary_peaks", -1.0), ("boundary_peaks_warmup", 2.5), ("boundary_nesting", -1.0),
    ("boundary_rates", [[0.5, 0.1], None]), ("boundary_rates", [[0.1, 0.2]]), ("boundary_rate_step", 0.0),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v}" for n, v in BAD])
def test_a_bad_argument_fails_by_its_name(name, value):
    with pytest.raises(ValueError, match=name):
        HMLSTMLanguageModel(hidden_sizes=(8, 8, 8), **{name: value})


@pytest.mark.parametrize("name", HM_ONLY)
def test_the_lstm_refuses_each_option_that_builds_detectors(name):
    value = {"boundary": "sample", "copy_boundary": "recompute", "boundary_norm_cap": 1.9365}.get(name, True)
    with pytest.raises(ValueError, match=f"cell lstm has no boundary detector: {name} applies"):
        HMLSTMLanguageModel(hidden_sizes=(8, 8), cell="lstm", **{name: value})


@pytest.mark.parametrize("name", HM_TRAINING)
def test_the_lstm_says_each_boundary_charge_is_unused(name):
    value = {"boundary_peaks_reach": True, "boundary_peaks_warmup": 10, "boundary_rates": [[0.1, 0.3]]}.get(name, 0.5)
    with pytest.warns(UserWarning, match=f"{name}=.* is unused: cell='lstm'"):
        model = HMLSTMLanguageModel(hidden_sizes=(8, 8), cell="lstm", **{name: value})
    assert (model._costs, model._peaks, model._bands) == ([], [], [])  # said unused, and nothing is charged


def test_the_lstm_with_its_defaults_is_silent_and_has_no_charges():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = HMLSTMLanguageModel(hidden_sizes=(8, 8), cell="lstm")
    assert (model._costs, model._peaks, model._bands) == ([], [], [])


def test_every_boundary_argument_is_classified_for_the_lstm():
    # a new boundary option must say what the LSTM baseline does with it (refuse, or warn that it is unused)
    params = inspect.signature(HMLSTMLanguageModel.__init__).parameters
    boundary = {p for p in params if p.startswith("boundary") or p in ("copy_boundary", "oracle_boundaries")}
    assert boundary - {"boundary_rate_step"} == set(HM_ONLY) | set(HM_TRAINING)
    assert not set(HM_ONLY) & set(HM_TRAINING)


def test_charges_are_parsed_per_boundary_layer():
    model = HMLSTMLanguageModel(hidden_sizes=(8, 8, 8), boundary_cost=0.1, boundary_peaks=[0.5, 0.0],
                                boundary_rates=[None, [0.02, 0.2]])
    assert model._costs == [0.1, 0.1]
    assert model._peaks == [0.5, 0.0]
    assert model._bands == [None, (0.02, 0.2)]
