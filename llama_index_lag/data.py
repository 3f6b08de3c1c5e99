"""Shared data formats: documents, questions and task-adapter examples (JSON Lines).

``documents.jsonl``  ``{"id": str, "title": str, "text": str, ...}``  (``title`` optional, default ``""``)
``questions.jsonl``  ``{"id": str, "question": str, "answers": [str, ...], "doc_id": str, "task": str, ...}``
                     (``task`` optional, default ``"qa"``; for ``task == "fact"`` answers are ``["true"]`` or
                     ``["false"]``)
task examples        ``{"prompt": str, "answer": str, ...}``

Keys other than these are kept, unchanged, in the record's ``metadata`` dict and written back at top level.
Blank lines are skipped. Every problem raises :class:`~llama_index_lag.errors.DataError` naming the file,
the 1-based line and the field.

Document ids (and the ``doc_id`` a question refers to) are any text without control characters (file paths,
names with spaces): :func:`~llama_index_lag.ids.validate_document_id`; a document's adapter is named
:func:`~llama_index_lag.ids.adapter_name` of its id. Question ids are strict
(:func:`~llama_index_lag.ids.validate_id`). The adapter names of one file's ids must differ case-insensitively
(adapter folders would collide on case-insensitive file systems). :func:`document_records` turns llama-index
``Document`` s / nodes into records with stable ids (:func:`stable_document_id`), :func:`read_directory`
reads a folder with ``SimpleDirectoryReader``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ._fs import atomic_write_text
from .errors import ConfigError, DataError
from .ids import (  # re-exported: the id rules of documents and adapters
    MAX_ID_LENGTH,
    adapter_name,
    id_key,
    validate_document_id,
    validate_id,
)

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core import Document

FACT_ANSWERS = ("true", "false")

DOCUMENT_FIELDS = ("id", "title", "text")
QUESTION_FIELDS = ("id", "question", "answers", "doc_id", "task")
TASK_EXAMPLE_FIELDS = ("prompt", "answer")

# ---- records ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DocumentRecord:
    """One document; ``id`` doubles as its knowledge-adapter name."""

    id: str
    text: str
    title: str = ""
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class QuestionRecord:
    """One evaluation question about document ``doc_id``."""

    id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str
    task: str = "qa"
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class TaskExample:
    """One task-adapter training example."""

    prompt: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False)


def check_text(value: str, field: str) -> str:
    """Refuse strings that are not valid unicode text (lone surrogates, e.g. from a ``"\\ud800"`` JSON
    escape): no tokenizer or file system takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"field {field!r} is not valid unicode text (a lone surrogate at position "
                        f"{exc.start})", field=field) from None
    return value


# ---- parsing one object ----------------------------------------------------------------------------------


def _req_str(
    obj: Mapping[str, Any], key: str, *, allow_empty: bool = False, default: str | None = None
) -> str:
    if key not in obj:
        if default is not None:
            return default
        raise DataError(f"missing field {key!r}", field=key)
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"field {key!r} must be a string, got {type(value).__name__}", field=key)
    check_text(value, key)
    if not allow_empty and not value.strip():
        raise DataError(f"field {key!r} is empty", field=key)
    return value


def _req_id(obj: Mapping[str, Any], key: str, document: bool = False) -> str:
    """A required id: a document id (any text, see :mod:`llama_index_lag.ids`) or a strict one."""
    if key not in obj:
        raise DataError(f"missing field {key!r}", field=key)
    return (validate_document_id if document else validate_id)(obj[key], field=key)


def _extras(obj: Mapping[str, Any], known: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in known}


def parse_document(obj: Mapping[str, Any]) -> DocumentRecord:
    """Build a :class:`DocumentRecord` from one JSON object (no file/line context)."""
    doc_id = _req_id(obj, "id", document=True)
    text = _req_str(obj, "text")
    title = _req_str(obj, "title", allow_empty=True, default="")
    metadata = _extras(obj, DOCUMENT_FIELDS)
    if "doc_id" in metadata:
        raise DataError("'doc_id' is reserved in documents (the document id is 'id')", field="doc_id")
    return DocumentRecord(id=doc_id, title=title, text=text, metadata=metadata)


def _parse_answers(obj: Mapping[str, Any], task: str, allow_empty: bool) -> tuple[str, ...]:
    if "answers" not in obj:
        raise DataError("missing field 'answers'", field="answers")
    answers = obj["answers"]
    if not isinstance(answers, list):
        raise DataError(
            f"field 'answers' must be a list of strings, got {type(answers).__name__}", field="answers"
        )
    for i, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise DataError(f"answer {i} must be a non-empty string, got {answer!r}", field=f"answers[{i}]")
        check_text(answer, f"answers[{i}]")
    if not answers and not allow_empty:
        raise DataError("answers list is empty (pass allow_empty_answers=True to accept)", field="answers")
    if task == "fact" and answers and (len(answers) != 1 or answers[0] not in FACT_ANSWERS):
        raise DataError(
            f'fact-checking answers must be ["true"] or ["false"], got {answers!r}', field="answers"
        )
    return tuple(answers)


def parse_question(obj: Mapping[str, Any], *, allow_empty_answers: bool = False) -> QuestionRecord:
    """Build a :class:`QuestionRecord` from one JSON object (no file/line context)."""
    qid = _req_id(obj, "id")
    question = _req_str(obj, "question")
    doc_id = _req_id(obj, "doc_id", document=True)
    task = _req_str(obj, "task", default="qa")
    answers = _parse_answers(obj, task, allow_empty_answers)
    metadata = _extras(obj, QUESTION_FIELDS)
    return QuestionRecord(
        id=qid, question=question, answers=answers, doc_id=doc_id, task=task, metadata=metadata
    )


def parse_task_example(obj: Mapping[str, Any]) -> TaskExample:
    """Build a :class:`TaskExample` from one JSON object (no file/line context)."""
    prompt = _req_str(obj, "prompt")
    answer = _req_str(obj, "answer")
    return TaskExample(prompt=prompt, answer=answer, metadata=_extras(obj, TASK_EXAMPLE_FIELDS))


# ---- records -> objects ----------------------------------------------------------------------------------


def _check_metadata(metadata: Mapping[str, Any], known: tuple[str, ...]) -> None:
    clash = sorted(set(metadata) & set(known))
    if clash:
        raise DataError(f"metadata key {clash[0]!r} clashes with a record field", field=clash[0])


def document_to_dict(rec: DocumentRecord) -> dict[str, Any]:
    _check_metadata(rec.metadata, DOCUMENT_FIELDS)
    return {"id": rec.id, "title": rec.title, "text": rec.text, **rec.metadata}


def question_to_dict(rec: QuestionRecord) -> dict[str, Any]:
    _check_metadata(rec.metadata, QUESTION_FIELDS)
    return {
        "id": rec.id,
        "question": rec.question,
        "answers": list(rec.answers),
        "doc_id": rec.doc_id,
        "task": rec.task,
        **rec.metadata,
    }


def task_example_to_dict(rec: TaskExample) -> dict[str, Any]:
    _check_metadata(rec.metadata, TASK_EXAMPLE_FIELDS)
    return {"prompt": rec.prompt, "answer": rec.answer, **rec.metadata}


# ---- JSON Lines I/O --------------------------------------------------------------------------------------

T = TypeVar("T")


def _iter_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSON Lines file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except IsADirectoryError:
        raise DataError("expected a .jsonl file, got a folder", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read file: {exc}", path=path) from exc
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DataError(f"not valid UTF-8 ({exc.reason})", path=path, line=lineno) from None
        except json.JSONDecodeError as exc:
            raise DataError(
                f"invalid JSON: {exc.msg} at column {exc.colno}", path=path, line=lineno
            ) from None
        except RecursionError:
            raise DataError("invalid JSON: nested too deeply", path=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
        yield lineno, obj


def _read(
    path: str | Path,
    parse: Callable[[Mapping[str, Any]], T],
    key: Callable[[T], str | None],
    kind: str,
) -> list[T]:
    path = Path(path)
    records: list[T] = []
    seen: dict[str, tuple[str, int]] = {}
    for lineno, obj in _iter_objects(path):
        try:
            rec = parse(obj)
        except DataError as exc:
            raise DataError(exc.message, field=exc.field, path=path, line=lineno) from None
        rid = key(rec)
        if rid is not None:
            _check_duplicate(rid, lineno, seen, path)
        records.append(rec)
    if not records:
        raise DataError(f"no {kind} in file (empty or only blank lines)", path=path)
    return records


def _check_duplicate(rid: str, lineno: int, seen: dict[str, tuple[str, int]], path: Path | None) -> None:
    k = id_key(adapter_name(rid))  # ids whose adapter folders would collide
    if k in seen:
        first, first_line = seen[k]
        what = (
            f"duplicate id {rid!r}"
            if first == rid
            else f"id {rid!r} collides with {first!r} (case-insensitive)"
        )
        where = "line" if path is not None else "record"
        raise DataError(f"{what}: {where}s {first_line} and {lineno}", field="id", path=path, line=lineno)
    seen[k] = (rid, lineno)


def read_documents(path: str | Path) -> list[DocumentRecord]:
    """Read and validate ``documents.jsonl``."""
    return _read(path, parse_document, lambda r: r.id, "documents")


def read_questions(path: str | Path, *, allow_empty_answers: bool = False) -> list[QuestionRecord]:
    """Read and validate ``questions.jsonl`` (empty answer lists refused unless ``allow_empty_answers``)."""

    def parse(obj: Mapping[str, Any]) -> QuestionRecord:
        return parse_question(obj, allow_empty_answers=allow_empty_answers)

    return _read(path, parse, lambda r: r.id, "questions")


def read_task_examples(path: str | Path) -> list[TaskExample]:
    """Read and validate task-adapter training examples (``{"prompt", "answer"}`` per line)."""
    return _read(path, parse_task_example, lambda r: None, "task examples")


def _write(
    path: str | Path,
    records: Iterable[T],
    to_dict: Callable[[T], dict[str, Any]],
    parse: Callable[[Mapping[str, Any]], T],
    key: Callable[[T], str | None],
) -> None:
    """Validate every record exactly as a reader would, then write the file atomically."""
    lines: list[str] = []
    seen: dict[str, tuple[str, int]] = {}
    for index, rec in enumerate(records, start=1):
        try:
            obj = to_dict(rec)
            parse(obj)
            rid = key(rec)
            if rid is not None:
                _check_duplicate(rid, index, seen, None)
            lines.append(json.dumps(obj, ensure_ascii=False))
        except DataError as exc:
            raise DataError(f"record {index}: {exc.message}", field=exc.field, path=path) from None
        except (TypeError, ValueError) as exc:  # metadata that JSON cannot encode
            raise DataError(
                f"record {index}: cannot encode as JSON: {exc}", field="metadata", path=path
            ) from None
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def write_documents(path: str | Path, records: Iterable[DocumentRecord]) -> None:
    """Write ``documents.jsonl`` atomically (records validated as :func:`read_documents` would)."""
    _write(path, records, document_to_dict, parse_document, lambda r: r.id)


def write_questions(
    path: str | Path, records: Iterable[QuestionRecord], *, allow_empty_answers: bool = False
) -> None:
    """Write ``questions.jsonl`` atomically."""

    def parse(obj: Mapping[str, Any]) -> QuestionRecord:
        return parse_question(obj, allow_empty_answers=allow_empty_answers)

    _write(path, records, question_to_dict, parse, lambda r: r.id)


def write_task_examples(path: str | Path, records: Iterable[TaskExample]) -> None:
    """Write task-adapter training examples atomically."""
    _write(path, records, task_example_to_dict, parse_task_example, lambda r: None)


# ---- LlamaIndex ------------------------------------------------------------------------------------------

#: Metadata keys seen by the embedder and the LLM: every chunk is embedded/shown as ``"title: T\n\n<chunk>"``.
VISIBLE_METADATA_KEYS = ("title",)


def doc_to_llama_document(rec: DocumentRecord) -> Document:
    """A LlamaIndex ``Document`` with ``id_ = rec.id``.

    ``text`` is the document body; ``metadata`` holds ``doc_id``, ``title`` and the record's extra keys.
    Only ``title`` is visible to the embedder and the LLM (LlamaIndex renders a chunk as
    ``"title: <title>\\n\\n<chunk text>"``), so every chunk of a long document carries its title; an empty
    title is hidden too.
    """
    from llama_index.core import Document

    metadata: dict[str, Any] = {**rec.metadata, "doc_id": rec.id, "title": rec.title}
    visible = {k for k in VISIBLE_METADATA_KEYS if metadata.get(k)}
    hidden = [k for k in metadata if k not in visible]
    return Document(
        id_=rec.id,
        text=rec.text,
        metadata=metadata,
        excluded_embed_metadata_keys=hidden,
        excluded_llm_metadata_keys=hidden,
    )


__all__ = [
    "DocumentRecord",
    "QuestionRecord",
    "TaskExample",
    "validate_id",
    "validate_document_id",
    "adapter_name",
    "id_key",
    "read_documents",
    "read_questions",
    "read_task_examples",
    "write_documents",
    "write_questions",
    "write_task_examples",
    "parse_document",
    "parse_question",
    "parse_task_example",
    "document_to_dict",
    "question_to_dict",
    "task_example_to_dict",
    "doc_to_llama_document",
    "MAX_ID_LENGTH",
    "FACT_ANSWERS",
]


# ---- committed instances -----------------------------------------------------------------------------
DATA_DIR = Path(str(resources.files("llama_index_lag").joinpath("data")))
"""Folder of the committed instances: ``demo/``, ``benchmark/`` and ``benchmark-seed1/`` (written by
:mod:`llama_index_lag.eval.synthetic`)."""
PACKAGED = ("demo", "benchmark", "benchmark-seed1")


def packaged_path(name: str) -> Path:
    """Folder of a committed instance: ``"demo"``, ``"benchmark"`` (60 documents, seed 0) or
    ``"benchmark-seed1"`` (60 documents, seed 1)."""
    if name not in PACKAGED:
        raise ConfigError(f"unknown packaged instance {name!r} (expected one of {', '.join(PACKAGED)})",
                          field="name")
    return DATA_DIR / name
