"""Compare none / RAG / LAG / RAG+LAG answers in your own app — one model, one index, mode switched by config.

Run `lag demo` once (it writes a pipeline config next to the demo's index and adapter library), then:

    python examples/compare_rag_vs_lag.py [PIPELINE_CONFIG] ["your question"]

In your app, point LAGPipelineConfig at your own index (`lag index`) and knowledge library
(`lag build-adapters --compile`), or pass your own LAGLLM / VectorStoreIndex to build_query_engine.
"""

from __future__ import annotations

import sys
from pathlib import Path

from llama_index_lag import LAGPipelineConfig, build_query_engine
from llama_index_lag._fs import cache_dir

config_path = Path(sys.argv[1]) if len(sys.argv) > 1 else cache_dir("demo") / "pipeline.toml"
question = sys.argv[2] if len(sys.argv) > 2 else "What was the name of Veltrano Oskimar's parrot?"
if not config_path.is_file():
    sys.exit(f"{config_path} not found: run `lag demo` first, or pass your own pipeline config")

config = LAGPipelineConfig.load(config_path)
print(f"Q: {question}\n")
for mode in ["none", "rag", "lag", "rag+lag"]:
    engine = build_query_engine(config.model_copy(update={"mode": mode}))  # shares the loaded model and index
    response = engine.query(question)
    sources = [n.node.metadata.get("doc_id") for n in response.source_nodes]
    routing = response.metadata.get("lag")
    top = routing["libraries"]["knowledge"][0] if routing and "knowledge" in routing["libraries"] else None
    winner = f"{top['adapter']} ({top['share']:.0%})" if top else "-"
    print(f"{mode:8s} {str(response).strip()!r}")
    print(f"         sources: {sources or '-'}; top knowledge adapter: {winner}")
