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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SCORE_CALIBRATIONS, LAGConfig
from ..errors import ConfigError, IncompatibleLibraryError, LibraryError
from ..library.base import BaseModelSpec, fingerprint_diff, linear_shape
from ..library.stats import SHARED_DIMS
from ..library.store import AdapterLibrary
from ..routing.calibration import Calibrated, request_affine
from ..routing.dispatch import project_all
from ..routing.engine import (
    PoolTensors,
    add_fused,
    apply_fixed,
    in_place_ok,
    route_calibrated,
    route_tokens,
)
from ..trace import RoutingTrace
from .pool import APPROXIMATE, Pool, effort, route_spec
from .sequence import SequenceRouting
from .state import ForwardState, RequestState, RowGroup

_ids = itertools.count()


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
        groups = router._rows.get()
        if groups is not None:  # a batch of requests with their own routings (LAGRouter.rows)
            return router._route_rows(self, x, out, groups)
        return router._apply(self, x, out, router.state())


class LAGRouter(SequenceRouting):
    """Handle returned by :func:`attach_lag`: switch modes, trace, detach."""

    def __init__(self, model: nn.Module, libraries: list[AdapterLibrary], config: LAGConfig) -> None:
        self.model = model
        self._config = config
        self._state: contextvars.ContextVar[RequestState] = contextvars.ContextVar(f"lag_state_{next(_ids)}")
        self._forward: contextvars.ContextVar[ForwardState] = contextvars.ContextVar(f"lag_fwd_{next(_ids)}")
        self._focus: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar(
            f"lag_focus_{next(_ids)}", default=None)
        self._rows: contextvars.ContextVar[Sequence[RowGroup] | None] = contextvars.ContextVar(
            f"lag_rows_{next(_ids)}", default=None)
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

    def begin_request(self) -> ForwardState:
        """Start a fresh request for direct calls of adapted modules (``model(...)`` starts one per prompt
        itself): what its first forward computes for the request (centres, shortlists) serves the later ones.
        Returns a handle for :meth:`resume_request` (this thread / task)."""
        fwd = ForwardState(focus=self._focus.get())
        self._forward.set(fwd)
        return fwd

    def resume_request(self, handle: ForwardState) -> None:
        """Continue the request :meth:`begin_request` returned, e.g. decode steps after their prompt."""
        self._forward.set(handle)

    def state(self) -> RequestState:
        return self._state.get(self._default)

    # ---- batches of requests (continuous batching) -----------------------------------------------
    def request_state(self, config: LAGConfig, traces: Sequence[Any] = (),
                      timings: Sequence[list[float]] = ()) -> RequestState:
        """The settings of one request routed with ``config`` and recorded by ``traces`` / ``timings``."""
        return RequestState(config, tuple(traces), tuple(timings), self._resolve_fixed(config))

    def run_request(self, state: RequestState, focus: torch.Tensor | None,
                    fn: Any) -> tuple[Any, ForwardState | None]:
        """Run ``fn()`` (a prompt's forward) as one request with ``state`` and ``focus``, in a fresh context;
        returns its result and the request's sequence-level choices (for :meth:`rows` in later steps)."""
        def run() -> tuple[Any, ForwardState | None]:
            self._state.set(state)
            self._focus.set(None if focus is None else focus.bool())
            self._rows.set(None)
            self._forward.set(ForwardState(focus=self._focus.get()))
            result = fn()
            return result, self._forward.get(None)

        return contextvars.copy_context().run(run)

    @contextlib.contextmanager
    def rows(self, groups: Sequence[RowGroup]) -> Iterator[None]:
        """Route the forwards inside the block row group by row group: each group's rows with its own
        settings and sequence-level choices; rows in no group get no adapter. One pass per distinct routing
        of the batch, not per row."""
        token = self._rows.set(tuple(groups))
        try:
            yield
        finally:
            self._rows.reset(token)

    def _route_rows(self, layer: LAGLinear, x: torch.Tensor, out: torch.Tensor,
                    groups: Sequence[RowGroup]) -> torch.Tensor:
        for group in groups:
            rows = group.rows.to(x.device)
            xs, outs = x.index_select(0, rows), out.index_select(0, rows)  # [G, S, n], [G, S, m]
            state_token, forward_token = self._state.set(group.state), self._forward.set(group.forward)
            try:
                routed = self._apply(layer, xs, outs, group.state)
            finally:
                self._forward.reset(forward_token)
                self._state.reset(state_token)
            out.index_copy_(0, rows, routed.to(out.dtype))
        return out

    def check_config(self, config: LAGConfig) -> None:
        """Raise :class:`ConfigError` / :class:`LibraryError` if ``config`` names a library kind or adapter
        that is not attached, or asks for a calibration a routed library is too small for (so a request fails
        before it generates)."""
        self._resolve_fixed(config)

    def _resolve_fixed(self, config: LAGConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The rows and weights of ``config.fixed`` per kind (every setting of a request passes here: the
        calibration's library sizes are checked too)."""
        self._check_calibration(config)
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
            fwd = ForwardState(focus=self._focus.get())
            self._forward.set(fwd)
        fwd.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cfg = self.state().config
        pre_pass = ((cfg.shortlist is not None or cfg.granularity == "sequence")
                    and cfg.sequence_scope == "model")
        if start == 0 and pre_pass and cfg.mode in ("arrow", "spectr", "lag"):
            self._choose_for_sequences(fwd, kwargs)

    def _apply(self, layer: LAGLinear, x: torch.Tensor, out: torch.Tensor,
               state: RequestState) -> torch.Tensor:
        """``out`` (the base layer's output for ``x``) plus the adapters ``state`` routes ``x`` to."""
        cfg = state.config
        if cfg.mode == "none":
            return out
        start = time.perf_counter() if state.timings else 0.0
        fused = None
        if state.fused_k is not None:
            fused = self._decode_in_place(layer, x, out, state.fused_k, cfg)
        elif state.fused_shortlist:
            fused = self._decode_shortlist_in_place(layer, x, out, cfg)
        if fused is not None:  # the deltas are in out already
            if state.traces:
                state.record(fused[0], layer.module_name, fused[1], self._token_mask(x))
            if state.timings:
                elapsed = time.perf_counter() - start
                for timer in state.timings:
                    timer[0] += elapsed
            return out
        delta = None
        for kind, tensors in layer.pools.items():
            d = self._route(layer.module_name, kind, tensors, x, state)
            if d is not None:
                delta = d if delta is None else delta + d
        if delta is not None:
            out = out + delta.view(*out.shape[:-1], -1).to(out.dtype)
        if state.timings:
            elapsed = time.perf_counter() - start
            for timer in state.timings:
                timer[0] += elapsed
        return out

    @staticmethod
    def _decode_in_place(layer: LAGLinear, x: torch.Tensor, out: torch.Tensor, k: int,
                         cfg: LAGConfig) -> tuple[str, torch.Tensor] | None:
        """Decode fast path: one token per row, one library kind at this module, the in-place kernels apply
        (:func:`~llama_index_lag.routing.engine.in_place_ok`) and Arrow is exact. The fused kernel adds each
        winner's delta into ``out`` in place: the general path's result bit for bit, without its tensors and
        Python (its cost: BENCHMARKS.md, decode). Returns (kind, winners [R]); None: nothing done."""
        if len(layer.pools) != 1:
            return None
        ((kind, t),) = layer.pools.items()
        if not in_place_ok(x, out, t) or t.approximates(APPROXIMATE[cfg.arrow_backend], 1, effort(cfg, t)):
            return None
        return kind, add_fused(x, t, k, out)

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
        if cfg.calibration in SCORE_CALIBRATIONS and cfg.mode in ("arrow", "spectr", "lag"):
            out = self._route_calibrated(module, kind, t, x, flat, cfg)
            if state.traces:
                state.record(kind, module, out.chosen, self._token_mask(x))
            return out.delta
        if cfg.shortlist is not None and x.dim() == 3:
            out = self._route_shortlist(module, kind, t, x, flat, cfg)
        else:
            score_x = self._centred(module, x, flat) if cfg.calibration == "request" else None
            out = route_tokens(flat, t, route_spec(cfg, t), score_x=score_x)
        if state.traces:
            state.record(kind, module, out.chosen, self._token_mask(x), out.candidates)
        return out.delta

    def _route_calibrated(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor, flat: torch.Tensor,
                          cfg: LAGConfig) -> Any:
        """Per-token routing on calibrated scores (``cfg.calibration`` other than none / request)."""
        spec = route_spec(cfg, t)
        how = cfg.calibration
        if how == "subspace":
            return route_calibrated(flat, t, spec, Calibrated(None, None),
                                    shared=t.shared_prototypes(cfg.subspace_dims))
        if how in ("centre", "zscore", "csls") and cfg.calibration_reference == "library":
            return route_calibrated(flat, t, spec, t.library_calibration(how))
        cal = self._request_calibration(module, kind, t, x, flat, cfg)  # [B, N] affines of the prompt
        per_row = x.shape[1] if x.dim() == 3 else 1
        per_token = Calibrated(*(None if a is None else a.rows(per_row) for a in cal))
        return route_calibrated(flat, t, spec, per_token)

    def _request_calibration(self, module: str, kind: str, t: PoolTensors, x: torch.Tensor,
                             flat: torch.Tensor, cfg: LAGConfig) -> Calibrated:
        """The request-reference affines of this module: from the scores of the prompt's real tokens over
        every adapter, taken in the prompt's forward and kept for the tokens generated after it."""
        fwd = self._current_forward()
        x3 = x if x.dim() == 3 else flat[None]
        cal = fwd.calibrations.get((kind, module))
        if cal is not None and cal.spectr.scale.shape[0] == x3.shape[0]:
            return cal
        mask = self._token_mask(x3)
        mask = mask if mask is not None else torch.ones(x3.shape[:2], dtype=torch.bool, device=x.device)
        xf = x3.reshape(-1, x3.shape[-1]).float()  # [B S, n]
        inv = 1.0 / xf.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        shape = (*x3.shape[:2], t.n_adapters)
        arrow = ((xf @ t.protos.float().T).abs() * inv).view(shape)  # [B, S, N]
        spectr = (project_all(xf, t.A).float().norm(dim=-1) * inv).view(shape)  # [B, S, N]
        how, beta = cfg.calibration, cfg.calibration_beta
        cal = Calibrated(request_affine(arrow, mask, how, beta), request_affine(spectr, mask, how, beta))
        fwd.calibrations[(kind, module)] = cal
        return cal

    def _check_calibration(self, config: LAGConfig) -> None:
        """A score calibration needs at least MIN_CALIBRATION_ADAPTERS adapters in every routed library."""
        if config.calibration not in SCORE_CALIBRATIONS or config.mode not in ("arrow", "spectr", "lag"):
            return
        if config.calibration == "subspace" and config.subspace_dims > SHARED_DIMS:
            raise ConfigError(f"subspace_dims must be at most {SHARED_DIMS} (the shared directions a library "
                              f"stores), got {config.subspace_dims}", field="subspace_dims")
        for kind, pool in self.pools.items():
            routed = ((config.libraries is None or kind in config.libraries)
                      and kind not in (config.fixed or {}))
            if routed and len(pool.names) < MIN_CALIBRATION_ADAPTERS:
                raise ConfigError(
                    f"calibration {config.calibration!r} needs at least {MIN_CALIBRATION_ADAPTERS} adapters "
                    f"in every routed library; the attached {kind} adapters are {len(pool.names)} "
                    f"({', '.join(pool.names)}): route the other kinds only (libraries=...) or fix its "
                    "adapters (fixed=...)",
                    field="calibration", path=pool.libraries[0].path)


#: a calibrated library needs a reference of other adapters for each one (and a spread to normalise by)
MIN_CALIBRATION_ADAPTERS = 3


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
