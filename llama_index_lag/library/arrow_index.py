"""Approximate Arrow retrieval for large libraries: one FAISS index per adapted module over the prototypes.

Two index types (float16 vectors, the size of float16 prototypes):

* ``hnsw`` (default): a graph (``IndexHNSWSQ``, M = 32); its recall of the exact top-k and its speed
  against the exact scan, per library size: ``lag bench scale`` (BENCHMARKS.md). Graphs cannot delete
  nodes: removed adapters become *tombstones* that searches skip (an ``IDSelector``), and the index is
  rebuilt once they pass a quarter of it.
* ``ivf``: an inverted file (``IndexIVFScalarQuantizer``, ~4 sqrt(N) lists), searched in ``nprobe`` lists.
  Cheaper to build and update (ids are removed in place) but needs ~4x the reads of ``hnsw`` for the same
  recall on spread-out prototypes.

Arrow needs the top-k of ``|a_i . x|`` (singular vectors have no sign). The index holds ``a_i`` once (inner
product metric) and is queried with both ``x`` and ``-x``; the merged top-k by score is the top-k by
absolute score. Index ids are the adapters' stable ``uid`` (manifest), so adding adapters only adds
vectors and removing them only removes (or hides) ids: no renumbering.

Stored in ``LIB_DIR/arrow_index/``: ``{i}.faiss`` per module (i = position in the manifest's modules) and
``meta.json`` with the index ``type``, the library ``revision`` it was built for and the tombstones
(``removed`` uids). Indexes are memory-mapped. A missing or stale index is never used silently:
:func:`load_module_indexes` raises :class:`LibraryFormatError` (``build_arrow_index()`` rebuilds it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import weakref
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._fs import atomic_write_json
from ..errors import ConfigError, LibraryFormatError

ARROW_DIR = "arrow_index"
INDEX_TYPES = ("hnsw", "ivf")
DEFAULT_TYPE = "hnsw"
DEFAULT_EFFORT = {"hnsw": 512, "ivf": 64}  # efSearch / nprobe
HNSW_M = 32  # graph degree
HNSW_EF_CONSTRUCTION = 40
COMPACT_AT = 0.25  # rebuild an HNSW index once this share of its nodes are tombstones


def _faiss() -> Any:
    import faiss

    return faiss


def check_index_type(kind: str) -> str:
    if kind not in INDEX_TYPES:
        raise ConfigError(f"arrow index type must be one of {INDEX_TYPES}, got {kind!r}", field="arrow_index")
    return kind


def default_nlist(n: int) -> int:
    """About 4 sqrt(N) lists, with >= 40 training points per list (FAISS' k-means minimum)."""
    return int(max(1, min(65536, 4 * math.sqrt(n), n // 40)))


def build_module_index(protos: np.ndarray, uids: np.ndarray, kind: str = DEFAULT_TYPE,
                       nlist: int | None = None, seed: int = 0) -> Any:
    """Inner-product index of type ``kind`` over prototypes [N, n] with ids = uids [N] (int64)."""
    faiss = _faiss()
    check_index_type(kind)
    n_vec, dim = protos.shape
    vectors = np.ascontiguousarray(protos, dtype=np.float32)
    if kind == "hnsw":
        graph = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.train(vectors[:1])  # float16 storage learns nothing; marks the index trained
        index = faiss.IndexIDMap(graph)
    else:
        nlist = min(nlist or default_nlist(n_vec), n_vec)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.seed = seed
        rng = np.random.default_rng(seed)
        sample = (vectors if n_vec <= 64 * nlist
                  else vectors[np.sort(rng.choice(n_vec, 64 * nlist, replace=False))])
        index.train(sample)
    index.add_with_ids(vectors, uids.astype(np.int64))
    return index


def index_type(index: Any) -> str:
    """``hnsw`` or ``ivf``, from a FAISS index built by :func:`build_module_index`."""
    return "hnsw" if isinstance(index, _faiss().IndexIDMap) else "ivf"


def index_path(lib_dir: Path, position: int) -> Path:
    return lib_dir / ARROW_DIR / f"{position}.faiss"


def save_arrow_index(lib_dir: Path, modules: list[str], indexes: Iterable[Any], revision: str,
                     removed: Iterable[int] = ()) -> None:
    """Write one index per module (``indexes``: in ``modules`` order; may be a generator, so only one
    index is in memory at a time), then ``meta.json``."""
    faiss = _faiss()
    folder = lib_dir / ARROW_DIR
    folder.mkdir(parents=True, exist_ok=True)
    ntotal, nlist, kind = {}, {}, DEFAULT_TYPE
    files = []
    for position, (module, index) in enumerate(zip(modules, indexes, strict=True)):
        path = index_path(lib_dir, position)
        try:
            faiss.write_index(index, str(path))
        except RuntimeError as exc:  # FAISS reports a failed write with strerror(errno) in the message
            if "No space left" in str(exc) or "quota" in str(exc).lower():
                raise OSError(errno.ENOSPC, f"writing the approximate Arrow index: {exc}",
                              str(path)) from None
            raise
        files.append([path.stat().st_size, file_crc32(path)])
        kind, ntotal[module] = index_type(index), int(index.ntotal)
        if kind == "ivf":
            nlist[module] = int(index.nlist)
        del index
    meta = {"revision": revision, "modules": modules, "type": kind,
            "removed": sorted(int(u) for u in removed), "ntotal": ntotal, "files": files}
    if kind == "ivf":
        meta.update(nlist=nlist, nprobe=DEFAULT_EFFORT["ivf"], kind="IVF,SQfp16/inner-product")
    else:
        meta.update(M=HNSW_M, efConstruction=HNSW_EF_CONSTRUCTION, efSearch=DEFAULT_EFFORT["hnsw"],
                    kind="IDMap,HNSW,SQfp16/inner-product")
    atomic_write_json(folder / "meta.json", meta)


def file_crc32(path: str | Path, chunk: int = 1 << 22) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


def read_arrow_meta(lib_dir: Path, dir_fd: int | None = None) -> dict[str, Any] | None:
    """``arrow_index/meta.json`` of a library folder (``dir_fd``: of the open folder ``lib_dir``), or None."""
    try:
        with open(os.open(f"{ARROW_DIR}/meta.json" if dir_fd is not None
                          else lib_dir / ARROW_DIR / "meta.json", os.O_RDONLY, dir_fd=dir_fd),
                  encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict):
        return None
    meta.setdefault("type", "ivf")  # indexes written before HNSW existed
    meta.setdefault("removed", [])
    return meta


class PinnedArrow:
    """The Arrow index files of one library revision, opened when the library was loaded.

    A writer replaces the whole library folder, so reading the index by path later could find another
    revision's files (or none). Holding open file descriptors keeps this revision's files readable;
    FAISS reads them through ``/proc/self/fd`` (``/dev/fd`` elsewhere)."""

    def __init__(self, meta: dict[str, Any], fds: list[int]) -> None:
        self.meta = meta
        self.fds = fds
        self._finalizer = weakref.finalize(self, _close_all, list(fds))

    @classmethod
    def open(cls, dir_fd: int, lib_dir: Path) -> PinnedArrow | None:
        """Pin the index of the folder open as ``dir_fd`` (None without one). A file listed by meta.json
        but missing raises FileNotFoundError (the folder is being replaced: the caller retries)."""
        meta = read_arrow_meta(lib_dir, dir_fd)
        if meta is None:
            return None
        modules = meta.get("modules")
        if not isinstance(modules, list):
            raise LibraryFormatError("meta.json has no module list", path=lib_dir / ARROW_DIR,
                                     field="modules")
        fds: list[int] = []
        try:
            for position in range(len(modules)):
                fds.append(os.open(f"{ARROW_DIR}/{position}.faiss", os.O_RDONLY, dir_fd=dir_fd))
        except BaseException:
            _close_all(fds)
            raise
        return cls(meta, fds)

    def paths(self) -> list[str]:
        return [_fd_path(fd) for fd in self.fds]

    def sizes(self) -> list[int]:
        return [os.fstat(fd).st_size for fd in self.fds]

    def close(self) -> None:
        self._finalizer()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}" if os.path.isdir("/proc/self/fd") else f"/dev/fd/{fd}"


def load_module_indexes(pinned: PinnedArrow | None, lib_dir: Path, modules: list[str], revision: str,
                        mmap: bool = True) -> dict[str, Any]:
    """Read every module's index of a pinned revision (memory-mapped); raise LibraryFormatError if missing
    or built for another revision. Several are read at once (FAISS releases the GIL): on a cold page cache
    each read waits on the disk."""
    meta = checked_meta(pinned, lib_dir, modules, revision)
    assert pinned is not None
    paths = pinned.paths()
    with ThreadPoolExecutor(max(1, min(8, len(modules)))) as pool:
        indexes = list(pool.map(lambda job: _read_index(lib_dir, paths[job[0]], *job, meta, mmap),
                                enumerate(modules)))
    return dict(zip(modules, indexes))


def iter_module_indexes(pinned: PinnedArrow | None, lib_dir: Path, modules: list[str], revision: str,
                        mmap: bool = True) -> Iterator[Any]:
    """Each module's index in turn (``mmap=False``: a private, writable copy, for updating it), after
    checking ``meta.json`` (LibraryFormatError if missing or stale)."""
    meta = checked_meta(pinned, lib_dir, modules, revision)
    assert pinned is not None
    paths = pinned.paths()
    return (_read_index(lib_dir, paths[position], position, module, meta, mmap)
            for position, module in enumerate(modules))


def checked_meta(pinned: PinnedArrow | None, lib_dir: Path, modules: list[str],
                 revision: str) -> dict[str, Any]:
    if pinned is None:
        raise LibraryFormatError("approximate Arrow index missing (arrow_index/meta.json); rebuild it with "
                                 "AdapterLibrary.build_arrow_index() or `lag compile --arrow-index hnsw`",
                                 path=lib_dir / ARROW_DIR)
    meta = pinned.meta
    if meta.get("revision") != revision or meta.get("modules") != modules:
        raise LibraryFormatError("approximate Arrow index is stale (built for another revision of this "
                                 "library); rebuild it with AdapterLibrary.build_arrow_index()",
                                 path=lib_dir / ARROW_DIR)
    return meta


def _read_index(lib_dir: Path, source: str, position: int, module: str, meta: dict[str, Any],
                mmap: bool) -> Any:
    faiss = _faiss()
    # IVF lists are memory-mapped by IO_FLAG_MMAP, flat codes and HNSW graphs by IO_FLAG_MMAP_IFC.
    flags = ((faiss.IO_FLAG_MMAP if meta["type"] == "ivf" else faiss.IO_FLAG_MMAP_IFC)
             | faiss.IO_FLAG_READ_ONLY)
    path = index_path(lib_dir, position)
    try:
        index = faiss.read_index(source, flags) if mmap else faiss.read_index(source)
    except RuntimeError as exc:
        raise LibraryFormatError(f"cannot read approximate Arrow index: {exc}", module=module,
                                 path=path) from None
    if index_type(index) != meta["type"] or index.ntotal != meta["ntotal"].get(module):
        raise LibraryFormatError(f"approximate Arrow index does not match meta.json (type {meta['type']}, "
                                 f"{meta['ntotal'].get(module)} vectors); rebuild it with "
                                 "AdapterLibrary.build_arrow_index()", module=module, path=path)
    return index


def update_index(index: Any, add: tuple[np.ndarray, np.ndarray] | None, remove: Iterable[int]) -> Any:
    """Incremental update: add (protos [K, n], uids [K]) and remove uids (IVF: in place; HNSW: the caller
    keeps them as tombstones), without retraining."""
    remove = np.fromiter(remove, dtype=np.int64)
    if remove.size and index_type(index) == "ivf":
        index.remove_ids(remove)
    if add is not None and add[0].shape[0]:
        index.add_with_ids(np.ascontiguousarray(add[0], dtype=np.float32), add[1].astype(np.int64))
    return index


class FaissArrow:
    """Approximate Arrow top-k for one module: ``search(x [T, n], k) -> (scores [T, k], rows [T, k])``.

    Rows are library row indices (uids mapped through ``uid_to_row``); missing results have score -1.
    ``effort``: search breadth (HNSW ``efSearch`` / IVF ``nprobe``); ``removed``: tombstone uids to skip.
    """

    def __init__(self, index: Any, uid_to_row: np.ndarray, effort: int | None = None,
                 removed: Iterable[int] = ()) -> None:
        faiss = _faiss()
        self.index = index
        self.kind = index_type(index)
        self.uid_to_row = uid_to_row
        self.effort = effort or DEFAULT_EFFORT[self.kind]
        removed = np.fromiter(removed, dtype=np.int64)
        # Keep the inner selector referenced: IDSelectorNot holds a raw pointer to it.
        self._removed = faiss.IDSelectorBatch(removed) if removed.size else None
        self._select = faiss.IDSelectorNot(self._removed) if removed.size else None

    def beats_exact(self, tokens: int, effort: int | None = None) -> bool:
        """Whether searching ``tokens`` queries should cost less than the exact scan of all N prototypes.

        Cost model fitted on a 2-core x86 CPU (``lag bench scale``, BENCHMARKS.md), in ms per prototype
        element of the library: the exact scan reads all of it once per call (~1.4e-7) plus a GEMM term per
        token (~1.2e-8); a search (queries x and -x) reads 2 nprobe / nlist of it per token for IVF
        (~5e-7 each), and ~2 efSearch vectors per token for HNSW (~5.5e-6 per vector dimension).
        So the index pays off for decoding large libraries, while long prompts scan exactly.
        """
        effort = effort or self.effort
        if self.kind == "hnsw":
            per_token = 2 * effort * 5.5e-6 / max(self.index.ntotal, 1)
        else:
            per_token = 2 * effort / self.index.nlist * 5e-7
        return tokens * per_token < 1.4e-7 + 1.2e-8 * tokens

    def _params(self, effort: int) -> Any:
        faiss = _faiss()
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(efSearch=effort, sel=self._select)
        return faiss.SearchParametersIVF(nprobe=effort)

    def search(self, x: torch.Tensor, k: int, effort: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        xq = x.detach().float().cpu().numpy()  # [T, n]
        T = xq.shape[0]
        scores, uids = self.index.search(np.concatenate([xq, -xq]), k,
                                         params=self._params(effort or self.effort))
        scores = np.concatenate([scores[:T], scores[T:]], axis=1)  # [T, 2k]
        uids = np.concatenate([uids[:T], uids[T:]], axis=1)
        scores[uids < 0] = -1.0
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, 1)
        rows = self.uid_to_row[np.maximum(np.take_along_axis(uids, order, 1), 0)]
        return torch.from_numpy(top), torch.from_numpy(rows.astype(np.int64))


class UidTable:
    """uid -> library row for arrays of uids (``table[uids]``); uids are sparse after removals."""

    def __init__(self, uids: np.ndarray) -> None:
        self._order = np.argsort(uids, kind="stable")
        self._sorted = uids[self._order]

    def __getitem__(self, uids: np.ndarray) -> np.ndarray:
        pos = np.minimum(np.searchsorted(self._sorted, uids), len(self._sorted) - 1)
        if not bool((self._sorted[pos] == uids).all()):
            raise LibraryFormatError("the approximate Arrow index returned an adapter uid the library does "
                                     "not have (stale index)")
        return self._order[pos]
