"""``lag index`` (build / inspect a persisted FAISS index) and ``lag search`` (query one)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from ._documents import add_document_args, documents_from


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "index",
        help="embed documents (documents.jsonl or a folder) into a persisted FAISS index",
        description="Embed documents.jsonl or a folder of files (offline MiniLM by default) into a FAISS "
        "index folder, atomically."
        " "
        "With --inspect, print an index's manifest instead.",
    )
    add_document_args(p, required=False)
    p.add_argument("--out", help="index folder to write (an existing index there is replaced on success)")
    p.add_argument(
        "--embed-model", metavar="DIR", help="local sentence-transformers folder (default: offline MiniLM)"
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="N",
        help="tokens per chunk incl. title (default: 512 capped at the embedder's input length)",
    )
    p.add_argument(
        "--chunk-overlap", type=int, default=32, metavar="N", help="tokens shared by adjacent chunks"
    )
    p.add_argument("--inspect", metavar="INDEX_DIR", help="print the manifest of an existing index and exit")
    p.add_argument("--force", action="store_true", help="replace --out even if it is not a lag index")
    p.add_argument("--max-document-chars", type=int, default=None, metavar="N",
                   help="refuse documents longer than N characters (default 131072)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_index)

    s = subparsers.add_parser("search", help="retrieve the best documents of a FAISS index for a query")
    s.add_argument("index_dir", metavar="INDEX_DIR", help="an index folder from `lag index`")
    s.add_argument("query", help="the search text")
    s.add_argument("--top-k", type=int, default=3, help="results to show")
    s.add_argument(
        "--embed-model", metavar="DIR", help="local sentence-transformers folder (default: offline MiniLM)"
    )
    s.add_argument("--chunks", action="store_true", help="list chunks, not one line per document")
    s.add_argument("--json", action="store_true", help="print JSON lines (doc_id, score, node_id, text)")
    s.set_defaults(func=_run_search)


def _embedder(args: argparse.Namespace) -> Any:
    from ..models import load_embed_model

    return load_embed_model(args.embed_model) if args.embed_model else None


def _run_index(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.inspect:
        return _inspect(args.inspect)
    if not (args.docs or args.input_dir) or not args.out:
        raise ConfigError("lag index needs --docs or --input-dir, and --out (or --inspect INDEX_DIR)")
    from ..indexing import build_index

    start = time.perf_counter()
    docs = documents_from(args, args.out)
    index = build_index(
        docs,
        args.out,
        embed_model=_embedder(args),
        chunk_size=args.chunk_size,
        chunk_overlap=args.chunk_overlap,
        show_progress=not args.quiet,
        force=args.force,
        inputs=[args.docs] if args.docs else [],
        **({"max_document_chars": args.max_document_chars} if args.max_document_chars is not None else {}),
    )
    dim = index.vector_store.client.d
    nodes = index.vector_store.client.ntotal
    print(
        f"indexed {len(docs)} documents as {nodes} nodes (dim {dim}) in {time.perf_counter() - start:.1f} s "
        f"-> {args.out}"
    )
    return 0


def _inspect(index_dir: str) -> int:
    from ..indexing import read_index_manifest

    manifest = read_index_manifest(index_dir)
    manifest["embedder"].pop("probe_embedding", None)
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    return 0


def _run_search(args: argparse.Namespace) -> int:
    from ..indexing import load_index, retrieve_documents

    index = load_index(args.index_dir, embed_model=_embedder(args))
    hits = retrieve_documents(index, args.query, args.top_k, dedupe=not args.chunks)
    for rank, hit in enumerate(hits, start=1):
        if args.json:
            print(
                json.dumps(
                    {
                        "rank": rank,
                        "doc_id": hit.doc_id,
                        "score": hit.score,
                        "node_id": hit.node_id,
                        "title": hit.title,
                        "text": hit.text,
                    },
                    ensure_ascii=False,
                )
            )
        else:
            snippet = " ".join(hit.text.split())[:80]
            print(f"{rank}\t{hit.score:.4f}\t{hit.doc_id}\t{hit.node_id}\t{snippet}")
    return 0
