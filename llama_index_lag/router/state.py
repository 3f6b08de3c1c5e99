"""Per-request routing state: the settings and recorders of one request (:class:`RequestState`, in a context
variable, so threads / asyncio tasks sharing a model never see each other's), and what one generated sequence
keeps between its forwards (:class:`ForwardState`: masks, centres, shortlists, sequence winners)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import LAGConfig
from ..trace import RoutingTrace


@dataclass
class RequestState:
    """Settings and recorders of one request (one thread / task)."""

    config: LAGConfig
    traces: tuple[RoutingTrace, ...] = ()  # every open trace() records (nested traces all see the calls)
    timings: tuple[list[float], ...] = ()  # every open timing() accumulates routing seconds
    fixed_idx: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # k of the decode fast path (LAGRouter._decode_in_place) under these settings: exact lag (k) or Arrow
    # top-1 (1), one adapter per token (its winner recorded by the traces); None: the general path.
    fused_k: int | None = field(init=False, default=None)
    # two-level routing's decode fast path (LAGRouter._decode_shortlist_in_place) applies
    fused_shortlist: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        cfg = self.config
        plain = (not self.fixed_idx and cfg.libraries is None and cfg.granularity == "token"
                 and cfg.dynamic_k is None and cfg.decode_kernel != "torch")
        if plain and cfg.shortlist is not None:
            self.fused_shortlist = cfg.mode in ("arrow", "spectr", "lag")
        elif plain and cfg.calibration == "none" and cfg.mode == "lag":
            self.fused_k = cfg.k
        elif plain and cfg.calibration == "none" and cfg.mode == "arrow" and cfg.arrow_top_k == 1:
            self.fused_k = 1

    def record(self, kind: str, module: str, chosen: torch.Tensor, mask: torch.Tensor | None,
               candidates: torch.Tensor | None = None) -> None:
        for trace in self.traces:
            trace.record(kind, module, chosen, mask, candidates)


@dataclass
class ForwardState:
    """Per generated sequence: attention mask of the current forward and sequence-level choices."""

    mask: torch.Tensor | None = None  # [B, S_total] 1 for real tokens
    focus: torch.Tensor | None = None  # [B, S_prompt] True for the prompt's content tokens (see focus())
    winners: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (kind, module) -> [B]
    scoring: dict[str, torch.Tensor] | None = None  # kind -> [B, N] scores summed over modules (pre-pass)
    # kind (model-wide pre-pass) or (kind, module) -> ([B, M] shortlisted adapters, [B, M] log mass shares)
    shortlists: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    centres: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [B, n] request means (prompt)
    # (kind, module) -> the request-reference calibration of the prompt (routing.calibration.Calibrated of
    # [B, N] affines)
    calibrations: dict[tuple[str, str], Any] = field(default_factory=dict)

    @staticmethod
    def stack(states: list[ForwardState]) -> ForwardState:
        """One state for the rows of several single-sequence requests decoded together (row i = states[i]):
        their sequence-level choices concatenated along the batch. The states must share one routing (the
        same keys); a key some lack is left out (recomputed from the decode tokens, as for a lone request
        that never saw its prompt)."""
        def common(name: str) -> list[Any]:
            keys = [set(getattr(s, name)) for s in states]
            return [k for k in getattr(states[0], name) if all(k in ks for ks in keys)]

        return ForwardState(
            winners={k: torch.cat([s.winners[k] for s in states]) for k in common("winners")},
            shortlists={k: (torch.cat([s.shortlists[k][0] for s in states]),
                            torch.cat([s.shortlists[k][1] for s in states])) for k in common("shortlists")},
            centres={k: torch.cat([s.centres[k] for s in states]) for k in common("centres")},
            calibrations={k: _cat_calibrations([s.calibrations[k] for s in states])
                          for k in common("calibrations")})

    def row(self, i: int) -> ForwardState:
        """The sequence-level choices of row ``i`` alone (the inverse of :meth:`stack`), e.g. of one prompt
        of several prefilled together."""
        pick = slice(i, i + 1)
        return ForwardState(
            winners={k: v[pick] for k, v in self.winners.items()},
            shortlists={k: (v[0][pick], v[1][pick]) for k, v in self.shortlists.items()},
            centres={k: v[pick] for k, v in self.centres.items()},
            calibrations={k: _row_calibration(v, pick) for k, v in self.calibrations.items()})


def _row_calibration(cal: Any, pick: slice) -> Any:
    """One row of a request calibration (each stage's [B, N] affines -> [1, N])."""
    from ..routing.calibration import Affine, Calibrated

    return Calibrated(*(None if a is None else Affine(a.scale[pick], a.shift[pick]) for a in cal))


def _cat_calibrations(parts: list[Any]) -> Any:
    """Request calibrations of single rows -> one of the rows stacked (each stage's [1, N] affines)."""
    from ..routing.calibration import Affine, Calibrated

    def stage(i: int) -> Affine | None:
        if parts[0][i] is None:
            return None
        return Affine(torch.cat([p[i].scale for p in parts]), torch.cat([p[i].shift for p in parts]))

    return Calibrated(stage(0), stage(1))


@dataclass
class RowGroup:
    """The rows of a batch that share one routing (``LAGRouter.rows``), routed together."""

    rows: torch.Tensor  # [G] long: the batch rows of this group
    state: RequestState  # their settings and recorders
    forward: ForwardState  # their sequence-level choices, row by row (ForwardState.stack)
