"""Run configuration: one YAML file with sections, Megatron key names, dotted overrides.

``load_run_config(path, ["optimizer.lr=3e-3", ...])`` merges defaults <- file <- overrides;
an unknown section or key, or a value of the wrong type, is a ``ValueError`` naming the key.
No torch here (pre-flight and the planner read it in about a second); ``megatron_configs``
turns the sections into Megatron-Core configs.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from crnet_megatron.data.safe_files import check_readable
from crnet_megatron.model.choices import (
    LOWRANK_INITS,
    RANK_SCHEDULES,
    RECOMPUTE_MODULES,
    VARIANTS,
)

NUM = (int, float)
OPT_INT, OPT_NUM, OPT_STR = (int, type(None)), (int, float, type(None)), (str, type(None))

# section -> key -> (default, allowed types)
SCHEMA: Dict[str, Dict[str, tuple]] = {
    "model": {
        "num_layers": (4, int), "hidden_size": (128, int), "ffn_hidden_size": (344, int),
        "num_attention_heads": (4, int), "num_query_groups": (None, OPT_INT),
        "kv_channels": (None, OPT_INT), "seq_length": (128, int),
        "variant": ("crnet", str), "crnet_learn_beta": (True, bool),
        "crnet_rank": (32, (int, list)), "crnet_rank_schedule": ("uniform", str),
        "crnet_dense_layers": (1, int), "crnet_beta_init": (1.0, NUM), "crnet_eps": (1e-6, NUM),
        "crnet_lowrank_init": ("cola", str), "init_method_std": (0.02, NUM),
        "rotary_base": (10000, int), "layernorm_epsilon": (1e-6, NUM),
    },
    "parallel": {
        "tensor_model_parallel_size": (1, int), "pipeline_model_parallel_size": (1, int),
        "sequence_parallel": (None, (bool, type(None))), "use_distributed_optimizer": (False, bool),
        "num_layers_in_first_pipeline_stage": (None, OPT_INT),
        "num_layers_in_last_pipeline_stage": (None, OPT_INT),
        "virtual_pipeline_model_parallel_size": (None, OPT_INT),
        "overlap_grad_reduce": (False, bool), "overlap_param_gather": (False, bool),
        "distributed_timeout_minutes": (10, int),
    },
    "optimizer": {
        "optimizer": ("adam", str), "lr": (3e-3, NUM), "min_lr": (3e-4, NUM),
        "weight_decay": (0.01, NUM), "adam_beta1": (0.9, NUM), "adam_beta2": (0.95, NUM),
        "adam_eps": (1e-8, NUM), "clip_grad": (1.0, NUM), "bf16": (False, bool),
    },
    "schedule": {
        "train_iters": (100, int), "micro_batch_size": (8, int), "global_batch_size": (8, int),
        "lr_warmup_fraction": (0.1, NUM), "lr_decay_style": ("cosine", str), "seed": (1234, int),
        "exit_interval": (None, OPT_INT),
    },
    "data": {
        "data_path": (None, (list, type(None))), "split": ("969,30,1", str),
        "tokenizer": (None, OPT_STR), "eod_token": (None, OPT_STR),
        "builtin_vocab_size": (2048, int),
        "cache_dir": ("~/.cache/crnet_megatron", str), "cache_build_timeout_minutes": (240, int),
    },
    "checkpoint": {
        "save": (None, OPT_STR), "load": (None, OPT_STR), "save_interval": (None, OPT_INT),
        "keep_last": (2, int), "no_load_optim": (False, bool),
        "override_opt_param_scheduler": (False, bool), "optim_fully_reshardable": (False, bool),
        "async_save": (False, bool),
    },
    "eval": {"eval_interval": (50, int), "eval_iters": (4, int)},
    "logging": {
        "log_interval": (10, int), "metrics_jsonl": (None, OPT_STR),
        "tensorboard_dir": (None, OPT_STR), "peak_tflops": (None, OPT_NUM),
        "progress_bar": (True, bool), "plot": (True, bool),
    },
    "recompute": {
        "recompute_granularity": (None, OPT_STR), "recompute_method": (None, OPT_STR),
        "recompute_num_layers": (None, OPT_INT), "recompute_modules": (None, (list, type(None))),
        "crnet_checkpoint_every": (8, int), "crnet_recompute_min_scale": (1e-2, NUM),
        "crnet_recompute_max_ratio": (16.0, OPT_NUM),
    },
    "safety": {"max_nonfinite_in_a_row": (5, int), "exit_on_signal": (True, bool)},
}


# Stated ranges: (lowest, highest, lowest is open, highest is open); None = unbounded.
_POS, _NONNEG = (1, None, False, False), (0, None, False, False)
RANGES: Dict[str, tuple] = {
    "model.num_layers": _POS, "model.hidden_size": _POS, "model.ffn_hidden_size": _POS,
    "model.num_attention_heads": _POS, "model.num_query_groups": _POS, "model.kv_channels": _POS,
    "model.seq_length": (1, 1 << 20, False, False), "model.crnet_dense_layers": _NONNEG,
    "model.crnet_eps": _NONNEG,
    "model.init_method_std": (0, None, True, False), "model.rotary_base": (1, None, False, False),
    "model.layernorm_epsilon": (0, None, True, False),
    "parallel.tensor_model_parallel_size": _POS, "parallel.pipeline_model_parallel_size": _POS,
    "parallel.num_layers_in_first_pipeline_stage": _POS,
    "parallel.num_layers_in_last_pipeline_stage": _POS,
    "parallel.virtual_pipeline_model_parallel_size": _POS,
    "parallel.distributed_timeout_minutes": _POS, "data.cache_build_timeout_minutes": _POS,
    "optimizer.lr": _NONNEG, "optimizer.min_lr": _NONNEG, "optimizer.weight_decay": _NONNEG,
    "optimizer.adam_beta1": (0, 1, False, True), "optimizer.adam_beta2": (0, 1, False, True),
    "optimizer.adam_eps": (0, None, True, False), "optimizer.clip_grad": _NONNEG,
    "schedule.train_iters": _POS, "schedule.micro_batch_size": _POS,
    "schedule.global_batch_size": _POS, "schedule.lr_warmup_fraction": (0, 1, False, True),
    "schedule.seed": _NONNEG, "schedule.exit_interval": _POS,
    "data.builtin_vocab_size": (260, None, False, False),
    "checkpoint.save_interval": _POS, "checkpoint.keep_last": _POS,
    "eval.eval_interval": _POS, "eval.eval_iters": _POS,
    "logging.log_interval": _POS, "logging.peak_tflops": (0, None, True, False),
    "recompute.recompute_num_layers": _POS, "recompute.crnet_checkpoint_every": _POS,
    "recompute.crnet_recompute_min_scale": _NONNEG,
    "recompute.crnet_recompute_max_ratio": (0, None, True, False),
    "safety.max_nonfinite_in_a_row": _POS,
}
CHOICES: Dict[str, tuple] = {
    "model.variant": VARIANTS,
    "model.crnet_rank_schedule": RANK_SCHEDULES,
    "model.crnet_lowrank_init": LOWRANK_INITS,
    "optimizer.optimizer": ("adam", "sgd"),
    "schedule.lr_decay_style": ("cosine", "linear", "constant", "inverse-square-root"),
    "recompute.recompute_granularity": ("full", "selective", "crnet", None),
    "recompute.recompute_method": ("uniform", "block", None),
}


def _range_text(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def validate(cfg: Dict[str, Dict[str, Any]]) -> None:
    """Every numeric key finite and within its stated range, every choice valid, cross-key
    rules."""
    for section, keys in cfg.items():
        for key, v in keys.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"config key {section}.{key} = {v!r} is not a finite number")
    for dotted, (lo, hi, lo_open, hi_open) in RANGES.items():
        section, key = dotted.split(".")
        v = cfg[section][key]
        if v is None:
            continue
        bad = (lo is not None and (v <= lo if lo_open else v < lo)) or \
              (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            raise ValueError(f"config key {dotted} = {v!r} is out of range; it must be "
                             f"{_range_text(lo, hi, lo_open, hi_open)}")
    for dotted, options in CHOICES.items():
        section, key = dotted.split(".")
        if cfg[section][key] not in options:
            raise ValueError(f"config key {dotted} = {cfg[section][key]!r} is not one of "
                             f"{[o for o in options if o is not None]}")
    o, s, m = cfg["optimizer"], cfg["schedule"], cfg["model"]
    if o["min_lr"] > o["lr"]:
        raise ValueError(f"config key optimizer.min_lr = {o['min_lr']} must be <= optimizer.lr "
                         f"= {o['lr']}")
    if s["global_batch_size"] < s["micro_batch_size"]:
        raise ValueError(f"config key schedule.global_batch_size = {s['global_batch_size']} "
                         f"must be >= schedule.micro_batch_size = {s['micro_batch_size']}")
    if m["crnet_dense_layers"] > m["num_layers"]:
        raise ValueError(f"config key model.crnet_dense_layers = {m['crnet_dense_layers']} must "
                         f"be <= model.num_layers = {m['num_layers']}")
    if m["crnet_dense_layers"] == 0 and m["variant"] != "lowrank":
        raise ValueError("config key model.crnet_dense_layers = 0 needs model.variant: lowrank "
                         f"(model.variant = {m['variant']!r}: a CR-Net chain needs a dense "
                         "layer to seed it)")
    if cfg["recompute"]["recompute_granularity"] == "crnet" and m["variant"] != "crnet":
        raise ValueError("config key recompute.recompute_granularity = 'crnet' needs "
                         f"model.variant: crnet (model.variant = {m['variant']!r} has no "
                         "cross-layer chain to invert); use 'full' or 'selective'")
    _validate_recompute_modules(cfg["recompute"])
    p = cfg["parallel"]
    if p["overlap_param_gather"] and not p["use_distributed_optimizer"]:
        raise ValueError("config key parallel.overlap_param_gather = true needs "
                         "parallel.use_distributed_optimizer: true (it overlaps the distributed "
                         "optimizer's parameter all-gather with the next forward)")
    rank = m["crnet_rank"]
    ranks = rank if isinstance(rank, list) else [rank]
    if not ranks or any(not isinstance(r, int) or isinstance(r, bool) or r < 1 for r in ranks):
        raise ValueError(f"config key model.crnet_rank = {rank!r} must be a positive int or a "
                         "list of positive ints (one per layer)")


def _validate_recompute_modules(r: Dict[str, Any]) -> None:
    modules = r["recompute_modules"]
    if modules is None:
        return
    if r["recompute_granularity"] != "selective":
        raise ValueError(f"config key recompute.recompute_modules = {modules!r} applies only with "
                         "recompute.recompute_granularity: selective (recompute_granularity = "
                         f"{r['recompute_granularity']!r}); remove it or choose selective")
    unknown = [x for x in modules if x not in RECOMPUTE_MODULES]
    if unknown or not modules:
        raise ValueError(f"config key recompute.recompute_modules = {modules!r}: the CR-Net "
                         f"layers honour {list(RECOMPUTE_MODULES)}; {unknown or 'an empty list'} "
                         "would save nothing")


def resolve_sequence_parallel(cfg: Dict[str, Dict[str, Any]]) -> None:
    """``parallel.sequence_parallel: null`` (the default) means on for CR-Net and lowrank at
    TP > 1 (without it every rank runs the column A factors on every token), as Megatron's."""
    p = cfg["parallel"]
    if p["sequence_parallel"] is None:
        p["sequence_parallel"] = (p["tensor_model_parallel_size"] > 1
                                  and cfg["model"]["variant"] in ("crnet", "lowrank"))


def defaults() -> Dict[str, Dict[str, Any]]:
    return {s: {k: copy.deepcopy(v[0]) for k, v in keys.items()} for s, keys in SCHEMA.items()}


def _type_names(types) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _check(section: str, key: str, value):
    if section not in SCHEMA:
        raise ValueError(f"unknown config section {section!r}; valid: {sorted(SCHEMA)}")
    if key not in SCHEMA[section]:
        raise ValueError(f"unknown config key {section}.{key}; valid keys of {section}: "
                         f"{sorted(SCHEMA[section])}")
    types = SCHEMA[section][key][1]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in (
        types if isinstance(types, tuple) else (types,)))
    if not ok:
        raise ValueError(f"config key {section}.{key} = {value!r} has type "
                         f"{type(value).__name__}; expected {_type_names(types)}")


def _coerce_float(section: str, key: str, value):
    """YAML reads ``3e-3`` (no dot) as a string; accept it where a number is expected."""
    types = SCHEMA.get(section, {}).get(key, (None, ()))[1]
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, str) and float in types:
        try:
            return float(value)
        except ValueError:
            return value
    return value


MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 16  # a config needs a handful; a "billion laughs" file needs thousands


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.safe_load`` with a limit on aliases: a few hundred bytes of nested aliases would
    otherwise expand into gigabytes and hang start-up."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases_seen = getattr(self, "aliases_seen", 0) + 1
            if self.aliases_seen > MAX_YAML_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_YAML_ALIASES} aliases (*name); a config "
                                     "needs none")
        return super().compose_node(parent, index)


def load_run_config(path: Optional[str], overrides: Sequence[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Defaults <- YAML file <- ``section.key=value`` overrides (values parsed as YAML)."""
    cfg = defaults()
    updates: Dict[str, Dict[str, Any]] = {}
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        check_readable(path, "config file")
        if os.path.getsize(path) > MAX_CONFIG_BYTES:
            raise ValueError(f"config file {path!r} is larger than {MAX_CONFIG_BYTES} bytes")
        try:
            with open(path, encoding="utf-8") as f:
                updates = yaml.load(f, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"config file {path!r} is not valid YAML{where}: {problem}") from None
        if updates is None:
            raise ValueError(f"config file {path!r} is empty; it needs at least one section "
                             f"(valid: {sorted(SCHEMA)})")
        if not isinstance(updates, dict):
            raise ValueError(f"config file {path!r} must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        try:
            updates.setdefault(section, {})[name] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--set {item!r}: the value is not valid YAML") from None
    return from_mapping(updates, cfg)


# keys renamed since a release: (section, old) -> new. A config file naming the old key is
# refused with a line naming the new one; a checkpoint's stored config is read under the new name.
RENAMED = {("model", "projection"): "variant"}


def _renamed_keys(updates: Dict[str, Any], legacy: bool) -> Dict[str, Any]:
    out = dict(updates)
    for (section, old), new in RENAMED.items():
        values = out.get(section)
        if not isinstance(values, dict) or old not in values:
            continue
        if not legacy:
            raise ValueError(f"config key {section}.{old} was renamed to {section}.{new}; write "
                             f"{section}.{new}: {values[old]!r}")
        values = dict(values)
        values.setdefault(new, values.pop(old))
        values.pop(old, None)
        out[section] = values
    return out


def from_mapping(updates: Dict[str, Any], cfg: Optional[Dict[str, Dict[str, Any]]] = None,
                 legacy: bool = False):
    """Defaults (or ``cfg``) <- a mapping of sections, checked key by key (a checkpoint's stored
    config is read through here too, with ``legacy`` renames: it is untrusted input like a YAML
    file)."""
    cfg = cfg if cfg is not None else defaults()
    updates = _renamed_keys(updates, legacy)
    for section, values in updates.items():
        if section not in SCHEMA:
            raise ValueError(f"unknown config section {section!r}; valid: {sorted(SCHEMA)}")
        if not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be a mapping")
        for name, value in values.items():
            value = _coerce_float(section, name, value)
            _check(section, name, value)
            cfg[section][name] = value
    validate(cfg)
    resolve_sequence_parallel(cfg)
    return cfg


def dump(cfg: Dict[str, Dict[str, Any]]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


def stored_shape_keys(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's stored shape keys under today's names."""
    saved = dict(saved)
    for (section, old), new in RENAMED.items():
        if section == "model" and old in saved:
            saved.setdefault(new, saved.pop(old))
    return saved


# the keys that shape the learning-rate / weight-decay schedule a checkpoint carries
SCHEDULE_KEYS = ("schedule.train_iters", "schedule.lr_warmup_fraction", "schedule.lr_decay_style",
                 "optimizer.lr", "optimizer.min_lr", "optimizer.weight_decay")


def schedule_changes(stored: Dict[str, Any], cfg) -> Dict[str, tuple]:
    """{key: (checkpoint's value, config's value)} for the schedule keys that differ."""
    out = {}
    for dotted in SCHEDULE_KEYS:
        section, key = dotted.split(".")
        old = stored.get(section, {}).get(key) if isinstance(stored.get(section), dict) else None
        if old is not None and old != cfg[section][key]:
            out[dotted] = (old, cfg[section][key])
    return out


def shape_keys(cfg) -> Dict[str, Any]:
    """The model keys a checkpoint must agree on to be loadable."""
    keys = ("variant", "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
            "num_query_groups", "kv_channels", "crnet_rank", "crnet_rank_schedule",
            "crnet_dense_layers", "rotary_base")
    return {k: cfg["model"][k] for k in keys}


def parse_blend(data_path: List) -> Tuple[List[str], Optional[List[float]]]:
    """Megatron's ``--data-path`` format: ``[p1, p2]`` or ``[w1, p1, w2, p2]``."""
    items = [str(x) for x in data_path]
    if not items:
        raise ValueError("data.data_path is empty")
    try:
        weights = [float(x) for x in items[0::2]]
        prefixes = items[1::2]
        if len(weights) != len(prefixes):
            raise ValueError
    except ValueError:
        return items, None
    for w, prefix in zip(weights, prefixes):
        if not math.isfinite(w) or w <= 0:
            raise ValueError(f"data.data_path: the weight {w!r} of {prefix!r} must be a finite "
                             "number > 0 (Megatron's [w1, p1, w2, p2] blend; leave a prefix "
                             "out instead of giving it weight 0)")
    return prefixes, weights


def padded_vocab(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """The model's vocabulary: Megatron-LM's padding to a multiple of 128 x TP."""
    multiple = 128 * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
