"""What a trained synthetic model's boundaries are worth, by layer and position class: validation bits/char with
its own boundaries, and with them forced after removing one layer's firings in one class (README.md beside it).

    python counterfactual.py RUN_DIR      # RUN_DIR: a run folder with config.yaml and checkpoints/last.ckpt
"""
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/, for where_fired
from where_fired import position_classes  # noqa: E402

from hmlstm.data import SyntheticDataModule
from hmlstm.training import HMLSTMLanguageModel

run = Path(sys.argv[1])
torch.set_num_threads(1)
model = HMLSTMLanguageModel.load_from_checkpoint(run / "checkpoints" / "last.ckpt", map_location="cpu").eval()
cfg = yaml.safe_load((run / "config.yaml").read_text())
dm = SyntheticDataModule(**cfg["data"]["init_args"])
dm.setup()
corpus = dm._corpora["val"]
N, B = 10000, 20
T = N // B
text = corpus.text[: N + B]
ids = model.vocab.encode(text)
x = torch.stack([ids[b * T: b * T + T] for b in range(B)])
y = torch.stack([ids[b * T + 1: b * T + T + 1] for b in range(B)])
cls = position_classes(corpus.boundaries["word"][:N + B], corpus.boundaries["phrase"][:N + B])
C = [[cls[b * T + t] for t in range(T)] for b in range(B)]


def bpc(boundaries=None):
    """Bits per character of the B streams (and the model's output), with `boundaries` forced if given."""
    with torch.no_grad():
        out = model.net(x, slope=model.slope, boundaries=boundaries)
    nll = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), y.reshape(-1)).item()
    return nll / math.log(2), out


base, out = bpc()
z = torch.stack([zz > 0.5 for zz in out.rnn.z]).float()  # (L-1, B, T)
print(f"own boundaries: {base:.4f} bpc; rates {[round(float(r), 3) for r in z.mean((1, 2))]}")
same, _ = bpc(z)
print(f"the same forced: {same:.4f}")
for layer in range(z.shape[0]):
    for c in ("inner", "before_word", "before_phrase", "word_first", "phrase_first", "word_sep", "phrase_sep"):
        mask = torch.tensor([[k == c for k in row] for row in C])
        zz = z.clone()
        zz[layer][mask] = 0
        removed = int((z[layer][mask] > 0).sum())
        v, _ = bpc(zz)
        print(f"layer {layer + 1} without its {removed:5d} firings at {c:13s}: {v:.4f} ({v - same:+.4f})")
# layer 1 at exactly the separators
sep = torch.tensor([[k in ("word_sep", "phrase_sep") for k in row] for row in C]).float()
zz = z.clone()
zz[0] = sep
v, _ = bpc(zz)
print(f"layer 1 at exactly the separators: {v:.4f} ({v - same:+.4f})")
