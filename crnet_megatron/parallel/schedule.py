"""One step of Megatron's schedule over the micro-batches: the forward step and its loss, the
schedule (1F1B, or interleaved 1F1B with model chunks, under PP; chains carried between stages
and chunks), and the forward-only mean loss that training-time eval and ``crnet-eval`` share."""

from __future__ import annotations

import functools
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.utils import get_attr_wrapped_model

from crnet_megatron.data.batches import get_batch
from crnet_megatron.parallel.pipeline import forward_backward, model_chunks


def reads_batch(model) -> bool:
    """A model chunk that holds the embedding or the loss reads the micro-batch; the others
    (a middle stage, or an inner virtual stage of the first/last rank) take the previous
    stage's output."""
    return bool(get_attr_wrapped_model(model, "pre_process")
                or get_attr_wrapped_model(model, "post_process"))


def _forward_step(data_iterator, model, micro_batch_size: int, seq_len: int):
    device = next(model.parameters()).device
    batch = (get_batch(data_iterator, micro_batch_size, seq_len, device)
             if reads_batch(model) else None)
    if batch is None:  # its input is the previous stage's output
        return model(None, None, None), lambda out: (out, {})
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    mask = batch["loss_mask"].float()

    def loss_func(out):
        loss = (out.float() * mask).sum() / mask.sum().clamp(min=1.0)
        return loss, {"lm loss": loss.detach().clone()}

    return output, loss_func


def run_schedule(model, data_iterator, num_microbatches: int, seq_len: int, mbs: int,
                 forward_only: bool) -> float:
    """Megatron's schedule over the micro-batches (``model``: a module or this rank's model
    chunks); mean loss, broadcast from the last stage."""
    step = functools.partial(_forward_step, micro_batch_size=mbs, seq_len=seq_len)
    out = forward_backward(forward_step_func=step, data_iterator=data_iterator,
                           model=model, num_microbatches=num_microbatches, seq_length=seq_len,
                           micro_batch_size=mbs, forward_only=forward_only)
    device = next(model_chunks(model)[0].parameters()).device
    loss = torch.zeros((), dtype=torch.float32, device=device)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss += sum(o["lm loss"].float() for o in out) / len(out)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(loss, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    if ps.get_data_parallel_world_size() > 1:  # the global batch's loss, as Megatron logs it
        dist.all_reduce(loss, group=ps.get_data_parallel_group())
        loss /= ps.get_data_parallel_world_size()
    return loss.item()


def step_with_norm(optimizer, grad_norm: float) -> None:
    """Megatron's optimizer step once ``prepare_grads`` and ``get_grad_norm`` have run this step
    (the trainer needs the norm first, for its non-finite check): clip by that norm and step with
    the ready gradients, as ``ChainedOptimizer.step`` does after its own prepare and norm, so
    gradients are prepared once and the norm all-reduced once per step."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if getattr(opt, "is_stub_optimizer", False):
            continue
        params = opt.get_parameters()
        if params and opt.config.clip_grad > 0.0:
            clip_grad_by_total_norm_fp32(
                params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    optimizer.step_with_ready_grads()


def mean_loss(model, batches: Iterator, num_batches: int, num_microbatches: int, seq_len: int,
              micro_batch_size: int) -> float:
    """Forward-only loss over ``num_batches`` global batches (windows of equal length make the
    mean over batches the mean over tokens)."""
    chunks = model_chunks(model)
    was_training = chunks[0].training
    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        losses = [run_schedule(model, batches, num_microbatches, seq_len, micro_batch_size,
                               forward_only=True) for _ in range(num_batches)]
    for chunk in chunks:
        chunk.train(was_training)
    return sum(losses) / len(losses)
