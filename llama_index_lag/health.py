"""Routing health of an adapter library: how much input subspace its adapters share, and whether per-token
routing collapses onto a few "hub" adapters.

Two parts:

* **Spectrum** (the library alone). Per module, the mean input projector ``P = (1/N) sum_i A*_i^T A*_i``
  (A*_i has orthonormal rows, so ``trace(P)`` is the mean rank r). Isotropic adapters give eigenvalues near
  ``r / n``; a few eigenvalues far above it are a subspace that every adapter covers, so a generic token
  scores high for all of them. Per adapter, its overlap with that shared subspace
  ``h_i = ||A*_i U_c||_F^2 / r_i`` (U_c: the top-m eigenvectors of P), averaged over modules.
* **Hubness** (with unlabelled prompts and a model). The prompts are routed and each adapter's wins
  ``N_i`` (token x module selections) are counted. Their skewness is the k-occurrence skewness of the
  hubness literature (0 for even use, large when a few adapters win most); also the top hubs, the share of
  the top 1 % of adapters, and the correlation of ``N_i`` with ``h_i`` (high: the shared subspace is what
  makes the hubs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .library.store import AdapterLibrary

SHARED_M = 8  # eigenvectors of P taken as the shared subspace
MAX_SPECTRUM_ADAPTERS = 2048  # adapters sampled to estimate P (the overlaps use every adapter)
HUB_SKEWNESS = 2.0  # win-count skewness above which routing is flagged hub-dominated
HUB_TOP_SHARE = 5.0  # ... or when the top 1 % of adapters take this many times their even share


def module_spectrum(A: torch.Tensor, ranks: torch.Tensor, m: int = SHARED_M,
                    sample: torch.Tensor | None = None) -> dict[str, Any]:
    """Spectrum of ``P`` and the overlaps of one module. A [N, r, n] (zero rows past each rank), ranks [N]."""
    N, r, n = A.shape
    rows = A if sample is None else A[sample]
    flat = rows.reshape(-1, n).float()  # [N' r, n]
    # eigenvalues of P = flat^T flat / N' are the squared singular values of flat / sqrt(N')
    _, s, vh = torch.linalg.svd(flat / math.sqrt(rows.shape[0]), full_matrices=False)
    eig = s.square()  # [min(N' r, n)] descending
    m = min(m, eig.numel())
    U = vh[:m].T  # [n, m] shared subspace
    overlap = (A.float() @ U).square().sum(dim=(1, 2)) / ranks.clamp_min(1).float()  # [N]
    mean_rank = float(ranks.float().mean())
    iso = mean_rank / n
    return {"eigenvalues": [round(float(v), 6) for v in eig[:m]], "isotropic": round(iso, 6),
            "top_ratio": round(float(eig[0]) / iso, 3),
            "shared_mass": round(float(eig[:m].sum()) / mean_rank, 4), "overlap": overlap}


def library_spectrum(lib: AdapterLibrary, m: int = SHARED_M, modules: Sequence[str] | None = None,
                     seed: int = 0) -> dict[str, Any]:
    """Per module and overall: P's top eigenvalues against isotropic r/n, the share of the mean rank in
    the top m eigenvectors, and each adapter's overlap with them (mean over modules)."""
    ranks = torch.tensor([int(e["rank"]) for e in lib.adapters])
    sample = None
    if len(lib) > MAX_SPECTRUM_ADAPTERS:
        g = torch.Generator().manual_seed(seed)
        sample = torch.randperm(len(lib), generator=g)[:MAX_SPECTRUM_ADAPTERS].sort().values
    per_module, overlaps = {}, []
    for module in modules or lib.modules:
        present = lib.present(module)
        spec = module_spectrum(lib.tensors(module).A, ranks, m, sample)
        overlap = spec.pop("overlap")
        if present is not None:
            overlap = torch.where(present, overlap, torch.nan)
        overlaps.append(overlap)
        per_module[module] = spec
    overlap = torch.stack(overlaps).nanmean(dim=0)  # [N]
    ratios = torch.tensor([s["top_ratio"] for s in per_module.values()])
    masses = torch.tensor([s["shared_mass"] for s in per_module.values()])
    return {"m": m, "modules": per_module, "overlap": overlap,
            "top_ratio": {"median": round(float(ratios.median()), 3), "max": round(float(ratios.max()), 3)},
            "shared_mass": {"median": round(float(masses.median()), 4), "max": round(float(masses.max()), 4)}}


def hubness(counts: torch.Tensor, names: Sequence[str], top: int = 5) -> dict[str, Any]:
    """Hubness of per-adapter win counts [N]: skewness, top hubs, share of the top 1 %, even share."""
    c = counts.double()
    N, total = c.numel(), float(c.sum())
    mean, std = c.mean(), c.std(unbiased=False)
    skew = float(((c - mean) ** 3).mean() / std**3) if std > 0 else 0.0
    n_top = max(1, math.ceil(0.01 * N))
    order = torch.argsort(c, descending=True, stable=True)
    top_share = float(c[order[:n_top]].sum()) / total if total else 0.0
    return {
        "selections": int(total), "skewness": round(skew, 3), "top1pct_adapters": n_top,
        "top1pct_share": round(top_share, 4), "even_share": round(n_top / N, 4),
        "never_selected": int((c == 0).sum()),
        "hubs": [{"adapter": names[i], "share": round(float(c[i]) / total, 4)} for i in order[:top].tolist()
                 if total and c[i] > 0],
        "hub_dominated": bool(skew > HUB_SKEWNESS or top_share > HUB_TOP_SHARE * n_top / N),
    }


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok].double(), b[ok].double()
    if a.numel() < 3 or a.std() == 0 or b.std() == 0:
        return None
    return round(float(torch.corrcoef(torch.stack([a, b]))[0, 1]), 4)


def route_prompts(model: Any, tokenizer: Any, libraries: Sequence[AdapterLibrary], prompts: Sequence[str],
                  config: Any = None, chat: bool | None = None) -> dict[str, torch.Tensor]:
    """Route each prompt (chat template applied when the tokenizer has one and ``chat`` is not False)
    through ``model`` with ``libraries`` attached under ``config`` (default ``LAGConfig()``): per library
    kind, the [N] win counts over every (prompt token x module)."""
    from .config import LAGConfig
    from .router import attach_lag

    config = config or LAGConfig()
    router = attach_lag(model, list(libraries), config)
    use_chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    try:
        with torch.no_grad(), router.trace(keep_tokens=False) as trace:
            for prompt in prompts:
                if use_chat:
                    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                        add_generation_prompt=True, return_tensors="pt",
                                                        return_dict=True)["input_ids"]
                else:
                    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                model(input_ids=ids)
        return {kind: trace.counts(kind) for kind in trace.kinds}
    finally:
        router.detach()


@dataclass
class HealthReport:
    """What :meth:`AdapterLibrary.health` found (``to_dict()`` for JSON, ``plot()`` for a PNG)."""

    path: str
    adapters: list[str]
    spectrum: dict[str, Any]
    routing: dict[str, Any] | None = None  # hubness of the routed prompts
    counts: torch.Tensor | None = None  # [N] wins per adapter
    flags: list[str] = field(default_factory=list)

    @property
    def hub_dominated(self) -> bool:
        return bool(self.routing and self.routing["hub_dominated"])

    def to_dict(self, per_module: bool = False) -> dict[str, Any]:
        spectrum = {k: v for k, v in self.spectrum.items() if k not in ("overlap", "modules")}
        overlap = self.spectrum["overlap"]
        order = torch.argsort(torch.nan_to_num(overlap, nan=-1.0), descending=True)
        spectrum["most_overlapping"] = [{"adapter": self.adapters[i], "overlap": round(float(overlap[i]), 4)}
                                        for i in order[:5].tolist()]
        spectrum["overlap_mean"] = round(float(overlap.nanmean()), 4)
        if per_module:
            spectrum["modules"] = self.spectrum["modules"]
        out = {"path": self.path, "adapters": len(self.adapters), "spectrum": spectrum,
               "routing": self.routing, "flags": self.flags}
        if self.counts is not None:
            out["wins"] = {name: int(c) for name, c in zip(self.adapters, self.counts.tolist())}
        return out

    def plot(self, path: str | Path) -> Path:
        """Bar chart of win counts (sorted) and overlaps: a PNG at ``path``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        fig, axes = plt.subplots(1, 2 if self.counts is not None else 1, figsize=(12, 4), squeeze=False)
        overlap = torch.nan_to_num(self.spectrum["overlap"], nan=0.0)
        if self.counts is not None:
            order = torch.argsort(self.counts, descending=True, stable=True)
            ax = axes[0][0]
            ax.bar(range(len(order)), (self.counts[order].double() / max(int(self.counts.sum()), 1)).tolist())
            ax.axhline(1 / len(order), color="grey", linestyle="--", label="even share")
            ax.set(title=f"wins per adapter (skewness {self.routing['skewness']})",
                   xlabel="adapters, by wins", ylabel="share of selections")
            ax.legend()
            ax = axes[0][1]
            ax.scatter(overlap.tolist(), self.counts.tolist(), s=10)
            ax.set(title="wins vs overlap with the shared subspace (r = "
                         f"{self.routing.get('wins_overlap_r')})",
                   xlabel="overlap h_i", ylabel="wins N_i")
        else:
            ax = axes[0][0]
            ax.bar(range(len(overlap)), sorted(overlap.tolist(), reverse=True))
            ax.set(title="overlap with the shared subspace", xlabel="adapters", ylabel="h_i")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def library_health(lib: AdapterLibrary, model: Any = None, prompts: Sequence[str] | None = None, *,
                   tokenizer: Any = None, config: Any = None, m: int = SHARED_M) -> HealthReport:
    """See :meth:`AdapterLibrary.health`."""
    spectrum = library_spectrum(lib, m)
    report = HealthReport(str(lib.path), lib.names, spectrum)
    iso_ratio = spectrum["top_ratio"]["median"]
    if iso_ratio > 10:
        report.flags.append(f"shared input subspace: P's top eigenvalue is {iso_ratio:.0f}x the isotropic "
                            "r/n (median over modules)")
    if prompts:
        if model is None or isinstance(model, (str, Path)):
            from .models import load_causal_lm

            model, tokenizer = load_causal_lm(model)
        if tokenizer is None:
            from .errors import ConfigError

            raise ConfigError("health(model=<loaded model>, prompts=...) needs tokenizer=", field="tokenizer")
        counts = route_prompts(model, tokenizer, [lib], prompts, config)[lib.kind]
        report.counts = counts
        report.routing = hubness(counts, lib.names)
        report.routing["prompts"] = len(prompts)
        report.routing["wins_overlap_r"] = _pearson(counts.double(), spectrum["overlap"].double())
        if report.routing["hub_dominated"]:
            hub = report.routing["hubs"][0]
            report.flags.append(f"hub-dominated routing: {hub['adapter']} wins {100 * hub['share']:.1f} % of "
                                f"the selections (even share {100 / len(lib):.1f} %), skewness "
                                f"{report.routing['skewness']}")
    return report


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one per line) or a ``.jsonl`` file (``question``, ``prompt`` or
    ``text`` of each object)."""
    import json

    from .errors import DataError

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read prompts: {exc}", path=path) from None
    if path.suffix != ".jsonl":
        return [line for line in lines if line.strip()]
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            raise DataError("invalid JSON", path=path, line=lineno) from None
        text = next((obj[k] for k in ("question", "prompt", "text") if isinstance(obj, dict)
                     and isinstance(obj.get(k), str)), None)
        if text is None:
            raise DataError("expected an object with a 'question', 'prompt' or 'text' string", path=path,
                            line=lineno)
        out.append(text)
    return out
