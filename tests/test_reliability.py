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
