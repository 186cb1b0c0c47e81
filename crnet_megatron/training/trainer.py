"""The training driver: set-up, the step, evaluation, checkpoints, metrics and safety.

Order of set-up (one place): distributed groups -> data (built-in corpus or indexed prefixes)
-> CR-Net model on its TP/PP shard -> Megatron DDP -> Megatron optimizer (+ param scheduler)
-> resume. Each step runs Megatron's forward/backward schedule over the micro-batches (1F1B
under PP, chains carried between stages), ``finalize_model_grads`` through the schedule, a
non-finite check, then the optimizer step.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist

from crnet_megatron.training import run_config
from crnet_megatron.training.step import run_schedule

log = logging.getLogger(__name__)


def _any_rank(flag: bool) -> bool:
    t = torch.tensor([1.0 if flag else 0.0],
                     device="cuda" if torch.cuda.is_available() else "cpu")
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _Signals:
    """SIGTERM (Slurm's warning before the time limit) and SIGINT request a save and exit."""

    def __init__(self, enabled: bool):
        self.received: Optional[int] = None
        self.previous = {}
        if enabled:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    self.previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread
                    pass

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer:
    def __init__(self, cfg: Dict[str, Dict[str, Any]]):
        warnings.filterwarnings("ignore")
        logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)
        self.cfg = cfg
        self._setup()

    # -- set-up ------------------------------------------------------------------------------
    def _setup(self):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import (
            get_megatron_optimizer,
            get_standard_config_overrides,
        )
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from crnet_megatron.analysis.counting import (
            ModelShape,
            flops_per_token,
            pipeline_boundary,
        )
        from crnet_megatron.data.preprocess import HFTokenizer
        from crnet_megatron.parallel import cpu_compat
        from crnet_megatron.parallel.build import build_model
        from crnet_megatron.parallel.groups import init_distributed
        from crnet_megatron.training.data import (
            build_datasets,
            parse_blend,
            prepare_builtin,
        )
        from crnet_megatron.training.faults import children_die_with_parent
        from crnet_megatron.training.metrics import MetricsWriter, detect_peak_tflops

        children_die_with_parent()
        cfg = self.cfg
        m, p, s, d = cfg["model"], cfg["parallel"], cfg["schedule"], cfg["data"]
        init_distributed(p["tensor_model_parallel_size"], p["pipeline_model_parallel_size"],
                         seed=s["seed"])
        self.rank0 = dist.get_rank() == 0
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.num_microbatches = run_config.validate_batch(cfg, self.dp_size)
        self.config = run_config.to_crnet_config(cfg)

        if d["data_path"]:
            prefixes, weights = parse_blend(d["data_path"])
            if not d["tokenizer"]:
                raise ValueError("data.tokenizer (a tokenizer.json) is required with data.data_path")
            tok_path = d["tokenizer"]
        else:
            (prefixes, tok_path), weights = prepare_builtin(d["cache_dir"], d["builtin_vocab_size"]), None
        self.prefixes = prefixes
        self.tokenizer = HFTokenizer(tok_path, d["eod_token"])
        e = cfg["eval"]
        evals = s["train_iters"] // e["eval_interval"] + 1
        gbs = s["global_batch_size"]
        sizes = [s["train_iters"] * gbs, evals * e["eval_iters"] * gbs, e["eval_iters"] * gbs]
        self.train_ds, self.valid_ds, _ = build_datasets(cfg, self.tokenizer, prefixes, weights,
                                                         sizes)
        self.vocab = run_config.padded_vocab(self.tokenizer.vocab_size,
                                             p["tensor_model_parallel_size"])

        model = build_model(self.config, vocab_size=self.vocab, max_sequence_length=m["seq_length"],
                            rotary_base=m["rotary_base"], seed=s["seed"])
        dist_opt = run_config.use_distributed_optimizer(cfg)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=p["overlap_grad_reduce"],
            use_distributed_optimizer=dist_opt)
        with cpu_compat.cuda_device_rewrite():
            self.model = DistributedDataParallel(self.config, ddp_config, model)
            ocfg = run_config.to_optimizer_config(cfg, dist_opt)
            self.optimizer = get_megatron_optimizer(
                ocfg, [self.model], config_overrides=get_standard_config_overrides(ocfg))
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.no_sync_func = self.model.no_sync
        o = cfg["optimizer"]
        warmup = int(s["lr_warmup_fraction"] * s["train_iters"])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=float(o["lr"]), min_lr=float(o["min_lr"]),
            lr_warmup_steps=warmup, lr_decay_steps=s["train_iters"],
            lr_decay_style=s["lr_decay_style"], start_wd=float(o["weight_decay"]),
            end_wd=float(o["weight_decay"]), wd_incr_steps=s["train_iters"],
            wd_incr_style="constant")

        shape = ModelShape.from_config(self.config, self.vocab)
        ranks = self.config.crnet_layer_ranks
        self.flops = flops_per_token(shape, ranks, m["seq_length"])["training"]
        self.dense_flops = flops_per_token(shape, None, m["seq_length"])["training"]
        self.peak = detect_peak_tflops(cfg["logging"]["peak_tflops"])
        self.boundary = (pipeline_boundary(shape, m["seq_length"], s["micro_batch_size"],
                                           p["tensor_model_parallel_size"], p["sequence_parallel"],
                                           2 if o["bf16"] else 4)
                         if p["pipeline_model_parallel_size"] > 1 else None)
        save = cfg["checkpoint"]["save"]
        jsonl = cfg["logging"]["metrics_jsonl"] or (os.path.join(save, "metrics.jsonl") if save else None)
        self.metrics_path = jsonl
        self.iteration, self.consumed, self.skipped_total, self.skipped_in_a_row = 0, 0, 0, 0
        self._resume()
        self.writer = MetricsWriter(jsonl, cfg["logging"]["tensorboard_dir"], self.rank0)

    def _resume(self):
        from crnet_megatron.training.checkpointing import (
            check_compatible,
            load_checkpoint,
            load_common,
        )
        from crnet_megatron.training.metrics import truncate_metrics

        ck = self.cfg["checkpoint"]
        root = ck["load"] or ck["save"]
        exists = bool(root) and os.path.isdir(root)
        dist.barrier()  # every rank has looked before rank 0 can create the directory
        if not exists:
            if ck["load"]:
                raise FileNotFoundError(f"checkpoint.load={ck['load']!r} does not exist")
            return
        common = load_common(root)
        if common is None:
            if ck["load"]:
                raise FileNotFoundError(f"checkpoint.load={ck['load']!r} holds no checkpoint "
                                        "(no latest_checkpointed_iteration.txt)")
            return
        check_compatible(common, run_config.shape_keys(self.cfg), self.tokenizer.fingerprint())
        optimizer = None if ck["no_load_optim"] else self.optimizer
        self.rng_restored = load_checkpoint(common, self.model, optimizer)
        if optimizer is not None:
            self.scheduler.load_state_dict(common["scheduler"])
        self.iteration, self.consumed = common["iteration"], common["consumed_samples"]
        self.skipped_total = common.get("skipped_iterations", 0)
        if self.rank0:
            if self.metrics_path:  # rows a crashed run logged past this checkpoint are dropped
                truncate_metrics(self.metrics_path, self.iteration)
            print(f"resumed from {common['path']} at iteration {self.iteration}", flush=True)

    # -- pieces ------------------------------------------------------------------------------
    def _iterator(self, dataset, consumed: int):
        from crnet_megatron.training.data import SampleIterator

        device = next(self.model.parameters()).device
        return SampleIterator(dataset, self.cfg["schedule"]["micro_batch_size"], self.dp_rank,
                              self.dp_size, consumed, device, self.tokenizer.vocab_size,
                              self.prefixes)

    def evaluate(self) -> float:
        """Loss on a fixed validation budget: eval_iters global batches from the split start."""
        from crnet_megatron.training.step import mean_loss

        s = self.cfg["schedule"]
        return mean_loss(self.model, self._iterator(self.valid_ds, 0), self.cfg["eval"]["eval_iters"],
                         self.num_microbatches, self.cfg["model"]["seq_length"],
                         s["micro_batch_size"])

    def save(self):
        from crnet_megatron.training.checkpointing import save_checkpoint

        ck = self.cfg["checkpoint"]
        common = dict(consumed_samples=self.consumed, scheduler=self.scheduler.state_dict(),
                      skipped_iterations=self.skipped_total, config=self.cfg,
                      model_shape=run_config.shape_keys(self.cfg), vocab_size=self.vocab,
                      tokenizer=self.tokenizer.fingerprint())
        path = save_checkpoint(ck["save"], self.iteration, self.model, self.optimizer, common,
                               ck["keep_last"])
        if self.rank0:
            print(f"saved checkpoint {path}", flush=True)

    def train_step(self, data_iterator) -> Dict[str, float]:
        from crnet_megatron.parallel import cpu_compat

        s = self.cfg["schedule"]
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = run_schedule(self.model, data_iterator, self.num_microbatches,
                            self.cfg["model"]["seq_length"], s["micro_batch_size"], False)
        self.consumed += s["global_batch_size"]
        with cpu_compat.cuda_device_rewrite():  # the norm Megatron's clipping uses
            self.optimizer.prepare_grads()
            norm = float(self.optimizer.get_grad_norm())
        if _any_rank(not (math.isfinite(loss) and math.isfinite(norm))):
            self.skipped_total += 1
            self.skipped_in_a_row += 1
            limit = self.cfg["safety"]["max_nonfinite_in_a_row"]
            if self.skipped_in_a_row >= limit:
                raise RuntimeError(f"non-finite loss or grad norm in {self.skipped_in_a_row} "
                                   f"iterations in a row (last: iteration {self.iteration + 1}, "
                                   f"loss {loss}, grad norm {norm}); stopping "
                                   "(safety.max_nonfinite_in_a_row)")
            return dict(loss=loss, grad_norm=norm, skipped=1)
        self.skipped_in_a_row = 0
        with cpu_compat.cuda_device_rewrite():
            self.optimizer.step()
        self.scheduler.step(increment=1)
        return dict(loss=loss, grad_norm=norm, skipped=0)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        from tqdm import tqdm

        from crnet_megatron.training.checkpointing import iteration_dir
        from crnet_megatron.training.metrics import peak_memory_gb, throughput

        cfg = self.cfg
        s, lg, ck, ev = cfg["schedule"], cfg["logging"], cfg["checkpoint"], cfg["eval"]
        if self.rank0:
            print("resolved config:\n" + run_config.dump(cfg), flush=True)
            if ck["save"]:
                os.makedirs(ck["save"], exist_ok=True)
                with open(os.path.join(ck["save"], "config.yaml"), "w") as f:
                    f.write(run_config.dump(cfg))
                # the tokenizer travels with the run (export, eval and generation read it)
                shutil.copyfile(self.tokenizer.path, os.path.join(ck["save"], "tokenizer.json"))
            print(f"{self.config.crnet_variant}: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params "
                  f"on this rank; ranks {self.config.crnet_layer_ranks}; {self.flops / 1e9:.3f} "
                  f"GFLOP/token (dense equivalent {self.dense_flops / 1e9:.3f}); MFU peak "
                  f"{self.peak or 'n/a'} TFLOP/s", flush=True)
            if self.boundary:
                b = self.boundary
                print(f"pipeline boundary per micro-batch per rank: {b['crnet_bytes'] / 2**20:.2f}"
                      f" MiB ({b['ratio']:.2f}x the dense model's {b['dense_bytes'] / 2**20:.2f} "
                      "MiB)", flush=True)
        signals = _Signals(cfg["safety"]["exit_on_signal"])
        data = self._iterator(self.train_ds, self.consumed)
        world = dist.get_world_size()
        history: List[Dict[str, Any]] = []
        evals: List[Dict[str, Any]] = []
        bar = tqdm(total=s["train_iters"], initial=self.iteration, desc="train",
                   disable=not (self.rank0 and lg["progress_bar"]), dynamic_ncols=True)
        window_t, window_tokens = time.perf_counter(), 0
        stopped_by = None
        exit_at = s.get("exit_interval")
        try:
            while self.iteration < s["train_iters"]:
                out = self.train_step(data)
                self.iteration += 1
                window_tokens += s["global_batch_size"] * cfg["model"]["seq_length"]
                history.append(dict(iteration=self.iteration, **out))
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{self._lr():.2e}")
                if self.iteration % lg["log_interval"] == 0 or self.iteration == s["train_iters"]:
                    dt = time.perf_counter() - window_t
                    rec = dict(split="train", iteration=self.iteration, loss=out["loss"],
                               ppl=math.exp(min(out["loss"], 50)), lr=self._lr(),
                               grad_norm=out["grad_norm"], skipped_total=self.skipped_total,
                               peak_memory_gb=peak_memory_gb(),
                               **throughput(window_tokens, dt, self.flops, self.dense_flops,
                                            world, self.peak))
                    self.writer.write(rec)
                    bar.set_postfix(loss=f"{out['loss']:.3f}", lr=f"{self._lr():.2e}",
                                    tok_s=f"{rec['tokens_per_s']:,.0f}")
                    window_t, window_tokens = time.perf_counter(), 0
                paused = time.perf_counter()  # eval and saves are not training throughput
                if self.iteration % ev["eval_interval"] == 0:
                    evals.append(self._eval_record())
                if ck["save"] and ck["save_interval"] and self.iteration % ck["save_interval"] == 0:
                    self.save()
                window_t += time.perf_counter() - paused
                if _any_rank(signals.received is not None):
                    stopped_by = "signal"
                    break
                if exit_at and self.iteration >= exit_at:
                    stopped_by = "exit_interval"
                    break
            if stopped_by is None and (not evals or evals[-1]["iteration"] != self.iteration):
                evals.append(self._eval_record())
            if ck["save"] and not os.path.isdir(iteration_dir(ck["save"], self.iteration)):
                self.save()  # a second SIGTERM during this save does not cut it short
        finally:
            bar.close()
            signals.restore()
        if self.rank0 and stopped_by == "signal":
            print(f"stopped by signal at iteration {self.iteration}; checkpoint saved", flush=True)
        self.writer.close()
        if self.rank0 and lg["plot"] and self.metrics_path and os.path.exists(self.metrics_path):
            from crnet_megatron.training.plot import plot_metrics

            png = plot_metrics(self.metrics_path)
            print(f"loss curves: {png}", flush=True)
        return dict(history=history, evals=evals, iteration=self.iteration,
                    skipped_total=self.skipped_total, stopped_by=stopped_by)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def _eval_record(self) -> Dict[str, Any]:
        loss = self.evaluate()
        rec = dict(split="valid", iteration=self.iteration, loss=loss, ppl=math.exp(min(loss, 50)))
        self.writer.write(rec)
        if self.rank0:
            from tqdm import tqdm

            tqdm.write(f"iteration {self.iteration}: validation loss {loss:.4f}, "
                       f"perplexity {rec['ppl']:.2f}")
        return rec


def run(cfg: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Set up, train, and tear down the process groups."""
    from crnet_megatron.parallel.groups import destroy_distributed

    try:
        return Trainer(cfg).train()
    finally:
        destroy_distributed()
