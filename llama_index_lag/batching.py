"""Continuous (iteration-level) batching: concurrent requests decoded together, one model forward per step,
each row routed with its own settings.

Waiting requests that share one routing are prefilled together, left-padded (:func:`prefill_groups`; the
prompt's forward also makes each row's sequence-level routing choices: request centres, shortlists, sequence
winners), then join the running batch: their KV caches are left-padded to the batch's length and stacked
under the others. Each step runs one forward over every running row (per-row
attention mask and position ids over the shared cache); rows that finish (eos, a stop string,
``max_new_tokens``, cancelled) leave between steps and fully padded cache columns are trimmed. Rows that share
one routing are routed as one group (``LAGRouter.rows``): one routing pass per distinct setting of the batch.
Greedy rows give the tokens they give alone (``routed_generate``).

:class:`BatchEngine` runs the loop in one thread; ``LAGLLM.enable_batching()`` sends its generations through
it (``lag serve`` does), so query / chat engines in any pipeline mode share the batch.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import LAGConfig
from .errors import ConfigError, LAGError, QueueFullError
from .generation import Generated, eos_ids
from .router import LAGRouter
from .router.state import ForwardState, RowGroup
from .tickets import SUPPORTED_GENERATE, Finished, SamplingParams, Ticket, cancel_scope, current_cancel
from .trace import RoutingTrace, RowTrace

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Row:
    ticket: Ticket
    ids: torch.Tensor  # [S] prompt ids
    focus: torch.Tensor | None  # [S] bool: the request's own tokens
    config: LAGConfig | None  # None: no router
    key: str  # rows with the same key share one routing
    params: SamplingParams
    trace: RoutingTrace | None
    submitted: float
    generated: list[int] = field(default_factory=list)
    forward: ForwardState | None = None
    generator: torch.Generator | None = None
    position: int = 0  # real tokens so far (the position id of the next one)
    first_token: float | None = None
    routing: float = 0.0


class BatchEngine:
    """Decode concurrent requests together on one model (see the module docstring).

    ``max_batch``: rows decoded together at most; ``max_queue``: requests waiting at most (more:
    :class:`QueueFullError`); ``on_step(batch_size, queued)`` / ``on_prefill(prompts)`` (prompts prefilled
    in one forward) / ``on_finish(Finished)``: metrics hooks."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        router: LAGRouter | None = None,
        *,
        max_batch: int = 8,
        max_queue: int = 256,
        on_step: Callable[[int, int], None] | None = None,
        on_finish: Callable[[Finished], None] | None = None,
        on_prefill: Callable[[int], None] | None = None,
    ) -> None:
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {max_batch!r}", field="max_batch")
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.max_batch, self.max_queue = max_batch, max_queue
        self.on_step, self.on_finish, self.on_prefill = on_step, on_finish, on_prefill
        self.context_window = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.x: cache
        self._last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._eos = eos_ids(model, tokenizer)
        self._pending: collections.deque[_Row] = collections.deque()
        self._wake = threading.Condition()
        self._ids = itertools.count(1)
        self._rows: list[_Row] = []
        self._cache: Any = None  # the batch's KV cache: [B, H, T, D] per layer, rows left-padded
        self._mask: torch.Tensor | None = None  # [B, T] 1 for real positions
        self._groups: list[RowGroup] = []
        self._group_meta: list[tuple[list[_Row], RowTrace | None, list[float]]] = []
        self._regroup_needed = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="lag-batch-engine", daemon=True)
        self._thread.start()

    # ---- submitting ---------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self._rows)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @staticmethod
    def supports(gen_kw: Mapping[str, Any], trace: str | None = None) -> bool:
        """Whether ``generate(**gen_kw)`` can run in the batch (per-token traces and other generate options
        run alone)."""
        return trace != "tokens" and not set(gen_kw) - SUPPORTED_GENERATE

    def submit(
        self,
        input_ids: torch.Tensor,
        *,
        config: LAGConfig | None = None,
        focus: torch.Tensor | None = None,
        params: SamplingParams | None = None,
        trace: bool = False,
        cancel: threading.Event | None = None,
    ) -> Ticket:
        """Queue one prompt (``input_ids`` [S]); ``config``: its routing (None: the router's current one in
        the calling context, as ``routed_generate``); ``trace``: record its routing (``Finished.trace``)."""
        if self._closed:
            raise LAGError("the batch engine is closed")
        ids = input_ids.reshape(-1).to(torch.long).cpu()
        if ids.numel() == 0:
            raise ConfigError("the prompt has no tokens", field="prompt")
        params = params or SamplingParams(eos=frozenset(self._eos))
        if ids.numel() + params.max_new_tokens > self.context_window:
            raise ConfigError(
                f"prompt of {ids.numel()} tokens + max_new_tokens={params.max_new_tokens} exceeds "
                f"the context window ({self.context_window})",
                field="max_new_tokens",
            )
        routed = self.router is not None
        if routed:
            config = config or self.router.state().config
            self.router.check_config(config)
        key = json.dumps(config.to_dict(), sort_keys=True, default=str) if config is not None else ""
        ticket = Ticket(next(self._ids), cancel if cancel is not None else current_cancel())
        row = _Row(
            ticket,
            ids,
            None if focus is None else focus.reshape(-1).bool().cpu(),
            config if routed else None,
            key,
            params,
            RoutingTrace({k: p.names for k, p in self.router.pools.items()}, keep_tokens=False)
            if routed and trace
            else None,
            time.perf_counter(),
        )
        if params.temperature > 0:
            row.generator = torch.Generator()
            row.generator.manual_seed(params.seed if params.seed is not None else int(torch.seed()))
        with self._wake:
            if len(self._pending) >= self.max_queue:
                raise QueueFullError(
                    f"{len(self._pending)} requests are waiting (max_queue={self.max_queue})"
                )
            self._pending.append(row)
            self._wake.notify()
        return ticket

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        config: LAGConfig | None = None,
        focus: torch.Tensor | None = None,
        trace: str | None = None,
        seed: int | None = None,
        eos: set[int] | None = None,
        streamer: Any = None,
        **gen_kw: Any,
    ) -> Generated:
        """``routed_generate`` for one prompt ([1, S]), run in the batch; blocks until it ends. ``streamer``
        gets the tokens as they come (transformers' streamer protocol)."""
        if input_ids.shape[0] != 1:
            raise ConfigError("the batch engine takes one prompt per call", field="input_ids")
        params = SamplingParams.from_generate_kwargs(gen_kw, eos if eos is not None else self._eos, seed)
        if params is None or not self.supports(gen_kw, trace):
            raise ConfigError(
                f"generate options the batch engine lacks: {sorted(set(gen_kw) - SUPPORTED_GENERATE)}",
                field="generate_kwargs",
            )
        keep = (
            attention_mask[0].bool()
            if attention_mask is not None
            else torch.ones(input_ids.shape[1], dtype=torch.bool)
        )
        ids = input_ids[0][keep]
        ticket = self.submit(
            ids,
            config=config,
            focus=None if focus is None else focus[0][keep],
            params=params,
            trace=trace is not None,
        )
        if streamer is not None:
            streamer.put(ids[None])  # the prompt (streamers skip it)
        try:
            for token in ticket.tokens():
                if streamer is not None:
                    streamer.put(torch.tensor([token]))
        finally:
            if streamer is not None:
                streamer.end()
        done = ticket.result()
        new = torch.tensor([done.tokens], dtype=torch.long).reshape(1, -1)
        return Generated(
            new=new,
            lengths=[len(done.tokens)],
            seconds=done.seconds,
            prompt_lengths=[len(ids)],
            trace=done.trace,
            routing_seconds=done.routing_seconds if trace is not None else None,
            finish_reason=done.finish_reason,
        )

    def close(self, timeout: float | None = 10.0) -> None:
        """Stop the loop; waiting and running requests end as cancelled."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join(timeout)

    # ---- the loop -----------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._wake:
                while not self._closed and not self._pending and not self._rows:
                    self._wake.wait()
                if self._closed:
                    break
            try:
                self._admit()
                if self._rows:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails its rows, the engine goes on
                logger.exception("batched decode step failed")
                self._fail_all(exc)
        for row in [*self._rows, *self._pending]:
            row.ticket._end(self._finished(row, "cancelled"))
        self._rows, self._cache, self._mask = [], None, None

    def _admit(self) -> None:
        """Prefill the waiting requests the batch has room for and let them join it: prompts that share one
        routing are prefilled together (:func:`prefill_groups`); a group whose forward fails is retried row by
        row, so that only the request at fault fails."""
        with self._wake:
            take = min(self.max_batch - len(self._rows), len(self._pending))
            rows = [self._pending.popleft() for _ in range(take)]
        live = []
        for row in rows:
            if row.ticket.cancelled:
                row.ticket._end(self._finished(row, "cancelled"))
            else:
                live.append(row)
        for group in prefill_groups(live):
            if not self._try_start(group):  # the group's forward failed: its rows one by one
                for row in group:
                    self._try_start([row])

    def _try_start(self, group: list[_Row]) -> bool:
        """Prefill ``group`` and start its rows; False (nothing started) when a group of several failed, a
        lone request that fails ends with its error."""
        try:
            logits, cache, mask = self._prefill(group)
            tokens = self._sample(group, logits)
        except Exception as exc:  # noqa: BLE001 - this request fails, the batch goes on
            if len(group) > 1:
                return False
            logger.warning("request %d failed in its prompt's forward: %s", group[0].ticket.id, exc)
            group[0].ticket._end(error=exc)
            return True
        self._start(group, tokens, cache, mask)
        return True

    def _start(self, group: list[_Row], tokens: list[int], cache: Any, mask: torch.Tensor) -> None:
        """Emit the first tokens of a prefilled group and stack the rows that go on under the batch."""
        if self.on_prefill is not None:
            self.on_prefill(len(group))
        going = []
        for i, (row, token) in enumerate(zip(group, tokens)):
            row.position = int(row.ids.numel())
            if not self._emit(row, token):
                going.append(i)
        if going:
            self._join([group[i] for i in going], cache, mask, torch.tensor(going, dtype=torch.long))

    def _prefill(self, group: list[_Row]) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """The prompts' forward (rows of one routing, left-padded): their last logits [G, V], KV cache,
        attention mask [G, S]; each row's routing state lands in ``row.forward``."""
        S = max(int(r.ids.numel()) for r in group)
        device = self.model.device
        ids = torch.stack([_pad_left(r.ids, S - r.ids.numel()) for r in group]).to(device)  # [G, S]
        mask = torch.stack(
            [_pad_left(torch.ones(r.ids.numel(), dtype=torch.long), S - r.ids.numel()) for r in group]
        )  # [G, S]
        positions = (mask.cumsum(-1) - 1).clamp_min(0).to(device)  # [G, S] each row from 0

        def forward() -> Any:
            return self.model(
                input_ids=ids,
                attention_mask=mask.to(device),
                position_ids=positions,
                use_cache=True,
                **self._last_only,
            )

        if self.router is None:
            out = forward()
        else:
            head = group[0]
            traced = [r for r in group if r.trace is not None]
            names = {k: p.names for k, p in self.router.pools.items()}
            recorder = RowTrace(names, len(group)) if traced else None
            timer = [0.0]
            state = self.router.request_state(
                head.config, (recorder,) if recorder else (), (timer,) if traced else ()
            )
            focus = None
            if any(r.focus is not None for r in group):  # rows without one: every token counts
                each = [torch.ones_like(r.ids, dtype=torch.bool) if r.focus is None else r.focus
                        for r in group]
                focus = torch.stack([_pad_left(f, S - f.numel()) for f in each])  # [G, S]
            out, forward_state = self.router.run_request(state, focus, forward)
            if recorder is not None:
                recorder.flush([r.trace for r in group])
            for i, row in enumerate(group):
                row.forward = forward_state.row(i) if forward_state is not None else None
                row.routing += timer[0] / len(group)
        cache = _cache_of(out)
        if not hasattr(cache, "layers"):
            raise ConfigError(
                f"{type(cache).__name__}: the batch engine needs transformers' DynamicCache",
                field="past_key_values",
            )
        return out.logits[:, -1].float(), cache, mask

    def _join(self, rows: list[_Row], cache: Any, mask: torch.Tensor, index: torch.Tensor) -> None:
        """Stack rows ``index`` of a prefilled group (its KV cache, its mask [G, S]) under the batch's, both
        left-padded to the longer one."""
        mask = mask[index]
        first = int(torch.nonzero(mask.sum(0))[0])  # columns that are padding in every joining row go
        mask = mask[:, first:]
        keys = [layer.keys[index.to(layer.keys.device), :, first:] for layer in cache.layers]
        values = [layer.values[index.to(layer.values.device), :, first:] for layer in cache.layers]
        length = mask.shape[1]
        if self._cache is None:
            for layer, k, v in zip(cache.layers, keys, values):
                layer.keys, layer.values = k, v
            self._cache, self._mask = cache, mask
        else:
            T = self._mask.shape[1]
            width = max(T, length)
            for mine, k, v in zip(self._cache.layers, keys, values):
                mine.keys = torch.cat([_pad_left(mine.keys, width - T), _pad_left(k, width - length)])
                mine.values = torch.cat([_pad_left(mine.values, width - T), _pad_left(v, width - length)])
            self._mask = torch.cat(
                [
                    torch.nn.functional.pad(self._mask, (width - T, 0)),
                    torch.nn.functional.pad(mask, (width - length, 0)),
                ]
            )
        self._rows.extend(rows)
        self._regroup_needed = True

    def _step(self) -> None:
        """One forward over every running row, one token each."""
        cancelled = [r for r in self._rows if r.ticket.cancelled]
        if cancelled:
            self._flush_groups()
            for row in cancelled:
                row.ticket._end(self._finished(row, "cancelled"))
            self._leave([r for r in self._rows if r not in cancelled])
        if not self._rows:
            return
        if self._regroup_needed:
            self._regroup()
        B = len(self._rows)
        if self.on_step is not None:
            self.on_step(B, len(self._pending))
        device = self.model.device
        ids = torch.tensor([[r.generated[-1]] for r in self._rows], device=device)  # [B, 1]
        positions = torch.tensor([[r.position] for r in self._rows], device=device)  # [B, 1]
        self._mask = torch.nn.functional.pad(self._mask, (0, 1), value=1)  # [B, T + 1]
        routed = self.router.rows(self._groups) if self.router is not None else contextlib.nullcontext()
        with routed:
            out = self.model(
                input_ids=ids,
                attention_mask=self._mask.to(device),
                position_ids=positions,
                use_cache=True,
                **{self._cache_arg: self._cache},
            )
        self._cache = _cache_of(out)
        tokens = self._sample(self._rows, out.logits[:, -1].float())
        ended = []
        for row, token in zip(self._rows, tokens):
            row.position += 1
            if self._emit(row, token, flush_first=True):
                ended.append(row)
        if ended:
            self._leave([r for r in self._rows if r not in ended])

    def _leave(self, keep: list[_Row]) -> None:
        """Keep only ``keep`` in the batch (cache rows selected, fully padded columns trimmed)."""
        if len(keep) == len(self._rows):
            return
        self._flush_groups()
        index = torch.tensor([self._rows.index(r) for r in keep], dtype=torch.long)
        self._rows = keep
        self._regroup_needed = True
        if not keep:
            self._cache, self._mask = None, None
            return
        self._mask = self._mask[index]
        first = int(torch.nonzero(self._mask.sum(0))[0])
        self._mask = self._mask[:, first:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index.to(layer.keys.device), :, first:]
            layer.values = layer.values[index.to(layer.values.device), :, first:]

    def _regroup(self) -> None:
        """One routing group per distinct routing among the running rows (rows with none: no group)."""
        self._flush_groups()
        by_key: dict[str, list[int]] = collections.defaultdict(list)
        for i, row in enumerate(self._rows):
            if row.config is not None and row.config.mode != "none":
                by_key[row.key].append(i)
        self._groups, self._group_meta = [], []
        names = {k: p.names for k, p in self.router.pools.items()} if self.router is not None else {}
        for index in by_key.values():
            members = [self._rows[i] for i in index]
            traced = any(m.trace is not None for m in members)
            recorder = RowTrace(names, len(members)) if traced else None
            timer = [0.0]
            state = self.router.request_state(
                members[0].config, (recorder,) if recorder else (), (timer,) if traced else ()
            )
            forward = ForwardState.stack([m.forward or ForwardState() for m in members])
            self._groups.append(RowGroup(torch.tensor(index, dtype=torch.long), state, forward))
            self._group_meta.append((members, recorder, timer))
        self._regroup_needed = False

    def _flush_groups(self) -> None:
        """Hand the groups' recorded counts and routing time to their rows."""
        for members, recorder, timer in self._group_meta:
            if recorder is not None:
                recorder.flush([m.trace for m in members])
            for m in members:
                m.routing += timer[0] / len(members)
            timer[0] = 0.0

    # ---- tokens -------------------------------------------------------------------------------
    @staticmethod
    def _sample(rows: list[_Row], logits: torch.Tensor) -> list[int]:
        """One token per row from logits [B, V]: argmax for greedy rows, each sampled row with its own
        generator (temperature, top-k, top-p)."""
        tokens = logits.argmax(dim=-1)  # [B]
        for i, row in enumerate(rows):
            p = row.params
            if p.temperature <= 0:
                continue
            scores = logits[i] / p.temperature
            if p.top_k:
                kth = scores.topk(min(int(p.top_k), scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                ordered, order = scores.sort(descending=True)
                cumulative = ordered.softmax(-1).cumsum(-1)
                drop = cumulative - ordered.softmax(-1) >= p.top_p  # keep the smallest set reaching top_p
                scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
            tokens[i] = torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0]
        return tokens.tolist()

    def _emit(self, row: _Row, token: int, flush_first: bool = False) -> bool:
        """Hand ``token`` to the row's ticket; True (and the row ended) when it finished the request."""
        row.generated.append(int(token))
        if row.first_token is None:
            row.first_token = time.perf_counter()
        row.ticket._tokens.put(int(token))
        p = row.params
        reason = None
        if token in p.eos or self._hit_stop(row):
            reason = "stop"
        elif len(row.generated) >= p.max_new_tokens or row.position + 1 >= self.context_window:
            reason = "length"
        if reason is None:
            return False
        if flush_first:
            self._flush_groups()
        row.ticket._end(self._finished(row, reason))
        return True

    def _hit_stop(self, row: _Row) -> bool:
        stops = row.params.stop
        if not stops:
            return False
        tail = self.tokenizer.decode(row.generated[-(max(map(len, stops)) + 4) :], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _finished(self, row: _Row, reason: str) -> Finished:
        done = Finished(
            tokens=list(row.generated),
            finish_reason=reason,
            prompt_tokens=int(row.ids.numel()),
            seconds=time.perf_counter() - row.submitted,
            first_token_seconds=None if row.first_token is None else row.first_token - row.submitted,
            trace=row.trace,
            routing_seconds=row.routing,
        )
        if self.on_finish is not None:
            try:
                self.on_finish(done)
            except Exception:  # noqa: BLE001 - metrics never fail a request
                logger.exception("on_finish hook failed")
        return done

    def _fail_all(self, exc: BaseException) -> None:
        for row in self._rows:
            if not row.ticket.done():
                row.ticket._end(error=exc)
        self._rows, self._cache, self._mask = [], None, None
        self._groups, self._group_meta = [], []


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _pad_left(t: torch.Tensor, n: int) -> torch.Tensor:
    """n zeros before the sequence axis: [S] -> [n + S]; [B, H, T, D] -> [B, H, n + T, D]."""
    if not n:
        return t
    return torch.nn.functional.pad(t, (n, 0) if t.dim() == 1 else (0, 0, n, 0))


def prefill_groups(rows: list[Any], waste: float = 1.5) -> list[list[Any]]:
    """Split waiting requests into prompts prefilled together: the same routing (``row.key``), and no more
    than ``waste`` x their real tokens once left-padded to the longest (short prompts group freely:
    their forward costs what one token's does). Within a routing, shortest prompts first; routings in order
    of arrival."""
    groups: list[list[Any]] = []
    for key in dict.fromkeys(r.key for r in rows):
        group: list[Any] = []
        for row in sorted((r for r in rows if r.key == key), key=lambda r: r.ids.numel()):
            grown = [*group, row]
            padded = len(grown) * max(int(r.ids.numel()) for r in grown)
            if group and padded > max(waste * sum(int(r.ids.numel()) for r in grown), SHORT_PROMPT):
                groups.append(group)
                grown = [row]
            group = grown
        groups.append(group)
    return groups


#: a padded prefill of at most this many tokens is grouped whatever its padding
SHORT_PROMPT = 256


__all__ = ["BatchEngine", "Finished", "QueueFullError", "SamplingParams", "Ticket", "cancel_scope"]
