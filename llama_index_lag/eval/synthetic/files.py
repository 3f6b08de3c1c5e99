"""Writing a benchmark instance to a folder."""

from __future__ import annotations

from pathlib import Path

from ..._fs import atomic_write_json
from ...data import write_documents, write_questions, write_task_examples
from ...errors import ConfigError
from .records import TASK_FILES, Benchmark


def write_benchmark(bench: Benchmark, out_dir: str | Path) -> dict[str, Path]:
    """Write ``documents.jsonl``, ``questions.jsonl``, ``tasks/<name>.jsonl`` (when the benchmark has task
    sets) and ``benchmark.json`` (generator version, seed, counts, confuser pairs) into ``out_dir``.

    Each file is written atomically; other files in ``out_dir`` are left alone. Returns the paths written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {str(out)!r} exists and is not a folder", path=out)
    written = {
        "documents": out / "documents.jsonl",
        "questions": out / "questions.jsonl",
    }
    write_documents(written["documents"], bench.documents)
    write_questions(written["questions"], bench.questions)
    for task, examples in bench.tasks.items():
        path = out / TASK_FILES.get(task, f"tasks/{task}.jsonl")
        write_task_examples(path, examples)
        written[task] = path
    written["benchmark"] = out / "benchmark.json"
    atomic_write_json(written["benchmark"], bench.metadata())
    return written
