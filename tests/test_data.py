"""Vocabulary, the PTB parser, truncated-BPTT batches, downloads and the data modules."""

import hashlib
import os
import math
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


def _phrases_of(lang: SyntheticLanguage, corpus) -> list[tuple[int, int]]:
    """The recorded phrase sequence, checked against the text: each whole phrase's words fill its template
    (or, with phrase_stop, a beginning of it of at least phrase_len[0] words). Returns (phrase, words) pairs."""
    word_end, phrase_end = corpus.boundaries["word"].tolist(), corpus.boundaries["phrase"].tolist()
    ids, start, k, lengths = [], 0, 0, []
    for i, (w_end, p_end) in enumerate(zip(word_end, phrase_end)):
        if not w_end:
            continue
        sep = lang.phrase_sep if p_end else lang.word_sep
        ids.append(lang.words.index(corpus.text[start : i + 1 - len(sep)]))
        start = i + 1
        if p_end:
            template = lang.phrases[corpus.phrases[k]]
            full = len(ids) == len(template) or lang.phrase_stop > 0 and min(lang.min_words, len(template)) <= len(ids)
            assert full and len(ids) <= len(template) and all(w in slot for w, slot in zip(ids, template))
            lengths.append(len(ids))
            ids, k = [], k + 1
    assert k in (len(corpus.phrases), len(corpus.phrases) - 1)  # the last phrase may be cut off
    return list(zip(corpus.phrases[:k], lengths))


def test_markov_language_follows_its_successors_and_slot_choices():
    lang = SyntheticLanguage(seed=5, word_sep=" ", phrase_sep=".", successors=2, slot_choices=3)
    assert all(len(set(slot)) == 3 for t in lang.phrases for slot in t)
    corpus = lang.sample(20_000, seed=1)
    seq = [p for p, _ in _phrases_of(lang, corpus)]
    assert len(seq) > 500
    assert all(q in lang.successors[p] for p, q in zip(seq, seq[1:]))  # a Markov chain over its successors
    assert len({(p, q) for p, q in zip(seq, seq[1:])}) > len(set(seq))  # and not a deterministic cycle
    assert (corpus.boundaries["phrase"] <= corpus.boundaries["word"]).all()
    for i in corpus.boundaries["word"].nonzero().flatten().tolist():
        assert corpus.text[i] in " ."  # every word ends on its separator


@pytest.mark.parametrize("options", [dict(), dict(successors=3, slot_choices=2, word_sep=" ", phrase_sep="."),
                                     dict(successors=2, slot_choices=3, word_sep=" ", phrase_sep=".", prefix_words=10,
                                          phrase_stop=0.3),
                                     dict(successors=3, slot_choices=3, word_sep=" ", phrase_sep=".", prefix_words=10,
                                          phrase_stop=0.3, next_by_last_word=True),
                                     dict(successors=1)])
def test_entropy_rate_matches_the_information_of_a_long_sample(options):
    """The bits a sampled text carries, counted from its own phrase sequence, word choices and phrase lengths,
    per character."""
    lang = SyntheticLanguage(seed=2, **options)
    corpus = lang.sample(150_000, seed=3)
    seq = _phrases_of(lang, corpus)
    P, s = lang.transition(), lang.phrase_stop
    bits = 0.0 if lang.next_by_last_word else sum(-math.log2(P[p][q]) for (p, _), (q, _) in zip(seq, seq[1:]))
    bits += sum(k * math.log2(len(lang.phrases[q][0])) for q, k in seq[1:])
    for q, k in seq[1:]:  # each stop-or-go decision the phrase took
        n, n0 = len(lang.phrases[q]), lang.min_words
        bits += sum(-math.log2(1 - s) for _ in range(n0, k)) + (-math.log2(s) if k < n else 0.0)
    chars = corpus.boundaries["phrase"].nonzero().flatten()
    measured = bits / float(chars[-1] - chars[0])
    if options.get("successors") == 1 and "slot_choices" not in options:
        assert lang.entropy_rate() == 0.0 and measured == 0.0  # one successor, fixed words: nothing to predict
    else:
        assert lang.entropy_rate() == pytest.approx(measured, rel=0.03)


def test_synthetic_language_rejects_bad_structure_options():
    with pytest.raises(ValueError, match="successors"):
        SyntheticLanguage(successors=0)
    with pytest.raises(ValueError, match="slot_choices"):
        SyntheticLanguage(slot_choices=41)
    with pytest.raises(ValueError, match="phrase_stop"):
        SyntheticLanguage(phrase_stop=1.0)
    with pytest.raises(ValueError, match="prefix_words"):
        SyntheticLanguage(prefix_words=3, word_len=(3, 3))


def test_the_last_word_picks_the_next_phrase():
    lang = SyntheticLanguage(seed=4, word_sep=" ", phrase_sep=".", successors=3, slot_choices=3, phrase_stop=0.3,
                             next_by_last_word=True)
    corpus = lang.sample(5000, seed=0)
    seq = _phrases_of(lang, corpus)
    ends = corpus.boundaries["phrase"].nonzero().flatten().tolist()
    for (p, k), (q, _), end in zip(seq, seq[1:], ends):
        last = corpus.text[: end].rsplit(" ", 1)[-1].rsplit(".", 1)[-1]  # the phrase's last word
        choice = lang.phrases[p][k - 1].index(lang.words.index(last))
        assert q == lang.successors[p][choice]
    with pytest.raises(ValueError, match="next_by_last_word needs successors == slot_choices"):
        SyntheticLanguage(successors=2, slot_choices=3, next_by_last_word=True)


def test_prefix_words_begin_other_words():
    lang = SyntheticLanguage(seed=1, num_words=30, prefix_words=12, word_len=(2, 5))
    assert len(set(lang.words)) == 30 and all(2 <= len(w) <= 5 for w in lang.words)
    extended = [w for w in lang.words if any(v != w and w.startswith(v) for v in lang.words)]
    assert len(extended) >= 12
