"""An export checked against the checkpoint it came from without a second copy of the model:
its logits are computed with one layer's weights in memory at a time (each module built on
the meta device, given its tensors from the shards just before it runs, and emptied after).
The tensors are read with plain reads at the offsets of the checked headers, not through a
memory map, whose pages would stay resident as the whole file is walked."""

from __future__ import annotations

import contextlib

import torch

from crnet_megatron.export.modeling_crnet import (
    CRNetForCausalLM,
    checked_export,
    export_weights,
)

_TORCH = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
          "F64": torch.float64}


def _read(f, entry) -> torch.Tensor:
    dtype, shape, start, end = entry
    buf = torch.empty(end - start, dtype=torch.uint8)
    f.seek(start)
    if f.readinto(buf.numpy()) != end - start:
        raise ValueError(f"{f.name} ended inside a tensor")
    return buf.view(_TORCH[dtype]).reshape(shape)


@torch.no_grad()
def export_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    """[b, s] token ids -> [b, s, vocab] float32 logits of the export at ``path``."""
    config, where = checked_export(CRNetForCausalLM, path)
    layout, _ = export_weights(path)
    with torch.device("meta"):
        model = CRNetForCausalLM(config).eval()
    with contextlib.ExitStack() as stack:
        files = {}

        def load(module, prefix):
            state = {}
            for name in module.state_dict():
                file = where[prefix + name]
                if file not in files:
                    files[file] = stack.enter_context(open(file, "rb", buffering=0))
                state[name] = _read(files[file], layout[prefix + name]).float()
            module.load_state_dict(state, assign=True)

        def empty(module, args, out):  # its weights are no longer needed
            module.to("meta")

        parts = [(model.model.embed_tokens, "model.embed_tokens.")]
        parts += [(layer, f"model.layers.{i}.") for i, layer in enumerate(model.model.layers)]
        parts += [(model.model.norm, "model.norm."), (model.lm_head, "lm_head.")]
        for module, prefix in parts:
            module.register_forward_pre_hook(lambda m, args, p=prefix: load(m, p))
            module.register_forward_hook(empty)
        return model(ids).logits.float()
