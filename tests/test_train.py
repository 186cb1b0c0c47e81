"""The first training entry: config handling, and the tiny run really learns (held-out loss
drops below 0.9x of its initial value), at TP=1 and at TP=2 with sequence parallel."""

import pytest

from crnet_megatron.train import _lr_lambda, load_config, run
from tests.helpers import free_port, run_distributed

TINY = ["model.num_layers=3", "model.hidden_size=64", "model.ffn_hidden_size=172",
        "model.crnet_rank=16", "model.seq_length=64", "model.vocab_size=1024",
        "training.micro_batch_size=8", "training.train_iters=40", "training.eval_batches=2"]


def _cfg(tmp_path, extra=()):
    return load_config(None, TINY + [f"data.cache_dir={tmp_path}"] + list(extra))


def test_tiny_run_lowers_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    result = run(_cfg(tmp_path), show_progress=False)
    assert result["final_loss"] < 0.9 * result["initial_loss"], result
    assert result["tokens_per_s"] > 0


def _tp_worker(rank, world, cfg):
    return run(cfg, show_progress=False)


@pytest.mark.parametrize("extra", [
    ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    ["parallel.pipeline_model_parallel_size=2", "model.num_layers=4",
     "training.num_microbatches=2"],
], ids=["tp2-sp", "pp2-1f1b"])
def test_tiny_parallel_run_learns_and_ranks_agree(tmp_path, extra):
    results = run_distributed(_tp_worker, 2, _cfg(tmp_path, extra), timeout=400)
    assert results[0]["final_loss"] < 0.9 * results[0]["initial_loss"]
    assert results[0]["train_losses"] == results[1]["train_losses"]


def test_unknown_key_and_section_are_errors():
    with pytest.raises(ValueError, match=r"unknown config key model.hiden_size"):
        load_config(None, ["model.hiden_size=3"])
    with pytest.raises(ValueError, match=r"unknown config section 'modle'"):
        load_config(None, ["modle.x=3"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_warmup_cosine_schedule():
    assert _lr_lambda(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert _lr_lambda(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert _lr_lambda(55, 100, 10, 0.1) == pytest.approx(0.55)
    assert _lr_lambda(100, 100, 10, 0.1) == pytest.approx(0.1)
