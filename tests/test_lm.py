"""The gated output module (eq. 11-12) and the character language model."""

import pytest
import torch

from hmlstm import CharLM, GatedOutput


def test_gated_output_follows_eq_11_12():
    torch.manual_seed(0)
    mod = GatedOutput((5, 3, 4), 6)
    hs = [torch.randn(2, 7, h) for h in (5, 3, 4)]
    cat = torch.cat(hs, -1)
    expect = 0
    for l, h in enumerate(hs):
        g = torch.sigmoid(cat @ mod.gate.weight[l])  # g^l = sigm(w^l . [h^1; ...; h^L])
        expect = expect + g[..., None] * (h @ mod.proj[l].weight.T)
    torch.testing.assert_close(mod(hs), torch.relu(expect))
    assert mod.gate.bias is None and all(p.bias is None for p in mod.proj)


def test_char_lm_shapes_and_state():
    lm = CharLM(30, (8, 6), embed_size=128, output_size=10, backend="reference")
    assert lm.embed.embedding_dim == 128
    tokens = torch.randint(0, 30, (3, 9))
    out = lm(tokens, slope=2.0)
    assert out.logits.shape == (3, 9, 30)
    assert [h.shape for h in out.rnn.h] == [(3, 9, 8), (3, 9, 6)]
    nxt = lm(tokens[:, :2], state=out.rnn.state)
    assert nxt.logits.shape == (3, 2, 30)


def test_char_lm_rejects_bad_tokens():
    lm = CharLM(30, (8,), output_size=10)
    with pytest.raises(ValueError, match=r"tokens must be an integer tensor of shape \(B, T\)"):
        lm(torch.randn(3, 9))
