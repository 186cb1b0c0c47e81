"""Fault soak: kill a tiny training job again and again, resume it, and check nothing is lost.

    python tools/soak_faults.py --kills 20 --out runs/soak

One uninterrupted reference run, then the same run started, killed (SIGKILL or SIGTERM) and
resumed, until it has been killed ``--kills`` times, at least ``--min-training`` kills landed
in training and ``--min-save`` while a checkpoint was being written, and it has finished. About
a third of the kills wait for a checkpoint being written ("mid-save"), most others for the
attempt's first logged training step and then a random 0-3 s of training ("training"), and
about one in twelve comes 0.5-5 s after launch ("start-up"; a SIGTERM then must end the
process cleanly, exit 143); each kill is counted in the phase it landed in. ``--set`` passes
config overrides to every run (e.g. ``--set checkpoint.async_save=true``); ``--nproc 2`` runs
every attempt (and the reference) under torchrun at DP=2, and a kill then goes to the whole
process group, as a scheduler's does. At the end the per-iteration losses of the killed run
(from its ``metrics.jsonl``) must equal the reference's exactly, and no process of any attempt,
no temporary checkpoint directory and no temporary file in the data cache may be left.
Local processes only; bounded by ``--max-minutes``. Prints a Markdown table and writes ``soak.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from crnet_megatron.config.tiny import QUIET, TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_MODEL + QUIET + [
    "model.num_layers=3", "schedule.micro_batch_size=4", "schedule.global_batch_size=4",
    "eval.eval_interval=1000", "eval.eval_iters=1", "logging.log_interval=1",
    "checkpoint.save_interval=3", "checkpoint.keep_last=2"]


def _command(save: Path, cache: Path, iters: int, extra=(), nproc: int = 1):
    sets = TINY + [f"schedule.train_iters={iters}", f"checkpoint.save={save}",
                   f"data.cache_dir={cache}"] + list(extra)
    if nproc > 1:  # the same global batch over DP ranks
        sets.append(f"schedule.micro_batch_size={4 // nproc}")
    config = cache.parent / "soak.yaml"  # the values are all --set; the config names the run
    config.write_text("logging:\n  plot: false\n")
    launcher = [sys.executable, "-m", "crnet_megatron.cli.train"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "crnet_megatron.cli.train"]
    return launcher + [str(config)] + [a for s in sets for a in ("--set", s)]


def _cache_leftovers(cache: Path):
    """Temporary files or directories a writer left in the data cache (``*.tmp``)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if ".tmp" in p.name)


def _env():
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def _logged(save: Path) -> int:
    """Training rows in the run's metrics.jsonl so far."""
    try:
        return sum('"split": "train"' in line for line in open(save / "metrics.jsonl"))
    except OSError:
        return 0


def _losses(save: Path):
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    return {r["iteration"]: r["loss"] for r in rows if r.get("split") == "train"}


def _tree(pid: int):
    try:
        proc = psutil.Process(pid)
        return [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _attempt(cmd, save: Path, rng: random.Random, log, kill: bool = True, group=False):
    """Start the job and (if ``kill``) kill it at a random moment; returns (row, finished)."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=log, stderr=log,
                            start_new_session=True)
    draw = rng.random()
    mid_save, startup = draw < 0.35, draw >= 0.92
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    delay = rng.uniform(0.0, 3.0)
    startup_at = rng.uniform(0.5, 5.0)
    t0, seen, phase, trained_at = time.monotonic(), [], "training", None
    rows_at_start = _logged(save)
    stale = set(save.glob("iter_*.tmp"))  # left by an earlier kill; removed at the next save
    while proc.poll() is None:
        seen = {p.pid: p for p in seen + _tree(proc.pid)}.values()
        seen = list(seen)
        saving = bool(set(save.glob("iter_*.tmp")) - stale)
        if trained_at is None and _logged(save) > rows_at_start:
            trained_at = time.monotonic()  # this attempt's first step is logged
        if not kill:
            pass
        elif startup and time.monotonic() - t0 > startup_at:
            phase = "start-up" if trained_at is None else ("mid-save" if saving else "training")
            break
        elif (mid_save and saving and time.monotonic() - t0 > 1.0) or \
                (not mid_save and not startup and trained_at
                 and time.monotonic() - trained_at > delay):
            phase = "mid-save" if saving else "training"
            break
        if time.monotonic() - t0 > 600:
            phase = "timeout"
            break
        time.sleep(0.02)
    if proc.poll() is not None:  # finished before the kill moment
        return dict(signal="-", phase="finished", exit=proc.returncode, left=0), True
    seen = list({p.pid: p for p in seen + _tree(proc.pid)}.values())
    if group:  # torchrun and its workers, as a scheduler kills a job step
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    try:
        proc.wait(180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs([p for p in seen if p.pid != proc.pid], timeout=15)
    for p in alive:
        p.kill()
    return dict(signal=signal.Signals(sig).name, phase=phase, exit=proc.returncode,
                left=len(alive)), False


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--min-training", type=int, default=10)
    ap.add_argument("--min-save", type=int, default=5)
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=30.0)
    ap.add_argument("--out", default="runs/soak")
    ap.add_argument("--nproc", type=int, default=1, help="DP ranks per attempt (torchrun)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every run (repeatable)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cache, rng = out / "cache", random.Random(args.seed)
    log = open(out / "soak.log", "w")
    ref_dir, run_dir = out / f"reference-{os.getpid()}", out / f"killed-{os.getpid()}"
    ref = subprocess.run(_command(ref_dir, cache, args.iters, args.set, args.nproc), env=_env(),
                         cwd=ROOT, stdout=log, stderr=log)
    if ref.returncode:
        raise SystemExit(f"reference run failed (exit {ref.returncode}); see {out / 'soak.log'}")
    reference = _losses(ref_dir)
    rows, rounds, deadline = [], [], time.monotonic() + 60 * args.max_minutes

    def kills():
        return sum(r["phase"] != "finished" for r in rows)

    def enough():
        landed = [r["phase"] for r in rows]
        return (kills() >= args.kills and landed.count("training") >= args.min_training
                and landed.count("mid-save") >= args.min_save)

    while time.monotonic() < deadline and not (enough() and rows
                                               and rows[-1]["phase"] == "finished"):
        if run_dir.exists() and rows and rows[-1]["phase"] == "finished":
            shutil.rmtree(run_dir)  # a finished round; start the job again from scratch
        cmd = _command(run_dir, cache, args.iters, args.set, args.nproc)
        row, finished = _attempt(cmd, run_dir, rng, log, kill=not enough(),
                                 group=args.nproc > 1)
        rows.append(dict(attempt=len(rows) + 1, **row))
        if finished:  # every completed round must match the reference exactly
            got = _losses(run_dir)
            rounds.append(dict(attempts=len(rows), iterations=len(got),
                               mismatched=[i for i in reference if got.get(i) != reference[i]],
                               tmp_dirs=sorted(p.name for p in run_dir.glob("*.tmp"))))
        print("| {attempt} | {signal} | {phase} | {exit} | {left} |".format(**rows[-1]),
              flush=True)
    leftovers = sum(r["left"] for r in rows)
    summary = dict(kills=kills(), mid_save=sum(r["phase"] == "mid-save" for r in rows),
                   mid_training=sum(r["phase"] == "training" for r in rows),
                   start_up=sum(r["phase"] == "start-up" for r in rows),
                   sigterm_exit_codes=sorted({r["exit"] for r in rows if r["signal"] == "SIGTERM"}),
                   sigkill=sum(r["signal"] == "SIGKILL" for r in rows),
                   sigterm=sum(r["signal"] == "SIGTERM" for r in rows), rounds=len(rounds),
                   iterations_per_round=len(reference),
                   losses_equal=all(not r["mismatched"] and r["iterations"] == len(reference)
                                    for r in rounds),
                   processes_left=leftovers,
                   tmp_dirs_left=sum(len(r["tmp_dirs"]) for r in rounds),
                   cache_tmp_left=_cache_leftovers(cache), nproc=args.nproc,
                   settings=args.set, passed=False)
    summary["passed"] = (summary["losses_equal"] and not leftovers
                         and not summary["tmp_dirs_left"] and not summary["cache_tmp_left"]
                         and enough())
    print("\n| attempt | signal | phase | exit | processes left |\n|---|---|---|---|---|")
    for r in rows:
        print("| {attempt} | {signal} | {phase} | {exit} | {left} |".format(**r))
    print("\n" + "\n".join(f"- {k}: {v}" for k, v in summary.items()))
    with open(out / "soak.json", "w") as f:
        json.dump(dict(summary=summary, attempts=rows, rounds=rounds), f, indent=1)
    raise SystemExit(0 if summary["passed"] else 1)


if __name__ == "__main__":
    main()
