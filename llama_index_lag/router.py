"""Model surgery: wrap the Linear modules that attached libraries adapt, route on every forward.

``attach_lag(model, libraries, LAGConfig(...))`` replaces each adapted module by a :class:`LAGLinear`
holding a reference to the original (no weight copy); ``router.detach()`` puts the originals back.

Per-request settings travel in a ``ContextVar`` (``router.using(...)``, ``router.trace()``), so one model
shared by threads or asyncio tasks routes each request as it would alone. ``router.set(...)`` changes the
defaults for requests that do not override them.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LAGConfig
from .errors import ConfigError, IncompatibleLibraryError, LibraryError
from .library.base import BaseModelSpec, fingerprint_diff, linear_shape
from .library.store import AdapterLibrary
from .routing import kernels
from .routing.engine import (
    PoolTensors,
    Routed,
    add_fused,
    add_shortlist_fused,
    apply_fixed,
    request_centre,
    route_shortlist,
    route_tokens,
    sequence_scores,
)
from .trace import RoutingTrace

_ids = itertools.count()
logger = logging.getLogger(__name__)
APPROXIMATE = {"exact": False, "faiss": True, "auto": None}  # arrow_backend -> route_tokens(approximate=...)


def _effort(cfg: LAGConfig, t: PoolTensors) -> int | None:
    """The configured search breadth for ``t``'s approximate index (HNSW efSearch / IVF nprobe)."""
    if t.index is None:
        return None
    return cfg.ef_search if t.index.kind == "hnsw" else cfg.nprobe


@dataclass
class RequestState:
    """Settings and recorders of one request (one thread / task)."""

    config: LAGConfig
    traces: tuple[RoutingTrace, ...] = ()  # every open trace() records (nested traces all see the calls)
    timings: tuple[list[float], ...] = ()  # every open timing() accumulates routing seconds
    fixed_idx: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # k of the decode fast path (LAGRouter._decode_in_place) under these settings: exact lag (k) or Arrow
    # top-1 (1), one adapter per token, nothing to record; None: the general path.
    fused_k: int | None = field(init=False, default=None)
    # two-level routing's decode fast path (LAGRouter._decode_shortlist_in_place) applies
    fused_shortlist: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        cfg = self.config
        plain = (not self.traces and not self.timings and not self.fixed_idx and cfg.libraries is None
                 and cfg.granularity == "token" and cfg.dynamic_k is None and cfg.decode_kernel != "torch")
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
class _ForwardState:
    """Per generated sequence: attention mask of the current forward and sequence-level choices."""

    mask: torch.Tensor | None = None  # [B, S_total] 1 for real tokens
    focus: torch.Tensor | None = None  # [B, S_prompt] True for the prompt's content tokens (see focus())
    winners: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)  # (kind, module) -> [B]
    scoring: dict[str, torch.Tensor] | None = None  # kind -> [B, N] scores summed over modules (pre-pass)
    # kind (model-wide pre-pass) or (kind, module) -> ([B, M] shortlisted adapters, [B, M] log mass shares)
    shortlists: dict[Any, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    centres: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> [B, n] request means (prompt)


class Pool:
    """All attached libraries of one kind, routed as one set of adapters."""

    def __init__(self, kind: str, libraries: list[AdapterLibrary], backend: str = "auto") -> None:
        self.kind = kind
        self.libraries = libraries
        self.indexed = False  # approximate Arrow index in use (single-library pools with a current index)
        if len(libraries) == 1 and backend != "exact":
            lib = libraries[0]
            if lib.has_arrow_index():
                self.indexed = True
            elif backend == "faiss":
                lib.arrow_indexes()  # raises LibraryFormatError: missing or stale index
            elif lib.arrow_meta_exists():
                logger.warning("%s: approximate Arrow index is stale; using exact Arrow (rebuild it with "
                               "AdapterLibrary.build_arrow_index())", lib.path)
        elif backend == "faiss":
            raise IncompatibleLibraryError("arrow_backend='faiss' needs exactly one library per kind "
                                           f"({kind} has {len(libraries)})", path=libraries[0].path)
        self.names = [name for lib in libraries for name in lib.names]
        self.index = {name: i for i, name in enumerate(self.names)}
        if len(self.index) != len(self.names):
            dup = next(n for n in self.names if self.names.count(n) > 1)
            holders = [lib for lib in libraries if dup in lib.names]
            where = (f"appears in two {kind} libraries ({holders[0].path} and {holders[1].path})"
                     if len(holders) > 1 else f"appears twice in the {kind} library {holders[0].path}")
            raise IncompatibleLibraryError(f"adapter name {dup!r} {where}", adapter=dup, path=holders[0].path)
        self.modules = list(dict.fromkeys(m for lib in libraries for m in lib.modules))

    def tensors(self, module: str, device: torch.device | None = None) -> PoolTensors:
        """A*/B* stay memory-mapped (one library); prototypes are copied into RAM. For a module on an
        accelerator (``device``), everything is copied to it (the FAISS index stays on the CPU)."""
        parts = []
        for lib in self.libraries:
            if module in lib.modules:
                t = lib.tensors(module)
                present = lib.present(module)
                parts.append((t.proto, t.A, t.B, torch.ones(len(lib), dtype=torch.bool) if present is None
                              else present))
            else:  # a library of this kind that does not adapt the module: zero rows, never valid
                m, n = next(lb.module_shape(module) for lb in self.libraries if module in lb.modules)
                N, r = len(lib), lib.r_max
                parts.append((torch.zeros(N, n), torch.zeros(N, r, n), torch.zeros(N, m, r),
                              torch.zeros(N, dtype=torch.bool)))
        index = None
        if len(parts) == 1:
            proto, A, B, valid = parts[0]
            if self.indexed:  # the index serves Arrow: prototypes stay memory-mapped, not resident
                index = self.libraries[0].arrow_search(module)
            else:
                proto = proto.clone()
        else:
            r = max(p[1].shape[1] for p in parts)
            dtype = parts[0][1].dtype
            proto = torch.cat([p[0].to(dtype) for p in parts])
            A = torch.cat([nn.functional.pad(p[1].to(dtype), (0, 0, 0, r - p[1].shape[1])) for p in parts])
            B = torch.cat([nn.functional.pad(p[2].to(dtype), (0, r - p[2].shape[2])) for p in parts])
            valid = torch.cat([p[3] for p in parts])
        valid = None if bool(valid.all()) else valid
        if device is not None and device.type != "cpu":
            proto, A, B = proto.to(device), A.to(device), B.to(device)
            valid = valid.to(device) if valid is not None else None
        return PoolTensors(proto, A, B, valid, index)


class LAGLinear(nn.Module):
    """A Linear-like module plus the routed adapters of every attached library that adapts it."""

    def __init__(self, base_layer: nn.Module, name: str, router: LAGRouter,
                 pools: dict[str, PoolTensors]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.module_name = name
        self.pools = pools
        object.__setattr__(self, "_router", router)  # not a submodule

    def extra_repr(self) -> str:
        return ", ".join(f"{kind}: {t.n_adapters} adapters" for kind, t in self.pools.items())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        router: LAGRouter = self._router
        state = router.state()
        cfg = state.config
        if cfg.mode == "none":
            return out
        if state.fused_k is not None and router._decode_in_place(self, x, out, state.fused_k, cfg):
            return out
        if state.fused_shortlist and router._decode_shortlist_in_place(self, x, out, cfg):
            return out
        start = time.perf_counter() if state.timings else 0.0
        delta = None
        for kind, tensors in self.pools.items():
            d = router._route(self.module_name, kind, tensors, x, state)
            if d is not None:
                delta = d if delta is None else delta + d
        if delta is not None:
            out = out + delta.view(*out.shape[:-1], -1).to(out.dtype)
        if state.timings:
            elapsed = time.perf_counter() - start
            for timer in state.timings:
                timer[0] += elapsed
        return out


class LAGRouter:
    """Handle returned by :func:`attach_lag`: switch modes, trace, detach."""

    def __init__(self, model: nn.Module, libraries: list[AdapterLibrary], config: LAGConfig) -> None:
        self.model = model
        self._config = config
        self._state: contextvars.ContextVar[RequestState] = contextvars.ContextVar(f"lag_state_{next(_ids)}")
        self._forward: contextvars.ContextVar[_ForwardState] = contextvars.ContextVar(f"lag_fwd_{next(_ids)}")
        self._focus: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
            f"lag_focus_{next(_ids)}", default=None)
        self._default = RequestState(config)
        kinds = sorted({lib.kind for lib in libraries})
        self.pools = {kind: Pool(kind, [lib for lib in libraries if lib.kind == kind], config.arrow_backend)
                      for kind in kinds}
        self._originals: dict[str, nn.Module] = {}
        self._hooks: list[Any] = []
        self._attached = False
        self._default.fixed_idx = self._resolve_fixed(config)

    # ---- attach / detach ------------------------------------------------------------------------
    def _attach(self) -> None:
        modules = list(dict.fromkeys(m for pool in self.pools.values() for m in pool.modules))
        wrapped: dict[str, LAGLinear] = {}
        for name in modules:
            original = self.model.get_submodule(name)
            if isinstance(original, LAGLinear):
                raise IncompatibleLibraryError("module is already routed by another LAG router; detach it "
                                               "first", module=name)
            shape = linear_shape(original)
            device = next(original.parameters(), torch.empty(0)).device
            pools = {kind: pool.tensors(name, device) for kind, pool in self.pools.items()
                     if name in pool.modules}
            for kind, t in pools.items():
                if shape is None or (t.B.shape[1], t.A.shape[2]) != shape[:2]:
                    raise IncompatibleLibraryError(
                        f"library expects a Linear of shape {(t.B.shape[1], t.A.shape[2])}, model has "
                        f"{type(original).__name__} {shape}", module=name,
                        path=self.pools[kind].libraries[0].path,
                    )
            wrapped[name] = LAGLinear(original, name, self, pools)
        for name, module in wrapped.items():  # swap only after every check passed
            self._originals[name] = module.base_layer
            _set_submodule(self.model, name, module)
        self._forward_signature = inspect.signature(self.model.forward)
        self._hooks.append(self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._attached = True

    def detach(self) -> nn.Module:
        """Put the original modules back; the model is exactly as before :func:`attach_lag`."""
        for name, original in self._originals.items():
            _set_submodule(self.model, name, original)
        for hook in self._hooks:
            hook.remove()
        self._originals.clear()
        self._hooks.clear()
        self._attached = False
        return self.model

    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def modules(self) -> list[str]:
        return list(self._originals)

    def names(self, kind: str) -> list[str]:
        return self.pools[kind].names

    @property
    def libraries(self) -> dict[str, list[AdapterLibrary]]:
        return {kind: pool.libraries for kind, pool in self.pools.items()}

    # ---- settings -------------------------------------------------------------------------------
    @property
    def config(self) -> LAGConfig:
        return self._default.config

    def set(self, config: LAGConfig | None = None, **changes: Any) -> LAGConfig:
        """Change the default routing (for requests without their own ``using``); no reload."""
        new = ((config or self._default.config).replace(**changes) if changes
               else (config or self._default.config))
        fixed = self._resolve_fixed(new)
        self._default = RequestState(new, self._default.traces, self._default.timings, fixed)
        return new

    @contextlib.contextmanager
    def using(self, config: LAGConfig | None = None, **changes: Any) -> Iterator[LAGConfig]:
        """Route the requests of this thread / asyncio task with other settings, for the block only."""
        current = self.state()
        new = (config or current.config).replace(**changes) if changes else (config or current.config)
        token = self._state.set(RequestState(new, current.traces, current.timings, self._resolve_fixed(new)))
        try:
            yield new
        finally:
            self._state.reset(token)

    @contextlib.contextmanager
    def trace(self, keep_tokens: bool = True) -> Iterator[RoutingTrace]:
        """Record the adapter chosen per token and module inside the block (this thread / task only).

        Traces nest: an outer trace also records what happens inside an inner one (e.g. LAGLLM's own)."""
        current = self.state()
        recorder = RoutingTrace({kind: pool.names for kind, pool in self.pools.items()}, keep_tokens)
        token = self._state.set(RequestState(current.config, (*current.traces, recorder), current.timings,
                                             current.fixed_idx))
        try:
            yield recorder
        finally:
            self._state.reset(token)

    @contextlib.contextmanager
    def timing(self) -> Iterator[list[float]]:
        """Accumulate seconds spent in routing inside the block: ``with router.timing() as t: ...; t[0]``."""
        current = self.state()
        timer = [0.0]
        token = self._state.set(RequestState(current.config, current.traces, (*current.timings, timer),
                                             current.fixed_idx))
        try:
            yield timer
        finally:
            self._state.reset(token)

    @contextlib.contextmanager
    def focus(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Mark the prompt tokens that carry the request's content ([B, S] bool, aligned with the prompt's
        input ids), e.g. the user's message without the chat template and system prompt. Sequence-level
        routing aggregates its scores over these tokens only (template tokens are the same in every request
        and only add noise). Applies to the prompts run inside the block (this thread / task)."""
        token = self._focus.set(None if mask is None else mask.bool())
        try:
            yield
        finally:
            self._focus.reset(token)

    def begin_request(self) -> _ForwardState:
        """Start a fresh request for direct calls of adapted modules (``model(...)`` starts one per prompt
        itself): what its first forward computes for the request (centres, shortlists) serves the later ones.
        Returns a handle for :meth:`resume_request` (this thread / task)."""
        fwd = _ForwardState(focus=self._focus.get())
        self._forward.set(fwd)
        return fwd

    def resume_request(self, handle: _ForwardState) -> None:
        """Continue the request :meth:`begin_request` returned, e.g. decode steps after their prompt."""
        self._forward.set(handle)

    def state(self) -> RequestState:
        return self._state.get(self._default)

    def check_config(self, config: LAGConfig) -> None:
        """Raise :class:`ConfigError` / :class:`LibraryError` if ``config`` names a library kind or adapter
        that is not attached (so a request fails before it generates)."""
        self._resolve_fixed(config)

    def _resolve_fixed(self, config: LAGConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for kind, weights in (config.fixed or {}).items():
            if kind not in self.pools:
                raise ConfigError(f"fixed names library kind {kind!r}, attached: {sorted(self.pools)}",
                                  field="fixed")
            pool = self.pools[kind]
            missing = [n for n in weights if n not in pool.index]
            if missing:
                raise LibraryError(f"fixed adapter not in the attached {kind} libraries", adapter=missing[0],
                                   field="fixed")
            out[kind] = (torch.tensor([pool.index[n] for n in weights]),
                         torch.tensor(list(weights.values()), dtype=torch.float32))
        return out

    # ---- the hot path ---------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Keep the attention mask (padding) and start a fresh sequence state on a new prompt; refuse to run
        on a library file that was truncated under us (its pages would raise SIGBUS)."""
        for pool in self.pools.values():
            for lib in pool.libraries:
                lib.check_mapped()
        if args:  # `model(input_ids, ...)`: name the positional arguments
            kwargs = {**self._forward_signature.bind_partial(*args).arguments, **kwargs}
        mask = kwargs.get("attention_mask")
        past = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 passes `cache`
        position = kwargs.get("cache_position")
        if past is not None and hasattr(past, "get_seq_length"):
            start = int(past.get_seq_length())
        elif position is not None and position.numel():
            start = int(position.reshape(-1)[0])
        else:
            start = 0
        fwd = self._forward.get(None)
        if fwd is not None and fwd.scoring is not None:
            return  # inside the scoring pre-pass of sequence-level routing (below)
        if fwd is None or start == 0:
            fwd = _ForwardState(focus=self._focus.get())
            self._forward.set(fwd)
        fwd.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cfg = self.state().config
        two_level = cfg.shortlist is not None or (cfg.granularity == "sequence"
                                                  and cfg.sequence_scope == "model")
        if start == 0 and two_level and cfg.mode in ("arrow", "spectr", "lag"):
            self._choose_for_sequences(fwd, kwargs)

    @torch.no_grad()
    def _choose_for_sequences(self, fwd: _ForwardState, kwargs: dict) -> None:
        """Sequence-level routing over the whole model: one extra, adapter-free forward over the prompt sums
        every module's scores per sequence; the best adapter of each library then serves every module."""
        inputs = {k: kwargs[k] for k in ("input_ids", "inputs_embeds", "attention_mask", "position_ids")
                  if kwargs.get(k) is not None}
        fwd.scoring = {}
        current = self.state()
        # untraced
        token = self._state.set(RequestState(current.config, (), current.timings, current.fixed_idx))
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

    @staticmethod
    def _decode_in_place(layer: LAGLinear, x: torch.Tensor, out: torch.Tensor, k: int,
                         cfg: LAGConfig) -> bool:
        """Decode fast path: one float32 token on the CPU, no autograd, one library kind at this module. The
        fused kernel adds the winner's delta into ``out`` in place: the general path's result bit for bit,
        without its tensors and Python (~6 ms of a ~75 ms SmolLM2 token at N=1000). False: nothing done."""
        if (len(layer.pools) != 1 or x.numel() != x.shape[-1] or x.dtype != torch.float32 or not x.is_cpu
                or out.dtype != torch.float32 or torch.is_grad_enabled() or not x.is_contiguous()
                or not out.is_contiguous()):
            return False
        (t,) = layer.pools.values()
        if not t.fused_exact(APPROXIMATE[cfg.arrow_backend], _effort(cfg, t)):
            return False
        add_fused(x, t, k, out)
        return True

    def _decode_shortlist_in_place(self, layer: LAGLinear, x: torch.Tensor, out: torch.Tensor,
                                   cfg: LAGConfig) -> bool:
        """Two-level decode fast path: one float32 token of a request whose prompt chose its shortlist (and
        centre), on the CPU, without autograd, one library kind at this module. Adds what
        :meth:`_route_shortlist` would into ``out`` in place. False: nothing done."""
        fwd = self._forward.get(None)
        if (fwd is None or len(layer.pools) != 1 or x.numel() != x.shape[-1] or x.dtype != torch.float32
                or not x.is_cpu or out.dtype != torch.float32 or torch.is_grad_enabled()
                or not x.is_contiguous() or not out.is_contiguous()):
            return False
        ((kind, t),) = layer.pools.items()
        module = layer.module_name
        lists = fwd.shortlists.get(kind) or fwd.shortlists.get((kind, module))
        centre = fwd.centres.get(module) if cfg.calibration == "request" else None
        if (lists is None or lists[0].shape[0] != 1 or (cfg.calibration == "request" and centre is None)
                or t.bits is None or t.valid is not None or not kernels.available()):
            return False
        add_shortlist_fused(x, t, lists[0][0], lists[1][0], cfg.shortlist_weight,
                            None if centre is None else centre[0], out)
        return True

    def _route(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor,
               state: RequestState) -> torch.Tensor | None:
        cfg = state.config
        if cfg.libraries is not None and kind not in cfg.libraries:
            return None
        flat = x.reshape(-1, x.shape[-1])  # [T, n]
        if kind in state.fixed_idx:
            idx, weights = (v.to(flat.device) for v in state.fixed_idx[kind])
            delta = apply_fixed(flat, t, idx, weights)
            if state.traces:
                chosen = idx[weights.argmax()].expand(flat.shape[0])
                state.record(kind, module, chosen, self._token_mask(x))
            return delta
        if cfg.mode == "fixed":
            return None
        if (cfg.granularity == "sequence" or cfg.shortlist is not None) and x.dim() == 3:
            fwd = self._forward.get(None)
            if fwd is not None and fwd.scoring is not None:  # scoring pre-pass: accumulate, apply nothing
                totals = self._sequence_totals(module, kind, t, x, flat, cfg)
                fwd.scoring[kind] = fwd.scoring[kind] + totals if kind in fwd.scoring else totals
                return None
            if cfg.granularity == "sequence":
                return self._route_sequence(module, kind, t, x, flat, state)
        score_x = self._centred(module, x, flat) if cfg.calibration == "request" else None
        if cfg.shortlist is not None and x.dim() == 3:
            out = self._route_shortlist(module, kind, t, x, flat, score_x, cfg)
        else:
            out = route_tokens(flat, t, cfg.mode, k=cfg.k, arrow_top_k=cfg.arrow_top_k,
                               temperature=cfg.temperature, spectr_top_k=cfg.spectr_top_k,
                               strategy=cfg.dispatch, margin=cfg.dynamic_k,
                               approximate=APPROXIMATE[cfg.arrow_backend],
                               effort=_effort(cfg, t), kernel=cfg.decode_kernel, score_x=score_x)
        if state.traces:
            state.record(kind, module, out.chosen, self._token_mask(x), out.candidates)
        return out.delta

    def _current_forward(self) -> _ForwardState:
        """This request's forward state (a fresh one for module calls outside ``model(...)``)."""
        fwd = self._forward.get(None)
        if fwd is None:
            fwd = _ForwardState()
            self._forward.set(fwd)
        return fwd

    def _sequence_totals(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor, flat: torch.Tensor,
                         cfg: LAGConfig) -> torch.Tensor:
        """[B, N] this module's scores per sequence, over the focus tokens (else every real token)."""
        mask = self._focus_mask(x)
        if mask is None or not bool(mask.any(dim=1).all()):  # no focus: every real token counts
            mask = self._token_mask(x)
            mask = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        centre = request_centre(x, self._token_mask(x)) if cfg.calibration == "request" else None
        return sequence_scores(flat.view(*x.shape[:2], -1), mask, t, cfg.mode, cfg.sequence_score, k=cfg.k,
                               strategy=cfg.dispatch, approximate=APPROXIMATE[cfg.arrow_backend],
                               effort=_effort(cfg, t), centre=centre)

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
                         score_x: torch.Tensor | None, cfg: LAGConfig) -> Routed:
        """Two-level routing: each token picks among its sequence's shortlist (chosen by the pre-pass over the
        prompt; without one, from this module's own scores of the current tokens)."""
        fwd = self._current_forward()
        lists = fwd.shortlists.get(kind) or fwd.shortlists.get((kind, module))
        if lists is None or lists[0].shape[0] != x.shape[0]:  # this module's own, kept for the decode steps
            lists = _shortlist(self._sequence_totals(module, kind, t, x, flat, cfg), cfg.shortlist or 1)
            fwd.shortlists[(kind, module)] = lists
        idx, prior = (v.repeat_interleave(x.shape[1], dim=0) for v in lists)  # [T, M] per token's row
        return route_shortlist(flat, t, idx, prior, cfg.shortlist_weight, score_x=score_x,
                               strategy=cfg.dispatch)

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


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _as_libraries(libraries: Any) -> list[AdapterLibrary]:
    if isinstance(libraries, (AdapterLibrary, str, Path)):
        libraries = [libraries]
    out = [lib if isinstance(lib, AdapterLibrary) else AdapterLibrary.load(lib) for lib in libraries]
    if not out:
        raise LibraryError("attach_lag needs at least one adapter library")
    return out


def attach_lag(model: nn.Module, libraries: AdapterLibrary | str | Path | Sequence[Any],
               config: LAGConfig | None = None) -> LAGRouter:
    """Route ``model``'s adapted Linear modules through ``libraries`` (in place, no weight copy).

    Libraries must be compiled for this base model (same architecture, sizes and module shapes) and share
    one dtype. Task and knowledge libraries are routed separately and their winners added.
    """
    libs = _as_libraries(libraries)
    fingerprint = BaseModelSpec.from_model(model).fingerprint()
    for lib in libs:
        diff = fingerprint_diff(lib.fingerprint, fingerprint)
        if diff:
            raise IncompatibleLibraryError(
                f"library was compiled for another base model: {'; '.join(diff)}", path=lib.path
            )
    dtypes = {lib.manifest["dtype"] for lib in libs}
    if len(dtypes) > 1:
        raise IncompatibleLibraryError(
            f"libraries attached together must share one dtype, got {sorted(dtypes)}: "
            + ", ".join(f"{lib.path} ({lib.manifest['dtype']})" for lib in libs),
            field="dtype", path=libs[0].path,
        )
    router = LAGRouter(model, libs, config or LAGConfig())
    router._attach()
    return router
