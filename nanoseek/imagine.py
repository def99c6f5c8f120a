"""Janus-Pro on files: model directories in both layouts, images in and out, and the two terminal commands.

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
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .janus import (
    Janus,
    JanusConfig,
    from_hf_state_dict,
    generate_image_tokens,
    original_to_hf_state_dict,
    to_hf_state_dict,
)
from .weights import CheckpointError, read_hf_state_dict

IMAGE_TOKEN, BOI, EOI, PAD = "<image_placeholder>", "<begin_of_image>", "<end_of_image>", "<｜▁pad▁｜>"
# tokenizer_config.json: what transformers' JanusProcessor reads as tokenizer.image_token / boi_token / eoi_token
EXTRA_SPECIAL_TOKENS = {"image_token": IMAGE_TOKEN, "boi_token": BOI, "eoi_token": EOI}
DEFAULT_PROCESSOR = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "min_size": 14, "resample": 3,
                     "rescale_factor": 1 / 255, "do_normalize": True, "do_rescale": True, "do_resize": True,
                     "do_pad": True}


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
        cfg, layout = JanusConfig.from_hf(raw, gen), "hf"
        ids.pop("image_token_id", None)  # config.json's image_token_id is what transformers uses
        ids = {k: v for k, v in ids.items() if k not in gen}
    elif raw.get("model_type") == "multi_modality":
        cfg, layout = JanusConfig.from_original(raw), "original"
    else:
        raise CheckpointError(f"{path / 'config.json'} is not a Janus config (model_type {raw.get('model_type')!r})")
    return (replace(cfg, **ids) if ids else cfg), layout


def load_janus(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Janus:
    """Load a Janus directory in either layout; device None: the default device (nanoseek.device); dtype None keeps
    the checkpoint's floating dtype."""
    from .device import resolve_device

    device = resolve_device(device)
    path = Path(path)
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
    if dtype is None:
        floats = [t.dtype for t in sd.values() if t.is_floating_point()]
        dtype = max(set(floats), key=floats.count) if floats else torch.float32
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
    for k, t in sd.items():
        if tuple(t.shape) != tuple(own[k].shape):
            raise CheckpointError(f"shape mismatch for {_hf_name(k)}{where}: expected {tuple(own[k].shape)}, "
                                  f"found {tuple(t.shape)}")
    with torch.no_grad():
        for k, t in sd.items():
            own[k].copy_(t)


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
    """Write transformers' JanusForConditionalGeneration layout (config.json, model.safetensors,
    generation_config.json, preprocessor_config.json, tokenizer files when `tokenizer` is given) into a temp
    directory and rename it into place."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
          for k, v in to_hf_state_dict(model).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        floats = [v.dtype for v in sd.values() if v.is_floating_point()]
        hf_cfg = {**cfg.to_hf(), "torch_dtype": str(max(set(floats), key=floats.count)).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(processor_config(cfg), indent=2) + "\n")
        save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer is not None:
            write_tokenizer(Path(tokenizer), tmp, cfg)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


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
                dtype: str | None = None) -> list[Path]:
    """`nanoseek imagine`: n images for one prompt, as PNGs and a grid in `out`. Everything is checked before the
    model is loaded, and nothing is written until the images exist."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    if n < 1:
        raise ValueError(f"--n must be >= 1, got {n}")
    from .janus import _check_sampling

    _check_sampling(cfg_weight, temperature)
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
                                       progress=lambda i, _: bar.update(task, completed=i))
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
