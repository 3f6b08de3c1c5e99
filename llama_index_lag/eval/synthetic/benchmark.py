"""Generating a benchmark instance: the world, one document per entity, QA questions, balanced fact checks
and the confuser pairs."""

from __future__ import annotations

import random
import re
from typing import Any

from ...data import DocumentRecord, QuestionRecord
from ...errors import ConfigError
from ..metrics import normalize_answer
from .compose import compose
from .entities import ID_PREFIX, PARTNER_SHARED
from .facts import Probe
from .names import NameMaker, reserved_words
from .records import KINDS, TASK_FACT, TASK_QA, TASK_SLOT, Benchmark, Confuser, Entity
from .slots import RELATIONS, slot_question
from .tasks import make_task_sets
from .world import World, WorldEntity

DEFAULT_N_DOCS, DEFAULT_SEED = 60, 0
MAX_DOCS = 10_000  # the name grammar (pets, rivers) has room for about twice as many


def _slug(text: str) -> str:
    """``text`` lower-cased, runs of other characters than letters and digits as one ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _is_int(x: Any) -> bool:
    """Whether ``x`` is an ``int`` and not a ``bool``."""
    return isinstance(x, int) and not isinstance(x, bool)


def _check_params(
    n_docs: Any, seed: Any, questions_per_doc: Any, fact_checks_per_doc: Any
) -> tuple[int, int]:
    """Validate :func:`make_benchmark`'s arguments (:class:`ConfigError` naming the field); return the
    (min, max) questions per document."""
    if not _is_int(n_docs) or not 1 <= n_docs <= MAX_DOCS:
        raise ConfigError(f"n_docs must be an integer in [1, {MAX_DOCS}], got {n_docs!r}", field="n_docs")
    if not _is_int(seed):
        raise ConfigError(f"seed must be an integer, got {seed!r}", field="seed")
    try:
        lo, hi = questions_per_doc
    except (TypeError, ValueError):
        raise ConfigError(
            f"questions_per_doc must be a (min, max) pair, got {questions_per_doc!r}",
            field="questions_per_doc",
        ) from None
    if not (_is_int(lo) and _is_int(hi)) or not 0 <= lo <= hi:
        raise ConfigError(
            f"questions_per_doc must satisfy 0 <= min <= max, got {questions_per_doc!r}",
            field="questions_per_doc",
        )
    if not _is_int(fact_checks_per_doc) or fact_checks_per_doc < 0:
        raise ConfigError(
            f"fact_checks_per_doc must be an integer >= 0, got {fact_checks_per_doc!r}",
            field="fact_checks_per_doc",
        )
    return lo, hi


def _value_pools(doc_probes: list[list[Probe]]) -> dict[str, list[tuple[str, str]]]:
    """The values of each attribute as stated in the documents, with their normalized forms: the source of
    false claims (a document states each attribute at most once, so "another value" always comes from
    another document)."""
    stated: dict[str, dict[str, str]] = {}
    for probes in doc_probes:
        for p in probes:
            stated.setdefault(p.slot, {}).setdefault(p.value, normalize_answer(p.value))
    return {slot: sorted(values.items()) for slot, values in stated.items()}


def _questions(
    ents: list[WorldEntity],
    doc_probes: list[list[Probe]],
    rng: random.Random,
    per_doc: tuple[int, int],
    fact_checks_per_doc: int,
) -> tuple[list[QuestionRecord], list[tuple[Probe, int]]]:
    """QA questions (at most one per fact) and placeholders for the fact checks, preferably on facts the QA
    questions do not ask about; the placeholders' probes and positions in the question list."""
    questions: list[QuestionRecord] = []
    pending: list[tuple[Probe, int]] = []
    for e, probes in zip(ents, doc_probes):
        n_q = min(len(probes), rng.randint(*per_doc))
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
            pending.append((probes[i], len(questions)))
            questions.append(QuestionRecord(f"{e.doc_id}.f{j}", "", (), e.doc_id, TASK_FACT))
    return questions, pending


def _fill_fact_checks(
    questions: list[QuestionRecord],
    pending: list[tuple[Probe, int]],
    pools: dict[str, list[tuple[str, str]]],
    rng: random.Random,
) -> None:
    """Replace the placeholders (in place) by true/false claims, ``ceil(F/2)`` true in random positions; a
    false claim takes another document's value of the attribute (or the probe's fake)."""
    labels = [True] * (len(pending) - len(pending) // 2) + [False] * (len(pending) // 2)
    rng.shuffle(labels)
    for (p, pos), label in zip(pending, labels):
        if label:
            claim = p.claim(p.value)
        else:
            true_key = normalize_answer(p.value)
            options = [v for v, key in pools.get(p.slot, ()) if key != true_key]
            value = rng.choice(options) if options else p.fake(rng)
            claim = p.claim(value)
        q = questions[pos]
        answer = "true" if label else "false"
        questions[pos] = QuestionRecord(q.id, f"True or false: {claim}", (answer,), q.doc_id, TASK_FACT)


def _slot_questions(ents: list[WorldEntity], doc_probes: list[list[Probe]], seed: int,
                    per_doc: int) -> list[QuestionRecord]:
    """``per_doc`` slot-filling questions per document (``"<title> | <relation>"``), on facts its document
    states. Their own random stream: the QA and fact questions of a seed are those of generator version 1."""
    rng = random.Random(f"slot-filling:{seed}")
    out: list[QuestionRecord] = []
    for e, probes in zip(ents, doc_probes):
        usable = [p for p in probes if p.slot in RELATIONS]
        for j, p in enumerate(rng.sample(usable, min(per_doc, len(usable))), 1):
            question = slot_question(e.title, RELATIONS[p.slot])
            out.append(QuestionRecord(f"{e.doc_id}.s{j}", question, p.answers, e.doc_id, TASK_SLOT))
    return out


def _confusers(ents: list[WorldEntity], texts: dict[str, str]) -> list[Confuser]:
    """Look-alike pairs (the attributes they share that both texts state) and mentions of other entities."""
    confusers: list[Confuser] = []
    for e in ents:
        if e.partner is not None:
            a, b = e.partner, e
            shared = tuple(
                v
                for v in (str(a.attrs[k]) for k in PARTNER_SHARED[e.kind])
                if v in texts[a.doc_id] and v in texts[b.doc_id]
            )
            if shared:
                confusers.append(Confuser(a.doc_id, b.doc_id, e.partner_reason, shared))
        for r in e.refs:
            confusers.append(Confuser(e.doc_id, r.doc_id, "mentions", (r.title,)))
    return confusers


def make_benchmark(
    n_docs: int,
    seed: int,
    *,
    questions_per_doc: tuple[int, int] = (3, 5),
    fact_checks_per_doc: int = 2,
    slots_per_doc: int = 1,
) -> Benchmark:
    """Generate a benchmark of ``n_docs`` fictional entities (one document each) from ``seed``.

    Each document gets ``questions_per_doc`` = (min, max) QA questions (at most one per fact) and
    ``fact_checks_per_doc`` true/false claims (preferably on facts the QA questions do not ask about); over
    the benchmark, ``ceil(F/2)`` claims are true and ``floor(F/2)`` false; and ``slots_per_doc``
    slot-filling questions (``"<entity> | <relation>"`` -> value). Deterministic in its arguments.
    """
    per_doc = _check_params(n_docs, seed, questions_per_doc, fact_checks_per_doc)
    tasks = make_task_sets()
    rng = random.Random(seed)
    names = NameMaker(rng, reserved_words(tasks))
    world = World(n_docs, rng, names)
    ents = [e for k in KINDS for e in world.by_kind[k]]
    rng.shuffle(ents)
    for e in ents:
        e.doc_id = f"{ID_PREFIX[e.kind]}-{_slug(' '.join(e.invented))}"

    documents: list[DocumentRecord] = []
    doc_probes: list[list[Probe]] = []
    for e in ents:
        text, probes, refs = compose(e, world, rng)
        e.refs = [r for r in refs if r is not e]
        documents.append(DocumentRecord(id=e.doc_id, title=e.title, text=text))
        doc_probes.append(probes)

    questions, pending = _questions(ents, doc_probes, rng, per_doc, fact_checks_per_doc)
    _fill_fact_checks(questions, pending, _value_pools(doc_probes), rng)
    if not _is_int(slots_per_doc) or slots_per_doc < 0:
        raise ConfigError(f"slots_per_doc must be an integer >= 0, got {slots_per_doc!r}",
                          field="slots_per_doc")
    questions += _slot_questions(ents, doc_probes, seed, slots_per_doc)
    return Benchmark(
        name=f"synthetic-{n_docs}-seed{seed}",
        seed=seed,
        documents=documents,
        questions=questions,
        tasks=tasks,
        entities=[Entity(e.doc_id, e.kind, e.title, e.invented) for e in ents],
        confusers=_confusers(ents, {d.id: d.text for d in documents}),
        names=tuple(sorted(names.used)),
    )
