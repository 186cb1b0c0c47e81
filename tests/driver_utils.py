"""Config and launch helpers for the training-driver tests."""

from __future__ import annotations

from crnet_megatron.config.run_config import load_run_config
from crnet_megatron.config.tiny import QUIET, TINY_MODEL

TINY = [s for s in TINY_MODEL if not s.startswith("data.")] + QUIET + [  # default vocabulary
    "schedule.train_iters=8", "schedule.micro_batch_size=4", "schedule.global_batch_size=4",
    "eval.eval_interval=4", "eval.eval_iters=2", "logging.log_interval=2", "data.split=90,10,0",
    "optimizer.lr=3e-3", "optimizer.min_lr=3e-4"]


def driver_cfg(data, cache, save=None, *extra):
    prefix, tok, _ = data
    sets = TINY + [f"data.data_path=[{prefix}]", f"data.tokenizer={tok}",
                   f"data.cache_dir={cache}"]
    if save:
        sets.append(f"checkpoint.save={save}")
    return load_run_config(None, sets + list(extra))


def run_in_process(cfg, monkeypatch=None):
    import os

    from crnet_megatron.training.trainer import run
    from tests.helpers import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    return run(cfg)


def run_worker(rank, world, cfg):
    from crnet_megatron.training.trainer import run

    return run(cfg)
