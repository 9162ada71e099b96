"""What a trained synthetic-language model's own boundaries are worth to it: its validation BPC with layer 2's z
replaced by other patterns, layer 1's kept.

    python benchmarks/forced_boundaries.py RUN_DIR [--chars 6000] [--out forced.json]

RUN_DIR is a `hmlstm fit` log folder (config.yaml, checkpoints/last.ckpt) of a 3-layer run on
`SyntheticDataModule`. The model reads the first --chars validation characters once with its own boundaries, then
with layer 2's z forced (the forward's `boundaries` argument; layer 1's z as the model chose them):

    own                 the model's own z (the forced path; equals the free forward)
    true_phrases        the true phrase ends
    own_on_phrases      its own z, kept only on the true phrase ends
    own_and_phrases     its own z, plus every true phrase end
    word_ends           every true word end
    never               no layer-2 boundary

A model whose BPC rises when its layer 2 is moved onto the true phrases has built its predictions on its own
pattern: two models of equal BPC can rely on different layer-2 structures (docs/results.md), so the language
model loss alone does not say where layer 2 belongs.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from hmlstm.training import HMLSTMLanguageModel
from where_fired import validation_corpus

PATTERNS = ("own", "true_phrases", "own_on_phrases", "own_and_phrases", "word_ends", "never")


def forced_bpc(run_dir: str | Path, chars: int = 6000) -> dict:
    """{"run", "chars", "free": BPC of the free forward, "forced": {pattern: BPC}, "rate_l2": {pattern: rate}}."""
    run_dir = Path(run_dir)
    model = HMLSTMLanguageModel.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    model.eval()
    if model.net.rnn.num_layers != 3:
        raise ValueError(f"{run_dir} has {model.net.rnn.num_layers} layers: this table forces layer 2 of a "
                         f"3-layer model")
    corpus = validation_corpus(run_dir)
    ids = model.vocab.encode(corpus.text[: chars + 1])[None]  # (1, N + 1)
    x, y = ids[:, :-1], ids[0, 1:]
    n = x.shape[1]
    word = corpus.boundaries["word"][:n].float()  # (N,), True on the last character of a segment
    phrase = corpus.boundaries["phrase"][:n].float()

    def bpc(logits: torch.Tensor) -> float:
        return float(F.cross_entropy(logits[0], y)) / math.log(2)

    with torch.no_grad():
        free = model.net(x, slope=model.slope)
        z1, z2 = free.rnn.z[0][0], free.rnn.z[1][0]  # (N,) each
        layer2 = {"own": z2, "true_phrases": phrase, "own_on_phrases": z2 * phrase,
                  "own_and_phrases": torch.maximum(z2, phrase), "word_ends": word, "never": torch.zeros_like(z2)}
        forced = {}
        for name in PATTERNS:
            out = model.net(x, slope=model.slope, boundaries=torch.stack([z1, layer2[name]])[:, None])  # (2, 1, N)
            forced[name] = bpc(out.logits)
    return {"run": str(run_dir), "chars": n, "free": bpc(free.logits), "forced": forced,
            "rate_l2": {name: float(layer2[name].mean()) for name in PATTERNS}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--chars", type=int, default=6000)
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    result = forced_bpc(args.run_dir, args.chars)
    print(f"free forward: {result['free']:.4f} bits/char")
    print("| layer 2's z | rate | val BPC |\n|---|---|---|")
    for name in PATTERNS:
        print(f"| {name} | {result['rate_l2'][name]:.3f} | {result['forced'][name]:.4f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
