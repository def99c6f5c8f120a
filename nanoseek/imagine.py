"""Janus-Pro on files: model directories in both layouts, images in and out, and the two terminal commands.

- The adapters between nanoseek.janus (the math) and the two checkpoint layouts: config.json
  (`janus_config_from_hf`, `janus_config_to_hf`, `janus_config_from_original`) and state dicts
  (`to_hf_state_dict`, `from_hf_state_dict`, `original_to_hf_state_dict`; the LLM's keys through nanoseek.weights).
- `load_janus(dir)`: transformers' JanusForConditionalGeneration layout (config.json `model_type: janus`, e.g.
  deepseek-community/Janus-Pro-1B) or DeepSeek's MultiModalityCausalLM layout (`model_type: multi_modality`,
  deepseek-ai/Janus-Pro-1B / -7B, `pytorch_model*.bin` read with torch.load(weights_only=True)).
- `save_janus(model, dir)`: transformers' layout, plus what image generation needs and transformers' own save
  leaves out (begin-of-image id in generation_config.json) and the tokenizer's image tokens as JanusProcessor reads
  them (tokenizer_config.json `extra_special_tokens`).
- `preprocess(images, processor_config)`: transformers' JanusImageProcessorPil (resize the long side, pad to a
  square with the background colour, rescale, normalise); `to_pil(pixels)`: its `postprocess`.
- `run_imagine` (`nanoseek imagine`) and `run_understand` (`nanoseek generate --image`).
Prompt format: DeepSeek's "deepseek" conversation template (janus/utils/conversation.py), BOS first.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .infer import generate_image_tokens
from .janus import Janus, JanusConfig, VisionConfig, VQConfig, VQModel
from .weights import CheckpointError, config_from_hf, config_to_hf, copy_checked, dominant_dtype, read_hf_state_dict
from .weights import from_hf_state_dict as lm_from_hf
from .weights import to_hf_state_dict as lm_to_hf

IMAGE_TOKEN, BOI, EOI, PAD = "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<｜▁pad▁｜>"
# tokenizer_config.json: what transformers' JanusProcessor reads as tokenizer.image_token / boi_token / eoi_token
EXTRA_SPECIAL_TOKENS = {"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI}
DEFAULT_PROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "min_size": 14, "resample": 3,
                     "rescale_factor": 1 / 255, "do_normalize": True, "do_rescale": True, "do_resize": True,
                     "do_pad": True}


# ---------------------------------------------------------------------------------------------------------------
# config.json in both layouts


def janus_config_from_hf(hf: dict[str, Any], generation: dict[str, Any] | None = None) -> JanusConfig:
    """transformers' JanusConfig (config.json `model_type: janus`); `generation`: generation_config.json (the
    begin-of-image and pad ids)."""

    def pick(klass: type, d: dict[str, Any]) -> Any:
        names = {f.name for f in fields(klass)}
        return klass(**{k: (tuple(x) if isinstance(x, list) else x) for k, x in d.items() if k in names})

    vd, qd = dict(hf.get("vision_config") or {}), dict(hf.get("vq_config") or {})
    if vd.get("use_qk_norm"):
        raise ValueError("vision_config.use_qk_norm=true is not supported (Janus-Pro has no qk norm)")
    if qd.get("double_latent"):
        raise ValueError("vq_config.double_latent=true is not supported (VQ-16 has a single latent)")
    for d, what in ((vd, "vision_config"), (qd, "vq_config")):
        if d.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{what}.hidden_act={d['hidden_act']!r} is not supported (only gelu)")
    text = dict(hf.get("text_config") or {})
    text.setdefault("model_type", "llama")
    # transformers ties lm_head to the embeddings by the top-level flag (JanusConfig default: true); the loader
    # unties it when a checkpoint carries a different lm_head (transformers' rule, see load_janus)
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    gen = generation or {}
    ids = {k: gen[k] for k in ("boi_token_id", "pad_token_id") if gen.get(k) is not None}
    if hf.get("image_token_id") is not None:
        ids["image_token_id"] = hf["image_token_id"]
    return JanusConfig(text=config_from_hf(text), vision=pick(VisionConfig, vd), vq=pick(VQConfig, qd), **ids)


def janus_config_to_hf(cfg: JanusConfig) -> dict[str, Any]:
    """transformers' JanusConfig as config.json (the LLM's part through nanoseek.weights.config_to_hf)."""
    text = config_to_hf(cfg.text)
    text.pop("architectures", None)
    vision = {**asdict(cfg.vision), "hidden_act": "gelu", "use_qk_norm": False, "model_type": "janus_vision_model"}
    vq = vq_config_to_hf(cfg.vq, cfg.vision.grid)
    return {"architectures": ["JanusForConditionalGeneration"], "model_type": "janus", "text_config": text,
            "vision_config": vision, "vq_config": vq, "image_token_id": cfg.image_token_id,
            "tie_word_embeddings": cfg.text.tie_word_embeddings}


def vq_config_to_hf(q: VQConfig, grid: int) -> dict[str, Any]:
    """transformers' JanusVQVAEConfig (the `vq_config` of a Janus config.json; alone, a VQ directory's config)."""
    return {**asdict(q), "channel_multiplier": list(q.channel_multiplier), "hidden_act": "gelu",
            "double_latent": False, "num_patches": grid, "model_type": "janus_vqgan"}


def janus_config_from_original(d: dict[str, Any]) -> JanusConfig:
    """DeepSeek's MultiModalityConfig (config.json `model_type: multi_modality`)."""

    def params(key: str) -> dict[str, Any]:
        return dict((d.get(key) or {}).get("params") or {})

    vp, ap, gvp, gap, ghp = (params(k) for k in ("vision_config", "aligner_config", "gen_vision_config",
                                                 "gen_aligner_config", "gen_head_config"))
    name = vp.get("model_name", "siglip_large_patch16_384")
    if name != "siglip_large_patch16_384":
        raise ValueError(f"vision model {name!r} is not supported (Janus-Pro: siglip_large_patch16_384)")
    gen_cls = (d.get("gen_vision_config") or {}).get("cls", "VQ-16")
    if gen_cls != "VQ-16":
        raise ValueError(f"generation tokenizer {gen_cls!r} is not supported (Janus-Pro: VQ-16)")
    for p, what in ((ap, "aligner"), (gap, "gen_aligner")):
        if p.get("projector_type", "mlp_gelu") != "mlp_gelu":
            raise ValueError(f"{what} projector_type {p['projector_type']!r} is not supported (only mlp_gelu)")
    select = vp.get("select_layer", -1)  # siglip_vit.create_siglip_vit: the first N blocks are kept
    layers = min(24, 24 + select + 1) if select <= 0 else min(24, select)
    image_size = vp.get("image_size", 384)
    text = dict(d.get("language_config") or {})
    text.setdefault("model_type", "llama")
    # DeepSeek's config names the towers (siglip_large_patch16_384, VQ-16) and their code fixes the widths;
    # a "nanoseek" entry may override them (test-sized checkpoints in this layout; DeepSeek's code ignores it)
    extra = d.get("nanoseek") or {}
    vo, qo = dict(extra.get("vision") or {}), dict(extra.get("vq") or {})
    patch = vo.get("patch_size", 16)
    vision = VisionConfig(**{"num_hidden_layers": layers, "image_size": image_size,
                             "projection_dim": ap.get("n_embed", 2048), "depth": ap.get("depth", 2),
                             "num_image_tokens": (image_size // patch) ** 2, **vo})
    vq = VQConfig(**{"embed_dim": gvp.get("n_embed", 8), "num_embeddings": gvp.get("image_token_size", 16384),
                     "projection_dim": gap.get("n_embed", 2048), "num_hidden_layers": gap.get("depth", 2),
                     "image_token_embed_dim": ghp.get("n_embed", 2048), **qo})
    if ghp.get("image_token_embed", vq.image_token_embed_dim) != vq.projection_dim:
        raise ValueError("gen_head image_token_embed must equal the LLM width (transformers' layout)")
    return JanusConfig(text=config_from_hf(text), vision=vision, vq=vq)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint key layouts. nanoseek names = transformers' keys without the `model.` prefix, the LLM under
# `language_model.` in nanoseek's own trunk names (weights.py maps those to HF). DeepSeek's original layout is
# renamed to transformers' first (the table below, read off siglip_vit.py, vq_model.py and modeling_vlm.py).


def to_hf_state_dict(model: Janus) -> dict[str, torch.Tensor]:
    out = {("model." + k): t for k, t in model.state_dict().items() if not k.startswith("language_model.")}
    for k, t in lm_to_hf(model.language_model).items():  # model.layers... / lm_head.weight
        out[k if k.startswith("lm_head.") else "model.language_model." + k.removeprefix("model.")] = t
    return out


def from_hf_state_dict(cfg: JanusConfig, hf: dict[str, torch.Tensor]
                       ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """transformers' keys -> (nanoseek state dict, unexpected keys)."""
    sd, lm, unexpected = {}, {}, []
    for k, t in hf.items():
        if k.startswith("model.language_model."):
            lm["model." + k.removeprefix("model.language_model.")] = t
        elif k.startswith("lm_head."):
            lm[k] = t
        elif k.startswith("model."):
            sd[k.removeprefix("model.")] = t
        else:
            unexpected.append(k)
    lm_sd, lm_unexpected = lm_from_hf(cfg.text, lm)
    sd.update({"language_model." + k: t for k, t in lm_sd.items()})
    return sd, unexpected + ["model.language_model." + k.removeprefix("model.") for k in lm_unexpected]


# DeepSeek's MultiModalityCausalLM -> transformers' JanusForConditionalGeneration: (pattern, replacement), applied
# in order to each key; None drops the key (attention pooling head and codebook usage counter: unused at inference)
ORIGINAL_TO_HF: list[tuple[str, str | None]] = [
    (r"^vision_model\.vision_tower\.attn_pool\..*$", None),
    (r"^gen_vision_model\.quantize\.codebook_used$", None),
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm(\d)\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.",
     r"model.vision_model.encoder.layers.\1.self_attn.qkv."),  # split into q/k/v below
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.",
     r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."),
    (r"^aligner\.layers\.(\d+)\.", lambda m: f"model.aligner.hidden_layers.{int(m.group(1)) // 2 - 1}."),  # type: ignore[list-item]
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.(\d+)\.",
     lambda m: f"model.generation_aligner.hidden_layers.{int(m.group(1)) // 2 - 1}."),  # type: ignore[list-item]
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.0\.", r"gen_vision_model.\1.mid.block_1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.1\.", r"gen_vision_model.\1.mid.attn_1."),
    (r"^gen_vision_model\.(encoder|decoder)\.mid\.2\.", r"gen_vision_model.\1.mid.block_2."),
    (r"^gen_vision_model\.encoder\.conv_blocks\.", "gen_vision_model.encoder.down."),
    (r"^gen_vision_model\.decoder\.conv_blocks\.", "gen_vision_model.decoder.up."),
    (r"^(gen_vision_model\.(?:encoder|decoder)\.(?:down|up)\.\d+)\.res\.", r"\1.block."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.lm_head\.", "lm_head."),
]


def original_to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DeepSeek's layout -> transformers' keys: renames, timm's fused qkv split in three, pos_embed (1, N, C) ->
    (N, C). Keys that match no rule are kept as they are (and reported as unexpected by the loader)."""
    out: dict[str, torch.Tensor] = {}
    for k, t in sd.items():
        name: str | None = k
        for pat, rep in ORIGINAL_TO_HF:
            if re.search(pat, name):  # type: ignore[arg-type]
                name = None if rep is None else re.sub(pat, rep, name)  # type: ignore[arg-type]
                if name is None or name.startswith(("model.", "lm_head.")):
                    break
        if name is None:
            continue
        if ".self_attn.qkv." in name:
            for part, x in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                out[name.replace(".qkv.", f".{part}.")] = x.contiguous()
        elif name.endswith("position_embedding.weight"):
            out[name] = t.reshape(-1, t.shape[-1])
        else:
            out[name] = t
    return out


# ---------------------------------------------------------------------------------------------------------------
# Directories


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def token_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Ids of the image, begin/end-of-image and pad tokens in the directory's tokenizer.json (those present)."""
    if not (tokenizer_dir / "tokenizer.json").is_file():
        return {}
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    found = {k: tok.token_to_id(t) for k, t in (("image_token_id", IMAGE_TOKEN), ("boi_token_id", BOI),
                                                 ("eoi_token_id", EOI), ("pad_token_id", PAD))}
    return {k: v for k, v in found.items() if v is not None}


def janus_config(path: str | Path) -> tuple[JanusConfig, str]:
    """(config, layout) of a Janus directory; layout is "hf" or "original"."""
    path = Path(path)
    raw = _read_json(path / "config.json")
    ids = token_ids(path)
    if raw.get("model_type") == "janus":
        gen = _read_json(path / "generation_config.json") if (path / "generation_config.json").is_file() else {}
        gen = {**(gen.get("generation_kwargs") or {}), **gen}
        cfg, layout = janus_config_from_hf(raw, gen), "hf"
        ids.pop("image_token_id", None)  # config.json's image_token_id is what transformers uses
        ids = {k: v for k, v in ids.items() if k not in gen}
    elif raw.get("model_type") == "multi_modality":
        cfg, layout = janus_config_from_original(raw), "original"
    else:
        raise CheckpointError(f"{path / 'config.json'} is not a Janus config (model_type {raw.get('model_type')!r})")
    return (replace(cfg, **ids) if ids else cfg), layout


def load_janus(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Janus:
    """Load a Janus directory in either layout; device None: the default device (nanoseek.device); dtype None keeps
    the checkpoint's floating dtype."""
    from .device import resolve_device

    device = resolve_device(device)
    cfg, sd, unexpected, layout = _read_janus(Path(path), dtype)
    if dtype is None:
        dtype = dominant_dtype(sd)
    with torch.device("meta"):
        model = Janus(cfg)
    model = model.to_empty(device=device)
    lm = model.language_model
    if cfg.text.tie_word_embeddings:  # to_empty gives each module its own new tensor: tie again
        lm.lm_head.weight = lm.embed_tokens.weight
    lm.rotary.__init__(cfg.text)  # non-persistent buffer: recompute
    model.to(device)
    _copy_state(model, sd, unexpected, layout)
    return model.to(dtype).eval()


def _read_janus(path: Path, dtype: torch.dtype | None
                ) -> tuple[JanusConfig, dict[str, torch.Tensor], list[str], str]:
    """(config, nanoseek state dict, unexpected keys, layout) of a Janus directory."""
    cfg, layout = janus_config(path)
    hf = read_hf_state_dict(path, dtype)
    if layout == "original":
        hf = original_to_hf_state_dict(hf)
    embed, head = hf.get("model.language_model.embed_tokens.weight"), hf.get("lm_head.weight")
    if cfg.text.tie_word_embeddings and head is not None and embed is not None and not torch.equal(head, embed):
        # transformers' rule: a config that says "tied" but a checkpoint with a different head means untied
        # (Janus-Pro's head is its own; JanusConfig defaults to tied)
        cfg = replace(cfg, text=replace(cfg.text, tie_word_embeddings=False))
    if cfg.text.tie_word_embeddings:
        hf.pop("lm_head.weight", None)
    sd, unexpected = from_hf_state_dict(cfg, hf)
    return cfg, sd, unexpected, layout


def load_janus_weights(model: Janus, path: str | Path) -> None:
    """Copy a Janus directory's weights into `model` in place (nanoseek.checkpoint's resume), after checking the
    directory was saved from the same config."""
    cfg, sd, unexpected, layout = _read_janus(Path(path), None)
    if cfg != model.config:
        raise ValueError(f"{path} was saved from a different Janus config than the model's")
    _copy_state(model, sd, unexpected, layout)


def _hf_name(key: str) -> str:
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    return "model." + key


def _copy_state(model: Janus, sd: dict[str, torch.Tensor], unexpected: list[str], layout: str) -> None:
    own = model.state_dict()
    if model.config.text.tie_word_embeddings:
        own.pop("language_model.lm_head.weight", None)
    where = "" if layout == "hf" else " (named as in transformers' layout, after mapping DeepSeek's keys)"
    extra = sorted(unexpected + [_hf_name(k) for k in sd if k not in own])
    if extra:
        raise CheckpointError(f"unexpected tensor(s) in checkpoint{where}: {', '.join(extra[:5])}"
                              + (f" and {len(extra) - 5} more" if len(extra) > 5 else ""))
    missing = [_hf_name(k) for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"missing tensor(s) in checkpoint{where}: {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    copy_checked(own, sd, _hf_name, where)


def generation_config(cfg: JanusConfig) -> dict[str, Any]:
    """What image generation needs: BOS, pad (unconditional rows) and begin-of-image ids, Janus' sampling.
    transformers' Janus `generate(generation_mode="image")` reads the begin-of-image id from
    `generation_kwargs["boi_token_id"]`; its own save_pretrained leaves it out."""
    t = cfg.text
    return {"bos_token_id": t.bos_token_id, "eos_token_id": t.eos_token_id, "pad_token_id": cfg.pad_token_id,
            "boi_token_id": cfg.boi_token_id, "generation_kwargs": {"boi_token_id": cfg.boi_token_id},
            "guidance_scale": 5, "temperature": 1.0, "do_sample": True}


def processor_config(cfg: JanusConfig) -> dict[str, Any]:
    s = cfg.vision.image_size
    return {**DEFAULT_PROCESSOR, "size": {"height": s, "width": s}, "image_processor_type": "JanusImageProcessor",
            "processor_class": "JanusProcessor"}


def save_janus(model: Janus, path: str | Path, *, dtype: torch.dtype | None = None,
               tokenizer: str | Path | None = None) -> Path:
    """Write transformers' JanusForConditionalGeneration layout (write_janus) into a temp directory and rename it
    into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        write_janus(model, tmp, dtype=dtype, tokenizer=tokenizer)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def write_janus(model: Janus, path: str | Path, *, dtype: torch.dtype | None = None,
                tokenizer: str | Path | None = None) -> None:
    """Write a Janus into the existing directory `path` (config.json, model.safetensors, generation_config.json,
    preprocessor_config.json, tokenizer files when `tokenizer` is given): save_janus, and a training checkpoint's
    model part (nanoseek.checkpoint's save_model)."""
    from safetensors.torch import save_file

    path = Path(path)
    cfg = model.config
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in to_hf_state_dict(model).items()}
    main_dtype = str(dominant_dtype(sd)).removeprefix("torch.")
    hf_cfg = {**janus_config_to_hf(cfg), "torch_dtype": main_dtype}
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(processor_config(cfg), indent=2) + "\n")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        write_tokenizer(Path(tokenizer), path, cfg)


def write_vq(vq: VQModel, path: str | Path) -> None:
    """Write a VQ tokenizer alone into the existing directory `path`, in transformers' JanusVQVAE layout (config.json
    with model_type janus_vqgan, model.safetensors with the keys of `model.vqmodel.*` without the prefix):
    `JanusVQVAE.from_pretrained` loads it, and so does load_vq. A Janus built with this VQConfig takes the weights
    with `model.vqmodel.load_state_dict(load_vq(path).state_dict())`."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.detach().cpu().contiguous() for k, v in vq.state_dict().items()}
    cfg = {"architectures": ["JanusVQVAE"], **vq_config_to_hf(vq.config, vq.grid),
           "torch_dtype": str(dominant_dtype(sd)).removeprefix("torch.")}
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def save_vq(vq: VQModel, path: str | Path) -> Path:
    """write_vq into a temporary directory renamed into place (nanoseek.files.atomic_dir)."""
    from .files import atomic_dir

    with atomic_dir(path) as tmp:
        write_vq(vq, tmp)
    return Path(path)


def load_vq(path: str | Path, device: torch.device | str | None = None) -> VQModel:
    """A VQ directory written by write_vq / save_vq (or transformers' JanusVQVAE.save_pretrained), in eval mode."""
    from .device import resolve_device

    path = Path(path)
    raw = _read_json(path / "config.json")
    if raw.get("model_type") != "janus_vqgan":
        raise CheckpointError(f"{path / 'config.json'} is not a Janus VQ config (model_type "
                              f"{raw.get('model_type')!r}, expected 'janus_vqgan')")
    names = {f.name for f in fields(VQConfig)}
    q = VQConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in names})
    with torch.device("meta"):
        vq = VQModel(q, int(raw["num_patches"]))
    vq = vq.to_empty(device=resolve_device(device))
    sd = read_hf_state_dict(path)
    own = vq.state_dict()
    extra, missing = sorted(set(sd) - set(own)), sorted(set(own) - set(sd))
    if extra or missing:
        raise CheckpointError(f"{path}: " + "; ".join(
            f"{what} tensor(s) {', '.join(ks[:5])}" + (f" and {len(ks) - 5} more" if len(ks) > 5 else "")
            for what, ks in (("unexpected", extra), ("missing", missing)) if ks))
    copy_checked(own, sd, str)
    return vq.eval()


def write_tokenizer(src: Path, dst: Path, cfg: JanusConfig) -> None:
    """Copy a tokenizer directory and declare the image tokens and the pad token in tokenizer_config.json the way
    transformers' JanusProcessor reads them, after checking their ids agree with the model config."""
    if not (src / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in {src}")
    ids = token_ids(src)
    want = {"image_token_id": cfg.image_token_id, "boi_token_id": cfg.boi_token_id,
            "eoi_token_id": cfg.eoi_token_id, "pad_token_id": cfg.pad_token_id}
    bad = [f"{k} {ids.get(k)} != {v}" for k, v in want.items() if ids.get(k) != v]
    if bad:
        raise CheckpointError(f"tokenizer {src} does not match the model's special tokens: {'; '.join(bad)}")
    for name in ("tokenizer.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    tc = _read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    tc.pop("added_tokens_decoder", None)
    tc.update({"extra_special_tokens": dict(EXTRA_SPECIAL_TOKENS), "pad_token": PAD,
               "processor_class": "JanusProcessor", "tokenizer_class": tc.get("tokenizer_class",
                                                                               "PreTrainedTokenizerFast")})
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Images


def read_processor_config(path: str | Path | None, cfg: JanusConfig) -> dict[str, Any]:
    """The directory's preprocessor_config.json in either layout (transformers: `size`; DeepSeek: `image_size`,
    `background_color`), over transformers' defaults."""
    out = processor_config(cfg)
    f = Path(path) / "preprocessor_config.json" if path is not None else None
    if f is not None and f.is_file():
        raw = _read_json(f)
        out.update({k: v for k, v in raw.items() if k in DEFAULT_PROCESSOR or k == "background_color"})
        if "image_size" in raw:
            out["size"] = {"height": raw["image_size"], "width": raw["image_size"]}
        elif "size" in raw:
            out["size"] = raw["size"]
    return out


def preprocess(images: Sequence[Any], proc: dict[str, Any]) -> torch.Tensor:
    """PIL images -> pixel_values (B, 3, S, S) float32, as transformers' JanusImageProcessorPil: scale the long
    side to S (short side rounded, at least min_size; bicubic), pad to a square centred on the background colour
    (the mean in 0..255, truncated), rescale by 1/255, normalise with mean/std."""
    from PIL import Image

    S = int(proc["size"]["height"])
    if proc["size"].get("width", S) != S:
        raise ValueError(f"the image processor needs a square size, got {proc['size']}")
    mean, std = np.array(proc["image_mean"], np.float32), np.array(proc["image_std"], np.float32)
    bg = proc.get("background_color") or [int(m * 255) for m in proc["image_mean"]]
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        if proc.get("do_resize", True):
            d = S / max(w, h)
            w, h = max(round(w * d), proc["min_size"]), max(round(h * d), proc["min_size"])
            im = im.resize((w, h), resample=Image.Resampling(proc.get("resample", 3)), reducing_gap=None)
        x = np.asarray(im).transpose(2, 0, 1)  # (3, h, w) uint8
        if proc.get("do_pad", True) and h != w:
            m = max(h, w)
            sq = np.empty((3, m, m), dtype=x.dtype)
            sq[:] = np.array(bg, dtype=x.dtype)[:, None, None]
            if w > h:
                sq[:, (m - h) // 2: (m - h) // 2 + h] = x
            else:
                sq[:, :, (m - w) // 2: (m - w) // 2 + w] = x
            x = sq
        x = (x.astype(np.float64) * proc["rescale_factor"]).astype(np.float32) if proc.get("do_rescale", True) \
            else x.astype(np.float32)
        if proc.get("do_normalize", True):
            x = (x - mean[:, None, None]) / std[:, None, None]
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return torch.stack(out)


def to_pil(pixels: torch.Tensor, proc: dict[str, Any] | None = None) -> list[Any]:
    """Decoded pixels (B, 3, H, W) -> PIL images: un-normalise, scale to 0..255, clip, truncate to uint8 (as
    transformers' postprocess and DeepSeek's (x + 1) / 2 * 255)."""
    from PIL import Image

    proc = proc or DEFAULT_PROCESSOR
    mean = np.array(proc["image_mean"], np.float32)[:, None, None]
    std = np.array(proc["image_std"], np.float32)[:, None, None]
    arr = pixels.detach().float().cpu().numpy()
    arr = np.clip((arr * std + mean) / proc["rescale_factor"], 0, 255).astype(np.uint8)
    return [Image.fromarray(a.transpose(1, 2, 0)) for a in arr]


def open_image(path: str | Path) -> Any:
    """A PIL image from a file, with one clear error for a missing, unreadable or non-image path."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ValueError(f"image {p} does not exist")
    if not p.is_file():
        raise ValueError(f"image {p} is not a file")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except UnidentifiedImageError as e:
        raise ValueError(f"cannot read image {p}: not an image format Pillow can open") from e
    except (OSError, ValueError) as e:  # truncated or corrupt data
        raise ValueError(f"cannot read image {p}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def grid_image(images: Sequence[Any]) -> Any:
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def _save_png(image: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------------
# Prompts (DeepSeek's "deepseek" conversation template: "{system}\n\n<|User|>: {text}\n\n<|Assistant|>:")

# VLChatProcessor.system_prompt (janus/models/processing_vlm.py), used for understanding; generation_inference.py
# passes an empty system prompt (and then the template writes no separator either)
UNDERSTANDING_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                        "content that the user provides, and assist the user with a variety of tasks using natural "
                        "language.")


def user_turn(text: str, system: str = "") -> str:
    return (f"{system}\n\n" if system else "") + f"<|User|>: {text.strip()}\n\n<|Assistant|>:"


def generation_prompt(tokenizer: Any, cfg: JanusConfig, text: str) -> list[int]:
    """BOS + the formatted turn + <begin_of_image> (generation_inference.py)."""
    if not text.strip():
        raise ValueError("the prompt is empty")
    return tokenizer.encode(user_turn(text), add_bos=True) + [cfg.boi_token_id]


def understanding_prompt(tokenizer: Any, cfg: JanusConfig, text: str) -> list[int]:
    """BOS + system prompt + "<|User|>: <image_placeholder>\\n{text}..." with the placeholder expanded to
    <begin_of_image>, num_image_tokens image tokens and <end_of_image> (DeepSeek's VLChatProcessor)."""
    ids = tokenizer.encode(user_turn(f"{IMAGE_TOKEN}\n{text}", UNDERSTANDING_SYSTEM), add_bos=True)
    if ids.count(cfg.image_token_id) != 1:
        raise ValueError(f"the tokenizer does not encode {IMAGE_TOKEN} as one token (id {cfg.image_token_id})")
    i = ids.index(cfg.image_token_id)
    return ids[:i] + [cfg.boi_token_id] + [cfg.image_token_id] * cfg.num_image_tokens + [cfg.eoi_token_id] \
        + ids[i + 1:]


# ---------------------------------------------------------------------------------------------------------------
# Commands


def _load_with_tokenizer(model_dir: Path, device: str | None, dtype: str | None) -> tuple[Janus, Any]:
    from .device import resolve_device, resolve_dtype
    from .tokenizer import Tokenizer

    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    if not (model_dir / "tokenizer.json").is_file():
        raise ValueError(f"no tokenizer.json in {model_dir}: a Janus directory needs its tokenizer")
    dev = resolve_device(device)
    model = load_janus(model_dir, device=dev, dtype=resolve_dtype(dtype, dev) if dtype else None)
    return model, Tokenizer.load(model_dir)


def run_imagine(model_dir: str | Path, prompt: str, out: str | Path, *, n: int = 4, cfg_weight: float = 5.0,
                temperature: float = 1.0, seed: int | None = None, device: str | None = None,
                dtype: str | None = None, compile: bool = False) -> list[Path]:
    """`nanoseek imagine`: n images for one prompt, as PNGs and a grid in `out`. Everything is checked before the
    model is loaded, and nothing is written until the images exist. `compile`: the compiled decode step (its
    compilation takes tens of seconds; it pays in bf16, where it is ~2x faster per token: docs/janus.md)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    from .janus import check_guidance

    check_guidance(cfg_weight, temperature)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    from .device import resolve_device

    device = resolve_device(device)  # a bad --device fails here, before the model is read
    model, tok = _load_with_tokenizer(Path(model_dir), device, dtype)
    cfg = model.config
    ids = generation_prompt(tok, cfg, prompt)
    N = cfg.num_image_tokens
    if len(ids) + N > cfg.text.max_position_embeddings:
        raise ValueError(f"the prompt is {len(ids)} tokens; with {N} image tokens it exceeds the context "
                         f"({cfg.text.max_position_embeddings} tokens)")
    slow = "; a 1B model on a CPU takes minutes (docs/janus.md)" if device.type == "cpu" else ""
    print(f"{n} image(s) x {N} tokens, 2 rows each (classifier-free guidance, weight {cfg_weight:g}) on "
          f"{device}{slow}", file=sys.stderr)
    t0 = time.perf_counter()
    with Progress(TextColumn("imagine"), BarColumn(), TextColumn("{task.completed}/{task.total} tokens"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
                  console=_stderr_console()) as bar:
        task = bar.add_task("tokens", total=N)
        tokens = generate_image_tokens(model, [ids] * n, cfg_weight=cfg_weight, temperature=temperature, seed=seed,
                                       progress=lambda i, _: bar.update(task, completed=i), compile=compile)
    t1 = time.perf_counter()
    with torch.inference_mode():
        images = [im for chunk in tokens.split(4) for im in to_pil(model.decode_image(chunk),
                                                                     read_processor_config(model_dir, cfg))]
    t2 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        paths.append(out / f"image_{i}.png")
        _save_png(im, paths[-1])
    _save_png(grid_image(images), out / "grid.png")
    print(f"{n * N} image tokens in {t1 - t0:.1f}s ({n * N / (t1 - t0):.1f} tokens/s), VQ decoding {t2 - t1:.1f}s; "
          f"wrote {len(paths)} PNGs and grid.png to {out}", file=sys.stderr)
    return paths


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


@torch.inference_mode()
def understand(model: Janus, tokenizer: Any, image: Any, prompt: str, proc: dict[str, Any], *,
               max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None) -> list[int]:
    """Answer a question about a PIL image: prefill [prompt with image features] through the KV cache, then decode
    text tokens until EOS or max_tokens. temperature 0 is greedy (DeepSeek's inference.py)."""
    from .model import KVCache

    cfg, lm = model.config, model.language_model
    ids = understanding_prompt(tokenizer, cfg, prompt)
    if len(ids) + max_tokens > cfg.text.max_position_embeddings:
        raise ValueError(f"the prompt is {len(ids)} tokens (with {cfg.num_image_tokens} image tokens); with "
                         f"{max_tokens} new tokens it exceeds the context ({cfg.text.max_position_embeddings})")
    param = next(model.parameters())
    x = torch.tensor([ids], device=param.device)
    emb = model.embed(x, preprocess([image], proc).to(param.device, param.dtype))
    cache = KVCache(cfg.text, 1, len(ids) + max_tokens, param.device, param.dtype)
    g = torch.Generator(param.device).manual_seed(seed if seed is not None else int(torch.randint(2**62, ())))
    h, _ = lm.trunk(None, inputs_embeds=emb, cache=cache)
    eos = cfg.text.eos_token_id
    stops = set(eos) if isinstance(eos, list) else {eos}
    out: list[int] = []
    for _ in range(max_tokens):
        logits = lm.lm_head(h[:, -1]).float()
        tok = logits.argmax(-1) if temperature < 1e-5 else \
            torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=g)[:, 0]
        t = int(tok)
        if t in stops:
            break
        out.append(t)
        h, _ = lm.trunk(tok[:, None], cache=cache)
    return out


def run_understand(model_dir: str | Path, image: str | Path, prompt: str, *, max_tokens: int = 256,
                   temperature: float = 0.0, seed: int | None = None, device: str | None = None,
                   dtype: str | None = None) -> int:
    """`nanoseek generate --image`: the answer on stdout, a summary line on stderr."""
    pil = open_image(image)  # before loading the model: a bad path fails at once
    if max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {max_tokens}")
    model, tok = _load_with_tokenizer(Path(model_dir), device, dtype)
    t0 = time.perf_counter()
    ids = understand(model, tok, pil, prompt, read_processor_config(model_dir, model.config), max_tokens=max_tokens,
                     temperature=temperature, seed=seed)
    print(tok.decode(ids, skip_special_tokens=True))
    print(f"[{len(ids)} tokens in {time.perf_counter() - t0:.2f}s]", file=sys.stderr)
    return 0
