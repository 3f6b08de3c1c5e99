"""``LAGConfig``: how attached adapter libraries are routed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import ConfigError
from .modes import ROUTING_MODES as MODES
from .modes import SCORE_CALIBRATIONS
from .routing.dispatch import STRATEGIES

Mode = Literal["none", "arrow", "spectr", "lag", "fixed"]  # = modes.ROUTING_MODES (a test checks)
GRANULARITIES = ("token", "sequence")
SEQUENCE_SCORES = ("mass", "vote")
# "none" and "request" (request-centred tokens) route through the engine's plain paths; the others through
# routing.engine.route_calibrated (routing/calibration.py has their math).
CALIBRATIONS = ("none", "request", *SCORE_CALIBRATIONS)
REFERENCES = ("library", "request")
# Named LAG routings (BENCHMARKS.md, "Routing quality", has the measurements behind the choice).
PRESETS: dict[str, dict[str, Any]] = {  # keys: modes.LAG_METHODS
    "two-level": {"calibration": "request", "shortlist": 2, "shortlist_weight": 0.25},
    "paper": {},
}
DEFAULT_PRESET = "two-level"


@dataclass(frozen=True)
class LAGConfig:
    """Routing settings. Immutable; derive variants with :meth:`replace`.

    mode:
        ``none``   adapters off (logits bit-identical to the bare model).
        ``arrow``  Arrow: per token per module the adapter whose prototype best aligns with the token
                   (``arrow_top_k > 1``: PEFT's soft variant, softmax(score / temperature) over the kept
                   ones).
        ``spectr`` SpectR: argmax over all N of ||A*_i x|| (``spectr_top_k > 1``: uniform merge of the
                   top-k).
        ``lag``    Arrow keeps the top-``k`` (clamped to N), SpectR picks one of them: the paper's method.
        ``fixed``  only the adapters named in ``fixed`` (Oracle / PRAG); other libraries off.
    fixed:
        ``{library_kind: [adapter, ...]}`` or ``{kind: {adapter: weight}}``: those libraries apply exactly
        these adapters (summed) whatever the mode; e.g. ``mode="lag", fixed={"knowledge": ["doc-7"]}`` is
        PRAG+LAG (the document's knowledge adapter + LAG over task adapters).
    libraries:
        kinds to route (``None``: every attached library).
    granularity:
        ``token`` (the paper): a choice per token per module. ``sequence``: scores are aggregated over each
        prompt's content tokens (``sequence_score``: ``mass`` = sum of per-token scores normalised over the
        candidates, ``vote`` = count of per-token winners) and the winner is applied to all its tokens,
        including generated ones. ``sequence_scope``: ``model`` sums the scores of every adapted module in
        one extra adapter-free forward over the prompt and applies one adapter per library everywhere;
        ``module`` decides per module from that module's scores (no extra forward).
    calibration:
        ``none`` (the paper): tokens are scored as they are. ``request``: each token is scored after
        subtracting the mean of its request's tokens at that module (data-free: the reference is the request
        itself), which removes what every token of the prompt shares (template, generic words) and leaves
        what is particular to it; the winner is still applied to the token itself. Measured on the
        benchmark: the gold document's adapter becomes the most selected for ~90 % of questions instead of a
        few "hub" adapters.
        Score calibrations against hub adapters (top-1 per token, exact Arrow; BENCHMARKS.md compares them;
        none beats ``request`` + ``shortlist`` there): each adapter's Arrow and SpectR scores (divided by
        ``||x||``) are rescaled by statistics of a data-free reference set (``calibration_reference``):
        ``centre`` (score - mean), ``zscore`` ((score - mean) / std), ``csls`` (2 score - mean of its top-10
        reference scores); the reference is ``library`` (every other adapter's right singular vectors;
        computed at compile time and stored in the library) or ``request`` (the request's prompt tokens).
        ``isoftmax`` (inverted softmax over the request's tokens, inverse temperature ``calibration_beta``)
        and ``sinkhorn`` (3 rounds of row / column normalisation of ``exp(beta score)`` over adapters and the
        request's tokens) always use the request. ``subspace`` scores tokens and prototypes without the top
        ``subspace_dims`` eigenvectors of the library's mean input projector (its shared input subspace,
        stored), and applies the winner's original ``B* A* x``. These need at least 3 adapters in every
        routed library (:class:`ConfigError` otherwise).
    shortlist:
        two-level routing: ``M`` adapters per sequence by score mass over the prompt
        (``sequence_score='mass'``, one adapter-free forward, as ``granularity='sequence'``; clamped to N),
        then per token the one of them maximising ``log(mass share) + shortlist_weight * log ||A*_i x||``
        (a sequence prior times the token's own evidence). None: every adapter is a candidate for every
        token (the paper). With ``sequence_scope="module"`` each module shortlists from its own scores of
        the prompt's tokens, in the routed forward itself (no adapter-free pre-pass: a cheaper prompt).
    shortlist_weight:
        weight of the token's evidence against the sequence prior (0: the sequence winner everywhere).
    dynamic_k:
        ``lag`` only (the paper's future work): per token, of the Arrow top-``k`` keep the candidates whose
        score is at least ``dynamic_k x`` the best score (a margin in (0, 1]); ``k`` is then the maximum.
    arrow_backend:
        Arrow retrieval: ``exact`` scans all N prototypes; ``faiss`` uses the library's approximate index
        (``arrow_index/``, built at compile time for large libraries) for every forward; ``auto`` uses a
        current index where a cost model expects it to beat the exact scan (decoding with large libraries;
        long prompts scan exactly). Search breadth of the index (recall vs speed): ``ef_search`` for HNSW
        indexes (default 512), ``nprobe`` (IVF lists searched) for IVF ones (default 64).
    dispatch:
        kernel strategy for the candidate products (``auto`` picks by a cost model).
    decode_kernel:
        ``auto``: where they can run, fused numba kernels route each module in one call: a decode step's
        tokens (scan, top-k, rerank and apply), and a prompt's tokens after one GEMM for their Arrow scores
        (exact ``lag``, two-level shortlists, the pre-pass's score masses); the same choices as the PyTorch
        ops. ``torch`` always uses the PyTorch ops.
    """

    mode: Mode = "lag"
    k: int = 20
    arrow_top_k: int = 1
    temperature: float = 1.0
    spectr_top_k: int = 1
    fixed: Mapping[str, Sequence[str] | Mapping[str, float]] | None = None
    libraries: tuple[str, ...] | None = None
    granularity: Literal["token", "sequence"] = "token"
    sequence_score: Literal["mass", "vote"] = "mass"
    sequence_scope: Literal["model", "module"] = "model"
    dynamic_k: float | None = None
    calibration: Literal["none", "request", "centre", "zscore", "csls", "subspace", "isoftmax",
                         "sinkhorn"] = "none"
    calibration_reference: Literal["library", "request"] = "library"
    calibration_beta: float = 30.0
    subspace_dims: int = 4
    shortlist: int | None = None
    shortlist_weight: float = 1.0
    arrow_backend: Literal["auto", "exact", "faiss"] = "auto"
    nprobe: int | None = None
    ef_search: int | None = None
    dispatch: str = "auto"
    decode_kernel: Literal["auto", "torch"] = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"unknown mode {self.mode!r}; expected one of {MODES}", field="mode")
        for name in ("k", "arrow_top_k", "spectr_top_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature!r}", field="temperature")
        if self.granularity not in GRANULARITIES:
            raise ConfigError(f"granularity must be one of {GRANULARITIES}", field="granularity")
        if self.sequence_scope not in ("model", "module"):
            raise ConfigError("sequence_scope must be 'model' or 'module'", field="sequence_scope")
        if self.sequence_score not in SEQUENCE_SCORES:
            raise ConfigError(f"sequence_score must be one of {SEQUENCE_SCORES}", field="sequence_score")
        if self.dynamic_k is not None and not 0 < self.dynamic_k <= 1:
            raise ConfigError(f"dynamic_k is a score margin in (0, 1], got {self.dynamic_k!r}",
                              field="dynamic_k")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {CALIBRATIONS}, got {self.calibration!r}",
                              field="calibration")
        self._check_calibration()
        if self.shortlist is not None:
            if not isinstance(self.shortlist, int) or isinstance(self.shortlist, bool) or self.shortlist <= 0:
                raise ConfigError(f"shortlist must be a positive integer or None, got {self.shortlist!r}",
                                  field="shortlist")
            if self.granularity != "token":
                raise ConfigError("shortlist is two-level routing per token; granularity='sequence' already "
                                  "picks one adapter per sequence", field="shortlist")
        if (not isinstance(self.shortlist_weight, (int, float)) or isinstance(self.shortlist_weight, bool)
                or not 0 <= self.shortlist_weight < float("inf")):
            raise ConfigError(f"shortlist_weight must be a finite number >= 0, got {self.shortlist_weight!r}",
                              field="shortlist_weight")
        if (self.calibration != "none" or self.shortlist) and (self.arrow_top_k > 1 or self.spectr_top_k > 1):
            raise ConfigError("calibration / shortlist choose one adapter per token: use arrow_top_k = "
                              "spectr_top_k = 1", field="calibration")
        if self.arrow_backend not in ("auto", "exact", "faiss"):
            raise ConfigError("arrow_backend must be auto, exact or faiss", field="arrow_backend")
        for name in ("nprobe", "ef_search"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}", field=name)
        if self.dispatch not in STRATEGIES:
            raise ConfigError(f"dispatch must be one of {STRATEGIES}", field="dispatch")
        if self.decode_kernel not in ("auto", "torch"):
            raise ConfigError("decode_kernel must be 'auto' or 'torch'", field="decode_kernel")
        if self.mode == "fixed" and not self.fixed:
            raise ConfigError("mode 'fixed' needs fixed={library_kind: [adapter names]}", field="fixed")
        if self.fixed is not None:
            object.__setattr__(self, "fixed", _normalise_fixed(self.fixed))
        if self.libraries is not None:
            object.__setattr__(self, "libraries", tuple(self.libraries))

    def _check_calibration(self) -> None:
        if self.calibration_reference not in REFERENCES:
            raise ConfigError(f"calibration_reference must be one of {REFERENCES}, got "
                              f"{self.calibration_reference!r}", field="calibration_reference")
        if self.calibration_reference == "request" and self.calibration not in ("centre", "zscore", "csls"):
            raise ConfigError("calibration_reference='request' applies to the centre / zscore / csls "
                              "calibrations", field="calibration_reference")
        beta = self.calibration_beta
        if (not isinstance(beta, (int, float)) or isinstance(beta, bool)
                or not 0 < beta < float("inf")):
            raise ConfigError(f"calibration_beta must be a finite number > 0, got {beta!r}",
                              field="calibration_beta")
        dims = self.subspace_dims
        if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
            raise ConfigError(f"subspace_dims must be a positive integer, got {dims!r}",
                              field="subspace_dims")
        if self.calibration in SCORE_CALIBRATIONS:
            if self.granularity != "token" or self.shortlist is not None or self.dynamic_k is not None:
                raise ConfigError(f"calibration {self.calibration!r} routes each token on its own: it does "
                                  "not combine with granularity='sequence', shortlist or dynamic_k",
                                  field="calibration")

    def replace(self, **changes: Any) -> LAGConfig:
        """A copy with ``changes`` applied (validated; an unknown field is a :class:`ConfigError`)."""
        _check_fields(changes)
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str, **fields: Any) -> LAGConfig:
        """A named LAG routing: ``"two-level"`` (the default of the pipeline and of :class:`LAGLLM`:
        request-centred scores, a per-sequence shortlist, then per-token choice; see :data:`PRESETS`) or
        ``"paper"`` (the LAG paper's per-token Arrow top-k -> SpectR, ``LAGConfig(mode="lag")``); ``fields``
        override it."""
        if name not in PRESETS:
            raise ConfigError(f"unknown LAG routing preset {name!r}; expected one of {sorted(PRESETS)}",
                              field="lag_method")
        return cls.from_dict({"mode": "lag", **PRESETS[name], **fields})

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> LAGConfig:
        """``LAGConfig(**fields)``, with an unknown field a :class:`ConfigError` naming it."""
        if not isinstance(fields, Mapping):
            raise ConfigError(f"routing settings must be a mapping of LAGConfig fields, got {fields!r}",
                              field="routing")
        fields = {k: v for k, v in fields.items() if not (k == "extra" and not v)}  # an empty field of 0.1
        _check_fields(fields)
        return cls(**fields)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["fixed"] = {k: dict(v) for k, v in self.fixed.items()} if self.fixed else None
        return out


def _check_fields(fields: Mapping[str, Any]) -> None:
    known = {f.name for f in dataclasses.fields(LAGConfig)}
    unknown = sorted(str(k) for k in fields if k not in known)
    if unknown:
        raise ConfigError(f"unknown routing setting {unknown[0]!r}; LAGConfig fields: {sorted(known)}",
                          field=unknown[0])


def _normalise_fixed(fixed: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for kind, names in fixed.items():
        if isinstance(names, str):
            names = [names]
        weights = dict(names) if isinstance(names, Mapping) else {n: 1.0 for n in names}
        if not weights:
            raise ConfigError(f"fixed[{kind!r}] names no adapter", field="fixed")
        out[str(kind)] = {str(n): float(w) for n, w in weights.items()}
    return out
