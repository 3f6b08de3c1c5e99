"""`lag demo` end to end on the real SmolLM2-135M (slow: ~2-3 minutes on 2 CPU cores)."""

from __future__ import annotations

import pytest

from llama_index_lag.data import read_documents, read_questions, write_documents, write_questions
from llama_index_lag.eval.synthetic import packaged_path


@pytest.mark.slow
def test_demo_on_two_documents(tmp_path, capsys):
    from llama_index_lag.demo import MODES, run_demo
    from llama_index_lag.errors import MissingDependencyError
    from llama_index_lag.models import prepare_default_model

    try:
        prepare_default_model(progress=False)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    data = packaged_path("demo")
    docs = read_documents(data / "documents.jsonl")[:2]
    write_documents(tmp_path / "docs.jsonl", docs)
    ids = {d.id for d in docs}
    questions = [q for q in read_questions(data / "questions.jsonl") if q.doc_id in ids]
    write_questions(tmp_path / "questions.jsonl", questions)

    result = run_demo(tmp_path / "out", n_questions=2, k=2, docs=tmp_path / "docs.jsonl",
                      questions=tmp_path / "questions.jsonl")
    out = capsys.readouterr().out
    assert "[2/4] adapters  2 knowledge adapters" in out and "routing heat-map" in out
    rows = result["rows"]
    assert [r["doc_id"] for r in rows] == [d.id for d in docs]  # one question per document
    for row in rows:
        assert set(MODES) <= set(row)
        assert row["none"]["top_adapter"] is None and row["none"]["sources"] == []
        assert row["rag"]["sources"] == [row["doc_id"]]  # retrieval finds the document
        assert row["lag"]["top_adapter"]["adapter"] in ids and row["lag"]["sources"] == []
    assert result["totals"]["none"] == 0  # the model cannot know fictional entities
    assert result["totals"]["rag"] >= 1 and result["totals"]["rag+lag"] >= 1
    assert sum(r["lag"]["top_adapter"]["adapter"] == r["doc_id"] for r in rows) >= 1
    png = tmp_path / "out" / "routing_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run reuses the adapters, the library and the index
    weights = [tmp_path / "out" / "adapters" / d.id / "adapter_model.safetensors" for d in docs]
    stamps = [w.stat().st_mtime_ns for w in weights]
    again = run_demo(tmp_path / "out", n_questions=2, k=2, docs=tmp_path / "docs.jsonl",
                     questions=tmp_path / "questions.jsonl")
    assert [w.stat().st_mtime_ns for w in weights] == stamps
    assert [r["lag"]["answer"] for r in again["rows"]] == [r["lag"]["answer"] for r in rows]  # greedy
