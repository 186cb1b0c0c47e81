"""Resume never trains the wrong model, a broken newest checkpoint is recovered from, a full disk
keeps the previous checkpoint, and a killed run leaves no processes or duplicate metrics."""

import errno
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from crnet_megatron.checkpoint import checkpointing
from crnet_megatron.checkpoint.resume import find_resumable, read_latest
from crnet_megatron.parallel.compat import megatron_at_least
from tests.driver_utils import driver_cfg, run_in_process

# megatron-core 0.17+ writes a save's shards from threads and writes no common.pt: a writer's
# OSError reaches the trainer as its class name only, and there are no writer processes.
FORKED_WRITER = pytest.mark.skipif(
    megatron_at_least("0.17"), reason="megatron-core 0.17+ writes from threads, reports a "
    "writer's OSError by class only and writes no common.pt (a real full disk is still named "
    "through the filesystem's free space)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _iters(result):
    return [h["iteration"] for h in result["history"]]


def test_checkpoint_of_another_tokenizer_is_refused(tiny_dataset, tmp_path):
    from crnet_megatron.data.corpus import builtin_corpus, train_tokenizer

    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    other = tmp_path / "other.json"
    train_tokenizer(builtin_corpus(max_chars=60_000), 512).save(str(other))  # same size
    listing = sorted(os.listdir(save))
    with pytest.raises(ValueError, match=r"trained with another tokenizer \(checkpoint: "
                                         r"vocabulary 512, .*data.tokenizer: vocabulary 512"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                                  f"data.tokenizer={other}"))
    assert sorted(os.listdir(save)) == listing


@pytest.mark.parametrize("damage", ["truncated-shard", "missing-dir", "garbage-common"])
def test_unreadable_newest_checkpoint_falls_back(tiny_dataset, tmp_path, capfd, damage):
    save = tmp_path / "ck"
    straight = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / "s",
                                         "schedule.train_iters=6"))
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=6",
                              "schedule.exit_interval=4", "checkpoint.save_interval=2",
                              "checkpoint.keep_last=3"))
    (save / "iter_0000006.tmp").mkdir()  # a save cut short by a kill
    (save / "iter_0000006.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert find_resumable(str(save))["iteration"] == 4
    assert not (save / "iter_0000006.tmp").exists()  # cleared at start-up, nothing else touched
    newest = save / "iter_0000004"
    if damage == "truncated-shard":
        shard = sorted(newest.glob("*.distcp"))[0]
        os.truncate(shard, shard.stat().st_size // 2)
    elif damage == "missing-dir":
        for f in newest.iterdir():
            f.unlink()
        newest.rmdir()
    else:
        (newest / "common.pt").write_bytes(b"not a torch file")
        (save / "iter_0000004.broken").mkdir()  # an earlier move-aside of iteration 4
        (save / "iter_0000004.broken" / "kept.txt").write_text("earlier")
    capfd.readouterr()
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save,
                                        "schedule.train_iters=6"))
    err = capfd.readouterr().err
    assert "WARNING" in err
    assert _iters(resumed) == [3, 4, 5, 6]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"][2:]]
    assert (save / "iter_0000004.broken").exists() == (damage != "missing-dir")
    if damage == "garbage-common":  # never deleted: the new one takes the next suffix
        assert (save / "iter_0000004.broken" / "kept.txt").read_text() == "earlier"
        assert (save / "iter_0000004.broken.2" / "common.pt").exists()
        assert "moved aside (iter_0000004.broken.2; nothing is deleted)" in err
    assert read_latest(str(save)) == 6


@FORKED_WRITER
def test_full_disk_keeps_the_previous_checkpoint(tiny_dataset, tmp_path, monkeypatch):
    """ENOSPC inside megatron-core's forked writer surfaces as one message with the path."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    save, real = tmp_path / "ck", filesystem_async._write_item

    @functools.wraps(real)  # megatron-core inspects its signature
    def disk_fills(*args, **kwargs):  # the second save's file stream hits a full disk
        if any("iter_0000004" in str(getattr(a, "name", "")) for a in args):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", disk_fills)
    with pytest.raises(checkpointing.CheckpointSaveError,
                       match=r"iter_0000004: no space left on device; the previous checkpoint "
                             r"\(iteration 2\) is still the latest"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                                  "checkpoint.save_interval=2"))
    assert read_latest(str(save)) == 2
    assert sorted(p.name for p in save.glob("iter_*")) == ["iter_0000002"]


def _second_save_on_a_full_filesystem(tiny_dataset, tmp_path, monkeypatch):
    """Train 4 steps saving every 2 with (patched) no space left: the second save is refused
    with the reason named and the first stays the latest."""
    monkeypatch.setattr(checkpointing, "_free_bytes", lambda path: 4096)
    save = tmp_path / "ck"
    with pytest.raises(checkpointing.CheckpointSaveError,
                       match=r"iter_0000004: no space left on device; the previous checkpoint "):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                                  "checkpoint.save_interval=2"))
    assert read_latest(str(save)) == 2


@FORKED_WRITER
def test_full_disk_at_the_first_small_write_is_named(tiny_dataset, tmp_path, monkeypatch):
    """torch.save on a full disk fails inside its zip writer ("unexpected pos"), not with
    ENOSPC: on a filesystem with no space left that is named as such."""
    from megatron.core.dist_checkpointing.strategies import common

    def full(obj, path, *args, **kwargs):
        if "iter_0000004" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                               "64 vs 0")
        return real(obj, path, *args, **kwargs)

    real = common.torch.save
    monkeypatch.setattr(common.torch, "save", full)
    _second_save_on_a_full_filesystem(tiny_dataset, tmp_path, monkeypatch)


@FORKED_WRITER  # on 0.19's writer threads it passes, then the process crashes in a later GC
def test_a_shard_write_on_a_full_filesystem_is_named(tiny_dataset, tmp_path, monkeypatch):
    """ENOSPC while a shard is written, on a filesystem with no space left: named as such on
    every megatron-core (0.17+ threads pass on only the error's class)."""
    from crnet_megatron.checkpoint import integrity

    def full(self, data):
        if "iter_0000004" in self.path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    real = integrity.HashingWriter.write
    monkeypatch.setattr(integrity.HashingWriter, "write", full)
    _second_save_on_a_full_filesystem(tiny_dataset, tmp_path, monkeypatch)


def test_resume_drops_metrics_rows_past_the_checkpoint(tiny_dataset, tmp_path):
    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                              "checkpoint.save_interval=2", "logging.log_interval=1"))
    # as if the run had crashed after logging iterations 3-4 but before saving them
    for f in (save / "iter_0000004").iterdir():
        f.unlink()
    (save / "iter_0000004").rmdir()
    (save / "latest_checkpointed_iteration.txt").write_text("2")
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                              "logging.log_interval=1"))
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    keys = [(r["split"], r["iteration"]) for r in rows]
    assert len(keys) == len(set(keys))
    assert [i for s, i in keys if s == "train"] == [1, 2, 3, 4]


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {root!r})
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync
    real = FileSystemWriterAsync.write_preloaded_data

    def slow(*args, **kwargs):  # runs in the forked writer: the save is in progress for a minute
        time.sleep(60)
        return real(*args, **kwargs)

    if __name__ == "__main__":  # megatron-core may spawn helpers that import this file
        FileSystemWriterAsync.write_preloaded_data = staticmethod(slow)
        from crnet_megatron.cli.train import main
        main([{config!r}] + {sets!r})
""")


@FORKED_WRITER
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_during_save_leaves_no_processes(tiny_dataset, tmp_path, mode):
    """SIGKILL while a save is being written (async: by a forked process while training goes
    on): no process is left behind and nothing half-written becomes the latest."""
    save = tmp_path / "ck"
    prefix, tok, _ = tiny_dataset
    sets = ["--set", f"checkpoint.async_save={str(mode == 'async').lower()}"]
    for item in ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=172",
                 "model.crnet_rank=16", "model.seq_length=32", "schedule.train_iters=4",
                 "schedule.micro_batch_size=2", "schedule.global_batch_size=2",
                 "checkpoint.save_interval=2", f"checkpoint.save={save}",
                 f"data.data_path=[{prefix}]", f"data.tokenizer={tok}", "data.split=90,10,0",
                 f"data.cache_dir={tmp_path / 'c'}", "logging.progress_bar=false",
                 "logging.plot=false"]:
        sets += ["--set", item]
    script = tmp_path / "run.py"
    config = tmp_path / "run.yaml"
    config.write_text("logging:\n  plot: false\n")
    script.write_text(_KILL_SCRIPT.format(root=ROOT, config=str(config), sets=sets))
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline, writers = time.monotonic() + 120, []
        parent = psutil.Process(proc.pid)
        while time.monotonic() < deadline and proc.poll() is None and not writers:
            time.sleep(0.1)
            # megatron-core's writer workers are forks of the trainer (same command line)
            writers = [c for c in parent.children(recursive=True)
                       if c.cmdline() == parent.cmdline()]
        assert writers and list(save.glob("iter_*.tmp")), "the save never started"
        children = parent.children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {[(p.pid, p.name()) for p in alive]}"
        assert read_latest(str(save)) is None  # nothing half-written became the latest
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_single_process_runs_pick_a_free_port(tiny_dataset, tmp_path, monkeypatch):
    """Another job holds the default port 29500: a single-process run still starts."""
    from crnet_megatron.training.trainer import run

    blocker = socket.socket()
    try:
        blocker.bind(("127.0.0.1", 29500))
        blocker.listen(1)
    except OSError:
        pytest.skip("port 29500 is in use on this machine already")
    try:
        for key in ("MASTER_PORT", "WORLD_SIZE", "RANK"):
            monkeypatch.delenv(key, raising=False)
        result = run(driver_cfg(tiny_dataset, tmp_path / "c", None, "schedule.train_iters=1"))
        assert _iters(result) == [1]
    finally:
        blocker.close()


def _put_large(results):
    results.put(b"x" * (4 << 20))  # far more than a pipe holds


def _large_results_worker(rank, world, tmp):
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    from megatron.core.dist_checkpointing.strategies.async_utils import (
        AsyncCallsQueue,
        AsyncRequest,
    )

    from crnet_megatron.parallel.groups import init_distributed

    init_distributed(1, 1)
    checkpointing._write_results_queue(True)
    results, got = filesystem_async._results_queue, []
    calls = AsyncCallsQueue()
    calls.schedule_async_request(AsyncRequest(
        _put_large, (results,), [lambda: got.append(len(results.get_nowait()))]))
    return checkpointing.finish_saves(calls, tmp, blocking=True), got


def test_async_writer_with_large_results_is_waited_for(tmp_path):
    """megatron-core joins its forked writer before reading the write results; results larger
    than a pipe would keep the writer from ever exiting. ``finish_saves`` drains them while it
    waits (bounded by the helper's timeout, so a regression fails instead of hanging)."""
    from tests.helpers import run_distributed

    done, got = run_distributed(_large_results_worker, 1, str(tmp_path), timeout=120)[0]
    assert done == [0] and got == [4 << 20]
