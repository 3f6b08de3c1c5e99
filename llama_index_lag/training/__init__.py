"""Knowledge adapters from documents (PRAG-style synthetic training, EVA init) and task adapters.

``build_knowledge_adapters(documents, out, ...)`` writes one PEFT LoRA folder per document (named by the
document id, with ``lag_adapter.json``), resumable and optionally in parallel, and can compile them into a
knowledge library; ``train_task_adapter(examples, out)`` trains a task adapter. ``measure_recall`` checks
that a library recalls its documents. CLI: ``lag build-adapters``, ``lag train-task``.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "KnowledgeRecipe": "recipe",
    "TaskRecipe": "recipe",
    "BuildError": "builder",
    "BuildReport": "builder",
    "build_knowledge_adapter": "builder",
    "build_knowledge_adapters": "builder",
    "train_task_adapter": "task",
    "read_adapter_meta": "builder",
    "is_finished": "builder",
    "document_seed": "builder",
    "augment_document": "augment",
    "knowledge_examples": "augment",
    "HFGenerator": "augment",
    "QAGenerationWarning": "augment",
    "train_lora": "train",
    "sync_documents": "sync",
    "SyncReport": "sync",
    "measure_recall": "evaluate",
    "recall_table": "evaluate",
}

__all__ = [
    "BuildError",
    "BuildReport",
    "HFGenerator",
    "KnowledgeRecipe",
    "QAGenerationWarning",
    "SyncReport",
    "TaskRecipe",
    "augment_document",
    "build_knowledge_adapter",
    "build_knowledge_adapters",
    "document_seed",
    "is_finished",
    "knowledge_examples",
    "measure_recall",
    "read_adapter_meta",
    "recall_table",
    "sync_documents",
    "train_lora",
    "train_task_adapter",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llama_index_lag.training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
