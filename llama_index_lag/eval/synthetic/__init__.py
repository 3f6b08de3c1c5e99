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

Modules: :mod:`.names` (the name grammar and its blocklists), :mod:`.vocabulary` (value pools, fillers),
:mod:`.world` (the entities and their attributes), :mod:`.facts` (the fact-spec types and drafting),
:mod:`.people` / :mod:`.things` (the kinds as tables of fact specs, registered in :mod:`.entities`),
:mod:`.compose` (one document), :mod:`.benchmark` (:func:`make_benchmark`), :mod:`.tasks` (the task
training sets), :mod:`.demo` (the hand-written demo instance), :mod:`.records` and :mod:`.files`
(:func:`write_benchmark`).
"""

from __future__ import annotations

from ...data import (  # DATA_DIR, packaged_path: re-exported (they moved to data)
    DATA_DIR,
    packaged_path,
)
from ...data import DocumentRecord as DocumentRecord
from ...data import QuestionRecord as QuestionRecord
from ...data import TaskExample as TaskExample
from .benchmark import DEFAULT_N_DOCS, DEFAULT_SEED, make_benchmark
from .benchmark import MAX_DOCS as MAX_DOCS
from .compose import MAX_WORDS as MAX_WORDS
from .compose import MIN_WORDS as MIN_WORDS
from .demo import make_demo
from .files import write_benchmark
from .names import NameMaker, real_words, reserved_words
from .records import GENERATOR_VERSION, KINDS, TASK_FACT, TASK_QA, Benchmark, Confuser, Entity
from .records import TASK_FILES as TASK_FILES
from .tasks import make_task_sets

_real_words = real_words  # the old module's private names, still used by the tests
_reserved_words = reserved_words

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
