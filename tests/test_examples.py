"""Every example config parses, builds a valid CRNetConfig, and has the parameter count its
comment states (the paper's shapes)."""

import glob
import re

import pytest

from crnet_megatron.analysis.counting import ModelShape, count_params
from crnet_megatron.config.megatron_configs import to_crnet_config
from crnet_megatron.config.run_config import load_run_config

CONFIGS = sorted(glob.glob("examples/configs/*.yaml"))


@pytest.mark.parametrize("path", CONFIGS)
def test_example_config_is_valid(path):
    cfg = load_run_config(path)
    config = to_crnet_config(cfg)
    stated = re.search(r"([\d.]+)M parameters", open(path).read())
    if stated:
        shape = ModelShape.from_config(config, 32000)
        total = count_params(shape, config.crnet_layer_ranks)["total"]
        assert round(total / 1e6, 1) == float(stated.group(1))


def test_sbatch_scripts_name_existing_configs():
    for script in glob.glob("examples/slurm/*.sbatch") + glob.glob("examples/torchrun/*.sh"):
        for cfg in re.findall(r"examples/configs/[\w.]+\.yaml", open(script).read()):
            assert cfg in CONFIGS, (script, cfg)
