"""The training driver: exact resume, resharded loads, crash-safe saves, safety, schedule."""

import math
import os

import pytest

from crnet_megatron.checkpoint import checkpointing
from crnet_megatron.checkpoint.resume import read_latest
from tests.driver_utils import driver_cfg, run_in_process, run_worker
from tests.helpers import run_distributed


def _losses(result, start=0):
    return [h["loss"] for h in result["history"] if h["iteration"] > start]


def test_resume_is_exact(tiny_dataset, tmp_path):
    """8 steps straight == 4 steps, stop, resume for 4: bitwise equal losses (CPU fp32, same
    process layout, deterministic kernels)."""
    straight = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / "a"))
    first = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / "b",
                                      "schedule.exit_interval=4"))
    assert first["iteration"] == 4 and first["stopped_by"] == "exit_interval"
    assert read_latest(str(tmp_path / "b")) == 4
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / "b"))
    assert [h["iteration"] for h in resumed["history"]] == [5, 6, 7, 8]
    assert _losses(first) == _losses(straight)[:4]
    assert _losses(resumed) == _losses(straight, 4)
    assert resumed["evals"][-1]["loss"] == straight["evals"][-1]["loss"]


@pytest.mark.parametrize("layout", [
    ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    ["parallel.pipeline_model_parallel_size=2"],
], ids=["tp2-to-tp1", "pp2-to-pp1"])
def test_checkpoint_loads_at_another_layout(tiny_dataset, tmp_path, layout):
    """Saved at TP=2 (or PP=2), loaded at TP=1 PP=1: same validation loss (rtol 1e-5: only
    the reduction order differs) and training continues from the saved iteration."""
    save = tmp_path / "ck"
    cfg = driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4", *layout)
    saved = run_distributed(run_worker, 2, cfg, timeout=400)[0]
    assert read_latest(str(save)) == 4
    loaded = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", None,
                                       "schedule.train_iters=4", f"checkpoint.load={save}"))
    assert loaded["history"] == []  # nothing left to train: pure load + evaluation
    assert loaded["evals"][-1]["loss"] == pytest.approx(saved["evals"][-1]["loss"], rel=1e-5)


DEEP = ["model.num_layers=8", "schedule.train_iters=8", "schedule.micro_batch_size=2",
        "schedule.global_batch_size=8", "eval.eval_interval=100", "eval.eval_iters=1"]
VPP = ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"]
PP4 = ["parallel.pipeline_model_parallel_size=4"]
UNEVEN_VPP = VPP + ["parallel.num_layers_in_first_pipeline_stage=2"]  # chunks of 1 and 3 layers


def test_interleaved_checkpoints_resume_at_other_pipeline_layouts(tiny_dataset, tmp_path):
    """A PP=2 x VPP=2 checkpoint (iteration 4) resumes at PP=1 and at PP=4; the PP=4 run's own
    checkpoint (iteration 6) resumes at PP=2 x VPP=2 with an uneven first stage. Every resumed
    run's losses equal the uninterrupted one-process run's (rtol 2e-5, the whole-run
    equivalence tolerance: layouts differ in reduction order)."""
    def run(world, save, load, *sets):
        extra = [f"checkpoint.load={load}"] if load else []
        cfg = driver_cfg(tiny_dataset, tmp_path / "c", save, *DEEP, *extra, *sets)
        return (run_in_process(cfg) if world == 1
                else run_distributed(run_worker, world, cfg, timeout=400)[0])

    straight = _losses(run(1, None, None))
    a, b = tmp_path / "vpp", tmp_path / "pp4"
    first = run(2, a, None, "schedule.exit_interval=4", *VPP)
    assert first["iteration"] == 4 and read_latest(str(a)) == 4
    for world, save, sets, until in ((1, None, [], 8), (4, b, PP4 + ["schedule.exit_interval=6"], 6)):
        resumed = run(world, save, a, *sets)
        assert [h["iteration"] for h in resumed["history"]] == list(range(5, until + 1))
        assert _losses(resumed) == pytest.approx(straight[4:until], rel=2e-5), sets
    assert read_latest(str(b)) == 6
    resumed = run(2, None, b, *UNEVEN_VPP)
    assert [h["iteration"] for h in resumed["history"]] == [7, 8]
    assert _losses(resumed) == pytest.approx(straight[6:], rel=2e-5)


def test_crash_during_save_keeps_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    save = tmp_path / "ck"
    real_save = checkpointing.dist_checkpointing.save
    calls = []

    def crashing_save(state, directory, *a, **k):
        calls.append(directory)
        real_save(state, directory, *a, **k)  # files are written ...
        if len(calls) == 2:
            raise OSError("injected crash after the files were written")  # ... then it dies

    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", crashing_save)
    with pytest.raises(checkpointing.CheckpointSaveError,
                       match=r"injected crash.*iteration 2\) is still the latest"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save,
                                  "checkpoint.save_interval=2"))
    assert not list(save.glob("*.tmp"))
    monkeypatch.setattr(checkpointing.dist_checkpointing, "save", real_save)
    assert read_latest(str(save)) == 2
    assert not (save / "iter_0000004").exists()
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save,
                                        "schedule.train_iters=3",
                                        "checkpoint.override_opt_param_scheduler=true"))
    assert [h["iteration"] for h in resumed["history"]] == [3]


def test_nonfinite_steps_are_skipped_then_training_stops(tiny_dataset, tmp_path, monkeypatch):
    from crnet_megatron.parallel import schedule as loop

    real = loop._forward_step
    bad_iters = {3, 6, 7}
    state = {"calls": 0}

    def poisoned(data_iterator, model, **shape):
        state["calls"] += 1
        out, loss_func = real(data_iterator, model, **shape)
        if state["calls"] in bad_iters:
            out = out * float("nan")
        return out, loss_func

    monkeypatch.setattr(loop, "_forward_step", poisoned)
    result = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", None,
                                       "eval.eval_interval=100", "eval.eval_iters=1"))
    skipped = [h["iteration"] for h in result["history"] if h["skipped"]]
    assert skipped == [3, 6, 7] and result["skipped_total"] == 3
    assert all(math.isfinite(h["loss"]) for h in result["history"] if not h["skipped"])

    state["calls"] = 0
    bad_iters.update(range(1, 100))
    with pytest.raises(RuntimeError, match=r"non-finite loss or grad norm in 2 iterations in a row"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", None,
                                  "safety.max_nonfinite_in_a_row=2", "eval.eval_interval=100"))


def test_sigterm_saves_a_final_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    import signal

    from crnet_megatron.parallel import schedule as loop

    real, state = loop._forward_step, {"calls": 0}

    def sends_sigterm(data_iterator, model, **shape):
        state["calls"] += 1
        if state["calls"] == 3:
            signal.raise_signal(signal.SIGTERM)  # what Slurm sends before the time limit
        return real(data_iterator, model, **shape)

    monkeypatch.setattr(loop, "_forward_step", sends_sigterm)
    save = tmp_path / "ck"
    result = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save))
    assert result["stopped_by"] == "signal" and result["iteration"] == 3
    assert read_latest(str(save)) == 3


def test_schedule_and_weight_decay_follow_the_config(tiny_dataset, tmp_path):
    from crnet_megatron.parallel.groups import destroy_distributed
    from crnet_megatron.training.trainer import Trainer
    from tests.helpers import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    cfg = driver_cfg(tiny_dataset, tmp_path / "c", None, "schedule.train_iters=20",
                     "schedule.lr_warmup_fraction=0.25", "optimizer.lr=1e-2",
                     "optimizer.min_lr=1e-3", "optimizer.weight_decay=0.1")
    try:
        t = Trainer(cfg)
        names = {id(p): n for n, p in t.model[0].module.named_parameters()}
        for group in t.optimizer.param_groups:
            for p in group["params"]:
                exempt = p.ndim == 1  # RMSNorm weights and betas
                assert group["weight_decay"] == (0.0 if exempt else 0.1), names[id(p)]
        assert any(n.endswith("beta") for n in names.values())
        lrs = []
        for step in range(21):
            lrs.append(t.optimizer.param_groups[0]["lr"])
            t.scheduler.step(increment=1)
        warm = 5
        for step, lr in enumerate(lrs):
            if step <= warm:
                expect = 1e-2 * step / warm
            else:
                frac = (step - warm) / (20 - warm)
                expect = 1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * frac))
            assert lr == pytest.approx(expect, rel=1e-6, abs=1e-9), step
    finally:
        destroy_distributed()


def test_blend_of_two_prefixes_trains(tiny_dataset, tmp_path):
    from crnet_megatron.data.preprocess import preprocess_jsonl

    prefix, tok, jsonl = tiny_dataset
    second = preprocess_jsonl([jsonl], str(tmp_path / "second"), tok, append_eod=True,
                              progress=False)["text"]
    result = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", None,
                                       f"data.data_path=[0.3, {prefix}, 0.7, {second}]",
                                       "schedule.train_iters=4"))
    assert len(result["history"]) == 4 and all(math.isfinite(h["loss"]) for h in result["history"])


def test_builtin_corpus_run_learns_and_writes_artifacts(tmp_path):
    """The README job's path: built-in corpus preprocessed into the cache, training, eval,
    checkpoint, metrics JSONL and loss plot."""
    from crnet_megatron.config.run_config import load_run_config

    save = tmp_path / "run"
    cfg = load_run_config("examples/configs/tiny_cpu.yaml", [
        f"checkpoint.save={save}", f"data.cache_dir={tmp_path / 'cache'}",
        "schedule.train_iters=40", "eval.eval_interval=20", "eval.eval_iters=2",
        "checkpoint.save_interval=20", "logging.progress_bar=false"])
    result = run_in_process(cfg)
    losses = [h["loss"] for h in result["history"]]
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0]
    assert [e["iteration"] for e in result["evals"]] == [20, 40]
    assert result["evals"][-1]["loss"] < result["evals"][0]["loss"]
    for name in ("metrics.jsonl", "metrics.png", "config.yaml", "iter_0000040"):
        assert (save / name).exists(), name
    assert read_latest(str(save)) == 40
