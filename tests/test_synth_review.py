"""The synthetic generator's option edge cases: seeds numpy cannot take, sizes it cannot draw."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from dcnbench.cli import main
from dcnbench.data import SynthConfig, SyntheticDataset, generate_sample, write_synthetic
from dcnbench.data.synthetic import smallest_extent
from dcnbench.errors import InvalidSetting


def test_negative_seed_is_refused_before_anything_is_written(tmp_path):
    """default_rng([seed, i]) takes non-negative integers only: a negative seed (or index) is an
    error naming it, the CLI's a usage error, and no output folder is created."""
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["data", "synth", "--num", "3", "--size", "32", "--seed", "-1", "--out", str(out)])
    assert result.exit_code == 2 and "Invalid value for '--seed'" in result.output, result.output
    assert not out.exists()
    with pytest.raises(InvalidSetting, match="seed must be a non-negative integer, got -1") as err:
        write_synthetic(out, "seg", 3, SynthConfig(size=32, min_size=4, max_size=24), seed=-1)
    assert err.value.fields == ("seed",) and not out.exists()
    with pytest.raises(InvalidSetting, match="seed must be a non-negative integer, got -2"):
        SyntheticDataset(3, seed=-2)[0]
    with pytest.raises(InvalidSetting, match="index must be a non-negative integer, got -1"):
        generate_sample(-1)


def test_min_size_below_a_placeable_object_is_refused():
    """Every object keeps >= min_pixels visible pixels; an object under the extent of a disc of that
    many pixels can never be placed, so such a min_size would silently leave its sizes out."""
    assert smallest_extent(12) == pytest.approx(2 * math.sqrt(12 / math.pi))
    with pytest.raises(InvalidSetting, match=r"min_size=2 px is below 3.91 px") as err:
        SynthConfig(size=32, min_size=2, max_size=24)
    assert err.value.fields == ("min_size",)
    SynthConfig(size=32, min_size=4, max_size=24)


def test_cli_default_min_size_draws_the_whole_range_at_small_sizes(tmp_path):
    """--size 32 defaults to min-size max(32/16, 3.91) = 3.91 px, and objects from the smallest
    sixth of the log range are placed (at 2 px, the former default, none of that sixth ever was)."""
    out = tmp_path / "s32"
    result = CliRunner().invoke(main, ["data", "synth", "--num", "60", "--size", "32", "--out", str(out)])
    assert result.exit_code == 0, result.output
    cfg = json.loads((out / "synth_config.json").read_text())["config"]
    assert cfg["min_size"] == pytest.approx(smallest_extent(12)) and cfg["max_size"] == 24
    config = SynthConfig(**cfg)
    boxes = np.concatenate([generate_sample(i, config)["boxes"] for i in range(60)])
    longest = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    sixth = config.min_size * (config.max_size / config.min_size) ** (1 / 6)
    assert (longest <= sixth).sum() >= 5
