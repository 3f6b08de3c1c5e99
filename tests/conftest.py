"""Shared fixtures: tiny random causal LMs (built from configs) and random PEFT LoRA adapters."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from llama_index_lag.testing import make_lora_adapters, make_tiny_model  # noqa: E402

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
