"""Routing scores and selections: pure tensor functions (no modules, no I/O).

Shapes: T tokens (batch x sequence flattened), N adapters, n in-features, m out-features, r rank, k candidates.
"""

from __future__ import annotations

import torch

from .dispatch import project_all, project_pairs


def arrow_scores(x: torch.Tensor, protos: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Arrow: |a*_i . x| for every adapter (sign-free: singular vectors have no sign).

    x [T, n], protos [N, n], valid [N] bool or None -> [T, N]; invalid adapters score -1 (never chosen
    before a valid one, since valid scores are >= 0).
    """
    scores = (x @ protos.T).abs_()  # [T, N]
    if valid is not None:
        scores.masked_fill_(~valid, -1.0)
    return scores


def arrow_select(
    x: torch.Tensor, protos: torch.Tensor, top_k: int = 1, temperature: float = 1.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Arrow top-k: candidates [T, k] and softmax(score / temperature) weights [T, k] over the kept ones.

    With top_k=1 the weight is 1: hard Arrow top-1 (the LAG paper's baseline). With top_k>1 it is PEFT's
    ``ArrowConfig(top_k, router_temperature)`` soft routing.
    """
    scores = arrow_scores(x, protos, valid)  # [T, N]
    top, idx = scores.topk(min(top_k, scores.shape[-1]), dim=-1)  # [T, k]
    return idx, torch.softmax(top.float() / temperature, dim=-1).to(x.dtype)


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


def lag_select(
    x: torch.Tensor, protos: torch.Tensor, A: torch.Tensor, k: int, valid: torch.Tensor | None = None,
    strategy: str = "auto", margin: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LAG: Arrow keeps the top-k adapters, SpectR picks the one with the largest ||A*_i x|| among them.

    x [T, n], protos [N, n], A [N, r, n] -> (winner [T], proj [T, r] = A*_winner x (reused by the caller to
    apply the adapter), candidates per token [T] or None). k=1 is Arrow top-1; k=N is SpectR top-1.

    ``margin`` (dynamic k): of the top-k, keep only candidates whose Arrow score is at least
    ``margin x`` the token's best score, so confident tokens rerank few adapters and ambiguous ones many.
    """
    scores = arrow_scores(x, protos, valid)  # [T, N]
    top, cand = scores.topk(min(k, scores.shape[-1]), dim=-1)  # [T, k] (sorted)
    proj = project_pairs(x, A, cand, strategy)  # [T, k, r]
    norms = proj.float().norm(dim=-1)  # [T, k]
    if valid is not None:
        norms.masked_fill_(~valid[cand], -1.0)
    kept = None
    if margin is not None:
        keep = top >= margin * top[:, :1]  # [T, k]; the best candidate is always kept
        norms.masked_fill_(~keep, -2.0)
        kept = keep.sum(dim=-1)  # [T]
    best = norms.argmax(dim=-1, keepdim=True)  # [T, 1]
    winner = cand.gather(1, best).squeeze(1)  # [T]
    return winner, proj.gather(1, best[..., None].expand(-1, -1, proj.shape[-1])).squeeze(1), kept
