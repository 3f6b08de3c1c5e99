"""Writing a library: compile / add / remove as one pipeline into a hidden ``.<name>.partial`` sibling
(chunks of adapters read, hashed, aligned and written on ``WORKERS`` threads, committed with checksums so an
interrupted write resumes), the approximate Arrow index kept consistent, then one rename. Reading is
:mod:`.store`; :class:`~.store.AdapterLibrary`'s compile / add / remove call :func:`write_library`."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import math
import shutil
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
)
from ..ids import id_key
from .align import spectral_align
from .arrow_index import (
    COMPACT_AT,
    DEFAULT_TYPE,
    build_module_index,
    check_index_type,
    iter_module_indexes,
    save_arrow_index,
    update_index,
)
from .base import BaseModelSpec
from .integrity import (
    CHECKSUM,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TENSORS,
    check_adapter_name,
    dtype_name,
    parse_dtype,
)
from .packed import PackedWriter, tensor_names
from .peft_io import AdapterHeader, factor_arrays, read_header
from .stats import write_stats

if TYPE_CHECKING:  # pragma: no cover
    from .store import AdapterLibrary

logger = logging.getLogger(__name__)
ARROW_INDEX_MIN = 4096  # libraries this large get an approximate Arrow index by default
WORKERS = 2  # chunks read, hashed, aligned and written concurrently
ALIGN_BATCH = 64  # (module, adapter) pairs aligned in one batch: ~3 MB of float32 factors at SmolLM2's sizes


@dataclass
class Row:
    """One adapter of a library being written: its manifest entry and where its tensors come from."""

    entry: dict[str, Any]
    header: AdapterHeader | None = None  # new adapter, aligned from its PEFT folder
    old_index: int | None = None  # existing adapter, copied from the current library
    # already-aligned factors: generate(module, rows [K]) -> (A* [K, r, n], B* [K, m, r])
    generate: Any = None


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


def new_rows(
    adapter_dirs: Sequence[str | Path],
    names: Sequence[str] | None,
    spec: BaseModelSpec,
    allow_pickle: bool,
    taken: set[str],
) -> list[Row]:
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
        rows.append(Row(entry, header=header))
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


def _layout(rows: list[Row], spec_linear: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Library modules in base-model order with their shapes."""
    used = set()
    for row in rows:
        used.update(row.entry["modules"] or [])
    order = [m for m in spec_linear if m in used]
    return {m: {"out_features": int(spec_linear[m][0]), "in_features": int(spec_linear[m][1])} for m in order}


def library_lock(out: Path) -> contextlib.AbstractContextManager[None]:
    """The writers' lock of library ``out`` (beside it): writers wait for each other's turn."""
    return file_lock(out.parent / f".{out.name}.lock", what="library")


#: Manifest fields :func:`write_library` derives from the rows it writes; the rest is the library's header.
DERIVED_FIELDS = ("adapters", "modules", "r_max", "revision", "created_by", "checksums", "format_version",
                  "routing_stats")


def manifest_header(kind: str, dtype: str | torch.dtype, spec: BaseModelSpec) -> dict[str, Any]:
    """The header of a new library's manifest: format and version, kind, storage dtype and the base model
    (fingerprint and Linear shapes). :func:`write_library` adds the fields derived from the adapters."""
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "dtype": dtype_name(parse_dtype(dtype)),
        "base_model": {"fingerprint": spec.fingerprint(),
                       "linear_modules": {k: list(v) for k, v in spec.linear.items()}},
    }


def header_of(manifest: dict[str, Any]) -> dict[str, Any]:
    """The header of an existing library's manifest (everything but :data:`DERIVED_FIELDS`), to rewrite it
    with other adapters."""
    return {k: v for k, v in manifest.items() if k not in DERIVED_FIELDS}


def _full_manifest(header: dict[str, Any], rows: list[Row], modules: dict[str, dict[str, int]]
                   ) -> dict[str, Any]:
    """``header`` plus the fields derived from ``rows`` (all but the revision and checksums, which the
    write adds)."""
    return {**header, "format_version": FORMAT_VERSION, "created_by": f"llama-index-lag {__version__}",
            "r_max": max(int(row.entry["rank"]) for row in rows), "modules": modules,
            "adapters": [row.entry for row in rows]}


def write_library(out: Path, base: dict[str, Any], rows: list[Row], *, old: AdapterLibrary | None,
                  progress: bool, chunk_size: int | None, library_cls: type[AdapterLibrary],
                  arrow_index: bool | str | None = None, aligner: Any = None) -> AdapterLibrary:
    """Write ``rows`` into a partial folder (resuming a matching one), then swap it in with one rename and
    open it as ``library_cls``. ``base``: the manifest header (:func:`manifest_header`, :func:`header_of`).
    ``aligner`` (``library.ray_compile.RayAligner``): new adapters are aligned as tasks on a Ray cluster; the
    bytes written are the same.

    ``chunk_size``: rows per batch (None: two batches per worker, 8 to 64 rows: batched alignment amortises
    per-call costs, several batches keep the workers busy)."""
    if chunk_size is None:
        chunk_size = max(8, min(64, math.ceil(len(rows) / (2 * WORKERS))))
    base = _assign_uids(base, rows)
    modules = _settle_modules(rows, base, old)
    manifest = _full_manifest(base, rows, modules)
    r_max = manifest["r_max"]
    out.parent.mkdir(parents=True, exist_ok=True)
    digest = _plan_digest(manifest, old, rows)
    # The revision names this content; it is also stamped in the tensor file's header, so a reader can
    # tell a manifest and tensors from two different writes apart (see load()).
    manifest["revision"] = digest[:32]
    partial = out.parent / f".{out.name}.partial"
    shapes = {m: (v["out_features"], v["in_features"]) for m, v in modules.items()}
    dtype = DTYPES[manifest["dtype"]]
    needed = PackedWriter.size_of(shapes, len(rows), r_max, dtype)
    with disk_full(out, f"writing the library ({len(rows)} adapters)", "nothing was changed (the partial "
                    "write was removed)", needed=needed, cleanup=partial):
        done, hashes, blocks = _resume_point(partial, digest)
        if done == 0:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            atomic_write_json(partial / "progress.json",
                              {"plan": digest, "done": 0, "sha256": {}, "blocks": []})
        writer = PackedWriter(partial / TENSORS, shapes, len(rows), r_max, dtype,
                              create=done == 0, metadata={"revision": manifest["revision"]})
        _write_chunks(writer, partial, digest, rows, modules, old, (done, hashes, blocks),
                      chunk_size=chunk_size, progress=progress, desc=f"compile {out.name}", aligner=aligner)
        writer.close()
        for i, row in enumerate(rows):
            if row.header is not None:
                row.entry["sha256"] = hashes[str(i)]
        manifest["checksums"] = {"algorithm": CHECKSUM, "blocks": blocks}
        _write_arrow_index(partial, manifest, rows, old, arrow_index, library_cls)
        fresh = library_cls(partial, manifest)
        try:  # computed from the written tensors: compile, add and remove keep them consistent
            manifest["routing_stats"] = write_stats(partial, fresh, manifest["revision"])
        finally:
            fresh.close()
        atomic_write_json(partial / MANIFEST, manifest)
        (partial / "progress.json").unlink()
        if old is not None:
            old.close()
        replace_dir(partial, out)
    return library_cls.load(out)


def _assign_uids(base: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """Give rows without a uid the next free ones (stable ids: approximate Arrow index ids survive add /
    remove); return ``base`` with its ``next_uid`` advanced past every uid."""
    next_uid = int(base.get("next_uid", 0))
    for row in rows:
        if row.entry.get("uid") is None:
            row.entry["uid"] = next_uid
            next_uid += 1
    return {**base, "next_uid": max(next_uid, max(int(r.entry["uid"]) for r in rows) + 1)}


def _settle_modules(rows: list[Row], base: dict[str, Any], old: AdapterLibrary | None
                    ) -> dict[str, dict[str, int]]:
    """The library's modules (base-model order, with shapes); rows' module lists made explicit or None.

    Adapters kept from the old library get an explicit module list when modules were added; an adapter of
    every module of the library lists None."""
    old_modules = set(old.modules) if old is not None else set()
    for row in rows:
        if row.old_index is not None and row.entry.get("modules") is None:
            row.entry["modules"] = sorted(old_modules)
    modules = _layout(rows, base["base_model"]["linear_modules"])
    for row in rows:
        if row.entry["modules"] is not None and set(row.entry["modules"]) == set(modules):
            row.entry["modules"] = None  # adapts every module of the library
    return modules


def _plan_digest(manifest: dict[str, Any], old: AdapterLibrary | None, rows: list[Row]) -> str:
    """sha256 of what this write produces: the manifest, the library it starts from and its input files.

    A resumed build must read the same input files: they are named by path, size and mtime (their sha256
    is computed while they are read, and kept in progress.json for the rows already written)."""
    inputs = [_identity(row.header.weights_file) if row.header is not None else None for row in rows]
    plan = json.dumps({"manifest": manifest, "old": old.manifest if old is not None else None,
                       "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(plan.encode()).hexdigest()


def _write_chunks(writer: PackedWriter, partial: Path, digest: str, rows: list[Row], modules: dict[str, Any],
                  old: AdapterLibrary | None, resume: tuple[int, dict[str, str], list[list[int]]], *,
                  chunk_size: int, progress: bool, desc: str, aligner: Any = None) -> None:
    """Write rows ``done:`` chunk by chunk, updating ``hashes`` ({row: sha256}) and ``blocks`` (chunk
    checksums) of ``resume = (done, hashes, blocks)`` in place.

    Pipelined: WORKERS threads each read, hash, align and write whole chunks (file reads, hashing, torch ops
    and pwrite release the GIL); chunks are committed in order by another thread, which makes them durable
    before recording them as done. On an error the writer is closed unsynced; a bad adapter (a
    :class:`LAGError`) also drops the partial build, anything else (Ctrl-C, a crash) keeps it so that
    re-running the same command resumes (a full disk drops it: see :func:`disk_full`). ``aligner``
    (``RayAligner``): chunks are aligned on a Ray cluster, ``aligner.ahead`` of them ahead of the writer."""
    done, hashes, blocks = resume
    starts = list(range(done, len(rows), chunk_size))
    remote: dict[int, Any] = {}

    def aligned(i: int) -> Any:  # start the alignments of chunks i.. (up to aligner.ahead) on the cluster
        if aligner is None:
            return None
        for j in range(i, min(i + aligner.ahead, len(starts))):
            if starts[j] not in remote:
                remote[starts[j]] = aligner.submit(starts[j], rows[starts[j]:starts[j] + chunk_size], modules)
        return remote.pop(starts[i])

    bar = tqdm(total=len(rows), initial=done, desc=desc, unit="adapter", disable=not progress)
    try:
        with ThreadPoolExecutor(WORKERS) as workers, ThreadPoolExecutor(1) as syncer:
            in_flight: collections.deque = collections.deque()
            commits = []
            for i, start in enumerate(starts):
                chunk = rows[start:start + chunk_size]
                wait = aligned(i)
                in_flight.append((start, start + len(chunk), workers.submit(
                    _write_chunk, writer, start, chunk, modules, old, wait)))
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
            shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        bar.close()


@contextlib.contextmanager
def disk_full(out: Path, what: str, leftover: str, needed: int | None = None,
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


def _write_arrow_index(folder: Path, manifest: dict[str, Any], rows: list[Row], old: AdapterLibrary | None,
                       wanted: bool | str | None, library_cls: type[AdapterLibrary]) -> None:
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
    lib = library_cls(folder, manifest)  # read the freshly written prototypes
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


def _write_chunk(writer: PackedWriter, start: int, chunk: list[Row], modules: dict[str, Any],
                 old: AdapterLibrary | None, wait: Any) -> tuple[dict[str, str], int]:
    """:func:`_process_chunk` with the alignment computed here (``wait`` None) or on the cluster."""
    return _process_chunk(writer, start, chunk, modules, old, None if wait is None else wait())


def _process_chunk(writer: PackedWriter, start: int, chunk: list[Row], modules: dict[str, Any],
                   old: AdapterLibrary | None, aligned: Aligned | None = None) -> tuple[dict[str, str], int]:
    """Write rows ``start:start+len(chunk)``: the new adapters aligned by :func:`align_chunk` (here, or
    ``aligned`` when another process did it), kept and generated ones copied; return ({row: sha256}, the
    crc32 of the rows written)."""
    hashes, runs = aligned if aligned is not None else align_chunk(start, chunk, modules, writer.dtype)
    _copy_rows(writer, start, chunk, modules, old)
    for module, rows, a_star, b_star, overflow in runs:
        index = torch.tensor(rows)
        writer.write_rows(module, index, a_star, b_star, a_star[:, 0])
        if overflow:
            _check_cast(writer, module, index, [chunk[r - start] for r in rows])
    return hashes, writer.checksum(start, start + len(chunk))


#: what :func:`align_chunk` returns: ({row: sha256}, [(module, rows, A* [K, r, n], B* [K, m, r], overflow)])
Aligned = tuple[dict[str, str], list[tuple[str, list[int], torch.Tensor, torch.Tensor, bool]]]


def align_chunk(start: int, chunk: list[Row], modules: dict[str, Any], dtype: torch.dtype) -> Aligned:
    """Read the chunk's new adapters once (sha256 and factors from the same bytes; NaN / Inf are checked
    batched, in :func:`_align_batch`) and align them for a library of ``dtype``: a pure function of the
    files (a Ray task of a compile on a cluster, see ``library/ray_compile.py``)."""
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
    # New adapters are aligned in batches of up to ``ALIGN_BATCH`` (module, adapter) pairs of one shape and
    # rank, across modules (SmolLM2's 30 gate_proj and 30 up_proj modules are one shape) rather than one
    # module's adapters at a time: fewer calls of the ~20 tensor ops, each on a batch that stays in cache. No
    # padding: a factor does not depend on its batch-mates (adding adapters to a library gives the bytes of a
    # fresh compile).
    new = [(start + i, row, f) for i, (row, f) in enumerate(zip(chunk, factors)) if f is not None]
    groups: dict[tuple[int, ...], list[tuple[str, int, Row, np.ndarray, np.ndarray]]] = {}
    for module in modules:
        for idx, row, f in new:
            if module in f:
                a, b = f[module]
                groups.setdefault((*a.shape, b.shape[0]), []).append((module, idx, row, a, b))
    runs = []
    for pairs in groups.values():
        for first in range(0, len(pairs), ALIGN_BATCH):
            runs += _align_batch(pairs[first:first + ALIGN_BATCH], dtype)
    return hashes, runs


def _copy_rows(writer: PackedWriter, start: int, chunk: list[Row], modules: dict[str, Any],
               old: AdapterLibrary | None) -> None:
    """Write the chunk's adapters kept from the old library and those generated already aligned."""
    kept = [(start + i, row.old_index) for i, row in enumerate(chunk) if row.old_index is not None]
    made = torch.tensor([start + i for i, row in enumerate(chunk) if row.generate is not None],
                        dtype=torch.long)
    for module in modules:
        if made.numel():
            a_star, b_star = chunk[0].generate(module, made)
            writer.write_rows(module, made, a_star, b_star, a_star[:, 0])
        if kept and old is not None and module in old.manifest["modules"]:
            src = old.tensors(module)
            rows = torch.tensor([idx for idx, _ in kept])
            old_idx = torch.tensor([o for _, o in kept])
            writer.write_rows(module, rows, src.A[old_idx], src.B[old_idx], src.proto[old_idx])


def _align_batch(pairs: list[tuple[str, int, Row, np.ndarray, np.ndarray]], dtype: torch.dtype
                 ) -> list[tuple[str, list[int], torch.Tensor, torch.Tensor, bool]]:
    """Check and align (module, row, adapter, lora_A, lora_B) pairs of one shape and rank; the result
    module by module in row order (as :func:`align_chunk` lists them), with whether a singular value may
    overflow the library dtype (then the written rows are checked)."""
    A = _stack([a for *_, a, _ in pairs])  # [K, r, n]
    B = _stack([b for *_, b in pairs])  # [K, m, r]
    _check_finite(A, B, pairs)
    scaling = torch.tensor([row.header.scalings[module] for module, _, row, _, _ in pairs])
    a_star, b_star, s = spectral_align(A, B, scaling, dtype=torch.float32)
    # |B*_ij| <= s_j (B* = U S, U orthonormal): only a singular value past the dtype's range can overflow
    # the cast; then the written rows are read back to name the adapter.
    overflow = bool((s > torch.finfo(dtype).max / 2).any())
    runs, first = [], 0
    for module, run in itertools.groupby(pairs, key=lambda pair: pair[0]):  # one run of pairs per module
        end = first + len(list(run))
        rows = [idx for _, idx, *_ in pairs[first:end]]
        runs.append((module, rows, a_star[first:end], b_star[first:end], overflow))
        first = end
    return runs


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


def _check_finite(A: torch.Tensor, B: torch.Tensor, pairs: list[tuple[str, int, Row, Any, Any]]) -> None:
    """LoRA factors [K, r, n] / [K, m, r] of K (module, row, adapter, ...) pairs must be finite."""
    j = _first_bad([A, B])
    if j is not None:
        module, _, row, *_ = pairs[j]
        which = "lora_A" if _first_bad([A[j:j + 1]]) is not None else "lora_B"
        raise AdapterFormatError("weights contain NaN or Inf", adapter=row.header.name, module=module,
                                 field=which, path=row.header.weights_file)


def _check_cast(writer: PackedWriter, module: str, rows: torch.Tensor, chunk_rows: list[Row]) -> None:
    """After the cast to the library dtype, B* must still be finite (float16 can overflow)."""
    j = _first_bad([writer.view(tensor_names(module)[1])[rows]])
    if j is not None:
        raise IncompatibleAdapterError(
            f"aligned B* overflows {writer.dtype} (singular values too large); compile with dtype float32",
            adapter=chunk_rows[j].entry["name"], module=module, field="dtype",
        )
