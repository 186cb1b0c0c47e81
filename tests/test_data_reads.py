"""Data is read once per TP group and only on the first and last pipeline stages (Megatron's
``get_batch_on_this_tp_rank``): at TP=2 x PP=2 two of the four ranks read, each every sample
of the run, and the others read none; the run is unchanged (whole-run equivalence holds at
tp2-pp2 in ``test_whole_run_equivalence``)."""

from tests.driver_utils import driver_cfg, run_worker
from tests.helpers import run_distributed

ITERS, GBS, EVAL_ITERS, EVAL_INTERVAL = 4, 4, 2, 4


def _counting_worker(rank, world, cfg):
    from crnet_megatron.diagnostics.profiling import count_dataset_reads

    reads = count_dataset_reads()
    result = run_worker(rank, world, cfg)
    return dict(reads=reads[0], history=result["history"])


def _cfg(tiny_dataset, tmp_path, *layout):
    return driver_cfg(tiny_dataset, tmp_path / "c", None, f"schedule.train_iters={ITERS}",
                      f"schedule.global_batch_size={GBS}", "schedule.micro_batch_size=2",
                      f"eval.eval_iters={EVAL_ITERS}", f"eval.eval_interval={EVAL_INTERVAL}",
                      *layout)


def test_only_tp_rank0_of_the_end_stages_reads(tiny_dataset, tmp_path):
    cfg = _cfg(tiny_dataset, tmp_path, "parallel.tensor_model_parallel_size=2",
               "parallel.pipeline_model_parallel_size=2")
    results = run_distributed(_counting_worker, 4, cfg, timeout=400)
    # global rank order (Megatron's default tp-cp-ep-dp-pp): tp fastest, then pp
    reads = [r["reads"] for r in results]
    evals = ITERS // EVAL_INTERVAL
    per_reader = ITERS * GBS + evals * EVAL_ITERS * GBS
    assert reads == [per_reader, 0, per_reader, 0], reads
    assert len({tuple(h["loss"] for h in r["history"]) for r in results}) == 1


def _own_home_worker(rank, world, cfg, root):
    import os

    os.environ["HOME"] = os.path.join(root, f"node{rank}")  # each "node" has its own ~
    return run_worker(rank, world, cfg)


def test_a_cache_dir_not_shared_between_nodes_stops_every_rank(tiny_dataset, tmp_path):
    """``data.cache_dir`` under a per-node ``~``: every rank stops at start-up with one line
    naming the ranks that cannot see rank 0's files (and nothing hangs)."""
    import pytest

    cfg = driver_cfg(tiny_dataset, "~/cache", None, "schedule.global_batch_size=8")
    with pytest.raises(RuntimeError) as err:
        run_distributed(_own_home_worker, 2, cfg, str(tmp_path), timeout=200)
    text = str(err.value)
    assert "data.cache_dir='~/cache' is not shared between the ranks: rank 1 on " in text
    assert "point data.cache_dir at a filesystem every node mounts" in text


def _chunk_iterators_worker(rank, world, cfg):
    from crnet_megatron.diagnostics.profiling import count_dataset_reads
    from crnet_megatron.parallel.groups import destroy_distributed
    from crnet_megatron.training.trainer import Trainer

    reads = count_dataset_reads()
    try:
        trainer = Trainer(cfg)
        iterators = trainer._iterators(trainer.train_ds, 0)
        kinds = [type(it).__name__ if it is not None else None for it in iterators]
        distinct = len({id(it) for it in iterators if it is not None})
        trainer.train()
    finally:
        destroy_distributed()
    return dict(kinds=kinds, distinct=distinct, reads=reads[0])


def test_each_model_chunk_has_its_own_iterator(tiny_dataset, tmp_path):
    """Interleaved PP=2 x VPP=2, as Megatron-LM builds them: one iterator per model chunk, the
    embedding's chunk (rank 0, chunk 0) and the loss's (rank 1, chunk 1) their own, the others
    none; each reading rank reads every sample of the run once."""
    cfg = _cfg(tiny_dataset, tmp_path, "parallel.pipeline_model_parallel_size=2",
               "parallel.virtual_pipeline_model_parallel_size=2")
    results = run_distributed(_chunk_iterators_worker, 2, cfg, timeout=400)
    assert [r["kinds"] for r in results] == [["SampleIterator", None], [None, "SampleIterator"]]
    assert all(r["distinct"] == 1 for r in results)
    per_reader = ITERS * GBS + ITERS // EVAL_INTERVAL * EVAL_ITERS * GBS
    assert [r["reads"] for r in results] == [per_reader, per_reader]
