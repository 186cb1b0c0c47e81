"""Training data: Megatron indexed datasets read through Megatron-Core's ``GPTDataset`` and
``BlendedMegatronDatasetBuilder`` (train/valid/test split, blends of prefixes). With no
``data.data_path`` the built-in corpus is preprocessed into the cache through the same path as ``crnet-preprocess``. Micro-batches are
read through ``data.batches``."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from crnet_megatron.config.run_config import parse_blend
from crnet_megatron.data.batches import reads_data
from crnet_megatron.data.corpus import EOS, builtin_corpus, load_or_train_tokenizer
from crnet_megatron.data.index_cache import (
    blend_problem,
    check_index_cache,
    index_problem,
    remove_cache_set,
)
from crnet_megatron.data.preprocess import HFTokenizer, output_paths, preprocess_jsonl
from crnet_megatron.data.safe_files import (
    UnsafePathError,
    atomic_writer,
    check_cache_tree,
)
from crnet_megatron.data.validate import validate_prefix


def cache_barrier(timeout_minutes: int) -> None:
    """Wait for rank 0's cache building: a barrier on a gloo group of its own whose timeout is
    ``data.cache_build_timeout_minutes`` (a C4-sized index can take longer than the collectives'
    ``parallel.distributed_timeout_minutes``)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    import datetime

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)


def check_shared_dir(root: str, key: str) -> None:
    """Rank 0 builds what ``root`` caches and the other ranks read it: every rank must see the
    same directory. Rank 0 writes a token file there; a rank that cannot read it back (a node
    whose ``~`` or local disk is not shared) stops every rank with one line naming them."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    import secrets
    import socket

    path = os.path.expanduser(root)
    token = torch.zeros(1, dtype=torch.int64)
    if dist.get_rank() == 0:
        os.makedirs(path, exist_ok=True)
        token[0] = secrets.randbits(62)
        with open(os.path.join(path, f".shared-check-{int(token)}"), "w") as f:
            f.write(str(int(token)))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    token = token.to(device)
    dist.broadcast(token, 0)
    marker = os.path.join(path, f".shared-check-{int(token)}")
    try:
        seen = open(marker).read() == str(int(token))
    except OSError:
        seen = False
    hosts: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        os.remove(marker)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(hosts) if not ok]
    if blind:
        raise ValueError(f"{key}={root!r} is not shared between the ranks: {', '.join(blind)} "
                         f"cannot see the file rank 0 ({hosts[0][1]}) wrote in {path}; rank 0 "
                         f"builds the dataset caches there for every rank, so point {key} at a "
                         "filesystem every node mounts")


def cache_checked(cache_dir: str) -> None:
    """Rank 0, the one process that writes the cache, checks it (``check_cache_tree``) while
    nothing writes there; every rank raises its verdict, so none is left waiting at a barrier."""
    problem = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            check_cache_tree(cache_dir)
        except UnsafePathError as e:
            problem = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [problem]
        dist.broadcast_object_list(box, src=0)
        problem = box[0]
    if problem:
        raise UnsafePathError(problem)


def prepare_builtin(cache_dir: str, vocab_size: int,
                    timeout_minutes: int = 240) -> Tuple[List[str], str]:
    """Built-in corpus -> jsonl -> BPE tokenizer -> indexed dataset (once, on global rank 0)."""
    root = os.path.join(os.path.expanduser(cache_dir), "builtin")
    tok_path = os.path.join(root, f"builtin_bpe_{vocab_size}.json")
    prefix = os.path.join(root, f"builtin_v{vocab_size}")
    bin_path, _ = output_paths(prefix, "text")
    cache_checked(cache_dir)
    if (not dist.is_initialized() or dist.get_rank() == 0) and not os.path.exists(bin_path):
        os.makedirs(root, exist_ok=True)
        docs = builtin_corpus()
        jsonl = os.path.join(root, "builtin.jsonl")
        with atomic_writer(jsonl, "built-in corpus") as f:  # never through a planted link
            for d in docs:
                f.write(json.dumps({"text": d}) + "\n")
        load_or_train_tokenizer(docs, vocab_size, root)
        preprocess_jsonl([jsonl], prefix, tok_path, ["text"], append_eod=True, workers=1,
                         eod_token=EOS, overwrite=True, progress=False)
    cache_barrier(timeout_minutes)
    return [bin_path[:-4]], tok_path


def check_splits(prefixes: List[str], split: str) -> None:
    """Every split with a non-zero weight must get documents from every prefix (Megatron's
    split rule); an empty one would make GPTDataset loop forever looking for tokens."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        parse_and_normalize_split,
    )
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    weights = parse_and_normalize_split(split)
    for prefix in prefixes:
        n = len(IndexedDataset(prefix))
        bounds = [0]
        for w in weights:
            bounds.append(bounds[-1] + int(round(w * float(n))))
        bounds[-1] = n
        for name, w, lo, hi in zip(("train", "valid", "test"), weights, bounds, bounds[1:]):
            if w > 0 and hi <= lo:
                raise ValueError(f"data.split={split!r} gives the {name} split no documents of "
                                 f"{prefix!r} ({n} documents); use a larger dataset or a split "
                                 f"such as '90,10,0'")


def build_datasets(cfg, tokenizer: HFTokenizer, prefixes: List[str],
                   weights: Optional[List[float]], sizes: List[int]):
    """(train, valid, test) GPTDatasets on the ranks that read data (None elsewhere).

    Megatron-Core's builder builds on rank 0 between barriers of the default group, which time
    out after ``parallel.distributed_timeout_minutes``. Rank 0 therefore builds the index caches
    first, on its own (the builder sees one process), while the others wait on
    ``cache_barrier`` (``data.cache_build_timeout_minutes``); then every rank builds from the
    caches, as Megatron-Core does."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    for p in prefixes:
        validate_prefix(p, tokenizer.vocab_size)
    check_splits(prefixes, cfg["data"]["split"])
    cache_checked(cfg["data"]["cache_dir"])  # before megatron-core writes there
    cache = os.path.join(os.path.expanduser(cfg["data"]["cache_dir"]), "index_cache")
    check_index_cache(cache, repair=not dist.is_initialized() or dist.get_rank() == 0)
    if dist.is_initialized():
        dist.barrier()  # every rank has checked the caches before rank 0 writes new ones
    config = GPTDatasetConfig(
        random_seed=cfg["schedule"]["seed"], sequence_length=cfg["model"]["seq_length"],
        blend=(prefixes, weights), split=cfg["data"]["split"], tokenizer=tokenizer,
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False,
        path_to_cache=cache)

    def build():
        try:
            return BlendedMegatronDatasetBuilder(GPTDataset, sizes, reads_data, config).build()
        except (AssertionError, ValueError, OSError) as e:
            raise ValueError(f"could not read datasets {prefixes}: {e}") from e

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _built_and_checked(build, cache)
    if dist.get_rank() == 0:
        with _builder_sees_one_process():
            _built_and_checked(build, cache)
    cache_barrier(cfg["data"]["cache_build_timeout_minutes"])
    return build()


def _gpt_datasets(datasets) -> list:
    """The GPTDatasets inside what the builder returned (blends hold them in ``datasets``)."""
    found, todo = [], [d for d in datasets if d is not None]
    while todo:
        d = todo.pop()
        inner = getattr(d, "datasets", None)
        todo.extend(inner) if inner is not None else found.append(d)
    return found


def _built_and_checked(build, cache: str):
    """Build; a GPTDataset whose indices came from a cache that existed before is checked for
    plausibility (``index_cache.index_problem``), and an implausible cache is removed and
    built again (rank 0 or a single process: where the caches are written)."""
    existed = set(os.listdir(cache)) if os.path.isdir(cache) else set()
    datasets = build()
    bad = 0
    for ds in _gpt_datasets(datasets):
        base = f"{ds.unique_description_hash}-{type(ds).__name__}-{ds.index_split.name}"
        path = os.path.join(cache, f"{base}-document_index.npy")
        if os.path.basename(path) not in existed:
            continue  # built just now
        problem = index_problem(ds.document_index, ds.sample_index, ds.shuffle_index,
                                ds.indices, ds.dataset.sequence_lengths,
                                ds.config.sequence_length)
        if problem:
            remove_cache_set(path, problem)
            bad += 1
    for blend in (d for d in datasets if getattr(d, "dataset_index", None) is not None):
        path = os.path.join(cache, f"{blend.unique_description_hash}-{type(blend).__name__}-"
                                   f"{blend.split.name}-dataset_index.npy")
        if os.path.basename(path) not in existed:
            continue
        problem = blend_problem(blend.dataset_index, blend.dataset_sample_index,
                                [len(d) for d in blend.datasets])
        if problem:
            remove_cache_set(path, problem)
            bad += 1
    return build() if bad else datasets


@contextlib.contextmanager
def _builder_sees_one_process():
    """While rank 0 builds the caches alone: megatron-core's dataset builder asks
    ``torch.distributed.is_initialized()`` before each of its barriers."""
    original = dist.is_initialized
    dist.is_initialized = lambda: False
    try:
        yield
    finally:
        dist.is_initialized = original


@dataclass
class RunData:
    tokenizer: HFTokenizer
    prefixes: List[str]
    train: object  # megatron-core datasets; None where this rank reads no data
    valid: object


def build_run_data(cfg) -> RunData:
    """A run's tokenizer and train/valid datasets: the built-in corpus (prepared once into
    ``data.cache_dir``), or indexed prefixes with their blend weights; sized for the whole
    schedule (every evaluation reads from the split's start)."""
    s, d, e = cfg["schedule"], cfg["data"], cfg["eval"]
    check_shared_dir(d["cache_dir"], "data.cache_dir")
    if d["data_path"]:
        prefixes, weights = parse_blend(d["data_path"])
        if not d["tokenizer"]:
            raise ValueError("data.tokenizer (a tokenizer.json) is required with data.data_path")
        tok_path = d["tokenizer"]
    else:
        (prefixes, tok_path), weights = prepare_builtin(d["cache_dir"], d["builtin_vocab_size"],
                                                       d["cache_build_timeout_minutes"]), None
    tokenizer = HFTokenizer(tok_path, d["eod_token"])
    evals = s["train_iters"] // e["eval_interval"] + 1
    gbs = s["global_batch_size"]
    sizes = [s["train_iters"] * gbs, evals * e["eval_iters"] * gbs, e["eval_iters"] * gbs]
    train, valid, _ = build_datasets(cfg, tokenizer, prefixes, weights, sizes)
    return RunData(tokenizer, prefixes, train, valid)
