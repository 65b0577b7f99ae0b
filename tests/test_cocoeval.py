"""Tests of captioning.cocoeval, the pycocoevalcap-compatible caption metrics that need no Java.

tests/fixtures/coco_metrics_fixture.json holds 120 generated COCO-like images and what pycocoevalcap 1.2 (with
Java) makes of them: its PTBTokenizer output and its BLEU-1..4, METEOR, ROUGE-L and CIDEr. Everything but METEOR
is checked against it without Java; the tests marked ``java`` recompute it with pycocoevalcap when it and
``java`` are installed. The expected tokens of the tricky strings below were produced by CoreNLP 3.4.1's
PTBTokenizer (``-preserveLines -lowerCase``), the jar that pycocoevalcap ships.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import random
import subprocess
import sys
import threading
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from captioning import cocoeval
from captioning.cocoeval import CiderD, meteor_available, ptb_tokenize, score_captions, tokenize_captions

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE = json.loads((FIXTURES / "coco_metrics_fixture.json").read_text(encoding="utf-8"))
OURS_TO_PYCOCO = {
    "bleu1": "Bleu_1",
    "bleu2": "Bleu_2",
    "bleu3": "Bleu_3",
    "bleu4": "Bleu_4",
    "rouge_l": "ROUGE_L",
    "cider_d": "CIDEr",
    "meteor": "METEOR",
}

# (caption, PTB tokens as CoreNLP 3.4.1 prints them with -lowerCase), checked with the jar alone and in one file
TRICKY = [
    ("A man (in a hat) is riding a horse.", ["a", "man", "-lrb-", "in", "a", "hat", "-rrb-", "is", "riding", "a", "horse", "."]),  # noqa: E501
    ("It's the dogs' bowl, don't you think?", ["it", "'s", "the", "dogs", "'", "bowl", ",", "do", "n't", "you", "think", "?"]),  # noqa: E501
    ("The cat's toy isn't here; they're gone!", ["the", "cat", "'s", "toy", "is", "n't", "here", ";", "they", "'re", "gone", "!"]),  # noqa: E501
    ("A 10-year-old boy in a t-shirt holds 3.5 kg of apples.", ["a", "10-year-old", "boy", "in", "a", "t-shirt", "holds", "3.5", "kg", "of", "apples", "."]),  # noqa: E501
    ('A sign that says "STOP" near the U.S. border...', ["a", "sign", "that", "says", "``", "stop", "''", "near", "the", "u.s.", "border", "..."]),  # noqa: E501
    ("Two people -- one with an umbrella --- walk by.", ["two", "people", "--", "one", "with", "an", "umbrella", "--", "walk", "by", "."]),  # noqa: E501
    ("I can't believe it's not butter", ["i", "ca", "n't", "believe", "it", "'s", "not", "butter"]),
    ("They cannot go; we're gonna wait, I'm sure.", ["they", "can", "not", "go", ";", "we", "'re", "gon", "na", "wait", ",", "i", "'m", "sure", "."]),  # noqa: E501
    ("Mr. Smith's car is parked at 10:30 a.m. today", ["mr.", "smith", "'s", "car", "is", "parked", "at", "10:30", "a.m.", "today"]),  # noqa: E501
    ("A plate with ½ a sandwich & fries (yum)", ["a", "plate", "with", "1/2", "a", "sandwich", "&", "fries", "-lrb-", "yum", "-rrb-"]),  # noqa: E501
    ("“Curly quotes” and ‘single’ ones — with an em dash…", ["``", "curly", "quotes", "''", "and", "`", "single", "'", "ones", "--", "with", "an", "em", "dash", "..."]),  # noqa: E501
    ("the kids' bikes and James' car", ["the", "kids", "'", "bikes", "and", "james", "'", "car"]),
    ("A café's naïve décor", ["a", "café", "'s", "naïve", "décor"]),
    ("A photo from www.flickr.com, e.g. this one", ["a", "photo", "from", "www.flickr.com", ",", "e.g.", "this", "one"]),  # noqa: E501
    ("rock 'n' roll in the '90s", ["rock", "'n'", "roll", "in", "the", "'90s"]),
    ("A [red] {blue} <green> car", ["a", "-lsb-", "red", "-rsb-", "-lcb-", "blue", "-rcb-", "<green>", "car"]),
    ("O'Neil's dog at 5 o'clock", ["o'neil", "'s", "dog", "at", "5", "o'clock"]),
    ("Fruits, vegetables, etc. on a table etc.", ["fruits", ",", "vegetables", ",", "etc.", "on", "a", "table", "etc.", "."]),  # noqa: E501
    ("  extra   spaces\tand tabs  ", ["extra", "spaces", "and", "tabs"]),
    ("", []),
    ("...!?", ["...", "!?"]),
    ("a 2x4 board, 1/2 inch pipe and 5 1/2 feet", ["a", "2x4", "board", ",", "1/2", "inch", "pipe", "and", "5\u00a01/2", "feet"]),  # noqa: E501
    ("Don't DON'T don’t WON'T", ["do", "n't", "do", "n't", "do", "n't", "wo", "n't"]),
    ("y'all ma'am", ["y'", "all", "ma'am"]),
    ("The No. 5 bus - a double-decker - at St. Paul's", ["the", "no.", "5", "bus", "-", "a", "double-decker", "-", "at", "st.", "paul", "'s"]),  # noqa: E501
    ("$5 hot dogs; 50% off!!", ["$", "5", "hot", "dogs", ";", "50", "%", "off", "!!"]),
    ("An A-frame house, ca. 1950", ["an", "a-frame", "house", ",", "ca.", "1950"]),
]  # fmt: skip

REFS = {
    "a": ["A man riding a horse on the beach.", "A person rides a horse near the ocean."],
    "b": ["Two dogs play with a ball in the grass.", "Dogs playing in a field."],
}
# score_captions edge cases and what pycocoevalcap 1.2 (its own tokenizer, Java) returns for them
EDGE_CASES = {
    "empty candidate": (
        REFS,
        {"a": "", "b": "Two dogs playing with a ball."},
        {"bleu1": 0.3114032238107967, "bleu2": 0.2785275107367669, "bleu3": 0.18210971002480614,
         "bleu4": 2.813845769460695e-05, "rouge_l": 0.3388888888888889, "cider_d": 1.152266206171135,
         "meteor": 0.21010386165360692},
    ),
    "punctuation only": (
        REFS,
        {"a": "...!", "b": "Two dogs playing with a ball."},
        {"bleu1": 0.3114032238107967, "bleu2": 0.2785275107367669, "bleu3": 0.18210971002480614,
         "bleu4": 2.813845769460695e-05, "rouge_l": 0.3388888888888889, "cider_d": 1.152266206171135,
         "meteor": 0.21010386165360692},
    ),
    "one image": (
        {"a": REFS["a"]},
        {"a": "A man riding a horse."},
        {"bleu1": 0.5488116358745021, "bleu2": 0.5488116358607817, "bleu3": 0.5488116358409636,
         "bleu4": 0.5488116358081874, "rouge_l": 0.7384987893462469, "cider_d": 0.0,
         "meteor": 0.40763634227719403},
    ),
    "all empty": (
        REFS,
        {"a": "", "b": ""},
        {"bleu1": 0.0, "bleu2": 0.0, "bleu3": 0.0, "bleu4": 0.0, "rouge_l": 0.0, "cider_d": 0.0, "meteor": 0.0},
    ),
}  # fmt: skip


def _fixture_inputs() -> tuple[dict[str, list[str]], dict[str, str]]:
    images = FIXTURE["images"]
    return {im["id"]: im["references"] for im in images}, {im["id"]: im["candidate"] for im in images}


def _java_and_pycocoevalcap() -> None:
    if not meteor_available():
        pytest.skip("needs java and pycocoevalcap (pip install pycocoevalcap==1.2)")


# --- stored pycocoevalcap values (no Java) ---------------------------------------------------------------------


def test_scores_equal_stored_pycocoevalcap_values():
    refs, cands = _fixture_inputs()
    ours = score_captions(refs, cands, meteor=False)
    assert set(ours) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider_d"}
    for key, value in ours.items():
        assert abs(value - FIXTURE["scores"][OURS_TO_PYCOCO[key]]) <= 1e-6, key


def test_per_image_rouge_and_cider_equal_pycocoevalcap():
    refs = FIXTURE["ptb_tokenized"]["references"]
    cands = FIXTURE["ptb_tokenized"]["candidates"]
    _, rouge = cocoeval.rouge_l(refs, cands)
    _, cider = CiderD(refs).score(cands, refs)
    np.testing.assert_allclose(rouge, FIXTURE["per_image"]["ROUGE_L"], rtol=0, atol=1e-9)
    np.testing.assert_allclose(cider, FIXTURE["per_image"]["CIDEr"], rtol=0, atol=1e-9)


def test_tokenizer_reproduces_stored_ptbtokenizer_output():
    images = FIXTURE["images"]
    flat = tokenize_captions([c for im in images for c in im["references"]])
    expected = [c for refs in FIXTURE["ptb_tokenized"]["references"] for c in refs]
    assert flat == expected
    assert tokenize_captions([im["candidate"] for im in images]) == FIXTURE["ptb_tokenized"]["candidates"]


def test_fixture_is_varied():
    images = FIXTURE["images"]
    assert len(images) >= 100 and all(len(im["references"]) == 5 for im in images)
    lengths = [len(c.split()) for im in images for c in im["references"]]
    assert min(lengths) >= 5 and max(lengths) <= 20
    text = " ".join(c for im in images for c in im["references"])
    for feature in ["n't", "'s", "-", ",", ".", "(", '"', "3.5", "U.S."]:
        assert feature in text, feature
    assert any(im["candidate"] in im["references"] for im in images)


# --- tokenizer ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("caption", "tokens"), TRICKY, ids=[c[:30] or "empty" for c, _ in TRICKY])
def test_ptb_tokenize_tricky_captions(caption, tokens):
    assert ptb_tokenize(caption) == tokens


def test_tokenize_captions_drops_punctuation_as_pycocoevalcap():
    # lowercased "-lrb-"/"-rrb-" are not in pycocoevalcap's list, so they stay; neither does "!?"
    out = tokenize_captions(["A man (left) waves.", "Don't go -- it's late!", "!?", "..."])
    assert out == ["a man -lrb- left -rrb- waves", "do n't go it 's late", "!?", ""]


def test_tokenize_captions_looks_across_lines_like_the_java_lexer():
    # "I." before a line starting with "The" is split as "I" + "."; at the end of the text it stays "i."
    assert tokenize_captions(["A photo of the letter I.", "The end"]) == ["a photo of the letter i", "the end"]
    assert tokenize_captions(["A photo of the letter I."]) == ["a photo of the letter i."]


def test_line_breaks_inside_captions_do_not_shift_captions():
    assert tokenize_captions(["a\rb\nc", "d\u2028e", "f"]) == ["a b c", "d e", "f"]


# --- CIDEr-D --------------------------------------------------------------------------------------------------


def _cider_reference(cands, refs, corpus, n=4, sigma=6.0):
    """Straight port of pycocoevalcap's cider_scorer.py, with the document frequencies taken from ``corpus``."""

    def counts(s):
        w = s.split()
        return Counter(tuple(w[i : i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))

    df = Counter(g for rs in corpus for g in {g for r in rs for g in counts(r)})
    ref_len = np.log(float(len(corpus)))

    def vec(c):
        v, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for g, tf in c.items():
            k = len(g) - 1
            v[k][g] = tf * (ref_len - np.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            length += tf if k == 1 else 0
        return v, [math.sqrt(x) for x in norm], length

    scores = []
    for cand, rs in zip(cands, refs):
        vh, nh, lh = vec(counts(cand))
        total = np.zeros(n)
        for r in rs:
            vr, nr, lr = vec(counts(r))
            for k in range(n):
                val = sum(min(w, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, w in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.e ** (-((lh - lr) ** 2) / (2 * sigma**2))
        scores.append(total.mean() / len(rs) * 10.0)
    return np.array(scores)


def test_cider_d_class_equals_score_captions():
    refs, cands = _fixture_inputs()
    expected = score_captions(refs, cands, meteor=False)["cider_d"]
    tok_refs = FIXTURE["ptb_tokenized"]["references"]
    tok_cands = FIXTURE["ptb_tokenized"]["candidates"]
    for precompute in (True, False):
        scorer = CiderD(tok_refs, precompute=precompute)
        assert abs(scorer.score(tok_cands, tok_refs)[0] - expected) <= 1e-9
        assert abs(scorer.score(tok_cands, tok_refs)[0] - expected) <= 1e-9  # again, from the cache
    as_lists = [[r.split() for r in rs] for rs in tok_refs]
    assert abs(CiderD(as_lists).score([c.split() for c in tok_cands], as_lists)[0] - expected) <= 1e-9


def test_cider_d_matches_a_direct_port_with_a_separate_corpus():
    rng = random.Random(0)
    vocab = "a an the man dog cat red big small on in with runs sits near table ball grass".split()

    def cap(lo=1, hi=12):
        return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

    corpus = [[cap() for _ in range(rng.randint(1, 5))] for _ in range(40)]
    # evaluated references partly outside the corpus, 1-6 per image; candidates include empty and 1-word ones
    refs = [rng.choice(corpus) if rng.random() < 0.5 else [cap() for _ in range(rng.randint(1, 6))] for _ in range(60)]
    cands = [cap(0, 12) for _ in range(60)]
    scorer = CiderD(corpus)
    mean, per_image = scorer.score(cands, refs)
    expected = _cider_reference(cands, refs, corpus)
    np.testing.assert_allclose(per_image, expected, rtol=0, atol=1e-9)
    assert abs(mean - expected.mean()) <= 1e-9
    scorer.clear_cache()
    np.testing.assert_allclose(scorer.score(cands, refs)[1], expected, rtol=0, atol=1e-9)


def test_cider_d_candidate_identical_to_references_scores_high():
    refs = [
        ["a man riding a brown horse on the beach"] * 5,
        ["two dogs play with a red ball"] * 5,
        ["a cat on a sofa"] * 5,
    ]
    scorer = CiderD(refs)
    _, per_image = scorer.score([r[0] for r in refs], refs)
    np.testing.assert_allclose(per_image, 10.0, rtol=1e-12)  # cosine 1 for every n and reference, times 10
    varied = FIXTURE["ptb_tokenized"]["references"]
    scorer = CiderD(varied)
    copies = scorer.score([r[0] for r in varied], varied)[0]
    swapped = scorer.score([r[0] for r in varied[1:] + varied[:1]], varied)[0]
    assert copies > 2.0 > 0.2 > swapped


def test_cider_d_empty_candidate_scores_zero():
    refs = [["a man riding a horse", "a person on a horse"], ["two dogs", "dogs playing"]]
    mean, per_image = CiderD(refs).score(["", []], refs)
    assert mean == 0.0 and per_image.tolist() == [0.0, 0.0]
    _, per_image = CiderD(refs).score(["", "two dogs"], refs)
    assert per_image[0] == 0.0 and per_image[1] > 0
    assert CiderD(refs).score([], [])[0] == 0.0


def test_cider_d_rejects_bad_input():
    with pytest.raises(ValueError):
        CiderD([])
    with pytest.raises(ValueError):
        CiderD([["a b"]]).score(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        CiderD([["a b"]]).score(["a"], [[]])


# --- score_captions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(EDGE_CASES))
def test_score_captions_edge_cases(case):
    refs, cands, expected = EDGE_CASES[case]
    ours = score_captions(refs, cands, meteor=False)
    assert set(ours) == set(expected) - {"meteor"}
    for key, value in ours.items():
        assert math.isfinite(value)
        assert abs(value - expected[key]) <= 1e-9, key


def test_score_captions_checks_image_ids():
    # each with its own message: a bare ValueError also matched what the scorers raise further in (CiderD's
    # "needs at least one set of references", numpy's "min() arg is an empty sequence") without these checks
    with pytest.raises(ValueError, match="image ids differ: 1 without a candidate, 1 without references"):
        score_captions({"a": ["x y"]}, {"b": "x y"}, meteor=False)
    with pytest.raises(ValueError, match="no images to score"):
        score_captions({}, {}, meteor=False)
    with pytest.raises(ValueError, match="every image needs at least one reference"):
        score_captions({"a": []}, {"a": "x"}, meteor=False)


def test_score_captions_refuses_a_bare_string_of_references_and_a_list_as_candidate():
    """{id: "a caption"} as references scored each character as a reference (a candidate equal to the caption got
    BLEU-1 0.2 and BLEU-4 ~1e-12); a list as the candidate failed inside the tokeniser on 'list'.replace."""
    with pytest.raises(TypeError, match=r"references\[1\] must be a list of caption strings, got 'a man riding"):
        score_captions({1: "a man riding a horse"}, {1: "a man riding a horse"}, meteor=False)
    with pytest.raises(TypeError, match=r"candidates\['x'\] must be one caption string, got \['a man'\]"):
        score_captions({"x": ["a man"]}, {"x": ["a man"]}, meteor=False)
    with pytest.raises(TypeError, match=r"references\[1\] must be a list of caption strings"):
        score_captions({1: [["a", "man"]]}, {1: "a man"}, meteor=False)  # tokens, not a caption
    assert score_captions({1: ("a man riding a horse",)}, {1: "a man riding a horse"}, meteor=False)["bleu4"] > 0.99


def test_meteor_is_left_out_with_a_warning_without_java(monkeypatch):
    monkeypatch.setattr(cocoeval.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="METEOR"):
        out = score_captions(REFS, {"a": "a man on a horse", "b": "two dogs"})
    assert "meteor" not in out and "cider_d" in out


def test_meteor_not_asked_for_gives_no_warning(recwarn):
    out = score_captions(REFS, {"a": "a man on a horse", "b": "two dogs"}, meteor=False)
    assert "meteor" not in out
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


class _FakeJar:
    """Stands in for the METEOR subprocess: ``kill`` wakes a blocked ``compute_score``."""

    def __init__(self):
        self.killed = threading.Event()
        self.stdin = io.BytesIO()

    def kill(self):
        self.killed.set()

    def wait(self, timeout=None):
        return 0


def _fake_meteor(monkeypatch, compute_score):
    """Make score_captions find a pycocoevalcap Meteor whose compute_score is ``compute_score``."""

    class Meteor:
        def __init__(self):
            self.lock = threading.Lock()
            self.meteor_p = _FakeJar()

        def compute_score(self, gts, res):
            self.lock.acquire()  # like pycocoevalcap: never released when it fails
            return compute_score(self, gts, res)

    module = types.ModuleType("pycocoevalcap.meteor.meteor")
    module.Meteor = Meteor
    monkeypatch.setitem(sys.modules, "pycocoevalcap.meteor.meteor", module)
    monkeypatch.setattr(cocoeval, "meteor_available", lambda: True)
    return Meteor


def test_meteor_failures_leave_the_key_out_with_a_warning(monkeypatch):
    def broken(self, gts, res):
        raise ValueError("could not convert string to float: ''")

    _fake_meteor(monkeypatch, broken)
    with pytest.warns(RuntimeWarning, match="METEOR left out"):
        out = score_captions(REFS, {"a": "a man on a horse", "b": "two dogs"})
    assert "meteor" not in out and "bleu4" in out

    def hung(self, gts, res):
        self.meteor_p.killed.wait(30)
        raise ValueError("jar killed")

    _fake_meteor(monkeypatch, hung)
    with pytest.warns(RuntimeWarning, match="no answer"):
        out = score_captions(REFS, {"a": "a man on a horse", "b": "two dogs"}, meteor_timeout=0.5)
    assert "meteor" not in out

    given = []

    def scored(self, gts, res):
        given.append((gts, res))
        return 0.25, [0.25] * len(gts)

    _fake_meteor(monkeypatch, scored)
    assert score_captions(REFS, {"b": "Two dogs.", "a": "A man on a horse"})["meteor"] == 0.25
    # the jar gets each image's tokenised references and its candidate under one key, candidates as candidates
    ((gts, res),) = given
    by_candidate = {res[k][0]: gts[k] for k in res}
    assert set(gts) == set(res) and all(len(r) == 1 for r in res.values())
    assert by_candidate == {
        "a man on a horse": ["a man riding a horse on the beach", "a person rides a horse near the ocean"],
        "two dogs": ["two dogs play with a ball in the grass", "dogs playing in a field"],
    }


def test_library_does_not_import_pycocoevalcap():
    code = (
        "import sys, captioning.cocoeval as c; "
        "c.score_captions({'a': ['a man on a horse']}, {'a': 'a man'}, meteor=False); "
        "print('pycocoevalcap' in sys.modules)"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- against pycocoevalcap itself (Java) ----------------------------------------------------------------------


@pytest.mark.java
def test_fixture_recomputed_with_pycocoevalcap_equals_stored_and_ours():
    _java_and_pycocoevalcap()
    spec = importlib.util.spec_from_file_location("make_fixture", FIXTURES / "make_coco_metrics_fixture.py")
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    assert maker.generate() == FIXTURE["images"]  # the generator still makes the stored captions
    fresh = maker.pycocoevalcap_scores(FIXTURE["images"])
    assert fresh["ptb_tokenized"] == FIXTURE["ptb_tokenized"]
    refs, cands = _fixture_inputs()
    ours = score_captions(refs, cands, meteor=True)
    assert set(ours) == set(OURS_TO_PYCOCO)
    for key, name in OURS_TO_PYCOCO.items():
        assert abs(fresh["scores"][name] - FIXTURE["scores"][name]) <= 1e-6, name
        assert abs(ours[key] - fresh["scores"][name]) <= 1e-6, name


@pytest.mark.java
def test_tricky_captions_against_the_java_tokenizer(tmp_path):
    _java_and_pycocoevalcap()
    import pycocoevalcap.tokenizer.ptbtokenizer as ptb

    jar = Path(ptb.__file__).with_name(ptb.STANFORD_CORENLP_3_4_1_JAR)
    text = tmp_path / "captions.txt"
    text.write_text("\n".join(c for c, _ in TRICKY), encoding="utf-8")
    cmd = ["java", "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase", str(text)]
    lines = subprocess.run(cmd, capture_output=True, check=True).stdout.decode("utf-8").split("\n")
    for (caption, tokens), line in zip(TRICKY, lines):
        assert [t for t in line.rstrip().split(" ") if t] == tokens, caption


@pytest.mark.java
def test_edge_cases_against_pycocoevalcap():
    _java_and_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    for case, (refs, cands, expected) in EDGE_CASES.items():
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        res = tokenizer.tokenize({k: [{"caption": cands[k]}] for k in refs})
        theirs = dict(zip(["bleu1", "bleu2", "bleu3", "bleu4"], Bleu(4).compute_score(gts, res, verbose=0)[0]))
        theirs["rouge_l"] = Rouge().compute_score(gts, res)[0]
        theirs["cider_d"] = Cider().compute_score(gts, res)[0]
        for key, value in theirs.items():
            assert abs(value - expected[key]) <= 1e-9, (case, key)
    refs, cands, expected = EDGE_CASES["empty candidate"]
    assert abs(score_captions(refs, cands)["meteor"] - expected["meteor"]) <= 1e-9
