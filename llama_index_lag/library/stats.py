"""A library's data-free routing statistics: computed once from its own aligned factors when it is written
(compile / add / remove), stored beside its tensors, read memory-mapped (the math that uses them:
``routing/calibration.py``).

Shapes: N adapters, r rank, n in-features, R reference vectors, M shared directions.

``routing_stats.safetensors`` holds, per module, ``{module}.<key>`` for the keys of :class:`ReferenceStats`
(its metadata carries the library revision, so a stale file is refused like stale tensors).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import LibraryFormatError
from .packed import PackedFormatError, PackedReader

STATS = "routing_stats.safetensors"
#: reference vectors per module (a fixed subsample beyond), top scores averaged by CSLS, shared directions
MAX_REFERENCE = 256
CSLS_TOP = 10
SHARED_DIMS = 8
SUBSPACE_ITERS = 12
KEEP_ELEMENTS = 1 << 25  # factors of up to this many elements are converted to float32 once (128 MB)
STAT_KEYS = ("arrow_mean", "arrow_std", "arrow_csls", "spectr_mean", "spectr_std", "spectr_csls")
_ALL_KEYS = (*STAT_KEYS, "shared", "shared_values")


@dataclass(frozen=True)
class ReferenceStats:
    """One library's data-free routing statistics at one module."""

    arrow_mean: torch.Tensor  # [N] mean of a_i over the reference set
    arrow_std: torch.Tensor  # [N]
    arrow_csls: torch.Tensor  # [N] mean of a_i's top CSLS_TOP reference scores
    spectr_mean: torch.Tensor  # [N] the same for c_i
    spectr_std: torch.Tensor  # [N]
    spectr_csls: torch.Tensor  # [N]
    shared: torch.Tensor  # [M, n] top eigenvectors of P (rows, descending eigenvalue)
    shared_values: torch.Tensor  # [M] their eigenvalues

    def to_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{k}": getattr(self, k).float().contiguous() for k in _ALL_KEYS}


#: adapters per chunk of the computation (bounded memory for any library size)
CHUNK = 1024


def _chunks(N: int) -> list[slice]:
    return [slice(i, min(i + CHUNK, N)) for i in range(0, N, CHUNK)]


def _reference(A: torch.Tensor, valid: torch.Tensor | None, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference vectors [R, n] — the non-zero rows of every valid adapter's A* (ranks below r_max are
    zero-padded), an evenly spaced subsample of ``limit`` when there are more — and their adapters [R]."""
    N, r, _ = A.shape
    live = torch.cat([A[c].float().norm(dim=-1).gt(0).reshape(-1) for c in _chunks(N)])  # [N r]
    if valid is not None:
        live &= valid.to(torch.bool).repeat_interleave(r)
    rows = live.nonzero().squeeze(1)  # [R0] flat row ids
    if rows.numel() > limit:  # deterministic: the same library gives the same statistics
        rows = rows[torch.linspace(0, rows.numel() - 1, limit).round().long()]
    return A.reshape(N * r, -1).index_select(0, rows).float(), rows // r


def _stats(scores: torch.Tensor, own: torch.Tensor, top: int) -> list[torch.Tensor]:
    """Mean, std and top-``top`` mean of scores [C, R] over the reference (each adapter's own rows left
    out): three [C]."""
    others = (~own).float()  # [C, R]
    count = others.sum(dim=1).clamp_min(1.0)  # [C]
    mean = (scores * others).sum(dim=1) / count
    var = (((scores - mean[:, None]) ** 2) * others).sum(dim=1) / (count - 1).clamp_min(1.0)
    best = scores.masked_fill(own, float("-inf")).topk(min(top, scores.shape[1]), dim=1).values  # [C, top]
    found = best.isfinite()
    csls = torch.where(found, best, torch.zeros_like(best)).sum(dim=1) / found.sum(dim=1).clamp_min(1)
    return [mean, var.sqrt().clamp_min(1e-6), csls]


def shared_subspace(A: torch.Tensor, valid: torch.Tensor | None = None,
                    dims: int = SHARED_DIMS) -> tuple[torch.Tensor, torch.Tensor]:
    """Top ``dims`` eigenvectors [dims, n] (rows) and eigenvalues [dims] of the library's mean input
    projector ``P = (1/N) sum_i A*_i^T A*_i``, by seeded subspace iteration (``SUBSPACE_ITERS`` products
    ``P Q``, each chunk by chunk without forming P, then Rayleigh-Ritz): deterministic for a given A."""
    N, r, n = A.shape
    count = N if valid is None else int(valid.sum())
    width = min(n, dims + 8)

    def rows_of(c: slice) -> torch.Tensor:  # [C r, n] float32: the valid adapters' rows of one chunk
        rows = A[c].float()
        if valid is not None:
            rows = rows[valid[c].to(torch.bool)]
        return rows.reshape(-1, n)

    chunks = _chunks(N)
    kept = [rows_of(c) for c in chunks] if N * r * n <= KEEP_ELEMENTS else None  # small: convert once

    def times_p(Q: torch.Tensor) -> torch.Tensor:  # P Q, Q [n, width]
        out = torch.zeros(n, width, dtype=torch.float64)
        for i, c in enumerate(chunks):
            rows = kept[i] if kept is not None else rows_of(c)
            out += (rows.T @ (rows @ Q.float())).double()
        return out / max(count, 1)

    gen = torch.Generator().manual_seed(0)
    Q = torch.linalg.qr(torch.randn(n, width, generator=gen, dtype=torch.float64))[0]
    for _ in range(SUBSPACE_ITERS):
        Q = torch.linalg.qr(times_p(Q))[0]
    values, W = torch.linalg.eigh(Q.T @ times_p(Q))  # ascending
    dims = min(dims, width)
    vectors = (Q @ W.flip(1)[:, :dims]).T
    return vectors.float().contiguous(), values.flip(0)[:dims].float().contiguous()


def reference_stats(A: torch.Tensor, protos: torch.Tensor, valid: torch.Tensor | None = None, *,
                    limit: int = MAX_REFERENCE, top: int = CSLS_TOP,
                    dims: int = SHARED_DIMS) -> ReferenceStats:
    """The data-free statistics of one library at one module (stored at compile time).

    A [N, r, n], protos [N, n], valid [N] bool or None. The reference set is every valid adapter's right
    singular vectors (unit vectors; at most ``limit`` of them, evenly spaced); adapter i's statistics leave
    its own rows out. Adapters not valid here get mean 0, std 1, csls 0."""
    ref, owner = _reference(A, valid, limit)  # [R, n], [R]
    N = A.shape[0]
    parts: list[list[torch.Tensor]] = []
    for c in _chunks(N):
        own = owner[None, :] == torch.arange(c.start, c.stop)[:, None]  # [C, R]
        arrow = (protos[c].float() @ ref.T).abs()  # [C, R]
        block = A[c].float()  # [C, r, n]
        spectr = (block.reshape(-1, block.shape[-1]) @ ref.T).view(*block.shape[:2], -1).norm(dim=1)  # [C, R]
        parts.append(_stats(arrow, own, top) + _stats(spectr, own, top))
    out = [torch.cat([p[i] for p in parts]) for i in range(len(STAT_KEYS))]
    if valid is not None:
        off = ~valid.to(torch.bool)
        out = [v.masked_fill(off, 1.0 if i % 3 == 1 else 0.0) for i, v in enumerate(out)]
    shared, values = shared_subspace(A, valid, dims)
    return ReferenceStats(*out, shared=shared, shared_values=values)


# ---- stored ---------------------------------------------------------------------------------------------
def write_stats(folder: Path, lib: Any, revision: str) -> dict[str, Any]:
    """Compute every module's statistics of the library ``lib`` (just written in ``folder``) into
    ``folder/STATS``; returns the manifest's ``routing_stats`` entry."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for module in lib.modules:  # torch threads fill the cores (two modules at once: no faster)
        t = lib.tensors(module)
        tensors.update(reference_stats(t.A, t.proto, lib.present(module)).to_dict(module))
    path = folder / STATS
    save_file(tensors, str(path), metadata={"revision": revision})
    return {"file": STATS, "sha256": _sha256(path), "reference": MAX_REFERENCE, "csls_top": CSLS_TOP,
            "shared_dims": SHARED_DIMS}


def open_stats(manifest: dict[str, Any], path: Path, dir_fd: int | None) -> PackedReader | None:
    """The stored statistics of a library being loaded (None: written before they were stored), checked
    against its revision."""
    entry = manifest.get("routing_stats")
    if entry is None:
        return None
    file = path / STATS
    if not isinstance(entry, dict) or entry.get("file") != STATS:
        raise LibraryFormatError(f"routing_stats must name {STATS}", path=path, field="routing_stats")
    try:
        reader = PackedReader(Path(STATS), dir_fd=dir_fd) if dir_fd is not None else PackedReader(file)
    except FileNotFoundError:
        if dir_fd is not None:
            raise  # the loader tells a folder replaced under it (retry) from a missing file
        raise LibraryFormatError("the routing statistics file is missing", path=file) from None
    except (PackedFormatError, OSError, ValueError) as exc:
        raise LibraryFormatError(f"cannot open the routing statistics: {exc}", path=file) from None
    if reader.metadata.get("revision") != manifest.get("revision"):
        raise LibraryFormatError("routing statistics and manifest are from different revisions (stale "
                                 "library)", path=file)
    return reader


def read_stats(reader: PackedReader, module: str, n_adapters: int, path: Path) -> ReferenceStats:
    """One module's stored statistics (memory-mapped views), shapes checked."""
    try:
        values = {k: reader.tensor(f"{module}.{k}") for k in _ALL_KEYS}
    except PackedFormatError as exc:
        raise LibraryFormatError(f"routing statistics: {exc}", module=module, path=path / STATS) from None
    if any(values[k].shape != (n_adapters,) for k in STAT_KEYS):
        raise LibraryFormatError("routing statistics do not cover the library's adapters", module=module,
                                 path=path / STATS)
    return ReferenceStats(**values)


def verify_stats(path: Path, manifest: dict[str, Any]) -> bool | None:
    """Check the statistics file against its stored sha256 (None: the library stores none)."""
    entry = manifest.get("routing_stats")
    if entry is None:
        return None
    got = _sha256(path / STATS)
    if got != entry.get("sha256"):
        raise LibraryFormatError(f"checksum mismatch: stored {entry.get('sha256')}, read {got} (corrupt "
                                 "routing statistics)", path=path / STATS, field="routing_stats")
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["STATS", "ReferenceStats", "open_stats", "read_stats", "reference_stats", "shared_subspace",
           "verify_stats", "write_stats"]
