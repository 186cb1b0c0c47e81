"""The training driver, in named steps as torchtitan's ``Trainer``.

Set-up (one place, in this order): distributed groups -> data (built-in corpus or indexed
prefixes) -> this rank's CR-Net stage -> Megatron DDP -> Megatron optimizer -> param scheduler
-> FLOP counts -> resume. Each step runs Megatron's forward/backward schedule over the
micro-batches (``parallel.schedule.run_schedule``: 1F1B or interleaved 1F1B under PP, chains
carried between stages and model chunks; ``finalize_model_grads`` through the schedule, and
the column betas' TP sum), a non-finite check, then the optimizer step. The loop evaluates,
saves and stops (signal, ``exit_interval``) in named steps too; what it prints and writes is
``report.RunReport``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
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
from crnet_megatron.checkpoint import run_dir
from crnet_megatron.checkpoint.checkpointing import (
    finish_saves,
    load_checkpoint,
    save_checkpoint,
)
from crnet_megatron.checkpoint.resume import (
    check_compatible,
    check_schedule,
    iteration_dir,
    load_common,
)
from crnet_megatron.config import megatron_configs, run_config
from crnet_megatron.data.batches import SampleIterator
from crnet_megatron.parallel import compat
from crnet_megatron.parallel.build import build_model_chunks
from crnet_megatron.parallel.environment import banner, versions
from crnet_megatron.parallel.groups import (
    any_rank,
    destroy_distributed,
    finalize_grads,
    init_distributed,
    run_id_from_rank0,
)
from crnet_megatron.parallel.schedule import (
    mean_loss,
    reads_batch,
    run_schedule,
    step_with_norm,
)
from crnet_megatron.training import preflight
from crnet_megatron.training.console import Console, IntervalWindow, wants_bar
from crnet_megatron.training.data import build_run_data
from crnet_megatron.training.faults import (
    StopSignals,
    children_die_with_parent,
    clean_exit_on_sigterm,
)
from crnet_megatron.training.metrics import (
    MetricsWriter,
    detect_peak_tflops,
    truncate_metrics,
)
from crnet_megatron.training.report import RunReport

log = logging.getLogger(__name__)





class Trainer(RunReport):
    def __init__(self, cfg: Dict[str, Dict[str, Any]]):
        warnings.filterwarnings("ignore")
        self.cfg = cfg
        self.versions = versions()
        self.banner = banner()
        children_die_with_parent()
        self._init_distributed()
        self.run_id = run_id_from_rank0(run_dir.new_run_id())  # a resume keeps its own (_resume)
        if self.rank0 and cfg["checkpoint"]["save"]:
            run_dir.acquire_lock(cfg["checkpoint"]["save"])
        self._build_data()
        self._build_model_and_optimizer()
        self._build_scheduler()
        self._count_flops()
        save = cfg["checkpoint"]["save"]
        self.metrics_path = cfg["logging"]["metrics_jsonl"] or (
            os.path.join(save, "metrics.jsonl") if save else None)
        self.iteration, self.consumed, self.skipped_total, self.skipped_in_a_row = 0, 0, 0, 0
        self.schedule_changes: Dict[str, tuple] = {}
        self.async_saves, self.saving = None, []  # megatron-core's queue; paths in flight
        if cfg["checkpoint"]["async_save"]:
            from megatron.core.dist_checkpointing.strategies.async_utils import (
                AsyncCallsQueue,
            )

            self.async_saves = AsyncCallsQueue()
        self._resume()
        if cfg["checkpoint"]["save"]:  # another run's newer checkpoints would be overwritten
            run_dir.refuse_foreign(cfg["checkpoint"]["save"], self.run_id, self.iteration)
        if self.rank0 and self.iteration and self.metrics_path:  # refused first: then rows a
            truncate_metrics(self.metrics_path, self.iteration)  # crashed run logged past it go
        self.writer = MetricsWriter(self.metrics_path, cfg["logging"]["tensorboard_dir"],
                                    self.rank0)

    # -- set-up ------------------------------------------------------------------------------
    def _init_distributed(self):
        # before any arithmetic of the run
        if compat.flushes_denormals(self.cfg["optimizer"]["cpu_flush_denormal"]):
            torch.set_flush_denormal(True)
        p = self.cfg["parallel"]
        init_distributed(p["tensor_model_parallel_size"], p["pipeline_model_parallel_size"],
                         seed=self.cfg["schedule"]["seed"],
                         timeout_minutes=p["distributed_timeout_minutes"],
                         virtual_pipeline_model_parallel_size=p[
                             "virtual_pipeline_model_parallel_size"])
        self.rank0 = dist.get_rank() == 0
        self.dp_size, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.num_microbatches = preflight.validate_batch(self.cfg, self.dp_size)
        self.config = megatron_configs.to_crnet_config(self.cfg)

    def _build_data(self):
        """The tokenizer and the train/valid datasets (``data.build_run_data``)."""
        run_data = build_run_data(self.cfg)
        self.tokenizer, self.prefixes = run_data.tokenizer, run_data.prefixes
        self.train_ds, self.valid_ds = run_data.train, run_data.valid
        self.vocab = run_config.padded_vocab(self.tokenizer.vocab_size,
                                             self.cfg["parallel"]["tensor_model_parallel_size"])

    def _build_model_and_optimizer(self):
        """This rank's model chunks (its stage, or its virtual stages under interleaving), each
        wrapped in Megatron DDP (bucketing for the first only, as Megatron-LM does), and
        Megatron's optimizer over them."""
        cfg = self.cfg
        m, p = cfg["model"], cfg["parallel"]
        chunks = build_model_chunks(self.config, vocab_size=self.vocab,
                                    max_sequence_length=m["seq_length"],
                                    rotary_base=m["rotary_base"], seed=cfg["schedule"]["seed"])
        dist_opt = megatron_configs.use_distributed_optimizer(cfg)
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=p["overlap_grad_reduce"],
            overlap_param_gather=p["overlap_param_gather"], use_distributed_optimizer=dist_opt)
        with compat.cuda_device_rewrite():
            self.model = [DistributedDataParallel(self.config, ddp_config, chunk,
                                                  disable_bucketing=i > 0)
                          for i, chunk in enumerate(chunks)]
            ocfg = megatron_configs.to_optimizer_config(cfg, dist_opt)
            self.optimizer = get_megatron_optimizer(
                ocfg, self.model, config_overrides=get_standard_config_overrides(ocfg))
        self.config.finalize_model_grads_func = finalize_grads
        syncs = [chunk.no_sync for chunk in self.model]
        self.config.no_sync_func = syncs if len(syncs) > 1 else syncs[0]

    def _build_scheduler(self):
        o, s = self.cfg["optimizer"], self.cfg["schedule"]
        override = self.cfg["checkpoint"]["override_opt_param_scheduler"]
        warmup = int(s["lr_warmup_fraction"] * s["train_iters"])
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=float(o["lr"]), min_lr=float(o["min_lr"]),
            lr_warmup_steps=warmup, lr_decay_steps=s["train_iters"],
            lr_decay_style=s["lr_decay_style"], start_wd=float(o["weight_decay"]),
            end_wd=float(o["weight_decay"]), wd_incr_steps=s["train_iters"],
            wd_incr_style="constant",
            override_opt_param_scheduler=override, use_checkpoint_opt_param_scheduler=not override)

    def _count_flops(self):
        """Training FLOPs per token (MFU) and the stage boundary's bytes, from the formulas."""
        cfg = self.cfg
        m, p, s = cfg["model"], cfg["parallel"], cfg["schedule"]
        shape = ModelShape.from_config(self.config, self.vocab)
        ranks = self.config.crnet_layer_ranks
        self.flops = flops_per_token(shape, ranks, m["seq_length"])["training"]
        self.dense_flops = flops_per_token(shape, None, m["seq_length"])["training"]
        self.peak = detect_peak_tflops(cfg["logging"]["peak_tflops"])
        self.boundary = (pipeline_boundary(shape, m["seq_length"], s["micro_batch_size"],
                                           p["tensor_model_parallel_size"], p["sequence_parallel"],
                                           2 if cfg["optimizer"]["bf16"] else 4)
                         if p["pipeline_model_parallel_size"] > 1 else None)

    def _resume(self):
        ck = self.cfg["checkpoint"]
        root = ck["load"] or ck["save"]
        exists = bool(root) and os.path.isdir(root)
        dist.barrier()  # every rank has looked before rank 0 can create the directory
        if not exists:
            if ck["load"]:
                raise FileNotFoundError(f"checkpoint.load={ck['load']!r} does not exist")
            return
        own = bool(ck["save"]) and os.path.realpath(root) == os.path.realpath(ck["save"])
        common = load_common(root, writable=own,  # checkpoint.load elsewhere is only read
                             verify=ck["verify"])
        if common is None:
            if ck["load"]:
                raise FileNotFoundError(f"checkpoint.load={ck['load']!r} holds no checkpoint "
                                        "(no latest_checkpointed_iteration.txt)")
            return
        check_compatible(common, run_config.shape_keys(self.cfg), self.tokenizer.fingerprint())
        self.schedule_changes = check_schedule(common, self.cfg)
        optimizer = None if ck["no_load_optim"] else self.optimizer
        self.rng_restored = load_checkpoint(common, self.model, optimizer,
                                            ck["fully_parallel_load"])
        if optimizer is not None:
            if self.schedule_changes:  # the groups' own max/min lr came back with the optimizer
                o = self.cfg["optimizer"]
                for group in self.optimizer.param_groups:
                    group.update({k: float(o[key]) for k, key in
                                  (("max_lr", "lr"), ("min_lr", "min_lr")) if k in group})
            self.scheduler.load_state_dict(common["scheduler"])
        self.iteration, self.consumed = common["iteration"], common["consumed_samples"]
        if own and isinstance(common.get("run_id"), str):
            self.run_id = common["run_id"]  # the same run, resumed: its checkpoints stay its own
        self.skipped_total = common.get("skipped_iterations", 0)
        if self.rank0:
            print(f"resumed from {common['path']} at iteration {self.iteration}", flush=True)

    # -- pieces ------------------------------------------------------------------------------
    def _iterators(self, dataset, consumed: int) -> List[Optional[SampleIterator]]:
        """One micro-batch iterator per model chunk, as Megatron-LM builds them: its own for a
        chunk that reads (the embedding's or the loss's, ``schedule.reads_batch``), None for
        the others and on ranks that read nothing (``data.reads_data``)."""
        device = next(self.model[0].parameters()).device
        return [SampleIterator(dataset, self.cfg["schedule"]["micro_batch_size"], self.dp_rank,
                               self.dp_size, consumed, device, self.tokenizer.vocab_size,
                               self.prefixes)
                if dataset is not None and reads_batch(chunk) else None
                for chunk in self.model]

    @contextlib.contextmanager
    def _params_gathered(self):
        """With ``overlap_param_gather`` the updated parameters are all-gathered in the next
        forward's pre-hooks; evaluation and checkpoints need them now (as Megatron-LM does:
        hooks off, which syncs the parameters, then on again)."""
        hooked = [c for c in self.model if getattr(c, "use_forward_hook", False)]
        with compat.cuda_device_rewrite():
            for chunk in hooked:
                chunk.disable_forward_pre_hook()
        try:
            yield
        finally:
            for chunk in hooked:
                chunk.enable_forward_pre_hook()

    def evaluate(self) -> float:
        """Loss on a fixed validation budget: eval_iters global batches from the split start."""
        s = self.cfg["schedule"]
        with self._params_gathered():
            return mean_loss(self.model, self._iterators(self.valid_ds, 0),
                             self.cfg["eval"]["eval_iters"], self.num_microbatches,
                             self.cfg["model"]["seq_length"], s["micro_batch_size"])

    def save(self):
        ck = self.cfg["checkpoint"]
        common = dict(consumed_samples=self.consumed, scheduler=self.scheduler.state_dict(),
                      skipped_iterations=self.skipped_total, config=self.cfg,
                      model_shape=run_config.shape_keys(self.cfg), vocab_size=self.vocab,
                      tokenizer=self.tokenizer.fingerprint(), versions=self.versions,
                      run_id=self.run_id)
        self.finish_saves(blocking=True)  # one save in flight at a time
        with self._params_gathered():
            path = save_checkpoint(ck["save"], self.iteration, self.model, self.optimizer,
                                   common, ck["keep_last"], ck["optim_fully_reshardable"],
                                   self.async_saves, ck["fully_parallel_save"])
        if self.async_saves is None:
            self._say(f"saved checkpoint {path}") if self.rank0 else None
        else:
            self.saving.append(path)

    def finish_saves(self, blocking: bool) -> None:
        """Async saves whose writes are complete everywhere become the latest (collective)."""
        done = finish_saves(self.async_saves, self.cfg["checkpoint"]["save"] or "", blocking)
        for _ in done:
            path = self.saving.pop(0)
            self._say(f"saved checkpoint {path} (written while training)") if self.rank0 \
                else None

    def train_step(self, data_iterators) -> Dict[str, float]:
        s = self.cfg["schedule"]
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = run_schedule(self.model, data_iterators, self.num_microbatches,
                            self.cfg["model"]["seq_length"], s["micro_batch_size"], False)
        self.consumed += s["global_batch_size"]
        with compat.cuda_device_rewrite():  # the norm Megatron's clipping uses
            found_inf = self.optimizer.prepare_grads()
            norm = float(self.optimizer.get_grad_norm())
        if any_rank(found_inf or not (math.isfinite(loss) and math.isfinite(norm))):
            return self._skip_step(loss, norm)
        self.skipped_in_a_row = 0
        with compat.cuda_device_rewrite():  # prepared once, one norm: clip and step
            step_with_norm(self.optimizer, norm)
        self.scheduler.step(increment=1)
        return dict(loss=loss, grad_norm=norm, skipped=0)

    def _skip_step(self, loss: float, norm: float) -> Dict[str, float]:
        """A non-finite step changes nothing; too many in a row stop the run."""
        self.skipped_total += 1
        self.skipped_in_a_row += 1
        if self.skipped_in_a_row >= self.cfg["safety"]["max_nonfinite_in_a_row"]:
            raise RuntimeError(f"non-finite loss or grad norm in {self.skipped_in_a_row} "
                               f"iterations in a row (last: iteration {self.iteration + 1}, "
                               f"loss {loss}, grad norm {norm}); stopping "
                               "(safety.max_nonfinite_in_a_row)")
        return dict(loss=loss, grad_norm=norm, skipped=1)

    # -- the loop ----------------------------------------------------------------------------
    def train(self) -> Dict[str, Any]:
        s, lg = self.cfg["schedule"], self.cfg["logging"]
        self._log_start()
        signals = StopSignals(self.cfg["safety"]["exit_on_signal"])
        data = self._iterators(self.train_ds, self.consumed)
        history: List[Dict[str, Any]] = []
        evals: List[Dict[str, Any]] = []
        self.console = Console(self.rank0, wants_bar(lg["progress_bar"]), s["train_iters"],
                               self.iteration)
        self._window = IntervalWindow()
        stopped_by = None
        try:
            while self.iteration < s["train_iters"]:
                out = self.train_step(data)
                self.finish_saves(blocking=False)
                self.iteration += 1
                history.append(dict(iteration=self.iteration, **out))
                self._log_step(out)
                paused = time.perf_counter()  # eval and saves are not training throughput
                self._evaluate_and_save(evals)
                self._window.start += time.perf_counter() - paused
                stopped_by = self._stop_reason(signals)
                if stopped_by:
                    break
            self._finish(stopped_by, evals)
        finally:
            self.console.close()
            signals.restore()
        self._close(stopped_by)
        return dict(history=history, evals=evals, iteration=self.iteration,
                    skipped_total=self.skipped_total, stopped_by=stopped_by)

    def _evaluate_and_save(self, evals: List[Dict[str, Any]]) -> None:
        ck = self.cfg["checkpoint"]
        if self.iteration % self.cfg["eval"]["eval_interval"] == 0:
            evals.append(self._eval_record())
        if ck["save"] and ck["save_interval"] and self.iteration % ck["save_interval"] == 0:
            self.save()

    def _stop_reason(self, signals) -> Optional[str]:
        if any_rank(signals.received is not None):
            return "signal"
        exit_at = self.cfg["schedule"].get("exit_interval")
        if exit_at and self.iteration >= exit_at:
            return "exit_interval"
        return None

    def _finish(self, stopped_by: Optional[str], evals: List[Dict[str, Any]]) -> None:
        """A final evaluation (unless stopped early) and a final save."""
        save = self.cfg["checkpoint"]["save"]
        if stopped_by is None and (not evals or evals[-1]["iteration"] != self.iteration):
            evals.append(self._eval_record())
        self.finish_saves(blocking=True)
        if save and not os.path.isdir(iteration_dir(save, self.iteration)):
            self.save()  # a second SIGTERM during this save does not cut it short
        self.finish_saves(blocking=True)


def run(cfg: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """Set up, train, and tear down the process groups."""
    try:
        with clean_exit_on_sigterm():
            return Trainer(cfg).train()
    finally:
        if cfg["checkpoint"]["save"]:
            run_dir.release_lock(cfg["checkpoint"]["save"])  # only the holder's own lock
        destroy_distributed()
        if compat.flushes_denormals(cfg["optimizer"]["cpu_flush_denormal"]):
            torch.set_flush_denormal(False)  # the process as it was (flushing is off by default)
