"""Fault injection for the Ray tests, run in every Ray worker process at start
(``runtime_env={"worker_process_setup_hook": "tests.ray_hooks.setup"}``): the adapter builder raises for the
document ids listed in the file named by ``LAG_TEST_POISON`` (a "poisoned" document), as a real bug would."""

from __future__ import annotations

import os
from pathlib import Path


def setup() -> None:
    from llama_index_lag.training import builder

    real = builder.build_knowledge_adapter

    def build(doc, *args, **kwargs):
        listed = Path(os.environ.get("LAG_TEST_POISON", "/nonexistent"))
        if listed.is_file() and doc.id in listed.read_text().split():
            raise RuntimeError(f"poisoned document {doc.id}")
        return real(doc, *args, **kwargs)

    builder.build_knowledge_adapter = build
