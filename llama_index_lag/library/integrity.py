"""The format of a compiled library (file names, dtypes, adapter names) and its integrity: the manifest's
schema (checked at every load, cheaply) and the stored checksums (checked by :func:`verify`, which reads every
byte).

What a load refuses, with a :class:`LibraryFormatError` naming the file and field: a manifest that is not
JSON or nested past reason, missing or mistyped fields, adapter names that are not safe ids (``../x``) or
collide case-insensitively, duplicate or negative uids, ranks outside ``1..r_max``, adapters listing modules
the library does not have. What :func:`verify` adds: the crc32 of every chunk of rows of the packed file
(a same-size corruption, NaN written over a body), NaN / Inf anywhere, the checksum of every Arrow index
file, and whether the index holds this library's prototypes (another library's index with its revision
copied over).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..dtypes import parse_torch_dtype
from ..errors import AdapterError, DataError, LibraryFormatError
from ..ids import id_key, validate_id  # the id rules shared with documents
from .stats import verify_stats

if TYPE_CHECKING:  # pragma: no cover
    from .store import AdapterLibrary

FORMAT = "llama-index-lag/adapter-library"
# 2: per-chunk checksums of the packed file; 3: stored routing statistics (routing_stats.safetensors).
# Every earlier version still loads.
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
CHECKSUM = "crc32"
KINDS = ("task", "knowledge")
INDEX_SAMPLE = 256  # prototypes per module compared with what the Arrow index holds


MANIFEST = "manifest.json"
TENSORS = "adapters.safetensors"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = tuple(DTYPES)


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A library storage dtype: one of :data:`DTYPE_NAMES` or its torch dtype (else :class:`ConfigError`)."""
    return parse_torch_dtype(dtype, allowed=DTYPE_NAMES)


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def check_adapter_name(name: str) -> str:
    """Adapter names become file names and document ids: refuse path-like or unsafe names."""
    try:
        return validate_id(name)
    except ValueError as exc:
        raise AdapterError(f"invalid adapter name: {exc}", adapter=name, field="name") from None


def parse_manifest(raw: bytes, path: Path) -> dict[str, Any]:
    """Decode and check ``manifest.json`` (see :func:`check_manifest`)."""
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise LibraryFormatError(f"manifest is not valid JSON: {why}", path=path) from None
    check_manifest(manifest, path)
    return manifest


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_manifest(manifest: Any, path: Path) -> None:
    """Refuse a manifest that this package did not write (or that was edited into an inconsistent state)."""
    def bad(message: str, field: str) -> LibraryFormatError:
        return LibraryFormatError(message, path=path, field=field)

    _check_header(manifest, bad)
    modules = manifest["modules"]
    if not isinstance(modules, dict) or not modules:
        raise bad("modules must map module names to their shapes", "modules")
    for module, info in modules.items():
        if not isinstance(info, dict) or not all(_int(info.get(k)) and info[k] > 0
                                                 for k in ("in_features", "out_features")):
            raise bad(f"module {module!r} needs positive in_features / out_features", "modules")
    adapters = manifest["adapters"]
    if not isinstance(adapters, list) or not adapters:
        raise bad("the library holds no adapters", "adapters")
    uids = _check_adapters(adapters, modules, manifest["r_max"], bad)
    next_uid = manifest.get("next_uid")
    if next_uid is not None and (not _int(next_uid) or next_uid <= max(uids)):
        raise bad(f"next_uid must exceed every uid, got {next_uid!r}", "next_uid")
    checksums = manifest.get("checksums")
    if checksums is not None:
        _check_checksums(checksums, len(adapters), bad)


_Bad = Callable[[str, str], LibraryFormatError]  # (message, field) -> the error to raise


def _check_header(manifest: Any, bad: _Bad) -> None:
    """Format, version, required fields, kind, dtype, r_max and base model of a manifest."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise bad(f"not a {FORMAT} manifest", "format")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise bad(f"unsupported format_version {version!r} (this llama-index-lag reads {READABLE_VERSIONS}); "
                  "recompile the library", "format_version")
    for key in ("kind", "dtype", "r_max", "base_model", "modules", "adapters"):
        if key not in manifest:
            raise bad("manifest field missing", key)
    if manifest["kind"] not in KINDS:
        raise bad(f"unknown kind {manifest['kind']!r}", "kind")
    if manifest["dtype"] not in DTYPE_NAMES:
        raise bad(f"unknown dtype {manifest['dtype']!r}", "dtype")
    r_max = manifest["r_max"]
    if not _int(r_max) or r_max < 1:
        raise bad(f"r_max must be a positive integer, got {r_max!r}", "r_max")
    base = manifest["base_model"]
    if (not isinstance(base, dict) or not isinstance(base.get("fingerprint"), dict)
            or not isinstance(base.get("linear_modules"), dict)):
        raise bad("base_model must hold a fingerprint and linear_modules", "base_model")
    for key in ("architecture", "model_type"):
        if key not in base["fingerprint"]:
            raise bad(f"base_model fingerprint has no {key!r}", f"base_model.fingerprint.{key}")


def _check_adapters(adapters: list[Any], modules: dict[str, Any], r_max: int, bad: _Bad) -> set[int]:
    """Every adapter entry: a safe name unique up to case, a rank in 1..r_max, a unique uid, modules of the
    library; returns the uids."""
    names: dict[str, str] = {}
    uids: set[int] = set()
    for i, entry in enumerate(adapters):
        where = f"adapters[{i}]"
        if not isinstance(entry, dict):
            raise bad("adapter entry must be an object", where)
        try:
            name = validate_id(entry.get("name"), field=f"{where}.name")
        except DataError as exc:
            raise bad(f"invalid adapter name: {exc.message}", f"{where}.name") from None
        key = id_key(name)
        if key in names:
            raise bad(f"adapter name {name!r} appears twice in this library (also {names[key]!r})",
                      f"{where}.name")
        names[key] = name
        rank = entry.get("rank")
        if not _int(rank) or not 1 <= rank <= r_max:
            raise bad(f"rank of {name!r} must be an integer in 1..r_max ({r_max}), got {rank!r}",
                      f"{where}.rank")
        uid = entry.get("uid", i)
        if not _int(uid) or uid < 0 or uid in uids:
            raise bad(f"uid of {name!r} must be a unique non-negative integer, got {uid!r}", f"{where}.uid")
        uids.add(uid)
        listed = entry.get("modules")
        if listed is not None and (not isinstance(listed, list) or not set(listed) <= set(modules)):
            raise bad(f"adapter {name!r} lists modules the library does not have", f"{where}.modules")
    return uids


def _check_checksums(checksums: Any, n_adapters: int, bad: _Bad) -> None:
    """``{"algorithm": "crc32", "blocks": [[start, end, crc], ...]}`` whose blocks cover the adapters in
    order."""
    blocks = checksums.get("blocks") if isinstance(checksums, dict) else None
    if (not isinstance(checksums, dict) or checksums.get("algorithm") != CHECKSUM
            or not isinstance(blocks, list)
            or not all(isinstance(b, list) and len(b) == 3 and all(_int(v) for v in b) for b in blocks)):
        raise bad(f"checksums must be {{'algorithm': {CHECKSUM!r}, 'blocks': [[start, end, crc], ...]}}",
                  "checksums")
    covered = 0
    for start, end, _ in blocks:
        if start != covered or end <= start:
            raise bad(f"checksum blocks must cover the adapters in order, got [{start}, {end}]", "checksums")
        covered = end
    if covered != n_adapters:
        raise bad(f"checksum blocks cover {covered} of {n_adapters} adapters", "checksums")


def verify(lib: AdapterLibrary) -> dict[str, Any]:
    """Read the whole library and check it against its stored checksums; raise LibraryFormatError at the
    first mismatch, else return what was checked."""
    reader = lib._open()
    file = lib.path / "adapters.safetensors"
    lib.check_mapped()
    report: dict[str, Any] = {"path": str(lib.path), "adapters": len(lib), "bytes": reader.nbytes,
                              "blocks": 0, "checksums": False, "arrow_index": None}
    checksums = lib.manifest.get("checksums")
    if checksums is not None:
        for start, end, crc in checksums["blocks"]:
            got = reader.checksum(start, end)
            if got != crc:
                names = lib.names[start:end]
                raise LibraryFormatError(
                    f"checksum mismatch in the packed tensors of adapters {start}..{end - 1} ({names[0]}"
                    f"{'...' if len(names) > 1 else ''}): stored {crc:08x}, read {got:08x} (corrupt file)",
                    adapter=names[0], path=file, field="checksums")
        report.update(blocks=len(checksums["blocks"]), checksums=True)
    for module in lib.modules:
        t = lib.tensors(module)
        for key, value in (("A", t.A), ("B", t.B), ("proto", t.proto)):
            if not bool(torch.isfinite(value).all()):
                row = int((~torch.isfinite(value.flatten(1))).any(dim=1).nonzero()[0])
                raise LibraryFormatError("NaN or Inf in the packed tensors", adapter=lib.names[row],
                                         module=module, field=key, path=file)
    if lib.arrow_meta_exists():
        report["arrow_index"] = _verify_index(lib)
    report["routing_stats"] = verify_stats(lib.path, lib.manifest)
    return report


def _verify_index(lib: AdapterLibrary) -> dict[str, Any]:
    from .arrow_index import ARROW_DIR, file_crc32, index_type

    pinned = lib._pinned
    assert pinned is not None
    where = lib.path / ARROW_DIR
    indexes = lib.arrow_indexes()  # raises when missing or stale
    files = pinned.meta.get("files")
    if files is not None:
        for position, (path, (_size, crc)) in enumerate(zip(pinned.paths(), files)):
            got = file_crc32(path)
            if got != crc:
                raise LibraryFormatError(f"checksum mismatch: stored {crc:08x}, read {got:08x} "
                                         "(corrupt index file)",
                                         module=lib.modules[position], path=where / f"{position}.faiss")
    uids = lib.uids()
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(len(lib), min(INDEX_SAMPLE, len(lib)), replace=False))
    for module, index in indexes.items():
        protos = lib.tensors(module).proto[torch.from_numpy(rows)].float().numpy()
        held = _reconstruct(index, index_type(index), uids[rows])
        if held is None:
            continue
        expected = protos.astype(np.float16).astype(np.float32)  # the index stores float16 vectors
        err = float(np.abs(held - expected).max()) if held.size else 0.0
        if not math.isfinite(err) or err > 1e-3:
            raise LibraryFormatError(f"the approximate Arrow index does not hold this library's prototypes "
                                     f"(max difference {err:.3g}): it belongs to another library or "
                                     "revision; rebuild it with AdapterLibrary.build_arrow_index()",
                                     module=module, path=where)
    return {"type": pinned.meta.get("type"), "files": len(files or []), "sampled": int(rows.size)}


def _reconstruct(index: Any, kind: str, uids: np.ndarray) -> np.ndarray | None:
    """The vectors the index holds for ``uids`` (float32), or None where it cannot say."""
    import faiss

    try:
        if kind == "hnsw":  # IndexIDMap(IndexHNSWSQ): internal ids through id_map
            id_map = faiss.vector_to_array(index.id_map)
            position = {int(u): i for i, u in enumerate(id_map)}
            inner = faiss.downcast_index(index.index)
            return np.stack([inner.reconstruct(position[int(u)]) for u in uids])
        ivf = faiss.extract_index_ivf(index)
        ivf.make_direct_map()
        return np.stack([ivf.reconstruct(int(u)) for u in uids])
    except (RuntimeError, KeyError):
        raise LibraryFormatError("the approximate Arrow index does not hold every adapter of the library "
                                 "(another library's index?)") from None


def module_patterns(modules: Iterable[str]) -> dict[str, int]:
    """Group module names by replacing layer numbers with '*': {'model.layers.*.mlp.gate_proj': 30}."""
    import re

    counts: dict[str, int] = {}
    for module in modules:
        key = re.sub(r"\.\d+\.", ".*.", module)
        counts[key] = counts.get(key, 0) + 1
    return counts


def revision_on_disk(path: str | Path) -> str | None:
    """The revision of the library at ``path`` now (its manifest's), or None when it cannot be read."""
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return manifest.get("revision") if isinstance(manifest, dict) else None
