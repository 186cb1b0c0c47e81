"""Small hostile files get one line naming the file or key, before anything is allocated or
run: export ``config.json`` sizes and types, crafted safetensors headers, a tokenizer whose
regular expression can take exponential time, a checkpoint's ``common.pt`` with missing keys or
wrong types, and blend weights that are not positive. The export cases run in a child with a
8 GiB address-space limit and a time limit, so a regression fails instead of swapping or
hanging CI."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.driver_utils import driver_cfg, run_in_process
from tests.helpers import read_common, write_common

CONFIG = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40,
              crnet_projection="crnet", crnet_layer_ranks=[None, 8, 12, 8], eos_token_id=0)

_CHILD = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))  # a CUDA torch maps 3.5 GB
from crnet_megatron.export.modeling_crnet import CRNetForCausalLM
out = {}
for d in sys.argv[1:]:
    try:
        CRNetForCausalLM.from_export(d)
        out[d] = "loaded"
    except ValueError as e:
        out[d] = str(e)
print(json.dumps(out))
"""


def _export(root, name, config=None, weights=None):
    """An export directory: a real model's tensors, with ``config`` or ``weights`` replaced."""
    from safetensors.torch import save_file

    from crnet_megatron.export.modeling_crnet import CRNetForCausalLM, CRNetLlamaConfig

    out = root / name
    out.mkdir()
    text = config if isinstance(config, str) else json.dumps(CONFIG if config is None else config)
    (out / "config.json").write_text(text)
    torch.manual_seed(0)
    model = CRNetForCausalLM(CRNetLlamaConfig(**CONFIG))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(out / "model.safetensors"))
    if weights is not None:
        weights(out / "model.safetensors")
    return str(out)


def _header_length(path, n):
    data = path.read_bytes()
    path.write_bytes(n.to_bytes(8, "little") + data[8:])


def _offsets_outside(path):
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = [0, 1 << 40]
    text = json.dumps(header).encode()
    text += b" " * (n - len(text)) if len(text) <= n else b""
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])


def _edit_header(edit):
    """A weights damage: ``edit(header)`` applied to the safetensors header, data unchanged."""
    def damage(path):
        data = path.read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        edit(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return damage


def _same_size_dtype(header):  # float32 bytes declared as int32: the same size, other numbers
    header["model.norm.weight"]["dtype"] = "I32"


def _overlap(header):  # two same-sized tensors declared over the same bytes
    header["model.layers.1.post_attention_layernorm.weight"]["data_offsets"] = \
        header["model.layers.1.input_layernorm.weight"]["data_offsets"]


def _sharded_index(weight_map_edit):
    """A weights damage: the file as one shard named by an index, ``weight_map_edit`` applied."""
    def damage(path):
        shard = path.parent / "model-00001-of-00001.safetensors"
        path.rename(shard)
        names = [k for k in json.loads(shard.read_bytes()[8:8 + int.from_bytes(
            shard.read_bytes()[:8], "little")]) if k != "__metadata__"]
        weight_map = {k: shard.name for k in names}
        weight_map_edit(weight_map)
        (path.parent / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    return damage


CASES = {
    "empty-config": ({}, None, "vocab_size=None must be a positive int"),
    "huge-vocab": (dict(CONFIG, vocab_size=10 ** 9), None,
                   "shape of lm_head.weight: file (97, 64), config (1000000000, 64)"),
    "huge-hidden": (dict(CONFIG, hidden_size=1 << 22, num_attention_heads=1 << 12), None,
                    "does not match"),
    "many-layers": (dict(CONFIG, num_hidden_layers=10 ** 9, crnet_layer_ranks=None), None,
                    "num_hidden_layers=1000000000 is more than"),
    "string-size": (dict(CONFIG, hidden_size="64"), None, "hidden_size='64' must be a positive int"),
    "malformed-json": ('{"vocab_size": 97,', None, "config.json is not valid JSON"),
    "not-an-object": ("[1, 2]", None, "holds list, not a JSON object"),
    "header-too-long": (None, lambda p: _header_length(p, 1 << 40),
                        "is not a valid safetensors file (header length"),
    "offsets-outside": (None, _offsets_outside, "do not hold"),
    "same-size-dtype": (None, _edit_header(_same_size_dtype),
                        "holds model.norm.weight as I32"),
    "other-torch-dtype": (dict(CONFIG, torch_dtype="bfloat16"), None,
                          "says torch_dtype='bfloat16'"),
    "overlapping-offsets": (None, _edit_header(_overlap), "tensors overlap or leave a gap"),
    "nested-config": ("[" * 200_000, None, "config.json is nested too deeply"),
    "index-outside": (None, _sharded_index(lambda m: m.update({"lm_head.weight": "../x.safetensors"})),
                      "weight_map must map tensor names to .safetensors files in the export"),
    "index-missing-shard": (None, _sharded_index(lambda m: m.update(
        {"lm_head.weight": "b.safetensors"})), "b.safetensors is missing or not a regular file"),
    "index-unplaced": (None, _sharded_index(lambda m: m.pop("lm_head.weight")),
                       "holds lm_head.weight, which the index places in None"),
}


def test_hostile_export_files_are_refused_before_building(tmp_path):
    dirs = {name: _export(tmp_path, name, config, weights)
            for name, (config, weights, _) in CASES.items()}
    dirs["intact"] = _export(tmp_path, "intact")
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, *dirs.values()], capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got[dirs["intact"]] == "loaded"
    for name, (_, _, message) in CASES.items():
        assert message in got[dirs[name]], (name, got[dirs[name]])
        assert "\n" not in got[dirs[name]]


@pytest.mark.parametrize("pattern,why", [
    ("(a+)+$", "repeats a group that itself repeats without bound"),
    ("(a|a?)+$", "repeats without bound a group that can match a text in several ways"),
    ("(.*a){12}$", "repeats a counted number of times a group that repeats without bound")])
def test_a_tokenizer_with_an_exploding_regex_is_refused(tiny_dataset, tmp_path, pattern, why):
    """A pre-tokenizer ``Split`` whose pattern takes exponential (or 12th-power) time on a
    crafted line (the last two once passed and ended in an 82-line Rust panic): refused when
    the tokenizer is opened, before any text is matched."""
    from crnet_megatron.data.preprocess import HFTokenizer

    tok = json.loads(open(tiny_dataset[1]).read())
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated",
         "invert": False}, tok["pre_tokenizer"]]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match=re.escape(f"the pattern {pattern!r} {why}")):
        HFTokenizer(str(path))
    assert HFTokenizer(tiny_dataset[1]).vocab_size == 512  # the real one passes


def test_a_library_panic_is_one_line(capsys):
    """A Rust panic inside tokenizers (a BaseException, not an Exception) ends a command with
    one line, not a Rust backtrace and a Python traceback."""
    from crnet_megatron.cli.common import run_cli

    class PanicException(BaseException):  # pyo3's, by name
        pass

    def panics():
        raise PanicException("called `Result::unwrap()` on an `Err` value: BacktrackLimit\nmore")

    with pytest.raises(SystemExit) as stop:
        run_cli("crnet-preprocess", panics)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "BacktrackLimit" in err[0]


COMMON_DAMAGE = [
    ({"iteration": None}, "common.pt lacks 'iteration'"),
    ({"iteration": "2"}, "common.pt holds iteration='2', expected int >= 0"),
    ({"consumed_samples": -8}, "common.pt holds consumed_samples=-8, expected int >= 0"),
    ({"scheduler": [1]}, "common.pt holds scheduler=[1], expected dict"),
]


def test_common_state_with_missing_keys_or_wrong_types(tiny_dataset, tmp_path):
    from crnet_megatron.checkpoint.resume import read_checkpoint
    from crnet_megatron.checkpoint.safe_checkpoint import IncompleteCheckpointError

    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    path = save / "iter_0000002"
    intact = read_common(path)
    write_common(path, intact)  # what a hand edit leaves (no checksums.json)
    assert read_checkpoint(str(path))["iteration"] == 2
    for change, message in COMMON_DAMAGE:
        state = {"common": dict(intact["common"])}
        state.update({k: v for k, v in intact.items() if k != "common"})
        for key, value in change.items():
            state["common"].pop(key) if value is None else state["common"].update({key: value})
        write_common(path, state)
        with pytest.raises(IncompleteCheckpointError, match=re.escape(message)):
            read_checkpoint(str(path))


@pytest.mark.parametrize("weight", ["0", "-1", ".nan", ".inf"])
def test_blend_weights_must_be_positive_and_finite(weight):
    from crnet_megatron.config.run_config import load_run_config, parse_blend

    cfg = load_run_config(None, [f"data.data_path=[0.5, a, {weight}, b]"])
    with pytest.raises(ValueError, match=r"data.data_path: the weight .* of 'b' must be a "
                                         r"finite number > 0"):
        parse_blend(cfg["data"]["data_path"])


STORED_CONFIG_DAMAGE = [
    ({"hidden_size": 1 << 20}, "its config asks for an embedding of (512, 1048576)"),
    ({"num_layers": 10 ** 9}, "model.num_layers=1000000000, its tensors hold 4 layers"),
    ({"kv_channels": 1 << 20}, "its tensors hold"),
    ({"ffn_hidden_size": 1 << 24}, "its tensors hold"),
]


def test_a_stored_config_is_checked_against_the_tensors_before_building(tiny_dataset,
                                                                        tmp_path):
    """The exporter, eval and generation build a model from the config stored in common.pt: a
    crafted one asking for terabytes is refused with one line (its layers, embedding and
    parameter count against the checkpoint's tensors), quickly and without allocating."""
    import time

    from crnet_megatron.export.loader import load_megatron_model, single_process

    save = tmp_path / "ck"
    run_in_process(driver_cfg(tiny_dataset, tmp_path / "c", save, "schedule.train_iters=2"))
    path = save / "iter_0000002"
    intact = read_common(path)
    for change, message in STORED_CONFIG_DAMAGE:
        state = dict(intact, common=dict(intact["common"]))
        state["common"]["config"] = dict(state["common"]["config"])
        state["common"]["config"]["model"] = dict(state["common"]["config"]["model"], **change)
        write_common(path, state)  # what a hand edit leaves (no checksums.json)
        start = time.monotonic()
        with single_process(), pytest.raises(ValueError, match=re.escape(message)):
            load_megatron_model(str(save))
        assert time.monotonic() - start < 30, change
