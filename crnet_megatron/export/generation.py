"""Sampling from a trained model (``crnet-generate``).

Greedy (``--temperature 0``), temperature, top-k and top-p sampling with a KV cache. A CR-Net
chain runs through depth per position, so a decode step needs only the new token's
previous-layer projection outputs: the cache holds keys and values, as in any LLaMA. Reads an
export directory (``crnet-export``) or a checkpoint (converted in memory); prints the
text and tokens/s.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """[b, vocab] logits -> [b] token ids."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: List[int], max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos: Optional[int] = None,
             use_cache: bool = True, return_logits: bool = False):
    """Token ids after the prompt (and, with ``return_logits``, each step's logits)."""
    from crnet_megatron.export.modeling_crnet import KVCache

    limit = model.config.max_position_embeddings
    if len(prompt_ids) > limit:
        raise ValueError(f"the prompt has {len(prompt_ids)} tokens, more than the model's "
                         f"sequence length {limit}")
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt_ids], device=device)
    cache = KVCache() if use_cache else None
    step_in = ids
    out, logits_seen = [], []
    for _ in range(min(max_new_tokens, limit - len(prompt_ids))):
        logits = model(step_in if use_cache else ids, cache=cache).logits[:, -1]
        if return_logits:
            logits_seen.append(logits.float().cpu())
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        out.append(int(nxt))
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        step_in = nxt[:, None]
        if eos is not None and int(nxt) == eos:
            break
    return (out, logits_seen) if return_logits else out


def load_for_generation(path: str, tokenizer: Optional[str] = None):
    """(CRNetForCausalLM, tokenizers.Tokenizer, eos id) from an export or a checkpoint."""
    from crnet_megatron.data.preprocess import open_tokenizer
    from crnet_megatron.export.modeling_crnet import (
        CRNetForCausalLM,
        read_export_config,
    )
    from crnet_megatron.parallel.environment import announce

    announce()
    if os.path.isfile(os.path.join(path, "config.json")):
        tok_path = tokenizer or os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_path):
            raise FileNotFoundError(f"export {path} has no tokenizer.json; pass --tokenizer")
        model = CRNetForCausalLM.from_export(path).eval()  # config.json checked first
        return model, open_tokenizer(tok_path), read_export_config(path).get("eos_token_id")
    from crnet_megatron.export.hf import to_hf_model
    from crnet_megatron.export.loader import load_megatron_model, single_process

    with single_process():
        model, loaded = load_megatron_model(path, tokenizer)
        hf = to_hf_model(model, loaded)
    return hf, loaded.tokenizer.tok, loaded.tokenizer.eod
