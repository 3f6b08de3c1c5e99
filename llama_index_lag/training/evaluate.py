"""Does a knowledge library recall its documents? ``measure_recall`` answers held-back questions under several
routing modes and reports contains-match recall and routing accuracy.

Inference format (the one the pipeline uses): the tokenizer's chat template with the question as the only
user message, greedy decoding, ``max_new_tokens`` (32) new tokens. An answer is correct when a normalised gold
answer occurs in the normalised output (:func:`llama_index_lag.eval.metrics.contains_match`).

Routing accuracy: the share of (prompt token x knowledge module) selections that went to the gold document's
adapter, recorded with ``router.trace()`` over the question prompt (system prompt included, as the pipeline
sends it). For ``oracle`` it is 1 by construction and reported as None.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import QuestionRecord
from ..errors import ConfigError, DataError
from ..eval.metrics import contains_match
from .augment import chat_prompt

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..library import AdapterLibrary

#: the modes measured by default (names and grammar: :mod:`llama_index_lag.modes`)
DEFAULT_MODES = ("none", "oracle", "arrow", "spectr", "lag", "spectr-seq-mass", "lag-seq-mass")


def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers to ``questions`` in the chat template (batched, left padding)."""
    from .augment import HFGenerator

    prompts = [chat_prompt(tokenizer, q) for q in questions]
    return [a.strip()
            for a in HFGenerator(model, tokenizer, batch_size)(prompts, max_new_tokens=max_new_tokens)]


def measure_recall(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[QuestionRecord],
    library: AdapterLibrary | str | Path | None,
    *,
    modes: Sequence[str] = DEFAULT_MODES,
    k: int = 3,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    routing_accuracy: bool = True,
) -> dict[str, Any]:
    """Recall of ``questions`` (their ``answers`` are the golds; use the held-back ``qa`` questions) under
    each mode, with a knowledge ``library`` attached to ``model`` for the duration (detached afterwards).

    Returns ``{mode: {"recall", "correct", "total", "routing_accuracy", "seconds", "answers": [...]}}``.
    Modes: the evaluated modes of :mod:`llama_index_lag.modes` that need no index: ``none``, ``oracle``,
    ``arrow``, ``spectr``, ``lag`` (top-``k``) and their variants, e.g. ``lag-seq-mass`` (sequence
    granularity, ``mass`` score) or ``lag-req-sl2-w0.25`` (the pipeline's two-level default).
    """

    from ..config import LAGConfig
    from ..eval.harness import parse_modes
    from ..library import AdapterLibrary
    from ..router import attach_lag

    specs = parse_modes(modes, k)
    bad = [s.name for s in specs if s.retrieves or s.base == "oracle-knowledge"]
    if bad:
        raise ConfigError(f"mode {bad[0]!r} is not measured here (no index, no task adapters): use lag eval",
                          field="modes")
    routing = {s.name: s.routing for s in specs}
    modes = list(routing)
    if not questions:
        raise DataError("no questions to evaluate")
    if library is None:
        if any(m != "none" for m in modes):
            raise ConfigError("modes other than 'none' need a knowledge library", field="library")
        router = None
        adapter_of: dict[str, str] = {}
    else:
        lib = library if isinstance(library, AdapterLibrary) else AdapterLibrary.load(library)
        router = attach_lag(model, [lib], LAGConfig(mode="none"))
        adapter_of = lib.doc_ids()
        missing = sorted({q.doc_id for q in questions} - set(adapter_of))
        if missing and any(m != "none" for m in modes):
            router.detach()
            raise DataError(f"no adapter in the library for document {missing[0]!r}", field="doc_id")
    results: dict[str, Any] = {}
    try:
        for mode in modes:
            start = time.perf_counter()
            answers: list[str] = [""] * len(questions)
            if router is None:
                answers = generate_answers(model, tokenizer, [q.question for q in questions],
                                           max_new_tokens=max_new_tokens, batch_size=batch_size)
            elif mode == "oracle":
                groups: dict[str, list[int]] = {}
                for i, q in enumerate(questions):
                    groups.setdefault(q.doc_id, []).append(i)
                for doc_id, idx in groups.items():
                    with router.using(LAGConfig(mode="fixed", fixed={"knowledge": [adapter_of[doc_id]]})):
                        out = generate_answers(model, tokenizer, [questions[i].question for i in idx],
                                               max_new_tokens=max_new_tokens, batch_size=batch_size)
                    for i, a in zip(idx, out):
                        answers[i] = a
            else:
                with router.using(LAGConfig(**routing[mode])):
                    answers = generate_answers(model, tokenizer, [q.question for q in questions],
                                               max_new_tokens=max_new_tokens, batch_size=batch_size)
            scores = [contains_match(a, q.answers) for a, q in zip(answers, questions)]
            entry: dict[str, Any] = {
                "recall": sum(scores) / len(scores),
                "correct": int(sum(scores)),
                "total": len(scores),
                "routing_accuracy": None,
                "routing_accuracy_question": None,
                "answers": [{"id": q.id, "answer": a, "correct": bool(s)} for q, a, s in
                            zip(questions, answers, scores)],
            }
            if router is not None and routing_accuracy and mode not in ("none", "oracle"):
                entry.update(_routing_accuracy(model, tokenizer, router, questions, adapter_of,
                                               LAGConfig(**routing[mode])))
            entry["seconds"] = round(time.perf_counter() - start, 2)
            results[mode] = entry
    finally:
        if router is not None:
            router.detach()
    return results


def _question_span(tokenizer: PreTrainedTokenizerBase, prompt: str, question: str) -> tuple[int, int] | None:
    """Token index range [start, end) of the question inside the prompt (None if it cannot be located)."""
    at = prompt.rfind(question)
    if at < 0:
        return None
    before = len(tokenizer(prompt[:at], add_special_tokens=False)["input_ids"])
    upto = len(tokenizer(prompt[:at + len(question)], add_special_tokens=False)["input_ids"])
    return before, upto


def _routing_accuracy(model: Any, tokenizer: Any, router: Any, questions: Sequence[QuestionRecord],
                      adapter_of: Mapping[str, str], config: Any) -> dict[str, float | None]:
    """Share of knowledge selections that went to the gold adapter: over all prompt tokens x modules, and
    over the question's own tokens x modules (the template's system prompt is the same for every question)."""
    import torch

    names = router.names("knowledge")
    hits = total = q_hits = q_total = 0
    with router.using(config), torch.no_grad():
        for q in questions:
            prompt = chat_prompt(tokenizer, q.question)
            enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            gold = names.index(adapter_of[q.doc_id])
            with router.trace(keep_tokens=True) as trace:
                model(**{key: v.to(model.device) for key, v in enc.items()})
            counts = trace.counts("knowledge")
            hits += int(counts[gold])
            total += int(counts.sum())
            span = _question_span(tokenizer, prompt, q.question)
            if span is not None:
                for module in trace.modules("knowledge"):
                    chosen = trace.tokens("knowledge", module)[span[0]:span[1]]
                    q_hits += int((chosen == gold).sum())
                    q_total += int(chosen.numel())
    return {"routing_accuracy": hits / total if total else None,
            "routing_accuracy_question": q_hits / q_total if q_total else None}


def recall_table(results: Mapping[str, Mapping[str, Any]]) -> str:
    """A markdown table of :func:`measure_recall` results."""
    lines = ["| mode | recall | correct/total | routing acc. (prompt) | routing acc. (question tokens) |",
             "|---|---|---|---|---|"]
    for mode, r in results.items():
        acc = "-" if r.get("routing_accuracy") is None else f"{r['routing_accuracy']:.2f}"
        qacc = "-" if r.get("routing_accuracy_question") is None else f"{r['routing_accuracy_question']:.2f}"
        lines.append(f"| {mode} | {r['recall']:.2f} | {r['correct']}/{r['total']} | {acc} | {qacc} |")
    return "\n".join(lines)


__all__ = ["DEFAULT_MODES", "generate_answers", "measure_recall", "recall_table"]
