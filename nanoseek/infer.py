"""Inference over the absorbed-MLA KV cache. (The batched Engine and speculative decoding grow here.)"""

from __future__ import annotations

import torch

from .model import KVCache, Transformer


@torch.no_grad()
def generate(model: Transformer, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_p: float = 1.0, eos_token_id: int | None = None, seed: int | None = None) -> list[int]:
    """Generate for one prompt: prefill once, then one absorbed-MLA decode step per token."""
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: at least one token (e.g. BOS) is needed")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config, 1, len(prompt_ids) + max_new_tokens, device=device,
                    dtype=next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt_ids], device=device), cache=cache)[:, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = _sample(logits.float(), temperature, top_p, gen)
        out.append(nxt)
        if eos_token_id is not None and nxt == eos_token_id:
            break
        logits = model(torch.tensor([[nxt]], device=device), cache=cache)[:, -1]
    return out


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax(-1))
    probs = (logits / temperature).softmax(-1)[0]
    if top_p < 1:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
        p, i = probs.sort(descending=True)
        keep = p.cumsum(0) - p < top_p
        probs = torch.zeros_like(probs).scatter_(0, i[keep], p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))
