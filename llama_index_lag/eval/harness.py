"""The evaluation harness behind ``lag eval``: answer every question in every mode, score, report.

Modes (``--modes``): see :mod:`llama_index_lag.modes`, each measured on the prompts the LlamaIndex pipeline
itself sends.

Prompts are built with the pipeline's own objects: :func:`~llama_index_lag.pipeline.build_query_engine` makes
the engine of the matching pipeline mode and its synthesizer's templates are formatted exactly as
``LLM.predict`` does, then rendered by ``LAGLLM.chat_prompt``. Generation is batched (left padding, attention
mask) per routing setting; the per-question routing summary and the routing accuracy are split out of the
batch's routing trace (prompt tokens: routing accuracy; prompt + fed generated tokens: summary). A RAG prompt
that would not fit one LLM call (the refine loop) falls back to ``engine.query`` for that question.

Results are appended per batch (fsync'ed) to ``RESULTS_DIR/answers.jsonl`` whose header holds the run
fingerprint (model weights, libraries, index, prompts, settings); a restart skips what is done, a changed
fingerprint is refused (or archived with ``restart=True``). ``results.json`` / ``results.md`` / plots are
written at the end (:mod:`.report`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError, LibraryError
from ..modes import BASE_MODES, DEFAULT_MODES, ModeSpec
from .accuracy import routing_accuracy, split_trace
from .prompts import predict_prompt, question_prompt, rag_prompt, template_text
from .results import (
    RESULTS_FILE,
    RESULTS_FORMAT,
    RESULTS_FORMAT_VERSION,
    ResultStore,
    WorkItem,
    digest,
    index_digest,
    library_digest,
    load_results,
    model_digest,
)
from .settings import (
    NO_TASK_ADAPTER,
    EvalConfig,
    parse_mode,
    parse_modes,
    parse_sweep,
    parse_task_map,
)

logger = logging.getLogger(__name__)


EMPTY_RESPONSE = "Empty Response"  # what LlamaIndex's refine loop answers for an empty generation
_SUMMARY_TOP = 5


# ---- the harness -----------------------------------------------------------------------------------------
class EvalHarness:
    """Plans, runs (resumably) and collects one evaluation. ``run()`` returns the results dict.

    ``llm`` (a :class:`~llama_index_lag.llm.LAGLLM` with the knowledge and task libraries attached),
    ``index`` (a loaded VectorStoreIndex) and ``embed_model`` may be passed to reuse loaded objects.
    """

    def __init__(self, config: EvalConfig, *, llm: Any = None, index: Any = None, embed_model: Any = None,
                 progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self._llm_in, self._index_in, self._embed_in = llm, index, embed_model
        self._prepared = False
        self._enc_cache: dict[str, Any] = {}

    # ---- preparation ----------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Read and check data, load model / libraries / index, build the pipeline engines and the plan."""
        if self._prepared:
            return
        self._setup()
        self.items = self._plan()
        self._prepared = True

    def _setup(self) -> None:
        """Everything but the plan (retrieval, prompts): enough for the run fingerprint."""
        if getattr(self, "fingerprint", None) is not None:
            return
        from ..data import read_documents, read_questions

        cfg = self.config
        self.documents = read_documents(cfg.docs)
        questions = read_questions(cfg.questions)  # empty answers lists: DataError naming file and line
        self.specs = list(cfg.mode_specs)
        self.llm = self._load_llm()
        router = self.llm.router
        if router is None or "knowledge" not in router.pools:
            raise ConfigError("the evaluation needs a knowledge library (--knowledge)", field="knowledge")
        self.router = router
        self.knowledge_names = router.names("knowledge")
        self.doc_to_adapter = {d: a for lib in router.libraries["knowledge"]
                               for d, a in lib.doc_ids().items()}
        self.questions, self.skipped = self._check_questions(questions)
        if cfg.limit:
            self.questions = self.questions[: cfg.limit]
        self.sweep_points = self._sweep_points()
        self.task_adapter = self._task_adapters()
        self.tasks = _task_info(self.questions)
        if any(s.retrieves for s in self.specs):
            if cfg.index is None and self._index_in is None:
                raise ConfigError("modes " + ", ".join(s.name for s in self.specs if s.retrieves)
                                  + " retrieve documents: pass --index (a folder from `lag index`)",
                                  field="index")
        self._build_engines()
        self.fingerprint_parts = self._fingerprint_parts()
        self.fingerprint = digest(self.fingerprint_parts)

    def _load_llm(self) -> Any:
        from ..config import LAGConfig
        from ..library import AdapterLibrary
        from ..llm import LAGLLM

        cfg = self.config
        if self._llm_in is not None:
            llm = self._llm_in
        else:
            if cfg.knowledge is None:
                raise ConfigError("the evaluation needs a knowledge library (--knowledge)", field="knowledge")
            know = AdapterLibrary.load(cfg.knowledge)
            if know.kind != "knowledge":
                raise ConfigError(f"--knowledge is a {know.kind} library", field="knowledge",
                                  path=cfg.knowledge)
            tasks = [AdapterLibrary.load(p) for p in cfg.task]
            for lib, p in zip(tasks, cfg.task):
                if lib.kind != "task":
                    raise ConfigError(f"--task {p} is a {lib.kind} library", field="task", path=p)
            # attach_lag checks every library against the model: IncompatibleLibraryError surfaces here
            llm = LAGLLM(cfg.model, libraries=[know, *tasks], lag_config=LAGConfig(mode="none"),
                         dtype=cfg.dtype)
        return llm.model_copy(update={"max_new_tokens": cfg.max_new_tokens, "temperature": 0.0})

    def _check_questions(self, questions: list[Any]) -> tuple[list[Any], list[dict[str, str]]]:
        doc_ids = {d.id for d in self.documents}
        kept, skipped = [], []
        for q in questions:
            if q.doc_id not in doc_ids:
                skipped.append({"id": q.id, "doc_id": q.doc_id, "reason": "doc_id not in the documents"})
            elif q.doc_id not in self.doc_to_adapter:
                skipped.append({"id": q.id, "doc_id": q.doc_id,
                                "reason": "no adapter in the knowledge library"})
            else:
                kept.append(q)
        if skipped:
            listing = "; ".join(f"{s['id']} ({s['doc_id']}: {s['reason']})" for s in skipped[:20])
            more = f"; ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
            if self.config.missing == "error":
                raise DataError(f"{len(skipped)} question(s) cannot be evaluated: {listing}{more} "
                                "(--missing skip evaluates the others)", path=self.config.questions,
                                field="doc_id")
            logger.warning("skipping %d question(s) whose gold document cannot be used: %s%s", len(skipped),
                           listing, more)
        if not kept:
            raise DataError("no question left to evaluate (every gold document is missing or has no adapter)",
                            path=self.config.questions, field="doc_id")
        return kept, skipped

    def _sweep_points(self) -> list[dict[str, Any]] | None:
        cfg = self.config
        if not cfg.sweep:
            return None
        n = len(self.knowledge_names)
        names = {s.name for s in self.specs}
        points: dict[int, str] = {}
        for value in cfg.sweep:
            k = n if value == "N" else min(int(value), n)
            points.setdefault(k, "N" if k == n else str(k))
        out = []
        # lag with k = 1 is arrow and with k = N is spectr (same selections, tested in test_routing):
        # reuse them
        same = {cfg.k: "lag", 1: "arrow", n: "spectr"}
        for k in sorted(points):
            name = same[k] if same.get(k) in names else f"lag-k{k}"
            if name not in names:
                self.specs.append(parse_mode(name, cfg.k))
                names.add(name)
            out.append({"k": k, "label": points[k], "mode": name})
        return out

    def _task_adapters(self) -> dict[str, str]:
        pool = self.router.pools.get("task")
        task_names = set(pool.names) if pool is not None else set()
        tasks = sorted({q.task for q in self.questions})
        mapping = self.config.task_adapters
        if mapping is None:
            return {t: t for t in tasks if t in task_names}
        if pool is None:
            raise ConfigError("--task-map given but no task library is attached (--task)", field="task_map")
        unknown = {t: a for t, a in mapping.items() if a not in task_names and a != NO_TASK_ADAPTER}
        if unknown:
            raise ConfigError(f"--task-map names adapters not in the task libraries: {unknown}; "
                              f"task adapters: {sorted(task_names)}", field="task_map")
        unmapped = [t for t in tasks if t not in mapping]
        if unmapped:
            raise ConfigError(f"task {unmapped[0]!r} of the questions is not in --task-map; map it to a task "
                              f"adapter, or to {NO_TASK_ADAPTER!r} for none", field="task_map")
        return {t: a for t, a in mapping.items() if t in tasks and a != NO_TASK_ADAPTER}

    def _build_engines(self) -> None:
        from ..pipeline import LAGPipelineConfig, build_query_engine

        cfg = self.config
        base = dict(model=None if cfg.model is None else str(cfg.model), k=cfg.k,
                    similarity_top_k=cfg.similarity_top_k, response_mode=cfg.response_mode,
                    max_new_tokens=cfg.max_new_tokens, knowledge=str(cfg.knowledge or "knowledge"),
                    task=list(cfg.task), index=None if cfg.index is None else str(cfg.index), dtype=cfg.dtype)
        if self._index_in is not None and base["index"] is None:
            base["index"] = "<given>"
        needs = {s.prompt for s in self.specs} | {"prag" for s in self.specs if s.knowledge == "retrieved"}
        if any(s.retrieves for s in self.specs):
            self.index = self._index_in
            if self.index is None:
                from ..indexing import load_index, read_index_manifest
                from ..models import load_embed_model

                embed = self._embed_in if self._embed_in is not None else load_embed_model(cfg.embed_model)
                self.index = load_index(cfg.index, embed_model=embed)
                indexed = set(read_index_manifest(cfg.index)["doc_ids"])
                docs = {d.id for d in self.documents}
                if indexed != docs:
                    logger.warning("the index holds %d documents, --docs %d (%d in common): retrieval may "
                                   "not match the documents", len(indexed), len(docs), len(indexed & docs))
        else:
            self.index = None
        self.engines: dict[str, Any] = {}
        for kind, mode in (("question", "none"), ("rag", "rag"), ("prag", "prag")):
            if kind in needs:
                pcfg = LAGPipelineConfig(mode=mode, **base)
                self.engines[kind] = build_query_engine(pcfg, llm=self.llm, index=self.index)
        self.view = self.engines["question" if "question" in self.engines else "rag"].llm

    def _fingerprint_parts(self) -> dict[str, Any]:
        from .._env import __version__

        cfg = self.config
        llm = self.llm
        tok = llm.tokenizer
        prompts = {}
        for kind, engine in self.engines.items():
            for name, prompt in engine._response_synthesizer.get_prompts().items():
                prompts[f"{kind}:{name}"] = template_text(prompt)
        tokenizer = getattr(tok, "backend_tokenizer", None)
        return {
            "model": model_digest(llm.model),
            "tokenizer": digest({"json": tokenizer.to_str() if tokenizer is not None else repr(tok),
                                  "chat_template": getattr(tok, "chat_template", None),
                                  "pad": tok.pad_token_id, "eos": tok.eos_token_id}),
            "libraries": {kind: [library_digest(lib) for lib in libs]
                          for kind, libs in sorted(self.router.libraries.items())},
            "index": index_digest(cfg.index) if self.index is not None and cfg.index is not None else None,
            "prompts": digest({"templates": prompts, "system_prompt": llm.system_prompt,
                                "chat_model": llm.is_chat_model, "context_window": llm.context_window}),
            "generation": {"max_new_tokens": cfg.max_new_tokens, "decoding": "greedy", "seed": cfg.seed,
                           "dtype": str(next(llm.model.parameters()).dtype)},
            "settings": {"k": cfg.k, "similarity_top_k": cfg.similarity_top_k,
                         "response_mode": cfg.response_mode,
                         "task_map": self.task_adapter, "harness": RESULTS_FORMAT_VERSION,
                         "package": __version__},
        }

    # ---- plan -----------------------------------------------------------------------------------------
    def _plan(self) -> list[WorkItem]:
        from llama_index.core.schema import QueryBundle

        self._nodes: dict[str, list[Any]] = {}
        self._retrieval_s: dict[str, float] = {}
        self._prompts: dict[tuple[str, str], str | None] = {}
        items: list[WorkItem] = []
        retrieval_engine = self.engines.get("rag") or self.engines.get("prag")
        for spec in self.specs:
            for order, q in enumerate(self.questions):
                item = WorkItem(spec, q, order)
                if spec.retrieves and q.id not in self._nodes:
                    start = time.perf_counter()
                    self._nodes[q.id] = retrieval_engine.retrieve(QueryBundle(q.question))
                    self._retrieval_s[q.id] = time.perf_counter() - start
                self._fill(item)
                items.append(item)
        return items

    def _fill(self, item: WorkItem) -> None:
        from ..config import LAGConfig

        spec, q = item.mode, item.question
        nodes = self._nodes.get(q.id) if spec.retrieves else None
        if nodes is not None:
            item.meta["retrieved"] = [
                {"doc_id": n.node.metadata.get("doc_id") or n.node.ref_doc_id,
                 "score": round(float(n.score or 0), 6)}
                for n in nodes]
            item.meta["retrieval_s"] = round(self._retrieval_s.get(q.id, 0.0), 4)
        routing = dict(spec.routing)
        fixed: dict[str, list[str]] = {}
        if spec.knowledge == "gold":
            fixed["knowledge"] = [self.doc_to_adapter[q.doc_id]]
            task_adapter = self.task_adapter.get(q.task) if spec.base == "oracle" else None
            if task_adapter is not None:
                fixed["task"] = [task_adapter]
        elif spec.knowledge == "retrieved":
            try:
                fixed["knowledge"] = [self.engines["prag"].prag_adapter(nodes)]
            except LibraryError as exc:  # the product fails this query: scored as a wrong answer
                item.error = str(exc)
        if fixed:
            routing["fixed"] = fixed
            item.meta["adapters"] = {kind: names[0] for kind, names in fixed.items()}
        if item.error is None:
            item.routing = LAGConfig(**routing)
            item.prompt, item.fallback = self._prompt(spec.prompt, q, nodes)
            if item.prompt is not None:
                item.n_prompt = int(self._encode(item.prompt).shape[-1])
        item.key = digest({"mode": spec.to_dict(), "question": q.question, "prompt": item.prompt,
                            "routing": item.routing.to_dict() if item.routing is not None else None,
                            "error": item.error, "fallback": item.fallback,
                            "retrieved": [r["doc_id"] for r in item.meta.get("retrieved") or []]})

    def _prompt(self, kind: str, q: Any, nodes: list[Any] | None) -> tuple[str | None, bool]:
        """The exact prompt string the pipeline sends to LAGLLM.complete, or (None, True) when the pipeline
        would make several LLM calls (refine loop / other response modes): answered by ``engine.query``."""
        key = (kind, q.id)
        if key not in self._prompts:
            engine = self.engines[kind]
            if kind == "question":
                prompt: str | None = question_prompt(engine, q.question)
            else:
                prompt = rag_prompt(engine, q.question, nodes or [])
            self._prompts[key] = prompt
        prompt = self._prompts[key]
        return prompt, prompt is None

    def _encode(self, prompt: str) -> Any:
        return self._encoded(prompt)["input_ids"][0]

    def _encoded(self, prompt: str) -> dict[str, Any]:
        if prompt not in self._enc_cache:  # LAGLLM's own tokenisation, truncation and focus tokens
            self._enc_cache[prompt] = self.view.encode(prompt, self.config.max_new_tokens,
                                                       getattr(prompt, "focus", None))
        return self._enc_cache[prompt]

    def batches(self, items: Sequence[WorkItem]) -> list[list[WorkItem]]:
        """Deterministic batches over the full plan: by mode, then routing setting (fixed adapters), then
        prompt length; errors and fallbacks alone."""
        out: list[list[WorkItem]] = []
        size = self.config.batch_size
        for spec in self.specs:
            groups: dict[str, list[WorkItem]] = {}
            for item in items:
                if item.mode.name != spec.name:
                    continue
                if item.error is not None or item.fallback:
                    out.append([item])
                    continue
                gkey = json.dumps(item.routing.to_dict(), sort_keys=True)
                groups.setdefault(gkey, []).append(item)
            for group in groups.values():
                group.sort(key=lambda it: (it.n_prompt, it.order))
                out.extend(group[i:i + size] for i in range(0, len(group), size))
        return out

    # ---- run ------------------------------------------------------------------------------------------
    def run(self, on_batch: Callable[[int, list[dict[str, Any]]], None] | None = None) -> dict[str, Any]:
        """Answer every pending (mode, question), appending to ``answers.jsonl`` per batch; return results.

        ``on_batch(n_done_batches, records)`` is called after each written batch (progress hooks, tests).
        """
        from tqdm.auto import tqdm

        self._setup()
        cfg = self.config
        # refuse a changed configuration before any retrieval / tokenisation work
        store = ResultStore(cfg.out, self.fingerprint, self.fingerprint_parts, restart=cfg.restart)
        self.prepare()
        batches = self.batches(self.items)
        pending = [b for b in batches if not all(store.done(it) for it in b)]
        n_pending = sum(1 for b in pending for it in b if not store.done(it))
        n_done = len(self.items) - n_pending
        if n_done:
            logger.info("resuming: %d of %d answers already in %s", n_done, len(self.items), store.path)
        bar = tqdm(total=len(self.items), initial=n_done, desc="lag eval", unit="answer",
                   disable=not self.progress, dynamic_ncols=True)
        written = 0
        started = time.perf_counter()
        try:
            for batch in pending:
                bar.set_postfix_str(batch[0].mode.name, refresh=False)
                records = self._answer(batch)
                new = [r for r, it in zip(records, batch) if not store.done(it)]
                store.add(new)
                written += 1
                bar.update(len(new))
                if on_batch is not None:
                    on_batch(written, new)
        finally:
            bar.close()
        results = self.collect(store)
        results["run"] = {"answered": n_pending, "resumed_from": n_done,
                          "wall_seconds": round(time.perf_counter() - started, 3)}
        return results

    def _answer(self, batch: list[WorkItem]) -> list[dict[str, Any]]:
        first = batch[0]
        if first.error is not None:
            return [self._record(first, answer="", error=first.error)]
        if first.fallback:
            return [self._answer_with_engine(first)]
        return self._generate(batch)

    def _generate(self, batch: list[WorkItem]) -> list[dict[str, Any]]:
        from ..generation import eos_ids, left_pad, routed_generate
        from ..llm import cut_at_stop

        llm, tok, model = self.view, self.view.tokenizer, self.view.model
        encoded = [self._encoded(it.prompt) for it in batch]
        encs = [e["input_ids"][0] for e in encoded]
        lens = [int(e.shape[0]) for e in encs]
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids, mask, focus = left_pad(encs, pad, [e["focus"][0] if "focus" in e else None for e in encoded])
        width = ids.shape[1]
        gen_kw = llm.generation_kwargs({"max_new_tokens": self.config.max_new_tokens, "temperature": 0.0})
        cfg = first_routing = batch[0].routing
        out = routed_generate(model, ids, mask, router=self.router, config=cfg, focus=focus,
                              trace="tokens" if cfg.mode != "none" else None, seed=self.config.seed,
                              eos=eos_ids(model, tok), **gen_kw)
        new, n_new, seconds, trace = out.new, out.lengths, out.seconds, out.trace
        timer = None if out.routing_seconds is None else [out.routing_seconds]
        split = split_trace(trace, lens, n_new, new.shape[1]) if trace is not None else None
        mean_cands = trace.mean_candidates("knowledge") if trace is not None else None
        if mean_cands is None and cfg.mode == "lag" and cfg.granularity == "token":  # static k: all kept
            mean_cands = float(min(cfg.k, len(self.knowledge_names)))
        records = []
        for i, item in enumerate(batch):
            text = cut_at_stop(tok.decode(new[i, : n_new[i]], skip_special_tokens=True), gen_kw)
            answer = text if item.mode.prompt == "question" or text else EMPTY_RESPONSE
            routing = acc = None
            if split is not None:
                prompt_counts, all_counts = split
                routing = self._summary(first_routing, {kind: c[i] for kind, c in all_counts.items()})
                routing["routing_ms"] = round(timer[0] * 1e3 / len(batch), 3) if timer is not None else None
                if item.mode.routes_knowledge and "knowledge" in prompt_counts:
                    acc = routing_accuracy(prompt_counts["knowledge"][i],
                                           self.knowledge_names.index(self.doc_to_adapter[item.question.doc_id]))
            records.append(self._record(
                item, answer=answer, raw=text, prompt_tokens=lens[i], new_tokens=n_new[i],
                seconds=seconds / len(batch), routing=routing, routing_accuracy=acc,
                mean_candidates=(None if mean_cands is None or not item.mode.routes_knowledge
                                 else round(mean_cands, 4)),
                batch={"size": len(batch), "seconds": round(seconds, 4), "width": width}))
        return records

    def _summary(self, cfg: Any, counts: Mapping[str, Any]) -> dict[str, Any]:
        libraries, selections = {}, {}
        for kind, c in sorted(counts.items()):
            total = int(c.sum())
            selections[kind] = total
            order = sorted(range(len(c)), key=lambda j: (-int(c[j]), j))
            names = self.router.names(kind)
            libraries[kind] = [{"adapter": names[j], "share": round(int(c[j]) / total, 4)}
                               for j in order[:_SUMMARY_TOP] if total and int(c[j]) > 0]
        out = {"mode": cfg.mode, "k": cfg.k, "libraries": libraries, "selections": selections}
        if cfg.granularity != "token":
            out["granularity"], out["sequence_score"] = cfg.granularity, cfg.sequence_score
        if cfg.dynamic_k is not None:
            out["dynamic_k"] = cfg.dynamic_k
        if cfg.fixed:
            out["fixed"] = {kind: list(names) for kind, names in cfg.fixed.items()}
        return out

    def _answer_with_engine(self, item: WorkItem) -> dict[str, Any]:
        """The pipeline itself, unbatched: for prompts that need several LLM calls (refine loop)."""
        import torch
        from llama_index.core.schema import QueryBundle

        from ..trace import collect_routing, merge_summaries

        engine = self.engines[item.mode.prompt if item.mode.prompt == "rag" else "question"]
        overrides = item.routing.to_dict()
        torch.manual_seed(self.config.seed)
        start = time.perf_counter()
        with collect_routing() as sink, engine.llm.routing_override(**overrides):
            response = engine._response_synthesizer.synthesize(query=QueryBundle(item.question.question),
                                                               nodes=self._nodes.get(item.question.id) or [])
        seconds = time.perf_counter() - start
        text = str(response)
        new_tokens = (sum(int(s.get("new_tokens", 0)) for s in sink) if sink
                      else len(self.view.tokenizer.encode(text, add_special_tokens=False)))
        routing = merge_summaries(sink)
        return self._record(item, answer=text, raw=text, prompt_tokens=None, new_tokens=new_tokens,
                            seconds=seconds, routing=routing, path="pipeline")

    def _record(self, item: WorkItem, *, answer: str, raw: str | None = None, error: str | None = None,
                prompt_tokens: int | None = None, new_tokens: int = 0, seconds: float = 0.0,
                routing: Any = None, routing_accuracy: Any = None, mean_candidates: float | None = None,
                batch: Any = None, path: str = "batched") -> dict[str, Any]:
        rec = {
            "mode": item.mode.name, "qid": item.question.id, "key": item.key, "answer": answer,
            "raw_answer": raw if raw is not None else answer, "error": error, "prompt_tokens": prompt_tokens,
            "new_tokens": new_tokens, "seconds": round(seconds, 5), "routing": routing,
            "routing_accuracy": routing_accuracy, "mean_candidates": mean_candidates, "path": path,
            "batch": batch, **item.meta,
        }
        return rec

    # ---- collect --------------------------------------------------------------------------------------
    def collect(self, store: ResultStore) -> dict[str, Any]:
        """The results dict (``results.json``) of the planned (mode, question) pairs, in plan order."""
        from .._env import machine
        from .report import score_answer, summarize

        answers = []
        missing = 0
        for item in self.items:
            rec = store.records.get(item.id)
            if rec is None or rec.get("key") != item.key:
                missing += 1
                continue
            rec = {k: v for k, v in rec.items() if k != "type"}
            q = item.question
            rec["scores"] = score_answer(rec["answer"], q.answers, self.tasks[q.task]["label"])
            answers.append(rec)
        results = {
            "format": RESULTS_FORMAT, "format_version": RESULTS_FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "fingerprint": self.fingerprint, "fingerprint_parts": self.fingerprint_parts,
            "settings": self.config.settings(), "machine": machine(),
            "modes": [s.to_dict() for s in self.specs], "sweep": self.sweep_points,
            "knowledge_adapters": len(self.knowledge_names), "knowledge_names": list(self.knowledge_names),
            "task_adapters": dict(self.task_adapter), "tasks": self.tasks,
            "questions": [{"id": q.id, "question": q.question, "answers": list(q.answers), "task": q.task,
                           "dataset": _dataset(q), "doc_id": q.doc_id,
                           "gold_adapter": self.doc_to_adapter[q.doc_id]}
                          for q in self.questions],
            "skipped": self.skipped, "complete": missing == 0, "answers": answers,
        }
        results["summary"] = summarize(results)
        return results


# ---- tasks ------------------------------------------------------------------------------------------------
def _dataset(q: Any) -> str:
    ds = q.metadata.get("dataset") if isinstance(q.metadata, dict) else None
    return str(ds) if ds else q.task


def _is_label(answers: Sequence[str]) -> bool:
    return len(answers) == 1 and answers[0].strip().lower() in ("true", "false", "yes", "no")


def _task_info(questions: Sequence[Any]) -> dict[str, dict[str, Any]]:
    """task -> {label: bool (scored by accuracy), n, datasets: {dataset: n}}."""
    tasks: dict[str, dict[str, Any]] = {}
    for q in questions:
        info = tasks.setdefault(q.task, {"label": True, "n": 0, "datasets": {}})
        info["n"] += 1
        info["label"] = info["label"] and (q.task == "fact" or _is_label(q.answers))
        ds = _dataset(q)
        info["datasets"][ds] = info["datasets"].get(ds, 0) + 1
    return dict(sorted(tasks.items()))


# ---- entry point -----------------------------------------------------------------------------------------
def run_eval(config: EvalConfig, *, llm: Any = None, index: Any = None, embed_model: Any = None,
             progress: bool = True, on_batch: Callable[[int, list[dict[str, Any]]], None] | None = None,
             ) -> dict[str, Any]:
    """Run (or resume) an evaluation and write ``results.json``, ``results.md`` and plots into
    ``config.out``."""
    from .._fs import atomic_write_json
    from .report import write_report

    harness = EvalHarness(config, llm=llm, index=index, embed_model=embed_model, progress=progress)
    results = harness.run(on_batch=on_batch)
    out = Path(config.out)
    atomic_write_json(out / RESULTS_FILE, results)
    write_report(results, out)
    return results


__all__ = [
    "BASE_MODES",
    "DEFAULT_MODES",
    "EvalConfig",
    "EvalHarness",
    "ModeSpec",
    "ResultStore",
    "load_results",
    "parse_mode",
    "parse_modes",
    "parse_sweep",
    "parse_task_map",
    "predict_prompt",
    "question_prompt",
    "rag_prompt",
    "routing_accuracy",
    "run_eval",
]
