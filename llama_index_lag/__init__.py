"""llama-index-lag: LoRA-Augmented Generation (LAG) for LlamaIndex.

Per token and per adapted layer, Arrow retrieval keeps the k adapters of a library whose top singular
direction best aligns with the token, SpectR reranking picks the one whose input subspace holds most of the
token, and only that adapter is applied.

Public names are imported lazily so that ``import llama_index_lag`` (and the ``lag`` CLI) stay fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._env import __version__

_EXPORTS = {
    # adapter library
    "AdapterLibrary": "llama_index_lag.library",
    "BaseModelSpec": "llama_index_lag.library",
    # routing engine
    "LAGConfig": "llama_index_lag.config",
    "attach_lag": "llama_index_lag.router",
    "LAGRouter": "llama_index_lag.router",
    "RoutingTrace": "llama_index_lag.trace",
    # LlamaIndex integration
    "LAGLLM": "llama_index_lag.llm",
    "LAGPipelineConfig": "llama_index_lag.pipeline",
    "build_query_engine": "llama_index_lag.pipeline",
    "build_chat_engine": "llama_index_lag.chat",
    "LAGChatEngine": "llama_index_lag.chat",
    "RoutingSummary": "llama_index_lag.trace",
    "check_coverage": "llama_index_lag.pipeline",
    # data, index, models
    "read_documents": "llama_index_lag.data",
    "read_questions": "llama_index_lag.data",
    "read_directory": "llama_index_lag.ingest",
    "build_index": "llama_index_lag.indexing",
    "load_index": "llama_index_lag.indexing",
    "prepare_default_model": "llama_index_lag.models",
    "load_causal_lm": "llama_index_lag.models",
    # adapters from documents / examples
    "KnowledgeRecipe": "llama_index_lag.training",
    "TaskRecipe": "llama_index_lag.training",
    "build_knowledge_adapters": "llama_index_lag.training",
    "train_task_adapter": "llama_index_lag.training",
    "measure_recall": "llama_index_lag.training",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'llama_index_lag' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
