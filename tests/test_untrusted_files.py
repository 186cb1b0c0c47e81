"""Checkpoints and dataset caches are untrusted: crafted files that would run code when read are
refused with a message naming the file, and the code never runs (a marker file never appears)."""

import os
import pickle

import numpy as np
import pytest

from tests.driver_utils import driver_cfg, run_in_process
from tests.helpers import read_common


class _Payload:
    """Unpickling this creates ``marker``: what an attacker's code would do first."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train(tiny_dataset, tmp_path, save, *extra):
    return run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2",
                                     *extra))


def _listing(root):
    return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*"))


def test_crafted_checkpoint_metadata_is_refused(tiny_dataset, tmp_path):
    save, marker = tmp_path / "ck", tmp_path / "pwned"
    _train(tiny_dataset, tmp_path, save)
    (save / "iter_0000002" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    before = _listing(save)
    with pytest.raises(ValueError, match=r"iter_0000002/\.metadata refers to (builtins|_?io)\.open"
                                         r".*refusing to unpickle"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4"))
    assert not marker.exists()
    assert _listing(save) == before  # refused, not moved aside or overwritten


def test_checkpoint_item_marked_as_pickled_bytes_is_refused(tiny_dataset, tmp_path):
    """Valid metadata classes, but a tensor re-declared as bytes: torch's planner would
    ``torch.load(weights_only=False)`` it, so the checkpoint is refused before any read."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from crnet_megatron.checkpoint.safe_checkpoint import load_metadata

    save = tmp_path / "ck"
    _train(tiny_dataset, tmp_path, save)
    path = save / "iter_0000002" / ".metadata"
    md = load_metadata(str(path))
    key = next(k for k in md.state_dict_metadata if "word_embeddings" in k)
    md.state_dict_metadata[key] = BytesStorageMetadata()
    path.write_bytes(pickle.dumps(md))
    with pytest.raises(ValueError, match=rf"marks '{key}' as a pickled object"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4"))


def test_checkpoints_hold_tensors_only(tiny_dataset, tmp_path):
    """No pickled item in what the driver writes (RNG state included) but, with megatron-core
    0.17+, megatron-core's own common-state item, and the common state loads with torch's
    weights-only unpickler."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from crnet_megatron.checkpoint.safe_checkpoint import (
        COMMON_STATE_ITEM,
        load_metadata,
    )

    save = tmp_path / "ck"
    _train(tiny_dataset, tmp_path, save)
    md = load_metadata(str(save / "iter_0000002" / ".metadata"))
    kinds = {type(v).__name__ for k, v in md.state_dict_metadata.items() if k != COMMON_STATE_ITEM}
    assert kinds == {TensorStorageMetadata.__name__}
    assert any(k.startswith("rng_state.cpu") for k in md.state_dict_metadata)
    common = read_common(save / "iter_0000002")
    assert common["common"]["rng_format"] == "tensors"


@pytest.mark.parametrize("kind", ["pickle", "object-array", "float64"])
def test_crafted_index_cache_is_refused(tiny_dataset, tmp_path, kind):
    """megatron-core reads its caches with ``numpy.load(allow_pickle=True)``: a file that is a
    plain pickle (no .npy header) is unpickled by numpy, running its code; an object array is
    refused by the memory map today but would run code on any non-mapped load; float indices
    would index samples wrongly."""
    cache, marker = tmp_path / "c", tmp_path / "pwned"
    _train(tiny_dataset, tmp_path, None)
    victim = sorted((cache / "index_cache").glob("*-GPTDataset-train-document_index.npy"))[0]
    if kind == "pickle":
        victim.write_bytes(pickle.dumps(_Payload(marker)))
        expected = "is not a valid .npy file"
    elif kind == "object-array":
        np.save(victim, np.array([_Payload(marker)], dtype=object), allow_pickle=True)
        expected = "holds object data.*refusing"
    else:
        np.save(victim, np.load(victim).astype(np.float64))
        expected = "holds float64 data, not an integer index"
    with pytest.raises(ValueError, match=rf"index cache {victim} {expected}"):
        _train(tiny_dataset, tmp_path, None)
    assert not marker.exists()
    os.remove(victim)  # as the message says: delete it and it is rebuilt
    result = _train(tiny_dataset, tmp_path, None)
    assert victim.exists() and len(result["history"]) == 2


CACHE_DAMAGE = [
    ("shuffle_index", "zeros", "shuffle index that is not a permutation of its samples"),
    ("document_index", "zeros", "does not hold every document of its split equally often"),
    ("sample_index", "zeros", "sample boundaries that are not 32 tokens apart"),
    ("sample_index", "cut", "is cut short"),
    ("document_index", "cut", "is cut short"),
]


def test_implausible_or_cut_short_index_caches_are_rebuilt(tiny_dataset, tmp_path, capfd):
    """A numerically valid but all-zero cache (which would train on one repeated sample) or one
    cut short by a kill: removed with a line naming it and why, built again, and the run trains
    on the same samples as with the intact cache."""
    import shutil

    first = _train(tiny_dataset, tmp_path, None)
    cache = tmp_path / "c" / "index_cache"
    pristine = tmp_path / "pristine"
    shutil.copytree(cache, pristine)
    for affix, damage, why in CACHE_DAMAGE:
        shutil.rmtree(cache)
        shutil.copytree(pristine, cache)
        victim = sorted(cache.glob(f"*-train-{affix}.npy"))[0]
        if damage == "zeros":
            np.save(victim, np.zeros_like(np.load(victim)))
        else:
            victim.write_bytes(victim.read_bytes()[:-16])
        capfd.readouterr()
        again = _train(tiny_dataset, tmp_path, None)
        out = capfd.readouterr().out
        assert f"dataset index cache {victim.parent}" in out and why in out, (affix, damage)
        assert victim.exists()
        assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]


@pytest.mark.parametrize("damage", ["dataset", "sample"])
def test_a_blend_cache_naming_what_it_lacks_is_rebuilt(tiny_dataset, tmp_path, capfd, damage):
    """A blend's cached indices naming a dataset it does not have, or a sample past the end of
    one: removed with a line naming it and why, built again; the run trains as with the
    intact cache (it once crashed at the first batch or read out of range)."""
    from crnet_megatron.data.preprocess import preprocess_jsonl

    prefix, tok, jsonl = tiny_dataset
    second = preprocess_jsonl([jsonl], str(tmp_path / "second"), tok, append_eod=True,
                              progress=False)["text"]
    blend = f"data.data_path=[0.3, {prefix}, 0.7, {second}]"
    first = _train(tiny_dataset, tmp_path, None, blend)
    cache = tmp_path / "c" / "index_cache"
    victim = sorted(cache.glob(f"*-BlendedDataset-train-dataset{'' if damage == 'dataset' else '_sample'}_index.npy"))[0]
    data = np.load(victim)
    data[len(data) // 2] = 7 if damage == "dataset" else 10 ** 6
    np.save(victim, data)
    capfd.readouterr()
    again = _train(tiny_dataset, tmp_path, None, blend)
    out = capfd.readouterr().out
    why = "names a dataset the blend does not have" if damage == "dataset" else \
        "names a sample beyond the end of its dataset"
    assert f"dataset index cache {victim.parent}" in out and why in out
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]


NESTED = "[" * 100_000  # 100 kB: deeper than any JSON or YAML parser recurses


def test_nested_json_anywhere_is_one_line_or_skipped(tiny_dataset, tmp_path, capsys):
    """Deeply nested JSON (or YAML) where a run reads it: refused with a ValueError naming the
    file (tokenizer, YAML config, a preprocessing line, checksums.json, the lock), or skipped
    where the file is advisory (a metrics row, the retention manifest); never a
    RecursionError."""
    import json as jsonlib

    from crnet_megatron.checkpoint import run_dir
    from crnet_megatron.checkpoint.integrity import CorruptCheckpointError
    from crnet_megatron.checkpoint.resume import iteration_dir, read_checkpoint
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.data.preprocess import HFTokenizer, iter_texts
    from crnet_megatron.training.metrics import truncate_metrics

    bad = tmp_path / "bad"
    bad.mkdir()
    refused = {}
    for name, read in (
            ("tokenizer.json", lambda p: HFTokenizer(str(p))),
            ("config.yaml", lambda p: load_run_config(str(p))),
            ("docs.jsonl", lambda p: list(iter_texts([str(p)], "text")))):
        (bad / name).write_text(NESTED + "\n")
        with pytest.raises(ValueError) as err:
            read(bad / name)
        refused[name] = str(err.value)
    assert all("nested too deeply" in m and "\n" not in m for m in refused.values()), refused
    assert refused["docs.jsonl"].startswith(f"{bad / 'docs.jsonl'}:1:")

    save = tmp_path / "s"
    _train(tiny_dataset, tmp_path, save)
    ckpt = iteration_dir(str(save), 2)
    (tmp_path / "ck").mkdir()
    copy = tmp_path / "ck" / "iter_0000002"
    __import__("shutil").copytree(ckpt, copy)
    (copy / "checksums.json").write_text(NESTED)
    with pytest.raises(CorruptCheckpointError, match="checksums.json .*nested too deeply"):
        read_checkpoint(str(copy))
    lock = tmp_path / "locked"
    lock.mkdir()
    (lock / run_dir.LOCK).write_text(NESTED)
    with pytest.raises(ValueError, match="lock file .* is unreadable .*nested too deeply"):
        run_dir.acquire_lock(str(lock))
    (save / run_dir.MANIFEST).write_text(NESTED)
    assert run_dir.prune(str(save), 1, "any", None) == []  # nothing pruned, with a note
    assert "nested too deeply to be read; no checkpoint is pruned" in capsys.readouterr().out
    metrics = save / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows[:1] + [NESTED] + rows[1:]) + "\n")
    truncate_metrics(str(metrics), 2)
    assert [jsonlib.loads(r) for r in metrics.read_text().splitlines()] == \
        [jsonlib.loads(r) for r in rows]
