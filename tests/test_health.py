"""Routing health: the library's shared input subspace against a dense reference, hubness figures against
scipy, and a planted hub (an adapter on the generic directions of every token) flagged end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from scipy.stats import skew

from llama_index_lag import AdapterLibrary, LAGConfig
from llama_index_lag.cli import main as cli_main
from llama_index_lag.health import hubness, library_spectrum
from llama_index_lag.models import load_causal_lm
from llama_index_lag.testing import make_lora_adapters, make_tiny_model_dir

from .conftest import MLP

PROMPTS = ["the cat sat on the mat", "where was the ship built", "who founded the society in 1907",
           "a quiet town by the sea", "what is the capital of the island", "name the festival of lights"]


@pytest.fixture
def tiny(tmp_path_factory):
    folder = make_tiny_model_dir(tmp_path_factory.getbasetemp() / "tiny-health")
    model, tok = load_causal_lm(folder)
    return folder, model, tok


def test_spectrum_matches_a_dense_reference(tmp_path, tiny):
    _, model, _ = tiny
    dirs = make_lora_adapters(model, tmp_path / "ad", 7, rank=4, target_modules=MLP, seed=4)
    lib = AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False)
    spec = library_spectrum(lib, m=3)
    overlaps = []
    for module in lib.modules:
        A = lib.tensors(module).A.double()  # [N, r, n]
        # the mean projector, one adapter at a time
        P = sum(A[i].T @ A[i] for i in range(len(lib))) / len(lib)
        eig, vec = torch.linalg.eigh(P)
        eig, vec = eig.flip(0), vec.flip(1)
        got = spec["modules"][module]
        assert np.allclose(got["eigenvalues"], eig[:3].numpy(), atol=1e-5)
        assert got["isotropic"] == pytest.approx(4 / A.shape[2], abs=1e-6)
        assert got["shared_mass"] == pytest.approx(float(eig[:3].sum() / 4), abs=1e-3)
        U = vec[:, :3]
        overlaps.append(torch.stack([(A[i] @ U).square().sum() / 4 for i in range(len(lib))]))
    assert torch.allclose(spec["overlap"].double(), torch.stack(overlaps).mean(0), atol=1e-5)


def test_hubness_figures():
    counts = torch.tensor([60, 3, 2, 2, 1, 0, 1, 1, 0, 30])
    names = [f"a{i}" for i in range(10)]
    h = hubness(counts, names)
    assert h["skewness"] == pytest.approx(skew(counts.numpy()), abs=1e-3)
    assert h["selections"] == 100 and h["top1pct_adapters"] == 1 and h["top1pct_share"] == 0.6
    assert [x["adapter"] for x in h["hubs"][:2]] == ["a0", "a9"] and h["never_selected"] == 2
    assert h["hub_dominated"]
    even = hubness(torch.full((10,), 7), names)
    assert even["skewness"] == 0 and not even["hub_dominated"]


def _plant_hub(model, tok, adapter_dir, rank):
    """Rewrite adapter_dir's lora_A rows as the top principal directions of the model's own inputs to each
    module over generic prompts (what every token has), keeping lora_B: an adapter every token prefers."""
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, name=name: inputs.setdefault(name, []).append(args[0][0]))
        for name, mod in model.named_modules() if name.rsplit(".", 1)[-1] in MLP]
    with torch.no_grad():
        for p in PROMPTS:
            model(**tok(p, return_tensors="pt"))
    for h in hooks:
        h.remove()
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(str(path))
    for name, xs in inputs.items():
        key = next(k for k in tensors if f"{name}.lora_A" in k)
        _, _, vh = torch.linalg.svd(torch.cat(xs).float(), full_matrices=False)  # uncentred: the mean too
        tensors[key] = vh[:rank].contiguous()
    save_file(tensors, str(path))


def test_a_planted_hub_is_flagged_and_a_plain_library_is_not(tmp_path, tiny):
    folder, model, tok = tiny
    dirs = make_lora_adapters(model, tmp_path / "ad", 12, rank=4, target_modules=MLP, seed=5)
    plain = AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=tmp_path / "plain",
                                   progress=False)
    report = plain.health(model, PROMPTS, tokenizer=tok, config=LAGConfig(mode="spectr"))
    assert not report.hub_dominated, report.routing
    _plant_hub(model, tok, dirs[3], 4)
    hubbed = AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=tmp_path / "hub",
                                    progress=False)
    report = hubbed.health(model, PROMPTS, tokenizer=tok, config=LAGConfig(mode="spectr"))
    assert report.hub_dominated and report.routing["hubs"][0]["adapter"] == "doc3"
    assert report.counts.sum() == report.routing["selections"] and int(report.counts.argmax()) == 3
    assert any("hub-dominated" in f for f in report.flags)
    # the CLI: the same figures as JSON, and the plot
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    png = tmp_path / "wins.png"
    assert cli_main(["inspect", str(tmp_path / "hub"), "--health", "--prompts", str(prompts), "--model",
                     str(folder), "--routing", '{"mode": "spectr"}', "--plot", str(png), "--json"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_health_cli_text_and_bad_input(tmp_path, tiny, capsys):
    folder, model, _ = tiny
    dirs = make_lora_adapters(model, tmp_path / "ad", 4, rank=2, target_modules=MLP, seed=6)
    AdapterLibrary.compile(dirs, kind="knowledge", base_model=model, out=tmp_path / "lib", progress=False)
    assert cli_main(["inspect", str(tmp_path / "lib"), "--health"]) == 0
    assert "spectrum" in capsys.readouterr().out
    bad = tmp_path / "p.jsonl"
    bad.write_text(json.dumps({"nothing": 1}) + "\n")
    assert cli_main(["inspect", str(tmp_path / "lib"), "--health", "--prompts", str(bad), "--model",
                     str(folder)]) == 1
    assert "question" in capsys.readouterr().err
    assert cli_main(["inspect", str(tmp_path / "lib"), "--health", "--routing", "{bad"]) == 1
