"""One layer's TP communication, measured: forward + backward of the dense layer 1 and of a
CR-Net layer of the same model under a ``CommCounter`` (used by the test and the benchmark)."""

from __future__ import annotations

from typing import Dict

import torch


def measure_layer_comm(hidden: int, ffn: int, heads: int, groups: int, rank: int, seq: int,
                       batch: int, tp: int, sequence_parallel: bool) -> Dict[str, Dict]:
    """{"dense"|"crnet": {"elements": {kind: n}, "calls": {kind: n}, "smallest": n,
    "wire_bytes": b}} on this rank (fp32)."""
    from megatron.core import parallel_state as ps

    from crnet_megatron.diagnostics.comm_counter import CommCounter
    from crnet_megatron.model.config import CRNetConfig
    from crnet_megatron.parallel.build import build_model

    config = CRNetConfig(num_layers=2, hidden_size=hidden, ffn_hidden_size=ffn,
                         num_attention_heads=heads, num_query_groups=groups, crnet_rank=rank,
                         tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
                         use_cpu_initialization=not torch.cuda.is_available())
    model = build_model(config, vocab_size=128 * tp, max_sequence_length=seq, seed=1)
    device = next(model.parameters()).device
    local_seq = seq // tp if sequence_parallel else seq
    hidden_states = torch.randn(local_seq, batch, hidden, device=device, requires_grad=True)
    rope = model.rotary_pos_emb(seq)
    with torch.no_grad():
        _, chains = model.decoder.layers[0](hidden_states, None, rotary_pos_emb=rope)
    out = {}
    for name, layer, incoming in (("dense", model.decoder.layers[0], None),
                                  ("crnet", model.decoder.layers[1], chains)):
        with CommCounter(ps.get_tensor_model_parallel_group()) as counter:
            y, outgoing = layer(hidden_states, incoming, rotary_pos_emb=rope)
            (y.sum() + sum(c.sum() for c in outgoing)).backward()
        out[name] = dict(elements=counter.elements(), calls=counter.call_counts(),
                         smallest=counter.smallest(), wire_bytes=counter.wire_bytes())
    return out
