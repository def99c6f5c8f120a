"""GRPO reasoning RL — the DeepSeek-R1-Zero recipe (`nanoseek rl --model DIR --task NAME --out DIR`).

Per step (DeepSeekMath §4.1 / R1 §2.2): take P prompts, sample G completions each with nanoseek's batched engine
over the absorbed-MLA cache, score them with rule-based rewards (accuracy + format, no reward model), normalise
rewards within each group (A_i = (r_i - mean) / std), then `mu` passes of the clipped policy-gradient objective
over `mini_batches` mini-batches, with an optional k3 KL penalty to a frozen reference (beta). Loss aggregation:
  grpo     per-sequence token mean, then mean over sequences (the paper)
  dr_grpo  token sum / max_new_tokens, no std scaling (Liu et al. 2025: removes the length and difficulty biases)
  dapo     token-level mean over the mini-batch, clip-higher eps_high (Yu et al. 2025)
MTP is ignored (main head only) and the router bias frozen during RL: RL updates are small and off the
pretraining distribution, and the bias rule targets pretraining load balance.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .device import autocast as autocast_factory
from .device import dtype_name, model_device, resolve_device, resolve_dtype
from .files import append_jsonl, read_jsonl
from .infer import Engine, SamplingParams
from .metrics import plot_panels, progress_bar, truncate_jsonl
from .model import SharedPrefix, Transformer
from .rewards import RewardRunner, parse_reward_spec
from .stats import derive_seed
from .tasks import PROMPT_FORMATS, Task, get_task
from .tokenizer import Tokenizer
from .train import set_lr
from .weights import load as load_model
from .weights import save_pretrained


@dataclass
class RLConfig:
    model: str = ""
    task: str = "arithmetic"  # a built-in task, a JSONL file or a plugin module:name (nanoseek.tasks.get_task)
    task_options: dict[str, Any] = field(default_factory=dict)  # the task's settings, e.g. {"max_digits": 3}
    rewards: list[str] = field(default_factory=list)  # extra reward specs (module:fn[=weight]) added to the task's
    replace_rewards: bool = False  # use only `rewards`, not the task's built-in accuracy + format
    out: str = "runs/rl"
    steps: int = 50
    group_size: int = 8  # G
    batch_prompts: int = 4  # P: P x G completions per step
    mu: int = 1  # policy-gradient passes over each rollout batch (old log-probs fixed)
    mini_batches: int = 1  # optimizer steps per pass
    loss: str = "grpo"  # grpo | dr_grpo | dapo
    eps_low: float = 0.2
    eps_high: float | None = None  # None: eps_low (0.28 for dapo)
    scale_rewards: bool | None = None  # divide by the group std; None: on except for dr_grpo
    beta: float = 0.0  # KL to the frozen reference (R1: 0.001); 0 disables the reference model
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    dynamic_sampling: bool = False  # DAPO: drop groups with equal rewards and refill
    max_refill_rounds: int = 3
    overlong: str = "none"  # none | mask (truncated completions get no gradient) | soft (DAPO length penalty)
    overlong_buffer: int = 32
    length_penalty: float = 0.0  # Kimi 1.5 length reward weight (0: off)
    prompt_format: str = "chat"  # chat (R1 template, what `nanoseek chat` uses) | r1_zero (plain R1-Zero template)
    lr: float = 1e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup_steps: int = 0
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on a CPU: docs/rl.md) | fp32 | bf16 (autocast, rollouts + updates)
    device: str | None = None  # None: CUDA if available, else CPU (nanoseek.device)
    seed: int = 0
    reward_timeout: float = 10.0
    save_every: int = 25
    sample_every: int = 5
    eval_every: int = 0  # held-out greedy accuracy every N steps (and at start/end when > 0 or eval_n > 0)
    eval_n: int = 100
    max_time: float | None = None
    resume: bool = False
    progress: bool = True
    n_train_items: int = 5000
    ignore_eos: bool = False  # benchmarks: every completion runs to max_new_tokens

    def __post_init__(self) -> None:
        errors = []
        if self.group_size < 2:
            errors.append(f"group_size must be >= 2 (advantages compare samples within a group), got {self.group_size}")
        if self.batch_prompts < 1 or self.steps < 1 or self.mu < 1 or self.max_new_tokens < 1:
            errors.append("batch_prompts, steps, mu and max_new_tokens must be >= 1")
        if self.mini_batches < 1 or (self.batch_prompts * self.group_size) % self.mini_batches:
            errors.append(f"the rollout batch ({self.batch_prompts} prompts x {self.group_size} samples = "
                          f"{self.batch_prompts * self.group_size}) does not split into {self.mini_batches} "
                          "equal mini-batches")
        if self.loss not in ("grpo", "dr_grpo", "dapo"):
            errors.append(f"loss {self.loss!r} not in (grpo, dr_grpo, dapo)")
        if self.overlong not in ("none", "mask", "soft"):
            errors.append(f"overlong {self.overlong!r} not in (none, mask, soft)")
        if self.prompt_format not in PROMPT_FORMATS:
            errors.append(f"prompt_format {self.prompt_format!r} not in {PROMPT_FORMATS}")
        try:
            dtype_name(self.dtype, training=True)
        except ValueError as e:
            errors.append(str(e))
        if not self.eps_low > 0 or (self.eps_high is not None and not self.eps_high > 0):
            errors.append("eps_low and eps_high must be > 0")
        if self.beta < 0 or self.temperature <= 0:
            errors.append("need beta >= 0 and temperature > 0")
        if errors:
            raise ValueError("invalid RL config: " + "; ".join(errors))
        if self.eps_high is None:
            self.eps_high = 0.28 if self.loss == "dapo" else self.eps_low
        if self.scale_rewards is None:
            self.scale_rewards = self.loss != "dr_grpo"


# ------------------------------------------------------------------------------------------------------------
# pure pieces (unit-tested by hand)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + eps); rewards are laid out group by group."""
    r = rewards.view(-1, group_size)
    a = r - r.mean(dim=1, keepdim=True)
    if scale:
        a = a / (r.std(dim=1, keepdim=True) + eps)  # unbiased std, as TRL
    return a.flatten()


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, *,
                loss_type: str, eps_low: float, eps_high: float, max_new_tokens: int,
                ref_logp: torch.Tensor | None = None, beta: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped surrogate (PPO/GRPO) over completion tokens. logp/old_logp/ref_logp/mask: (B, L); adv: (B,)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None and beta > 0:
        d = ref_logp - logp  # k3 estimator of KL(pi || pi_ref): exp(d) - d - 1 >= 0, unbiased (Schulman 2020)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    m = mask.float()
    if loss_type == "grpo":
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = ((per_token * m).sum(1) / max_new_tokens).mean()
    else:  # dapo: token-level
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
        stats = {"clip_frac": float((clipped.float() * m).sum() / n), "kl": float((kl * m).sum() / n)}
    return loss, stats


def kimi_length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    """Kimi 1.5 length reward within a group: lambda = 0.5 - (len - min) / (max - min); correct answers get lambda,
    wrong ones min(0, lambda). Zero when all lengths are equal."""
    lo, hi = min(lengths), max(lengths)
    if hi == lo:
        return [0.0] * len(lengths)
    lam = [0.5 - (n - lo) / (hi - lo) for n in lengths]
    return [x if c else min(0.0, x) for x, c in zip(lam, correct)]


def overlong_penalty(length: int, max_new_tokens: int, buffer: int) -> float:
    """DAPO soft overlong punishment: 0 up to max - buffer, then linearly down to -1 at max."""
    start = max_new_tokens - buffer
    return 0.0 if length <= start else max(-1.0, (start - length) / max(buffer, 1))


# ------------------------------------------------------------------------------------------------------------
# rollouts and log-probs (prompts are the task's: nanoseek.tasks)


def completion_logprobs(model: Transformer, prompts: list[list[int]], completions: list[list[int]],
                        temperature: float, pad_id: int, with_entropy: bool = False, share_prompts: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """log pi(token) of every completion token under `model` at `temperature` (as sampled): (B, L) logprobs,
    (B, L) mask and optionally per-token entropy.

    Rows repeating a prompt (GRPO's G samples of each prompt) run that prompt through the model once
    (`share_prompts`, model.SharedPrefix): the completions attend to its keys/values and its gradients sum over the
    group. Same values as prompt + completion per row up to float rounding; the prompts' share of the forward and
    backward shrinks G-fold (`small`, 32 rows of ~30 + 128 tokens: update 1.49 -> 1.35 s, docs/rl.md)."""
    device = model_device(model)
    L = max(len(c) for c in completions)
    distinct: dict[tuple[int, ...], int] = {}
    row_prompt = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    if share_prompts and len(distinct) < len(prompts):
        h = _shared_prompt_hidden(model, list(distinct), row_prompt, completions, L, pad_id, device)
    else:
        h = _rowwise_hidden(model, prompts, completions, L, pad_id, device)
    # rows are filled on the host (cheap per-row writes) and moved to the model's device in one copy each
    tgt = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, c in enumerate(completions):
        tgt[i, : len(c)] = torch.tensor(c)
        mask[i, : len(c)] = True
    tgt, mask = tgt.to(device), mask.to(device)
    logits = model.lm_head(h).float()
    if temperature != 1.0:  # dividing by 1 would still be a pass over (B, L, V) logits, and another in backward
        logits = logits / temperature
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, tgt[..., None]).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.no_grad():  # a logged statistic: no autograd graph through it
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, mask, ent


def _rowwise_hidden(model: Transformer, prompts: list[list[int]], completions: list[list[int]], L: int,
                    pad_id: int, device: torch.device) -> torch.Tensor:
    """(B, L, D) hidden states predicting each completion token: prompt + completion per row, right-padded, so
    plain causal attention suffices."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    pos = torch.zeros(len(prompts), L, dtype=torch.long)  # index of the position that predicts each token
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        pos[i, : len(c)] = torch.arange(len(p) - 1, len(p) - 1 + len(c))
    ids, pos = ids.to(device), pos.to(device)
    h, _ = model.trunk(ids)
    return h.gather(1, pos[..., None].expand(-1, -1, h.shape[-1]))  # only the positions that predict completions


def _shared_prompt_hidden(model: Transformer, distinct: list[tuple[int, ...]], row_prompt: list[int],
                          completions: list[list[int]], L: int, pad_id: int, device: torch.device) -> torch.Tensor:
    """As `_rowwise_hidden`, with each distinct prompt run once: the prompt's last position predicts the first
    completion token, completion token j predicts token j + 1 (the last one is never fed)."""
    lengths = torch.tensor([len(p) for p in distinct])
    pids = torch.full((len(distinct), int(lengths.max())), pad_id, dtype=torch.long)
    for i, p in enumerate(distinct):
        pids[i, : len(p)] = torch.tensor(p)
    cids = torch.full((len(completions), L - 1), pad_id, dtype=torch.long)
    for i, c in enumerate(completions):
        cids[i, : len(c) - 1] = torch.tensor(c[:-1])
    rows, lengths = torch.tensor(row_prompt, device=device), lengths.to(device)
    shared = SharedPrefix(lengths, rows)
    hp, _ = model.trunk(pids.to(device), cache=shared)
    first = hp[rows, lengths[rows] - 1][:, None]  # (B, 1, D)
    if L == 1:
        return first
    hc, _ = model.trunk(cids.to(device), cache=shared)
    return torch.cat([first, hc], 1)


# ------------------------------------------------------------------------------------------------------------
# the loop


def _reward_specs(cfg: RLConfig, task: Task) -> list[tuple[str, float]]:
    specs = [] if cfg.replace_rewards else list(task.rewards)
    specs += [parse_reward_spec(s) for s in cfg.rewards]
    if not specs:
        raise ValueError("no rewards: replace_rewards is set but no --reward was given" if cfg.replace_rewards else
                         f"no rewards: task {task.name} has no default rewards; give --reward")
    return specs


def _columns(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys = sorted({k for it in items for k in it} - {"prompt"})
    return {k: [it.get(k) for it in items] for k in keys}


def evaluate_accuracy(engine: Engine, tokenizer: Tokenizer, items: list[dict[str, Any]], task: Task, fmt: str,
                      max_new_tokens: int) -> dict[str, Any]:
    """Greedy held-out accuracy with the task's verifier (accuracy only, format not required)."""
    if not items:
        return {}
    prompts = [task.encode_prompt(it, tokenizer, fmt) for it in items]
    outs = engine.generate(prompts, SamplingParams(max_tokens=max_new_tokens, temperature=0.0, detokenize=False))
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    correct = [task.correct(it, t) for it, t in zip(items, texts)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct), "correct": correct,
            "mean_len": sum(len(o.token_ids) for o in outs) / len(outs)}


def rl(cfg: RLConfig, clock: Callable[[], float] = time.perf_counter) -> dict[str, Any]:
    """Run GRPO; returns a summary. Writes OUT/metrics.jsonl, OUT/samples.jsonl, OUT/rl.png, checkpoints and
    OUT/final (an HF model directory with the tokenizer, servable by `nanoseek serve`). `clock` times the steps and
    `max_time` (tests inject a deterministic one)."""
    if not cfg.model:
        raise ValueError("model is required: a model directory (config.json + safetensors + tokenizer)")
    device = resolve_device(cfg.device)  # before any work: `--device cuda` without a GPU fails here
    task = get_task(cfg.task, **cfg.task_options)
    task.require_output("text", "GRPO")
    # a generated task draws n_train_items problems; a fixed set (a JSONL file) is used whole
    train_items = task.items("train", cfg.n_train_items if task.size is None else None, cfg.seed)
    test_items = task.items("test", max(cfg.eval_n, 0), cfg.seed) if task.held_out else []
    if not cfg.replace_rewards:
        task.check_items(train_items + test_items)  # the task's rewards grade against its columns
    rewarder = RewardRunner(_reward_specs(cfg, task), timeout=cfg.reward_timeout)  # import errors before compute
    tokenizer = Tokenizer.load(cfg.model)
    if cfg.prompt_format == "chat" and tokenizer.chat_template is None:
        raise ValueError(f"{cfg.model} has no chat template: use prompt_format = 'r1_zero'")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, device=device, dtype=torch.float32)  # fp32 master weights; autocast below
    model.train()
    ref = None
    if cfg.beta > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                            weight_decay=cfg.weight_decay, betas=(0.9, 0.99), fused=True)
    start, cursor = 0, [0]  # cursor: prompts drawn so far (dynamic sampling draws more than P per step)
    if cfg.resume and (ckpt := latest_checkpoint(out)) is not None:
        state = load_checkpoint(ckpt, model, opt)
        start = state["step"]
        cursor = [state.get("data", {}).get("cursor", start * cfg.batch_prompts)]
        truncate_jsonl(out / "metrics.jsonl", start)
        truncate_jsonl(out / "samples.jsonl", start)
    else:
        for f in ("metrics.jsonl", "samples.jsonl"):
            (out / f).unlink(missing_ok=True)
    (out / "rl_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    autocast = autocast_factory(device, resolve_dtype(cfg.dtype, device, training=True))
    P, G = cfg.batch_prompts, cfg.group_size
    prompt_len = max(len(task.encode_prompt(it, tokenizer, cfg.prompt_format)) for it in train_items + test_items)
    engine = Engine(model, tokenizer, max_batch=P * G, max_model_len=prompt_len + cfg.max_new_tokens + 8,
                    seed=cfg.seed)
    rng = random.Random(cfg.seed)
    order = list(range(len(train_items)))
    rng.shuffle(order)

    def next_items(n: int) -> list[dict[str, Any]]:
        got = [train_items[order[(cursor[0] + i) % len(order)]] for i in range(n)]
        cursor[0] += n
        return got

    summary: dict[str, Any] = {"start_step": start}
    eval_items = test_items[: cfg.eval_n]
    if eval_items and start == 0 and (cfg.eval_every or cfg.eval_n):
        with autocast():
            ev = evaluate_accuracy(engine, tokenizer, eval_items, task, cfg.prompt_format, cfg.max_new_tokens)
        summary["eval_start"] = {k: v for k, v in ev.items() if k != "correct"}
        append_jsonl(out / "metrics.jsonl", {"step": 0, "eval_accuracy": ev["accuracy"], "eval_len": ev["mean_len"]})
    progress = progress_bar(cfg.progress)
    t_run = clock()
    step_times: list[float] = []
    step = start
    with progress or nullcontext():
        bar = progress.add_task("rl", total=cfg.steps, completed=start) if progress else None
        for step in range(start, cfg.steps):
            t0 = clock()
            if cfg.max_time is not None and len(step_times) >= 3:
                # stop before a step that would end past max_time (the median of recent steps: one slow step, a
                # save, does not stop the run early); the lr is constant, so nothing is left unfinished
                recent = sorted(step_times[-8:])
                if t0 - t_run + recent[len(recent) // 2] > cfg.max_time:
                    summary["stopped"] = "time_budget"
                    save_checkpoint(out, step, model, opt, data={"cursor": cursor[0]}, keep_last=2,
                                    tokenizer=cfg.model, extra={"rl_config": dataclasses.asdict(cfg)})
                    step -= 1  # this step was not taken: `steps` below counts the finished ones
                    break
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else cfg.lr
            set_lr([opt], lr)
            # ---- rollouts (+ dynamic sampling refill) -------------------------------------------------------
            model.eval()
            batch: list[dict[str, Any]] = []
            zero_var_groups, total_groups, rollout_tokens, t_roll = 0, 0, 0, 0.0
            need, rounds = P, 0
            while need > 0 and rounds <= (cfg.max_refill_rounds if cfg.dynamic_sampling else 0):
                items = next_items(need)
                tr = clock()
                groups = _rollout(engine, tokenizer, rewarder, task, items, cfg, step, rounds, autocast)
                t_roll += clock() - tr
                rounds += 1
                for grp in groups:
                    total_groups += 1
                    rollout_tokens += sum(len(s["completion"]) for s in grp)
                    flat = len({round(s["reward"], 6) for s in grp}) == 1
                    zero_var_groups += flat
                    if cfg.dynamic_sampling and flat:
                        continue
                    batch.extend(grp)
                need = P - len(batch) // G
                if not cfg.dynamic_sampling:
                    break
            if not batch:  # every group was flat after all refills: nothing to learn from this step
                append_jsonl(out / "metrics.jsonl", {"step": step + 1, "event": "all_groups_flat", "lr": lr,
                                                     "prompts_drawn": cursor[0]})
                continue
            # ---- advantages, old/ref log-probs ------------------------------------------------------------------
            model.train()
            rewards = torch.tensor([s["reward"] for s in batch])  # host: logged statistics
            adv = group_advantages(rewards, G, cfg.scale_rewards).to(device)  # meets the log-probs in the loss
            prompts = [s["prompt"] for s in batch]
            comps = [s["completion"] or [tokenizer.eos_id] for s in batch]
            keep = torch.tensor([not (cfg.overlong == "mask" and s["finish_reason"] == "length") for s in batch],
                                device=device)
            # one update per rollout batch: the old policy *is* the current one, so the old log-probs are the
            # update pass's own, detached (ratio = 1, gradient unchanged) and their separate forward is skipped
            reuse_old = cfg.mu == 1 and cfg.mini_batches == 1
            ref_logp = None
            mismatch = math.nan
            with torch.no_grad(), autocast():
                if not reuse_old:
                    old_logp, mask, _ = completion_logprobs(model, prompts, comps, cfg.temperature,
                                                            tokenizer.pad_id or 0)
                    mask = mask & keep[:, None]
                    mismatch = _sampler_mismatch(batch, old_logp, mask)
                if ref is not None:
                    ref_logp = completion_logprobs(ref, prompts, comps, cfg.temperature, tokenizer.pad_id or 0)[0]
            # ---- policy updates -----------------------------------------------------------------------------
            n = len(batch)
            mb = max(1, n // cfg.mini_batches) if n % cfg.mini_batches == 0 else n
            stats_acc: dict[str, float] = {"clip_frac": 0.0, "kl": 0.0, "entropy": 0.0, "loss": 0.0}
            n_updates = 0
            for epoch in range(cfg.mu):
                # a fresh mini-batch order per epoch (as PPO reshuffles), reproducible per (step, epoch) on resume;
                # a host generator on purpose: the permutation only orders Python lists (.tolist()), and the same
                # seed then gives the same mini-batches on every device
                perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                    derive_seed(cfg.seed, "minibatch", step, epoch)))
                for i in range(0, n, mb):
                    idx = perm[i: i + mb].tolist()
                    with autocast():
                        logp, m, ent = completion_logprobs(model, [prompts[j] for j in idx], [comps[j] for j in idx],
                                                           cfg.temperature, tokenizer.pad_id or 0, with_entropy=True)
                        L = logp.shape[1]
                        if reuse_old:  # the one update covers the whole batch (in the order of idx)
                            old, valid = logp.detach(), m & keep[idx, None]
                            mismatch = _sampler_mismatch([batch[j] for j in idx], old, valid)
                        else:
                            old, valid = old_logp[idx, :L], m & mask[idx, :L]
                        loss, st = policy_loss(
                            logp, old, adv[idx], valid, loss_type=cfg.loss,
                            eps_low=cfg.eps_low, eps_high=cfg.eps_high, max_new_tokens=cfg.max_new_tokens,
                            ref_logp=None if ref_logp is None else ref_logp[idx, :L], beta=cfg.beta)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                    opt.step()
                    mm = valid.float()
                    stats_acc["entropy"] += float((ent.detach() * mm).sum() / mm.sum().clamp(min=1))
                    stats_acc["loss"] += float(loss.detach())
                    stats_acc["clip_frac"] += st["clip_frac"]
                    stats_acc["kl"] += st["kl"]
                    n_updates += 1
            for r in model.routers():  # router bias frozen during RL: discard the load counts
                r.expert_load.zero_()
            dt = clock() - t0
            step_times.append(dt)
            lens = [len(s["completion"]) for s in batch]
            rec = {"step": step + 1, "lr": lr, "prompts_drawn": cursor[0],
                   "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                   "accuracy": sum(s["correct"] for s in batch) / n,
                   "format": sum(s["format_ok"] for s in batch) / n,
                   "len_mean": sum(lens) / n, "len_max": max(lens), "prompt_len_mean": sum(map(len, prompts)) / n,
                   "truncated": sum(s["finish_reason"] == "length" for s in batch) / n,
                   **{k: v / max(n_updates, 1) for k, v in stats_acc.items()}, "grad_norm": float(gnorm),
                   "zero_var_frac": zero_var_groups / max(total_groups, 1), "groups": n // G,
                   "rollout_tok_s": rollout_tokens / max(t_roll, 1e-9),
                   "train_tok_s": cfg.mu * sum(lens) / max(dt - t_roll, 1e-9),
                   "logprob_mismatch": mismatch, "reward_failures": sum(rewarder.failures.values()),
                   "step_time": dt, "elapsed": clock() - t_run}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and eval_items:
                model.eval()
                with autocast():
                    ev = evaluate_accuracy(engine, tokenizer, eval_items, task, cfg.prompt_format,
                                           cfg.max_new_tokens)
                rec["eval_accuracy"], rec["eval_len"] = ev["accuracy"], ev["mean_len"]
            append_jsonl(out / "metrics.jsonl", rec)
            if cfg.sample_every and (step + 1) % cfg.sample_every == 0:
                for s in batch[: min(len(batch), 2 * G): G]:
                    append_jsonl(out / "samples.jsonl", {"step": step + 1, "prompt": tokenizer.decode(s["prompt"]),
                                                 "completion": s["text"], "reward": s["reward"]})
            if progress:
                progress.update(bar, completed=step + 1, description=f"rl reward {rec['reward_mean']:.2f} "
                                f"acc {rec['accuracy']:.2f} len {rec['len_mean']:.0f}")
            over = cfg.max_time is not None and clock() - t_run > cfg.max_time
            if (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.steps or over:
                save_checkpoint(out, step + 1, model, opt, data={"cursor": cursor[0]}, keep_last=2,
                                tokenizer=cfg.model, extra={"rl_config": dataclasses.asdict(cfg)})
            if over:
                summary["stopped"] = "time_budget"
                break
    rewarder.close()
    model.eval()
    if eval_items and (cfg.eval_every or cfg.eval_n):
        with autocast():
            ev = evaluate_accuracy(engine, tokenizer, eval_items, task, cfg.prompt_format, cfg.max_new_tokens)
        summary["eval_end"] = {k: v for k, v in ev.items() if k != "correct"}
        append_jsonl(out / "metrics.jsonl",
                     {"step": step + 1, "eval_accuracy": ev["accuracy"], "eval_len": ev["mean_len"]})
    final = save_pretrained(model, out / "final", tokenizer=cfg.model,
                            meta={"stage": "rl", "prompt_format": cfg.prompt_format, "task": cfg.task})
    summary.update({"steps": step + 1, "final_model": str(final), "reward_failures": dict(rewarder.failures)})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_rl(out / "metrics.jsonl", out / "rl.png")
    return summary


def _rollout(engine: Engine, tokenizer: Tokenizer, rewarder: RewardRunner, task: Task, items: list[dict[str, Any]],
             cfg: RLConfig, step: int, round_: int, autocast) -> list[list[dict[str, Any]]]:
    """G samples per item, scored. Per-request seeds make a resumed run sample exactly what it would have."""
    G = cfg.group_size
    prompts = [task.encode_prompt(it, tokenizer, cfg.prompt_format) for it in items]
    params = [SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                             logprobs=0, ignore_eos=cfg.ignore_eos, detokenize=False,
                             seed=derive_seed(cfg.seed, "rollout", step, round_, j))
              for j in range(len(items) * G)]
    with autocast():
        outs = engine.generate([p for p in prompts for _ in range(G)], params)
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    # the chat template pre-fills "<think>\n": rewards see the completion as the model wrote it
    expanded = [it for it in items for _ in range(G)]
    total, parts = rewarder(texts, [tokenizer.decode(p) for p in prompts for _ in range(G)], _columns(expanded))
    first = next(iter(parts.values()))  # the accuracy reward comes first for built-in tasks
    fmt = parts.get("format", [0.0] * len(texts))
    samples = []
    for j, o in enumerate(outs):
        r = total[j]
        if cfg.overlong == "soft":
            r += overlong_penalty(len(o.token_ids), cfg.max_new_tokens, cfg.overlong_buffer)
        samples.append({"prompt": prompts[j // G], "completion": list(o.token_ids), "text": texts[j],
                        "reward": r, "correct": first[j] >= 1.0, "format_ok": fmt[j] >= 1.0,
                        "finish_reason": o.finish_reason, "sampler_logprobs": o.logprobs})
    groups = [samples[i: i + G] for i in range(0, len(samples), G)]
    if cfg.length_penalty:
        for grp in groups:
            bonus = kimi_length_rewards([len(s["completion"]) for s in grp], [s["correct"] for s in grp])
            for s, b in zip(grp, bonus):
                s["reward"] += cfg.length_penalty * b
    return groups


def _sampler_mismatch(batch: list[dict[str, Any]], old_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean |sampler log-prob - trainer log-prob| over completion tokens (only comparable at top_p = 1)."""
    diffs, n = 0.0, 0
    for i, s in enumerate(batch):
        lp = s.get("sampler_logprobs")
        if not lp:
            continue
        k = min(len(lp), int(mask[i].sum()))
        if k:
            diffs += float((old_logp[i, :k] - torch.tensor(lp[:k], device=old_logp.device)).abs().sum())
            n += k
    return diffs / n if n else math.nan


def plot_rl(metrics: str | Path, png: str | Path) -> Path:
    recs = [r for r in read_jsonl(metrics) if "event" not in r]
    return plot_panels(recs, png, [("reward / accuracy", ["reward_mean", "accuracy", "format", "eval_accuracy"]),
                                   ("response length (tokens)", ["len_mean", "len_max"]),
                                   ("KL / clip / entropy", ["kl", "clip_frac", "entropy"])],
                       smooth=max(1, len(recs) // 12))
