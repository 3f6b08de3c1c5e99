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

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .._ray import ray_cluster, require_ray
from ..errors import (
    ConfigError,
    IncompatibleAdapterError,
    LibraryError,
    LibraryFormatError,
)
from .arrow_index import (
    PinnedArrow,
)
from .base import BaseModelSpec
from .indexed import ArrowIndexed
from .integrity import (  # noqa: F401  (FORMAT, FORMAT_VERSION, dtype_name: re-exported)
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    TENSORS,
    check_adapter_name,
    dtype_name,
    module_patterns,
    parse_dtype,
    parse_manifest,
    revision_on_disk,
)
from .integrity import verify as verify_library
from .packed import PackedFormatError, PackedReader, tensor_names
from .stats import ReferenceStats, open_stats, read_stats
from .writer import (  # noqa: F401  (re-exported)
    ARROW_INDEX_MIN,
    DERIVED_FIELDS,
    WORKERS,
    Row,
    check_library_output,
    disk_full,
    header_of,
    is_library,
    library_lock,
    manifest_header,
    new_rows,
    write_library,
)

_DERIVED = DERIVED_FIELDS  # the manifest fields a write derives (see writer.header_of)
Kind = Literal["task", "knowledge"]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModuleTensors:
    """Packed, aligned tensors of one adapted module (memory-mapped views)."""

    A: torch.Tensor  # [N, r_max, n]  A*_i = V_i^T (orthonormal rows; zero rows beyond rank)
    B: torch.Tensor  # [N, m, r_max]  B*_i = U_i S_i
    proto: torch.Tensor  # [N, n]     Arrow prototypes A*_i[0]


class AdapterLibrary(ArrowIndexed):
    """A compiled library of spectrally aligned LoRA adapters of one kind (task or knowledge).

    Create with :meth:`compile`, open with :meth:`load`; update with :meth:`add` / :meth:`remove`.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], reader: PackedReader | None = None,
                 pinned: PinnedArrow | None = None, stats: PackedReader | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self._handle: PackedReader | None = reader  # this revision's packed file, mapped at load
        self._pinned = pinned  # this revision's Arrow index files, opened at load
        self._stats = stats  # this revision's routing statistics, mapped at load
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

    def has_routing_stats(self) -> bool:
        """Whether the library stores its data-free routing statistics (libraries written before format 3
        do not: the router computes them when a calibration needs them)."""
        return self.manifest.get("routing_stats") is not None

    def routing_stats(self, module: str) -> ReferenceStats:
        """The stored data-free routing statistics of ``module`` (:class:`~.stats.ReferenceStats`, memory-
        mapped), for the score calibrations of ``LAGConfig.calibration``."""
        if not self.has_routing_stats():
            raise LibraryFormatError("this library stores no routing statistics (compiled before format 3)",
                                     path=self.path, field="routing_stats")
        if module not in self.manifest["modules"]:
            raise LibraryError("module not in this library", module=module, path=self.path)
        if self._stats is None:
            self._stats = open_stats(self.manifest, self.path, None)
        assert self._stats is not None
        return read_stats(self._stats, module, len(self), self.path)

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
                stats = open_stats(manifest, path, dir_fd)
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
        lib = cls(path, manifest, reader, pinned, stats)
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
        ray_address: str | None = None,
    ) -> AdapterLibrary:
        """Validate PEFT LoRA folders against ``base_model`` (a model, config or model folder), align them
        and write a library to ``out`` (atomically; an interrupted compile resumes when re-run).
        ``ray_address`` (``"auto"`` or ``HOST:PORT``, ``pip install "llama-index-lag[ray]"``): the adapters
        are read and aligned as tasks on that Ray cluster (each worker reads the adapter folders: paths every
        node sees) and this process writes the library, byte for byte what a local compile writes.

        ``out`` may be missing, empty, or an existing library (replaced); anything else is refused with an
        :class:`UnsafeOutputError` (``force=True`` replaces it), and so is an ``out`` equal to, inside or
        containing an adapter folder. ``arrow_index``: build the approximate (FAISS) Arrow index: True (type
        ``hnsw``), ``"hnsw"`` or ``"ivf"``; None = only for >= 4096 adapters."""
        if kind not in KINDS:
            raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}", field="kind")
        if ray_address is not None:
            require_ray()  # before any work
        torch_dtype = parse_dtype(dtype)  # a bad dtype fails first, before the output is looked at
        out = check_library_output(out, adapter_dirs, force)
        spec = BaseModelSpec.resolve(base_model)
        rows = new_rows(adapter_dirs, names, spec, allow_pickle, taken=set())
        manifest = manifest_header(kind, torch_dtype, spec)
        with library_lock(out), contextlib.ExitStack() as stack:
            check_library_output(out, adapter_dirs, force)  # again, now that no other writer runs
            aligner = None
            if ray_address is not None:
                from .ray_compile import RayAligner

                aligner = RayAligner(stack.enter_context(ray_cluster(ray_address)), torch_dtype)
            return write_library(out, manifest, rows, old=None, progress=progress, chunk_size=chunk_size,
                                 library_cls=cls, arrow_index=arrow_index, aligner=aligner)

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
        torch_dtype = parse_dtype(dtype)  # a bad dtype fails first, before the output is looked at
        spec = BaseModelSpec.resolve(base_model)
        missing = [m for m in modules if m not in spec.linear]
        if missing:
            raise IncompatibleAdapterError("module is not a Linear of the base model", module=missing[0],
                                           field="modules")
        rows = [Row({"name": check_adapter_name(name), "doc_id": name, "source": source, "sha256": None,
                      "rank": rank, "lora_alpha": None, "use_rslora": False, "target_modules": None,
                      "modules": list(modules), "base_model_name_or_path": None}, generate=generate)
                for name in names]
        if not rows:
            raise LibraryError("no adapters given: a library needs at least one adapter")
        manifest = manifest_header(kind, torch_dtype, spec)
        out = check_library_output(out, (), force)
        with library_lock(out):
            check_library_output(out, (), force)
            return write_library(out, manifest, rows, old=None, progress=progress, chunk_size=chunk_size,
                                 library_cls=cls, arrow_index=arrow_index)

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
        return self.update(adapter_dirs, names=names, allow_pickle=allow_pickle, progress=progress,
                           chunk_size=chunk_size)

    def remove(self, names: Iterable[str]) -> AdapterLibrary:
        """Remove adapters by name and rewrite the library atomically (applied to the revision on disk, as
        :meth:`add`). Returns self."""
        return self.update(remove=names, progress=False, chunk_size=4096)

    def update(
        self,
        adapter_dirs: Sequence[str | Path] = (),
        *,
        remove: Iterable[str] = (),
        names: Sequence[str] | None = None,
        allow_pickle: bool = False,
        progress: bool = True,
        chunk_size: int | None = None,
    ) -> AdapterLibrary:
        """Remove adapters by name and add others in one atomic rewrite (a name removed may be added again:
        that adapter is replaced). Applied to the revision on disk, as :meth:`add`. Returns self."""
        drop = list(dict.fromkeys(remove))
        with library_lock(self.path):
            current = self._current()
            missing = [n for n in drop if n not in current._index]
            if missing:
                changed = " (the library changed since it was loaded)" if current is not self else ""
                raise LibraryError(f"cannot remove unknown adapters: {missing}{changed}", adapter=missing[0],
                                   path=self.path)
            rows = [Row(dict(e), old_index=i) for i, e in enumerate(current.adapters)
                    if e["name"] not in drop]
            kept = {e["name"] for e in current.adapters if e["name"] not in drop}
            if adapter_dirs:
                rows += new_rows(adapter_dirs, names, current._spec(), allow_pickle, taken=kept)
            if not rows:
                raise LibraryError("removing these adapters would leave the library empty", path=self.path)
            new = write_library(self.path, header_of(current.manifest), rows, old=current, progress=progress,
                                chunk_size=chunk_size, library_cls=type(self))
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

    def is_current(self) -> bool:
        """Whether the library on disk is still this object's revision (a sync or add replaced it if not)."""
        return revision_on_disk(self.path) == self.revision

    def reload(self) -> AdapterLibrary:
        """The library as it is on disk now (a new object; this one keeps reading its own revision)."""
        return type(self).load(self.path)

    def _adopt(self, new: AdapterLibrary) -> None:
        """Take over ``new``'s manifest and open files (after this object's own write)."""
        self.close()
        if self._pinned is not None:
            self._pinned.close()
        self.manifest = new.manifest
        self._index = new._index
        self._handle, self._pinned, self._stats = new._handle, new._pinned, new._stats
        new._handle, new._pinned, new._stats = None, None, None

    def close(self) -> None:
        """Drop memory maps (tensors already handed out stay valid; a later use maps the file again if the
        library on disk is still this revision)."""
        self._handle = None
        self._stats = None
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
            "routing_stats": self.has_routing_stats(),
            "base_model": self.fingerprint,
        }


# ---- helpers --------------------------------------------------------------------------------------
class _Replaced(Exception):
    """The library folder was replaced while it was being opened (retry)."""


def _replaced(path: Path, dir_fd: int) -> bool:
    """Whether ``path`` now names another folder than the one open as ``dir_fd``."""
    try:
        now, held = os.stat(path), os.fstat(dir_fd)
    except FileNotFoundError:
        return True
    return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)
