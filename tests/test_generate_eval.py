"""Cached generation equals full-sequence forwards; sampling controls; crnet-eval is
deterministic and equals a direct computation; bad inputs get one line."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from crnet_megatron.export.generation import generate, sample_next
from crnet_megatron.export.modeling_crnet import CRNetForCausalLM, CRNetLlamaConfig
from tests.driver_utils import driver_cfg, run_in_process
from tests.helpers import scaled


def _model(projection, seed=0):
    torch.manual_seed(seed)
    ranks = [None, 8, 12, 8] if projection != "dense" else None
    config = CRNetLlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=40, crnet_projection=projection,
                              crnet_layer_ranks=ranks)
    model = CRNetForCausalLM(config).eval()
    betas = [p for n, p in model.named_parameters() if n.endswith("beta")]
    with torch.no_grad():
        for k, p in enumerate(betas):  # mixed signs, as training leaves them
            p.fill_((-1) ** k * (0.3 + 0.1 * (k % 10)))
    return model


@pytest.mark.parametrize("projection", ["crnet", "lowrank", "dense"])
def test_cached_decoding_equals_full_forward(projection):
    model = _model(projection)
    prompt = [3, 14, 15, 92, 65, 35]
    cached, logits_c = generate(model, prompt, 12, use_cache=True, return_logits=True)
    full, logits_f = generate(model, prompt, 12, use_cache=False, return_logits=True)
    assert cached == full and len(cached) == 12
    for step, (a, b) in enumerate(zip(logits_c, logits_f)):
        torch.testing.assert_close(a, b, **scaled(b, 1e-5), msg=f"step {step}")
    # and against one forward of the final sequence: every position's logits
    with torch.no_grad():
        whole = model(torch.tensor([prompt + cached[:-1]])).logits[0]
    for step, a in enumerate(logits_c):
        expect = whole[len(prompt) - 1 + step]
        torch.testing.assert_close(a[0], expect, **scaled(expect, 1e-5))


def test_cache_feeds_several_tokens_at_once():
    """A multi-token step after a cache (offset causal mask) equals the full forward."""
    from crnet_megatron.export.modeling_crnet import KVCache

    model = _model("crnet", seed=1)
    ids = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache()
        a = model(ids[:, :7], cache=cache).logits
        b = model(ids[:, 7:], cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), full, **scaled(full, 1e-5))


def test_sampling_controls():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0, 3.0]])
    assert sample_next(logits).item() == 1
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    # top_p: probabilities ~[.003, .50, .45, .0005, .05]; 0.9 keeps {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.9, generator=g).item() for _ in range(200)}
    assert draws == {1, 2}
    draws = {sample_next(logits, 1.0, top_p=0.3, generator=g).item() for _ in range(50)}
    assert draws == {1}


def test_generation_stops_at_sequence_length_and_refuses_long_prompts():
    model = _model("crnet")
    assert len(generate(model, list(range(30)), 100)) == 10  # 40 positions in all
    with pytest.raises(ValueError, match="the prompt has 41 tokens, more than the model's sequence length 40"):
        generate(model, list(range(41)), 5)


def test_eval_is_deterministic_and_equals_direct_loss(tiny_dataset, tmp_path, capsys):
    from crnet_megatron.cli.evaluate import main as eval_main
    from crnet_megatron.export.generation import load_for_generation

    save = str(tmp_path / "run")
    run_in_process(driver_cfg(tiny_dataset, str(tmp_path / "cache"), save,
                              "schedule.train_iters=2", "eval.eval_interval=2"))
    capsys.readouterr()
    results = []
    for data in (tiny_dataset[2], tiny_dataset[0], tiny_dataset[2]):  # jsonl, prefix, jsonl
        assert eval_main([save, "--data", str(data), "--tokens", "200",
                          "--output", str(tmp_path / "r.json")]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0] == results[2]
    r = results[0]
    assert r["tokens"] == 192 and r["windows"] == 6 and r["seq_length"] == 32
    assert json.load(open(tmp_path / "r.json")) == r
    # the indexed dataset holds the same documents, tokenized the same way, EOD after each
    assert results[1]["tokens_sha256"] == r["tokens_sha256"]
    assert results[1]["loss"] == pytest.approx(r["loss"], rel=1e-6)
    # direct: the exported model's token-mean cross entropy over the same windows
    from crnet_megatron.data.preprocess import HFTokenizer
    from crnet_megatron.data.token_windows import token_stream

    model, _, _ = load_for_generation(save)
    stream = torch.as_tensor(token_stream(str(tiny_dataset[2]), HFTokenizer(tiny_dataset[1]),
                                          limit=201))
    losses = [F.cross_entropy(model(stream[i * 32:(i + 1) * 32][None]).logits[0],
                              stream[i * 32 + 1:(i + 1) * 32 + 1]) for i in range(6)]
    assert float(torch.stack(losses).mean()) == pytest.approx(r["loss"], rel=1e-5)


def test_generate_cli_and_bad_inputs(tiny_dataset, tmp_path, capsys):
    from crnet_megatron.cli.generate import main as gen_main

    save = str(tmp_path / "run")
    run_in_process(driver_cfg(tiny_dataset, str(tmp_path / "cache"), save,
                              "schedule.train_iters=2", "eval.eval_interval=2"))
    capsys.readouterr()
    assert gen_main([save, "--prompt", "The file", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The file") and "tokens/s" in out.err
    with pytest.raises(SystemExit) as e:
        gen_main([save, "--prompt", "word " * 200])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "crnet-generate: error: the prompt has" in err[0] and "sequence length 32" in err[0]
    # resuming a CR-Net checkpoint as another variant is refused before anything loads
    from crnet_megatron.cli.train import main as train_main
    from tests.driver_utils import TINY

    sets = TINY + [f"data.data_path=[{tiny_dataset[0]}]", f"data.tokenizer={tiny_dataset[1]}",
                   f"data.cache_dir={tmp_path / 'cache'}", f"checkpoint.save={save}",
                   "model.variant=lowrank"]
    config = tmp_path / "run.yaml"
    config.write_text("logging:\n  plot: false\n")
    with pytest.raises(SystemExit):
        train_main([str(config)] + [a for s in sets for a in ("--set", s)])
    err = capsys.readouterr().err.strip().splitlines()
    assert "another model shape" in err[-1] and "model.variant: checkpoint 'crnet' vs config 'lowrank'" in err[-1]


def test_export_of_another_variant_is_refused(tmp_path, capsys):
    """An export whose tensors do not match its config.json (here: CR-Net tensors, a lowrank
    config) gets one line naming both files; nothing is loaded."""
    import json as _json

    from safetensors.torch import save_file

    from crnet_megatron.cli.generate import main as gen_main

    model = _model("crnet")
    out = tmp_path / "export"
    out.mkdir()
    config = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
                  crnet_projection="lowrank", crnet_layer_ranks=[None, 8, 12, 8], eos_token_id=0)
    (out / "config.json").write_text(_json.dumps(config))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(out / "tokenizer.json"))
    with pytest.raises(SystemExit) as e:
        gen_main([str(out), "--prompt", "a"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert "model.safetensors does not match" in err[0] and "lowrank" in err[0] and "beta" in err[0]


def test_an_export_with_an_empty_tokenizer_is_one_line(tiny_dataset, tmp_path, capsys):
    """An export whose tokenizer.json is ``{}``: crnet-generate names the file in one line
    (it was a bare Exception from the tokenizers library)."""
    from crnet_megatron.cli.export import main as export_main
    from crnet_megatron.cli.generate import main as generate_main
    from tests.driver_utils import driver_cfg, run_in_process

    save, out = str(tmp_path / "run"), str(tmp_path / "export")
    run_in_process(driver_cfg(tiny_dataset, str(tmp_path / "c"), save, "schedule.train_iters=1",
                              "eval.eval_interval=1"))
    assert export_main([save, out, "--no-verify"]) == 0
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        f.write("{}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        generate_main([out, "--prompt", "hi", "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1
    assert "tokenizer.json' is not a valid HF tokenizers JSON" in err[0]
