"""Sequence-level and two-level routing: the adapter-free pre-pass over a prompt that scores every module,
one adapter per sequence, and the per-sequence shortlist each token then chooses from (with its fused decode
step). A mixin of :class:`~llama_index_lag.router.surgery.LAGRouter`: it reads the router's context variables
and pools."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..config import LAGConfig
from ..routing.engine import (
    PoolTensors,
    Routed,
    add_shortlist_fused,
    decode_rows,
    in_place_ok,
    request_centre,
    route_shortlist,
    sequence_scores,
)
from .pool import route_spec
from .state import ForwardState, RequestState

if TYPE_CHECKING:  # pragma: no cover
    from .surgery import LAGLinear


class SequenceRouting:
    """The sequence-level half of :class:`~llama_index_lag.router.surgery.LAGRouter`."""

    _forward: Any
    _forward_signature: Any
    _focus: Any
    _state: Any
    model: Any
    pools: Any

    @torch.no_grad()
    def _choose_for_sequences(self, fwd: ForwardState, kwargs: dict) -> None:
        """Sequence-level routing over the whole model: one extra, adapter-free forward over the prompt sums
        every module's scores per sequence; the best adapter of each library then serves every module."""
        inputs = {k: kwargs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
                  if kwargs.get(k) is not None}
        fwd.scoring = {}
        current = self.state()
        # untraced
        token = self._state.set(RequestState(current.config, (), current.timings, current.fixed_idx))
        if "logits_to_keep" in self._forward_signature.parameters:  # the scores are all it needs
            inputs["logits_to_keep"] = 1
        try:
            self.model(**inputs, use_cache=False)
            scores = fwd.scoring
        finally:
            fwd.scoring = None
            self._state.reset(token)
        shortlist = current.config.shortlist
        for kind, totals in scores.items():
            if shortlist is not None:  # two-level: M candidates per sequence and their log mass shares
                fwd.shortlists[kind] = _shortlist(totals, shortlist)
                continue
            best = totals.argmax(dim=-1)  # [B]
            for module in self.pools[kind].modules:
                fwd.winners[(kind, module)] = best

    def _token_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B, S] bool mask of the current tokens (False = padding), if known."""
        fwd = self._forward.get(None)
        if fwd is None or fwd.mask is None or x.dim() != 3 or fwd.mask.shape[0] != x.shape[0]:
            return None
        if fwd.mask.shape[1] < x.shape[1]:
            return None
        return fwd.mask[:, -x.shape[1]:].bool()

    def _focus_mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """[B, S] content-token mask of a prompt (prefill) forward, if a focus was given for it."""
        fwd = self._forward.get(None)
        focus = fwd.focus if fwd is not None else None
        if focus is None or x.dim() != 3 or tuple(focus.shape) != tuple(x.shape[:2]):
            return None
        focus, mask = focus.to(x.device), self._token_mask(x)
        return focus if mask is None else focus & mask

    def _decode_shortlist_in_place(self, layer: LAGLinear, x: torch.Tensor, out: torch.Tensor,
                                   cfg: LAGConfig) -> tuple[str, torch.Tensor] | None:
        """Two-level decode fast path: one token per row of requests whose prompts chose their shortlists
        (and centres), one library kind at this module, the in-place kernels apply
        (:func:`.engine.in_place_ok`). Adds what :meth:`_route_shortlist` would into ``out`` in place and
        returns (kind, winners [R]); None: nothing done."""
        fwd = self._forward.get(None)
        if fwd is None or len(layer.pools) != 1:
            return None
        ((kind, t),) = layer.pools.items()
        module = layer.module_name
        lists = fwd.shortlists.get(kind) or fwd.shortlists.get((kind, module))
        centre = fwd.centres.get(module) if cfg.calibration == "request" else None
        rows = decode_rows(x)
        if (lists is None or rows is None or lists[0].shape[0] != rows
                or (cfg.calibration == "request" and (centre is None or centre.shape[0] != rows))
                or not in_place_ok(x, out, t)):
            return None
        return kind, add_shortlist_fused(x, t, lists[0], lists[1], cfg.shortlist_weight, centre, out)

    def _current_forward(self) -> ForwardState:
        """This request's forward state (a fresh one for module calls outside ``model(...)``)."""
        fwd = self._forward.get(None)
        if fwd is None:
            fwd = ForwardState()
            self._forward.set(fwd)
        return fwd

    def _sequence_totals(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor, flat: torch.Tensor,
                         cfg: LAGConfig) -> torch.Tensor:
        """[B, N] this module's scores per sequence, over the focus tokens (else every real token)."""
        real = self._token_mask(x)
        real = real if real is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        focus = self._focus_mask(x)  # [B, S] or None
        # a row without focus tokens: every real token counts
        mask = real if focus is None else torch.where(focus.any(dim=1, keepdim=True), focus, real)
        centre = request_centre(x, real) if cfg.calibration == "request" else None
        return sequence_scores(flat.view(*x.shape[:2], -1), mask, t, route_spec(cfg, t), cfg.sequence_score,
                               centre=centre)

    def _centred(self, module: str, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """[T, n] the tokens minus their request's mean at this module: the mean of the prompt's real tokens,
        taken in the prompt's forward and kept for the tokens generated after it."""
        fwd = self._current_forward()
        x3 = x if x.dim() == 3 else flat[None]
        centre = fwd.centres.get(module)
        if centre is None or centre.shape[0] != x3.shape[0]:
            centre = request_centre(x3, self._token_mask(x3))  # [B, n]
            fwd.centres[module] = centre
        return (x3.float() - centre[:, None]).reshape(flat.shape)

    def _route_shortlist(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor, flat: torch.Tensor,
                         cfg: LAGConfig) -> Routed:
        """Two-level routing: each token picks among its sequence's shortlist (chosen by the pre-pass over the
        prompt; without one, from this module's own scores of the current tokens)."""
        fwd = self._current_forward()
        lists = fwd.shortlists.get(kind) or fwd.shortlists.get((kind, module))
        if lists is None or lists[0].shape[0] != x.shape[0]:  # this module's own, kept for the decode steps
            lists = _shortlist(self._sequence_totals(module, kind, t, x, flat, cfg), cfg.shortlist or 1)
            fwd.shortlists[(kind, module)] = lists
        per_token = x.shape[1] if x.dim() == 3 else 1
        idx, prior = (v.repeat_interleave(per_token, dim=0) for v in lists)  # [T, M] per token's row
        centre = None
        if cfg.calibration == "request":
            self._centred(module, x, flat)  # computed on the prompt, kept for the tokens after it
            centre = fwd.centres[module].repeat_interleave(per_token, dim=0)  # [T, n]
        return route_shortlist(flat, t, idx, prior, cfg.shortlist_weight, centre=centre,
                               strategy=cfg.dispatch, kernel=cfg.decode_kernel)

    def _route_sequence(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor, flat: torch.Tensor,
                        state: RequestState) -> torch.Tensor:
        """One adapter per sequence, chosen on the prompt and kept for the generated tokens."""
        cfg = state.config
        fwd = self._current_forward()
        key = (kind, module)
        winners = fwd.winners.get(key)
        mask = self._token_mask(x)
        if winners is None or winners.shape[0] != x.shape[0]:
            winners = self._sequence_totals(module, kind, t, x, flat, cfg).argmax(dim=-1)  # [B]
            fwd.winners[key] = winners
        chosen = winners.repeat_interleave(x.shape[1])  # [T]
        xs = flat.view(*x.shape[:2], -1)  # [B, S, n]
        proj = xs @ t.A[winners].to(xs.dtype).transpose(1, 2)  # [B, S, r]
        delta = (proj @ t.B[winners].to(xs.dtype).transpose(1, 2)).reshape(flat.shape[0], -1)  # [T, m]
        if state.traces:
            state.record(kind, module, chosen, mask)
        return delta


def _shortlist(totals: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-m adapters [B, m] of score masses totals [B, N] (m clamped to N) and their log shares."""
    top = totals.topk(min(m, totals.shape[-1]), dim=-1)
    share = top.values / totals.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    return top.indices, share.clamp_min(1e-30).log()
