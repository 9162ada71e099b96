"""A synthetic hierarchical language with known segment boundaries at two levels.

Characters make words (a fixed lexicon), words make phrases (a fixed inventory of templates), and a text
is a random sequence of phrases. Everything is drawn from a seed, so the true word and phrase boundaries are
known exactly: an HM-LSTM's first layer should find the word ends, the second the phrase ends (see
`hmlstm.metrics.boundary_f1`).

These options decide whether the structure carries information a language model can use (all off gives the
first version of this language, whose phrases are i.i.d. with Zipf-like frequencies and fixed words):

- `successors=k`: the phrases form a Markov chain, each phrase followed by one of k phrases of its own, so
  predicting the next phrase needs the identity of the current one: a summary of the phrase that ends.
- `next_by_last_word=True` (with successors = slot_choices = k): the word chosen in a phrase's last slot picks
  which successor follows, so what comes next depends on how the phrase ended: its summary is needed at its end.
- `slot_choices=m`: each word slot of a phrase holds m alternative words, one drawn per occurrence, so the
  start of every word carries information and the rest of it is spelled from memory.

`entropy_rate()` gives the bits per character of the generating process, the floor a model can reach.

    lang = SyntheticLanguage(seed=0)
    corpus = lang.sample(10_000, seed=1)
    corpus.text[:40], corpus.boundaries["word"][:40], corpus.boundaries["phrase"][:40]

Boundary convention (as in `hmlstm.metrics`): a segment ends at its last character; a separator belongs to
the segment it closes, so with `phrase_sep=" "` the phrase (and its last word) ends on the space.
"""

from __future__ import annotations

import math
import random
import string
from dataclasses import dataclass

import torch
from torch import Tensor

LEVELS = ("word", "phrase")


@dataclass
class SyntheticCorpus:
    """text: N characters; boundaries: level name -> (N,) bool, True where a segment of that level ends;
    phrases: the index (into `SyntheticLanguage.phrases`) of every phrase begun in the text, in order."""

    text: str
    boundaries: dict[str, Tensor]
    phrases: list[int]


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
        successors: None draws every phrase independently (Zipf-like); k >= 1 gives each phrase k successor
            phrases (Zipf-like among them) and makes the text a Markov chain over phrases.
        slot_choices: alternative words per word slot of a phrase (distinct), one drawn uniformly each time.
        prefix_words: how many of the lexicon's words extend another of its words by one or two letters, so that
            a word can be the beginning of another: as in real text, a word is then known to be over only when
            the character after it arrives.
        phrase_stop: after its first phrase_len[0] words, a phrase ends after each further word with this
            probability (0: every phrase has its template's length), so that only its separator tells that
            it is over.
        next_by_last_word: the choice made in a phrase's last word slot (its index among the slot's words) picks
            the successor (needs successors == slot_choices), instead of an independent draw.
    """

    def __init__(self, seed: int = 0, num_words: int = 40, num_phrases: int = 24, word_len: tuple[int, int] = (2, 5),
                 phrase_len: tuple[int, int] = (2, 4), alphabet: str = string.ascii_lowercase, word_sep: str = "",
                 phrase_sep: str = " ", successors: int | None = None, slot_choices: int = 1, prefix_words: int = 0,
                 phrase_stop: float = 0.0, next_by_last_word: bool = False) -> None:
        if not 1 <= word_len[0] <= word_len[1]:
            raise ValueError(f"word_len must be (min, max) with 1 <= min <= max, got {word_len}")
        if not 1 <= phrase_len[0] <= phrase_len[1]:
            raise ValueError(f"phrase_len must be (min, max) with 1 <= min <= max, got {phrase_len}")
        if num_words < 1 or num_phrases < 1:
            raise ValueError(f"num_words and num_phrases must be >= 1, got {num_words} and {num_phrases}")
        if successors is not None and not 1 <= successors <= num_phrases:
            raise ValueError(f"successors must be None or in [1, num_phrases={num_phrases}], got {successors}")
        if not 1 <= slot_choices <= num_words:
            raise ValueError(f"slot_choices must be in [1, num_words={num_words}], got {slot_choices}")
        if not 0 <= prefix_words < num_words or (prefix_words and word_len[0] == word_len[1]):
            raise ValueError(f"prefix_words must be in [0, num_words) and needs word_len min < max, got "
                             f"{prefix_words} with word_len={word_len}")
        if next_by_last_word and successors != slot_choices:
            raise ValueError(f"next_by_last_word needs successors == slot_choices (one successor per word choice), "
                             f"got successors={successors} and slot_choices={slot_choices}")
        if not 0.0 <= phrase_stop < 1.0:
            raise ValueError(f"phrase_stop must be in [0, 1), got {phrase_stop}")
        if len(set(alphabet)) < 2 or set(alphabet) & set(word_sep + phrase_sep):
            raise ValueError("alphabet needs at least 2 characters and none of the separator characters")
        possible = sum(len(alphabet) ** n for n in range(word_len[0], word_len[1] + 1))
        if possible < num_words:
            raise ValueError(f"num_words={num_words} distinct words do not fit in alphabet {alphabet!r} with "
                             f"word_len={word_len}")
        rng = random.Random(seed)
        words: list[str] = []
        seen: set[str] = set()
        while len(words) < num_words - prefix_words:
            w = "".join(rng.choice(alphabet) for _ in range(rng.randint(*word_len)))
            if w not in seen:
                seen.add(w)
                words.append(w)
        bases = [w for w in words if len(w) < word_len[1]]
        if prefix_words and not bases:
            raise ValueError(f"prefix_words={prefix_words}: every other word has the longest length {word_len[1]}, "
                             f"so none can be extended; use more words or a wider word_len")
        while len(words) < num_words:
            base = rng.choice(bases)
            w = base + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, min(2, word_len[1] - len(base)))))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        self.min_words = phrase_len[0]
        self.phrase_stop = phrase_stop
        self.next_by_last_word = next_by_last_word
        # a phrase is a template: per word slot, the tuple of words it may hold
        self.phrases = [tuple(tuple(rng.sample(range(num_words), slot_choices)) for _ in range(rng.randint(*phrase_len)))
                        for _ in range(num_phrases)]
        self.weights = [1.0 / (k + 1) for k in range(num_phrases)]  # Zipf-like phrase frequencies
        self.successors = None if successors is None else [rng.sample(range(num_phrases), successors)
                                                             for _ in range(num_phrases)]
        self.word_sep = word_sep
        self.phrase_sep = phrase_sep

    def transition(self) -> list[list[float]]:
        """P[p][q], the probability that phrase q follows phrase p."""
        n = len(self.phrases)
        if self.successors is None:
            total = sum(self.weights)
            return [[w / total for w in self.weights] for _ in range(n)]
        rows = []
        for succ in self.successors:
            # with next_by_last_word the uniform choice of the last word picks the successor
            w = [1.0] * len(succ) if self.next_by_last_word else self.weights[: len(succ)]
            row = [0.0] * n
            for q, wq in zip(succ, w):
                row[q] += wq / sum(w)
            rows.append(row)
        return rows

    def entropy_rate(self) -> float:
        """Bits per character of the generating process (the floor of a model's BPC on a long text).

        Per phrase: the entropy of the next phrase given this one (none of its own with next_by_last_word: the
        last word's choice decides it), plus log2(slot_choices) per word slot and the stop decisions; divided
        by the expected characters per phrase, both under the chain's long-run phrase frequencies (started, as
        `sample` starts, from the Zipf-like weights). It bounds the text's entropy rate from above and equals it
        when the phrase and the words can be read back from the text, as with distinct words and a separator.
        """
        P = self.transition()
        n = len(P)
        total = sum(self.weights)
        dist = [w / total for w in self.weights]
        freq = [0.0] * n
        steps = 2000  # Cesaro average: the long-run frequencies even for a periodic chain
        for _ in range(steps):
            freq = [f + d / steps for f, d in zip(freq, dist)]
            dist = [sum(dist[p] * P[p][q] for p in range(n)) for q in range(n)]
        s = self.phrase_stop
        h_stop = -(s * math.log2(s) + (1 - s) * math.log2(1 - s)) if s > 0 else 0.0
        bits = chars = 0.0
        for p, template in enumerate(self.phrases):
            if not self.next_by_last_word:
                bits += freq[p] * -sum(x * math.log2(x) for x in P[p] if x > 0)
            reach = 1.0  # the probability that the phrase reaches word slot j
            for j, slot in enumerate(template):
                word_chars = sum(len(self.words[w]) for w in slot) / len(slot)
                decides = self.min_words <= j + 1 < len(template)  # a stop-or-go decision after this word
                ends_here = 1.0 if j + 1 == len(template) else (s if decides else 0.0)
                bits += freq[p] * reach * (math.log2(len(slot)) + (h_stop if decides else 0.0))
                chars += freq[p] * reach * (word_chars + ends_here * len(self.phrase_sep)
                                            + (1 - ends_here) * len(self.word_sep))
                reach *= 1 - ends_here
        return bits / chars

    def sample(self, num_chars: int, seed: int = 0) -> SyntheticCorpus:
        """A text of exactly `num_chars` characters (the last phrase cut off) with its true boundaries."""
        if num_chars < 1:
            raise ValueError(f"num_chars must be >= 1, got {num_chars}")
        rng = random.Random(seed)
        parts: list[str] = []
        word_end: list[int] = []
        phrase_end: list[int] = []
        n = 0
        drawn: list[int] = []
        p = rng.choices(range(len(self.phrases)), weights=self.weights)[0]
        while n < num_chars:
            phrase = self.phrases[p]
            drawn.append(p)
            length = len(phrase)
            if self.phrase_stop > 0:
                length = min(self.min_words, len(phrase))
                while length < len(phrase) and rng.random() >= self.phrase_stop:
                    length += 1
            for k, slot in enumerate(phrase[:length]):
                choice = rng.randrange(len(slot)) if len(slot) > 1 else 0
                w = self.words[slot[choice]]
                sep = self.phrase_sep if k == length - 1 else self.word_sep
                parts.append(w + sep)
                n += len(w) + len(sep)
                word_end.append(n - 1)
            phrase_end.append(n - 1)
            if self.successors is None:
                p = rng.choices(range(len(self.phrases)), weights=self.weights)[0]
            elif self.next_by_last_word:
                p = self.successors[p][choice]
            else:
                succ = self.successors[p]
                p = rng.choices(succ, weights=self.weights[: len(succ)])[0]
        text = "".join(parts)[:num_chars]
        bounds = {}
        for name, ends in (("word", word_end), ("phrase", phrase_end)):
            mask = torch.zeros(num_chars, dtype=torch.bool)
            idx = torch.tensor([e for e in ends if e < num_chars], dtype=torch.long)
            mask[idx] = True
            bounds[name] = mask
        return SyntheticCorpus(text, bounds, drawn)
