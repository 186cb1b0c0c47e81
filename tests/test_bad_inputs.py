"""Corrupt data, tokenizers and configs fail at start-up with one line naming the file or key,
in bounded time and memory, and nothing is written."""

import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch

from crnet_megatron.config.run_config import load_run_config
from crnet_megatron.data.validate import _HEADER, read_index, validate_prefix
from tests.driver_utils import driver_cfg, run_in_process


def _copy_prefix(prefix, dst):
    for ext in (".bin", ".idx"):
        shutil.copy(prefix + ext, str(dst) + ext)
    return str(dst)


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_flipped_count_in_index_fails_fast(tiny_dataset, tmp_path):
    """A sequence count of 2^40 (one flipped byte) made megatron-core allocate without bound; it
    is now refused from the file size alone."""
    p = _copy_prefix(tiny_dataset[0], tmp_path / "x")
    _patch(p + ".idx", 18, struct.pack("<Q", 1 << 40))
    with pytest.raises(ValueError, match=r"x\.idx: 1099511627776 sequences .* need .* bytes"):
        read_index(p)


def test_inconsistent_pointers_and_boundaries(tiny_dataset, tmp_path):
    p = _copy_prefix(tiny_dataset[0], tmp_path / "x")
    seqs = struct.unpack("<Q", open(p + ".idx", "rb").read(_HEADER)[18:26])[0]
    _patch(p + ".idx", _HEADER + 4 * seqs + 8 * 3, struct.pack("<q", 12345))
    with pytest.raises(ValueError, match=r"x\.idx: sequence pointers do not follow"):
        read_index(p)
    p = _copy_prefix(tiny_dataset[0], tmp_path / "y")
    _patch(p + ".idx", _HEADER + 12 * seqs + 8, struct.pack("<q", 10 ** 9))
    with pytest.raises(ValueError, match=r"y\.idx: document boundaries are not monotone"):
        read_index(p)
    p = _copy_prefix(tiny_dataset[0], tmp_path / "z")
    _patch(p + ".idx", 17, bytes([6]))  # float64 tokens
    with pytest.raises(ValueError, match=r"z\.idx: token dtype code 6 is not an integer type"):
        read_index(p)


def test_truncated_or_mismatched_bin(tiny_dataset, tmp_path):
    p = _copy_prefix(tiny_dataset[0], tmp_path / "cut")
    size = os.path.getsize(p + ".bin")
    with open(p + ".bin", "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(ValueError, match=rf"cut\.bin: has {size - 10} bytes, its index .* "
                                         rf"implies {size}"):
        read_index(p)
    p = _copy_prefix(tiny_dataset[0], tmp_path / "big")
    with open(p + ".bin", "ab") as f:
        f.write(b"\0" * 64)  # another corpus's larger .bin
    with pytest.raises(ValueError, match=r"big\.bin: has .* bytes"):
        read_index(p)


def test_token_ids_outside_the_vocabulary(tiny_dataset, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "wide")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for n in range(20):
        builder.add_document(torch.arange(n * 50, n * 50 + 50), [50])
    builder.finalize(prefix + ".idx")
    validate_prefix(prefix, 1000)
    with pytest.raises(ValueError, match=r"wide\.bin: token id \d+ .* vocabulary \[0, 512\)"):
        validate_prefix(prefix, 512)
    # through the driver: one line at start-up instead of an IndexError at step 1
    cfg = driver_cfg(tiny_dataset, tmp_path / "c", None, f"data.data_path=[{prefix}]")
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary \[0, 512\)"):
        run_in_process(cfg)


def test_every_batch_is_checked_against_the_vocabulary():
    from crnet_megatron.data.validate import check_batch_tokens

    check_batch_tokens(torch.tensor([[0, 511]]), 512, ["p"])
    with pytest.raises(ValueError, match=r"from \['p'\] holds token id 512"):
        check_batch_tokens(torch.tensor([[0, 512]]), 512, ["p"])


def test_bad_tokenizer_and_input_files(tiny_dataset, tmp_path, capsys):
    from crnet_megatron.cli.preprocess import main as preprocess_main
    from crnet_megatron.data.preprocess import HFTokenizer, preprocess_jsonl

    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=r"tok\.json' is not a valid HF tokenizers JSON"):
        HFTokenizer(str(bad_tok))
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin\.jsonl:2: not UTF-8 text"):
        preprocess_jsonl([str(latin)], str(tmp_path / "o"), tiny_dataset[1], progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": "unterminated\n')
    with pytest.raises(SystemExit) as exit_info:
        preprocess_main(["--input", str(broken), "--output-prefix", str(tmp_path / "b"),
                         "--vocab-size", "300", "--tokenizer-out", str(tmp_path / "t.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken.jsonl:2: not valid JSON" in err[0]
    assert not list(tmp_path.glob("b_text_document*")) and not (tmp_path / "t.json").exists()


def test_an_empty_input_trains_no_tokenizer_and_leaves_nothing(tmp_path, capsys):
    """An empty JSONL with --vocab-size: one line; no tokenizer, no dataset written (the
    tokenizer was once trained and left behind)."""
    from crnet_megatron.cli.preprocess import main as preprocess_main

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SystemExit) as stop:
        preprocess_main(["--input", str(empty), "--output-prefix", str(tmp_path / "b"),
                         "--vocab-size", "300", "--tokenizer-out", str(tmp_path / "t.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "nothing to train a tokenizer on" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]


def test_what_killed_writers_left_is_removed_at_the_next_start(tiny_dataset, tmp_path, capsys):
    """A killed preprocessing leaves its .tmp files beside the outputs: the next run of the
    same output removes them, with a line; other files are left alone (the export's hidden
    directory: ``test_export``)."""
    from crnet_megatron.data.preprocess import output_paths, preprocess_jsonl

    prefix = str(tmp_path / "d")
    bin_path, idx_path = output_paths(prefix, "text")
    stale = [tmp_path / f".{os.path.basename(p)}.0123456789ab.tmp" for p in (bin_path, idx_path)]
    keep = tmp_path / ".notes.0123456789ab.tmp"
    for path in stale + [keep]:
        path.write_bytes(b"x" * 100)
    preprocess_jsonl([tiny_dataset[2]], prefix, tiny_dataset[1], progress=False)
    assert not any(p.exists() for p in stale) and keep.exists()
    assert capsys.readouterr().out.count("left by an earlier dataset writer") == 2


def test_custom_end_of_document_token(tiny_dataset, tmp_path):
    """A tokenizer whose EOD token has an unguessable name works through data.eod_token."""
    from crnet_megatron.data.corpus import builtin_corpus, train_tokenizer
    from crnet_megatron.data.preprocess import HFTokenizer, preprocess_jsonl

    tok = train_tokenizer(builtin_corpus(max_chars=50_000), 400)
    vocab = json.loads(tok.to_str())
    vocab["added_tokens"][0]["content"] = "<|doc_end|>"  # rename the special token
    model_vocab = vocab["model"]["vocab"]
    old = next(k for k, v in model_vocab.items() if v == vocab["added_tokens"][0]["id"])
    model_vocab["<|doc_end|>"] = model_vocab.pop(old)
    path = tmp_path / "tok.json"
    path.write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"no end-of-document token .* data\.eod_token"):
        HFTokenizer(str(path))
    assert HFTokenizer(str(path), "<|doc_end|>").eod == vocab["added_tokens"][0]["id"]
    prefix = preprocess_jsonl([tiny_dataset[2]], str(tmp_path / "d"), str(path), append_eod=True,
                              eod_token="<|doc_end|>", progress=False)["text"]
    result = run_in_process(driver_cfg((prefix, str(path), None), tmp_path / "c", None,
                                       "data.eod_token=<|doc_end|>", "schedule.train_iters=2"))
    assert len(result["history"]) == 2


@pytest.mark.parametrize("setting,key", [
    ("eval.eval_iters=0", "eval.eval_iters"), ("logging.log_interval=0", "logging.log_interval"),
    ("eval.eval_interval=0", "eval.eval_interval"),
    ("schedule.micro_batch_size=0", "schedule.micro_batch_size"),
    ("schedule.train_iters=0", "schedule.train_iters"),
    ("schedule.lr_warmup_fraction=1.0", "schedule.lr_warmup_fraction"),
    ("optimizer.lr=-0.1", "optimizer.lr"), ("optimizer.adam_beta2=1.0", "optimizer.adam_beta2"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("schedule.lr_decay_style=cosin", "schedule.lr_decay_style"),
    ("recompute.recompute_granularity=ful", "recompute.recompute_granularity"),
    ("model.crnet_rank=[16, 0]", "model.crnet_rank"),
])
def test_out_of_range_values_name_the_key(setting, key):
    with pytest.raises(ValueError, match=rf"config key {key} = .* (must be|is not one of)"):
        load_run_config(None, [setting])


def test_empty_config_unknown_and_removed_keys(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(ValueError, match=r"empty\.yaml' is empty"):
        load_run_config(str(empty))
    with pytest.raises(ValueError, match=r"unknown config key checkpoint\.ckpt_format"):
        load_run_config(None, ["checkpoint.ckpt_format=torch_dist"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match=r"bad\.yaml' is not valid YAML"):
        load_run_config(str(bad))


def test_rotary_base_reaches_the_model(megatron_single):
    from crnet_megatron.parallel.build import build_model
    from tests.helpers import batch, tiny_config

    ids, pos, _ = batch()
    logits = {}
    for base in (10000, 100):
        torch.manual_seed(0)
        model = build_model(tiny_config(), vocab_size=96, max_sequence_length=16,
                            rotary_base=base)
        dim = model.rotary_pos_emb.inv_freq.numel() * 2
        expect = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        torch.testing.assert_close(model.rotary_pos_emb.inv_freq.cpu(), expect)
        logits[base] = model(ids, pos, None).detach()
    assert not torch.allclose(logits[10000], logits[100])


def test_main_prints_one_line(tmp_path, capsys):
    from crnet_megatron.cli.train import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"crnet-train: error: config file '{tmp_path / 'missing.yaml'}' does not exist"]
