"""Shared fixtures: tiny random causal LMs (built from configs), random PEFT LoRA adapters, libraries compiled
from them, and the demo-document world of the LLM and pipeline tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llama_index_lag import AdapterLibrary  # noqa: E402
from llama_index_lag.testing import make_lora_adapters, make_tiny_model  # noqa: E402

if TYPE_CHECKING:  # pragma: no cover
    from llama_index_lag.pipeline import LAGPipelineConfig

torch.set_num_threads(2)

MLP = ("gate_proj", "up_proj", "down_proj")
ATTN = ("q_proj", "v_proj", "down_proj")  # shares down_proj with MLP: both libraries adapt it


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never write into the user's cache from tests (a prepared default model is reused read-only)."""
    if "LLAMA_INDEX_LAG_TEST_CACHE" not in os.environ:
        return
    monkeypatch.setenv("LLAMA_INDEX_LAG_CACHE", os.environ["LLAMA_INDEX_LAG_TEST_CACHE"])


@pytest.fixture(params=["llama", "qwen2"])
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def tiny_model(arch: str) -> torch.nn.Module:
    return make_tiny_model(arch, seed=0)


@pytest.fixture
def llama() -> torch.nn.Module:
    return make_tiny_model("llama", seed=0)


@pytest.fixture
def knowledge_dirs(tmp_path: Path, tiny_model: torch.nn.Module) -> list[Path]:
    return make_lora_adapters(tiny_model, tmp_path / "knowledge", 6, rank=4, target_modules=MLP, seed=1)


@pytest.fixture
def task_dirs(tmp_path: Path, tiny_model: torch.nn.Module) -> list[Path]:
    return make_lora_adapters(tiny_model, tmp_path / "task", 3, rank=2, target_modules=ATTN, seed=2,
                              prefix="task")


def compile_library(dirs, kind, model, out, **kw) -> AdapterLibrary:
    """``AdapterLibrary.compile`` without a progress bar."""
    return AdapterLibrary.compile(dirs, kind=kind, base_model=model, out=out, progress=False, **kw)


@pytest.fixture
def two_libs(tmp_path, tiny_model, knowledge_dirs, task_dirs):
    """A knowledge library (6 adapters on the MLP) and a task library (3 on attention) of ``tiny_model``."""
    know = compile_library(knowledge_dirs, "knowledge", tiny_model, tmp_path / "klib")
    task = compile_library(task_dirs, "task", tiny_model, tmp_path / "tlib")
    return know, task


# ---- the demo-document world (LLM, pipeline, config tests) -------------------------------------------
DEMO = Path(__file__).resolve().parents[1] / "llama_index_lag" / "data" / "demo" / "documents.jsonl"
QUESTION = "In which town was Veltrano Oskimar born?"


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """Model folder, knowledge library (one adapter per demo document), task library, FAISS index: shared by
    the LLM and pipeline tests (a test module may override it with its own ``world``)."""
    from llama_index_lag.data import read_documents
    from llama_index_lag.indexing import build_index
    from llama_index_lag.models import load_embed_model
    from llama_index_lag.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("world")
    model_dir = make_tiny_model_dir(root / "model", max_position_embeddings=2048)
    model = make_tiny_model("llama", max_position_embeddings=2048)
    docs = read_documents(DEMO)
    raw = make_lora_adapters(model, root / "raw", len(docs), rank=4, seed=1)
    dirs = []
    for path, doc in zip(raw, docs):
        dirs.append(path.rename(root / "raw" / doc.id))
    AdapterLibrary.compile(dirs[:-1], kind="knowledge", base_model=model_dir, out=root / "know",
                           progress=False)  # the last document has no adapter
    task_dirs = make_lora_adapters(model, root / "traw", 2, rank=2, target_modules=("q_proj", "v_proj"),
                                   seed=2, prefix="style")
    AdapterLibrary.compile(task_dirs, kind="task", base_model=model_dir, out=root / "task", progress=False)
    embed = load_embed_model()
    build_index(docs, root / "index", embed_model=embed, show_progress=False)
    return {"root": root, "model": str(model_dir), "know": str(root / "know"), "task": str(root / "task"),
            "index": str(root / "index"), "embed": embed, "docs": docs}


@pytest.fixture(scope="session")
def config(world) -> LAGPipelineConfig:
    """The pipeline configuration over ``world`` (mode unset)."""
    from llama_index_lag.pipeline import LAGPipelineConfig

    return LAGPipelineConfig(model=world["model"], index=world["index"], knowledge=world["know"],
                             task=[world["task"]], max_new_tokens=6, k=3)
