"""Compare knowledge-adapter recipes: build a library per recipe, then measure recall and routing.

    python examples/recipe_sweep.py --set demo --tag detonly --recipe '{"qa": false, "n_rewrites": 0}'
    python examples/recipe_sweep.py --set bench12 --tag default

``--set demo`` uses the 5 bundled demo documents (15 questions), ``bench12`` every 5th document of the bundled
benchmark (12 documents, 49 questions). Each run builds its adapters into ``OUT/<set>-<tag>/`` (resumable),
answers the documents' held-back questions under Oracle and routed modes
(:func:`llama_index_lag.training.measure_recall`) and writes ``result.json`` with build times and scores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from llama_index_lag.data import read_documents, read_questions
from llama_index_lag.eval.synthetic import packaged_path
from llama_index_lag.models import load_causal_lm
from llama_index_lag.training import KnowledgeRecipe, build_knowledge_adapters, measure_recall, recall_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--set", choices=["demo", "bench12"], default="demo")
    p.add_argument("--tag", default="default", help="name of this recipe in the output folder")
    p.add_argument("--recipe", default="{}", help="KnowledgeRecipe overrides as a JSON object")
    p.add_argument("--modes", default="none,oracle,arrow,spectr,lag,seq-spectr,seq-lag")
    p.add_argument("--k", type=int, default=3, help="Arrow candidates of the lag modes")
    p.add_argument("--out", default="recipe-sweep", help="output folder")
    args = p.parse_args()

    data = packaged_path("demo" if args.set == "demo" else "benchmark")
    docs = read_documents(data / "documents.jsonl")
    if args.set == "bench12":
        docs = docs[::5]
    ids = {d.id for d in docs}
    questions = [q for q in read_questions(data / "questions.jsonl") if q.doc_id in ids and q.task == "qa"]
    recipe = KnowledgeRecipe().replace(**json.loads(args.recipe))
    run = Path(args.out) / f"{args.set}-{args.tag}"

    model, tok = load_causal_lm(None)
    start = time.perf_counter()
    report = build_knowledge_adapters(docs, run / "adapters", model=model, tokenizer=tok, recipe=recipe,
                                      compile_to=run / "lib")
    build_s = time.perf_counter() - start
    res = measure_recall(model, tok, questions, run / "lib", modes=args.modes.split(","), k=args.k)
    per_adapter = [m["timings"]["total_s"] for m in report.metadata.values()]
    summary = {
        "set": args.set, "tag": args.tag, "recipe": recipe.to_dict(), "documents": len(docs),
        "questions": len(questions), "build_s": round(build_s, 1),
        "per_adapter_s": round(sum(per_adapter) / len(per_adapter), 1),
        "results": res,
    }
    (run / "result.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    print(f"{args.set}-{args.tag}: {len(docs)} adapters, {summary['per_adapter_s']} s per adapter")
    print(recall_table(res))


if __name__ == "__main__":
    main()
