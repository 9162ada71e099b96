"""Vocabulary, the PTB parser, truncated-BPTT batches, downloads and the data modules."""

import hashlib
import os
from pathlib import Path

import pytest
import torch

from hmlstm.data import (PTB_FILES, PTBDataModule, PydocDataModule, RemoteFile, StreamBatches, SyntheticDataModule,
                         TextDataModule, Vocabulary, download, ensure_files, parse_ptb_char, pydoc_text)
from hmlstm.synthetic import SyntheticLanguage

SHARED_PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb"


def test_vocabulary_roundtrip_and_unknown():
    v = Vocabulary.from_text("hello world")
    assert len(v) == len(set("hello world")) + 1
    ids = v.encode("hello")
    assert ids.dtype == torch.int64 and (ids > 0).all()
    assert v.decode(ids) == "hello"
    unk = v.encode("hé\u4e16")  # é (one byte in latin-1) and a CJK character are both unknown
    assert unk.tolist()[1:] == [Vocabulary.UNK, Vocabulary.UNK] and unk[0] > 0
    assert v.decode(unk, unknown="?") == "h??"


PTB_SAMPLE = " a e r _ b a n k n o t e _ < u n k >\n n _ y e a r s _ o l d _ .\n"


def test_ptb_parser_inline_sample():
    text = parse_ptb_char(PTB_SAMPLE)
    assert text == "aer banknote <unk>\nn years old .\n"
    with pytest.raises(ValueError, match="single character"):
        parse_ptb_char(" a b c _ de f\n")


@pytest.mark.skipif(not SHARED_PTB.is_dir(), reason=f"PTB data not present in {SHARED_PTB}")
def test_ptb_parser_on_shared_data():
    raw = (SHARED_PTB / "ptb.char.valid.txt").read_text()
    text = parse_ptb_char(raw)
    # the paper's data: 393,042 validation characters counting one newline per line
    assert len(text) == 393_042
    assert text.count("\n") == raw.count("\n")
    dm = PTBDataModule(data_dir=str(SHARED_PTB), download=False, batch_size=8, seq_len=20)
    dm.setup()
    assert len(dm.text("train")) == 5_017_482 and len(dm.text("test")) == 442_423
    assert len(dm.vocab) == 50 + 1  # the paper's 50 symbols and the unknown id
    assert "_" not in dm.vocab.chars and " " in dm.vocab.chars
    batch = next(iter(dm.val_dataloader()))
    assert batch["input"].shape == (8, 20) and batch["boundary/word"].any()


def test_stream_batches_are_contiguous():
    ids = torch.arange(1, 104)  # 103 tokens, B=4 -> 4 streams of 25
    ds = StreamBatches(ids, batch_size=4, seq_len=7, labels={"word": ids % 5 == 0})
    assert len(ds) == 4  # 24 inputs per stream: 7, 7, 7, 3
    xs = torch.cat([ds[k]["input"] for k in range(len(ds))], dim=1)
    ys = torch.cat([ds[k]["target"] for k in range(len(ds))], dim=1)
    streams = ids[:100].view(4, 25)
    assert torch.equal(xs, streams[:, :-1]) and torch.equal(ys, streams[:, 1:])
    labels = torch.cat([ds[k]["boundary/word"] for k in range(len(ds))], dim=1)
    assert torch.equal(labels, streams[:, :-1] % 5 == 0)


def test_too_short_text_names_the_minimum(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("abcdefghij" * 10)  # 100 characters: train split 90
    dm = TextDataModule(path=str(path), batch_size=4, seq_len=50)
    with pytest.raises(ValueError, match=r"batch_size=4 and seq_len=50.*at least batch_size \* \(seq_len \+ 1\) = 204"):
        dm.train_dataloader()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="training split is empty"):
        TextDataModule(path=str(empty), batch_size=2, seq_len=3).setup()


def test_text_module_arguments(tmp_path):
    with pytest.raises(ValueError, match="either path"):
        TextDataModule()
    with pytest.raises(ValueError, match="split"):
        TextDataModule(path="x.txt", split=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TextDataModule(path="x.txt", batch_size=0)
    bad = tmp_path / "latin.txt"
    bad.write_bytes(b"caf\xe9 " * 100)
    with pytest.raises(ValueError, match="byte_level=True"):
        TextDataModule(path=str(bad)).setup()
    dm = TextDataModule(path=str(bad), byte_level=True, batch_size=2, seq_len=5)
    assert "\xe9" in dm.vocab.chars


def test_unknown_chars_at_eval_use_the_unknown_id(tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("abc " * 100)
    val.write_text("abz " * 100)
    dm = TextDataModule(train_path=str(train), val_path=str(val), batch_size=2, seq_len=5)
    ids = dm.ids("val")
    assert (ids == Vocabulary.UNK).sum() == 100
    with pytest.raises(ValueError, match="no test split"):
        dm.test_dataloader()


def test_pydoc_default_is_real_text():
    text = pydoc_text()
    assert len(text) > 400_000 and "def " in text
    dm = PydocDataModule(batch_size=8, seq_len=16)
    assert 3.5 < dm.unigram_entropy("val") < 6.0


def test_synthetic_corpus_is_seeded_and_labelled():
    lang = SyntheticLanguage(seed=3, word_sep="", phrase_sep=" ")
    a, b = lang.sample(500, seed=1), lang.sample(500, seed=1)
    assert a.text == b.text and torch.equal(a.boundaries["word"], b.boundaries["word"])
    assert lang.sample(500, seed=2).text != a.text
    assert SyntheticLanguage(seed=4).words != lang.words
    word, phrase = a.boundaries["word"], a.boundaries["phrase"]
    assert (phrase <= word).all()  # every phrase end is a word end
    # every phrase ends on its separator, and the words between two word ends are in the lexicon
    ends = word.nonzero().flatten().tolist()
    starts = [0] + [e + 1 for e in ends[:-1]]
    for s, e in zip(starts, ends):
        piece = a.text[s : e + 1]
        if phrase[e]:
            assert piece.endswith(" ")
        assert piece.strip() in lang.words
    dm = SyntheticDataModule(seed=3, train_chars=2000, val_chars=500, test_chars=500, batch_size=4, seq_len=10)
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"input", "target", "boundary/word", "boundary/phrase"}


def test_download_verifies_and_writes_atomically(tmp_path):
    src = tmp_path / "src.txt"
    src.write_bytes(b"hello hm-lstm\n")
    good = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = download(src.as_uri(), tmp_path / "out" / "file.txt", sha256=good, size=14)
    assert dest.read_bytes() == src.read_bytes()
    with pytest.raises(ValueError, match="sha256"):
        download(src.as_uri(), tmp_path / "out" / "bad.txt", sha256="0" * 64)
    assert sorted(os.listdir(tmp_path / "out")) == ["file.txt"]  # no partial or corrupt file left behind


def test_ensure_files_extracts_from_archive(tmp_path):
    import tarfile

    member = tmp_path / "ptb.char.valid.txt"
    member.write_text(PTB_SAMPLE)
    archive = tmp_path / "simple-examples.tgz"
    with tarfile.open(archive, "w:gz") as t:
        t.add(member, arcname="./simple-examples/data/ptb.char.valid.txt")
    spec = RemoteFile("ptb.char.valid.txt", archive.as_uri(), member="ptb.char.valid.txt",
                      sha256=hashlib.sha256(PTB_SAMPLE.encode()).hexdigest())
    (path,) = ensure_files([spec], tmp_path / "data", "PTB")
    assert path.read_text() == PTB_SAMPLE


def test_missing_data_without_network_names_files_and_directory(tmp_path):
    data_dir = tmp_path / "nowhere"
    dead = [RemoteFile(f.name, (tmp_path / "no-such-archive.tgz").as_uri(), f.member, f.sha256)
            for f in PTB_FILES.values()]
    with pytest.raises(FileNotFoundError) as e:
        ensure_files(dead, data_dir, "PTB (character level)")
    msg = str(e.value)
    for name in ("ptb.char.train.txt", "ptb.char.valid.txt", "ptb.char.test.txt", str(data_dir.resolve())):
        assert name in msg
    assert "download failed" in msg
    dm = PTBDataModule(data_dir=str(data_dir), download=False)
    with pytest.raises(FileNotFoundError, match=r"ptb\.char\.train\.txt.*download=False"):
        dm.prepare_data()
