"""Building and compiling on a real local Ray cluster (no mocks): the same adapters and library bytes as a
local build, a worker killed mid-adapter, a poisoned document, a driver killed mid-build and resumed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_index_lag.data import DocumentRecord, write_documents
from llama_index_lag.errors import MissingDependencyError
from llama_index_lag.library import AdapterLibrary
from llama_index_lag.testing import make_tiny_model_dir
from llama_index_lag.training import KnowledgeRecipe, build_knowledge_adapters, is_finished

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parent.parent
DOCS = [DocumentRecord(f"doc-{i}", f"Entity {i} was founded in {1800 + 7 * i} near the river Olse. "
                       f"It keeps {i + 3} boats and a bell named Mox{i}.", f"Entity {i}") for i in range(5)]
FAST = KnowledgeRecipe(rank=4, alpha=8.0, steps=3, batch_size=2, warmup_steps=1, bf16=False, n_rewrites=0,
                       qa=False)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    poison = tmp_path_factory.mktemp("poison") / "ids.txt"
    poison.write_text("")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": "tests.ray_hooks.setup",
                          "env_vars": {"PYTHONPATH": str(ROOT), "LAG_TEST_POISON": str(poison)}})
    yield poison
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama")


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _local(docs, out, tiny, threads, recipe=FAST):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return build_knowledge_adapters(docs, out, base=tiny, recipe=recipe, progress=False)
    finally:
        torch.set_num_threads(before)


def test_ray_build_and_compile_equal_the_local_ones(tmp_path, cluster, tiny):
    local = _local(DOCS, tmp_path / "local", tiny, threads=2)
    report = build_knowledge_adapters(DOCS, tmp_path / "ray", base=tiny, recipe=FAST, progress=False,
                                      ray_address="auto", workers=1, ray_cpus_per_worker=2,
                                      compile_to=tmp_path / "ray-lib")
    assert report.built == [d.id for d in DOCS] and not report.failed
    (worker,) = report.workers.values()
    assert worker["adapters"] == len(DOCS) and worker["load_s"] > 0 and worker["busy_s"] > 0
    for doc in DOCS:  # the same seeds and threads per worker: bit for bit
        assert _same(local.out / doc.id, report.out / doc.id), doc.id
    # compile on the cluster == compile here, byte for byte (the tensors, statistics and manifest)
    lib = AdapterLibrary.compile(local.adapter_dirs, kind="knowledge", base_model=tiny, out=tmp_path / "lib",
                                 progress=False)
    ray_lib = AdapterLibrary.compile(local.adapter_dirs, kind="knowledge", base_model=tiny,
                                     out=tmp_path / "lib2", progress=False, ray_address="auto")
    for name in ("adapters.safetensors", "routing_stats.safetensors", "manifest.json"):
        assert (lib.path / name).read_bytes() == (ray_lib.path / name).read_bytes(), name
    assert AdapterLibrary.load(report.library).names == lib.names


def test_a_poisoned_document_is_reported_and_the_rest_are_built(tmp_path, cluster, tiny):
    cluster.write_text("doc-2")
    try:
        report = build_knowledge_adapters(DOCS, tmp_path / "ray", base=tiny, recipe=FAST, progress=False,
                                          ray_address="auto", workers=2, retries=1,
                                          compile_to=tmp_path / "lib")
    finally:
        cluster.write_text("")
    assert list(report.failed) == ["doc-2"]
    assert "RuntimeError: poisoned document doc-2 (after 2 attempts)" in report.failed["doc-2"]
    assert sorted(report.built) == ["doc-0", "doc-1", "doc-3", "doc-4"]
    assert not (tmp_path / "ray" / "doc-2").exists() and not list((tmp_path / "ray").glob(".doc-2.tmp-*"))
    assert AdapterLibrary.load(tmp_path / "lib").names == ["doc-0", "doc-1", "doc-3", "doc-4"]
    again = build_knowledge_adapters(DOCS, tmp_path / "ray", base=tiny, recipe=FAST, progress=False,
                                     ray_address="auto", workers=2)  # fixed: the re-run builds only it
    assert again.built == ["doc-2"] and sorted(again.skipped) == ["doc-0", "doc-1", "doc-3", "doc-4"]


def test_a_worker_killed_mid_adapter_is_restarted_and_its_document_retried(tmp_path, cluster, tiny):
    recipe = FAST.replace(steps=40)
    out = tmp_path / "ray"
    result: dict = {}

    def run() -> None:
        result["report"] = build_knowledge_adapters(DOCS[:3], out, base=tiny, recipe=recipe, progress=False,
                                                    ray_address="auto", workers=1, ray_cpus_per_worker=1)

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 240
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        for tmp in out.glob(".doc-*.tmp-*") if out.is_dir() else []:
            pid = int(tmp.name.split(".tmp-")[1].split("-")[0])
            os.kill(pid, signal.SIGKILL)  # the worker process, mid-adapter
            killed = tmp.name.split(".tmp-")[0].lstrip(".")
            break
        time.sleep(0.05)
    thread.join(timeout=600)
    assert killed is not None, "no adapter in progress was seen"
    report = result["report"]
    assert sorted(report.built) == ["doc-0", "doc-1", "doc-2"] and not report.failed
    assert not list(out.glob(".*.tmp-*"))  # the killed attempt's temp folder is gone
    local = _local([d for d in DOCS if d.id == killed], tmp_path / "local", tiny, threads=1, recipe=recipe)
    assert _same(local.out / killed, out / killed)  # the retried adapter is the one a clean build makes


def test_killing_the_driver_mid_build_then_resuming(tmp_path, cluster, tiny):
    docs = tmp_path / "docs.jsonl"
    write_documents(docs, DOCS)
    out = tmp_path / "ray"
    cmd = [sys.executable, "-m", "llama_index_lag.cli", "build-adapters", "--docs", str(docs), "--out",
           str(out), "--base", str(tiny), "--ray", "auto", "--workers", "1", "--no-generate", "--steps", "30",
           "--rank", "4", "--bf16", "off", "-q"]
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_dir() and any(is_finished(p) for p in out.iterdir()):
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = sorted(p.name for p in out.iterdir() if is_finished(p))
    assert 1 <= len(finished) < len(DOCS), (finished, proc.stderr.read().decode()[-2000:])
    recipe = KnowledgeRecipe.from_dict({**KnowledgeRecipe().to_dict(), "n_rewrites": 0, "qa": False,
                                        "steps": 30, "rank": 4, "alpha": 8.0, "bf16": False})
    report = build_knowledge_adapters(DOCS, out, base=tiny, recipe=recipe, progress=False,
                                      ray_address="auto", workers=1)
    assert sorted(report.skipped) == finished
    assert sorted(report.built + report.skipped) == [d.id for d in DOCS]
    assert not list(out.glob(".*.tmp-*"))


def test_without_ray_a_clear_error_names_the_install_command(tmp_path, tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r'pip install "llama-index-lag\[ray\]"'):
        build_knowledge_adapters(DOCS[:1], tmp_path / "a", base=tiny, recipe=FAST, progress=False,
                                 ray_address="auto")
    with pytest.raises(MissingDependencyError, match="ray"):
        AdapterLibrary.compile([tmp_path / "none"], kind="knowledge", base_model=tiny, out=tmp_path / "l",
                               ray_address="auto")
