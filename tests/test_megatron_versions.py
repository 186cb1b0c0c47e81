"""Checkpoints across megatron-core versions: 0.17+ keeps the common state as a pickled item
inside the shard files (megatron-core reads it with ``torch.load(weights_only=False)``); here it
is read from its byte range with the weights-only loader, so a crafted one runs nothing. A
checkpoint written by a newer megatron-core than the one installed is refused with both
versions named and nothing moved (it is not broken)."""

import os
import re
import shutil

import pytest

from crnet_megatron.checkpoint.resume import read_checkpoint, read_latest
from crnet_megatron.config.run_config import load_run_config
from tests.driver_utils import TINY, driver_cfg, run_in_process
from tests.helpers import read_common, write_common


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def saved(saved_checkpoint):
    return saved_checkpoint


def test_the_common_state_item_of_newer_megatron_core_is_read(saved, tmp_path):
    ckpt = tmp_path / "iter_0000002"
    shutil.copytree(saved, ckpt)
    common = read_common(ckpt)
    write_common(ckpt, common, as_item=True)
    got = read_checkpoint(str(ckpt), "off")
    assert got["iteration"] == 2 and got["run_id"] == common["common"]["run_id"]


def test_a_crafted_common_state_item_runs_nothing(saved, tmp_path):
    from crnet_megatron.checkpoint.safe_checkpoint import IncompleteCheckpointError

    ckpt, marker = tmp_path / "iter_0000002", tmp_path / "pwned"
    shutil.copytree(saved, ckpt)
    write_common(ckpt, _Payload(marker), as_item=True)
    with pytest.raises(IncompleteCheckpointError, match="is unreadable"):
        read_checkpoint(str(ckpt), "off")
    assert not marker.exists()


def test_appended_bytes_are_found_by_the_checksums(saved, tmp_path):
    from crnet_megatron.checkpoint.integrity import CorruptCheckpointError

    ckpt = tmp_path / "iter_0000002"
    shutil.copytree(saved, ckpt)
    shard = sorted(ckpt.glob("*.distcp"))[0]
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"appended")
    with pytest.raises(CorruptCheckpointError,
                       match=f"{shard.name} has {size + 8} bytes, its checksums cover {size}"):
        read_checkpoint(str(ckpt), "model")


def test_a_checkpoint_of_a_newer_megatron_core_is_refused_not_moved(tiny_dataset, tmp_path):
    """Resuming in the run's own save directory from a checkpoint that says megatron-core 99.0
    wrote it: one line naming both versions; nothing moved aside, the tracker unchanged."""
    import megatron.core

    save = tmp_path / "s"
    cfg = ("schedule.train_iters=2", "checkpoint.save_interval=2")
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, *cfg))
    common = read_common(save / "iter_0000002")
    common["common"]["versions"]["megatron-core"] = "99.0"
    write_common(save / "iter_0000002", common)
    listing = sorted(p.name for p in save.iterdir())
    with pytest.raises(ValueError, match=rf"written by megatron-core 99\.0; this is megatron-core "
                                         rf"{re.escape(megatron.core.__version__)}.*nothing was moved"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                                  "checkpoint.save_interval=2"))
    assert sorted(p.name for p in save.iterdir() if p.name != ".crnet-train.lock.guard") == \
        listing
    assert read_latest(str(save)) == 2


_OLDER = """
import json, sys
from crnet_megatron.config.run_config import load_run_config
from crnet_megatron.training.trainer import run
print(json.dumps(run(load_run_config(None, json.loads(sys.argv[1])))["history"]))
"""


@pytest.mark.skipif(not os.environ.get("CRNET_OLDER_MEGATRON_PYTHON"),
                    reason="needs CRNET_OLDER_MEGATRON_PYTHON: a Python whose megatron-core is "
                    "older than this one's (CI's second set-up points it at the first)")
def test_a_checkpoint_of_an_older_megatron_core_resumes_exactly(tiny_dataset, tmp_path):
    """Written by the older megatron-core (2 of 4 steps), then resumed by this one and, from a
    copy, by the older one: the same losses, bitwise."""
    import json
    import subprocess

    import megatron.core

    older = os.environ["CRNET_OLDER_MEGATRON_PYTHON"]
    prefix, tok, _ = tiny_dataset
    sets = TINY + [
        f"data.data_path=[{prefix}]", f"data.tokenizer={tok}", f"data.cache_dir={tmp_path / 'c'}",
        f"checkpoint.save={tmp_path / 'a'}", "schedule.train_iters=4",
        "checkpoint.save_interval=2"]
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}

    def in_older(*extra):
        out = subprocess.run([older, "-c", _OLDER, json.dumps(sets + list(extra))], env=env,
                             capture_output=True, text=True, timeout=600, cwd=os.getcwd())
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    in_older("schedule.exit_interval=2")
    saved = read_common(tmp_path / "a" / "iter_0000002")["common"]["versions"]["megatron-core"]
    assert saved != megatron.core.__version__
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    here = run_in_process(load_run_config(None, sets))["history"]
    there = in_older(f"checkpoint.save={tmp_path / 'b'}")
    assert [h["iteration"] for h in here] == [3, 4]
    assert [h["loss"] for h in here] == [h["loss"] for h in there]
