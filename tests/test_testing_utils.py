"""Tiny real models shipped in llama_index_lag.testing: tokenizer, three architectures, model folders."""

from __future__ import annotations

import time

import pytest
import torch

from llama_index_lag.errors import ConfigError, ModelError
from llama_index_lag.models import load_causal_lm
from llama_index_lag.testing import (
    ARCHS,
    CHATML_TEMPLATE,
    make_lora_adapters,
    make_tiny_model,
    make_tiny_model_dir,
    make_tiny_tokenizer,
)

TEXTS = [
    "The capital of France is Paris.",
    "Question: Who wrote the report?\nAnswer: the team, in 1850!",
    "  leading spaces, tabs\tand   runs of spaces  ",
    "Unseen words: zygomorphic quixotry {braces} [brackets] <angle> ~`@#$%^&*()_+=|\\;:'\",./?",
    "Non-ASCII too: caf\u00e9, \u00c4\u00d6\u00dc, \u65e5\u672c, \U0001f600",
]


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tiny_tokenizer_round_trips_any_text() -> None:
    tok = make_tiny_tokenizer()
    assert 300 <= len(tok) <= 600
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert all(0 <= i < len(tok) for i in ids)
        assert tok.decode(ids) == text


def test_tiny_tokenizer_compresses_english() -> None:
    tok = make_tiny_tokenizer()
    text = "The router picks the adapters whose directions best match the hidden state of every token."
    assert len(tok(text)["input_ids"]) < len(text) / 2


def test_tiny_tokenizer_special_tokens() -> None:
    tok = make_tiny_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    ids = tok("<|im_start|>user\nhi<|im_end|>")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_tiny_tokenizer_chat_template() -> None:
    tok = make_tiny_tokenizer()
    assert tok.chat_template == CHATML_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    encoded = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                      return_tensors="pt")
    assert encoded["input_ids"].shape == encoded["attention_mask"].shape
    assert tok.decode(encoded["input_ids"][0]) == text


def test_tiny_tokenizer_is_deterministic_and_saves(tmp_path) -> None:
    from transformers import AutoTokenizer

    a, b = make_tiny_tokenizer(), make_tiny_tokenizer(tmp_path)
    assert a.get_vocab() == b.get_vocab()
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == a.get_vocab()
    assert loaded.chat_template == CHATML_TEMPLATE
    assert loaded.pad_token == "<|endoftext|>"
    assert loaded(TEXTS[1])["input_ids"] == a(TEXTS[1])["input_ids"]


# ------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_config(arch: str) -> None:
    model = make_tiny_model(arch)
    cfg = model.config
    assert cfg.model_type == arch
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 96, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(make_tiny_tokenizer())
    assert cfg.tie_word_embeddings is False
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert not model.training
    assert model.dtype == torch.float32


def test_tiny_model_seed_and_rng_state() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = make_tiny_model(seed=0)
    assert torch.equal(torch.rand(3), expected), "the global RNG state must be restored"
    b, c = make_tiny_model(seed=0), make_tiny_model(seed=1)
    for (name, pa), pb, _pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_tiny_model_options() -> None:
    model = make_tiny_model("mistral", hidden_size=32, num_hidden_layers=1, dtype=torch.bfloat16)
    assert model.config.hidden_size == 32 and len(model.model.layers) == 1
    assert model.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="gpt2"):
        make_tiny_model("gpt2")


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_dir_loads_and_runs(tmp_path, arch: str) -> None:
    folder = make_tiny_model_dir(tmp_path / arch, arch=arch, seed=1)
    model, tok = load_causal_lm(folder)
    reference = make_tiny_model(arch, seed=1)
    for (name, p), q in zip(reference.named_parameters(), model.parameters()):
        assert torch.equal(p, q), name
    assert type(model).__name__.lower().startswith(arch)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id

    batch = tok(["hello world", "The capital of France is"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tok))
    assert torch.isfinite(out.logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_generates_with_kv_cache(tmp_path, arch: str) -> None:
    model, tok = load_causal_lm(make_tiny_model_dir(tmp_path / arch, arch=arch))
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        out = model(**prompt, use_cache=True)
        assert (out.past_key_values is not None
                and out.past_key_values.get_seq_length() == prompt["input_ids"].shape[1])
        kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
        cached = model.generate(**prompt, use_cache=True, **kw)
        uncached = model.generate(**prompt, use_cache=False, **kw)
    n = prompt["input_ids"].shape[1]
    assert cached.shape == (1, n + 12)
    assert torch.equal(cached, uncached)
    assert isinstance(tok.decode(cached[0, n:]), str)


# ----------------------------------------------------------------------------------------------- folders


def test_tiny_model_dir_is_idempotent(tmp_path) -> None:
    folder = make_tiny_model_dir(tmp_path / "m")
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert make_tiny_model_dir(tmp_path / "m") == folder
    assert weights.stat().st_mtime_ns == stamp
    first = make_tiny_model(seed=0).lm_head.weight
    make_tiny_model_dir(tmp_path / "m", seed=5)
    model, _ = load_causal_lm(folder)
    assert not torch.equal(model.lm_head.weight, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"], "no temp folders left behind"


def test_tiny_model_dir_into_empty_existing_folder(tmp_path) -> None:
    folder = make_tiny_model_dir(tmp_path, arch="qwen2")
    assert folder == tmp_path
    assert load_causal_lm(folder)[0].config.model_type == "qwen2"


def test_tiny_model_dir_refuses_foreign_folder(tmp_path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="non-empty"):
        make_tiny_model_dir(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_tiny_model_dir_is_fast(tmp_path) -> None:
    make_tiny_model_dir(tmp_path / "warm", arch="llama")  # imports done
    for arch in ARCHS:
        start = time.perf_counter()
        make_tiny_model_dir(tmp_path / f"fast-{arch}", arch=arch, seed=7)
        assert time.perf_counter() - start < 2.0


# ------------------------------------------------------------------------------------------ LoRA adapters


def test_make_lora_adapters(tmp_path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    model = make_tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    paths = make_lora_adapters(model, tmp_path / "k", 3, rank=4, seed=1, prefix="doc")
    assert [p.name for p in paths] == ["doc0", "doc1", "doc2"]
    assert model.state_dict().keys() == before.keys(), "the model must not be modified"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    weights = [load_file(p / "adapter_model.safetensors") for p in paths]
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_{}.weight"
    assert len(weights[0]) == 2 * 3 * 2  # A and B, 3 MLP modules, 2 layers
    a, b = weights[0][key.format("A")], weights[0][key.format("B")]
    assert a.shape == (4, 64) and b.shape == (96, 4)
    sv = torch.linalg.svdvals(b.double() @ a.double())[:4]
    assert torch.allclose(sv, 0.5 * 0.3 ** torch.arange(4, dtype=torch.float64), rtol=1e-4)
    assert not torch.equal(a, weights[1][key.format("A")])
    again = make_lora_adapters(model, tmp_path / "again", 3, rank=4, seed=1, prefix="doc")
    assert torch.equal(load_file(again[2] / "adapter_model.safetensors")[key.format("B")],
                       weights[2][key.format("B")])

    peft_model = PeftModel.from_pretrained(make_tiny_model("qwen2"), str(paths[0]))
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, model(ids).logits)


def test_make_lora_adapters_targets_and_errors(tmp_path) -> None:
    import json

    model = make_tiny_model("llama")
    (path,) = make_lora_adapters(model, tmp_path, 1, rank=2, target_modules=("q_proj", "v_proj"),
                                 prefix="task")
    config = json.loads((path / "adapter_config.json").read_text())
    assert (path.name == "task0" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
            and config["r"] == 2)
    with pytest.raises(ConfigError, match="rank"):
        # k_proj: 64 -> 32
        make_lora_adapters(model, tmp_path / "big", 1, rank=40, target_modules=("k_proj",))
    with pytest.raises(ConfigError, match="vocab_size"):
        make_tiny_model_dir(tmp_path / "small-vocab", vocab_size=100)


def test_write_lora_adapter_from_shapes_matches_the_bench_writer(tmp_path) -> None:
    import json

    from safetensors.torch import load_file

    from llama_index_lag.bench.common import write_random_peft_lora
    from llama_index_lag.testing import write_lora_adapter

    shapes = {"model.layers.0.mlp.gate_proj": (24, 16), "model.layers.0.self_attn.q_proj": (16, 16)}
    path = write_lora_adapter(tmp_path / "a", shapes, rank=3, lora_alpha=6.0, decay=0.5, scale=0.1,
                              generator=torch.Generator().manual_seed(0), precision=torch.float32)
    bench = write_random_peft_lora(tmp_path / "b", shapes, rank=3, alpha=6.0, decay=0.5, scale=0.1,
                                   generator=torch.Generator().manual_seed(0))
    a, b = load_file(path / "adapter_model.safetensors"), load_file(bench / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "base_model.model.model.layers.0.mlp.gate_proj.lora_{}.weight"
    assert a[key.format("A")].shape == (3, 16) and a[key.format("B")].shape == (24, 3)
    sv = torch.linalg.svdvals(a[key.format("B")].double() @ a[key.format("A")].double())[:3]
    assert torch.allclose(sv, 0.1 * 0.5 ** torch.arange(3, dtype=torch.float64), rtol=1e-4)
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["gate_proj", "q_proj"] and config["r"] == 3
    with pytest.raises(ConfigError, match="rank"):
        write_lora_adapter(tmp_path / "c", shapes, rank=20, lora_alpha=1.0, decay=0.5, scale=0.1,
                           generator=torch.Generator())
