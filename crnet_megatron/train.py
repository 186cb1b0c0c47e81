"""``crnet-train CONFIG.yaml [--set section.key=value ...]``: a small CR-Net pre-training loop.

Trains a CR-Net LLaMA on the built-in corpus (stdlib docstrings, BPE tokenizer) with TP/SP
from the config (run under ``torchrun --nproc-per-node N`` for TP/DP > 1; gloo on CPU, NCCL on
GPU), shows a progress bar with loss and tokens/s, and prints held-out loss before and after.
It is the first, small entry point: datasets, checkpoints and the full driver come later.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional

import yaml

DEFAULTS: Dict[str, Dict[str, Any]] = {
    "model": dict(num_layers=4, hidden_size=128, ffn_hidden_size=344, num_attention_heads=4,
                  num_query_groups=None, crnet_rank=32, crnet_rank_schedule="uniform",
                  crnet_dense_layers=1, crnet_beta_init=1.0, crnet_lowrank_init="cola",
                  seq_length=128, vocab_size=2048, bf16=False),
    "parallel": dict(tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                     sequence_parallel=False),
    "training": dict(train_iters=60, micro_batch_size=8, num_microbatches=1, lr=3e-3, min_lr_ratio=0.1,
                     warmup_fraction=0.1, weight_decay=0.01, clip_grad=1.0, seed=1234,
                     eval_batches=4, log_interval=10),
    "recompute": dict(recompute_granularity=None, recompute_method=None,
                      recompute_num_layers=None, crnet_checkpoint_every=8),
    "data": dict(cache_dir="~/.cache/crnet_megatron"),
    "logging": dict(result_json=None),
}


def load_config(path: Optional[str], overrides: List[str] = ()) -> Dict[str, Dict[str, Any]]:
    """Defaults <- YAML file <- ``section.key=value`` overrides; unknown keys are errors."""
    cfg = {s: dict(v) for s, v in DEFAULTS.items()}
    updates = {}
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"config file {path!r} does not exist")
        with open(path) as f:
            updates = yaml.safe_load(f) or {}
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        updates.setdefault(section, {})[name] = yaml.safe_load(value)
    for section, values in updates.items():
        if section not in cfg:
            raise ValueError(f"unknown config section {section!r}; valid: {sorted(cfg)}")
        for name, value in (values or {}).items():
            if name not in cfg[section]:
                raise ValueError(f"unknown config key {section}.{name}; valid: {sorted(cfg[section])}")
            cfg[section][name] = value
    return cfg


def _lr_lambda(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model, weight_decay: float):
    """No weight decay on 1-D parameters: RMSNorm weights and the betas."""
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def _grad_norm(model) -> "torch.Tensor":
    """Global grad L2 norm over TP shards, counting replicated parameters once."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    sq = sum((p.grad.float() ** 2).sum() for p in model.parameters()
             if p.grad is not None and param_is_not_tensor_parallel_duplicate(p))
    sq = torch.as_tensor(sq, dtype=torch.float32)
    if ps.get_model_parallel_group().size() > 1:  # TP shards and PP stages
        dist.all_reduce(sq, group=ps.get_model_parallel_group())
    return sq.sqrt()


def _reduce_grads(model) -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from .parallel import sync_sequence_parallel_grads

    sync_sequence_parallel_grads(model)
    dp = ps.get_data_parallel_world_size()
    if dp > 1:
        for p in model.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
                p.grad.div_(dp)


def _forward_step(data_iterator, model):
    """Megatron forward-step function: loss per token, averaged over the micro-batch."""
    import torch

    tokens, labels = next(data_iterator)
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
    output = model(tokens, pos, None, labels=labels)

    def loss_func(out):
        loss = out.float().mean()
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def _run_schedule(model, batches, seq_len: int, forward_only: bool) -> float:
    """Forward(/backward) over the micro-batches with Megatron's schedule (1F1B when PP > 1);
    returns the mean loss, broadcast from the last pipeline stage to every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from .pipeline import forward_backward

    out = forward_backward(forward_step_func=_forward_step, data_iterator=iter(batches),
                           model=model, num_microbatches=len(batches), seq_length=seq_len,
                           micro_batch_size=batches[0][0].shape[0], forward_only=forward_only)
    loss = torch.zeros((), dtype=torch.float32, device=batches[0][0].device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss += sum(o["lm loss"].float() for o in out) / len(out)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return loss.item()


def _eval_loss(model, batches, seq_len: int) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        loss = _run_schedule(model, batches, seq_len, forward_only=True)
    model.train()
    return loss


def run(cfg: Dict[str, Dict[str, Any]], show_progress: bool = True) -> Dict[str, Any]:
    """Train as configured; returns losses and throughput (rank 0 prints them)."""
    warnings.filterwarnings("ignore")
    # Megatron logs "Unknown MLP type" for any MLP subclass spec (CRNetMLP); it is expected.
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from tqdm import tqdm

    from .config import CRNetConfig
    from .counting import ModelShape, flops_per_token, pipeline_boundary
    from .data.builtin import WindowSampler, builtin_tokens
    from .model import build_model
    from .parallel import destroy_distributed, init_distributed

    m, par, tr = cfg["model"], cfg["parallel"], cfg["training"]
    init_distributed(par["tensor_model_parallel_size"], par["pipeline_model_parallel_size"],
                     seed=tr["seed"])
    try:
        config = CRNetConfig(
            num_layers=m["num_layers"], hidden_size=m["hidden_size"],
            ffn_hidden_size=m["ffn_hidden_size"], num_attention_heads=m["num_attention_heads"],
            num_query_groups=m["num_query_groups"], crnet_rank=m["crnet_rank"],
            crnet_rank_schedule=m["crnet_rank_schedule"], crnet_dense_layers=m["crnet_dense_layers"],
            crnet_beta_init=m["crnet_beta_init"], crnet_lowrank_init=m["crnet_lowrank_init"],
            tensor_model_parallel_size=par["tensor_model_parallel_size"],
            pipeline_model_parallel_size=par["pipeline_model_parallel_size"],
            sequence_parallel=par["sequence_parallel"], bf16=m["bf16"],
            params_dtype=torch.bfloat16 if m["bf16"] else torch.float32,
            use_cpu_initialization=not torch.cuda.is_available(), **cfg["recompute"])
        rank0 = dist.get_rank() == 0
        tokens = builtin_tokens(m["vocab_size"], cfg["data"]["cache_dir"])
        sampler = WindowSampler(tokens, m["seq_length"], tr["seed"], ps.get_data_parallel_rank())
        model = build_model(config, vocab_size=m["vocab_size"], max_sequence_length=m["seq_length"])
        device = next(model.parameters()).device
        opt = torch.optim.AdamW(_param_groups(model, tr["weight_decay"]), lr=tr["lr"],
                                betas=(0.9, 0.95))
        total = tr["train_iters"]
        warmup = max(1, int(tr["warmup_fraction"] * total))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: _lr_lambda(s, total, warmup, tr["min_lr_ratio"]))
        evals = [(x.to(device), y.to(device))
                 for x, y in sampler.eval_batches(tr["micro_batch_size"], tr["eval_batches"])]
        shape = ModelShape.from_config(config, m["vocab_size"])
        flops_tok = flops_per_token(shape, config.crnet_layer_ranks, m["seq_length"])["training"]
        n_params = sum(p.numel() for p in model.parameters())

        seq, mbs, n_mb = m["seq_length"], tr["micro_batch_size"], tr["num_microbatches"]
        initial = _eval_loss(model, evals, seq)
        if rank0:
            print(f"CR-Net model: {n_params / 1e6:.2f}M parameters on this rank, "
                  f"ranks {config.crnet_layer_ranks}, TP={config.tensor_model_parallel_size}, "
                  f"PP={config.pipeline_model_parallel_size}, SP={config.sequence_parallel}, "
                  f"DP={ps.get_data_parallel_world_size()}, {len(tokens):,} corpus tokens",
                  flush=True)
            if config.pipeline_model_parallel_size > 1:
                b = pipeline_boundary(shape, seq, mbs, config.tensor_model_parallel_size,
                                      config.sequence_parallel, 2 if m["bf16"] else 4)
                print(f"pipeline boundary per micro-batch per rank: {b['crnet_bytes'] / 2**20:.2f} "
                      f"MiB (dense model: {b['dense_bytes'] / 2**20:.2f} MiB, "
                      f"{b['ratio']:.2f}x)", flush=True)
        tokens_per_step = mbs * n_mb * seq * ps.get_data_parallel_world_size()
        losses, step_times = [], []
        bar = tqdm(range(total), disable=not (rank0 and show_progress), desc="train",
                   dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            batches = [tuple(t.to(device) for t in sampler.next_batch(mbs)) for _ in range(n_mb)]
            opt.zero_grad(set_to_none=True)
            loss = _run_schedule(model, batches, seq, forward_only=False)
            _reduce_grads(model)
            gnorm = _grad_norm(model)
            if tr["clip_grad"] and gnorm > tr["clip_grad"]:
                for p in model.parameters():
                    if p.grad is not None:
                        p.grad.mul_(tr["clip_grad"] / (gnorm + 1e-6))
            opt.step()
            sched.step()
            step_times.append(time.perf_counter() - t0)
            losses.append(loss)
            tps = tokens_per_step / step_times[-1]
            bar.set_postfix(loss=f"{losses[-1]:.3f}", tok_s=f"{tps:,.0f}",
                            lr=f"{sched.get_last_lr()[0]:.2e}")
        final = _eval_loss(model, evals, seq)
        steady = step_times[len(step_times) // 5:] or step_times
        tok_s = tokens_per_step * len(steady) / sum(steady)
        result = dict(initial_loss=initial, final_loss=final, train_losses=losses,
                      tokens_per_s=tok_s, step_time_s=sum(steady) / len(steady),
                      tflops=tok_s * flops_tok / 1e12)
        if rank0:
            print(f"held-out loss before {initial:.4f} -> after {final:.4f} "
                  f"(ppl {math.exp(initial):.1f} -> {math.exp(final):.1f}); "
                  f"{tok_s:,.0f} tokens/s, {result['tflops']:.3f} TFLOP/s (CR-Net FLOPs)",
                  flush=True)
            if cfg["logging"]["result_json"]:
                with open(cfg["logging"]["result_json"], "w") as f:
                    json.dump(result, f, indent=1)
        return result
    finally:
        destroy_distributed()


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="crnet-train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="YAML config (see examples/configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable)")
    args = parser.parse_args(argv)
    run(load_config(args.config, args.set))


if __name__ == "__main__":
    main()
