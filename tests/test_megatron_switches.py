"""Megatron switches are honoured or refused, never silently ignored; sequence parallel is on by
default where CR-Net needs it; every run records the versions it ran with."""

import pytest
import torch

from crnet_megatron.config.run_config import load_run_config
from crnet_megatron.training.preflight import sequence_parallel_warning
from tests.helpers import SEQ, VOCAB, batch, scaled, tiny_config

pytestmark = pytest.mark.quick  # python -m pytest -m quick: a first check


@pytest.mark.parametrize("overrides,pattern", [
    (dict(fp8="hybrid"), r"fp8='hybrid' is invalid: FP8 is not supported"),
    (dict(cuda_graph_impl="local"), r"cuda_graph_impl='local' is invalid: CUDA graphs"),
    (dict(context_parallel_size=2), r"context_parallel_size=2 is invalid: context parallelism"),
    (dict(cpu_offloading=True), r"cpu_offloading=True is invalid: activation offloading"),
    (dict(recompute_granularity="selective", recompute_modules=["core_attn", "moe"]),
     r"recompute_modules=\['core_attn', 'moe'\] is invalid: the CR-Net layers honour"),
])
def test_refused_switches_name_themselves(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny_config(**overrides)


@pytest.mark.parametrize("sets,pattern", [
    (["recompute.recompute_modules=[mlp]"], r"recompute.recompute_modules = \['mlp'\] applies only "
                                             r"with recompute.recompute_granularity: selective"),
    (["recompute.recompute_granularity=selective", "recompute.recompute_modules=[moe_act]"],
     r"recompute.recompute_modules = \['moe_act'\]: the CR-Net layers honour"),
])
def test_refused_yaml_keys_name_the_key(sets, pattern):
    with pytest.raises(ValueError, match=pattern):
        load_run_config(None, sets)


def test_selective_mlp_and_layernorm_save_memory_and_keep_gradients(megatron_single):
    """Honoured, not ignored: each module recomputed saves measured bytes, and the gradients
    (betas of both signs) equal those without recompute."""
    from crnet_megatron import build_model
    from crnet_megatron.diagnostics.profiling import saved_activation_storage_bytes
    from tests.helpers import randomize_betas

    ids, pos, labels = batch()
    saved, grads = {}, {}
    for name, modules in [("none", None), ("mlp", ["mlp"]), ("layernorm", ["layernorm"]),
                          ("both", ["mlp", "layernorm"])]:
        kw = dict(recompute_granularity="selective", recompute_modules=modules) if modules else {}
        model = build_model(tiny_config(**kw), VOCAB, SEQ, seed=3)
        randomize_betas(model)
        saved[name], loss = saved_activation_storage_bytes(
            lambda: model(ids, pos, None, labels=labels).sum(), list(model.parameters()))
        loss.backward()
        grads[name] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert saved["mlp"] < 0.9 * saved["none"] and saved["layernorm"] < 0.9 * saved["none"]
    assert saved["both"] < min(saved["mlp"], saved["layernorm"])
    # fp32; the recomputed forward sums in another order (measured worst: 2e-6 absolute)
    for name in ("mlp", "layernorm", "both"):
        for k, g in grads[name].items():
            torch.testing.assert_close(g, grads["none"][k], **scaled(grads["none"][k], 1e-4))


@pytest.mark.parametrize("variant,tp,expected", [
    ("crnet", 2, True), ("lowrank", 2, True), ("dense", 2, True), ("crnet", 1, False),
    ("dense", 1, False)])
def test_sequence_parallel_is_on_by_default_under_tp_for_every_variant(variant, tp, expected):
    """Like with like: dense gets SP at TP > 1 as CR-Net does (crnet-compare, benchmarks); an
    explicit false stays false."""
    cfg = load_run_config(None, [f"model.variant={variant}",
                                 f"parallel.tensor_model_parallel_size={tp}"])
    assert cfg["parallel"]["sequence_parallel"] is expected
    assert sequence_parallel_warning(cfg) is None
    off = load_run_config(None, [f"model.variant={variant}",
                                 f"parallel.tensor_model_parallel_size={tp}",
                                 "parallel.sequence_parallel=false"])
    assert off["parallel"]["sequence_parallel"] is False


def test_turning_sequence_parallel_off_warns_with_its_flop_cost():
    cfg = load_run_config(None, ["parallel.tensor_model_parallel_size=2",
                                 "parallel.sequence_parallel=false"])
    line = sequence_parallel_warning(cfg)
    assert line.startswith("warning: parallel.sequence_parallel is false at "
                           "tensor_model_parallel_size=2")
    ratio = float(line.split("with sequence parallel (")[1].split("x)")[0])
    assert ratio > 1.0 and "GFLOP of forward GEMM per CR-Net layer" in line


def test_runs_record_their_versions(tiny_dataset, tmp_path):

    import platform

    import megatron.core
    import torch

    from crnet_megatron.checkpoint.resume import iteration_dir, read_checkpoint
    from crnet_megatron.parallel.environment import banner
    from tests.driver_utils import driver_cfg, run_in_process

    line = banner()  # read from package metadata; checked against the imported modules
    assert line.startswith(f"versions: python {platform.python_version()}, ")
    assert f"torch {torch.__version__}," in line
    # (0.19's __version__ may carry a local "+<git hash>" of the working directory)
    public = megatron.core.__version__.split("+")[0]
    assert f"megatron-core {public}," in line
    save = tmp_path / "run"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", str(save), "schedule.train_iters=2"))
    assert f"# {line}" in (save / "config.yaml").read_text().splitlines()[:3]
    common = read_checkpoint(iteration_dir(str(save), 2))
    assert common["versions"]["megatron-core"] == public
    assert load_run_config(str(save / "config.yaml"))["schedule"]["train_iters"] == 2
