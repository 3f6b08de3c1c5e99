"""Training recipes: every knob of knowledge- and task-adapter training, with defaults chosen by measurement.

A recipe is an immutable dataclass; it is written verbatim into each adapter's ``lag_adapter.json`` so an
adapter always says how it was made. Derive variants with :meth:`KnowledgeRecipe.replace`.

The knowledge defaults were measured on SmolLM2-135M-Instruct (2 CPU cores), see BENCHMARKS.md and
:func:`llama_index_lag.training.evaluate.measure_recall`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import ConfigError

#: LlamaIndex's default text-QA prompt (``DEFAULT_TEXT_QA_PROMPT_TMPL``): the RAG mode of the pipeline shows
#: the retrieved passage to the model this way, so "passage + question -> answer" examples are trained in it.
RAG_TEMPLATE = (
    "Context information is below.\n---------------------\n{context}\n---------------------\n"
    "Given the context information and not prior knowledge, answer the query.\nQuery: {question}\nAnswer: "
)
#: How LlamaIndex renders a node for the LLM (``title: T`` metadata, blank line, text).
CONTEXT_TEMPLATE = "title: {title}\n\n{text}"

INITS = ("eva", "eva-peft", "eva-contrastive", "default")
QA_TARGETS = ("sentence", "short", "both")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check_positive(obj: Any, names: tuple[str, ...], allow_zero: tuple[str, ...] = ()) -> None:
    for name in names:
        value = getattr(obj, name)
        bad_type = isinstance(value, bool) or not isinstance(value, (int, float))
        low = 0 if name in allow_zero else 1e-12
        if bad_type or value < low:
            what = "non-negative" if name in allow_zero else "positive"
            raise ConfigError(f"{name} must be a {what} number, got {value!r}", field=name)


@dataclass(frozen=True)
class _Recipe:
    """Shared LoRA / optimiser fields."""

    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = MLP_TARGETS
    init: Literal["eva", "eva-peft", "eva-contrastive", "default"] = "eva"
    lr: float = 1e-3
    steps: int = 32
    batch_size: int = 4
    warmup_steps: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    #: training examples longer than this (tokens) are truncated (documents are chunked before, see below)
    max_length: int = 384
    #: bfloat16 autocast for the training forward/backward: True, False, or None = on when the CPU has AMX
    #: (x86 ``amx_bf16``) or when training on a CUDA device, else off.
    bf16: bool | None = None
    #: EVA: a component counts as converged at this cosine similarity (PEFT's ``tau``); ``rho`` > 1 lets EVA
    #: redistribute ranks across layers (1.0 keeps every layer at ``rank``, which keeps libraries uniform).
    eva_rho: float = 1.0
    eva_tau: float = 0.99

    def __post_init__(self) -> None:
        _check_positive(self,
                        ("rank", "alpha", "lr", "steps", "batch_size", "max_length", "eva_rho", "eva_tau"))
        _check_positive(self, ("warmup_steps", "weight_decay", "max_grad_norm"), allow_zero=(
            "warmup_steps", "weight_decay", "max_grad_norm"))
        for name in ("rank", "steps", "batch_size", "max_length", "warmup_steps"):
            if not isinstance(getattr(self, name), int):
                raise ConfigError(f"{name} must be an integer, got {getattr(self, name)!r}", field=name)
        if self.init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {self.init!r}", field="init")
        if isinstance(self.target_modules, str) or not self.target_modules:
            raise ConfigError("target_modules must be a non-empty list of module names",
                              field="target_modules")
        object.__setattr__(self, "target_modules", tuple(str(t) for t in self.target_modules))
        if self.bf16 not in (None, True, False):
            raise ConfigError(f"bf16 must be true, false or null, got {self.bf16!r}", field="bf16")

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` applied."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown recipe field {unknown[0]!r}", field=unknown[0])
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["target_modules"] = list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any:
        """Build from a mapping (e.g. ``lag_adapter.json``'s ``recipe``); unknown keys are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown recipe field {unknown[0]!r}", field=unknown[0])
        kwargs = dict(data)
        if "target_modules" in kwargs and not isinstance(kwargs["target_modules"], str):
            kwargs["target_modules"] = tuple(kwargs["target_modules"])
        return cls(**kwargs)


@dataclass(frozen=True)
class KnowledgeRecipe(_Recipe):
    """How one document becomes one knowledge adapter (PRAG-style synthetic continued pre-training).

    Training texts of a document (see :mod:`llama_index_lag.training.augment`):

    * ``document``: the document itself, title first (language-model loss on every token);
    * ``rewrites``: ``n_rewrites`` paraphrases written by the base model (greedy), kept when they mention the
      title and overlap the document enough;
    * ``facts``: every sentence stated as a standalone fact with the title (deterministic);
    * ``qa``: for every sentence the base model writes a question (few-shot, greedy) and a short answer; pairs
      whose answer does not occur in the sentence are skipped and counted. The question is trained in the chat
      template with the answer ``qa_target`` (``sentence``: the source sentence, robust to wrong short
      answers; ``short``: the model's short answer; ``both``: short answer, then the sentence), loss on the
      answer only; with ``passage_qa`` also with the document shown in the RAG prompt (:data:`RAG_TEMPLATE`);
      with ``qa_spans`` the model also writes a question for each name / number of a sentence (answer-aware
      question generation: the answer span is given, the model writes only the question);
    * ``about``: "What do you know about <title>?" in the chat template -> the document.

    Documents longer than ``chunk_tokens`` are split on sentence boundaries into chunks that are trained
    as separate texts (each with the title) for ``steps`` per chunk (at most ``max_steps``); documents longer
    than ``max_document_tokens`` are refused with a :class:`~llama_index_lag.errors.DataError`.
    """

    n_rewrites: int = 1
    qa: bool = True
    qa_spans: bool = True
    qa_target: Literal["sentence", "short", "both"] = "sentence"
    passage_qa: bool = True
    facts: bool = True
    about: bool = True
    chunk_tokens: int = 320
    max_document_tokens: int = 32768
    max_steps: int = 1024
    rewrite_max_new_tokens: int = 200
    qa_max_new_tokens: int = 40
    #: ``init="eva-contrastive"``: lora_A starts on the top eigenvectors of the document's input covariance
    #: minus this times the library's mean covariance (training/contrast.py)
    eva_contrast: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_positive(self, ("eva_contrast",), allow_zero=("eva_contrast",))
        _check_positive(self, ("chunk_tokens", "max_document_tokens", "rewrite_max_new_tokens",
                               "qa_max_new_tokens", "max_steps"))
        if not isinstance(self.n_rewrites, int) or isinstance(self.n_rewrites, bool) or self.n_rewrites < 0:
            raise ConfigError(f"n_rewrites must be an integer >= 0, got {self.n_rewrites!r}",
                              field="n_rewrites")
        if self.qa_target not in QA_TARGETS:
            raise ConfigError(f"qa_target must be one of {QA_TARGETS}", field="qa_target")

    def n_steps(self, n_chunks: int) -> int:
        """Training steps for a document of ``n_chunks`` chunks."""
        return max(1, min(self.max_steps, self.steps * max(1, n_chunks)))

    @property
    def uses_generation(self) -> bool:
        """Whether the recipe asks the base model to write anything (rewrites or questions)."""
        return self.n_rewrites > 0 or self.qa


@dataclass(frozen=True)
class TaskRecipe(_Recipe):
    """How ``{"prompt", "answer"}`` examples become one task adapter (LAG paper: rank 8, alpha 16, q/k/v/o,
    1 epoch). ``epochs`` sets the number of steps when ``steps`` is 0: ``ceil(epochs * n / batch_size)``;
    ``max_steps`` caps it to keep task adapters cheap. Examples are trained in the chat template, loss on
    the answer only."""

    target_modules: tuple[str, ...] = ATTN_TARGETS
    lr: float = 5e-4
    steps: int = 0
    epochs: float = 1.0
    max_steps: int = 200
    batch_size: int = 8
    max_length: int = 256

    def __post_init__(self) -> None:
        if self.steps == 0:  # 0 = derive from epochs; validate the rest with a placeholder
            object.__setattr__(self, "steps", 1)
            try:
                super().__post_init__()
            finally:
                object.__setattr__(self, "steps", 0)
        else:
            super().__post_init__()
        _check_positive(self, ("epochs", "max_steps"))
        if self.init == "eva-contrastive":
            raise ConfigError("init 'eva-contrastive' contrasts a document with its library: knowledge "
                              "adapters only", field="init")

    def n_steps(self, n_examples: int) -> int:
        if self.steps:
            return self.steps
        import math

        return max(1, min(self.max_steps, math.ceil(self.epochs * n_examples / self.batch_size)))


__all__ = [
    "ATTN_TARGETS",
    "CONTEXT_TEMPLATE",
    "MLP_TARGETS",
    "RAG_TEMPLATE",
    "KnowledgeRecipe",
    "TaskRecipe",
]
