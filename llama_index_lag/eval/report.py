"""Tables and plots of a ``lag eval`` run: pure functions of ``results.json``.

:func:`summarize` scores every answer again from its text and the gold answers (SQuAD-normalised exact match,
token F1, contains for short-answer tasks; true/false accuracy for label tasks) and aggregates per mode and
task, the normalised score of the LAG paper (Eq. 9, % of the Oracle's score per task, AVG = mean over tasks),
routing accuracy, retrieval hit@1 and throughput. :func:`render_markdown` lays it out like the paper's
normalised table; :func:`write_report` writes ``results.md`` and the PNG plots (matplotlib, Agg backend), so a
report can be re-rendered at any time from ``results.json`` alone (``lag eval --render-only``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .metrics import contains_match, exact_match, label_accuracy, normalised_score, token_f1

REPORT_FILE = "results.md"
SWEEP_PLOT = "k_sweep.png"
DYNAMIC_PLOT = "dynamic_k.png"
_QA_KEYS = {"f1": "f1", "em": "em", "contains": "contains"}


# ---- scoring ----------------------------------------------------------------------------------------------
def score_answer(answer: str, golds: Sequence[str], label: bool) -> dict[str, float]:
    """Per-answer scores: ``{"accuracy"}`` for a label task, else ``{"em", "f1", "contains"}``."""
    answer = answer or ""
    if label:
        return {"accuracy": label_accuracy(answer, list(golds))}
    return {"em": exact_match(answer, list(golds)), "f1": token_f1(answer, list(golds)),
            "contains": contains_match(answer, list(golds))}


ORACLES = ("oracle", "oracle-knowledge")
INFORMATIVE_MARGIN = 0.10  # a label task counts in AVG when the better Oracle beats chance by this much


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def primary_key(label: bool, qa_metric: str) -> str:
    """The metric a task is normalised by: accuracy for label tasks, ``qa_metric`` otherwise."""
    return "accuracy" if label else _QA_KEYS[qa_metric]


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Aggregate a results dict (see :mod:`.harness`) into per-mode tables. Pure; ignores
    ``results["summary"]``."""
    qa_metric = results.get("settings", {}).get("qa_metric", "f1")
    questions = {q["id"]: q for q in results["questions"]}
    tasks: dict[str, Any] = results["tasks"]
    modes = [m["name"] for m in results["modes"]]
    by_mode = _answers_by_mode(results["answers"], modes, questions)

    def scores(rec: Mapping[str, Any]) -> dict[str, float]:
        q = questions[rec["qid"]]
        return score_answer(rec["answer"], q["answers"], tasks[q["task"]]["label"])

    scored = {m: {qid: scores(rec) for qid, rec in recs.items()} for m, recs in by_mode.items()}
    oracles = [m for m in ORACLES if by_mode.get(m)]
    oracle_by_task = _oracle_by_task(tasks, oracles, scored, questions, qa_metric)
    oracle = oracles[0] if oracles else None
    uninformative = _uninformative_tasks(tasks, oracle_by_task, scored, questions)
    names = results.get("knowledge_names") or []
    out_modes: dict[str, Any] = {}
    for m in modes:
        entry = _mode_entry(by_mode[m], scored[m], tasks, questions, qa_metric)
        entry["normalised"] = {task: _normalised(task, info, primary_key(info["label"], qa_metric), scored[m],
                                                 scored[oracle_by_task[task]], questions)
                               for task, info in tasks.items() if task in oracle_by_task}
        values = [v for t, v in entry["normalised"].items()
                  if v is not None and not math.isnan(v) and t not in uninformative]
        entry["avg"] = sum(values) / len(values) if values else None
        entry["primary_avg"] = _mean([t["primary"] for t in entry["tasks"].values() if t["n"]])
        entry.update(_routing_and_speed(by_mode[m], questions, names))
        out_modes[m] = entry
    spec = {m["name"]: m for m in results["modes"]}
    return {
        "qa_metric": qa_metric,
        "oracle": oracle is not None,
        "oracle_by_task": oracle_by_task,
        "uninformative": uninformative,
        "tasks": {t: {"label": i["label"], "n": i["n"], "metric": primary_key(i["label"], qa_metric)}
                  for t, i in tasks.items()},
        "chance_share": 1.0 / results["knowledge_adapters"] if results.get("knowledge_adapters") else None,
        "modes": out_modes,
        "sweep": [{**p, **_point(out_modes[p["mode"]])} for p in (results.get("sweep") or [])
                  if p["mode"] in out_modes],
        "dynamic": [{"mode": m, "k": spec[m]["routing"].get("k"),
                     "margin": spec[m]["routing"].get("dynamic_k"), **_point(out_modes[m])}
                    for m in modes if _is_dynamic_row(spec[m])],
    }


def _answers_by_mode(answers: Sequence[Mapping[str, Any]], modes: Sequence[str],
                     questions: Mapping[str, Any]) -> dict[str, dict[str, Mapping[str, Any]]]:
    """mode -> question id -> answer record, for the run's modes and questions (the last record wins)."""
    by_mode: dict[str, dict[str, Mapping[str, Any]]] = {m: {} for m in modes}
    for rec in answers:
        if rec["mode"] in by_mode and rec["qid"] in questions:
            by_mode[rec["mode"]][rec["qid"]] = rec
    return by_mode


def _task_mean(scores: Mapping[str, Mapping[str, float]], questions: Mapping[str, Any], task: str,
               key: str) -> float | None:
    """Mean of metric ``key`` over the scored questions of ``task``."""
    return _mean([sc[key] for qid, sc in scores.items() if questions[qid]["task"] == task])


def _oracle_by_task(tasks: Mapping[str, Any], oracles: Sequence[str], scored: Mapping[str, Any],
                    questions: Mapping[str, Any], qa_metric: str) -> dict[str, str]:
    """Each task's normalising Oracle: the better of gold knowledge + task adapter, or gold knowledge alone
    (the first of ``oracles`` on a tie)."""
    oracle_by_task: dict[str, str] = {}
    for task, info in tasks.items():
        key = primary_key(info["label"], qa_metric)
        best = None
        for m in oracles:
            value = _task_mean(scored[m], questions, task, key)
            if value is not None and (best is None or value > best[0]):
                best = (value, m)
        if best is not None:
            oracle_by_task[task] = best[1]
    return oracle_by_task


def _uninformative_tasks(tasks: Mapping[str, Any], oracle_by_task: Mapping[str, str],
                         scored: Mapping[str, Any], questions: Mapping[str, Any]) -> list[str]:
    """Label tasks the better Oracle itself answers at chance (majority label + ``INFORMATIVE_MARGIN``):
    they measure nothing, so they are reported but left out of AVG."""
    uninformative = []
    for task, info in tasks.items():
        if info["label"] and task in oracle_by_task:
            golds = [questions[qid]["answers"][0] for qid in questions if questions[qid]["task"] == task]
            chance = max(golds.count(g) for g in set(golds)) / len(golds) if golds else 0.0
            best = _task_mean(scored[oracle_by_task[task]], questions, task, "accuracy")
            if best is not None and best < chance + INFORMATIVE_MARGIN:
                uninformative.append(task)
    return uninformative


def _mode_entry(recs: Mapping[str, Mapping[str, Any]], sc: Mapping[str, Mapping[str, float]],
                tasks: Mapping[str, Any], questions: Mapping[str, Any], qa_metric: str) -> dict[str, Any]:
    """A mode's answer counts and per-task metrics (mean over its questions; ``primary``: the task's
    metric); normalised scores and AVG are filled in by :func:`summarize`."""
    entry: dict[str, Any] = {"n": len(recs), "errors": sum(1 for r in recs.values() if r.get("error")),
                             "tasks": {}, "normalised": {}, "avg": None}
    for task, info in tasks.items():
        qids = [qid for qid in sc if questions[qid]["task"] == task]
        t: dict[str, Any] = {"n": len(qids)}
        metric_names = ("accuracy",) if info["label"] else ("em", "f1", "contains")
        for name in metric_names:
            t[name] = _mean([sc[qid][name] for qid in qids])
        t["primary"] = t.get(primary_key(info["label"], qa_metric))
        entry["tasks"][task] = t
    return entry


def _routing_and_speed(recs: Mapping[str, Mapping[str, Any]], questions: Mapping[str, Any],
                       names: list[str]) -> dict[str, Any]:
    """A mode's routing accuracy (with hubness), retrieval hit@1, generated tokens, seconds, throughput and
    mean candidates per token."""
    acc = [r["routing_accuracy"] for r in recs.values() if r.get("routing_accuracy")]
    out: dict[str, Any] = {}
    out["routing"] = None if not acc else {
        "n": len(acc),
        "gold_share": _mean([a["gold_share"] for a in acc]),
        "gold_top": _mean([float(a["gold_top"]) for a in acc]),
        "gold_rank": _mean([a["gold_rank"] for a in acc]),
        "hubness": _hubness(acc, names),
    }
    hits = [r["retrieved"][0]["doc_id"] == questions[qid]["doc_id"] for qid, r in recs.items()
            if r.get("retrieved")]
    out["retrieval_hit1"] = _mean([float(h) for h in hits]) if hits else None
    tokens = sum(int(r.get("new_tokens") or 0) for r in recs.values())
    seconds = sum(float(r.get("seconds") or 0.0) for r in recs.values())
    out["new_tokens"], out["seconds"] = tokens, round(seconds, 4)
    out["tokens_per_s"] = tokens / seconds if seconds > 0 else None
    cands = [r["mean_candidates"] for r in recs.values() if r.get("mean_candidates") is not None]
    out["mean_candidates"] = _mean(cands)
    return out


def _hubness(acc: list[Mapping[str, Any]], names: list[str]) -> dict[str, Any] | None:
    """Hubness of a mode's prompt routing: the wins of every knowledge adapter summed over the questions."""
    import torch

    from ..health import hubness

    wins = [a["wins"] for a in acc if "wins" in a]
    if not wins or not names:
        return None
    counts = torch.zeros(len(names), dtype=torch.long)
    for w in wins:
        for j, v in w.items():
            counts[int(j)] += int(v)
    out = hubness(counts, names, top=3)
    return {k: out[k] for k in ("skewness", "top1pct_share", "even_share", "hubs", "hub_dominated",
                                "never_selected")}


def _is_dynamic_row(spec: Mapping[str, Any]) -> bool:
    """Question-only token-level LAG modes: the static-k points and the dynamic-k ones."""
    r = spec["routing"]
    return spec["base"] == "lag" and r.get("granularity", "token") == "token"


def _point(entry: Mapping[str, Any]) -> dict[str, Any]:
    routing = entry.get("routing") or {}
    return {"avg": entry.get("avg"), "primary_avg": entry.get("primary_avg"),
            "normalised": entry.get("normalised"), "gold_share": routing.get("gold_share"),
            "gold_top": routing.get("gold_top"), "mean_candidates": entry.get("mean_candidates"),
            "tokens_per_s": entry.get("tokens_per_s")}


def _normalised(task: str, info: Mapping[str, Any], key: str, mode_scores: Mapping[str, Any],
                oracle_scores: Mapping[str, Any], questions: Mapping[str, Any]) -> float | None:
    """Eq. 9 for one task, in %, over the questions answered in both the mode and the Oracle."""
    mode_f, oracle_f, sizes = {}, {}, {}
    for ds in info["datasets"]:
        qids = [qid for qid in mode_scores if qid in oracle_scores and questions[qid]["task"] == task
                and questions[qid].get("dataset", task) == ds]
        sizes[ds] = len(qids)
        mode_f[ds] = _mean([mode_scores[q][key] for q in qids]) or 0.0
        oracle_f[ds] = _mean([oracle_scores[q][key] for q in qids]) or 0.0
    # a dataset the Oracle scores 0 on has no ratio (Eq. 9): left out here, silently (the report says so)
    sizes = {ds: (n if oracle_f[ds] > 0 else 0) for ds, n in sizes.items()}
    if not any(sizes.values()):
        return None
    value = normalised_score(mode_f, oracle_f, sizes)
    return None if math.isnan(value) else 100.0 * value


# ---- markdown ---------------------------------------------------------------------------------------------
def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.{digits}f}"


def _num(v: float | None, digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:"
                                                              for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def _label(mode: str, spec: Mapping[str, Any]) -> str:
    routing = spec.get("routing") or {}
    if spec.get("base") in ("lag", "rag+lag", "prag+lag") and "dyn" not in mode:
        return f"{mode} (k={routing.get('k')})"
    return mode


def render_markdown(results: Mapping[str, Any]) -> str:
    """``results.md``: normalised table (paper layout), metrics + routing + speed, k sweep, dynamic k."""
    s = summarize(results)
    specs = {m["name"]: m for m in results["modes"]}
    tasks = list(s["tasks"])
    lines = _md_header(results, s)
    lines += _md_normalised(s, specs, tasks)
    lines += _md_metrics(s, tasks)
    lines += _md_sweep(s, tasks)
    lines += _md_dynamic(s)
    lines += _md_skipped(results.get("skipped") or [])
    return "\n".join(lines).rstrip() + "\n"


def _md_header(results: Mapping[str, Any], s: Mapping[str, Any]) -> list[str]:
    """Title and the run's settings: questions, adapters, model, task metrics, machine, completeness."""
    settings = results.get("settings", {})
    lines = ["# lag eval results", ""]
    lines.append(f"- questions: {len(results['questions'])} evaluated"
                 + (f", {len(results.get('skipped') or [])} skipped" if results.get("skipped") else "")
                 + f" ({settings.get('questions')}); knowledge adapters: {results.get('knowledge_adapters')}"
                 + (f"; task adapters: {results.get('task_adapters')}" if results.get("task_adapters")
                    else ""))
    lines.append(f"- model: {settings.get('model') or 'default (SmolLM2-135M-Instruct)'}; greedy, "
                 f"max_new_tokens={settings.get('max_new_tokens')}, batch_size={settings.get('batch_size')}, "
                 f"k={settings.get('k')}, similarity_top_k={settings.get('similarity_top_k')}")
    metric_line = ", ".join(f"{t}: {i['metric']}" for t, i in s["tasks"].items())
    lines.append(f"- task metric (f_D in Eq. 9): {metric_line}")
    machine = results.get("machine") or {}
    if machine:
        lines.append(f"- machine: {machine.get('cpu')}, {machine.get('torch_threads')} torch threads, "
                     f"torch {machine.get('torch')}; {results.get('created', '')}")
    if not results.get("complete", True):
        lines.append("- **incomplete run**: some (mode, question) answers are missing")
    lines.append("")
    return lines


def _md_normalised(s: Mapping[str, Any], specs: Mapping[str, Any], tasks: list[str]) -> list[str]:
    """The paper's table: % of the Oracle per task, AVG and throughput per mode (or why there is none)."""
    lines = ["## Normalised score (% of Oracle, Eq. 9)", ""]
    if not s["oracle"]:
        return [*lines, "(no `oracle` mode in this run: the normalised score needs it)", ""]
    lines.append("Each task is normalised by the better of its Oracles (gold knowledge adapter + task "
                 "adapter, `oracle`; gold knowledge adapter alone, `oracle-knowledge`): "
                 + ", ".join(f"{t}: `{m}`" for t, m in s["oracle_by_task"].items()) + ".")
    lines.append("")
    if s["uninformative"]:
        lines.append(f"Left out of AVG: {', '.join(s['uninformative'])} (the better Oracle answers it "
                     f"within {100 * INFORMATIVE_MARGIN:.0f} points of chance, so its scores "
                     "measure nothing).")
        lines.append("")
    zero = [t for t, m in s["oracle_by_task"].items()
            if s["modes"][m]["tasks"][t]["n"] and not s["modes"][m]["tasks"][t]["primary"]]
    rows = [[_label(m, specs[m])] + [_num(e["normalised"].get(t)) for t in tasks]
            + [_num(e["avg"]), _num(e["tokens_per_s"])] for m, e in s["modes"].items()]
    lines += _table(["% of Oracle"] + tasks + ["AVG", "tokens/s"], rows)
    if zero:
        lines += ["", f"The Oracle scores 0 on {', '.join(zero)}: no ratio there (–), AVG over the "
                      "other tasks."]
    lines.append("")
    return lines


def _md_metrics(s: Mapping[str, Any], tasks: list[str]) -> list[str]:
    """Answer metrics per task, routing accuracy, hubness, hit@1, throughput and errors per mode."""
    lines = ["## Answer metrics, routing accuracy and speed", ""]
    header = ["Mode", "n"]
    for t in tasks:
        header += [f"{t} acc"] if s["tasks"][t]["label"] else [f"{t} EM", f"{t} F1", f"{t} contains"]
    header += ["gold share", "gold top", "skewness", "top hub", "hit@1", "tokens/s", "errors"]
    lines += _table(header, [_metrics_row(m, e, s, tasks) for m, e in s["modes"].items()])
    chance = s.get("chance_share")
    lines += ["", "Metrics in %. *gold share*: share of (prompt token x knowledge module) selections that "
              "went to the gold document's adapter (chance "
              + (f"{100 * chance:.1f}%" if chance else "1/N")
              + "); *gold top*: % of questions whose gold adapter "
              "was strictly the most selected; *skewness*: of the knowledge adapters' wins summed over the "
              "questions (the k-occurrence skewness of hubness; 0 = even use); *top hub*: the most selected "
              "adapter and its % of the selections; *hit@1*: top retrieved document is the gold one; "
              "*tokens/s*: generated tokens per second of batched generation (oracle / prag batch only the "
              "questions sharing an adapter, so their batches are smaller); *errors*: queries the pipeline "
              "refuses (e.g. PRAG retrieved a document without adapter), scored 0.", ""]
    return lines


def _metrics_row(m: str, e: Mapping[str, Any], s: Mapping[str, Any], tasks: list[str]) -> list[str]:
    """One mode's row of :func:`_md_metrics`."""
    row = [m, str(e["n"])]
    for t in tasks:
        te = e["tasks"][t]
        if s["tasks"][t]["label"]:
            row.append(_pct(te.get("accuracy")))
        else:
            row += [_pct(te.get("em")), _pct(te.get("f1")), _pct(te.get("contains"))]
    r = e["routing"] or {}
    hub = r.get("hubness") or {}
    top = hub.get("hubs") or [{}]
    hub_cell = f"{top[0]['adapter']} {100 * top[0]['share']:.1f}" if top[0] else "–"
    row += [_pct(r.get("gold_share")), _pct(r.get("gold_top")), _num(hub.get("skewness")), hub_cell,
            _pct(e["retrieval_hit1"]), _num(e["tokens_per_s"]), str(e["errors"]) if e["errors"] else ""]
    return row


def _md_sweep(s: Mapping[str, Any], tasks: list[str]) -> list[str]:
    """The k sweep (Fig. 3) table and plot, when the run has one."""
    if not s["sweep"]:
        return []
    norm_cols = ["AVG % of Oracle"] if s["oracle"] else []
    rows = []
    for p in s["sweep"]:
        per_task = [_num((p.get("normalised") or {}).get(t)) for t in tasks] if s["oracle"] else []
        norm = [_num(p["avg"])] if s["oracle"] else []
        rows.append([p["label"], p["mode"], *per_task, *norm, _pct(p["primary_avg"]),
                     _pct(p["gold_share"]), _pct(p["gold_top"]), _num(p["mean_candidates"], 2),
                     _num(p["tokens_per_s"])])
    task_cols = [f"{t} % of Oracle" for t in tasks] if s["oracle"] else []
    lines = ["## k sweep (LAG, Fig. 3)", ""]
    lines += _table(["k", "mode", *task_cols, *norm_cols, "mean task score %", "gold share", "gold top",
                     "avg candidates", "tokens/s"], rows)
    return [*lines, "", f"![k sweep]({SWEEP_PLOT})", ""]


def _md_dynamic(s: Mapping[str, Any]) -> list[str]:
    """Quality vs candidates reranked per token, static and dynamic k, when the run has dynamic-k modes."""
    if not any(d["margin"] is not None for d in s["dynamic"]):
        return []
    norm_cols = ["AVG % of Oracle"] if s["oracle"] else []
    rows = []
    for d in sorted(s["dynamic"], key=lambda d: (d["mean_candidates"] is None, d["mean_candidates"] or 0)):
        norm = [_num(d["avg"])] if s["oracle"] else []
        rows.append([d["mode"], str(d["k"]), "static" if d["margin"] is None else f"{d['margin']:g}",
                     _num(d["mean_candidates"], 2), *norm, _pct(d["primary_avg"]), _pct(d["gold_share"]),
                     _num(d["tokens_per_s"])])
    lines = ["## Dynamic k (quality vs candidates reranked per token)", ""]
    lines += _table(["mode", "k (max)", "margin", "avg candidates", *norm_cols, "mean task score %",
                     "gold share", "tokens/s"], rows)
    return [*lines, "", "*avg candidates*: knowledge adapters reranked per token and module (dynamic k: "
            "batch average over prompt and generated tokens; static k: min(k, N)); *mean task score*: mean "
            "over tasks of the task metric.", "", f"![dynamic k]({DYNAMIC_PLOT})", ""]


def _md_skipped(skipped: Sequence[Mapping[str, Any]]) -> list[str]:
    """The questions left out (the first 50), when there are any."""
    if not skipped:
        return []
    lines = ["## Skipped questions", ""]
    lines += [f"- `{q['id']}` ({q['doc_id']}): {q['reason']}" for q in skipped[:50]]
    if len(skipped) > 50:
        lines.append(f"- ... and {len(skipped) - 50} more")
    lines.append("")
    return lines


# ---- plots ------------------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    """Lay out, write (PNG, 110 dpi) and close a figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Score and routing accuracy vs k (log x), one PNG; None when the run has no sweep."""
    s = summarize(results)
    points = s["sweep"]
    if not points:
        return None
    plt = _pyplot()
    ks = [p["k"] for p in points]
    labels = [f"{p['k']} (N)" if p["label"] == "N" else str(p["k"]) for p in points]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if s["oracle"] and any(p["avg"] is not None for p in points):
        for t in s["tasks"]:
            ax1.plot(ks, [(p["normalised"] or {}).get(t) for p in points], marker="o", alpha=0.6, label=t)
        ax1.plot(ks, [p["avg"] for p in points], marker="o", color="black", linewidth=2, label="AVG")
        ax1.set_ylabel("% of Oracle")
    else:
        ax1.plot(ks, [None if p["primary_avg"] is None else 100 * p["primary_avg"] for p in points],
                 marker="o", color="black", label="mean task score")
        ax1.set_ylabel("score %")
    ax1.set_title("Answer quality vs k")
    share = [None if p["gold_share"] is None else 100 * p["gold_share"] for p in points]
    top = [None if p["gold_top"] is None else 100 * p["gold_top"] for p in points]
    ax2.plot(ks, share, marker="o", label="gold share")
    ax2.plot(ks, top, marker="s", label="gold is top")
    if s.get("chance_share"):
        ax2.axhline(100 * s["chance_share"], color="grey", linestyle="--", linewidth=1, label="chance (1/N)")
    ax2.set_ylabel("%")
    ax2.set_title("Routing accuracy vs k (prompt tokens)")
    for ax in (ax1, ax2):
        if len(set(ks)) > 1:
            ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels(labels)
        ax.minorticks_off()
        ax.set_xlabel("k (Arrow candidates reranked by SpectR)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dynamic(results: Mapping[str, Any], path: str | Path) -> Path | None:
    """Score vs average candidates per token: static k points and dynamic-k margins; None without dyn
    modes."""
    s = summarize(results)
    rows = [d for d in s["dynamic"] if d["mean_candidates"] is not None]
    if not any(d["margin"] is not None for d in rows):
        return None
    plt = _pyplot()
    normalised = s["oracle"] and any(d["avg"] is not None for d in rows)
    y = (lambda d: d["avg"]) if normalised else (lambda d: None if d["primary_avg"] is None
                                                 else 100 * d["primary_avg"])
    fig, ax = plt.subplots(figsize=(6, 4))
    static = sorted((d for d in rows if d["margin"] is None), key=lambda d: d["mean_candidates"])
    if static:
        ax.plot([d["mean_candidates"] for d in static], [y(d) for d in static], marker="o", label="static k")
        for d in static:
            ax.annotate(f"k={d['k']}", (d["mean_candidates"], y(d) or 0), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    dyn = [d for d in rows if d["margin"] is not None]
    ax.scatter([d["mean_candidates"] for d in dyn], [y(d) for d in dyn], marker="s", color="C3",
               label="dynamic k", zorder=3)
    for d in dyn:
        ax.annotate(f"m={d['margin']:g}", (d["mean_candidates"], y(d) or 0), fontsize=7, xytext=(3, -9),
                    textcoords="offset points")
    xs = [d["mean_candidates"] for d in rows]
    if min(xs) > 0 and max(xs) / min(xs) > 4:
        ax.set_xscale("log")
    ax.set_xlabel("average candidates per token (knowledge)")
    ax.set_ylabel("% of Oracle (AVG)" if normalised else "mean task score %")
    ax.set_title("Dynamic k: quality vs compute")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def write_report(results: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``results.md`` and the plots into ``out_dir``; returns the paths written."""
    from .._fs import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    sweep = plot_sweep(results, out / SWEEP_PLOT)
    if sweep is not None:
        written["k_sweep"] = sweep
    dynamic = plot_dynamic(results, out / DYNAMIC_PLOT)
    if dynamic is not None:
        written["dynamic_k"] = dynamic
    atomic_write_text(out / REPORT_FILE, render_markdown(results))
    written["markdown"] = out / REPORT_FILE
    return written


__all__ = ["plot_dynamic", "plot_sweep", "primary_key", "render_markdown", "score_answer", "summarize",
           "write_report"]
