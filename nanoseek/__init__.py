"""nanoseek: DeepSeek's LLM system (V3 model, R1 reasoning RL, distillation, serving), compact and hackable.

Public API::

    from nanoseek import ModelConfig, Transformer, KVCache, build, load
    model = build("tiny")                      # or ModelConfig.from_preset("small", vocab_size=...)
    logits = model(input_ids)                  # (B, T, vocab)
    model.save_pretrained("out/")              # HF-format directory, loadable by transformers
    model = load("out/")                       # or an official DeepSeek-V3/V2 checkpoint directory
"""

__version__ = "0.1.0"

from .model import PRESETS, KVCache, ModelConfig, Transformer, build  # noqa: E402
from .weights import CheckpointError, load, save_pretrained  # noqa: E402

__all__ = ["PRESETS", "CheckpointError", "KVCache", "ModelConfig", "Transformer", "build", "load",
           "save_pretrained", "__version__"]
