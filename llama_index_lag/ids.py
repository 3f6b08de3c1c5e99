"""Ids shared by documents and adapters: a document's id becomes its adapter's folder name.

An id is 1-128 characters, each a unicode letter or digit or one of ``. _ -``; no leading or trailing dot (so
no ``.``/``..``/hidden names), no spaces, path separators or control characters, NFC-normalised, not a Windows
device name (``con``, ``nul``, ``com1``...). Ids of one set must differ case-insensitively (:func:`id_key`).
"""

from __future__ import annotations

import unicodedata

from .errors import DataError

MAX_ID_LENGTH = 128
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
