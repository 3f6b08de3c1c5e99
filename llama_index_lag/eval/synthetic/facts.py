"""Documents from fact specs: the spec types a kind of entity is described by (:class:`KindSpec`), the
makers of fake values for false claims, and :func:`draft`, which turns an entity and its kind's spec into
a :class:`Draft` (the opening sentence, candidate fact sentences and fillers).

Templates are ``str.format`` strings rendered with the entity's *context*: its attributes, ``name`` (and
``T``, the fillers' name for it), and the keys its kind's ``context`` hook adds. Besides the standard
format specs (``{n:,}`` groups thousands), ``{x:a}`` renders a string ``x`` with its indefinite article
("an oak").
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..metrics import normalize_answer
from . import vocabulary as V
from .world import World, WorldEntity

Fake = Callable[[random.Random], str]
"""A plausible other value of an attribute, drawn from the RNG it is given (fallback for false claims)."""

FakeMaker = Callable[[World, Mapping[str, Any], str, str], Fake]
"""Makes the :data:`Fake` of one fact from the world, the entity's context, the attribute and the value."""

AnswerMaker = Callable[[Mapping[str, Any], str], Sequence[str]]
"""Makes the answers of one fact from the entity's context and the attribute."""

ALT_P = 0.5
"""Probability that a body sentence with two alternative facts states its first one."""

# ---- text helpers ----------------------------------------------------------------------------------------


def article(word: str) -> str:
    """The indefinite article for ``word``."""
    return "an" if word[:1].lower() in "aeiou" else "a"


def fmt(n: int) -> str:
    """``n`` with thousands separators."""
    return f"{n:,}"


def num_answers(n: int, unit: str | None = None) -> tuple[str, ...]:
    """The accepted answers for a number: digits, digits with ``unit``, and the word forms up to twenty."""
    out = [fmt(n)]
    if unit:
        out.append(f"{fmt(n)} {unit}")
    if n < len(V.NUMBER_WORDS):
        out.append(V.NUMBER_WORDS[n])
        if unit:
            out.append(f"{V.NUMBER_WORDS[n]} {unit}")
    return tuple(out)


class _Word(str):
    """A string with one more format spec, ``a``: the string with its indefinite article."""

    __slots__ = ()

    def __format__(self, format_spec: str) -> str:
        if format_spec == "a":
            return f"{article(self)} {self}"
        return str.__format__(self, format_spec)


class _Fields:
    """The fields of one :func:`render` call: ``extra`` over ``ctx``, strings as :class:`_Word`."""

    __slots__ = ("ctx", "extra")

    def __init__(self, ctx: Mapping[str, Any], extra: Mapping[str, Any]) -> None:
        self.ctx = ctx
        self.extra = extra

    def __getitem__(self, key: str) -> Any:
        value = self.extra[key] if key in self.extra else self.ctx[key]
        return _Word(value) if isinstance(value, str) else value


def render(template: str, ctx: Mapping[str, Any], **extra: Any) -> str:
    """``template`` formatted with ``ctx`` and ``extra`` (which wins)."""
    return template.format_map(_Fields(ctx, extra))


# ---- probes and drafts -----------------------------------------------------------------------------------


@dataclass
class Probe:
    """One checkable fact of a document."""

    slot: str  # "<kind>.<attribute>": the swap pool for false claims
    questions: tuple[str, ...]  # alternative phrasings, each naming the entity
    answers: tuple[str, ...]  # answers[0] occurs verbatim in the sentence
    claim: Callable[[str], str]  # claim sentence for a value of the attribute
    fake: Fake  # a plausible other value (fallback for false claims)

    @property
    def value(self) -> str:
        """The canonical answer."""
        return self.answers[0]


@dataclass
class Sentence:
    """A sentence of a document and the facts it states."""

    text: str
    probes: list[Probe] = field(default_factory=list)


@dataclass
class Draft:
    """A document before fact selection: the opening sentence (always kept), candidate body sentences
    (one fact each) and filler sentences (no facts) for the word budget."""

    intro: Sentence
    intro_refs: list[WorldEntity]
    fillers: tuple[str, ...]
    body: list[tuple[Sentence, list[WorldEntity], bool]] = field(
        default_factory=list
    )  # sentence, mentions, preferred

    def add(
        self, text: str, probe: Probe, refs: Sequence[WorldEntity | None] = (), preferred: bool = False
    ) -> None:
        """A body sentence stating one fact; ``refs`` are entities with their own document it mentions;
        ``preferred`` sentences (cross-references) are kept more often."""
        self.body.append((Sentence(text, [probe]), [r for r in refs if r is not None], preferred))


def make_probe(
    slot: str,
    questions: str | tuple[str, ...],
    answers: Sequence[str],
    claim: Callable[[str], str],
    fake: Fake,
) -> Probe:
    """A probe whose answers are de-duplicated by their normalized form (the first one is kept)."""
    seen: set[str] = set()
    kept = []
    for ans in answers:
        key = normalize_answer(ans)
        if key and key not in seen:
            seen.add(key)
            kept.append(ans)
    qs = (questions,) if isinstance(questions, str) else tuple(questions)
    return Probe(slot, qs, tuple(kept), claim, fake)


def cap(rng: random.Random, flags: list[bool], limit: int) -> list[bool]:
    """Switch randomly chosen true flags off until at most ``limit`` are true."""
    flags = list(flags)
    while sum(flags) > max(0, limit):
        flags[rng.choice([i for i, f in enumerate(flags) if f])] = False
    return flags


# ---- fakes -----------------------------------------------------------------------------------------------


def fake_year(year: int) -> Fake:
    """Another year, 3-40 years before or after ``year``."""
    return lambda r: str(year + r.choice((-1, 1)) * r.randint(3, 40))


def fake_num(n: int) -> Fake:
    """Another number, about half to twice ``n`` (never ``n``)."""

    def fake(r: random.Random) -> str:
        m = max(2, round(n * r.choice((0.5, 0.6, 0.75, 1.3, 1.5, 2.0))))
        return fmt(m if m != n else n + r.randint(1, 5))

    return fake


def fake_pool(value: str, pool: Sequence[str]) -> Fake:
    """Another value of ``pool`` than ``value``."""
    return lambda r: r.choice([x for x in pool if x != value])


def other_year(w: World, ctx: Mapping[str, Any], attr: str, value: str) -> Fake:
    """Another year, 3-40 years off."""
    return fake_year(ctx[attr])


def other_number(w: World, ctx: Mapping[str, Any], attr: str, value: str) -> Fake:
    """Another number, about half to twice the value."""
    return fake_num(ctx[attr])


def other_town(w: World, ctx: Mapping[str, Any], attr: str, value: str) -> Fake:
    """Another town of the world (with or without a document)."""
    return w.fake_town(value)


def fresh_person(w: World, ctx: Mapping[str, Any], attr: str, value: str) -> Fake:
    """A fresh person's name."""
    return w.fake_person()


def other_in(values: Sequence[str]) -> FakeMaker:
    """Another value of ``values``."""
    return lambda w, ctx, attr, value: fake_pool(value, values)


def fresh_word(pattern: str, suffix: str = "") -> FakeMaker:
    """A fresh invented word of ``pattern`` followed by ``suffix`` (a template)."""
    return lambda w, ctx, attr, value: w.fake_word(pattern, render(suffix, ctx))


def num(unit: str | None = None) -> AnswerMaker:
    """The answers of a number attribute (see :func:`num_answers`)."""
    return lambda ctx, attr: num_answers(ctx[attr], unit)


# ---- specs -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fact:
    """One checkable fact of a kind. ``question`` and ``answers`` are templates (``answers`` ``None``: the
    attribute's value; answers[0] must occur verbatim in the sentence), ``claim`` a template with ``{v}``,
    the value claimed; ``fake`` makes a plausible other value."""

    attr: str  # the attribute; "<kind>.<attr>" is the slot (the swap pool of false claims)
    question: str | tuple[str, ...]  # alternative phrasings, each naming the entity
    claim: str
    fake: FakeMaker
    answers: tuple[str, ...] | AnswerMaker | None = None


@dataclass(frozen=True)
class IntroFact:
    """A fact the opening sentence may state, with probability ``chance`` (``chance_with_ref`` when the
    attribute ``ref``, an entity with its own document that the sentence then mentions, is set)."""

    fact: Fact
    chance: float
    ref: str | None = None
    chance_with_ref: float | None = None

    def p(self, ctx: Mapping[str, Any]) -> float:
        """The probability of stating the fact for an entity of context ``ctx``."""
        if self.chance_with_ref is not None and self.ref is not None and ctx[self.ref]:
            return self.chance_with_ref
        return self.chance


@dataclass(frozen=True)
class Intro:
    """The opening sentence: ``texts`` by which of the ``optional`` facts it states (a tuple of flags);
    it always states the ``always`` facts, first."""

    texts: Mapping[tuple[bool, ...], str]
    optional: tuple[IntroFact, ...]
    always: tuple[Fact, ...] = ()


@dataclass(frozen=True)
class Line:
    """A body sentence stating ``fact`` (or ``alt``, drawn with probability ``1 - ALT_P``). ``texts`` are
    variants, one drawn when there are several; ``refs`` name attributes holding entities with their own
    document; ``when``: only when that attribute is set; ``preferred``: kept more often."""

    texts: str | tuple[str, ...]
    fact: Fact
    alt: Fact | None = None
    refs: tuple[str, ...] = ()
    when: str | None = None
    preferred: bool = False


def no_context(e: WorldEntity) -> dict[str, Any]:
    """No derived keys (the default context hook)."""
    return {}


@dataclass(frozen=True)
class KindSpec:
    """How documents of one kind are written: the opening sentence, the body sentences in order, and a
    hook adding derived keys to the templates' context."""

    intro: Intro
    body: tuple[Line, ...]
    context: Callable[[WorldEntity], dict[str, Any]] = no_context


# ---- drafting --------------------------------------------------------------------------------------------


def _probe(kind: str, f: Fact, w: World, ctx: Mapping[str, Any]) -> Probe:
    """The probe of fact ``f`` for the entity of context ``ctx``."""
    if f.answers is None:
        answers: Sequence[str] = (str(ctx[f.attr]),)
    elif isinstance(f.answers, tuple):
        answers = tuple(render(a, ctx) for a in f.answers)
    else:
        answers = f.answers(ctx, f.attr)
    questions = (f.question,) if isinstance(f.question, str) else f.question
    return make_probe(
        f"{kind}.{f.attr}",
        tuple(render(q, ctx) for q in questions),
        answers,
        lambda v: render(f.claim, ctx, v=v),
        f.fake(w, ctx, f.attr, answers[0]),
    )


def draft(spec: KindSpec, e: WorldEntity, w: World, rng: random.Random, max_intro: int) -> Draft:
    """The draft of ``e``'s document: an opening sentence stating the ``always`` facts and at most
    ``max_intro`` facts in all, then every body sentence whose condition holds."""
    ctx = {**e.attrs, "name": e.title, "T": e.title, **spec.context(e)}
    intro = spec.intro
    wanted = [rng.random() < o.p(ctx) for o in intro.optional]
    flags = cap(rng, wanted, max_intro - len(intro.always))
    stated = [o for o, on in zip(intro.optional, flags) if on]
    probes = [_probe(e.kind, f, w, ctx) for f in (*intro.always, *(o.fact for o in stated))]
    refs = [ctx[o.ref] for o in stated if o.ref is not None and ctx[o.ref] is not None]
    fillers = tuple(f.format(**ctx) for f in V.FILLERS[e.kind])
    d = Draft(Sentence(render(intro.texts[tuple(flags)], ctx), probes), refs, fillers)
    for line in spec.body:
        if line.when is not None and ctx[line.when] is None:
            continue
        fact = line.fact if line.alt is None or rng.random() < ALT_P else line.alt
        text = line.texts if isinstance(line.texts, str) else rng.choice(line.texts)
        d.add(render(text, ctx), _probe(e.kind, fact, w, ctx), [ctx[r] for r in line.refs], line.preferred)
    return d
