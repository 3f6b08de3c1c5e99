"""Ids shared by documents and adapters: one policy, used by the index and the library alike.

An adapter name (a folder name) is 1-128 characters, each a unicode letter or digit or one of ``. _ -``; no
leading or trailing dot (so no ``.``/``..``/hidden names), no spaces, path separators or control characters,
NFC-normalised, not a Windows device name (``con``, ``nul``, ``com1``...) (:func:`validate_id`).

A document id is any string of up to 1024 characters without control characters (a file path, a name with
spaces, a URL: :func:`validate_document_id`). Its adapter is named :func:`adapter_name` of it: the id itself
when it is a safe adapter name, else a readable slug of it plus 10 hex digits of its SHA-256, deterministic
(the same id gets the same name on every machine and run); the library's manifest keeps the original id.
Names of one set must differ case-insensitively (:func:`id_key`).
"""

from __future__ import annotations

import hashlib
import unicodedata

from .errors import DataError

MAX_ID_LENGTH = 128
MAX_DOCUMENT_ID_LENGTH = 1024
_DIGEST = 10  # hex digits of SHA-256 in a derived adapter name
_ID_PUNCT = frozenset("._-")
_RESERVED_NAMES = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
)


def validate_id(value: object, *, field: str = "id") -> str:
    """Return ``value`` if it is a safe id (see module docstring), else raise :class:`DataError`.

    Shared with the adapter library: document ids become adapter folder names.
    """
    if not isinstance(value, str):
        raise DataError(f"id must be a string, got {type(value).__name__}", field=field)
    if not value:
        raise DataError("id is empty", field=field)
    if len(value) > MAX_ID_LENGTH:
        raise DataError(
            f"id is {len(value)} characters long (max {MAX_ID_LENGTH}): {value[:40]!r}...", field=field
        )
    bad = [c for c in value if not (c.isalnum() or c in _ID_PUNCT)]
    if bad:
        raise DataError(
            f"id {value!r} contains {bad[0]!r}: ids may only use letters, digits and '._-' "
            "(they become adapter folder names)",
            field=field,
        )
    if value[0] == "." or value[-1] == ".":
        raise DataError(f"id {value!r} may not start or end with '.'", field=field)
    if unicodedata.normalize("NFC", value) != value:
        raise DataError(f"id {value!r} is not NFC-normalised unicode", field=field)
    if value.split(".")[0].lower() in _RESERVED_NAMES:
        raise DataError(f"id {value!r} is a reserved file name on Windows", field=field)
    return value


def id_key(value: str) -> str:
    """The key under which two ids collide as folder names (case-insensitive)."""
    return value.casefold()


def validate_document_id(value: object, *, field: str = "id") -> str:
    """Return ``value`` if it can be a document id (a non-empty string of at most 1024 characters, no control
    characters, no leading or trailing whitespace), else raise :class:`DataError`."""
    if not isinstance(value, str):
        raise DataError(f"id must be a string, got {type(value).__name__}", field=field)
    if not value.strip():
        raise DataError("id is empty", field=field)
    if len(value) > MAX_DOCUMENT_ID_LENGTH:
        raise DataError(f"id is {len(value)} characters long (max {MAX_DOCUMENT_ID_LENGTH}): "
                        f"{value[:40]!r}...", field=field)
    bad = [c for c in value if unicodedata.category(c) in ("Cc", "Cs")]
    if bad:
        raise DataError(f"id {value!r} contains the control character {bad[0]!r}", field=field)
    if value != value.strip():
        raise DataError(f"id {value!r} starts or ends with whitespace", field=field)
    return value


def adapter_name(doc_id: str) -> str:
    """The adapter (folder) name of document ``doc_id`` (see the module docstring): ``doc_id`` itself when
    it is a safe name, else ``<slug>-<10 hex digits of sha256(doc_id)>``, e.g. ``docs/a b.md`` ->
    ``docs-a-b.md-1f0c3a9e2d``."""
    validate_document_id(doc_id)
    try:
        return validate_id(doc_id)
    except DataError:
        pass
    text = unicodedata.normalize("NFC", doc_id)
    slug = "".join(c if c.isalnum() or c in _ID_PUNCT else "-" for c in text)
    while "--" in slug:
        slug = slug.replace("--", "-")
    slug = slug[-(MAX_ID_LENGTH - _DIGEST - 1):].strip("-.")  # the end of a path names the file
    if not slug or slug.split(".")[0].lower() in _RESERVED_NAMES:
        slug = f"doc-{slug}".strip("-.")
    return validate_id(f"{slug}-{hashlib.sha256(doc_id.encode('utf-8')).hexdigest()[:_DIGEST]}")
