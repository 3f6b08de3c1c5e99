"""LlamaIndex-native ingestion: documents from SimpleDirectoryReader (random ids on every load) get stable ids
and safe adapter names; the user's own indexes (simple vector store, FAISS; persisted and reloaded) drive
PRAG; as_query_engine's keyword arguments are honoured and typos refused; --input-dir on the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llama_index.core import SimpleDirectoryReader, StorageContext, VectorStoreIndex, load_index_from_storage
from llama_index.core.postprocessor import SimilarityPostprocessor
from llama_index.core.prompts import PromptTemplate

from llama_index_lag import LAGLLM, AdapterLibrary
from llama_index_lag.data import adapter_name, read_documents
from llama_index_lag.errors import ConfigError, DataError, LibraryError
from llama_index_lag.ingest import document_records, read_directory, stable_document_id
from llama_index_lag.models import load_causal_lm, load_embed_model
from llama_index_lag.pipeline import build_query_engine
from llama_index_lag.testing import make_tiny_model_dir
from llama_index_lag.training import KnowledgeRecipe, build_knowledge_adapters

DEMO = Path(__file__).resolve().parents[1] / "llama_index_lag" / "data" / "demo" / "documents.jsonl"
FILES = {"Veltrano Oskimar.md": "person-veltrano-oskimar", "harbour towns/drelmouth.txt": "town-drelmouth",
         "Brisovan Society.md": "org-brisovan-society"}
QUESTION = "In which town was Veltrano Oskimar born?"
RECIPE = KnowledgeRecipe(rank=2, alpha=4.0, steps=1, batch_size=2, warmup_steps=0, bf16=False, qa=False,
                         n_rewrites=0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A user's folder: file names with spaces, a subfolder, and a file of another kind."""
    root = tmp_path_factory.mktemp("user") / "docs"
    texts = {d.id: d.text for d in read_documents(DEMO)}
    for name, doc_id in FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(texts[doc_id], encoding="utf-8")
    (root / "table.csv").write_text("a,b\n1,2\n")
    return root


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    """Adapters and a library built straight from SimpleDirectoryReader's Documents."""
    root = tmp_path_factory.mktemp("built")
    model_dir = make_tiny_model_dir(root / "model", max_position_embeddings=2048)
    model, tok = load_causal_lm(model_dir)
    docs = SimpleDirectoryReader(str(folder), recursive=True, required_exts=[".md", ".txt"]).load_data()
    report = build_knowledge_adapters(docs, root / "adapters", model=model, tokenizer=tok, recipe=RECIPE,
                                      progress=False, compile_to=root / "lib")
    lib = AdapterLibrary.load(root / "lib")
    return {"root": root, "model_dir": model_dir, "model": model, "tok": tok, "docs": docs, "report": report,
            "lib": lib, "embed": load_embed_model(),
            "llm": LAGLLM(model_dir, libraries=[lib], max_new_tokens=3)}


def _path(folder: Path, name: str) -> str:
    return str(folder / name)


def test_reader_documents_get_stable_ids_and_safe_adapter_names(folder, built):
    again = SimpleDirectoryReader(str(folder), recursive=True, required_exts=[".md", ".txt"]).load_data()
    assert [d.id_ for d in again] != [d.id_ for d in built["docs"]]  # llama-index's ids change per load
    ids = [stable_document_id(d) for d in again]
    assert ids == [stable_document_id(d) for d in built["docs"]] == [d.metadata["file_path"] for d in again]
    expected = {_path(folder, name): adapter_name(_path(folder, name)) for name in FILES}
    assert built["lib"].doc_ids() == expected  # the manifest keeps the original id of each adapter
    assert sorted(p.name for p in (built["root"] / "adapters").iterdir() if p.is_dir()) == sorted(
        expected.values())
    assert all(" " not in name and "/" not in name for name in expected.values())
    rerun = build_knowledge_adapters(again, built["root"] / "adapters", model=built["model"],
                                     tokenizer=built["tok"], recipe=RECIPE, progress=False)
    assert rerun.built == [] and sorted(rerun.skipped) == sorted(ids)  # the same files: nothing rebuilt
    records = document_records(again)
    assert {r.title for r in records} == {"Veltrano Oskimar", "drelmouth", "Brisovan Society"}
    pages = [again[0], again[0].model_copy()]  # one file read as two documents without filename_as_id
    with pytest.raises(DataError, match="filename_as_id=True"):
        build_knowledge_adapters(pages, built["root"] / "other", model=built["model"],
                                 tokenizer=built["tok"], recipe=RECIPE, progress=False)


def _simple_index(docs, embed, persist: Path):
    VectorStoreIndex.from_documents(docs, embed_model=embed).storage_context.persist(persist_dir=str(persist))
    return load_index_from_storage(StorageContext.from_defaults(persist_dir=str(persist)), embed_model=embed)


def _faiss_index(docs, embed, persist: Path):
    import faiss
    from llama_index.vector_stores.faiss import FaissVectorStore

    store = FaissVectorStore(faiss_index=faiss.IndexFlatL2(384))
    ctx = StorageContext.from_defaults(vector_store=store)
    VectorStoreIndex.from_documents(docs, storage_context=ctx, embed_model=embed).storage_context.persist(
        persist_dir=str(persist))
    ctx = StorageContext.from_defaults(vector_store=FaissVectorStore.from_persist_dir(str(persist)),
                                       persist_dir=str(persist))
    return load_index_from_storage(ctx, embed_model=embed)


@pytest.mark.parametrize("make_index", [_simple_index, _faiss_index])
def test_prag_with_the_users_own_index(folder, built, tmp_path, make_index):
    fresh = SimpleDirectoryReader(str(folder), recursive=True, required_exts=[".md", ".txt"]).load_data()
    index = make_index(fresh, built["embed"], tmp_path / "storage")  # a new load: new random ids
    llm = built["llm"]
    engine = build_query_engine(mode="prag", llm=llm, index=index, similarity_top_k=1)  # no config.index
    response = engine.query(QUESTION)
    person = adapter_name(_path(folder, "Veltrano Oskimar.md"))
    assert response.metadata["lag"]["fixed"] == {"knowledge": [person]}
    other = adapter_name(_path(folder, "Brisovan Society.md"))
    pinned = build_query_engine(mode="prag", llm=llm, index=index, similarity_top_k=1,
                                doc_to_adapter=lambda node: other)
    assert pinned.query(QUESTION).metadata["lag"]["fixed"] == {"knowledge": [other]}
    by_key = build_query_engine(mode="prag", llm=llm, index=index, doc_to_adapter="adapter")
    with pytest.raises(LibraryError, match="has no adapter"):
        by_key.query(QUESTION)


def test_engine_keyword_arguments_are_honoured_and_typos_refused(built, tmp_path):
    index = _simple_index(built["docs"], built["embed"], tmp_path / "storage")
    llm = built["llm"]
    template = PromptTemplate("Context: {context_str}\nQ: {query_str}\nA:")
    engine = build_query_engine(mode="rag+lag", llm=llm, index=index, similarity_top_k=3,
                                text_qa_template=template,
                                node_postprocessors=[SimilarityPostprocessor(similarity_cutoff=0.45)])
    prompts = engine.get_prompts()
    assert prompts["response_synthesizer:text_qa_template"].get_template() == template.get_template()
    sources = engine.query(QUESTION).source_nodes
    plain = build_query_engine(mode="rag+lag", llm=llm, index=index, similarity_top_k=3)
    everything = plain.retrieve(QUESTION)
    assert len(everything) == 3 and 1 <= len(sources) < 3  # the cut-off removed the unrelated documents
    assert all(n.score >= 0.45 for n in sources)
    with pytest.raises(ConfigError, match="similarity_topk.*did you mean 'similarity_top_k'"):
        build_query_engine(mode="rag", llm=llm, index=index, similarity_topk=5)
    with pytest.raises(ConfigError, match="set index"):
        build_query_engine(mode="rag", llm=llm)


def test_read_directory_and_the_cli_input_dir(folder, built, tmp_path, capsys):
    from llama_index_lag.cli import main

    records = read_directory(folder, required_exts=["md", ".txt"])
    assert sorted(r.id for r in records) == sorted(FILES)  # relative paths: stable across machines
    assert main(["index", "--input-dir", str(folder), "--required-exts", ".md,.txt", "--out",
                 str(tmp_path / "idx"), "-q"]) == 0
    manifest = json.loads((tmp_path / "idx" / "lag_index.json").read_text())
    assert sorted(manifest["doc_ids"]) == sorted(FILES)
    args = ["build-adapters", "--input-dir", str(folder), "--required-exts", ".md,.txt", "--base",
            str(built["model_dir"]), "--steps", "1", "--rank", "2", "--bf16", "off", "--no-generate",
            "--quiet"]
    assert main([*args, "--out", str(tmp_path / "ad"), "--compile", str(tmp_path / "lib")]) == 0
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.doc_ids() == {name: adapter_name(name) for name in FILES}
    capsys.readouterr()
    assert main([*args, "--out", str(folder / "adapters")]) == 1  # would be read as documents next time
    assert "inside --input-dir" in capsys.readouterr().err and not (folder / "adapters").exists()
    with pytest.raises(SystemExit) as exc:  # one source of documents
        main(["index", "--docs", str(DEMO), "--input-dir", str(folder), "--out", str(tmp_path / "x")])
    assert exc.value.code == 2
    from llama_index_lag.pipeline_config import LAGPipelineConfig

    config = LAGPipelineConfig(mode="prag", model=str(built["model_dir"]), index=str(tmp_path / "idx"),
                               knowledge=str(tmp_path / "lib"), max_new_tokens=3, similarity_top_k=1)
    response = build_query_engine(config, embed_model=built["embed"]).query(QUESTION)
    assert response.metadata["lag"]["fixed"] == {"knowledge": [adapter_name("Veltrano Oskimar.md")]}


def test_existing_app_example_runs(folder, built, tmp_path):
    import os
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "existing_app.py"
    env = {**os.environ, "LLAMA_INDEX_LAG_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, str(script), "--docs", str(folder), "--base", str(built["model_dir"]),
           "--steps", "1", "--no-generate", "--question", QUESTION]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"Q: {QUESTION}" in run.stdout and "routing: lag {'knowledge':" in run.stdout
