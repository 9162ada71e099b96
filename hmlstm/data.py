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

import hashlib
import math
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .metrics import unigram_entropy, whitespace_run_starts
from .synthetic import SyntheticLanguage

SPLITS = ("train", "val", "test")


# -- vocabulary ------------------------------------------------------------------------------------------


class Vocabulary:
    """Characters <-> ids. Id 0 is the unknown character; the known ones get 1..V-1 in code point order.

    Args:
        chars: the known characters (duplicates and order do not matter).
    """

    UNK = 0

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars = "".join(sorted(set(chars)))
        if not self.chars:
            raise ValueError("a vocabulary needs at least one character, got none")
        self._codes = torch.tensor([ord(c) for c in self.chars], dtype=torch.int64)
        self._space = torch.tensor([False] + [c.isspace() for c in self.chars])

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        return cls(set(text))

    def __len__(self) -> int:
        return len(self.chars) + 1

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} ids: unknown + {self.chars!r})"

    def encode(self, text: str) -> Tensor:
        """text -> (N,) int64 ids; characters outside the vocabulary map to `UNK`."""
        if not text:
            return torch.zeros(0, dtype=torch.int64)
        if max(text) <= "\xff":  # one byte per character: fast path (byte-level data, most ASCII text)
            codes = torch.frombuffer(bytearray(text.encode("latin-1")), dtype=torch.uint8).long()
        else:
            codes = torch.frombuffer(bytearray(text.encode("utf-32-le", "surrogatepass")), dtype=torch.int32).long()
        idx = torch.searchsorted(self._codes, codes).clamp_(max=len(self.chars) - 1)
        known = self._codes[idx] == codes
        return torch.where(known, idx + 1, torch.zeros_like(idx))

    def decode(self, ids: Iterable[int] | Tensor, unknown: str = "\ufffd") -> str:
        """ids -> text; `UNK` becomes `unknown`."""
        if isinstance(ids, Tensor):
            ids = ids.flatten().tolist()
        return "".join(self.chars[i - 1] if i > 0 else unknown for i in ids)

    def word_boundaries(self, ids: Tensor) -> Tensor:
        """(..., N) ids -> bool, True at whitespace that closes a word (see `hmlstm.metrics`)."""
        return whitespace_run_starts(self._space[ids])


# -- reading and downloading -----------------------------------------------------------------------------


def read_text(path: str | os.PathLike, byte_level: bool = False) -> str:
    """The file as a str; byte_level: one character per byte (latin-1), for data that is not valid UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path.resolve()}")
    data = path.read_bytes()
    if byte_level:
        return data.decode("latin-1")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.end]
        raise ValueError(f"{path} is not valid UTF-8: byte{'s' if len(bad) > 1 else ''} {bad.hex(' ')} at byte offset "
                         f"{e.start} ({e.reason}); fix the file, or read it byte by byte with byte_level=True "
                         f"(--data.byte_level true)") from None


def parse_ptb_char(text: str) -> str:
    """Mikolov's character-level PTB format -> plain text.

    Each line holds one sentence as space-separated characters with `_` marking a word boundary, e.g.
    " a e r _ b a n k n o t e". Returns the characters with `_` as a space and one newline per line, so
    the length counts one newline per line (PAPER.md: 5,017,482 characters for the training split).
    """
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines = lines[:-1]
    out = []
    for line in lines:
        symbols = line.split()
        if any(len(s) != 1 for s in symbols):
            bad = next(s for s in symbols if len(s) != 1)
            raise ValueError(f"not the ptb.char format: symbol {bad!r} is not a single character "
                             f"(line {line[:60]!r})")
        out.append("".join(" " if s == "_" else s for s in symbols) + "\n")
    return "".join(out)


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, sha256: Optional[str] = None, md5: Optional[str] = None,
                size: Optional[int] = None) -> None:
    """Raise ValueError naming the file and both values if its size or checksum is not the expected one."""
    if size is not None and path.stat().st_size != size:
        raise ValueError(f"{path.name}: size {path.stat().st_size} bytes, expected {size}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            got = _digest(path, algorithm)
            if got != expected.lower():
                raise ValueError(f"{path.name}: {algorithm} {got}, expected {expected}")


def download(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, md5: Optional[str] = None,
             size: Optional[int] = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically: into a temporary file beside it, verified, then renamed.

    A failed or corrupt download leaves nothing at `dest`. Any urllib URL works (file:// too).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f, 1 << 20)
        verify_file(tmp, sha256=sha256, md5=md5, size=size)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy the archive member whose file name is `member` (zip or tar) to `dest`, atomically."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    names = [n for n in z.namelist() if Path(n).name == member]
                    if not names:
                        raise ValueError(f"{archive.name} has no member named {member}")
                    with z.open(names[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            else:
                with tarfile.open(archive) as t:
                    infos = [i for i in t.getmembers() if i.isfile() and Path(i.name).name == member]
                    if not infos:
                        raise ValueError(f"{archive.name} has no member named {member}")
                    shutil.copyfileobj(t.extractfile(infos[0]), out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RemoteFile:
    """A data file and where it comes from.

    name: the file name in the data directory. url: the download. member: the file's name inside the
    downloaded archive (zip or tar), None if the download is the file itself. archive_sha256 / archive_size:
    what the download must be; sha256 / size: what the final file must be (None: not checked).
    """

    name: str
    url: str
    member: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    archive_sha256: Optional[str] = None
    archive_size: Optional[int] = None


def ensure_files(files: Sequence[RemoteFile], data_dir: str | os.PathLike, dataset: str,
                 download_missing: bool = True) -> list[Path]:
    """The paths of `files` in `data_dir`, downloading (and verifying) the missing ones.

    Raises FileNotFoundError naming the missing files and the directory to put them in when they are
    absent and cannot be downloaded (no network, or download_missing=False).
    """
    data_dir = Path(data_dir)
    paths = [data_dir / f.name for f in files]
    missing = [f for f, p in zip(files, paths) if not p.is_file()]
    if not missing:
        return paths
    names = ", ".join(f.name for f in missing)
    urls = ", ".join(sorted({f.url for f in missing}))
    hint = (f"Put {names} in {data_dir.resolve()} (or point --data.data_dir at the directory that has them); "
            f"source: {urls}")
    if not download_missing:
        raise FileNotFoundError(f"{dataset}: missing {names} in {data_dir.resolve()} and download=False. {hint}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        archives: dict[str, Path] = {}
        for f in missing:
            dest = data_dir / f.name
            if f.member is None:
                download(f.url, dest, sha256=f.sha256, size=f.size)
                continue
            if f.url not in archives:
                archives[f.url] = download(f.url, data_dir / Path(urllib.parse.urlparse(f.url).path).name,
                                           sha256=f.archive_sha256, size=f.archive_size)
            _extract_member(archives[f.url], f.member, dest)
            try:
                verify_file(dest, sha256=f.sha256, size=f.size)
            except ValueError:
                dest.unlink(missing_ok=True)
                raise
    except (urllib.error.URLError, OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise FileNotFoundError(f"{dataset}: missing {names} in {data_dir.resolve()}, and the download "
                                f"failed: {e}. {hint}") from e
    return paths


# -- batches ---------------------------------------------------------------------------------------------


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


# -- data modules ----------------------------------------------------------------------------------------


class CharDataModule(pl.LightningDataModule):
    """Base of the character data modules: subclasses provide `load_splits()` (and may override
    `boundary_labels`); this class builds the vocabulary, the streams and the loaders.

    Args:
        batch_size: B, the number of contiguous streams of a training batch.
        seq_len: T, the truncated-BPTT length.
        eval_batch_size: B for validation and test (default: batch_size).
    """

    byte_level = False

    def __init__(self, batch_size: int = 32, seq_len: int = 100, eval_batch_size: Optional[int] = None) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if eval_batch_size is not None and (not isinstance(eval_batch_size, int) or eval_batch_size < 1):
            raise ValueError(f"eval_batch_size must be a positive int or None, got {eval_batch_size!r}")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.eval_batch_size = eval_batch_size or batch_size
        self._texts: Optional[dict[str, str]] = None
        self._vocab: Optional[Vocabulary] = None
        self._ids: dict[str, Tensor] = {}

    # subclasses -------------------------------------------------------------------------------------
    def load_splits(self) -> dict[str, str]:
        """{"train": str, "val": str, "test": str} (test may be absent)."""
        raise NotImplementedError(f"{type(self).__name__} must implement load_splits()")

    def boundary_labels(self, split: str) -> dict[str, Tensor]:
        """name -> (N,) bool true boundaries of a split; real text: the word ends (whitespace)."""
        return {"word": self.vocab.word_boundaries(self.ids(split))}

    # lightning hooks --------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self._texts is None:
            texts = self.load_splits()
            if not texts.get("train"):
                raise ValueError(f"{type(self).__name__}: the training split is empty; it needs at least "
                                 f"batch_size * (seq_len + 1) = {self.batch_size * (self.seq_len + 1)} characters")
            self._texts = texts

    def train_dataloader(self) -> StreamLoader:
        return self._loader("train", self.batch_size)

    def val_dataloader(self) -> StreamLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> StreamLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> StreamLoader:
        return self._loader("test", self.eval_batch_size)

    # vocabulary and encoded splits ------------------------------------------------------------------
    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary: set with `set_vocab` (a trained model's), else built from the training split."""
        if self._vocab is None:
            self.setup()
            self._vocab = Vocabulary.from_text(self._texts["train"])
        return self._vocab

    def set_vocab(self, vocab: Vocabulary) -> None:
        """Use `vocab` (a trained model's) to encode every split."""
        if vocab != self._vocab:
            self._vocab = vocab
            self._ids.clear()

    def text(self, split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        text = self._texts.get(split)
        if not text:
            raise ValueError(f"{type(self).__name__} has no {split} split; give it one (e.g. --data.{split}_path)")
        return text

    def ids(self, split: str) -> Tensor:
        """(N,) int64 ids of a split, encoded with `vocab`. Characters the vocabulary lacks become the unknown
        id, with one warning per split that counts them."""
        if split not in self._ids:
            text = self.text(split)
            ids = self.vocab.encode(text)
            unknown = int((ids == Vocabulary.UNK).sum())
            if unknown:
                chars = sorted(set(text) - set(self.vocab.chars))
                shown = "".join(chars[:20]) + ("..." if len(chars) > 20 else "")
                warnings.warn(f"{unknown} of the {ids.numel()} characters of the {split} split ({len(chars)} distinct: "
                              f"{shown!r}) are not in the training vocabulary; they are mapped to the unknown id "
                              f"{Vocabulary.UNK}", stacklevel=2)
            self._ids[split] = ids
        return self._ids[split]

    def unigram_entropy(self, split: str = "val") -> float:
        """Bits per character of the split's own character distribution (the best context-free model)."""
        return unigram_entropy(self.ids(split), len(self.vocab))

    def _loader(self, split: str, batch_size: int) -> StreamLoader:
        ids = self.ids(split)
        need = batch_size * (self.seq_len + 1)
        if ids.numel() < need:
            raise ValueError(f"the {split} split has {ids.numel()} characters, too few for batch_size="
                             f"{batch_size} and seq_len={self.seq_len}: it needs at least batch_size * "
                             f"(seq_len + 1) = {need}; use a longer text or smaller --data.batch_size / "
                             f"--data.eval_batch_size / --data.seq_len")
        dataset = StreamBatches(ids, batch_size, self.seq_len, self.boundary_labels(split))
        # Not a DataLoader: batches in order, no workers, so the carried state continues the streams exactly;
        # and with several processes each takes its share of the streams (not Lightning's DistributedSampler).
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        return StreamLoader(dataset, rank, world)


def split_text(text: str, fractions: Sequence[float]) -> dict[str, str]:
    """Contiguous train/val/test pieces of `text` in proportion to `fractions` (three numbers summing to 1)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split must be three fractions (train, val, test) >= 0 summing to 1, got {fractions}")
    n = len(text)
    a = int(n * fractions[0])
    b = a + int(n * fractions[1])
    return {"train": text[:a], "val": text[a:b], "test": text[b:]}


class TextDataModule(CharDataModule):
    """Any text: one file split contiguously by `split`, or separate train/val/test files.

    Args:
        path: a single text file, split into train/val/test by `split`.
        train_path, val_path, test_path: separate files instead of `path` (test_path optional).
        split: (train, val, test) fractions of `path`.
        byte_level: read bytes (one symbol per byte) instead of UTF-8 characters.
        batch_size, seq_len, eval_batch_size: see `CharDataModule`.
    """

    def __init__(self, path: Optional[str] = None, train_path: Optional[str] = None, val_path: Optional[str] = None,
                 test_path: Optional[str] = None, split: tuple[float, float, float] = (0.9, 0.05, 0.05),
                 byte_level: bool = False, batch_size: int = 32, seq_len: int = 100,
                 eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size)
        if (path is None) == (train_path is None):
            raise ValueError("give either path (one file, split by `split`) or train_path and val_path, "
                             f"got path={path!r}, train_path={train_path!r}")
        if train_path is not None and val_path is None:
            raise ValueError("train_path needs val_path too")
        split_text(" ", split)  # validates the fractions now rather than at setup
        self.path, self.train_path, self.val_path, self.test_path = path, train_path, val_path, test_path
        self.split = tuple(split)
        self.byte_level = byte_level

    def load_splits(self) -> dict[str, str]:
        if self.path is not None:
            return split_text(read_text(self.path, self.byte_level), self.split)
        texts = {"train": read_text(self.train_path, self.byte_level), "val": read_text(self.val_path, self.byte_level)}
        if self.test_path is not None:
            texts["test"] = read_text(self.test_path, self.byte_level)
        return texts


def pydoc_text() -> str:
    """The Python documentation topics bundled with CPython (`pydoc_data.topics`): ~465k characters of
    real English prose and code, present in every Python install."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"


class PydocDataModule(CharDataModule):
    """The offline default: `pydoc_text()` split contiguously 90/5/5 (or by `split`)."""

    def __init__(self, batch_size: int = 32, seq_len: int = 100, eval_batch_size: Optional[int] = None,
                 split: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size)
        split_text(" ", split)
        self.split = tuple(split)

    def load_splits(self) -> dict[str, str]:
        return split_text(pydoc_text(), self.split)


_PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
# sha256 and sizes of Mikolov's files (as distributed in simple-examples.tgz, data/ptb.char.*.txt)
PTB_FILES = {
    "train": RemoteFile("ptb.char.train.txt", _PTB_URL, "ptb.char.train.txt",
                        "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9", 10034964),
    "val": RemoteFile("ptb.char.valid.txt", _PTB_URL, "ptb.char.valid.txt",
                      "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8", 786084),
    "test": RemoteFile("ptb.char.test.txt", _PTB_URL, "ptb.char.test.txt",
                       "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe", 884846),
}


class PTBDataModule(CharDataModule):
    """Mikolov's character-level Penn Treebank (PAPER.md: vocabulary 50, Mikolov's split).

    Args:
        data_dir: holds ptb.char.{train,valid,test}.txt; missing files are downloaded (simple-examples.tgz)
            and verified by sha256 when download=True and a network is there.
        download: try to download missing files.
    """

    def __init__(self, data_dir: str = "data/ptb", download: bool = True, batch_size: int = 64, seq_len: int = 100,
                 eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size)
        self.data_dir = data_dir
        self.download = download

    def prepare_data(self) -> None:
        ensure_files(list(PTB_FILES.values()), self.data_dir, "PTB (character level)", self.download)

    def load_splits(self) -> dict[str, str]:
        paths = ensure_files(list(PTB_FILES.values()), self.data_dir, "PTB (character level)", self.download)
        return {split: parse_ptb_char(read_text(p)) for split, p in zip(PTB_FILES, paths)}


class _HutterDataModule(CharDataModule):
    """Shared by text8 and enwik8: one 100M-symbol file split 90M/5M/5M."""

    FILE: RemoteFile
    NAME: str

    def __init__(self, data_dir: str, download: bool, batch_size: int, seq_len: int,
                 eval_batch_size: Optional[int], max_chars: Optional[int]) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size)
        self.data_dir = data_dir
        self.download = download
        self.max_chars = max_chars

    def prepare_data(self) -> None:
        ensure_files([self.FILE], self.data_dir, self.NAME, self.download)

    def load_splits(self) -> dict[str, str]:
        (path,) = ensure_files([self.FILE], self.data_dir, self.NAME, self.download)
        text = read_text(path, byte_level=self.byte_level)
        splits = {"train": text[:90_000_000], "val": text[90_000_000:95_000_000], "test": text[95_000_000:]}
        if self.max_chars is not None:  # a quick look at a prefix of every split
            splits = {k: v[: self.max_chars] for k, v in splits.items()}
        return splits


# Sizes are the published ones (zip and unzipped); content hashes are not pinned here.
# SHA-256 of the unzipped files, as published alongside many independent uses of these corpora.
TEXT8_FILE = RemoteFile("text8", "http://mattmahoney.net/dc/text8.zip", member="text8", size=100_000_000,
                        sha256="6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7",
                        archive_size=31_344_016)
ENWIK8_FILE = RemoteFile("enwik8", "http://mattmahoney.net/dc/enwik8.zip", member="enwik8", size=100_000_000,
                         sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8",
                         archive_size=36_445_475)


class Text8DataModule(_HutterDataModule):
    """text8 (27 symbols: a-z and space), split 90M/5M/5M as in PAPER.md.

    Args:
        data_dir: holds the unzipped `text8` file (downloaded from mattmahoney.net when missing).
        max_chars: use only the first max_chars of each split (quick experiments).
    """

    FILE = TEXT8_FILE
    NAME = "text8"

    def __init__(self, data_dir: str = "data/text8", download: bool = True, batch_size: int = 128,
                 seq_len: int = 100, eval_batch_size: Optional[int] = None, max_chars: Optional[int] = None) -> None:
        super().__init__(data_dir, download, batch_size, seq_len, eval_batch_size, max_chars)


class Enwik8DataModule(_HutterDataModule):
    """enwik8 read as bytes (PAPER.md: 205 byte values seen), split 90M/5M/5M.

    Args:
        data_dir: holds the unzipped `enwik8` file (downloaded from mattmahoney.net when missing).
        max_chars: use only the first max_chars bytes of each split (quick experiments).
    """

    FILE = ENWIK8_FILE
    NAME = "enwik8"
    byte_level = True

    def __init__(self, data_dir: str = "data/enwik8", download: bool = True, batch_size: int = 128,
                 seq_len: int = 100, eval_batch_size: Optional[int] = None, max_chars: Optional[int] = None) -> None:
        super().__init__(data_dir, download, batch_size, seq_len, eval_batch_size, max_chars)


class SyntheticDataModule(CharDataModule):
    """Text of a `SyntheticLanguage` with true word and phrase boundaries (logged as boundary F1).

    Args:
        seed: draws the language; the splits are sampled from seed + 1, + 2, + 3.
        train_chars, val_chars, test_chars: split lengths.
        num_words, num_phrases, word_sep, phrase_sep: see `SyntheticLanguage`.
    """

    def __init__(self, seed: int = 0, train_chars: int = 200_000, val_chars: int = 20_000, test_chars: int = 20_000,
                 num_words: int = 40, num_phrases: int = 24, word_sep: str = "", phrase_sep: str = " ",
                 batch_size: int = 32, seq_len: int = 100, eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size)
        self.language = SyntheticLanguage(seed, num_words=num_words, num_phrases=num_phrases, word_sep=word_sep,
                                          phrase_sep=phrase_sep)
        self.seed = seed
        self.lengths = {"train": train_chars, "val": val_chars, "test": test_chars}
        self._corpora = {}

    def load_splits(self) -> dict[str, str]:
        self._corpora = {split: self.language.sample(n, seed=self.seed + 1 + k)
                         for k, (split, n) in enumerate(self.lengths.items())}
        return {split: c.text for split, c in self._corpora.items()}

    def boundary_labels(self, split: str) -> dict[str, Tensor]:
        self.setup()
        return dict(self._corpora[split].boundaries)
