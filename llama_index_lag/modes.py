"""Every mode name of the package, and the one parser of evaluated mode names.

* Routing modes (``LAGConfig.mode``): ``none | arrow | spectr | lag | fixed``.
* Pipeline modes (``LAGPipelineConfig.mode``, ``lag ask``): ``none | rag | lag | rag+lag | prag | prag+lag``;
  ``lag demo`` compares the first four.
* Evaluated modes (``lag eval --modes``, ``measure_recall(modes=...)``), parsed by :func:`parse_mode`:

  ==========  ==========================  ===============================================================
  mode        prompt                      adapters
  ==========  ==========================  ===============================================================
  none        question only               off
  arrow       question only               Arrow top-1 per token over every attached library
  spectr      question only               SpectR per token over every attached library
  lag         question only               LAG (Arrow top-k, SpectR rerank) over every attached library
  oracle      question only               the gold document's knowledge adapter (+ the question's task
                                          adapter when task libraries are attached and mapped)
  oracle-     question only               the gold document's knowledge adapter alone (each task is
  knowledge                               normalised by the better of the two Oracles)
  rag         top documents in the prompt off
  rag+lag     top documents in the prompt LAG over every attached library
  prag        question only               the top retrieved document's knowledge adapter (fixed)
  prag+lag    question only               that adapter + LAG over the task adapters
  ==========  ==========================  ===============================================================

  Variants of the routed modes (``arrow``, ``spectr``, ``lag``, ``rag+lag``, ``prag+lag``) add suffixes:
  ``-k5`` (Arrow candidates, lag-based modes), ``-seq-mass`` / ``-seq-vote`` (sequence-level routing,
  ``LAGConfig(granularity="sequence", sequence_score=...)``), ``-dyn0.9`` (dynamic k: keep the candidates
  whose Arrow score is at least 0.9 x the best, lag-based modes); e.g. ``lag-seq-mass``, ``spectr-seq-vote``,
  ``lag-dyn0.9``, ``lag-k5-dyn0.5``; ``-req`` (``calibration="request"``), ``-sl<M>`` (``shortlist=M``),
  ``-w<weight>`` (``shortlist_weight``), ``-mod`` (``sequence_scope="module"``: per-module shortlists or
  sequence winners, no pre-pass), e.g. ``lag-req-sl2``; ``-cal<name>`` (a score calibration,
  ``calibration=name``: centre, zscore, csls, subspace, isoftmax, sinkhorn) with ``-refreq``
  (``calibration_reference="request"``), ``-m<dims>`` (``subspace_dims``), ``-b<beta>``
  (``calibration_beta``), e.g. ``lag-calzscore-refreq``, ``lag-calsubspace-m4``. ``--sweep-k 1,2,5,N`` adds
  ``lag-k<k>`` modes (the paper's Fig. 3).

  Here ``lag`` / ``rag+lag`` are the paper's per-token method, so tables stay comparable with the paper; the
  pipeline's default LAG (``LAGConfig.preset("two-level")``) is ``lag-req-sl2-w0.25``.
  ``seq-lag`` / ``seq-spectr`` (earlier names of ``measure_recall``) are read as ``lag-seq-mass`` /
  ``spectr-seq-mass``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError

ROUTING_MODES = ("none", "arrow", "spectr", "lag", "fixed")  # LAGConfig.mode
PIPELINE_MODES = ("none", "rag", "lag", "rag+lag", "prag", "prag+lag")
RETRIEVAL_MODES = ("rag", "rag+lag", "prag", "prag+lag")  # pipeline modes that need an index
DEMO_MODES = ("none", "rag", "lag", "rag+lag")
LAG_METHODS = ("two-level", "paper")  # the pipeline's LAG routing: the keys of config.PRESETS

ROUTED_BASES = ("arrow", "spectr", "lag", "rag+lag", "prag+lag")
LAG_BASES = ("lag", "rag+lag", "prag+lag")
RETRIEVAL_BASES = RETRIEVAL_MODES
ALIASES = {"seq-lag": "lag-seq-mass", "seq-spectr": "spectr-seq-mass"}
# LAGConfig.calibration's score calibrations (besides none / request; config.CALIBRATIONS, a test checks)
SCORE_CALIBRATIONS = ("centre", "zscore", "csls", "subspace", "isoftmax", "sinkhorn")


# ---- evaluated modes (``lag eval``, ``measure_recall``) ----------------------------------------------
@dataclass(frozen=True)
class ModeSpec:
    """One evaluated mode.

    prompt: ``question`` (the pipeline's generation synthesizer) or ``rag`` (its text-QA synthesizer with the
    retrieved documents). knowledge: ``off``, ``routed`` (per-token / per-sequence routing), ``gold`` (oracle)
    or ``retrieved`` (PRAG). routing: LAGConfig fields; the fixed adapters are added per question.
    """

    name: str
    base: str
    prompt: str
    knowledge: str
    routing: Mapping[str, Any]

    @property
    def retrieves(self) -> bool:
        return self.base in RETRIEVAL_BASES

    @property
    def routes_knowledge(self) -> bool:
        """Whether the knowledge library is routed (so routing accuracy is meaningful)."""
        return self.knowledge == "routed"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "prompt": self.prompt, "knowledge": self.knowledge,
                "routing": dict(self.routing)}


EVAL_BASES: dict[str, tuple[str, str, str]] = {  # base -> (prompt, knowledge, LAGConfig mode)
    "none": ("question", "off", "none"),
    "arrow": ("question", "routed", "arrow"),
    "spectr": ("question", "routed", "spectr"),
    "lag": ("question", "routed", "lag"),
    "oracle": ("question", "gold", "fixed"),
    "oracle-knowledge": ("question", "gold", "fixed"),  # the gold knowledge adapter alone, no task adapter
    "rag": ("rag", "off", "none"),
    "rag+lag": ("rag", "routed", "lag"),
    "prag": ("question", "retrieved", "fixed"),
    "prag+lag": ("question", "retrieved", "lag"),
}
BASE_MODES = tuple(EVAL_BASES)
DEFAULT_MODES = BASE_MODES
_VARIANT = re.compile(r"^(arrow|spectr|lag|rag\+lag|prag\+lag)-(.+)$")
_DYN = re.compile(r"^dyn(\d+(?:\.\d*)?|\.\d+)$")


def mode_help() -> str:
    return (f"modes: {', '.join(BASE_MODES)}; variants of {', '.join(ROUTED_BASES)} with suffixes -k<int> "
            "(lag-based), -seq-mass / -seq-vote (sequence-level routing), -dyn<margin> (dynamic k, "
            "lag-based), -req (request-centred scoring), -sl<M> (two-level: a shortlist of M per sequence), "
            "-w<weight> (the token's weight against the shortlist prior), -mod (per-module shortlists, no "
            "pre-pass), -cal<calibration> (score "
            f"calibration: {', '.join(SCORE_CALIBRATIONS)}) with -refreq (request reference), -m<dims> "
            "(subspace), -b<beta> (isoftmax / sinkhorn), e.g. lag-seq-mass, spectr-seq-mass, lag-dyn0.9, "
            "lag-k5, lag-req, lag-req-sl2, lag-req-sl2-w0.5, lag-calzscore, lag-calsubspace-m4")


def parse_mode(name: str, k: int = 20) -> ModeSpec:
    """A mode name (see the module docstring) -> :class:`ModeSpec`; :class:`ConfigError` if unknown. The
    values of its routing are checked by ``LAGConfig(**spec.routing)``
    (:func:`llama_index_lag.eval.harness.parse_mode` does both)."""
    name = ALIASES.get(str(name).strip(), str(name).strip())
    if name in EVAL_BASES:
        prompt, knowledge, mode = EVAL_BASES[name]
        return ModeSpec(name, name, prompt, knowledge, {"mode": mode, "k": k})
    match = _VARIANT.match(name)
    if not match:
        raise ConfigError(f"unknown mode {name!r}; {mode_help()}", field="modes")
    base, rest = match.groups()
    prompt, knowledge, mode = EVAL_BASES[base]
    routing: dict[str, Any] = {"mode": mode, "k": k}
    parts = rest.split("-")
    seen: set[str] = set()
    i = 0
    while i < len(parts):
        part = parts[i]
        if part == "seq" and i + 1 < len(parts) and parts[i + 1] in ("mass", "vote"):
            what, value = "seq", {"granularity": "sequence", "sequence_score": parts[i + 1]}
            i += 2
        elif re.fullmatch(r"k\d+", part):
            if base not in LAG_BASES:
                raise ConfigError(f"mode {name!r}: -k applies to lag-based modes ({', '.join(LAG_BASES)})",
                                  field="modes")
            what, value = "k", {"k": int(part[1:])}
            i += 1
        elif part == "req":
            what, value = "cal", {"calibration": "request"}
            i += 1
        elif part.startswith("cal") and part[3:] in SCORE_CALIBRATIONS:
            what, value = "cal", {"calibration": part[3:]}
            i += 1
        elif part == "refreq":
            what, value = "ref", {"calibration_reference": "request"}
            i += 1
        elif re.fullmatch(r"m\d+", part):
            what, value = "m", {"subspace_dims": int(part[1:])}
            i += 1
        elif re.fullmatch(r"b\d+(?:\.\d*)?", part):
            what, value = "b", {"calibration_beta": float(part[1:])}
            i += 1
        elif part == "mod":
            what, value = "mod", {"sequence_scope": "module"}
            i += 1
        elif re.fullmatch(r"sl\d+", part):
            what, value = "sl", {"shortlist": int(part[2:])}
            i += 1
        elif re.fullmatch(r"w\d+(?:\.\d*)?", part):
            what, value = "w", {"shortlist_weight": float(part[1:])}
            i += 1
        elif _DYN.match(part):
            if base not in LAG_BASES:
                raise ConfigError(f"mode {name!r}: dynamic k (-dyn) applies to lag-based modes "
                                  f"({', '.join(LAG_BASES)})", field="modes")
            what, value = "dyn", {"dynamic_k": float(part[3:])}
            i += 1
        else:
            raise ConfigError(f"unknown mode {name!r}: bad suffix {part!r}; {mode_help()}", field="modes")
        if what in seen:
            raise ConfigError(f"mode {name!r} repeats its -{what} suffix", field="modes")
        seen.add(what)
        routing.update(value)
    return ModeSpec(name, base, prompt, knowledge, routing)


def split_modes(modes: str | Sequence[str]) -> list[str]:
    """Comma-separated (or a list of) mode names -> names, duplicates dropped, order kept."""
    names = [m.strip() for m in (modes.split(",") if isinstance(modes, str) else modes) if m and m.strip()]
    if not names:
        raise ConfigError("no modes given", field="modes")
    return list(dict.fromkeys(names))


__all__ = [
    "ALIASES",
    "BASE_MODES",
    "DEFAULT_MODES",
    "DEMO_MODES",
    "EVAL_BASES",
    "LAG_BASES",
    "LAG_METHODS",
    "PIPELINE_MODES",
    "RETRIEVAL_MODES",
    "ROUTED_BASES",
    "ROUTING_MODES",
    "SCORE_CALIBRATIONS",
    "ModeSpec",
    "mode_help",
    "parse_mode",
    "split_modes",
]
