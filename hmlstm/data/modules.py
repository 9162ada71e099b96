"""The Lightning data modules: the shared character-level base class and one module per corpus."""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import pytorch_lightning as pl
from torch import Tensor

from ..metrics import unigram_entropy
from ..synthetic import SyntheticLanguage
from .download import RemoteFile, ensure_files, parse_ptb_char, read_text
from .streams import StreamBatches, StreamLoader
from .vocab import Vocabulary

SPLITS = ("train", "val", "test")


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
    """Mikolov's character-level Penn Treebank (the paper: vocabulary 50, Mikolov's split).

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
    """text8 (27 symbols: a-z and space), split 90M/5M/5M as in the paper.

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
    """enwik8 read as bytes (the paper: 205 byte values seen), split 90M/5M/5M.

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
        num_words, num_phrases, word_sep, phrase_sep, successors, slot_choices, prefix_words, phrase_stop,
            next_by_last_word: see `SyntheticLanguage`.
    """

    def __init__(self, seed: int = 0, train_chars: int = 200_000, val_chars: int = 20_000, test_chars: int = 20_000,
                 num_words: int = 40, num_phrases: int = 24, word_sep: str = "", phrase_sep: str = " ",
                 successors: Optional[int] = None, slot_choices: int = 1, prefix_words: int = 0,
                 phrase_stop: float = 0.0, next_by_last_word: bool = False, batch_size: int = 32,
                 seq_len: int = 100, eval_batch_size: Optional[int] = None) -> None:
        super().__init__(batch_size, seq_len, eval_batch_size)
        self.language = SyntheticLanguage(seed, num_words=num_words, num_phrases=num_phrases, word_sep=word_sep,
                                          phrase_sep=phrase_sep, successors=successors, slot_choices=slot_choices,
                                          prefix_words=prefix_words, phrase_stop=phrase_stop,
                                          next_by_last_word=next_by_last_word)
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
