"""Synthetic knowledge benchmark: short documents about fictional entities, questions with short answers.

The entities (people, towns, organisations, devices, ships, festivals) have invented, pronounceable names
built from syllables, so a pretrained model cannot know any of their facts: a correct answer must come from
the document (in the prompt, RAG) or from the document's knowledge adapter (LAG / PRAG / Oracle).

One document per entity, 60-130 words of plain declarative prose stating 4-6 facts, each once. Every fact
has a short answer (1-3 words: an invented name, a year, a number, a colour, a material, a profession...).
Deliberate *confusers* make retrieval and routing discriminate on specifics: people share a surname and a
profession or home town, towns share the first syllables of their names, organisations / devices / ships /
festivals share the word of their kind (``... Guild``, ``... Pump``) and a town or material; and documents
mention other entities that have their own document (a person founded an organisation, a ship's home port
is a town of the benchmark). Each question's answer is stated in its own ``doc_id`` document.

Tasks (KILT-like names): ``"qa"`` (3-5 per document, answers[0] is the canonical answer and occurs verbatim
in the document; later answers are accepted aliases) and ``"fact"`` (``fact_checks_per_doc`` per document,
"True or false: <claim>", answers ``["true"]`` / ``["false"]``, balanced over the benchmark; a false claim
swaps in the same attribute of another entity of the same kind).

Task-adapter training sets are built from common knowledge and never mention a benchmark entity:
``tasks/fact_check.jsonl`` (true/false claims) and ``tasks/short_answer.jsonl`` (terse answers). They do
not depend on the seed.

Everything is deterministic: the same ``(n_docs, seed)`` gives byte-identical files.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._fs import atomic_write_json
from ..data import (  # DATA_DIR, packaged_path: re-exported (they moved to data)
    DATA_DIR,
    DocumentRecord,
    QuestionRecord,
    TaskExample,
    packaged_path,
    write_documents,
    write_questions,
    write_task_examples,
)
from ..errors import ConfigError
from .metrics import normalize_answer

GENERATOR_VERSION = 1
"""Bump when the output of :func:`make_benchmark` / :func:`make_demo` changes for the same arguments."""

TASK_QA = "qa"
TASK_FACT = "fact"
TASK_FILES = {"fact_check": "tasks/fact_check.jsonl", "short_answer": "tasks/short_answer.jsonl"}

KINDS = ("person", "town", "organisation", "device", "ship", "festival")
_KIND_SHARE = {
    "person": 0.30,
    "town": 0.20,
    "organisation": 0.15,
    "device": 0.12,
    "ship": 0.12,
    "festival": 0.11,
}
_CONFUSER_P = {
    "person": 0.35,
    "town": 0.2,
    "organisation": 0.35,
    "device": 0.35,
    "ship": 0.35,
    "festival": 0.35,
}
MIN_WORDS, MAX_WORDS = 60, 130
MAX_DOCS = 10_000  # the name grammar (pets, rivers) has room for about twice as many

# ---- records ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entity:
    """The fictional entity a document is about. ``invented`` lists its invented name words."""

    doc_id: str
    kind: str
    name: str
    invented: tuple[str, ...]


@dataclass(frozen=True)
class Confuser:
    """Two documents that share surface strings (``shared``, each occurring in both texts)."""

    a: str
    b: str
    reason: str  # "surname", "name-stem", "kind-word", "mentions"
    shared: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "reason": self.reason, "shared": list(self.shared)}


@dataclass
class Benchmark:
    """A generated benchmark instance (see :func:`make_benchmark`, :func:`make_demo`)."""

    name: str
    seed: int | None
    documents: list[DocumentRecord]
    questions: list[QuestionRecord]
    tasks: dict[str, list[TaskExample]] = field(default_factory=dict)
    entities: list[Entity] = field(default_factory=list)
    confusers: list[Confuser] = field(default_factory=list)
    names: tuple[str, ...] = ()  # every invented word used (lower-case), not written to disk

    def counts(self) -> dict[str, Any]:
        by_task: dict[str, int] = {}
        for q in self.questions:
            by_task[q.task] = by_task.get(q.task, 0) + 1
        by_kind: dict[str, int] = {}
        for e in self.entities:
            by_kind[e.kind] = by_kind.get(e.kind, 0) + 1
        fact_true = sum(1 for q in self.questions if q.task == TASK_FACT and q.answers[0] == "true")
        return {
            "documents": len(self.documents),
            "questions": dict(sorted(by_task.items())),
            "fact_true": fact_true,
            "fact_false": by_task.get(TASK_FACT, 0) - fact_true,
            "kinds": {k: by_kind[k] for k in KINDS if k in by_kind},
            "tasks": {k: len(v) for k, v in self.tasks.items()},
            "confusers": len(self.confusers),
        }

    def metadata(self) -> dict[str, Any]:
        return {
            "generator": "llama_index_lag.eval.synthetic",
            "generator_version": GENERATOR_VERSION,
            "name": self.name,
            "seed": self.seed,
            "counts": self.counts(),
            "confusers": [c.to_dict() for c in self.confusers],
        }


# ---- invented names --------------------------------------------------------------------------------------

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
_REAL_WORDS_FILE = Path(__file__).resolve().parent.parent / "data" / "real_words.txt"
_real_words_cache: frozenset[str] | None = None


def _real_words() -> frozenset[str]:
    global _real_words_cache
    if _real_words_cache is None:
        try:
            lines = _REAL_WORDS_FILE.read_text(encoding="utf-8").splitlines()
        except OSError as exc:  # pragma: no cover - broken installation
            raise ConfigError(f"cannot read the name blocklist: {exc}", path=_REAL_WORDS_FILE) from exc
        _real_words_cache = frozenset(w.strip().lower() for w in lines if w.strip() and not w.startswith("#"))
    return _real_words_cache


def _syllable1(rng: random.Random) -> str:
    r = rng.random()
    onset = "" if r < 0.15 else (rng.choice(_CLUSTER) if r < 0.40 else rng.choice(_SINGLE))
    coda = rng.choice(_CODAS) if rng.random() < 0.45 else ""
    return onset + rng.choice(_VOWELS) + coda


def _syllable2(rng: random.Random, after_closed: bool) -> str:
    if after_closed or rng.random() < 0.75:
        onset = rng.choice(_SINGLE)
    else:
        onset = rng.choice(_CLUSTER)
    return onset + rng.choice(_VOWELS)


def _raw_name(rng: random.Random, pattern: str) -> str:
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
    stem = _syllable1(rng)
    if rng.random() < 0.45 or len(stem) < 3:
        stem += _syllable2(rng, after_closed=stem[-1] not in "aeiou")
    return stem.capitalize()


def _town_name(rng: random.Random, stem: str) -> str:
    suffixes = [s for s in _TOWN_SUFFIXES if s[0] != stem[-1]]
    return stem + rng.choice(suffixes)


def _bad_word(word: str, reserved: frozenset[str]) -> bool:
    low = word.lower()
    if len(low) < 4 or low in reserved or low in _real_words():
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
        for _ in range(tries):
            word = make()
            low = word.lower()
            if low not in self.used and not _bad_word(word, self.reserved):
                self.used.add(low)
                return word
        raise ConfigError("ran out of invented names; the benchmark is too large for the name grammar")

    def word(self, pattern: str) -> str:
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
        given = self.word("given")
        return given, surname if surname is not None else self.word("surname")


# ---- value pools -----------------------------------------------------------------------------------------

_PROFESSIONS = (
    "glassblower", "clockmaker", "cartographer", "bookbinder", "beekeeper", "shipwright", "violin maker",
    "stonemason", "botanist", "astronomer", "printer", "potter", "blacksmith", "weaver", "surveyor",
    "lighthouse keeper", "apothecary", "engraver", "bell founder", "tailor", "brewer", "schoolteacher",
    "architect", "photographer", "chemist", "rope maker", "miller", "tanner", "jeweller", "carpenter",
)  # fmt: skip
_PETS = ("dog", "cat", "parrot", "goat", "tortoise", "raven", "pony", "ferret", "donkey", "canary")
_INSTRUMENTS = (
    "violin", "cello", "harp", "flute", "accordion", "trumpet", "oboe", "lute", "clarinet", "piano",
    "mandolin", "bassoon",
)  # fmt: skip
_COLOURS = ("red", "blue", "green", "yellow", "white", "black", "grey", "orange", "purple", "brown")
_EMBLEM_COLOURS = ("silver", "golden", "red", "blue", "green", "black", "white")
_EMBLEM_ANIMALS = ("heron", "fox", "owl", "stag", "hare", "swan", "wolf", "bear", "falcon", "otter", "boar")
_MATERIALS = (
    "brass",
    "oak",
    "copper",
    "iron",
    "walnut",
    "bronze",
    "tin",
    "steel",
    "pewter",
    "birch",
    "maple",
)
_PRODUCTS = (
    "salt", "wool", "cheese", "paper", "rope", "glass", "honey", "cider", "pottery", "timber", "lace",
    "candles", "soap", "ink", "barley", "linen", "leather",
)  # fmt: skip
_WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
    "November", "December",
)  # fmt: skip
_TOWN_SIZES = ("small", "quiet", "old", "busy", "hillside", "market")
_ORG_TYPES = (
    ("Guild", "guild of clockmakers"), ("Guild", "guild of weavers"), ("Guild", "guild of stonemasons"),
    ("Society", "society of amateur astronomers"), ("Society", "botanical society"),
    ("Society", "historical society"), ("Company", "shipping company"), ("Company", "trading company"),
    ("Club", "rowing club"), ("Club", "chess club"), ("Academy", "music academy"),
    ("Institute", "research institute"), ("Library", "lending library"), ("Bank", "savings bank"),
)  # fmt: skip
_DEVICE_TYPES = (
    ("Engine", "machine"), ("Lamp", "device"), ("Lens", "instrument"), ("Pump", "machine"),
    ("Gauge", "instrument"), ("Clock", "device"), ("Compass", "instrument"), ("Press", "machine"),
    ("Drill", "tool"), ("Winch", "machine"), ("Bellows", "device"), ("Kettle", "device"),
)  # fmt: skip
_DEVICE_WEIGHTS = {  # plausible weight range in kilograms per kind word
    "Engine": (60, 900), "Lamp": (2, 30), "Lens": (2, 25), "Pump": (20, 300), "Gauge": (2, 20),
    "Clock": (5, 400), "Compass": (2, 12), "Press": (80, 900), "Drill": (3, 60), "Winch": (20, 400),
    "Bellows": (5, 80), "Kettle": (2, 40),
}  # fmt: skip
_DEVICE_USERS = (
    ("millers", "miller"), ("lighthouse keepers", "lighthouse keeper"), ("beekeepers", "beekeeper"),
    ("miners", "miner"), ("fishermen", "fisherman"), ("bakers", "baker"), ("surveyors", "surveyor"),
    ("printers", "printer"), ("weavers", "weaver"), ("brewers", "brewer"), ("farmers", "farmer"),
    ("sailors", "sailor"), ("dyers", "dyer"),
)  # fmt: skip
_SHIP_TYPES = (
    "schooner", "steamship", "ferry", "fishing trawler", "paddle steamer", "cargo barge", "whaling ship",
    "brigantine", "tugboat", "sailing barge",
)  # fmt: skip
_CARGOES = (
    "timber",
    "coal",
    "grain",
    "wool",
    "salt",
    "tea",
    "passengers",
    "mail",
    "marble",
    "iron ore",
    "wine",
)
_FESTIVAL_TYPES = (
    "lantern festival", "harvest festival", "music festival", "kite festival", "boat festival",
    "bread festival", "flower festival", "fire festival", "dance festival", "puppet festival",
)  # fmt: skip
_DISHES = (
    "plum dumplings", "roast chestnuts", "barley soup", "honey cakes", "fried trout", "onion pie",
    "rye bread", "smoked eel", "apple fritters", "lentil stew", "cabbage rolls", "pear tart",
)  # fmt: skip
_NUMBER_WORDS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty",
)  # fmt: skip

_FILLERS = {
    "person": (
        "{Short} was known for a careful and patient way of working.",
        "Neighbours remembered {obj} as quiet and generous.",
        "{Pr} kept detailed notebooks about every project.",
        "{Pr} enjoyed long walks in the countryside on Sunday afternoons.",
        "Several of {poss} letters have survived in private collections.",
        "Friends described {Short} as cheerful, curious and rather stubborn.",
        "{Pr} often worked late into the evening by candlelight.",
    ),
    "town": (
        "The streets of the old centre are narrow and paved with stone.",
        "Many of the houses in {T} date from the nineteenth century.",
        "A small museum in {T} describes the history of the area.",
        "The surrounding countryside is mostly farmland and low hills.",
        "Visitors often remark on the quiet of its evenings.",
        "A stone bridge and an old chapel are the best known sights of {T}.",
    ),
    "organisation": (
        "Its members meet regularly to share their work and plans.",
        "The {T} keeps a small archive of letters and records.",
        "New members are admitted after a short interview.",
        "The {T} publishes a short newsletter for its members.",
        "Over the years the {T} has moved between several buildings.",
    ),
    "device": (
        "Early versions were difficult to repair.",
        "A restored example of the {T} is kept in a private collection.",
        "Later models were smaller and cheaper to build.",
        "Its design was copied by several rival workshops.",
        "Owners of the {T} praised its simple controls.",
    ),
    "ship": (
        "The ship was repaired several times during its long career.",
        "Sailors considered the {T} a steady and reliable vessel.",
        "A painting of the ship hangs in a harbour tavern.",
        "Its deck was rebuilt after a winter storm.",
        "The {T} was a familiar sight along the coast.",
    ),
    "festival": (
        "Families travel from nearby villages to take part.",
        "The celebrations end with music in the main square.",
        "Local children prepare decorations weeks in advance.",
        "Stalls sell food and handmade goods along the streets.",
        "Many visitors return to the {T} year after year.",
    ),
}


def _a(word: str) -> str:
    """The indefinite article for ``word``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def _fmt(n: int) -> str:
    return f"{n:,}"


def _num_answers(n: int, unit: str | None = None) -> tuple[str, ...]:
    out = [_fmt(n)]
    if unit:
        out.append(f"{_fmt(n)} {unit}")
    if n < len(_NUMBER_WORDS):
        out.append(_NUMBER_WORDS[n])
        if unit:
            out.append(f"{_NUMBER_WORDS[n]} {unit}")
    return tuple(out)


def _norm(s: str) -> str:
    return normalize_answer(s)


# ---- world model -----------------------------------------------------------------------------------------


@dataclass
class _Probe:
    """One checkable fact of a document."""

    slot: str  # "<kind>.<attribute>": the swap pool for false claims
    questions: tuple[str, ...]  # alternative phrasings, each naming the entity
    answers: tuple[str, ...]  # answers[0] occurs verbatim in the sentence
    claim: Callable[[str], str]  # claim sentence for a value of the attribute
    fake: Callable[[random.Random], str]  # a plausible other value (fallback for false claims)

    @property
    def value(self) -> str:
        return self.answers[0]


@dataclass
class _Sentence:
    text: str
    probes: list[_Probe] = field(default_factory=list)


@dataclass
class _Ent:
    kind: str
    title: str
    invented: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    doc_id: str = ""
    partner: _Ent | None = None
    partner_reason: str = ""
    refs: list[_Ent] = field(default_factory=list)  # entities with their own document this one mentions


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _kind_counts(n: int) -> dict[str, int]:
    raw = {k: n * _KIND_SHARE[k] for k in KINDS}
    counts = {k: int(v) for k, v in raw.items()}
    rest = n - sum(counts.values())
    for k in sorted(KINDS, key=lambda k: (-(raw[k] - counts[k]), KINDS.index(k)))[:rest]:
        counts[k] += 1
    return counts


class _World:
    """All entities of one benchmark, built before any text is written so cross-references agree."""

    def __init__(self, n_docs: int, rng: random.Random, names: NameMaker) -> None:
        self.rng = rng
        self.names = names
        self.counts = _kind_counts(n_docs)
        self.by_kind: dict[str, list[_Ent]] = {k: [] for k in KINDS}
        self.background_towns = [names.town()[0] for _ in range(max(3, n_docs // 8))]
        self.provinces = [names.word("province") for _ in range(max(2, self.counts["town"] // 3))]
        self._build()

    # -- helpers --
    def fresh_person(self) -> str:
        given, surname = self.names.person()
        return f"{given} {surname}"

    def pick_town(self, p_entity: float = 0.7) -> tuple[str, _Ent | None]:
        towns = self.by_kind["town"]
        if towns and self.rng.random() < p_entity:
            t = self.rng.choice(towns)
            return t.title, t
        return self.rng.choice(self.background_towns), None

    def partner_for(self, kind: str) -> _Ent | None:
        pool = self.by_kind[kind]
        if pool and self.rng.random() < _CONFUSER_P[kind]:
            return self.rng.choice(pool)
        return None

    # -- entities --
    def _build(self) -> None:
        rng = self.rng
        for _ in range(self.counts["town"]):
            partner = self.partner_for("town")
            name = stem = None
            if partner is not None:
                try:
                    name, stem = self.names.town(partner.attrs["stem"])
                except ConfigError:
                    partner = None
            if name is None:
                name, stem = self.names.town()
            e = _Ent("town", name, (name,), partner=partner, partner_reason="name-stem" if partner else "")
            e.attrs = {
                "stem": stem,
                "size": rng.choice(_TOWN_SIZES),
                "province": partner.attrs["province"] if partner else rng.choice(self.provinces),
                "river": self.names.word("river"),
                "founded": rng.randint(900, 1750),
                "population": rng.randint(8, 600) * 100,
                "product": rng.choice(_PRODUCTS),
                "roof": rng.choice(_COLOURS),
                "mayor": self.fresh_person(),
                "market": rng.choice(_WEEKDAYS),
            }
            self.by_kind["town"].append(e)

        for _ in range(self.counts["person"]):
            partner = self.partner_for("person")
            given, surname = self.names.person(partner.attrs["surname"] if partner else None)
            born = rng.randint(1780, 1950)
            town, town_ent = self.pick_town()
            profession = rng.choice(_PROFESSIONS)
            if partner is not None:
                if rng.random() < 0.5:
                    profession = partner.attrs["profession"]
                else:
                    town, town_ent = partner.attrs["town"], partner.attrs["town_ent"]
            moved, moved_ent = self.pick_town()
            while moved == town:
                moved, moved_ent = self.pick_town()
            died = born + rng.randint(55, 92)
            e = _Ent(
                "person",
                f"{given} {surname}",
                (given, surname),
                partner=partner,
                partner_reason="surname" if partner else "",
            )
            e.attrs = {
                "given": given,
                "surname": surname,
                "he": rng.random() < 0.5,
                "profession": profession,
                "born": born,
                "town": town,
                "town_ent": town_ent,
                "mentor": self.fresh_person(),
                "spouse": self.fresh_person(),
                "married": born + rng.randint(20, 40),
                "pet": rng.choice(_PETS),
                "pet_name": self.names.word("pet"),
                "instrument": rng.choice(_INSTRUMENTS),
                "medal": self.names.word("stem"),
                "medal_year": born + rng.randint(25, 50),
                "moved": moved,
                "moved_ent": moved_ent,
                "died": died if died <= 2015 else None,
                "employer": None,
                "founded": None,
                "invented": None,
            }
            self.by_kind["person"].append(e)

        for _ in range(self.counts["organisation"]):
            partner = self.partner_for("organisation")
            word, desc = rng.choice(_ORG_TYPES)
            if partner is not None:
                word, desc = partner.attrs["word"], partner.attrs["desc"]
            stem = self.names.word("stem")
            founder, founder_ent, year = self._maker("founded", 1760, 2000)
            hq, hq_ent = (partner.attrs["hq"], partner.attrs["hq_ent"]) if partner else self.pick_town()
            e = _Ent(
                "organisation",
                f"{stem} {word}",
                (stem,),
                partner=partner,
                partner_reason="kind-word" if partner else "",
            )
            e.attrs = {
                "word": word,
                "desc": desc,
                "founder": founder,
                "founder_ent": founder_ent,
                "year": year,
                "hq": hq,
                "hq_ent": hq_ent,
                "members": rng.randint(12, 950),
                "emblem": f"{rng.choice(_EMBLEM_COLOURS)} {rng.choice(_EMBLEM_ANIMALS)}",
                "assembly": rng.choice(_MONTHS),
                "leader": self.fresh_person(),
            }
            if founder_ent is not None:
                founder_ent.attrs["founded"] = e
            self.by_kind["organisation"].append(e)

        orgs = self.by_kind["organisation"]
        for p in self.by_kind["person"]:
            options = [
                o for o in orgs if o is not p.attrs["founded"] and o.attrs["year"] <= p.attrs["born"] + 40
            ]
            if options and rng.random() < 0.5:
                p.attrs["employer"] = rng.choice(options)

        for _ in range(self.counts["device"]):
            partner = self.partner_for("device")
            if partner is not None:
                word, desc = partner.attrs["word"], partner.attrs["desc"]
            else:
                word, desc = rng.choice(_DEVICE_TYPES)
            stem = self.names.word("stem")
            inventor, inventor_ent, year = self._maker("invented", 1760, 1990)
            town, town_ent = self.pick_town()
            e = _Ent(
                "device",
                f"{stem} {word}",
                (stem,),
                partner=partner,
                partner_reason="kind-word" if partner else "",
            )
            e.attrs = {
                "word": word,
                "desc": desc,
                "inventor": inventor,
                "inventor_ent": inventor_ent,
                "year": year,
                "material": partner.attrs["material"] if partner else rng.choice(_MATERIALS),
                "weight": rng.randint(*_DEVICE_WEIGHTS[word]),
                "users": rng.choice(_DEVICE_USERS),
                "town": town,
                "town_ent": town_ent,
                "units": rng.randint(3, 90),
                "colour": rng.choice(_COLOURS),
            }
            if inventor_ent is not None:
                inventor_ent.attrs["invented"] = e
            self.by_kind["device"].append(e)

        companies = [o for o in orgs if o.attrs["word"] == "Company"]
        for _ in range(self.counts["ship"]):
            partner = self.partner_for("ship")
            name = self.names.word("ship")
            port, port_ent = (
                (partner.attrs["port"], partner.attrs["port_ent"]) if partner else self.pick_town()
            )
            year = rng.randint(1800, 1990)
            builders = [o for o in companies if o.attrs["year"] < year]
            builder = rng.choice(builders) if builders and rng.random() < 0.5 else None
            e = _Ent("ship", name, (name,), partner=partner, partner_reason="kind-word" if partner else "")
            e.attrs = {
                "type": partner.attrs["type"] if partner else rng.choice(_SHIP_TYPES),
                "year": year,
                "port": port,
                "port_ent": port_ent,
                "captain": self.fresh_person(),
                "length": rng.randint(14, 90),
                "hull": rng.choice(_COLOURS),
                "cargo": rng.choice(_CARGOES),
                "crew": rng.randint(4, 60),
                "builder": builder,
            }
            self.by_kind["ship"].append(e)

        for _ in range(self.counts["festival"]):
            partner = self.partner_for("festival")
            stem = self.names.word("stem")
            town, town_ent = (
                (partner.attrs["town"], partner.attrs["town_ent"]) if partner else self.pick_town()
            )
            organiser = rng.choice(orgs) if orgs and rng.random() < 0.4 else None
            e = _Ent(
                "festival",
                f"{stem} Festival",
                (stem,),
                partner=partner,
                partner_reason="kind-word" if partner else "",
            )
            e.attrs = {
                "type": partner.attrs["type"] if partner else rng.choice(_FESTIVAL_TYPES),
                "month": rng.choice(_MONTHS),
                "town": town,
                "town_ent": town_ent,
                "first": rng.randint(1760, 1995),
                "days": rng.randint(2, 9),
                "dish": rng.choice(_DISHES),
                "masks": rng.choice(_COLOURS),
                "organiser": organiser,
                "visitors": rng.randint(5, 400) * 100,
            }
            self.by_kind["festival"].append(e)

    def _maker(self, role: str, lo: int, hi: int) -> tuple[str, _Ent | None, int]:
        """A founder / inventor: a person of the benchmark (once per role) or a fresh name, and a year."""
        free = [p for p in self.by_kind["person"] if p.attrs[role] is None]
        if free and self.rng.random() < 0.6:
            p = self.rng.choice(free)
            year = p.attrs["born"] + self.rng.randint(25, 50)
            return p.title, p, year
        return self.fresh_person(), None, self.rng.randint(lo, hi)

    # -- fallbacks for false claims when no other entity of the kind has a different value --
    def fake_town(self, value: str) -> Callable[[random.Random], str]:
        towns = [t.title for t in self.by_kind["town"]] + self.background_towns
        return lambda r: r.choice([t for t in towns if t != value])

    def fake_person(self) -> Callable[[random.Random], str]:
        return lambda r: self.fresh_person()

    def fake_word(self, pattern: str, suffix: str = "") -> Callable[[random.Random], str]:
        return lambda r: self.names.word(pattern) + suffix


def _fake_year(year: int) -> Callable[[random.Random], str]:
    return lambda r: str(year + r.choice((-1, 1)) * r.randint(3, 40))


def _fake_num(n: int) -> Callable[[random.Random], str]:
    def fake(r: random.Random) -> str:
        m = max(2, round(n * r.choice((0.5, 0.6, 0.75, 1.3, 1.5, 2.0))))
        return _fmt(m if m != n else n + r.randint(1, 5))

    return fake


def _fake_pool(value: str, pool: Sequence[str]) -> Callable[[random.Random], str]:
    return lambda r: r.choice([x for x in pool if x != value])


def _probe(
    slot: str,
    questions: str | tuple[str, ...],
    answers: Sequence[str],
    claim: Callable[[str], str],
    fake: Callable[[random.Random], str],
) -> _Probe:
    seen: set[str] = set()
    kept = []
    for ans in answers:
        key = _norm(ans)
        if key and key not in seen:
            seen.add(key)
            kept.append(ans)
    qs = (questions,) if isinstance(questions, str) else tuple(questions)
    return _Probe(slot, qs, tuple(kept), claim, fake)


@dataclass
class _Draft:
    """A document before fact selection: the opening sentence (always kept), candidate body sentences
    (one fact each) and filler sentences (no facts) for the word budget."""

    intro: _Sentence
    intro_refs: list[_Ent]
    fillers: tuple[str, ...]
    body: list[tuple[_Sentence, list[_Ent], bool]] = field(
        default_factory=list
    )  # sentence, mentions, preferred

    def add(
        self, text: str, probe: _Probe, refs: Sequence[_Ent | None] = (), preferred: bool = False
    ) -> None:
        """A body sentence stating one fact; ``refs`` are entities with their own document it mentions;
        ``preferred`` sentences (cross-references) are kept more often."""
        self.body.append((_Sentence(text, [probe]), [r for r in refs if r is not None], preferred))


def _pick(rng: random.Random, *variants: str) -> str:
    return rng.choice(variants)


def _cap(rng: random.Random, flags: list[bool], limit: int) -> list[bool]:
    """Switch randomly chosen true flags off until at most ``limit`` are true."""
    flags = list(flags)
    while sum(flags) > max(0, limit):
        flags[rng.choice([i for i, f in enumerate(flags) if f])] = False
    return flags


def _person_draft(e: _Ent, w: _World, rng: random.Random, max_intro: int) -> _Draft:
    a = e.attrs
    n = e.title
    pr, poss, obj = ("he", "his", "him") if a["he"] else ("she", "her", "her")
    Pr = pr.capitalize()
    prof, born, town = a["profession"], a["born"], a["town"]
    p_prof = _probe(
        "person.profession",
        (f"What was {n}'s profession?", f"What did {n} work as?"),
        (prof,),
        lambda v: f"{n} was {_a(v)} {v}.",
        _fake_pool(prof, _PROFESSIONS),
    )
    p_born = _probe(
        "person.born",
        f"In which year was {n} born?",
        (str(born),),
        lambda v: f"{n} was born in {v}.",
        _fake_year(born),
    )
    p_town = _probe(
        "person.town",
        f"In which town was {n} born?",
        (town, f"the town of {town}"),
        lambda v: f"{n} was born in the town of {v}.",
        w.fake_town(town),
    )
    use_born, use_town = _cap(rng, [rng.random() < 0.75, rng.random() < 0.75], max_intro - 1)
    if use_born and use_town:
        intro = _Sentence(
            f"{n} was {_a(prof)} {prof} born in {born} in the town of {town}.", [p_prof, p_born, p_town]
        )
    elif use_born:
        intro = _Sentence(f"{n} was {_a(prof)} {prof} born in {born}.", [p_prof, p_born])
    elif use_town:
        intro = _Sentence(f"{n} was {_a(prof)} {prof} born in the town of {town}.", [p_prof, p_town])
    else:
        intro = _Sentence(f"{n} was {_a(prof)} {prof}.", [p_prof])
    refs = [a["town_ent"]] if use_town and a["town_ent"] is not None else []
    fillers = tuple(
        f.format(Short=a["given"], Pr=Pr, pr=pr, poss=poss, obj=obj, T=n) for f in _FILLERS["person"]
    )
    d = _Draft(intro, refs, fillers)

    mentor = a["mentor"]
    d.add(
        _pick(
            rng,
            f"{Pr} learned the trade as an apprentice of {mentor}, a respected master of the craft.",
            f"As a young apprentice {pr} was trained by {mentor}, who taught {obj} patience and precision.",
        ),
        _probe(
            "person.mentor",
            f"Who trained {n} as an apprentice?",
            (mentor,),
            lambda v: f"{n} trained as an apprentice under {v}.",
            w.fake_person(),
        ),
    )
    spouse, married = a["spouse"], a["married"]
    if rng.random() < 0.5:
        p = _probe(
            "person.spouse", f"Whom did {n} marry?", (spouse,), lambda v: f"{n} married {v}.", w.fake_person()
        )
    else:
        p = _probe(
            "person.married",
            f"In which year did {n} marry {spouse}?",
            (str(married),),
            lambda v: f"{n} married {spouse} in {v}.",
            _fake_year(married),
        )
    d.add(
        _pick(
            rng,
            f"In {married} {pr} married {spouse}, and the couple lived above the workshop.",
            f"In {married} {pr} married {spouse} in a small ceremony with close friends.",
        ),
        p,
    )
    employer = a["employer"]
    if employer is not None:
        d.add(
            f"For most of {poss} career {pr} worked for the {employer.title}, "
            f"where colleagues valued {poss} skill.",
            _probe(
                "person.employer",
                f"Which organisation did {n} work for?",
                (employer.title,),
                lambda v: f"{n} worked for the {v}.",
                w.fake_word("stem", " " + employer.attrs["word"]),
            ),
            [employer],
            preferred=True,
        )
    founded = a["founded"]
    if founded is not None:
        d.add(
            f"{Pr} was the founder of the {founded.title}, which still exists today.",
            _probe(
                "person.founded",
                f"Which organisation did {n} found?",
                (founded.title,),
                lambda v: f"{n} founded the {v}.",
                w.fake_word("stem", " " + founded.attrs["word"]),
            ),
            [founded],
            preferred=True,
        )
    invented = a["invented"]
    if invented is not None:
        d.add(
            f"{Pr} invented the {invented.title}, which made {poss} name known far beyond {poss} workshop.",
            _probe(
                "person.invented",
                f"Which device did {n} invent?",
                (invented.title,),
                lambda v: f"{n} invented the {v}.",
                w.fake_word("stem", " " + invented.attrs["word"]),
            ),
            [invented],
            preferred=True,
        )
    pet, pet_name = a["pet"], a["pet_name"]
    d.add(
        _pick(
            rng,
            f"{Pr} kept {_a(pet)} {pet} named {pet_name}, which followed {obj} almost everywhere.",
            f"At home {pr} kept {_a(pet)} {pet} named {pet_name}, a favourite of the neighbourhood children.",
        ),
        _probe(
            "person.pet_name",
            f"What was the name of {n}'s {pet}?",
            (pet_name,),
            lambda v: f"{n} kept {_a(pet)} {pet} named {v}.",
            w.fake_word("pet"),
        ),
    )
    instrument = a["instrument"]
    d.add(
        _pick(
            rng,
            f"In {poss} spare time {pr} played the {instrument} at village dances.",
            f"In {poss} spare time {pr} played the {instrument}, often late in the evening.",
        ),
        _probe(
            "person.instrument",
            f"Which musical instrument did {n} play?",
            (instrument,),
            lambda v: f"{n} played the {v}.",
            _fake_pool(instrument, _INSTRUMENTS),
        ),
    )
    medal, medal_year = a["medal"] + " Medal", a["medal_year"]
    if rng.random() < 0.5:
        p = _probe(
            "person.medal",
            f"Which medal did {n} receive in {medal_year}?",
            (medal, a["medal"]),
            lambda v: f"{n} received the {v} in {medal_year}.",
            w.fake_word("stem", " Medal"),
        )
    else:
        p = _probe(
            "person.medal_year",
            f"In which year did {n} receive the {medal}?",
            (str(medal_year),),
            lambda v: f"{n} received the {medal} in {v}.",
            _fake_year(medal_year),
        )
    d.add(f"In {medal_year} {pr} received the {medal} for {poss} contributions to {poss} craft.", p)
    moved = a["moved"]
    d.add(
        f"Later in life {pr} moved to the town of {moved}, where {pr} lived in a house near the market.",
        _probe(
            "person.moved",
            f"To which town did {n} move later in life?",
            (moved, f"the town of {moved}"),
            lambda v: f"Later in life {n} moved to the town of {v}.",
            w.fake_town(moved),
        ),
        [a["moved_ent"]],
    )
    died = a["died"]
    if died is not None:
        d.add(
            f"{Pr} died in {died} at the age of {died - born}.",
            _probe(
                "person.died",
                f"In which year did {n} die?",
                (str(died),),
                lambda v: f"{n} died in {v}.",
                _fake_year(died),
            ),
        )
    return d


def _town_draft(e: _Ent, w: _World, rng: random.Random, max_intro: int) -> _Draft:
    a = e.attrs
    t = e.title
    province, size = a["province"], a["size"]
    if _cap(rng, [rng.random() < 0.8], max_intro)[0]:
        intro = _Sentence(
            f"{t} is {_a(size)} {size} town in the province of {province}.",
            [
                _probe(
                    "town.province",
                    (f"In which province is {t}?", f"In which province is the town of {t}?"),
                    (province, f"the province of {province}"),
                    lambda v: f"{t} is in the province of {v}.",
                    _fake_pool(province, w.provinces),
                )
            ],
        )
    else:
        intro = _Sentence(f"{t} is {_a(size)} {size} town.")
    d = _Draft(intro, [], tuple(f.format(T=t) for f in _FILLERS["town"]))
    river = a["river"]
    d.add(
        _pick(
            rng,
            f"{t} lies on the {river} River, which flows past an old water mill.",
            f"{t} lies on the {river} River, and boats once carried goods along it.",
        ),
        _probe(
            "town.river",
            f"On which river does {t} lie?",
            (river, f"{river} River"),
            lambda v: f"{t} lies on the {v} River.",
            w.fake_word("river"),
        ),
    )
    founded = a["founded"]
    d.add(
        _pick(
            rng,
            f"{t} was founded in {founded} by a group of farming families.",
            f"{t} was founded in {founded} as a small trading post.",
        ),
        _probe(
            "town.founded",
            f"In which year was {t} founded?",
            (str(founded),),
            lambda v: f"{t} was founded in {v}.",
            _fake_year(founded),
        ),
    )
    pop = _fmt(a["population"])
    d.add(
        f"About {pop} people live in {t} today.",
        _probe(
            "town.population",
            f"About how many people live in {t}?",
            (pop,),
            lambda v: f"About {v} people live in {t}.",
            _fake_num(a["population"]),
        ),
    )
    product = a["product"]
    d.add(
        f"{t} is known for its {product}, sold at markets across the province.",
        _probe(
            "town.product",
            f"Which product is {t} known for?",
            (product,),
            lambda v: f"{t} is known for its {v}.",
            _fake_pool(product, _PRODUCTS),
        ),
    )
    roof = a["roof"]
    d.add(
        f"The town hall of {t} has {_a(roof)} {roof} roof that can be seen from far away.",
        _probe(
            "town.roof",
            f"What colour is the roof of the town hall in {t}?",
            (roof,),
            lambda v: f"The town hall of {t} has {_a(v)} {v} roof.",
            _fake_pool(roof, _COLOURS),
        ),
    )
    mayor = a["mayor"]
    d.add(
        f"The mayor of {t} is {mayor}, who was elected after a close vote.",
        _probe(
            "town.mayor",
            f"Who is the mayor of {t}?",
            (mayor,),
            lambda v: f"The mayor of {t} is {v}.",
            w.fake_person(),
        ),
    )
    day = a["market"]
    d.add(
        f"A market is held in {t} every {day}, "
        "when farmers from the surrounding villages sell their produce.",
        _probe(
            "town.market",
            f"On which day of the week is the market held in {t}?",
            (day, day + "s"),
            lambda v: f"A market is held in {t} every {v}.",
            _fake_pool(day, _WEEKDAYS),
        ),
    )
    return d


def _organisation_draft(e: _Ent, w: _World, rng: random.Random, max_intro: int) -> _Draft:
    a = e.attrs
    o = e.title
    desc, founder, year = a["desc"], a["founder"], a["year"]
    p_year = _probe(
        "organisation.year",
        f"In which year was the {o} founded?",
        (str(year),),
        lambda v: f"The {o} was founded in {v}.",
        _fake_year(year),
    )
    p_founder = _probe(
        "organisation.founder",
        f"Who founded the {o}?",
        (founder,),
        lambda v: f"The {o} was founded by {v}.",
        w.fake_person(),
    )
    use_year, use_founder = _cap(
        rng, [rng.random() < 0.75, rng.random() < (0.9 if a["founder_ent"] else 0.6)], max_intro
    )
    if use_year and use_founder:
        intro = _Sentence(
            f"The {o} is {_a(desc)} {desc} founded in {year} by {founder}.", [p_year, p_founder]
        )
    elif use_year:
        intro = _Sentence(f"The {o} is {_a(desc)} {desc} founded in {year}.", [p_year])
    elif use_founder:
        intro = _Sentence(f"The {o} is {_a(desc)} {desc} founded by {founder}.", [p_founder])
    else:
        intro = _Sentence(f"The {o} is {_a(desc)} {desc}.")
    refs = [a["founder_ent"]] if use_founder and a["founder_ent"] is not None else []
    d = _Draft(intro, refs, tuple(f.format(T=o) for f in _FILLERS["organisation"]))
    hq = a["hq"]
    d.add(
        f"Its headquarters are in the town of {hq}, in a tall building near the main square.",
        _probe(
            "organisation.hq",
            f"In which town does the {o} have its headquarters?",
            (hq, f"the town of {hq}"),
            lambda v: f"The {o} has its headquarters in {v}.",
            w.fake_town(hq),
        ),
        [a["hq_ent"]],
    )
    members = a["members"]
    d.add(
        f"The {o} has {_fmt(members)} members, most of whom live nearby.",
        _probe(
            "organisation.members",
            f"How many members does the {o} have?",
            _num_answers(members),
            lambda v: f"The {o} has {v} members.",
            _fake_num(members),
        ),
    )
    emblem = a["emblem"]
    d.add(
        f"Its emblem is {_a(emblem)} {emblem}, which appears on all of its letters.",
        _probe(
            "organisation.emblem",
            f"What is the emblem of the {o}?",
            (emblem,),
            lambda v: f"The emblem of the {o} is {_a(v)} {v}.",
            lambda r: (
                f"{r.choice(_EMBLEM_COLOURS)} {r.choice([x for x in _EMBLEM_ANIMALS if x not in emblem])}"
            ),
        ),
    )
    month = a["assembly"]
    d.add(
        f"The {o} holds its annual assembly every {month}, when the members elect their officers.",
        _probe(
            "organisation.assembly",
            f"In which month does the {o} hold its annual assembly?",
            (month,),
            lambda v: f"The {o} holds its annual assembly every {v}.",
            _fake_pool(month, _MONTHS),
        ),
    )
    leader = a["leader"]
    d.add(
        f"The {o} is currently led by {leader}, who took office a few years ago.",
        _probe(
            "organisation.leader",
            f"Who currently leads the {o}?",
            (leader,),
            lambda v: f"The {o} is currently led by {v}.",
            w.fake_person(),
        ),
    )
    return d


def _device_draft(e: _Ent, w: _World, rng: random.Random, max_intro: int) -> _Draft:
    a = e.attrs
    dv = e.title
    desc, inventor, year = a["desc"], a["inventor"], a["year"]
    p_inv = _probe(
        "device.inventor",
        f"Who invented the {dv}?",
        (inventor,),
        lambda v: f"The {dv} was invented by {v}.",
        w.fake_person(),
    )
    p_year = _probe(
        "device.year",
        f"In which year was the {dv} invented?",
        (str(year),),
        lambda v: f"The {dv} was invented in {v}.",
        _fake_year(year),
    )
    use_inv, use_year = _cap(
        rng, [rng.random() < (0.9 if a["inventor_ent"] else 0.7), rng.random() < 0.75], max_intro
    )
    if use_inv and use_year:
        intro = _Sentence(f"The {dv} is {_a(desc)} {desc} invented by {inventor} in {year}.", [p_inv, p_year])
    elif use_inv:
        intro = _Sentence(f"The {dv} is {_a(desc)} {desc} invented by {inventor}.", [p_inv])
    elif use_year:
        intro = _Sentence(f"The {dv} is {_a(desc)} {desc} invented in {year}.", [p_year])
    else:
        intro = _Sentence(f"The {dv} is {_a(desc)} {desc} of unusual design.")
    refs = [a["inventor_ent"]] if use_inv and a["inventor_ent"] is not None else []
    d = _Draft(intro, refs, tuple(f.format(T=dv) for f in _FILLERS["device"]))
    material = a["material"]
    d.add(
        f"Its frame is made of {material}, which made it sturdy but expensive.",
        _probe(
            "device.material",
            f"What material is the frame of the {dv} made of?",
            (material,),
            lambda v: f"The frame of the {dv} is made of {v}.",
            _fake_pool(material, _MATERIALS),
        ),
    )
    weight = a["weight"]
    d.add(
        f"The {dv} weighs {_fmt(weight)} kilograms.",
        _probe(
            "device.weight",
            f"How many kilograms does the {dv} weigh?",
            _num_answers(weight, "kilograms"),
            lambda v: f"The {dv} weighs {v} kilograms.",
            _fake_num(weight),
        ),
    )
    users, user = a["users"]
    d.add(
        f"It was used mainly by {users}, who valued its reliability.",
        _probe(
            "device.users",
            f"Who mainly used the {dv}?",
            (users, user),
            lambda v: f"The {dv} was used mainly by {v}.",
            _fake_pool(users, [u for u, _ in _DEVICE_USERS]),
        ),
    )
    town = a["town"]
    d.add(
        f"The first {dv} was built in a workshop in {town}.",
        _probe(
            "device.town",
            f"In which town was the first {dv} built?",
            (town, f"the town of {town}"),
            lambda v: f"The first {dv} was built in {v}.",
            w.fake_town(town),
        ),
        [a["town_ent"]],
    )
    units = a["units"]
    d.add(
        f"Only {units} copies of the {dv} were ever made, and few of them survive.",
        _probe(
            "device.units",
            f"How many copies of the {dv} were ever made?",
            _num_answers(units),
            lambda v: f"Only {v} copies of the {dv} were ever made.",
            _fake_num(units),
        ),
    )
    colour = a["colour"]
    d.add(
        f"It was usually painted {colour} to protect it from damp.",
        _probe(
            "device.colour",
            f"What colour was the {dv} usually painted?",
            (colour,),
            lambda v: f"The {dv} was usually painted {v}.",
            _fake_pool(colour, _COLOURS),
        ),
    )
    return d


def _ship_draft(e: _Ent, w: _World, rng: random.Random, max_intro: int) -> _Draft:
    a = e.attrs
    s = e.title
    kind, year = a["type"], a["year"]
    if _cap(rng, [rng.random() < 0.8], max_intro)[0]:
        intro = _Sentence(
            f"The {s} was {_a(kind)} {kind} launched in {year}.",
            [
                _probe(
                    "ship.year",
                    f"In which year was the {s} launched?",
                    (str(year),),
                    lambda v: f"The {s} was launched in {v}.",
                    _fake_year(year),
                )
            ],
        )
    else:
        intro = _Sentence(f"The {s} was {_a(kind)} {kind} built for coastal trade.")
    d = _Draft(intro, [], tuple(f.format(T=s) for f in _FILLERS["ship"]))
    port = a["port"]
    d.add(
        f"Its home port was {port}, where it spent every winter.",
        _probe(
            "ship.port",
            f"What was the home port of the {s}?",
            (port, f"the port of {port}"),
            lambda v: f"The home port of the {s} was {v}.",
            w.fake_town(port),
        ),
        [a["port_ent"]],
    )
    builder = a["builder"]
    if builder is not None:
        d.add(
            f"The {s} was built by the {builder.title}.",
            _probe(
                "ship.builder",
                f"Which company built the {s}?",
                (builder.title,),
                lambda v: f"The {s} was built by the {v}.",
                w.fake_word("stem", " Company"),
            ),
            [builder],
            preferred=True,
        )
    captain = a["captain"]
    d.add(
        f"Its first captain was {captain}, who commanded it for many years.",
        _probe(
            "ship.captain",
            f"Who was the first captain of the {s}?",
            (captain,),
            lambda v: f"The first captain of the {s} was {v}.",
            w.fake_person(),
        ),
    )
    length = a["length"]
    d.add(
        f"The {s} was {length} metres long.",
        _probe(
            "ship.length",
            f"How long was the {s}, in metres?",
            _num_answers(length, "metres"),
            lambda v: f"The {s} was {v} metres long.",
            _fake_num(length),
        ),
    )
    hull = a["hull"]
    d.add(
        f"Its hull was painted {hull}, which made it easy to recognise at sea.",
        _probe(
            "ship.hull",
            f"What colour was the hull of the {s}?",
            (hull,),
            lambda v: f"The hull of the {s} was painted {v}.",
            _fake_pool(hull, _COLOURS),
        ),
    )
    cargo = a["cargo"]
    d.add(
        f"For most of its career the {s} carried {cargo}.",
        _probe(
            "ship.cargo",
            f"What did the {s} carry for most of its career?",
            (cargo,),
            lambda v: f"For most of its career the {s} carried {v}.",
            _fake_pool(cargo, _CARGOES),
        ),
    )
    crew = a["crew"]
    d.add(
        f"The {s} sailed with a crew of {crew}.",
        _probe(
            "ship.crew",
            f"How many crew members did the {s} sail with?",
            _num_answers(crew),
            lambda v: f"The {s} sailed with a crew of {v}.",
            _fake_num(crew),
        ),
    )
    return d


def _festival_draft(e: _Ent, w: _World, rng: random.Random, max_intro: int) -> _Draft:
    a = e.attrs
    f = e.title
    kind, month, town = a["type"], a["month"], a["town"]
    p_month = _probe(
        "festival.month",
        f"In which month is the {f} held?",
        (month,),
        lambda v: f"The {f} is held every {v}.",
        _fake_pool(month, _MONTHS),
    )
    p_town = _probe(
        "festival.town",
        f"In which town is the {f} held?",
        (town, f"the town of {town}"),
        lambda v: f"The {f} is held in {v}.",
        w.fake_town(town),
    )
    use_month, use_town = _cap(rng, [rng.random() < 0.75, rng.random() < 0.8], max_intro)
    if use_month and use_town:
        intro = _Sentence(f"The {f} is {_a(kind)} {kind} held every {month} in {town}.", [p_month, p_town])
    elif use_month:
        intro = _Sentence(f"The {f} is {_a(kind)} {kind} held every {month}.", [p_month])
    elif use_town:
        intro = _Sentence(f"The {f} is {_a(kind)} {kind} held in {town}.", [p_town])
    else:
        intro = _Sentence(f"The {f} is {_a(kind)} {kind}.")
    refs = [a["town_ent"]] if use_town and a["town_ent"] is not None else []
    d = _Draft(intro, refs, tuple(x.format(T=f) for x in _FILLERS["festival"]))
    first = a["first"]
    d.add(
        f"It was first held in {first}, and it has taken place almost every year since.",
        _probe(
            "festival.first",
            f"In which year was the {f} first held?",
            (str(first),),
            lambda v: f"The {f} was first held in {v}.",
            _fake_year(first),
        ),
    )
    days = a["days"]
    d.add(
        f"The festival lasts {days} days, with events in the streets and the main square.",
        _probe(
            "festival.days",
            f"How many days does the {f} last?",
            _num_answers(days, "days"),
            lambda v: f"The {f} lasts {v} days.",
            _fake_pool(str(days), [str(x) for x in range(2, 10)]),
        ),
    )
    dish = a["dish"]
    d.add(
        f"The traditional dish of the {f} is {dish}.",
        _probe(
            "festival.dish",
            f"What is the traditional dish of the {f}?",
            (dish,),
            lambda v: f"The traditional dish of the {f} is {v}.",
            _fake_pool(dish, _DISHES),
        ),
    )
    masks = a["masks"]
    d.add(
        f"Dancers at the festival wear {masks} masks during the evening parade.",
        _probe(
            "festival.masks",
            f"What colour are the masks worn by dancers at the {f}?",
            (masks,),
            lambda v: f"Dancers at the {f} wear {v} masks.",
            _fake_pool(masks, _COLOURS),
        ),
    )
    organiser = a["organiser"]
    if organiser is not None:
        d.add(
            f"It is organised by the {organiser.title}.",
            _probe(
                "festival.organiser",
                f"Which organisation organises the {f}?",
                (organiser.title,),
                lambda v: f"The {f} is organised by the {v}.",
                w.fake_word("stem", " " + organiser.attrs["word"]),
            ),
            [organiser],
            preferred=True,
        )
    visitors = _fmt(a["visitors"])
    d.add(
        f"About {visitors} visitors come to the {f} each year.",
        _probe(
            "festival.visitors",
            f"About how many visitors come to the {f} each year?",
            (visitors,),
            lambda v: f"About {v} visitors come to the {f} each year.",
            _fake_num(a["visitors"]),
        ),
    )
    return d


_DRAFTERS: dict[str, Callable[[_Ent, _World, random.Random, int], _Draft]] = {
    "person": _person_draft,
    "town": _town_draft,
    "organisation": _organisation_draft,
    "device": _device_draft,
    "ship": _ship_draft,
    "festival": _festival_draft,
}

_ID_PREFIX = {
    "person": "person",
    "town": "town",
    "organisation": "org",
    "device": "device",
    "ship": "ship",
    "festival": "festival",
}
_PRONOUN_START = ("It ", "Its ", "He ", "She ", "His ", "Her ")
_PARTNER_SHARED = {
    "person": ("surname", "profession", "town"),
    "town": ("stem", "province"),
    "organisation": ("word", "hq"),
    "device": ("word", "material"),
    "ship": ("type", "port"),
    "festival": ("type", "town"),
}


def _compose(e: _Ent, w: _World, rng: random.Random) -> tuple[str, list[_Probe], list[_Ent]]:
    """Draft a document with 4-6 facts (at least 2 outside the opening sentence), add filler sentences up to
    the word budget; return text, probes, refs."""
    target = rng.randint(4, 6)
    draft = _DRAFTERS[e.kind](e, w, rng, target - 2)
    k = max(0, target - len(draft.intro.probes))
    preferred = [i for i, (_, _, pref) in enumerate(draft.body) if pref and rng.random() < 0.85]
    rest = [i for i in range(len(draft.body)) if i not in preferred]
    rng.shuffle(rest)
    chosen = sorted((preferred + rest)[:k])
    sentences = [draft.intro.text] + [draft.body[i][0].text for i in chosen]
    probes = list(draft.intro.probes) + [p for i in chosen for p in draft.body[i][0].probes]
    refs = list(draft.intro_refs) + [r for i in chosen for r in draft.body[i][1]]
    fillers = list(draft.fillers)
    rng.shuffle(fillers)
    words = sum(len(x.split()) for x in sentences)
    extra = rng.random() < 0.3  # sometimes one filler more than needed, for variety
    while fillers and (words < MIN_WORDS or extra):
        filler = fillers.pop()
        if words + len(filler.split()) > MAX_WORDS:
            break
        if words >= MIN_WORDS:
            extra = False
        # never put a filler in front of a sentence that starts with a pronoun (its referent would change)
        slots = [len(sentences)] + [
            i for i in range(1, len(sentences)) if not sentences[i].startswith(_PRONOUN_START)
        ]
        sentences.insert(rng.choice(slots), filler)
        words += len(filler.split())
    unique_refs: list[_Ent] = []
    for r in refs:
        if all(r is not u for u in unique_refs):
            unique_refs.append(r)
    return " ".join(sentences), probes, unique_refs


def _check_params(
    n_docs: Any, seed: Any, questions_per_doc: Any, fact_checks_per_doc: Any
) -> tuple[int, int]:
    if isinstance(n_docs, bool) or not isinstance(n_docs, int) or not 1 <= n_docs <= MAX_DOCS:
        raise ConfigError(f"n_docs must be an integer in [1, {MAX_DOCS}], got {n_docs!r}", field="n_docs")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}", field="seed")
    try:
        lo, hi = questions_per_doc
    except (TypeError, ValueError):
        raise ConfigError(
            f"questions_per_doc must be a (min, max) pair, got {questions_per_doc!r}",
            field="questions_per_doc",
        ) from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or not 0 <= lo <= hi:
        raise ConfigError(
            f"questions_per_doc must satisfy 0 <= min <= max, got {questions_per_doc!r}",
            field="questions_per_doc",
        )
    if (
        isinstance(fact_checks_per_doc, bool)
        or not isinstance(fact_checks_per_doc, int)
        or fact_checks_per_doc < 0
    ):
        raise ConfigError(
            f"fact_checks_per_doc must be an integer >= 0, got {fact_checks_per_doc!r}",
            field="fact_checks_per_doc",
        )
    return lo, hi


def make_benchmark(
    n_docs: int,
    seed: int,
    *,
    questions_per_doc: tuple[int, int] = (3, 5),
    fact_checks_per_doc: int = 2,
) -> Benchmark:
    """Generate a benchmark of ``n_docs`` fictional entities (one document each) from ``seed``.

    Each document gets ``questions_per_doc`` = (min, max) QA questions (at most one per fact) and
    ``fact_checks_per_doc`` true/false claims (preferably on facts the QA questions do not ask about); over
    the benchmark, ``ceil(F/2)`` claims are true and ``floor(F/2)`` false. Deterministic in its arguments.
    """
    q_lo, q_hi = _check_params(n_docs, seed, questions_per_doc, fact_checks_per_doc)
    tasks = make_task_sets()
    rng = random.Random(seed)
    names = NameMaker(rng, _reserved_words(tasks))
    world = _World(n_docs, rng, names)
    ents = [e for k in KINDS for e in world.by_kind[k]]
    rng.shuffle(ents)
    for e in ents:
        e.doc_id = f"{_ID_PREFIX[e.kind]}-{_slug(' '.join(e.invented))}"

    documents: list[DocumentRecord] = []
    texts: dict[str, str] = {}
    doc_probes: list[list[_Probe]] = []
    for e in ents:
        text, probes, refs = _compose(e, world, rng)
        e.refs = [r for r in refs if r is not e]
        documents.append(DocumentRecord(id=e.doc_id, title=e.title, text=text))
        texts[e.doc_id] = text
        doc_probes.append(probes)

    # values of each attribute as stated in the documents: the source of false claims (a document states
    # each attribute at most once, so "another value" always comes from another document)
    stated: dict[str, dict[str, str]] = {}
    for probes in doc_probes:
        for p in probes:
            stated.setdefault(p.slot, {}).setdefault(p.value, _norm(p.value))
    pools = {slot: sorted(values.items()) for slot, values in stated.items()}

    questions: list[QuestionRecord] = []
    pending: list[tuple[_Ent, _Probe, int]] = []  # fact checks: entity, probe, position in `questions`
    for e, probes in zip(ents, doc_probes):
        n_q = min(len(probes), rng.randint(q_lo, q_hi))
        asked = sorted(rng.sample(range(len(probes)), n_q))
        for j, i in enumerate(asked, 1):
            p = probes[i]
            questions.append(
                QuestionRecord(f"{e.doc_id}.q{j}", rng.choice(p.questions), p.answers, e.doc_id, TASK_QA)
            )
        others = [i for i in range(len(probes)) if i not in asked]
        rng.shuffle(others)
        again = list(asked)
        rng.shuffle(again)
        for j, i in enumerate((others + again)[:fact_checks_per_doc], 1):
            pending.append((e, probes[i], len(questions)))
            questions.append(QuestionRecord(f"{e.doc_id}.f{j}", "", (), e.doc_id, TASK_FACT))
    labels = [True] * (len(pending) - len(pending) // 2) + [False] * (len(pending) // 2)
    rng.shuffle(labels)
    for (_e, p, pos), label in zip(pending, labels):
        if label:
            claim = p.claim(p.value)
        else:
            true_key = _norm(p.value)
            options = [v for v, key in pools.get(p.slot, ()) if key != true_key]
            value = rng.choice(options) if options else p.fake(rng)
            claim = p.claim(value)
        q = questions[pos]
        answer = "true" if label else "false"
        questions[pos] = QuestionRecord(q.id, f"True or false: {claim}", (answer,), q.doc_id, TASK_FACT)

    confusers: list[Confuser] = []
    for e in ents:
        if e.partner is not None:
            a, b = e.partner, e
            shared = tuple(
                v
                for v in (str(a.attrs[k]) for k in _PARTNER_SHARED[e.kind])
                if v in texts[a.doc_id] and v in texts[b.doc_id]
            )
            if shared:
                confusers.append(Confuser(a.doc_id, b.doc_id, e.partner_reason, shared))
        for r in e.refs:
            confusers.append(Confuser(e.doc_id, r.doc_id, "mentions", (r.title,)))

    return Benchmark(
        name=f"synthetic-{n_docs}-seed{seed}",
        seed=seed,
        documents=documents,
        questions=questions,
        tasks=tasks,
        entities=[Entity(e.doc_id, e.kind, e.title, e.invented) for e in ents],
        confusers=confusers,
        names=tuple(sorted(names.used)),
    )


# ---- task-adapter training sets (common knowledge; never a benchmark entity) ------------------------------

# (swap group, claim template with {} for the value, question, answer). False claims put in the answer of
# another fact of the same group.
_CAPITALS = (
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Turkey", "Ankara"),
    ("Thailand", "Bangkok"),
)  # fmt: skip
_COMMON_FACTS: tuple[tuple[str, str, str, str], ...] = tuple(
    ("capital", f"The capital of {country} is {{}}.", f"What is the capital of {country}?", city)
    for country, city in _CAPITALS
) + (
    ("planet", "{} is the largest planet in the Solar System.",
     "Which planet is the largest in the Solar System?", "Jupiter"),
    ("planet", "{} is the planet closest to the Sun.", "Which planet is closest to the Sun?", "Mercury"),
    ("planet", "{} is known as the Red Planet.", "Which planet is known as the Red Planet?", "Mars"),
    ("planet", "{} is the planet we live on.", "Which planet do we live on?", "Earth"),
    ("planet", "{} is the hottest planet in the Solar System.",
     "Which planet is the hottest in the Solar System?", "Venus"),
    ("planet", "{} is the planet farthest from the Sun.",
     "Which planet is farthest from the Sun?", "Neptune"),
    ("symbol", "The chemical symbol for gold is {}.", "What is the chemical symbol for gold?", "Au"),
    ("symbol", "The chemical symbol for silver is {}.", "What is the chemical symbol for silver?", "Ag"),
    ("symbol", "The chemical symbol for iron is {}.", "What is the chemical symbol for iron?", "Fe"),
    ("symbol", "The chemical symbol for sodium is {}.", "What is the chemical symbol for sodium?", "Na"),
    ("symbol", "The chemical symbol for oxygen is {}.", "What is the chemical symbol for oxygen?", "O"),
    ("symbol", "The chemical symbol for helium is {}.", "What is the chemical symbol for helium?", "He"),
    ("symbol", "The chemical symbol for lead is {}.", "What is the chemical symbol for lead?", "Pb"),
    ("animal", "The tallest animal in the world is the {}.",
     "What is the tallest animal in the world?", "giraffe"),
    ("animal", "The fastest land animal is the {}.", "What is the fastest land animal?", "cheetah"),
    ("animal", "The largest animal on Earth is the {}.",
     "What is the largest animal on Earth?", "blue whale"),
    ("animal", "The only mammal that can truly fly is the {}.", "Which mammal can truly fly?", "bat"),
    ("animal", "The flightless bird that lives in Antarctica is the {}.",
     "Which flightless bird lives in Antarctica?", "penguin"),
    ("animal", "The black and white bear that eats bamboo is the {}.",
     "Which black and white bear eats bamboo?", "giant panda"),
    ("animal", "The animal that stores fat in its hump is the {}.",
     "Which animal stores fat in its hump?", "camel"),
    ("animal", "The animal that carries its young in a pouch and lives in Australia is the {}.",
     "Which Australian animal carries its young in a pouch?", "kangaroo"),
    ("number", "A spider has {} legs.", "How many legs does a spider have?", "8"),
    ("number", "A week has {} days.", "How many days are in a week?", "7"),
    ("number", "An insect has {} legs.", "How many legs does an insect have?", "6"),
    ("number", "An hour has {} minutes.", "How many minutes are in an hour?", "60"),
    ("number", "A day has {} hours.", "How many hours are in a day?", "24"),
    ("number", "A year has {} months.", "How many months are in a year?", "12"),
    ("number", "A triangle has {} sides.", "How many sides does a triangle have?", "3"),
    ("number", "A right angle measures {} degrees.", "How many degrees are in a right angle?", "90"),
    ("number", "At sea level water boils at {} degrees Celsius.",
     "At how many degrees Celsius does water boil at sea level?", "100"),
    ("number", "A standard piano has {} keys.", "How many keys does a standard piano have?", "88"),
    ("number", "There are {} planets in the Solar System.", "How many planets are in the Solar System?", "8"),
    ("number", "A football team has {} players on the field.",
     "How many players does a football team have on the field?", "11"),
    ("number", "A leap year has {} days.", "How many days does a leap year have?", "366"),
    ("gas", "Plants take in {} from the air to make food.",
     "Which gas do plants take in from the air to make food?", "carbon dioxide"),
    ("gas", "The gas humans need to breathe in to live is {}.",
     "Which gas do humans need to breathe in to live?", "oxygen"),
    ("gas", "The most common gas in Earth's atmosphere is {}.",
     "What is the most common gas in Earth's atmosphere?", "nitrogen"),
    ("gas", "Balloons that float in the air are often filled with {}.",
     "Which gas are floating balloons often filled with?", "helium"),
    ("organ", "The organ that pumps blood around the body is the {}.",
     "Which organ pumps blood around the body?", "heart"),
    ("organ", "The largest organ of the human body is the {}.",
     "What is the largest organ of the human body?", "skin"),
    ("organ", "The organ we think with is the {}.", "Which organ do we think with?", "brain"),
    ("organ", "The organ where swallowed food is first broken down is the {}.",
     "In which organ is swallowed food first broken down?", "stomach"),
    ("author", "{} wrote the play Hamlet.", "Who wrote the play Hamlet?", "William Shakespeare"),
    ("author", "{} wrote the novel Pride and Prejudice.",
     "Who wrote the novel Pride and Prejudice?", "Jane Austen"),
    ("author", "{} wrote the novel War and Peace.", "Who wrote the novel War and Peace?", "Leo Tolstoy"),
    ("author", "{} wrote the novel Oliver Twist.", "Who wrote the novel Oliver Twist?", "Charles Dickens"),
    ("author", "{} wrote the novel Don Quixote.", "Who wrote the novel Don Quixote?", "Miguel de Cervantes"),
    ("author", "{} wrote the novel Les Miserables.", "Who wrote the novel Les Miserables?", "Victor Hugo"),
    ("painter", "{} painted the Mona Lisa.", "Who painted the Mona Lisa?", "Leonardo da Vinci"),
    ("painter", "{} painted The Starry Night.", "Who painted The Starry Night?", "Vincent van Gogh"),
    ("painter", "{} painted Guernica.", "Who painted Guernica?", "Pablo Picasso"),
    ("painter", "{} painted The Night Watch.", "Who painted The Night Watch?", "Rembrandt"),
    ("city", "The Eiffel Tower is in {}.", "In which city is the Eiffel Tower?", "Paris"),
    ("city", "The Colosseum is in {}.", "In which city is the Colosseum?", "Rome"),
    ("city", "The Statue of Liberty is in {}.", "In which city is the Statue of Liberty?", "New York"),
    ("city", "Big Ben is in {}.", "In which city is Big Ben?", "London"),
    ("city", "The Sagrada Familia is in {}.", "In which city is the Sagrada Familia?", "Barcelona"),
    ("country", "The pyramids of Giza are in {}.", "In which country are the pyramids of Giza?", "Egypt"),
    ("country", "The Taj Mahal is in {}.", "In which country is the Taj Mahal?", "India"),
    ("country", "Machu Picchu is in {}.", "In which country is Machu Picchu?", "Peru"),
    ("country", "The city of Kyoto is in {}.", "In which country is the city of Kyoto?", "Japan"),
    ("country", "The Great Wall is in {}.", "In which country is the Great Wall?", "China"),
    ("year", "World War II ended in {}.", "In which year did World War II end?", "1945"),
    ("year", "The first crewed Moon landing took place in {}.",
     "In which year did the first crewed Moon landing take place?", "1969"),
    ("year", "Christopher Columbus first reached the Americas in {}.",
     "In which year did Christopher Columbus first reach the Americas?", "1492"),
    ("year", "The Berlin Wall fell in {}.", "In which year did the Berlin Wall fall?", "1989"),
    ("year", "World War I began in {}.", "In which year did World War I begin?", "1914"),
    ("year", "The Titanic sank in {}.", "In which year did the Titanic sink?", "1912"),
    ("place", "The largest ocean on Earth is the {}.",
     "What is the largest ocean on Earth?", "Pacific Ocean"),
    ("place", "The longest river in Africa is the {}.", "What is the longest river in Africa?", "Nile"),
    ("place", "The largest hot desert on Earth is the {}.",
     "What is the largest hot desert on Earth?", "Sahara"),
    ("place", "The largest rainforest on Earth is the {}.",
     "What is the largest rainforest on Earth?", "Amazon"),
    ("colour", "On a clear day the sky is {}.", "What colour is the sky on a clear day?", "blue"),
    ("colour", "A ripe banana is {}.", "What colour is a ripe banana?", "yellow"),
    ("colour", "Fresh snow is {}.", "What colour is fresh snow?", "white"),
    ("colour", "A ripe tomato is {}.", "What colour is a ripe tomato?", "red"),
    ("colour", "Fresh grass is {}.", "What colour is fresh grass?", "green"),
    ("language", "The main language of Brazil is {}.", "What is the main language of Brazil?", "Portuguese"),
    ("language", "The main language of Mexico is {}.", "What is the main language of Mexico?", "Spanish"),
    ("language", "The main language of Austria is {}.", "What is the main language of Austria?", "German"),
    ("language", "The main language of the Netherlands is {}.",
     "What is the main language of the Netherlands?", "Dutch"),
    ("currency", "The currency of Japan is the {}.", "What is the currency of Japan?", "yen"),
    ("currency", "The currency of India is the {}.", "What is the currency of India?", "rupee"),
    ("currency", "The currency of the United States is the {}.",
     "What is the currency of the United States?", "dollar"),
    ("currency", "The currency of Germany is the {}.", "What is the currency of Germany?", "euro"),
    ("currency", "The currency of the United Kingdom is the {}.",
     "What is the currency of the United Kingdom?", "pound"),
)  # fmt: skip

# Extra short-answer items: (question, answer).
_SHORT_EXTRA: tuple[tuple[str, str], ...] = (
    ("What do bees make?", "honey"), ("What is frozen water called?", "ice"),
    ("Which season comes after winter?", "spring"), ("What is the first month of the year?", "January"),
    ("Which day comes after Monday?", "Tuesday"), ("How many wheels does a bicycle have?", "2"),
    ("What do caterpillars turn into?", "butterflies"), ("What is a young cat called?", "kitten"),
    ("What is a young dog called?", "puppy"), ("What is a young cow called?", "calf"),
    ("What is a young sheep called?", "lamb"), ("What is a young horse called?", "foal"),
    ("What is a young frog called?", "tadpole"), ("What is the plural of mouse?", "mice"),
    ("What is the plural of child?", "children"), ("What is the plural of foot?", "feet"),
    ("What is the plural of tooth?", "teeth"), ("What is the plural of goose?", "geese"),
    ("What colour do you get by mixing blue and yellow?", "green"),
    ("What colour do you get by mixing red and white?", "pink"),
    ("What colour do you get by mixing red and yellow?", "orange"),
    ("What is the largest continent?", "Asia"),
    ("Which ocean lies between Europe and North America?", "Atlantic Ocean"),
    ("Which metal is liquid at room temperature?", "mercury"),
    ("What is the main ingredient of guacamole?", "avocado"),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
    ("Who developed the theory of relativity?", "Albert Einstein"),
    ("Who discovered penicillin?", "Alexander Fleming"),
    ("Who painted the ceiling of the Sistine Chapel?", "Michelangelo"),
    ("Who was the first President of the United States?", "George Washington"),
    ("In which country did the ancient Olympic Games begin?", "Greece"),
    ("What is the hardest natural substance?", "diamond"),
    ("What force pulls objects towards the ground?", "gravity"),
    ("Which bird is a common symbol of peace?", "dove"),
    ("What is the largest bone in the human body?", "femur"),
    ("How many teeth does an adult human usually have?", "32"), ("What is the square root of 81?", "9"),
    ("How many sides does a square have?", "4"), ("What shape has three sides?", "triangle"),
    ("Which gas do humans breathe out?", "carbon dioxide"), ("What is the opposite of hot?", "cold"),
    ("What is the opposite of early?", "late"), ("What is the opposite of heavy?", "light"),
    ("What is the opposite of ancient?", "modern"), ("What is the opposite of empty?", "full"),
    ("What is the opposite of narrow?", "wide"), ("What is the opposite of quiet?", "loud"),
    ("What is the opposite of rough?", "smooth"), ("What is the opposite of shallow?", "deep"),
    ("What is the opposite of victory?", "defeat"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("How many legs does a cow have?", "4"), ("What do you call a house made of ice blocks?", "igloo"),
    ("Which instrument measures temperature?", "thermometer"),
    ("In which year did the twentieth century begin?", "1901"),
    ("Which is the smallest prime number?", "2"), ("How many centimetres are in a metre?", "100"),
    ("How many grams are in a kilogram?", "1000"),
    ("What is the freezing point of water in degrees Celsius?", "0"),
    ("In which city is the Brandenburg Gate?", "Berlin"), ("What colour are emeralds?", "green"),
    ("How many strings does a violin have?", "4"), ("What is the highest mountain in Africa?", "Kilimanjaro"),
    ("Which animal builds dams across rivers?", "beaver"), ("What do giant pandas mainly eat?", "bamboo"),
    ("What is the main language of Argentina?", "Spanish"), ("Who wrote the Iliad?", "Homer"),
    ("Who composed The Four Seasons?", "Antonio Vivaldi"), ("In which year did World War II begin?", "1939"),
    ("How many players does a basketball team have on the court?", "5"),
    ("What is the currency of Switzerland?", "Swiss franc"),
    ("In which country is the city of Venice?", "Italy"), ("What is the largest country by area?", "Russia"),
    ("What do you call a scientist who studies rocks?", "geologist"),
    ("What do you call a person who bakes bread?", "baker"),
    ("Which month has the fewest days?", "February"), ("How many continents are there?", "7"),
)  # fmt: skip
_ARITHMETIC = (
    (7, 5), (12, 9), (23, 14), (8, 6), (15, 15), (31, 12), (9, 4), (40, 25), (17, 8), (6, 3), (11, 11),
    (50, 30), (4, 7), (13, 6), (26, 19),
)  # fmt: skip


def make_task_sets() -> dict[str, list[TaskExample]]:
    """The two task-adapter training sets (fixed; independent of any benchmark seed).

    ``fact_check``: one true and one false claim per common-knowledge fact ("True or false: ...",
    answers "true"/"false"; the false one swaps in the answer of another fact of the same group).
    ``short_answer``: the facts as questions with 1-3 word answers, plus simple arithmetic, word forms and
    general knowledge, to teach a terse answer style.
    """
    rng = random.Random(20250707)
    fact: list[TaskExample] = []
    by_group: dict[str, list[str]] = {}
    for group, _, _, answer in _COMMON_FACTS:
        by_group.setdefault(group, []).append(answer)
    for group, claim, _, answer in _COMMON_FACTS:
        wrong = rng.choice([a for a in by_group[group] if a != answer])
        fact.append(TaskExample(f"True or false: {claim.format(answer)}", "true"))
        fact.append(TaskExample(f"True or false: {claim.format(wrong)}", "false"))
    rng.shuffle(fact)
    short = [TaskExample(q, a) for _, _, q, a in _COMMON_FACTS]
    short += [TaskExample(q, a) for q, a in _SHORT_EXTRA]
    for i, (x, y) in enumerate(_ARITHMETIC):
        if i % 3 == 0:
            short.append(TaskExample(f"What is {x} plus {y}?", str(x + y)))
        elif i % 3 == 1:
            short.append(TaskExample(f"What is {x} minus {y}?", str(x - y)))
        else:
            short.append(TaskExample(f"What is {x} times {y}?", str(x * y)))
    rng.shuffle(short)
    return {"fact_check": fact, "short_answer": short}


def _reserved_words(tasks: dict[str, list[TaskExample]]) -> frozenset[str]:
    """Lower-cased words that invented names must avoid: the task sets' and the templates' vocabulary."""
    texts: list[str] = []
    for examples in tasks.values():
        for ex in examples:
            texts += [ex.prompt, ex.answer]
    for pool in (
        _PROFESSIONS,
        _PETS,
        _INSTRUMENTS,
        _COLOURS,
        _EMBLEM_COLOURS,
        _EMBLEM_ANIMALS,
        _MATERIALS,
        _PRODUCTS,
        _WEEKDAYS,
        _MONTHS,
        _TOWN_SIZES,
        _SHIP_TYPES,
        _CARGOES,
        _FESTIVAL_TYPES,
        _DISHES,
    ):
        texts += list(pool)
    texts += [w for pair in _ORG_TYPES + _DEVICE_TYPES + _DEVICE_USERS for w in pair]
    texts += [f for fillers in _FILLERS.values() for f in fillers]
    return frozenset(w for t in texts for w in re.findall(r"[a-z]+", t.lower()))


# ---- demo instance (hand-written, hand-checked) ------------------------------------------------------------

_DEMO_DOCS = (
    ("person-veltrano-oskimar", "Veltrano Oskimar",
     ("Veltrano Oskimar was a glassblower born in 1873 in the town of Drelmouth. He learned the trade as an "
     "apprentice of his uncle, Bastor Quelvin. In 1904 he opened a small workshop on the harbour road of "
     "Drelmouth, where he made lamps, bottles and window panes. He kept a grey parrot named Pimsy, which sat "
     "on a perch beside the furnace. In 1921 he received the Varnessi Medal for his work on coloured glass. "
     "Veltrano Oskimar died in 1950.")),
    ("town-drelmouth", "Drelmouth",
     ("Drelmouth is a small harbour town in the province of Ostevar. It lies at the mouth of the Kesmer "
     "River. The town was founded in 1612 by fishing families. About 4,200 people live in Drelmouth today. "
     "The town is known for its blue glass, which local workshops have made for more than two centuries. A "
     "market is held in Drelmouth every Thursday. The streets of the old centre are narrow and paved with "
     "stone.")),
    ("org-brisovan-society", "Brisovan Society",
     ("The Brisovan Society is a society of amateur astronomers founded in 1898 by Ilvessa Trevane. Its "
     "headquarters are in the town of Molbury, in an old grain store with a telescope on the roof. The "
     "Brisovan Society has 340 members. Its emblem is a silver owl. Members meet on the first evening of "
     "each month to compare their observations and notebooks. The society publishes a short newsletter for "
     "its members every spring.")),
    ("device-quorran-loom", "Quorran Loom",
     ("The Quorran Loom is a weaving machine invented by Eddavin Vastrel in 1836. Its frame is made of "
     "walnut, and its moving parts are made of brass. The Quorran Loom weighs 85 kilograms. It was used "
     "mainly by carpet makers in the valley towns. Only 40 copies of the Quorran Loom were ever made. A "
     "restored example is kept in a private collection.")),
    ("ship-tessaline", "Tessaline",
     ("The Tessaline was a three-masted schooner launched in 1889. Its home port was Drelmouth, where it had "
     "been built in the harbour yard. Its first captain was Morvessa Kaldrik. The Tessaline was 46 metres "
     "long. Its hull was painted dark green. For most of its career the Tessaline carried salt and timber "
     "along the coast. Sailors considered it a steady and reliable vessel.")),
)  # fmt: skip
_DEMO_QUESTIONS = (
    ("person-veltrano-oskimar", "qa", "In which town was Veltrano Oskimar born?",
     ("Drelmouth", "the town of Drelmouth")),
    ("person-veltrano-oskimar", "qa", "What was the name of Veltrano Oskimar's parrot?", ("Pimsy",)),
    ("person-veltrano-oskimar", "qa", "Which medal did Veltrano Oskimar receive in 1921?",
     ("Varnessi Medal", "Varnessi")),
    ("person-veltrano-oskimar", "fact", "True or false: Veltrano Oskimar was a glassblower.", ("true",)),
    ("town-drelmouth", "qa", "In which province is Drelmouth?", ("Ostevar", "the province of Ostevar")),
    ("town-drelmouth", "qa", "On which river does Drelmouth lie?", ("Kesmer", "Kesmer River")),
    ("town-drelmouth", "qa", "About how many people live in Drelmouth?", ("4,200",)),
    ("town-drelmouth", "fact", "True or false: Drelmouth was founded in 1790.", ("false",)),
    ("org-brisovan-society", "qa", "Who founded the Brisovan Society?", ("Ilvessa Trevane",)),
    ("org-brisovan-society", "qa", "What is the emblem of the Brisovan Society?", ("silver owl",)),
    ("org-brisovan-society", "qa", "How many members does the Brisovan Society have?", ("340",)),
    ("org-brisovan-society", "fact", "True or false: The Brisovan Society has its headquarters in Drelmouth.",
     ("false",)),
    ("device-quorran-loom", "qa", "Who invented the Quorran Loom?", ("Eddavin Vastrel",)),
    ("device-quorran-loom", "qa", "What material is the frame of the Quorran Loom made of?", ("walnut",)),
    ("device-quorran-loom", "qa", "In which year was the Quorran Loom invented?", ("1836",)),
    ("device-quorran-loom", "fact", "True or false: The Quorran Loom weighs 85 kilograms.", ("true",)),
    ("ship-tessaline", "qa", "Who was the first captain of the Tessaline?", ("Morvessa Kaldrik",)),
    ("ship-tessaline", "qa", "How long was the Tessaline, in metres?", ("46", "46 metres")),
    ("ship-tessaline", "qa", "What was the home port of the Tessaline?",
     ("Drelmouth", "the port of Drelmouth")),
    ("ship-tessaline", "fact", "True or false: The hull of the Tessaline was painted red.", ("false",)),
)  # fmt: skip
_DEMO_ENTITIES = (
    ("person-veltrano-oskimar", "person", ("Veltrano", "Oskimar")),
    ("town-drelmouth", "town", ("Drelmouth",)),
    ("org-brisovan-society", "organisation", ("Brisovan",)),
    ("device-quorran-loom", "device", ("Quorran",)),
    ("ship-tessaline", "ship", ("Tessaline",)),
)


def make_demo() -> Benchmark:
    """The small hand-checked instance of the package demo: 5 documents (person, town, organisation,
    device, ship), 3 QA questions and 1 fact check each. Three documents share the town name Drelmouth
    (the glassblower was born there, the ship's home port is there); no task sets."""
    documents = [DocumentRecord(id=i, title=t, text=x) for i, t, x in _DEMO_DOCS]
    titles = {i: t for i, t, _ in _DEMO_DOCS}
    counters: dict[tuple[str, str], int] = {}
    questions = []
    for doc_id, task, question, answers in _DEMO_QUESTIONS:
        n = counters[(doc_id, task)] = counters.get((doc_id, task), 0) + 1
        suffix = "q" if task == TASK_QA else "f"
        questions.append(QuestionRecord(f"{doc_id}.{suffix}{n}", question, answers, doc_id, task))
    confusers = [
        Confuser("person-veltrano-oskimar", "town-drelmouth", "mentions", ("Drelmouth",)),
        Confuser("ship-tessaline", "town-drelmouth", "mentions", ("Drelmouth",)),
        Confuser("person-veltrano-oskimar", "ship-tessaline", "shared-town", ("Drelmouth",)),
    ]
    return Benchmark(
        name="demo",
        seed=None,
        documents=documents,
        questions=questions,
        tasks={},
        entities=[Entity(i, k, titles[i], inv) for i, k, inv in _DEMO_ENTITIES],
        confusers=confusers,
        names=tuple(sorted({w.lower() for _, _, inv in _DEMO_ENTITIES for w in inv})),
    )


# ---- files -----------------------------------------------------------------------------------------------

DEFAULT_N_DOCS, DEFAULT_SEED = 60, 0


def write_benchmark(bench: Benchmark, out_dir: str | Path) -> dict[str, Path]:
    """Write ``documents.jsonl``, ``questions.jsonl``, ``tasks/<name>.jsonl`` (when the benchmark has task
    sets) and ``benchmark.json`` (generator version, seed, counts, confuser pairs) into ``out_dir``.

    Each file is written atomically; other files in ``out_dir`` are left alone. Returns the paths written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} exists and is not a folder", path=out)
    written = {
        "documents": out / "documents.jsonl",
        "questions": out / "questions.jsonl",
    }
    write_documents(written["documents"], bench.documents)
    write_questions(written["questions"], bench.questions)
    for task, examples in bench.tasks.items():
        path = out / TASK_FILES.get(task, f"tasks/{task}.jsonl")
        write_task_examples(path, examples)
        written[task] = path
    written["benchmark"] = out / "benchmark.json"
    atomic_write_json(written["benchmark"], bench.metadata())
    return written


__all__ = [
    "DATA_DIR",
    "DEFAULT_N_DOCS",
    "DEFAULT_SEED",
    "GENERATOR_VERSION",
    "KINDS",
    "TASK_FACT",
    "TASK_QA",
    "Benchmark",
    "Confuser",
    "Entity",
    "NameMaker",
    "make_benchmark",
    "make_demo",
    "make_task_sets",
    "packaged_path",
    "write_benchmark",
]
