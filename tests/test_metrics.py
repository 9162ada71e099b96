"""Boundary F1, word boundaries, operation fractions and the unigram entropy on hand-made examples."""

import math

import pytest
import torch

from hmlstm.metrics import boundary_f1, operation_fractions, unigram_entropy, word_boundaries


def mask(s: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in s])


def test_boundary_f1_known_answer():
    #            positions: 0123456789
    true = mask("0010010001")  # 3 true boundaries: 2, 5, 9
    pred = mask("0010100011")  # 4 predicted: 2 (hit), 4, 8, 9 (hit)
    s = boundary_f1(pred, true)
    assert (s.true_positives, s.num_predicted, s.num_true) == (2, 4, 3)
    assert s.precision == pytest.approx(2 / 4)
    assert s.recall == pytest.approx(2 / 3)
    assert s.f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))  # 4/7


def test_boundary_f1_tolerance_is_one_to_one():
    true = mask("0010010001")
    pred = mask("0010100011")
    s = boundary_f1(pred, true, tolerance=1)
    # 2 -> 2, 4 -> 5, 8 -> 9; 9 finds 9 already taken: 3 hits of 4 predictions
    assert (s.true_positives, s.num_predicted, s.num_true) == (3, 4, 3)
    assert s.precision == pytest.approx(0.75) and s.recall == pytest.approx(1.0)
    assert s.f1 == pytest.approx(2 * 0.75 / 1.75)


def test_boundary_f1_rows_are_independent():
    # a prediction at the end of row 0 must not match a true boundary at the start of row 1
    true = torch.tensor([[0, 0, 0], [1, 0, 0]], dtype=torch.bool)
    pred = torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    assert boundary_f1(pred, true, tolerance=1).true_positives == 0


def test_boundary_f1_edge_cases():
    empty = mask("0000")
    assert boundary_f1(empty, mask("0100")).f1 == 0.0
    assert boundary_f1(mask("0110"), mask("0110")).f1 == 1.0
    with pytest.raises(ValueError, match="same shape"):
        boundary_f1(mask("01"), mask("010"))


def test_word_boundaries_mark_the_space_that_ends_a_word():
    text = "the cat  sat\non"
    got = word_boundaries(text).nonzero().flatten().tolist()
    assert got == [3, 7, 12]  # second space of "  " is not a new boundary
    synthetic = "ab cd.ef gh."  # --separators " .": a period ends a word (and a phrase) too
    assert word_boundaries(synthetic, " .").nonzero().flatten().tolist() == [2, 5, 8, 11]
    assert word_boundaries(synthetic).nonzero().flatten().tolist() == [2, 8]


def test_operation_fractions_hand_example():
    # 3 layers, B=1, T=4. z1 = 1,0,1,0 from z1_init = 0; z2 = 0,0,1,0 from z2_init = 1.
    z1 = torch.tensor([[1.0, 0, 1, 0]])
    z2 = torch.tensor([[0.0, 0, 1, 0]])
    fr = operation_fractions([z1, z2], [torch.zeros(1), torch.ones(1)])
    # layer 1: previous own z = 0,1,0,1 -> FLUSH at t=1,3; UPDATE at t=0,2 (z^0 = 1)
    assert {k: float(v) for k, v in fr[0].items()} == {"update": 0.5, "copy": 0.0, "flush": 0.5}
    # layer 2: previous own z = 1,0,0,1 -> FLUSH t=0,3; below z1 at t=1,2 = 0,1 -> COPY t=1, UPDATE t=2
    assert {k: float(v) for k, v in fr[1].items()} == {"update": 0.25, "copy": 0.25, "flush": 0.5}
    # top layer: never FLUSH; UPDATE where z2 = 1 (t=2)
    assert {k: float(v) for k, v in fr[2].items()} == {"update": 0.25, "copy": 0.75, "flush": 0.0}


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([0, 1, 2, 3])) == pytest.approx(2.0)
    assert unigram_entropy(torch.tensor([5, 5, 5])) == pytest.approx(0.0)
    p = torch.tensor([0.5, 0.25, 0.25])
    assert unigram_entropy(torch.tensor([0, 0, 1, 2])) == pytest.approx(float(-(p * p.log2()).sum()))
    with pytest.raises(ValueError):
        unigram_entropy(torch.tensor([], dtype=torch.long))
    assert math.isfinite(unigram_entropy(torch.tensor([1, 7])))
