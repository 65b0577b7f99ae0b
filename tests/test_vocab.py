import json
from pathlib import Path

from captioning.vocab import SPECIALS, Vocabulary, detokenize, tokenize


def test_tokenize_lowercases_and_drops_punctuation_but_keeps_commas():
    assert tokenize("A Red circle, a blue square: and a DOG!") == [
        "a", "red", "circle", ",", "a", "blue", "square", "and", "a", "dog",
    ]  # fmt: skip


def test_tokenize_strips_quotes_around_words_and_never_makes_a_special_token():
    assert tokenize("A sign that says 'STOP', a man's hat") == [
        "a", "sign", "that", "says", "stop", ",", "a", "man", "'s", "hat",
    ]  # fmt: skip
    assert tokenize('a "stop" sign') == tokenize("a 'stop' sign") == ["a", "stop", "sign"]
    assert tokenize("a man <b>runs</b> <end> home ''") == ["a", "man", "runs", "home"]
    assert not set(tokenize("<pad> <start> <end> <unk> (<unk>)")) & set(SPECIALS)


def test_tokenize_keeps_the_words_the_ptb_tokenizer_keeps():
    """Hyphenated words, decimals, times, abbreviations and "&" stay one token, as the references'
    PTB tokenisation has them: a caption learnt word for word must score as its reference."""
    assert tokenize("A man in a T-shirt holds 3.5 kg at 10:30 in the U.S. & waves.") == [
        "a", "man", "in", "a", "t-shirt", "holds", "3.5", "kg", "at", "10:30", "in", "the", "u.s.", "&", "waves",
    ]  # fmt: skip
    # a curly apostrophe is a possessive too, and brackets are not words
    assert tokenize("the man’s dog (big) doesn't bark") == ["the", "man", "'s", "dog", "big", "does", "n't", "bark"]


def _fixture_captions() -> list[tuple[str, str]]:
    """(raw caption, its tokens by the Java PTB tokenizer as pycocoevalcap runs it) from the metrics fixture."""
    fixture = json.loads((Path(__file__).parent / "fixtures" / "coco_metrics_fixture.json").read_text())
    raws = [r for img in fixture["images"] for r in img["references"]] + [img["candidate"] for img in fixture["images"]]
    ptb = fixture["ptb_tokenized"]
    java = [r for refs in ptb["references"] for r in refs] + list(ptb["candidates"])
    assert len(raws) == len(java) > 100
    return list(zip(raws, java))


def test_tokenize_equals_the_java_ptb_tokenizer_on_the_metrics_fixture():
    """Every fixture caption: ``tokenize`` (less commas) == what pycocoevalcap scored (less bracket tokens)."""
    brackets = {"-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"}
    for raw, java in _fixture_captions():
        assert [t for t in tokenize(raw) if t != ","] == [t for t in java.split() if t not in brackets], raw


def test_a_captions_last_word_is_tokenized_as_scoring_reads_it():
    """Scoring lexes captions one per line; tokenize lexed a caption up to the end of its text, where the lexer reads
    some words otherwise ("they're" -> "they" "re"): a model saying exactly its training
    target scored below 1 (BLEU-4 0.90 on a one-caption example)."""
    from captioning.cocoeval import tokenize_captions

    for caption in ["people where they're", "where we've", "and you'll", "sign that says no.", "see fig."]:
        assert tokenize(caption) == tokenize_captions([caption, "x"])[0].split(), caption


def test_detokenize_writes_clitics_and_commas_onto_words_and_tokenizes_back():
    tokens = ["a", "man", "'s", "t-shirt", ",", "he", "does", "n't", "run"]
    assert detokenize(tokens) == "a man's t-shirt, he doesn't run"
    assert detokenize([",", "a"]) == ", a" and detokenize([]) == ""
    for raw, _ in _fixture_captions():
        assert tokenize(detokenize(tokenize(raw))) == tokenize(raw), raw


def test_detokenize_writes_the_halves_of_a_word_the_tokenizer_splits_as_that_word():
    """ "'tis" is "'t" + "is" and "y'all" "y'" + "all": written apart, "'t is" read back as "t" "is", so the display
    text scored other tokens than the caption's; "gonna" ("gon" + "na") was shown as "gon na"."""
    for raw, shown in [
        ("'tis a dog", "'tis a dog"),
        ("'twas night", "'twas night"),
        ("y'all know", "y'all know"),
        ("y'know what", "y'know what"),
        ("they don't wanna go", "they don't wanna go"),
        ("gonna gimme, lemme", "gonna gimme, lemme"),
        ("j'adore", "j' adore"),  # reads back the same apart: left as the tokens are
        ("can not", "can not"),
        ("gon na's", "gon na's"),  # joined, "gonna's" would read back as "gonna" "'s"
    ]:
        assert detokenize(tokenize(raw)) == shown, raw
        assert tokenize(shown) == tokenize(raw), raw


def test_detokenize_writes_a_word_the_tokenizer_keeps_whole_only_in_capitals_in_capitals():
    """The tokeniser keeps "B&W" or "AT&T" one word but splits "b&w" into "b" "&" "w": written lower case, a
    caption the model learnt word for word scored as other words (BLEU-4 0 against its own reference)."""
    for raw, shown in [
        ("a B&W photo of an AT&T store", "a B&W photo of an AT&T store"),
        ("M&M's and Q&A", "M&M's and Q&A"),
        ("tom & jerry, b & w", "tom & jerry, b & w"),  # already apart: left apart
    ]:
        assert detokenize(tokenize(raw)) == shown, raw
        assert tokenize(shown) == tokenize(raw), raw


def test_detokenize_writes_a_clitic_apart_where_joined_it_would_read_back_as_other_words():
    """After a word that ends in a full stop, a clitic written onto it read back split elsewhere ("mr.n't" as "mr.n"
    "t"), so the display text scored other tokens than the caption's; apart, it reads back as the tokens."""
    for raw, shown in [
        ("mr. n't", "mr. n't"),
        ("st. 'll st. n't", "st.'ll st. n't"),  # "st.'ll" reads back as the two: joined as other clitics are
        ("he does n't", "he doesn't"),
    ]:
        assert detokenize(tokenize(raw)) == shown, raw
        assert tokenize(shown) == tokenize(raw), raw


def test_build_respects_min_freq_and_is_order_independent():
    caps = [["a", "red", "circle"], ["a", "blue", "square"], ["a", "red", "square"]]
    v = Vocabulary.build(caps, min_freq=2)
    assert tuple(v.tokens[:4]) == SPECIALS
    assert set(v.tokens[4:]) == {"a", "red", "square"}
    assert Vocabulary.build(caps[::-1], min_freq=2).tokens == v.tokens


def test_encode_decode_round_trip_with_unknown_and_max_len():
    v = Vocabulary.build([["a", "red", "circle"]])
    ids = v.encode(["a", "green", "circle"])
    assert ids[0] == v.start_id and ids[-1] == v.end_id
    assert v.decode(ids) == ["a", "<unk>", "circle"]
    assert v.decode(v.encode(["a", "red", "circle"], max_len=2)) == ["a", "red"]


def test_vocabulary_survives_a_plain_list():
    v = Vocabulary.build([["x", "y"]])
    assert Vocabulary(list(v.tokens)).index == v.index


def test_encode_refuses_a_str_which_it_read_letter_by_letter():
    vocab = Vocabulary([*SPECIALS, "a", "dog"])
    try:
        vocab.encode("a dog")
    except TypeError as e:
        assert "encode(tokenize(text))" in str(e)
    else:
        raise AssertionError("a str was encoded")
    assert vocab.encode(tokenize("a dog")) == [vocab.start_id, 4, 5, vocab.end_id]
