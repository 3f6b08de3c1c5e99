"""The approximate Arrow index of a library, as methods of ``AdapterLibrary`` (a mixin): stable adapter
ids, the pinned FAISS index files of its revision, their checks, and rebuilding them."""

from __future__ import annotations

import shutil
import uuid
from typing import Any

import numpy as np

from .._fs import replace_dir
from ..errors import LibraryError, LibraryFormatError
from .arrow_index import (
    ARROW_DIR,
    DEFAULT_TYPE,
    FaissArrow,
    UidTable,
    build_module_index,
    check_index_type,
    load_module_indexes,
    save_arrow_index,
)
from .writer import disk_full, library_lock


class ArrowIndexed:
    """Arrow-index methods of :class:`~.store.AdapterLibrary` (it provides ``path``, ``manifest``,
    ``modules``, ``revision``, ``adapters``, ``tensors``, ``_pinned``, ``_arrow``, ``_current``, ``_adopt``,
    ``load``)."""

    _pinned: Any
    _arrow: Any
    path: Any
    modules: Any
    revision: Any
    adapters: Any
    tensors: Any
    _current: Any
    _adopt: Any

    def uids(self) -> np.ndarray:
        """[N] stable adapter ids (row order)."""
        return np.array([int(e.get("uid", i)) for i, e in enumerate(self.adapters)], dtype=np.int64)

    def uid_to_row(self) -> Any:
        """uid -> library row (array-like lookup of uid arrays; uids are sparse after removals)."""
        return UidTable(self.uids())

    def arrow_meta_exists(self) -> bool:
        return self._pinned is not None

    def has_arrow_index(self) -> bool:
        """True when the library has an approximate Arrow index built for this exact revision."""
        meta = self._pinned.meta if self._pinned is not None else None
        return bool(meta) and meta.get("revision") == self.revision and meta.get("modules") == self.modules

    def arrow_indexes(self) -> dict[str, Any]:
        """FAISS index per module, memory-mapped (raises LibraryFormatError when missing or stale)."""
        if self._arrow is None:
            self._arrow = load_module_indexes(self._pinned, self.path, self.modules, str(self.revision))
        return self._arrow

    def arrow_search(self, module: str, effort: int | None = None) -> FaissArrow:
        """Approximate Arrow for ``module``; ``effort``: HNSW efSearch / IVF nprobe (None: the default)."""
        index = self.arrow_indexes()[module]
        meta = self._pinned.meta if self._pinned is not None else {}
        return FaissArrow(index, self.uid_to_row(), effort, removed=meta.get("removed", ()))

    def arrow_index_type(self) -> str | None:
        """``hnsw`` / ``ivf`` of the current index, None without one."""
        return self._pinned.meta["type"] if self.has_arrow_index() and self._pinned is not None else None

    def _check_pinned_index(self) -> None:
        """Cheap checks of the Arrow index files opened with this revision: sizes as written, and no live
        adapter among the tombstones (``removed``)."""
        if not self.has_arrow_index() or self._pinned is None:
            return
        meta, where = self._pinned.meta, self.path / ARROW_DIR
        removed = meta.get("removed", [])
        if not isinstance(removed, list) or not all(isinstance(u, int) for u in removed):
            raise LibraryFormatError("meta.json 'removed' must list adapter uids", path=where,
                                     field="removed")
        live = set(removed) & set(self.uids().tolist())
        if live:
            raise LibraryFormatError(f"meta.json lists {len(live)} adapters of the library as removed "
                                     f"(uid {min(live)}...)", path=where, field="removed")
        files = meta.get("files")
        if files is not None:
            sizes = self._pinned.sizes()
            for position, (entry, size) in enumerate(zip(files, sizes)):
                if not isinstance(entry, list) or entry[0] != size:
                    raise LibraryFormatError(f"index file is {size} bytes, meta.json says {entry}",
                                             module=self.modules[position], path=where / f"{position}.faiss")

    def build_arrow_index(self, nlist: int | None = None, kind: str | None = None) -> Any:
        """(Re)build the approximate Arrow index for the current revision, atomically. Returns self.

        ``kind``: ``hnsw`` / ``ivf`` (None: the type of the existing index, else ``hnsw``); ``nlist``: IVF
        lists (None: ~4 sqrt(N))."""
        meta = self._pinned.meta if self._pinned is not None else None
        kind = check_index_type(kind or (meta["type"] if meta else DEFAULT_TYPE))
        with library_lock(self.path):
            if self._current() is not self:
                raise LibraryError("the library changed since it was loaded; load it again to index the "
                                   "current revision", path=self.path)
            uids = self.uids()
            indexes = (build_module_index(self.tensors(m).proto.float().numpy(), uids, kind, nlist)
                       for m in self.modules)  # one at a time
            staging = self.path / f".staging-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                with disk_full(self.path, "the approximate Arrow index", "the library is unchanged"):
                    save_arrow_index(staging, self.modules, indexes, str(self.revision))
                replace_dir(staging / ARROW_DIR, self.path / ARROW_DIR)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._adopt(type(self).load(self.path))
        return self
