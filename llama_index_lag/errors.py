"""Typed errors. Every error names what is at fault: adapter, module, field, file, line.

Hierarchy::

    LAGError
    ├── AdapterError            one PEFT adapter folder is unusable
    │   ├── AdapterFormatError      missing / corrupt / truncated files, NaN or Inf weights
    │   ├── UnsafeAdapterError      pickled weights refused (pass allow_pickle=True to accept)
    │   └── IncompatibleAdapterError  DoRA, non-Linear targets, shapes or modules not matching the base
    ├── LibraryError            a compiled adapter library
    │   ├── LibraryFormatError      missing / corrupt / stale library folder
    │   └── IncompatibleLibraryError  libraries or models that cannot be used together
    ├── ConfigError             invalid configuration value (also a ValueError)
    ├── DataError               documents / questions files (also a ValueError)
    ├── VectorIndexError        vector index folder problems
    ├── ModelError              model folder is missing or not a causal LM
    ├── PromptTooLongError      prompt longer than the context window, truncation="error" (a ValueError)
    ├── BuildError              building an adapter failed (disk, folder, worker); re-running resumes
    ├── UnsafeOutputError       an output path holds data that a write would destroy
    ├── DiskFullError           no space left for a write (says how much was needed and free)
    ├── MissingDependencyError  an optional package is not installed (also an ImportError)
    └── QueueFullError          the batch engine's queue is full: the request was not taken (retry later)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class LAGError(Exception):
    """Base class of every error raised by llama-index-lag.

    Keyword arguments name the culprit and are kept as attributes (``adapter``, ``module``, ``field``,
    ``path``, ``line``); they are also appended to the message so a log line is self-explanatory.
    """

    def __init__(
        self,
        message: str,
        *,
        adapter: str | None = None,
        module: str | None = None,
        field: str | None = None,
        path: str | Path | None = None,
        line: int | None = None,
        **extra: Any,
    ) -> None:
        self.adapter = adapter
        self.module = module
        self.field = field
        self.path = str(path) if path is not None else None
        self.line = line
        self.extra = extra
        where = []
        if adapter is not None:
            where.append(f"adapter {adapter!r}")
        if module is not None:
            where.append(f"module {module!r}")
        if field is not None:
            where.append(f"field {field!r}")
        if path is not None:
            where.append(f"file {str(path)!r}")
        if line is not None:
            where.append(f"line {line}")
        self.message = message
        super().__init__(f"{message} [{', '.join(where)}]" if where else message)


class AdapterError(LAGError):
    """A PEFT LoRA adapter folder cannot be used."""


class AdapterFormatError(AdapterError):
    """Missing, corrupt or truncated adapter files, or non-finite weights."""


class UnsafeAdapterError(AdapterError):
    """Pickled adapter weights (``adapter_model.bin``) refused unless ``allow_pickle=True``."""


class IncompatibleAdapterError(AdapterError):
    """An adapter LAG cannot route, or one that does not fit the base model."""


class LibraryError(LAGError):
    """A compiled adapter library cannot be used."""


class LibraryFormatError(LibraryError):
    """Library folder missing, corrupt, of an unknown format version, or stale."""


class IncompatibleLibraryError(LibraryError):
    """Libraries / models that cannot be used together (base model, dtype, names)."""


class ConfigError(LAGError, ValueError):
    """Invalid configuration value."""


class DataError(LAGError, ValueError):
    """Invalid documents / questions data (names file, line and field)."""


class VectorIndexError(LAGError):
    """A persisted vector index is missing, corrupt or does not match the embedder."""


class ModelError(LAGError):
    """A model folder is missing or is not a causal language model."""


class PromptTooLongError(LAGError, ValueError):
    """The prompt does not fit the context window and ``truncation="error"``."""


class BuildError(LAGError):
    """Building an adapter failed (disk full, unwritable folder, worker crash); finished adapters are kept and
    re-running the build resumes."""


class UnsafeOutputError(LAGError):
    """An output path exists and is not ours to replace (a user's folder or file, or one of the inputs)."""


class DiskFullError(LAGError):
    """The disk (or quota) is full; ``extra["needed"]`` / ``extra["free"]`` are in bytes when known."""


class MissingDependencyError(LAGError, ImportError):
    """An optional package is missing; the message says the exact install command."""


class QueueFullError(LAGError):
    """The batch engine's queue is full: the request was not accepted (retry later)."""



__all__ = [
    "LAGError",
    "AdapterError",
    "AdapterFormatError",
    "UnsafeAdapterError",
    "IncompatibleAdapterError",
    "LibraryError",
    "LibraryFormatError",
    "IncompatibleLibraryError",
    "ConfigError",
    "DataError",
    "VectorIndexError",
    "ModelError",
    "PromptTooLongError",
    "BuildError",
    "UnsafeOutputError",
    "DiskFullError",
    "MissingDependencyError",
    "QueueFullError",
]
