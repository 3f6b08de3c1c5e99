"""Build one knowledge adapter per document (resumable, optionally in parallel) and task adapters.

Layout of ``ADAPTERS_DIR``::

    <name>/adapter_config.json            a standard PEFT LoRA folder, named adapter_name(document id)
    <name>/adapter_model.safetensors      (the id itself when it is a safe folder name)
    <name>/lag_adapter.json               doc_id (the original id), kind, recipe, seed, timings, QA counts

Each adapter is written into a hidden temporary sibling and renamed into place only when complete
(``atomic_dir``), ``lag_adapter.json`` included, so a folder with a valid ``lag_adapter.json`` is a finished
adapter and nothing else is: re-running a build skips finished adapters and (re)builds the rest; an
interrupted run (Ctrl-C, crash, disk full) never leaves a half-written adapter that is taken as finished.

Determinism: every document gets its own seed ``crc32(f"{seed}:{doc_id}")``, so an adapter does not depend on
the order of documents or on how they were spread over workers (bit-identical for the same torch thread count;
a different thread count can change the last bits of the float sums).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._env import __version__
from .._fs import atomic_dir, atomic_write_json, free_bytes
from ..data import (
    DocumentRecord,
    adapter_name,
    check_text,
    id_key,
    validate_document_id,
)
from ..errors import BuildError, ConfigError, DataError, UnsafeOutputError
from ..ingest import load_documents
from .augment import (
    HFGenerator,
    QAGenerationWarning,
    TextGenerator,
    augment_document,
    chunk_document,
    eva_texts,
    knowledge_examples,
)
from .local_workers import build_lock, build_parallel
from .recipe import KnowledgeRecipe
from .train import StepCallback, train_lora

if TYPE_CHECKING:  # pragma: no cover
    from llama_index.core.schema import BaseNode, Document
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from ..library import AdapterLibrary

logger = logging.getLogger(__name__)

META_FILE = "lag_adapter.json"
META_FORMAT = "llama-index-lag/adapter"
META_VERSION = 1


# ---------------------------------------------------------------------------------------------- metadata
def read_adapter_meta(folder: str | Path) -> dict[str, Any] | None:
    """The ``lag_adapter.json`` of a finished adapter folder, else None (missing, corrupt, or no weights)."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        return None
    if not (folder / "adapter_config.json").is_file() or not (folder / "adapter_model.safetensors").is_file():
        return None
    return meta


def is_finished(folder: str | Path, doc_id: str | None = None, kind: str = "knowledge") -> bool:
    meta = read_adapter_meta(folder)
    if meta is None or meta.get("kind") != kind:
        return False
    return doc_id is None or meta.get("doc_id") == doc_id


def document_seed(seed: int, doc_id: str) -> int:
    """The per-document seed (independent of order and workers)."""
    return zlib.crc32(f"{seed}:{doc_id}".encode()) & 0x7FFFFFFF


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"llama_index_lag": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def _base_info(model: Any) -> dict[str, Any]:
    cfg = getattr(model, "config", None)
    return {"name_or_path": str(getattr(cfg, "_name_or_path", "") or ""),
            "architecture": type(model).__name__,
            "model_type": getattr(cfg, "model_type", None)}


def _text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------- one adapter
def build_knowledge_adapter(
    doc: DocumentRecord,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    recipe: KnowledgeRecipe | None = None,
    seed: int = 0,
    generate: TextGenerator | Callable[..., list[str]] | None = None,
    on_step: StepCallback | None = None,
    contrast: str | Path | None = None,
) -> dict[str, Any]:
    """Generate, train and atomically write the knowledge adapter of ``doc`` into ``out_dir``; return its
    metadata (also written as ``lag_adapter.json``). ``generate`` defaults to greedy generation with
    ``model``. ``contrast``: the library covariance file of ``init="eva-contrastive"``
    (:func:`~llama_index_lag.training.contrast.library_covariance`)."""
    from .contrast import load_covariance
    from .train import seed_everything

    recipe = recipe or KnowledgeRecipe()
    if recipe.init == "eva-contrastive" and contrast is None:
        raise ConfigError("init 'eva-contrastive' needs the library's mean covariance file (contrast=...); "
                          "build_knowledge_adapters computes it", field="init")
    covariance = load_covariance(contrast) if recipe.init == "eva-contrastive" and contrast else None
    doc_seed = document_seed(seed, doc.id)
    start = time.perf_counter()
    cpu_start = time.process_time()
    seed_everything(doc_seed)
    if generate is None and recipe.uses_generation:
        generate = HFGenerator(model, tokenizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QAGenerationWarning)
        aug = augment_document(doc, tokenizer, recipe, generate)
    for w in caught:  # QA skips go to the log (one line per document); anything else is re-issued
        if issubclass(w.category, QAGenerationWarning):
            logger.warning("%s", w.message)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    gen_s = time.perf_counter() - start
    examples = knowledge_examples(doc, aug, tokenizer, recipe)
    out_dir = Path(out_dir)
    with _disk_errors(doc.id, out_dir), atomic_dir(out_dir) as tmp:
        stats = train_lora(model, tokenizer, examples, recipe, tmp, eva_texts=eva_texts(aug), seed=doc_seed,
                           steps=recipe.n_steps(len(aug.chunks)), on_step=on_step, contrast=covariance)
        counts = _count(e.kind for e in examples)
        meta = {
            "format": META_FORMAT,
            "format_version": META_VERSION,
            "kind": "knowledge",
            "doc_id": doc.id,
            "title": doc.title,
            "document_sha256": _text_sha(doc.text),
            "seed": seed,
            "adapter_seed": doc_seed,
            "recipe": recipe.to_dict(),
            **({"contrast": Path(contrast).name} if covariance is not None else {}),
            "base_model": _base_info(model),
            "augmentation": {**aug.stats, "examples": counts},
            "train": {k: v for k, v in stats.items() if k != "timings"},
            "timings": {
                "generate_s": round(gen_s, 3),
                "eva_init_s": stats["timings"].get("init_s"),
                "train_s": stats["timings"].get("train_s"),
                "save_s": stats["timings"].get("save_s"),
                "total_s": round(time.perf_counter() - start, 3),
                "cpu_s": round(time.process_time() - cpu_start, 3),
                "threads": _threads(),
            },
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(tmp / META_FILE, meta)
    return meta


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _count(items: Iterator[str] | Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        out[item] = out.get(item, 0) + 1
    return out


@contextlib.contextmanager
def _disk_errors(name: str, path: Path) -> Iterator[None]:
    """Turn OS write errors into :class:`BuildError` naming the adapter (the temp folder is already gone)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            free = free_bytes(path)
            what = f"disk full ({free / 2**20:.1f} MB free)" if free is not None else "disk full"
        else:
            what = f"cannot write ({exc})"
        raise BuildError(f"{what} while writing the adapter; its temporary folder was removed, finished "
                         "adapters are kept, re-run to resume", adapter=name, path=path) from exc


# ---------------------------------------------------------------------------------------------- many adapters
@dataclass
class BuildReport:
    """What :func:`build_knowledge_adapters` did."""

    out: Path
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)  # rebuilt: their document changed since
    failed: dict[str, str] = field(default_factory=dict)  # doc id -> why (Ray builds; local builds raise)
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)
    library: Path | None = None
    seconds: float = 0.0
    #: per worker (Ray builds): adapters, busy_s (building), load_s (model), overhead_s (scheduling, transfer)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def adapter_dirs(self) -> list[Path]:
        return [self.out / adapter_name(doc_id) for doc_id in self.metadata]

    @property
    def adapters_per_hour(self) -> float | None:
        """Adapters built in this run per hour of its wall time."""
        return 3600.0 * len(self.built) / self.seconds if self.built and self.seconds > 0 else None


def _check_documents(documents: Sequence[DocumentRecord]) -> None:
    if not documents:
        raise DataError("no documents to build adapters for")
    seen: dict[str, str] = {}
    for doc in documents:
        validate_document_id(doc.id)
        key = id_key(adapter_name(doc.id))  # the adapter folders must not collide
        if key in seen:
            raise DataError(f"duplicate document id {doc.id!r} (collides with {seen[key]!r})", field="id")
        seen[key] = doc.id
        if not doc.text.strip():
            raise DataError("document text is empty", field="text", adapter=doc.id)
        try:
            check_text(doc.text, "text")
            check_text(doc.title, "title")
        except DataError as exc:
            raise DataError(exc.message, field=exc.field, adapter=doc.id) from None


def _clean_stale(out: Path, name: str) -> None:
    """Remove temp folders an earlier crashed run left for this adapter."""
    for stale in out.glob(f".{name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def build_knowledge_adapters(
    documents: Sequence[DocumentRecord | Document | BaseNode] | str | Path,
    out: str | Path,
    *,
    base: str | Path | None = None,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    recipe: KnowledgeRecipe | None = None,
    seed: int = 0,
    workers: int | None = None,
    compile_to: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    generate: TextGenerator | Callable[..., list[str]] | None = None,
    on_adapter: Callable[[str, dict[str, Any]], None] | None = None,
    on_step: StepCallback | None = None,
    force: bool = False,
    ray_address: str | None = None,
    ray_cpus_per_worker: float = 1.0,
    ray_gpus_per_worker: float = 0.0,
    retries: int = 2,
) -> BuildReport:
    """Build the knowledge adapter of every document into ``out/<adapter_name(doc id)>`` (skipping finished
    ones built from the same text unless ``overwrite``; an adapter whose document changed is rebuilt), then
    compile them into a knowledge library at ``compile_to`` when given.

    ``documents``: :class:`DocumentRecord` s, llama-index ``Document`` s or nodes (e.g. from
    ``SimpleDirectoryReader``; ids by :func:`~llama_index_lag.ingest.stable_document_id`), a
    ``documents.jsonl`` path or a folder path (:func:`~llama_index_lag.ingest.read_directory`).

    ``base`` is the model folder (None: the embedded SmolLM2-135M-Instruct); pass ``model`` + ``tokenizer``
    to reuse a loaded model (``workers`` must then be 1). ``workers > 1`` trains in that many spawned
    processes, each loading its own model and using ``torch.get_num_threads() // workers`` threads.
    ``on_adapter(doc_id, meta)`` is called in this process after each finished adapter (raise from it to stop
    the build).

    ``ray_address`` (``"auto"``: this machine's Ray cluster, else a local one; or ``HOST:PORT``) builds on Ray
    instead (:mod:`.ray_build`, ``pip install "llama-index-lag[ray]"``): ``workers`` actors (None: as many
    as the cluster's resources hold) of ``ray_cpus_per_worker`` CPUs (their torch threads) and
    ``ray_gpus_per_worker`` GPUs each load the model once; ``out`` must be a path every worker sees. A worker
    that dies is restarted and its document retried, a document that fails is retried ``retries`` times,
    then listed in ``report.failed`` while the others finish; ``compile_to`` then compiles the finished
    adapters on the cluster too.

    Nothing that is not ours is replaced: an existing adapter folder that is not a finished adapter (and
    not empty), or a ``compile_to`` that is a user's folder, equal to ``out`` or inside it, is refused with an
    :class:`UnsafeOutputError` before any training (``force=True`` replaces such adapter folders and library
    folders, never the adapters themselves). One build at a time writes ``out``: a second one, or one started
    while a worker of a killed build still runs, is refused. Workers die with this process.
    """
    start = time.perf_counter()
    docs = load_documents(documents)
    _check_documents(docs)
    recipe = recipe or KnowledgeRecipe()
    ray_options = None
    if ray_address is not None:
        from .._ray import require_ray
        from .ray_build import RayOptions

        require_ray()  # before any work
        if model is not None or generate is not None:
            raise ConfigError("a build on Ray loads the model in its workers: pass base=, not model= or "
                              "generate=", field="ray_address")
        ray_options = RayOptions(ray_address, workers, ray_cpus_per_worker, ray_gpus_per_worker, retries)
        workers = 1
    workers = 1 if workers is None else workers
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be a positive integer, got {workers!r}", field="workers")
    if (model is None) != (tokenizer is None):
        raise ConfigError("pass both model and tokenizer, or neither", field="model")
    if model is not None and workers > 1:
        raise ConfigError("a loaded model cannot be shared with worker processes; pass base= instead",
                          field="workers")
    if generate is not None and workers > 1:
        raise ConfigError("a custom generate function only works with workers=1", field="workers")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnsafeOutputError("the adapters folder is a file", path=out)
    if compile_to is not None:
        from ..library.store import check_library_output

        check_library_output(compile_to, [out], force)  # before hours of training, not after
    out.mkdir(parents=True, exist_ok=True)
    with build_lock(out):
        return _build_all(docs, out, base=base, model=model, tokenizer=tokenizer, recipe=recipe, seed=seed,
                          workers=workers, compile_to=compile_to, progress=progress, overwrite=overwrite,
                          generate=generate, on_adapter=on_adapter, on_step=on_step, force=force, start=start,
                          ray_options=ray_options)


def _plan(docs: list[DocumentRecord], out: Path, report: BuildReport, *, overwrite: bool,
          force: bool) -> list[DocumentRecord]:
    """The documents to (re)build; finished adapters of the same text go to ``report.skipped``. A folder
    that is not ours is refused unless ``force``."""
    todo: list[DocumentRecord] = []
    for doc in docs:
        folder = out / adapter_name(doc.id)
        meta = read_adapter_meta(folder)
        ours = meta is not None or not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
        if not ours and not force:
            raise UnsafeOutputError(f"refusing to replace {folder} (the adapter folder of document "
                                    f"{doc.id!r}): it is not an adapter written by llama-index-lag; move it "
                                    "away or pass --force / force=True", path=folder, adapter=doc.id)
        current = (meta is not None and meta.get("kind") == "knowledge" and meta.get("doc_id") == doc.id
                   and meta.get("document_sha256") in (None, _text_sha(doc.text))
                   and meta.get("title", doc.title) == doc.title)
        if current and not overwrite:
            report.skipped.append(doc.id)
            report.metadata[doc.id] = meta
            continue
        if meta is not None and not overwrite and meta.get("doc_id") == doc.id:
            logger.info("document %r changed since its adapter was built: rebuilding it", doc.id)
            report.stale.append(doc.id)
        todo.append(doc)
    return todo


def _build_all(docs: list[DocumentRecord], out: Path, *, base: str | Path | None, model: Any, tokenizer: Any,
               recipe: KnowledgeRecipe, seed: int, workers: int, compile_to: str | Path | None,
               progress: bool, overwrite: bool, generate: Any, on_adapter: Any, on_step: Any, force: bool,
               start: float, ray_options: Any = None) -> BuildReport:
    import torch
    from tqdm.auto import tqdm

    report = BuildReport(out=out)
    todo = _plan(docs, out, report, overwrite=overwrite, force=force)
    for doc in todo:
        _clean_stale(out, adapter_name(doc.id))

    if todo:
        if model is None and workers == 1 and ray_options is None:
            from ..models import load_causal_lm

            model, tokenizer = load_causal_lm(base)
        check_tok = tokenizer if tokenizer is not None else _load_tokenizer(base)
        for doc in todo:  # refuse too-long documents before spending any time
            chunk_document(doc, check_tok, recipe)
        contrast = _contrast(docs, out, base, model, check_tok, recipe)
        bar = tqdm(total=len(docs), initial=len(report.skipped), desc="adapters", unit="adapter",
                   disable=not progress, dynamic_ncols=True)
        try:
            def finished(doc_id: str, meta: dict[str, Any]) -> None:
                report.built.append(doc_id)
                report.metadata[doc_id] = meta
                bar.update(1)
                bar.set_postfix_str(f"{doc_id}: {meta['timings']['total_s']:.0f}s, "
                                    f"loss {meta['train'].get('loss_tail_mean')}")
                if on_adapter is not None:
                    on_adapter(doc_id, meta)

            def failed(doc_id: str, reason: str) -> None:
                report.failed[doc_id] = reason
                bar.update(1)
                logger.error("adapter of %r not built: %s", doc_id, reason)

            if ray_options is not None:
                from .ray_build import build_on_ray

                report.workers = build_on_ray(build_knowledge_adapter, todo, out, base=base, recipe=recipe,
                                              seed=seed,
                                              options=ray_options, contrast=contrast, finished=finished,
                                              failed=failed)
            elif workers == 1:
                assert model is not None and tokenizer is not None
                for doc in todo:
                    bar.set_description(f"adapters ({doc.id})")
                    meta = build_knowledge_adapter(doc, model, tokenizer, out / adapter_name(doc.id),
                                                   recipe=recipe, seed=seed, generate=generate,
                                                   on_step=on_step, contrast=contrast)
                    finished(doc.id, meta)
            else:
                build_parallel(build_knowledge_adapter, todo, out, base, recipe, seed, workers,
                               torch.get_num_threads(), finished, contrast)
        except KeyboardInterrupt:
            left = len(docs) - len(report.built) - len(report.skipped)
            logger.warning("interrupted: %d adapters built in this run%s, %d already finished, %d not built "
                           "(re-run the same command to resume)", len(report.built),
                           f" ({', '.join(report.built[:10])}{', ...' if len(report.built) > 10 else ''})"
                           if report.built else "", len(report.skipped), left)
            raise
        finally:
            bar.close()
    # documents order, not completion order
    report.metadata = {doc.id: report.metadata[doc.id] for doc in docs if doc.id in report.metadata}
    if compile_to is not None:
        from ..library import AdapterLibrary

        base_model: Any = model if model is not None else _resolve(base)
        dirs = [out / adapter_name(doc.id) for doc in docs if doc.id in report.metadata]
        if report.failed:
            logger.warning("compiling the %d finished adapters; %d documents failed", len(dirs),
                           len(report.failed))
        if dirs:
            lib: AdapterLibrary = AdapterLibrary.compile(
                dirs, kind="knowledge", base_model=base_model, out=compile_to, progress=progress, force=force,
                ray_address=None if ray_options is None else ray_options.address)
            report.library = lib.path
    report.seconds = time.perf_counter() - start
    return report


def _contrast(docs: list[DocumentRecord], out: Path, base: str | Path | None, model: Any, tokenizer: Any,
              recipe: KnowledgeRecipe) -> Path | None:
    """Contrastive EVA: the library covariance file of all ``docs`` (every document of the library, not only
    those to build; computed once, cached in ``out``), else None."""
    if recipe.init != "eva-contrastive":
        return None
    from .contrast import library_covariance

    if model is None:  # parallel workers load their own models; the covariance is computed here once
        from ..models import load_causal_lm

        model, _ = load_causal_lm(base)
    return library_covariance(docs, out, model, tokenizer, recipe,
                              lambda doc: chunk_document(doc, tokenizer, recipe))


def _load_tokenizer(base: str | Path | None) -> Any:
    """The tokenizer of a causal-LM folder (ModelError when the folder is not a causal LM)."""
    from transformers import AutoTokenizer

    from ..errors import ModelError
    from ..models import check_causal_lm_dir

    folder = _resolve(base)
    check_causal_lm_dir(folder)
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the tokenizer: {exc}", path=folder) from exc


def _resolve(base: str | Path | None) -> Path:
    from ..models import resolve_model_dir

    return resolve_model_dir(base)


__all__ = [
    "META_FILE",
    "BuildError",
    "BuildReport",
    "build_knowledge_adapter",
    "build_knowledge_adapters",
    "document_seed",
    "is_finished",
    "read_adapter_meta",
]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
