"""`nanoseek generate`: one completion streamed to the terminal from any model directory (a Janus one too: its LLM
generates), through the inference engine (nanoseek.infer). Loading lives here, not in the engine, so that infer.py
stays below the package's loaders (tests/test_imports.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .infer import Engine, SamplingParams
from .model import Transformer


def run_generate(model_dir: str | Path, prompt: str | None = None, prompt_ids: Sequence[int] | None = None, *,
                 max_tokens: int = 128, temperature: float | None = None, top_p: float | None = None,
                 seed: int | None = None, speculative: int = 0, chat: bool = False,
                 ignore_eos: bool = False, compile: bool | None = None, dtype: str = "auto",
                 device: str | None = None, int8: bool = False) -> int:
    """`nanoseek generate`: load an HF-format directory (and its tokenizer, if any), stream the completion to
    stdout, and a summary line (tokens, speed, finish reason, MTP acceptance) to stderr. device None: the default
    device (nanoseek.device); dtype: weights and KV cache ("auto": bf16 on CUDA, fp32 on a CPU); int8: weight-only
    int8 linear layers and experts (nanoseek.quant, CPU)."""
    import json

    from . import load  # any model directory: a Janus one too (its LLM generates below)
    from .device import resolve_device, resolve_dtype

    model_dir = Path(model_dir)
    dev = resolve_device(device)
    model = load(model_dir, device=dev, dtype=resolve_dtype(dtype, dev))
    if not isinstance(model, Transformer):  # a Janus directory: text in, text out through its LLM
        model = model.language_model
    if int8:
        from .quant import quantize_int8

        quantize_int8(model)
    tokenizer = None
    if (model_dir / "tokenizer.json").is_file():
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.load(model_dir)
    if prompt_ids is None:
        if prompt is None:
            raise ValueError("give --prompt TEXT or --prompt-ids 1,2,3")
        if tokenizer is None:
            raise ValueError(f"no tokenizer.json in {model_dir}: pass --prompt-ids instead of --prompt")
        ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True) if chat \
            else tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
    else:
        ids = list(prompt_ids)
    gen_cfg: dict[str, Any] = {}
    if (model_dir / "generation_config.json").is_file():
        gen_cfg = json.loads((model_dir / "generation_config.json").read_text())
    params = SamplingParams(
        max_tokens=max_tokens, seed=seed, ignore_eos=ignore_eos,
        temperature=temperature if temperature is not None else gen_cfg.get("temperature", 1.0),
        top_p=top_p if top_p is not None else gen_cfg.get("top_p", 1.0))
    engine = Engine(model, tokenizer, max_batch=1, max_model_len=min(len(ids) + max_tokens,
                                                                      model.config.max_position_embeddings),
                    num_speculative_tokens=speculative, compile=compile)
    engine.add_request(ids, params)
    t0 = time.perf_counter()
    final = None
    while engine.has_work():
        for d in engine.step():
            sys.stdout.write(d.text if tokenizer is not None else "".join(f"{t} " for t in d.token_ids))
            sys.stdout.flush()
            final = d
    dt = time.perf_counter() - t0
    assert final is not None
    s = engine.stats
    line = (f"\n[{final.completion_tokens} tokens in {dt:.2f}s, {final.completion_tokens / dt:.1f} tok/s, "
            f"finish_reason={final.finish_reason}")
    if speculative:
        line += f", MTP acceptance {s.acceptance_rate:.0%}, {s.tokens_per_verify:.2f} tokens/step"
    print(line + "]", file=sys.stderr)
    return 0
