"""``lag sync``: after files are edited, added and deleted, the library and index equal a fresh build of the
new folder, and only the adapters of changed documents are rebuilt (a tiny model, a real embedder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llama_index_lag import AdapterLibrary
from llama_index_lag.cli import main
from llama_index_lag.data import adapter_name
from llama_index_lag.indexing import build_index, load_index, read_index_manifest, retrieve_documents
from llama_index_lag.ingest import read_directory
from llama_index_lag.models import load_embed_model
from llama_index_lag.testing import make_tiny_model_dir
from llama_index_lag.training import KnowledgeRecipe, build_knowledge_adapters, sync_documents

RECIPE = KnowledgeRecipe(rank=2, alpha=4.0, steps=2, batch_size=2, warmup_steps=0, bf16=False, qa=False,
                         n_rewrites=0)
TEXTS = {"alpha.md": "Alpha is a lighthouse keeper in Norvik. She paints gulls.",
         "beta notes.md": "Beta is a ferry between two islands. It sails at dawn.",
         "sub/gamma.txt": "Gamma is a bakery famous for rye bread and honey cake."}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync")
    return {"root": root, "model": make_tiny_model_dir(root / "model"), "embed": load_embed_model()}


def _write(folder: Path, texts: dict[str, str]) -> None:
    for name, text in texts.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")


def _factors(lib: AdapterLibrary) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for module in lib.manifest["modules"]:
        t = lib.tensors(module)
        for i, name in enumerate(lib.names):
            out.setdefault(name, {})[module] = torch.cat([t.A[i].flatten(), t.B[i].flatten()])
    return out


def test_sync_equals_a_fresh_build_and_rebuilds_only_what_changed(setup, tmp_path):
    folder, work = tmp_path / "docs", tmp_path / "work"
    _write(folder, TEXTS)
    kw = {"index_dir": work / "index", "library_dir": work / "lib", "adapters_dir": work / "adapters",
          "base": setup["model"], "recipe": RECIPE, "embed_model": setup["embed"], "progress": False}
    first = sync_documents(folder, **kw)  # nothing yet: everything is built
    assert sorted(first.added) == sorted(TEXTS) and AdapterLibrary.load(work / "lib").names
    alpha_meta = (work / "adapters" / "alpha.md" / "lag_adapter.json").read_bytes()

    (folder / "beta notes.md").write_text("Beta is a ferry that now sails at dusk.", encoding="utf-8")  # edit
    (folder / "sub" / "gamma.txt").unlink()  # delete
    _write(folder, {"delta.md": "Delta is a river port with a red crane."})  # add
    dry = sync_documents(folder, **kw, dry_run=True)
    revision = AdapterLibrary.load(work / "lib").revision
    assert (dry.added, dry.changed, dry.removed) == (["delta.md"], ["beta notes.md"], ["sub/gamma.txt"])
    assert AdapterLibrary.load(work / "lib").revision == revision  # a dry run writes nothing
    report = sync_documents(folder, **kw)
    assert sorted(report.build.built) == ["beta notes.md", "delta.md"] and report.unchanged == ["alpha.md"]
    assert (work / "adapters" / "alpha.md" / "lag_adapter.json").read_bytes() == alpha_meta  # not rebuilt

    fresh = tmp_path / "fresh"
    build_knowledge_adapters(read_directory(folder), fresh / "adapters", base=setup["model"], recipe=RECIPE,
                             progress=False, compile_to=fresh / "lib")
    build_index(folder, fresh / "index", embed_model=setup["embed"], show_progress=False)
    synced, rebuilt = AdapterLibrary.load(work / "lib"), AdapterLibrary.load(fresh / "lib")
    assert synced.doc_ids() == rebuilt.doc_ids() == {d: adapter_name(d) for d in ("alpha.md", "beta notes.md",
                                                                                  "delta.md")}
    a, b = _factors(synced), _factors(rebuilt)
    assert a.keys() == b.keys() and all(torch.equal(a[n][m], b[n][m]) for n in a for m in a[n])
    ma, mb = read_index_manifest(work / "index"), read_index_manifest(fresh / "index")
    assert sorted(ma["doc_ids"]) == sorted(mb["doc_ids"]) and ma["num_nodes"] == mb["num_nodes"]
    ia, ib = (load_index(p, embed_model=setup["embed"]) for p in (work / "index", fresh / "index"))
    for query in ("Which ferry sails at dusk?", "a crane in a river port"):
        hits_a = [(h.doc_id, round(h.score, 5)) for h in retrieve_documents(ia, query, top_k=3)]
        assert hits_a == [(h.doc_id, round(h.score, 5)) for h in retrieve_documents(ib, query, top_k=3)]

    again = sync_documents(folder, **kw)
    assert again.up_to_date and again.build is None
    assert AdapterLibrary.load(work / "lib").revision == synced.revision  # nothing rewritten
    stale = read_directory(folder)  # an index of other texts under the same ids: re-embedded, adapters kept
    build_index([r.__class__(r.id, r.text + " Extra.", r.title) for r in stale], work / "index",
                embed_model=setup["embed"], show_progress=False)
    fixed = sync_documents(folder, **kw)
    assert fixed.up_to_date and fixed.build is None
    assert read_index_manifest(work / "index")["doc_sha256"] == mb["doc_sha256"]


def test_cli_sync(setup, tmp_path, capsys):
    folder, work = tmp_path / "docs", tmp_path / "work"
    _write(folder, TEXTS)
    args = ["sync", "--input-dir", str(folder), "--index", str(work / "index"), "--knowledge",
            str(work / "lib"), "--adapters", str(work / "ad"), "--base", str(setup["model"]), "--steps", "1",
            "--rank", "2", "--bf16", "off", "--no-generate", "-q"]
    assert main(args) == 0 and "3 added" in capsys.readouterr().out
    (folder / "alpha.md").write_text("Alpha moved to Sorvik.", encoding="utf-8")
    assert main([*args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 changed" in out and "would change" in out and "changed: alpha.md" in out
    assert main(args[:7] + args[9:]) == 0  # without --adapters: the library knows where they are
    out = capsys.readouterr().out
    assert "0 added, 1 changed, 0 removed, 2 unchanged" in out


def test_a_running_process_picks_up_the_synced_index_and_library(setup, tmp_path):
    from llama_index_lag.pipeline import build_query_engine
    from llama_index_lag.pipeline_config import LAGPipelineConfig

    folder, work = tmp_path / "docs", tmp_path / "work"
    _write(folder, TEXTS)
    kw = {"index_dir": work / "index", "library_dir": work / "lib", "adapters_dir": work / "adapters",
          "base": setup["model"], "recipe": RECIPE, "embed_model": setup["embed"], "progress": False}
    sync_documents(folder, **kw)
    config = LAGPipelineConfig(mode="prag", model=str(setup["model"]), index=str(work / "index"),
                               knowledge=str(work / "lib"), max_new_tokens=2, similarity_top_k=1)
    before = build_query_engine(config, embed_model=setup["embed"])
    library = before.llm.router.libraries["knowledge"][0]
    assert library.is_current()
    _write(folder, {"delta.md": "Delta is a river port with a red crane."})
    sync_documents(folder, **kw)
    assert not library.is_current() and library.reload().revision != library.revision
    after = build_query_engine(config, embed_model=setup["embed"])  # the same process, a new engine
    question = "Where is the red crane?"
    assert after.query(question).metadata["lag"]["fixed"] == {"knowledge": ["delta.md"]}
    old = before.query(question)  # the engine built before keeps the revision it had, and still works
    assert old.metadata["lag"]["fixed"] != {"knowledge": ["delta.md"]}
