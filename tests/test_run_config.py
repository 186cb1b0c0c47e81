"""Run configs: sections, Megatron key names, dotted overrides, errors that name the key, and a
checkpoint of another model shape refused before anything is loaded or written."""

import os

import pytest

from crnet_megatron.config.run_config import load_run_config
from tests.driver_utils import driver_cfg, run_in_process


def test_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 96\noptimizer:\n  lr: 1.0e-3\n")
    cfg = load_run_config(str(path), ["optimizer.lr=3e-3", "model.crnet_rank=[8, 16]",
                                      "parallel.sequence_parallel=true"])
    assert cfg["model"]["hidden_size"] == 96
    assert cfg["optimizer"]["lr"] == 3e-3
    assert cfg["model"]["crnet_rank"] == [8, 16]
    assert cfg["parallel"]["sequence_parallel"] is True
    assert cfg["schedule"]["train_iters"] == 100  # default kept


@pytest.mark.parametrize("sets,pattern", [
    (["model.hiden_size=3"], r"unknown config key model.hiden_size"),
    (["modle.x=3"], r"unknown config section 'modle'"),
    (["schedule.train_iters=ten"], r"schedule.train_iters = 'ten' has type str; expected int"),
    (["parallel.sequence_parallel=3"], r"parallel.sequence_parallel = 3 has type int; expected bool"),
    (["schedule.train_iters=true"], r"schedule.train_iters = True has type bool"),
    (["optimizer.lr"], r"expected section.key=value"),
])
def test_bad_keys_and_types(sets, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_run_config(None, sets)


def test_missing_config_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_run_config("nope.yaml")


def test_checkpoint_of_another_shape_is_refused(tiny_dataset, tmp_path):
    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    listing = sorted(os.listdir(save))
    with pytest.raises(ValueError, match=r"another model shape \(model.hidden_size: checkpoint "
                                         r"64 vs config 96"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                                  "model.hidden_size=96"))
    assert sorted(os.listdir(save)) == listing


def test_corrupt_tracker_is_a_clear_error(tiny_dataset, tmp_path):
    save = tmp_path / "ck"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("garbage")
    with pytest.raises(ValueError, match="no readable checkpoint .* corrupt checkpoint tracker"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save))
    (save / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(ValueError, match=r"iter_0000007 is missing or incomplete"):
        run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save))
    assert sorted(os.listdir(save)) == ["latest_checkpointed_iteration.txt"]  # nothing touched


def test_renamed_variant_key_is_refused_and_old_checkpoints_still_read(tmp_path):
    """``model.projection`` became ``model.variant``: a config naming the old key gets one line
    naming the new one; a checkpoint's stored config and shape keys are read under the new name."""
    from crnet_megatron.checkpoint.resume import check_compatible
    from crnet_megatron.config import run_config

    path = tmp_path / "old.yaml"
    path.write_text("model:\n  projection: lowrank\n")
    with pytest.raises(ValueError, match=r"model.projection was renamed to model.variant; "
                                         r"write model.variant: 'lowrank'"):
        load_run_config(str(path))
    stored = run_config.from_mapping({"model": {"projection": "lowrank"}}, legacy=True)
    assert stored["model"]["variant"] == "lowrank" and "projection" not in stored["model"]
    cfg = load_run_config(None, ["model.variant=lowrank"])
    common = {"path": "iter_0000001", "model_shape": dict(run_config.shape_keys(cfg))}
    common["model_shape"]["projection"] = common["model_shape"].pop("variant")
    check_compatible(common, run_config.shape_keys(cfg))  # same model under the old name
    with pytest.raises(ValueError, match=r"model.variant: checkpoint 'lowrank' vs config 'crnet'"):
        check_compatible(common, run_config.shape_keys(load_run_config(None)))


def test_readme_key_table_is_the_declared_keys():
    """README's key table is ``crnet-train --list-keys``, read off the one declaration per key."""
    import pathlib
    import subprocess
    import sys

    from crnet_megatron.config import keys

    listed = subprocess.run([sys.executable, "-m", "crnet_megatron.cli.train", "--list-keys"],
                            capture_output=True, text=True, timeout=120, check=True).stdout
    assert listed == keys.key_table()
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    marker = "(tests/test_run_config.py keeps them equal) -->\n"
    start = readme.index(marker) + len(marker)
    assert readme[start:readme.index("<!-- end of key table -->")] == listed
    assert listed.count("\n| `") == sum(1 for _ in keys.all_keys())


def test_every_declared_key_has_a_doc_and_a_default_of_its_type():
    from crnet_megatron.config import keys

    for section, f in keys.all_keys():
        assert f.metadata["doc"], f"{section}.{f.name} has no doc"
        assert isinstance(f.default, f.metadata["types"]), f"{section}.{f.name}'s default"
        if f.metadata["choices"]:
            assert f.default in f.metadata["choices"], f"{section}.{f.name}'s default"
