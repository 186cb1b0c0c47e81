"""Every run-config key, declared once: a dataclass per YAML section whose fields carry the
default, the allowed types, the stated range or choices and a one-line doc (as torchtitan's job
config and Megatron's ``TransformerConfig`` declare theirs). The loader, the validator, the
``crnet-train --list-keys`` listing and README's key table are all read off these fields.
No torch."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, Optional, Tuple

from crnet_megatron.model.choices import (
    LOWRANK_INITS,
    RANK_SCHEDULES,
    RECOMPUTE_MODULES,
    VARIANTS,
)

NUM = (int, float)
OPT_INT, OPT_NUM, OPT_STR = (int, type(None)), (int, float, type(None)), (str, type(None))
OPT_BOOL, OPT_LIST = (bool, type(None)), (list, type(None))

# a stated range: (lowest, highest, lowest is open, highest is open); None = unbounded
POS, NONNEG = (1, None, False, False), (0, None, False, False)
ABOVE_ZERO = (0, None, True, False)
FRACTION = (0, 1, False, True)  # [0, 1)


def key(default, types, doc: str, *, bounds: Optional[tuple] = None,
        choices: Optional[tuple] = None):
    """One config key: its default, allowed types, range or choices, and what it does."""
    return dataclasses.field(default=default, metadata=dict(
        types=types if isinstance(types, tuple) else (types,), doc=doc, bounds=bounds,
        choices=choices))


@dataclasses.dataclass
class Model:
    num_layers: int = key(4, int, "transformer layers", bounds=POS)
    hidden_size: int = key(128, int, "model width", bounds=POS)
    ffn_hidden_size: int = key(344, int, "SwiGLU inner width", bounds=POS)
    num_attention_heads: int = key(4, int, "query heads", bounds=POS)
    num_query_groups: Any = key(None, OPT_INT, "key/value heads (GQA); null: one per head",
                                bounds=POS)
    kv_channels: Any = key(None, OPT_INT, "per-head width; null: hidden / heads", bounds=POS)
    seq_length: int = key(128, int, "tokens per sample", bounds=(1, 1 << 20, False, False))
    variant: str = key("crnet", str, "projections: CR-Net, the low-rank baseline, or dense",
                       choices=VARIANTS)
    crnet_learn_beta: bool = key(True, bool, "learn beta (false freezes it at crnet_beta_init)")
    crnet_rank: Any = key(32, (int, list), "low-rank r: one int, or one per layer")
    crnet_rank_schedule: str = key("uniform", str, "how ranks vary with depth",
                                   choices=RANK_SCHEDULES)
    crnet_dense_layers: int = key(1, int, "leading dense layers that seed the chains",
                                  bounds=NONNEG)
    crnet_beta_init: Any = key(1.0, NUM, "initial beta of every chain")
    crnet_eps: Any = key(1e-6, NUM, "the 1e-6 in s(beta) = sign(beta)(|beta| + eps)",
                         bounds=NONNEG)
    crnet_lowrank_init: str = key("cola", str, "how A and B are initialised",
                                  choices=LOWRANK_INITS)
    init_method_std: Any = key(0.02, NUM, "std of the dense weights' normal init",
                               bounds=ABOVE_ZERO)
    rotary_base: int = key(10000, int, "RoPE base", bounds=POS)
    layernorm_epsilon: Any = key(1e-6, NUM, "RMSNorm epsilon", bounds=ABOVE_ZERO)


@dataclasses.dataclass
class Parallel:
    tensor_model_parallel_size: int = key(1, int, "TP degree", bounds=POS)
    pipeline_model_parallel_size: int = key(1, int, "PP degree", bounds=POS)
    sequence_parallel: Any = key(None, OPT_BOOL, "SP; null: on at TP > 1 (every variant)")
    use_distributed_optimizer: bool = key(False, bool, "shard optimizer state over DP")
    num_layers_in_first_pipeline_stage: Any = key(None, OPT_INT, "uneven first stage",
                                                  bounds=POS)
    num_layers_in_last_pipeline_stage: Any = key(None, OPT_INT, "uneven last stage",
                                                 bounds=POS)
    virtual_pipeline_model_parallel_size: Any = key(None, OPT_INT,
                                                    "model chunks per rank (interleaved 1F1B)",
                                                    bounds=POS)
    overlap_grad_reduce: bool = key(False, bool, "overlap the DP gradient reduce with backward")
    overlap_param_gather: bool = key(False, bool, "overlap the distributed optimizer's "
                                     "parameter all-gather with the next forward")
    distributed_timeout_minutes: int = key(10, int, "collective timeout", bounds=POS)


@dataclasses.dataclass
class Optimizer:
    optimizer: str = key("adam", str, "Megatron-Core optimizer", choices=("adam", "sgd"))
    lr: Any = key(3e-3, NUM, "peak learning rate", bounds=NONNEG)
    min_lr: Any = key(3e-4, NUM, "learning rate at the end of decay (<= lr)", bounds=NONNEG)
    weight_decay: Any = key(0.01, NUM, "decoupled weight decay", bounds=NONNEG)
    adam_beta1: Any = key(0.9, NUM, "Adam beta1", bounds=FRACTION)
    adam_beta2: Any = key(0.95, NUM, "Adam beta2", bounds=FRACTION)
    adam_eps: Any = key(1e-8, NUM, "Adam epsilon", bounds=ABOVE_ZERO)
    clip_grad: Any = key(1.0, NUM, "global gradient-norm clip (0: off)", bounds=NONNEG)
    bf16: bool = key(False, bool, "bf16 parameters and compute, fp32 main weights")
    cpu_flush_denormal: bool = key(True, bool, "on CPU, flush subnormal floats to zero (x86 "
                                   "runs them far slower; CR-Net's attention gradients have "
                                   "them)")


@dataclasses.dataclass
class Schedule:
    train_iters: int = key(100, int, "optimizer steps", bounds=POS)
    micro_batch_size: int = key(8, int, "samples per micro-batch per DP rank", bounds=POS)
    global_batch_size: int = key(8, int, "samples per step over all DP ranks", bounds=POS)
    lr_warmup_fraction: Any = key(0.1, NUM, "share of train_iters spent warming up",
                                  bounds=FRACTION)
    lr_decay_style: str = key("cosine", str, "learning-rate decay", choices=(
        "cosine", "linear", "constant", "inverse-square-root"))
    seed: int = key(1234, int, "the run's seed (weights, data order)",
                    bounds=(0, 2**31 - 1, False, False))  # numpy's seeds are < 2^32
    exit_interval: Any = key(None, OPT_INT, "save and stop after this many steps", bounds=POS)


@dataclasses.dataclass
class Data:
    data_path: Any = key(None, OPT_LIST, "Megatron prefixes [p1, ...] or a blend [w1, p1, ...]; "
                         "null: the built-in corpus")
    split: str = key("969,30,1", str, "train,valid,test weights")
    tokenizer: Any = key(None, OPT_STR, "HF tokenizer.json; null: trained on the corpus")
    eod_token: Any = key(None, OPT_STR, "the tokenizer's end-of-document token")
    builtin_vocab_size: int = key(2048, int, "vocabulary of the built-in corpus's tokenizer",
                                  bounds=(260, None, False, False))
    cache_dir: str = key("~/.cache/crnet_megatron", str, "tokenized corpus and index caches")
    cache_build_timeout_minutes: int = key(240, int, "how long other ranks wait for rank 0 to "
                                           "build the caches", bounds=POS)


@dataclasses.dataclass
class Checkpoint:
    save: Any = key(None, OPT_STR, "run directory (checkpoints, config, metrics)")
    load: Any = key(None, OPT_STR, "run directory to resume from; null: save's")
    save_interval: Any = key(None, OPT_INT, "steps between checkpoints", bounds=POS)
    keep_last: int = key(2, int, "checkpoints kept", bounds=POS)
    no_load_optim: bool = key(False, bool, "resume weights only")
    override_opt_param_scheduler: bool = key(False, bool, "take the schedule keys from the "
                                             "config, not the checkpoint")
    optim_fully_reshardable: bool = key(False, bool, "save optimizer state loadable at any "
                                        "TP/PP")
    async_save: bool = key(False, bool, "write checkpoints in the background")
    fully_parallel_save: bool = key(True, bool, "DP ranks share the writing of replicated "
                                    "tensors")
    fully_parallel_load: bool = key(True, bool, "DP ranks share the reading, then exchange")
    verify: str = key("all", str, "checksums checked on resume: every file, model tensors "
                      "only, or none", choices=("all", "model", "off"))


@dataclasses.dataclass
class Eval:
    eval_interval: int = key(50, int, "steps between validation runs", bounds=POS)
    eval_iters: int = key(4, int, "global batches per validation run", bounds=POS)


@dataclasses.dataclass
class Logging:
    log_interval: int = key(10, int, "steps between log lines", bounds=POS)
    metrics_jsonl: Any = key(None, OPT_STR, "metrics file; null: save/metrics.jsonl")
    tensorboard_dir: Any = key(None, OPT_STR, "TensorBoard event directory")
    peak_tflops: Any = key(None, OPT_NUM, "per-device peak for MFU; null: from the device",
                           bounds=ABOVE_ZERO)
    progress_bar: bool = key(True, bool, "tqdm bar on a terminal")
    plot: bool = key(True, bool, "write metrics.png at the end")


@dataclasses.dataclass
class Recompute:
    recompute_granularity: Any = key(None, OPT_STR, "activation recompute (crnet: Algorithm 1)",
                                     choices=("full", "selective", "crnet", None))
    recompute_method: Any = key(None, OPT_STR, "Megatron's full-recompute method",
                                choices=("uniform", "block", None))
    recompute_num_layers: Any = key(None, OPT_INT, "Megatron's full-recompute layers",
                                    bounds=POS)
    recompute_modules: Any = key(None, OPT_LIST,
                                 f"selective recompute modules, of {list(RECOMPUTE_MODULES)}")
    crnet_checkpoint_every: int = key(8, int, "Algorithm 1 stores Y every this many layers",
                                      bounds=POS)
    crnet_recompute_min_scale: Any = key(1e-2, NUM, "store Y rather than invert where "
                                         "|s(beta)| is below this", bounds=NONNEG)
    crnet_recompute_max_ratio: Any = key(16.0, OPT_NUM, "bf16: store Y where ||Z B|| exceeds "
                                         "this times ||s(beta) Y||", bounds=ABOVE_ZERO)


@dataclasses.dataclass
class Safety:
    max_nonfinite_in_a_row: int = key(5, int, "stop after this many skipped non-finite steps",
                                      bounds=POS)
    exit_on_signal: bool = key(True, bool, "SIGTERM or SIGINT: save, then exit")


SECTIONS = {"model": Model, "parallel": Parallel, "optimizer": Optimizer, "schedule": Schedule,
            "data": Data, "checkpoint": Checkpoint, "eval": Eval, "logging": Logging,
            "recompute": Recompute, "safety": Safety}


def declared(section: str, name: str) -> Optional[dataclasses.Field]:
    """The field declaring ``section.name``, or None."""
    cls = SECTIONS.get(section)
    fields = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
    return fields.get(name)


def all_keys() -> Iterator[Tuple[str, dataclasses.Field]]:
    """(section, field) for every key, in declaration order."""
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield section, f


def defaults() -> Dict[str, Dict[str, Any]]:
    return {s: {f.name: f.default for f in dataclasses.fields(c)} for s, c in SECTIONS.items()}


def type_text(types: tuple) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def bounds_text(bounds: tuple) -> str:
    lo, hi, lo_open, hi_open = bounds
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def key_table() -> str:
    """Every key as a Markdown table (``crnet-train --list-keys``; README's table is this)."""
    rows = ["| key | default | type | allowed | what it does |", "|---|---|---|---|---|"]
    for section, f in all_keys():
        m = f.metadata
        allowed = (", ".join("null" if c is None else str(c) for c in m["choices"])
                   if m["choices"] else bounds_text(m["bounds"]) if m["bounds"] else "")
        default = "null" if f.default is None else str(f.default).lower() \
            if isinstance(f.default, bool) else str(f.default)
        rows.append(f"| `{section}.{f.name}` | {default} | {type_text(m['types'])} | "
                    f"{allowed} | {m['doc']} |")
    return "\n".join(rows) + "\n"
