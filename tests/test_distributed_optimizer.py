"""Megatron's distributed optimizer end to end on CPU (torch Adam, no Apex/TE): it resumes
bit-exactly in both checkpoint formats, its dp_reshardable checkpoints load at another DP and are
refused at another TP with the way out, and its fully_reshardable ones load at another TP.
The checkpoints hold tensors only (the optimizer's small objects as JSON in uint8 tensors)."""

import os

import pytest

from crnet_megatron.checkpoint.resume import iteration_dir, read_latest
from crnet_megatron.checkpoint.safe_checkpoint import load_metadata
from tests.driver_utils import driver_cfg, run_worker
from tests.helpers import run_distributed

DIST = ["parallel.use_distributed_optimizer=true", "schedule.micro_batch_size=2",
        "schedule.global_batch_size=8"]
FULL = ["checkpoint.optim_fully_reshardable=true"]
TP2 = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]


def _losses(result, start=0):
    return [h["loss"] for h in result["history"]][start:]


def _train(tiny_dataset, tmp_path, save, world, *sets):
    cfg = driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / save, *DIST, *sets)
    return run_distributed(run_worker, world, cfg, timeout=400)[0]


@pytest.fixture(scope="module")
def straight(tiny_dataset, tmp_path_factory):
    return _train(tiny_dataset, tmp_path_factory.mktemp("straight"), "a", 2)


def _saved_keys(run_dir, iteration):
    path = os.path.join(iteration_dir(str(run_dir), iteration), ".metadata")
    return list(load_metadata(path).state_dict_metadata)


def test_resume_is_exact(straight, tiny_dataset, tmp_path):
    """8 steps at DP=2 == 4 steps, stop, resume for 4 (bitwise: same layout, fp32 CPU), in the
    default dp_reshardable format; the fully reshardable format resumes exactly in the async
    test and at another TP in the TP-change test."""
    first = _train(tiny_dataset, tmp_path, "b", 2, "schedule.exit_interval=4")
    assert read_latest(str(tmp_path / "b")) == 4
    keys = _saved_keys(tmp_path / "b", 4)
    assert any("dp_group_idx_0.per_bucket_numel" in k for k in keys)  # dp_reshardable
    assert not any("optimizer.state.exp_avg." in k for k in keys)
    resumed = _train(tiny_dataset, tmp_path, "b", 2)
    assert [h["iteration"] for h in resumed["history"]] == [5, 6, 7, 8]
    assert _losses(first) == _losses(straight)[:4]
    assert _losses(resumed) == _losses(straight, 4)


@pytest.mark.parametrize("saved_dp,resumed_dp", [(2, 1), (1, 2), (2, 4)],
                         ids=["dp2-to-dp1", "dp1-to-dp2", "dp2-to-dp4"])
def test_dp_reshardable_loads_at_another_dp(straight, tiny_dataset, tmp_path, saved_dp,
                                            resumed_dp):
    """Saved at one DP size, resumed at a smaller or larger one (the optimizer state
    resharded over the new DP group): the same run (rtol 2e-5: reduction order only)."""
    _train(tiny_dataset, tmp_path, "b", saved_dp, "schedule.exit_interval=4")
    resumed = _train(tiny_dataset, tmp_path, "b", resumed_dp)
    assert resumed["history"][0]["iteration"] == 5
    assert _losses(resumed) == pytest.approx(_losses(straight, 4), rel=2e-5)


def test_fully_reshardable_loads_at_another_tp(straight, tiny_dataset, tmp_path):
    """Saved at TP=1 × DP=2, resumed at TP=2 × DP=1 (+SP): the same run (rtol 2e-5)."""
    _train(tiny_dataset, tmp_path, "b", 2, *FULL, "schedule.exit_interval=4")
    resumed = _train(tiny_dataset, tmp_path, "b", 2, *TP2)
    assert _losses(resumed) == pytest.approx(_losses(straight, 4), rel=2e-5)


def test_dp_reshardable_at_another_tp_is_refused_with_the_way_out(tiny_dataset, tmp_path):
    _train(tiny_dataset, tmp_path, "b", 2, "schedule.exit_interval=4")
    with pytest.raises(RuntimeError) as err:
        _train(tiny_dataset, tmp_path, "b", 2, *TP2)
    text = str(err.value)
    assert "dp_reshardable" in text and "TP=1 PP=1" in text and "this run is TP=2 PP=1" in text
    assert "checkpoint.optim_fully_reshardable=true" in text
    assert read_latest(str(tmp_path / "b")) == 4  # nothing lost


def test_overlap_param_gather_trains_and_resumes_the_same(straight, tiny_dataset, tmp_path):
    """Parameter all-gathers overlapped with the next forward (+ overlapped grad reduction):
    the same losses as without, bitwise, through an evaluation, a save and a resume; the saved
    model weights alone (what export reads; no optimizer state) are the trained ones, so the
    parameters were gathered before the save."""
    overlap = ["parallel.overlap_param_gather=true", "parallel.overlap_grad_reduce=true"]
    first = _train(tiny_dataset, tmp_path, "b", 2, *overlap, "schedule.exit_interval=4",
                   "eval.eval_interval=100")  # the save follows a step, no evaluation between
    weights_only = run_distributed(run_worker, 2, driver_cfg(
        tiny_dataset, tmp_path / "c", None, *DIST, "schedule.train_iters=4",
        f"checkpoint.load={tmp_path / 'b'}", "checkpoint.no_load_optim=true",
        "checkpoint.override_opt_param_scheduler=true"), timeout=400)[0]
    assert weights_only["evals"][-1] == straight["evals"][0]  # iteration 4
    resumed = _train(tiny_dataset, tmp_path, "b", 2, *overlap)
    assert _losses(first) + _losses(resumed) == _losses(straight)
    assert resumed["evals"][-1]["loss"] == straight["evals"][-1]["loss"]


def test_async_save_resumes_exactly(straight, tiny_dataset, tmp_path):
    """checkpoint.async_save in the fully reshardable format: the tensors are written by a
    forked process while training goes on; the checkpoint becomes the latest only once
    complete, and resuming from it is exact."""
    fmt = FULL
    first = _train(tiny_dataset, tmp_path, "b", 2, *fmt, "checkpoint.async_save=true",
                   "checkpoint.save_interval=2", "schedule.exit_interval=4")
    assert read_latest(str(tmp_path / "b")) == 4
    keys = _saved_keys(tmp_path / "b", 4)
    assert any("optimizer.state.exp_avg." in k for k in keys)  # fully_reshardable
    assert not any("dp_group_idx_0.per_bucket_numel" in k for k in keys)
    assert sorted(p.name for p in (tmp_path / "b").glob("iter_*")) == ["iter_0000002",
                                                                      "iter_0000004"]
    resumed = _train(tiny_dataset, tmp_path, "b", 2, *fmt, "checkpoint.async_save=true")
    assert _losses(first) + _losses(resumed) == _losses(straight)


def test_torch_adam_mend_applies_on_a_gpu_without_apex_or_te():
    """The torch-Adam checkpoint mend is applied wherever torch Adam runs the distributed
    optimizer: with CUDA reported available (a GPU image without Apex/TE) it is applied, once,
    and the CPU adaptations are not."""
    import subprocess
    import sys

    code = """
import torch
torch.cuda.is_available = lambda: True
from crnet_megatron.parallel import compat
from megatron.core.optimizer import distrib_optimizer as do
before = torch.cuda.current_device
assert compat.activate() is False
first = do.DistributedOptimizer.load_state_dict
compat.activate()
assert do.DistributedOptimizer.load_state_dict is first  # applied once
print(do.DistributedOptimizer._crnet_mended, first.__name__, torch.cuda.current_device is before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.split() == ["True", "_load_state_dict", "True"], out.stderr[-2000:]
