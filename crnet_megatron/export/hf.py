"""Export a checkpoint to a self-contained directory: the weights (``model.safetensors``, or
shards and their index: ``shards``), ``config.json``,
the tokenizer and ``modeling_crnet.py`` (``hf/``), loadable with PyTorch alone
(``CRNetForCausalLM.from_export``) or with ``transformers``
(``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``). An all-dense model is
written as a plain ``LlamaForCausalLM`` (no remote code).

Names follow HF Llama (``model.layers.{i}.self_attn.q_proj.weight`` ...); a low-rank projection
is ``...q_proj.A.weight`` / ``.B.weight`` / ``.beta``. Megatron's fused tensors are split:
``linear_qkv`` by GQA group into q, k, v; ``linear_fc1`` into gate, up; the stacked column A
factors by position. The padded vocabulary rows are dropped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Iterator, List, Tuple

import torch

from crnet_megatron.data.safe_files import remove_stale_temporaries
from crnet_megatron.export import modeling_crnet, shards
from crnet_megatron.model import positions


def _split_dense(w: torch.Tensor, module: str, config) -> List[torch.Tensor]:
    """A fused dense weight's rows per position: ``linear_qkv`` by GQA group
    (``[ng, (np/ng + 2) hn]`` -> q, k, v in head order), ``linear_fc1`` as ``[gate | up]``."""
    if module == "linear_qkv":
        split = positions.qkv_group_split(config.num_attention_heads, config.num_query_groups,
                                          config.kv_channels)
        grouped = w.reshape(config.num_query_groups, sum(split), -1)
        return [t.reshape(-1, w.shape[-1]) for t in grouped.split(split, dim=1)]
    return list(w.chunk(len(positions.in_module(module)), dim=0))


def _export_module(sd: Dict, out: Dict, layer, pre: str, hf: str, module: str, config) -> None:
    """Move one fused module's tensors from ``sd`` (Megatron names) to ``out`` (HF names)."""
    members = positions.in_module(module)
    base = f"{pre}{members[0].fused}."
    names = [f"{hf}{p.hf}." for p in members]
    if base + "weight" in sd:  # dense
        for name, w in zip(names, _split_dense(sd.pop(base + "weight"), module, config)):
            out[name + "weight"] = w
        return
    rank = layer.get_submodule(members[0].fused).rank
    a = sd.pop(base + "linear_a.weight")
    beta = sd.pop(base + "beta", None)
    column = members[0].kind == "column"
    for j, (pos, name) in enumerate(zip(members, names)):
        out[name + "A.weight"] = a.split(rank, dim=0)[j] if column else a
        out[name + "B.weight"] = sd.pop(f"{base}linear_b.{pos.name}.weight" if column
                                        else base + "linear_b.weight")
        if beta is not None:
            out[name + "beta"] = beta[j:j + 1]


def hf_tensors(model, vocab: int) -> Iterator[Tuple[str, torch.Tensor]]:
    """HF-named tensors of a single-process Megatron model (its TP=1 state), layer by layer,
    as views of its parameters where the layout allows (the q/k/v split copies one tensor)."""
    sd = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    yield "model.embed_tokens.weight", sd.pop("embedding.word_embeddings.weight")[:vocab]
    for i, layer in enumerate(model.decoder.layers):
        pre, hf = f"decoder.layers.{i}.", f"model.layers.{i}."
        out = {hf + "input_layernorm.weight": sd.pop(pre + "input_layernorm.weight"),
               hf + "post_attention_layernorm.weight": sd.pop(pre + "pre_mlp_layernorm.weight")}
        for module in positions.FUSED_MODULES:
            _export_module(sd, out, layer, pre, hf, module, model.config)
        yield from out.items()
    yield "model.norm.weight", sd.pop("decoder.final_layernorm.weight")
    yield "lm_head.weight", sd.pop("output_layer.weight")[:vocab]
    if sd:
        raise ValueError(f"export: tensors with no HF name: {sorted(sd)[:5]}")


def to_hf_state(model, vocab: int) -> Dict[str, torch.Tensor]:
    """``hf_tensors`` as a dict of copies (an in-memory model of its own)."""
    return {k: v.detach().contiguous().clone() for k, v in hf_tensors(model, vocab)}


def hf_config(model, vocab: int, seq_length: int, rotary_base: int, eod: int, dtype) -> Dict:
    c = model.config
    ranks = [c.rank_of_layer(n) for n in range(1, c.num_layers + 1)]
    common = dict(vocab_size=vocab, hidden_size=c.hidden_size,
                  intermediate_size=c.ffn_hidden_size, num_hidden_layers=c.num_layers,
                  num_attention_heads=c.num_attention_heads,
                  num_key_value_heads=c.num_query_groups, head_dim=c.kv_channels,
                  rms_norm_eps=c.layernorm_epsilon, rope_theta=float(rotary_base),
                  max_position_embeddings=seq_length, tie_word_embeddings=False,
                  bos_token_id=eod, eos_token_id=eod, attention_bias=False, mlp_bias=False,
                  hidden_act="silu", torch_dtype=str(dtype).replace("torch.", ""))
    if all(r is None for r in ranks):
        return dict(common, model_type="llama", architectures=["LlamaForCausalLM"])
    return dict(common, model_type="crnet_llama", architectures=["CRNetForCausalLM"],
                crnet_projection=c.crnet_variant, crnet_layer_ranks=ranks,
                crnet_eps=c.crnet_eps,
                auto_map={"AutoConfig": "modeling_crnet.CRNetLlamaConfig",
                          "AutoModelForCausalLM": "modeling_crnet.CRNetForCausalLM"})


def check_output_dir(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise FileExistsError(f"export directory {out} exists and is not empty; nothing was "
                              "written (choose a new directory or empty it)")


def export(model, loaded, out: str, dtype=None,
           max_shard_size: str = shards.DEFAULT_MAX_SHARD_SIZE) -> Dict:
    """Write the export directory (into a fresh hidden sibling directory, renamed into place
    when complete), the weights streamed into shards (``shards``)."""
    check_output_dir(out)
    max_bytes = shards.parse_size(max_shard_size)
    tok = loaded.tokenizer
    vocab = tok.vocab_size
    dtype = dtype or next(model.parameters()).dtype
    m = loaded.cfg["model"]
    config = hf_config(model, vocab, m["seq_length"], m["rotary_base"], tok.eod, dtype)
    parent, name = os.path.split(os.path.abspath(out.rstrip("/")))
    os.makedirs(parent, exist_ok=True)
    remove_stale_temporaries(os.path.join(parent, name), "export", directories=True)
    # a fresh directory of our own: nothing the user keeps next to OUT is touched
    tmp = tempfile.mkdtemp(prefix=f".{name}.", suffix=EXPORT_TMP_SUFFIX, dir=parent)
    try:
        shards.write_shards(tmp, lambda: hf_tensors(model, vocab), max_bytes, dtype,
                            {"format": "pt", "source": loaded.common["path"]})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        shutil.copyfile(tok.path, os.path.join(tmp, "tokenizer.json"))
        eod_name = tok.tok.id_to_token(tok.eod)
        with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_name,
                       "bos_token": eod_name, "model_max_length": m["seq_length"]}, f, indent=2)
        if config["model_type"] == "crnet_llama":
            shutil.copyfile(modeling_crnet.__file__, os.path.join(tmp, "modeling_crnet.py"))
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        _readable_like_any_file(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours alone
        raise
    return config


EXPORT_TMP_SUFFIX = ".tmp"


def _readable_like_any_file(directory: str) -> None:
    """safetensors writes through a private temporary file (mode 0600); give every file of the
    export the mode a new file gets here (0644 under the usual umask), as any HF export has."""
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(directory):
        os.chmod(os.path.join(directory, name), 0o666 & ~umask)
    os.chmod(directory, 0o777 & ~umask)  # mkdtemp made it 0700


def to_hf_model(model, loaded):
    """The export as an in-memory ``CRNetForCausalLM`` (nothing written)."""
    tok = loaded.tokenizer
    m = loaded.cfg["model"]
    config = hf_config(model, tok.vocab_size, m["seq_length"], m["rotary_base"], tok.eod,
                       next(model.parameters()).dtype)
    keep = {k: v for k, v in config.items() if k not in ("auto_map", "architectures",
                                                          "model_type", "torch_dtype")}
    keep.setdefault("crnet_projection", "dense")
    hf = modeling_crnet.CRNetForCausalLM(modeling_crnet.CRNetLlamaConfig(**keep))
    hf.load_state_dict(to_hf_state(model, tok.vocab_size), strict=True)
    return hf.to(next(model.parameters()).dtype).eval()
