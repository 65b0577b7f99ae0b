"""COCO caption metrics (BLEU-1..4, ROUGE-L, CIDEr-D and, when Java is there, METEOR) as the coco-caption
toolkit / pycocoevalcap 1.2 computes them, in pure Python.

``score_captions`` takes raw captions keyed by image id and returns what pycocoevalcap's ``COCOEvalCap`` would
report for them. Reproduced without Java:

- the tokenisation: pycocoevalcap pipes all captions through Stanford CoreNLP 3.4.1's ``PTBTokenizer
  -preserveLines -lowerCase`` and then drops its punctuation tokens. ``ptb_tokenize`` re-implements the rules of
  that lexer that English captions exercise (contractions, possessives, quotes, brackets, hyphenated words,
  numbers, abbreviations and acronyms, ellipses, dashes, currency, simple URLs, common non-ASCII punctuation).
  It was checked token for token against the Java tokenizer (see tests/test_cocoeval.py and the fixture).
  Deliberate difference: pycocoevalcap splits the lexer's output on the newlines the lexer emits, so a caption
  holding a carriage return or another line separator shifts every later caption onto the wrong image; here
  such characters are read as spaces. Known, unreproduced corner: "letter" and "uppercase" follow Python's
  Unicode tables rather than those of the 2014 JDK (characters added to Unicode since then may differ).
- BLEU-1..4 (``bleu_scorer.py``: corpus level, "closest" reference length, its 1e-9 / 1e-15 smoothing),
- ROUGE-L (``rouge.py``: LCS, beta 1.2, best precision and best recall over the references, mean over images),
- CIDEr-D (``cider_scorer.py``, which pycocoevalcap calls "CIDEr": n = 1..4, tf-idf with document frequencies
  from the references of the evaluated set, clipped candidate weights, gaussian length penalty with sigma 6,
  x10). ``CiderD`` precomputes the document frequencies once so that it can serve as a training reward.

METEOR needs the METEOR 1.5 jar: it is computed only through pycocoevalcap's own ``Meteor`` wrapper when both
``java`` and pycocoevalcap are installed, and left out of the result (with a warning) otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import re
import shutil
import threading
import warnings
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np

__all__ = [
    "PUNCTUATIONS",
    "CiderD",
    "bleu",
    "meteor_available",
    "ptb_tokenize",
    "rouge_l",
    "score_captions",
    "tokenize_captions",
]

# pycocoevalcap/tokenizer/ptbtokenizer.py drops these tokens after PTB tokenisation. Note that the lexer output is
# lowercased first, so "-LRB-"/"-RRB-" (from parentheses) arrive as "-lrb-"/"-rrb-" and are *kept*, as in the
# official scores.
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

# ---------------------------------------------------------------------------------------------------------------
# PTB tokenizer (behaviour of edu.stanford.nlp.process.PTBLexer, CoreNLP 3.4.1, default options + tokenizeNLs)
# ---------------------------------------------------------------------------------------------------------------

_NL = "\n"  # marker the lexer emits for a line break (-preserveLines)


def _class_of(predicate: Callable[[str], bool]) -> str:
    """Body of a regex character class of the BMP characters for which ``predicate`` holds (JFlex 1.4, which
    built the lexer, works on UTF-16 units: characters beyond the BMP match no class)."""
    parts, start = [], None
    for cp in range(0x10001):
        inside = cp < 0x10000 and predicate(chr(cp))
        if inside and start is None:
            start = cp
        elif not inside and start is not None:
            parts.append(f"\\u{start:04x}" if cp - 1 == start else f"\\u{start:04x}-\\u{cp - 1:04x}")
            start = None
    return "".join(parts)


@functools.cache
def _letter_class() -> str:
    """Body of a regex character class matching what Java's Character.isLetter accepts in the BMP."""
    return _class_of(str.isalpha)


@functools.cache
def _upper_class() -> str:
    """Body of a regex character class matching what Java's Character.isUpperCase accepts in the BMP."""
    return _class_of(str.isupper)


def _i(s: str) -> str:
    """A caseless literal: the lexer is %caseless for strings but not inside character classes."""
    return f"(?i:{s})"


def _latex_quotes(tok: str, probably_left: bool) -> str:
    if probably_left:
        tok = re.sub(r"&apos;|'", "`", tok)
        tok = re.sub(r'"|&quot;', "``", tok)
    else:
        tok = re.sub(r"&apos;|'", "'", tok)
        tok = re.sub(r'"|&quot;', "''", tok)
    tok = re.sub("[\u0091\u2018\u201b\u2039]", "`", tok)
    tok = re.sub("[\u0092\u2019\u203a]", "'", tok)
    tok = re.sub("[\u0093\u201c\u00ab]", "``", tok)
    return re.sub("[\u0094\u201d\u00bb]", "''", tok)


def _amp(tok: str) -> str:
    return re.sub("(?i:&amp;)", "&", tok)


def _no_soft_hyphen(tok: str) -> str:
    return tok.replace("\u00ad", "") or "-"  # a token of soft hyphens only becomes a hyphen


def _nbsp(tok: str) -> str:
    return tok.replace(" ", "\u00a0")


def _parens(tok: str) -> str:
    return tok.replace("(", "-LRB-").replace(")", "-RRB-")


_CURRENCY = {"\u00a2": "cents", "\u00a3": "#", "\u0080": "$", "\u00a4": "$", "\u20a0": "$", "\u20ac": "$"}
_FRACTIONS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}

# An action maps the matched token text to (token to emit or None, number of characters consumed).
_Action = Callable[[str], tuple[str | None, int]]


def _emit(fn: Callable[[str], str] | None = None) -> _Action:
    return lambda t: (fn(t) if fn else t, len(t))


def _pushback(n: int) -> _Action:
    return lambda t: (t[:-n], len(t) - n)


def _skip(t: str) -> tuple[str | None, int]:
    return None, len(t)


def _acronym(t: str) -> tuple[str | None, int]:
    # "I." -> "I" then "."; longer acronyms are returned with their period *and* the period again
    return (t[:-1], 1) if len(t) == 2 else (t, len(t) - 1)


def _abbrev_sentence_end(t: str) -> tuple[str | None, int]:
    return t, len(t) - 1  # "etc." before a sentence start: "etc." then "."


@functools.cache
def _rules() -> tuple[tuple[tuple[re.Pattern, ...], bool, _Action], ...]:
    """The lexer rules in priority order: (patterns, has trailing context, action).

    As in JFlex, the longest match wins (trailing context counts towards its length), earlier rules break ties.
    A rule with trailing context has its token in group 1. A rule lists its alternatives as separate patterns
    where Python's first-alternative-wins regex semantics would otherwise miss the longest match.
    """
    letter = f"[{_letter_class()}]"
    letter_digit = f"[{_letter_class()}\\d]"
    splet = "&[aeiouAEIOU]" + _i("acute|grave|uml") + ";"
    word_char = (
        f"(?:[{_letter_class()}\u00ad\u0237-\u024f\u02c2-\u02c5\u02d2-\u02df\u02e5-\u02ff\u0300-\u036f"
        "\u0370-\u037d\u0384\u0385\u03cf\u03f6\u03fc-\u03ff\u0483-\u0487\u04cf\u04f6-\u04ff\u0510-\u0525"
        "\u055a-\u055f\u0591-\u05bd\u05bf\u05c1\u05c2\u05c4\u05c5\u05c7\u0615-\u061a\u063b-\u063f\u064b-\u065e"
        "\u0670\u06d6-\u06ef\u06fa-\u06ff\u070f\u0711\u0730-\u074f\u0750-\u077f\u07a6-\u07b1\u07ca-\u07f5\u07fa"
        "\u0900-\u0903\u093c\u093e-\u094e\u0951-\u0955\u0962-\u0963\u0981-\u0983\u09bc-\u09c4\u09c7\u09c8"
        "\u09cb-\u09cd\u09d7\u09e2\u09e3\u0a01-\u0a03\u0a3c\u0a3e-\u0a4f\u0a81-\u0a83\u0abc-\u0acf\u0b82"
        "\u0bbe-\u0bc2\u0bc6-\u0bc8\u0bca-\u0bcd\u0c01-\u0c03\u0c3e-\u0c56\u0d3e-\u0d44\u0d46-\u0d48\u0e30-\u0e3a"
        f"\u0e47-\u0e4e\u0eb1-\u0ebc\u0ec8-\u0ecd]|{splet})"
    )
    word_part = f"{word_char}(?:{word_char}|\\d)*"
    word = f"{word_part}(?:[.!?]{word_part})*"
    digit = "\\d"
    space = "[ \t\u00a0\u2000-\u200a\u3000]"
    newline = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c\u0085])"
    spacenl = f"(?:{space}|{newline})"
    sgml = (
        "<(?:[!?][A-Za-z\\-][^>\r\n]*|\\/?[A-Za-z][A-Za-z0-9_:.\\-]*"
        "(?: +[A-Za-z][A-Za-z0-9_:.\\-]*(?: *= *(?:'[^'\r\n]*'|\"[^\"\r\n]*\"))?)* *\\/?) *>"
    )
    sentend = f"{spacenl}(?:{spacenl}|[{_upper_class()}]|{sgml})"
    apos = "(?:['\u0092\u2019]|" + _i("&apos;") + ")"
    aposetc = "(?:['`\u0092\u2019\u0091\u2018\u201b]|" + _i("&apos;") + ")"
    redaux = f"{apos}(?:[msdMSD]|{_i('re|ve|ll')})"
    sword = "[A-Za-z\u00ad]*[A-MO-Za-mo-z]\u00ad*"
    sredaux = _i("n") + aposetc + _i("t")
    num = f"(?:{digit}*(?:[.:,\u00ad\u066b\u066c]{digit}+)+|{digit}+)"
    number = f"[\\-+]?{num}"
    hyphen = "[\\-_\u058a\u2010\u2011]"
    us_acro = _i("(?:Canada|Sino|Korean|EU|Japan|non)-U\\.S|U\\.S\\.-(?:U\\.K|U\\.S\\.S\\.R)")
    acro = f"(?:[A-Za-z](?:\\.[A-Za-z])*|{us_acro})"
    acro2 = f"(?:[A-Za-z](?:\\.[A-Za-z])+|{us_acro})"  # at least one period
    thing_part = f"(?:[dDoOlL]{aposetc}{letter_digit})?{letter_digit}+"
    thing = f"{thing_part}(?:{hyphen}{thing_part})*"
    thinga = f"[A-Z]+(?:(?:[+&]|{_i('&amp;')})[A-Z]+)+"
    thing3 = "[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\\\?\\/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}"
    hthing = f"[A-Za-z0-9][A-Za-z0-9.,\u00ad]*(?:-(?:{acro2}\\.|[A-Za-z0-9\u00ad]+))+"  # longer alternative first
    abmonth = "Jan|Feb|Mar|Apr|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec"
    abdays = "Mon|Tue|Tues|Wed|Thu|Thurs|Fri"
    abstate = (
        "Ala|Ariz|[A]z|[A]rk|Calif|Colo|Conn|Ct|Dak|[D]el|Fla|Ga|[I]ll|Ind|Kans?|Ky|[L]a|[M]ass|Md|Mich|Minn|[M]iss|Mo"
        "|Mont|Neb|Nev|Okla|[O]re|[P]a|Penn|Tenn|[T]ex|Va|Vt|[W]ash|Wisc?|Wyo"
    )
    abcomp = "Inc|Cos?|Corp|Pp?t[ye]s?|Ltd|Plc|Rt|Bancorp|Bhd|Assn|Univ|Intl|Sys"
    abnum = "tel|est|ext|sq"
    abptit = "Jr|Sr|Bros|(?:Ed|Ph)\\.D|Blvd|Rd|Esq"
    abbrev1 = _cased_literals(f"(?:{abmonth}|{abdays}|{abstate}|{abcomp}|{abnum}|{abptit}|etc|al|seq|Bldg)") + "\\."
    abtitle = (
        "Mr|Mrs|Ms|[M]iss|Drs?|Profs?|Sens?|Reps?|Attys?|Lt|Col|Gen|Messrs|Govs?|Adm|Rev|Maj|Sgt|Cpl|Pvt|Mt|Capt|Ste?"
        "|Ave|Pres|Lieut|Hon|Brig|Co?mdr|Pfc|Spc|Supts?|Det|Ft|Adj|Adv|Asst|Assoc|Ens|Insp|Mlle|Mme|Msgr|Sfc"
    )
    abcomp2 = "Invt|Elec|Natl|M[ft]g|Dept"
    abbrev4 = _cased_literals(f"(?:{abtitle}|vs|Alex|Wm|Jos|Cie|a\\.k\\.a|cf|TREAS|Ph|{abcomp2})")
    abbrev3 = _cased_literals("(?:ca|figs?|prop|nos?|art|bldg|pp|op)") + "\\."
    # words after which an acronym's period also ends the sentence (capital initial required)
    sentence_starts = _cased_literals(
        "[A]bout|[A]ccording|[A]dditionally|[A]fter|[A]n|[A]|[A]s|[A]t|[B]ut|[E]arlier|[H]e|[H]er|[H]ere|[H]owever"
        "|[I]f|[I]n|[I]t|[L]ast|[M]any|[M]ore|[M]r\\.|[M]s\\.|[N]ow|[O]nce|[O]ne|[O]ther|[O]ur|[S]he|[S]ince|[S]o"
        "|[S]ome|[S]uch|[T]hat|[T]he|[T]heir|[T]hen|[T]here|[T]hese|[T]hey|[T]his|[W]e|[W]hen|[W]hile|[W]hat|[Y]et"
        "|[Y]ou"
    )
    acronym_next = f"(?:{sentence_starts}|{sgml})"
    phone = (
        "(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[\\- \u00a0])?[0-9]{2,4}[\\- \u00a0])"
        "[0-9]{3,4}[\\- \u00a0]?[0-9]{3,5}"
    )
    phone_dots = "(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}\\.[0-9]{3,5}"
    ldots = "\\.{3,5}|(?:\\.[ \u00a0]){2,4}\\.|[\u0085\u2026]"
    quote_chars = "`\u2018\u2019\u201a\u201b\u201c\u201d\u0091\u0092\u0093\u0094\u201e\u201f\u2039\u203a\u00ab\u00bb"
    quotes = [apos, "''", f"[{quote_chars}]{{1,2}}"]
    dblquot = '"|' + _i("&quot;")
    miscsymbol = (
        "[+%&~\\^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00b3\u00b4-\u00ba\u00d7\u00f7\u0387\u05be"
        "\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614\u061b\u061e\u066a\u066d\u0703-\u070d"
        "\u07f6\u07f7\u07f8\u0964\u0965\u0e4f\u1fbd\u2016\u2017\u2020-\u2023\u2030-\u2038\u203b\u203e-\u2042\u2044"
        "\u207a-\u207f\u208a-\u208e\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3012\u30fb\uff01-\uff0f\uff1a-\uff20"
        "\uff3b-\uff40\uff5b-\uff65]"
    )
    url_bad = ' \t\n\f\r"<>|()'
    fullurl = _i("https?") + f"://[^{url_bad}{{}}]+[^{url_bad}.!?{{}},\\-]"
    likelyurl = (
        f'(?:(?:{_i("www")}\\.(?:[^ \t\n\f\r"<>|.!?(){{}},]+\\.)+[a-zA-Z]{{2,4}})'
        # ",-_" is a character range here, as in CoreNLP's lexer: no digits, capitals, "/", ":" ... in these names
        f"|(?:(?:[^ \t\n\f\r\"`'<>|.!?(){{}},-_$]+\\.)+{_i('com|net|org|edu')}))"
        f'(?:\\/[^ \t\n\f\r"<>|()]+[^ \t\n\f\r"<>|.!?(){{}},\\-])?'
    )
    email = (
        '(?:<|(?i:&lt;))?[a-zA-Z0-9][^ \t\n\f\r"<>|(){}\u00a0]*@(?:[^ \t\n\f\r"<>|(){}.\u00a0]+\\.)*'
        '[^ \t\n\f\r"<>|(){}.\u00a0]+(?:>|(?i:&gt;))?'
    )
    smiley = "[<>]?[:;=][\\-o\\*']?[\\(\\)DPdpO\\\\{@\\|\\[\\]]"
    asian_smileys = [
        "[\\-\\^x=~<>']_[\\-\\^x=~<>']",
        "\\([\\-\\^x=~<>'][_.]?[\\-\\^x=~<>']\\)",
        "\\([\\^x=~<>']-[\\^x=~<>'`]\\)",
        "\u00af\\\\_\\(\u30c4\\)_\\/\u00af",
    ]
    filename_ext = (
        "bat|bmp|c|class|cgi|cpp|dll|doc|docx|exe|gif|gz|h|htm|html|jar|java|jpeg|jpg|mov|mp3|pdf|php|pl|png|ppt|ps"
        "|py|sql|tar|txt|wav|x|xml|zip"
    )
    filename = f"(?:{word_char}|\\d)+(?:\\.(?:{word_char}|\\d)+)*\\.{_i(f'(?:{filename_ext})')}"

    def q(left: bool) -> _Action:
        return _emit(lambda t: _latex_quotes(t, left))

    def ctx(tok: str, context: str) -> str:
        return f"({tok})(?:{context})"

    dash: _Action = _emit(lambda t: "--")
    rules: list[tuple[list[str], bool, _Action]] = [
        ([_i("c\\+\\+|[cf]#")], False, _emit()),
        ([_i("cannot|'twas")], False, _pushback(3)),
        ([apos + _i("tis"), _i("gonna|gotta|lemme|gimme|wanna")], False, _pushback(2)),
        ([sgml], False, _emit(_nbsp)),
        ([_i("&(?:MD|mdash|ndash);") + "|[\u0096\u0097\u2013\u2014\u2015]"], False, dash),
        ([_i("&amp;")], False, _emit(_amp)),
        ([_i("&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);")], False, _emit()),
        ([ctx(word, redaux)], True, _emit(_no_soft_hyphen)),
        ([ctx(sword, sredaux)], True, _emit(_no_soft_hyphen)),
        ([word], False, _emit(_no_soft_hyphen)),
        (
            [
                f"{apos}{_i('n')}{apos}?",
                f"[lLdDjJ]{apos}",
                f"{_i('dunkin')}{apos}",
                f"{_i('somethin')}{apos}",
                f"{_i('ol')}{apos}",
                f"{apos}{_i('em')}",
                f"[A-HJ-XZn]{aposetc}{letter}{{2}}{letter}*",
                f"{apos}[2-9]0{_i('s')}",
                f"{apos}{_i('till?')}",
                f"{letter}+[aeiouyAEIOUY]{aposetc}[aeiouA-Z]{letter}*",
                f"{apos}{_i('cause')}",
                _i("cont'd\\.?|'twas|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l"),
                _i("o") + aposetc + _i("o"),
            ],
            False,
            _emit(),
        ),
        ([ctx(_i("y") + apos, letter)], True, _emit()),
        ([fullurl], False, _emit()),
        ([likelyurl], False, _emit()),
        ([email], False, _emit()),
        (["@[a-zA-Z_][a-zA-Z_0-9]*", f"#{word_char}+"], False, _emit()),
        ([ctx(redaux, "[^A-Za-z]")], True, q(False)),
        ([sredaux], False, q(False)),
        ([f"{digit}{{1,2}}[\\-\\/]{digit}{{1,2}}[\\-\\/]{digit}{{2,4}}"], False, _emit()),
        ([number], False, _emit(_no_soft_hyphen)),
        (["[\u207a\u207b\u208a\u208b]?(?:[\u2070\u00b9\u00b2\u00b3\u2074-\u2079]+|[\u2080-\u2089]+)"], False, _emit()),
        ([f"(?:{digit}{{1,4}}[\\- \u00a0])?{digit}{{1,4}}(?:\\\\?\\/|\u2044){digit}{{1,4}}"], False, _emit(_nbsp)),
        (["[\u00bc\u00bd\u00be\u2153-\u215e]"], False, _emit(lambda t: _FRACTIONS.get(t, t))),
        (
            [
                _i("-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|C\\.D\\.s|pro-|anti-|S(?:&|&amp;)P-500|S(?:&|&amp;)Ls"),
                _i("Cap") + apos + _i("n"),
                _i("c") + apos + _i("est"),
            ],
            False,
            _emit(_amp),
        ),
        ([thing3], False, _emit()),
        (["[A-Z]*\\$|#"], False, _emit()),
        (
            ["[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5\uffe6]"],
            False,
            _emit(lambda t: _CURRENCY.get(t, t)),
        ),
        ([ctx(f"{acro}\\.", f"{spacenl}+{acronym_next}{spacenl}")], True, _acronym),
        ([ctx(abbrev3, f"{spacenl}?{digit}")], True, _emit()),
        ([ctx(_i("pt[eyEY]|co") + "\\.", space + _i("ltd|lim"))], True, _emit()),
        ([ctx(abbrev1, sentend)], True, _abbrev_sentence_end),
        ([ctx(abbrev1, "(?s:..)")], True, _emit()),
        ([abbrev1], False, _abbrev_sentence_end),
        ([f"{abbrev4}\\.", f"{acro}\\."], False, _emit()),
        ([ctx(abbrev4, space), ctx(acro, space)], True, _emit()),
        ([ctx(acro, spacenl)], True, _emit()),
        ([ctx(f"{apos}[0-9][0-9]", spacenl)], True, _emit()),
        ([ctx(filename, f"{spacenl}|[.?!,]")], True, _emit()),
        ([ctx(f"{word}\\.", "[,;:\u3001]")], True, _emit(_no_soft_hyphen)),
        ([phone, phone_dots], False, _emit(lambda t: _parens(_nbsp(t)))),
        ([ctx(dblquot, "[A-Za-z0-9$]")], True, q(True)),
        ([dblquot], False, q(False)),
        (["\x7f"], False, _skip),
        (["<<|>>"], False, _emit()),
        (["<|" + _i("&lt;")], False, _emit(lambda t: "<")),
        ([">|" + _i("&gt;")], False, _emit(lambda t: ">")),
        ([ctx(smiley, "[^A-Za-z0-9]")], True, _emit(_parens)),
        (asian_smileys, False, _emit(_parens)),
        (["[\\[\\]{}()]"], False, _emit(lambda t: _BRACKETS[t])),
        (["\\-+"], False, _emit(lambda t: "--" if 3 <= len(t) <= 4 else t)),
        ([ldots], False, _emit(lambda t: "...")),
        (["@+", "#+", "_+"], False, _emit()),
        (["\\*+", "(?:\\\\\\*){1,3}"], False, _emit()),
        (["[,;:\u3001]"], False, _emit()),
        (["[?!]+"], False, _emit()),
        (["[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]"], False, _emit()),
        (["="], False, _emit()),
        (["\\/"], False, _emit()),
        ([ctx(f"{hthing}\\.", "[,;:\u3001]")], True, _emit(_no_soft_hyphen)),
        ([hthing], False, _emit(_no_soft_hyphen)),
        ([ctx(f"{thing}\\.", "[,;:\u3001]")], True, _emit()),
        ([thing], False, _emit()),
        ([ctx(f"{thinga}\\.", "[,;:\u3001]")], True, _emit(_amp)),
        ([thinga], False, _emit(_amp)),
        ([ctx("'", "[A-Za-z][^ \t\n\r\u00a0]")], True, q(True)),
        ([redaux], False, q(False)),
        (quotes, False, q(False)),
        ([miscsymbol], False, _emit()),
        (["\x00|" + space + "+|[\u200b\u200e\u200f\ufeff]"], False, _skip),
        ([newline], False, lambda t: (_NL, len(t))),
        ([_i("&nbsp;")], False, _skip),
    ]
    return tuple((tuple(re.compile(p) for p in pats), c, a) for pats, c, a in rules)


def _cased_literals(alternation: str) -> str:
    """Make the letters of an abbreviation list caseless except those in [X] classes (which the lexer keeps
    case-sensitive)."""
    out, i = [], 0
    while i < len(alternation):
        ch = alternation[i]
        if ch == "[":
            j = alternation.index("]", i)
            out.append(alternation[i : j + 1])
            i = j + 1
            continue
        out.append(f"[{ch.lower()}{ch.upper()}]" if ch.isalpha() and ch.isascii() else ch)
        i += 1
    return "".join(out)


# Plain ASCII words followed by whitespace are by far the most frequent tokens and no rule other than WORD (or one
# that returns the same text) can claim them, except these few that the lexer splits.
_FAST_WORD = re.compile(r"[A-Za-z]+(?=[ \t\n]|\Z)")
_FAST_EXCLUDE = frozenset(["cannot", "gonna", "gotta", "lemme", "gimme", "wanna"])
_SPACES = re.compile("[ \t][ \t\u00a0\u2000-\u200a\u3000]*")  # a run of spaces that starts like this is one


def _lex(text: str) -> list[str]:
    """PTB tokens of ``text`` in the lexer's own case; line breaks come out as ``_NL``."""
    rules = _rules()
    tokens: list[str] = []
    pos, end = 0, len(text)
    while pos < end:
        m = _SPACES.match(text, pos)
        if m:
            pos = m.end()
            continue
        m = _FAST_WORD.match(text, pos)
        if m and m.group().lower() not in _FAST_EXCLUDE:
            tokens.append(m.group())
            pos = m.end()
            continue
        best_len, best = 0, None
        for patterns, has_ctx, action in rules:
            for pattern in patterns:
                m = pattern.match(text, pos)
                if m and m.end() - pos > best_len:
                    best_len, best = m.end() - pos, (m, has_ctx, action)
        if best is None:  # untokenizable character: the lexer deletes it (and logs a warning)
            pos += 1
            continue
        m, has_ctx, action = best
        tok, consumed = action(m.group(1) if has_ctx else m.group())
        if tok is not None:
            tokens.append(tok)
        pos += max(consumed, 1)
    return tokens


# pycocoevalcap replaces "\n" inside a caption by a space; the lexer would also break lines at these.
_LINE_BREAKS = re.compile("[\r\u2028\u2029\u000b\u000c]")


_ASTRAL = re.compile("[\U00010000-\U0010ffff]")


def _surrogates(cp: int) -> str:
    return chr(0xD800 + ((cp - 0x10000) >> 10)) + chr(0xDC00 + ((cp - 0x10000) & 0x3FF))


def _lex_utf16(text: str) -> list[str]:
    """``_lex`` on the text as Java sees it: characters beyond the BMP (emoji, ...) as two UTF-16 surrogates, which
    match no letter class and count twice in patterns like URLs."""
    if not _ASTRAL.search(text):
        return _lex(text)
    utf16 = _ASTRAL.sub(lambda m: _surrogates(ord(m.group())), text)
    return [t.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace") for t in _lex(utf16)]


def ptb_tokenize(text: str) -> list[str]:
    """Lowercased PTB tokens of one caption, punctuation included (what ``PTBTokenizer -lowerCase`` prints).

    Lexed as a line, ending at a line break as a caption does in :func:`tokenize_captions`: at the end of the
    input a few rules read otherwise (a last "they're", "we've" or "you'll" gave "they" "re", not "they" "'re"),
    so training targets made here differed from the scored words of the same caption."""
    tokens = _lex_utf16(_LINE_BREAKS.sub(" ", text.replace("\n", " ")) + "\n")
    return [t.lower() for t in tokens if t != _NL]


def tokenize_captions(captions: Sequence[str]) -> list[str]:
    """pycocoevalcap's ``PTBTokenizer.tokenize`` for a list of raw captions: one string per caption, tokens joined
    by single spaces, punctuation tokens removed.

    Like pycocoevalcap, all captions are lexed as one text, one caption per line: a few rules look at what comes
    next (e.g. an acronym before "The"), also across lines.
    """
    text = "\n".join(_LINE_BREAKS.sub(" ", c.replace("\n", " ")) for c in captions)
    lines: list[list[str]] = [[]]
    for tok in _lex_utf16(text):
        if tok == _NL:
            lines.append([])
        else:
            lines[-1].append(tok.lower())
    out = []
    for line in lines[: len(captions)]:
        # exactly pycocoevalcap's post-processing of an output line
        out.append(" ".join(w for w in " ".join(line).rstrip().split(" ") if w not in PUNCTUATIONS))
    return out


# ---------------------------------------------------------------------------------------------------------------
# BLEU (pycocoevalcap/bleu/bleu_scorer.py, option "closest")
# ---------------------------------------------------------------------------------------------------------------


def _ngram_tf(words: Sequence[str], n: int) -> Counter:
    """Counts of the 1..n-grams of ``words`` (tuples), built with zip: several times faster than slicing."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        counts.update(zip(*(words[i:] for i in range(k))))
    return counts


def bleu(references: Sequence[Sequence[str]], candidates: Sequence[str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenised ``candidates`` (space-joined strings) against their tokenised references, as
    pycocoevalcap's ``Bleu(n)`` computes it."""
    small, tiny = 1e-9, 1e-15  # pycocoevalcap's constants: a zero match count still gives (almost) 0
    correct, guess = [0] * n, [0] * n
    testlen_total, reflen_total = 0, 0
    for refs, cand in zip(references, candidates):
        maxcounts: dict[tuple, int] = {}
        reflens = []
        for ref in refs:
            words = ref.split()
            reflens.append(len(words))
            for ngram, count in _ngram_tf(words, n).items():
                maxcounts[ngram] = max(maxcounts.get(ngram, 0), count)
        words = cand.split()
        testlen = len(words)
        for ngram, count in _ngram_tf(words, n).items():
            correct[len(ngram) - 1] += min(maxcounts.get(ngram, 0), count)
        for k in range(n):
            guess[k] += max(0, testlen - k)
        testlen_total += testlen
        reflen_total += min((abs(length - testlen), length) for length in reflens)[1]  # "closest", ties: shorter
    scores, value = [], 1.0
    for k in range(n):
        value *= float(correct[k] + tiny) / (guess[k] + small)
        scores.append(value ** (1.0 / (k + 1)))
    ratio = (testlen_total + tiny) / (reflen_total + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


# ---------------------------------------------------------------------------------------------------------------
# ROUGE-L (pycocoevalcap/rouge/rouge.py)
# ---------------------------------------------------------------------------------------------------------------


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(
    references: Sequence[Sequence[str]], candidates: Sequence[str], beta: float = 1.2
) -> tuple[float, np.ndarray]:
    """(mean, per-image) ROUGE-L of tokenised candidates as pycocoevalcap's ``Rouge`` computes it."""
    scores = []
    for refs, cand in zip(references, candidates):
        # split(" ") as pycocoevalcap: an empty caption is one empty token, not zero tokens
        cand_toks = cand.split(" ")
        prec, rec = [], []
        for ref in refs:
            ref_toks = ref.split(" ")
            lcs = _lcs(ref_toks, cand_toks)
            prec.append(lcs / float(len(cand_toks)))
            rec.append(lcs / float(len(ref_toks)))
        p, r = max(prec), max(rec)
        scores.append(((1 + beta**2) * p * r) / float(r + beta**2 * p) if p != 0 and r != 0 else 0.0)
    arr = np.array(scores)
    return float(np.mean(arr)), arr


# ---------------------------------------------------------------------------------------------------------------
# CIDEr-D (pycocoevalcap/cider/cider_scorer.py)
# ---------------------------------------------------------------------------------------------------------------


def _words(caption: str | Sequence[str]) -> Sequence[str]:
    return caption.split() if isinstance(caption, str) else caption


def _per_order_tf(words: Sequence[str], n: int) -> list[Counter]:
    """Counts of the k-grams (tuples) of ``words``, one Counter per k = 1..n."""
    if n == 4:  # the usual case, spelled out: about twice as fast
        w1, w2, w3 = words[1:], words[2:], words[3:]
        return [Counter(zip(words)), Counter(zip(words, w1)), Counter(zip(words, w1, w2)),
                Counter(zip(words, w1, w2, w3))]  # fmt: skip
    return [Counter(zip(*(words[i:] for i in range(k)))) for k in range(1, n + 1)]


class CiderD:
    """CIDEr-D with document frequencies computed once from a reference corpus.

    ``CiderD(refs).score(candidates, refs)`` is pycocoevalcap's ``Cider`` when ``refs`` are the references of the
    evaluated images themselves (what ``score_captions`` does). For a training reward, build it once from the
    training references (``references``: one sequence of reference captions per image) and score sampled captions
    against their images' references: a batch is scored with a few numpy operations, and the n-grams of each
    reference caption are cached (up to ``cache_size`` captions, about 0.5 kB each; with ``precompute`` those of the
    corpus are encoded up front) so that scoring against them is a lookup.

    Captions are tokenised: space-joined strings (as ``tokenize_captions`` returns them) or token lists. As in
    pycocoevalcap, the idf of an n-gram is ``log(N) - log(max(1, df))`` with N the number of reference sets of the
    corpus (so an n-gram it never saw counts as df 1), and the gaussian length penalty compares numbers of
    *bigrams* (``max(len - 1, 0)``), a quirk of ``cider_scorer.py`` kept for identical scores.
    """

    def __init__(
        self,
        references: Iterable[Sequence[str | Sequence[str]]],
        n: int = 4,
        sigma: float = 6.0,
        cache_size: int = 1_000_000,
        precompute: bool = True,
    ) -> None:
        self.n, self.sigma = n, sigma
        corpus = list(references) if precompute else references
        df: Counter = Counter()
        num_sets = 0
        for refs in corpus:
            num_sets += 1
            grams: set = set()
            for ref in refs:
                words = _words(ref)
                for k in range(1, n + 1):
                    grams.update(zip(*(words[i:] for i in range(k))))
            df.update(grams)
        if num_sets == 0:
            raise ValueError("CiderD needs at least one set of references for its document frequencies")
        self.num_sets = num_sets
        self.ref_len = float(np.log(float(num_sets)))
        # n-gram -> id, and id -> idf. N-grams of references that the corpus lacks get an id when first met.
        self._ids: dict[tuple, int] = {g: i for i, g in enumerate(df)}
        self._idf = np.empty(max(1024, 2 * len(df)))
        self._idf[: len(df)] = self.ref_len - np.log(np.maximum(1.0, np.fromiter(df.values(), float, len(df))))
        self._cache: dict[str, tuple[bytes, tuple[int, ...], int]] = {}
        self._cache_size = cache_size
        if precompute:  # encode the corpus references now, so that scoring them later only looks them up
            for refs in corpus:
                for ref in refs:
                    self._encode_ref(ref)

    def _encode(self, words: Sequence[str], register: bool) -> tuple[list[int], list[int], list[int]]:
        """(n-gram ids, term frequencies, number of distinct n-grams of each order) of a caption, n-grams ordered
        by order. With ``register``, n-grams without an id get one (df 0, so idf log N); otherwise their id is -1."""
        ids: list[int] = []
        tfs: list[int] = []
        sizes: list[int] = []
        get = self._ids.get
        for tf in _per_order_tf(words, self.n):
            sizes.append(len(tf))
            ids += map(get, tf, repeat(-1, len(tf)))
            tfs += tf.values()
        if register and -1 in ids:
            grams = [g for tf in _per_order_tf(words, self.n) for g in tf]
            for pos, i in enumerate(ids):
                if i == -1:
                    i = ids[pos] = self._ids[grams[pos]] = len(self._ids)
                    if i >= len(self._idf):
                        self._idf = np.concatenate([self._idf, np.empty(len(self._idf))])
                    self._idf[i] = self.ref_len
        return ids, tfs, sizes

    def _encode_ref(self, ref: str | Sequence[str]) -> tuple[bytes, tuple[int, ...], int]:
        """Cached (packed int64 ``id << 20 | tf`` per n-gram, n-grams per order, number of bigrams) of a reference."""
        key = ref if isinstance(ref, str) else " ".join(ref)
        hit = self._cache.get(key)
        if hit is None:
            words = key.split()
            ids, tfs, sizes = self._encode(words, register=True)
            packed = array("q", [(i << 20) | min(t, (1 << 20) - 1) for i, t in zip(ids, tfs)])
            hit = (packed.tobytes(), tuple(sizes), max(len(words) - 1, 0))
            if len(self._cache) >= self._cache_size:
                self._cache.clear()  # crude but bounded; the references of a training set fit the default size
            self._cache[key] = hit
        return hit

    def clear_cache(self) -> None:
        """Forget the encoded references (they are encoded again when next scored against)."""
        self._cache.clear()

    def score(
        self,
        candidates: Sequence[str | Sequence[str]],
        references: Sequence[Sequence[str | Sequence[str]]],
    ) -> tuple[float, np.ndarray]:
        """(mean, per-image scores) of one candidate per image against that image's references."""
        if len(candidates) != len(references):
            raise ValueError(f"{len(candidates)} candidates for {len(references)} reference sets")
        b, n = len(candidates), self.n
        if b == 0:
            return 0.0, np.zeros(0)
        num_refs = np.array([len(refs) for refs in references])
        if num_refs.min() == 0:
            raise ValueError("every image needs at least one reference")
        m = int(num_refs.max())
        orders = np.arange(n)

        # references: one row per (image, reference, n-gram)
        blobs, r_sizes, r_cells = [], [], []
        ref_len = np.zeros((b, m))
        for i, refs in enumerate(references):
            for j, ref in enumerate(refs):
                blob, sizes, length = self._encode_ref(ref)
                blobs.append(blob)
                r_sizes += sizes
                r_cells.append(i * m + j)
                ref_len[i, j] = length
        packed = np.frombuffer(b"".join(blobs), np.int64)
        rid, rw = packed >> 20, (packed & ((1 << 20) - 1)).astype(float)
        r_sizes_arr = np.array(r_sizes, np.int64).reshape(-1, n)
        rcell = np.repeat(np.array(r_cells, np.int64), r_sizes_arr.sum(axis=1))
        rorder = np.repeat(np.tile(orders, len(r_cells)), r_sizes_arr.ravel())
        rw *= self._idf[rid]
        ref_norm = np.sqrt(np.bincount(rcell * n + rorder, rw * rw, b * m * n)).reshape(b, m, n)

        # candidates: one row per (image, n-gram); encoded after the references so that they find their ids
        c_ids: list = []
        c_tf: list[int] = []
        c_sizes: list[int] = []
        cand_len = np.zeros(b)
        for i, cand in enumerate(candidates):
            words = _words(cand)
            ids, tfs, sizes = self._encode(words, register=False)
            c_ids += ids
            c_tf += tfs
            c_sizes += sizes
            cand_len[i] = max(len(words) - 1, 0)
        cid = np.array(c_ids, np.int64)
        c_sizes_arr = np.array(c_sizes, np.int64).reshape(b, n)
        cimg = np.repeat(np.arange(b), c_sizes_arr.sum(axis=1))
        corder = np.repeat(np.tile(orders, b), c_sizes_arr.ravel())
        cw = np.array(c_tf, float) * np.where(cid >= 0, self._idf[np.maximum(cid, 0)], self.ref_len)
        cand_norm = np.sqrt(np.bincount(cimg * n + corder, cw * cw, b * n)).reshape(b, n)

        # match each candidate n-gram with the same n-gram in every reference of its image
        rkey = ((rcell // m) << 40) | rid
        by_key = np.argsort(rkey, kind="stable")
        rkey = rkey[by_key]
        ckey = (cimg << 40) | np.maximum(cid, 0)
        lo = np.searchsorted(rkey, ckey, "left")
        counts = np.where(cid >= 0, np.searchsorted(rkey, ckey, "right") - lo, 0)
        total = int(counts.sum())
        sims = np.zeros(b * n * m)
        if total:
            cand_row = np.repeat(np.arange(len(cid)), counts)
            ref_row = by_key[np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)]
            h, r = cw[cand_row], rw[ref_row]
            contrib = np.minimum(h, r) * r  # clipping: min(candidate, reference) * reference
            slot = (cimg[cand_row] * n + corder[cand_row]) * m + rcell[ref_row] % m
            sims = np.bincount(slot, contrib, b * n * m)
        sims = sims.reshape(b, n, m)
        denom = cand_norm[:, :, None] * ref_norm.transpose(0, 2, 1)
        # pycocoevalcap divides only when both norms are non-zero (the numerator is 0 otherwise anyway)
        sims = np.divide(sims, denom, out=sims, where=denom != 0)
        delta = cand_len[:, None] - ref_len
        sims *= np.e ** (-(delta**2) / (2 * self.sigma**2))[:, None, :]
        valid = np.arange(m)[None, :] < num_refs[:, None]
        per_image = (sims * valid[:, None, :]).sum(axis=2).mean(axis=1) / num_refs * 10.0
        return float(np.mean(per_image)), per_image


# ---------------------------------------------------------------------------------------------------------------
# METEOR (only through pycocoevalcap's wrapper of the METEOR 1.5 jar)
# ---------------------------------------------------------------------------------------------------------------


def meteor_available() -> bool:
    """Whether METEOR can be computed here: ``java`` on PATH and pycocoevalcap installed."""
    return shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None


def _meteor(gts: dict[Any, list[str]], res: dict[Any, list[str]], timeout: float) -> float | None:
    """pycocoevalcap's METEOR of tokenised captions, or None (with a warning) when it cannot be computed."""
    if not meteor_available():
        warnings.warn("METEOR left out: it needs java and pycocoevalcap", RuntimeWarning, stacklevel=3)
        return None
    try:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
    except Exception as exc:  # any failure to start the jar means "no METEOR"
        warnings.warn(f"METEOR left out: could not start it ({exc!r})", RuntimeWarning, stacklevel=3)
        return None
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["score"] = float(scorer.compute_score(gts, res)[0])
        except Exception as exc:  # reported by the caller's thread
            result["error"] = exc

    # the wrapper blocks on the jar's stdout: a thread lets a hung jar be killed instead of hanging the caller
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    timed_out = worker.is_alive()
    if timed_out:
        scorer.meteor_p.kill()
        worker.join(5)
    _close_meteor(scorer)
    if timed_out:
        warnings.warn(f"METEOR left out: no answer from the jar within {timeout:.0f} s", RuntimeWarning, stacklevel=3)
        return None
    if "error" in result:
        warnings.warn(f"METEOR left out: {result['error']!r}", RuntimeWarning, stacklevel=3)
        return None
    score = result["score"]
    return score if math.isfinite(score) else None


def _close_meteor(scorer: Any) -> None:
    """Stop the jar now. The wrapper's ``__del__`` would do it at garbage collection, but it takes the wrapper's
    lock, which ``compute_score`` leaves held when it fails: release it so that ``__del__`` cannot hang."""
    if scorer.lock.locked():
        scorer.lock.release()
    try:
        scorer.meteor_p.stdin.close()
        scorer.meteor_p.kill()
        scorer.meteor_p.wait(10)
    except Exception:  # already gone
        pass


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


def score_captions(
    references: Mapping[Any, Sequence[str]],
    candidates: Mapping[Any, str],
    *,
    meteor: bool = True,
    meteor_timeout: float = 600.0,
) -> dict[str, float]:
    """COCO caption metrics of raw (untokenised) ``candidates`` (one caption per image id) against raw
    ``references`` (one or more captions per image id), as pycocoevalcap 1.2 reports them.

    Returns ``bleu1``..``bleu4``, ``rouge_l``, ``cider_d`` and, when ``meteor`` is asked for and java and
    pycocoevalcap are installed, ``meteor``. Both mappings must have the same image ids.
    """
    if set(references) != set(candidates):
        missing, extra = set(references) - set(candidates), set(candidates) - set(references)
        raise ValueError(f"image ids differ: {len(missing)} without a candidate, {len(extra)} without references")
    if not references:
        raise ValueError("no images to score")
    ids = list(references)
    for i in ids:
        # a str is a Sequence[str] too: {id: "a caption"} scored each character as a reference (BLEU-4 ~1e-12
        # for a candidate equal to it), silently
        refs_i, cand_i = references[i], candidates[i]
        if isinstance(refs_i, str) or not all(isinstance(r, str) for r in refs_i):
            raise TypeError(f"references[{i!r}] must be a list of caption strings, got {refs_i!r:.80}")
        if not isinstance(cand_i, str):
            raise TypeError(f"candidates[{i!r}] must be one caption string, got {cand_i!r:.80}")
    if any(len(references[i]) == 0 for i in ids):
        raise ValueError("every image needs at least one reference")
    # tokenised in two runs, references then candidates, like COCOEvalCap.evaluate
    flat_refs = tokenize_captions([c for i in ids for c in references[i]])
    refs, start = [], 0
    for i in ids:
        refs.append(flat_refs[start : start + len(references[i])])
        start += len(references[i])
    cands = tokenize_captions([candidates[i] for i in ids])

    b = bleu(refs, cands, 4)
    out = {f"bleu{k + 1}": float(v) for k, v in enumerate(b)}
    out["rouge_l"] = rouge_l(refs, cands)[0]
    out["cider_d"] = CiderD(refs).score(cands, refs)[0]
    if meteor:
        value = _meteor({k: r for k, r in enumerate(refs)}, {k: [c] for k, c in enumerate(cands)}, meteor_timeout)
        if value is not None:
            out["meteor"] = value
    return out
