"""Does a knowledge library recall its documents? ``measure_recall`` answers held-back questions under several
routing modes and reports contains-match recall and routing accuracy.

Inference format (the one the pipeline uses): the tokenizer's chat template with the question as the only
user message, greedy decoding, ``max_new_tokens`` (32) new tokens. An answer is correct when a normalised gold
answer occurs in the normalised output (:func:`llama_index_lag.eval.metrics.contains_match`).

Routing accuracy: the share of (prompt token x knowledge module) selections that went to the gold document's
adapter, read from the routing trace of the answers' own generation (system prompt included, as the pipeline
sends it), over all prompt tokens and over the question's own tokens. For ``oracle`` it is 1 by construction
and reported as None.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data import QuestionRecord
from ..errors import ConfigError, DataError
from .metrics import contains_match

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..config import LAGConfig
    from ..library import AdapterLibrary
    from ..router import LAGRouter

#: the modes measured by default (names and grammar: :mod:`llama_index_lag.modes`)
DEFAULT_MODES = ("none", "oracle", "arrow", "spectr", "lag", "spectr-seq-mass", "lag-seq-mass")


def generate_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
                     max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy answers to ``questions`` in the chat template (batched, left padding)."""
    from ..generation import HFGenerator, chat_prompt

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
    from ..library import AdapterLibrary
    from ..router import attach_lag
    from .settings import parse_modes

    specs = parse_modes(modes, k)
    bad = [s.name for s in specs if s.retrieves or s.base == "oracle-knowledge"]
    if bad:
        raise ConfigError(f"mode {bad[0]!r} is not measured here (no index, no task adapters): use lag eval",
                          field="modes")
    # oracle: each question its own adapter (built per document below), no routing config of its own
    routing = {s.name: None if s.base == "oracle" else LAGConfig(**s.routing) for s in specs}
    if not questions:
        raise DataError("no questions to evaluate")
    router, adapter_of = None, {}
    if library is not None:
        lib = library if isinstance(library, AdapterLibrary) else AdapterLibrary.load(library)
        adapter_of = lib.doc_ids()
        missing = sorted({q.doc_id for q in questions} - set(adapter_of))
        if missing and any(m != "none" for m in routing):
            raise DataError(f"no adapter in the library for document {missing[0]!r}", field="doc_id")
        router = attach_lag(model, [lib], LAGConfig(mode="none"))
    elif any(m != "none" for m in routing):
        raise ConfigError("modes other than 'none' need a knowledge library", field="library")
    results: dict[str, Any] = {}
    try:
        for mode, config in routing.items():
            start = time.perf_counter()
            traced = router is not None and routing_accuracy and mode not in ("none", "oracle")
            if mode == "oracle" and router is not None:
                answers, acc = _oracle_answers(model, tokenizer, router, questions, adapter_of,
                                               max_new_tokens=max_new_tokens, batch_size=batch_size), {}
            else:
                answers, acc = _answers(model, tokenizer, router, config, questions, adapter_of, traced,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size)
            scores = [contains_match(a, q.answers) for a, q in zip(answers, questions)]
            results[mode] = {
                "recall": sum(scores) / len(scores),
                "correct": int(sum(scores)),
                "total": len(scores),
                "routing_accuracy": None,
                "routing_accuracy_question": None,
                **acc,
                "answers": [{"id": q.id, "answer": a, "correct": bool(s)} for q, a, s in
                            zip(questions, answers, scores)],
                "seconds": round(time.perf_counter() - start, 2),
            }
    finally:
        if router is not None:
            router.detach()
    return results


def _answers(model: Any, tokenizer: Any, router: LAGRouter | None, config: LAGConfig | None,
             questions: Sequence[QuestionRecord], adapter_of: Mapping[str, str], traced: bool, *,
             max_new_tokens: int, batch_size: int) -> tuple[list[str], dict[str, float | None]]:
    """Answers under ``config``, and (``traced``) the routing accuracy of their own generation."""
    from ..generation import HFGenerator, chat_prompt

    prompts = [chat_prompt(tokenizer, q.question) for q in questions]
    generator = HFGenerator(model, tokenizer, batch_size, router=router, config=config)
    rows, batches = generator.generate(prompts, max_new_tokens=max_new_tokens,
                                       trace="tokens" if traced else None)
    answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]
    if not traced or router is None:
        return answers, {}
    return answers, _routing_accuracy(tokenizer, router, questions, prompts, adapter_of, batches)


def _oracle_answers(model: Any, tokenizer: Any, router: LAGRouter, questions: Sequence[QuestionRecord],
                    adapter_of: Mapping[str, str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Each question answered with its own document's adapter (questions grouped by document)."""
    from ..config import LAGConfig

    groups: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(q.doc_id, []).append(i)
    answers = [""] * len(questions)
    for doc_id, idx in groups.items():
        with router.using(LAGConfig(mode="fixed", fixed={"knowledge": [adapter_of[doc_id]]})):
            out = generate_answers(model, tokenizer, [questions[i].question for i in idx],
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
        for i, a in zip(idx, out):
            answers[i] = a
    return answers


def _question_span(tokenizer: PreTrainedTokenizerBase, prompt: str, question: str) -> tuple[int, int] | None:
    """Token index range [start, end) of the question inside the prompt (None if it cannot be located)."""
    at = prompt.rfind(question)
    if at < 0:
        return None
    before = len(tokenizer(prompt[:at], add_special_tokens=False)["input_ids"])
    upto = len(tokenizer(prompt[:at + len(question)], add_special_tokens=False)["input_ids"])
    return before, upto


def _routing_accuracy(tokenizer: Any, router: LAGRouter, questions: Sequence[QuestionRecord],
                      prompts: Sequence[str], adapter_of: Mapping[str, str],
                      batches: Sequence[Any]) -> dict[str, float | None]:
    """Share of knowledge selections that went to the gold adapter: over all prompt tokens x modules, and
    over the question's own tokens x modules (the template's system prompt is the same for every question)."""
    from .accuracy import span_counts, split_trace

    names = router.names("knowledge")
    gold = [names.index(adapter_of[q.doc_id]) for q in questions]
    hits = total = q_hits = q_total = 0
    row = 0
    for out in batches:
        lens, B = out.prompt_lengths, len(out.prompt_lengths)
        split = split_trace(out.trace, lens, out.lengths, out.new.shape[1])
        if split is None or "knowledge" not in split[0]:
            return {}
        spans = [_question_span(tokenizer, prompts[row + i], questions[row + i].question) for i in range(B)]
        counts, in_span = split[0]["knowledge"], span_counts(out.trace, "knowledge", lens, spans)  # [B, N]
        for i in range(B):
            g = gold[row + i]
            hits, total = hits + int(counts[i, g]), total + int(counts[i].sum())
            q_hits, q_total = q_hits + int(in_span[i, g]), q_total + int(in_span[i].sum())
        row += B
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
