"""Routing traces and timers: selection counts, shares, per-layer views, nesting."""

from __future__ import annotations

import pytest
import torch

from llama_index_lag import LAGConfig, attach_lag

IDS = torch.tensor([[5, 17, 42, 99, 7, 250, 31, 64, 11, 300, 2, 77]])


def test_trace_counts_and_shares(tiny_model, two_libs):
    router = attach_lag(tiny_model, list(two_libs), LAGConfig(mode="lag", k=3))
    with torch.no_grad(), router.trace() as t:
        tiny_model(IDS)
    summary = t.summary(top=None, per_layer=True)
    assert summary["knowledge"]["selections"] == IDS.shape[1] * 2 * 3
    assert summary["task"]["selections"] == IDS.shape[1] * 2 * 3
    assert sum(a["share"] for a in summary["knowledge"]["adapters"]) == pytest.approx(1.0, abs=1e-3)
    assert set(summary["knowledge"]["per_layer"]) == {0, 1}
    shares = [a["share"] for a in summary["knowledge"]["adapters"]]
    assert shares == sorted(shares, reverse=True)
    module = "model.layers.1.mlp.up_proj"
    assert t.tokens("knowledge", module).shape == (IDS.shape[1],)


def test_nested_traces_and_timers_all_record(tiny_model, two_libs):
    router = attach_lag(tiny_model, list(two_libs), LAGConfig(mode="lag", k=3))
    with torch.no_grad(), router.trace() as outer, router.timing() as t_outer:
        tiny_model(IDS)
        with router.trace() as inner, router.timing() as t_inner, router.using(mode="spectr"):
            tiny_model(IDS)
    assert inner.summary()["knowledge"]["selections"] == IDS.shape[1] * 6
    assert outer.summary()["knowledge"]["selections"] == 2 * IDS.shape[1] * 6
    assert t_outer[0] > t_inner[0] > 0
