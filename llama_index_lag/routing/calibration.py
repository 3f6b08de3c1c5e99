"""Data-free score calibration against hub adapters: pure tensor functions (no modules, no I/O).

Shapes: T tokens, N adapters, n in-features, r rank, R reference vectors, B requests of S tokens, M shared
directions.

Per-token routing scores an adapter by ``a_i(x) = |a*_i . x| / ||x||`` (Arrow) and ``c_i(x) = ||A*_i x|| /
||x||`` (SpectR). A "hub" adapter scores high on every token. The calibrations rescale each adapter's scores
by how it scores in general, ``s'_i = scale_i * s_i + shift_i`` (:class:`Affine`), with the statistics taken
from a reference set that needs no data:

* the library itself (``library.stats.reference_stats``, computed once at compile time and stored in the
  library):
  every other adapter's right singular vectors (the rows of A*_j, j != i, unit vectors) —
  ``centre`` (s - mean), ``zscore`` ((s - mean) / std), ``csls`` (2 s - mean of the adapter's top 10
  reference scores, as CSLS in cross-lingual retrieval);
* the request's own prompt tokens (:func:`request_affine`): ``centre`` / ``zscore`` / ``csls`` over them,
  ``isoftmax`` (inverted softmax: each adapter's scores normalised over the request's tokens) and
  ``sinkhorn`` (a few alternating normalisations over adapters and tokens).

``subspace`` instead removes the library's shared input subspace — the top eigenvectors of its mean input
projector ``P = (1/N) sum_i A*_i^T A*_i`` (also stored) — from the routing: tokens are scored as ``Q x`` and
prototypes as ``Q a*_i / ||Q a*_i||`` with ``Q = I - U U^T`` (:func:`project_out`); the winner's own
``B* A* x`` is applied unchanged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..library.stats import ReferenceStats

#: top scores averaged by CSLS, rounds of Sinkhorn
CSLS_TOP = 10
SINKHORN_ROUNDS = 3


class Affine(NamedTuple):
    """``s' = scale * s + shift``; each [N] (per adapter) or [T, N] (per token's request)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def at(self, scores: torch.Tensor, cand: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated scores [T, K] of candidates cand [T, K] (None: scores [T, N] of every adapter)."""
        scale, shift = self.scale, self.shift
        if cand is not None:
            if scale.dim() == 1:
                scale, shift = scale[cand], shift[cand]  # [T, K]
            else:
                scale, shift = scale.gather(1, cand), shift.gather(1, cand)
        return scores * scale + shift

    def rows(self, repeats: int) -> Affine:
        """Per-request [B, N] -> per-token [B * repeats, N] (every token of a row shares its request's)."""
        if self.scale.dim() == 1:
            return self
        return Affine(self.scale.repeat_interleave(repeats, dim=0),
                      self.shift.repeat_interleave(repeats, dim=0))


class Calibrated(NamedTuple):
    """How a calibrated routing scores one module's tokens: the two stages' affines (None: raw scores)."""

    arrow: Affine | None
    spectr: Affine | None


def library_affine(stats: ReferenceStats, how: str) -> Calibrated:
    """The affines of a library-reference calibration (``centre`` / ``zscore`` / ``csls``)."""
    def one(mean: torch.Tensor, std: torch.Tensor, csls: torch.Tensor) -> Affine:
        if how == "centre":
            return Affine(torch.ones_like(mean), -mean)
        if how == "zscore":
            return Affine(1.0 / std, -mean / std)
        if how == "csls":
            return Affine(torch.full_like(mean, 2.0), -csls)
        raise ValueError(f"not a library calibration: {how!r}")

    return Calibrated(one(stats.arrow_mean, stats.arrow_std, stats.arrow_csls),
                      one(stats.spectr_mean, stats.spectr_std, stats.spectr_csls))


# ---- the request as reference ---------------------------------------------------------------------------
def _masked_lse(logits: torch.Tensor, mask: torch.Tensor, dim: int) -> torch.Tensor:
    return logits.masked_fill(~mask, float("-inf")).logsumexp(dim=dim)


def request_affine(scores: torch.Tensor, mask: torch.Tensor, how: str, beta: float = 30.0) -> Affine:
    """Per-request affine [B, N] of one stage's scores [B, S, N] over each request's real tokens (mask
    [B, S]).

    ``centre`` / ``zscore`` / ``csls``: as :func:`library_affine`, the statistics taken over the tokens.
    ``isoftmax``: ``beta s_i(t) - log sum_t' exp(beta s_i(t'))`` (inverted softmax; the per-token softmax
    over adapters would not change the argmax). ``sinkhorn``: ``beta s_i(t) + log v_i`` with ``v`` the column
    scaling of SINKHORN_ROUNDS alternating row / column normalisations of ``exp(beta s)``; a token's row
    scaling does not change its argmax, so the new tokens of a request reuse ``v``."""
    s = scores.float()
    m = mask.bool()[..., None].expand_as(s)  # [B, S, N]
    count = mask.float().sum(dim=1).clamp_min(1.0)[:, None]  # [B, 1]
    if how in ("centre", "zscore", "csls"):
        mean = (s * m).sum(dim=1) / count  # [B, N]
        if how == "centre":
            return Affine(torch.ones_like(mean), -mean)
        if how == "zscore":
            var = (((s - mean[:, None]) ** 2) * m).sum(dim=1) / (count - 1).clamp_min(1.0)
            std = var.sqrt().clamp_min(1e-6)
            return Affine(1.0 / std, -mean / std)
        best = s.masked_fill(~m, float("-inf")).topk(min(CSLS_TOP, s.shape[1]), dim=1).values  # [B, top, N]
        fin = best.isfinite()
        csls = torch.where(fin, best, torch.zeros_like(best)).sum(dim=1) / fin.sum(dim=1).clamp_min(1)
        return Affine(torch.full_like(csls, 2.0), -csls)
    logits = beta * s  # [B, S, N]
    scale = torch.full(s.shape[::2], beta, dtype=s.dtype, device=s.device)  # [B, N]
    if how == "isoftmax":
        return Affine(scale, -_masked_lse(logits, m, dim=1))
    if how == "sinkhorn":
        col = torch.zeros_like(scale)  # [B, N] log column scaling
        for _ in range(SINKHORN_ROUNDS):
            row = _masked_lse(logits + col[:, None], m, dim=2)  # [B, S]
            col = -_masked_lse(logits - row[..., None], m, dim=1)  # [B, N]
        return Affine(scale, col.masked_fill(~col.isfinite(), 0.0))
    raise ValueError(f"not a request calibration: {how!r}")


# ---- subspace removal -----------------------------------------------------------------------------------
def project_out(x: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``Q x = x - U^T (U x)``: x [T, n] without the directions U [M, n] (orthonormal rows)."""
    U = U.to(device=x.device)
    return x.float() - (x.float() @ U.T) @ U


def projected_prototypes(protos: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``Q a*_i / ||Q a*_i||`` for prototypes [N, n] (a prototype inside the subspace keeps a zero row)."""
    q = project_out(protos, U)
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
