"""Truncated-BPTT batches over contiguous streams, and the loader that splits them between processes and resumes mid-epoch."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor
from torch.utils.data import Dataset


class StreamBatches(Dataset):
    """Truncated-BPTT batches over B contiguous streams of a token sequence.

    Args:
        ids: (N,) int64 tokens; the first B * (N // B) are used, as B streams of S = N // B.
        batch_size: B.
        seq_len: T; the last batch may be shorter (every position but the last of a stream is an input).
        labels: name -> (N,) bool boundary labels, cut the same way as the inputs.

    Item k: {"input": (B, T) positions [kT, kT+T), "target": (B, T) one position later,
    "boundary/<name>": (B, T) bool labels of the input positions}.
    """

    def __init__(self, ids: Tensor, batch_size: int, seq_len: int, labels: Optional[dict[str, Tensor]] = None) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
        S = ids.numel() // batch_size
        if S < 2:
            raise ValueError(f"{ids.numel()} tokens give streams of {S} for batch_size={batch_size}; need >= 2")
        self.seq_len = seq_len
        self.streams = ids[: batch_size * S].view(batch_size, S)  # (B, S)
        self.labels = {k: v[: batch_size * S].view(batch_size, S) for k, v in (labels or {}).items()}
        self.num_batches = math.ceil((S - 1) / seq_len)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, k: int) -> dict[str, Tensor]:
        if not 0 <= k < self.num_batches:
            raise IndexError(k)
        start = k * self.seq_len
        end = min(start + self.seq_len, self.streams.shape[1] - 1)
        batch = {"input": self.streams[:, start:end], "target": self.streams[:, start + 1 : end + 1]}
        batch.update({f"boundary/{name}": v[:, start:end] for name, v in self.labels.items()})
        return batch


class StreamLoader:
    """Yields the batches of a `StreamBatches` in order, over this process's share of the streams, and can
    start in the middle of an epoch.

    Several processes (DDP): the B streams of the global batch are split between the W processes, rank r
    taking rows [r B/W, (r+1) B/W), so W processes together train on exactly the batch one process would.
    (A plain DataLoader would get Lightning's DistributedSampler, which deals out batches, i.e. time steps,
    to the processes and breaks the truncated-BPTT streams.)

    Resuming mid-epoch: Lightning stores `state_dict()` in checkpoints and hands it back on resume, before the
    epoch's iterator is made. The position is the number of this epoch's batches that training has finished;
    the LightningModule advances it after every training step (`advance_to`): the loader cannot count them
    itself, because Lightning fetches a batch ahead.

    Args:
        dataset: the batches (B streams).
        rank, world_size: this process and the number of processes; world_size must divide B.
    """

    def __init__(self, dataset: StreamBatches, rank: int = 0, world_size: int = 1) -> None:
        B = dataset.streams.shape[0]
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if B % world_size:
            raise ValueError(f"the batch size {B} must be divisible by the number of processes {world_size}: each "
                             f"process takes B / {world_size} of the streams (set --data.batch_size / "
                             f"--data.eval_batch_size to a multiple of {world_size})")
        self.dataset = dataset
        self.rank, self.world_size = rank, world_size
        per = B // world_size
        self.rows = slice(rank * per, (rank + 1) * per)
        self.position = 0
        self._start = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        start, self._start = self._start, 0
        self.position = start
        return self._batches(start)

    def _batches(self, start: int):
        for k in range(start, len(self.dataset)):
            yield {key: value[self.rows] for key, value in self.dataset[k].items()}

    def advance_to(self, position: int) -> None:
        """Training has finished the first `position` batches of the epoch."""
        self.position = position

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "num_batches": len(self)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_batches", len(self)) != len(self):
            raise ValueError(f"the checkpoint was written with {state['num_batches']} training batches per epoch, "
                             f"this data gives {len(self)}: resume with the same data, batch_size and seq_len")
        position = int(state["position"])
        self._start = self.position = position if position < len(self) else 0  # finished: the next epoch
