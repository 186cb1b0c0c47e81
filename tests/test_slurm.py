"""The sbatch scripts on a real Slurm (a private cluster of two nodes on this host,
``tests/slurm_cluster.py``), run bare: the ``python`` on the submitter's PATH, as a venv, conda
or environment modules would give it. Dry runs check the launch at three shapes; a real 2-node
training equals one process; ``scancel --signal=TERM`` saves and completes; a requeued job
resumes with its log kept (opt-in: Slurm's 120 s requeue delay)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import Cluster, unavailable

REASON = unavailable()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "slurm" / "pretrain_llama2_7b.sbatch"
INTERLEAVED = ROOT / "examples" / "slurm" / "pretrain_llama2_7b_interleaved.sbatch"
TINY_CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
CPU_JOB = ["--gpus-per-node=0", "--cpus-per-task=1", "--time=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    yield c
    c.stop()


def _env(tmp_path, **extra):
    """The submitter's environment: no launcher variables, and a ``python`` on PATH that is
    this interpreter (the activated environment a user submits from)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "python").write_text(f'#!/bin/bash\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", WORKDIR=str(ROOT), CRNET_ROOT=str(ROOT), **extra)
    return env


def _output(tmp_path, job_id, name="crnet-7b"):
    path = tmp_path / f"{name}-{job_id}.out"
    return path.read_text() if path.exists() else ""


def _data_sets(tiny_dataset, cache):
    prefix, tok, _ = tiny_dataset
    return ["--set", f"data.data_path=[{prefix}]", "--set", f"data.tokenizer={tok}",
            "--set", f"data.cache_dir={cache}"]


def _tiny_sets(tiny_dataset, tmp_path, *more):
    from tests.driver_utils import TINY

    sets = [x for s in TINY + ["logging.log_interval=1", "eval.eval_interval=100",
                                 "schedule.micro_batch_size=2"]
            for x in ("--set", s)]
    return sets + _data_sets(tiny_dataset, tmp_path / "cache") + [
        x for s in more for x in ("--set", s)]


def _dry_ranks(text):
    rows = [dict(kv.split("=", 1) for kv in line.split() if "=" in kv and not kv.startswith("-"))
            for line in text.splitlines() if line.startswith("dry-run ")]
    return sorted(rows, key=lambda r: int(r["rank"]))


@pytest.mark.parametrize("script,nodes,tasks,layout,expect", [
    (SCRIPT, 1, 2, dict(TP="1"), dict(tp="1", pp="1", vpp="1", dp="2")),
    (SCRIPT, 2, 1, dict(TP="2"), dict(tp="2", pp="1", vpp="1", dp="1")),
    (INTERLEAVED, 2, 1, dict(TP="1", PP="2", VPP="2"), dict(tp="1", pp="2", vpp="2", dp="1")),
], ids=["1x2-dp2", "2x1-tp2", "interleaved-2x1-pp2-vpp2"])
def test_dry_run_launches_every_rank(cluster, tmp_path, tiny_dataset, script, nodes, tasks,
                                     layout, expect):
    env = _env(tmp_path, DRY_RUN="1", **layout)
    job = cluster.sbatch([f"--nodes={nodes}", f"--ntasks-per-node={tasks}", *CPU_JOB, str(script),
                          *_data_sets(tiny_dataset, tmp_path / "cache")], env, tmp_path)
    info = cluster.wait(job, 120)
    name = "crnet-7b-interleaved" if script == INTERLEAVED else "crnet-7b"
    out = _output(tmp_path, job, name)
    assert info["JobState"] == "COMPLETED", out
    ranks = _dry_ranks(out)
    world = nodes * tasks
    assert [int(r["rank"]) for r in ranks] == list(range(world)), out
    assert {r["world"] for r in ranks} == {str(world)}
    port = 20000 + int(job) % 20000  # derived from the job id: jobs sharing a node differ
    assert {r["master"] for r in ranks} == {f"node1:{port}"}
    for key, value in expect.items():
        assert {r[key] for r in ranks} == {value}, (key, ranks)


def test_two_nodes_train_like_one_process_and_stop_on_sigterm(cluster, tmp_path, tiny_dataset):
    """A bare 2-node x 1-task job (DP=2) trains the one-process run's losses exactly; a second
    job, sent SIGTERM mid-training by ``scancel``, saves a checkpoint and ends COMPLETED."""
    from crnet_megatron.config.run_config import load_run_config
    from tests.driver_utils import run_in_process

    save = tmp_path / "run"
    sets = _tiny_sets(tiny_dataset, tmp_path, f"checkpoint.save={save}")
    job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", *CPU_JOB, str(SCRIPT), *sets],
                         _env(tmp_path, TP="1", CONFIG=str(TINY_CONFIG)), tmp_path)
    # the long job queues behind the first (both want both nodes) and is signalled once running
    long_save = tmp_path / "long"
    long_sets = _tiny_sets(tiny_dataset, tmp_path, f"checkpoint.save={long_save}",
                           "schedule.train_iters=100000")
    long_job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", *CPU_JOB, str(SCRIPT),
                               *long_sets], _env(tmp_path, TP="1", CONFIG=str(TINY_CONFIG)),
                              tmp_path)
    info = cluster.wait(job, 240)
    out = _output(tmp_path, job)
    assert info["JobState"] == "COMPLETED", out
    assert "common state dict differs" not in out  # one run id, from rank 0
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    slurm = [r["loss"] for r in rows if r["split"] == "train"]
    ref_cfg = load_run_config(str(TINY_CONFIG), [s for s in sets if s != "--set"
                                                 and not s.startswith("checkpoint.save")]
                              + ["checkpoint.save=null"])
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each task runs (OMP_NUM_THREADS from --cpus-per-task=1), so
    try:                      # both sides sum in the same order and compare exactly
        ref = [h["loss"] for h in run_in_process(ref_cfg)["history"]]
    finally:
        torch.set_num_threads(threads)
    print(f"slurm job {job}: {info['JobState']} on {info.get('NodeList')}; losses {slurm}; "
          f"one process {ref}")
    assert len(slurm) == ref_cfg["schedule"]["train_iters"] and slurm == ref

    _signal_mid_training(cluster, tmp_path, long_job, long_save)


def _signal_mid_training(cluster, tmp_path, job, save):
    deadline = time.time() + 240
    while time.time() < deadline and _output(tmp_path, job).count(" iteration ") < 3:
        time.sleep(1)
    assert _output(tmp_path, job).count(" iteration ") >= 3, _output(tmp_path, job)[-3000:]
    cluster.scancel(job, "--signal=TERM")
    info = cluster.wait(job, 120)
    out = _output(tmp_path, job)
    print(f"slurm job {job}: scancel --signal=TERM -> {info['JobState']} "
          f"ExitCode={info.get('ExitCode')}")
    assert info["JobState"] == "COMPLETED", out[-3000:]
    assert "stopped by signal at iteration" in out
    latest = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert latest >= 3 and f"iteration {latest}" in out


@pytest.mark.skipif(not os.environ.get("CRNET_SLURM_REQUEUE"),
                    reason="waits out Slurm's 120 s requeue delay: CRNET_SLURM_REQUEUE=1 runs it")
def test_requeue_resumes_and_keeps_the_log(cluster, tmp_path, tiny_dataset):
    save = tmp_path / "run"
    sets = _tiny_sets(tiny_dataset, tmp_path, f"checkpoint.save={save}",
                      "checkpoint.save_interval=2", "schedule.train_iters=100000")
    job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=1", *CPU_JOB, str(SCRIPT), *sets],
                         _env(tmp_path, TP="1", CONFIG=str(TINY_CONFIG)), tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and not (save / "latest_checkpointed_iteration.txt").exists():
        time.sleep(1)
    first = int((save / "latest_checkpointed_iteration.txt").read_text())
    subprocess.run(["scontrol", "requeue", job], env={**os.environ, **cluster.env}, check=True)
    deadline = time.time() + 400
    while time.time() < deadline and "resumed from" not in _output(tmp_path, job):
        time.sleep(2)
    out = _output(tmp_path, job)
    cluster.scancel(job)
    print("\n".join(line for line in out.splitlines() if any(
        word in line for word in ("iteration ", "saved checkpoint", "REQUEUE", "resumed from",
                                  "stopped by"))))
    # both attempts' lines in one log: the first's checkpoint, the requeue, the resume
    assert f"saved checkpoint {save}/iter_{first:07d}" in out
    assert "DUE TO JOB REQUEUE" in out and f"resumed from {save}/iter_" in out
