"""Checkpoint costs that grow with the model: the DP replicas share the writing and reading of
replicated tensors (fully-parallel save and load), the checksums are taken by the writer as it
writes (a save never reads its files back), and a reader checks only what it reads
(``checkpoint.verify: model`` for exports: a flipped optimizer byte does not stop an export, a
flipped weight byte does)."""

import json
import os
import shutil

import pytest

from crnet_megatron.checkpoint import integrity
from crnet_megatron.checkpoint.resume import iteration_dir, read_checkpoint
from crnet_megatron.checkpoint.safe_checkpoint import load_metadata, model_key
from tests.driver_utils import driver_cfg, run_in_process, run_worker
from tests.helpers import run_distributed

DIST = ["parallel.use_distributed_optimizer=true", "schedule.micro_batch_size=2",
        "schedule.global_batch_size=8", "schedule.train_iters=2", "checkpoint.save_interval=2"]


def _bytes_by_rank(ckpt: str):
    """{rank: (model bytes, other bytes)} written into each rank's ``__RANK_*.distcp`` files."""
    shares = {}
    for index, info in load_metadata(os.path.join(ckpt, ".metadata")).storage_data.items():
        rank = int(info.relative_path.split("_")[2])
        model, other = shares.get(rank, (0, 0))
        shares[rank] = ((model + info.length, other) if model_key(index.fqn)
                        else (model, other + info.length))
    return shares


@pytest.mark.parametrize("fully_parallel", [True, False], ids=["fully-parallel", "rank0-writes"])
def test_dp_replicas_share_the_model_bytes_of_a_save(tiny_dataset, tmp_path, fully_parallel):
    """At DP=2 the model's tensors are replicated: with ``fully_parallel_save`` each replica
    writes between 35% and 65% of their bytes, without it DP rank 0 writes them all. The
    optimizer's dp_reshardable shards are each rank's own either way."""
    cfg = driver_cfg(tiny_dataset, tmp_path / "c", tmp_path / "s", *DIST,
                     f"checkpoint.fully_parallel_save={str(fully_parallel).lower()}")
    run_distributed(run_worker, 2, cfg, timeout=400)
    shares = _bytes_by_rank(iteration_dir(str(tmp_path / "s"), 2))
    total = shares[0][0] + shares.get(1, (0, 0))[0]
    if fully_parallel:
        assert all(0.35 * total <= shares[r][0] <= 0.65 * total for r in (0, 1)), shares
    else:
        assert shares[0][0] == total and shares.get(1, (0, 0))[0] == 0, shares
    assert all(shares[r][1] > 0 for r in (0, 1))  # each rank's optimizer shard


@pytest.fixture
def saved(saved_checkpoint):
    return saved_checkpoint


def test_the_writer_hashes_every_tensor_item_as_it_writes(tiny_dataset, tmp_path, monkeypatch):
    """A save reads none of its shards back (hashing a shard raises during the save; the small
    files are hashed whole), and the manifest holds one segment per tensor item, equal to the
    bytes on disk."""
    small = integrity.sha256_range

    def no_reads(path, *args, **kwargs):
        assert not path.endswith(".distcp"), "a save read a shard back"
        return small(path, *args, **kwargs)

    monkeypatch.setattr(integrity, "sha256_range", no_reads)
    save = tmp_path / "s"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2",
                              "checkpoint.save_interval=2"))
    monkeypatch.undo()
    ckpt = iteration_dir(str(save), 2)
    assert not [n for n in os.listdir(ckpt) if n.endswith(integrity.SIDECAR)]
    files = json.loads(open(os.path.join(ckpt, integrity.CHECKSUMS)).read())["files"]
    items = {(info.relative_path, info.offset, info.length) for info in
             load_metadata(os.path.join(ckpt, ".metadata")).storage_data.values()}
    segments = {(name, s[0], s[1]) for name, segs in files.items() if name.endswith(".distcp")
                for s in segs}
    assert segments == items
    for name, segs in files.items():
        for offset, length, sha in segs:
            assert integrity.sha256_range(os.path.join(ckpt, name), offset, length) == sha


def _flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _first_item(ckpt: str, model: bool):
    for index, info in load_metadata(os.path.join(ckpt, ".metadata")).storage_data.items():
        if (model_key(index.fqn) if model else index.fqn.startswith("optimizer.")) \
                and info.length > 64:
            return info
    raise AssertionError("no such item")


@pytest.mark.parametrize("where", ["optimizer", "model"])
def test_verify_model_checks_the_weights_only(saved, tmp_path, where):
    """A byte flipped in an optimizer tensor: ``verify=all`` refuses the checkpoint naming the
    shard, ``model`` (an export's) reads it, ``off`` reads it. Flipped in a weight: ``all``
    and ``model`` refuse it."""
    ckpt = str(tmp_path / "iter_0000002")
    shutil.copytree(saved, ckpt)
    info = _first_item(ckpt, model=where == "model")
    _flip(os.path.join(ckpt, info.relative_path), info.offset + info.length // 2)
    with pytest.raises(integrity.CorruptCheckpointError,
                       match=f"{info.relative_path} does not match its checksum"):
        read_checkpoint(ckpt, "all")
    if where == "model":
        with pytest.raises(integrity.CorruptCheckpointError, match=info.relative_path):
            read_checkpoint(ckpt, "model")
    else:
        assert read_checkpoint(ckpt, "model")["iteration"] == 2
    assert read_checkpoint(ckpt, "off")["iteration"] == 2


def test_an_extra_file_or_a_missing_manifest_is_noted_not_broken(saved, tmp_path, capfd):
    """A user's NOTES.txt beside the shards is noted, not a broken checkpoint; a deleted
    checksums.json is said once (read unverified)."""
    ckpt = str(tmp_path / "iter_0000002")
    shutil.copytree(saved, ckpt)
    open(os.path.join(ckpt, "NOTES.txt"), "w").write("lr sweep 3\n")
    assert read_checkpoint(ckpt, "all")["iteration"] == 2
    assert "does not list, not read: NOTES.txt" in capfd.readouterr().err
    os.remove(os.path.join(ckpt, integrity.CHECKSUMS))
    assert read_checkpoint(ckpt, "all")["iteration"] == 2
    assert f"has no {integrity.CHECKSUMS}; it is read unverified" in capfd.readouterr().err


def test_an_unlisted_shard_holding_weights_is_refused(saved, tmp_path):
    """A manifest that omits a shard the metadata reads from is corrupt, in every mode."""
    ckpt = str(tmp_path / "iter_0000002")
    shutil.copytree(saved, ckpt)
    manifest = os.path.join(ckpt, integrity.CHECKSUMS)
    data = json.loads(open(manifest).read())
    shard = _first_item(ckpt, model=True).relative_path
    del data["files"][shard]
    open(manifest, "w").write(json.dumps(data))
    for mode in ("all", "model"):
        with pytest.raises(integrity.CorruptCheckpointError, match=f"{shard} holds tensors"):
            read_checkpoint(ckpt, mode)
