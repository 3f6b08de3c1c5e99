"""``lag eval``'s results on disk: the resumable ``answers.jsonl`` (:class:`ResultStore`), ``results.json``,
and the fingerprints of a run's inputs (model weights, libraries, index)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..modes import ModeSpec

logger = logging.getLogger(__name__)

RESULTS_FORMAT = "llama-index-lag/eval-results"
RESULTS_FORMAT_VERSION = 1
ANSWERS_FILE = "answers.jsonl"
RESULTS_FILE = "results.json"


# ---- work items ------------------------------------------------------------------------------------------
@dataclass
class WorkItem:
    """One (mode, question) to answer."""

    mode: ModeSpec
    question: Any  # QuestionRecord
    order: int
    prompt: str | None = None
    routing: Any = None  # LAGConfig
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    fallback: bool = False  # answered through engine.query (multi-call refine)
    key: str = ""
    n_prompt: int = 0

    @property
    def id(self) -> tuple[str, str]:
        return (self.mode.name, self.question.id)


def digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:n]


# ---- result store ----------------------------------------------------------------------------------------
class ResultStore:
    """``answers.jsonl``: a header line (run fingerprint) then one line per finished (mode, question).

    Appends are flushed and fsync'ed per batch; a torn last line (crash mid-write) is dropped on open. A run
    whose fingerprint differs from the file's is refused (``restart=False``) or the old file is archived as
    ``answers.<old fingerprint>.jsonl`` and a new one started (``restart=True``).
    """

    def __init__(self, out_dir: str | Path, fingerprint: str, parts: Mapping[str, Any], *,
                 restart: bool = False) -> None:
        self.dir = Path(out_dir)
        self.path = self.dir / ANSWERS_FILE
        self.fingerprint = fingerprint
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            header = self._load()
            if header is not None and header.get("fingerprint") != fingerprint:
                changed = sorted(k for k in set(parts) | set(header.get("parts", {}))
                                 if parts.get(k) != header.get("parts", {}).get(k))
                if not restart:
                    raise ConfigError(
                        f"{self.path} holds results of another configuration (changed: "
                        f"{', '.join(changed) or '?'}); they would mix with this run's. Use another --out "
                        "folder, or --restart to archive the old answers and start over", path=self.path,
                        field="fingerprint")
                archived = self.dir / f"answers.{header.get('fingerprint', 'old')}.jsonl"
                os.replace(self.path, archived)
                logger.warning("configuration changed (%s): old answers archived as %s, starting over",
                               ", ".join(changed) or "?", archived)
                self.records.clear()
            elif header is None:
                self.records.clear()
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._append([{"type": "header", "format": RESULTS_FORMAT, "fingerprint": fingerprint,
                           "parts": dict(parts), "created": time.strftime("%Y-%m-%d %H:%M:%S")}])

    def _load(self) -> dict[str, Any] | None:
        raw = self.path.read_bytes()
        if raw and not raw.endswith(b"\n"):  # torn last line: drop it before appending
            keep = raw[: raw.rfind(b"\n") + 1]
            logger.warning("dropping an incomplete last line of %s (interrupted write)", self.path)
            with open(self.path, "r+b") as fh:
                fh.truncate(len(keep))
            raw = keep
        header = None
        for lineno, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DataError(f"corrupt results line: {exc.msg}", path=self.path, line=lineno) from None
            if obj.get("type") == "header":
                header = obj
            elif obj.get("type") == "answer":
                self.records[(obj["mode"], obj["qid"])] = obj
        if header is None and self.records:
            raise DataError("results file has no header line", path=self.path)
        return header

    def done(self, item: WorkItem) -> bool:
        rec = self.records.get(item.id)
        return rec is not None and rec.get("key") == item.key

    def _append(self, objs: Sequence[dict[str, Any]]) -> None:
        data = "".join(json.dumps(o, ensure_ascii=False, sort_keys=True) + "\n" for o in objs)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        objs = [{"type": "answer", **r} for r in records]
        self._append(objs)
        for o in objs:
            self.records[(o["mode"], o["qid"])] = o


def load_results(path: str | Path) -> dict[str, Any]:
    """Read a ``results.json`` (or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_FILE
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("results file not found", path=path) from None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read results: {exc}", path=path) from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise DataError("not a lag eval results.json", path=path)
    return results


# ---- fingerprints -----------------------------------------------------------------------------------------
def model_digest(model: Any) -> str:
    """Content hash of the model's weights (any source: folder, default model, object)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    h.update(type(model).__name__.encode())
    h.update(json.dumps(getattr(model.config, "to_diff_dict", lambda: {})(), sort_keys=True,
                        default=str).encode())
    seen: set[int] = set()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if ".base_layer." in name:  # LAGLinear wrappers keep the original weights under base_layer
                name = name.replace(".base_layer.", ".")
            ptr = tensor.data_ptr()
            if ptr in seen:
                continue
            seen.add(ptr)
            h.update(name.encode())
            h.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def library_digest(lib: Any) -> dict[str, Any]:
    """Content identity of a library: kind, dtype, base model, adapters' names + source checksums."""
    m = lib.manifest
    adapters = [{k: e.get(k) for k in ("name", "doc_id", "sha256", "rank", "lora_alpha", "use_rslora",
                                       "target_modules", "modules")} for e in m["adapters"]]
    return {"kind": m["kind"], "adapters": len(adapters),
            "digest": digest({"dtype": m["dtype"], "base": m["base_model"], "adapters": adapters,
                               "r_max": m.get("r_max")})}


def index_digest(index_dir: Any) -> str:
    from ..indexing import read_index_manifest

    m = read_index_manifest(index_dir)
    return digest({"files": m.get("files"), "chunking": m.get("chunking"), "doc_ids": m.get("doc_ids"),
                    "embedder": {k: v for k, v in m.get("embedder", {}).items() if k != "probe_embedding"},
                    "probe": m.get("embedder", {}).get("probe_embedding", [])[:8]})
