"""Route one module's tokens through one library: the modes of ``LAGConfig`` as pure tensor functions.

Shapes: T tokens, N adapters, n in-features, m out-features, r rank, B sequences of S tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from . import kernels
from .calibration import Affine, Calibrated, library_affine, project_out, projected_prototypes
from .dispatch import expand_pairs, gather_rows, project_all, project_pairs
from .scores import arrow_scores, arrow_topk, arrow_weights, lag_rerank, spectr_select

if TYPE_CHECKING:  # pragma: no cover
    from ..library.stats import ReferenceStats


@dataclass(frozen=True)
class PoolTensors:
    """One library's aligned adapters at one module."""

    protos: torch.Tensor  # [N, n] Arrow prototypes (resident, or memory-mapped when an index serves Arrow)
    A: torch.Tensor  # [N, r, n] A* (may be memory-mapped)
    B: torch.Tensor  # [N, m, r] B* (may be memory-mapped)
    valid: torch.Tensor | None = None  # [N] bool: adapters that adapt this module (None: all)
    index: Any = None  # approximate Arrow (FaissArrow): .search(x, k, effort) -> (top [T, k], rows [T, k])
    # () -> the library's data-free routing statistics (library.stats.ReferenceStats: stored, or computed by
    # the caller); only calibrated routings call it
    stats_source: Callable[[], ReferenceStats] | None = None

    @property
    def n_adapters(self) -> int:
        return self.A.shape[0]

    @cached_property
    def stats(self) -> ReferenceStats:
        """The data-free routing statistics of these adapters (read once from ``stats_source``)."""
        if self.stats_source is None:
            raise ValueError("these library tensors carry no routing statistics")
        return self.stats_source()

    @cached_property
    def _calibrations(self) -> dict[Any, Any]:
        return {}

    def library_calibration(self, how: str) -> Calibrated:
        """The affines of a library-reference calibration (``centre`` / ``zscore`` / ``csls``), cached."""
        if how not in self._calibrations:
            device = self.protos.device
            cal = library_affine(self.stats, how)
            self._calibrations[how] = Calibrated(*(Affine(a.scale.to(device), a.shift.to(device))
                                                   for a in cal))
        return self._calibrations[how]

    def shared_prototypes(self, dims: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(U [dims, n], the prototypes with U projected out and renormalised [N, n]), cached per dims."""
        key = ("subspace", dims)
        if key not in self._calibrations:
            U = self.stats.shared[:dims].to(self.protos.device)
            self._calibrations[key] = (U, projected_prototypes(self.protos, U))
        return self._calibrations[key]

    @cached_property
    def bits(self) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Zero-copy views (protos, A, B) for the fused decode kernels; None where they cannot run."""
        views = tuple(kernels.as_bits(v) for v in (self.protos, self.A, self.B))
        return None if any(v is None for v in views) else views  # type: ignore[return-value]

    def approximates(self, approximate: bool | None, tokens: int, effort: int | None = None) -> bool:
        """Whether Arrow for ``tokens`` tokens uses the index: ``approximate`` True / False forces it (when
        there is one); None lets the index's cost model choose (decode yes, long prompts no)."""
        if self.index is None or approximate is False:
            return False
        return approximate is True or self.index.beats_exact(tokens, effort)

    def arrow(self, x: torch.Tensor, k: int, approximate: bool | None = False,
              effort: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Arrow retrieval (scores [T, k], rows [T, k]): from the index (see :meth:`approximates`), else
        exact."""
        if self.approximates(approximate, x.shape[0], effort):
            top, rows = self.index.search(x, min(k, self.n_adapters), effort)  # on the CPU (FAISS)
            return top.to(x.device), rows.to(x.device)
        return arrow_topk(x, self.protos, k, self.valid)


class Routed(NamedTuple):
    delta: torch.Tensor  # [T, m] what the adapters add to the module's output
    chosen: torch.Tensor  # [T] adapter with the largest weight, per token
    candidates: torch.Tensor | None = None  # [T] candidates reranked per token (dynamic k only)


def request_centre(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of each request's real tokens: x [B, S, n], mask [B, S] bool (None: all real) -> [B, n].

    Rows with fewer than two real tokens get zeros (a lone token minus itself would leave nothing to
    score)."""
    w = (torch.ones(x.shape[:2], device=x.device) if mask is None else mask.float())[..., None]  # [B, S, 1]
    count = w.sum(dim=1)  # [B, 1]
    mean = (x.float() * w).sum(dim=1) / count.clamp_min(1.0)  # [B, n]
    return torch.where(count >= 2, mean, torch.zeros_like(mean))


def _winner_delta(x: torch.Tensor, t: PoolTensors, winner: torch.Tensor, strategy: str) -> torch.Tensor:
    """B*_w A*_w x for each token's winner w: x [T, n], winner [T] -> [T, m]."""
    proj = project_pairs(x, t.A, winner[:, None], strategy)  # [T, 1, r]
    return expand_pairs(proj, t.B, winner[:, None])


@dataclass(frozen=True)
class RouteSpec:
    """How :func:`route_tokens` routes (a :class:`~llama_index_lag.config.LAGConfig`'s per-token settings,
    resolved for one library: see ``llama_index_lag.router.pool.route_spec``)."""

    mode: str  # "lag" | "arrow" | "spectr"
    k: int = 20  # lag: Arrow candidates reranked by SpectR (clamped to N); sequence_scores: candidates
    arrow_top_k: int = 1  # arrow: adapters mixed per token
    temperature: float = 1.0  # arrow: softmax temperature of the mix
    spectr_top_k: int = 1  # spectr: adapters merged per token
    strategy: str = "auto"  # projection dispatch (see .dispatch)
    margin: float | None = None  # lag: dynamic k (keep candidates within this margin of the best)
    approximate: bool | None = False  # Arrow from the library's FAISS index (None: its cost model decides)
    effort: int | None = None  # the index's search breadth (HNSW efSearch / IVF nprobe; None: default)
    kernel: str = "auto"  # one token: "auto" runs the fused kernels of .kernels where they can, "torch" never


def _spec(spec: RouteSpec | str, settings: dict[str, Any]) -> RouteSpec:
    """``spec`` itself, or a mode name plus keyword settings (``route_tokens(x, t, "lag", k=5)``)."""
    if isinstance(spec, RouteSpec):
        if settings:
            raise TypeError(f"settings {sorted(settings)} given with a RouteSpec: use dataclasses.replace")
        return spec
    return RouteSpec(spec, **settings)


def route_tokens(x: torch.Tensor, t: PoolTensors, spec: RouteSpec | str, *,
                 score_x: torch.Tensor | None = None, **settings: Any) -> Routed:
    """Per-token routing of x [T, n] through one library at one module, as ``spec`` says (a
    :class:`RouteSpec`, or a mode name with its fields as keywords).

    ``score_x`` [T, n]: choose the adapters on these vectors (e.g. the request-centred tokens) and apply
    the winners to ``x`` (top-1 modes only).
    """
    spec = _spec(spec, settings)
    if score_x is not None:
        top1 = replace(spec, arrow_top_k=1, temperature=1.0, spectr_top_k=1, kernel="torch")
        chosen = route_tokens(score_x, t, top1)
        return Routed(_winner_delta(x, t, chosen.chosen, spec.strategy), chosen.chosen, chosen.candidates)
    approximate = spec.approximate
    if spec.mode in ("lag", "arrow"):  # decided once: it also means padding
        approximate = t.approximates(approximate, x.shape[0], spec.effort)
    fast = _decode_one(x, t, spec, approximate)
    if fast is not None:
        return fast
    if spec.mode == "lag" and spec.margin is None and not approximate and _tokens_ok(x, t, spec):
        scores = arrow_scores(x, t.protos).float().contiguous()  # [T, N] one GEMM
        _, A, B = t.bits  # type: ignore[misc]
        delta, winner = kernels.lag_scored_tokens(A, B, x.float().contiguous(), scores, spec.k)
        return Routed(delta.to(x.dtype), winner)
    if spec.mode == "lag":
        top, cand = t.arrow(x, spec.k, approximate, spec.effort)  # [T, k]
        winner, proj, kept = lag_rerank(x, t.A, top, cand, t.valid, spec.strategy, spec.margin,
                                        approximate)  # [T]
        return Routed(expand_pairs(proj[:, None], t.B, winner[:, None]), winner, kept)
    if spec.mode == "arrow":
        top, idx = t.arrow(x, spec.arrow_top_k, approximate, spec.effort)  # [T, k]
        proj = project_pairs(x, t.A, idx, spec.strategy)  # [T, k, r]
        w = None if idx.shape[1] == 1 else arrow_weights(top, spec.temperature).to(x.dtype)
        return Routed(expand_pairs(proj, t.B, idx, w), idx[:, 0])
    if spec.mode == "spectr":
        idx, proj = spectr_select(x, t.A, spec.spectr_top_k, t.valid)  # [T, k], [T, k, r]
        if idx.shape[1] == 1:
            return Routed(expand_pairs(proj, t.B, idx), idx[:, 0])
        # SpectR's merge: (mean_j B*_j)(mean_j A*_j) x, i.e. every B*_j applied to the mean projection.
        mean = proj.mean(dim=1, keepdim=True).expand_as(proj)  # [T, k, r]
        w = torch.full(idx.shape, 1.0 / idx.shape[1], dtype=x.dtype, device=x.device)
        return Routed(expand_pairs(mean, t.B, idx, w), idx[:, 0])
    raise ValueError(f"route_tokens cannot route mode {spec.mode!r}")


def route_calibrated(x: torch.Tensor, t: PoolTensors, spec: RouteSpec, cal: Calibrated, *,
                     shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> Routed:
    """Top-1 per-token routing of x [T, n] on calibrated scores (``LAGConfig.calibration``, see
    :mod:`.calibration`): Arrow scores ``|a*_i . x| / ||x||`` and SpectR scores ``||A*_i x|| / ||x||`` each
    pass through their stage's affine (per adapter [N] or per token [T, N]) before the top-k / argmax.
    ``shared``: (U [M, n], projected prototypes [N, n]): tokens and prototypes are scored without the
    directions U. The winner's own B* A* x is applied to x. Arrow is exact here (no approximate index)."""
    xs = x.float() if shared is None else project_out(x, shared[0])  # [T, n]
    protos = t.protos if shared is None else shared[1]
    inv = 1.0 / xs.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [T, 1]
    invalid = None if t.valid is None else ~t.valid
    if spec.mode == "spectr":
        scores = project_all(xs, t.A).float().norm(dim=-1) * inv  # [T, N]
        scores = scores if cal.spectr is None else cal.spectr.at(scores)
        if invalid is not None:
            scores = scores.masked_fill(invalid, float("-inf"))
        winner = scores.argmax(dim=-1)  # [T]
    else:
        scores = (xs @ protos.float().T).abs() * inv  # [T, N]
        scores = scores if cal.arrow is None else cal.arrow.at(scores)
        if invalid is not None:
            scores = scores.masked_fill(invalid, float("-inf"))
        k = 1 if spec.mode == "arrow" else min(spec.k, t.n_adapters)
        top, cand = scores.topk(k, dim=-1)  # [T, k]
        if k == 1:
            winner = cand[:, 0]
        else:
            norms = project_pairs(xs, t.A, cand, spec.strategy).float().norm(dim=-1) * inv  # [T, k]
            norms = norms if cal.spectr is None else cal.spectr.at(norms, cand)
            norms = norms.masked_fill(top == float("-inf"), float("-inf"))
            winner = cand.gather(1, norms.argmax(dim=-1, keepdim=True)).squeeze(1)
    return Routed(_winner_delta(x, t, winner, spec.strategy), winner)


# ---- the fused fast paths (decode steps, prompts), and the functions that decide where they apply ---------
def _tokens_ok(x: torch.Tensor, t: PoolTensors, spec: RouteSpec) -> bool:
    """A prompt's tokens x [T, n] may take the fused per-token kernels (:mod:`.kernels`: after one GEMM for
    the Arrow scores, each token's top-k, rerank and apply in one call, tokens split across cores): on the
    CPU, no autograd, every adapter valid here, numba present, not ``kernel="torch"``."""
    return (spec.kernel != "torch" and x.is_cpu and t.valid is None and not torch.is_grad_enabled()
            and t.bits is not None and kernels.available())



def _one_token(x: torch.Tensor, t: PoolTensors) -> bool:
    """One token on the CPU, no autograd, every adapter valid here: a decode step's fast paths may run."""
    return x.shape[0] == 1 and x.is_cpu and t.valid is None and not torch.is_grad_enabled()


def _decode_one(x: torch.Tensor, t: PoolTensors, spec: RouteSpec, approximate: bool | None) -> Routed | None:
    """:func:`route_tokens`'s result for one token through a fast path, or None: the general path.

    Top-1 routing only (lag without dynamic k, Arrow top-1, SpectR top-1): the fused kernels of
    :mod:`.kernels` where they run (exact Arrow, or SpectR over all N), else Python-int indexing
    (:func:`_apply_one`); an approximate search that found fewer than k candidates takes the general path."""
    if not _one_token(x, t):
        return None
    fused = spec.kernel != "torch" and t.bits is not None and kernels.available()
    if spec.mode == "spectr":
        return _fused(x, t, cand=torch.arange(t.n_adapters)) if fused and spec.spectr_top_k == 1 else None
    if spec.mode == "lag" and spec.margin is None:
        k = spec.k
    elif spec.mode == "arrow" and spec.arrow_top_k == 1:
        k = 1
    else:
        return None
    if fused and not approximate:
        return _fused(x, t, k=k)
    top, cand = t.arrow(x, k, approximate, spec.effort)  # [1, k]
    if approximate and not bool((top >= 0).all()):
        return None
    return _fused(x, t, cand=cand[0]) if fused else _apply_one(x, t, cand[0])


def _apply_one(x: torch.Tensor, t: PoolTensors, cand: torch.Tensor) -> Routed:
    """Decode fast path (one token, candidates cand [k]): SpectR among them, then the winner's B* A* x.

    The same result as the batched path with fewer, smaller ops: indices are Python ints, so the winner's
    B* is a view of the library, not a gather (a decode step routes ~90 modules; each op costs microseconds).
    """
    k, (_, r, n) = cand.numel(), t.A.shape
    x0 = x[0].float()  # [n]
    if k == 1:
        best, proj = 0, torch.mv(t.A[int(cand[0])].float(), x0)  # [r]
    else:
        projs = torch.mv(gather_rows(t.A, cand).view(k * r, n), x0).view(k, r)  # [k, r]
        best = int(torch.linalg.vector_norm(projs, dim=1).argmax())
        proj = projs[best]
    delta = torch.mv(t.B[int(cand[best])].float(), proj)  # [m]
    return Routed(delta[None].to(x.dtype), cand[best:best + 1])


def _fused(x: torch.Tensor, t: PoolTensors, k: int = 1, cand: torch.Tensor | None = None) -> Routed:
    """Decode fast path in one fused call: exact Arrow top-k over all N (or the given candidates cand [k]),
    SpectR among them, the winner's B* A* x. Same choice as :func:`_apply_one`, float32 sums throughout."""
    protos, A, B = t.bits  # type: ignore[misc]
    delta, winner = kernels.lag_one(protos, A, B, x, k) if cand is None else kernels.rerank_one(A, B, x, cand)
    return Routed(delta if x.dtype == torch.float32 else delta.to(x.dtype), winner)


def decode_rows(x: torch.Tensor) -> int | None:
    """R when x holds one token per row (a decode step): [R, 1, n], or [1, n] / [n]; else None."""
    if x.dim() == 3 and x.shape[1] == 1:
        return x.shape[0]
    return 1 if x.numel() == x.shape[-1] else None


def in_place_ok(x: torch.Tensor, out: torch.Tensor, t: PoolTensors) -> bool:
    """Whether the in-place decode kernels (:func:`add_fused`, :func:`add_shortlist_fused`) can add the
    deltas of a decode step's tokens into ``out``: x [R, 1, n] (or one token [.., n]) and out [R, 1, m]
    contiguous float32 CPU tensors, no autograd, CPU views of the library, every adapter valid, numba
    present."""
    return (decode_rows(x) is not None and x.dtype == torch.float32 and out.dtype == torch.float32
            and x.is_contiguous() and out.is_contiguous() and x.is_cpu and t.valid is None
            and not torch.is_grad_enabled() and t.bits is not None and kernels.available())


def route_shortlist(x: torch.Tensor, t: PoolTensors, cand: torch.Tensor, prior: torch.Tensor, weight: float,
                    *, centre: torch.Tensor | None = None, strategy: str = "auto",
                    kernel: str = "auto") -> Routed:
    """Two-level routing, the token level: per token the candidate of its sequence's shortlist with the best
    ``prior + weight * log ||A*_j (x - centre)||``.

    x [T, n] (the winners are applied to it), cand [T, M] each token's shortlist, prior [T, M] log mass
    shares, centre [T, n] subtracted before scoring (e.g. each token's request mean; None: x itself).
    ``kernel="auto"``: on the CPU the fused kernel routes and applies every token in one call."""
    if kernel != "torch" and x.is_cpu and t.valid is None and not torch.is_grad_enabled() and (
            t.bits is not None and kernels.available()):
        _, A, B = t.bits  # type: ignore[misc]
        delta = torch.zeros(x.shape[0], B.shape[1])  # [T, m]
        winner = kernels.add_shortlist_rows(A, B, x.float().contiguous(), centre, cand.contiguous(),
                                            prior.contiguous(), weight, delta)
        return Routed(delta.to(x.dtype), torch.from_numpy(winner))
    xs = x if centre is None else x.float() - centre
    if weight == 0:
        best = prior.argmax(dim=-1, keepdim=True)  # [T, 1]
    else:
        norms = project_pairs(xs, t.A, cand, strategy).float().norm(dim=-1)  # [T, M]
        score = prior.float() + weight * norms.clamp_min(1e-30).log()
        if t.valid is not None:
            score = score.masked_fill(~t.valid[cand], float("-inf"))
        best = score.argmax(dim=-1, keepdim=True)  # [T, 1]
    winner = cand.gather(1, best).squeeze(1)  # [T]
    return Routed(_winner_delta(x, t, winner, strategy), winner)


def add_fused(x: torch.Tensor, t: PoolTensors, k: int, out: torch.Tensor) -> torch.Tensor:
    """Decode in place: out [R, 1, m] += B*_w A*_w x for the rows' tokens x [R, 1, n] (float32, contiguous,
    CPU, no autograd), each w chosen by exact Arrow top-k -> SpectR (k = 1: Arrow top-1). What
    :func:`route_tokens` adds for those tokens, bit for bit, without its tensors (where :func:`in_place_ok`,
    exact Arrow). Returns the winners [R]."""
    protos, A, B = t.bits  # type: ignore[misc]
    R = decode_rows(x)
    return torch.from_numpy(kernels.add_rows(protos, A, B, x.view(R, -1), k, out.view(R, -1)))


def add_shortlist_fused(x: torch.Tensor, t: PoolTensors, cand: torch.Tensor, prior: torch.Tensor,
                        weight: float, centre: torch.Tensor | None, out: torch.Tensor) -> torch.Tensor:
    """Decode in place for two-level routing: out [R, 1, m] += B*_w A*_w x for the rows' tokens x [R, 1, n],
    each w the candidate of its row's shortlist cand [R, M] with the best prior [R, M] + weight *
    log ||A*_w (x - centre)||, centre [R, n] or None: what :func:`route_shortlist` adds for those tokens,
    without its tensors (where :func:`in_place_ok`). Returns the winners [R]."""
    _, A, B = t.bits  # type: ignore[misc]
    R = decode_rows(x)
    return torch.from_numpy(kernels.add_shortlist_rows(A, B, x.view(R, -1), centre, cand, prior, weight,
                                                       out.view(R, -1)))


def apply_fixed(x: torch.Tensor, t: PoolTensors, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Named adapters for every token: sum_f w_f B*_f A*_f x. x [T, n], idx [F], weights [F] -> [T, m]."""
    proj = project_all(x, t.A[idx])  # [T, F, r]
    T, F = proj.shape[:2]
    return expand_pairs(proj, t.B, idx.expand(T, F), weights.to(x.dtype).expand(T, F))


def sequence_scores(x: torch.Tensor, mask: torch.Tensor, t: PoolTensors, spec: RouteSpec | str, how: str, *,
                    centre: torch.Tensor | None = None, **settings: Any) -> torch.Tensor:
    """Aggregate per-token scores over each sequence. x [B, S, n], mask [B, S] -> [B, N].

    ``spec``: its mode, k (lag candidates), strategy and Arrow search settings are used (a
    :class:`RouteSpec`, or a mode name with its fields as keywords). ``mass``: per token, the SpectR scores
    ||A*_i x|| of its candidates (all N for spectr, Arrow top-k for lag, Arrow scores for arrow) normalised
    to sum 1 over the candidates, summed over the sequence. ``vote``: the number of tokens whose per-token
    (top-1) winner is each adapter. ``centre`` [B, n]: score ``x - centre`` (request-centred tokens, see
    :func:`request_centre`). Only the tokens ``mask`` counts are scored (a float mask weighs them).
    """
    spec = _spec(spec, settings)
    mode, k, strategy = spec.mode, spec.k, spec.strategy
    Bsz, S, n = x.shape
    N = t.n_adapters
    if centre is not None:
        x = x.float() - centre[:, None].to(x.device)
    # only the tokens that count are scored: pads and, under a focus, the context add nothing
    keep = mask.reshape(-1).nonzero().squeeze(1)  # [T]
    totals = torch.zeros(Bsz, N, device=x.device)
    if keep.numel() == 0:
        return totals
    flat = x.reshape(-1, n).index_select(0, keep)  # [T, n]
    if how == "vote":
        top1 = RouteSpec(mode, k=k, strategy=strategy, approximate=spec.approximate, effort=spec.effort)
        chosen = route_tokens(flat, t, top1).chosen  # [T]
        cand, score = chosen[:, None], flat.new_ones(flat.shape[0], 1, dtype=torch.float32)
    else:
        everyone = torch.arange(N, device=x.device).expand(flat.shape[0], N)  # [T, N]
        if mode == "spectr":
            cand, score = everyone, project_all(flat, t.A).float().norm(dim=-1)  # [T, N]
        elif (mode == "lag" and not t.approximates(spec.approximate, flat.shape[0], spec.effort)
              and _tokens_ok(flat, t, spec)):  # fused: each token's top-k and normalised norms in one call
            _, A, _ = t.bits  # type: ignore[misc]
            scores = arrow_scores(flat, t.protos).float().contiguous()  # [T, N]
            cand, score = kernels.mass_tokens(A, flat.float().contiguous(), scores, k)  # [T, k] each
        elif mode == "lag":
            cand = t.arrow(flat, k, spec.approximate, spec.effort)[1]  # [T, k]
            score = project_pairs(flat, t.A, cand, strategy).float().norm(dim=-1)  # [T, k]
        else:  # arrow
            cand, score = everyone, arrow_scores(flat, t.protos, t.valid).float().clamp_min(0)
        score = score / score.sum(dim=-1, keepdim=True).clamp_min(1e-12)  # (the fused masses sum to 1)
    if t.valid is not None:
        score = score * t.valid[cand]
    weight = mask.reshape(-1).index_select(0, keep).to(score.dtype)  # [T] (a float mask weighs tokens)
    score = score * weight[:, None]
    seq = (keep // S)[:, None].expand_as(cand)  # [T, k] each token's sequence
    totals.index_put_((seq.reshape(-1), cand.reshape(-1)), score.reshape(-1).float(), accumulate=True)
    return totals
