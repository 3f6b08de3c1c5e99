"""Answer metrics and the LAG paper's normalised score (Eq. 9), against hand-computed values."""

from __future__ import annotations

import logging
import math

import pytest

from llama_index_lag.errors import DataError
from llama_index_lag.eval.metrics import (
    contains_match,
    exact_match,
    label_accuracy,
    normalised_score,
    normalize_answer,
    parse_bool,
    token_f1,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Cat!", "cat"),
        ("  a   b  ", "b"),  # article removed, whitespace collapsed
        ("An apple, the pear.", "apple pear"),
        ("theatre anthem", "theatre anthem"),  # articles only as whole words
        ("A-B", "ab"),  # punctuation is deleted, not replaced by a space
        ("Mr. Smith's", "mr smiths"),
        ("don't", "dont"),
        ("U.S.A.", "usa"),
        ("1,873", "1873"),
        ("the", ""),
        ("", ""),
        ("AND Then", "and then"),  # "and" is not an article
        ("Café  au\tlait\n", "café au lait"),  # non-ASCII letters kept, any whitespace collapsed
        ("“quoted”", "“quoted”"),  # only ASCII punctuation is removed (as in the official script)
        ("the the a an", ""),
        ("(the) Drelmouth", "drelmouth"),
    ],
)
def test_normalize_answer_squad_cases(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("Paris", ["paris"]) == 1.0
    assert exact_match("The Paris.", "Paris") == 1.0  # a single gold string is accepted
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert (
        exact_match("the town of Drelmouth", ["Drelmouth", "the town of Drelmouth"]) == 1.0
    )  # max over golds
    assert exact_match("", ["the"]) == 1.0  # both normalise to ""
    with pytest.raises(DataError):
        exact_match("x", [])


def test_token_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], gold [cat, on, mat]: overlap 3, P = 3/4, R = 1
    assert token_f1("The cat sat on the mat.", ["cat on mat"]) == pytest.approx(2 * 0.75 * 1.0 / 1.75)
    # multiset overlap: pred [x, x, y], gold [x, y, y] -> overlap {x: 1, y: 1} = 2, P = R = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    assert token_f1("Paris", ["London"]) == 0.0
    # best over golds: "1873" -> 1.0 beats "born 1873" -> 2/3
    assert token_f1("1873", ["born 1873", "1873"]) == 1.0
    assert token_f1("born 1873", ["1873"]) == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    # empty answers (SQuAD v2 rule): empty vs empty agree, empty vs non-empty do not
    assert token_f1("", ["the"]) == 1.0
    assert token_f1("", ["cat"]) == 0.0
    assert token_f1("cat", [""]) == 0.0


def test_contains_match():
    assert contains_match("He was born in 1873.", ["1873"]) == 1.0
    assert contains_match("18731", ["1873"]) == 0.0  # token boundaries
    assert contains_match("In the town of Drelmouth, I think", ["Drelmouth"]) == 1.0
    assert contains_match("silver owls", ["silver owl"]) == 0.0
    assert contains_match("It is a silver owl.", ["silver owl"]) == 1.0
    assert contains_match("anything", ["the"]) == 0.0  # a gold that normalises to nothing never matches
    assert contains_match("4,200 people", ["4,200"]) == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("True.", True),
        ("false", False),
        ("TRUE", True),
        ("Yes, it is.", True),
        ("No.", False),
        ("Answer: false. It was 1873.", False),
        ("I think that is not true.", False),
        ("That is not false", True),
        ("yes and no", True),  # the first one wins
        ("That isn't true.", False),
        ("It was never false", True),
        ("True or false: the claim. False.", False),  # an echoed prompt is skipped
        ("Yes or no? No.", False),
        ("true or false", None),
        ("Nothing is known; notably untrue", None),  # "no" / "true" inside other words do not count
        ("", None),
        ("maybe", None),
    ],
)
def test_parse_bool(text, expected):
    assert parse_bool(text) is expected


def test_label_accuracy():
    assert label_accuracy("True", ["true"]) == 1.0
    assert label_accuracy("Yes, that's right.", ["true"]) == 1.0
    assert label_accuracy("false", ["true"]) == 0.0
    assert label_accuracy("I don't know", ["false"]) == 0.0
    assert label_accuracy("False.", "false") == 1.0
    with pytest.raises(DataError):
        label_accuracy("true", ["maybe"])


def test_normalised_score_eq9_hand_computed():
    mode = {"a": 0.5, "b": 0.8}
    oracle = {"a": 1.0, "b": 0.5}
    sizes = {"a": 100, "b": 300}
    # 100/400 * 0.5/1.0 + 300/400 * 0.8/0.5 = 0.125 + 1.2
    assert normalised_score(mode, oracle, sizes) == pytest.approx(1.325)
    assert normalised_score(oracle, oracle, sizes) == pytest.approx(1.0)
    # the task is the datasets named in `sizes`; extra scores are ignored
    assert normalised_score({**mode, "z": 9.0}, {**oracle, "z": 1.0}, {"a": 1}) == pytest.approx(0.5)


def test_normalised_score_oracle_zero_is_skipped_and_renormalised(caplog):
    mode = {"a": 0.5, "b": 0.8, "c": 0.3}
    oracle = {"a": 1.0, "b": 0.5, "c": 0.0}
    sizes = {"a": 100, "b": 300, "c": 100}
    with caplog.at_level(logging.WARNING, logger="llama_index_lag.eval.metrics"):
        score = normalised_score(mode, oracle, sizes)
    assert score == pytest.approx(1.325)  # as if "c" did not exist: weights 100/400 and 300/400
    assert any("'c'" in r.getMessage() for r in caplog.records)
    assert math.isnan(normalised_score({"c": 0.3}, {"c": 0.0}, {"c": 10}))
    # an empty dataset carries no weight
    assert normalised_score(mode, oracle, {"a": 100, "b": 0}) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("mode", "oracle", "sizes"),
    [
        ({"a": 0.5}, {"b": 1.0}, {"a": 1}),  # no oracle score for "a"
        ({"b": 0.5}, {"a": 1.0}, {"a": 1}),  # no mode score for "a"
        ({"a": 0.5}, {"a": 1.0}, {"a": -1}),
        ({"a": 0.5}, {"a": 1.0}, {"a": 1.5}),
        ({"a": float("nan")}, {"a": 1.0}, {"a": 1}),
        ({"a": 0.5}, {"a": -1.0}, {"a": 1}),
    ],
)
def test_normalised_score_rejects_bad_input(mode, oracle, sizes):
    with pytest.raises(DataError):
        normalised_score(mode, oracle, sizes)
