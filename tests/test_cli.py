"""The ``lag`` command line as a whole: help on every argument, one spelling of --quiet, no traceback on a
closed pipe, transformers' loading bars only with -v, --compare keeps going when one mode fails."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llama_index_lag.cli import build_parser, main
from llama_index_lag.data import TaskExample, write_task_examples
from llama_index_lag.pipeline import LAGPipelineConfig
from llama_index_lag.testing import make_tiny_model_dir


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        yield path, action
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_every_argument_has_help_and_quiet_is_spelled_one_way():
    actions = list(_walk(build_parser(), ("lag",)))
    assert len(actions) > 100
    missing = [(" ".join(p), a.option_strings or a.dest) for p, a in actions if not a.help]
    assert missing == []
    quiet = [(" ".join(p), a.option_strings) for p, a in actions if "--quiet" in a.option_strings]
    assert quiet and all(opts == ["-q", "--quiet"] for _, opts in quiet), quiet


def test_a_closed_pipe_ends_quietly(tmp_path, monkeypatch, capsys):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the reader (`head`) is gone

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self) -> int:
            return write_fd

    model = make_tiny_model_dir(tmp_path / "m")
    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert main(["model", "info", str(model)]) == 141  # as `yes | head` ends: no traceback
    assert "Traceback" not in capsys.readouterr().err
    os.close(write_fd)


def _train_task(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    model = tmp_path / "m"
    if not model.exists():
        make_tiny_model_dir(model)
        write_task_examples(tmp_path / "t.jsonl", [TaskExample(f"Q{i}?", f"A{i}") for i in range(2)])
    out = tmp_path / f"task{len(flags)}"
    cmd = [sys.executable, "-m", "llama_index_lag", *flags, "train-task", "--data", str(tmp_path / "t.jsonl"),
           "--out", str(out), "--base", str(model), "--steps", "1", "--bf16", "off"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_loading_bars_only_with_verbose(tmp_path):
    quiet = _train_task(tmp_path)
    assert quiet.returncode == 0, quiet.stderr
    assert "Loading weights" not in quiet.stderr
    verbose = _train_task(tmp_path, "-v")
    assert verbose.returncode == 0 and "Loading weights" in verbose.stderr


def test_compare_keeps_going_when_one_mode_fails(world, tmp_path, capsys):
    cfg = LAGPipelineConfig(model=world["model"], index=world["index"], knowledge=world["know"],
                            max_new_tokens=3, k=3, similarity_top_k=1)
    path = cfg.save(tmp_path / "pipeline.toml")
    question = "What was the Tessaline and what did it carry?"  # its document has no adapter: prag fails
    code = main(["ask", question, "--config", str(path), "--compare", "rag,prag,none", "--json"])
    rows = json.loads(capsys.readouterr().out)
    assert code == 1 and [r["mode"] for r in rows] == ["rag", "prag", "none"]
    assert rows[0]["answer"] is not None and rows[2]["answer"] is not None
    assert "ship-tessaline" in rows[1]["error"] and rows[1]["answer"] is None
    assert main(["ask", question, "--config", str(path), "--compare", "prag,none"]) == 1
    text = capsys.readouterr().out
    assert "[prag]\n  error:" in text and "[none]\n  answer:" in text
    with pytest.raises(SystemExit):
        main(["ask", "--help"])


def test_check_lists_documents_without_adapters(world, config, capsys, caplog):
    from llama_index_lag.pipeline import build_query_engine, check_coverage

    assert main(["check", "--index", world["index"], "--knowledge", world["know"], "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["documents_without_adapters"] == ["ship-tessaline"]  # the world's last document
    assert out["adapters_without_documents"] == [] and out["documents"] == len(world["docs"])
    index = build_query_engine(config.model_copy(update={"mode": "rag"}),
                               embed_model=world["embed"])._retriever._index
    assert check_coverage(index, world["know"]) == check_coverage(world["index"], world["know"])  # object
    with caplog.at_level("WARNING", logger="llama_index_lag.pipeline"):
        build_query_engine(config.model_copy(update={"mode": "prag"}), embed_model=world["embed"])
    assert "1 of 5 indexed documents have no knowledge adapter" in caplog.text
