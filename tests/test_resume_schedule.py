"""Resuming with another schedule is explicit, as Megatron's --override-opt_param-scheduler: a
changed schedule is refused with one line naming the keys and the override; with the override
the config's schedule applies from the resumed iteration, and config.yaml says so."""

import json

import pytest

from tests.driver_utils import driver_cfg, run_in_process

BASE = ["schedule.train_iters=4", "logging.log_interval=1", "eval.eval_interval=100",
        "eval.eval_iters=1", "schedule.lr_warmup_fraction=0.25"]


def _lrs(path):
    return {r["iteration"]: r["lr"] for r in map(json.loads, open(path)) if r["split"] == "train"}


def test_changed_schedule_is_refused_then_applied_with_the_override(tiny_dataset, tmp_path):
    save = tmp_path / "run"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save), *BASE))
    with pytest.raises(ValueError, match=r"another schedule \(schedule.train_iters: checkpoint 4 "
                                         r"vs config 6, optimizer.lr: checkpoint 0.003 vs config "
                                         r"0.002\).*checkpoint.override_opt_param_scheduler: true"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save), *BASE,
                                  "schedule.train_iters=6", "optimizer.lr=2e-3"))
    assert "history: iteration 4" not in (save / "config.yaml").read_text()  # nothing written

    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save), *BASE,
                                        "schedule.train_iters=6", "optimizer.lr=2e-3",
                                        "checkpoint.override_opt_param_scheduler=true"))
    assert [h["iteration"] for h in resumed["history"]] == [5, 6]
    straight = tmp_path / "straight"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(straight), *BASE,
                              "schedule.train_iters=6", "optimizer.lr=2e-3"))
    got, want = _lrs(save / "metrics.jsonl"), _lrs(straight / "metrics.jsonl")
    assert got[5] == pytest.approx(want[5], rel=1e-12) and got[6] == pytest.approx(want[6])
    assert got[5] != pytest.approx(_lrs(save / "metrics.jsonl")[4])  # not the old decay's end
    history = [ln for ln in (save / "config.yaml").read_text().splitlines()
               if ln.startswith("# history:")]
    assert history == ["# history: iteration 0: started",
                       "# history: iteration 4: resumed; schedule applied: schedule.train_iters "
                       "4 -> 6; optimizer.lr 0.003 -> 0.002"]


def test_unchanged_schedule_resumes_without_the_override(tiny_dataset, tmp_path):
    save = tmp_path / "run"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save), *BASE,
                              "schedule.exit_interval=2"))
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save), *BASE))
    assert [h["iteration"] for h in resumed["history"]] == [3, 4]
