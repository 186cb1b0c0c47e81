"""CRNetConfig: Megatron-Core's TransformerConfig plus the CR-Net fields.

Defaults are LLaMA-2 (RMSNorm, SwiGLU, no biases, no dropout); the CR-Net fields describe which
layers are dense (they seed the chains) and the rank of every low-rank layer. Every invalid value
raises one ``ValueError`` naming the field, the value and what would be valid.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Union

import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

from crnet_megatron.model import positions
from crnet_megatron.model.choices import (
    LOWRANK_INITS,
    RANK_SCHEDULES,
    RECOMPUTE_MODULES,
    VARIANTS,
)
from crnet_megatron.model.rules import layout_problems, transformer_config_names
from crnet_megatron.model.switches import unhonoured


def _bad(field: str, value, valid: str) -> ValueError:
    return ValueError(f"CRNetConfig.{field}={value!r} is invalid: {valid}")


@dataclass
class CRNetConfig(TransformerConfig):
    """TransformerConfig for a CR-Net LLaMA.

    crnet_variant: "crnet" (the method), or a baseline in the same framework: "lowrank"
        (W = B A with the same ranks and init, no cross-layer term; crnet_dense_layers may be 0)
        or "dense" (every layer dense; the ranks are ignored).
    crnet_learn_beta: False freezes beta at crnet_beta_init (the paper's ablation).
    crnet_rank: one int for every CR-Net layer, or a list with one int per CR-Net layer
        (layers crnet_dense_layers+1 .. num_layers).
    crnet_rank_schedule: "uniform" uses crnet_rank as is; "middle-high" (the paper's best
        ablation) scales an int crnet_rank from 0.75x at the ends to 1.25x in the middle.
    crnet_eps: epsilon of s(beta) = sign(beta)(|beta| + eps).
    crnet_beta_init: initial beta; 0 is rejected because sign(0) = 0 freezes the parameter.
    crnet_dense_layers: leading dense layers (the paper uses 1: the high-rank anchor).
    crnet_lowrank_init: "cola" gives Var(AB) ~ 1/(h_in + h_out); "megatron" uses init_method_std.
    recompute_granularity: Megatron's "full" / "selective", or "crnet" (the paper's Algorithm 1,
        ``recompute.py``) with crnet_checkpoint_every (Y stored every 8th layer) and
        crnet_recompute_min_scale (chains whose next |s(beta)| is smaller are stored, not inverted)
        and crnet_recompute_max_ratio (16-bit chains whose next update is larger than this many
        times the carried term are stored; None disables the check; ``parallel.conditioning``
        decides from earlier forwards' statistics, with no host sync per layer or micro-batch).
    """

    # LLaMA-2 defaults (override TransformerConfig's GPT defaults).
    normalization: str = "RMSNorm"
    gated_linear_unit: bool = True
    activation_func: callable = F.silu
    add_bias_linear: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    layernorm_epsilon: float = 1e-6
    # As Megatron-LM always sets it: a stage's packed output keeps only its graph once sent
    # (CR-Net's boundary tensor is ~11x a dense one's, so holding it per in-flight micro-batch
    # would cost more than for dense).
    deallocate_pipeline_outputs: bool = True

    # CR-Net.
    crnet_variant: str = "crnet"
    crnet_learn_beta: bool = True
    crnet_rank: Union[int, List[int]] = 128
    crnet_rank_schedule: str = "uniform"
    crnet_eps: float = 1e-6
    crnet_beta_init: float = 1.0
    crnet_dense_layers: int = 1
    crnet_lowrank_init: str = "cola"
    crnet_checkpoint_every: int = 8
    crnet_recompute_min_scale: float = 1e-2
    crnet_recompute_max_ratio: Optional[float] = 16.0

    def __post_init__(self):
        self._validate_switches()
        self._validate_pipeline()
        # "crnet" (Algorithm 1) sits beside Megatron's "full"/"selective", which Megatron's own
        # validation knows; hide it from that validation only.
        crnet_recompute = self.recompute_granularity == "crnet"
        if crnet_recompute:
            self.recompute_granularity = None
        super().__post_init__()
        if crnet_recompute:
            self.recompute_granularity = "crnet"
            if self.crnet_variant != "crnet":
                raise _bad("recompute_granularity", "crnet",
                           f"Algorithm 1 inverts the cross-layer chain, which crnet_variant="
                           f"{self.crnet_variant!r} does not have; use 'full' or 'selective'")
        if self.crnet_checkpoint_every < 1:
            raise _bad("crnet_checkpoint_every", self.crnet_checkpoint_every, "must be >= 1")
        if not self.crnet_recompute_min_scale >= 0:
            raise _bad("crnet_recompute_min_scale", self.crnet_recompute_min_scale, "must be >= 0")
        self._validate_crnet()
        self.crnet_layer_ranks = self._resolve_ranks()
        self._validate_ranks()

    # -- validation -----------------------------------------------------------------------
    def _validate_pipeline(self):
        pp = self.pipeline_model_parallel_size
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or pp < 2):
            raise _bad("virtual_pipeline_model_parallel_size", vpp,
                       "interleaving needs pipeline_model_parallel_size >= 2 and a size >= 1 "
                       "(model chunks per pipeline rank); use None for 1F1B")
        if vpp is not None:
            # Megatron-LM's settings for interleaving: P2P overlapped, not batched. Batched,
            # a PP=2 rank sends its activation and its gradient to the same peer in one batch,
            # and the peer's receives can match them the other way round (same shapes).
            self.overlap_p2p_comm, self.batch_p2p_comm = True, False
        self._check_layout_rules()
        if pp > 1 and self.pipeline_dtype is None:
            self.pipeline_dtype = self.params_dtype

    def _check_layout_rules(self):
        """The layout's divisibility rules, as the run config checks them (``model.rules``)."""
        problems = layout_problems(
            heads=self.num_attention_heads, groups=self.num_query_groups,
            ffn=self.ffn_hidden_size, layers=self.num_layers, seq=None,
            tp=self.tensor_model_parallel_size, pp=self.pipeline_model_parallel_size,
            sequence_parallel=bool(self.sequence_parallel),
            first=self.num_layers_in_first_pipeline_stage,
            last=self.num_layers_in_last_pipeline_stage,
            vpp=self.virtual_pipeline_model_parallel_size)
        if problems:
            raise ValueError(transformer_config_names(problems[0]))

    def _validate_switches(self):
        """Every Megatron switch the CR-Net forwards do not honour is refused at any value but
        its default (``model.switches``: an allowlist), not silently ignored."""
        refused = unhonoured(self)
        if refused:
            raise _bad(*refused)
        modules = list(self.recompute_modules or ())
        unknown = [m for m in modules if m not in RECOMPUTE_MODULES]
        if self.recompute_granularity == "selective" and unknown:
            raise _bad("recompute_modules", modules, f"the CR-Net layers honour "
                       f"{list(RECOMPUTE_MODULES)}; {unknown} would save nothing")

    def _validate_crnet(self):
        if self.crnet_beta_init == 0:
            raise _bad("crnet_beta_init", 0, "must be non-zero (sign(0)=0 gives a dead beta)")
        if not self.crnet_eps > 0:
            raise _bad("crnet_eps", self.crnet_eps, "must be > 0")
        if self.crnet_variant not in VARIANTS:
            raise _bad("crnet_variant", self.crnet_variant, f"one of {VARIANTS}")
        lowest = 0 if self.crnet_variant == "lowrank" else 1
        if not lowest <= self.crnet_dense_layers <= self.num_layers:
            raise _bad("crnet_dense_layers", self.crnet_dense_layers,
                       f"must be in [{lowest}, num_layers={self.num_layers}]"
                       + (" (a CR-Net chain needs a dense layer to seed it)" if lowest else ""))
        if self.crnet_rank_schedule not in RANK_SCHEDULES:
            raise _bad("crnet_rank_schedule", self.crnet_rank_schedule, f"one of {RANK_SCHEDULES}")
        if self.crnet_lowrank_init not in LOWRANK_INITS:
            raise _bad("crnet_lowrank_init", self.crnet_lowrank_init, f"one of {LOWRANK_INITS}")

    @property
    def num_dense_layers(self) -> int:
        """Leading dense layers: all of them for the dense baseline."""
        return self.num_layers if self.crnet_variant == "dense" else self.crnet_dense_layers

    @property
    def carries_chains(self) -> bool:
        """Whether layers hand projection outputs to the next layer (CR-Net only)."""
        return self.crnet_variant == "crnet"

    def _resolve_ranks(self) -> List[int]:
        if self.crnet_variant == "dense":
            return []
        n = self.num_layers - self.crnet_dense_layers
        r = self.crnet_rank
        if isinstance(r, (list, tuple)):
            if self.crnet_rank_schedule != "uniform":
                raise _bad("crnet_rank_schedule", self.crnet_rank_schedule,
                           "a per-layer crnet_rank list needs 'uniform'")
            if len(r) != n:
                raise _bad("crnet_rank", list(r),
                           f"a per-layer list needs {n} entries (one per CR-Net layer "
                           f"{self.crnet_dense_layers + 1}..{self.num_layers}), got {len(r)}")
            return [int(x) for x in r]
        if not isinstance(r, int) or isinstance(r, bool):
            raise _bad("crnet_rank", r, "an int, a list of ints, with a crnet_rank_schedule")
        if self.crnet_rank_schedule == "uniform" or n <= 1:
            return [r] * n
        ranks = []
        for i in range(n):
            mid = 1.0 - abs(2.0 * i / (n - 1) - 1.0)  # 0 at both ends, 1 in the middle
            ranks.append(max(1, int(round(r * (0.75 + 0.5 * mid)))))
        return ranks

    @property
    def query_projection_size(self) -> int:
        """Width of q (Megatron's ``Attention.query_projection_size``)."""
        return self.num_attention_heads * self.kv_channels

    @property
    def kv_projection_size(self) -> int:
        """Width of k (and of v) under GQA."""
        return self.num_query_groups * self.kv_channels

    def position_widths(self):
        """{"h", "f", "q", "kv"} widths the positions table reads (``positions.widths``)."""
        return positions.widths(self.hidden_size, self.ffn_hidden_size,
                                self.query_projection_size, self.kv_projection_size)

    def payload_parts(self):
        """(part, width per TP rank, SP fold) of this model's stage-boundary tensor
        (``positions.payload_parts``)."""
        return positions.payload_parts(
            self.hidden_size, self.ffn_hidden_size, self.query_projection_size,
            self.kv_projection_size, self.tensor_model_parallel_size,
            bool(self.sequence_parallel), self.carries_chains)

    @property
    def payload_width(self) -> int:
        """Last dimension of the packed stage-boundary tensor: its parts' widths x folds."""
        return positions.packed_width(self.payload_parts())

    def projection_shapes(self):
        """(module.position, h_in, h_out) of the 7 positions (``positions.POSITIONS``)."""
        shapes = positions.shapes(self.hidden_size, self.ffn_hidden_size,
                                  self.query_projection_size, self.kv_projection_size)
        return [(f"{p.module}.{p.name}", i, o) for p, (_, i, o) in zip(positions.POSITIONS, shapes)]

    def _validate_ranks(self):
        """The rank rules, stated once: 0 < r < min(h_in, h_out) for every position. Any r
        works at any TP size: column A factors are replicated over TP and B factors are split
        on their output width, so no rank needs to divide by TP."""
        for i, r in enumerate(self.crnet_layer_ranks):
            layer = self.crnet_dense_layers + 1 + i
            if r <= 0:
                raise _bad("crnet_rank", r, f"layer {layer}: rank must be > 0")
            for name, h_in, h_out in self.projection_shapes():
                if r >= min(h_in, h_out):
                    raise _bad("crnet_rank", r, f"layer {layer} {name}: rank must be < "
                               f"min(h_in={h_in}, h_out={h_out}) = {min(h_in, h_out)}")

    # -- queries ---------------------------------------------------------------------------
    def is_crnet_layer(self, layer_number: int) -> bool:
        """layer_number is 1-based and global."""
        return layer_number > self.num_dense_layers

    def rank_of_layer(self, layer_number: int) -> Optional[int]:
        if not self.is_crnet_layer(layer_number):
            return None
        return self.crnet_layer_ranks[layer_number - self.num_dense_layers - 1]
