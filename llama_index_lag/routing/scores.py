"""Routing scores and selections: pure tensor functions (no modules, no I/O).

Shapes: T tokens (batch x sequence flattened), N adapters, n in-features, m out-features, r rank,
k candidates.

Arrow retrieval yields candidates ``(top [T, k] scores, cand [T, k] adapter rows)`` — exactly
(:func:`arrow_topk`) or from an approximate index (``library.arrow_index.FaissArrow.search``, same contract);
the selections below take those candidates.
"""

from __future__ import annotations

import torch

from .dispatch import project_all, project_pairs


def arrow_scores(x: torch.Tensor, protos: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Arrow: |a*_i . x| for every adapter (sign-free: singular vectors have no sign).

    x [T, n], protos [N, n], valid [N] bool or None -> [T, N]; invalid adapters score -1 (never chosen
    before a valid one, since valid scores are >= 0).
    """
    scores = (x.to(protos.dtype) @ protos.T).abs_()  # [T, N]
    if valid is not None:
        scores.masked_fill_(~valid, -1.0)
    return scores


def arrow_topk(x: torch.Tensor, protos: torch.Tensor, k: int,
               valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Arrow retrieval: (scores [T, k] descending, adapter rows [T, k]); k is clamped to N."""
    scores = arrow_scores(x, protos, valid)  # [T, N]
    return scores.topk(min(k, scores.shape[-1]), dim=-1)


def arrow_weights(top: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(score / temperature) over the kept candidates [T, k] (weight 1 for top-1).

    With k=1 this is hard Arrow top-1 (the LAG paper's baseline); with k>1 PEFT's
    ``ArrowConfig(top_k, router_temperature)`` soft routing.
    """
    return torch.softmax(top.float() / temperature, dim=-1)


def arrow_select(
    x: torch.Tensor, protos: torch.Tensor, top_k: int = 1, temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow top-k with exact retrieval: candidates [T, k] and their softmax weights [T, k]."""
    top, idx = arrow_topk(x, protos, top_k, valid)
    return idx, arrow_weights(top, temperature).to(x.dtype)


def spectr_select(
    x: torch.Tensor, A: torch.Tensor, top_k: int = 1, valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpectR over all N adapters: top-k of ||A*_i x||.

    x [T, n], A [N, r, n] -> (idx [T, k], proj [T, k, r] = A*_idx x). Dense: costs 2 N r n per token.
    """
    proj = project_all(x, A)  # [T, N, r]
    norms = proj.float().norm(dim=-1)  # [T, N]
    if valid is not None:
        norms.masked_fill_(~valid, -1.0)
    idx = norms.topk(min(top_k, norms.shape[-1]), dim=-1).indices  # [T, k]
    return idx, proj.gather(1, idx[..., None].expand(-1, -1, proj.shape[-1]))


def lag_rerank(
    x: torch.Tensor, A: torch.Tensor, top: torch.Tensor, cand: torch.Tensor,
    valid: torch.Tensor | None = None, strategy: str = "auto", margin: float | None = None,
    padded: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SpectR among Arrow's candidates: the candidate with the largest ||A*_i x|| wins.

    x [T, n], A [N, r, n], Arrow's (top, cand) [T, k] -> (winner [T], proj [T, r] = A*_winner x (reused by
    the caller to apply the adapter), candidates kept per token [T] or None).

    ``padded``: ``cand`` may hold missing candidates (score < 0), as approximate search returns when it finds
    fewer than k; exact retrieval (``padded=False``) never does.
    ``margin`` (dynamic k): keep only candidates whose Arrow score is at least ``margin x`` the token's best
    score, so confident tokens rerank few adapters and ambiguous ones many.
    """
    proj = project_pairs(x, A, cand, strategy)  # [T, k, r]
    norms = proj.float().norm(dim=-1)  # [T, k]
    if padded or valid is not None:  # missing candidates (approximate search: score -1), adapters not here
        invalid = top < 0
        if valid is not None:
            invalid |= ~valid[cand]
        norms.masked_fill_(invalid, -1.0)
    kept = None
    if margin is not None:
        keep = top >= margin * top[:, :1]  # [T, k]; the best candidate is always kept
        norms.masked_fill_(~keep, -2.0)
        kept = keep.sum(dim=-1)  # [T]
    best = norms.argmax(dim=-1, keepdim=True)  # [T, 1]
    winner = cand.gather(1, best).squeeze(1)  # [T]
    return winner, proj.gather(1, best[..., None].expand(-1, -1, proj.shape[-1])).squeeze(1), kept


def lag_select(
    x: torch.Tensor, protos: torch.Tensor, A: torch.Tensor, k: int, valid: torch.Tensor | None = None,
    strategy: str = "auto", margin: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LAG with exact Arrow retrieval: Arrow keeps the top-k, SpectR picks one. k=1 is Arrow top-1; k=N is
    SpectR top-1. See :func:`lag_rerank` for the outputs."""
    top, cand = arrow_topk(x, protos, k, valid)  # [T, k]
    return lag_rerank(x, A, top, cand, valid, strategy, margin, padded=False)
