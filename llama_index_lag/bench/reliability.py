"""``lag bench reliability``: fault-injection trials against real processes, files and file systems.

Each scenario runs a number of trials on tiny random models and adapters and counts the outcomes: a
trial *survives* when the on-disk state afterwards is the old or the new one (never half-written), the
process that met the fault ended in a typed error (never a signal), and nothing was lost. Trials that need
root (a small tmpfs for a full disk) are skipped where mounting is not allowed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from .common import machine, print_table, save_results

MLP = ("gate_proj", "up_proj", "down_proj")
_COMPILE = textwrap.dedent("""
import sys
from llama_index_lag import AdapterLibrary
mode, model, out, *dirs = sys.argv[1:]
if mode == "add":
    AdapterLibrary.load(out).add(dirs, progress=False)
else:
    AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=out, progress=False, chunk_size=8)
""")
_READER = textwrap.dedent("""
    import os, sys, torch
    from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
    from llama_index_lag.errors import LibraryFormatError
    from llama_index_lag.models import load_causal_lm
    model = load_causal_lm(sys.argv[1])[0]
    attach_lag(model, AdapterLibrary.load(sys.argv[2]), LAGConfig(mode="lag", k=3))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        model(ids)
        f = sys.argv[2] + "/adapters.safetensors"
        os.truncate(f, int(os.path.getsize(f) * float(sys.argv[3])))
        try:
            model(ids if sys.argv[4] == "prefill" else ids[:, :1])
            print("NO ERROR")
        except LibraryFormatError:
            print("TYPED")
""")


def _python(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)


def _state(lib: Path) -> list[str] | str:
    from ..errors import LAGError
    from ..library import AdapterLibrary

    try:
        return AdapterLibrary.load(lib).names
    except LAGError as exc:
        return f"error: {exc}"


def _killed_writes(work: Path, model_dir: Path, dirs: list[Path], trials: int, rng: random.Random) -> dict:
    """SIGKILL a compile / add at a random moment: the library is the old or the new one; a re-run gives
    the tensors of a clean compile, bit for bit, and passes verify."""
    import torch

    from ..library import AdapterLibrary

    clean = AdapterLibrary.compile(dirs, kind="knowledge", base_model=model_dir, out=work / "clean",
                                   progress=False, chunk_size=8)
    old = [d.name for d in dirs[:8]]
    failures: list[str] = []
    for trial in range(trials):
        lib = work / f"kill-{trial}"
        AdapterLibrary.compile(dirs[:8], kind="knowledge", base_model=model_dir, out=lib, progress=False)
        mode = "add" if trial % 2 else "compile"
        args = [mode, str(model_dir), str(lib), *map(str, dirs[8:] if mode == "add" else dirs)]
        proc = subprocess.Popen([sys.executable, "-c", _COMPILE, *args], stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 4.0))  # the interpreter and torch import take ~2-3 s of it
        proc.kill()
        proc.wait()
        state = _state(lib)
        new = [d.name for d in dirs]
        finished = mode == "add" and state == new  # the add landed before the kill: nothing to re-run
        rerun = subprocess.CompletedProcess(args, 0) if finished else _python("-c", _COMPILE, *args)
        if state not in (old, new):
            failures.append(f"{mode}: after the kill {str(state)[:120]}")
        elif rerun.returncode != 0:
            failures.append(f"{mode}: re-run failed: {rerun.stderr[-200:]}")
        else:
            done = AdapterLibrary.load(lib)
            same = all(torch.equal(getattr(done.tensors(m), t), getattr(clean.tensors(m), t))
                       for m in clean.modules for t in ("A", "B", "proto"))
            if not (done.verify()["checksums"] and same):
                failures.append(f"{mode}: re-run differs from a clean compile")
    return {"scenario": "compile / add killed (SIGKILL)", "trials": trials,
            "survived": trials - len(failures), "failures": failures}


def _concurrent_adds(work: Path, model_dir: Path, dirs: list[Path], rounds: int) -> dict:
    from ..library import AdapterLibrary

    lost = 0
    for r in range(rounds):
        lib = work / f"concurrent-{r}"
        AdapterLibrary.compile(dirs[:2], kind="knowledge", base_model=model_dir, out=lib, progress=False)
        groups = [dirs[i:i + 2] for i in range(2, len(dirs), 2)][:5]
        procs = [subprocess.Popen([sys.executable, "-m", "llama_index_lag", "compile", *map(str, g), "--kind",
                                   "knowledge", "--out", str(lib), "--add"], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL) for g in groups]
        codes = [p.wait() for p in procs]
        names = set(AdapterLibrary.load(lib).names)
        lost += sum(d.name not in names for g in groups for d in g) + sum(c != 0 for c in codes)
    return {"scenario": f"{rounds} rounds of 5 concurrent `lag compile --add`", "trials": rounds * 5,
            "survived": rounds * 5 - lost, "lost adapters": lost}


def _readers_during_writes(work: Path, model_dir: Path, dirs: list[Path], seconds: float) -> dict:
    import torch

    from ..config import LAGConfig
    from ..errors import LAGError
    from ..library import AdapterLibrary
    from ..models import load_causal_lm
    from ..router import attach_lag

    lib = work / "readers"
    AdapterLibrary.compile(dirs[:6], kind="knowledge", base_model=model_dir, out=lib, progress=False,
                           arrow_index="hnsw")
    writer = textwrap.dedent(f"""
        import sys, time
        from llama_index_lag import AdapterLibrary
        extra = sys.argv[1:]
        deadline = time.monotonic() + {seconds}
        while time.monotonic() < deadline:
            AdapterLibrary.load({str(lib)!r}).add(extra, progress=False)
            AdapterLibrary.load({str(lib)!r}).remove([p.rsplit("/", 1)[-1] for p in extra])
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer, *map(str, dirs[6:10])])
    model = load_causal_lm(model_dir)[0]
    ids = torch.tensor([[1, 5, 9, 13]])
    attached = failed = 0
    while proc.poll() is None:
        try:
            router = attach_lag(model, AdapterLibrary.load(lib),
                                LAGConfig(mode="lag", k=3, arrow_backend="faiss"))
            with torch.no_grad():
                model(ids)
            router.detach()
            attached += 1
        except LAGError:
            failed += 1
    return {"scenario": f"readers attaching (faiss index) during {seconds:.0f} s of add / remove",
            "trials": attached + failed, "survived": attached, "writer exit": proc.returncode}


def _mount_tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def _disk_full(work: Path, model_dir: Path, dirs: list[Path], trials: int, rng: random.Random) -> dict:
    mnt = work / "tmpfs"
    if not _mount_tmpfs(mnt, "512k"):
        return {"scenario": "compile on a full disk (tmpfs)", "trials": 0, "survived": 0, "note": "no mount"}
    survived, outcomes = 0, {}
    script = _COMPILE.replace("progress=False, chunk_size=8)",
                              "progress=False, chunk_size=8)\n    print('OK')")
    try:
        for _trial in range(trials):
            for entry in mnt.iterdir():
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            stat = os.statvfs(mnt)
            left = rng.choice([4 << 10, 16 << 10, 64 << 10, 128 << 10, 256 << 10])
            (mnt / "filler").write_bytes(b"\0" * max(stat.f_bavail * stat.f_frsize - left, 0))
            mixed = dirs[::2] + dirs[1::2]  # rows of one rank scattered: written through the map
            run = _python("-c", script, "compile", str(model_dir), str(mnt / "lib"), *map(str, mixed))
            outcome = ("signal" if run.returncode < 0 else "typed DiskFullError"
                       if "DiskFullError" in run.stderr else "compiled" if "OK" in run.stdout
                       else "other error")
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            leftover = not (mnt / "lib").exists() and not (mnt / ".lib.partial").exists()
            survived += outcome in ("typed DiskFullError", "compiled") and (outcome == "compiled" or leftover)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    return {"scenario": "compile with 4-256 KB free (tmpfs, mixed ranks)", "trials": trials,
            "survived": survived, "outcomes": outcomes}


def _truncated(work: Path, model_dir: Path, dirs: list[Path], trials: int, rng: random.Random) -> dict:
    from ..library import AdapterLibrary

    survived, outcomes = 0, {}
    for trial in range(trials):
        lib = work / f"trunc-{trial}"
        AdapterLibrary.compile(dirs, kind="knowledge", base_model=model_dir, out=lib, progress=False)
        path = "prefill" if trial % 2 else "decode"
        run = _python("-c", _READER, str(model_dir), str(lib), f"{rng.uniform(0.0, 0.95):.3f}", path)
        outcome = ("signal" if run.returncode < 0
                   else run.stdout.strip().splitlines()[-1] if run.stdout else "error")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        survived += outcome == "TYPED"
    return {"scenario": "packed file truncated under a running model (prefill / fused decode)",
            "trials": trials, "survived": survived, "outcomes": outcomes}


def _killed_builds(work: Path, model_dir: Path, trials: int) -> dict:
    from ..errors import LAGError

    docs = work / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "title": f"D{i}",
                                        "text": f"Ada{i} was born in Pivo{i}. She built boats."}) + "\n"
                            for i in range(8)))
    survived = orphans = 0
    for trial in range(trials):
        out = work / f"build-{trial}"
        proc = subprocess.Popen([sys.executable, "-m", "llama_index_lag", "build-adapters", "--docs",
                                 str(docs), "--out", str(out), "--base", str(model_dir), "--workers", "2",
                                 "--no-generate", "--steps", "30", "--quiet"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (len(_children(proc.pid)) >= 2
                                                   and list(out.glob("d*/lag_adapter.json"))):
            time.sleep(0.1)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL if trial % 2 == 0 else signal.SIGTERM)
        proc.wait()
        time.sleep(3)
        alive = [w for w in workers if _alive(w)]
        for w in alive:
            os.kill(w, signal.SIGKILL)
        orphans += len(alive)
        try:
            from ..training import KnowledgeRecipe, build_knowledge_adapters

            report = build_knowledge_adapters(docs, out, base=model_dir, progress=False,
                                              recipe=KnowledgeRecipe(n_rewrites=0, qa=False, steps=30))
            survived += not alive and len(report.built) + len(report.skipped) == 8
        except LAGError:
            pass
    return {"scenario": "build-adapters --workers 2 killed (SIGKILL / SIGTERM), then resumed",
            "trials": trials, "survived": survived, "orphan workers": orphans}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run(out: str | Path, trials: int = 10, seconds: float = 20.0, work: str | Path | None = None,
        seed: int = 0) -> dict[str, Any]:
    from ..models import load_causal_lm
    from ..testing import make_lora_adapters, make_tiny_model_dir

    rng = random.Random(seed)
    scratch = Path(work) if work else Path(tempfile.mkdtemp(prefix="lag-bench-reliability-"))
    scratch.mkdir(parents=True, exist_ok=True)
    try:
        model_dir = make_tiny_model_dir(scratch / "model")
        model = load_causal_lm(model_dir)[0]
        r4 = make_lora_adapters(model, scratch / "r4", 12, rank=4, target_modules=MLP, seed=1, prefix="a")
        r2 = make_lora_adapters(model, scratch / "r2", 12, rank=2, target_modules=MLP, seed=2, prefix="b")
        dirs = [d for pair in zip(r4, r2) for d in pair]
        rows = [
            _killed_writes(scratch, model_dir, dirs, trials, rng),
            _concurrent_adds(scratch, model_dir, dirs, max(2, trials // 2)),
            _readers_during_writes(scratch, model_dir, dirs, seconds),
            _disk_full(scratch, model_dir, dirs[:16], trials, rng),
            _truncated(scratch, model_dir, dirs[:6], trials, rng),
            _killed_builds(scratch, model_dir, max(2, trials // 2)),
        ]
    finally:
        if not work:
            shutil.rmtree(scratch, ignore_errors=True)
    print_table([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows],
                ["scenario", "trials", "survived", "lost adapters", "orphan workers", "outcomes",
                 "failures", "note"],
                title="Fault-injection trials (survived: old or new state, typed error, nothing lost)")
    payload = {"benchmark": "reliability", "machine": machine(), "trials": trials, "rows": rows}
    save_results(out, payload)
    return payload
