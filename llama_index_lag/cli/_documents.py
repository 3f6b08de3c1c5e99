"""The document-source flags shared by ``lag build-adapters`` and ``lag index``: ``--docs x.jsonl`` or
``--input-dir DIR`` (llama-index's ``SimpleDirectoryReader``, recursive, ``--required-exts``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_document_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--docs", metavar="DOCUMENTS_JSONL", help="documents.jsonl ({id, title, text} per line)")
    src.add_argument("--input-dir", metavar="DIR",
                     help="a folder of documents read with llama-index's SimpleDirectoryReader (recursive); "
                          "each document's id is its path relative to DIR")
    p.add_argument("--required-exts", metavar="EXTS", default=None,
                   help="with --input-dir: only files with these comma-separated extensions, e.g. .md,.txt")


def documents_from(args: argparse.Namespace, *outputs: str | Path | None) -> Any:
    """The documents the flags name (records); an output inside --input-dir is refused (its files would be
    read as documents next time)."""
    from ..data import read_documents
    from ..errors import ConfigError
    from ..ingest import read_directory

    if args.required_exts and not args.input_dir:
        raise ConfigError("--required-exts goes with --input-dir", field="required_exts")
    if not args.input_dir:
        return read_documents(args.docs)
    root = Path(args.input_dir).expanduser().resolve()
    for out in outputs:
        if out is not None and Path(out).expanduser().resolve().is_relative_to(root):
            raise ConfigError(f"the output {out} is inside --input-dir {args.input_dir}: its files would be "
                              "read as documents; write it elsewhere", field="out")
    exts = [e.strip() for e in args.required_exts.split(",") if e.strip()] if args.required_exts else None
    return read_directory(root, required_exts=exts)
