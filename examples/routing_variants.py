"""The offline routing-variant study of BENCHMARKS.md ("Routing quality"): every data-free calibration of the
routing scores, measured on the base model's inputs to the knowledge modules for every benchmark question.

    python examples/routing_variants.py capture LIB_DIR acts.pt [--docs D.jsonl --questions Q.jsonl]
    python examples/routing_variants.py analyze acts.pt LIB_DIR [VARIANT,...]

``capture`` runs each question's prompt (as ``lag eval`` builds it) through the bare model and stores the
input of every adapted module (float16; about 2.5 GB for the 365 benchmark questions); ``analyze`` routes
those tokens under each variant and prints one JSON line per variant: gold share, gold top, k-occurrence
skewness, the top hub and its share. Variants score the same adapters with the same tokens, so the routing of
later layers sees the base model's activations (not the routed model's): a cheap, approximate screen, which
the chosen variants then pass through ``lag eval``. Variants: ``arrow``, ``spectr``, ``lag`` (the paper);
``zscore`` / ``csls`` / ``center`` (per-adapter statistics over a data-free reference: the other adapters'
right singular vectors; ``-spectr``: SpectR over all N); ``subspace-m`` (the top-m eigenvectors of the mean
projector projected out of the scores); ``zq`` / ``isoft-b`` / ``sinkhorn-b`` (normalised over the request's
tokens); ``xcenter`` (request-centred tokens); ``twolevel-M-c|z[-theta]`` (shortlist by score mass, then per
token, theta: a no-adapter threshold); ``xprior-M-w[-log]`` (request-centred two-level with the shortlist's
log mass share as prior: what ``LAGConfig.preset("two-level")`` implements).
"""
import argparse
import json
import math
import time

import torch

from llama_index_lag import AdapterLibrary
from llama_index_lag.eval.harness import EvalConfig, EvalHarness
from llama_index_lag.eval.synthetic import packaged_path


def capture(lib_dir: str, out: str, docs: str | None, questions: str | None, scratch: str) -> None:
    """Base-model inputs of every knowledge module for every question's prompt (adapters off)."""
    bench = packaged_path("benchmark")
    cfg = EvalConfig(docs=docs or bench / "documents.jsonl", questions=questions or bench / "questions.jsonl",
                     knowledge=lib_dir, out=scratch, modes="lag", max_new_tokens=32)
    h = EvalHarness(cfg, progress=False)
    h.prepare()
    model = h.view.model
    lib = h.router.pools["knowledge"].libraries[0]
    names, mods = lib.names, lib.modules
    store: dict[str, list[torch.Tensor]] = {m: [] for m in mods}
    cur: dict[str, torch.Tensor] = {}
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda mod, args, m=m: cur.__setitem__(m, args[0][0].to(torch.float16).clone())) for m in mods]
    meta = []
    t0 = time.time()
    with torch.no_grad(), h.router.using(mode="none"):
        for it in h.items:
            if it.prompt is None or it.error:
                continue
            enc = h._encoded(it.prompt)
            model(input_ids=enc["input_ids"])
            for m in mods:
                store[m].append(cur[m])
            q = it.question
            meta.append({"id": q.id, "task": q.task, "gold": names.index(h.doc_to_adapter[q.doc_id]),
                         "len": int(enc["input_ids"].shape[1]),
                         "focus": enc["focus"][0].tolist() if "focus" in enc else None})
    for hk in hooks:
        hk.remove()
    lens = [m["len"] for m in meta]
    print("questions", len(meta), "tokens", sum(lens), "s", round(time.time() - t0, 1))
    torch.save({"names": names, "modules": mods, "meta": meta,
                "x": {m: torch.cat(v) for m, v in store.items()}}, out)


def analyze(acts_path: str, lib_dir: str, only: list[str] | None) -> None:
    global acts, lib, names, mods, meta, N, lens, qid, gold, Q, focus, ranks
    acts = torch.load(acts_path)
    lib = AdapterLibrary.load(lib_dir)
    names, mods, meta = acts["names"], acts["modules"], acts["meta"]
    assert names == lib.names
    N = len(names)
    lens = torch.tensor([m["len"] for m in meta])
    qid = torch.arange(len(meta)).repeat_interleave(lens)  # [T] question of each token
    gold = torch.tensor([m["gold"] for m in meta])
    Q = len(meta)
    focus = torch.cat([torch.tensor(m["focus"] if m["focus"] else [True] * m["len"]) for m in meta]).bool()
    ranks = torch.tensor([int(e["rank"]) for e in lib.adapters]).float()
    run(only or DEFAULT)


def per_module():
    for m in mods:
        t = lib.tensors(m)
        A = t.A.float()  # [N, r, n]
        P = t.proto.float()
        X = acts["x"][m].float()  # [T, n]
        yield m, A, P, X


def scores(A, P, X, Qm=None):
    """c [T, N] = ||A x|| / ||x||, a [T, N] = |p . x| / ||x||, optionally after projecting out U
    (Qm: [n, n])."""
    if Qm is not None:
        X = X @ Qm
        P = P @ Qm
        P = P / P.norm(dim=1, keepdim=True).clamp_min(1e-9)
    xn = X.norm(dim=1, keepdim=True).clamp_min(1e-9)
    Nn, r, n = A.shape
    proj = (X @ A.reshape(Nn * r, n).T).view(X.shape[0], Nn, r)
    if Qm is not None:
        # ||A* Q x|| with A*'s rows projected: use A Q (rows no longer orthonormal)
        AQ = A.reshape(Nn * r, n) @ Qm
        proj = (X @ AQ.T).view(X.shape[0], Nn, r)
    c = proj.norm(dim=-1) / xn
    a = (X @ P.T).abs() / xn
    return c, a


def ref_stats(A, P):
    """Data-free reference: every adapter's right singular vectors (rows of A*); per adapter i the mean /
    std / top-10 mean of c_i and a_i over the rows of the other adapters."""
    Nn, r, n = A.shape
    R = A.reshape(Nn * r, n)  # [N r, n] unit rows (zero rows past rank)
    live = R.norm(dim=1) > 0.5
    owner = torch.arange(Nn).repeat_interleave(r)
    c = (R @ A.reshape(Nn * r, n).T).view(Nn * r, Nn, r).norm(dim=-1)  # [N r, N]
    a = (R @ P.T).abs()  # [N r, N]
    other = (owner[:, None] != torch.arange(Nn)[None]) & live[:, None]  # [N r, N]
    out = {}
    for key, s in (("c", c), ("a", a)):
        s = s.masked_fill(~other, float("nan"))
        mu = s.nanmean(dim=0)
        sd = ((s - mu).square().nanmean(dim=0)).sqrt()
        top = s.nan_to_num(-1.0).topk(10, dim=0).values.mean(dim=0)
        out[key] = (mu, sd, top)
    return out


def lag_pick(c, a, k=20):
    cand = a.topk(min(k, a.shape[1]), dim=1).indices
    return cand.gather(1, c.gather(1, cand).argmax(dim=1, keepdim=True)).squeeze(1)


def per_question_norm(s, how, b=30.0):
    """Normalise scores s [T, N] over each question's tokens."""
    out = torch.empty_like(s)
    start = 0
    for L in lens.tolist():
        blk = s[start:start + L]
        if how == "zq":
            out[start:start + L] = (blk - blk.mean(0)) / blk.std(0, unbiased=False).clamp_min(1e-6)
        elif how == "isoft":
            out[start:start + L] = torch.softmax(b * blk, dim=0)
        elif how == "sinkhorn":
            e = torch.exp(b * (blk - blk.max()))
            for _ in range(3):
                e = e / e.sum(1, keepdim=True)
                e = e / e.sum(0, keepdim=True)
            out[start:start + L] = e
        start += L
    return out


def summarise(name, winners_per_module, extra=None):
    """winners [T] per module (-1 = no adapter) -> metrics."""
    counts = torch.zeros(Q, N)
    none = 0
    total = 0
    for w in winners_per_module:
        ok = w >= 0
        none += int((~ok).sum())
        total += w.numel()
        counts.index_put_((qid[ok], w[ok]), torch.ones(int(ok.sum())), accumulate=True)
    sel = counts.sum(1).clamp_min(1)
    share = counts[torch.arange(Q), gold] / sel
    g = counts[torch.arange(Q), gold]
    others = counts.clone()
    others[torch.arange(Q), gold] = -1
    top = (g > others.max(1).values).float()
    wins = counts.sum(0)
    mu, sd = wins.mean(), wins.std(unbiased=False)
    skew = float(((wins - mu) ** 3).mean() / sd ** 3) if sd > 0 else 0.0
    hub = int(wins.argmax())
    row = {"variant": name, "gold_share": round(float(share.mean()) * 100, 1),
           "gold_top": round(float(top.mean()) * 100, 1), "skew": round(skew, 2), "hub": names[hub],
           "hub_share": round(float(wins[hub] / wins.sum()) * 100, 1),
           "none%": round(100 * none / max(total, 1), 1)}
    if extra:
        row.update(extra)
    print(json.dumps(row), flush=True)
    return row


def run(variants):
    res = {}
    # precompute per module scores once (base) + stats
    cache = []
    t0 = time.time()
    for m, A, P, X in per_module():
        c, a = scores(A, P, X)
        st = ref_stats(A, P)
        cache.append((m, A, P, X, c, a, st))
    print("scores", time.time() - t0, flush=True)
    for v in variants:
        winners = []
        if v.startswith("subspace"):
            mm = int(v.split("-")[1])
            kk = v.split("-")[2] if v.count("-") > 1 else "lag"
            for _m, A, P, X, _c, _a, _st in cache:
                Nn, r, n = A.shape
                flat = A.reshape(Nn * r, n)
                _, s, vh = torch.linalg.svd(flat / math.sqrt(Nn), full_matrices=False)
                U = vh[:mm].T
                Qm = torch.eye(n) - U @ U.T
                c2, a2 = scores(A, P, X, Qm)
                winners.append(lag_pick(c2, a2) if kk == "lag" else c2.argmax(1))
            res[v] = summarise(v, winners)
            continue
        if v.startswith("xcenter"):
            for _m, A, P, X, _c, _a, _st in cache:
                Xc = X.clone()
                start = 0
                for L in lens.tolist():
                    Xc[start:start + L] -= X[start:start + L].mean(0)
                    start += L
                c2, a2 = scores(A, P, Xc)
                winners.append(lag_pick(c2, a2) if v == "xcenter" else c2.argmax(1))
            res[v] = summarise(v, winners)
            continue
        if v.startswith("xprior") or v.startswith("mprior") or v.startswith("xlprior"):
            # xprior-M-beta: scores on request-centred tokens; mass summed over modules (mprior: per module)
            parts = v.split("-")
            M = int(parts[1])
            beta = float(parts[2])
            inner = parts[3] if len(parts) > 3 else "zq"
            cxs, axs = [], []
            for _m, A, P, X, _c, _a, _st in cache:
                Xc = X.clone()
                start = 0
                for L in lens.tolist():
                    Xc[start:start + L] -= X[start:start + L].mean(0)
                    start += L
                cx_, ax_ = scores(A, P, Xc)
                cxs.append(cx_)
                axs.append(ax_)
            def mass_of(cs, arrow=None, v=v, axs=axs):
                mass = torch.zeros(Q, N)
                for j, cx in enumerate(cs):
                    norm = cx / cx.sum(1, keepdim=True)
                    if v.startswith("xlprior"):  # only the Arrow top-20 candidates of the centred token
                        keep = torch.zeros_like(cx, dtype=torch.bool).scatter_(
                            1, axs[j].topk(20, dim=1).indices, True)
                        cm = cx * keep
                        norm = cm / cm.sum(1, keepdim=True)
                    mass.index_put_((qid.repeat_interleave(N), torch.arange(N).repeat(len(qid))),
                                    (norm * focus[:, None]).reshape(-1), accumulate=True)
                return mass
            total = mass_of(cxs)
            for cx in cxs:
                mass = total if not v.startswith("mprior") else mass_of([cx])
                share = mass / mass.sum(1, keepdim=True)
                short = mass.topk(M, dim=1).indices
                cand = short[qid]
                if inner == "zq":
                    zc = per_question_norm(cx, "zq").gather(1, cand)
                elif inner == "tok":
                    zc = ((cx - cx.mean(1, keepdim=True))
                          / cx.std(1, keepdim=True).clamp_min(1e-6)).gather(1, cand)
                elif inner == "rel":
                    cc = cx.gather(1, cand)
                    zc = cc / cc.mean(1, keepdim=True).clamp_min(1e-6)
                elif inner == "log":
                    zc = cx.gather(1, cand).clamp_min(1e-6).log()
                val = share[qid].gather(1, cand).log() + beta * zc
                winners.append(cand.gather(1, val.argmax(1, keepdim=True)).squeeze(1))
            res[v] = summarise(v, winners)
            continue
        if v.startswith("prior"):
            # prior-M-beta: per token argmax_i in shortlist of log(mass share_i) + beta * z_i(t)
            _, M, beta = v.split("-")
            M = int(M)
            beta = float(beta)
            mass = torch.zeros(Q, N)
            for _m, _A, _P, _X, c, _a, _st in cache:
                norm = c / c.sum(1, keepdim=True)
                mass.index_put_((qid.repeat_interleave(N), torch.arange(N).repeat(len(qid))),
                                (norm * focus[:, None]).reshape(-1), accumulate=True)
            share = mass / mass.sum(1, keepdim=True)
            short = mass.topk(M, dim=1).indices
            for _m, _A, _P, _X, c, _a, st in cache:
                z = (c - st["c"][0]) / st["c"][1]
                cand = short[qid]
                val = share[qid].gather(1, cand).log() + beta * z.gather(1, cand)
                winners.append(cand.gather(1, val.argmax(1, keepdim=True)).squeeze(1))
            res[v] = summarise(v, winners)
            continue
        if v.startswith("twolevel"):
            # twolevel-M-theta-inner: mass over all tokens & modules of per-token normalised c
            # among lag candidates
            parts = v.split("-")
            M, inner = int(parts[1]), parts[2]
            theta = float(parts[3]) if len(parts) > 3 else -1e9
            mass = torch.zeros(Q, N)
            for _m, _A, _P, _X, c, _a, st in cache:
                cc = c if inner != "z" else (c - st["c"][0]) / st["c"][1]
                norm = c / c.sum(1, keepdim=True)
                mass.index_put_((qid.repeat_interleave(N), torch.arange(N).repeat(len(qid))),
                                (norm * focus[:, None]).reshape(-1), accumulate=True)
            short = mass.topk(M, dim=1).indices  # [Q, M]
            for _m, _A, _P, _X, c, _a, st in cache:
                sc = c if inner == "c" else (c - st["c"][0]) / st["c"][1]
                cand = short[qid]  # [T, M]
                val = sc.gather(1, cand)
                best = val.argmax(1)
                w = cand.gather(1, best[:, None]).squeeze(1)
                if theta > -1e8:
                    w = torch.where(val.max(1).values >= theta, w, torch.full_like(w, -1))
                winners.append(w)
            res[v] = summarise(v, winners)
            continue
        for _m, _A, _P, _X, c, a, st in cache:
            if v == "lag":
                w = lag_pick(c, a)
            elif v == "spectr":
                w = c.argmax(1)
            elif v == "arrow":
                w = a.argmax(1)
            elif v in ("zscore", "zscore-spectr"):
                zc = (c - st["c"][0]) / st["c"][1]
                za = (a - st["a"][0]) / st["a"][1]
                w = lag_pick(zc, za) if v == "zscore" else zc.argmax(1)
            elif v in ("csls", "csls-spectr"):
                sc = 2 * c - st["c"][2]
                sa = 2 * a - st["a"][2]
                w = lag_pick(sc, sa) if v == "csls" else sc.argmax(1)
            elif v in ("center", "center-spectr"):
                sc = c - st["c"][0]
                sa = a - st["a"][0]
                w = lag_pick(sc, sa) if v == "center" else sc.argmax(1)
            elif v.startswith("zq"):
                zc = per_question_norm(c, "zq")
                za = per_question_norm(a, "zq")
                w = lag_pick(zc, za) if v == "zq" else zc.argmax(1)
            elif v.startswith("isoft"):
                b = float(v.split("-")[1])
                w = per_question_norm(c, "isoft", b).argmax(1)
            elif v.startswith("sinkhorn"):
                b = float(v.split("-")[1])
                w = per_question_norm(c, "sinkhorn", b).argmax(1)
            else:
                raise ValueError(v)
            winners.append(w)
        res[v] = summarise(v, winners)
    return res



DEFAULT = ["arrow", "spectr", "lag", "zscore", "zscore-spectr", "csls", "csls-spectr", "center",
               "center-spectr", "zq", "zq-spectr", "isoft-10", "isoft-30", "isoft-100", "sinkhorn-30",
               "subspace-1", "subspace-2", "subspace-4", "subspace-8", "subspace-8-spectr", "twolevel-1-c",
               "twolevel-2-c", "twolevel-3-c", "twolevel-2-z", "twolevel-3-z"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture")
    c.add_argument("library")
    c.add_argument("out")
    c.add_argument("--docs")
    c.add_argument("--questions")
    c.add_argument("--scratch", default="routing-variants-scratch")
    a = sub.add_parser("analyze")
    a.add_argument("acts")
    a.add_argument("library")
    a.add_argument("variants", nargs="?", default=None)
    args = p.parse_args()
    if args.cmd == "capture":
        capture(args.library, args.out, args.docs, args.questions, args.scratch)
    else:
        analyze(args.acts, args.library, args.variants.split(",") if args.variants else None)


if __name__ == "__main__":
    main()
