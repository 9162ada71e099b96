"""A synthetic hierarchical language with known segment boundaries at two levels.

Characters make words (a fixed lexicon), words make phrases (a fixed inventory), and a text is a random
sequence of phrases with Zipf-like frequencies. Everything is drawn from a seed, so the true word and
phrase boundaries are known exactly: an HM-LSTM's first layer should find the word ends, the second the
phrase ends (see `hmlstm.metrics.boundary_f1`).

    lang = SyntheticLanguage(seed=0)
    corpus = lang.sample(10_000, seed=1)
    corpus.text[:40], corpus.boundaries["word"][:40], corpus.boundaries["phrase"][:40]

Boundary convention (as in `hmlstm.metrics`): a segment ends at its last character; a separator belongs to
the segment it closes, so with `phrase_sep=" "` the phrase (and its last word) ends on the space.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import torch
from torch import Tensor

LEVELS = ("word", "phrase")


@dataclass
class SyntheticCorpus:
    """text: N characters; boundaries: level name -> (N,) bool, True where a segment of that level ends."""

    text: str
    boundaries: dict[str, Tensor]


class SyntheticLanguage:
    """A lexicon of words and an inventory of phrases, both drawn from `seed`.

    Args:
        seed: draws the lexicon and the phrases.
        num_words: lexicon size.
        num_phrases: phrase inventory size.
        word_len: (min, max) characters per word.
        phrase_len: (min, max) words per phrase.
        alphabet: characters words are made of.
        word_sep: written after every word inside a phrase ("" glues the words: their ends must be inferred).
        phrase_sep: written after every phrase.
    """

    def __init__(self, seed: int = 0, num_words: int = 40, num_phrases: int = 24, word_len: tuple[int, int] = (2, 5),
                 phrase_len: tuple[int, int] = (2, 4), alphabet: str = string.ascii_lowercase, word_sep: str = "",
                 phrase_sep: str = " ") -> None:
        if not 1 <= word_len[0] <= word_len[1]:
            raise ValueError(f"word_len must be (min, max) with 1 <= min <= max, got {word_len}")
        if not 1 <= phrase_len[0] <= phrase_len[1]:
            raise ValueError(f"phrase_len must be (min, max) with 1 <= min <= max, got {phrase_len}")
        if num_words < 1 or num_phrases < 1:
            raise ValueError(f"num_words and num_phrases must be >= 1, got {num_words} and {num_phrases}")
        if len(set(alphabet)) < 2 or set(alphabet) & set(word_sep + phrase_sep):
            raise ValueError("alphabet needs at least 2 characters and none of the separator characters")
        possible = sum(len(alphabet) ** n for n in range(word_len[0], word_len[1] + 1))
        if possible < num_words:
            raise ValueError(f"num_words={num_words} distinct words do not fit in alphabet {alphabet!r} with "
                             f"word_len={word_len}")
        rng = random.Random(seed)
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < num_words:
            w = "".join(rng.choice(alphabet) for _ in range(rng.randint(*word_len)))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        self.phrases = [tuple(rng.randrange(num_words) for _ in range(rng.randint(*phrase_len)))
                        for _ in range(num_phrases)]
        self.weights = [1.0 / (k + 1) for k in range(num_phrases)]  # Zipf-like phrase frequencies
        self.word_sep = word_sep
        self.phrase_sep = phrase_sep

    def sample(self, num_chars: int, seed: int = 0) -> SyntheticCorpus:
        """A text of exactly `num_chars` characters (the last phrase cut off) with its true boundaries."""
        if num_chars < 1:
            raise ValueError(f"num_chars must be >= 1, got {num_chars}")
        rng = random.Random(seed)
        parts: list[str] = []
        word_end: list[int] = []
        phrase_end: list[int] = []
        n = 0
        while n < num_chars:
            phrase = self.phrases[rng.choices(range(len(self.phrases)), weights=self.weights)[0]]
            for k, word_id in enumerate(phrase):
                w = self.words[word_id]
                sep = self.phrase_sep if k == len(phrase) - 1 else self.word_sep
                parts.append(w + sep)
                n += len(w) + len(sep)
                word_end.append(n - 1)
            phrase_end.append(n - 1)
        text = "".join(parts)[:num_chars]
        bounds = {}
        for name, ends in (("word", word_end), ("phrase", phrase_end)):
            mask = torch.zeros(num_chars, dtype=torch.bool)
            idx = torch.tensor([e for e in ends if e < num_chars], dtype=torch.long)
            mask[idx] = True
            bounds[name] = mask
        return SyntheticCorpus(text, bounds)
