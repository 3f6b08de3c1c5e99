"""Synthetic benchmark generator: determinism, name hygiene, answerability, confusers, task sets, CLI and
the committed instances."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from llama_index_lag.errors import ConfigError
from llama_index_lag.eval import synthetic as S
from llama_index_lag.eval.metrics import normalize_answer

ID_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


@pytest.fixture(scope="module")
def bench() -> S.Benchmark:
    return S.make_benchmark(60, 0)


@pytest.fixture(scope="module")
def big() -> S.Benchmark:
    return S.make_benchmark(2000, 7)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _contains(text: str, answer: str) -> bool:
    return f" {normalize_answer(answer)} " in f" {normalize_answer(text)} "


def _by_doc(b: S.Benchmark) -> dict[str, list[S.QuestionRecord]]:
    out: dict[str, list[S.QuestionRecord]] = {d.id: [] for d in b.documents}
    for q in b.questions:
        out[q.doc_id].append(q)
    return out


# ---- determinism -----------------------------------------------------------------------------------------


def test_same_arguments_give_byte_identical_files(tmp_path):
    S.write_benchmark(S.make_benchmark(60, 0), tmp_path / "one")
    S.write_benchmark(S.make_benchmark(60, 0), tmp_path / "two")
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(one) == [
        "benchmark.json",
        "documents.jsonl",
        "questions.jsonl",
        "tasks/fact_check.jsonl",
        "tasks/short_answer.jsonl",
        "tasks/slot_filling.jsonl",
    ]
    assert one == two


def test_other_seed_gives_other_entities(bench):
    other = S.make_benchmark(60, 1)
    assert other.documents != bench.documents
    assert len({d.title for d in bench.documents} & {d.title for d in other.documents}) <= 3


# ---- structure and names ---------------------------------------------------------------------------------


def test_counts_and_kinds(bench):
    counts = bench.counts()
    assert counts["documents"] == 60 == len(bench.entities)
    assert set(counts["kinds"]) == set(S.KINDS)
    per_doc = _by_doc(bench)
    for doc_id, qs in per_doc.items():
        assert 3 <= sum(q.task == "qa" for q in qs) <= 5, doc_id
        assert sum(q.task == "fact" for q in qs) == 2, doc_id
        assert sum(q.task == "slot" for q in qs) == 1, doc_id


def test_ids_are_valid_and_unique(big):
    doc_ids = [d.id for d in big.documents]
    q_ids = [q.id for q in big.questions]
    assert len(set(doc_ids)) == len(doc_ids) == 2000
    assert len(set(q_ids)) == len(q_ids)
    assert len({i.casefold() for i in doc_ids}) == len(doc_ids)
    for i in doc_ids + q_ids:
        assert ID_RE.match(i) and len(i) <= 128, i
    assert {q.doc_id for q in big.questions} == set(doc_ids)


def test_names_are_unique_and_invented(big):
    titles = [d.title for d in big.documents]
    assert len(set(titles)) == len(titles)
    # every invented word is used once, except a surname deliberately shared by a confuser pair
    words = Counter(w for e in big.entities for w in e.invented)
    surnames = {e.invented[1] for e in big.entities if e.kind == "person"}
    assert all(n == 1 or w in surnames for w, n in words.items())
    real = S._real_words()
    assert not any(w in real for w in big.names)
    assert all(re.fullmatch(r"[a-z]{4,}", w) for w in big.names)
    # the invented words are not template words (no "Silver" town or "Guild" person)
    template_words = S._reserved_words(S.make_task_sets())
    assert not template_words & set(big.names)


def test_documents_are_short(big):
    lengths = [len(d.text.split()) for d in big.documents]
    assert min(lengths) >= S.MIN_WORDS and max(lengths) <= S.MAX_WORDS


# ---- answerability ---------------------------------------------------------------------------------------


def test_every_qa_answer_is_in_its_document(big):
    texts = {d.id: d.text for d in big.documents}
    for q in big.questions:
        if q.task not in ("qa", "slot"):
            continue
        assert q.answers, q.id
        assert _contains(texts[q.doc_id], q.answers[0]), (q.id, q.answers[0])
        assert 1 <= len(q.answers[0].split()) <= 3, q.answers
        assert len({normalize_answer(a) for a in q.answers}) == len(q.answers), (
            q.answers
        )  # no duplicate aliases


def test_slot_questions_name_a_relation_their_document_states(big):
    from llama_index_lag.eval.synthetic.slots import RELATIONS

    titles = {d.id: d.title for d in big.documents}
    slots = [q for q in big.questions if q.task == "slot"]
    assert len(slots) == len(big.documents)
    for q in slots:
        subject, relation = q.question.split(" | ")
        assert subject == titles[q.doc_id] and relation in RELATIONS.values(), q.question


def test_every_question_names_its_entity(big):
    titles = {d.id: d.title for d in big.documents}
    for q in big.questions:
        assert titles[q.doc_id] in q.question, (q.id, q.question)


def test_qa_questions_are_distinct_within_a_document(big):
    for doc_id, qs in _by_doc(big).items():
        texts = [q.question for q in qs]
        assert len(set(texts)) == len(texts), doc_id


def test_fact_checks_are_balanced_and_well_formed(big):
    facts = [q for q in big.questions if q.task == "fact"]
    labels = Counter(q.answers for q in facts)
    assert set(labels) == {("true",), ("false",)}
    assert abs(labels[("true",)] - labels[("false",)]) <= 1
    for q in facts:
        assert q.question.startswith("True or false: ") and q.question.endswith("."), q.question
    # a false claim never repeats a true claim of the same document
    for doc_id, qs in _by_doc(big).items():
        true = {q.question for q in qs if q.answers == ("true",)}
        false = {q.question for q in qs if q.answers == ("false",)}
        assert not true & false, doc_id


_CLAIM_STOP = {
    "true",
    "false",
    "or",
    "was",
    "is",
    "in",
    "of",
    "the",
    "a",
    "an",
    "by",
    "for",
    "its",
    "later",
    "life",
    "to",
}


def test_fact_labels_agree_with_the_documents(big):
    """Every name or number of a true claim is in its document; nearly every false claim has a word its
    document lacks (the swapped-in value; it may occur elsewhere in the text by chance)."""
    texts = {d.id: d.text for d in big.documents}
    unsupported = n_false = 0
    for q in big.questions:
        if q.task != "fact":
            continue
        claim = q.question.removeprefix("True or false: ")
        doc_words = set(normalize_answer(texts[q.doc_id]).split())
        if q.answers == ("true",):
            for token in re.findall(r"\b(?:[A-Z][a-z]+|\d[\d,]*)\b", claim[1:]):
                assert normalize_answer(token) in doc_words, (q.id, token)
        else:
            n_false += 1
            words = set(normalize_answer(claim).split()) - _CLAIM_STOP
            unsupported += bool(words - doc_words)
    assert unsupported >= 0.95 * n_false


# ---- confusers -------------------------------------------------------------------------------------------


def test_confuser_pairs_exist_and_share_surface_strings(bench, big):
    texts = {d.id: d.text for d in big.documents}
    for c in big.confusers:
        assert c.a != c.b and c.shared
        for s in c.shared:
            assert s in texts[c.a] and s in texts[c.b], c
    for b in (bench, big):
        reasons = Counter(c.reason for c in b.confusers)
        assert {"surname", "name-stem", "kind-word", "mentions"} <= set(reasons), reasons
    # people sharing a surname are different people with different facts
    pairs = [c for c in big.confusers if c.reason == "surname"]
    assert len(pairs) >= 50
    titles = {d.id: d.title for d in big.documents}
    for c in pairs:
        assert titles[c.a] != titles[c.b] and titles[c.a].split()[1] == titles[c.b].split()[1]


def test_cross_references_point_to_documents(bench):
    ids = {d.id for d in bench.documents}
    mentions = [c for c in bench.confusers if c.reason == "mentions"]
    assert len(mentions) >= 10
    assert all(c.b in ids for c in mentions)


# ---- task training sets ----------------------------------------------------------------------------------


def test_task_sets_shape():
    tasks = S.make_task_sets()
    fact, short = tasks["fact_check"], tasks["short_answer"]
    assert 180 <= len(fact) <= 240 and 180 <= len(short) <= 240
    assert Counter(e.answer for e in fact) == {"true": len(fact) // 2, "false": len(fact) // 2}
    assert all(e.prompt.startswith("True or false: ") for e in fact)
    assert all(1 <= len(e.answer.split()) <= 3 and e.prompt.endswith("?") for e in short)
    assert len({e.prompt for e in fact}) == len(fact) and len({e.prompt for e in short}) == len(short)
    slots = tasks["slot_filling"]
    assert len(slots) >= 80 and all(re.fullmatch(r"[^|]+ \| [^|]+", e.prompt) for e in slots)
    assert len({e.prompt for e in slots}) == len(slots)
    assert S.make_task_sets() == tasks


def test_task_sets_never_mention_benchmark_entities(big, bench):
    tasks = S.make_task_sets()
    vocab = {
        w
        for exs in tasks.values()
        for e in exs
        for w in re.findall(r"[a-z]+", (e.prompt + " " + e.answer).lower())
    }
    for b in (bench, big):
        assert not vocab & set(b.names)
        assert not vocab & {w.lower() for e in b.entities for w in e.invented}
    demo = S.make_demo()
    assert not vocab & {w.lower() for e in demo.entities for w in e.invented}


# ---- scale and parameters --------------------------------------------------------------------------------


def test_large_benchmark_is_fast():
    start = time.perf_counter()
    b = S.make_benchmark(2000, 0)
    assert time.perf_counter() - start < 5.0
    assert len(b.documents) == 2000


def test_small_benchmarks_work():
    for n in (1, 2, 5):
        b = S.make_benchmark(n, 3)
        assert len(b.documents) == n
        assert all(q.answers for q in b.questions)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_docs": 0, "seed": 0},
        {"n_docs": True, "seed": 0},
        {"n_docs": 10, "seed": "0"},
        {"n_docs": 10, "seed": 0, "questions_per_doc": (5, 3)},
        {"n_docs": 10, "seed": 0, "questions_per_doc": 3},
        {"n_docs": 10, "seed": 0, "fact_checks_per_doc": -1},
    ],
)
def test_bad_parameters_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        S.make_benchmark(**kwargs)


def test_question_counts_follow_parameters():
    b = S.make_benchmark(20, 5, questions_per_doc=(1, 1), fact_checks_per_doc=3)
    for qs in _by_doc(b).values():
        assert sum(q.task == "qa" for q in qs) == 1
        assert sum(q.task == "fact" for q in qs) == 3
    none = S.make_benchmark(20, 5, slots_per_doc=0)
    assert not any(q.task == "slot" for q in none.questions)
    # slot questions come from their own random stream: the qa / fact questions do not depend on them
    assert [q for q in none.questions] == [q for q in S.make_benchmark(20, 5).questions if q.task != "slot"]


# ---- demo ------------------------------------------------------------------------------------------------


def test_demo_instance():
    demo = S.make_demo()
    assert len(demo.documents) == 5
    assert len({e.kind for e in demo.entities}) == 5
    texts = {d.id: d.text for d in demo.documents}
    titles = {d.id: d.title for d in demo.documents}
    for doc_id, qs in _by_doc(demo).items():
        qa = [q for q in qs if q.task == "qa"]
        assert 2 <= len(qa) <= 3 and sum(q.task == "fact" for q in qs) == 1
        for q in qs:
            assert titles[doc_id] in q.question
        for q in qa:
            assert _contains(texts[doc_id], q.answers[0]), q
            assert len(q.answers[0].split()) <= 3
    for c in demo.confusers:
        assert all(s in texts[c.a] and s in texts[c.b] for s in c.shared)
    for d in demo.documents:
        assert 50 <= len(d.text.split()) <= S.MAX_WORDS


# ---- files, CLI, committed instances ---------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_written_formats(tmp_path, bench):
    paths = S.write_benchmark(bench, tmp_path)
    docs = _read_jsonl(paths["documents"])
    qs = _read_jsonl(paths["questions"])
    assert all(list(d) == ["id", "title", "text"] for d in docs)
    assert all(list(q) == ["id", "question", "answers", "doc_id", "task"] for q in qs)
    assert all(isinstance(q["answers"], list) and q["task"] in ("qa", "fact", "slot") for q in qs)
    for name in ("fact_check", "short_answer", "slot_filling"):
        assert all(list(e) == ["prompt", "answer"] for e in _read_jsonl(paths[name]))
    meta = json.loads(paths["benchmark"].read_text())
    assert meta["seed"] == 0 and meta["generator_version"] == S.GENERATOR_VERSION
    assert meta["counts"]["documents"] == 60


def test_written_files_read_back_with_the_data_module(tmp_path, bench):
    data = pytest.importorskip("llama_index_lag.data")
    S.write_benchmark(bench, tmp_path)
    assert len(data.read_documents(tmp_path / "documents.jsonl")) == 60
    assert len(data.read_questions(tmp_path / "questions.jsonl")) == len(bench.questions)
    assert len(data.read_task_examples(tmp_path / "tasks" / "fact_check.jsonl")) == len(
        bench.tasks["fact_check"]
    )


def _parser() -> argparse.ArgumentParser:
    from llama_index_lag.cli import benchmark_data

    parser = argparse.ArgumentParser(prog="lag")
    benchmark_data.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_writes_the_files(tmp_path, capsys):
    args = _parser().parse_args(
        ["make-benchmark", "--n-docs", "12", "--seed", "4", "--out", str(tmp_path / "b")]
    )
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "documents: 12" in out and "fact_check" in out
    expected = tmp_path / "expected"
    S.write_benchmark(S.make_benchmark(12, 4), expected)
    assert _files(tmp_path / "b") == _files(expected)


def test_cli_demo_and_errors(tmp_path, capsys):
    parser = _parser()
    args = parser.parse_args(["make-benchmark", "--demo", "--out", str(tmp_path / "demo")])
    assert args.func(args) == 0
    assert sorted(_files(tmp_path / "demo")) == ["benchmark.json", "documents.jsonl", "questions.jsonl"]
    args = parser.parse_args(["make-benchmark", "--demo", "--seed", "1", "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError):
        args.func(args)


def test_cli_main_entry_point(tmp_path, capsys):
    from llama_index_lag.cli import main

    assert main(["make-benchmark", "--n-docs", "3", "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "documents.jsonl").is_file()
    assert main(["make-benchmark", "--n-docs", "0", "--out", str(tmp_path / "c")]) == 1
    assert "n_docs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "make"),
    [("demo", S.make_demo), ("benchmark", lambda: S.make_benchmark(S.DEFAULT_N_DOCS, S.DEFAULT_SEED))],
)
def test_committed_instances_match_the_generator(tmp_path, name, make):
    """The instances shipped in llama_index_lag/data/ are exactly what the generator writes now. If this
    fails after a deliberate change, bump GENERATOR_VERSION and regenerate them with
    ``lag make-benchmark --demo --out llama_index_lag/data/demo`` and
    ``lag make-benchmark --n-docs 60 --seed 0 --out llama_index_lag/data/benchmark``."""
    S.write_benchmark(make(), tmp_path)
    assert _files(S.packaged_path(name)) == _files(tmp_path)
