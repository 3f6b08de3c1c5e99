"""Invented, pronounceable names: a syllable grammar, the blocklists of real and reserved words, and
:class:`NameMaker`, which hands out globally unique name words from a seeded RNG."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from importlib import resources

from ...data import TaskExample
from ...errors import ConfigError
from . import vocabulary as V

_SINGLE = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z")
_CLUSTER = ("br", "dr", "gr", "kr", "tr", "st", "sk", "pr", "kl", "vr")
_VOWELS = ("a", "a", "e", "e", "i", "o", "o", "u")
_CODAS = ("l", "n", "r", "s", "m")

# Name endings by pattern; all start with a consonant so they follow an open syllable smoothly.
_ENDINGS = {
    "given": (
        "no",
        "na",
        "ra",
        "ro",
        "lin",
        "vin",
        "del",
        "mir",
        "sa",
        "lo",
        "ren",
        "tha",
        "ric",
        "var",
        "wen",
    ),
    "surname": ("mar", "vik", "dren", "sel", "rov", "lan", "tor", "vane", "rel", "brin", "dak", "nor"),
    "province": ("var", "mark", "sia", "ria", "vin", "thal"),
    "river": ("mer", "ven", "dra", "sel", "wen", "ra", "lo"),
    "stem": ("ra", "no", "vel", "dan", "ri", "sa", "len", "tis", "mor", "ka", "vis", "ne", "do"),
    "ship": ("na", "ra", "lia", "tis", "vel", "sa", "ne", "ria"),
    "pet": ("py", "bo", "sy", "ko", "li", "ni", "mo", "ro"),
}
_TOWN_SUFFIXES = (
    "mouth", "holt", "wick", "ford", "stead", "by", "dale", "ton", "brook", "moor", "haven", "bury", "mere",
    "combe", "gate",
)  # fmt: skip
# Patterns: which parts a name of that pattern is made of ("s1" = first syllable, "s2" = open syllable).
_PATTERNS = {
    "given": ("s1", "s2", "end"),
    "surname": ("s1", "s2", "end"),
    "province": ("s1", "s2", "end"),
    "river": ("s1", "end"),
    "stem": ("s1", "s2", "end"),
    "ship": ("s1", "s2", "end"),
    "pet": ("s1", "end"),
}

_OFFENSIVE = (
    "nig", "fag", "cum", "rape", "anal", "anus", "cock", "dick", "tit", "porn", "sex", "piss", "fuck", "cunt",
    "slut", "whore", "kike", "spic", "nazi", "hitl", "gook", "coon", "dago", "homo", "jew", "arse", "bitch",
    "butt", "crap", "damn", "hell", "kill", "dead", "shit", "turd", "wank", "negr", "nazi", "isis", "satan",
    "lust", "smut", "puta", "pute", "merd", "kurv", "pizd", "huy", "hure", "ficken", "scheis", "cul", "pene",
)  # fmt: skip

# Real words, first names, surnames and place names the grammar can produce (found by enumerating the
# grammar against English word lists, census name lists and a gazetteer; see the file's header).
_REAL_WORDS = resources.files("llama_index_lag") / "data" / "real_words.txt"
_real_words_cache: frozenset[str] | None = None


def real_words() -> frozenset[str]:
    """The packaged blocklist of real words (lower-case), read once."""
    global _real_words_cache
    if _real_words_cache is None:
        try:
            lines = _REAL_WORDS.read_text(encoding="utf-8").splitlines()
        except OSError as exc:  # pragma: no cover - broken installation
            raise ConfigError(f"cannot read the name blocklist: {exc}", path=str(_REAL_WORDS)) from exc
        _real_words_cache = frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))
    return _real_words_cache


def reserved_words(tasks: dict[str, list[TaskExample]]) -> frozenset[str]:
    """Lower-cased words that invented names must avoid: the task sets' and the templates' vocabulary."""
    texts: list[str] = []
    for examples in tasks.values():
        for ex in examples:
            texts += [ex.prompt, ex.answer]
    for pool in (
        V.PROFESSIONS,
        V.PETS,
        V.INSTRUMENTS,
        V.COLOURS,
        V.EMBLEM_COLOURS,
        V.EMBLEM_ANIMALS,
        V.MATERIALS,
        V.PRODUCTS,
        V.WEEKDAYS,
        V.MONTHS,
        V.TOWN_SIZES,
        V.SHIP_TYPES,
        V.CARGOES,
        V.FESTIVAL_TYPES,
        V.DISHES,
    ):
        texts += list(pool)
    texts += [w for pair in V.ORG_TYPES + V.DEVICE_TYPES + V.DEVICE_USERS for w in pair]
    texts += [f for fillers in V.FILLERS.values() for f in fillers]
    return frozenset(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))


def _syllable1(rng: random.Random) -> str:
    """A first syllable: optional onset, a vowel, optional coda."""
    r = rng.random()
    onset = "" if r < 0.15 else (rng.choice(_CLUSTER) if r < 0.40 else rng.choice(_SINGLE))
    coda = rng.choice(_CODAS) if rng.random() < 0.45 else ""
    return onset + rng.choice(_VOWELS) + coda


def _syllable2(rng: random.Random, after_closed: bool) -> str:
    """An open syllable (onset and vowel); a single consonant after a closed syllable."""
    if after_closed or rng.random() < 0.75:
        onset = rng.choice(_SINGLE)
    else:
        onset = rng.choice(_CLUSTER)
    return onset + rng.choice(_VOWELS)


def _raw_name(rng: random.Random, pattern: str) -> str:
    """A capitalised name of ``pattern``, not yet checked against the blocklists."""
    out = ""
    for part in _PATTERNS[pattern]:
        if part == "s1":
            out += _syllable1(rng)
        elif part == "s2":
            out += _syllable2(rng, after_closed=bool(out) and out[-1] not in "aeiou")
        else:
            end = rng.choice(_ENDINGS[pattern])
            if out and out[-1] not in "aeiou" and end[0] == out[-1]:
                end = end[1:] or end  # "Vel" + "lin" -> "Velin"
            out += end
    return out.capitalize()


def _town_stem(rng: random.Random) -> str:
    """The first syllables of a town name."""
    stem = _syllable1(rng)
    if rng.random() < 0.45 or len(stem) < 3:
        stem += _syllable2(rng, after_closed=stem[-1] not in "aeiou")
    return stem.capitalize()


def _town_name(rng: random.Random, stem: str) -> str:
    """``stem`` and a town suffix that does not start with its last letter."""
    suffixes = [s for s in _TOWN_SUFFIXES if s[0] != stem[-1]]
    return stem + rng.choice(suffixes)


def _bad_word(word: str, reserved: frozenset[str]) -> bool:
    """Whether ``word`` may not be a name: too short, reserved, a real word, hard to read or offensive."""
    low = word.lower()
    if len(low) < 4 or low in reserved or low in real_words():
        return True
    if re.search(r"(.)\1\1", low) or re.search(r"[^aeiou]{4}", low):
        return True
    return any(bad in low for bad in _OFFENSIVE)


class NameMaker:
    """Draws invented, globally unique name words from a seeded RNG.

    ``reserved`` holds lower-cased words that may never be used as a name (template words, the task
    training sets' vocabulary); every word handed out is also reserved, so names are unique.
    """

    def __init__(self, rng: random.Random, reserved: frozenset[str]) -> None:
        self.rng = rng
        self.reserved = reserved
        self.used: set[str] = set()
        self.used_stems: set[str] = set()

    def _take(self, make: Callable[[], str], tries: int = 10_000) -> str:
        """The first word from ``make`` that is neither used nor blocked; reserve it."""
        for _ in range(tries):
            word = make()
            low = word.lower()
            if low not in self.used and not _bad_word(word, self.reserved):
                self.used.add(low)
                return word
        raise ConfigError("ran out of invented names; the benchmark is too large for the name grammar")

    def word(self, pattern: str) -> str:
        """A fresh word of name pattern ``pattern`` ("given", "surname", "river", "stem", ...)."""
        return self._take(lambda: _raw_name(self.rng, pattern))

    def town(self, stem: str | None = None) -> tuple[str, str]:
        """A town name and its stem; pass another town's ``stem`` to make a look-alike of it."""
        if stem is not None:
            return self._take(lambda: _town_name(self.rng, stem), tries=60), stem
        for _ in range(10_000):
            new_stem = _town_stem(self.rng)
            if new_stem.lower() in self.used_stems:
                continue
            name = _town_name(self.rng, new_stem)
            if name.lower() not in self.used and not _bad_word(name, self.reserved):
                self.used.add(name.lower())
                self.used_stems.add(new_stem.lower())
                return name, new_stem
        raise ConfigError("ran out of invented town names; the benchmark is too large for the name grammar")

    def person(self, surname: str | None = None) -> tuple[str, str]:
        """A fresh given name and a fresh surname (or ``surname``, for a namesake)."""
        given = self.word("given")
        return given, surname if surname is not None else self.word("surname")
