"""Pretraining and SFT from one loop: `nanoseek train --config FILE.toml | --preset NAME [key=value ...]`.

The loop is a visible `for step in ...` inside `train()`. Parallelism (torchrun: DDP by default, FSDP2 with
`fsdp = true`) wraps the model here and never inside model.py. Per step: micro-batches (gradient accumulation)
-> clip -> optimizer -> schedule -> aux-loss-free router-bias update (V3 eq. 16, loads all-reduced over ranks)
-> one JSONL metrics line. Checkpoints use nanoseek.checkpoint (atomic, pickle-free, exact resume).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import time
import tomllib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import accounting
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .device import autocast as autocast_factory
from .device import dtype_name, resolve_device, resolve_dtype, synchronize
from .files import append_jsonl, read_jsonl
from .metrics import plot_panels, progress_bar, truncate_jsonl
from .model import ModelConfig, Transformer, build
from .weights import load as load_model


@dataclass
class TrainConfig:
    """Every knob of a run. TOML files and `key=value` overrides map onto these fields."""

    # model: a preset (with optional overrides) or an existing model directory to continue from (SFT)
    preset: str = "small"
    model: str | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    # data: directories written by `nanoseek data prepare` (SFT when the manifest carries loss masks)
    data: str = ""
    val_data: str | None = None
    tokenizer: str | None = None  # copied into saved model directories (default: the data manifest's tokenizer)
    seq_len: int = 256
    batch_size: int = 8  # global sequences per micro-step, split over ranks
    grad_accum: int = 1
    # optimisation
    optimizer: str = "adamw"  # adamw | muon (Muon for 2-D matrices, AdamW for the rest)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 20
    decay_ratio: float = 0.2  # wsd: the last fraction of steps decays
    max_steps: int = 200
    grad_clip: float = 1.0
    # DeepSeek-V3 specifics
    mtp_lambda: float = 0.3  # V3: 0.3 for the first 10T tokens, then 0.1
    balance_alpha: float | None = None  # None: the model config's aux_loss_alpha
    bias_update_speed: float = 1e-3  # gamma of V3 eq. 16; 0 freezes the router bias
    # speed
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, and on AMX CPUs from hidden 512: measured) | fp32 | bf16
    device: str | None = None  # None: CUDA if available (cuda:LOCAL_RANK under torchrun), else CPU (nanoseek.device)
    compile: bool = False
    fsdp: bool = False
    # run
    out: str = "runs/train"
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: only at the end
    eval_batches: int = 4
    save_every: int = 100
    keep_last: int = 2
    max_time: float | None = None  # seconds; stop (and save) when exceeded
    # with max_time: after a few timed steps, shrink max_steps to what fits in the remaining time, so the lr
    # schedule (cosine/WSD decay) completes inside the budget instead of being cut off at peak lr
    fit_to_time: bool = False
    # with fit_to_time: re-fit at every later step from the median of the last few step times (only ever
    # shortening), so a machine that slows down mid-run still ends the decay before max_time
    refit: bool = False
    resume: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        errors = []
        if self.optimizer not in ("adamw", "muon"):
            errors.append(f"optimizer {self.optimizer!r} not in (adamw, muon)")
        if self.schedule not in ("cosine", "wsd", "constant"):
            errors.append(f"schedule {self.schedule!r} not in (cosine, wsd, constant)")
        try:
            dtype_name(self.dtype, training=True)
        except ValueError as e:
            errors.append(str(e))
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            errors.append("need lr > 0 and 0 <= min_lr_ratio <= 1")
        if errors:
            raise ValueError("invalid train config: " + "; ".join(errors))

    @classmethod
    def from_sources(cls, config_file: str | None = None, overrides: list[str] | None = None,
                     **kwargs: Any) -> TrainConfig:
        """TOML file, then keyword arguments, then `key=value` strings (TOML values; bare words are strings)."""
        values: dict[str, Any] = {}
        if config_file:
            p = Path(config_file)
            if not p.exists():
                raise FileNotFoundError(f"config file {p} does not exist")
            try:
                values.update(_flatten_toml(tomllib.loads(p.read_text())))
            except tomllib.TOMLDecodeError as e:
                raise ValueError(f"{p} is not valid TOML: {e}") from e
        values.update({k: v for k, v in kwargs.items() if v is not None})
        values.update(parse_overrides(overrides))
        names = {f.name for f in dataclasses.fields(cls)}
        model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
        for k in list(values):
            if k.startswith("model."):  # model.hidden_size=... -> model_overrides
                sub = k[6:]
                if sub not in model_fields:
                    raise ValueError(_unknown(sub, model_fields, "model config key"))
                values.setdefault("model_overrides", {})[sub] = values.pop(k)
            elif k not in names:
                raise ValueError(_unknown(k, names, "train config key"))
        return cls(**values)


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings -> dict; values parse as TOML (numbers, booleans, lists), bare words stay strings."""
    values: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = item.split("=", 1)
        values[k.strip()] = _parse_value(v.strip())
    return values


def check_keys(keys: Any, names: set[str], what: str) -> None:
    """Reject the first unknown key, suggesting the closest valid name."""
    for k in keys:
        if k not in names:
            raise ValueError(_unknown(k, names, what))


def _unknown(key: str, names: set[str], what: str) -> str:
    close = difflib.get_close_matches(key, names, 1)
    return f"unknown {what} {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


def _flatten_toml(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k == "model" and isinstance(v, dict):  # a [model] table holds model config overrides
            out.update({f"model.{kk}": vv for kk, vv in v.items()})
        elif isinstance(v, dict) and k != "model_overrides":
            out.update(v)  # other tables ([data], [optim], ...) are just grouping
        else:
            out[k] = v
    return out


def _parse_value(v: str) -> Any:
    try:
        return tomllib.loads(f"x = {v}")["x"]
    except tomllib.TOMLDecodeError:
        return v


# ------------------------------------------------------------------------------------------------------------
# schedule, optimizer, distributed helpers


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine to min_lr, WSD (constant, then linear decay over the last decay_ratio), or flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    lo = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_ratio))
        if step < decay_start:
            return cfg.lr
        frac = (step - decay_start) / max(1, cfg.max_steps - decay_start)
        return cfg.lr - (cfg.lr - lo) * min(frac, 1.0)
    frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * min(frac, 1.0)))


def set_lr(optimizers: Sequence[torch.optim.Optimizer], lr: float) -> None:
    """Set the learning rate of every parameter group (the schedules here are computed, not torch schedulers)."""
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = lr


def build_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW with decay on matrices only; with `muon`, torch's Muon takes the 2-D hidden matrices (not the
    embedding/head, per Muon's recipe) and AdamW the rest (norms, router bias-free gates, stacked 3-D experts)."""
    decay, no_decay, muon = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if cfg.optimizer == "muon" and p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one vectorised pass per tensor instead of foreach's ~10 (4x faster on a CPU: 0.17 vs 0.66 s for the
    # 136M parameters of benchmarks/train_step.py's `wide`, where a step's tokens are few next to the parameters)
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                                           fused=True)]
    if muon:
        opts.append(torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     adjust_lr_fn="match_rms_adamw"))
    return opts


def _dist_info(device_name: str | None = None) -> tuple[int, int, torch.device]:
    """(rank, world size, this process's device). The device comes first: it picks the process-group backend
    (NCCL for CUDA, gloo otherwise), and a bare "cuda" becomes cuda:LOCAL_RANK (one GPU per torchrun process)."""
    device = resolve_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(device.type, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return rank, world, device


def _all_mean(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


class _LossModule(nn.Module):
    """forward() = model.loss(), so DDP/FSDP hooks (which run around forward) see the whole training step."""

    def __init__(self, model: Transformer, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor,
                document_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.model.loss(input_ids, targets, document_ids=document_ids, mtp_lambda=self.cfg.mtp_lambda,
                               balance_alpha=self.cfg.balance_alpha)


def _autocast_dtype(cfg: TrainConfig, device: torch.device, hidden_size: int) -> torch.dtype | None:
    """The autocast dtype of a run, None for plain fp32. The rules (bf16 on CUDA; on an AMX CPU from hidden 512,
    measured) live in nanoseek.device.resolve_dtype."""
    dt = resolve_dtype(cfg.dtype, device, training=True, amx_hidden_size=hidden_size)
    return None if dt == torch.float32 else dt


_PEAK_CACHE: dict[str, float] = {}


def measured_matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a 2048^3 matmul on this device in this dtype: the denominator of nanoseek's CPU MFU."""
    key = f"{device}-{dtype}"
    if key not in _PEAK_CACHE:
        n = 2048
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        synchronize(device)  # the warm-up matmul must not run into the timed loop
        reps, t0 = 0, time.perf_counter()
        while reps < 3 or time.perf_counter() - t0 < 0.3:
            a @ b
            reps += 1
        synchronize(device)  # GPU kernels run asynchronously: time them finished
        _PEAK_CACHE[key] = 2 * n**3 * reps / (time.perf_counter() - t0)
    return _PEAK_CACHE[key]


# ------------------------------------------------------------------------------------------------------------
# the run


def _make_model(cfg: TrainConfig, device: torch.device) -> Transformer:
    if device.type == "meta":  # a shape-only model would fail later, somewhere obscure
        raise ValueError("cannot train on the meta device: it holds shapes, not weights (use --device cpu or cuda)")
    if cfg.model:
        model = load_model(cfg.model, device=device, dtype=torch.float32)
        if cfg.model_overrides:
            raise ValueError("model overrides apply to presets only; the model directory fixes the architecture")
        return model
    mcfg = ModelConfig.from_preset(cfg.preset, **cfg.model_overrides)
    return build(mcfg, device=device)


def _open_data(cfg: TrainConfig, rank: int, world: int, model_cfg: ModelConfig, split: str = "train"):
    from .data import PackedBatches, TokenDataset

    path = cfg.data if split == "train" else cfg.val_data
    if not path:
        raise ValueError("no training data: set data = '<dir written by nanoseek data prepare>'")
    ds = TokenDataset(path, vocab_size=model_cfg.vocab_size)  # raises if the tokenizer's vocab does not fit
    if cfg.seq_len > model_cfg.max_position_embeddings:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's max_position_embeddings "
                         f"{model_cfg.max_position_embeddings}")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world})")
    return PackedBatches(ds, cfg.batch_size // world, cfg.seq_len, rank=rank, world_size=world,
                         seed=cfg.seed if split == "train" else cfg.seed + 1)


def _save(out: Path, step: int, model: Transformer, opts: list, cfg: TrainConfig, batches, rank: int,
          extra: dict[str, Any]) -> None:
    """Rank 0 writes the checkpoint; under FSDP every rank first joins the gather of the full state."""
    if cfg.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_sd, optim_sd = get_state_dict(model, opts, options=StateDictOptions(full_state_dict=True,
                                                                                  cpu_offload=True))
        if rank == 0:
            shadow = build(model.config)
            shadow.load_state_dict(model_sd, strict=False)  # non-persistent buffers are recomputed
            save_checkpoint(out, step, shadow, optimizer_state=optim_sd, data=batches.state_dict(), extra=extra,
                            keep_last=cfg.keep_last, tokenizer=cfg.tokenizer)
    elif rank == 0:
        save_checkpoint(out, step, model, opts, data=batches.state_dict(), extra=extra, keep_last=cfg.keep_last,
                        tokenizer=cfg.tokenizer)
    if dist.is_initialized():
        dist.barrier()


_FIT_AFTER = 10  # fit_to_time fixes the run length after this many steps, timing all but the first two
_RECENT = 8  # refit: the per-step estimate is the median of this many recent step times (a save is one outlier)


def _fit_steps_to_time(cfg: TrainConfig, step: int, per_step: float, elapsed: float, master: bool) -> None:
    """Shrink cfg.max_steps so the run ends within max_time at the measured speed. The new length is saved with
    every checkpoint (train_config), so a resumed run keeps it."""
    assert cfg.max_time is not None
    fits = step + int(0.97 * max(0.0, cfg.max_time - elapsed) / per_step)  # a small margin for slow steps
    if fits < cfg.max_steps:
        if master:
            print(f"fit_to_time: {per_step:.2f} s/step, max_steps {cfg.max_steps} -> {fits} to end within "
                  f"max_time {cfg.max_time:.0f} s (the lr schedule completes)")
        cfg.max_steps = max(fits, step + 1)
        if not cfg.refit:
            cfg.fit_to_time = False  # fixed from now on, also for a resumed run


class NonFiniteLoss(RuntimeError):
    pass


def train(cfg: TrainConfig, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run (or resume) a training job; returns a summary dict. Works alone or under torchrun. `clock` times the
    steps, `max_time` and `fit_to_time` (tests inject a deterministic one)."""
    rank, world, device = _dist_info(cfg.device)
    out = Path(cfg.out)
    master = rank == 0
    if master:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = _make_model(cfg, device)
    if cfg.tokenizer is None:
        cfg.tokenizer = _manifest_tokenizer(cfg.data)
    batches = _open_data(cfg, rank, world, model.config)
    start_step, optimizer_state = 0, None
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt, model)  # weights + RNG now; optimizer state once the model is wrapped
        start_step, optimizer_state = state["step"], state.get("optimizer_state")
        batches.load_state_dict(state["data"])
        saved = state.get("extra", {}).get("train_config", {})
        if cfg.fit_to_time and saved.get("fit_to_time") is False:  # the run length was already fitted: keep it
            cfg.max_steps, cfg.fit_to_time = saved["max_steps"], False
        if cfg.refit and saved.get("refit") and saved.get("max_steps", cfg.max_steps) < cfg.max_steps:
            cfg.max_steps = saved["max_steps"]  # refitting only shortens: the interrupted run's length is the cap
        if master:
            truncate_jsonl(out / "metrics.jsonl", start_step)
    elif master and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()  # a fresh run starts a fresh curve
    if master:
        (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")

    runner: nn.Module = _LossModule(model, cfg)
    if cfg.fsdp:
        if not dist.is_initialized():
            raise ValueError("fsdp = true needs torchrun (e.g. torchrun --nproc_per_node 2 -m nanoseek.cli train ...)")
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:  # one FSDP unit per block; embeddings, head and MTP stay in the root unit
            fully_shard(layer)
        fully_shard(runner)
    elif world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # the per-expert loop skips experts without tokens, and mtp_lambda=0 leaves MTP unused
        unused = any(not getattr(m, "use_grouped_mm", True) for m in model.modules()) or \
            (cfg.mtp_lambda == 0 and len(model.mtp) > 0)
        # broadcast_buffers=False: each rank counts its own expert loads (summed in update_router_bias)
        runner = DDP(runner, broadcast_buffers=False, find_unused_parameters=unused)
    opts = build_optimizers(model, cfg)  # after wrapping: FSDP replaces parameters by sharded DTensors
    if optimizer_state is not None:
        if cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            plain = {"state": optimizer_state["state"], "param_groups": [
                {k: v for k, v in g.items() if k != "optimizer"} for g in optimizer_state["param_groups"]]}
            set_optimizer_state_dict(model, opts, plain, options=StateDictOptions(full_state_dict=True))
        else:
            from .checkpoint import load_named_optimizer_state

            load_named_optimizer_state(model, opts, optimizer_state)
    if cfg.compile:
        runner = torch.compile(runner)

    ac_dtype = _autocast_dtype(cfg, device, model.config.hidden_size)
    autocast = autocast_factory(device, ac_dtype or torch.float32)
    if master and cfg.progress:
        print(f"train on {device}: {'bf16 autocast' if ac_dtype else 'fp32'} (dtype = {cfg.dtype!r})"
              f"{', compiled' if cfg.compile else ''}")
    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    flops_per_token = accounting.flops_per_token(model.config, cfg.seq_len, training=True,
                                                 mtp=cfg.mtp_lambda > 0)
    peak = measured_matmul_peak(device, ac_dtype or torch.float32) * world
    progress = progress_bar(master and cfg.progress)
    task = progress.add_task("train", total=cfg.max_steps, completed=start_step) if progress else None
    metrics_file = out / "metrics.jsonl"
    t_start = clock()
    fit_at = start_step + _FIT_AFTER if cfg.fit_to_time and cfg.max_time else None
    t_fit = t_start  # when the timed steps began (after the first two, which pay for warm-up)
    starts: list[float] = []  # refit: when each step began (intervals include logging and saving: all of a step)
    last_good = start_step
    step = start_step
    summary: dict[str, Any] = {"status": "finished"}
    with progress or nullcontext():
        for step in range(start_step, cfg.max_steps):
            t0 = clock()
            if step == start_step + 2:
                t_fit = t0
            if step == fit_at:
                _fit_steps_to_time(cfg, step, (t0 - t_fit) / (_FIT_AFTER - 2), t0 - t_start, master)
                if progress:
                    progress.update(task, total=cfg.max_steps)
            starts.append(t0)
            if cfg.refit and cfg.max_time and fit_at is not None and step > fit_at:
                recent = sorted(b - a for a, b in zip(starts[-_RECENT - 1:-1], starts[-_RECENT:]))
                before = cfg.max_steps
                cfg.max_steps = min(cfg.max_steps, max(step + 1, step + int(
                    0.97 * max(0.0, cfg.max_time - (t0 - t_start)) / recent[len(recent) // 2])))
                if progress and cfg.max_steps != before:
                    progress.update(task, total=cfg.max_steps)
            lr = lr_at(step, cfg)
            set_lr(opts, lr)
            sums: dict[str, float] = {}
            for micro in range(cfg.grad_accum):
                batch = next(batches)
                sync = nullcontext() if (world == 1 or cfg.fsdp or micro == cfg.grad_accum - 1
                                         or not hasattr(runner, "no_sync")) else runner.no_sync()
                with sync, autocast():
                    losses = runner(batch["input_ids"].to(device), batch["targets"].to(device),
                                    batch["document_ids"].to(device))
                (losses["loss"] / cfg.grad_accum).backward()
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float().item() / cfg.grad_accum
            loss_t = _all_mean(torch.tensor([sums["loss"]], device=device))
            if not torch.isfinite(loss_t).all():
                summary = {"status": "nonfinite", "step": step}
                msg = (f"loss became {loss_t.item()} at step {step}: stopping. The last good checkpoint "
                       f"(step {last_good}) is kept in {out}; lower lr (now {lr:.3g}) or check the data.")
                if master:
                    append_jsonl(metrics_file, {"step": step, "event": "nonfinite_loss", "loss": str(loss_t.item())})
                raise NonFiniteLoss(msg)
            params = [p for p in model.parameters() if p.grad is not None]
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            seq_maxvio = model.sequence_max_violation()  # read before the bias update resets the counters
            maxvio = model.update_router_bias(cfg.bias_update_speed)  # all-reduces loads under DP
            dt = clock() - t0
            rec = {"step": step + 1, "lr": lr, "grad_norm": float(gnorm),
                   **{k: float(_all_mean(torch.tensor([v], device=device))) for k, v in sums.items()},
                   "tokens": (step + 1) * tokens_per_step, "tokens_per_s": tokens_per_step / dt,
                   "mfu": flops_per_token * tokens_per_step / dt / peak, "step_time": dt,
                   "maxvio": [round(float(v), 4) for v in maxvio],
                   "seq_maxvio": [round(float(v), 4) for v in seq_maxvio], "elapsed": clock() - t_start}
            if cfg.val_data and cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                rec["val_loss"] = evaluate(model, cfg, rank, world, device, autocast)
            if master and ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps):
                append_jsonl(metrics_file, rec)
            if progress:
                progress.update(task, completed=step + 1,
                                description=f"train loss {rec['loss']:.3f} lr {lr:.2e} {rec['tokens_per_s']:.0f} tok/s")
            done = step + 1 == cfg.max_steps
            over_time = cfg.max_time is not None and clock() - t_start > cfg.max_time
            if done or over_time or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                _save(out, step + 1, model, opts, cfg, batches, rank,
                      {"loss": rec["loss"], "train_config": dataclasses.asdict(cfg)})
                last_good = step + 1
            if over_time:
                summary = {"status": "time_budget", "step": step + 1}
                break
            if done:  # fit_to_time may have shortened the run below the range's end
                break
    final = {"step": step + 1 if cfg.max_steps > start_step else start_step, "out": str(out), **summary}
    if cfg.val_data:
        final["val_loss"] = evaluate(model, cfg, rank, world, device, autocast)
    if master:
        (out / "summary.json").write_text(json.dumps(final, indent=1) + "\n")
        try:
            plot_metrics(metrics_file, out / "loss.png")
        except Exception as e:  # plotting never fails a run
            final["plot_error"] = str(e)
    return final


@torch.no_grad()
def evaluate(model: Transformer, cfg: TrainConfig, rank: int, world: int, device: torch.device,
             autocast=nullcontext) -> float:
    """Mean validation loss (main head only) over eval_batches fixed batches of val_data."""
    was_training = model.training
    model.eval()
    batches = _open_data(cfg, rank, world, model.config, split="val")
    total = 0.0
    for _ in range(cfg.eval_batches):
        b = next(batches)
        with autocast():
            total += model.loss(b["input_ids"].to(device), b["targets"].to(device),
                                document_ids=b["document_ids"].to(device), mtp_lambda=0.0,
                                balance_alpha=0.0)["main"].item()
    model.train(was_training)
    return float(_all_mean(torch.tensor([total / cfg.eval_batches], device=device)))


def _manifest_tokenizer(data: str) -> str | None:
    try:
        tok = json.loads((Path(data) / "manifest.json").read_text())["tokenizer"].get("path")
    except (OSError, json.JSONDecodeError, KeyError, AttributeError):
        return None
    return tok if tok and Path(tok).exists() else None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return read_jsonl(path)


def plot_metrics(metrics: str | Path, png: str | Path) -> Path:
    """Loss curves (total, main, MTP, validation), lr and MaxVio per MoE layer (batch-wise and sequence-wise) from a
    metrics JSONL."""
    recs = [r for r in read_jsonl(metrics) if "event" not in r]
    return plot_panels(recs, png, [("loss", ["loss", "main", "mtp", "val_loss"]), ("learning rate", ["lr"]),
                                   ("expert load MaxVio", ["maxvio", "seq_maxvio"])])
