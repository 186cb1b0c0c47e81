"""One checkpoint format for the Transformer Engine and local backends: a model that names its
parameters exactly as the TE spec does (``testing.te_standin``; TE itself needs CUDA) trains and
saves, and the real commands (export, eval, generate, resume on the local spec) take its
checkpoint; a local checkpoint resumes under the TE names; load errors name the keys."""

import json

import pytest
import torch

from tests.driver_utils import driver_cfg, run_in_process

NORM_KEYS = ("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight",
             "decoder.layers.0.mlp.linear_fc1.layer_norm_weight")


@pytest.fixture
def te_names(monkeypatch):
    """Build every model with the TE backend's parameter names (as on a GPU image)."""
    from crnet_megatron.model import specs
    from tests.te_standin import te_backend_modules

    local = specs._backend_modules
    monkeypatch.setattr(specs, "te_available", lambda: True)
    monkeypatch.setattr(specs, "_backend_modules",
                        lambda backend: te_backend_modules() if backend == "te" else local(backend))
    return monkeypatch


def _logits(path, backend):
    from crnet_megatron.export.loader import load_megatron_model, single_process
    from crnet_megatron.model import specs

    with single_process():
        if backend == "te":  # the loader builds the local spec; build the TE names instead
            real = specs.get_crnet_decoder_block_spec
            specs_fn = lambda c, backend=None, **kw: real(c, backend="te", **kw)  # noqa: E731
            from crnet_megatron.parallel import build

            build.get_crnet_decoder_block_spec = specs_fn
            try:
                model, _ = load_megatron_model(path)
            finally:
                build.get_crnet_decoder_block_spec = real
        else:
            model, _ = load_megatron_model(path)
        names = set(model.state_dict())
        ids = torch.arange(24)[None] % 200
        return model(ids, torch.arange(24)[None], None).float(), names


def test_te_named_checkpoint_exports_evaluates_generates_and_resumes(tiny_dataset, tmp_path,
                                                                     te_names, capsys):
    from crnet_megatron.checkpoint.checkpointing import _checkpoint_keys, iteration_dir
    from crnet_megatron.cli.evaluate import main as eval_main
    from crnet_megatron.cli.export import main as export_main
    from crnet_megatron.cli.generate import main as gen_main

    save = str(tmp_path / "run")
    cfg = driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=4",
                     "model.crnet_beta_init=-0.7")
    run_in_process(cfg)
    keys = _checkpoint_keys(iteration_dir(save, 4))
    assert set(NORM_KEYS) <= keys and not any("layers.0.input_layernorm" in k for k in keys)
    te_logits, te_names_seen = _logits(save, "te")
    assert any(n.endswith("linear_qkv.layer_norm_weight") for n in te_names_seen)
    te_names.undo()  # from here on: the local spec, as on a CPU

    local_logits, local_names = _logits(save, "local")
    assert "decoder.layers.0.input_layernorm.weight" in local_names
    torch.testing.assert_close(local_logits, te_logits, rtol=0, atol=0)
    assert export_main([save, str(tmp_path / "export")]) == 0
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(tmp_path / "export"):  # readable like any HF export (not 0600)
        mode = stat.S_IMODE(os.stat(tmp_path / "export" / name).st_mode)
        assert mode == 0o666 & ~umask, (name, oct(mode))
    out = capsys.readouterr().out
    diff = float(out.split("max |logits(export) - logits(Megatron)| = ")[1].split()[0])
    assert diff < 1e-4
    assert eval_main([save, "--data", tiny_dataset[2], "--tokens", "64"]) == 0
    from_checkpoint = json.loads(capsys.readouterr().out)
    assert from_checkpoint["tokens"] == 64
    assert eval_main([str(tmp_path / "export"), "--data", tiny_dataset[2], "--tokens", "64"]) == 0
    from_export = json.loads(capsys.readouterr().out)  # crnet-eval takes exports too
    assert from_export["tokens_sha256"] == from_checkpoint["tokens_sha256"]
    assert from_export["loss"] == pytest.approx(from_checkpoint["loss"], rel=1e-5)
    assert gen_main([save, "--prompt", "the", "--max-new-tokens", "3"]) == 0
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save,
                                        "schedule.train_iters=6", "model.crnet_beta_init=-0.7",
                                        "checkpoint.override_opt_param_scheduler=true"))
    assert [h["iteration"] for h in resumed["history"]] == [5, 6]


def test_local_checkpoint_resumes_under_te_names(tiny_dataset, tmp_path, te_names):
    save = str(tmp_path / "run")
    te_names.undo()
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=3"))
    local_logits, _ = _logits(save, "local")
    from crnet_megatron.model import specs
    from tests.te_standin import te_backend_modules

    local = specs._backend_modules
    te_names.setattr(specs, "te_available", lambda: True)
    te_names.setattr(specs, "_backend_modules",
                     lambda b: te_backend_modules() if b == "te" else local(b))
    te_logits, _ = _logits(save, "te")
    torch.testing.assert_close(te_logits, local_logits, rtol=0, atol=0)
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save,
                                        "schedule.train_iters=5",
                                        "checkpoint.override_opt_param_scheduler=true"))
    assert [h["iteration"] for h in resumed["history"]] == [4, 5]


def test_a_checkpoint_that_lacks_keys_names_them(tiny_dataset, tmp_path, te_names):
    """The error a user sees keeps its cause: the missing keys and what the checkpoint holds."""
    from crnet_megatron.export.loader import load_megatron_model, single_process
    from crnet_megatron.model import specs

    save = str(tmp_path / "run")
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    te_names.undo()
    te_names.setattr(specs, "TE_NORM_KEYS", {})  # a spec that forgot the key map
    with single_process(), pytest.raises(ValueError) as err:
        load_megatron_model(save)
    line = str(err.value)
    assert "\n" not in line and "does not match the model: missing" in line
    assert "decoder.layers.0.input_layernorm.weight" in line
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in line


def test_checkpoints_from_before_the_key_map_still_load(tiny_dataset, tmp_path, te_names):
    """Local checkpoints written before the dense norms took TE's keys (``input_layernorm``)
    load and resume as they are."""
    from crnet_megatron.checkpoint.checkpointing import _checkpoint_keys, iteration_dir
    from crnet_megatron.model import specs

    save = str(tmp_path / "run")
    te_names.undo()
    te_names.setattr(specs, "TE_NORM_KEYS", {})  # the old format
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    assert "decoder.layers.0.input_layernorm.weight" in _checkpoint_keys(iteration_dir(save, 2))
    old_logits, _ = _logits(save, "local")
    te_names.undo()
    new_logits, _ = _logits(save, "local")
    torch.testing.assert_close(new_logits, old_logits, rtol=0, atol=0)
    resumed = run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save,
                                        "schedule.train_iters=3",
                                        "checkpoint.override_opt_param_scheduler=true"))
    assert [h["iteration"] for h in resumed["history"]] == [3]
