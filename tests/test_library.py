"""Compiled adapter library: alignment against PEFT's dense deltas, on-disk format, mmap, add/remove,
atomic writes and resume, and every bad input named by the issue."""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_index_lag import AdapterLibrary
from llama_index_lag.cli import main as cli_main
from llama_index_lag.errors import (
    AdapterError,
    AdapterFormatError,
    ConfigError,
    IncompatibleAdapterError,
    LibraryError,
    LibraryFormatError,
    UnsafeAdapterError,
)
from llama_index_lag.library import writer
from llama_index_lag.testing import make_lora_adapters, make_tiny_model

from .conftest import MLP


def _compile(dirs, model, out, **kw) -> AdapterLibrary:
    kw.setdefault("kind", "knowledge")
    return AdapterLibrary.compile(dirs, base_model=model, out=out, progress=False, **kw)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
            if p.is_file()}


def _peft_deltas(model, path: Path) -> dict[str, torch.Tensor]:
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(path))
    return {name.removeprefix("base_model.model."): m.get_delta_weight("default").double()
            for name, m in peft_model.named_modules()
            if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}


def _save_peft(model, path: Path, seed: int = 0, **cfg) -> Path:
    torch.manual_seed(seed)
    cfg.setdefault("target_modules", list(MLP))
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(init_lora_weights=False, **cfg))
    peft_model.save_pretrained(str(path))
    return path


@pytest.fixture
def dirs(tmp_path, llama):
    return make_lora_adapters(llama, tmp_path / "ad", 5, rank=4, target_modules=MLP, seed=3)


# ---- alignment and format -------------------------------------------------------------------------
def test_aligned_factors_reproduce_peft_deltas_with_mixed_ranks_and_scalings(tmp_path, llama):
    dirs = [
        _save_peft(llama, tmp_path / "plain", 1, r=4, lora_alpha=8),
        _save_peft(llama, tmp_path / "rslora", 2, r=6, lora_alpha=3, use_rslora=True),
        _save_peft(llama, tmp_path / "pattern", 3, r=3, lora_alpha=6,
                   rank_pattern={"layers.1.mlp.gate_proj": 2}, alpha_pattern={"down_proj": 1.5}),
        _save_peft(llama, tmp_path / "attn", 4, r=2, lora_alpha=2, target_modules=["q_proj", "down_proj"]),
    ]
    lib = _compile(dirs, llama, tmp_path / "lib")
    assert lib.r_max == 6 and [e["rank"] for e in lib.adapters] == [4, 6, 3, 2]
    assert "model.layers.0.self_attn.q_proj" in lib.modules
    for i, d in enumerate(dirs):
        for module, dense in _peft_deltas(llama, d).items():
            t = lib.tensors(module)
            got = t.B[i].double() @ t.A[i].double()
            assert torch.allclose(got, dense, atol=1e-5), (d.name, module)
            top = torch.linalg.svd(dense)[2][0]
            assert abs(float(t.proto[i].double() @ top)) == pytest.approx(1.0, abs=1e-5)
            assert torch.equal(t.proto[i], t.A[i, 0])
    # the attention-only adapter does not adapt the MLP gate: zero rows, not valid there
    assert lib.present("model.layers.0.mlp.gate_proj").tolist() == [True, True, True, False]
    assert lib.tensors("model.layers.0.mlp.gate_proj").A[3].abs().max() == 0


def test_manifest_and_packed_tensors(tmp_path, llama, dirs):
    lib = _compile(dirs, llama, tmp_path / "lib", dtype="bfloat16")
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert (manifest["format_version"] == 3 and manifest["kind"] == "knowledge"
            and manifest["dtype"] == "bfloat16")
    assert manifest["base_model"]["fingerprint"]["architecture"] == "LlamaForCausalLM"
    assert manifest["base_model"]["fingerprint"]["hidden_size"] == 64
    assert [a["name"] for a in manifest["adapters"]] == [d.name for d in dirs]
    for entry, d in zip(manifest["adapters"], dirs):
        assert entry["sha256"] == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
        assert entry["source"] == str(d.resolve()) and entry["rank"] == 4
    with safe_open(str(tmp_path / "lib" / "adapters.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    m = "model.layers.0.mlp.down_proj"
    assert (shapes[f"{m}.A"] == (5, 4, 96) and shapes[f"{m}.B"] == (5, 64, 4)
            and shapes[f"{m}.proto"] == (5, 96))
    assert lib.tensors(m).A.dtype == torch.bfloat16
    f32 = _compile(dirs, llama, tmp_path / "lib32")
    assert torch.allclose(lib.tensors(m).B.float(), f32.tensors(m).B, atol=1e-2, rtol=1e-2)


def test_load_is_memory_mapped(tmp_path, llama, dirs):
    _compile(dirs, llama, tmp_path / "lib")
    lib = AdapterLibrary.load(tmp_path / "lib")
    A = lib.tensors(lib.modules[0]).A
    ptr = A.data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines()
    owners = [line.split()[-1] for line in maps
              if int(line.split()[0].split("-")[0], 16) <= ptr < int(line.split()[0].split("-")[1], 16)]
    assert owners and owners[0].endswith("adapters.safetensors")


def test_add_and_remove_equal_a_fresh_compile(tmp_path, llama, dirs):
    extra = make_lora_adapters(llama, tmp_path / "more", 2, rank=6, target_modules=("down_proj",), seed=9,
                               prefix="more")
    lib = _compile(dirs[:3], llama, tmp_path / "lib")
    lib.add(dirs[3:] + extra)
    fresh = _compile(dirs + extra, llama, tmp_path / "fresh")
    assert lib.names == fresh.names and lib.r_max == fresh.r_max == 6 and lib.modules == fresh.modules
    for m in fresh.modules:
        a, b = lib.tensors(m), fresh.tensors(m)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.proto, b.proto)
    assert [e["modules"] for e in lib.adapters] == [e["modules"] for e in fresh.adapters]
    lib.remove(["doc1", "more0"])
    kept = [dirs[0], dirs[2], dirs[3], dirs[4], extra[1]]
    fresh2 = _compile(kept, llama, tmp_path / "fresh2")
    assert lib.names == fresh2.names
    reloaded = AdapterLibrary.load(tmp_path / "lib")
    for m in fresh2.modules:
        assert torch.equal(reloaded.tensors(m).A[:, : fresh2.r_max], fresh2.tensors(m).A)


def test_alignment_batches_do_not_change_the_bytes(tmp_path, llama, dirs, monkeypatch):
    """(module, adapter) pairs are aligned in batches across modules; a batch boundary inside a module's
    run of adapters, or one chunk per adapter, gives the same library."""
    extra = make_lora_adapters(llama, tmp_path / "more", 2, rank=6, target_modules=("down_proj",), seed=9,
                               prefix="more")
    fresh = _compile(dirs + extra, llama, tmp_path / "fresh")
    monkeypatch.setattr(writer, "ALIGN_BATCH", 3)
    small = _compile(dirs + extra, llama, tmp_path / "small", chunk_size=1)
    for m in fresh.modules:
        a, b = small.tensors(m), fresh.tensors(m)
        assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.proto, b.proto)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_adapters_stored_in_other_dtypes(tmp_path, llama, dirs, dtype):
    """Factors are read in place from the weights file's bytes: float16 / bfloat16 / float64 files give
    the library of the same values stored as float32 (as safetensors decodes them)."""
    values = {k: v.to(dtype) for k, v in load_file(str(dirs[0] / "adapter_model.safetensors")).items()}
    stored, as_f32 = (shutil.copytree(dirs[0], tmp_path / "stored"),
                      shutil.copytree(dirs[0], tmp_path / "as_f32"))
    save_file(values, str(stored / "adapter_model.safetensors"))
    save_file({k: v.float() for k, v in values.items()}, str(as_f32 / "adapter_model.safetensors"))
    got, ref = _compile([stored], llama, tmp_path / "got"), _compile([as_f32], llama, tmp_path / "ref")
    for m in ref.modules:
        assert (torch.equal(got.tensors(m).A, ref.tensors(m).A)
                and torch.equal(got.tensors(m).B, ref.tensors(m).B))


def test_weights_file_checked_against_its_header(tmp_path, llama, dirs):
    """The compiler parses the bytes it hashes; they must still match the header read (and validated by
    safetensors) before: a changed, truncated or inconsistent file is an AdapterFormatError."""
    from llama_index_lag.library.peft_io import factor_arrays, read_header

    header = read_header(dirs[0])
    data = (dirs[0] / "adapter_model.safetensors").read_bytes()
    assert set(factor_arrays(header, data)) == set(header.shapes)
    size = int.from_bytes(data[:8], "little")
    entries = json.loads(data[8:8 + size])
    key = next(k for k in entries if k != "__metadata__")

    def rewritten(**change) -> bytes:
        head = json.dumps({**entries, key: {**entries[key], **change}}).encode()
        head += b" " * (size - len(head))
        return len(head).to_bytes(8, "little") + head + data[8 + size:]

    other = make_lora_adapters(llama, tmp_path / "other", 1, rank=2, target_modules=MLP, seed=5)[0]
    cases = {
        "truncated": data[: len(data) // 2],
        "header length": b"\xff" * 8 + data[8:],
        "not JSON": data[:8] + b"#" + data[9:],
        "offsets": rewritten(data_offsets=[0, 10**9]),
        "dtype I8": rewritten(dtype="I8"),
        "shape": rewritten(shape=["four", 32]),
        "changed": (other / "adapter_model.safetensors").read_bytes(),
    }
    for name, bad in cases.items():
        with pytest.raises(AdapterFormatError) as err:
            factor_arrays(header, bad)
        assert err.value.adapter == header.name, name


def test_failed_add_leaves_library_intact(tmp_path, llama, dirs):
    lib = _compile(dirs[:3], llama, tmp_path / "lib")
    before = _digest(tmp_path / "lib")
    bad = shutil.copytree(dirs[3], tmp_path / "bad")
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in weights if "layers.1.mlp.up_proj.lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterFormatError, match="NaN") as err:
        lib.add([dirs[4], bad])
    assert err.value.adapter == "bad" and err.value.module == "model.layers.1.mlp.up_proj"
    assert err.value.field == "lora_B"
    assert _digest(tmp_path / "lib") == before
    assert not any(p.name.startswith(".lib.partial") for p in tmp_path.iterdir())
    with pytest.raises(LibraryError, match="unknown adapters"):
        lib.remove(["nope"])
    with pytest.raises(LibraryError, match="empty"):
        lib.remove(lib.names)
    assert _digest(tmp_path / "lib") == before and AdapterLibrary.load(tmp_path / "lib").names == lib.names


def test_float16_overflow_names_the_adapter_and_keeps_nothing(tmp_path, llama, dirs):
    bad = shutil.copytree(dirs[2], tmp_path / "huge")
    weights = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in weights if "layers.0.mlp.down_proj.lora_B" in k)
    weights[key] = weights[key] * 1e9  # finite in float32, beyond float16's range once aligned
    save_file(weights, str(bad / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleAdapterError, match="overflows") as err:
        _compile([dirs[0], bad], llama, tmp_path / "lib", dtype="float16")
    assert err.value.adapter == "huge" and err.value.module == "model.layers.0.mlp.down_proj"
    assert err.value.field == "dtype" and not (tmp_path / "lib").exists()
    assert not any(p.name.startswith(".lib.partial") for p in tmp_path.iterdir())
    assert len(_compile([dirs[0], bad], llama, tmp_path / "lib32", dtype="float32")) == 2


def _interrupt_once_at(monkeypatch, start_row: int) -> list[int]:
    """Make the compiler raise KeyboardInterrupt (once) when it reaches the chunk starting at ``start_row``;
    returns the list of chunk starts it processes."""
    calls: list[int] = []
    pending = [start_row]
    real = writer._process_chunk

    def flaky(writer, start, chunk, modules, old, aligned=None):
        calls.append(start)
        if start in pending:
            pending.remove(start)
            raise KeyboardInterrupt
        return real(writer, start, chunk, modules, old, aligned)

    monkeypatch.setattr(writer, "_process_chunk", flaky)
    return calls


def test_interrupted_compile_resumes(tmp_path, llama, dirs, monkeypatch):
    old = _compile(dirs[:1], llama, tmp_path / "lib")
    calls = _interrupt_once_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _compile(dirs, llama, tmp_path / "lib", chunk_size=2)
    assert AdapterLibrary.load(tmp_path / "lib").names == old.names  # previous library intact
    assert (tmp_path / ".lib.partial" / "progress.json").is_file()
    first = list(calls)
    calls.clear()
    lib = _compile(dirs, llama, tmp_path / "lib", chunk_size=2)
    assert 0 in first and sorted(calls) == [2, 4]  # resumed at the chunk that was interrupted
    for entry, d in zip(lib.adapters, dirs):  # hashes of the rows written before the interruption kept
        assert entry["sha256"] == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
    fresh = _compile(dirs, llama, tmp_path / "fresh", chunk_size=2)
    for m in fresh.modules:
        assert torch.equal(lib.tensors(m).A, fresh.tensors(m).A)
    assert not (tmp_path / ".lib.partial").exists()


def test_interrupted_compile_restarts_when_an_input_changed(tmp_path, llama, dirs, monkeypatch):
    calls = _interrupt_once_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _compile(dirs, llama, tmp_path / "lib", chunk_size=2)
    weights = dirs[0] / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors = {k: v * 2 for k, v in tensors.items()}
    save_file(tensors, str(weights))  # a new file: the rows written before no longer match it
    calls.clear()
    lib = _compile(dirs, llama, tmp_path / "lib", chunk_size=2)
    assert 0 in calls  # started over
    assert lib.adapters[0]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    fresh = _compile(dirs, llama, tmp_path / "fresh", chunk_size=2)
    for m in fresh.modules:
        assert torch.equal(lib.tensors(m).B, fresh.tensors(m).B)


def test_cli_compile_and_inspect(tmp_path, llama, dirs, capsys):
    from llama_index_lag.testing import make_tiny_model_dir

    base = make_tiny_model_dir(tmp_path / "base", arch="llama")
    model = make_tiny_model("llama")
    assert cli_main(["compile", *map(str, dirs), "--kind", "task", "--base", str(base), "--out",
                     str(tmp_path / "lib"), "--dtype", "float16"]) == 0
    assert "5 task adapters" in capsys.readouterr().out
    assert cli_main(["inspect", str(tmp_path / "lib"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"] == 5 and info["dtype"] == "float16" and info["kind"] == "task"
    assert info["module_patterns"] == {"model.layers.*.mlp.gate_proj": 2, "model.layers.*.mlp.up_proj": 2,
                                       "model.layers.*.mlp.down_proj": 2}
    assert cli_main(["inspect", str(tmp_path / "lib")]) == 0
    out = capsys.readouterr().out
    assert "ranks 4..4" in out and "exact scan" in out and not info["arrow_index"]
    assert cli_main(["compile", *map(str, dirs[:3]), "--kind", "task", "--base", str(base), "--out",
                     str(tmp_path / "indexed"), "--arrow-index", "ivf"]) == 0
    assert AdapterLibrary.load(tmp_path / "indexed").arrow_index_type() == "ivf"
    # added, and the index rebuilt as HNSW
    assert cli_main(["compile", *map(str, dirs[3:]), "--kind", "task", "--add", "--out",
                     str(tmp_path / "indexed"), "--arrow-index", "hnsw"]) == 0
    capsys.readouterr()
    assert cli_main(["inspect", str(tmp_path / "indexed"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["adapters"] == 5 and info["arrow_index"] == "hnsw"
    del model


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_adapter_folders(tmp_path, llama, dirs):
    good = dirs[0]
    cases = {}
    cases["missing"] = tmp_path / "nope"
    cases["noconfig"] = shutil.copytree(good, tmp_path / "noconfig")
    (cases["noconfig"] / "adapter_config.json").unlink()
    cases["badjson"] = shutil.copytree(good, tmp_path / "badjson")
    (cases["badjson"] / "adapter_config.json").write_text("{not json")
    cases["noweights"] = shutil.copytree(good, tmp_path / "noweights")
    (cases["noweights"] / "adapter_model.safetensors").unlink()
    cases["truncated"] = shutil.copytree(good, tmp_path / "truncated")
    data = (cases["truncated"] / "adapter_model.safetensors").read_bytes()
    (cases["truncated"] / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    for name, path in cases.items():
        with pytest.raises(AdapterFormatError) as err:
            _compile([path], llama, tmp_path / "lib")
        assert err.value.adapter == path.name, name
    assert not (tmp_path / "lib").exists()


def test_pickle_refused_unless_allowed(tmp_path, llama, dirs):
    pickled = shutil.copytree(dirs[0], tmp_path / "pickled")
    weights = load_file(str(pickled / "adapter_model.safetensors"))
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(weights, pickled / "adapter_model.bin")
    with pytest.raises(UnsafeAdapterError, match="allow_pickle"):
        _compile([pickled], llama, tmp_path / "lib")
    lib = _compile([pickled], llama, tmp_path / "lib", allow_pickle=True)
    ref = _compile([dirs[0]], llama, tmp_path / "ref")
    assert torch.equal(lib.tensors(lib.modules[0]).A, ref.tensors(ref.modules[0]).A)


def test_incompatible_adapters(tmp_path, llama):
    bigger = make_tiny_model("llama", intermediate_size=128)
    wrong_shape = make_lora_adapters(bigger, tmp_path / "big", 1, rank=2, target_modules=MLP, prefix="big")[0]
    with pytest.raises(IncompatibleAdapterError, match="_features 128, the base module has 96") as err:
        _compile([wrong_shape], llama, tmp_path / "lib")
    assert err.value.module.startswith("model.layers.") and err.value.field in ("lora_A", "lora_B")
    cases = {
        "dora": (dict(r=2, use_dora=True), "use_dora"),
        "embed": (dict(r=2, target_modules=["embed_tokens"]), "embedding"),
        "mts": (dict(r=2, modules_to_save=["lm_head"]), "modules_to_save"),
    }
    for name, (cfg, match) in cases.items():
        path = _save_peft(llama, tmp_path / name, **cfg)
        with pytest.raises(IncompatibleAdapterError, match=match) as err:
            _compile([path], llama, tmp_path / "lib")
        assert err.value.adapter == name
    deep = make_tiny_model("llama", num_hidden_layers=3)
    extra_layer = make_lora_adapters(deep, tmp_path / "deep", 1, rank=2, target_modules=MLP, prefix="deep")[0]
    with pytest.raises(IncompatibleAdapterError, match="does not exist") as err:
        _compile([extra_layer], llama, tmp_path / "lib")
    assert err.value.module.startswith("model.layers.2.mlp.")
    assert not (tmp_path / "lib").exists()


def test_names_and_arguments(tmp_path, llama, dirs):
    with pytest.raises(AdapterError, match="duplicate"):
        _compile([dirs[0], dirs[1]], llama, tmp_path / "lib", names=["same", "same"])
    for bad in ("../x", "a/b", ".hidden", ""):
        with pytest.raises(AdapterError, match="invalid adapter name"):
            _compile([dirs[0]], llama, tmp_path / "lib", names=[bad])
    with pytest.raises(LibraryError, match="at least one adapter"):
        _compile([], llama, tmp_path / "lib")
    with pytest.raises(ConfigError, match="dtype"):
        _compile(dirs, llama, tmp_path / "lib", dtype="int8")
    with pytest.raises(ConfigError, match="kind"):
        _compile(dirs, llama, tmp_path / "lib", kind="style")
    lib = _compile(dirs[:2], llama, tmp_path / "lib")
    before = _digest(tmp_path / "lib")
    with pytest.raises(AdapterError, match="duplicate"):
        lib.add([dirs[0]])
    assert _digest(tmp_path / "lib") == before


def test_corrupt_or_stale_library_folders(tmp_path, llama, dirs):
    _compile(dirs, llama, tmp_path / "lib")
    with pytest.raises(LibraryFormatError, match="does not exist"):
        AdapterLibrary.load(tmp_path / "missing")
    broken = shutil.copytree(tmp_path / "lib", tmp_path / "broken")
    (broken / "manifest.json").write_text("{")
    with pytest.raises(LibraryFormatError, match="not valid JSON"):
        AdapterLibrary.load(broken)
    stale = shutil.copytree(tmp_path / "lib", tmp_path / "stale")
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["adapters"] = manifest["adapters"][:3]
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryFormatError, match="stale"):
        AdapterLibrary.load(stale)
    future = shutil.copytree(tmp_path / "lib", tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["format_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryFormatError, match="format_version"):
        AdapterLibrary.load(future)
    truncated = shutil.copytree(tmp_path / "lib", tmp_path / "truncated")
    data = (truncated / "adapters.safetensors").read_bytes()
    (truncated / "adapters.safetensors").write_bytes(data[:-100])  # cuts into the last tensor
    last = AdapterLibrary.load(tmp_path / "lib").modules[-1]
    with pytest.raises(LibraryFormatError, match="truncated") as err:
        AdapterLibrary.load(truncated)
    assert err.value.module == last and err.value.field == f"{last}.proto"
    (truncated / "adapters.safetensors").write_bytes(data[:6])
    with pytest.raises(LibraryFormatError, match="cannot open packed tensors"):
        AdapterLibrary.load(truncated)
    (truncated / "adapters.safetensors").write_bytes(b"\xff" * 8 + data[8:])  # header length past the end
    with pytest.raises(LibraryFormatError, match="does not fit"):
        AdapterLibrary.load(truncated)


def test_packed_writer_flushes_both_write_paths(tmp_path, monkeypatch):
    """Consecutive rows go through pwrite (fsync alone makes them durable: no msync, whose CPython
    implementation holds the GIL for the whole sync); scattered rows through the map, which the next flush
    msyncs. Both read back exactly."""
    import numpy as np

    from llama_index_lag.library.packed import PackedReader, PackedWriter

    msyncs = []
    original = np.memmap.flush
    monkeypatch.setattr(np.memmap, "flush", lambda self: (msyncs.append(1), original(self))[1])
    gen = torch.Generator().manual_seed(0)
    N, r, m, n = 6, 3, 5, 4
    A, B = torch.randn(N, r, n, generator=gen), torch.randn(N, m, r, generator=gen)
    writer = PackedWriter(tmp_path / "t.safetensors", {"mod": (m, n)}, N, r, torch.float32)
    writer.write_rows("mod", torch.tensor([0, 1, 2]), A[:3], B[:3], A[:3, 0])
    writer.flush()
    assert msyncs == []
    writer.write_rows("mod", torch.tensor([5, 3]), A[[5, 3]], B[[5, 3]], A[[5, 3], 0])
    writer.flush()
    assert msyncs == [1]
    writer.write_rows("mod", torch.tensor([4]), A[4:], B[4:], A[4:, 0])
    writer.close()
    assert msyncs == [1]
    reader = PackedReader(tmp_path / "t.safetensors")
    assert torch.equal(reader.tensor("mod.A"), A) and torch.equal(reader.tensor("mod.B"), B)
    assert torch.equal(reader.tensor("mod.proto"), A[:, 0])
