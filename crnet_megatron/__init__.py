"""CR-Net (cross-layer low-rank LLaMA) on Megatron-Core.

The package is built in wings, each importing only the wings below it (listed before it here; ``tests/test_layering.py``
checks the order stated in ``LAYERS``):

    model        what the network is: config, the positions table, chain ops, TP linears,
                 layers, block, GPT model, specs, init                  (torch, megatron-core)
    analysis     formulas (parameters, FLOPs, payload, Algorithm 1's checkpoint set, recompute
                 memory, TP traffic; no torch) and the rank advisor
    data         corpus, tokenizer, preprocessing, validation, micro-batches, evaluation windows
    parallel     how it is distributed: process groups and the plan, building a rank's stage,
                 the pipeline payload and schedule, recompute, the CPU adaptation of megatron-core
    planner      ``crnet-plan``'s model (no torch)
    config       the run config: every YAML key once, its checks (no torch), and the
                 Megatron-Core configs made from it
    checkpoint   saving and loading, which checkpoint to resume from, integrity, reading without
                 unpickling, the run-directory rules
    training     the driver: datasets, preflight, the trainer loop, console, metrics, faults
    export       after training: checkpoint -> single-process model, HF export, generation,
                 perplexity, the self-contained ``modeling_crnet.py``
    diagnostics  what a user runs to check an install: the self-test's checks, communication
                 counters, the saved-activation and host-sync profilers
    bench        ``crnet-bench``: one runner, one table and JSON writer
    cli          every console script

The test oracle and the Transformer Engine stand-in live with the tests (``tests/``), not here.

Importing this package loads nothing heavy; the model's public names below are loaded on first
use.
"""

from __future__ import annotations

import importlib

LAYERS = ("model", "analysis", "data", "parallel", "planner", "config", "checkpoint", "training",
          "export", "diagnostics", "bench", "cli")

_EXPORTS = {
    "CRNetConfig": "crnet_megatron.model.config",
    "Chains": "crnet_megatron.model.layer",
    "CRNetGPTModel": "crnet_megatron.model.gpt",
    "build_model": "crnet_megatron.parallel.build",
    "get_crnet_decoder_block_spec": "crnet_megatron.model.specs",
    "get_crnet_layer_spec": "crnet_megatron.model.specs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'crnet_megatron' has no attribute {name!r}")
