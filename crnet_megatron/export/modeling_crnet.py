"""CRNetForCausalLM: a self-contained PyTorch CR-Net LLaMA for exported checkpoints.

This one file is what an export directory carries for ``trust_remote_code``: it imports only
torch, safetensors and (when installed) transformers, never Megatron. Layers up to the first
low-rank one are LLaMA layers with HF Llama's tensor names (``q_proj.weight`` ...); a low-rank
projection has ``A.weight`` (r x h_in), ``B.weight`` (h_out x r) and, for CR-Net,
``beta`` (1): ``Y_l = s(beta) Y_{l-1} + B(A X_l)`` with ``s(beta) = sign(beta)(|beta| + eps)``.
The chain is per position (token), so a KV-cached decode step needs only the new token's
previous-layer projection outputs. ``config.crnet_projection``: "crnet", "lowrank" or "dense"
(a plain LLaMA; a Llama ``config.json`` loads as that).
"""

from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # with transformers: AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast

    HAVE_TRANSFORMERS = True
except ImportError:  # plain PyTorch
    HAVE_TRANSFORMERS = False

    class PretrainedConfig:  # the attributes-from-kwargs part of transformers' class
        model_type = ""

        def __init__(self, **kwargs):
            for key, value in kwargs.items():
                setattr(self, key, value)

    class PreTrainedModel(nn.Module):
        def __init__(self, config):
            super().__init__()
            self.config = config

        def post_init(self):
            pass

    class GenerationMixin:
        pass

    class CausalLMOutputWithPast(dict):
        def __getattr__(self, name):
            return self.get(name)

_CACHE_FIELD = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__",
                                              {"cache": None}) else "past_key_values")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class CRNetLlamaConfig(PretrainedConfig):
    model_type = "crnet_llama"

    def __init__(self, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                 head_dim=None, rms_norm_eps=1e-6, rope_theta=10000.0,
                 max_position_embeddings=4096, crnet_projection="dense",
                 crnet_layer_ranks=None, crnet_eps=1e-6, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.intermediate_size, self.num_hidden_layers = intermediate_size, num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.rms_norm_eps, self.rope_theta = rms_norm_eps, rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.crnet_projection = crnet_projection
        self.crnet_layer_ranks = list(crnet_layer_ranks or [None] * num_hidden_layers)
        self.crnet_eps = crnet_eps
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)


class KVCache:
    """Keys and values per layer ([b, kv_heads, t, head_dim], after RoPE); the same ``update``
    / ``get_seq_length`` calls as transformers' DynamicCache, which may be passed instead."""

    def __init__(self):
        self.layers: List[Tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key, value, layer_idx, cache_kwargs=None):
        if layer_idx == len(self.layers):
            self.layers.append((key, value))
        else:
            k, v = self.layers[layer_idx]
            self.layers[layer_idx] = (torch.cat([k, key], dim=2), torch.cat([v, value], dim=2))
        return self.layers[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx][0].shape[2] if len(self.layers) > layer_idx else 0


class LowRank(nn.Module):
    """``B(A x)``, plus ``s(beta) * prev`` when chained (CR-Net)."""

    def __init__(self, h_in: int, h_out: int, rank: int, chained: bool, eps: float):
        super().__init__()
        self.A = nn.Linear(h_in, rank, bias=False)
        self.B = nn.Linear(rank, h_out, bias=False)
        self.beta = nn.Parameter(torch.ones(1)) if chained else None
        self.eps = eps

    def forward(self, x, prev):
        y = self.B(self.A(x))
        if self.beta is None:
            return y
        return y + torch.sign(self.beta) * (self.beta.abs() + self.eps) * prev


def _project(module, x, prev):
    return module(x, prev) if isinstance(module, LowRank) else module(x)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class CRNetLayer(nn.Module):
    def __init__(self, config: CRNetLlamaConfig, rank: Optional[int]):
        super().__init__()
        c = config
        self.heads, self.kv_heads, self.head_dim = (c.num_attention_heads,
                                                    c.num_key_value_heads, c.head_dim)
        q, kv, h, f = self.heads * self.head_dim, self.kv_heads * self.head_dim, c.hidden_size, \
            c.intermediate_size
        shapes = dict(q_proj=(h, q), k_proj=(h, kv), v_proj=(h, kv), o_proj=(q, h),
                      gate_proj=(h, f), up_proj=(h, f), down_proj=(f, h))
        chained = c.crnet_projection == "crnet"

        def make(name):
            i, o = shapes[name]
            if rank is None:
                return nn.Linear(i, o, bias=False)
            return LowRank(i, o, rank, chained, c.crnet_eps)

        self.self_attn = nn.Module()
        for name in PROJECTIONS[:4]:
            self.self_attn.add_module(name, make(name))
        self.mlp = nn.Module()
        for name in PROJECTIONS[4:]:
            self.mlp.add_module(name, make(name))
        self.input_layernorm = nn.RMSNorm(h, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=c.rms_norm_eps)

    def forward(self, x, chains, cos, sin, cache, layer_idx):
        """x: [b, t, h]; chains: the previous layer's 7 projection outputs (or None)."""
        prev = chains or [None] * 7
        a, m = self.self_attn, self.mlp
        y = self.input_layernorm(x)
        q, k, v = (_project(getattr(a, n), y, p) for n, p in zip(PROJECTIONS[:3], prev[:3]))
        outs = [q, k, v]
        b, t = x.shape[:2]
        qh = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        kh = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        vh = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        qh, kh = qh * cos + _rotate_half(qh) * sin, kh * cos + _rotate_half(kh) * sin
        past = 0
        if cache is not None:
            past = cache.get_seq_length(layer_idx)
            kh, vh = cache.update(kh, vh, layer_idx)
        mask = None
        if past and t > 1:  # causal with an offset: query i sees keys up to past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
        ctx = F.scaled_dot_product_attention(
            qh, kh, vh, attn_mask=mask, is_causal=mask is None and t > 1,
            enable_gqa=self.heads != self.kv_heads)
        ctx = ctx.transpose(1, 2).reshape(b, t, -1)
        o = _project(a.o_proj, ctx, prev[3])
        x = x + o
        y = self.post_attention_layernorm(x)
        gate = _project(m.gate_proj, y, prev[4])
        up = _project(m.up_proj, y, prev[5])
        down = _project(m.down_proj, F.silu(gate) * up, prev[6])
        return x + down, outs + [o, gate, up, down]


class CRNetModel(nn.Module):
    def __init__(self, config: CRNetLlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([CRNetLayer(config, r) for r in config.crnet_layer_ranks])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head_dim, self.rope_theta = config.head_dim, config.rope_theta
        self.chained = config.crnet_projection == "crnet"

    def forward(self, input_ids, cache=None):
        past = cache.get_seq_length() if cache is not None else 0
        x = self.embed_tokens(input_ids)
        pos = torch.arange(past, past + input_ids.shape[1], device=x.device, dtype=torch.float32)
        # computed here, not held in a buffer: transformers builds models on the meta device
        dim = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32,
                                                           device=x.device) / dim))
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        chains = None
        for i, layer in enumerate(self.layers):
            x, outs = layer(x, chains, cos, sin, cache, i)
            chains = outs if self.chained else None
        return self.norm(x)


class CRNetForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = CRNetLlamaConfig
    base_model_prefix = "model"
    _no_split_modules = ["CRNetLayer"]
    _supports_cache_class = True

    def __init__(self, config: CRNetLlamaConfig):
        super().__init__(config)
        self.model = CRNetModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _init_weights(self, module):  # only for tensors a checkpoint lacks (transformers)
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, LowRank) and module.beta is not None:
            nn.init.ones_(module.beta)

    def forward(self, input_ids, cache=None, use_cache: bool = False, labels=None,
                attention_mask=None, past_key_values=None, **unused):
        """Logits [b, t, vocab]; with a cache, ``input_ids`` are the tokens after it."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("CRNetForCausalLM: padded batches are not supported; pass "
                             "equal-length sequences")
        cache = cache if cache is not None else past_key_values  # (older transformers' name)
        if cache is None and use_cache:
            cache = KVCache()
        logits = self.lm_head(self.model(input_ids, cache))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    @classmethod
    def from_export(cls, path: str, dtype: Optional[torch.dtype] = None,
                    device: str = "cpu") -> "CRNetForCausalLM":
        """Load an export directory (one ``model.safetensors`` or shards and their index) with
        PyTorch and safetensors alone (never unpickles), shard by shard into a model built on
        the meta device: the weights are held once. Computes in float32 unless ``dtype``."""
        from safetensors import safe_open

        config, where = checked_export(cls, path)
        with torch.device("meta"):
            model = cls(config)
        for weights in sorted(set(where.values())):
            with safe_open(weights, framework="pt", device=str(device)) as f:
                model.load_state_dict({n: f.get_tensor(n) for n in f.keys()}, strict=False,
                                      assign=True)
        return model.to(device, dtype or torch.float32)


# -- export files are untrusted: sizes are checked before anything is allocated ----------------
_KNOWN = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
          "max_position_embeddings", "crnet_projection", "crnet_layer_ranks", "crnet_eps",
          "eos_token_id", "bos_token_id")
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
          "num_attention_heads")
_MAX_JSON = 1 << 20
_MAX_INDEX = 1 << 26
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"  # transformers' name for a sharded checkpoint's index
_TORCH_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}
_MAX_HEADER = 100 << 20  # safetensors' own limit
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U8": 1, "BOOL": 1}


def _regular_file(path: str, limit: int) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing or not a regular file")
    if os.path.getsize(path) > limit:
        raise ValueError(f"{path} is {os.path.getsize(path)} bytes, more than {limit}")


def read_export_config(path: str) -> dict:
    """An export's ``config.json``: at most 1 MiB of JSON with the model's sizes as positive
    ints (an empty one would otherwise build the default 7B shape)."""
    config_path = os.path.join(path, "config.json")
    _regular_file(config_path, _MAX_JSON)
    raw = _load_json(config_path)
    if not isinstance(raw, dict):
        raise ValueError(f"{config_path} holds {type(raw).__name__}, not a JSON object")
    for key in _SIZES + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = raw.get(key)
        if (key in _SIZES or value is not None) and (
                not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{config_path}: {key}={value!r} must be a positive int")
    ranks = raw.get("crnet_layer_ranks")
    if ranks is not None and (not isinstance(ranks, list) or len(ranks) != raw[
            "num_hidden_layers"] or not all(r is None or (isinstance(r, int) and r > 0)
                                             for r in ranks)):
        raise ValueError(f"{config_path}: crnet_layer_ranks must list a positive int or null "
                         f"for each of the {raw['num_hidden_layers']} layers")
    if raw.get("crnet_projection", "dense") not in ("dense", "lowrank", "crnet"):
        raise ValueError(f"{config_path}: crnet_projection={raw['crnet_projection']!r} is not "
                         "'dense', 'lowrank' or 'crnet'")
    return raw


def _load_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except RecursionError:
        raise ValueError(f"{path} is nested too deeply to be read") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def checked_export(cls, path: str):
    """(config, {tensor name: file}) of an export whose ``config.json`` and weights' headers
    agree (sizes, names, shapes, dtypes), before anything is allocated."""
    config_path = os.path.join(path, "config.json")
    raw = read_export_config(path)
    tensors, where = export_weights(path)
    weights = os.path.join(path, INDEX if os.path.exists(os.path.join(path, INDEX)) else SINGLE)
    if raw["num_hidden_layers"] > len(tensors):  # each layer holds at least one tensor
        raise ValueError(f"{config_path}: num_hidden_layers={raw['num_hidden_layers']} is "
                         f"more than the {len(tensors)} tensors of {weights} can hold")
    config = CRNetLlamaConfig(**{k: raw[k] for k in _KNOWN if k in raw})
    _check_tensors(cls, config, tensors, weights, config_path)
    _check_dtypes(tensors, raw.get("torch_dtype"), weights, config_path)
    return config, where


def export_weights(path: str):
    """({name: (dtype, shape, first, end byte)}, {name: file}) of an export's weights: ``model.safetensors``, or
    the shards ``model.safetensors.index.json`` names (each shard holding exactly the tensors
    the index places in it)."""
    index = os.path.join(path, INDEX)
    if not os.path.exists(index):
        single = os.path.join(path, SINGLE)
        tensors = safetensors_header(single)
        return tensors, {n: single for n in tensors}
    _regular_file(index, _MAX_INDEX)
    raw = _load_json(index)
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v
            and v.endswith(".safetensors") for k, v in weight_map.items()):
        raise ValueError(f"{index}: weight_map must map tensor names to .safetensors files in "
                         "the export directory")
    tensors, where = {}, {}
    for shard in sorted(set(weight_map.values())):
        held = safetensors_header(os.path.join(path, shard))
        stray = sorted(n for n in held if weight_map.get(n) != shard)
        if stray:
            raise ValueError(f"{index}: {shard} holds {stray[0]}, which the index places in "
                             f"{weight_map.get(stray[0])}")
        tensors.update(held)
        where.update({n: os.path.join(path, shard) for n in held})
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise ValueError(f"{index} places {missing[0]} in {weight_map[missing[0]]}, which does "
                         "not hold it")
    return tensors, where


def _check_dtypes(tensors: dict, torch_dtype, weights: str, config_path: str) -> None:
    """Every tensor has the export's dtype (``config.json``'s ``torch_dtype``, else one float
    dtype for all): bytes of another dtype of the same size would load as noise."""
    want = _TORCH_DTYPES.get(str(torch_dtype)) if torch_dtype is not None else None
    held = sorted({entry[0] for entry in tensors.values()})
    if want is not None and held != [want] or want is None and (
            len(held) != 1 or held[0] not in _TORCH_DTYPES.values()):
        odd = next((n for n, entry in tensors.items() if entry[0] != (want or held[0])), None)
        raise ValueError(f"{weights} holds {odd} as {tensors[odd][0] if odd else held}; "
                         f"{config_path} says torch_dtype={torch_dtype!r} (every tensor must "
                         "have that one float dtype)")


def safetensors_header(path: str) -> dict:
    """{name: (dtype, shape, first byte, end byte in the file)} from a safetensors file's
    header, every entry checked against the file's size (a crafted header fails here with one line, not inside the reader)."""
    _regular_file(path, 1 << 50)
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > min(size - 8, _MAX_HEADER):
                raise ValueError(f"header length {n} does not fit the file")
            header = json.loads(f.read(n).decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        tensors, spans = {}, []
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in _ITEMSIZE or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"{name}: dtype {dtype!r} or shape {shape!r} is not valid")
            if not 0 <= start <= end <= size - 8 - n or \
                    end - start != math.prod(shape) * _ITEMSIZE[dtype]:
                raise ValueError(f"{name}: data offsets {[start, end]} do not hold {shape} "
                                 f"{dtype} within the file")
            tensors[name] = (dtype, tuple(shape), 8 + n + start, 8 + n + end)
            spans.append((start, end, name))
        _check_spans(sorted(spans), size - 8 - n)
    except RecursionError:
        raise ValueError(f"{path} is not a valid safetensors file (its header is nested too "
                         "deeply)") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e})") from None
    return tensors


def _check_spans(spans: list, data_bytes: int) -> None:
    """The tensors tile the data section, as the format requires: no overlap, no gap."""
    at = 0
    for start, end, name in spans:
        if start != at:
            raise ValueError(f"{name}: data offsets start at {start}, expected {at} (tensors "
                             "overlap or leave a gap)")
        at = end
    if at != data_bytes:
        raise ValueError(f"the tensors end at byte {at} of a {data_bytes}-byte data section")


def _check_tensors(cls, config, tensors: dict, weights: str, config_path: str) -> None:
    """The tensors ``config`` asks for (built on the meta device: nothing allocated) are those
    the file holds, with their shapes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    wrong = sorted(k for k in expected if k in tensors and tensors[k][1] != expected[k])
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if wrong or missing or extra:
        detail = (f"shape of {wrong[0]}: file {tensors[wrong[0]][1]}, config {expected[wrong[0]]}"
                  if wrong else f"missing {missing[:3]}, unexpected {extra[:3]}")
        raise ValueError(f"{weights} does not match {config_path} "
                         f"(crnet_projection={config.crnet_projection!r}): {detail}")
