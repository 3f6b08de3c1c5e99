"""Routing accuracy of ``lag eval``: the gold adapter's share of a question's selections, split per row out of
a batched generation's routing trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


# ---- routing accuracy -----------------------------------------------------------------------------------
def routing_accuracy(counts: Any, gold: int) -> dict[str, Any]:
    """From per-adapter selection counts [N] (token x module): the gold adapter's share, whether it is the
    strictly most selected adapter, its rank (1 = most selected; ties share the better rank)."""
    values = [int(v) for v in counts.tolist()]
    total = sum(values)
    g = values[gold]
    others = max((v for j, v in enumerate(values) if j != gold), default=0)
    return {"gold_share": round(g / total, 6) if total else 0.0, "gold_top": bool(total and g > others),
            "gold_rank": 1 + sum(1 for v in values if v > g), "selections": total,
            "wins": {str(j): v for j, v in enumerate(values) if v}}  # sparse, for the mode's hubness


def split_trace(trace: Any, lens: Sequence[int], n_new: Sequence[int], steps: int
                 ) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """Per-row selection counts out of a batched generate trace.

    A trace records, per module, the prefill call (the real prompt tokens, row-major) then one entry per row
    for each decode step. Row i's own routing is its prompt plus the generated tokens fed back before it
    stopped (``n_new[i] - 1``), exactly what an unbatched generation of it routes. Returns
    (prompt counts, prompt + generated counts) as {kind: [B, N] tensors}, or None if the layout differs.
    """
    import torch

    B, P = len(lens), sum(lens)
    decode = max(steps - 1, 0)
    owner_prompt = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lens)])
    step = torch.arange(decode)[:, None].expand(decode, B)
    row = torch.arange(B)[None, :].expand(decode, B)
    limit = torch.tensor([max(n - 1, 0) for n in n_new])[None, :]
    owner_decode = torch.where(step < limit, row, torch.full_like(row, -1)).reshape(-1)
    prompt_counts, all_counts = {}, {}
    for kind in trace.kinds:
        N = len(trace.names[kind])
        pc = torch.zeros(B, N, dtype=torch.long)
        ac = torch.zeros(B, N, dtype=torch.long)
        for module in trace.modules(kind):
            chosen = trace.tokens(kind, module).long()
            if chosen.numel() != P + decode * B:
                logger.debug("unexpected trace layout at %s (%d entries, expected %d)", module,
                             chosen.numel(), P + decode * B)
                return None
            pc.index_put_((owner_prompt, chosen[:P]), torch.ones(P, dtype=torch.long), accumulate=True)
            dec = chosen[P:]
            keep = owner_decode >= 0
            ac.index_put_((owner_decode[keep], dec[keep]), torch.ones(int(keep.sum()), dtype=torch.long),
                          accumulate=True)
        prompt_counts[kind] = pc
        all_counts[kind] = ac + pc
    return prompt_counts, all_counts


def span_counts(trace: Any, kind: str, lens: Sequence[int], spans: Sequence[tuple[int, int] | None]) -> Any:
    """[B, N] selection counts of ``kind`` over each row's prompt tokens in ``spans[i]`` = [start, end)
    (token positions in row i's unpadded prompt; None: no tokens), summed over modules. Same trace layout
    as :func:`split_trace`."""
    import torch

    B, P, N = len(lens), sum(lens), len(trace.names[kind])
    owner = torch.cat([torch.full((n,), i, dtype=torch.long) for i, n in enumerate(lens)])  # [P]
    pos = torch.cat([torch.arange(n) for n in lens])  # [P] position inside the row
    lo = torch.tensor([s[0] if s else 0 for s in spans])[owner]
    hi = torch.tensor([s[1] if s else 0 for s in spans])[owner]
    inside = (pos >= lo) & (pos < hi)  # [P]
    counts = torch.zeros(B, N, dtype=torch.long)
    for module in trace.modules(kind):
        chosen = trace.tokens(kind, module).long()[:P]
        counts.index_put_((owner[inside], chosen[inside]), torch.ones(int(inside.sum()), dtype=torch.long),
                          accumulate=True)
    return counts
