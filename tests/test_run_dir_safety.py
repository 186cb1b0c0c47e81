"""A run directory received from someone else: no write goes through a planted symbolic link or
into a FIFO, the temporary files have unpredictable names created exclusively, and a received
``metrics.jsonl`` is validated row by row before a resume keeps any of it."""

import json
import os

import pytest

from crnet_megatron.checkpoint.run_dir import RUN_FILES, TRACKER
from crnet_megatron.data import safe_files
from tests.driver_utils import TINY, driver_cfg, run_in_process


def _train_cli(tiny_dataset, tmp_path, save, *extra):
    """``crnet-train`` in this process; (exit code, stderr text)."""
    from crnet_megatron.cli.train import main

    prefix, tok, _ = tiny_dataset
    sets = TINY + [f"data.data_path=[{prefix}]", f"data.tokenizer={tok}",
                   f"data.cache_dir={tmp_path / 'c'}", f"checkpoint.save={save}",
                   "schedule.train_iters=2", *extra]
    config = tmp_path / "run.yaml"
    config.write_text("logging:\n  plot: true\n")
    argv = [str(config)] + [a for s in sets for a in ("--set", s)]
    try:
        main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.mark.parametrize("name", sorted(RUN_FILES))
def test_a_planted_link_in_the_run_directory_is_refused(tiny_dataset, tmp_path, capfd, name):
    """Each file a run writes into ``checkpoint.save``, planted as a link to a file outside:
    one line naming it at start-up, exit 2, the target untouched, nothing else written."""
    save = tmp_path / "run"
    save.mkdir()
    marker = tmp_path / "outside.txt"
    marker.write_text("precious\n")
    os.symlink(marker, save / name)
    assert _train_cli(tiny_dataset, tmp_path, save) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err[-1].startswith("crnet-train: error: ") and str(save / name) in err[-1]
    assert "symbolic link" in err[-1]
    assert marker.read_text() == "precious\n"
    assert sorted(os.listdir(save)) == [name]


def test_a_fifo_in_the_run_directory_is_refused(tiny_dataset, tmp_path, capfd):
    save = tmp_path / "run"
    save.mkdir()
    os.mkfifo(save / TRACKER)
    assert _train_cli(tiny_dataset, tmp_path, save) == 2
    assert "is not a regular file" in capfd.readouterr().err


def test_writes_never_follow_a_link_planted_while_running(tmp_path):
    """The write helpers themselves (used by the trainer, checkpointing, the exporter and
    preprocessing): a link at the target is refused, a link at any old-style ``.tmp`` name is
    never written through, and a failed write leaves neither a temporary file nor a change."""
    marker = tmp_path / "outside.txt"
    marker.write_text("precious\n")
    target = tmp_path / "metrics.png"
    os.symlink(marker, target)
    with pytest.raises(safe_files.UnsafePathError, match="symbolic link"):
        safe_files.write_text(str(target), "x")
    os.unlink(target)
    os.symlink(marker, str(target) + ".tmp")  # the name a naive writer would use
    safe_files.write_text(str(target), "new")
    assert target.read_text() == "new" and marker.read_text() == "precious\n"
    with pytest.raises(RuntimeError):
        with safe_files.atomic_writer(str(target)) as f:
            f.write("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.png", "metrics.png.tmp",
                                                          "outside.txt"]


def test_a_received_metrics_file_is_validated_row_by_row(tiny_dataset, tmp_path, capfd):
    """Rows that are not this project's (a shell string as a loss, a null iteration, a list,
    an iteration going backwards, a huge line) are dropped with one note; the resume works."""
    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2",
                              "logging.log_interval=1"))
    good = [json.loads(line) for line in open(save / "metrics.jsonl")]
    crafted = [{"split": "train", "iteration": 1, "loss": "$(touch /tmp/pwned)"},
               {"split": "train", "iteration": None, "loss": 1.0}, [1, 2, 3],
               {"split": "train", "iteration": 0, "loss": 2.0},
               {"split": "train", "iteration": 2, "loss": 1.0, "x": "y" * 70000}]
    with open(save / "metrics.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in crafted))
    capfd.readouterr()
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=3",
                              "logging.log_interval=1",
                              "checkpoint.override_opt_param_scheduler=true"))
    assert "5 row(s) that are not this project's metrics rows were dropped" in \
        capfd.readouterr().out
    rows = [json.loads(line) for line in open(save / "metrics.jsonl")]
    assert rows[:len(good)] == good
    assert [r["iteration"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert all(isinstance(r["loss"], float) for r in rows)


def test_a_second_run_into_one_save_directory_is_refused(tmp_path):
    """The lock names its holder; a live holder (this test's parent process, here) refuses the
    second run; a dead holder's lock is taken over with a note."""
    import subprocess
    import sys

    from crnet_megatron.checkpoint import run_dir

    save = tmp_path / "ck"
    save.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (save / run_dir.LOCK).write_text(json.dumps(
            dict(host=__import__("socket").gethostname(), pid=holder.pid, started="then")))
        with pytest.raises(ValueError, match=rf"is in use by pid {holder.pid} on .*remove "):
            run_dir.acquire_lock(str(save))
    finally:
        holder.kill()
        holder.wait()
    run_dir.acquire_lock(str(save))  # the holder is gone: taken over
    assert json.loads((save / run_dir.LOCK).read_text())["pid"] == os.getpid()
    run_dir.release_lock(str(save))
    assert not (save / run_dir.LOCK).exists()


def test_retention_removes_only_this_runs_checkpoints(tiny_dataset, tmp_path, capfd):
    """Loaded from A, saved into B that holds another run's checkpoints and a user's copy:
    keep_last prunes only the checkpoints this run wrote into B; A is only read (its partial
    save is not removed); newer checkpoints of another run in B are refused at start-up."""
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", a, "schedule.train_iters=2"))
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", b, "schedule.train_iters=2",
                              "checkpoint.save_interval=1"))  # another run: iter 1 and 2 in B
    shutil.copytree(b / "iter_0000002", b / "iter_0000002.bak1")  # the user's own copy
    (a / "iter_0000009.tmp").mkdir()  # someone else's save in progress in A
    listing_a = sorted(os.listdir(a))
    resumed = ["checkpoint.override_opt_param_scheduler=true", f"checkpoint.load={a}"]
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", b, "schedule.train_iters=7",
                              "checkpoint.save_interval=1", "checkpoint.keep_last=2", *resumed))
    names = sorted(p.name for p in b.glob("iter_*"))
    assert names == ["iter_0000001", "iter_0000002", "iter_0000002.bak1", "iter_0000006",
                     "iter_0000007"], names
    assert sorted(os.listdir(a)) == listing_a

    c = tmp_path / "c2"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", c, "schedule.train_iters=4"))
    metrics = (c / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"holds checkpoints this run did not write at "
                                         r"iterations \[4\], past the one it starts from \(2\)"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", c, "schedule.train_iters=5",
                                  *resumed))
    assert sorted(p.name for p in c.glob("iter_*")) == ["iter_0000004"]
    assert (c / "metrics.jsonl").read_bytes() == metrics  # refused first, nothing touched


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    """466 bytes of nested aliases would expand to 9^9 items: refused in well under a second,
    with the file named."""
    import time

    from crnet_megatron.config.run_config import load_run_config

    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"bomb.yaml' is not valid YAML.*more than 16 aliases"):
        load_run_config(str(bomb))
    assert time.monotonic() - start < 2.0


_BOUNDED_CHILD = """
import sys
from crnet_megatron.training.metrics import truncate_metrics
open("/proc/self/clear_refs", "w").write("5")
rss = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
before = rss("VmRSS:")
truncate_metrics(sys.argv[1], 10)
print(rss("VmHWM:") - before)
"""


def test_a_huge_metrics_line_is_skipped_without_being_read_whole(tmp_path):
    """A received metrics.jsonl holding a 512 MiB line (sparse: cheap to make, as long to
    read): the line is dropped as not a row, the rows around it kept, and the reader's peak
    memory grows by less than 64 MiB (it once held the line whole)."""
    import subprocess
    import sys

    path = tmp_path / "metrics.jsonl"
    row = {"split": "train", "iteration": 1, "loss": 7.5}
    with open(path, "wb") as f:
        f.write((json.dumps(row) + "\n").encode())
        f.write(b'{"split": "train", "pad": "')
        f.truncate(f.tell() + (512 << 20))
        f.seek(0, 2)
        f.write(b'"}\n' + (json.dumps(dict(row, iteration=2)) + "\n").encode())
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    proc = subprocess.run([sys.executable, "-c", _BOUNDED_CHILD, str(path)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) < 64 << 10  # kB
    assert "1 row(s)" in proc.stdout
    assert [json.loads(line)["iteration"] for line in open(path)] == [1, 2]


def _take_lock(root, start, done, results, i):
    from crnet_megatron.checkpoint.run_dir import acquire_lock

    start.wait(30)
    try:
        acquire_lock(root)
        results.put(i)
    except ValueError:
        results.put(None)
    done.wait(30)  # the holder stays alive until every contender has answered


def test_exactly_one_of_many_processes_takes_over_a_stale_lock(tmp_path):
    """Eight processes start together on a save directory whose lock names a dead process of
    this host: in each of 20 trials exactly one takes it over, the others are refused."""
    import multiprocessing as mp
    import socket

    from crnet_megatron.checkpoint.run_dir import LOCK

    ctx = mp.get_context("fork")
    gone = ctx.Process(target=int)
    gone.start()
    gone.join()
    for trial in range(20):
        root = tmp_path / f"t{trial}"
        root.mkdir()
        (root / LOCK).write_text(json.dumps(dict(host=socket.gethostname(), pid=gone.pid)))
        start, done, results = ctx.Barrier(8), ctx.Barrier(9), ctx.Queue()
        procs = [ctx.Process(target=_take_lock, args=(str(root), start, done, results, i))
                 for i in range(8)]
        for p in procs:
            p.start()
        try:
            winners = [w for w in (results.get(timeout=30) for _ in procs) if w is not None]
            done.wait(30)
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
        assert len(winners) == 1, (trial, winners)
        assert json.loads((root / LOCK).read_text())["pid"] == procs[winners[0]].pid


def test_an_earlier_attempt_of_the_same_slurm_job_is_taken_over(tmp_path, monkeypatch, capsys):
    """A requeued job may start on another node: the lock its earlier attempt left (same
    SLURM_JOB_ID) is taken over with a note; another job's lock on another node is not."""
    from crnet_megatron.checkpoint import run_dir

    lock = tmp_path / run_dir.LOCK
    lock.write_text(json.dumps(dict(host="node-17", pid=4242, job="777", started="then")))
    monkeypatch.setenv("SLURM_JOB_ID", "778")
    with pytest.raises(ValueError, match="is in use by pid 4242 on node-17"):
        run_dir.acquire_lock(str(tmp_path))
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    run_dir.acquire_lock(str(tmp_path))
    assert "an earlier attempt of Slurm job 777" in capsys.readouterr().out
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    here = __import__("socket").gethostname()  # a pid no system has: one line, no traceback
    lock.write_text(json.dumps(dict(host=here, pid=10 ** 30, started="then")))
    with pytest.raises(ValueError, match=f"is in use by pid {10 ** 30} on {here}"):
        run_dir.acquire_lock(str(tmp_path))


def test_fifos_where_files_are_read_never_block(tiny_dataset, tmp_path):
    """A FIFO as the tracker or a checkpoint's ``.metadata`` is a broken checkpoint (fall back,
    with a warning), as a config file or a dataset ``.bin`` one line naming it; nothing blocks
    (the helper's timeout turns a hang into a failure)."""
    from crnet_megatron.checkpoint import resume as checkpointing
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.data.validate import read_index
    from tests.helpers import run_distributed

    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                              "checkpoint.save_interval=2", "checkpoint.keep_last=3"))
    (save / TRACKER).unlink()
    os.mkfifo(save / TRACKER)
    os.unlink(save / "iter_0000004" / ".metadata")
    os.mkfifo(save / "iter_0000004" / ".metadata")
    # read (checkpoint.load elsewhere): the previous checkpoint, nothing written
    assert run_distributed(_find_resumable, 1, str(save), False, timeout=60)[0] == 2
    # the run's own directory: the FIFO tracker is not replaced silently
    with pytest.raises(RuntimeError, match=r"checkpoint tracker .* is not a regular file"):
        run_distributed(_find_resumable, 1, str(save), True, timeout=60)
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="config file .* is not a regular file"):
        load_run_config(str(fifo))
    prefix = tmp_path / "data"
    (tmp_path / "data.idx").write_bytes(open(tiny_dataset[0] + ".idx", "rb").read())
    os.mkfifo(tmp_path / "data.bin")
    with pytest.raises(ValueError, match=r"data.bin: not a regular file"):
        read_index(str(prefix))
    assert checkpointing.TRACKER == TRACKER


def _find_resumable(rank, world, save, writable):
    from crnet_megatron.checkpoint import resume as checkpointing

    return checkpointing.find_resumable(save, writable)["iteration"]


@pytest.mark.parametrize("item,message", [
    ("optimizer.lr=.nan", r"optimizer.lr = nan is not a finite number"),
    ("model.crnet_beta_init=.nan", r"model.crnet_beta_init = nan is not a finite number"),
    ("optimizer.min_lr=.inf", r"optimizer.min_lr = inf is not a finite number"),
    ("model.seq_length=1000000000", r"model.seq_length = 1000000000 is out of range"),
])
def test_non_finite_and_huge_values_are_refused(item, message):
    from crnet_megatron.config.run_config import load_run_config

    with pytest.raises(ValueError, match=message):
        load_run_config(None, [item])


def test_a_huge_jsonl_line_is_refused_before_tokenizing(tiny_dataset, tmp_path):
    """A 20 MB line: one line naming file and line, no output and no temporary file left."""
    from crnet_megatron.data import preprocess

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "short"}) + "\n"
                   + json.dumps({"text": "x" * (20 << 20)}) + "\n")
    out = tmp_path / "out" / "data"
    with pytest.raises(ValueError, match=r"in.jsonl:2: a line longer than 16777216 bytes"):
        preprocess.preprocess_jsonl([str(src)], str(out), tiny_dataset[1], progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_sigterm_during_start_up_exits_cleanly(tiny_dataset, tmp_path):
    """SIGTERM while the run sets up (after it took the save directory's lock): exit 143, no
    traceback, the lock released."""
    import signal
    import subprocess
    import sys
    import time

    from crnet_megatron.checkpoint import run_dir

    prefix, tok, _ = tiny_dataset
    save = tmp_path / "ck"
    sets = TINY + [f"data.data_path=[{prefix}]", f"data.tokenizer={tok}",
                   f"data.cache_dir={tmp_path / 'c'}", f"checkpoint.save={save}"]
    config = tmp_path / "run.yaml"
    config.write_text("logging:\n  plot: false\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.Popen([sys.executable, "-m", "crnet_megatron.cli.train", str(config)]
                            + [a for s in sets for a in ("--set", s)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (save / run_dir.LOCK).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err
    assert not (save / run_dir.LOCK).exists()


@pytest.mark.parametrize("damage", ["repeated-chunks", "negative-offset"])
def test_crafted_metadata_sizes_are_refused_quickly(tiny_dataset, tmp_path, damage):
    """A ``.metadata`` of allowed classes only, but one chunk repeated 200,000 times (or a
    negative storage offset): the checkpoint is broken (one line), in well under a second."""
    import pickle
    import time

    from crnet_megatron.checkpoint import safe_checkpoint

    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    path = save / "iter_0000002" / ".metadata"
    md = safe_checkpoint.load_metadata(str(path))
    if damage == "repeated-chunks":
        key = next(k for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks"))
        chunks = md.state_dict_metadata[key].chunks
        md.state_dict_metadata[key].chunks = chunks * (200_000 // len(chunks))
    else:
        info = next(iter(md.storage_data.values()))
        info.offset = -8
    path.write_bytes(pickle.dumps(md))
    start = time.monotonic()
    with pytest.raises(safe_checkpoint.IncompleteCheckpointError,
                       match="repeated or outside" if damage == "repeated-chunks" else "negative"):
        safe_checkpoint.verify_checkpoint(str(save / "iter_0000002"))
    assert time.monotonic() - start < 5.0


def test_a_checkpoint_with_flipped_bytes_is_moved_aside(tiny_dataset, tmp_path, capfd):
    """Bytes flipped inside the newest checkpoint's tensor data (the shard holds the weights,
    then the optimizer states: flips at 30% and at 80% of it) no longer match its checksums:
    the reader refuses it with one line; a resume says so, moves it aside and continues from
    the previous checkpoint, which equals an uninterrupted run."""
    from crnet_megatron.checkpoint.integrity import CHECKSUMS, CorruptCheckpointError
    from crnet_megatron.checkpoint.resume import read_checkpoint

    save = tmp_path / "s"
    cfg = ("schedule.train_iters=4", "checkpoint.save_interval=2", "logging.log_interval=1")
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, *cfg))
    newest = save / "iter_0000004"
    assert (newest / CHECKSUMS).is_file()
    read_checkpoint(str(newest))  # intact: verified
    shard = max(newest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    intact = shard.read_bytes()
    for where in (0.3, 0.8):
        data = bytearray(intact)
        at = int(len(data) * where)
        data[at:at + 8] = bytes(b ^ 0xFF for b in data[at:at + 8])
        shard.write_bytes(bytes(data))
        with pytest.raises(CorruptCheckpointError,
                           match=f"{shard.name} does not match its checksum"):
            read_checkpoint(str(newest))
    capfd.readouterr()
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, *cfg))
    err = capfd.readouterr().err
    assert f"{shard.name} does not match its checksum" in err and "iter_0000002" in err
    assert (save / "iter_0000004.broken").is_dir()
    assert [h["iteration"] for h in resumed["history"]] == [3, 4]
    straight = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / "u", *cfg))
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"][2:]]


@pytest.mark.parametrize("plant", ["builtin-tmp-link", "index-cache-links", "fifo"])
def test_planted_entries_in_the_cache_directory_are_refused(tiny_dataset, tmp_path, capfd, plant):
    """``data.cache_dir`` is shared between runs and nodes: a link planted where the built-in
    corpus is written, links (one dangling) where megatron-core writes its index cache, or a
    FIFO, are refused at start-up with one line naming them; the link targets are untouched and
    nothing is created outside the cache."""
    cache = tmp_path / "c"
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "precious.txt"
    target.write_text("precious\n")
    if plant == "builtin-tmp-link":
        (cache / "builtin").mkdir(parents=True)
        (cache / "builtin" / "builtin.jsonl.tmp").symlink_to(target)
        named = "builtin.jsonl.tmp"
    elif plant == "index-cache-links":
        (cache / "index_cache").mkdir(parents=True)
        (cache / "index_cache" / "0abc-GPTDataset-train-description.txt").symlink_to(target)
        (cache / "index_cache" / "0abc-GPTDataset-train-document_index.npy").symlink_to(
            outside / "made_by_megatron.npy")  # dangling
        named = "0abc-GPTDataset-train-"
    else:
        (cache / "index_cache").mkdir(parents=True)
        os.mkfifo(cache / "index_cache" / "pipe")
        named = "pipe"
    sets = [] if plant != "builtin-tmp-link" else ["data.data_path=null", "data.tokenizer=null"]
    code = _train_cli(tiny_dataset, tmp_path, tmp_path / "run", *sets)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "data.cache_dir=" in err[0] and named in err[0], err
    assert target.read_text() == "precious\n"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]


@pytest.mark.parametrize("name", [".crnet-checkpoints.json", "iter_0000002.tmp"])
def test_links_where_a_save_writes_are_refused_at_start(tiny_dataset, tmp_path, capfd, name):
    """The retention manifest, or a partial save's directory, planted as a link: refused at
    start-up with one line naming it (it was found only at the first save, after training)."""
    save = tmp_path / "run"
    save.mkdir()
    target = tmp_path / "outside.txt"
    target.write_text("precious\n")
    (save / name).symlink_to(target)
    code = _train_cli(tiny_dataset, tmp_path, save)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and name in err[0], err
    assert target.read_text() == "precious\n"
    assert not (save / "metrics.jsonl").exists()  # nothing trained


def test_retention_counts_past_seven_digits_and_knows_every_published_checkpoint(
        tiny_dataset, tmp_path, monkeypatch):
    """Names of iterations >= 10^7 have eight digits: pruned in numeric order like the others.
    A kill right after a save's rename leaves a checkpoint the manifest already names, so
    retention prunes it later (the manifest was once written after the rename)."""
    from crnet_megatron.checkpoint import checkpointing, run_dir

    root = tmp_path / "r"
    for it in (9_999_999, 10_000_000, 10_000_001):
        (root / f"iter_{it:07d}").mkdir(parents=True)
        run_dir.record_saved(str(root), it, "me")
    assert run_dir.prune(str(root), 1, "me", 10_000_001) == ["iter_9999999", "iter_10000000"]
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_10000001"]

    def killed(path, *args):  # the tracker write right after the rename
        if path.endswith(run_dir.TRACKER):
            raise SystemExit("killed")
        return real(path, *args)

    real = checkpointing.write_text
    monkeypatch.setattr(checkpointing, "write_text", killed)
    save = tmp_path / "s"
    with pytest.raises(SystemExit):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2",
                                  "checkpoint.save_interval=2"))
    assert (save / "iter_0000002").is_dir()
    assert "iter_0000002" in json.loads((save / run_dir.MANIFEST).read_text())
