"""A trained checkpoint, from any TP/PP layout, as one single-process model (export, eval,
generation and the rank advisor start here).

``single_process()`` sets up a one-rank gloo/NCCL group (Megatron modules need parallel state);
``load_megatron_model(path)`` reads the run config stored in the checkpoint (checked like a
YAML file), builds the model at TP=1/PP=1 and loads the checkpoint into it through Megatron's
dist-checkpointing (which reshards), never unpickling anything. ``path`` is a run directory
(its latest checkpoint) or one ``iter_N`` directory.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist


@contextlib.contextmanager
def single_process():
    """A one-rank process group for the ``with`` block (or the one already there)."""
    from crnet_megatron.parallel.environment import announce
    from crnet_megatron.parallel.groups import destroy_distributed, init_distributed

    announce()
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("single_process(): a multi-rank group is already initialised")
        yield
        return
    for key in ("RANK", "WORLD_SIZE", "MASTER_PORT"):
        os.environ.pop(key, None)
    init_distributed(1, 1, seed=0)
    try:
        yield
    finally:
        destroy_distributed()


@dataclass
class Loaded:
    cfg: Dict[str, Dict[str, Any]]  # the run config, as trained
    common: Dict[str, Any]          # the checkpoint's non-sharded state
    tokenizer: Any                  # data.preprocess.HFTokenizer
    vocab_size: int                 # the model's (padded) vocabulary
    run_dir: str


def resolve_checkpoint(path: str, verify: str = "model") -> Dict[str, Any]:
    """The checkpoint's common state, from a run directory or an iter_N directory (read-only:
    nothing is moved or repaired here). Only the model's tensors are read after this, so only
    their checksums are checked by default."""
    from crnet_megatron.checkpoint.resume import (
        TRACKER,
        iteration_dir,
        read_checkpoint,
        read_latest,
    )

    if os.path.isfile(os.path.join(path, TRACKER)):
        return read_checkpoint(iteration_dir(path, read_latest(path)), verify)
    if os.path.isfile(os.path.join(path, "metadata.json")):
        return read_checkpoint(path, verify)
    raise FileNotFoundError(f"{path} is neither a run directory (with {TRACKER}) nor a "
                            "checkpoint directory (iter_N with metadata.json)")


def find_tokenizer(common: Dict[str, Any], cfg, run_dir: str, explicit: Optional[str] = None):
    """The tokenizer the checkpoint was trained with: ``explicit``, the run's copy, the
    config's path or the built-in one, whichever exists and matches the stored hash."""
    from crnet_megatron.data.preprocess import HFTokenizer

    d = cfg["data"]
    builtin = os.path.join(os.path.expanduser(d["cache_dir"]), "builtin",
                           f"builtin_bpe_{d['builtin_vocab_size']}.json")
    candidates: List[str] = [explicit] if explicit else [
        os.path.join(run_dir, "tokenizer.json"), d["tokenizer"] or builtin]
    saved = common.get("tokenizer")
    tried = []
    for path in candidates:
        if not path or not os.path.exists(path):
            tried.append(f"{path} (missing)")
            continue
        tok = HFTokenizer(path, d["eod_token"])
        if saved is None or tok.fingerprint() == saved:
            return tok
        tried.append(f"{path} (another tokenizer: sha256 {tok.fingerprint()['sha256'][:12]}, "
                     f"checkpoint {saved.get('sha256', '')[:12]})")
    raise FileNotFoundError(f"no tokenizer for checkpoint {common['path']}: tried "
                            + "; ".join(tried) + "; pass --tokenizer PATH/tokenizer.json")


def load_megatron_model(path: str, tokenizer: Optional[str] = None, dtype=None,
                        device: Optional[str] = None):
    """(model at TP=1/PP=1 in eval mode, Loaded). Call inside ``single_process()``.
    ``device="cpu"`` keeps it in host memory where a GPU is visible."""

    from crnet_megatron.checkpoint.checkpointing import load_checkpoint
    from crnet_megatron.config import run_config
    from crnet_megatron.config.megatron_configs import to_crnet_config
    from crnet_megatron.parallel.build import build_model

    common = resolve_checkpoint(path)
    if not isinstance(common.get("config"), dict):
        raise ValueError(f"checkpoint {common['path']} stores no run config")
    cfg = run_config.from_mapping(copy.deepcopy(common["config"]), legacy=True)
    run_dir = os.path.dirname(os.path.abspath(common["path"]))
    tok = find_tokenizer(common, cfg, run_dir, tokenizer)
    vocab = common.get("vocab_size")
    if not isinstance(vocab, int):  # Megatron-LM's padding at the training TP size
        vocab = run_config.padded_vocab(tok.vocab_size,
                                        cfg["parallel"]["tensor_model_parallel_size"])
    single = copy.deepcopy(cfg)
    single["parallel"].update(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              sequence_parallel=False, num_layers_in_first_pipeline_stage=None,
                              virtual_pipeline_model_parallel_size=None,
                              num_layers_in_last_pipeline_stage=None)
    single["recompute"]["recompute_granularity"] = None
    stored = _stored_model_tensors(common["path"])
    _check_layers_and_embedding(common["path"], cfg["model"], vocab, stored)
    config = to_crnet_config(single)  # its rank list is now bounded by the stored layers
    config.perform_initialization = False  # every weight is loaded: no random init (nor its copies)
    _check_parameter_count(common["path"], config, vocab, stored)
    m = cfg["model"]
    model = build_model(config, vocab_size=vocab, max_sequence_length=m["seq_length"],
                        backend="local", rotary_base=m["rotary_base"], device=device)
    load_checkpoint(common, model, None)
    model.eval()
    if dtype is not None:
        model = model.to(dtype)
    return model, Loaded(cfg=cfg, common=common, tokenizer=tok, vocab_size=vocab,
                         run_dir=run_dir)


def _stored_model_tensors(path: str) -> Dict[str, tuple]:
    """{key: global shape} of the model tensors a checkpoint's (checked) ``.metadata`` holds."""
    from crnet_megatron.checkpoint.safe_checkpoint import load_metadata, model_key

    md = load_metadata(os.path.join(path, ".metadata"))
    return {k: tuple(v.size) for k, v in md.state_dict_metadata.items()
            if hasattr(v, "size") and model_key(k)}


def _check_layers_and_embedding(path: str, m: Dict[str, Any], vocab: int,
                                stored: Dict[str, tuple]) -> None:
    """The stored config's layer count, vocabulary and hidden size are those of the stored
    tensors, before a model is built from them (a crafted config could ask for terabytes)."""
    layers = {int(k.split(".")[2]) for k in stored if k.startswith("decoder.layers.")}
    if m["num_layers"] != len(layers):
        raise ValueError(f"checkpoint {path}: its config has model.num_layers="
                         f"{m['num_layers']}, its tensors hold {len(layers)} layers")
    embedding = stored.get("embedding.word_embeddings.weight")
    if embedding != (vocab, m["hidden_size"]):
        raise ValueError(f"checkpoint {path}: its config asks for an embedding of "
                         f"{(vocab, m['hidden_size'])} (vocabulary, model.hidden_size), its "
                         f"tensors hold {embedding}")


def _check_parameter_count(path: str, config, vocab: int, stored: Dict[str, tuple]) -> None:
    """Every other size (FFN, heads, kv channels, ranks) shows in the parameter count."""
    from crnet_megatron.analysis.counting import ModelShape, count_params

    expected = count_params(ModelShape.from_config(config, vocab),
                            config.crnet_layer_ranks)["total"]
    held = sum(math.prod(shape) for shape in stored.values())
    if expected != held:
        raise ValueError(f"checkpoint {path}: its config describes {expected:,} parameters, its "
                         f"tensors hold {held:,}; the config stored in common.pt does not "
                         "match the checkpoint")


@torch.no_grad()
def megatron_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """[b, s] token ids -> [b, s, vocab] logits of a single-process Megatron model."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    pos = torch.arange(ids.shape[1], device=device)[None].expand_as(ids)
    return model(ids, pos, None)
