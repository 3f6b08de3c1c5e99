"""``lag demo``: LAG end to end on the embedded model and the bundled fictional documents.

Prepares SmolLM2-135M-Instruct, builds one knowledge adapter per bundled document (cached, resumable),
indexes the documents with FAISS, answers a few questions under none / RAG / LAG / RAG+LAG, prints a table
with the routing summary and writes a routing heat-map (layers x adapters). Everything lands in the user
cache (``demo/``), so a second run only answers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._fs import cache_dir
from .data import QuestionRecord, packaged_path, read_documents, read_questions
from .eval.metrics import contains_match, parse_bool
from .modes import DEMO_MODES

MODES = DEMO_MODES  # the pipeline modes the demo compares


def _say(msg: str) -> None:
    print(msg, flush=True)


def build_assets(out: Path, docs_path: Path, *, workers: int = 1, seed: int = 0) -> dict[str, Path]:
    """Model, knowledge adapters + library, FAISS index (each reused when already built)."""
    from .indexing import build_index, read_index_manifest
    from .library import AdapterLibrary
    from .models import prepare_default_model
    from .training import build_knowledge_adapters

    start = time.perf_counter()
    model_dir = prepare_default_model(progress=False)
    _say(f"[1/4] model     {model_dir} ({time.perf_counter() - start:.0f} s)")

    docs = read_documents(docs_path)
    start = time.perf_counter()
    library = out / "knowledge"
    build_knowledge_adapters(docs, out / "adapters", base=model_dir, seed=seed, workers=workers,
                             compile_to=library)
    _say(f"[2/4] adapters  {len(docs)} knowledge adapters, one per document -> {library} "
         f"({time.perf_counter() - start:.0f} s)")
    assert AdapterLibrary.load(library).names  # noqa: S101 - built above

    start = time.perf_counter()
    index = out / "index"
    try:
        fresh = sorted(read_index_manifest(index).get("doc_ids", [])) != sorted(d.id for d in docs)
    except Exception:  # noqa: BLE001 - missing or unreadable: rebuild
        fresh = True
    if fresh:
        build_index(docs, index, show_progress=False)
    _say(f"[3/4] index     {len(docs)} documents -> {index} ({time.perf_counter() - start:.0f} s)")
    return {"model": model_dir, "knowledge": library, "index": index}


def pick_questions(questions: Sequence[QuestionRecord], n: int) -> list[QuestionRecord]:
    """The first question of each document (then the next ones), up to n."""
    by_doc: dict[str, list[QuestionRecord]] = {}
    for q in questions:
        by_doc.setdefault(q.doc_id, []).append(q)
    picked: list[QuestionRecord] = []
    depth = 0
    while len(picked) < n and any(depth < len(v) for v in by_doc.values()):
        picked += [v[depth] for v in by_doc.values() if depth < len(v)][: n - len(picked)]
        depth += 1
    return picked


def correct(q: QuestionRecord, answer: str) -> bool:
    if q.task == "fact":
        return parse_bool(answer) == (q.answers[0].lower() == "true")
    return bool(contains_match(answer, list(q.answers)))


def run_demo(out: Path | None = None, *, n_questions: int = 4, k: int = 3, workers: int = 1,
             max_new_tokens: int = 32, docs: Path | None = None,
             questions: Path | None = None) -> dict[str, Any]:
    from .pipeline import LAGPipelineConfig, build_query_engine

    out = Path(out) if out else cache_dir("demo")
    data = packaged_path("demo")
    docs = Path(docs) if docs else data / "documents.jsonl"
    questions_path = Path(questions) if questions else data / "questions.jsonl"
    _say("lag demo: LoRA-Augmented Generation on SmolLM2-135M-Instruct (CPU, offline)")
    assets = build_assets(out, docs, workers=workers)
    config = LAGPipelineConfig(mode="rag+lag", k=k, similarity_top_k=1, model=str(assets["model"]),
                               index=str(assets["index"]), knowledge=str(assets["knowledge"]),
                               max_new_tokens=max_new_tokens)
    config.save(out / "pipeline.toml")
    qs = pick_questions([q for q in read_questions(questions_path) if q.task == "qa"], n_questions)
    _say(f"[4/4] answering {len(qs)} questions x {len(MODES)} modes (k={k}) ...\n")
    engines = {m: build_query_engine(config.model_copy(update={"mode": m})) for m in MODES}
    router = engines["lag"].llm.router
    rows, traces = [], []
    for q in qs:
        row: dict[str, Any] = {"question": q.question, "gold": q.answers[0], "doc_id": q.doc_id}
        for mode in MODES:
            if mode == "lag":
                with router.trace(keep_tokens=False) as trace:
                    response = engines[mode].query(q.question)
                traces.append(trace)
            else:
                response = engines[mode].query(q.question)
            answer = " ".join(str(response).split())
            lag = (response.metadata or {}).get("lag")
            top = lag["libraries"].get("knowledge", [None])[0] if lag else None
            row[mode] = {"answer": answer, "correct": correct(q, answer), "top_adapter": top,
                         "sources": [n.node.metadata.get("doc_id") for n in response.source_nodes]}
        rows.append(row)
        _print_row(row)
    totals = {m: sum(r[m]["correct"] for r in rows) for m in MODES}
    _say("correct (answer contains the gold answer): "
         + ", ".join(f"{m} {totals[m]}/{len(rows)}" for m in MODES))
    heatmap = out / "routing_heatmap.png"
    write_heatmap(heatmap, rows, traces, router.names("knowledge"))
    _say(f"routing heat-map: {heatmap}")
    _say(f"pipeline config:  {out / 'pipeline.toml'}\n"
         f"try:  lag ask \"{qs[0].question}\" --config {out / 'pipeline.toml'} "
         "--compare none,rag,lag,rag+lag")
    return {"rows": rows, "totals": totals, "heatmap": str(heatmap), "config": str(out / "pipeline.toml")}


def _print_row(row: dict[str, Any]) -> None:
    _say(f"Q: {row['question']}   (gold: {row['gold']}; document {row['doc_id']})")
    for mode in MODES:
        r = row[mode]
        mark = "+" if r["correct"] else "-"
        extra = []
        if r["sources"]:
            extra.append(f"retrieved {r['sources'][0]}")
        if r["top_adapter"]:
            extra.append(f"top adapter {r['top_adapter']['adapter']} {r['top_adapter']['share']:.0%}")
        answer = r["answer"] if len(r["answer"]) <= 90 else r["answer"][:87] + "..."
        _say(f"  {mode:8s} {mark} {answer!r}" + (f"  [{'; '.join(extra)}]" if extra else ""))
    _say("")


def write_heatmap(path: Path, rows: list[dict[str, Any]], traces: list[Any], names: list[str]) -> None:
    """One panel per question: share of LAG's (token x module) selections per layer (rows) and adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows) + 1, 6), sharey=True, squeeze=False)
    image = None
    for ax, row, trace in zip(axes[0], rows, traces):
        layers, counts = trace.layer_counts("knowledge")
        share = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
        image = ax.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          extent=(-0.5, len(names) - 0.5, max(layers) + 0.5, min(layers) - 0.5))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.split("-", 1)[-1][:14] for n in names], rotation=60, ha="right", fontsize=7)
        gold = names.index(row["doc_id"]) if row["doc_id"] in names else None
        if gold is not None:
            ax.get_xticklabels()[gold].set_color("red")
        ax.set_title("\n".join(_wrap(row["question"], 34)), fontsize=8)
    axes[0][0].set_ylabel("layer")
    fig.suptitle("LAG routing: share of selections per layer (gold document in red)", fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="share of token x module selections")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width)
