"""Knowledge / task adapter builder: folders, determinism, resume, bad input, real loss decrease (tiny
models)."""

from __future__ import annotations

import errno
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llama_index_lag.data import DocumentRecord, TaskExample, write_documents, write_task_examples
from llama_index_lag.errors import ConfigError, DataError, ModelError, UnsafeOutputError
from llama_index_lag.library import AdapterLibrary
from llama_index_lag.models import load_causal_lm
from llama_index_lag.testing import make_tiny_model_dir
from llama_index_lag.training import (
    BuildError,
    KnowledgeRecipe,
    QAGenerationWarning,
    TaskRecipe,
    augment_document,
    build_knowledge_adapters,
    is_finished,
    read_adapter_meta,
    train_task_adapter,
)
from llama_index_lag.training.augment import answer_spans, chunk_document, parse_qa, split_sentences
from llama_index_lag.training.train import causal_lm_loss, tokenize_examples

DOCS = [
    DocumentRecord("person-ada", "Ada Brill was a baker born in 1850 in Tarn. She kept a cat named Mox. "
                   "She died in 1920.", "Ada Brill"),
    DocumentRecord("town-tarn", "Tarn is a town on the Olse River. It was founded in 1402. "
                   "About 900 people live near its mill.", "Tarn"),
    DocumentRecord("ship-vela", "The Vela was a schooner launched in 1877. Its captain was Ilo Sand. "
                   "It was 30 metres long.", "Vela"),
]
#: tiny, fast recipe (the tiny model cannot write anything useful; tests feed their own generator)
FAST = KnowledgeRecipe(rank=4, alpha=8.0, steps=3, batch_size=2, warmup_steps=1, bf16=False, qa_spans=False,
                       rewrite_max_new_tokens=16, qa_max_new_tokens=12)


def fake_generate(prompts, *, max_new_tokens, stop=None):
    """Good QA pairs for QA prompts (answer = last word of the sentence), a rewrite for rewrite prompts."""
    out = []
    for prompt in prompts:
        if prompt.endswith("Question:"):
            sentence = prompt.rsplit("Sentence: ", 1)[1].split("\n", 1)[0]
            topic = prompt.rsplit("Topic: ", 1)[1].split("\n", 1)[0]
            answer = re.findall(r"\w+", sentence)[-1]
            out.append(f" Which fact number {len(sentence)} is told about {topic}?\nAnswer: {answer}\n\n")
        else:
            text = prompt.split("\n\n")[-1].split("<|im_end|>")[0]
            out.append(f"In other words: {text}")
    return out


def garbage_generate(prompts, *, max_new_tokens, stop=None):
    return ["@@@ ### no structure here" for _ in prompts]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", arch="llama")


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path):
    return load_causal_lm(tiny_dir)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def _build(docs, out, tiny, **kw):
    model, tok = tiny
    kw.setdefault("recipe", FAST)
    kw.setdefault("generate", fake_generate)
    return build_knowledge_adapters(docs, out, model=model, tokenizer=tok, progress=False, **kw)


# ---------------------------------------------------------------------------------------------- builder
def test_builder_writes_peft_folders_named_by_doc_id_and_compiles(tmp_path, tiny, tiny_dir):
    report = _build(DOCS, tmp_path / "adapters", tiny, compile_to=tmp_path / "lib")
    assert report.built == [d.id for d in DOCS] and report.skipped == []
    for doc in DOCS:
        folder = tmp_path / "adapters" / doc.id
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        meta = json.loads((folder / "lag_adapter.json").read_text())
        assert meta["doc_id"] == doc.id and meta["kind"] == "knowledge" and meta["seed"] == 0
        assert meta["recipe"]["rank"] == 4 and meta["recipe"]["init"] == "eva"
        assert set(meta["timings"]) >= {"generate_s", "eva_init_s", "train_s", "total_s"}
        assert meta["train"]["steps"] == 3 and meta["train"]["loss_first"] > 0
        aug = meta["augmentation"]
        assert aug["qa_generated"] == 3 and aug["qa_kept"] == 3 and aug["qa_skipped"] == 0
        assert aug["rewrites_kept"] == 1 and aug["examples"]["passage_qa"] == 3
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["r"] == 4 and sorted(config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    lib = AdapterLibrary.load(tmp_path / "lib")
    assert lib.kind == "knowledge" and lib.names == [d.id for d in DOCS]
    assert lib.doc_ids() == {d.id: d.id for d in DOCS}
    # a second library compiled from the folders alone (as `lag compile` would) agrees
    lib2 = AdapterLibrary.compile(report.adapter_dirs, kind="knowledge", base_model=tiny_dir,
                                  out=tmp_path / "lib2", progress=False)
    assert lib2.names == lib.names


def test_builder_restores_the_base_model(tmp_path, tiny):
    model, _tok = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _build(DOCS[:1], tmp_path / "a", tiny)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(model, "peft_config")
    assert not any("lora" in name for name, _ in model.named_modules())


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, tiny):
    _build(DOCS[:2], tmp_path / "a", tiny, seed=7)
    _build(DOCS[:2][::-1], tmp_path / "b", tiny, seed=7)  # order does not matter
    _build(DOCS[:1], tmp_path / "c", tiny, seed=8)
    for doc in DOCS[:2]:
        wa, wb = _weights(tmp_path / "a" / doc.id), _weights(tmp_path / "b" / doc.id)
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
    wa, wc = _weights(tmp_path / "a" / DOCS[0].id), _weights(tmp_path / "c" / DOCS[0].id)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_resume_after_interrupt_builds_only_the_rest(tmp_path, tiny):
    out = tmp_path / "adapters"

    def stop_after_first(doc_id, meta):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(DOCS, out, tiny, on_adapter=stop_after_first)
    assert is_finished(out / DOCS[0].id, DOCS[0].id)
    assert not (out / DOCS[1].id).exists()

    # interrupted in the middle of training the second adapter: nothing half-written is left behind
    calls = {"n": 0}

    def crash_mid_training(step, n_steps, loss):
        calls["n"] += 1
        if step == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _build(DOCS, out, tiny, on_step=crash_mid_training)
    assert not (out / DOCS[1].id).exists()
    assert _listing(out) == [DOCS[0].id]  # no temp folders either

    first = _weights(out / DOCS[0].id)
    report = _build(DOCS, out, tiny)
    assert report.skipped == [DOCS[0].id] and report.built == [d.id for d in DOCS[1:]]
    assert list(report.metadata) == [d.id for d in DOCS]
    assert all(torch.equal(first[k], v) for k, v in _weights(out / DOCS[0].id).items())
    assert _build(DOCS, out, tiny).built == []  # everything finished now


def _listing(folder):
    """Entries of an adapters folder, without the build's lock files."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock"))


def test_foreign_folder_is_not_taken_as_finished_nor_replaced(tmp_path, tiny):
    out = tmp_path / "adapters"
    (out / DOCS[0].id).mkdir(parents=True)
    (out / DOCS[0].id / "adapter_config.json").write_text("{}")  # e.g. copied by hand, no lag_adapter.json
    (out / f".{DOCS[0].id}.tmp-deadbeef").mkdir()  # left by a crashed run
    assert not is_finished(out / DOCS[0].id)
    with pytest.raises(UnsafeOutputError, match="not an adapter written by llama-index-lag") as info:
        _build(DOCS[:1], out, tiny)
    assert info.value.adapter == DOCS[0].id
    assert (out / DOCS[0].id / "adapter_config.json").read_text() == "{}"  # untouched
    report = _build(DOCS[:1], out, tiny, force=True)
    assert report.built == [DOCS[0].id]
    assert is_finished(out / DOCS[0].id, DOCS[0].id)
    assert not (out / f".{DOCS[0].id}.tmp-deadbeef").exists()


def test_disk_full_raises_build_error_and_resume_works(tmp_path, tiny, monkeypatch):
    from llama_index_lag.training import builder

    out = tmp_path / "adapters"
    real = builder.atomic_write_json
    seen = {"n": 0}

    def full_on_second(path, obj):
        seen["n"] += 1
        if seen["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(builder, "atomic_write_json", full_on_second)
    with pytest.raises(BuildError, match="disk full") as info:
        _build(DOCS, out, tiny)
    assert info.value.adapter == DOCS[1].id
    assert _listing(out) == [DOCS[0].id]
    monkeypatch.setattr(builder, "atomic_write_json", real)
    assert _build(DOCS, out, tiny).built == [d.id for d in DOCS[1:]]


def test_overwrite_rebuilds(tmp_path, tiny):
    _build(DOCS[:1], tmp_path / "a", tiny)
    assert _build(DOCS[:1], tmp_path / "a", tiny, overwrite=True).built == [DOCS[0].id]


# ---------------------------------------------------------------------------------------------- bad input
def test_garbage_qa_generations_are_skipped_and_counted(tmp_path, tiny):
    _model, tok = tiny
    with pytest.warns(QAGenerationWarning, match="skipped 3 of 3"):
        aug = augment_document(DOCS[0], tok, FAST, garbage_generate)
    assert aug.qa == [] and aug.rewrites == []
    assert aug.stats["qa_generated"] == 3 and aug.stats["qa_skipped"] == 3
    assert aug.stats["qa_skip_reasons"] == {"unparsable": 3}
    report = _build(DOCS[:1], tmp_path / "a", tiny, generate=garbage_generate)  # still trains on the rest
    meta = report.metadata[DOCS[0].id]
    assert meta["augmentation"]["qa_kept"] == 0 and meta["augmentation"]["qa_skipped"] == 3
    assert meta["augmentation"]["rewrites_generated"] == 1 and meta["augmentation"]["rewrites_kept"] == 0


@pytest.mark.parametrize(
    ("completion", "reason"),
    [
        (" Who was Ada Brill?\nAnswer: 1850", "kept"),
        (" Who kept the cat?\nAnswer: She", "bad_answer"),
        (" What was the name of her cat?\nAnswer: Felix", "answer_not_in_document"),
        (" Who was Mox?\nAnswer: Mox", "answer_in_question"),
        (" What is the answer to the question?\nAnswer: 1850", "not_a_question"),
        (" no answer line", "unparsable"),
        ("", "unparsable"),
    ],
)
def test_parse_qa(completion, reason):
    sentence = "Ada Brill was a baker born in 1850 in Tarn. She kept a cat named Mox."
    pair, why = parse_qa(completion, sentence, DOCS[0].text)
    assert why == reason and (pair is not None) == (reason == "kept")


def test_generator_returning_wrong_count_is_a_data_error(tiny):
    _model, tok = tiny
    with pytest.raises(DataError, match="returned 0 texts"):
        augment_document(DOCS[0], tok, FAST, lambda prompts, **kw: [])


def test_long_documents_are_chunked_and_too_long_refused(tmp_path, tiny):
    _model, tok = tiny
    sentences = [f"Fact {i}: the tower number {i} was painted on day {i}." for i in range(40)]
    long_doc = DocumentRecord("long-doc", " ".join(sentences), "Long")
    recipe = FAST.replace(chunk_tokens=64)
    chunks = chunk_document(long_doc, tok, recipe)
    assert len(chunks) > 3
    from llama_index.core.node_parser import SentenceSplitter  # the index's splitter: one chunker

    count = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert chunks == SentenceSplitter(chunk_size=64, chunk_overlap=0, tokenizer=count).split_text(
        " ".join(long_doc.text.split()))
    assert " ".join(chunks) == " ".join(long_doc.text.split())
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 64 for c in chunks)
    # one over-long "sentence" without punctuation is cut on word boundaries
    run_on = DocumentRecord("run-on", " ".join(["word"] * 300), "Run")
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) <= 64
               for c in chunk_document(run_on, tok, recipe))
    report = _build([long_doc], tmp_path / "a", tiny, recipe=recipe.replace(n_rewrites=0))
    assert report.metadata["long-doc"]["augmentation"]["chunks"] == len(chunks)
    # longer than max_document_tokens: refused before anything is trained
    with pytest.raises(DataError, match="max_document_tokens") as info:
        _build([DOCS[0], long_doc], tmp_path / "b", tiny, recipe=recipe.replace(max_document_tokens=100))
    assert info.value.adapter == "long-doc"
    assert not (tmp_path / "b" / DOCS[0].id).exists()


def test_duplicate_or_empty_ids_are_refused(tmp_path, tiny):
    with pytest.raises(DataError, match="duplicate"):
        _build([DOCS[0], DOCS[0]], tmp_path / "a", tiny)
    with pytest.raises(DataError, match="duplicate"):
        _build([DOCS[0], DocumentRecord("PERSON-ADA", "x y z.", "")], tmp_path / "a", tiny)
    with pytest.raises(DataError):
        _build([DocumentRecord("", "text.", "")], tmp_path / "a", tiny)
    with pytest.raises(DataError):
        _build([], tmp_path / "a", tiny)
    bad = tmp_path / "docs.jsonl"
    bad.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(DataError, match="duplicate"):
        build_knowledge_adapters(bad, tmp_path / "b", base=tmp_path, progress=False)


def test_base_that_is_not_a_causal_lm_is_a_model_error(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ModelError):
        build_knowledge_adapters(DOCS[:1], tmp_path / "a", base=folder, progress=False)
    with pytest.raises(ModelError):
        train_task_adapter([TaskExample("p", "a")], tmp_path / "t", base=folder)


def test_recipe_validation():
    with pytest.raises(ConfigError):
        KnowledgeRecipe(rank=0)
    with pytest.raises(ConfigError):
        KnowledgeRecipe(init="pissa")
    with pytest.raises(ConfigError):
        KnowledgeRecipe(lr=-1.0)
    with pytest.raises(ConfigError):
        KnowledgeRecipe().replace(nope=1)
    with pytest.raises(ConfigError):
        KnowledgeRecipe.from_dict({"rank": 4, "bogus": 1})
    r = KnowledgeRecipe.from_dict(KnowledgeRecipe(rank=4).to_dict())
    assert r == KnowledgeRecipe(rank=4)
    assert TaskRecipe().n_steps(100) == 13 and TaskRecipe(steps=5).n_steps(100) == 5
    assert TaskRecipe().n_steps(10**6) == TaskRecipe().max_steps


def test_unknown_target_module_is_a_config_error(tmp_path, tiny):
    with pytest.raises(ConfigError, match="not a Linear"):
        _build(DOCS[:1], tmp_path / "a", tiny, recipe=FAST.replace(target_modules=("c_fc",)))
    assert not (tmp_path / "a" / DOCS[0].id).exists()


def test_answer_aware_questions_for_names_and_numbers(tiny):
    _model, tok = tiny
    assert answer_spans("Ada Brill was a baker born in 1850 in Tarn.", "Ada Brill") == ["1850", "Tarn"]
    assert answer_spans("The Vela was 30 metres long and cost 4,200 pounds.", "Vela") == ["30", "4,200"]
    assert answer_spans("Its captain was Ilo Sand.", "Vela") == ["Ilo Sand"]
    assert answer_spans("it was small.", "Vela") == []
    seen = []

    def gen(prompts, *, max_new_tokens, stop=None):
        seen.extend(prompts)
        return [" What year is mentioned about the baker?\nAnswer: whatever" if "\nAnswer: 1850\n" in p
                else "garbage" for p in prompts]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aug = augment_document(DOCS[0], tok, FAST.replace(qa_spans=True, n_rewrites=0), gen)
    assert len(seen) == 3 + 4  # one free prompt per sentence + one per span (1850, Tarn, Mox, 1920)
    assert [(p.question, p.answer) for p in aug.qa] == [("What year is mentioned about the baker?", "1850")]
    assert aug.stats["qa_generated"] == 7 and aug.stats["qa_kept"] == 1


def test_split_sentences():
    assert split_sentences("A b. C d! 12 e? f g.") == ["A b.", "C d!", "12 e? f g."]
    assert split_sentences("  One.  Two.\nThree.") == ["One.", "Two.", "Three."]


# ---------------------------------------------------------------------------------------------- training
def test_trained_adapter_lowers_the_loss_on_its_document(tmp_path, tiny):
    """The saved adapter (reloaded with PEFT) lowers the LM loss on its own document, and more than on
    another."""
    from peft import PeftModel

    from llama_index_lag.training.augment import Example

    model, tok = tiny
    recipe = FAST.replace(steps=30, lr=5e-3, batch_size=4)
    _build(DOCS[:1], tmp_path / "a", tiny, recipe=recipe)

    def batch(doc: DocumentRecord) -> dict[str, torch.Tensor]:
        data = tokenize_examples([Example("", f"{doc.title}\n\n{doc.text}", "document")], tok, 256)
        ids = torch.tensor([data[0][0]])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    own, other = batch(DOCS[0]), batch(DOCS[1])
    with torch.no_grad():
        base = [causal_lm_loss(model, b).item() for b in (own, other)]
        peft = PeftModel.from_pretrained(model, str(tmp_path / "a" / DOCS[0].id))
        adapted = [causal_lm_loss(peft, b).item() for b in (own, other)]
        peft.unload()
    gain_own, gain_other = base[0] - adapted[0], base[1] - adapted[1]
    assert adapted[0] < 0.92 * base[0], (base, adapted)
    assert gain_own > 2 * gain_other, (base, adapted)


def test_init_variants_train(tmp_path, tiny):
    for init in ("default", "eva-peft"):
        report = _build(DOCS[:1], tmp_path / init, tiny, recipe=FAST.replace(init=init))
        assert report.metadata[DOCS[0].id]["recipe"]["init"] == init
        assert is_finished(tmp_path / init / DOCS[0].id)


def test_train_task_adapter(tmp_path, tiny, tiny_dir):
    examples = [TaskExample(f"True or false: {i} is even.", "true" if i % 2 == 0 else "false")
                for i in range(12)]
    recipe = TaskRecipe(rank=4, alpha=8.0, batch_size=4, bf16=False, epochs=1.0)
    meta = train_task_adapter(examples, tmp_path / "fact", model=tiny[0], tokenizer=tiny[1], recipe=recipe)
    assert meta["kind"] == "task" and meta["name"] == "fact" and meta["train"]["steps"] == 3
    assert read_adapter_meta(tmp_path / "fact")["kind"] == "task"
    config = json.loads((tmp_path / "fact" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    data = tmp_path / "style.jsonl"
    write_task_examples(data, [TaskExample(f"Say {i}.", f"{i}!") for i in range(6)])
    train_task_adapter(data, tmp_path / "style", base=tiny_dir, recipe=recipe)
    lib = AdapterLibrary.compile([tmp_path / "fact", tmp_path / "style"], kind="task", base_model=tiny_dir,
                                 out=tmp_path / "tasks", progress=False)
    assert lib.names == ["fact", "style"]


def test_measure_recall_runs_on_a_tiny_library(tmp_path, tiny):
    from llama_index_lag.data import QuestionRecord
    from llama_index_lag.training import measure_recall, recall_table

    model, tok = tiny
    _build(DOCS, tmp_path / "a", tiny, compile_to=tmp_path / "lib")
    qs = [QuestionRecord(f"{d.id}.q", f"What about {d.title}?", (d.title,), d.id) for d in DOCS]
    res = measure_recall(model, tok, qs, tmp_path / "lib", modes=["none", "oracle", "lag", "seq-spectr"],
                         max_new_tokens=4)
    assert set(res) == {"none", "oracle", "lag", "spectr-seq-mass"}  # seq-spectr: the earlier spelling
    assert 0 <= res["lag"]["routing_accuracy"] <= 1 and res["oracle"]["routing_accuracy"] is None
    assert "| lag |" in recall_table(res)
    assert not any("LAG" in type(m).__name__ for m in model.modules())  # detached
    with pytest.raises(ConfigError, match="use lag eval"):
        measure_recall(model, tok, qs, tmp_path / "lib", modes=["rag"])


# ---------------------------------------------------------------------------------------------- CLI, workers
def test_cli_build_adapters_and_train_task(tmp_path, tiny_dir, capsys):
    from llama_index_lag.cli import main

    docs = tmp_path / "docs.jsonl"
    write_documents(docs, DOCS[:2])
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"rewrite_max_new_tokens": 8, "qa_max_new_tokens": 8, "batch_size": 2,
                                  "warmup_steps": 0}))
    args = ["build-adapters", "--docs", str(docs), "--out", str(tmp_path / "ad"), "--base", str(tiny_dir),
            "--compile", str(tmp_path / "lib"), "--recipe", str(recipe), "--steps", "2", "--rank", "2",
            "--bf16", "off", "--quiet", "--seed", "3"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "built 2" in out and "knowledge library" in out
    meta = read_adapter_meta(tmp_path / "ad" / DOCS[0].id)
    assert meta["recipe"]["rank"] == 2 and meta["recipe"]["alpha"] == 4.0 and meta["seed"] == 3
    assert AdapterLibrary.load(tmp_path / "lib").names == [d.id for d in DOCS[:2]]
    assert main(args) == 0 and "built 0, already finished 2" in capsys.readouterr().out

    data = tmp_path / "task.jsonl"
    write_task_examples(data, [TaskExample(f"Q{i}?", f"A{i}") for i in range(4)])
    assert main(["train-task", "--data", str(data), "--out", str(tmp_path / "t1"), "--base", str(tiny_dir),
                 "--steps", "2", "--bf16", "off"]) == 0
    assert read_adapter_meta(tmp_path / "t1")["kind"] == "task"
    # bad input -> exit code 1 with the error, nothing written
    assert main(["train-task", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "t2"),
                 "--base", str(tiny_dir)]) == 1
    assert "file not found" in capsys.readouterr().err and not (tmp_path / "t2").exists()


def test_parallel_workers_match_sequential(tmp_path, tiny_dir):
    recipe = FAST.replace(n_rewrites=0, qa=False)  # workers generate with their own (tiny) model
    kw = {"base": tiny_dir, "recipe": recipe, "progress": False, "seed": 1}
    seq = build_knowledge_adapters(DOCS[:2], tmp_path / "seq", workers=1, **kw)
    par = build_knowledge_adapters(DOCS[:2], tmp_path / "par", workers=2, **kw)
    assert sorted(par.built) == sorted(seq.built)
    for doc in DOCS[:2]:
        a, b = _weights(tmp_path / "seq" / doc.id), _weights(tmp_path / "par" / doc.id)
        # one thread per worker vs two in-process: equal up to float summation order
        assert all(torch.allclose(a[k], b[k], atol=1e-4, rtol=1e-3) for k in a)


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_smollm2_oracle_adapter_recalls_held_back_facts(tmp_path):
    """One demo document, the default recipe, the real SmolLM2-135M: the Oracle adapter answers held-back
    questions the bare model cannot (~1-2 minutes on 2 CPU cores)."""
    from llama_index_lag.data import read_documents, read_questions
    from llama_index_lag.errors import MissingDependencyError
    from llama_index_lag.training import measure_recall

    demo = Path(__file__).resolve().parents[1] / "llama_index_lag" / "data" / "demo"
    try:
        model, tok = load_causal_lm(None)
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    doc = read_documents(demo / "documents.jsonl")[0]
    questions = [q for q in read_questions(demo / "questions.jsonl") if q.doc_id == doc.id and q.task == "qa"]
    report = build_knowledge_adapters([doc], tmp_path / "adapters", model=model, tokenizer=tok,
                                      compile_to=tmp_path / "lib", progress=False)
    meta = report.metadata[doc.id]
    assert meta["augmentation"]["qa_generated"] > 0 and meta["train"]["loss_tail_mean"] < 0.5
    res = measure_recall(model, tok, questions, tmp_path / "lib", modes=["none", "oracle"],
                         routing_accuracy=False)
    assert res["none"]["correct"] == 0
    assert res["oracle"]["correct"] >= 2, res["oracle"]["answers"]


# ------------------------------------------------------------------------------------------ contrastive EVA
def _inputs_by_hand(model, tok, texts, module):
    """``module``'s input tokens [T, n] over ``texts`` (one text at a time), centred (numpy)."""
    rows = []
    hook = model.get_submodule(module).register_forward_pre_hook(lambda m, a: rows.append(a[0][0].double()))
    with torch.no_grad():
        for text in texts:
            model(torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
    hook.remove()
    X = torch.cat(rows).numpy()
    return X - X.mean(axis=0)


def test_contrastive_eva_starts_on_the_documents_own_directions(tmp_path, tiny):
    import numpy as np

    from llama_index_lag.training.contrast import library_covariance, load_covariance
    from llama_index_lag.training.train import contrastive_components

    model, tok = tiny
    recipe = FAST.replace(init="eva-contrastive", eva_contrast=0.7)
    module = "model.layers.1.mlp.down_proj"
    path = library_covariance(DOCS, tmp_path, model, tok, recipe, lambda d: chunk_document(d, tok, recipe))
    mean = load_covariance(path)
    inputs = [_inputs_by_hand(model, tok, [f"{d.title}\n\n{d.text}"], module) for d in DOCS]
    by_hand = np.mean([X.T @ X / X.shape[0] for X in inputs], axis=0)
    assert np.allclose(mean[module].numpy(), by_hand, atol=1e-5)
    gate, up = mean["model.layers.0.mlp.gate_proj"], mean["model.layers.0.mlp.up_proj"]
    assert gate is up  # one input, one matrix
    # the components: top eigenvectors of cov(X) - 0.7 C_mean
    X, w = inputs[0], 3.0  # one document's tokens
    got = contrastive_components(torch.from_numpy(X), mean[module], w, 4).double().numpy()  # [4, n]
    _, vectors = np.linalg.eigh(X.T @ X / X.shape[0] - w * mean[module].double().numpy())
    assert np.linalg.svd(got @ vectors[:, ::-1][:, :4], compute_uv=False).min() > 0.999
    _, plain_vectors = np.linalg.eigh(X.T @ X / X.shape[0])  # plain EVA's directions differ
    assert np.linalg.svd(got @ plain_vectors[:, ::-1][:, :4], compute_uv=False).min() < 0.8
    # end to end: cached once per build, recorded in each adapter, and not plain EVA
    report = _build(DOCS, tmp_path / "c", tiny, recipe=recipe)
    files = list((tmp_path / "c").glob(".lag-contrast-*.safetensors"))
    assert len(files) == 1 and report.metadata["ship-vela"]["contrast"] == files[0].name
    plain = _build(DOCS[2:], tmp_path / "p", tiny)
    a, b = _weights(tmp_path / "c" / "ship-vela"), _weights(plain.out / "ship-vela")
    key = next(k for k in a if "down_proj.lora_A" in k)
    assert not torch.allclose(a[key], b[key])
    stamp = files[0].stat().st_mtime_ns
    again = _build(DOCS, tmp_path / "c", tiny, recipe=recipe, overwrite=True)
    assert again.built == [d.id for d in DOCS] and files[0].stat().st_mtime_ns == stamp
    assert torch.equal(_weights(tmp_path / "c" / "ship-vela")[key], a[key])  # deterministic


def test_contrastive_eva_bad_input(tmp_path, tiny):
    from llama_index_lag.training.train import train_lora

    with pytest.raises(ConfigError, match="knowledge adapters only"):
        TaskRecipe(init="eva-contrastive")
    with pytest.raises(ConfigError, match="eva_contrast"):
        KnowledgeRecipe(init="eva-contrastive", eva_contrast=-1)
    model, tok = tiny
    with pytest.raises(ConfigError, match="mean covariance"):
        train_lora(model, tok, [], FAST.replace(init="eva-contrastive"), tmp_path / "x")
