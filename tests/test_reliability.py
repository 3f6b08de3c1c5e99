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
from llama_index_lag.testing import make_lora_adapters, make_tiny_model_dir

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
    docs.write_text(json.dumps({"id": "d1", "title": "D", "text": "Ada was born in Pivo. She built boats."})
                    + "\n")
    out = tmp_path / "AD"
    code = cli_main(["build-adapters", "--docs", str(docs), "--out", str(out), "--compile", str(out),
                     "--base", str(model_dir), "--no-generate", "--steps", "1", "--quiet"])
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
    with pytest.raises(DiskFullError,
                       match=r"disk full: writing the library .* needs about .* MB, .* free") as info:
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
    run = subprocess.run([sys.executable, "-c", script, str(model_dir), str(small_fs / "lib"),
                          *map(str, adapters)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr  # a SIGBUS would be -7
    assert "TYPED disk full" in run.stdout and "free" in run.stdout
    assert sorted(p.name for p in small_fs.iterdir()) == [".lib.lock", "filler"]
    # FAISS index writes: the packed file fits, the index does not
    filler.unlink()
    from llama_index_lag.library import writer

    real = writer.build_module_index

    def fill_then_build(*args, **kwargs):
        if not (small_fs / "filler").exists():
            free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
            (small_fs / "filler").write_bytes(b"\0" * max(free - 4096, 0))
        return real(*args, **kwargs)

    writer.build_module_index = fill_then_build
    try:
        with pytest.raises(DiskFullError, match="disk full"):
            _compile(adapters, model, small_fs / "lib", arrow_index="hnsw")
    finally:
        writer.build_module_index = real
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
    proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "lib"), *map(str, dirs[6:])],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
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
    docs.write_text("".join(json.dumps({"id": f"d{i}", "title": f"D{i}",
                                        "text": f"Ada{i} was born in Pivo{i}. She built boats. Her brother "
                                        "sold fish."}) + "\n" for i in range(8)))
    return docs


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_the_build_stops_its_workers(tmp_path, model_dir, many_docs, sig):
    import signal

    out = tmp_path / "AD"
    proc = subprocess.Popen([sys.executable, "-m", "llama_index_lag", "build-adapters", "--docs",
                             str(many_docs), "--out", str(out), "--base", str(model_dir), "--workers", "2",
                             "--no-generate", "--steps", "30", "--quiet"], cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)
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
        assert "Loading weights" not in err  # --quiet reaches the workers: no transformers bars
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
        code = cli_main(["build-adapters", "--docs", str(many_docs), "--out", str(out), "--base",
                         str(model_dir), "--no-generate", "--steps", "1", "--quiet"])
        assert code == 1 and "a worker of an earlier build still runs" in capsys.readouterr().err
        assert not list(out.glob("d*"))
    finally:
        holder.kill()


# ---- 7. silent wrong results are refused ----------------------------------------------------------------
def test_adapter_file_with_two_sets_of_factors_is_refused(tmp_path, model, dirs):
    from safetensors.torch import load_file, save_file

    from llama_index_lag.errors import IncompatibleAdapterError

    weights = dirs[0] / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key.replace("lora_A.weight", "lora_A.evil.weight")] = torch.randn_like(tensors[key])
    save_file(tensors, str(weights))
    with pytest.raises(IncompatibleAdapterError, match="two lora_A tensors for one module") as info:
        _compile(dirs[:1], model, tmp_path / "lib")
    assert "lora_A.evil.weight" in str(info.value) and info.value.adapter == "doc0"


def _damage(lib_dir: Path, offset_from_end: int, data: bytes) -> None:
    file = lib_dir / "adapters.safetensors"
    with open(file, "r+b") as f:
        f.seek(os.path.getsize(file) - offset_from_end)
        f.write(data)


def test_verify_finds_same_size_corruption_and_nan_bodies(tmp_path, model, dirs):
    lib = _compile(dirs, model, tmp_path / "lib")
    report = lib.verify()
    assert report["checksums"] and report["blocks"] >= 1 and report["adapters"] == 10
    assert cli_main(["verify", str(tmp_path / "lib")]) == 0
    _damage(tmp_path / "lib", 100, b"\x01\x02\x03\x04")  # same size, four bytes of one adapter changed
    lib = AdapterLibrary.load(tmp_path / "lib")  # a load stays cheap: sizes and headers only
    with pytest.raises(LibraryFormatError, match="checksum mismatch in the packed tensors") as info:
        lib.verify()
    assert info.value.adapter in lib.names
    with pytest.raises(LibraryFormatError, match="checksum mismatch"):
        AdapterLibrary.load(tmp_path / "lib", verify=True)
    assert cli_main(["verify", str(tmp_path / "lib")]) == 1
    nan = torch.full((8,), float("nan")).numpy().tobytes()
    _compile(dirs, model, tmp_path / "lib2")
    _damage(tmp_path / "lib2", 64, nan)
    with pytest.raises(LibraryFormatError, match="checksum mismatch"):
        AdapterLibrary.load(tmp_path / "lib2").verify()


def test_a_format_1_library_still_loads_and_verifies_its_values(tmp_path, model, dirs):
    _compile(dirs[:3], model, tmp_path / "lib")
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    manifest["format_version"] = 1
    del manifest["checksums"]
    (tmp_path / "lib" / "manifest.json").write_text(json.dumps(manifest))
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.verify()["checksums"] is False
    lib.add(dirs[3:5], progress=False)  # a write upgrades it
    assert lib.manifest["format_version"] == 3 and AdapterLibrary.load(tmp_path / "lib").verify()["checksums"]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_verify_catches_another_librarys_index_with_the_revision_copied(tmp_path, model, dirs, kind):
    import shutil

    _compile(dirs[:5], model, tmp_path / "a", arrow_index=kind)
    other = make_lora_adapters(model, tmp_path / "other", 5, rank=4, target_modules=MLP, seed=11)
    b = _compile(other, model, tmp_path / "b", arrow_index=kind)
    assert AdapterLibrary.load(tmp_path / "a").verify()["arrow_index"]["type"] == kind
    meta_a = json.loads((tmp_path / "a" / "arrow_index" / "meta.json").read_text())
    shutil.rmtree(tmp_path / "a" / "arrow_index")
    shutil.copytree(tmp_path / "b" / "arrow_index", tmp_path / "a" / "arrow_index")
    meta = json.loads((tmp_path / "a" / "arrow_index" / "meta.json").read_text())
    meta["revision"] = meta_a["revision"]  # disguised as a's
    (tmp_path / "a" / "arrow_index" / "meta.json").write_text(json.dumps(meta))
    assert b.uids().tolist() == AdapterLibrary.load(tmp_path / "a").uids().tolist()  # same ids, other vectors
    with pytest.raises(LibraryFormatError, match="does not hold this library's prototypes"):
        AdapterLibrary.load(tmp_path / "a").verify()


def _edited(lib_dir: Path, edit) -> Path:
    manifest = json.loads((lib_dir / "manifest.json").read_text())
    edit(manifest)
    (lib_dir / "manifest.json").write_text(json.dumps(manifest))
    return lib_dir


MANIFEST_EDITS = {
    "uid 10**12": (lambda m: m["adapters"][0].update(uid=10**12), "next_uid must exceed every uid"),
    "uid repeated": (lambda m: m["adapters"][1].update(uid=m["adapters"][0]["uid"]), "unique non-negative"),
    "no name": (lambda m: m["adapters"][0].pop("name"), "invalid adapter name"),
    "path name": (lambda m: m["adapters"][0].update(name="../../etc/passwd"), "contains '/'"),
    "duplicate name": (lambda m: m["adapters"][1].update(name=m["adapters"][0]["name"]), "appears twice"),
    "case-colliding name": (lambda m: m["adapters"][1].update(name="DOC0"), "appears twice"),
    "no fingerprint": (lambda m: m["base_model"].pop("fingerprint"), "fingerprint"),
    "module deleted": (lambda m: m["modules"].pop(next(iter(m["modules"]))),
                       "modules the library does not have|"
                       "tensors the manifest does not list"),
    "rank 0": (lambda m: m["adapters"][0].update(rank=0), "rank of"),
    "checksum blocks cut": (lambda m: m["checksums"]["blocks"].pop(), "checksum blocks cover"),
    "nested": (None, "nested too deeply"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_EDITS))
def test_hand_edited_manifests_are_refused_at_load(tmp_path, model, dirs, case):
    edit, message = MANIFEST_EDITS[case]
    _compile(dirs[:3], model, tmp_path / "lib")
    if edit is None:
        (tmp_path / "lib" / "manifest.json").write_text("[" * 100000 + "]" * 100000)
    else:
        _edited(tmp_path / "lib", edit)
    with pytest.raises(LibraryFormatError, match=message):
        AdapterLibrary.load(tmp_path / "lib")


def test_arrow_tombstones_listing_live_adapters_are_refused(tmp_path, model, dirs):
    lib = _compile(dirs[:5], model, tmp_path / "lib", arrow_index="hnsw")
    meta_path = tmp_path / "lib" / "arrow_index" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["removed"] = lib.uids().tolist()  # every adapter a tombstone: searches would return nothing
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LibraryFormatError, match="lists 5 adapters of the library as removed"):
        AdapterLibrary.load(tmp_path / "lib")


def test_case_colliding_names_are_refused_before_writing(tmp_path, model, dirs):
    from llama_index_lag.errors import AdapterError

    with pytest.raises(AdapterError, match="only in case"):
        _compile(dirs[:2], model, tmp_path / "lib", names=["Doc1", "doc1"])
    assert not (tmp_path / "lib").exists()
    lib = _compile(dirs[:2], model, tmp_path / "lib", names=["Doc1", "doc2"])
    with pytest.raises(AdapterError, match="only in case"):
        lib.add(dirs[2:3], names=["DOC2"], progress=False)


# ---- 8. no hang on hostile patterns or huge documents ----------------------------------------------------
def _bad_adapter(tmp_path, source: Path, **changes) -> Path:
    import shutil

    folder = tmp_path / "bad" / source.name
    shutil.copytree(source, folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return folder


def test_backtracking_alpha_pattern_does_not_hang(tmp_path, model, dirs):
    import time

    folder = _bad_adapter(tmp_path, dirs[0], alpha_pattern={"([a-z_.0-9]+)*!": 2.0})  # exponential for `re`
    start = time.perf_counter()
    lib = _compile([folder], model, tmp_path / "lib")
    assert time.perf_counter() - start < 30 and len(lib) == 1  # matches nothing: lora_alpha applies


def test_a_pattern_that_runs_out_of_time_is_a_typed_error(tmp_path, model, dirs, monkeypatch):
    from llama_index_lag.errors import AdapterFormatError
    from llama_index_lag.library import peft_io

    folder = _bad_adapter(tmp_path, dirs[0], alpha_pattern={"gate_proj": 2.0})
    monkeypatch.setattr(peft_io, "PATTERN_TIMEOUT", 1e-9)  # every match is over time
    with pytest.raises(AdapterFormatError, match="takes too long to match") as info:
        _compile([folder], model, tmp_path / "lib")
    assert info.value.field == "alpha_pattern" and info.value.adapter == folder.name


def test_index_refuses_a_huge_document_quickly(tmp_path, capsys):
    import time

    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"id": "big", "title": "B", "text": "word " * 2_000_000}) + "\n")  # 10 MB
    start = time.perf_counter()
    assert cli_main(["index", "--docs", str(docs), "--out", str(tmp_path / "idx"), "-q"]) == 1
    assert time.perf_counter() - start < 60 and "max_document_chars" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()


# ---- 9. every bad input is a LAGError --------------------------------------------------------------------
NESTED = "[" * 100000 + "]" * 100000


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model, a library and a LAGLLM over them, shared by the bad-input cases."""
    from llama_index_lag import LAGLLM
    from llama_index_lag.models import load_causal_lm

    base = tmp_path_factory.mktemp("served")
    model_dir = make_tiny_model_dir(base / "m")
    model, tok = load_causal_lm(model_dir)
    dirs = make_lora_adapters(model, base / "ad", 3, rank=4, target_modules=MLP, seed=3)
    lib = AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=base / "lib", progress=False)
    return {"base": base, "model_dir": model_dir, "model": model, "dirs": dirs, "lib": lib,
            "llm": LAGLLM(model, tok, libraries=[lib])}


def _bad_compile(s, tmp_path, **changes):
    folder = _bad_adapter(tmp_path, s["dirs"][0], **changes)
    return lambda: AdapterLibrary.compile([folder], kind="knowledge", base_model=s["model"],
                                          out=tmp_path / "o", progress=False)


def _nested_adapter_config(s, tmp_path):
    folder = _bad_adapter(tmp_path, s["dirs"][0])
    (folder / "adapter_config.json").write_text(NESTED)
    return lambda: AdapterLibrary.compile([folder], kind="knowledge", base_model=s["model"],
                                          out=tmp_path / "o", progress=False)


def _cli(*args):
    def run():
        if cli_main(list(args)) != 0:
            raise LAGError("the CLI reported an error")  # cli_main prints LAGErrors and returns 1
    return run


def _data(reader, text):
    def run(s, tmp_path):
        from llama_index_lag import data

        path = _write(tmp_path / "f.jsonl", text)
        return lambda: getattr(data, reader)(path)
    return run


SURROGATE_DOC = '{"id": "a", "title": "t", "text": "x \\ud800 y"}\n'
SURROGATE_Q = '{"id": "q", "question": "x \\ud800", "answers": ["y"], "doc_id": "a"}\n'
BAD_INPUTS = {
    "alpha NaN": lambda s, t: _bad_compile(s, t, lora_alpha=float("nan")),
    "alpha Inf": lambda s, t: _bad_compile(s, t, lora_alpha=float("inf")),
    "alpha_pattern not a mapping": lambda s, t: _bad_compile(s, t, alpha_pattern="abc"),
    "alpha_pattern bad regex": lambda s, t: _bad_compile(s, t, alpha_pattern={"((": 2}),
    "alpha_pattern value NaN": lambda s, t: _bad_compile(s, t, alpha_pattern={"gate_proj": float("nan")}),
    "rank_pattern not an int": lambda s, t: _bad_compile(s, t, rank_pattern={"gate_proj": 2.5}),
    "r 1e9": lambda s, t: _bad_compile(s, t, r=10**9),
    "r inf": lambda s, t: _bad_compile(s, t, r=float("inf")),
    "r string": lambda s, t: _bad_compile(s, t, r="4"),
    "nested adapter_config.json": _nested_adapter_config,
    "nested documents": _data("read_documents", NESTED + "\n"),
    "nested questions": _data("read_questions", NESTED + "\n"),
    "nested task examples": _data("read_task_examples", NESTED + "\n"),
    "surrogate in a document": _data("read_documents", SURROGATE_DOC),
    "surrogate in a question": _data("read_questions", SURROGATE_Q),
    "nested pipeline config": lambda s, t: (lambda: __import__("llama_index_lag").LAGPipelineConfig.load(
        _write(t / "c.json", NESTED))),
    "nested recipe file": lambda s, t: _cli("build-adapters", "--docs",
                                            str(_write(t / "d.jsonl", SURROGATE_DOC)), "--out", str(t / "AD"),
                                            "--recipe", str(_write(t / "r.json", NESTED))),
    "surrogate in a prompt": lambda s, t: (lambda: s["llm"].complete("hi \ud800 there", max_new_tokens=2)),
    "max_new_tokens 0 per call": lambda s, t: (lambda: s["llm"].complete("hi", max_new_tokens=0)),
    "max_new_tokens -1 per call": lambda s, t: (lambda: s["llm"].complete("hi", max_new_tokens=-1)),
    "max_new_tokens 0 LAGLLM": lambda s, t: (lambda: __import__("llama_index_lag").LAGLLM(
        s["model"], s["llm"]._tokenizer, max_new_tokens=0)),
    "temperature -1 LAGLLM": lambda s, t: (lambda: __import__("llama_index_lag").LAGLLM(
        s["model"], s["llm"]._tokenizer, temperature=-1)),
    "temperature -1 per call": lambda s, t: (
        lambda: s["llm"].complete("hi", temperature=-1, max_new_tokens=2)),
    "temperature NaN per call": lambda s, t: (lambda: s["llm"].complete("hi", temperature=float("nan"))),
    "top_p 0 per call": lambda s, t: (lambda: s["llm"].complete("hi", top_p=0.0, temperature=0.5)),
    "unknown routing key per call": lambda s, t: (lambda: s["llm"].complete("hi", routing={"bogus": 1})),
    "unknown routing key in a pipeline": lambda s, t: (
        lambda: __import__("llama_index_lag").LAGPipelineConfig(routing={"bogus": 1})),
    "routing not a mapping": lambda s, t: (lambda: s["llm"].complete("hi", routing=["lag"])),
    "LAGConfig temperature < 0": lambda s, t: (lambda: LAGConfig(temperature=-1.0)),
    "lag ask max-new-tokens 0": lambda s, t: _cli("ask", "q", "--mode", "none", "--max-new-tokens", "0",
                                                  "--model", str(s["model_dir"])),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_inputs_end_in_a_lag_error(served, tmp_path, case):
    call = BAD_INPUTS[case](served, tmp_path)
    with pytest.raises(LAGError):
        call()


def test_leftover_temp_folders_are_removed_by_the_next_successful_write(tmp_path, model, dirs):
    from llama_index_lag._fs import atomic_dir

    out = tmp_path / "idx"
    dead = tmp_path / ".idx.tmp-999999999-deadbeef"  # a crashed writer's (no such pid)
    old_style = tmp_path / ".idx.tmp-deadbeef"
    live = tmp_path / f".idx.tmp-{os.getppid()}-cafe0000"  # a running process's: left alone
    for folder in (dead, old_style, live):
        folder.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "x").write_text("1")
    assert not dead.exists() and not old_style.exists() and live.exists()
    # a compile's partial folder from an interrupted, different compile
    partial = tmp_path / ".lib.partial"
    partial.mkdir()
    (partial / "progress.json").write_text('{"plan": "another", "done": 3}')
    _compile(dirs[:2], model, tmp_path / "lib")
    assert not partial.exists() and len(AdapterLibrary.load(tmp_path / "lib")) == 2
