"""Where a trained model's boundaries fall, by position class, on the validation text of its synthetic run.

    python benchmarks/where_fired.py RUN_DIR [--chars 20000] [--at-init] [--out where.json]

RUN_DIR is a `hmlstm fit` log folder (lightning_logs/csv/version_N: config.yaml and checkpoints/last.ckpt) of a
run on `SyntheticDataModule`. Every validation character gets one class, by the true segment ends around it:

    phrase_sep      the separator that closes a phrase (a boundary of both levels)
    word_sep        the separator that closes a word inside a phrase
    before_phrase   the character just before a phrase_sep (the phrase's last letter)
    before_word     the character just before a word_sep
    phrase_first    the first character of a phrase
    word_first      the first character of a word inside a phrase
    inner           every other character

and the table gives, per layer, the fraction of each class on which that layer fired. A second table splits the
word ends by the word's place in its phrase: `space 2` is the separator after a phrase's second word when the
phrase goes on, `period 2` the end of a phrase of two words. A third gives, for the same word ends, the model's own
entropy of the next character there (bits) and the fraction above the mean over all word ends: the targets that
`--model.boundary_peaks` gives layer 2 (`hmlstm.boundary_options.peak_targets`), and whether the phrase ends stand
out among the word ends as peaks. The F1 of the logs counts
hits on the separators only (`hmlstm.metrics`); this table tells a boundary that is missing from one that is one
character early (before_*) or late (*_first).

With --at-init the table is that of the run's model before its first step: the same configuration and seed
(`seed_everything` of its config.yaml) rebuild the weights it started from (tested). It shows what the
random initialization handed the training: on the synthetic language, whether a run's layer 1 ends up firing on
the word separators was already decided there (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytorch_lightning as pl
import torch
import yaml

from hmlstm.boundary_options import next_char_entropy
from hmlstm.data import SyntheticDataModule
from hmlstm.synthetic import SyntheticCorpus
from hmlstm.training import HMLSTMLanguageModel

CLASSES = ("phrase_sep", "word_sep", "before_phrase", "before_word", "phrase_first", "word_first", "inner")


def position_classes(word: torch.Tensor, phrase: torch.Tensor) -> list[str]:
    """word, phrase: (N,) bool true segment ends -> the class of every position (see the module docstring)."""
    n = len(word)
    out = []
    for i in range(n):
        if phrase[i]:
            out.append("phrase_sep")
        elif word[i]:
            out.append("word_sep")
        elif i + 1 < n and phrase[i + 1]:
            out.append("before_phrase")
        elif i + 1 < n and word[i + 1]:
            out.append("before_word")
        elif i > 0 and phrase[i - 1]:
            out.append("phrase_first")
        elif i > 0 and word[i - 1]:
            out.append("word_first")
        else:
            out.append("inner")
    return out


def word_end_positions(word: torch.Tensor, phrase: torch.Tensor) -> list[str]:
    """word, phrase: (N,) bool true segment ends -> for each word end in order, "space K" or "period K": K is the
    word's place in its phrase (1 = first), and whether it ends the phrase."""
    out, k = [], 0
    for w, p in zip(word.tolist(), phrase.tolist()):
        if w:
            k += 1
            out.append(f"{'period' if p else 'space'} {k}")
            if p:
                k = 0
    return out


def initial_model(run_dir: str | Path, trained: HMLSTMLanguageModel) -> HMLSTMLanguageModel:
    """The run's model before its first step: its config.yaml's model arguments and seed, `trained`'s vocabulary.

    The training CLI seeds every generator, then builds the network once the data module has given the
    vocabulary; seeding and building with the same vocabulary here draws the same weights (tested)."""
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
    seed = config.get("seed_everything")
    if not isinstance(seed, int):
        raise ValueError(f"{run_dir}/config.yaml has seed_everything: {seed!r}; the initial weights of a run "
                         f"can be rebuilt only from an integer seed")
    pl.seed_everything(seed, verbose=False)
    args = {k: v for k, v in config["model"].items() if k != "vocab"}
    return HMLSTMLanguageModel(vocab=trained.vocab.chars, **args)


def validation_corpus(run_dir: str | Path) -> SyntheticCorpus:
    """The validation text and true boundaries of a run on `SyntheticDataModule`, rebuilt from its config.yaml.

    Raises ValueError naming the data module when the run trained on another one (no true boundaries)."""
    data = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())["data"]
    if not data["class_path"].endswith("SyntheticDataModule"):
        raise ValueError(f"{run_dir} trained on {data['class_path']}: this table needs SyntheticDataModule's "
                         f"true word and phrase ends")
    dm = SyntheticDataModule(**data.get("init_args", {}))
    dm.setup()
    return dm._corpora["val"]


def where_fired(run_dir: str | Path, chars: int = 20_000, at_init: bool = False) -> dict:
    """The table's numbers as JSON: per layer the overall rate and the fraction fired in each class."""
    run_dir = Path(run_dir)
    model = HMLSTMLanguageModel.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", map_location="cpu")
    if at_init:
        model = initial_model(run_dir, model)
    model.eval()
    corpus = validation_corpus(run_dir)
    text = corpus.text[:chars]
    ids = model.vocab.encode(text)[None]  # (1, N) int64
    with torch.no_grad():
        out = model.net(ids, slope=model.slope)
    classes = position_classes(corpus.boundaries["word"][: len(text)], corpus.boundaries["phrase"][: len(text)])
    word, phrase = corpus.boundaries["word"][: len(text)], corpus.boundaries["phrase"][: len(text)]
    ends = word.nonzero().flatten()
    positions = word_end_positions(word, phrase)
    result = {"run": str(run_dir), "at_init": at_init, "chars": len(text),
              "counts": {c: classes.count(c) for c in CLASSES},
              "word_end_counts": {k: positions.count(k) for k in sorted(set(positions))}, "layers": []}
    # indices of each class among the characters, and of each kind of word end among the word ends
    class_idx = {c: torch.tensor([i for i, k in enumerate(classes) if k == c], dtype=torch.long) for c in CLASSES}
    position_idx = {k: torch.tensor([i for i, q in enumerate(positions) if q == k]) for k in result["word_end_counts"]}
    bits = next_char_entropy(out.logits)[0][ends] / math.log(2)  # (word ends,)
    above = bits > bits.mean()
    result["entropy_by_word_position"] = {
        k: {"bits": float(bits[idx].mean()), "above_mean": float(above[idx].float().mean())}
        for k, idx in position_idx.items()}
    for z in out.rnn.z:
        fired = z[0] > 0.5
        by_class = {c: float(fired[idx].float().mean()) if len(idx) else float("nan") for c, idx in class_idx.items()}
        at_ends = fired[ends]
        by_position = {k: float(at_ends[idx].float().mean()) for k, idx in position_idx.items()}
        result["layers"].append({"rate": float(fired.float().mean()), "fired": by_class,
                                 "fired_by_word_position": by_position})
    return result


def table(result: dict) -> str:
    cols = ["layer", "rate"] + list(CLASSES)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for k, layer in enumerate(result["layers"], start=1):
        lines.append(f"| {k} | {layer['rate']:.3f} | " + " | ".join(f"{layer['fired'][c]:.3f}" for c in CLASSES) + " |")
    keys = list(result["word_end_counts"])
    lines += ["", "| layer | " + " | ".join(f"{k} (n={result['word_end_counts'][k]})" for k in keys) + " |",
              "|" + "---|" * (len(keys) + 1)]
    for k, layer in enumerate(result["layers"], start=1):
        lines.append(f"| {k} | " + " | ".join(f"{layer['fired_by_word_position'][q]:.2f}" for q in keys) + " |")
    entropy = result["entropy_by_word_position"]
    lines += ["| next-character entropy, bits | " + " | ".join(f"{entropy[q]['bits']:.2f}" for q in keys) + " |",
              "| above the word ends' mean | " + " | ".join(f"{entropy[q]['above_mean']:.2f}" for q in keys) + " |"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--chars", type=int, default=20_000)
    parser.add_argument("--at-init", action="store_true", help="the run's model before its first step")
    parser.add_argument("--out", help="write the JSON here")
    args = parser.parse_args(argv)
    result = where_fired(args.run_dir, args.chars, args.at_init)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
