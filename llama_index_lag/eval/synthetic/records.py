"""The records of a generated benchmark: entities, confuser pairs and the instance itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...data import DocumentRecord, QuestionRecord, TaskExample

GENERATOR_VERSION = 2  # 2: slot-filling questions and task set (qa / fact questions unchanged)
"""Bump when the output of :func:`make_benchmark` / :func:`make_demo` changes for the same arguments."""

TASK_QA = "qa"
TASK_FACT = "fact"
TASK_SLOT = "slot"
TASK_FILES = {"fact_check": "tasks/fact_check.jsonl", "short_answer": "tasks/short_answer.jsonl",
              "slot_filling": "tasks/slot_filling.jsonl"}

KINDS = ("person", "town", "organisation", "device", "ship", "festival")


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
        """The pair as written to ``benchmark.json``."""
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
        """Documents, questions by task, true / false fact checks, entities by kind, task-set sizes."""
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
        """The content of ``benchmark.json``: generator, version, name, seed, counts, confuser pairs."""
        return {
            "generator": "llama_index_lag.eval.synthetic",
            "generator_version": GENERATOR_VERSION,
            "name": self.name,
            "seed": self.seed,
            "counts": self.counts(),
            "confusers": [c.to_dict() for c in self.confusers],
        }
