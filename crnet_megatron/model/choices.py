"""The names a model config chooses from (no torch: the run config and the planner check them
before anything heavy is imported)."""

# the projection variant: CR-Net, or a baseline built from the same TP modules
VARIANTS = ("crnet", "lowrank", "dense")
RANK_SCHEDULES = ("uniform", "middle-high")
LOWRANK_INITS = ("cola", "megatron")
# Megatron's selective recompute modules the CR-Net layers honour (model/layer.py, attention.py)
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm")
