"""``lag check``: do an index and a knowledge library cover the same documents?"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check", help="list indexed documents without adapters and adapters without documents",
        description="Compare the documents of an index folder with the adapters of knowledge libraries, "
        "under the one id policy (a document's adapter is named after its id). Exit code 0 when they match, "
        "1 otherwise.")
    p.add_argument("--index", required=True, metavar="INDEX_DIR", help="an index folder from `lag index`")
    p.add_argument("--knowledge", required=True, nargs="+", metavar="LIB_DIR",
                   help="knowledge library folder(s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..pipeline import check_coverage

    cov = check_coverage(args.index, args.knowledge)
    if args.json:
        print(json.dumps({"documents": cov.documents, "adapters": cov.adapters,
                          "documents_without_adapters": cov.documents_without_adapters,
                          "adapters_without_documents": cov.adapters_without_documents}, indent=2))
    else:
        print(f"{cov.documents} documents, {cov.adapters} adapters")
        for title, items in (("documents without adapters", cov.documents_without_adapters),
                             ("adapters without documents", cov.adapters_without_documents)):
            print(f"{title}: {len(items)}")
            for item in items:
                print(f"  {item}")
    return 0 if cov.complete else 1
