"""An existing LlamaIndex app (its own reader, index and chat engine) gains RAG+LAG in a few lines.

    python examples/existing_app.py [--docs DIR] [--mode rag+lag|prag|...] [--base MODEL_DIR] [--steps N]

Without ``--docs`` it chats over the package's five demo documents (written as .md files into the user
cache). Adapters are built once per document and cached (the embedded SmolLM2-135M-Instruct: about a minute
per document on 2 CPU cores; re-runs skip finished ones).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_index.core import SimpleDirectoryReader, VectorStoreIndex

from llama_index_lag import LAGLLM, build_chat_engine, build_knowledge_adapters, read_documents
from llama_index_lag._fs import cache_dir
from llama_index_lag.data import packaged_path
from llama_index_lag.models import load_embed_model


def demo_folder() -> Path:
    """The demo documents as a folder of Markdown files, as an app would have them."""
    folder = cache_dir("examples", "existing-app-docs")
    folder.mkdir(parents=True, exist_ok=True)
    for doc in read_documents(packaged_path("demo") / "documents.jsonl"):
        (folder / f"{doc.title}.md").write_text(doc.text + "\n", encoding="utf-8")
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=Path, default=None, help="a folder of documents (default: the demo's)")
    p.add_argument("--mode", default="rag+lag", help="pipeline mode of the chat engine (default rag+lag)")
    p.add_argument("--base", default=None, help="base model folder (default: the embedded SmolLM2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: recipe's)")
    p.add_argument("--no-generate", action="store_true", help="no model-written rewrites / QA pairs")
    p.add_argument("--question", action="append", default=None, help="a chat turn (repeatable)")
    args = p.parse_args()
    folder = args.docs or demo_folder()

    # ---- the existing app: its own documents, embedder and index ---------------------------------------
    documents = SimpleDirectoryReader(str(folder), recursive=True).load_data()
    embed_model = load_embed_model()
    index = VectorStoreIndex.from_documents(documents, embed_model=embed_model)

    # ---- the few lines that add LAG ----------------------------------------------------------------------
    from llama_index_lag import KnowledgeRecipe

    recipe = KnowledgeRecipe(**({"steps": args.steps} if args.steps else {}),
                             **({"n_rewrites": 0, "qa": False} if args.no_generate else {}))
    work = cache_dir("examples", "existing-app", Path(folder).resolve().name)
    build_knowledge_adapters(documents, work / "adapters", base=args.base, recipe=recipe,
                             compile_to=work / "library")  # resumable: the same files are not rebuilt
    llm = LAGLLM(args.base, libraries=[work / "library"], max_new_tokens=48)
    chat = build_chat_engine(mode=args.mode, llm=llm, index=index, similarity_top_k=2)

    for question in args.question or ["Where was Veltrano Oskimar born?", "What did he make there?"]:
        response = chat.chat(question)
        lag = (response.metadata or {}).get("lag") or {}
        top = {kind: ads[0]["adapter"] for kind, ads in lag.get("libraries", {}).items() if ads}
        print(f"Q: {question}\nA: {response.response.strip()}\n   routing: {lag.get('mode', 'off')} {top}\n")


if __name__ == "__main__":
    main()
