"""`lag serve` on the embedded SmolLM2-135M with a library built from the demo documents (slow): concurrent
requests in three modes through the real openai client equal the in-process pipeline's answers, rag+lag
retrieves and cites the question's document, streaming equals the whole answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from llama_index.core.llms import ChatMessage

from llama_index_lag.data import read_documents, read_questions
from llama_index_lag.eval.synthetic import packaged_path

N = 12  # max_tokens


@pytest.mark.slow
def test_serve_smollm2_demo_library(tmp_path):
    pytest.importorskip("fastapi")
    import openai

    from llama_index_lag import AdapterLibrary
    from llama_index_lag.chat import build_chat_engine
    from llama_index_lag.errors import MissingDependencyError
    from llama_index_lag.indexing import build_index
    from llama_index_lag.llm import shared_llm
    from llama_index_lag.models import prepare_default_model
    from llama_index_lag.pipeline import LAGPipelineConfig
    from llama_index_lag.serve import background_server, create_app
    from llama_index_lag.serve.app import ServeSettings
    from llama_index_lag.training import KnowledgeRecipe, build_knowledge_adapters

    try:
        model_dir = prepare_default_model(progress=False)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    data = packaged_path("demo")
    docs = read_documents(data / "documents.jsonl")[:2]
    # a short recipe: the test is about serving the real model and library, not about the adapters' quality
    recipe = KnowledgeRecipe(steps=2, n_rewrites=0, qa=False)
    build_knowledge_adapters(docs, tmp_path / "adapters", base=model_dir, recipe=recipe,
                             compile_to=tmp_path / "knowledge", progress=False)
    build_index(docs, tmp_path / "index", show_progress=False)
    config = LAGPipelineConfig(mode="rag+lag", k=2, similarity_top_k=1, model=str(model_dir),
                               index=str(tmp_path / "index"), knowledge=str(tmp_path / "knowledge"),
                               max_new_tokens=N)
    names = AdapterLibrary.load(tmp_path / "knowledge").names
    q = next(q for q in read_questions(data / "questions.jsonl") if q.doc_id == docs[1].id and q.task == "qa")

    app = create_app(config, settings=ServeSettings(max_batch=4))
    with background_server(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=600)

        def chat(mode: str, **kw):
            return client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": q.question}], max_tokens=N,
                extra_body={"lag": {"mode": mode}}, **kw)

        modes = ["none", "lag", "rag+lag"]
        with ThreadPoolExecutor(len(modes)) as pool:  # decoded together in one batch
            got = dict(zip(modes, pool.map(chat, modes)))
        streamed = "".join(c.choices[0].delta.content or "" for c in chat("lag", stream=True) if c.choices)
        listed = client.models.list().data

    message = [ChatMessage(role="user", content=q.question)]
    for mode in ("none", "lag"):
        ref = shared_llm(config.model_copy(update={"mode": mode})).chat(message, max_new_tokens=N)
        assert got[mode].choices[0].message.content == ref.message.content, mode
        assert got[mode].usage.prompt_tokens == ref.message.additional_kwargs["prompt_tokens"]
    ref = build_chat_engine(config, mode="rag+lag", max_new_tokens=N).chat(q.question)
    assert got["rag+lag"].choices[0].message.content == str(ref.response).strip()
    lag = got["rag+lag"].model_extra["lag"]
    assert [s["id"] for s in lag["sources"]] == [q.doc_id]  # retrieval server-side, the question's document
    routed = lag["routing"]["libraries"]["knowledge"]
    assert routed and {r["adapter"] for r in routed} <= set(names)
    assert got["none"].model_extra["lag"]["routing"] is None
    assert streamed.strip() == got["lag"].choices[0].message.content
    assert listed and listed[0].id
