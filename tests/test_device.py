"""Routing on an accelerator gives the CPU's logits, routing choices and generations.

Runs where torch sees an accelerator (CUDA or Apple MPS); a CPU-only run skips it. The library stays
where it is loaded (memory-mapped on the CPU); attach_lag copies what each wrapped module needs to the
module's device, and the FAISS index, when one serves Arrow, searches on the CPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
from llama_index_lag.testing import make_lora_adapters

from .conftest import ATTN, MLP

DEVICES = [name for name, available in (("cuda", torch.cuda.is_available()),
                                        ("mps", torch.backends.mps.is_available())) if available]
pytestmark = pytest.mark.skipif(not DEVICES, reason="no accelerator")
IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 11, 300, 2, 77]])

CONFIGS = [
    LAGConfig(mode="lag", k=3),
    LAGConfig(mode="arrow"),
    LAGConfig(mode="arrow", arrow_top_k=3, temperature=0.7),
    LAGConfig(mode="spectr"),
    LAGConfig(mode="spectr", spectr_top_k=2),
    LAGConfig(mode="lag", k=2, fixed={"knowledge": ["doc2"]}),  # PRAG+LAG
    LAGConfig(mode="lag", k=4, dynamic_k=0.8),
    LAGConfig(mode="spectr", granularity="sequence"),
    LAGConfig(mode="lag", k=3, granularity="sequence", sequence_scope="module"),
]


def _libraries(model: torch.nn.Module, root, dtype: str = "float32") -> list[AdapterLibrary]:
    know = make_lora_adapters(model, root / "k", 6, rank=4, target_modules=MLP, seed=1)
    task = make_lora_adapters(model, root / "t", 3, rank=2, target_modules=ATTN, seed=2, prefix="task")
    return [AdapterLibrary.compile(know, kind="knowledge", base_model=model, out=root / "kl", progress=False,
                                   dtype=dtype),
            AdapterLibrary.compile(task, kind="task", base_model=model, out=root / "tl", progress=False,
                                   dtype=dtype)]


def _run(model: torch.nn.Module, libs: list[AdapterLibrary], cfg: LAGConfig, device: str):
    router = attach_lag(model, libs, cfg)
    ids = IDS.to(device)
    batch = torch.stack([ids[0], torch.cat([torch.zeros(4, dtype=torch.long, device=device), ids[0, 4:]])])
    mask = (torch.arange(ids.shape[1], device=device) >= torch.tensor([[0], [4]], device=device)).long()
    with torch.no_grad(), router.trace() as trace:
        logits = model(ids).logits
        generated = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=0)
    router.detach()
    return logits, generated, trace


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.mode}-{c.granularity}-k{c.k}-{bool(c.fixed)}")
def test_routing_on_the_accelerator_matches_the_cpu(tiny_model, tmp_path, device, cfg):
    libs = _libraries(tiny_model, tmp_path)
    ref_logits, ref_gen, ref_trace = _run(tiny_model, libs, cfg, "cpu")
    model = copy.deepcopy(tiny_model).to(device)
    logits, generated, trace = _run(model, libs, cfg, device)
    assert logits.device.type == device
    assert torch.allclose(logits.cpu(), ref_logits, atol=1e-3), (logits.cpu() - ref_logits).abs().max()
    assert torch.equal(generated.cpu(), ref_gen)
    for kind in ref_trace.kinds:
        assert trace.summary()[kind]["selections"] == ref_trace.summary()[kind]["selections"]
        for module in ref_trace.modules(kind):
            assert torch.equal(trace.tokens(kind, module), ref_trace.tokens(kind, module)), (kind, module)


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
def test_half_precision_library_on_the_accelerator(tiny_model, tmp_path, device):
    libs = _libraries(tiny_model, tmp_path, dtype="bfloat16")
    model = copy.deepcopy(tiny_model).to(device=device, dtype=torch.bfloat16)
    ref = copy.deepcopy(tiny_model).to(torch.bfloat16)
    logits, generated, _ = _run(model, libs, LAGConfig(mode="lag", k=3), device)
    ref_logits, _, _ = _run(ref, libs, LAGConfig(mode="lag", k=3), "cpu")
    assert logits.dtype == torch.bfloat16 and generated.shape == (2, IDS.shape[1] + 6)
    assert torch.allclose(logits.float().cpu(), ref_logits.float(), atol=0.15)


@pytest.mark.parametrize("device", DEVICES or ["cpu"])
def test_faiss_backend_on_the_accelerator(tiny_model, tmp_path, device):
    pytest.importorskip("faiss")
    dirs = make_lora_adapters(tiny_model, tmp_path / "ad", 150, rank=2, target_modules=MLP, seed=5)
    lib = AdapterLibrary.compile(dirs, kind="knowledge", base_model=tiny_model, out=tmp_path / "lib",
                                 progress=False, arrow_index=True)
    cfg = LAGConfig(mode="lag", k=8, arrow_backend="faiss", nprobe=10_000, ef_search=10_000)
    ref_logits, ref_gen, _ = _run(tiny_model, [lib], cfg, "cpu")
    logits, generated, _ = _run(copy.deepcopy(tiny_model).to(device), [lib], cfg, device)
    assert torch.allclose(logits.cpu(), ref_logits, atol=1e-3)
    assert torch.equal(generated.cpu(), ref_gen)
