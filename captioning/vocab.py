"""Tokenisation and the word vocabulary.

``tokenize`` needs no NLTK data download: captions are lowercased, punctuation other than
commas is dropped and text is split on whitespace, which is what caption datasets (and the
coco-caption PTB tokeniser, after punctuation removal) amount to. Commas are kept as their own
token because list captions ("a red circle , a blue square and ...") read better with them.

A :class:`Vocabulary` is stored as a plain list of tokens (index = position), so it travels in a
checkpoint without pickling any object.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

_PUNCT = re.compile(r"[^\w\s,']")
_COMMA = re.compile(r",")


def tokenize(text: str) -> list[str]:
    """Lowercase ``text``, drop punctuation except commas (kept as tokens), split on whitespace.

    Apostrophes stay inside words ("man's", "don't") but quotes around a word go ("'stop'" is "stop"),
    and angle brackets go with the other punctuation, so a caption's text never yields a special
    token such as ``<end>``."""
    text = _PUNCT.sub(" ", text.lower())
    text = _COMMA.sub(" , ", text)
    return [w for w in (t.strip("'") for t in text.split()) if w]


class Vocabulary:
    """Maps tokens to ids: ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then words."""

    def __init__(self, tokens: Sequence[str]):
        tokens = list(tokens)
        if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tokens[:4]}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary must not contain duplicate tokens")
        self.tokens: list[str] = tokens
        self.index: dict[str, int] = {t: i for i, t in enumerate(tokens)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    @classmethod
    def build(cls, captions: Iterable[Sequence[str]], min_freq: int = 1) -> Vocabulary:
        """Build from tokenised captions, keeping words seen at least ``min_freq`` times.

        Words are ordered by decreasing frequency, then alphabetically, so the result does not
        depend on the order of the captions.
        """
        counts = Counter(tok for caption in captions for tok in caption)
        words = sorted(
            (w for w, n in counts.items() if n >= min_freq and w not in SPECIALS), key=lambda w: (-counts[w], w)
        )
        return cls([*SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, tokens: Sequence[str], max_len: int | None = None) -> list[int]:
        """``[<start>, w1..wn, <end>]`` as ids; words are cut to ``max_len`` before the specials."""
        if max_len is not None:
            tokens = tokens[:max_len]
        return [self.start_id, *(self.index.get(t, self.unk_id) for t in tokens), self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Ids to words, stopping at ``<end>`` and dropping ``<start>``/``<pad>``."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.pad_id, self.start_id):
                continue
            out.append(self.tokens[i] if 0 <= i < len(self.tokens) else UNK)
        return out
