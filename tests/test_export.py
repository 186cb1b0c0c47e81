"""Export round trips: a TP=2 or PP=2 checkpoint of each variant, exported, gives the Megatron
model's loss and logits; transformers loads it (remote code, or LlamaForCausalLM when dense)."""

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.driver_utils import driver_cfg
from tests.helpers import run_distributed, scaled

SEQ = 32  # driver_utils.TINY's model.seq_length
WINDOWS = 4  # even: two per step (interleaved schedules run micro-batches in groups of PP)


def _windows(vocab: int) -> np.ndarray:
    return np.random.default_rng(5).integers(0, vocab, WINDOWS * SEQ + 1)


def _train_and_score(rank, world, cfg, tokens):
    """Train through the real driver, then the Megatron model's loss on fixed windows, computed
    in the run's own TP/PP layout (the schedule used by training-time eval)."""
    from crnet_megatron.data.batches import SampleIterator
    from crnet_megatron.data.token_windows import TokenWindows
    from crnet_megatron.parallel.groups import destroy_distributed
    from crnet_megatron.parallel.schedule import mean_loss
    from crnet_megatron.training.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        trainer.train()
        device = next(trainer.model[0].parameters()).device
        it = SampleIterator(TokenWindows(tokens, SEQ, WINDOWS), 1, 0, 1, 0, device)
        # two windows per step: an interleaved schedule runs micro-batches in groups of PP
        return mean_loss(trainer.model, it, WINDOWS // 2, 2, SEQ, 1)
    finally:
        destroy_distributed()


def _hf_loss(model, tokens) -> float:
    ids = torch.as_tensor(tokens, dtype=torch.long)
    losses = []
    for i in range(WINDOWS):
        w = ids[i * SEQ:(i + 1) * SEQ + 1]
        logits = model(w[None, :-1]).logits[0].float()
        losses.append(F.cross_entropy(logits, w[1:]))
    return float(torch.stack(losses).mean())


LAYOUTS = {"tp2": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pipeline_model_parallel_size=2"],
           "pp2-vpp2": ["parallel.pipeline_model_parallel_size=2",  # 4 chunks of one layer
                        "parallel.virtual_pipeline_model_parallel_size=2",
                        "schedule.micro_batch_size=2"]}


@pytest.mark.parametrize("projection,layout", [
    ("crnet", "tp2"), ("crnet", "pp2-vpp2"), ("lowrank", "tp2"), ("lowrank", "pp2"),
    ("dense", "tp2"), ("dense", "pp2")])
def test_export_matches_megatron(tiny_dataset, tmp_path, projection, layout):
    from crnet_megatron.cli.export import main as export_main
    from crnet_megatron.export.loader import (
        load_megatron_model,
        megatron_logits,
        single_process,
    )
    from crnet_megatron.export.modeling_crnet import CRNetForCausalLM

    save, out = str(tmp_path / "run"), str(tmp_path / "export")
    cfg = driver_cfg(tiny_dataset, str(tmp_path / "cache"), save, f"model.variant={projection}",
                     "model.crnet_beta_init=-0.7", "schedule.train_iters=3",
                     "eval.eval_interval=3", *LAYOUTS[layout])
    from tokenizers import Tokenizer

    tokens = _windows(Tokenizer.from_file(tiny_dataset[1]).get_vocab_size())
    megatron_loss = run_distributed(_train_and_score, 2, cfg, tokens, timeout=400)[-1]
    assert export_main([save, out]) == 0

    files = sorted(os.listdir(out))
    config = json.load(open(os.path.join(out, "config.json")))
    if projection == "dense":
        assert config["architectures"] == ["LlamaForCausalLM"] and "modeling_crnet.py" not in files
    else:
        assert config["crnet_projection"] == projection and "modeling_crnet.py" in files
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(files)
    exported = CRNetForCausalLM.from_export(out).eval()
    with torch.no_grad():
        hf_loss = _hf_loss(exported, tokens)
    # the TP=2/PP=2 run's own loss on the same windows (fp32; reductions in another order)
    assert hf_loss == pytest.approx(megatron_loss, rel=2e-6)
    ids = torch.as_tensor(tokens[:SEQ])[None]
    with single_process():
        model, loaded = load_megatron_model(save)
        ref = megatron_logits(model, ids)[..., :config["vocab_size"]]
    with torch.no_grad():
        got = exported(ids).logits
    torch.testing.assert_close(got, ref, **scaled(ref, 1e-5))
    betas = [t for n, t in exported.named_parameters() if n.endswith("beta")]
    assert (projection == "crnet") == bool(betas)


def test_transformers_loads_exports(tiny_dataset, tmp_path):
    """AutoModelForCausalLM (trust_remote_code) gives our logits; a dense export is a plain
    LlamaForCausalLM with the same logits."""
    transformers = pytest.importorskip("transformers")
    from crnet_megatron.cli.export import main as export_main
    from crnet_megatron.export.modeling_crnet import CRNetForCausalLM
    from tests.driver_utils import run_in_process

    ids = torch.arange(20)[None] % 200
    for projection, cls in (("crnet", "CRNetForCausalLM"), ("dense", "LlamaForCausalLM")):
        save, out = str(tmp_path / projection), str(tmp_path / f"{projection}_export")
        cfg = driver_cfg(tiny_dataset, str(tmp_path / "cache"), save, f"model.variant={projection}",
                         "schedule.train_iters=2", "eval.eval_interval=2",
                         "model.num_query_groups=2")
        run_in_process(cfg)
        assert export_main([save, out, "--no-verify"]) == 0
        ours = CRNetForCausalLM.from_export(out).eval()
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            out, trust_remote_code=projection != "dense").eval()
        assert type(theirs).__name__ == cls
        with torch.no_grad():
            expect = ours(ids).logits
            torch.testing.assert_close(theirs(ids).logits, expect, **scaled(expect, 1e-5))


def test_export_refuses_a_nonempty_directory(tiny_dataset, tmp_path, capsys):
    from crnet_megatron.cli.export import main as export_main
    from tests.driver_utils import run_in_process

    save, out = str(tmp_path / "run"), tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_in_process(driver_cfg(tiny_dataset, str(tmp_path / "cache"), save,
                              "schedule.train_iters=1", "eval.eval_interval=1"))
    with pytest.raises(SystemExit) as e:
        export_main([save, str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not empty" in err[0] and str(out) in err[0]
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    os.remove(os.path.join(save, "tokenizer.json"))  # the run's copy gone, and the original
    cfg_tok = tiny_dataset[1]
    moved = cfg_tok + ".moved"
    os.replace(cfg_tok, moved)
    try:
        with pytest.raises(SystemExit):
            export_main([save, str(tmp_path / "export2")])
    finally:
        os.replace(moved, cfg_tok)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no tokenizer for checkpoint" in err[0] and "--tokenizer" in err[0]
    assert not os.path.exists(tmp_path / "export2")


def test_a_sharded_export_holds_the_same_tensors_and_loads_everywhere(tiny_dataset, tmp_path,
                                                                      capsys):
    """``--max-shard-size 200KB``: HF's shard names and index; every shard within the size
    unless it holds one larger tensor; the tensors bitwise those of the one-file export; the
    export's own check (one layer at a time) and transformers give the Megatron logits."""
    transformers = pytest.importorskip("transformers")
    from safetensors import safe_open

    from crnet_megatron.cli.export import main as export_main
    from crnet_megatron.export.loader import (
        load_megatron_model,
        megatron_logits,
        single_process,
    )
    from crnet_megatron.export.modeling_crnet import INDEX, CRNetForCausalLM
    from tests.driver_utils import run_in_process

    save = str(tmp_path / "run")
    run_in_process(driver_cfg(tiny_dataset, str(tmp_path / "cache"), save,
                              "schedule.train_iters=2", "eval.eval_interval=2",
                              "model.crnet_beta_init=-0.7"))
    one, many = str(tmp_path / "one"), str(tmp_path / "many")
    assert export_main([save, one, "--no-verify"]) == 0
    capsys.readouterr()
    left = tmp_path / ".many.k3j2h1g0.tmp"  # what a killed export of ``many`` leaves
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"x" * 100)
    assert export_main([save, many, "--max-shard-size", "200KB"]) == 0
    out = capsys.readouterr().out
    assert not left.exists() and "left by an earlier export writer" in out
    diff = float(out.split("| = ")[1].split()[0])
    index = json.load(open(os.path.join(many, INDEX)))
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert "model.safetensors" not in os.listdir(many)
    with safe_open(os.path.join(one, "model.safetensors"), "pt") as f:
        expect = {k: f.get_tensor(k) for k in f.keys()}
    got = {}
    for shard in shards:
        with safe_open(os.path.join(many, shard), "pt") as f:
            part = {k: f.get_tensor(k) for k in f.keys()}
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= 200_000 or len(part) == 1
        assert all(index["weight_map"][k] == shard for k in part)
        got.update(part)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                   for t in got.values())
    assert got.keys() == expect.keys() and all(torch.equal(got[k], expect[k]) for k in got)
    ids = torch.arange(SEQ)[None] % 200
    with single_process():
        model, _ = load_megatron_model(save)
        ref = megatron_logits(model, ids)[..., :_vocab(many)]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(many, trust_remote_code=True)
    with torch.no_grad():
        for logits in (theirs.eval()(ids).logits, CRNetForCausalLM.from_export(many)(ids).logits):
            torch.testing.assert_close(logits, ref, **scaled(ref, 1e-5))
    assert diff <= scaled(ref, 1e-5)["atol"]


def _vocab(export_dir: str) -> int:
    return json.load(open(os.path.join(export_dir, "config.json")))["vocab_size"]


def test_a_bad_shard_size_is_one_line(tiny_dataset, tmp_path, capsys):
    from crnet_megatron.cli.export import main as export_main

    with pytest.raises(SystemExit) as stop:
        export_main([str(tmp_path), str(tmp_path / "out"), "--max-shard-size", "5 parsecs"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-shard-size '5 parsecs' is not a size" in err[0]
