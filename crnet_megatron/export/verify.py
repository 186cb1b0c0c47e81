"""An export checked against the checkpoint it came from without a second copy of the model:
its logits are computed with one layer's weights in memory at a time (each module built on
the meta device, given its tensors from the shards just before it runs, and emptied after)."""

from __future__ import annotations

import contextlib

import torch

from crnet_megatron.export.modeling_crnet import CRNetForCausalLM, checked_export


@torch.no_grad()
def export_logits(path: str, ids: torch.Tensor) -> torch.Tensor:
    """[b, s] token ids -> [b, s, vocab] float32 logits of the export at ``path``."""
    from safetensors import safe_open

    config, where = checked_export(CRNetForCausalLM, path)
    with torch.device("meta"):
        model = CRNetForCausalLM(config).eval()
    with contextlib.ExitStack() as stack:
        files = {}

        def load(module, prefix):
            state = {}
            for name in module.state_dict():
                file = where[prefix + name]
                if file not in files:
                    files[file] = stack.enter_context(safe_open(file, framework="pt"))
                state[name] = files[file].get_tensor(prefix + name).float()
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
