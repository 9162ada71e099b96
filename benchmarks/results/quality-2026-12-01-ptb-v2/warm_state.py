"""Validation BPC of a PTB checkpoint from a zero state and from the training streams' state it saved, and the
cell norms of both: does the model depend on a state that only a long stream builds?

    python warm_state.py CKPT [--batches 6] [--data-dir ../../../../shared/data/ptb]

Prints, per layer, the mean over the batch of |c| in the checkpoint's training state and after the first
validation batches from zero, then the BPC of those batches from zero, from the training state, and from zero
with only the top layer's cell taken from the training state.
"""

import argparse
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F

from hmlstm.data import PTBDataModule
from hmlstm.state import HMLSTMState
from hmlstm.training import HMLSTMLanguageModel


def norms(cells) -> str:
    return " / ".join(f"{c.norm(dim=-1).mean():.1f}" for c in cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[4] / "shared" / "data" / "ptb"))
    args = parser.parse_args()
    saved = torch.load(args.ckpt, map_location="cpu", weights_only=False)
    train = saved["hmlstm"]["train_state"]
    model = HMLSTMLanguageModel.load_from_checkpoint(args.ckpt, map_location="cpu")
    model.eval()
    hp = model.hparams
    dm = PTBDataModule(data_dir=args.data_dir, batch_size=train["h"][0].shape[0], seq_len=100)
    dm.setup("fit")
    batches = list(itertools.islice(iter(dm.val_dataloader()), args.batches))
    B = batches[0]["input"].shape[0]
    zero = model.net.rnn.initial_state(B)
    starts = {
        "zero": None,
        "training state": HMLSTMState(tuple(train["h"]), tuple(train["c"]), tuple(train["z"])),
        "zero, top cell from the training state": HMLSTMState(zero.h, zero.c[:-1] + (train["c"][-1],), zero.z),
    }
    print(f"step {saved['global_step']}, layers {list(hp.hidden_sizes)}: |c| per layer in the training state "
          f"{norms(train['c'])}")
    for name, state in starts.items():
        bits = []
        for b in batches:
            with torch.no_grad():
                out = model.net(b["input"], state=state, slope=model.slope)
            state = out.rnn.state
            bits.append(F.cross_entropy(out.logits.flatten(0, 1), b["target"].flatten()).item() / 0.6931471805599453)
        print(f"  from {name}: val BPC of the first {len(batches)} batches {sum(bits) / len(bits):.3f}; "
              f"|c| after them {norms(state.c)}")


if __name__ == "__main__":
    main()
