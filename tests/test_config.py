"""Pipeline configuration files (JSON, YAML, TOML) and bad settings."""

from __future__ import annotations

import pytest

from llama_index_lag.errors import ConfigError
from llama_index_lag.pipeline import LAGPipelineConfig, build_query_engine


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".toml"])
def test_config_round_trip_and_relative_paths(tmp_path, suffix):
    cfg = LAGPipelineConfig(mode="prag+lag", k=5, task=["/abs/t1"], knowledge="/abs/know", max_new_tokens=9)
    path = cfg.save(tmp_path / f"pipeline{suffix}")
    assert LAGPipelineConfig.load(path) == cfg
    (tmp_path / f"rel{suffix}").write_text({".json": '{"index": "idx", "mode": "rag"}',
                                            ".yaml": "index: idx\nmode: rag\n",
                                            ".toml": 'index = "idx"\nmode = "rag"\n'}[suffix])
    rel = LAGPipelineConfig.load(tmp_path / f"rel{suffix}", k=7)
    assert rel.index == str((tmp_path / "idx").resolve()) and rel.k == 7


def test_bad_configs(world, config):
    with pytest.raises(ConfigError, match="unknown mode 'best'"):
        LAGPipelineConfig(mode="best")
    with pytest.raises(ConfigError, match="k"):
        LAGPipelineConfig(k=0)
    with pytest.raises(ConfigError, match="needs|set index"):
        build_query_engine(LAGPipelineConfig(mode="rag", model=world["model"]))
    with pytest.raises(ConfigError, match="set knowledge"):
        build_query_engine(LAGPipelineConfig(mode="lag", model=world["model"]))
    with pytest.raises(ConfigError, match="granularity"):
        LAGPipelineConfig(routing={"granularity": "paragraph"})
