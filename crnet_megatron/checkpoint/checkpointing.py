"""Megatron distributed checkpoints (``torch_dist``): crash-safe saves, safe and fault-tolerant loads.

Layout: ``SAVE/iter_0000100/`` (written as ``iter_0000100.tmp`` and renamed once every rank has
finished) and ``SAVE/latest_checkpointed_iteration.txt``, replaced atomically only after the
rename. A crash or a full disk during a save therefore leaves ``latest`` at the previous,
complete checkpoint. The model's ``sharded_state_dict`` makes checkpoints loadable at another
TP/PP layout; the per-rank RNG state (plain tensors) is restored only when the layout is
unchanged. Nothing in a checkpoint is pickled, and reading one never unpickles code
(``safe_checkpoint``); each save is checksummed (``integrity``). Which checkpoint a run
resumes from, and its checks, are ``resume``'s.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import glob
import os
import queue
import shutil
import time
from typing import Any, Dict, List, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core import parallel_state as ps
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from torch.distributed.checkpoint.api import CheckpointException

from crnet_megatron.checkpoint import run_dir
from crnet_megatron.checkpoint.integrity import write_checksums, writer_open
from crnet_megatron.checkpoint.resume import (
    _barrier,
    _rank0,
    _remove_partial_saves,
    iteration_dir,
    read_latest,
)
from crnet_megatron.checkpoint.run_dir import TRACKER
from crnet_megatron.checkpoint.safe_checkpoint import (
    TensorsOnly,
    UnsafeCheckpointError,
    load_metadata,
    object_sizes,
    safe_reads,
)
from crnet_megatron.data.safe_files import write_text
from crnet_megatron.parallel import compat
from crnet_megatron.parallel.pipeline import model_chunks


class CheckpointSaveError(RuntimeError):
    """A save failed; the previous checkpoint is still the latest."""


def layout() -> Dict[str, int]:
    return dict(tp=ps.get_tensor_model_parallel_world_size(),
                pp=ps.get_pipeline_model_parallel_world_size(),
                vpp=ps.get_virtual_pipeline_model_parallel_world_size(),
                dp=ps.get_data_parallel_world_size())


def _rng_tensors() -> Dict[str, ShardedTensor]:
    """This rank's RNG states as uint8 tensors, one slot per (PP, TP, DP) rank."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state().cpu()
    pp, tp, dp = (ps.get_pipeline_model_parallel_world_size(),
                  ps.get_tensor_model_parallel_world_size(), ps.get_data_parallel_world_size())
    ranks = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
             ps.get_data_parallel_rank())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return {name: ShardedTensor.from_rank_offsets(
        f"rng_state.{name}", state.to(device).view(1, 1, 1, -1),
        (0, ranks[0], pp), (1, ranks[1], tp), (2, ranks[2], dp), replica_id=0)
        for name, state in states.items()}


def optimizer_format(optimizer, fully_reshardable: bool) -> Optional[str]:
    """How the distributed optimizer's state is written (None: the plain optimizer's own).

    ``dp_reshardable`` (Megatron-LM's default) writes each rank's shard as it is: no gather, no
    extra host copies; it loads at any DP but only at the TP/PP it was saved with.
    ``fully_reshardable`` gathers every bucket over DP and writes one copy per parameter, which
    loads at any layout, at the price of three fp32 host copies of the model-parallel shard on
    every DP rank during the save.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if not any(isinstance(o, DistributedOptimizer)
               for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        return None
    return "fully_reshardable" if fully_reshardable else "dp_reshardable"


def _modules(model) -> List[torch.nn.Module]:
    """This rank's model chunks, unwrapped from DDP."""
    return [getattr(chunk, "module", chunk) for chunk in model_chunks(model)]


def _model_keys(model) -> List[str]:
    """Where each chunk's state sits in the checkpoint's state dict (Megatron-LM's names:
    ``model``, or ``model0``, ``model1``, ... under interleaving). The tensors themselves are
    keyed by global layer number, so a checkpoint loads at any PP x VPP layout."""
    n = len(_modules(model))
    return ["model"] if n == 1 else [f"model{i}" for i in range(n)]


def _sharded_state(model, optimizer, is_loading: bool, with_rng: bool, fmt: Optional[str],
                   tensors_only: TensorsOnly):
    state = {key: tensors_only(module.sharded_state_dict())
             for key, module in zip(_model_keys(model), _modules(model))}
    if optimizer is not None:
        state["optimizer"] = tensors_only(optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": fmt or "fully_reshardable"}), ("optimizer",))
    if with_rng:
        state["rng_state"] = _rng_tensors()
    return state


class _WriteResults:
    """Where megatron-core's forked async writer puts its write results: a fork-context
    multiprocessing queue (a pipe, no server process) that this process drains into a buffer
    while it waits (``drain``). Megatron-core joins the writer before reading its results; a
    writer whose results fill the pipe would then never exit, so the waiting loop of
    ``finish_saves`` drains between its checks."""

    def __init__(self):
        import multiprocessing as mp

        self._pipe = mp.get_context("fork").Queue()
        self._got: collections.deque = collections.deque()

    def put(self, item) -> None:  # in the writer
        self._pipe.put(item)

    def drain(self) -> None:
        while True:
            try:
                self._got.append(self._pipe.get_nowait())
            except queue.Empty:
                return

    def get_nowait(self):
        self.drain()
        if not self._got:
            raise queue.Empty
        return self._got.popleft()


def _write_results_queue(async_save: bool):
    """Megatron's checkpoint writer collects write results through a queue it creates with a
    ``multiprocessing.Manager()`` (a server process that outlives a killed trainer). A
    synchronous save writes from this process, so an in-process queue does the job; an async
    save writes from a forked process (``_WriteResults``)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = _WriteResults() if async_save else queue.Queue()


def _free_bytes(path: str) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _failure_reason(exc: BaseException, root: Optional[str] = None) -> str:
    """'no space left on device' when that is what happened anywhere in a (wrapped) failure,
    or when the save failed on a filesystem with no space left (torch's serializer reports a
    full disk as ``unexpected pos``; megatron-core 0.17+'s writer threads report a worker's
    OSError by its class alone)."""
    if root is not None and _free_bytes(root) < _NEARLY_FULL:
        return "no space left on device"
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left" in str(e):
            return "no space left on device"
        todo += [e.__cause__, e.__context__]
        for value in (getattr(e, "failures", None) or {}).values():
            todo.append(value[0] if isinstance(value, tuple) else value)
    return f"{type(exc).__name__}: {exc}"


_NEARLY_FULL = 1 << 20


def _dp_group():
    """The group that holds replicas of the same tensors (Megatron-LM's choice for the
    fully-parallel wrappers), or None at DP=1 where there is nothing to share."""
    if ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy(fully_parallel: bool):
    """megatron-core's default writer; with ``fully_parallel`` wrapped so that the DP replicas
    split the replicated tensors between them (each writes about 1/DP of them) instead of DP
    rank 0 writing them all (Megatron-LM's ``--ckpt-fully-parallel-save``)."""
    from megatron.core.dist_checkpointing.serialization import (
        get_default_save_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    strategy = get_default_save_sharded_strategy()
    group = _dp_group() if fully_parallel else None
    return strategy if group is None else FullyParallelSaveStrategyWrapper(strategy, group)


def _load_strategy(path: str, fully_parallel: bool):
    """megatron-core's default reader; with ``fully_parallel`` each DP replica reads about 1/DP
    of the replicated tensors and the replicas exchange them (instead of every replica reading
    every shard; Megatron-LM's ``--ckpt-fully-parallel-load``)."""
    from megatron.core.dist_checkpointing.serialization import (
        get_default_load_sharded_strategy,
    )
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    strategy = get_default_load_sharded_strategy(path)
    group = _dp_group() if fully_parallel else None
    return strategy if group is None else FullyParallelLoadStrategyWrapper(strategy, group)


def save_checkpoint(root: str, iteration: int, model, optimizer, common: Dict[str, Any],
                    keep_last: int, fully_reshardable: bool = False, async_queue=None,
                    fully_parallel: bool = True) -> str:
    """Save into ``iter_N.tmp``, then rename it into place, move ``latest`` and keep the newest
    ``keep_last``. With ``async_queue`` (megatron-core's ``AsyncCallsQueue``) the tensors are
    written by a forked process while training goes on, and the rename, ``latest`` and the
    retention happen only when every rank's write is complete (``finish_saves``)."""
    final = iteration_dir(root, iteration)
    tmp = final + ".tmp"
    if os.path.lexists(final) and (os.path.islink(final) or not os.path.isdir(final)):
        raise CheckpointSaveError(f"could not save checkpoint {final}: that path exists and is "
                                  "not a checkpoint directory (a file or a link); move it away")
    if _rank0():
        os.makedirs(root, exist_ok=True)
        _remove_partial_saves(root)
        os.makedirs(tmp)
    _barrier()
    _write_results_queue(async_queue is not None)
    compat.route_checkpoint_writes(writer_open)  # shards are hashed as they are written
    try:
        with compat.cuda_device_rewrite():
            fmt = optimizer_format(optimizer, fully_reshardable)
            state = _sharded_state(model, optimizer, is_loading=False, with_rng=True, fmt=fmt,
                                   tensors_only=TensorsOnly())
            state["common"] = dict(common, iteration=iteration, layout=layout(),
                                   rng_format="tensors", rng_cuda=torch.cuda.is_available(),
                                   optimizer_format=fmt)
            request = dist_checkpointing.save(
                state, tmp, _save_strategy(fully_parallel),
                async_sharded_save=async_queue is not None,
                **(compat.async_save_options() if async_queue is not None else {}))
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - one message, then stop
        raise _save_failed(root, final, e) from None
    run_id = common["run_id"]
    if async_queue is None:
        _publish(root, iteration, keep_last, run_id)
    else:
        request.add_finalize_fn(lambda: _publish(root, iteration, keep_last, run_id))
        with compat.cuda_device_rewrite():
            async_queue.schedule_async_request(request)
    return final


def finish_saves(async_queue, root: str, blocking: bool) -> List[int]:
    """Publish the async saves whose writes are complete on every rank (all of them, waiting,
    when ``blocking``); a failed write raises ``CheckpointSaveError`` on every rank. Called by
    every rank at the same points (it is collective)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if async_queue is None or not async_queue.get_num_unfinalized_calls():
        return []
    done: List[int] = []
    try:
        while True:  # megatron-core's own blocking wait would join before reading the results
            results = filesystem_async._results_queue
            if isinstance(results, _WriteResults):
                results.drain()
            with compat.cuda_device_rewrite():  # every rank gets the same answer
                done += async_queue.maybe_finalize_async_calls(blocking=False)
            if not blocking or not async_queue.get_num_unfinalized_calls():
                return done
            time.sleep(0.02)
    except (Exception, CheckpointException) as e:  # noqa: BLE001
        tmp = sorted(glob.glob(os.path.join(root, "iter_*.tmp")))
        raise _save_failed(root, tmp[-1][:-4] if tmp else root, e) from None


def _save_failed(root: str, final: str, exc: BaseException) -> CheckpointSaveError:
    if _rank0():
        shutil.rmtree(final + ".tmp", ignore_errors=True)
    latest = read_latest(root) if os.path.exists(os.path.join(root, TRACKER)) else None
    return CheckpointSaveError(
        f"could not save checkpoint {final}: {_failure_reason(exc, root)}; the previous "
        f"checkpoint (iteration {latest}) is still the latest")


def _publish(root: str, iteration: int, keep_last: int, run_id: str) -> None:
    """Every rank has written ``iter_N.tmp``: fold the checksums its writers took into the
    manifest (``integrity``), rename it,
    then move ``latest``, then prune this run's own older checkpoints (``run_dir``)."""
    final = iteration_dir(root, iteration)
    _barrier()
    write_checksums(final + ".tmp")  # every rank folds its share of the files' records
    _barrier()
    if _rank0():
        run_dir.record_saved(root, iteration, run_id)  # first: a kill after the rename
        if os.path.exists(final):  # re-saving an iteration: replace the old copy last
            shutil.rmtree(final)
        os.replace(final + ".tmp", final)  # leaves no checkpoint retention does not know
        write_text(os.path.join(root, TRACKER), str(iteration), "checkpoint tracker")
        run_dir.prune(root, keep_last, run_id, iteration)
    _barrier()


def _ensure_optimizer_state(optimizer) -> None:
    """A fresh distributed optimizer has no Adam state, but building its sharded state for
    loading reads the step count; give it placeholder states (as Megatron-LM does), which the
    load then overwrites, like the model parameters."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _checkpoint_keys(path: str) -> set:
    """The tensor keys a checkpoint holds (its ``.metadata``, read with the safe unpickler)."""
    return set(load_metadata(os.path.join(path, ".metadata")).state_dict_metadata)


@contextlib.contextmanager
def _norm_keys_as_saved(module, keys: set):
    """Checkpoints written before the local spec saved its dense norms under TE's keys hold
    ``...input_layernorm.weight``: load those under the names they were saved with."""
    layers = [layer for layer in getattr(getattr(module, "decoder", None), "layers", [])
              if getattr(getattr(layer, "submodules_config", None),
                         "sharded_state_dict_keys_map", None)]
    legacy = [layer for layer in layers
              if f"model.decoder.layers.{layer.layer_number - 1}.input_layernorm.weight" in keys
              or f"decoder.layers.{layer.layer_number - 1}.input_layernorm.weight" in keys]
    saved = {id(layer): layer.submodules_config.sharded_state_dict_keys_map for layer in legacy}
    for layer in legacy:
        layer.submodules_config.sharded_state_dict_keys_map = {}
    try:
        yield
    finally:
        for layer in legacy:
            layer.submodules_config.sharded_state_dict_keys_map = saved[id(layer)]


def _missing_keys_line(path: str, state, keys: set) -> str:
    """What the model asks for that the checkpoint lacks, and what it holds instead."""
    wanted = {sh.key for sh in _sharded_values(state)}
    missing = sorted(wanted - keys)
    extra = sorted(k for k in keys - wanted if k.startswith(("decoder.", "embedding.", "output_")))
    return (f"checkpoint {path} does not match the model: missing {missing[:4]}"
            f"{' ...' if len(missing) > 4 else ''} ({len(missing)} in all); the checkpoint "
            f"holds instead {extra[:4]}{' ...' if len(extra) > 4 else ''}")


def check_optimizer_layout(common: Dict[str, Any], optimizer) -> None:
    """A ``dp_reshardable`` optimizer state loads only into the distributed optimizer at the
    TP/PP it was saved with: anything else is refused with the ways out."""
    if optimizer is None or common.get("optimizer_format") != "dp_reshardable":
        return
    saved, now = common.get("layout") or {}, layout()
    distributed = optimizer_format(optimizer, False) is not None
    if distributed and all(saved.get(k) == now[k] for k in ("tp", "pp", "vpp")):
        return
    where = f"TP={saved.get('tp')} PP={saved.get('pp')} VPP={saved.get('vpp')}"
    raise ValueError(
        f"checkpoint {common['path']} holds the distributed optimizer's state as dp_reshardable, "
        f"which loads only with parallel.use_distributed_optimizer=true at the layout it was "
        f"saved at ({where}; any DP); this run is TP={now['tp']} PP={now['pp']}"
        f" VPP={now['vpp']}{'' if distributed else ' without it'}. Resume once at {where} with "
        "checkpoint.optim_fully_reshardable=true to write a checkpoint that loads at any "
        "layout, or set checkpoint.no_load_optim=true to start the optimizer afresh")


def load_checkpoint(common: Dict[str, Any], model, optimizer,
                    fully_parallel: bool = True) -> bool:
    """Load model (+ optimizer) state; returns whether the RNG state was restored."""
    check_optimizer_layout(common, optimizer)
    restore_rng = (common.get("layout") == layout() and common.get("rng_format") == "tensors"
                   and bool(common.get("rng_cuda")) == torch.cuda.is_available())
    modules, model_keys = _modules(model), _model_keys(model)
    metadata = load_metadata(os.path.join(common["path"], ".metadata"))
    keys = set(metadata.state_dict_metadata)
    tensors_only = TensorsOnly(object_sizes(metadata))
    with contextlib.ExitStack() as stack:
        stack.enter_context(compat.cuda_device_rewrite())
        for module in modules:
            stack.enter_context(_norm_keys_as_saved(module, keys))
        if optimizer is not None:
            _ensure_optimizer_state(optimizer)
        state = _sharded_state(model, optimizer, is_loading=True, with_rng=restore_rng,
                               fmt=common.get("optimizer_format"), tensors_only=tensors_only)
        try:
            with safe_reads():
                loaded = dist_checkpointing.load(
                    state, common["path"], _load_strategy(common["path"], fully_parallel))
        except UnsafeCheckpointError:
            raise
        except (Exception, CheckpointException) as e:  # noqa: BLE001
            wanted = [state[k] for k in model_keys]
            if any(getattr(sh, "key", None) not in keys for sh in _sharded_values(wanted)):
                raise ValueError(_missing_keys_line(common["path"], wanted, keys)) from None
            raise ValueError(f"could not load checkpoint {common['path']}: "
                             f"{_failure_reason(e)}") from None
        loaded = tensors_only.restore(loaded)
        bad = []
        for key, module in zip(model_keys, modules):
            result = module.load_state_dict(loaded[key], strict=False)
            bad += [k for k in list(result.missing_keys) + list(result.unexpected_keys)
                    if not k.endswith("_extra_state")]
        if bad:
            raise ValueError(f"checkpoint {common['path']} does not match the model: {bad[:5]}")
        if optimizer is not None:
            with torch.no_grad():  # dp_reshardable copies into fp32 params that need grads
                optimizer.load_state_dict(loaded["optimizer"])
    if restore_rng:
        rng = loaded["rng_state"]
        torch.set_rng_state(rng["cpu"].reshape(-1).cpu())
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"].reshape(-1).cpu())
    return restore_rng


def _sharded_values(state):
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    return [sh for sh in nested_values(state) if hasattr(sh, "key")]
