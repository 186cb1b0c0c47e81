"""What we ship is what we test: the LLaMA-2 7B recipe (``examples/configs/
llama2_7b_seq4096.yaml``) read as shipped, with only its size scaled down (shape, sequence, data,
batch, steps) and Algorithm 1's interval small enough that chains are inverted, so that its whole
switch set (TP=2 + SP, the distributed optimizer, overlap_grad_reduce and overlap_param_gather,
CR-Net recompute, bf16) runs together; and the interleaved sbatch's PP=4 x VPP=2 layout with
several groups of micro-batches.

Tolerance: as the whole-run equivalence tests (rtol 2e-5 on loss and grad norm in fp32; layouts
differ only in reduction order); bf16 resumes compare bitwise (same layout)."""

import pathlib

from crnet_megatron.config.run_config import load_run_config
from crnet_megatron.config.tiny import TINY_MODEL
from tests.driver_utils import run_in_process, run_worker
from tests.helpers import run_distributed

RECIPE = pathlib.Path(__file__).parents[1] / "examples" / "configs" / "llama2_7b_seq4096.yaml"
ITERS = 8
RTOL = 2e-5
# the size only: every parallel, optimizer and recompute switch stays as shipped
SCALED = [s for s in TINY_MODEL if not s.startswith("data.")] + [
    "model.num_attention_heads=4", "schedule.micro_batch_size=2", "schedule.global_batch_size=8",
    f"schedule.train_iters={ITERS}", "schedule.lr_warmup_fraction=0.25", "optimizer.lr=3e-3",
    "optimizer.min_lr=3e-4", "data.split=90,10,0", "data.eod_token=null",
    "eval.eval_interval=100", "eval.eval_iters=1", "logging.log_interval=100",
    "logging.tensorboard_dir=null", "logging.progress_bar=false", "logging.plot=false",
    "checkpoint.save=null", "checkpoint.save_interval=null", "recompute.crnet_checkpoint_every=2"]
FP32 = ["optimizer.bf16=false"]
ONE_PROCESS = ["parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false",
               "parallel.use_distributed_optimizer=false", "parallel.overlap_grad_reduce=false",
               "parallel.overlap_param_gather=false"]
# 8 layers in 8 chunks of one layer: rank r holds global layers r+1 and r+5, each with its own
# rank of the middle-high schedule (ranks keep their global positions)
INTERLEAVED = ["model.num_layers=8", "model.crnet_rank_schedule=middle-high",
               "parallel.tensor_model_parallel_size=1",
               "parallel.sequence_parallel=false", "parallel.pipeline_model_parallel_size=4",
               "parallel.virtual_pipeline_model_parallel_size=2",
               "schedule.global_batch_size=16"]  # 8 micro-batches: two groups of PP=4


def _recipe(tiny_dataset, tmp_path, *sets):
    prefix, tok, _ = tiny_dataset
    data = [f"data.data_path=[{prefix}]", f"data.tokenizer={tok}",
            f"data.cache_dir={tmp_path / 'cache'}"]
    return load_run_config(str(RECIPE), SCALED + data + list(sets))


def _worst(got, ref):
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
    return (max(rel(g["loss"], r["loss"]) for g, r in zip(got, ref)),
            max(rel(g["grad_norm"], r["grad_norm"]) for g, r in zip(got, ref)))


def _check_equal_to_one_process(tiny_dataset, tmp_path, world, sets):
    cfg = _recipe(tiny_dataset, tmp_path, *FP32, *sets)
    ref = run_in_process(_recipe(tiny_dataset, tmp_path, *FP32, *sets, *ONE_PROCESS,
                                 "parallel.pipeline_model_parallel_size=1",
                                 "parallel.virtual_pipeline_model_parallel_size=null"))["history"]
    results = run_distributed(run_worker, world, cfg, timeout=500)
    got = results[0]["history"]
    assert [h["iteration"] for h in got] == list(range(1, ITERS + 1))
    assert all([h["loss"] for h in r["history"]] == [h["loss"] for h in got] for r in results)
    worst_loss, worst_norm = _worst(got, ref)
    print(f"equivalence recipe {' '.join(sets) or 'tp2-sp-dp2'}: loss {worst_loss:.1e}, "
          f"grad norm {worst_norm:.1e}")
    assert worst_loss < RTOL and worst_norm < RTOL, (worst_loss, worst_norm)
    assert got[-1]["loss"] < got[0]["loss"] - 0.05  # it trained
    return worst_loss, worst_norm


def test_the_7b_recipe_reads_as_its_switch_set(tiny_dataset, tmp_path):
    """The scaled recipe keeps what the test claims to run: the switches come from the file."""
    p, o, r = (_recipe(tiny_dataset, tmp_path)[k] for k in ("parallel", "optimizer", "recompute"))
    assert (p["tensor_model_parallel_size"], p["sequence_parallel"]) == (2, True)
    assert p["use_distributed_optimizer"] and p["overlap_grad_reduce"] and \
        p["overlap_param_gather"]
    assert o["bf16"] and r["recompute_granularity"] == "crnet"


def test_the_7b_recipe_at_tp2_sp_dp2_trains_like_one_process(tiny_dataset, tmp_path):
    """4 processes, TP=2 + SP x DP=2 with the distributed optimizer, both overlaps and
    Algorithm 1 (chains inverted every other layer), in fp32: one process's run."""
    _check_equal_to_one_process(tiny_dataset, tmp_path, 4, [])


def test_the_interleaved_recipe_pp4_vpp2_with_two_microbatch_groups(tiny_dataset, tmp_path):
    """The interleaved sbatch's PP=4 x VPP=2 (8 layers, a chunk of one layer each) with 8
    micro-batches, so every rank leaves warm-up and runs the steady state: one process's run."""
    _check_equal_to_one_process(tiny_dataset, tmp_path, 4, INTERLEAVED)


def test_the_7b_recipe_in_bf16_resumes_bitwise(tiny_dataset, tmp_path):
    """As shipped (bf16) at TP=2 + SP x DP=2: 4 steps, stop, resume for 4 == 8 uninterrupted,
    bitwise, evaluation included; the checkpoint holds the distributed optimizer's state."""
    save = [f"checkpoint.save={tmp_path / 'run'}", "eval.eval_interval=4"]
    straight = run_distributed(run_worker, 4, _recipe(tiny_dataset, tmp_path / "a", *save[1:]),
                               timeout=500)[0]
    first = run_distributed(run_worker, 4, _recipe(tiny_dataset, tmp_path, *save,
                                                   "schedule.exit_interval=4"), timeout=500)[0]
    resumed = run_distributed(run_worker, 4, _recipe(tiny_dataset, tmp_path, *save),
                              timeout=500)[0]
    losses = lambda r: [(h["loss"], h["grad_norm"]) for h in r["history"]]  # noqa: E731
    assert [h["iteration"] for h in resumed["history"]] == [5, 6, 7, 8]
    assert losses(first) + losses(resumed) == losses(straight)
    assert resumed["evals"][-1]["loss"] == straight["evals"][-1]["loss"]
    assert len({loss for loss, _ in losses(straight)}) == ITERS  # bf16 steps, all distinct
