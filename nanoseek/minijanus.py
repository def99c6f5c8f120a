"""Mini Janus on a CPU (docs/mini-janus.md): the VQ tokenizer of the shapes world and the GenEval-style scores.

- `train_vq` (`nanoseek janus train-vq`): transformers' Janus VQ architecture (nanoseek.janus.VQModel, LlamaGen's
  VQ-16 at a small size: 32 px images, 4x downsampling -> 8 x 8 tokens, 512 codes of 8 dims) trained on the
  world's training images with a reconstruction loss, VQ-VAE's codebook and commitment losses and the
  straight-through estimator (VQModel.forward); codebook usage (perplexity, live codes) is logged every step and
  codes unused for `dead_after` steps restart from encoder outputs of the current batch. The loop follows
  nanoseek.train: lr schedule and optimizer from there, a JSONL line per step, atomic pickle-free checkpoints
  (nanoseek.checkpoint, the model in transformers' JanusVQVAE layout), exact resume, a rich progress bar, a plot.
- `round_trip` / the VQ ceiling: the verifier's score on ground-truth images after encode -> decode, i.e. the best a
  generator that emits this tokenizer's codes can score.
- `run_score` (`nanoseek janus score`): generated images against their prompts, beside the verifier's own accuracy
  on freshly rendered ground truth and (with a VQ) the ceiling.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import shapes
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .device import resolve_device
from .files import append_jsonl, atomic_path, atomic_write_json, check_resume, read_jsonl
from .janus import VQConfig, VQModel
from .metrics import plot_panels, progress_bar, truncate_jsonl
from .stats import derive_seed
from .train import build_optimizers, check_keys, lr_at, parse_overrides, set_lr


@dataclass
class VQTrainConfig:
    """A VQ tokenizer run. The optimisation fields carry TrainConfig's names: nanoseek.train's lr_at and
    build_optimizers read them."""

    data: str = ""  # a directory written by `nanoseek data synth --task shapes --split train`
    out: str = "runs/vq"
    # the VQ model (janus.VQConfig): GroupNorm(32) needs channel counts that are multiples of 32
    codebook_size: int = 512
    embed_dim: int = 8  # code width, as VQ-16
    base_channels: int = 32
    latent_channels: int = 64
    channel_multiplier: tuple[int, ...] = (1, 1, 2)  # len - 1 = 2 downsamplings: 4x, 32 px -> 8 x 8 tokens
    num_res_blocks: int = 1
    # losses: reconstruction + codebook + beta * commitment (VQ-VAE eq. 3; beta 0.25 as VQ-VAE and LlamaGen)
    beta: float = 0.25
    # squared error on object pixels (not the white background) counts 1 + this: objects cover ~15% of an image,
    # and their edges and colours are what the verifier reads (measured: with 0, the ceiling after 400 steps was
    # 59% instead of 73%; docs/mini-janus.md)
    foreground_weight: float = 4.0
    dead_after: int = 20  # steps without being chosen before a code counts as dead
    restart_every: int = 10  # look for dead codes every this many steps
    # optimisation
    optimizer: str = "adamw"
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0  # codes live on the unit sphere: decay would only shrink what normalisation undoes
    beta1: float = 0.9
    beta2: float = 0.99
    schedule: str = "cosine"
    warmup_steps: int = 10
    decay_ratio: float = 0.2
    max_steps: int = 800
    batch_size: int = 16  # measured: 800 x 16 beat 400 x 32 (same images, same time) by 6 points of ceiling
    grad_clip: float = 1.0
    # run
    device: str | None = None
    seed: int = 0
    save_every: int = 100
    keep_last: int = 2
    resume: bool = False
    progress: bool = True
    ceiling: bool = True  # at the end: the verifier's score on VQ round trips of the test prompts' ground truth
    ceiling_per_category: int = shapes.VALIDATION_PER_CATEGORY

    def __post_init__(self) -> None:
        self.channel_multiplier = tuple(self.channel_multiplier)
        errors = []
        for name in ("codebook_size", "embed_dim", "max_steps", "batch_size", "num_res_blocks", "dead_after",
                     "restart_every"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if any(self.base_channels * m % 32 for m in self.channel_multiplier) or self.latent_channels % 32:
            errors.append("base_channels x each channel_multiplier and latent_channels must be multiples of 32 "
                          "(the VQ's GroupNorm has 32 groups)")
        if len(self.channel_multiplier) < 1:
            errors.append("channel_multiplier needs at least one level")
        if self.schedule not in ("cosine", "wsd", "constant") or self.optimizer != "adamw":
            errors.append("schedule must be cosine, wsd or constant and optimizer adamw")
        if self.lr <= 0 or self.beta < 0 or self.foreground_weight < 0:
            errors.append("need lr > 0, beta >= 0 and foreground_weight >= 0")
        if errors:
            raise ValueError("invalid VQ train config: " + "; ".join(errors))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_multiplier) - 1)

    def vq_config(self) -> VQConfig:
        return VQConfig(embed_dim=self.embed_dim, num_embeddings=self.codebook_size,
                        latent_channels=self.latent_channels, base_channels=self.base_channels,
                        channel_multiplier=self.channel_multiplier, num_res_blocks=self.num_res_blocks)


def synth_world(n: int, split: str, seed: int, out: str | Path, world: list[str] | None = None,
                png: bool = False) -> Path:
    """`nanoseek data synth --task shapes`: the world from `key=value` settings (TOML values), then shapes.synth."""
    return shapes.synth(n, split, seed, out, shapes.ShapesConfig.from_dict(parse_overrides(world)), png=png)


def vq_train_config(overrides: list[str] | None = None, **kwargs: Any) -> VQTrainConfig:
    """Keyword arguments (None: unset), then `key=value` strings (TOML values), onto VQTrainConfig."""
    values = {k: v for k, v in kwargs.items() if v is not None}
    values.update(parse_overrides(overrides))
    check_keys(values, {f.name for f in dataclasses.fields(VQTrainConfig)}, "VQ train config key")
    return VQTrainConfig(**values)


# ----------------------------------------------------------------------------------------------------------------
# Data and pixels


class ImageBatches:
    """Endless batches of a uint8 (N, S, S, 3) array as (B, 3, S, S) floats in [-1, 1]: a fresh permutation per
    epoch from (seed, epoch); the position is the whole state (resume)."""

    def __init__(self, images: np.ndarray, batch_size: int, seed: int) -> None:
        if len(images) < batch_size:
            raise ValueError(f"{len(images)} training images are fewer than one batch ({batch_size})")
        self.images, self.batch_size, self.seed = images, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng(derive_seed("vq-batches", self.seed, self.epoch)).permutation(len(self.images))

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.images):
            self.epoch, self.pos = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return to_pixels(self.images[np.sort(idx)])

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._permutation()


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, S, S, 3) -> float (N, 3, S, S) in [-1, 1]: what imagine.preprocess gives for a square image of
    the model's size (rescale 1/255, mean 0.5, std 0.5)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_images(pixels: torch.Tensor) -> np.ndarray:
    """Decoded pixels (N, 3, S, S) -> uint8 (N, S, S, 3), as imagine.to_pil: un-normalise, clip, truncate."""
    return np.stack([np.asarray(im) for im in _to_pil(pixels)])


def _to_pil(pixels: torch.Tensor) -> list[Any]:
    from .imagine import to_pil

    return to_pil(pixels)


@torch.no_grad()
def round_trip(vq: VQModel, images: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """Ground-truth images through the tokenizer: encode to token ids, decode, back to uint8 (N, S, S, 3)."""
    param = next(vq.parameters())
    out = []
    for i in range(0, len(images), batch_size):
        x = to_pixels(images[i:i + batch_size]).to(param.device, param.dtype)
        out.append(to_images(vq.decode(vq.encode(x))))
    return np.concatenate(out)


def vq_ceiling(vq: VQModel, config: shapes.ShapesConfig, per_category: int = shapes.VALIDATION_PER_CATEGORY,
               seed: int = 0) -> dict[str, Any]:
    """The verifier on VQ round trips of freshly rendered ground truth of the test prompts: the score a perfect
    generator of this tokenizer's codes would get."""
    S = config.image_size
    if vq.config.downsample * vq.grid != S:
        raise ValueError(f"the VQ model encodes {vq.config.downsample * vq.grid} px images, the world's are {S} px")
    was_training = vq.training
    vq.eval()
    try:
        return shapes.validate(config, per_category, seed, transform=lambda ims: round_trip(vq, ims))
    finally:
        vq.train(was_training)


def load_vq_run(path: str | Path, device: str | torch.device | None = None) -> VQModel:
    """A VQ directory, or a train-vq run directory (its latest checkpoint)."""
    from .imagine import load_vq

    p = Path(path)
    if (p / "latest").exists():
        ckpt = latest_checkpoint(p)
        if ckpt is None:
            raise ValueError(f"{p}/latest points to a missing or incomplete checkpoint")
        p = ckpt
    if not (p / "config.json").is_file():
        raise ValueError(f"{path} is neither a VQ directory nor a train-vq run directory (no config.json, no "
                         "latest)")
    return load_vq(p, device)


# ----------------------------------------------------------------------------------------------------------------
# Training


def vq_losses(vq: VQModel, x: torch.Tensor, cfg: VQTrainConfig) -> dict[str, torch.Tensor]:
    """One batch: reconstruction (squared error, object pixels weighted 1 + foreground_weight) + codebook loss
    + beta x commitment loss; also the token ids and the latents (for usage and restarts)."""
    out = vq(x)
    fg = (x.min(1).values < 0.9).float()  # not background: some channel below ~242 of 255 (white is 1.0)
    rec = (((out["recon"] - x) ** 2).mean(1) * (1 + cfg.foreground_weight * fg)).mean()
    loss = rec + out["codebook_loss"] + cfg.beta * out["commitment_loss"]
    return {**out, "loss": loss, "rec_loss": rec}


def codebook_usage(ids: torch.Tensor, K: int) -> dict[str, float]:
    """Perplexity of the batch's code histogram (exp of its entropy: K when every code is equally used, 1 when
    one code takes everything) and the fraction of codes used in the batch."""
    counts = torch.bincount(ids.flatten(), minlength=K).float()
    p = counts[counts > 0] / counts.sum()
    return {"perplexity": float(torch.exp(-(p * p.log()).sum())), "codes_used": float((counts > 0).float().mean())}


@torch.no_grad()
def restart_dead_codes(vq: VQModel, z: torch.Tensor, last_used: torch.Tensor, step: int, dead_after: int,
                       seed: int, optimizers: list[torch.optim.Optimizer]) -> int:
    """Codes not chosen in the last `dead_after` steps move onto distinct random latents of the current batch
    (as Jukebox, Dhariwal et al. 2020 section 2.1, and SoundStream restart them), and their optimizer moments are
    cleared so the old momentum does not drag them back. The draw depends on (seed, step) only, so a resumed run
    restarts the same codes. Returns the number restarted."""
    dead = (step - last_used) >= dead_after
    n = int(dead.sum())
    if n == 0:
        return 0
    g = torch.Generator().manual_seed(derive_seed("vq-restart", seed, step))
    pick = torch.randperm(len(z), generator=g)[:n] if n <= len(z) else torch.randint(len(z), (n,), generator=g)
    emb = vq.quantize.embedding.weight
    emb[dead.to(emb.device)] = z[pick.to(z.device)].to(emb.dtype)
    last_used[dead] = step
    for opt in optimizers:
        for v in opt.state.get(emb, {}).values():
            if isinstance(v, torch.Tensor) and v.shape == emb.shape:
                v[dead.to(v.device)] = 0
    return n


def _load_vq_into(path: Path, vq: VQModel) -> None:
    from .imagine import load_vq

    saved = load_vq(path, device="cpu")
    if (saved.config, saved.grid) != (vq.config, vq.grid):
        raise ValueError(f"checkpoint {path} holds another VQ config ({saved.config}) than this run "
                         f"({vq.config}): use another --out or the same settings")
    vq.load_state_dict(saved.state_dict())


_RESUME_KEYS = ("data", "codebook_size", "embed_dim", "base_channels", "latent_channels", "channel_multiplier",
                "num_res_blocks", "batch_size", "seed", "optimizer")


def train_vq(cfg: VQTrainConfig, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Train (or resume) a VQ tokenizer on a shapes world's training images; returns the summary (also in
    OUT/summary.json). Everything is checked before the first step."""
    from .imagine import write_vq

    if not cfg.data:
        raise ValueError("no training data: pass --data DIR (written by `nanoseek data synth --task shapes --split "
                         "train --out DIR`)")
    world, _, images = shapes.load_split(cfg.data, "train")
    S = world.image_size
    if S % cfg.downsample:
        raise ValueError(f"image_size {S} is not a multiple of the VQ's downsampling ({cfg.downsample}x)")
    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.resume:
        check_resume(out / "train_config.json", dataclasses.asdict(cfg), _RESUME_KEYS, what="a VQ run",
                     hint="resume with the same settings or choose another --out")
    torch.manual_seed(cfg.seed)
    vq = VQModel(cfg.vq_config(), S // cfg.downsample).to(device)
    opts = build_optimizers(vq, cfg)  # type: ignore[arg-type]  # TrainConfig's optimisation fields
    batches = ImageBatches(images, cfg.batch_size, cfg.seed)
    K = cfg.codebook_size
    last_used = torch.zeros(K, dtype=torch.long)  # the step each code was last chosen at (0: start)
    metrics = out / "metrics.jsonl"
    start, spent = 0, 0.0
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt, vq, opts, load_model=_load_vq_into)
        start, extra = state["step"], state["extra"]
        batches.load_state_dict(state["data"])
        last_used = torch.tensor(extra["last_used"], dtype=torch.long)
        spent = extra.get("train_seconds", 0.0)
        truncate_jsonl(metrics, start)
    elif metrics.exists():
        metrics.unlink()  # a fresh run starts a fresh curve
    atomic_write_json(out / "train_config.json", dataclasses.asdict(cfg))

    progress = progress_bar(cfg.progress)
    task = progress.add_task("train-vq", total=cfg.max_steps, completed=start) if progress else None
    rec: dict[str, Any] = {}
    vq.train()
    with progress or nullcontext():
        for step in range(start, cfg.max_steps):
            t0 = clock()
            lr = lr_at(step, cfg)  # type: ignore[arg-type]
            set_lr(opts, lr)
            x = next(batches).to(device)
            losses = vq_losses(vq, x, cfg)
            if not torch.isfinite(losses["loss"]):
                raise RuntimeError(f"VQ loss became {losses['loss'].item()} at step {step}: lower lr (now {lr:.3g})")
            losses["loss"].backward()
            gnorm = torch.nn.utils.clip_grad_norm_(vq.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else
                                                   float("inf"))
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            ids = losses["ids"].flatten().cpu()
            last_used[ids] = step + 1
            restarted = 0
            if (step + 1) % cfg.restart_every == 0:
                restarted = restart_dead_codes(vq, losses["z"], last_used, step + 1, cfg.dead_after, cfg.seed, opts)
            dt = clock() - t0
            spent += dt
            rec = {"step": step + 1, "lr": lr, "loss": float(losses["loss"].detach()),
                   "rec_loss": float(losses["rec_loss"].detach()),
                   "codebook_loss": float(losses["codebook_loss"].detach()),
                   "commitment_loss": float(losses["commitment_loss"].detach()), "grad_norm": float(gnorm),
                   **codebook_usage(ids, K), "codes_alive": float(((step + 1 - last_used) < cfg.dead_after)
                                                                  .float().mean()),
                   "restarted": restarted, "step_time": dt, "train_seconds": spent}
            append_jsonl(metrics, rec)
            if progress:
                progress.update(task, completed=step + 1, description=f"train-vq rec {rec['rec_loss']:.4f} "
                                f"ppl {rec['perplexity']:.0f}")
            done = step + 1 == cfg.max_steps
            if done or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                save_checkpoint(out, step + 1, vq, opts, data=batches.state_dict(), keep_last=cfg.keep_last,
                                save_model=write_vq, extra={"last_used": last_used.tolist(), "train_seconds": spent,
                                                            "rec_loss": rec["rec_loss"]})
    vq.eval()
    summary: dict[str, Any] = {"out": str(out), "model": str(latest_checkpoint(out)), "steps": cfg.max_steps,
                               "train_seconds": round(spent, 2), "device": str(device),
                               "final": {k: rec[k] for k in ("rec_loss", "codebook_loss", "commitment_loss",
                                                             "perplexity", "codes_used", "codes_alive")} if rec
                               else {}}
    if cfg.ceiling:
        summary["verifier"] = shapes.validate(world, cfg.ceiling_per_category)
        summary["vq_ceiling"] = vq_ceiling(vq, world, cfg.ceiling_per_category)
        _write_round_trip_grid(vq, world, out / "round_trip.png")
    atomic_write_json(out / "summary.json", summary)
    try:
        plot_panels(read_jsonl(metrics), out / "loss.png",
                    [("losses", ["rec_loss", "codebook_loss", "commitment_loss"]), ("codebook perplexity",
                                                                                     ["perplexity"]),
                     ("codes", ["codes_used", "codes_alive"]), ("learning rate", ["lr"])])
    except Exception as e:  # plotting never fails a run
        summary["plot_error"] = str(e)
    return summary


def _write_round_trip_grid(vq: VQModel, world: shapes.ShapesConfig, png: Path, n: int = 16) -> None:
    """Ground truth of the first n test prompts (top rows) and their round trips (bottom rows), 4x."""
    items = shapes.make_items(world, "test", n)
    gt = shapes.fresh_ground_truth(items, world)
    with atomic_path(png) as tmp:
        shapes.grid(np.concatenate([gt, round_trip(vq, gt)]), scale=4, cols=8).save(tmp, format="PNG")


# ----------------------------------------------------------------------------------------------------------------
# `nanoseek janus score`


def run_score(images: str | Path | None = None, *, world: str | Path | None = None, vq: str | Path | None = None,
              out: str | Path | None = None, per_category: int = shapes.VALIDATION_PER_CATEGORY,
              device: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Score generated images (a JSONL of rows with category, requirement and a PNG path; see shapes.read_generated)
    and always the verifier itself on freshly rendered ground truth of 6 x per_category test prompts; with `vq`,
    also the VQ round-trip ceiling. Inputs (image sizes, the VQ) are all read before anything is scored. The
    report is written to `out` (JSON) when given."""
    if per_category < 1:
        raise ValueError(f"--per-category must be >= 1, got {per_category}")
    config = shapes.load_config(world)
    generated = shapes.read_generated(images, config) if images is not None else None
    vq_model = load_vq_run(vq, device) if vq is not None else None
    report: dict[str, Any] = {"world": config.to_dict()}
    if generated is not None:
        rows, ims = generated
        bar = progress_bar(progress)
        with bar or nullcontext():
            task = bar.add_task("score", total=len(ims)) if bar else None
            summary, scored = shapes.score_images(rows, ims, config,
                                                  (lambda i: bar.update(task, completed=i)) if bar else None)
        report["generated"] = {**summary, "source": str(images),
                               "images": [{k: r[k] for k in ("id", "category", "prompt", "correct", "reason")}
                                          for r in scored]}
    report["verifier"] = shapes.validate(config, per_category)
    if vq_model is not None:
        report["vq_ceiling"] = {**vq_ceiling(vq_model, config, per_category), "vq": str(vq)}
    if out is not None:
        atomic_write_json(out, report)
    return report


def _cell(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "-"
    lo, hi = entry["ci"]
    return f"{100 * entry['accuracy']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({entry['correct']}/{entry['n']})"


def print_score(report: dict[str, Any], console: Any) -> None:
    """Per-category table (generated images, the verifier on ground truth, the VQ ceiling) with Wilson 95% CIs,
    then the verifier's and the ceiling's line."""
    from rich.table import Table

    cols = [(k, t) for k, t in (("generated", "generated"), ("verifier", "verifier on ground truth"),
                                ("vq_ceiling", "VQ round-trip ceiling")) if k in report]
    table = Table(title="GenEval-style scores (shapes world), Wilson 95% CIs")
    table.add_column("category")
    for _, title in cols:
        table.add_column(title)
    for cat in shapes.CATEGORIES:
        table.add_row(cat, *[_cell(report[k]["categories"].get(cat)) for k, _ in cols])
    table.add_row("overall", *[_cell(report[k]["overall"]) for k, _ in cols])
    console.print(table)
    v = report["verifier"]["overall"]
    console.print(f"verifier on freshly rendered ground truth of {v['n']} test prompts: {_cell(v)}"
                  + ("" if v["accuracy"] >= 0.98 else "  [bold red]below 98%: scores measure the checker[/]"))
    if "vq_ceiling" in report:
        console.print(f"VQ round-trip ceiling ({report['vq_ceiling']['vq']}): {_cell(report['vq_ceiling']['overall'])}")


def print_train_summary(summary: dict[str, Any], console: Any) -> None:
    f = summary.get("final", {})
    console.print(f"VQ trained {summary['steps']} steps in {summary['train_seconds']:.1f} s on {summary['device']}: "
                  f"reconstruction loss {f.get('rec_loss', float('nan')):.4f}, codebook perplexity "
                  f"{f.get('perplexity', float('nan')):.0f}, {100 * f.get('codes_alive', 0):.0f}% of codes alive")
    if "vq_ceiling" in summary:
        console.print(f"verifier on ground truth: {_cell(summary['verifier']['overall'])}; VQ round-trip ceiling: "
                      f"{_cell(summary['vq_ceiling']['overall'])}")
    console.print(f"model, metrics.jsonl, loss.png, round_trip.png and summary.json in [bold]{summary['out']}[/]")
