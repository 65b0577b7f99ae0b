from captioning.vocab import SPECIALS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation_but_keeps_commas():
    assert tokenize("A Red circle, a blue square: and a DOG!") == [
        "a", "red", "circle", ",", "a", "blue", "square", "and", "a", "dog",
    ]  # fmt: skip


def test_tokenize_strips_quotes_around_words_and_never_makes_a_special_token():
    assert tokenize("A sign that says 'STOP', a man's hat") == [
        "a",
        "sign",
        "that",
        "says",
        "stop",
        ",",
        "a",
        "man's",
        "hat",
    ]
    assert tokenize('a "stop" sign') == tokenize("a 'stop' sign") == ["a", "stop", "sign"]
    assert tokenize("a man <b>runs</b> <end> home ''") == ["a", "man", "b", "runs", "b", "end", "home"]


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
