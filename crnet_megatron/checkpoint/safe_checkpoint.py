"""Reading checkpoints without executing code from them.

A ``torch_dist`` checkpoint is read by torch's ``FileSystemReader.read_metadata`` (a plain
``pickle.load`` of ``.metadata``) and by its default planner, which ``torch.load``s any item the
metadata marks as bytes with ``weights_only=False``. Checkpoints are copied between users and
clusters, so neither may run. Here:

* ``.metadata`` is unpickled by ``MetadataUnpickler``, which knows only the classes torch's
  distributed-checkpoint metadata is made of and refuses everything else, naming the file and
  the class (``safe_reads()`` puts it in place of torch's reader while a load runs);
* the checkpoints this project writes hold no pickled objects (``TensorsOnly``: no Megatron
  ``_extra_state`` objects, RNG state as plain tensors, and the distributed optimizer's small
  per-group objects as JSON in uint8 tensors), and a checkpoint whose metadata marks any other
  item as pickled bytes is refused before anything is read;
* every storage file the metadata points into must exist and be long enough (a truncated copy
  is "incomplete", not a crash in the middle of a load).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
from typing import Any, Dict

import torch
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md

_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.distributed.checkpoint.planner": {
        "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "LoadPlan", "ReadItem",
        "LoadItemType"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "collections": {"OrderedDict"},
}
# Pickled items that checkpoints of earlier versions hold and that are never read any more.
_LEGACY_BYTES = re.compile(r"(\._extra_state|^rng_state)/shard_[0-9._]+$")
# megatron-core 0.17+ keeps the common state as a pickled item in the shard files (no
# common.pt) and reads it with torch's default planner, i.e. ``torch.load(weights_only=False)``;
# ``read_common_state`` reads exactly this item itself, with the weights-only loader.
COMMON_STATE_ITEM = "common_state/shard_0_1"
MAX_COMMON_STATE_BYTES = 64 << 20


MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # a checkpoint's model tensors


def model_key(key: str) -> bool:
    """Whether a checkpoint key names a model tensor (not optimizer or RNG state)."""
    return key.startswith(MODEL_PREFIXES)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something that would execute code when read."""


class IncompleteCheckpointError(ValueError):
    """A checkpoint directory is missing files or holds truncated ones."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles torch distributed-checkpoint metadata and nothing else."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"checkpoint file {self.path} refers to {module}.{name}, which is not part of "
            "torch distributed-checkpoint metadata; refusing to unpickle it (the file may be "
            "crafted to run code)")


def load_metadata(path: str) -> dcp_md.Metadata:
    """Read a ``.metadata`` file with the restricted unpickler and check what it holds."""
    try:
        with open(path, "rb") as f:
            metadata = MetadataUnpickler(f, path).load()
    except UnsafeCheckpointError:
        raise
    except FileNotFoundError:
        raise IncompleteCheckpointError(f"checkpoint file {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated or garbage file
        raise IncompleteCheckpointError(f"checkpoint file {path} is unreadable ({e})") from None
    if not isinstance(metadata, dcp_md.Metadata):
        raise UnsafeCheckpointError(f"checkpoint file {path} holds a {type(metadata).__name__}, "
                                    "not torch distributed-checkpoint metadata")
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, dcp_md.BytesStorageMetadata) and not _LEGACY_BYTES.search(key) \
                and key != COMMON_STATE_ITEM:
            raise UnsafeCheckpointError(
                f"checkpoint file {path} marks {key!r} as a pickled object; this project's "
                "checkpoints hold tensors only, and a pickled item would be unpickled with "
                "code execution, so the checkpoint is refused")
    _check_bounds(metadata, path)
    return metadata


MAX_CHUNKS = 1 << 20  # chunks of all tensors together (a 13B model at TP x PP = 64: ~10^5)


def _check_bounds(metadata: dcp_md.Metadata, path: str) -> None:
    """Chunk lists that a loader would walk (quadratically, in places) are bounded and
    consistent: each chunk inside its tensor, no chunk twice, offsets and lengths >= 0."""
    total = 0
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, dcp_md.TensorStorageMetadata):
            continue
        total += len(md.chunks)
        if total > MAX_CHUNKS:
            raise IncompleteCheckpointError(f"checkpoint file {path} lists more than "
                                            f"{MAX_CHUNKS} tensor chunks")
        seen = set()
        for chunk in md.chunks:
            where = (tuple(chunk.offsets), tuple(chunk.sizes))
            if where in seen or len(where[0]) != len(md.size) or any(
                    o < 0 or n < 0 or o + n > full
                    for o, n, full in zip(where[0], where[1], md.size)):
                raise IncompleteCheckpointError(
                    f"checkpoint file {path}: tensor {key!r} has a chunk at {list(where[0])} "
                    f"of {list(where[1])} that is repeated or outside its shape "
                    f"{list(md.size)}")
            seen.add(where)
    for info in (metadata.storage_data or {}).values():
        if getattr(info, "offset", 0) < 0 or getattr(info, "length", 0) < 0:
            raise IncompleteCheckpointError(f"checkpoint file {path} has a storage range with "
                                            "a negative offset or length")


def verify_checkpoint(ckpt_dir: str) -> None:
    """Metadata safe to read, and every storage range it names present on disk."""
    metadata = load_metadata(os.path.join(ckpt_dir, ".metadata"))
    sizes: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = info.relative_path
        if os.path.basename(name) != name:
            raise UnsafeCheckpointError(f"checkpoint {ckpt_dir}: storage path {name!r} points "
                                        "outside the checkpoint directory")
        if name not in sizes:
            path = os.path.join(ckpt_dir, name)
            if not os.path.exists(path):
                raise IncompleteCheckpointError(f"checkpoint {ckpt_dir} is incomplete: {name} "
                                                "is missing")
            sizes[name] = os.path.getsize(path)
        if info.offset + info.length > sizes[name]:
            raise IncompleteCheckpointError(
                f"checkpoint {ckpt_dir} is incomplete: {name} has {sizes[name]} bytes, the "
                f"metadata needs {info.offset + info.length}")


def read_common_state(ckpt_dir: str):
    """A checkpoint's non-sharded state, never unpickling code: ``common.pt`` (megatron-core
    0.16) through torch's weights-only loader, or the ``common_state`` item megatron-core 0.17+
    writes into the shard files, read here from its byte range with the weights-only loader."""
    import io

    from megatron.core import dist_checkpointing

    if os.path.exists(os.path.join(ckpt_dir, "common.pt")):
        with safe_reads():
            return dist_checkpointing.load_common_state_dict(ckpt_dir)
    metadata = load_metadata(os.path.join(ckpt_dir, ".metadata"))
    info = next((i for k, i in (metadata.storage_data or {}).items()
                 if k.fqn == COMMON_STATE_ITEM), None)
    if info is None:
        raise IncompleteCheckpointError(f"checkpoint {ckpt_dir} holds no common state (no "
                                        f"common.pt, no {COMMON_STATE_ITEM} item)")
    if getattr(info, "transform_descriptors", None) or os.path.basename(
            info.relative_path) != info.relative_path or info.length > MAX_COMMON_STATE_BYTES:
        raise IncompleteCheckpointError(f"checkpoint {ckpt_dir}: its {COMMON_STATE_ITEM} item is "
                                        "transformed, outside the directory or too large")
    with open(os.path.join(ckpt_dir, info.relative_path), "rb") as f:
        f.seek(info.offset)
        raw = f.read(info.length)
    if len(raw) != info.length:
        raise IncompleteCheckpointError(f"checkpoint {ckpt_dir}: {info.relative_path} ends "
                                        f"inside its {COMMON_STATE_ITEM} item")
    loaded = torch.load(io.BytesIO(raw), weights_only=True)
    return loaded[0] if isinstance(loaded, list) and len(loaded) == 1 else loaded


def _safe_read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
    metadata = load_metadata(str(self._get_metadata_path(kwargs.get("rank"))))
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = dcp_md.StorageMeta()
    metadata.storage_meta.load_id = self.load_id
    return metadata


@contextlib.contextmanager
def safe_reads():
    """While a checkpoint is read: restricted ``.metadata`` unpickling, and torch.load kept at
    its safe ``weights_only`` default (Megatron's ``common.pt``) whatever the environment says."""
    original = dcp_fs.FileSystemReader.read_metadata
    forced = os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    dcp_fs.FileSystemReader.read_metadata = _safe_read_metadata
    try:
        yield
    finally:
        dcp_fs.FileSystemReader.read_metadata = original
        if forced is not None:
            os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = forced


# A JSON-coded object larger than this in a checkpoint is refused (they are a few kB).
MAX_OBJECT_BYTES = 16 << 20


def _encode(value, key: str):
    """Plain data as JSON-able values; tuples, non-string keys and dtypes tagged."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_encode(v, key) for v in value]
    if isinstance(value, tuple):
        return {"t": [_encode(v, key) for v in value]}
    if isinstance(value, dict):
        return {"d": [[_encode(k, key), _encode(v, key)] for k, v in value.items()]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    raise TypeError(f"state {key!r} holds a {type(value).__name__}, which would be pickled into "
                    "the checkpoint; store it as tensors")


def _decode(value, key: str):
    if isinstance(value, list):
        return [_decode(v, key) for v in value]
    if not isinstance(value, dict):
        return value
    if set(value) == {"t"}:
        return tuple(_decode(v, key) for v in value["t"])
    if set(value) == {"d"}:
        return {_hashable(_decode(k, key)): _decode(v, key) for k, v in value["d"]}
    dtype = getattr(torch, str(value.get("dtype")), None) if set(value) == {"dtype"} else None
    if isinstance(dtype, torch.dtype):
        return dtype
    raise IncompleteCheckpointError(f"checkpoint object {key!r} holds an unknown value {value!r:.80}")


def _hashable(key):
    if isinstance(key, list):
        raise IncompleteCheckpointError(f"checkpoint object key {key!r:.80} is a list")
    return key


class TensorsOnly:
    """A sharded state made of tensors only: Megatron's per-linear ``_extra_state`` objects
    (None for local linears, unused without FP8) are dropped, and every other ``ShardedObject``
    (the distributed optimizer's param groups and bucket sizes in its ``dp_reshardable`` format)
    travels as its JSON in a uint8 ``ShardedTensor`` under the same key, with the same replicas.

    Loading needs each object's byte length: ``sizes`` (key -> bytes, from the checkpoint's
    ``.metadata``). ``restore(loaded)`` turns the loaded bytes back into the objects.
    """

    def __init__(self, sizes: Dict[str, int] | None = None):
        self.sizes = sizes
        self.paths: list = []

    def __call__(self, state: Dict[str, Any], path: tuple = ()) -> Dict[str, Any]:
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        out = {}
        for key, value in state.items():
            if isinstance(value, dict):
                out[key] = self(value, path + (key,))
            elif isinstance(value, ShardedObject):
                if not key.endswith("_extra_state"):
                    out[key] = self._as_tensor(value)
                    self.paths.append(path + (key,))
            else:
                out[key] = value
        return out

    def _as_tensor(self, obj):
        from megatron.core.dist_checkpointing.mapping import ShardedTensor

        if any(n != 1 for n in obj.global_shape):
            raise TypeError(f"state {obj.key!r} is an object sharded {obj.global_shape}; store "
                            "it as tensors")
        if self.sizes is None:
            data = torch.frombuffer(bytearray(json.dumps(_encode(obj.data, obj.key)).encode()),
                                    dtype=torch.uint8)
        else:
            n = self.sizes.get(obj.key, 1)
            if not 0 < n <= MAX_OBJECT_BYTES:
                raise IncompleteCheckpointError(f"checkpoint object {obj.key!r} claims {n} bytes "
                                                f"(at most {MAX_OBJECT_BYTES})")
            data = torch.zeros(n, dtype=torch.uint8)
        return ShardedTensor.from_rank_offsets(obj.key, data.view(1, -1),
                                               replica_id=obj.replica_id)

    def restore(self, loaded: Dict[str, Any]) -> Dict[str, Any]:
        for path in self.paths:
            parent = loaded
            for key in path[:-1]:
                parent = parent[key]
            raw = bytes(parent[path[-1]].reshape(-1).cpu().numpy())
            try:
                parent[path[-1]] = _decode(json.loads(raw.decode()), path[-1])
            except (UnicodeDecodeError, ValueError) as e:
                raise IncompleteCheckpointError(
                    f"checkpoint object {'/'.join(map(str, path))} is not valid JSON ({e})") \
                    from None
        return loaded


def object_sizes(metadata: dcp_md.Metadata) -> Dict[str, int]:
    """Byte lengths of the JSON-coded objects (and every other tensor) a checkpoint holds."""
    return {key: int(md.size[-1]) for key, md in metadata.state_dict_metadata.items()
            if isinstance(md, dcp_md.TensorStorageMetadata) and len(md.size) == 2
            and md.properties.dtype == torch.uint8}
