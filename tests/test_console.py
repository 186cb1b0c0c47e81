"""A crnet-train log written to a file (Slurm, nohup): no progress bar, one Megatron-style line
per log_interval with the interval's mean loss, checkpoint and eval messages on lines of their
own, no megatron-core import warnings; metrics rows carry the interval's mean loss."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.driver_utils import TINY, driver_cfg, run_in_process

LINE = re.compile(r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +4 \| consumed samples: "
                  r"+(\d+) \| consumed tokens: +\d+ \| elapsed time per iteration \(ms\): [\d.]+ \| "
                  r"learning rate: [\d.E+-]+ \| lm loss: ([\d.E+-]+) \| grad norm: [\d.]+ \| ")


def test_log_file_gets_lines_not_a_bar(tiny_dataset, tmp_path):
    prefix, tok, _ = tiny_dataset
    config = tmp_path / "run.yaml"
    config.write_text("logging:\n  plot: false\n")
    sets = [s for s in TINY if not s.startswith("logging.progress_bar")] + [
        f"data.data_path=[{prefix}]", f"data.tokenizer={tok}", f"data.cache_dir={tmp_path / 'c'}",
        f"checkpoint.save={tmp_path / 'run'}", "schedule.train_iters=4",
        "checkpoint.save_interval=2", "eval.eval_interval=2"]
    log = tmp_path / "train.log"
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "crnet_megatron.cli.train", str(config)]
                              + [a for s in sets for a in ("--set", s)],
                              stdout=f, stderr=subprocess.STDOUT, timeout=300, env=env)
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text and "Transformer Engine and Apex are not installed" not in text
    lines = text.splitlines()
    assert lines[0].startswith("versions: python ")
    steps = [LINE.match(ln) for ln in lines if " iteration " in ln and "| lm loss:" in ln]
    assert [int(m.group(1)) for m in steps] == [2, 4] and [int(m.group(2)) for m in steps] == [8, 16]
    assert any(ln.startswith("saved checkpoint ") for ln in lines)
    assert any(ln.startswith("iteration 2: validation loss ") for ln in lines)


def test_metrics_rows_hold_the_interval_mean_loss(tiny_dataset, tmp_path):
    save = tmp_path / "run"
    result = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save),
                                       "schedule.train_iters=4", "logging.log_interval=2"))
    rows = [json.loads(ln) for ln in open(save / "metrics.jsonl")]
    train = [r for r in rows if r["split"] == "train"]
    losses = [h["loss"] for h in result["history"]]
    assert [r["iteration"] for r in train] == [2, 4]
    assert train[0]["loss"] == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-12)
    assert train[1]["loss"] == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-12)
