"""One table of modes (llama_index_lag.modes): every layer's names come from it, and the one grammar of
evaluated mode names spells the pipeline's default LAG routing."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args, get_type_hints

import pytest

from llama_index_lag import config, demo, modes, pipeline, pipeline_config
from llama_index_lag.errors import ConfigError
from llama_index_lag.eval import harness


def test_every_layer_uses_the_one_table():
    assert config.MODES is modes.ROUTING_MODES and get_args(config.Mode) == modes.ROUTING_MODES
    hints = get_type_hints(config.LAGConfig)
    assert (get_args(hints["calibration"]) == config.CALIBRATIONS
            == ("none", "request", *modes.SCORE_CALIBRATIONS))
    assert pipeline.MODES is modes.PIPELINE_MODES and get_args(pipeline_config.Mode) == modes.PIPELINE_MODES
    assert (pipeline.RETRIEVAL_MODES is modes.RETRIEVAL_MODES
            and set(modes.RETRIEVAL_MODES) < set(modes.PIPELINE_MODES))
    assert get_args(pipeline_config.LAGMethod) == modes.LAG_METHODS == tuple(config.PRESETS)
    assert demo.MODES is modes.DEMO_MODES and set(modes.DEMO_MODES) <= set(modes.PIPELINE_MODES)
    assert harness.BASE_MODES is modes.BASE_MODES and harness.ModeSpec is modes.ModeSpec
    assert {spec[2] for spec in modes.EVAL_BASES.values()} <= set(modes.ROUTING_MODES)
    assert set(modes.PIPELINE_MODES) <= set(modes.BASE_MODES)  # every pipeline mode can be evaluated


def test_the_pipelines_default_is_spelled_in_the_grammar():
    two_level = config.LAGConfig.preset(config.DEFAULT_PRESET)
    spec = harness.parse_mode("lag-req-sl2-w0.25")
    assert config.LAGConfig(**spec.routing) == two_level
    assert pipeline_config.LAGPipelineConfig(mode="lag", knowledge="x").lag_config() == two_level


def test_one_spelling_and_checked_values():
    assert modes.parse_mode("seq-lag", 5).name == "lag-seq-mass"
    assert modes.parse_mode("seq-spectr").routing == harness.parse_mode("spectr-seq-mass").routing
    assert modes.split_modes("lag, rag,lag") == ["lag", "rag"]
    assert modes.parse_mode("lag-dyn1.5").routing["dynamic_k"] == 1.5  # grammar only ...
    with pytest.raises(ConfigError, match="dynamic_k"):  # ... the values are LAGConfig's
        harness.parse_mode("lag-dyn1.5")
    with pytest.raises(ConfigError, match="unknown mode 'fast'"):
        modes.parse_mode("fast")


def test_the_cli_lists_the_table_without_importing_torch():
    code = ("import sys; from llama_index_lag.cli import build_parser; build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_routing_settings_round_trip_and_read_the_earlier_format():
    cfg = config.LAGConfig.preset("two-level", k=7)
    assert config.LAGConfig.from_dict(cfg.to_dict()) == cfg and "extra" not in cfg.to_dict()
    old = {"mode": "lag", "extra": {}}  # a dict written by 0.1
    assert config.LAGConfig.from_dict(old) == config.LAGConfig(mode="lag")
    with pytest.raises(ConfigError, match="extra"):
        config.LAGConfig.from_dict({"mode": "lag", "extra": {"x": 1}})


def test_calibration_suffixes():
    spec = harness.parse_mode("lag-calzscore-refreq-k5")
    assert spec.routing == {"mode": "lag", "k": 5, "calibration": "zscore",
                            "calibration_reference": "request"}
    assert harness.parse_mode("spectr-calsubspace-m2").routing["subspace_dims"] == 2
    assert harness.parse_mode("lag-calisoftmax-b10").routing["calibration_beta"] == 10.0
    with pytest.raises(ConfigError, match="repeats"):
        modes.parse_mode("lag-req-calcsls")
    with pytest.raises(ConfigError, match="calibration_reference"):
        harness.parse_mode("lag-calsinkhorn-refreq")
