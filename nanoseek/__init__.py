"""nanoseek: DeepSeek's LLM system (V3 model, R1 reasoning RL, distillation, serving), compact and hackable.

Public API::

    from nanoseek import ModelConfig, Transformer, KVCache, build, load, save_pretrained
    model = build("tiny")                      # or ModelConfig.from_preset("small", vocab_size=...)
    logits = model(input_ids)                  # (B, T, vocab)
    save_pretrained(model, "out/")             # HF-format directory, loadable by transformers
    model = load("out/")                       # or an official DeepSeek-V3/V2 checkpoint directory
    janus = load("Janus-Pro-1B/")              # a Janus directory (either layout): nanoseek.janus.Janus
    janus(input_ids, pixel_values)             # text logits; janus.image_logits(prompt_ids, image_ids)
    save_pretrained(janus, "out-janus/")       # transformers' JanusForConditionalGeneration layout

`load` and `save_pretrained` are the one entry point for every model: they dispatch to nanoseek.weights (the
DeepSeek LLMs) or nanoseek.imagine (Janus), which sit above the model math (nanoseek.model, nanoseek.janus).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ._version import __version__

# oneDNN JIT-compiles one kernel per matmul shape and keeps 1,024 of them by default. MoE experts see a new token
# count almost every step, so bf16 training on a CPU kept regenerating kernels: with 16,384 a `small` bf16 step
# went 1.32 -> 0.89 s (docs/LOG.md). Read at oneDNN's first primitive, so setting it here (after `import torch`
# but before any bf16 matmul) works; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch  # noqa: E402

from . import weights  # noqa: E402
from .janus import Janus  # noqa: E402
from .model import PRESETS, KVCache, ModelConfig, Transformer, build  # noqa: E402
from .weights import CheckpointError  # noqa: E402

__all__ = ["PRESETS", "CheckpointError", "KVCache", "ModelConfig", "Transformer", "build", "load",
           "save_pretrained", "__version__"]


def load(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
         revision: str | None = None) -> Transformer | Janus:
    """Any model directory, or Hugging Face Hub id (at `revision`, fetched into the shared cache once): a
    DeepseekV3/V2 or DeepSeek-LLM directory (nanoseek's own or an official checkpoint) as a Transformer
    (nanoseek.weights.load), a Janus directory in either layout as a nanoseek.janus.Janus
    (nanoseek.imagine.load_janus). device None: nanoseek.device.default_device(); dtype None keeps the
    checkpoint's floating dtype."""
    path, device, model_type = weights.open_model_dir(path, device, revision=revision)
    if model_type in weights.JANUS_MODEL_TYPES:
        from .imagine import load_janus

        return load_janus(path, device, dtype)
    return weights.load(path, device, dtype)


def save_pretrained(model: Transformer | Janus, path: str | Path, **kwargs: Any) -> Path:
    """Write `model` as a directory transformers loads, written to a temp directory and renamed into place: a
    Transformer through nanoseek.weights.save_pretrained (keywords dtype, tokenizer, max_shard_bytes, meta), a Janus
    through nanoseek.imagine.save_janus (JanusForConditionalGeneration; keywords dtype, tokenizer)."""
    if isinstance(model, Janus):
        from .imagine import save_janus

        return save_janus(model, path, **kwargs)
    return weights.save_pretrained(model, path, **kwargs)
