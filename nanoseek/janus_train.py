"""The mini Janus, trained from scratch on a CPU: `nanoseek janus train --data WORLD --vq VQ --out RUN [key=value]`.

One model learns the shapes world (nanoseek.shapes) both ways, as Janus-Pro does (arXiv 2501.17811):
  text-to-image   BOS "<|User|>: {prompt}\\n\\n<|Assistant|>:" <begin_of_image> t_0 .. t_63: the 8 x 8 VQ tokens of
                  the image (the frozen VQ of `nanoseek janus train-vq`) are the targets of the generation head.
                  CFG dropout: 10% of the prompts become BOS, pads, <begin_of_image> (Janus, arXiv 2410.13848,
                  training details: the text condition is replaced by the pad token with probability 10%, so the
                  model also learns the unconditional distribution), exactly the unconditional row that sampling
                  builds (nanoseek.janus.guidance_rows, DeepSeek's rule).
  understanding   the understanding prompt of `nanoseek generate --image` (nanoseek.imagine.understanding_prompt: the
                  system prompt, <begin_of_image>, 64 image placeholders, <end_of_image>, the question), then
                  " {answer}" EOS as the target; the placeholders carry the ViT + aligner features ("vit":
                  decoupled, as Janus) or, for the paper's ablation, the image's own VQ tokens through the generation
                  embeddings and aligner ("vq": one shared visual encoder). Half the rows ask "Describe the
                  picture." and answer with the scene's full caption (image-caption pairs, as Janus' stage I/II).
  text            BOS caption EOS: plain language modelling.
Each step draws all three (Janus-Pro stage III's ratio understanding : text : generation = 5 : 1 : 4, section 3.2)
and the loss is the sum of the three means plus V3's sequence-wise balance loss; the router bias moves by V3
eq. 16 after every step. Janus-Pro's stage I (adaptors and image head first, on a frozen pretrained LLM) is not
imitated: there is no pretrained LLM here, so everything but the VQ trains from the first step.

The trunk is nanoseek's DeepSeek-V3 block (the "janus-mini" preset: MLA + DeepSeekMoE), so the saved model is
transformers' JanusForConditionalGeneration with a DeepSeek-V3 text model, and `nanoseek imagine`, `generate
--image`, `serve` and the web page run it unchanged.

The loop follows nanoseek.train's conventions and reuses its parts: the lr schedule and optimizers (train.lr_at,
build_optimizers: the optimisation fields below have TrainConfig's names), atomic checkpoints with exact resume
(nanoseek.checkpoint: a checkpoint is a complete Janus directory), one JSONL line per step, a progress bar, a PNG
of the curves. Batches are a function of (seed, step), so a resumed run draws the same batches as an uninterrupted
one. OUT/model is the published model: the last checkpoint's Janus directory plus world.json and janus_train.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .files import append_jsonl, atomic_dir, atomic_write_json, read_jsonl
from .janus import Janus, JanusConfig, janus_preset, unconditional_prompt
from .stats import derive_seed

ENCODERS = ("vit", "vq")
DESCRIBE = "Describe the picture."
IMAGE_TOKENS = ("<image_placeholder>", "<begin_of_image>", "<end_of_image>")


@dataclass
class JanusTrainConfig:
    """Every knob of a mini Janus run; TOML files and `key=value` overrides map onto these fields (`model.*` keys
    override the preset's text trunk, e.g. model.num_hidden_layers=2)."""

    data: str = ""  # a shapes world directory with a train split (`nanoseek data synth --task shapes`)
    vq: str = ""  # the frozen VQ: a directory written by `nanoseek janus train-vq`
    preset: str = "janus-mini"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    vocab_size: int = 0  # the world tokenizer's BPE size before the 3 image tokens; 0: the preset's vocab - 3
    understanding_encoder: str = "vit"  # vit (decoupled, Janus) | vq (shared: the image's VQ tokens)
    # the mix per step, in sequences: Janus-Pro stage III's 5 : 1 : 4 (understanding : text : text-to-image) would be
    # 10 : 2 : 8; generation gets 24 because a prompt is worth a few nats of a 64-token image's loss, so its signal
    # per sample is weak: measured at 1,000 steps (docs/LOG.md), 24 images per step made the image-token loss depend
    # on the prompt (2.35 vs 2.60 nats with shuffled prompts) where 8 per step at 600 steps hardly did (3.79 vs 3.82)
    und_batch: int = 10
    text_batch: int = 2
    t2i_batch: int = 24
    cfg_dropout: float = 0.1  # Janus: the prompt of a text-to-image sample becomes pads 10% of the time
    # understanding rows that ask for a description (DESCRIBE -> the scene's full caption: every object's size,
    # colour, shape and place, ~15 target tokens) instead of a one-word question: image-caption pairs, the bulk of
    # Janus' understanding data, teach the encoder far more per image than a one-token answer
    describe_frac: float = 0.5
    caption_frac: float = 0.5  # text-to-image prompts: the item's GenEval-style prompt, or its full caption
    # optimisation (TrainConfig's names: train.lr_at and train.build_optimizers read them)
    optimizer: str = "adamw"
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "wsd"
    warmup_steps: int = 20
    decay_ratio: float = 0.3
    max_steps: int = 1200
    grad_clip: float = 1.0
    balance_alpha: float | None = None  # None: the trunk config's aux_loss_alpha (V3: 1e-4)
    bias_update_speed: float = 1e-3  # gamma of V3 eq. 16
    # run
    dtype: str = "fp32"
    device: str | None = None
    out: str = "runs/janus"
    seed: int = 0
    log_every: int = 1
    save_every: int = 100
    keep_last: int = 2
    max_time: float | None = None  # seconds; stop (and save) when exceeded
    fit_to_time: bool = False  # with max_time: shrink max_steps after a few steps so the lr decay completes
    refit: bool = False  # (train.py's field; the fitted length is kept either way)
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        from .device import dtype_name

        errors = []
        if self.understanding_encoder not in ENCODERS:
            errors.append(f"understanding_encoder {self.understanding_encoder!r} not in {ENCODERS}")
        if self.schedule not in ("cosine", "wsd", "constant"):
            errors.append(f"schedule {self.schedule!r} not in (cosine, wsd, constant)")
        if self.optimizer not in ("adamw", "muon"):
            errors.append(f"optimizer {self.optimizer!r} not in (adamw, muon)")
        for name in ("und_batch", "text_batch", "t2i_batch"):
            if getattr(self, name) < 0:
                errors.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.und_batch + self.text_batch + self.t2i_batch == 0:
            errors.append("the batch is empty: und_batch + text_batch + t2i_batch must be >= 1")
        if not all(0 <= x <= 1 for x in (self.cfg_dropout, self.caption_frac, self.describe_frac)):
            errors.append("cfg_dropout, caption_frac and describe_frac must be in [0, 1]")
        if self.max_steps < 1 or self.lr <= 0:
            errors.append("need max_steps >= 1 and lr > 0")
        try:
            dtype_name(self.dtype, training=True)
        except ValueError as e:
            errors.append(str(e))
        if errors:
            raise ValueError("invalid janus train config: " + "; ".join(errors))

    @classmethod
    def from_sources(cls, config_file: str | None = None, overrides: Sequence[str] | None = None,
                     **kwargs: Any) -> JanusTrainConfig:
        """TOML file, then keyword arguments, then `key=value` strings, as `nanoseek train`."""
        import tomllib

        from .model import ModelConfig
        from .train import _flatten_toml, _unknown, parse_overrides

        values: dict[str, Any] = {}
        if config_file:
            p = Path(config_file)
            if not p.is_file():
                raise FileNotFoundError(f"config file {p} does not exist")
            values.update(_flatten_toml(tomllib.loads(p.read_text())))
        values.update({k: v for k, v in kwargs.items() if v is not None})
        values.update(parse_overrides(list(overrides or [])))
        names = {f.name for f in dataclasses.fields(cls)}
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for k in list(values):
            if k.startswith("model."):
                if k[6:] not in model_fields:
                    raise ValueError(_unknown(k[6:], model_fields, "model config key"))
                values.setdefault("model_overrides", {})[k[6:]] = values.pop(k)
            elif k not in names:
                raise ValueError(_unknown(k, names, "janus train config key"))
        return cls(**values)


# ----------------------------------------------------------------------------------------------------------------
# The world's tokenizer and the model config


def world_texts(items: Sequence[dict[str, Any]]) -> list[str]:
    """Every text the model reads or writes about a world, in the formats it sees them (BPE merges the template's
    words as well as the world's)."""
    from .imagine import UNDERSTANDING_SYSTEM, user_turn

    out = []
    for it in items:
        out += [user_turn(it["prompt"]), user_turn(it["caption"]), it["caption"]]
        # as the understanding prompt reads (the system prompt with every question), minus the image tokens
        out += [user_turn(q["question"], UNDERSTANDING_SYSTEM) + " " + q["answer"] for q in it.get("questions", [])]
        out.append(user_turn(DESCRIBE, UNDERSTANDING_SYSTEM) + " " + it["caption"])
    return out


def world_tokenizer(items: Sequence[dict[str, Any]], out_dir: str | Path, vocab_size: int) -> Any:
    """nanoseek's byte-level BPE (DeepSeek's special tokens: BOS 0, EOS 1, pad 2) trained on the world's texts, plus
    Janus' image tokens (<image_placeholder>, <begin_of_image>, <end_of_image>) as the next three ids: the
    tokenizer directory that `nanoseek imagine`, `generate --image` and `serve` read (imagine.token_ids)."""
    from tokenizers import AddedToken

    from .tokenizer import Tokenizer, train_bpe

    tok = train_bpe(world_texts(items), vocab_size, out_dir, min_frequency=2, source="the shapes world's texts")
    tok.tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in IMAGE_TOKENS])
    tok.save(out_dir)
    return Tokenizer.load(out_dir)


def load_vq(path: str | Path) -> Any:
    """The trained VQ (a VQModel): a VQ directory or a run directory of `nanoseek janus train-vq`."""
    from .minijanus import load_vq_run

    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"--vq {p} does not exist (write it with `nanoseek janus train-vq`)")
    return load_vq_run(p, device="cpu")


def model_config(cfg: JanusTrainConfig, tok: Any, vq_config: Any, image_size: int) -> JanusConfig:
    """The preset with the trained VQ's tokenizer config (widths mapped to the trunk), the tokenizer's special ids
    and the world's image size, checked before anything is built."""
    base = janus_preset(cfg.preset, **cfg.model_overrides)
    D = base.text.hidden_size
    if tok.vocab_size > base.text.vocab_size:
        raise ValueError(f"the world tokenizer has {tok.vocab_size} tokens, more than the model's vocab_size "
                         f"{base.text.vocab_size} (lower vocab_size or raise model.vocab_size)")
    if base.vision.image_size != image_size:
        raise ValueError(f"the world's images are {image_size}x{image_size} but preset {cfg.preset} reads "
                         f"{base.vision.image_size}x{base.vision.image_size}")
    vq = replace(vq_config, projection_dim=D, image_token_embed_dim=D,
                 num_hidden_layers=base.vq.num_hidden_layers)
    ids = dict(zip(("image_token_id", "boi_token_id", "eoi_token_id"), (tok.token_id(t) for t in IMAGE_TOKENS)))
    return JanusConfig(text=replace(base.text, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                    pad_token_id=tok.pad_id),
                       vision=replace(base.vision, projection_dim=D), vq=vq, pad_token_id=tok.pad_id, **ids)


@torch.no_grad()
def vq_tokens(model: Janus, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, 3, S, S) -> (N, grid^2) VQ token ids, in batches (the frozen tokenizer: computed once per run)."""
    dev = next(model.parameters()).device
    return torch.cat([model.encode_image(pixels[i:i + batch].to(dev)).cpu() for i in range(0, len(pixels), batch)])


# ----------------------------------------------------------------------------------------------------------------
# Sequences and losses (one implementation: training and the evaluation's samplers use these)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids left-padded with pad_id, and the (B, T) attention mask (1 = real token)."""
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids, mask


def image_features(model: Janus, encoder: str, pixels: torch.Tensor | None, vq_ids: torch.Tensor | None
                   ) -> torch.Tensor:
    """(B, grid^2, D) features for the image placeholders: the ViT + aligner ("vit", Janus' decoupled encoding) or
    the image's VQ tokens through the generation embeddings + aligner ("vq", one shared encoder: the ablation)."""
    if encoder == "vit":
        assert pixels is not None
        return model.image_features(pixels)
    assert vq_ids is not None
    return model.embed_image_tokens(vq_ids)


def understanding_embeds(model: Janus, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Token embeddings with each row's image features over its placeholders (Janus.embed, for either encoder)."""
    x = model.language_model.embed_tokens(ids)
    is_image = ids == model.config.image_token_id
    if int(is_image.sum()) != feats.shape[0] * feats.shape[1]:
        raise ValueError(f"{int(is_image.sum())} image placeholders for {feats.shape[0]} x {feats.shape[1]} features")
    return x.masked_scatter(is_image[..., None], feats.to(x.dtype))


def t2i_loss(model: Janus, prompts: Sequence[Sequence[int]], image_ids: torch.Tensor, want_balance: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean cross-entropy of the image tokens through the generation head (teacher forcing, Janus.image_logits with
    left-padded prompts: positions count from each row's first real token, as generate_image_tokens' prefill)."""
    lm, dev = model.language_model, image_ids.device
    ids, mask = (t.to(dev) for t in left_pad(prompts, model.config.pad_token_id))
    x = torch.cat([lm.embed_tokens(ids), model.embed_image_tokens(image_ids[:, :-1])], dim=1)
    full = torch.cat([mask, torch.ones_like(image_ids[:, :-1])], dim=1)
    h, bal = lm.trunk(None, inputs_embeds=x, attention_mask=None if bool(mask.all()) else full,
                      want_balance=want_balance)
    logits = model.generation_head(h[:, ids.shape[1] - 1:])
    return F.cross_entropy(logits.float().flatten(0, 1), image_ids.flatten()), bal


def lm_loss(model: Janus, rows: Sequence[Sequence[int]], starts: Sequence[int], feats: torch.Tensor | None,
            want_balance: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean next-token cross-entropy of rows (right-padded; causal attention never sees the padding) on the tokens
    from position starts[i] on (the answer and EOS; 1 for a whole text)."""
    lm = model.language_model
    dev = next(model.parameters()).device
    T = max(map(len, rows))
    ids = torch.full((len(rows), T), model.config.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts)):
        ids[i, :len(r)] = torch.tensor(list(r))
        targets[i, s - 1:len(r) - 1] = torch.tensor(list(r[s:]))
    ids, targets = ids.to(dev), targets.to(dev)
    x = understanding_embeds(model, ids, feats) if feats is not None else lm.embed_tokens(ids)
    h, bal = lm.trunk(None, inputs_embeds=x, want_balance=want_balance)
    return F.cross_entropy(lm.lm_head(h).float().flatten(0, 1), targets.flatten(), ignore_index=-100), bal


@dataclass
class WorldData:
    """A world's training split as the loop reads it: items, images as model inputs, VQ tokens, token ids."""

    world: Any  # shapes.ShapesConfig
    items: list[dict[str, Any]]
    pixels: torch.Tensor  # (N, 3, S, S)
    vq_ids: torch.Tensor  # (N, grid^2)
    gen_prompts: list[tuple[list[int], list[int]]]  # per item: (prompt, caption) generation prompts
    questions: list[tuple[int, list[int], int]]  # (item index, prompt + answer + EOS, answer start)
    descriptions: list[tuple[int, list[int], int]]  # the same for DESCRIBE -> caption, one per item
    captions: list[list[int]]  # BOS caption EOS


def prepare_world(items: Sequence[dict[str, Any]], images: np.ndarray, world: Any, model: Janus, tok: Any
                  ) -> WorldData:
    """Tokenize every prompt, caption and question once, and the images through the frozen VQ."""
    from .imagine import generation_prompt, understanding_prompt
    from .minijanus import to_pixels

    cfg = model.config
    pixels = to_pixels(images)
    gen = [(generation_prompt(tok, cfg, it["prompt"]), generation_prompt(tok, cfg, it["caption"])) for it in items]
    questions = []
    for i, it in enumerate(items):
        for q in it.get("questions", []):
            p = understanding_prompt(tok, cfg, q["question"])
            questions.append((i, p + tok.encode(" " + q["answer"]) + [tok.eos_id], len(p)))
    describe = understanding_prompt(tok, cfg, DESCRIBE)
    descriptions = [(i, describe + tok.encode(" " + it["caption"]) + [tok.eos_id], len(describe))
                    for i, it in enumerate(items)]
    captions = [tok.encode(it["caption"], add_bos=True) + [tok.eos_id] for it in items]
    return WorldData(world, list(items), pixels, vq_tokens(model, pixels), gen, questions, descriptions, captions)


@dataclass
class Batch:
    """What one step trains on: text-to-image prompts (after CFG dropout) with their items, the questions, texts."""

    t2i_items: np.ndarray
    t2i_prompts: list[list[int]]
    dropped: np.ndarray  # which prompts CFG dropout replaced
    und: list[tuple[int, list[int], int]]
    text: list[list[int]]


def draw_batch(data: WorldData, cfg: JanusTrainConfig, step: int, pad_id: int) -> Batch:
    """The batch of step `step`: a function of (seed, step) only, so a resumed run draws what an uninterrupted one
    would. Each text-to-image prompt is the item's prompt or its caption (caption_frac), and with probability
    cfg_dropout its unconditional row (CFG dropout)."""
    rng = np.random.default_rng(derive_seed(cfg.seed, "janus-batch", step))
    idx = rng.integers(len(data.items), size=cfg.t2i_batch)
    use_caption = rng.random(cfg.t2i_batch) < cfg.caption_frac
    drop = rng.random(cfg.t2i_batch) < cfg.cfg_dropout
    prompts = [data.gen_prompts[i][int(c)] for i, c in zip(idx, use_caption)]
    prompts = [unconditional_prompt(p, pad_id) if d else p for p, d in zip(prompts, drop)]
    describe = rng.random(cfg.und_batch) < cfg.describe_frac
    und = [data.descriptions[rng.integers(len(data.descriptions))] if d
           else data.questions[rng.integers(len(data.questions))] for d in describe]
    text = [data.captions[j] for j in rng.integers(len(data.captions), size=cfg.text_batch)]
    return Batch(idx, prompts, drop, und, text)


def step_losses(model: Janus, data: WorldData, cfg: JanusTrainConfig, step: int) -> dict[str, torch.Tensor]:
    """The losses of one step on draw_batch's batch: {"loss", "t2i", "und", "text", "balance"}; loss = the sum of
    the three means + alpha x V3's sequence-wise balance loss."""
    dev = next(model.parameters()).device
    mc = model.config
    b = draw_batch(data, cfg, step, mc.pad_token_id)
    alpha = mc.text.aux_loss_alpha if cfg.balance_alpha is None else cfg.balance_alpha
    want = alpha > 0
    out: dict[str, torch.Tensor] = {}
    balance: list[torch.Tensor] = []

    def add(name: str, loss_bal: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        out[name] = loss_bal[0]
        if loss_bal[1] is not None:
            balance.append(loss_bal[1])

    if b.t2i_prompts:
        add("t2i", t2i_loss(model, b.t2i_prompts, data.vq_ids[b.t2i_items].to(dev), want))
    if b.und:
        idx = np.array([u[0] for u in b.und])
        feats = image_features(model, cfg.understanding_encoder, data.pixels[idx].to(dev), data.vq_ids[idx].to(dev))
        add("und", lm_loss(model, [u[1] for u in b.und], [u[2] for u in b.und], feats, want))
    if b.text:
        add("text", lm_loss(model, b.text, [1] * len(b.text), None, want))
    total = sum(out.values(), torch.zeros((), device=dev))
    if want and balance:
        out["balance"] = sum(balance, torch.zeros((), device=dev))
        total = total + alpha * out["balance"]
    out["loss"] = total
    return out


# ----------------------------------------------------------------------------------------------------------------
# The run


def _load_world(path: str) -> tuple[Any, list[dict[str, Any]], np.ndarray]:
    from .shapes import load_split

    if not path:
        raise ValueError("no training data: set data = '<dir written by nanoseek data synth --task shapes>'")
    return load_split(path, "train")


def build_model(cfg: JanusTrainConfig, tok: Any, world: Any, device: torch.device) -> Janus:
    """The preset around the trained VQ (loaded and frozen), initialised from cfg.seed."""
    vq = load_vq(cfg.vq)
    if vq.grid * vq.config.downsample != world.image_size:
        raise ValueError(f"the VQ encodes {vq.grid * vq.config.downsample} px images, the world's are "
                         f"{world.image_size} px")
    mcfg = model_config(cfg, tok, vq.config, world.image_size)
    torch.manual_seed(cfg.seed)
    model = Janus(mcfg).to(device)
    model.vqmodel.load_state_dict(vq.state_dict())
    model.vqmodel.requires_grad_(False)  # the VQ is frozen (Janus trains the LLM around a fixed tokenizer)
    return model


def train_janus(cfg: JanusTrainConfig, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run (or resume) a mini Janus training run; returns a summary. Writes OUT/metrics.jsonl, OUT/loss.png,
    checkpoints OUT/step_*, and the published model OUT/model."""
    from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from .device import autocast as autocast_factory
    from .device import resolve_device
    from .imagine import load_janus_weights, write_janus
    from .metrics import progress_bar, truncate_jsonl
    from .tokenizer import Tokenizer
    from .train import (
        _FIT_AFTER,
        NonFiniteLoss,
        _autocast_dtype,
        _fit_steps_to_time,
        build_optimizers,
        lr_at,
        set_lr,
    )

    device = resolve_device(cfg.device)
    if not cfg.vq:
        raise ValueError("no VQ: set vq = '<dir written by nanoseek janus train-vq>'")
    world, items, images = _load_world(cfg.data)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = latest_checkpoint(out) if cfg.resume else None
    tok_dir = out / "tokenizer"
    if ckpt is None or not (tok_dir / "tokenizer.json").is_file():
        vocab = cfg.vocab_size or janus_preset(cfg.preset, **cfg.model_overrides).text.vocab_size - len(IMAGE_TOKENS)
        tok = world_tokenizer(items, tok_dir, vocab)
    tok = Tokenizer.load(tok_dir)
    model = build_model(cfg, tok, world, device)
    data = prepare_world(items, images, world, model, tok)
    opts = build_optimizers(model, cfg)  # type: ignore[arg-type]  (TrainConfig's fields, by name)
    start = 0
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opts, load_model=lambda path, m: load_janus_weights(m, path))
        start = state["step"]
        saved = state.get("extra", {}).get("train_config", {})
        if cfg.fit_to_time and saved.get("fit_to_time") is False:  # the run length was already fitted: keep it
            cfg.max_steps, cfg.fit_to_time = saved["max_steps"], False
        truncate_jsonl(out / "metrics.jsonl", start)
    elif (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh curve
    atomic_write_json(out / "janus_train.json", dataclasses.asdict(cfg))
    ac = _autocast_dtype(cfg, device, model.config.text.hidden_size)  # type: ignore[arg-type]
    autocast = autocast_factory(device, ac or torch.float32)
    progress = progress_bar(cfg.progress)
    task = progress.add_task("janus", total=cfg.max_steps, completed=start) if progress else None
    metrics = out / "metrics.jsonl"
    t_start = t_fit = clock()
    fit_at = start + _FIT_AFTER if cfg.fit_to_time and cfg.max_time else None
    status, step = "finished", start
    model.train()
    with progress or nullcontext():
        for step in range(start, cfg.max_steps):
            t0 = clock()
            if step == start + 2:
                t_fit = t0
            if step == fit_at:
                _fit_steps_to_time(cfg, step, (t0 - t_fit) / (_FIT_AFTER - 2), t0 - t_start, True)  # type: ignore
                if progress:
                    progress.update(task, total=cfg.max_steps)
            lr = lr_at(step, cfg)  # type: ignore[arg-type]
            set_lr(opts, lr)
            with autocast():
                losses = step_losses(model, data, cfg, step)
            if not torch.isfinite(losses["loss"]):
                append_jsonl(metrics, {"step": step, "event": "nonfinite_loss", "loss": str(losses["loss"].item())})
                raise NonFiniteLoss(f"loss became {losses['loss'].item()} at step {step}: stopping; the last "
                                    f"checkpoint in {out} is kept. Lower lr (now {lr:.3g}).")
            losses["loss"].backward()
            params = [p for p in model.parameters() if p.grad is not None]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            maxvio = model.language_model.update_router_bias(cfg.bias_update_speed)
            dt = clock() - t0
            rec = {"step": step + 1, "lr": lr, "grad_norm": float(gnorm),
                   **{k: float(v.detach()) for k, v in losses.items()}, "step_time": dt,
                   "maxvio": [round(float(v), 4) for v in maxvio], "elapsed": clock() - t_start}
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                append_jsonl(metrics, rec)
            if progress:
                progress.update(task, completed=step + 1, description=f"janus loss {rec['loss']:.3f} (image "
                                f"{rec.get('t2i', 0):.2f}, answer {rec.get('und', 0):.2f}) lr {lr:.1e}")
            done = step + 1 >= cfg.max_steps
            over = cfg.max_time is not None and clock() - t_start > cfg.max_time
            if done or over or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(out, step + 1, model, opts, extra={"loss": rec["loss"],
                                                                    "train_config": dataclasses.asdict(cfg)},
                                keep_last=cfg.keep_last,
                                save_model=lambda m, d: write_janus(m, d, tokenizer=tok_dir))
            if over:
                status = "time_budget"
                break
            if done:
                break
    final_step = step + 1 if cfg.max_steps > start else start
    published = publish(out, world)
    summary = {"status": status, "step": final_step, "out": str(out), "model": str(published),
               "params": sum(p.numel() for p in model.parameters()),
               "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    atomic_write_json(out / "summary.json", summary)
    try:
        plot_metrics(metrics, out / "loss.png")
    except Exception as e:  # plotting never fails a run
        summary["plot_error"] = str(e)
    return summary


def publish(out: Path, world: Any) -> Path:
    """OUT/model: the newest checkpoint's Janus directory (no optimizer or RNG state) with the world it was trained
    on (world.json: what eval reads) and the run's settings (janus_train.json: the understanding encoder)."""
    import shutil

    from .checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise ValueError(f"{out} has no checkpoint to publish")
    dst = out / "model"
    with atomic_dir(dst) as tmp:
        shutil.copytree(ckpt, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "optimizer.safetensors", "rng.safetensors", "trainer_state.json"))
        atomic_write_json(tmp / "world.json", world.to_dict())
        shutil.copyfile(out / "janus_train.json", tmp / "janus_train.json")
    return dst


def plot_metrics(metrics: str | Path, png: str | Path) -> Path:
    """The three losses (and their sum), lr and MaxVio per MoE layer from a Janus run's metrics JSONL."""
    from .metrics import plot_panels

    recs = [r for r in read_jsonl(metrics) if "event" not in r]
    return plot_panels(recs, png, [("loss", ["loss", "t2i", "und", "text"]), ("learning rate", ["lr"]),
                                   ("expert load MaxVio", ["maxvio"])], smooth=10)


def run_settings(model_dir: str | Path) -> dict[str, Any]:
    """The janus_train.json a published mini Janus carries ({} for any other Janus directory)."""
    f = Path(model_dir) / "janus_train.json"
    return json.loads(f.read_text()) if f.is_file() else {}
