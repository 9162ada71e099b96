"""Character-level data for the HM-LSTM: vocabulary, truncated-BPTT batches, Lightning data modules.

    dm = PydocDataModule(batch_size=32, seq_len=100)   # offline: the Python docs shipped with CPython
    dm = PTBDataModule(data_dir="data/ptb")             # Mikolov's character-level PTB (ptb.char.*.txt)
    dm = Text8DataModule(); dm = Enwik8DataModule()     # 90M/5M/5M splits; enwik8 is read as bytes
    dm = TextDataModule(path="corpus.txt")              # any text file, split 90/5/5 (or train/val/test files)
    dm = SyntheticDataModule(seed=0)                    # known word and phrase boundaries

Truncated BPTT: each split is cut into B contiguous streams (B = batch size); batch k holds positions
[k*T, (k+1)*T) of every stream and the targets one position later, so the final state of batch k is the
right initial state of batch k+1 (the LightningModule carries it). Batches are never shuffled. The loaders
are `StreamLoader`s: with several processes (DDP) each takes its share of the B streams, and a run resumed
from a mid-epoch checkpoint starts at the batch after the last one trained.

The vocabulary is built from the training split. Id 0 is reserved for characters not in it (an evaluation
text may contain some); it is never a training target. The LightningModule stores the vocabulary in its
hyperparameters, so a checkpoint is self-contained.
"""

from __future__ import annotations

from .download import (
    RemoteFile,
    download,
    ensure_files,
    parse_ptb_char,
    read_text,
    verify_file,
)
from .modules import (
    ENWIK8_FILE,
    PTB_FILES,
    SPLITS,
    TEXT8_FILE,
    CharDataModule,
    Enwik8DataModule,
    PTBDataModule,
    PydocDataModule,
    SyntheticDataModule,
    Text8DataModule,
    TextDataModule,
    pydoc_text,
    split_text,
)
from .streams import StreamBatches, StreamLoader
from .vocab import Vocabulary

__all__ = [
    "SPLITS",
    "CharDataModule",
    "ENWIK8_FILE",
    "Enwik8DataModule",
    "PTBDataModule",
    "PTB_FILES",
    "PydocDataModule",
    "RemoteFile",
    "StreamBatches",
    "StreamLoader",
    "SyntheticDataModule",
    "TEXT8_FILE",
    "Text8DataModule",
    "TextDataModule",
    "Vocabulary",
    "download",
    "ensure_files",
    "parse_ptb_char",
    "pydoc_text",
    "read_text",
    "split_text",
    "verify_file",
]
