"""Run configuration: one YAML file with sections, Megatron key names, dotted overrides.

``load_run_config(path, ["optimizer.lr=3e-3", ...])`` merges defaults <- file <- overrides;
an unknown section or key, or a value of the wrong type, is a ``ValueError`` naming the key.
Each key is declared once in ``config.keys`` (default, types, range or choices, doc); this
module loads, checks and compares configs against those declarations. No torch here (pre-flight
and the planner read it in about a second); ``megatron_configs`` turns the sections into
Megatron-Core configs.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from crnet_megatron.config.keys import (
    SECTIONS,
    all_keys,
    bounds_text,
    declared,
    type_text,
)
from crnet_megatron.config.keys import defaults as _defaults
from crnet_megatron.data.safe_files import check_readable
from crnet_megatron.model.choices import RECOMPUTE_MODULES


def validate(cfg: Dict[str, Dict[str, Any]]) -> None:
    """Every numeric key finite and within its stated range, every choice valid, cross-key
    rules."""
    for section, keys in cfg.items():
        for key, v in keys.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"config key {section}.{key} = {v!r} is not a finite number")
    for section, f in all_keys():
        v, dotted = cfg[section][f.name], f"{section}.{f.name}"
        bounds, options = f.metadata["bounds"], f.metadata["choices"]
        if bounds and v is not None and not isinstance(v, list):
            lo, hi, lo_open, hi_open = bounds
            if (lo is not None and (v <= lo if lo_open else v < lo)) or \
               (hi is not None and (v >= hi if hi_open else v > hi)):
                raise ValueError(f"config key {dotted} = {v!r} is out of range; it must be "
                                 f"{bounds_text(bounds)}")
        if options and v not in options:
            raise ValueError(f"config key {dotted} = {v!r} is not one of "
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
    _validate_split(cfg["data"]["split"])
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
    """``parallel.sequence_parallel: null`` (the default) means on at TP > 1, for every variant,
    so that variants compare like with like. Megatron-LM leaves SP off unless asked; here it is
    on because a CR-Net or lowrank rank without it runs the column A factors on every token."""
    p = cfg["parallel"]
    if p["sequence_parallel"] is None:
        p["sequence_parallel"] = p["tensor_model_parallel_size"] > 1


def defaults() -> Dict[str, Dict[str, Any]]:
    return copy.deepcopy(_defaults())


def _check(section: str, key: str, value):
    if section not in SECTIONS:
        raise ValueError(f"unknown config section {section!r}; valid: {sorted(SECTIONS)}")
    field = declared(section, key)
    if field is None:
        valid = sorted(f.name for s, f in all_keys() if s == section)
        raise ValueError(f"unknown config key {section}.{key}; valid keys of {section}: {valid}")
    types = field.metadata["types"]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise ValueError(f"config key {section}.{key} = {value!r} has type "
                         f"{type(value).__name__}; expected {type_text(types)}")


def _coerce_float(section: str, key: str, value):
    """YAML reads ``3e-3`` (no dot) as a string; accept it where a number is expected."""
    field = declared(section, key)
    if isinstance(value, str) and field is not None and float in field.metadata["types"]:
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
        except RecursionError:
            raise ValueError(f"config file {path!r} is nested too deeply to be read (a config "
                             "has two levels: section, key)") from None
        if updates is None:
            raise ValueError(f"config file {path!r} is empty; it needs at least one section "
                             f"(valid: {sorted(SECTIONS)})")
        if not isinstance(updates, dict):
            raise ValueError(f"config file {path!r} must be a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        try:
            updates.setdefault(section, {})[name] = yaml.safe_load(value)
        except (yaml.YAMLError, RecursionError):
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
        if section not in SECTIONS:
            raise ValueError(f"unknown config section {section!r}; valid: {sorted(SECTIONS)}")
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


def _validate_split(split: str) -> None:
    """Megatron's ``--split``: one to three comma-separated weights, finite, >= 0, not all 0."""
    try:
        parts = [float(x) for x in str(split).replace("/", ",").split(",")]
    except ValueError:
        parts = []
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(x) and x >= 0 for x in parts) \
            or not math.isfinite(sum(parts)) or sum(parts) <= 0:
        raise ValueError(f"config key data.split = {split!r} must be train,valid,test weights: "
                         "up to three finite numbers >= 0, not all zero (e.g. '969,30,1')")


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
    if not math.isfinite(sum(weights)):
        raise ValueError(f"data.data_path: the blend weights {weights} sum beyond a float's "
                         "range; scale them down (only their ratios matter)")
    return prefixes, weights


def padded_vocab(vocab_size: int, tensor_model_parallel_size: int) -> int:
    """The model's vocabulary: Megatron-LM's padding to a multiple of 128 x TP."""
    multiple = 128 * tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
