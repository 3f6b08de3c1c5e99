"""Large-library features: approximate (FAISS) Arrow retrieval stored with the library, incremental
add/remove, stale-index handling, memory-mapped adapters and concurrent readers."""

from __future__ import annotations

import logging
import shutil
import threading

import numpy as np
import pytest
import torch

from llama_index_lag import AdapterLibrary, LAGConfig, attach_lag
from llama_index_lag.errors import LibraryFormatError
from llama_index_lag.routing.engine import route_tokens
from llama_index_lag.testing import make_lora_adapters

from .conftest import MLP

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 11, 300, 2, 77]])


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    from llama_index_lag.testing import make_tiny_model

    root = tmp_path_factory.mktemp("big")
    model = make_tiny_model("llama", seed=0)
    dirs = make_lora_adapters(model, root / "ad", 160, rank=2, target_modules=MLP, seed=5)
    return model, dirs, root


def _x(n: int, T: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(T, n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_index_built_at_compile_and_exact_at_full_search_breadth(big, tmp_path, kind):
    model, dirs, _ = big
    lib = AdapterLibrary.compile(dirs[:120], kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False, arrow_index=kind)
    assert lib.has_arrow_index() and lib.info()["arrow_index"] == kind == lib.arrow_index_type()
    module = lib.modules[0]
    search = lib.arrow_search(module)
    assert search.kind == kind
    x = _x(lib.module_shape(module)[1])
    t = lib.tensors(module)
    exact_top, exact_rows = (x @ t.proto.T).abs().topk(10, dim=-1)
    top, rows = search.search(x, 10, effort=10_000)  # every list probed / whole graph: exact up to float16
    assert torch.allclose(top, exact_top, atol=2e-3)
    agree = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(rows, exact_rows)])
    assert agree >= 0.95
    top_few, _ = search.search(x, 10, effort=1)  # narrowest search: approximate, never better than exact
    assert (top_few <= exact_top + 2e-3).all()


def _exact_over_library(lib: AdapterLibrary, module: str, x: torch.Tensor,
                        k: int) -> tuple[torch.Tensor, ...]:
    return (x @ lib.tensors(module).proto.T).abs().topk(k, dim=-1)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_add_and_remove_update_the_index_incrementally(big, tmp_path, kind):
    from llama_index_lag.library.arrow_index import read_arrow_meta

    model, dirs, _ = big
    lib = AdapterLibrary.compile(dirs[:100], kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False, arrow_index=kind)
    before = lib.revision
    lib.add(dirs[100:130])
    assert lib.revision != before and lib.has_arrow_index() and lib.arrow_index_type() == kind
    index = lib.arrow_indexes()[lib.modules[0]]
    assert index.ntotal == 130
    lib.remove([d.name for d in dirs[10:40]])
    assert len(lib) == 100 and lib.has_arrow_index()
    module = lib.modules[1]
    index = lib.arrow_indexes()[module]
    removed_uids = read_arrow_meta(lib.path)["removed"]
    if kind == "hnsw":  # a graph keeps removed nodes as tombstones that searches skip
        assert index.ntotal == 130 and len(removed_uids) == 30
    else:
        assert index.ntotal == 100 and removed_uids == []
    x = _x(lib.module_shape(module)[1], seed=3)
    exact_top, exact_rows = _exact_over_library(lib, module, x, 5)
    top, rows = lib.arrow_search(module).search(x, 5, effort=10_000)
    assert torch.allclose(top, exact_top, atol=2e-3)
    # no removed adapter returned
    assert torch.equal(rows.sort(dim=-1).values, exact_rows.sort(dim=-1).values)
    fresh = AdapterLibrary.compile([*dirs[:10], *dirs[40:130]], kind="knowledge", base_model=model,
                                   out=tmp_path / "fresh", progress=False)
    assert fresh.names == lib.names
    assert torch.equal(fresh.tensors(module).proto, lib.tensors(module).proto)
    if kind == "hnsw":  # past a quarter of tombstones the graph is rebuilt without them
        lib.remove([d.name for d in dirs[40:50]])
        assert lib.arrow_indexes()[module].ntotal == 90 and read_arrow_meta(lib.path)["removed"] == []
        exact_top, _ = _exact_over_library(lib, module, x, 5)
        assert torch.allclose(lib.arrow_search(module).search(x, 5, effort=10_000)[0], exact_top, atol=2e-3)


def test_approximate_routing_equals_exact_when_all_lists_probed(big, tmp_path):
    model, dirs, _ = big
    lib = AdapterLibrary.compile(dirs[:150], kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False, arrow_index=True)
    router = attach_lag(model, lib, LAGConfig(mode="lag", k=8))
    assert router.pools["knowledge"].indexed
    module = lib.modules[0]
    t = router.pools["knowledge"].tensors(module)
    assert t.index is not None
    x = _x(lib.module_shape(module)[1], seed=7)
    exact = route_tokens(x, t, "lag", k=8)
    approx = route_tokens(x, t, "lag", k=8, approximate=True, effort=10_000)
    assert (exact.chosen == approx.chosen).float().mean() >= 0.95
    with torch.no_grad():
        with router.using(arrow_backend="exact"):
            ref = model(IDS).logits
        with router.using(arrow_backend="faiss", ef_search=10_000):
            got = model(IDS).logits
    router.detach()
    assert torch.allclose(got, ref, atol=1e-2)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_auto_backend_searches_the_index_only_where_it_beats_the_exact_scan(kind):
    from llama_index_lag.library.arrow_index import FaissArrow, build_module_index
    from llama_index_lag.routing.engine import PoolTensors

    g = torch.Generator().manual_seed(11)
    N, n = 4000, 32
    protos = torch.nn.functional.normalize(torch.randn(N, n, generator=g), dim=-1)
    A = torch.cat([protos[:, None], torch.randn(N, 1, n, generator=g) * 0.1], dim=1)  # [N, 2, n]
    effort, wide = (2, 100) if kind == "ivf" else (8, 4000)
    index = FaissArrow(build_module_index(protos.numpy(), np.arange(N), kind), np.arange(N), effort=effort)
    t = PoolTensors(protos, A, torch.randn(N, 8, 2, generator=g), index=index)
    if kind == "ivf":
        assert index.index.nlist == 100  # 2 x 2 of 100 lists read per token: 4 % of the exact scan's reads
    assert t.approximates(None, 1) and not t.approximates(None, 64)  # decode: index; long prompt: exact
    assert t.approximates(True, 64) and not t.approximates(False, 1)
    assert not t.approximates(None, 1, effort=wide)  # searching everything costs more than the scan
    x1, x64 = _x(n, T=1, seed=1), _x(n, T=64, seed=2)
    assert torch.equal(route_tokens(x1, t, "lag", k=5, approximate=None).delta,
                       route_tokens(x1, t, "lag", k=5, approximate=True).delta)
    assert torch.equal(route_tokens(x64, t, "lag", k=5, approximate=None).delta,
                       route_tokens(x64, t, "lag", k=5, approximate=False).delta)
    few = route_tokens(x64, t, "lag", k=5, approximate=True, effort=1).chosen  # the index does differ here
    assert not torch.equal(few, route_tokens(x64, t, "lag", k=5, approximate=False).chosen)


def test_stale_or_missing_index_is_never_used_silently(big, tmp_path, caplog):
    model, dirs, _ = big
    lib = AdapterLibrary.compile(dirs[:60], kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False, arrow_index=True)
    old_index = shutil.copytree(tmp_path / "lib" / "arrow_index", tmp_path / "old_index")
    lib.add(dirs[60:70])  # new revision; now plant the old index back
    shutil.rmtree(tmp_path / "lib" / "arrow_index")
    shutil.copytree(old_index, tmp_path / "lib" / "arrow_index")
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert not lib.has_arrow_index()
    with pytest.raises(LibraryFormatError, match="stale"):
        attach_lag(model, lib, LAGConfig(arrow_backend="faiss"))
    with caplog.at_level(logging.WARNING):
        router = attach_lag(model, lib, LAGConfig())
    assert "stale" in caplog.text and not router.pools["knowledge"].indexed
    router.detach()
    lib.build_arrow_index()
    assert lib.has_arrow_index()
    shutil.rmtree(tmp_path / "lib" / "arrow_index")
    with pytest.raises(LibraryFormatError, match="missing"):
        attach_lag(model, AdapterLibrary.load(tmp_path / "lib"), LAGConfig(arrow_backend="faiss"))


def test_index_file_that_disagrees_with_its_meta_is_refused(big, tmp_path):
    import faiss

    from llama_index_lag.library.arrow_index import build_module_index, index_path

    model, dirs, _ = big
    lib = AdapterLibrary.compile(dirs[:40], kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False, arrow_index="hnsw")
    module = lib.modules[1]
    protos = lib.tensors(module).proto.float().numpy()
    # another index (30 of the 40 adapters) planted under the same name, meta.json untouched
    faiss.write_index(build_module_index(protos[:30], lib.uids()[:30]), str(index_path(lib.path, 1)))
    with pytest.raises(LibraryFormatError, match="meta.json says") as err:  # its size, checked at load
        attach_lag(model, AdapterLibrary.load(tmp_path / "lib"), LAGConfig(arrow_backend="faiss"))
    assert err.value.module == module


def test_indexed_pool_keeps_prototypes_memory_mapped(big, tmp_path):
    model, dirs, _ = big
    lib = AdapterLibrary.compile(dirs[:50], kind="knowledge", base_model=model, out=tmp_path / "lib",
                                 progress=False, arrow_index=True)
    router = attach_lag(model, lib)
    t = router.pools["knowledge"].tensors(lib.modules[0])
    mapped = lib.tensors(lib.modules[0])
    assert t.protos.data_ptr() == mapped.proto.data_ptr() and t.A.data_ptr() == mapped.A.data_ptr()
    router.detach()
    plain = AdapterLibrary.compile(dirs[:50], kind="knowledge", base_model=model, out=tmp_path / "plain",
                                   progress=False)
    router = attach_lag(model, plain)
    t = router.pools["knowledge"].tensors(plain.modules[0])
    assert t.protos.data_ptr() != plain.tensors(plain.modules[0]).proto.data_ptr()  # resident copy
    assert t.A.data_ptr() == plain.tensors(plain.modules[0]).A.data_ptr()  # A* stays mapped
    router.detach()


def test_concurrent_readers_during_updates(big, tmp_path):
    model, dirs, _ = big
    AdapterLibrary.compile(dirs[:20], kind="knowledge", base_model=model, out=tmp_path / "lib",
                           progress=False)
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                lib = AdapterLibrary.load(tmp_path / "lib")  # checks manifest against tensor shapes
                t = lib.tensors(lib.modules[0])
                assert t.A.shape[0] == len(lib)
                float(t.A[-1].abs().sum())  # touch the mapped pages
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    [t.start() for t in threads]
    writer = AdapterLibrary.load(tmp_path / "lib")
    for i in range(3):
        writer.add(dirs[20 + 5 * i: 25 + 5 * i])
        writer.remove([dirs[20 + 5 * i].name])
    stop.set()
    [t.join() for t in threads]
    assert not errors, errors[0]
    assert len(AdapterLibrary.load(tmp_path / "lib")) == 32


def test_packed_file_larger_than_ram_and_swap_is_mapped(tmp_path, monkeypatch):
    """A library larger than RAM + swap still opens: its packed file is mapped read-only. (A writable
    private map, as safetensors makes, is charged in full against the commit limit: ENOMEM.)"""
    from pathlib import Path

    from llama_index_lag.library import packed
    from llama_index_lag.library.packed import PackedReader, PackedWriter

    # The writer reserves its blocks (posix_fallocate) against a full disk; this file must stay sparse,
    # or it would take RAM + swap x 1.5 of real disk.
    monkeypatch.setattr(packed, "reserve", lambda fd, size: None)

    meminfo = Path("/proc/meminfo")
    if not meminfo.is_file():
        pytest.skip("needs /proc/meminfo")
    kib = {line.split(":")[0]: int(line.split()[1]) for line in meminfo.read_text().splitlines()
           if line.endswith("kB")}
    limit = (kib["MemTotal"] + kib.get("SwapTotal", 0)) * 1024
    m = n = 4096
    r = 8
    N = int(1.5 * limit) // ((r * n + m * r + n) * 4) + 1
    path = tmp_path / "big.safetensors"
    try:
        PackedWriter(path, {"layers.0.mlp": (m, n)}, N, r, torch.float32).close()  # sparse: no disk used
    except OSError as exc:  # e.g. a file-size limit
        pytest.skip(f"cannot create a {N}-row sparse file here: {exc}")
    if path.stat().st_blocks * 512 > 1 << 30:
        path.unlink()
        pytest.skip("this filesystem has no sparse files")
    assert path.stat().st_size > limit
    A = PackedReader(path).tensor("layers.0.mlp.A")
    try:
        assert A.shape == (N, r, n) and not bool(A[N - 1].any())  # the last row, past RAM + swap: paged in
    finally:
        del A
        path.unlink()
