"""a s at the word and phrase separators of the untrained model of each run given (where_fired.initial_model),
on 3200 validation characters: python init_preactivations.py RUN_DIR ... (run from this folder)."""
import sys
from pathlib import Path

import torch
import yaml

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]
from where_fired import initial_model, position_classes
from hmlstm.training import HMLSTMLanguageModel
from hmlstm.data import SyntheticDataModule
from experiments import preactivations
for run in sys.argv[1:]:
    tr = HMLSTMLanguageModel.load_from_checkpoint(run + "/checkpoints/last.ckpt", map_location="cpu")
    m = initial_model(run, tr)
    m.eval()
    cfg = yaml.safe_load(open(run + "/config.yaml"))
    dm = SyntheticDataModule(**cfg["data"]["init_args"])
    dm.setup()
    c = dm._corpora["val"]
    N = 3200
    x = m.vocab.encode(c.text[:N]).view(64, 50)  # 64 rows of 50 characters, each from a zero state
    cls = position_classes(c.boundaries["word"][:N], c.boundaries["phrase"][:N])
    with torch.no_grad():
        out = m.net(x, slope=m.slope)
        (s, _), _ = preactivations(m, x, None, out)  # layer 1 (never COPY), layer 2
    s = s.reshape(-1)
    a = float(m.slope)
    for k in ("word_sep", "phrase_sep"):
        idx = torch.tensor([i for i, q in enumerate(cls) if q == k])
        v = a * s[idx]
        print(Path(run).parents[2].name, k, f"a*s mean {v.mean():+.2f} min {v.min():+.2f} max {v.max():+.2f} "
              f"inside {(v.abs() < 1).float().mean():.2f}")
