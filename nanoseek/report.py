"""The demo's report card (`OUT/report/report.md` + PNGs), built only from what the stages wrote: metrics JSONL,
evaluation summaries, the model directories — in the spirit of nanochat's report card."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from . import __version__, accounting
from .eval import per_item
from .files import read_jsonl
from .stats import paired_difference
from .weights import config_from_hf


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(pair: list[float] | tuple[float, float] | None) -> str:
    return "" if not pair else f"{100 * pair[0]:.1f}–{100 * pair[1]:.1f}%"


def environment() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "nanoseek": __version__,
            "commit": commit, "python": platform.python_version(), "torch": torch.__version__, "cpu": cpu,
            "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def accuracy_chart(results: dict[str, dict[str, Any]], png: Path, k: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    metrics = ["greedy", "pass@1", f"cons@{k}"]
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        vals = [100 * (results[n].get(m) or 0) for n in names]
        lo = [100 * (results[n].get(m) or 0) - 100 * (results[n].get(m + "_ci") or [0, 0])[0] for n in names]
        hi = [100 * (results[n].get(m + "_ci") or [0, 0])[1] - 100 * (results[n].get(m) or 0) for n in names]
        xs = [i + (j - 1) * width for i in range(len(names))]
        ax.bar(xs, vals, width, label=m, yerr=[lo, hi], capsize=3)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def write_report(root: Path, plan: Any) -> Path:
    """Assemble OUT/report/report.md from the stage outputs under OUT."""
    rep = root / "report"
    rep.mkdir(parents=True, exist_ok=True)
    state = json.loads((root / "demo_state.json").read_text()) if (root / "demo_state.json").exists() else {}
    stages = state.get("stages", {})
    env = environment()
    lines = ["# nanoseek report card", "",
             f"The DeepSeek recipe at toy scale on {env['cpu'] or 'this machine'} ({env['cores']} cores"
             + (f", GPU {env['cuda']}" if env["cuda"] else ", CPU only") + f"), {env['date']}.", ""]

    # ---- environment and timing
    lines += ["## Environment", "", "| | |", "|---|---|"]
    for k, v in env.items():
        lines.append(f"| {k} | {v} |")
    lines += ["", "## Stages", "", "| stage | wall time | budget | notes |", "|---|---|---|---|"]
    for name, s in stages.items():
        notes = ", ".join(f"{k}={v}" for k, v in s.items() if k in ("steps", "stopped_by", "tokens", "documents",
                                                                       "traces", "skipped"))
        lines.append(f"| {name} | {s['seconds']:.0f}s | {s.get('budget', 0):.0f}s | {notes} |")
    total = sum(s["seconds"] for s in stages.values())
    lines += ["", f"Total: **{total / 60:.1f} min** (installation not included).", ""]

    # ---- the model
    base = root / "models" / "base"
    if (base / "config.json").exists():
        cfg = config_from_hf(base / "config.json")
        counts = accounting.count_params(cfg)
        kv = accounting.kv_cache_bytes(cfg)
        narrowed = " with " + ", ".join(f"{k}={v}" for k, v in plan.model_overrides.items()) \
            if plan.model_overrides else ""
        lines += ["## The model", "",
                  f"`{plan.preset}` preset{narrowed}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                  f"{cfg.num_attention_heads} MLA heads (kv_lora_rank {cfg.kv_lora_rank}, rope dim "
                  f"{cfg.qk_rope_head_dim}), {cfg.n_shared_experts} shared + {cfg.n_routed_experts} routed experts "
                  f"({cfg.num_experts_per_tok} active), {cfg.num_nextn_predict_layers} MTP module(s), vocab "
                  f"{cfg.vocab_size}.", "",
                  "| parameters | count |", "|---|---|",
                  f"| total (main model) | {counts['total']:,} |",
                  f"| total with MTP | {counts['total_with_mtp']:,} |",
                  f"| activated per token | {counts['activated']:,} |", "",
                  f"KV cache per token ({kv['dtype']}): MLA {kv['mla_bytes_per_token']:,} B vs MHA with the same heads "
                  f"{kv['mha_bytes_per_token']:,} B ({kv['mha_bytes_per_token'] / kv['mla_bytes_per_token']:.1f}x "
                  "smaller).", ""]

    # ---- pretraining
    pm = [r for r in read_jsonl(root / "pretrain" / "metrics.jsonl") if "event" not in r]
    if pm:
        shutil.copyfile(root / "pretrain" / "loss.png", rep / "pretrain.png") \
            if (root / "pretrain" / "loss.png").exists() else None
        tps = sorted(r["tokens_per_s"] for r in pm[1:]) or [pm[0]["tokens_per_s"]]
        mfu = sorted(r["mfu"] for r in pm[1:]) or [pm[0]["mfu"]]
        lines += ["## Pretraining", "", f"{len(pm)} steps, {pm[-1]['tokens']:,} tokens; loss {pm[0]['loss']:.3f} -> "
                  f"{pm[-1]['loss']:.3f} (main {pm[-1]['main']:.3f}, MTP {pm[-1].get('mtp', float('nan')):.3f}). "
                  f"Median throughput {tps[len(tps) // 2]:,.0f} tokens/s, MFU {100 * mfu[len(mfu) // 2]:.1f}% of "
                  "the matmul peak measured at start-up. Expert load MaxVio (max load / mean - 1) per MoE layer "
                  f"at the end: {pm[-1].get('maxvio')} — the aux-loss-free bias keeps routing balanced.", "",
                  "![pretraining](pretrain.png)", ""]

    # ---- RL
    rm = [r for r in read_jsonl(root / "rl" / "metrics.jsonl") if "event" not in r and "reward_mean" in r]
    if rm:
        if (root / "rl" / "rl.png").exists():
            shutil.copyfile(root / "rl" / "rl.png", rep / "rl.png")
        first, last = rm[: max(1, len(rm) // 5)], rm[-max(1, len(rm) // 5):]

        def avg(rs: list[dict[str, Any]], k: str) -> float:
            return sum(r[k] for r in rs) / len(rs)

        lines += ["## GRPO (R1-Zero style)", "",
                  f"{len(rm)} steps of {plan.rl_prompts} prompts x {plan.rl_group} samples, rule-based rewards "
                  "(accuracy + format), prompts in the R1 chat format (the one `nanoseek chat`/`serve` use). "
                  f"Rollout reward {avg(first, 'reward_mean'):.2f} -> {avg(last, 'reward_mean'):.2f}, "
                  f"rollout accuracy {_pct(avg(first, 'accuracy'))} -> {_pct(avg(last, 'accuracy'))}, "
                  f"mean response length {avg(first, 'len_mean'):.0f} -> {avg(last, 'len_mean'):.0f} tokens "
                  "(first vs last fifth of the steps).", "", "![rl](rl.png)", ""]

    # ---- evaluation
    results: dict[str, Any] = {}
    stage_summary: dict[str, Any] = {}
    for name in ("base", "rl", "student"):
        f = root / "eval" / name / "summary.json"
        if f.exists():
            results[name] = json.loads(f.read_text())
    if results:
        k = next(iter(results.values()))["k"]
        n = next(iter(results.values()))["n_items"]
        fmt = {"base": "pretraining corpus format (R1 chat template, reasoning kept)",
               "rl": "R1 chat template (as in RL)", "student": "R1 chat template (as in its SFT traces)"}
        lines += ["## Held-out accuracy", "",
                  f"The same {n} held-out problems for every model; greedy, pass@1 averaged over {k} samples at "
                  "temperature 0.6 / top_p 0.95 (R1's protocol), and cons@k (majority vote). 95% CIs: Wilson "
                  "(greedy, cons@k), bootstrap (pass@1).", "",
                  f"| model | prompt format | greedy | pass@1 | cons@{k} |", "|---|---|---|---|---|"]
        for name, s in results.items():
            lines.append(f"| {name} | {fmt[name]} | {_pct(s.get('greedy'))} ({_ci(s.get('greedy_ci'))}) | "
                         f"{_pct(s['pass@1'])} ({_ci(s['pass@1_ci'])}) | {_pct(s[f'cons@{k}'])} "
                         f"({_ci(s[f'cons@{k}_ci'])}) |")
        accuracy_chart(results, rep / "accuracy.png", k)
        lines += ["", "![accuracy](accuracy.png)", ""]
        if "base" in results and "rl" in results:
            rows = {n: read_jsonl(root / "eval" / n / "items.jsonl") for n in ("base", "rl")}
            d1 = paired_difference(per_item(rows["base"], "pass1"), per_item(rows["rl"], "pass1"))
            dg = paired_difference(per_item(rows["base"], "greedy_correct"), per_item(rows["rl"], "greedy_correct"))
            verdict = ("**RL measurably improved held-out accuracy**" if d1["ci"][0] > 0 else
                       "**RL did not measurably improve held-out accuracy** (the CI includes 0 or lies below it)")
            lines += [f"{verdict}: RL - base, paired over the same {d1['n']} problems: pass@1 "
                      f"{100 * d1['mean']:+.1f} points (95% bootstrap CI {100 * d1['ci'][0]:+.1f} to "
                      f"{100 * d1['ci'][1]:+.1f}), greedy {100 * dg['mean']:+.1f} points ({100 * dg['ci'][0]:+.1f} "
                      f"to {100 * dg['ci'][1]:+.1f}).", ""]
            stage_summary["rl_minus_base"] = {"pass@1": d1, "greedy": dg}
        student = root / "models" / "student" / "config.json"
        if "student" in results and student.exists():
            scfg = config_from_hf(student)
            traces = stages.get("distill", {}).get("traces")
            lines += [f"The student ({scfg.num_hidden_layers} layers, hidden {scfg.hidden_size}, "
                      f"{accounting.count_params(scfg)['total']:,} parameters) starts from random weights and sees "
                      f"only the RL model's {traces if traces is not None else 'verified'} rejection-sampled traces "
                      "(R1 distilled into *pretrained* Qwen/Llama bases), so it learns the format long before the "
                      "arithmetic.", ""]
        samples = read_jsonl(root / "eval" / "rl" / "items.jsonl")[:3]
        if samples:
            lines += ["### Sample completions (RL model, greedy)", ""]
            for s in samples:
                verdict = "correct" if s["greedy_correct"] else "wrong"
                lines += [f"**{s['prompt']}** (answer {s['answer']}; {verdict})", "", "```",
                          (s["greedy_text"] or "").strip()[:800], "```", ""]

    # ---- cost at V3 scale
    tokens = pm[-1]["tokens"] if pm else 0
    if tokens:
        v3 = accounting.cost_report(preset="deepseek-v3", tokens=float(tokens), gpu="h800", gpu_hour_price=2.0,
                                    mfu=0.4)
        full = accounting.cost_report(preset="deepseek-v3", tokens=14.8e12, gpu="h800", gpu_hour_price=2.0,
                                      gpu_hours_per_trillion=180000, extra_gpu_hours=[119e3, 5e3])
        lines += ["## The same recipe at DeepSeek-V3 scale", "",
                  f"Pretraining V3 on this demo's {tokens:,} tokens would cost "
                  f"{v3['total_gpu_hours']:,.2f} H800 GPU-hours (${v3['total_cost_usd']:,.2f}) at 40% MFU; "
                  f"the real run, 14.8T tokens, took {full['total_gpu_hours'] / 1e3:,.0f}K GPU-hours "
                  f"(${full['total_cost_usd'] / 1e6:.3f}M), "
                  "the report's own figure (`nanoseek cost` given the report's rate, extra hours and price).", ""]

    lines += ["## Talk to the models", "", "```bash",
              f"nanoseek chat --model {root / 'models' / 'rl'}",
              f"nanoseek serve --model {root / 'models' / 'rl'}   # OpenAI-compatible API + web chat at /",
              "```", ""]
    out = rep / "report.md"
    out.write_text("\n".join(lines))
    (rep / "report.json").write_text(json.dumps({"environment": env, "stages": stages, "results": results,
                                                 **stage_summary}, indent=1, default=str) + "\n")
    return out
