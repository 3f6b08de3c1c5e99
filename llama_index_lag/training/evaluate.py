"""Moved to :mod:`llama_index_lag.eval.recall` (``measure_recall`` is evaluation); re-exported here."""

from ..eval.recall import DEFAULT_MODES, generate_answers, measure_recall, recall_table

__all__ = ["DEFAULT_MODES", "generate_answers", "measure_recall", "recall_table"]
