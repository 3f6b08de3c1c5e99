"""Answer metrics (SQuAD-style) and the LAG paper's normalised score (Eq. 9).

Per-question metrics take a model ``prediction`` and the gold ``answers`` (a list, or one string) and return
a float in [0, 1], the best over the golds:

- :func:`exact_match`: normalised prediction equals a normalised gold.
- :func:`token_f1`: bag-of-tokens F1 between normalised prediction and gold.
- :func:`contains_match`: a normalised gold occurs, on token boundaries, inside the normalised prediction
  (lenient; suits a chatty small model: "He was born in 1873." contains "1873").
- :func:`label_accuracy`: for true/false tasks, the first yes/no/true/false word of the prediction agrees
  with the gold label.

:func:`normalize_answer` is the official SQuAD v1.1 normalisation: lower-case, drop ASCII punctuation,
drop the articles a/an/the, collapse whitespace.
"""

from __future__ import annotations

import logging
import math
import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

from ..errors import DataError

logger = logging.getLogger(__name__)

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}
_BOOL_RE = re.compile(r"[a-z]+")
_ECHO_RE = re.compile(r"\btrue\s+or\s+false\b|\byes\s+or\s+no\b")
_NEG_CONTRACTIONS = frozenset({"isn", "wasn", "aren", "weren", "doesn", "don", "didn", "ain"})


def normalize_answer(s: str) -> str:
    """Lower-case, remove punctuation, articles (a, an, the) and extra whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = s.translate(_PUNCT_TABLE)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def _golds(golds: str | Sequence[str]) -> list[str]:
    if isinstance(golds, str):
        return [golds]
    out = list(golds)
    if not out:
        raise DataError("no gold answers to compare with", field="answers")
    for g in out:
        if not isinstance(g, str):
            raise DataError(f"gold answers must be strings, got {type(g).__name__}", field="answers")
    return out


def exact_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _golds(golds)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        # SQuAD v2 rule: two empty answers agree, an empty and a non-empty one do not.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, golds: str | Sequence[str]) -> float:
    """Best token-level F1 (multiset overlap of normalised tokens) over the gold answers."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(g).split()) for g in _golds(golds))


def contains_match(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if some normalised gold occurs in the normalised prediction on token boundaries, else 0.0.

    "born in 1873" contains "1873" but "18731" does not; a gold that normalises to nothing (e.g. "the")
    never matches.
    """
    pred = f" {normalize_answer(prediction)} "
    for g in _golds(golds):
        gold = normalize_answer(g)
        if gold and f" {gold} " in pred:
            return 1.0
    return 0.0


def parse_bool(prediction: str) -> bool | None:
    """The truth value of the first true/false/yes/no word in ``prediction`` (case-insensitive).

    A negated "true"/"false" flips ("not true", "isn't true", "never false"); an echoed "true or false" /
    "yes or no" (a model repeating the prompt) is skipped. Returns None if there is no such word.
    """
    text = _ECHO_RE.sub(" ", prediction.lower())
    words = _BOOL_RE.findall(text)
    for i, word in enumerate(words):
        if word in _BOOL_WORDS:
            value = _BOOL_WORDS[word]
            if word in ("true", "false") and _negated(words, i):
                return not value
            return value
    return None


def _negated(words: list[str], i: int) -> bool:
    prev = words[i - 1] if i >= 1 else ""
    if prev in ("not", "never"):
        return True
    return prev == "t" and i >= 2 and words[i - 2] in _NEG_CONTRACTIONS


def label_accuracy(prediction: str, golds: str | Sequence[str]) -> float:
    """1.0 if :func:`parse_bool` of the prediction equals that of a gold label ("true"/"false"), else 0.0.

    An unparseable prediction scores 0.0; a gold label that does not parse raises :class:`DataError`.
    """
    labels = []
    for g in _golds(golds):
        value = parse_bool(g)
        if value is None:
            raise DataError(f"gold label {g!r} is not true/false/yes/no", field="answers")
        labels.append(value)
    pred = parse_bool(prediction)
    return float(pred is not None and pred in labels)


def normalised_score(
    mode_scores: Mapping[str, float],
    oracle_scores: Mapping[str, float],
    sizes: Mapping[str, int],
) -> float:
    """The LAG paper's normalised task score (Eq. 9), as a fraction (multiply by 100 for "% of Oracle").

    ``S_T = sum_{D in T} |D| / |T| * f_D(M) / f_D(Oracle)``, where the task ``T`` is the set of datasets
    named in ``sizes`` (``|D|`` = ``sizes[D]`` questions, ``|T|`` = their sum), ``f_D(M)`` is
    ``mode_scores[D]`` and ``f_D(Oracle)`` is ``oracle_scores[D]``. Extra keys of the score dicts are
    ignored, so one dict of all scores can be reused per task.

    Rule for a dataset on which the Oracle scores 0 (the ratio is undefined): it is skipped, a warning
    names it, and the weights of the remaining datasets are renormalised (``|T|`` is the sum of their
    sizes). Datasets of size 0 carry no weight and are skipped too. If no dataset is left, the score is
    ``nan``. A score can exceed 1.0 when the mode beats the Oracle (R-LAG on Slot in the paper: 102.7%).

    Raises :class:`DataError` for a dataset missing from ``mode_scores`` / ``oracle_scores``, a negative
    or non-integer size, or a negative / non-finite score.
    """
    kept: list[tuple[int, float, float]] = []
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise DataError(f"size of dataset {name!r} must be an integer >= 0, got {size!r}", field="sizes")
        for label, scores in (("mode_scores", mode_scores), ("oracle_scores", oracle_scores)):
            if name not in scores:
                raise DataError(f"dataset {name!r} has no score in {label}", field=label)
            value = scores[name]
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not math.isfinite(value)
                or value < 0
            ):
                raise DataError(f"{label}[{name!r}] must be a finite number >= 0, got {value!r}", field=label)
        if size == 0:
            continue
        oracle = float(oracle_scores[name])
        if oracle == 0.0:
            logger.warning(
                "normalised_score: the Oracle scores 0 on dataset %r; it is left out and the other datasets' "
                "weights are renormalised",
                name,
            )
            continue
        kept.append((size, float(mode_scores[name]), oracle))
    total = sum(size for size, _, _ in kept)
    if total == 0:
        return math.nan
    return sum(size / total * mode / oracle for size, mode, oracle in kept)


__all__ = [
    "contains_match",
    "exact_match",
    "label_accuracy",
    "normalised_score",
    "normalize_answer",
    "parse_bool",
    "token_f1",
]
