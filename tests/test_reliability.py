"""Fault injection: outputs that must not be replaced, concurrent writers, a full disk, files damaged under a
reader, readers attaching during writes, killed builds, and bad inputs that must end in a typed error."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
from llama_index_lag.cli import main as cli_main
from llama_index_lag.errors import (
    DiskFullError,
    LAGError,
    LibraryError,
    LibraryFormatError,
    UnsafeOutputError,
)
from llama_index_lag.testing import make_lora_adapters, make_tiny_model, make_tiny_model_dir

from .conftest import MLP

ROOT = Path(__file__).resolve().parents[1]


def _compile(dirs, model, out, **kw) -> AdapterLibrary:
    kw.setdefault("kind", "knowledge")
    return AdapterLibrary.compile(dirs, base_model=model, out=out, progress=False, **kw)


@pytest.fixture
def model_dir(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.getbasetemp() / "tiny-llama", "llama", seed=0)


@pytest.fixture
def model(model_dir):
    from llama_index_lag.models import load_causal_lm

    return load_causal_lm(model_dir)[0]


@pytest.fixture
def dirs(tmp_path, model):
    return make_lora_adapters(model, tmp_path / "ad", 10, rank=4, target_modules=MLP, seed=3)


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. a write only replaces what is ours --------------------------------------------------------------
def test_compile_never_replaces_a_users_folder_or_file(tmp_path, model_dir, dirs):
    user = tmp_path / "X"
    (user / "notes").mkdir(parents=True)
    (user / "notes" / "a.txt").write_text("hi")
    before = _tree(user)
    args = ["compile", *map(str, dirs[:2]), "--kind", "knowledge", "--base", str(model_dir)]
    assert cli_main([*args, "--out", str(user)]) == 1
    assert _tree(user) == before
    a_file = tmp_path / "file.txt"
    a_file.write_text("keep")
    with pytest.raises(UnsafeOutputError, match="not a folder") as info:
        _compile(dirs[:2], model_dir, a_file)
    assert info.value.path == str(a_file) and a_file.read_text() == "keep"
    # the adapters' own parent folder, one of the input adapters, a folder inside an input
    inputs = _tree(dirs[0].parent)
    for out in (dirs[0].parent, dirs[1], dirs[1] / "sub"):
        with pytest.raises(UnsafeOutputError, match="input"):
            _compile(dirs[:2], model_dir, out, force=True)  # --force never deletes inputs
    assert _tree(dirs[0].parent) == inputs
    # an empty folder, an existing library, and (with --force) a user's folder may be replaced
    (tmp_path / "empty").mkdir()
    assert len(_compile(dirs[:2], model_dir, tmp_path / "empty")) == 2
    assert len(_compile(dirs[:3], model_dir, tmp_path / "empty")) == 3
    assert cli_main([*args, "--out", str(user), "--force"]) == 0
    assert len(AdapterLibrary.load(user)) == 2 and not (user / "notes").exists()


def test_build_adapters_refuses_to_compile_into_its_own_adapters(tmp_path, model_dir, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d1", "title": "D", "text": "Ada was born in Pivo. She built boats."}) + "\n")
    out = tmp_path / "AD"
    code = cli_main(["build-adapters", "--docs", str(docs), "--out", str(out), "--compile", str(out), "--base",
                     str(model_dir), "--no-generate", "--steps", "1", "--quiet"])
    assert code == 1 and "input" in capsys.readouterr().err
    assert not (out / "d1").exists()  # refused before any training


def test_index_refuses_an_output_holding_its_documents(tmp_path):
    out = tmp_path / "idx"
    out.mkdir()
    docs = out / "docs.jsonl"
    docs.write_text(json.dumps({"id": "d1", "title": "D", "text": "Ada was born in Pivo."}) + "\n")
    assert cli_main(["index", "--docs", str(docs), "--out", str(out), "--force", "-q"]) == 1
    assert docs.is_file()


# ---- 2. concurrent writers: every update lands ------------------------------------------------------------
def test_a_stale_handle_does_not_drop_another_writers_adapters(tmp_path, model, dirs):
    _compile(dirs[:6], model, tmp_path / "lib")
    held = AdapterLibrary.load(tmp_path / "lib")
    AdapterLibrary.load(tmp_path / "lib").add(dirs[6:])  # another writer adds doc6..doc9
    held.remove(["doc0"])  # applied to the revision on disk, not to the one `held` loaded
    expected = [f"doc{i}" for i in range(1, 10)]
    assert held.names == expected and AdapterLibrary.load(tmp_path / "lib").names == expected
    fresh = _compile(dirs[1:], model, tmp_path / "fresh")
    for module in fresh.modules:
        assert torch.equal(held.tensors(module).A, fresh.tensors(module).A)
    with pytest.raises(LibraryError, match="changed since it was loaded"):
        stale = AdapterLibrary.load(tmp_path / "lib")
        AdapterLibrary.load(tmp_path / "lib").remove(["doc1"])
        stale.remove(["doc1"])


def test_concurrent_adds_from_many_processes_all_land(tmp_path, model, dirs):
    _compile(dirs[:2], model, tmp_path / "lib")
    script = textwrap.dedent("""
        import sys
        from llama_index_lag import AdapterLibrary
        AdapterLibrary.load(sys.argv[1]).add(sys.argv[2:], progress=False)
    """)
    groups = [dirs[2:4], dirs[4:6], dirs[6:8], dirs[8:10]]
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "lib"), *map(str, g)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for g in groups]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert sorted(lib.names) == sorted(f"doc{i}" for i in range(10))
    lib.verify()


# ---- 3. a full disk is a typed error, never a SIGBUS ----------------------------------------------------
def _mixed_ranks(model, tmp_path):
    """Ranks 4 and 2 interleaved: each rank's rows are scattered, so they are written through the map."""
    a = make_lora_adapters(model, tmp_path / "r4", 5, rank=4, target_modules=MLP, seed=5, prefix="a")
    b = make_lora_adapters(model, tmp_path / "r2", 5, rank=2, target_modules=MLP, seed=6, prefix="b")
    return [d for pair in zip(a, b) for d in pair]


@pytest.mark.parametrize("failing", ["posix_fallocate", "pwrite"])
def test_injected_disk_full_keeps_the_old_library(tmp_path, model, dirs, monkeypatch, failing):
    from llama_index_lag.library import packed

    _compile(dirs[:3], model, tmp_path / "lib")
    before = _tree(tmp_path / "lib")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(packed.os, failing, full)
    with pytest.raises(DiskFullError, match=r"disk full: writing the library .* needs about .* MB, .* free") as info:
        AdapterLibrary.load(tmp_path / "lib").add(_mixed_ranks(model, tmp_path), progress=False)
    assert info.value.extra["needed"] > 0 and info.value.extra["free"] is not None
    monkeypatch.undo()
    assert _tree(tmp_path / "lib") == before
    assert not (tmp_path / ".lib.partial").exists()  # the space it took is free again
    assert len(AdapterLibrary.load(tmp_path / "lib")) == 3


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KB tmpfs (skipped where mounting is not allowed)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_disk_compile_and_index_writes(tmp_path, model_dir, model, small_fs):
    adapters = _mixed_ranks(model, tmp_path)
    script = textwrap.dedent("""
        import sys
        from llama_index_lag import AdapterLibrary
        from llama_index_lag.errors import DiskFullError
        try:
            AdapterLibrary.compile(sys.argv[3:], kind="knowledge", base_model=sys.argv[1], out=sys.argv[2],
                                   progress=False, arrow_index=False)
        except DiskFullError as exc:
            print("TYPED", exc)
    """)
    filler = small_fs / "filler"
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    filler.write_bytes(b"\0" * (free - (8 << 10)))  # 8 KB left: the header fits, the ~150 KB of rows do not
    run = subprocess.run([sys.executable, "-c", script, str(model_dir), str(small_fs / "lib"), *map(str, adapters)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr  # a SIGBUS would be -7
    assert "TYPED disk full" in run.stdout and "free" in run.stdout
    assert sorted(p.name for p in small_fs.iterdir()) == [".lib.lock", "filler"]
    # FAISS index writes: the packed file fits, the index does not
    filler.unlink()
    from llama_index_lag.library import store

    real = store.build_module_index

    def fill_then_build(*args, **kwargs):
        if not (small_fs / "filler").exists():
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            (small_fs / "filler").write_bytes(b"\0" * max(free - 4096, 0))
        return real(*args, **kwargs)

    store.build_module_index = fill_then_build
    try:
        with pytest.raises(DiskFullError, match="disk full"):
            _compile(adapters, model, small_fs / "lib", arrow_index="hnsw")
    finally:
        store.build_module_index = real
    assert not (small_fs / ".lib.partial").exists() and not (small_fs / "lib").exists()


# ---- 4. a file damaged under a reader: a clear error, no signal ------------------------------------------
def test_truncated_library_under_a_reader_raises_instead_of_sigbus(tmp_path, model_dir, model, dirs):
    _compile(dirs, model, tmp_path / "lib")
    script = textwrap.dedent("""
        import os, sys, torch
        from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
        from llama_index_lag.errors import LibraryFormatError
        from llama_index_lag.models import load_causal_lm
        model = load_causal_lm(sys.argv[1])[0]
        lib = AdapterLibrary.load(sys.argv[2])
        attach_lag(model, lib, LAGConfig(mode="lag", k=3))
        ids = torch.tensor([[1, 5, 9, 13]])
        with torch.no_grad():
            model(ids)
            model.generate(ids, max_new_tokens=2, do_sample=False)  # the fused one-token kernels too
            f = sys.argv[2] + "/adapters.safetensors"
            os.truncate(f, os.path.getsize(f) // 3)
            for call in (lambda: model(ids), lambda: model(ids[:, :1])):
                try:
                    call()
                    print("NO ERROR")
                except LibraryFormatError as exc:
                    print("TYPED", exc)
    """)
    run = subprocess.run([sys.executable, "-c", script, str(model_dir), str(tmp_path / "lib")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr  # SIGBUS would be -7
    assert run.stdout.count("TYPED packed tensors damaged while in use") == 2, run.stdout
    with pytest.raises(LibraryFormatError, match="truncated"):
        AdapterLibrary.load(tmp_path / "lib")


def test_library_replaced_under_a_reader_keeps_serving_its_revision(tmp_path, model, dirs):
    lib = _compile(dirs[:5], model, tmp_path / "lib")
    router = attach_lag(model, lib, LAGConfig(mode="lag", k=3))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        before = model(ids).logits
        _compile(dirs[5:], model, tmp_path / "lib")  # another library at the same path
        after = model(ids).logits
    assert torch.equal(before, after)
    router.detach()
    assert AdapterLibrary.load(tmp_path / "lib").names == [f"doc{i}" for i in range(5, 10)]


# ---- 5. readers attaching while another process writes ---------------------------------------------------
def test_readers_attaching_during_writes_never_fail(tmp_path, model, dirs):
    _compile(dirs[:6], model, tmp_path / "lib", arrow_index="hnsw")
    writer = textwrap.dedent("""
        import sys, time
        from llama_index_lag import AdapterLibrary
        lib, extra = sys.argv[1], sys.argv[2:]
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            AdapterLibrary.load(lib).add(extra, progress=False)
            AdapterLibrary.load(lib).remove([p.rsplit("/", 1)[-1] for p in extra])
    """)
    proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "lib"), *map(str, dirs[6:])], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    ids = torch.tensor([[1, 5, 9, 13]])
    attached, failures = 0, []
    try:
        while proc.poll() is None:
            try:
                lib = AdapterLibrary.load(tmp_path / "lib")
                router = attach_lag(model, lib, LAGConfig(mode="lag", k=3, arrow_backend="faiss"))
                with torch.no_grad():
                    model(ids)
                router.detach()
                attached += 1
            except LAGError as exc:
                failures.append(str(exc))
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0, proc.stderr.read()
    assert failures == [] and attached >= 10, (attached, failures[:3])


# ---- 6. a killed build leaves no worker behind -----------------------------------------------------------
def _fast_recipe():
    from llama_index_lag.training import KnowledgeRecipe

    return KnowledgeRecipe(n_rewrites=0, qa=False, steps=30)



def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, timeout: float) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def many_docs(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"id": f"d{i}", "title": f"D{i}", "text": f"Ada{i} was born in Pivo{i}. "
                                        "She built boats. Her brother sold fish."}) + "\n" for i in range(8)))
    return docs


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_the_build_stops_its_workers(tmp_path, model_dir, many_docs, sig):
    import signal

    out = tmp_path / "AD"
    proc = subprocess.Popen([sys.executable, "-m", "llama_index_lag", "build-adapters", "--docs", str(many_docs),
                             "--out", str(out), "--base", str(model_dir), "--workers", "2", "--no-generate",
                             "--steps", "30", "--quiet"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        # both workers running and at least one adapter finished: the pool is busy
        assert _wait_for(lambda: len(_children(proc.pid)) >= 2 and any(out.glob("d*/lag_adapter.json")), 240)
        workers = _children(proc.pid)
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=60)
        assert _wait_for(lambda: not any(_alive(w) for w in workers), 15), "a worker outlived the build"
    finally:
        proc.kill()
    err = proc.stderr.read()
    if sig == "SIGTERM":  # stopped like Ctrl-C: workers terminated, what finished is reported
        assert proc.returncode == 130 and "adapters built in this run" in err and "interrupted" in err, err
    finished = sorted(p.parent.name for p in out.glob("d*/lag_adapter.json"))
    assert finished
    if sig == "SIGTERM":
        return
    # the re-run keeps the finished adapters and builds the rest; nothing half-written was taken as finished
    from llama_index_lag.training import build_knowledge_adapters
    from llama_index_lag.training.builder import is_finished

    report = build_knowledge_adapters(many_docs, out, base=model_dir, recipe=_fast_recipe(), progress=False)
    assert sorted(report.skipped) == finished and len(report.built) == 8 - len(finished)
    assert all(is_finished(out / f"d{i}", f"d{i}") for i in range(8))
    assert not list(out.glob(".d*.tmp-*"))  # the killed workers' temp folders are gone


def test_a_live_worker_of_an_earlier_build_blocks_a_new_one(tmp_path, model_dir, many_docs, capsys):
    out = tmp_path / "AD"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import fcntl, sys, time
        f = open(sys.argv[1], "a+b"); fcntl.flock(f, fcntl.LOCK_SH); print("held", flush=True); time.sleep(60)
    """), str(out / ".lag-build-workers.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = cli_main(["build-adapters", "--docs", str(many_docs), "--out", str(out), "--base", str(model_dir),
                         "--no-generate", "--steps", "1", "--quiet"])
        assert code == 1 and "a worker of an earlier build still runs" in capsys.readouterr().err
        assert not list(out.glob("d*"))
    finally:
        holder.kill()
