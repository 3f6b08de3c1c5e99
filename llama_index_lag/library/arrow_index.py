"""Approximate Arrow retrieval for large libraries: one FAISS IVF (float16 vectors) index per adapted module over the prototypes.

Arrow needs the top-k of ``|a_i . x|`` (singular vectors have no sign). The index holds ``a_i`` once (inner
product metric) and is queried with both ``x`` and ``-x``; the merged top-k by score is the top-k by
absolute score. Index ids are the adapters' stable ``uid`` (manifest), so adding adapters only adds
vectors and removing them only removes ids: no retraining, no renumbering.

Stored in ``LIB_DIR/arrow_index/``: ``{i}.faiss`` per module (i = position in the manifest's modules) and
``meta.json`` with the library ``revision`` it was built for. A missing or stale index is never used
silently: :func:`load_arrow_index` raises :class:`LibraryFormatError` (``rebuild=True`` rebuilds it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fs import atomic_write_json
from ..errors import LibraryFormatError

ARROW_DIR = "arrow_index"
DEFAULT_NPROBE = 64


def _faiss() -> Any:
    import faiss

    return faiss


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists, with >= 40 training points per list (FAISS' k-means minimum)."""
    return int(max(1, min(65536, 4 * math.sqrt(n), n // 40)))


def build_module_index(protos: np.ndarray, uids: np.ndarray, nlist: int | None = None, seed: int = 0) -> Any:
    """IVF inner-product index (vectors stored as float16: the size of float16 prototypes) over prototypes
    [N, n], ids = uids [N] (int64)."""
    faiss = _faiss()
    n_vec, dim = protos.shape
    nlist = min(nlist or default_nlist(n_vec), n_vec)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                          faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = 10
    index.cp.seed = seed
    rng = np.random.default_rng(seed)
    sample = protos if n_vec <= 64 * nlist else protos[np.sort(rng.choice(n_vec, 64 * nlist, replace=False))]
    index.train(np.ascontiguousarray(sample, dtype=np.float32))
    index.add_with_ids(np.ascontiguousarray(protos, dtype=np.float32), uids.astype(np.int64))
    return index


def index_path(lib_dir: Path, position: int) -> Path:
    return lib_dir / ARROW_DIR / f"{position}.faiss"


def save_arrow_index(lib_dir: Path, modules: list[str], indexes: dict[str, Any], revision: str) -> None:
    faiss = _faiss()
    folder = lib_dir / ARROW_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for position, module in enumerate(modules):
        faiss.write_index(indexes[module], str(index_path(lib_dir, position)))
    nlist = {m: int(indexes[m].nlist) for m in modules}
    atomic_write_json(folder / "meta.json", {"revision": revision, "modules": modules, "nlist": nlist,
                                             "ntotal": {m: int(indexes[m].ntotal) for m in modules},
                                             "nprobe": DEFAULT_NPROBE, "kind": "IVF,SQfp16/inner-product"})


def read_arrow_meta(lib_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((lib_dir / ARROW_DIR / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_module_indexes(lib_dir: Path, modules: list[str], revision: str) -> dict[str, Any]:
    """Read every module's index; raise LibraryFormatError if missing or built for another revision."""
    meta = read_arrow_meta(lib_dir)
    if meta is None:
        raise LibraryFormatError("approximate Arrow index missing (arrow_index/meta.json); rebuild it with "
                                 "AdapterLibrary.build_arrow_index() or `lag compile --arrow-index`",
                                 path=lib_dir / ARROW_DIR)
    if meta.get("revision") != revision or meta.get("modules") != modules:
        raise LibraryFormatError("approximate Arrow index is stale (built for another revision of this library); "
                                 "rebuild it with AdapterLibrary.build_arrow_index()", path=lib_dir / ARROW_DIR)
    faiss = _faiss()
    out = {}
    for position, module in enumerate(modules):
        path = index_path(lib_dir, position)
        try:
            out[module] = faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError as exc:
            raise LibraryFormatError(f"cannot read approximate Arrow index: {exc}", module=module,
                                     path=path) from None
    return out


def update_index(index: Any, add: tuple[np.ndarray, np.ndarray] | None, remove: Iterable[int]) -> Any:
    """Incremental update: add (protos [K, n], uids [K]) and remove uids, without retraining."""
    remove = np.fromiter(remove, dtype=np.int64)
    if remove.size:
        index.remove_ids(remove)
    if add is not None and add[0].shape[0]:
        index.add_with_ids(np.ascontiguousarray(add[0], dtype=np.float32), add[1].astype(np.int64))
    return index


class FaissArrow:
    """Approximate Arrow top-k for one module: ``search(x [T, n], k) -> (scores [T, k], rows [T, k])``.

    Rows are library row indices (uids mapped through ``uid_to_row``); missing results have score -1.
    """

    def __init__(self, index: Any, uid_to_row: np.ndarray, nprobe: int = DEFAULT_NPROBE) -> None:
        self.index = index
        self.uid_to_row = uid_to_row
        self.nprobe = nprobe

    def beats_exact(self, tokens: int, nprobe: int | None = None) -> bool:
        """Whether searching ``tokens`` queries should cost less than the exact scan of all N prototypes.

        Cost model fitted on a 2-core x86 CPU (``lag bench scale``, BENCHMARKS.md), per prototype element:
        the search reads 2 nprobe / nlist of the library per token (queries x and -x), ~5e-7 ms each; the
        exact scan reads all of it once per call (~1.4e-7 ms) plus a GEMM term per token (~1.2e-8 ms).
        So the index pays off for decoding large libraries, while long prompts scan exactly.
        """
        scanned = 2 * (nprobe or self.nprobe) / self.index.nlist  # share of the library read per token
        return tokens * scanned * 5e-7 < 1.4e-7 + 1.2e-8 * tokens

    def search(self, x: torch.Tensor, k: int, nprobe: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        faiss = _faiss()
        xq = x.detach().float().cpu().numpy()  # [T, n]
        T = xq.shape[0]
        params = faiss.SearchParametersIVF(nprobe=nprobe or self.nprobe)
        scores, uids = self.index.search(np.concatenate([xq, -xq]), k, params=params)  # [2T, k]
        scores = np.concatenate([scores[:T], scores[T:]], axis=1)  # [T, 2k]
        uids = np.concatenate([uids[:T], uids[T:]], axis=1)
        scores[uids < 0] = -1.0
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, 1)
        rows = self.uid_to_row[np.maximum(np.take_along_axis(uids, order, 1), 0)]
        return torch.from_numpy(top), torch.from_numpy(rows.astype(np.int64))
