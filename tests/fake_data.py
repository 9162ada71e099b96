"""Small stand-ins for the corpora that tests read, written into a temporary folder."""

from pathlib import Path

import torch


def fake_ptb(root: Path, lines: int = 200) -> Path:
    """`lines` training lines (a tenth of that for validation and test) in Mikolov's ptb.char format
    (space-separated characters, `_` between words), drawn from eight words with a fixed seed; returns root."""
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran"]
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", lines), ("valid", lines // 10), ("test", lines // 10)):
        text = [" _ ".join(" ".join(words[i]) for i in torch.randint(0, len(words), (6,), generator=g).tolist())
                for _ in range(n)]
        (root / f"ptb.char.{split}.txt").write_text("\n".join(text) + "\n")
    return root
