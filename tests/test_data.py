"""Data formats: readers, writers, id rules and the LlamaIndex Document mapping."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path

import pytest

from llama_index_lag.data import (
    DocumentRecord,
    QuestionRecord,
    TaskExample,
    adapter_name,
    doc_to_llama_document,
    read_documents,
    read_questions,
    read_task_examples,
    validate_document_id,
    validate_id,
    write_documents,
    write_questions,
    write_task_examples,
)
from llama_index_lag.errors import DataError


def _write_lines(path: Path, lines: list[object]) -> Path:
    out = []
    for line in lines:
        out.append(line if isinstance(line, str) else json.dumps(line))
    path.write_text("\n".join(out) + "\n", encoding="utf-8")
    return path


def _doc(doc_id: object = "d1", **kw: object) -> dict[str, object]:
    return {"id": doc_id, "title": "A title", "text": "Some text.", **kw}


def _q(qid: object = "q1", **kw: object) -> dict[str, object]:
    return {"id": qid, "question": "Who?", "answers": ["Ann"], "doc_id": "d1", "task": "qa", **kw}


def _raises(fn, path: Path, *, line: int | None, field: str | None, match: str | None = None) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        fn(path)
    err = info.value
    assert err.line == line
    assert err.field == field
    assert err.path == str(path)
    assert isinstance(err, ValueError)
    return err


# ---- documents ---------------------------------------------------------------------------------------------


def test_read_documents_skips_blank_lines_and_keeps_extra_keys(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_doc("a"), "", "   ", _doc("b", source="wiki", year=2020)])
    docs = read_documents(path)
    assert [d.id for d in docs] == ["a", "b"]
    assert docs[0] == DocumentRecord(id="a", title="A title", text="Some text.", metadata={})
    assert docs[1].metadata == {"source": "wiki", "year": 2020}


def test_title_is_optional(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [{"id": "a", "text": "x"}])
    assert read_documents(path)[0].title == ""


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(_doc("a")).encode() + b"\n")
    assert read_documents(path)[0].id == "a"


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_doc("a"), "", '{"id": "b", "text": '])
    _raises(read_documents, path, line=3, field=None, match="invalid JSON")


def test_invalid_utf8_names_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps(_doc("a")).encode() + b'\n{"id": "b\xff", "text": "x"}\n')
    _raises(read_documents, path, line=2, field=None, match="UTF-8")


@pytest.mark.parametrize("value", ['["a", "b"]', '"text"', "3", "null"])
def test_not_an_object(tmp_path: Path, value: str) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_doc("a"), value])
    _raises(read_documents, path, line=2, field=None, match="JSON object")


@pytest.mark.parametrize(
    ("obj", "field", "match"),
    [
        ({"title": "t", "text": "x"}, "id", "missing field 'id'"),
        ({"id": 7, "text": "x"}, "id", "must be a string"),
        ({"id": "", "text": "x"}, "id", "empty"),
        ({"id": "a"}, "text", "missing field 'text'"),
        ({"id": "a", "text": 5}, "text", "must be a string"),
        ({"id": "a", "text": "  \n "}, "text", "empty"),
        ({"id": "a", "text": "x", "title": ["t"]}, "title", "must be a string"),
        ({"id": "a", "text": "x", "doc_id": "a"}, "doc_id", "reserved"),
    ],
)
def test_bad_document_fields(tmp_path: Path, obj: dict, field: str, match: str) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_doc("first"), "", obj])
    _raises(read_documents, path, line=3, field=field, match=match)


@pytest.mark.parametrize(
    "bad",
    [
        "a/b",
        "a\\b",
        "..",
        ".",
        ".hidden",
        "trailing.",
        "x\x00y",
        "tab\tid",
        "new\nline",
        "with space",
        "colon:x",
        "a" * 129,
        "CON",
        "nul.txt",
        unicodedata.normalize("NFD", "café"),
    ],
)
def test_unsafe_adapter_names_refused_and_mapped(tmp_path: Path, bad: str) -> None:
    with pytest.raises(DataError) as info:
        validate_id(bad)
    assert info.value.field == "id"
    path = _write_lines(tmp_path / "d.jsonl", [_doc("ok"), _doc(bad)])
    if any(c in bad for c in "\x00\t\n"):  # control characters: not even a document id
        _raises(read_documents, path, line=2, field="id", match="control character")
        return
    assert read_documents(path)[1].id == bad  # any other text is a document id ...
    name = adapter_name(bad)  # ... whose adapter gets a safe, stable folder name
    assert validate_id(name) == name != bad and adapter_name(bad) == name
    assert name.endswith(hashlib.sha256(bad.encode()).hexdigest()[:10])


def test_adapter_names_of_document_ids() -> None:
    assert adapter_name("doc-1") == "doc-1"  # a safe id names its adapter unchanged
    assert adapter_name("notes/a b.md").startswith("notes-a-b.md-")
    assert adapter_name("a b") != adapter_name("a_b") != adapter_name("a-b")  # no collisions by folding
    for bad in ("", "  ", " lead", "a" * 1025, "x\x00y"):
        with pytest.raises(DataError):
            validate_document_id(bad)


@pytest.mark.parametrize("good", ["doc-1", "Doc_2.v3", "café", "文档七", "a" * 128, "0", "a..b", "console"])
def test_safe_ids_accepted(good: str) -> None:
    assert validate_id(good) == good


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_doc("a"), _doc("b"), "", _doc("a")])
    err = _raises(read_documents, path, line=4, field="id", match="duplicate id 'a'")
    assert "lines 1 and 4" in str(err)


def test_case_insensitive_id_collision(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "d.jsonl", [_doc("Doc"), _doc("doc")])
    err = _raises(read_documents, path, line=2, field="id", match="case-insensitive")
    assert "lines 1 and 2" in str(err)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    _raises(read_documents, path, line=None, field=None, match="no documents")


def test_missing_file(tmp_path: Path) -> None:
    _raises(read_documents, tmp_path / "nope.jsonl", line=None, field=None, match="not found")


# ---- questions ---------------------------------------------------------------------------------------------


def test_read_questions(tmp_path: Path) -> None:
    rows = [
        _q("q1"),
        {"id": "q2", "question": "Is it?", "answers": ["false"], "doc_id": "d2", "task": "fact", "hops": 2},
        {"id": "q3", "question": "Default task?", "answers": ["x", "y"], "doc_id": "d1"},
    ]
    qs = read_questions(_write_lines(tmp_path / "q.jsonl", rows))
    assert qs[0] == QuestionRecord(id="q1", question="Who?", answers=("Ann",), doc_id="d1", task="qa")
    assert qs[1].task == "fact" and qs[1].answers == ("false",) and qs[1].metadata == {"hops": 2}
    assert qs[2].task == "qa" and qs[2].answers == ("x", "y")


@pytest.mark.parametrize(
    ("obj", "field", "match"),
    [
        ({"question": "q", "answers": ["a"], "doc_id": "d"}, "id", "missing"),
        (_q(question=""), "question", "empty"),
        ({"id": "q", "answers": ["a"], "doc_id": "d"}, "question", "missing"),
        ({"id": "q", "question": "q", "doc_id": "d"}, "answers", "missing"),
        (_q(answers="Ann"), "answers", "list"),
        (_q(answers=["Ann", 3]), "answers[1]", "non-empty string"),
        (_q(answers=["Ann", " "]), "answers[1]", "non-empty string"),
        (_q(answers=[]), "answers", "empty"),
        (_q(doc_id="a\nb"), "doc_id", "control character"),
        ({"id": "q", "question": "q", "answers": ["a"]}, "doc_id", "missing"),
        (_q(task=1), "task", "must be a string"),
        (_q(task="fact", answers=["maybe"]), "answers", "true"),
        (_q(task="fact", answers=["true", "false"]), "answers", "true"),
        (_q(task="fact", answers=["True"]), "answers", "true"),
    ],
)
def test_bad_questions(tmp_path: Path, obj: dict, field: str, match: str) -> None:
    path = _write_lines(tmp_path / "q.jsonl", ["", _q("q0"), obj])
    _raises(read_questions, path, line=3, field=field, match=match)


def test_empty_answers_allowed_on_request(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "q.jsonl", [_q(answers=[])])
    assert read_questions(path, allow_empty_answers=True)[0].answers == ()


def test_duplicate_question_ids(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "q.jsonl", [_q("q1"), _q("q1")])
    _raises(read_questions, path, line=2, field="id", match="lines 1 and 2")


# ---- task examples -----------------------------------------------------------------------------------------


def test_task_examples(tmp_path: Path) -> None:
    path = _write_lines(
        tmp_path / "t.jsonl", [{"prompt": "2+2=", "answer": "4"}, "", {"prompt": "p", "answer": "a"}]
    )
    assert read_task_examples(path) == [TaskExample("2+2=", "4"), TaskExample("p", "a")]


@pytest.mark.parametrize(
    ("obj", "field"),
    [
        ({"answer": "a"}, "prompt"),
        ({"prompt": "p", "answer": ""}, "answer"),
        ({"prompt": 1, "answer": "a"}, "prompt"),
    ],
)
def test_bad_task_examples(tmp_path: Path, obj: dict, field: str) -> None:
    path = _write_lines(tmp_path / "t.jsonl", [{"prompt": "p", "answer": "a"}, obj])
    _raises(read_task_examples, path, line=2, field=field)


# ---- writers -----------------------------------------------------------------------------------------------


def test_round_trips(tmp_path: Path) -> None:
    docs = [
        DocumentRecord(
            id="d1", title="Ünïcode ☃", text='Line one.\nLine two "quoted".', metadata={"k": [1, 2]}
        ),
        DocumentRecord(id="d2", text="No title."),
    ]
    qs = [
        QuestionRecord(
            id="q1", question="Who?", answers=("Ann", "Anne"), doc_id="d1", metadata={"level": "easy"}
        ),
        QuestionRecord(id="q2", question="True?", answers=("true",), doc_id="d2", task="fact"),
    ]
    tasks = [TaskExample(prompt="Translate: chat", answer="cat", metadata={"lang": "fr"})]
    write_documents(tmp_path / "d.jsonl", docs)
    write_questions(tmp_path / "q.jsonl", qs)
    write_task_examples(tmp_path / "t.jsonl", tasks)
    assert read_documents(tmp_path / "d.jsonl") == docs
    assert read_questions(tmp_path / "q.jsonl") == qs
    assert read_task_examples(tmp_path / "t.jsonl") == tasks
    assert "☃" in (tmp_path / "d.jsonl").read_text(encoding="utf-8")  # not \u-escaped
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d.jsonl",
        "q.jsonl",
        "t.jsonl",
    ]  # no temp files left


@pytest.mark.parametrize(
    "bad",
    [
        DocumentRecord(id="a\nb", text="x"),
        DocumentRecord(id="ok", text=""),
        DocumentRecord(id="ok", text="x", metadata={"title": "clash"}),
        DocumentRecord(id="ok", text="x", metadata={"obj": object()}),
    ],
)
def test_writer_validates_and_leaves_old_file(tmp_path: Path, bad: DocumentRecord) -> None:
    path = tmp_path / "d.jsonl"
    write_documents(path, [DocumentRecord(id="old", text="old")])
    before = path.read_bytes()
    with pytest.raises(DataError, match="record 2") as info:
        write_documents(path, [DocumentRecord(id="fine", text="y"), bad])
    assert info.value.path == str(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["d.jsonl"]


def test_writer_refuses_duplicates(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="duplicate id 'a'"):
        write_documents(
            tmp_path / "d.jsonl", [DocumentRecord(id="a", text="x"), DocumentRecord(id="a", text="y")]
        )
    qs = [QuestionRecord(id="q", question="?", answers=(), doc_id="d")]
    with pytest.raises(DataError, match="empty"):
        write_questions(tmp_path / "q.jsonl", qs)
    write_questions(tmp_path / "q.jsonl", qs, allow_empty_answers=True)
    assert read_questions(tmp_path / "q.jsonl", allow_empty_answers=True) == qs


# ---- LlamaIndex mapping ------------------------------------------------------------------------------------


def test_doc_to_llama_document() -> None:
    from llama_index.core.schema import MetadataMode

    rec = DocumentRecord(id="moon-1", title="The Moon", text="It orbits.", metadata={"source": "x"})
    doc = doc_to_llama_document(rec)
    assert doc.id_ == "moon-1" and doc.doc_id == "moon-1"
    assert doc.metadata == {"source": "x", "doc_id": "moon-1", "title": "The Moon"}
    assert doc.get_content(MetadataMode.EMBED) == "title: The Moon\n\nIt orbits."
    assert doc.get_content(MetadataMode.LLM) == "title: The Moon\n\nIt orbits."
    assert doc.get_content(MetadataMode.NONE) == "It orbits."
    untitled = doc_to_llama_document(DocumentRecord(id="u", text="Body."))
    assert untitled.get_content(MetadataMode.EMBED) == "Body."
