"""Tokenisation and the word vocabulary.

``tokenize`` splits a caption into the words that evaluation sees: the tokens of the coco-caption
PTB tokeniser (``captioning.cocoeval.ptb_tokenize``, pure Python, no NLTK data download), less the
punctuation that pycocoevalcap drops, so that a caption the model learnt word for word scores as
the reference it came from ("t-shirt", "3.5", "10:30", "u.s.", "&" stay one token each; "man's" is
"man" + "'s", "don't" is "do" + "n't"). Commas are kept as their own token, because list captions
("a red circle , a blue square and ...") read better with them; scoring drops them again.
``detokenize`` joins tokens back into display text ("a man's t-shirt, red", "gonna"), which the PTB
tokeniser splits into the same tokens.

A :class:`Vocabulary` is stored as a plain list of tokens (index = position), so it travels in a
checkpoint without pickling any object.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterable, Sequence

from captioning.cocoeval import PUNCTUATIONS, ptb_tokenize

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)

#: PTB tokens that ``tokenize`` leaves out: pycocoevalcap's punctuation except the comma, and every bracket
#: token. Lowercased, its "-LRB-"/"-RRB-"/"-LCB-"/"-RCB-" match the lexer's lowercased brackets, which
#: pycocoevalcap itself keeps as words ("-lrb-" for "("): words no caption should be taught to say.
_DROP = frozenset(t.lower() for t in PUNCTUATIONS if t != ",") | {"-lsb-", "-rsb-"}
_TAG = re.compile(r"<.*>\Z")  # the lexer keeps "<b>" or "<end>" as one token: markup, never a word
#: tokens written onto the word before them in display text (the PTB tokeniser splits them off again)
_ATTACHED = frozenset([",", "'s", "'re", "'ve", "'ll", "'m", "'d", "n't", "'"])


def tokenize(text: str) -> list[str]:
    """Lowercased PTB tokens of ``text`` without punctuation (commas kept) or markup tags.

    What is left is what pycocoevalcap scores (plus commas), so a special token such as ``<end>``
    never comes out of a caption's text: the lexer reads it as a tag, which is dropped."""
    return [t for t in ptb_tokenize(text) if t not in _DROP and not _TAG.match(t)]


_CLITICS = _ATTACHED - {","}
#: words the PTB tokeniser splits in two ("gonna" -> "gon" "na"): written whole
_SPLIT_WORDS = frozenset([("gon", "na"), ("got", "ta"), ("lem", "me"), ("gim", "me"), ("wan", "na")])


@functools.lru_cache(maxsize=4096)
def _reads_back_joined(first: str, second: str) -> bool:
    """Whether ``first`` must be written onto ``second`` to read back as these two tokens: the front of a word
    the tokeniser splits off ("'tis" -> "'t" "is", "y'all" -> "y'" "all"), which apart reads back otherwise
    ("'t is" -> "t" "is")."""
    return tokenize(f"{first} {second}") != [first, second] and tokenize(first + second) == [first, second]


@functools.lru_cache(maxsize=4096)
def _attaches(first: str, second: str) -> bool:
    """Whether the clitic or comma ``second`` is written onto ``first``: unless joined it would read back as other
    tokens and apart as these two ("mr." "n't": "mr.n't" reads back as "mr.n" "t", "mr. n't" as the two)."""
    joined, apart = _written(first) + second, f"{_written(first)} {second}"
    return tokenize(joined) == [first, second] or tokenize(apart) != [first, second]


@functools.lru_cache(maxsize=1 << 16)
def _written(token: str) -> str:
    """How ``token`` is written to read back as itself: as it is, or in capitals where only those keep it one
    word (the tokeniser keeps "B&W", "AT&T" whole but splits "b&w" into "b" "&" "w")."""
    if tokenize(token) != [token] and tokenize(token.upper()) == [token]:
        return token.upper()
    return token


def detokenize(tokens: Sequence[str]) -> str:
    """Display text of tokens: clitics ("'s", "n't") and commas written onto the word before them, the two
    halves of a word the tokeniser splits ("gon" "na", "'t" "is", "y'" "all") written as that word, a word
    the tokeniser keeps whole only in capitals ("b&w") written in capitals.

    ``tokenize(detokenize(t)) == t`` for what ``tokenize`` returns from words, numbers, clitics and commas, so
    scoring the display text of a caption scores its tokens; not always around the tokens the lexer makes of
    brackets, quote marks and emoticons ("-lrb-", "``", "=-rrb-" for "=)"), which captions hardly hold. A model's
    free output need not be such a sequence ("#" then "n't" reads back as "#n", "t"): scoring always takes the
    text, as coco-caption does, so it scores what a reader sees."""
    out: list[str] = []
    onto_next = False  # the last token is written onto this one
    for i, tok in enumerate(tokens):
        if out and (onto_next or (tok in _ATTACHED and _attaches(tokens[i - 1], tok))):
            out[-1] += tok
        else:
            out.append(_written(tok))
        following = tokens[i + 1] if i + 1 < len(tokens) else None
        onto_next = following is not None and (
            # not before a clitic: "gonna's" reads back as "gonna" "'s"
            ((tok, following) in _SPLIT_WORDS and (i + 2 >= len(tokens) or tokens[i + 2] not in _CLITICS))
            or ("'" in tok and tok not in _ATTACHED and _reads_back_joined(tok, following))
        )
    return " ".join(out)


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
        if isinstance(tokens, str):  # encoded letter by letter, each an <unk>, without a word
            raise TypeError(f"encode takes a list of words, got a str ({tokens[:40]!r}): encode(tokenize(text))")
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
