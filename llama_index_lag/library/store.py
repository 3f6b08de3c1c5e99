"""The compiled adapter library: a folder with ``manifest.json`` + one packed, memory-mapped safetensors file.

Layout of ``LIB_DIR``::

    manifest.json           format version, kind, dtype, r_max, base-model fingerprint, modules, adapters
    adapters.safetensors    per adapted module: {module}.A [N, r_max, n], {module}.B [N, m, r_max],
                            {module}.proto [N, n]   (zero-padded ranks; absent modules all-zero)

Every write goes to a hidden ``.<name>.partial`` sibling and replaces the library with one rename, so an
interrupted or failed compile / add / remove leaves the previous library intact; re-running the same compile
resumes from the last finished chunk of adapters.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from .._env import __version__
from .._fs import atomic_write_json, check_output, disk_full_error, file_lock, is_disk_full, replace_dir
from ..errors import (
    AdapterError,
    AdapterFormatError,
    ConfigError,
    IncompatibleAdapterError,
    LAGError,
    LibraryError,
    LibraryFormatError,
)
from ..ids import id_key, validate_id  # the id rules shared with documents
from .align import spectral_align
from .arrow_index import (
    ARROW_DIR,
    COMPACT_AT,
    DEFAULT_TYPE,
    FaissArrow,
    PinnedArrow,
    build_module_index,
    check_index_type,
    iter_module_indexes,
    load_module_indexes,
    save_arrow_index,
    update_index,
)
from .base import BaseModelSpec
from .integrity import CHECKSUM, FORMAT, FORMAT_VERSION, KINDS, parse_manifest
from .integrity import verify as verify_library
from .packed import PackedFormatError, PackedReader, PackedWriter, tensor_names
from .peft_io import AdapterHeader, factor_arrays, read_header

MANIFEST = "manifest.json"
TENSORS = "adapters.safetensors"
_DERIVED = ("adapters", "modules", "r_max", "revision", "created_by", "checksums", "format_version")
ARROW_INDEX_MIN = 4096  # libraries this large get an approximate Arrow index by default
WORKERS = 2  # chunks read, hashed, aligned and written concurrently
ALIGN_BATCH = 64  # (module, adapter) pairs aligned in one batch: ~3 MB of float32 factors at SmolLM2's sizes
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
Kind = Literal["task", "knowledge"]
logger = logging.getLogger(__name__)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", field="dtype")


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_adapter_name(name: str) -> str:
    """Adapter names become file names and document ids: refuse path-like or unsafe names."""
    try:
        return validate_id(name)
    except ValueError as exc:
        raise AdapterError(f"invalid adapter name: {exc}", adapter=name, field="name") from None


@dataclass(frozen=True)
class ModuleTensors:
    """Packed, aligned tensors of one adapted module (memory-mapped views)."""

    A: torch.Tensor  # [N, r_max, n]  A*_i = V_i^T (orthonormal rows; zero rows beyond rank)
    B: torch.Tensor  # [N, m, r_max]  B*_i = U_i S_i
    proto: torch.Tensor  # [N, n]     Arrow prototypes A*_i[0]


@dataclass
class _Row:
    """One adapter of a library being written: its manifest entry and where its tensors come from."""

    entry: dict[str, Any]
    header: AdapterHeader | None = None  # new adapter, aligned from its PEFT folder
    old_index: int | None = None  # existing adapter, copied from the current library
    # already-aligned factors: generate(module, rows [K]) -> (A* [K, r, n], B* [K, m, r])
    generate: Any = None


class AdapterLibrary:
    """A compiled library of spectrally aligned LoRA adapters of one kind (task or knowledge).

    Create with :meth:`compile`, open with :meth:`load`; update with :meth:`add` / :meth:`remove`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], reader: PackedReader | None = None,
                 pinned: PinnedArrow | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._handle: PackedReader | None = reader  # this revision's packed file, mapped at load
        self._pinned = pinned  # this revision's Arrow index files, opened at load
        self._tensors: dict[str, ModuleTensors] = {}
        self._arrow: dict[str, Any] | None = None
        self._index = {entry["name"]: i for i, entry in enumerate(manifest["adapters"])}

    # ---- basic properties -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return [entry["name"] for entry in self.manifest["adapters"]]

    @property
    def kind(self) -> Kind:
        return self.manifest["kind"]

    @property
    def modules(self) -> list[str]:
        return list(self.manifest["modules"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def r_max(self) -> int:
        return int(self.manifest["r_max"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.manifest["base_model"]["fingerprint"]

    @property
    def adapters(self) -> list[dict[str, Any]]:
        """Manifest entries: name, doc_id, source, sha256, rank, lora_alpha, use_rslora, modules."""
        return self.manifest["adapters"]

    def __len__(self) -> int:
        return len(self.manifest["adapters"])

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __repr__(self) -> str:
        return (f"AdapterLibrary(kind={self.kind!r}, adapters={len(self)}, modules={len(self.modules)}, "
                f"r_max={self.r_max}, dtype={self.manifest['dtype']}, path={str(self.path)!r})")

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise LibraryError(f"no adapter named {name!r} in this {self.kind} library", adapter=name,
                               path=self.path) from None

    def doc_ids(self) -> dict[str, str]:
        """Document id -> adapter name (knowledge libraries built from documents)."""
        return {entry.get("doc_id") or entry["name"]: entry["name"] for entry in self.adapters}

    def module_shape(self, module: str) -> tuple[int, int]:
        info = self.manifest["modules"][module]
        return int(info["out_features"]), int(info["in_features"])

    def present(self, module: str) -> torch.Tensor | None:
        """[N] bool: which adapters adapt ``module``; None when every adapter adapts every module."""
        if all(e.get("modules") is None for e in self.adapters):
            return None
        return torch.tensor([e.get("modules") is None or module in e["modules"] for e in self.adapters])

    # ---- tensors --------------------------------------------------------------------------------
    def tensors(self, module: str) -> ModuleTensors:
        """Memory-mapped A*, B*, prototypes of one module (no copy; the OS pages them in on use). Read-only
        views of the library file: copy before modifying (``.clone()``)."""
        if module not in self._tensors:
            if module not in self.manifest["modules"]:
                raise LibraryError("module not in this library", module=module, path=self.path)
            reader = self._open()
            self._tensors[module] = ModuleTensors(*(self._tensor(reader, module, key)
                                                    for key in tensor_names(module)))
        return self._tensors[module]

    def _open(self) -> PackedReader:
        if self._handle is None:  # after close(): reopen by path, only if it is still this revision
            file = self.path / TENSORS
            try:
                self._handle = PackedReader(file)
            except (PackedFormatError, OSError, ValueError) as exc:
                raise LibraryFormatError(f"cannot open packed tensors: {exc}", path=file) from None
            if self._handle.metadata.get("revision") != self.revision:
                self._handle = None
                raise LibraryFormatError("the library was replaced since it was loaded (another revision is "
                                         "on disk): load it again", path=self.path)
        return self._handle

    def _tensor(self, reader: PackedReader, module: str, key: str) -> torch.Tensor:
        try:
            return reader.tensor(key)
        except PackedFormatError as exc:
            raise LibraryFormatError(f"packed tensor: {exc} (stale or corrupt library)", module=module,
                                     field=key, path=self.path / TENSORS) from None

    def check_mapped(self) -> None:
        """Raise :class:`LibraryFormatError` if the mapped packed file was truncated since it was opened.

        Called before every routed forward (one ``fstat``): reading a page past the end of a truncated
        file would otherwise kill the process with SIGBUS. Writers never modify a library file in place."""
        if self._handle is not None:
            try:
                self._handle.check_size()
            except PackedFormatError as exc:
                raise LibraryFormatError(f"packed tensors damaged while in use: {exc}",
                                         path=self.path / TENSORS) from None

    def _check_tensor_file(self) -> None:
        """The packed file must be of this revision, hold exactly the manifest's tensors with its shapes and
        dtype, and every tensor must lie within the file (detects stale / truncated / mixed-up files)."""
        reader = self._open()
        file = self.path / TENSORS
        if reader.metadata.get("revision") != self.revision:
            raise LibraryFormatError("manifest and packed tensors are from different revisions (stale "
                                     "library)", path=file)
        expected = {key for module in self.modules for key in tensor_names(module)}
        extra = sorted(set(reader.keys) - expected)
        if extra:
            raise LibraryFormatError(f"packed file holds tensors the manifest does not list: {extra[:3]} "
                                     "(a module was removed from the manifest?)", path=file, field=extra[0])
        n, r = len(self), self.r_max
        for module in self.modules:
            m, n_in = self.module_shape(module)
            for key, shape in zip(tensor_names(module), ((n, r, n_in), (n, m, r), (n, n_in))):
                t = self._tensor(reader, module, key)
                if tuple(t.shape) != shape or t.dtype != DTYPES[self.manifest["dtype"]]:
                    raise LibraryFormatError(
                        f"packed tensor is {t.dtype} {list(t.shape)}, manifest says "
                        f"{self.manifest['dtype']} {list(shape)} (stale library)",
                        module=module, field=key, path=file,
                    )

    # ---- load -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, verify: bool = False) -> AdapterLibrary:
        """Open a compiled library: the manifest is read and checked, the packed tensors are memory-mapped
        (nothing else is read), the Arrow index files are opened. ``verify``: also check every stored
        checksum (reads the whole library, see :meth:`verify`).

        Everything is opened through one handle on the library folder, so a library is always read from
        one revision: a writer replaces the whole folder at once and the revision opened stays readable for
        as long as this object holds it. If the old folder is deleted mid-open, the load is retried.
        """
        path = Path(path)
        for attempt in range(20):
            try:
                lib = cls._load_once(path)
            except _Replaced:
                time.sleep(0.01 * (attempt + 1))
                continue
            if verify:
                lib.verify()
            return lib
        raise LibraryFormatError("the library kept being replaced while it was opened", path=path)

    @classmethod
    def _load_once(cls, path: Path) -> AdapterLibrary:
        if not path.is_dir():
            raise LibraryFormatError("library folder does not exist", path=path)
        try:
            dir_fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise _Replaced from None
        try:
            try:
                with open(os.open(MANIFEST, os.O_RDONLY, dir_fd=dir_fd), "rb") as f:
                    raw = f.read()
            except FileNotFoundError:
                if _replaced(path, dir_fd):
                    raise _Replaced from None
                raise LibraryFormatError(f"not an adapter library ({MANIFEST} is missing)",
                                         path=path) from None
            manifest = parse_manifest(raw, path / MANIFEST)
            try:
                reader = PackedReader(Path(TENSORS), dir_fd=dir_fd)
                pinned = PinnedArrow.open(dir_fd, path)
                if pinned is None and _replaced(path, dir_fd):
                    raise _Replaced  # its index may have been deleted with the old folder
            except FileNotFoundError as exc:
                if _replaced(path, dir_fd):
                    raise _Replaced from None
                raise LibraryFormatError(f"library file missing: {exc.filename}", path=path) from None
            except (PackedFormatError, OSError, ValueError) as exc:
                raise LibraryFormatError(f"cannot open packed tensors: {exc}", path=path / TENSORS) from None
        finally:
            os.close(dir_fd)
        lib = cls(path, manifest, reader, pinned)
        lib._check_tensor_file()
        lib._check_pinned_index()
        return lib

    # ---- compile / add / remove -----------------------------------------------------------------
    @classmethod
    def compile(
        cls,
        adapter_dirs: Sequence[str | Path],
        *,
        kind: Kind,
        base_model: Any,
        out: str | Path,
        dtype: str | torch.dtype = "float32",
        names: Sequence[str] | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        chunk_size: int | None = None,
        arrow_index: bool | str | None = None,
        force: bool = False,
    ) -> AdapterLibrary:
        """Validate PEFT LoRA folders against ``base_model`` (a model, config or model folder), align them
        and write a library to ``out`` (atomically; an interrupted compile resumes when re-run).

        ``out`` may be missing, empty, or an existing library (replaced); anything else is refused with an
        :class:`UnsafeOutputError` (``force=True`` replaces it), and so is an ``out`` equal to, inside or
        containing an adapter folder. ``arrow_index``: build the approximate (FAISS) Arrow index: True (type
        ``hnsw``), ``"hnsw"`` or ``"ivf"``; None = only for >= 4096 adapters."""
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}", field="kind")
        torch_dtype = parse_dtype(dtype)
        out = check_library_output(out, adapter_dirs, force)
        spec = BaseModelSpec.resolve(base_model)
        rows = _new_rows(adapter_dirs, names, spec, allow_pickle, taken=set())
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": kind,
            "dtype": dtype_name(torch_dtype),
            "base_model": {"fingerprint": spec.fingerprint(),
                           "linear_modules": {k: list(v) for k, v in spec.linear.items()}},
        }
        with _lock(out):
            check_library_output(out, adapter_dirs, force)  # again, now that no other writer runs
            return _write(out, manifest, rows, old=None, progress=progress, chunk_size=chunk_size,
                          arrow_index=arrow_index)

    @classmethod
    def from_aligned(
        cls,
        names: Sequence[str],
        generate: Any,
        *,
        kind: Kind,
        base_model: Any,
        modules: Sequence[str],
        rank: int,
        out: str | Path,
        dtype: str | torch.dtype = "float32",
        source: str = "generated",
        progress: bool = True,
        chunk_size: int = 1024,
        arrow_index: bool | str | None = None,
        force: bool = False,
    ) -> AdapterLibrary:
        """Write a library from factors that are already aligned (A* with orthonormal rows, B* = U S).

        ``generate(module, rows)`` returns ``(A* [K, rank, n], B* [K, m, rank])`` for library rows ``rows``
        [K]; used by the scale benchmark to synthesise large libraries, and for converting other formats.
        """
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}", field="kind")
        torch_dtype = parse_dtype(dtype)
        spec = BaseModelSpec.resolve(base_model)
        missing = [m for m in modules if m not in spec.linear]
        if missing:
            raise IncompatibleAdapterError("module is not a Linear of the base model", module=missing[0],
                                           field="modules")
        rows = [_Row({"name": check_adapter_name(name), "doc_id": name, "source": source, "sha256": None,
                      "rank": rank, "lora_alpha": None, "use_rslora": False, "target_modules": None,
                      "modules": list(modules), "base_model_name_or_path": None}, generate=generate)
                for name in names]
        if not rows:
            raise LibraryError("no adapters given: a library needs at least one adapter")
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind,
                    "dtype": dtype_name(torch_dtype),
                    "base_model": {"fingerprint": spec.fingerprint(),
                                   "linear_modules": {k: list(v) for k, v in spec.linear.items()}}}
        out = check_library_output(out, (), force)
        with _lock(out):
            check_library_output(out, (), force)
            return _write(out, manifest, rows, old=None, progress=progress, chunk_size=chunk_size,
                          arrow_index=arrow_index)

    def verify(self) -> dict[str, Any]:
        """Read every byte of the library and check it against the checksums stored at compile time (and
        the Arrow index against the prototypes); raise :class:`LibraryFormatError` naming the adapter /
        module / file at the first mismatch. Returns what was checked. Libraries of format 1 have no
        checksums: only their values (NaN / Inf) and index are checked."""
        return verify_library(self)

    def add(
        self,
        adapter_dirs: Sequence[str | Path],
        *,
        names: Sequence[str] | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        chunk_size: int | None = None,
    ) -> AdapterLibrary:
        """Add adapters (aligning only the new ones) and rewrite the library atomically. Returns self.

        Writers of one library take turns (a lock beside it); the change is applied to the revision on disk
        when the writer's turn comes, so adapters another process added or removed since this object was
        loaded are kept as they are now."""
        with _lock(self.path):
            current = self._current()
            rows = [_Row(dict(e), old_index=i) for i, e in enumerate(current.adapters)]
            rows += _new_rows(adapter_dirs, names, current._spec(), allow_pickle, taken=set(current.names))
            base = {k: v for k, v in current.manifest.items() if k not in _DERIVED}
            new = _write(self.path, base, rows, old=current, progress=progress, chunk_size=chunk_size)
        self._adopt(new)
        return self

    def remove(self, names: Iterable[str]) -> AdapterLibrary:
        """Remove adapters by name and rewrite the library atomically (applied to the revision on disk, as
        :meth:`add`). Returns self."""
        drop = list(dict.fromkeys(names))
        with _lock(self.path):
            current = self._current()
            missing = [n for n in drop if n not in current._index]
            if missing:
                changed = " (the library changed since it was loaded)" if current is not self else ""
                raise LibraryError(f"cannot remove unknown adapters: {missing}{changed}", adapter=missing[0],
                                   path=self.path)
            rows = [_Row(dict(e), old_index=i) for i, e in enumerate(current.adapters)
                    if e["name"] not in drop]
            if not rows:
                raise LibraryError("removing these adapters would leave the library empty", path=self.path)
            base = {k: v for k, v in current.manifest.items() if k not in _DERIVED}
            new = _write(self.path, base, rows, old=current, progress=False, chunk_size=4096)
        self._adopt(new)
        return self

    def _current(self) -> AdapterLibrary:
        """Under the writers' lock: self if the library on disk is still this revision, else that revision."""
        disk = AdapterLibrary.load(self.path)
        if disk.revision == self.revision:
            disk.close()
            return self
        logger.info("%s changed since it was loaded (revision %s -> %s); applying the change to the current "
                    "one", self.path, self.revision, disk.revision)
        return disk

    # ---- approximate Arrow index ------------------------------------------------------------------
    @property
    def revision(self) -> str | None:
        return self.manifest.get("revision")

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

    def build_arrow_index(self, nlist: int | None = None, kind: str | None = None) -> AdapterLibrary:
        """(Re)build the approximate Arrow index for the current revision, atomically. Returns self.

        ``kind``: ``hnsw`` / ``ivf`` (None: the type of the existing index, else ``hnsw``); ``nlist``: IVF
        lists (None: ~4 sqrt(N))."""
        meta = self._pinned.meta if self._pinned is not None else None
        kind = check_index_type(kind or (meta["type"] if meta else DEFAULT_TYPE))
        with _lock(self.path):
            if self._current() is not self:
                raise LibraryError("the library changed since it was loaded; load it again to index the "
                                   "current revision", path=self.path)
            uids = self.uids()
            indexes = (build_module_index(self.tensors(m).proto.float().numpy(), uids, kind, nlist)
                       for m in self.modules)  # one at a time
            staging = self.path / f".staging-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            try:
                with _disk_full(self.path, "the approximate Arrow index", "the library is unchanged"):
                    save_arrow_index(staging, self.modules, indexes, str(self.revision))
                replace_dir(staging / ARROW_DIR, self.path / ARROW_DIR)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self._adopt(AdapterLibrary.load(self.path))
        return self

    def _adopt(self, new: AdapterLibrary) -> None:
        """Take over ``new``'s manifest and open files (after this object's own write)."""
        self.close()
        if self._pinned is not None:
            self._pinned.close()
        self.manifest = new.manifest
        self._index = new._index
        self._handle, self._pinned = new._handle, new._pinned
        new._handle, new._pinned = None, None

    def close(self) -> None:
        """Drop memory maps (tensors already handed out stay valid; a later use maps the file again if the
        library on disk is still this revision)."""
        self._handle = None
        self._tensors = {}
        self._arrow = None

    def _spec(self) -> BaseModelSpec:
        base = self.manifest["base_model"]
        fp = base["fingerprint"]
        linear = {k: (int(v[0]), int(v[1]), str(v[2])) for k, v in base["linear_modules"].items()}
        sizes = {k: v for k, v in fp.items() if k not in ("architecture", "model_type", "linear_modules",
                                                          "linear_digest")}
        return BaseModelSpec(fp["architecture"], fp["model_type"], sizes, linear)

    # ---- inspection -----------------------------------------------------------------------------
    def health(self, model: Any = None, prompts: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """Routing health: the spectrum of the library's mean input projector and each adapter's overlap
        with its shared subspace; with unlabelled ``prompts`` (and ``model``: a loaded model with
        ``tokenizer=``, a folder, or None for the embedded default) also the hubness of per-token routing
        under ``config=`` (default ``LAGConfig()``). Returns a
        :class:`llama_index_lag.health.HealthReport`."""
        from ..health import library_health  # the routing layer sits above the library

        return library_health(self, model, prompts, **kwargs)

    def info(self) -> dict[str, Any]:
        """Summary for ``lag inspect``: adapters, ranks, modules, dtype, size on disk."""
        ranks = [int(e["rank"]) for e in self.adapters]
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {
            "path": str(self.path),
            "kind": self.kind,
            "adapters": len(self),
            "names": self.names,
            "ranks": {"min": min(ranks), "max": max(ranks), "r_max": self.r_max},
            "modules": len(self.modules),
            "module_patterns": module_patterns(self.modules),
            "dtype": self.manifest["dtype"],
            "size_bytes": size,
            "arrow_index": self.arrow_index_type() or False,
            "base_model": self.fingerprint,
        }


def module_patterns(modules: Iterable[str]) -> dict[str, int]:
    """Group module names by replacing layer numbers with '*': {'model.layers.*.mlp.gate_proj': 30}."""
    import re

    counts: dict[str, int] = {}
    for module in modules:
        key = re.sub(r"\.\d+\.", ".*.", module)
        counts[key] = counts.get(key, 0) + 1
    return counts


# ---- helpers --------------------------------------------------------------------------------------
def is_library(path: Path) -> bool:
    """A folder holding a manifest of this format (a library this package wrote)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def check_library_output(out: str | Path, inputs: Iterable[str | Path], force: bool) -> Path:
    """Where a library may be written: see :func:`llama_index_lag._fs.check_output`."""
    return check_output(out, ours=is_library, what="adapter library", inputs=inputs, force=force)


class _Replaced(Exception):
    """The library folder was replaced while it was being opened (retry)."""


def _replaced(path: Path, dir_fd: int) -> bool:
    """Whether ``path`` now names another folder than the one open as ``dir_fd``."""
    try:
        now, held = os.stat(path), os.fstat(dir_fd)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)


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


def _new_rows(
    adapter_dirs: Sequence[str | Path],
    names: Sequence[str] | None,
    spec: BaseModelSpec,
    allow_pickle: bool,
    taken: set[str],
) -> list[_Row]:
    """Read and validate new adapters (config + shapes only): fail before anything is written."""
    dirs = [Path(d) for d in adapter_dirs]
    if not dirs:
        raise LibraryError("no adapters given: a library needs at least one adapter")
    if names is not None and len(names) != len(dirs):
        raise ConfigError(f"{len(names)} names for {len(dirs)} adapter folders", field="names")
    headers = []
    keys = {id_key(n): n for n in taken}
    for i, path in enumerate(dirs):
        name = check_adapter_name(names[i] if names is not None else path.name)
        if id_key(name) in keys:
            other = keys[id_key(name)]
            also = ("" if other == name
                    else f" (differs from {other!r} only in case: adapter names are folder names)")
            raise AdapterError(f"duplicate adapter name{also}", adapter=name, field="name", path=path)
        keys[id_key(name)] = name
        header = read_header(path, name, allow_pickle=allow_pickle)
        spec.check_adapter(header)
        headers.append((path, header))
    rows = []
    for path, header in headers:
        meta = _builder_metadata(path)
        cfg = header.config
        entry = {
            "name": header.name,
            "doc_id": meta.get("doc_id", header.name),
            "source": str(path.resolve()),
            "sha256": None,  # of the weights file: computed from the bytes read to align it (_process_chunk)
            "rank": header.rank,
            "lora_alpha": cfg.get("lora_alpha"),
            "use_rslora": bool(cfg.get("use_rslora", False)),
            "target_modules": cfg.get("target_modules"),
            "modules": sorted(header.modules),
            "base_model_name_or_path": cfg.get("base_model_name_or_path"),
        }
        rows.append(_Row(entry, header=header))
    return rows


def _builder_metadata(path: Path) -> dict[str, Any]:
    """Optional ``lag_adapter.json`` written by the adapter builder (doc id, training recipe)."""
    meta = path / "lag_adapter.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _layout(rows: list[_Row], spec_linear: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Library modules in base-model order with their shapes."""
    used = set()
    for row in rows:
        used.update(row.entry["modules"] or [])
    order = [m for m in spec_linear if m in used]
    return {m: {"out_features": int(spec_linear[m][0]), "in_features": int(spec_linear[m][1])} for m in order}


def _lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """The writers' lock of library ``out`` (beside it): writers wait for each other's turn."""
    return file_lock(out.parent / f".{out.name}.lock", what="library")


def _write(out: Path, base: dict[str, Any], rows: list[_Row], *, old: AdapterLibrary | None, progress: bool,
           chunk_size: int | None, arrow_index: bool | str | None = None) -> AdapterLibrary:
    """Write ``rows`` into a partial folder (resuming a matching one), then swap it in with one rename.

    ``chunk_size``: rows per batch (None: two batches per worker, 8 to 64 rows: batched alignment amortises
    per-call costs, several batches keep the workers busy)."""
    if chunk_size is None:
        chunk_size = max(8, min(64, math.ceil(len(rows) / (2 * WORKERS))))
    old_modules = set(old.modules) if old is not None else set()
    next_uid = int(base.get("next_uid", 0))
    for row in rows:  # stable ids (approximate Arrow index ids survive add / remove)
        if row.entry.get("uid") is None:
            row.entry["uid"] = next_uid
            next_uid += 1
    base = {**base, "next_uid": max(next_uid, max(int(r.entry["uid"]) for r in rows) + 1)}
    # Adapters kept from the old library: entries may need an explicit module list if modules were added.
    for row in rows:
        if row.old_index is not None and row.entry.get("modules") is None:
            row.entry["modules"] = sorted(old_modules)
    modules = _layout(rows, base["base_model"]["linear_modules"])
    for row in rows:
        if row.entry["modules"] is not None and set(row.entry["modules"]) == set(modules):
            row.entry["modules"] = None  # adapts every module of the library
    r_max = max(int(row.entry["rank"]) for row in rows)
    manifest = {**base, "format_version": FORMAT_VERSION, "created_by": f"llama-index-lag {__version__}",
                "r_max": r_max, "modules": modules, "adapters": [row.entry for row in rows]}
    out.parent.mkdir(parents=True, exist_ok=True)
    # A resumed build must read the same input files: they are named by path, size and mtime (their sha256
    # is computed while they are read, and kept in progress.json for the rows already written).
    inputs = [_identity(row.header.weights_file) if row.header is not None else None for row in rows]
    plan = json.dumps({"manifest": manifest, "old": old.manifest if old is not None else None,
                       "inputs": inputs}, sort_keys=True, default=str)
    digest = hashlib.sha256(plan.encode()).hexdigest()
    # The revision names this content; it is also stamped in the tensor file's header, so a reader can
    # tell a manifest and tensors from two different writes apart (see load()).
    manifest["revision"] = digest[:32]
    partial = out.parent / f".{out.name}.partial"
    shapes = {m: (v["out_features"], v["in_features"]) for m, v in modules.items()}
    needed = PackedWriter.size_of(shapes, len(rows), r_max, DTYPES[manifest["dtype"]])
    with _disk_full(out, f"writing the library ({len(rows)} adapters)", "nothing was changed (the partial "
                    "write was removed)", needed=needed, cleanup=partial):
        done, hashes, blocks = _resume_point(partial, digest)
        if done == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            atomic_write_json(partial / "progress.json",
                              {"plan": digest, "done": 0, "sha256": {}, "blocks": []})
        writer = PackedWriter(partial / TENSORS, shapes, len(rows), r_max, DTYPES[manifest["dtype"]],
                              create=done == 0, metadata={"revision": manifest["revision"]})
        bar = tqdm(total=len(rows), initial=done, desc=f"compile {out.name}", unit="adapter",
                   disable=not progress)
        try:
            # Pipelined: WORKERS threads each read, hash, align and write whole chunks (file reads, hashing,
            # torch ops and pwrite release the GIL); chunks are committed in order by another thread, which
            # makes them durable before recording them as done.
            with ThreadPoolExecutor(WORKERS) as workers, ThreadPoolExecutor(1) as syncer:
                in_flight: collections.deque = collections.deque()
                commits = []
                for start in range(done, len(rows), chunk_size):
                    chunk = rows[start:start + chunk_size]
                    in_flight.append((start, start + len(chunk), workers.submit(
                        _process_chunk, writer, start, chunk, modules, old)))
                    while len(in_flight) > WORKERS or (in_flight and start + chunk_size >= len(rows)):
                        first, end, job = in_flight.popleft()
                        chunk_hashes, crc = job.result()  # the first failing chunk in row order raises
                        hashes.update(chunk_hashes)
                        blocks.append([first, end, crc])
                        commits.append(syncer.submit(_commit, writer, partial, digest, end, dict(hashes),
                                                     list(blocks)))
                        bar.update(end - bar.n)
                for commit in commits:
                    commit.result()
        except BaseException as exc:
            writer.close(sync=False)
            if isinstance(exc, LAGError):
                # A bad adapter will fail again: drop the partial build. Anything else (Ctrl-C, a crash)
                # keeps it so that re-running the same command resumes; a full disk drops it (above).
                shutil.rmtree(partial, ignore_errors=True)
            raise
        finally:
            bar.close()
        writer.close()
        for i, row in enumerate(rows):
            if row.header is not None:
                row.entry["sha256"] = hashes[str(i)]
        manifest["checksums"] = {"algorithm": CHECKSUM, "blocks": blocks}
        _write_arrow_index(partial, manifest, rows, old, arrow_index)
        atomic_write_json(partial / MANIFEST, manifest)
        (partial / "progress.json").unlink()
        if old is not None:
            old.close()
        replace_dir(partial, out)
    return AdapterLibrary.load(out)


@contextlib.contextmanager
def _disk_full(out: Path, what: str, leftover: str, needed: int | None = None,
               cleanup: Path | None = None) -> Iterator[None]:
    """A full disk (ENOSPC / EDQUOT anywhere in the block) becomes a :class:`DiskFullError` saying what was
    needed and free; ``cleanup`` (the partial folder) is removed first, so the space it took is free again."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        raise disk_full_error(out.parent, needed, what, leftover) from None


def _write_arrow_index(folder: Path, manifest: dict[str, Any], rows: list[_Row], old: AdapterLibrary | None,
                       wanted: bool | str | None) -> None:
    """Keep the approximate Arrow index consistent: update the old one incrementally, or build one when
    asked (``wanted`` True or a type) or when the library is large (``None`` and N >= ARROW_INDEX_MIN).

    Removing adapters from an HNSW index leaves tombstones (searches skip them); once they pass
    ``COMPACT_AT`` of its nodes the index is rebuilt."""
    modules = list(manifest["modules"])
    n = len(rows)
    old_ok = old is not None and old.has_arrow_index() and old.modules == modules
    if wanted is False or (wanted is None and not old_ok and n < ARROW_INDEX_MIN):
        return
    old_type = old.arrow_index_type() if old_ok else None
    kind = check_index_type(wanted if isinstance(wanted, str) else old_type or DEFAULT_TYPE)
    lib = AdapterLibrary(folder, manifest)  # read the freshly written prototypes
    uids = np.array([int(r.entry["uid"]) for r in rows], dtype=np.int64)
    removed: set[int] = set()
    update = old_ok and kind == old_type
    if update:
        new_rows = [i for i, r in enumerate(rows) if r.old_index is None]
        removed = set(old.uids().tolist()) - set(uids.tolist())
        meta = old._pinned.meta if old._pinned is not None else {}
        if kind == "hnsw":
            removed |= set(meta.get("removed", []))
            ntotal = int(meta["ntotal"][modules[0]]) + len(new_rows)
            update = len(removed) <= COMPACT_AT * ntotal  # else too many tombstones: rebuild
    if update:
        def updated(drop: frozenset[int]) -> Iterator[Any]:  # one module's index in memory at a time
            for module, index in zip(modules, iter_module_indexes(old._pinned, old.path, modules,
                                                                  str(old.revision), mmap=False)):
                protos = lib.tensors(module).proto[new_rows].float().numpy() if new_rows else None
                yield update_index(index, (protos, uids[new_rows]) if new_rows else None, drop)

        indexes: Iterable[Any] = updated(frozenset(removed))
        removed = removed if kind == "hnsw" else set()  # IVF removes them; HNSW keeps tombstones
    else:
        removed = set()
        indexes = (build_module_index(lib.tensors(m).proto.float().numpy(), uids, kind) for m in modules)
    try:
        save_arrow_index(folder, modules, indexes, manifest["revision"], removed)
    finally:
        lib.close()


def _identity(path: Path) -> list[Any]:
    """What names an input file for a resumed build: resolved path, size, modification time (ns)."""
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _resume_point(partial: Path, digest: str) -> tuple[int, dict[str, str], list[list[int]]]:
    """(rows already written, sha256 of their files by row, checksums of their chunks) of a matching partial
    build, else (0, {}, [])."""
    try:
        progress = json.loads((partial / "progress.json").read_text())
    except (OSError, ValueError, RecursionError):
        return 0, {}, []
    if (not isinstance(progress, dict) or progress.get("plan") != digest or not (partial / TENSORS).is_file()
            or not isinstance(progress.get("blocks"), list)):
        return 0, {}, []
    return int(progress.get("done", 0)), dict(progress.get("sha256", {})), list(progress["blocks"])


def _commit(writer: PackedWriter, partial: Path, digest: str, done: int, hashes: dict[str, str],
            blocks: list[list[int]]) -> None:
    """Rows ``:done`` are written: make them durable, then record them (a resumed build skips them)."""
    writer.flush()
    atomic_write_json(partial / "progress.json", {"plan": digest, "done": done, "sha256": hashes,
                                                  "blocks": blocks})


def _process_chunk(writer: PackedWriter, start: int, chunk: list[_Row], modules: dict[str, Any],
                   old: AdapterLibrary | None) -> tuple[dict[str, str], int]:
    """Read the chunk's new adapters once (sha256 and factors from the same bytes; NaN / Inf are checked
    batched, in :func:`_align_batch`), write rows ``start:start+len(chunk)``; return ({row: sha256}, the
    crc32 of the rows written)."""
    factors, hashes = [], {}
    for i, row in enumerate(chunk):
        if row.header is None:
            factors.append(None)
            continue
        path = row.header.weights_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AdapterFormatError(f"cannot read weights: {exc}", adapter=row.header.name,
                                     path=path) from None
        hashes[str(start + i)] = hashlib.sha256(data).hexdigest()
        factors.append(factor_arrays(row.header, data))
    _fill_chunk(writer, start, chunk, modules, old, factors)
    return hashes, writer.checksum(start, start + len(chunk))


def _fill_chunk(writer: PackedWriter, start: int, chunk: list[_Row], modules: dict[str, Any],
                old: AdapterLibrary | None,
                factors: list[dict[str, tuple[np.ndarray, np.ndarray]] | None]) -> None:
    """Align new adapters and copy kept ones, for rows ``start:start+len(chunk)``.

    New adapters are aligned in batches of up to ``ALIGN_BATCH`` (module, adapter) pairs of one shape and
    rank, across modules (SmolLM2's 30 gate_proj and 30 up_proj modules are one shape) rather than one
    module's adapters at a time: fewer calls of the ~20 tensor ops, each on a batch that stays in cache. No
    padding: a factor does not depend on its batch-mates (adding adapters to a library gives the bytes of a
    fresh compile)."""
    new = [(start + i, row, f) for i, (row, f) in enumerate(zip(chunk, factors)) if f is not None]
    kept = [(start + i, row.old_index) for i, row in enumerate(chunk) if row.old_index is not None]
    made = torch.tensor([start + i for i, row in enumerate(chunk) if row.generate is not None],
                        dtype=torch.long)
    groups: dict[tuple[int, ...], list[tuple[str, int, _Row, np.ndarray, np.ndarray]]] = {}
    for module in modules:
        if made.numel():
            a_star, b_star = chunk[0].generate(module, made)
            writer.write_rows(module, made, a_star, b_star, a_star[:, 0])
        if kept and old is not None and module in old.manifest["modules"]:
            src = old.tensors(module)
            rows = torch.tensor([idx for idx, _ in kept])
            old_idx = torch.tensor([o for _, o in kept])
            writer.write_rows(module, rows, src.A[old_idx], src.B[old_idx], src.proto[old_idx])
        for idx, row, f in new:
            if module in f:
                a, b = f[module]
                groups.setdefault((*a.shape, b.shape[0]), []).append((module, idx, row, a, b))
    for pairs in groups.values():
        for first in range(0, len(pairs), ALIGN_BATCH):
            _align_batch(writer, pairs[first:first + ALIGN_BATCH])


def _align_batch(writer: PackedWriter, pairs: list[tuple[str, int, _Row, np.ndarray, np.ndarray]]) -> None:
    """Check, align and write (module, row, adapter, lora_A, lora_B) pairs of one shape and rank, module
    by module in row order (as :func:`_fill_chunk` lists them)."""
    A = _stack([a for *_, a, _ in pairs])  # [K, r, n]
    B = _stack([b for *_, b in pairs])  # [K, m, r]
    _check_finite(A, B, pairs)
    scaling = torch.tensor([row.header.scalings[module] for module, _, row, _, _ in pairs])
    a_star, b_star, s = spectral_align(A, B, scaling, dtype=torch.float32)
    # |B*_ij| <= s_j (B* = U S, U orthonormal): only a singular value past the dtype's range can overflow
    # the cast; then the written rows are read back to name the adapter.
    overflow = bool((s > torch.finfo(writer.dtype).max / 2).any())
    first = 0
    for module, run in itertools.groupby(pairs, key=lambda pair: pair[0]):  # one run of pairs per module
        end = first + len(list(run))
        rows = torch.tensor([idx for _, idx, *_ in pairs[first:end]])
        writer.write_rows(module, rows, a_star[first:end], b_star[first:end], a_star[first:end, 0])
        if overflow:
            _check_cast(writer, module, rows, [row for _, _, row, *_ in pairs[first:end]])
        first = end


def _stack(arrays: list[np.ndarray]) -> torch.Tensor:
    """[K, *shape] float32 from K same-shaped arrays (float16 / float64 converted on the copy)."""
    with np.errstate(over="ignore"):  # a float64 factor past float32's range becomes Inf: reported as such
        return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))


def _first_bad(tensors: list[torch.Tensor]) -> int | None:
    """Index of the first adapter (dim 0) with a NaN / Inf in any of ``tensors``, or None.

    Sums per adapter first (NaN / Inf propagate; no mask as large as the weights), then confirms on the
    suspects, so a sum that merely overflows is not an error."""
    sums = torch.stack([t.flatten(1).sum(dim=1, dtype=torch.float32) for t in tensors])  # [len, K]
    for j in (~torch.isfinite(sums).all(dim=0)).nonzero().flatten().tolist():
        if not all(bool(torch.isfinite(t[j]).all()) for t in tensors):
            return j
    return None


def _check_finite(A: torch.Tensor, B: torch.Tensor, pairs: list[tuple[str, int, _Row, Any, Any]]) -> None:
    """LoRA factors [K, r, n] / [K, m, r] of K (module, row, adapter, ...) pairs must be finite."""
    j = _first_bad([A, B])
    if j is not None:
        module, _, row, *_ = pairs[j]
        which = "lora_A" if _first_bad([A[j:j + 1]]) is not None else "lora_B"
        raise AdapterFormatError("weights contain NaN or Inf", adapter=row.header.name, module=module,
                                 field=which, path=row.header.weights_file)


def _check_cast(writer: PackedWriter, module: str, rows: torch.Tensor, chunk_rows: list[_Row]) -> None:
    """After the cast to the library dtype, B* must still be finite (float16 can overflow)."""
    j = _first_bad([writer.view(tensor_names(module)[1])[rows]])
    if j is not None:
        raise IncompatibleAdapterError(
            f"aligned B* overflows {writer.dtype} (singular values too large); compile with dtype float32",
            adapter=chunk_rows[j].entry["name"], module=module, field="dtype",
        )
