"""Checkpoints across megatron-core versions: 0.17+ keeps the common state as a pickled item
inside the shard files (megatron-core reads it with ``torch.load(weights_only=False)``); here it
is read from its byte range with the weights-only loader, so a crafted one runs nothing. A
checkpoint written by a newer megatron-core than the one installed is refused with both
versions named and nothing moved (it is not broken)."""

import shutil

import pytest

from crnet_megatron.checkpoint.resume import iteration_dir, read_checkpoint, read_latest
from tests.driver_utils import driver_cfg, run_in_process
from tests.helpers import read_common, write_common


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def saved(tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("versions")
    run_in_process(driver_cfg(tiny_dataset, root / "c", root / "s", "schedule.train_iters=2",
                              "checkpoint.save_interval=2"))
    return iteration_dir(str(root / "s"), 2)


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
                                         rf"{megatron.core.__version__}.*nothing was moved"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                                  "checkpoint.save_interval=2"))
    assert sorted(p.name for p in save.iterdir() if p.name != ".crnet-train.lock.guard") == \
        listing
    assert read_latest(str(save)) == 2
