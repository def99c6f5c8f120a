"""Helpers to build test models and transformers' reference models from nanoseek configs (tests only)."""

from __future__ import annotations

from pathlib import Path

import torch

from nanoseek import ModelConfig, Transformer, build, save_pretrained
from nanoseek.weights import config_to_hf


def hf_model_from_dir(path: str | Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def random_hf_model(cfg: ModelConfig):
    """A transformers DeepseekV3/V2ForCausalLM with random weights (incl. a random router bias)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.for_model(**config_to_hf(cfg))
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(torch.randn_like(buf) * 0.05)
    return model


def randomize_router_bias(model: Transformer, scale: float = 0.05) -> None:
    with torch.no_grad():
        for r in model.routers():
            if r.e_score_correction_bias is not None:
                r.e_score_correction_bias.copy_(torch.randn_like(r.e_score_correction_bias) * scale)


def sharp_tiny(seed: int = 0) -> Transformer:
    """The `tiny` preset with its final norm scaled by 8: sharper logits than N(0, 0.02) weights give, so greedy
    choices have clear margins and differently rounded paths (packed, int8, compiled) pick the same tokens."""
    torch.manual_seed(seed)
    m = build("tiny").eval()
    with torch.no_grad():
        m.norm.weight.fill_(8.0)
    return m


def make_tiny_model_dir(d, name: str = "model", seed: int = 0):
    """A random `tiny` model directory with a 512-token tokenizer trained on synthetic arithmetic text."""
    from pathlib import Path

    from nanoseek import build
    from nanoseek.data import train_tokenizer
    from nanoseek.synthetic import generate, to_text

    d = Path(d)
    (d / "c.txt").write_text("\n\n".join(to_text(it) for it in generate("arithmetic", 300, seed=1)))
    train_tokenizer([d / "c.txt"], 512, d / "tok")
    torch.manual_seed(seed)
    save_pretrained(build("tiny"), d / name, tokenizer=d / "tok")
    return d / name
