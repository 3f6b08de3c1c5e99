"""One routed-generation path: ``routed_generate`` runs ``model.generate`` under a router's settings (routing
config, focus mask, optional trace and routing timer) and returns the new tokens with their per-row lengths.

``LAGLLM`` (one prompt, optionally streamed), ``lag eval`` (a left-padded batch, traced per token) and the
knowledge builder's ``HFGenerator`` (batches of prompts, with or without a router) all generate through it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from .config import LAGConfig
    from .router import LAGRouter
    from .trace import RoutingTrace

TraceLevel = Literal["summary", "tokens"]


@dataclass
class Generated:
    """What one ``routed_generate`` call produced."""

    new: torch.Tensor  # [B, T] generated ids (rows that stopped early are padded after their eos)
    lengths: list[int]  # per row: generated tokens up to and including the first eos
    seconds: float  # wall time of ``model.generate``
    prompt_lengths: list[int]  # per row: real (unpadded) prompt tokens
    trace: RoutingTrace | None = None  # the routing of the call (prefill, then one entry per row per step)
    routing_seconds: float | None = None  # time spent inside the routing, when traced
    finish_reason: str | None = None  # one row: "stop" | "length" | "cancelled", when the generator knows


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The token ids that end a generation (the model's generation config, else the tokenizer's eos)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def new_lengths(new: torch.Tensor, eos: set[int]) -> list[int]:
    """Per row of ``new`` [B, T]: the number of tokens up to and including the first eos (T if none)."""
    T = new.shape[1]
    if not eos or T == 0:
        return [T] * new.shape[0]
    is_eos = torch.isin(new, torch.tensor(sorted(eos), dtype=new.dtype))  # [B, T]
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, torch.full((new.shape[0],), T))
    return [int(n) for n in first]


def left_pad(rows: Sequence[torch.Tensor], pad_id: int, focus: Sequence[torch.Tensor | None] | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Left-pad 1-d id rows into (input_ids [B, S], attention_mask [B, S], focus [B, S] bool or None).

    ``focus``: per row an optional [S_i] bool mask of the tokens that carry the request; None when no row
    has one (then sequence-level routing uses every prompt token)."""
    lens = [int(r.shape[0]) for r in rows]
    B, S = len(rows), max(lens)
    ids = torch.full((B, S), pad_id, dtype=torch.long)
    mask = torch.zeros((B, S), dtype=torch.long)
    marks = torch.zeros((B, S), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, S - lens[i]:] = row
        mask[i, S - lens[i]:] = 1
        if focus is not None and focus[i] is not None:
            marks[i, S - lens[i]:] = focus[i]
    return ids, mask, (marks if bool(marks.any()) else None)


def routed_generate(model: torch.nn.Module, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor | None = None, *, router: LAGRouter | None = None,
                    config: LAGConfig | None = None,
                    focus: torch.Tensor | None = None, trace: TraceLevel | None = None,
                    seed: int | None = None, eos: set[int] | None = None, streamer: Any = None,
                    **gen_kw: Any) -> Generated:
    """``model.generate(input_ids [B, S], attention_mask, **gen_kw)`` routed by ``router``.

    ``config``: the routing of this call (None: the router's current one, e.g. set by ``router.using``);
    ``focus`` [B, S] bool: the request's own tokens (sequence-level routing); ``trace``: record the chosen
    adapters, ``"summary"`` (counts only) or ``"tokens"`` (per token, for per-row accounting), and time the
    routing; ``seed``: seeds torch before sampling; ``eos``: the ids that end a row (for ``lengths``)."""
    with contextlib.ExitStack() as stack:
        recorder = timer = None
        if router is not None:
            if config is not None:
                stack.enter_context(router.using(config))
            stack.enter_context(router.focus(focus))
            if trace is not None:
                recorder = stack.enter_context(router.trace(keep_tokens=trace == "tokens"))
                timer = stack.enter_context(router.timing())
        if seed is not None:
            torch.manual_seed(int(seed))
        kwargs = {"attention_mask": attention_mask} if attention_mask is not None else {}
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, streamer=streamer, **kwargs, **gen_kw)
        seconds = time.perf_counter() - start
    new = out[:, input_ids.shape[1]:]
    prompt = (attention_mask.sum(1).tolist() if attention_mask is not None
              else [input_ids.shape[1]] * input_ids.shape[0])
    return Generated(new=new, lengths=new_lengths(new, eos or set()), seconds=seconds,
                     prompt_lengths=[int(n) for n in prompt], trace=recorder,
                     routing_seconds=None if timer is None else timer[0])


# ---- batches of text prompts -----------------------------------------------------------------------------
class HFGenerator:
    """Greedy batched generation with a transformers causal LM (left padding, per-sequence stop string).

    ``router`` / ``config``: generate routed by an attached LAG router with these settings (None: the
    router's current settings, or a model without adapters)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16, *,
                 router: LAGRouter | None = None, config: LAGConfig | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.router = router
        self.config = config

    def __call__(self, prompts: Sequence[str], *, max_new_tokens: int, stop: str | None = None) -> list[str]:
        return [self.tokenizer.decode(row, skip_special_tokens=True)
                for row in self.generate(prompts, max_new_tokens=max_new_tokens, stop=stop)[0]]

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, stop: str | None = None,
                 trace: TraceLevel | None = None) -> tuple[list[torch.Tensor], list[Generated]]:
        """The new token ids per prompt (cut after the first eos), and each batch's :class:`Generated`."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        eos = eos_ids(self.model, tok)
        kwargs: dict[str, Any] = {"stop_strings": [stop], "tokenizer": tok} if stop else {}
        rows: list[torch.Tensor] = []
        batches: list[Generated] = []
        for start in range(0, len(prompts), self.batch_size):
            encs = [torch.tensor(tok(p, add_special_tokens=False)["input_ids"], dtype=torch.long)
                    for p in prompts[start:start + self.batch_size]]
            ids, mask, _ = left_pad(encs, pad)
            out = routed_generate(self.model, ids.to(self.model.device), mask.to(self.model.device),
                                  router=self.router, config=self.config, trace=trace, eos=eos,
                                  max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                  pad_token_id=pad, **kwargs)
            rows.extend(out.new[i, :n].cpu() for i, n in enumerate(out.lengths))
            batches.append(out)
        return rows, batches


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> str:
    """The inference format: the tokenizer's chat template with one user message + generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
    return f"{user}\n"


__all__ = ["Generated", "HFGenerator", "chat_prompt", "eos_ids", "left_pad", "new_lengths", "routed_generate"]
