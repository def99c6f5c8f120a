"""nanoseek: DeepSeek's LLM system (V3 model, R1 reasoning RL, distillation, serving), compact and hackable.

Public API::

    from nanoseek import ModelConfig, Transformer, KVCache, build, load
    model = build("tiny")                      # or ModelConfig.from_preset("small", vocab_size=...)
    logits = model(input_ids)                  # (B, T, vocab)
    model.save_pretrained("out/")              # HF-format directory, loadable by transformers
    model = load("out/")                       # or an official DeepSeek-V3/V2 checkpoint directory
    janus = load("Janus-Pro-1B/")              # a Janus directory (either layout): nanoseek.janus.Janus
    janus(input_ids, pixel_values)             # text logits; janus.image_logits(prompt_ids, image_ids)
"""

__version__ = "0.1.0"

import os  # noqa: E402

# oneDNN JIT-compiles one kernel per matmul shape and keeps 1,024 of them by default. MoE experts see a new token
# count almost every step, so bf16 training on a CPU kept regenerating kernels: with 16,384 a `small` bf16 step
# went 1.32 -> 0.89 s (docs/LOG.md). Read at oneDNN's first primitive, so setting it here (after `import torch`
# but before any bf16 matmul) works; a value the user set wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

from .model import PRESETS, KVCache, ModelConfig, Transformer, build  # noqa: E402
from .weights import CheckpointError, load, save_pretrained  # noqa: E402

__all__ = ["PRESETS", "CheckpointError", "KVCache", "ModelConfig", "Transformer", "build", "load",
           "save_pretrained", "__version__"]
