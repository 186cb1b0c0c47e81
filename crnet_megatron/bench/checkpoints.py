"""What checkpoints and exports cost as the model grows: at three model sizes and DP = 1, 2, 4
(the distributed optimizer, local processes: gloo on CPU, NCCL on GPU), each rank's save stall
(seconds the training loop waits) and time to complete, bytes written, load time, bytes read,
and checksum time and bytes on resume; then the export's peak host memory above the imported
libraries, in units of the weights. Each measurement is taken twice, interleaved over rounds:

* ``before``: DP rank 0 writes every replicated tensor and every replica reads every shard
  (``checkpoint.fully_parallel_save/_load: false``), and the shards are hashed after the write
  by reading them back on the training thread (for an async save when it is published: the
  stall of an async save counts the training thread's share, the call and the publish); the export holds the HF state dict beside the
  model, serialises one ``model.safetensors`` with ``safetensors.torch.save_file`` and checks it
  with a second full model (the code of the previous release, re-enacted);
* ``after``: the defaults: fully-parallel save and load, shards hashed by the writer as they
  are written; the export streams shards one tensor at a time and checks one layer at a time.

    crnet-bench checkpoints --json bench_checkpoints.json [--sizes small,medium] [--dps 1,2]
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

from crnet_megatron.bench import runner
from crnet_megatron.bench.costs import TINY, _median, _PeakRSS, _setup, _spawn

warnings.filterwarnings("ignore")

SIZES = {  # name: model overrides (the 14.0M one is crnet-bench costs' save model)
    "small": ["model.num_layers=4", "model.hidden_size=256", "model.ffn_hidden_size=688",
              "model.num_attention_heads=4", "model.crnet_rank=64"],
    "medium": ["model.num_layers=8", "model.hidden_size=512", "model.ffn_hidden_size=1376",
               "model.num_attention_heads=8", "model.crnet_rank=128"],
    "large": ["model.num_layers=12", "model.hidden_size=1024", "model.ffn_hidden_size=2752",
              "model.num_attention_heads=16", "model.crnet_rank=256"],
}
COMMON = ["model.seq_length=128", "schedule.micro_batch_size=1", "data.builtin_vocab_size=2048",
          "parallel.use_distributed_optimizer=true", "checkpoint.keep_last=1"]
VARIANTS = (("before", False), ("after", True))  # (name, the scalable paths on)


class _Counted:
    """Bytes this rank reads for tensors (torch's FileSystemReader) and for checksums, and the
    seconds spent publishing saves (on the training thread, for async saves too)."""

    def __init__(self):
        from torch.distributed.checkpoint import filesystem as fs

        from crnet_megatron.checkpoint import checkpointing, integrity

        self.read = self.hashed = self.publish = 0
        publish = checkpointing._publish

        def timed_publish(*args):
            start = time.perf_counter()
            publish(*args)
            self.publish += time.perf_counter() - start

        checkpointing._publish = timed_publish
        read_data, sha256_range = fs.FileSystemReader.read_data, integrity.sha256_range

        def counting_read(reader, plan, planner):
            self.read += sum(reader.storage_data[i.storage_index].length for i in plan.items)
            return read_data(reader, plan, planner)

        def counting_hash(path, offset=0, length=None):
            self.hashed += os.path.getsize(path) - offset if length is None else length
            return sha256_range(path, offset, length)

        fs.FileSystemReader.read_data = counting_read
        integrity.sha256_range = counting_hash


def _measure(trainer, counted, rank, scalable: bool, use_async: bool) -> dict:
    from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

    from crnet_megatron.checkpoint import integrity
    from crnet_megatron.checkpoint.checkpointing import load_checkpoint
    from crnet_megatron.checkpoint.resume import iteration_dir, read_checkpoint

    ck = trainer.cfg["checkpoint"]
    ck.update(fully_parallel_save=scalable, fully_parallel_load=scalable)
    integrity.HASH_WHILE_WRITING = scalable
    trainer.async_saves = AsyncCallsQueue() if use_async else None
    trainer.iteration += 1
    counted.publish = 0.0
    start = time.perf_counter()
    with _PeakRSS() as rss:
        trainer.save()
    stall = time.perf_counter() - start
    trainer.finish_saves(blocking=True)
    complete = time.perf_counter() - start
    if use_async:  # the publish runs on the training thread when the write is complete
        stall += counted.publish
    path = iteration_dir(ck["save"], trainer.iteration)
    written = sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                  if n.startswith(f"__{rank}_"))
    counted.read = counted.hashed = 0
    start = time.perf_counter()
    common = read_checkpoint(path, "all")
    verify = time.perf_counter() - start
    start = time.perf_counter()
    load_checkpoint(common, trainer.model, trainer.optimizer, scalable)
    return dict(rank=rank, stall_s=stall, complete_s=complete, written=written,
                load_s=time.perf_counter() - start, read=counted.read, verify_s=verify,
                hashed=counted.hashed, extra_rss_mib=rss.extra / 2**20)


def _worker(rank, world, port, sets, rounds, out):
    _setup(rank, world, port)
    from crnet_megatron.config.run_config import load_run_config
    from crnet_megatron.training.trainer import Trainer

    trainer = Trainer(load_run_config(None, sets))
    trainer.train_step(trainer._iterators(trainer.train_ds, 0))  # Adam states exist
    counted = _Counted()
    params = sum(p.numel() for chunk in trainer.model for p in chunk.parameters())
    rows = []
    for r in range(rounds):
        for name, scalable in VARIANTS:
            for use_async in (False, True):
                row = _measure(trainer, counted, rank, scalable, use_async)
                rows.append(dict(row, round=r, variant=name, params=params,
                                 mode="async" if use_async else "sync"))
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rows, f)


_EXPORT = """
import json, os, sys, warnings
warnings.filterwarnings("ignore")
import torch
from crnet_megatron.bench.checkpoints import model_bytes
from crnet_megatron.bench.costs import _PeakRSS
from crnet_megatron.cli.export import main as export_main
from crnet_megatron.export import hf, loader
from crnet_megatron.export.modeling_crnet import CRNetForCausalLM, CRNetLlamaConfig
from safetensors.torch import load_file, save_file
variant, ckpt, out = sys.argv[1:]
torch.set_num_threads(1)
import crnet_megatron.checkpoint.checkpointing, crnet_megatron.config.megatron_configs
import crnet_megatron.export.verify, crnet_megatron.parallel.build, megatron.core.models.gpt
with torch.device("meta"):  # transformers imports the rest of itself on a first model
    CRNetForCausalLM(CRNetLlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8,
                                      num_hidden_layers=1, num_attention_heads=1, head_dim=8,
                                      num_key_value_heads=1, crnet_layer_ranks=[None]))
with loader.single_process():  # a process group is up before the measurement starts
    rss = _PeakRSS().__enter__()
    ids = torch.arange(32)[None]
    if variant == "after":  # the command itself
        export_main([ckpt, out, "--device", "cpu"])
    else:  # the previous release: a state dict beside the model, save_file, a second model
        model, loaded = loader.load_megatron_model(ckpt, device="cpu")
        state = hf.to_hf_state(model, loaded.tokenizer.vocab_size)
        os.makedirs(out)
        save_file(state, os.path.join(out, "model.safetensors"))
        del state
        config = hf.hf_config(model, loaded.tokenizer.vocab_size, 128, 10000, 0, torch.float32)
        keep = {k: v for k, v in config.items() if k not in ("auto_map", "architectures",
                                                            "model_type", "torch_dtype")}
        second = CRNetForCausalLM(CRNetLlamaConfig(**keep))
        second.load_state_dict(load_file(os.path.join(out, "model.safetensors")))
        with torch.no_grad():
            second(ids)
    rss.__exit__(None, None, None)
weights = model_bytes(loader.resolve_checkpoint(ckpt)["path"])
print(json.dumps(dict(weights=weights, extra=rss.extra)))
"""


def model_bytes(ckpt: str) -> int:
    """Bytes of a checkpoint's model tensors (from its checked ``.metadata``)."""
    from crnet_megatron.checkpoint.safe_checkpoint import load_metadata, model_key

    md = load_metadata(os.path.join(ckpt, ".metadata"))
    return sum(math.prod(v.size) * v.properties.dtype.itemsize
               for k, v in md.state_dict_metadata.items() if model_key(k) and hasattr(v, "size"))


def _export_rss(ckpt: str, variant: str, out: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE")}
    proc = subprocess.run([sys.executable, "-c", _EXPORT, variant, ckpt, out], env=env,
                          capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"export ({variant}) failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _save_rows(size: str, dp: int, rows) -> list:
    out = []
    for name, _ in VARIANTS:
        for mode in ("sync", "async"):
            got = [x for x in rows if x["variant"] == name and x["mode"] == mode]
            per_rank = {k: [x[k] for x in got if x["round"] == 0] for k in ("written", "read",
                                                                            "hashed")}
            mib = {k: (min(v) / 2**20, max(v) / 2**20) for k, v in per_rank.items()}
            out.append(dict(size=size, params=f"{got[0]['params'] / 1e6:.1f}M", dp=dp,
                            variant=name, mode=mode,
                            stall_s=_median([x["stall_s"] for x in got]),
                            complete_s=_median([x["complete_s"] for x in got]),
                            written=f"{mib['written'][0]:.1f}-{mib['written'][1]:.1f}",
                            load_s=_median([x["load_s"] for x in got]),
                            read=f"{mib['read'][0]:.1f}-{mib['read'][1]:.1f}",
                            verify_s=_median([x["verify_s"] for x in got]),
                            hashed=f"{mib['hashed'][0]:.1f}-{mib['hashed'][1]:.1f}"))
    return out


def hardware() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()}, temporary files on {tempfile.gettempdir()}"


def main(argv=None):
    p = runner.parser(__doc__, "checkpoints", repeats=2)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--dps", default="1,2,4")
    args = p.parse_args(argv)
    sizes, dps = args.sizes.split(","), [int(x) for x in args.dps.split(",")]
    save_rows, export_rows, raw = [], [], {}
    with tempfile.TemporaryDirectory() as d:
        for size in sizes:
            for dp in dps:
                save = f"{d}/{size}_dp{dp}"
                sets = TINY + COMMON + SIZES[size] + [
                    f"data.cache_dir={d}/cache", f"checkpoint.save={save}",
                    f"schedule.global_batch_size={dp}"]
                ranks = _spawn(_worker, dp, sets, args.repeats)
                raw[f"{size}_dp{dp}"] = ranks
                save_rows += _save_rows(size, dp, [x for r in ranks for x in r])
            for r in range(args.repeats):
                for name, _ in VARIANTS:
                    got = _export_rss(f"{d}/{size}_dp{dps[0]}", name, f"{d}/export_{name}")
                    export_rows.append(dict(size=size, variant=name, round=r, **got))
    export_table = []
    for size in sizes:
        for name, _ in VARIANTS:
            got = [x for x in export_rows if x["size"] == size and x["variant"] == name]
            weights = got[0]["weights"]
            extra = max(x["extra"] for x in got)
            export_table.append(dict(size=size, weights_mib=weights / 2**20, variant=name,
                                     extra_mib=extra / 2**20, ratio=extra / weights))
    save_cols = [("size", "size", ""), ("params", "params", ""), ("DP", "dp", ""),
                 ("variant", "variant", ""), ("mode", "mode", ""), ("stall s", "stall_s", ".3f"),
                 ("complete s", "complete_s", ".3f"), ("written MiB/rank", "written", ""),
                 ("load s", "load_s", ".3f"), ("read MiB/rank", "read", ""),
                 ("verify s", "verify_s", ".3f"), ("hashed MiB/rank", "hashed", "")]
    export_cols = [("size", "size", ""), ("weights MiB", "weights_mib", ".1f"),
                   ("variant", "variant", ""), ("peak RSS above imports MiB", "extra_mib", ".1f"),
                   ("x weights", "ratio", ".2f")]
    runner.finish(args, [
        runner.table(save_rows, save_cols, f"save, load and verify per rank (median of "
                     f"{args.repeats} interleaved rounds; MiB per rank: min-max over ranks); "
                     f"{hardware()}"),
        runner.table(export_table, export_cols, "crnet-export (fp32, one-shard default), peak "
                     f"over {args.repeats} interleaved rounds")],
        saves=save_rows, exports=export_table, raw=raw, export_raw=export_rows,
        hardware=hardware())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
