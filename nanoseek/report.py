"""The demo's report card: OUT/report/report.json (every number of the card) and report.md + PNGs rendered from it,
in the spirit of nanochat's report card.

Two rules keep the card honest:
  - report.json holds the results apart from what differs between two runs of the same plan on the same machine:
    `timings` (seconds, throughput, MFU) and `environment` (date, commit, software, CPU, threads). Everything else
    is the same, byte for byte, on every such run (tests/test_cli.py checks it).
  - every sentence that judges (improved, balanced, beat) is a verdict computed here by a stated rule over numbers in
    report.json, printed with its threshold and where the threshold comes from; without the numbers a rule needs,
    the judgement is not made.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__, accounting
from .eval import per_item
from .files import atomic_write, atomic_write_json, read_jsonl
from .janus_experiment import guidance_chart
from .stats import derive_seed, paired_difference
from .weights import config_from_hf

BOOTSTRAP_REPS = 2000  # stats.paired_difference's default, printed with every verdict that uses it
COMPUTE_TOLERANCE = 0.10  # distillation vs RL is judged only when the two paths' training FLOPs are this close
NOISE_STEPS = 200  # simulated steps of perfectly balanced routing behind the MaxVio reference
# docs/findings/moe-balance.md: MaxVio (the worst MoE layer's, median over the last 10% of steps) of the demo base's
# shape trained with neither the aux-loss-free bias nor a balance loss — what its routing does unbalanced: 6.154,
# the mean of 6.283 / 6.398 / 5.779 over the finding's 3 seeds (95% t CI 5.34-6.97; 7 is the maximum, all tokens on
# 4 experts). Its runs were shorter than the demo's pretraining (`steps`); the finding's 600-step run stayed as
# unbalanced. The balance verdict of a pretraining of this shape is judged against it; other shapes fall back to
# the noise floor of balanced routing.
UNBALANCED_MAXVIO = {"maxvio": 6.154, "steps": 160, "seeds": 3, "source": "docs/findings/moe-balance.md",
                     "shape": {"experts": 32, "experts_per_token": 4, "moe_layers": 4, "tokens_per_step": 4096}}

# (b, a, what): the paired comparisons of held-out accuracy, b - a over the same problems
COMPARISONS = [("rl", "base", "GRPO on the base"),
               ("student-rl", "student-base", "(a) GRPO on the student"),
               ("student", "student-base", "(b) distillation into the student"),
               ("student", "student-rl", "(b) distillation vs (a) GRPO on the student")]
LABELS = {"base": "base (pretrained)", "rl": "base + GRPO", "student-base": "student (pretrained)",
          "student-rl": "student + GRPO (a)", "student": "student + distillation (b)"}


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _ci(pair: list[float] | tuple[float, float] | None) -> str:
    return "" if not pair else f"{100 * pair[0]:.1f}–{100 * pair[1]:.1f}%"


def _pts(x: float) -> str:
    return f"{100 * x:+.1f}"


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


# ------------------------------------------------------------------------------------------------------------
# numbers


def maxvio_noise_floor(tokens: int, experts: int, k: int, layers: int, steps: int = NOISE_STEPS,
                       seed: int = 0, sequences: int = 1) -> dict[str, float]:
    """MaxVio that perfectly balanced routing shows on a batch of `tokens` tokens through chance alone: every token
    picks its k experts uniformly at random in each of `layers` MoE layers; per simulated step the worst layer's
    max load / mean - 1. Returns its median and 95th percentile (numpy, seeded: the same on every machine).
    sequences > 1: the sequence-wise statistic (model.sequence_max_violation) — each of `sequences` sequences of
    `tokens` tokens has its own MaxVio, averaged over the sequences before taking the worst layer."""
    rng = np.random.default_rng(seed)
    worst = []
    for _ in range(steps):
        idx = np.argpartition(rng.random((layers, sequences, tokens, experts), dtype=np.float32), k,
                              axis=-1)[..., :k]
        offset = (np.arange(layers * sequences) * experts).reshape(layers, sequences, 1, 1)
        loads = np.bincount((idx + offset).ravel(), minlength=layers * sequences * experts).reshape(
            layers, sequences, experts)
        worst.append(float((loads.max(-1) / loads.mean(-1) - 1).mean(-1).max()))
    worst.sort()
    return {"median": worst[len(worst) // 2], "p95": worst[int(0.95 * len(worst))], "steps": steps}


def _model_info(path: Path) -> dict[str, Any]:
    cfg = config_from_hf(path / "config.json")
    counts = accounting.count_params(cfg)
    weights = sorted(path.glob("*.safetensors"))
    h = hashlib.sha256()
    for f in weights:  # the weights themselves: two runs that agree here trained the same model
        h.update(f.read_bytes())
    return {"layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size, "heads": cfg.num_attention_heads,
            "routed_experts": cfg.n_routed_experts, "experts_per_token": cfg.num_experts_per_tok,
            "params": counts["total"], "params_with_mtp": counts["total_with_mtp"], "activated": counts["activated"],
            "weights_sha256": h.hexdigest()}


def _comparison(root: Path, b: str, a: str, seed: int) -> dict[str, Any] | None:
    fa, fb = root / "eval" / a / "items.jsonl", root / "eval" / b / "items.jsonl"
    if not (fa.exists() and fb.exists()):
        return None
    ra, rb = read_jsonl(fa), read_jsonl(fb)
    out = {}
    for metric, key in (("pass@1", "pass1"), ("greedy", "greedy_correct")):
        d = paired_difference(per_item(ra, key), per_item(rb, key), seed=seed, reps=BOOTSTRAP_REPS)
        out[metric] = {"mean": d["mean"], "ci": list(d["ci"]), "n": d["n"]}
    return out


def build_report(root: Path, plan: Any, results: dict[str, dict[str, Any]], timings: dict[str, Any]) -> dict[str, Any]:
    """Every number of the report card, from the stages' results and the files they wrote."""
    seed = derive_seed(plan.seed, "report", bits=31)
    rep: dict[str, Any] = {"plan": plan.identity(), "stages_done": list(results)}
    rep["time_limited"] = {name: {"planned_steps": r["planned_steps"], "steps": r["steps"]}
                           for name, r in results.items() if isinstance(r, dict) and r.get("time_limited")}
    if "data" in results:
        rep["data"] = results["data"]
    rep["models"] = {name: _model_info(root / "models" / name) for name in LABELS
                     if (root / "models" / name / "config.json").exists()}
    rep["pretraining"] = {}
    for who, stage in (("base", "pretrain"), ("student", "student_pretrain")):
        if stage in results:
            r = dict(results[stage])
            mv = r["maxvio"]
            layers = len(mv["last_per_layer"])
            if layers:
                mv["noise_floor"] = maxvio_noise_floor(mv["tokens_per_step"], mv["experts"], mv["experts_per_token"],
                                                       layers, seed=derive_seed(seed, "maxvio", who, bits=31))
            rep["pretraining"][who] = r
    rep["rl"] = {who: results[stage] for who, stage in (("base", "rl"), ("student", "student_rl"))
                 if stage in results}
    rep["distillation"] = {k: results[s] for k, s in (("traces", "traces"), ("sft", "student_distill"))
                           if s in results}
    if "student_rl" in results and "traces" in results and "student_distill" in results:
        f_a = results["student_rl"]["flops"]
        f_gen = results["traces"]["teacher_sampling_flops"]
        f_sft = results["student_distill"]["sft_flops"]
        teacher = sum(results[s].get(k, 0.0) for s, k in (("pretrain", "train_flops"), ("rl", "flops"))
                      if s in results)
        rep["compute"] = {"a_student_grpo": f_a, "b_teacher_sampling": f_gen, "b_student_sft": f_sft,
                          "b_total": f_gen + f_sft, "b_over_a": (f_gen + f_sft) / f_a if f_a else None,
                          "shared_student_pretraining": results.get("student_pretrain", {}).get("train_flops"),
                          "teacher_training_not_charged": teacher}
    rep["eval"] = results.get("eval", {})
    rep["comparisons"] = {}
    for b, a, _ in COMPARISONS:
        c = _comparison(root, b, a, seed)
        if c is not None:
            rep["comparisons"][f"{b}-vs-{a}"] = c
    tokens = results.get("pretrain", {}).get("tokens")
    if tokens:
        v3 = accounting.cost_report(preset="deepseek-v3", tokens=float(tokens), gpu="h800", gpu_hour_price=2.0,
                                    mfu=0.4)
        full = accounting.cost_report(preset="deepseek-v3", tokens=14.8e12, gpu="h800", gpu_hour_price=2.0,
                                      gpu_hours_per_trillion=180000, extra_gpu_hours=[119e3, 5e3])
        rep["v3_scale"] = {"tokens": tokens, "gpu_hours": v3["total_gpu_hours"], "usd": v3["total_cost_usd"],
                           "real_gpu_hours": full["total_gpu_hours"], "real_usd": full["total_cost_usd"]}
    if any(k.startswith("janus_") for k in results):
        rep["janus"] = janus_report(root, results, seed)
    rep["verdicts"] = verdicts(rep) + janus_verdicts(rep)
    rep["timings"] = _timings(root, timings)
    rep["environment"] = environment()
    return rep


def _timings(root: Path, timings: dict[str, Any]) -> dict[str, Any]:
    """Wall times, and the throughput numbers that depend on them (not results: they vary with the machine's load)."""
    out = dict(timings)
    for name, run in (("pretrain", "pretrain"), ("student_pretrain", "student-pretrain")):
        recs = [r for r in read_jsonl(root / run / "metrics.jsonl") if "event" not in r][1:]  # step 1 warms up
        if recs:
            tps, mfu = sorted(r["tokens_per_s"] for r in recs), sorted(r["mfu"] for r in recs)
            out.setdefault("throughput", {})[name] = {"median_tokens_per_s": tps[len(tps) // 2],
                                                      "median_mfu": mfu[len(mfu) // 2]}
    return out


# ------------------------------------------------------------------------------------------------------------
# verdicts: a claim, whether it holds (True / False / None = not judged), the sentence, the rule


def _paired_rule(n: int) -> str:
    return (f"paired 95% bootstrap CI of the pass@1 difference ({BOOTSTRAP_REPS:,} resamples over the {n} held-out "
            "problems, nanoseek.stats.paired_difference) lies above 0 (better) or below 0 (worse), else no "
            "measurable difference; threshold 0, the CI's level 95% by convention")


def _paired_verdict(vid: str, what: str, d: dict[str, Any] | None) -> dict[str, Any]:
    if d is None:
        return {"id": vid, "holds": None, "outcome": "not judged",
                "text": f"{what}: not judged (a model or its evaluation is missing).", "rule": _paired_rule(0)}
    p = d["pass@1"]
    lo, hi = p["ci"]
    nums = f"{_pts(p['mean'])} points pass@1 (95% CI {_pts(lo)} to {_pts(hi)})"
    if lo > 0:
        outcome, text = "better", f"{what} improved held-out accuracy: {nums}."
    elif hi < 0:
        outcome, text = "worse", f"{what} lowered held-out accuracy: {nums}."
    else:
        outcome, text = "no measurable difference", f"{what} made no measurable difference: {nums}; the CI includes 0."
    return {"id": vid, "holds": outcome == "better", "outcome": outcome, "text": text, "rule": _paired_rule(p["n"]),
            "numbers": p}


def verdicts(rep: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    ev, cmp_ = rep.get("eval", {}), rep.get("comparisons", {})
    for name in ("base", "student-base"):
        if name in ev:
            s = ev[name]
            lo, hi = s["pass@1_ci"]
            holds = lo > 0
            out.append({"id": f"{name}-solves", "holds": holds, "outcome": "yes" if holds else "no",
                        "text": f"The {LABELS[name]} {'solves' if holds else 'is not shown to solve'} held-out "
                                f"problems: pass@1 {_pct(s['pass@1'])} (95% CI {_ci(s['pass@1_ci'])}).",
                        "rule": f"the 95% bootstrap CI of pass@1 over the {s['n_items']} held-out problems lies "
                                "above 0", "numbers": {"pass@1": s["pass@1"], "ci": [lo, hi]}})
    for b, a, what in COMPARISONS[:3]:
        out.append(_paired_verdict(f"{b}-vs-{a}", what, cmp_.get(f"{b}-vs-{a}")))
    # R1 §4.1: distilling a stronger model beats RL on the small model — judged only at equal training compute
    d, comp = cmp_.get("student-vs-student-rl"), rep.get("compute")
    rule = (f"the student's paired pass@1 difference, distillation - GRPO, as above; judged only when the two paths' "
            f"training FLOPs differ by at most {100 * COMPUTE_TOLERANCE:.0f}% ((b) counts the teacher's sampling; "
            "docs/findings/distill-vs-rl.md)")
    v = {"id": "distill-beats-rl", "rule": rule}
    if d is None or not comp or comp.get("b_over_a") is None:
        v.update(holds=None, outcome="not judged", text="Distillation vs RL on the student: not judged (a path or "
                                                        "its compute is missing).")
    elif abs(comp["b_over_a"] - 1) > COMPUTE_TOLERANCE:
        v.update(holds=None, outcome="not judged", text=f"Distillation vs RL on the student: not judged — path (b) "
                 f"used {comp['b_over_a']:.2f}x path (a)'s training FLOPs, outside the ±"
                 f"{100 * COMPUTE_TOLERANCE:.0f}% an equal-compute comparison allows.")
    else:
        p = d["pass@1"]
        lo, hi = p["ci"]
        nums = (f"{_pts(p['mean'])} points pass@1 (95% CI {_pts(lo)} to {_pts(hi)}) at {comp['b_over_a']:.2f}x the "
                "training FLOPs")
        if lo > 0:
            v.update(holds=True, outcome="better", text=f"Distillation beat RL on the student, as R1 §4.1 reports: "
                                                         f"{nums}.")
        elif hi < 0:
            v.update(holds=False, outcome="worse", text=f"RL beat distillation on the student, against R1 §4.1: "
                                                         f"{nums}.")
        else:
            v.update(holds=False, outcome="no measurable difference",
                     text=f"Distillation and RL on the student did not measurably differ: {nums}; the CI includes 0.")
        v["numbers"] = {**p, "b_over_a": comp["b_over_a"]}
    out.append(v)
    for who, pre in rep.get("pretraining", {}).items():
        out.append(_balance_verdict("base" if who == "base" else "student", pre["maxvio"]))
    return out


def _balance_verdict(name: str, mv: dict[str, Any]) -> dict[str, Any]:
    """Did the aux-loss-free bias balance the routing? Against the same shape trained without any balancing
    (UNBALANCED_MAXVIO, docs/findings/moe-balance.md) when the finding measured this shape; otherwise against the
    noise floor of perfectly balanced routing. Both references are printed."""
    nf = mv.get("noise_floor")
    stat = (f"the median over the last {mv['steps_each']} training steps of the worst MoE layer's MaxVio (max expert "
            "load / mean - 1)")
    noise = (f"perfectly balanced routing (each of a step's {mv['tokens_per_step']:,} tokens picks its "
             f"{mv['experts_per_token']} of {mv['experts']} experts uniformly at random; p95 of {NOISE_STEPS} "
             "simulated steps)")
    vid = f"{name}-routing-balanced"
    if nf is None:
        return {"id": vid, "holds": None, "outcome": "not judged",
                "text": f"Routing balance of the {name}: not judged (no MoE layer).", "rule": f"{stat}; no MoE layer"}
    ref = UNBALANCED_MAXVIO
    shape = {"experts": mv["experts"], "experts_per_token": mv["experts_per_token"],
             "moe_layers": len(mv["last_per_layer"]), "tokens_per_step": mv["tokens_per_step"]}
    if shape == ref["shape"]:
        holds = mv["last_steps"] < ref["maxvio"]
        rule = (f"{stat} is below {ref['maxvio']:.3f}, the same shape's trained with neither the bias nor a balance "
                f"loss ({ref['source']}: mean over {ref['seeds']} seeds of {ref['steps']} steps; same experts, "
                f"active experts, MoE layers and tokens per step); for scale, {noise} gives {nf['p95']:.3f}")
        text = (f"The {name}'s expert load {'was' if holds else 'was not'} balanced by the aux-loss-free bias: MaxVio "
                f"{mv['last_steps']:.3f} at the end of pretraining vs {ref['maxvio']:.3f} for the same model trained "
                f"without balancing ({ref['source']}), and {nf['p95']:.3f} for perfectly balanced routing "
                f"({mv['first_steps']:.3f} over the first {mv['steps_each']} steps).")
        return {"id": vid, "holds": holds, "outcome": "yes" if holds else "no", "text": text, "rule": rule,
                "numbers": {"maxvio": mv["last_steps"], "reference": ref["maxvio"], "noise_floor": nf["p95"]}}
    holds = mv["last_steps"] <= nf["p95"]
    rule = (f"{stat} is at most the same statistic under {noise} ({ref['source']} measured the no-balancing "
            "reference for the base's shape only)")
    text = (f"The {name}'s expert load {'was' if holds else 'was not'} balanced to within sampling noise: MaxVio "
            f"{mv['last_steps']:.3f} at the end of pretraining vs {nf['p95']:.3f} for perfectly balanced routing "
            f"({mv['first_steps']:.3f} over the first {mv['steps_each']} steps).")
    return {"id": vid, "holds": holds, "outcome": "yes" if holds else "no", "text": text, "rule": rule,
            "numbers": {"maxvio": mv["last_steps"], "reference": nf["p95"]}}


# ------------------------------------------------------------------------------------------------------------
# rendering


def accuracy_chart(ev: dict[str, dict[str, Any]], png: Path, k: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(ev)
    metrics = ["greedy", "pass@1", f"cons@{k}"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(metrics)
    for j, m in enumerate(metrics):
        vals = [100 * ev[n][m] for n in names]
        lo = [100 * (ev[n][m] - ev[n][m + "_ci"][0]) for n in names]
        hi = [100 * (ev[n][m + "_ci"][1] - ev[n][m]) for n in names]
        ax.bar([i + (j - 1) * width for i in range(len(names))], vals, width, label=m, yerr=[lo, hi], capsize=3)
    ax.set_xticks(range(len(names)), [LABELS[n].replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def _flops(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def render(rep: dict[str, Any], root: Path) -> str:
    env, plan = rep["environment"], rep["plan"]
    L = ["# nanoseek report card", "",
         f"The DeepSeek recipe at toy scale on {env['cpu'] or 'this machine'} ({env['cores']} cores, "
         f"{env['threads']} threads" + (f", GPU {env['cuda']}" if env["cuda"] else ", CPU only") + f"), {env['date']}."
         " Every number below is in `report.json`; the judgements come from the rules printed with them.", ""]
    if rep["time_limited"]:
        cut = ", ".join(f"{k} {v['steps']} of {v['planned_steps']} steps" for k, v in rep["time_limited"].items())
        L += [f"**This run was time-limited (`--max-minutes`)**: {cut}. Its numbers are not those of the fixed "
              "plan and differ from run to run.", ""]

    L += ["## What the numbers say", "", "| | verdict | rule (threshold, source) |", "|---|---|---|"]
    for v in rep["verdicts"]:
        mark = {True: "yes", False: "no", None: "not judged"}[v["holds"]]
        L.append(f"| {mark} | {v['text']} | {v['rule']} |")
    L.append("")

    # ---- the models
    models = rep["models"]
    if "base" in models:
        m = models["base"]
        narrowed = " with " + ", ".join(f"{k}={v}" for k, v in plan["model_overrides"].items()) \
            if plan["model_overrides"] else ""
        cfg = config_from_hf(root / "models" / "base" / "config.json")
        kv = accounting.kv_cache_bytes(cfg)
        L += ["## The model", "",
              f"The base: `{plan['preset']}` preset{narrowed}: {m['layers']} layers, hidden {m['hidden']}, "
              f"{m['heads']} MLA heads (kv_lora_rank {cfg.kv_lora_rank}, rope dim {cfg.qk_rope_head_dim}), "
              f"{cfg.n_shared_experts} shared + {m['routed_experts']} routed experts "
              f"({m['experts_per_token']} active), "
              f"{cfg.num_nextn_predict_layers} MTP module(s), vocab {cfg.vocab_size}."
              + (f" The student: `{plan['student_preset']}` preset, {models['student-base']['layers']} layers, hidden "
                 f"{models['student-base']['hidden']}, {models['student-base']['routed_experts']} routed experts."
                 if "student-base" in models else ""), "",
              "| model | parameters | with MTP | activated per token | weights (sha256) |", "|---|---|---|---|---|"]
        for name, mi in models.items():
            L.append(f"| {LABELS[name]} | {mi['params']:,} | {mi['params_with_mtp']:,} | {mi['activated']:,} | "
                     f"`{mi['weights_sha256'][:12]}` |")
        L += ["", f"KV cache per token ({kv['dtype']}): MLA {kv['mla_bytes_per_token']:,} B vs MHA with the same "
              f"heads {kv['mha_bytes_per_token']:,} B ({kv['mha_bytes_per_token'] / kv['mla_bytes_per_token']:.1f}x "
              "smaller).", ""]

    # ---- pretraining
    if rep["pretraining"]:
        L += ["## Pretraining", "", f"Both models on the same {rep.get('data', {}).get('documents', 0):,} documents "
              f"({rep.get('data', {}).get('tokens', 0):,} tokens), batch {plan['batch_size']} x {plan['seq_len']}, "
              f"lr {plan['pretrain_lr']:g}, WSD schedule (decay over the last {100 * plan['decay_ratio']:.0f}%).", "",
              "| model | steps | tokens | loss first -> last | main / MTP loss (last) | MaxVio per layer (last step) |",
              "|---|---|---|---|---|---|"]
        for who, p in rep["pretraining"].items():
            L.append(f"| {who} | {p['steps']} of {p['planned_steps']} | {p['tokens']:,} | {p['loss_first']:.3f} -> "
                     f"{p['loss_last']:.3f} | {p['main_last']:.3f} / {p['mtp_last'] or float('nan'):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in p['maxvio']['last_per_layer'])} |")
        L.append("")
        for who, png in (("base", "pretrain.png"), ("student", "student-pretrain.png")):
            if who in rep["pretraining"]:
                L += [f"![{who} pretraining]({png})", ""]

    # ---- RL
    if rep["rl"]:
        L += ["## GRPO (R1-Zero style)", "",
              f"{plan['rl_prompts']} prompts x {plan['rl_group']} samples per step, rule-based rewards (accuracy + "
              "format), prompts in the R1 chat format (the one `nanoseek chat`/`serve` use), constant lr. First vs "
              "last fifth of the steps:", "",
              "| model | steps | lr | rollout reward | rollout accuracy | response length | groups without signal | "
              "training FLOPs |", "|---|---|---|---|---|---|---|---|"]
        for who, r in rep["rl"].items():
            L.append(f"| {who} | {r['steps']} of {r['planned_steps']} | {r['lr']:g} | {r['reward_mean_first']:.2f} -> "
                     f"{r['reward_mean_last']:.2f} | {_pct(r['accuracy_first'])} -> {_pct(r['accuracy_last'])} | "
                     f"{r['len_mean_first']:.0f} -> {r['len_mean_last']:.0f} | {_pct(r['zero_var_frac_first'])} -> "
                     f"{_pct(r['zero_var_frac_last'])} | {_flops(r['flops'])} |")
        L.append("")
        for who, png in (("base", "rl.png"), ("student", "student-rl.png")):
            if who in rep["rl"]:
                L += [f"![{who} GRPO]({png})", ""]

    # ---- distillation
    dist = rep["distillation"]
    if dist:
        L += ["## Distillation vs RL on the student (R1 §4.1)", ""]
        t = dist.get("traces")
        if t:
            rej = ", ".join(f"{k} {v}" for k, v in t["rejected"].items()) or "none"
            L += [f"Path (b): the RL model sampled {t['samples']:,} traces on training prompts (T 0.6, top_p 0.95); "
                  f"rejection sampling kept {t['accepted']:,} ({_pct(t['acceptance_rate'])}; rejected: {rej}).", ""]
        s = dist.get("sft")
        if s and s.get("skipped"):
            L += [f"No distilled student: {s['skipped']}.", ""]
        elif s:
            L += [f"The pretrained student was fine-tuned on them for {s['steps']} of {s['planned_steps']} SFT steps "
                  f"(lr {s['lr']:g}), the steps that make (b)'s training FLOPs equal to (a)'s"
                  + (f"; trained on {s['fallback']}" if s.get("fallback") else "") + ".", ""]
        c = rep.get("compute")
        if c:
            L += ["| training compute | FLOPs |", "|---|---|",
                  f"| (shared) student pretraining | {_flops(c['shared_student_pretraining'])} |",
                  f"| (a) GRPO on the student: rollouts + updates | {_flops(c['a_student_grpo'])} |",
                  f"| (b) teacher sampling (the RL model's traces) | {_flops(c['b_teacher_sampling'])} |",
                  f"| (b) student SFT | {_flops(c['b_student_sft'])} |",
                  f"| (b) total | {_flops(c['b_total'])} ({c['b_over_a']:.2f}x (a)) |",
                  f"| teacher training (pretraining + GRPO), not charged to (b), as in R1 | "
                  f"{_flops(c['teacher_training_not_charged'])} |", ""]

    # ---- evaluation
    ev = rep["eval"]
    if ev:
        first = next(iter(ev.values()))
        k, n = first["k"], first["n_items"]
        L += ["## Held-out accuracy", "",
              f"The same {n} held-out problems for every model; greedy, pass@1 averaged over {k} samples at "
              "temperature 0.6 / top_p 0.95 (R1's protocol), and cons@k (majority vote). 95% CIs: Wilson "
              "(greedy, cons@k), bootstrap (pass@1).", "",
              f"| model | greedy | pass@1 | cons@{k} |", "|---|---|---|---|"]
        for name, s in ev.items():
            L.append(f"| {LABELS[name]} | {_pct(s['greedy'])} ({_ci(s['greedy_ci'])}) | {_pct(s['pass@1'])} "
                     f"({_ci(s['pass@1_ci'])}) | {_pct(s[f'cons@{k}'])} ({_ci(s[f'cons@{k}_ci'])}) |")
        L += ["", "![accuracy](accuracy.png)", ""]
        if rep["comparisons"]:
            L += ["Paired differences over the same problems (b - a; 95% bootstrap CIs, "
                  f"{BOOTSTRAP_REPS:,} resamples):", "", "| comparison | pass@1 (points) | greedy (points) |",
                  "|---|---|---|"]
            for b, a, what in COMPARISONS:
                c = rep["comparisons"].get(f"{b}-vs-{a}")
                if c:
                    p, g = c["pass@1"], c["greedy"]
                    L.append(f"| {what} | {_pts(p['mean'])} ({_pts(p['ci'][0])} to {_pts(p['ci'][1])}) | "
                             f"{_pts(g['mean'])} ({_pts(g['ci'][0])} to {_pts(g['ci'][1])}) |")
            L.append("")
        samples = read_jsonl(root / "eval" / "rl" / "items.jsonl")[:3]
        if samples:
            L += ["### Sample completions (base + GRPO, greedy)", ""]
            for s in samples:
                L += [f"**{s['prompt']}** (answer {s['answer']}; {'correct' if s['greedy_correct'] else 'wrong'})",
                      "", "```", (s["greedy_text"] or "").strip()[:800], "```", ""]

    L += janus_markdown(rep)

    v3 = rep.get("v3_scale")
    if v3:
        L += ["## The same recipe at DeepSeek-V3 scale", "",
              f"Pretraining V3 on this demo's {v3['tokens']:,} tokens would cost {v3['gpu_hours']:,.2f} H800 "
              f"GPU-hours (${v3['usd']:,.2f}) at 40% MFU; the real run, 14.8T tokens, took "
              f"{v3['real_gpu_hours'] / 1e3:,.0f}K GPU-hours (${v3['real_usd'] / 1e6:.3f}M), the report's own "
              "figure (`nanoseek cost` given the report's rate, extra hours and price).", ""]

    # ---- timings and environment: the numbers that vary between runs
    tm = rep["timings"]
    L += ["## Stages and wall time", "", "| stage | wall time | reference estimate | budget |", "|---|---|---|---|"]
    for name, s in tm.get("stages", {}).items():
        budget = f"{s['budget_s']:.0f}s" if s.get("budget_s") is not None else "—"
        L.append(f"| {name} | {s['seconds']:.0f}s | {s.get('estimate_s', 0):.0f}s | {budget} |")
    total = sum(s["seconds"] for s in tm.get("stages", {}).values())
    L += ["", f"Total: **{total / 60:.1f} min** over all stages (installation not included)."]
    for name, t in tm.get("throughput", {}).items():
        L.append(f"{name}: median {t['median_tokens_per_s']:,.0f} tokens/s, MFU {100 * t['median_mfu']:.1f}% of "
                 "the matmul peak measured at start-up.")
    L += ["", "## Environment", "", "| | |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in env.items()]
    L += ["", "## Talk to the models", "", "```bash", f"nanoseek chat --model {root / 'models' / 'rl'}",
          f"nanoseek serve --model {root / 'models' / 'rl'}   # OpenAI-compatible API + web chat at /", "```", ""]
    return "\n".join(L)


def write_report(root: Path, plan: Any, results: dict[str, dict[str, Any]], timings: dict[str, Any]) -> Path:
    """OUT/report/report.json (all the numbers, written atomically), then report.md and the PNGs from it."""
    out = root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = build_report(root, plan, results, timings)
    atomic_write_json(out / "report.json", rep)
    for src, dst in (("pretrain/loss.png", "pretrain.png"), ("student-pretrain/loss.png", "student-pretrain.png"),
                     ("rl/rl.png", "rl.png"), ("student-rl/rl.png", "student-rl.png")):
        if (root / src).exists():
            shutil.copyfile(root / src, out / dst)
    if rep["eval"]:
        accuracy_chart(rep["eval"], out / "accuracy.png", plan.eval_k)
    j = rep.get("janus", {})
    for src, dst in (("janus/run/loss.png", "janus-train.png"), ("janus/eval/geneval/grid.png", "janus-grid.png")):
        if (root / src).exists():
            shutil.copyfile(root / src, out / dst)
    if j.get("guidance"):
        janus_guidance_chart(j["guidance"], out / "janus-guidance.png")
    path = atomic_write(out / "report.md", render(rep, root))
    return path


# ------------------------------------------------------------------------------------------------------------
# the mini Janus (the demo's janus_* stages, nanoseek.janus_experiment)

JANUS_VERIFIER_MIN = 0.98  # the bar: below it the generation score measures the checker, not the model


def _janus_pair(root: Path, a: str, b: str, seed: int) -> dict[str, Any] | None:
    """b - a over the same items (per-item pass@1 of two items.jsonl files under OUT)."""
    fa, fb = root / a, root / b
    if not (fa.exists() and fb.exists()):
        return None
    d = paired_difference(per_item(read_jsonl(fa)), per_item(read_jsonl(fb)), seed=seed, reps=BOOTSTRAP_REPS)
    return {"mean": d["mean"], "ci": list(d["ci"]), "n": d["n"]}


def janus_report(root: Path, results: dict[str, dict[str, Any]], seed: int) -> dict[str, Any]:
    """The Janus part's numbers: the world, the VQ, training, the evaluation and its paired comparisons."""
    rep: dict[str, Any] = {k.removeprefix("janus_"): results[k] for k in ("janus_data", "janus_vq", "janus_train")
                           if k in results}
    ev = results.get("janus_eval")
    if not ev:
        return rep
    g, v, d = ev["geneval"], ev["vqa"], ev["dir"]
    rep["geneval"] = {k: g[k] for k in ("n_items", "cfg_weight", "temperature", "categories", "overall",
                                        "geneval_overall", "baselines", "grid_prompts") if k in g}
    rep["vqa"] = {k: v[k] for k in ("n_items", "encoder", "kinds", "overall", "baselines") if k in v}
    rep["guidance"] = {w: {k: c[k] for k in ("overall", "geneval_overall", "categories")}
                       for w, c in ev["guidance"].items()}
    cw = f"{g['cfg_weight']:g}"
    low = min(ev["guidance"], key=float)
    rep["comparisons"] = {
        "model-vs-shuffled": _janus_pair(root, f"{d}/geneval/baselines/shuffled/items.jsonl",
                                         f"{d}/geneval/items.jsonl", seed),
        "model-vs-majority": _janus_pair(root, f"{d}/vqa/baselines/majority/items.jsonl", f"{d}/vqa/items.jsonl",
                                         seed),
        "guidance-vs-none": None if low == cw else {
            **(_janus_pair(root, ev["guidance"][low]["items"], ev["guidance"][cw]["items"], seed) or {}),
            "weights": [float(low), float(cw)]}}
    return rep


def janus_verdicts(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """The Janus part's judgements, each from a stated rule over report.json's numbers."""
    j = rep.get("janus", {})
    if "geneval" not in j:
        return []
    out = []
    ver = j["geneval"]["baselines"]["verifier_on_ground_truth"]["overall"]
    ok = ver["pass@1"] >= JANUS_VERIFIER_MIN
    out.append({"id": "janus-verifier-valid", "holds": ok, "outcome": "yes" if ok else "no",
                "text": f"The image verifier {'is' if ok else 'is not'} trustworthy on this world: "
                        f"{_pct(ver['pass@1'])} correct on {ver['n']} freshly rendered ground-truth images of the "
                        "test prompts" + ("" if ok else ", so the generation scores below measure the checker too")
                        + ".",
                "rule": f"verifier accuracy on fresh ground truth >= {100 * JANUS_VERIFIER_MIN:.0f}% (the mini-Janus "
                        "issue's bar)", "numbers": {"accuracy": ver["pass@1"], "n": ver["n"]}})

    def paired(vid: str, d: dict[str, Any] | None, yes: str, no: str, what: str) -> None:
        rule = (f"paired 95% bootstrap CI ({BOOTSTRAP_REPS:,} resamples, nanoseek.stats.paired_difference) of the "
                f"per-item difference, {what}, lies above 0; threshold 0, 95% by convention")
        if not d or "mean" not in d:
            out.append({"id": vid, "holds": None, "outcome": "not judged", "text": f"{yes}: not judged.",
                        "rule": rule})
            return
        nums = f"{_pts(d['mean'])} points (95% CI {_pts(d['ci'][0])} to {_pts(d['ci'][1])}, {d['n']} items)"
        holds = d["ci"][0] > 0
        outcome = "yes" if holds else "worse" if d["ci"][1] < 0 else "no measurable difference"
        text = f"{yes}: {nums}." if holds else f"{no}: {nums}" + (" — worse." if outcome == "worse" else ".")
        out.append({"id": vid, "holds": holds, "outcome": outcome, "text": text, "rule": rule, "numbers": d})

    c = j["comparisons"]
    paired("janus-follows-prompts", c["model-vs-shuffled"],
           "The mini Janus' images follow their prompts: it beat images drawn for shuffled prompts",
           "The mini Janus' images are not shown to follow their prompts better than images drawn for shuffled "
           "prompts", "model - shuffled-prompt images, scored against the same prompts")
    paired("janus-understands", c["model-vs-majority"],
           "The mini Janus reads the images: it beat the majority-answer guesser that sees only the question",
           "The mini Janus is not shown to read the images better than a majority-answer guesser",
           "model - majority answer, over the same questions")
    g = c.get("guidance-vs-none") or {}
    w = g.get("weights", [1.0, j["geneval"]["cfg_weight"]])
    paired("janus-guidance-helps", g, f"Classifier-free guidance (w = {w[1]:g}) improved the score over w = {w[0]:g}",
           f"Guidance w = {w[1]:g} is not shown to improve the score over w = {w[0]:g}",
           f"w = {w[1]:g} - w = {w[0]:g}, same prompts and sampling seeds")
    return out


ENCODER_NAMES = {"vit": "ViT (decoupled encoding)", "vq": "VQ tokens (shared encoding)"}


def janus_markdown(rep: dict[str, Any]) -> list[str]:
    """The report card's mini Janus section (empty without the Janus part)."""
    j = rep.get("janus")
    if not j:
        return []
    L = ["## Mini Janus: a unified image understander and generator trained from scratch", ""]
    t, data, vq = j.get("train"), j.get("data"), j.get("vq")
    if data:
        L += [f"World: {data['scenes']:,} training scenes of 32 x 32 images with 1-3 coloured shapes "
              f"({data['questions']:,} questions); held-out colour-shape pairings "
              f"{', '.join(' '.join(p) for p in data['world']['holdout'])} appear only in the test prompts.", ""]
    if vq:
        L += [f"VQ tokenizer (frozen afterwards): {vq['steps']} steps, reconstruction loss {vq['rec_loss']:.4f}, "
              f"codebook perplexity {vq['perplexity']:.0f}, {100 * vq['codes_alive']:.0f}% of codes alive.", ""]
    if t:
        L += [f"The model: the `janus-mini` preset, a DeepSeek-V3 trunk (MLA + DeepSeekMoE) between a ViT "
              f"understanding encoder and the VQ's generation path; {t['params']:,} parameters ({t['trainable']:,} "
              f"trained; the VQ is frozen). {t['steps']} of {t['planned_steps']} steps; losses over the first -> last "
              f"{t['steps_averaged']} steps: image tokens {t['t2i_first']:.2f} -> {t['t2i_last']:.2f}, answers "
              f"{t['und_first']:.2f} -> {t['und_last']:.2f}, captions {t['text_first']:.2f} -> {t['text_last']:.2f}.",
              "", "![janus training](janus-train.png)", ""]
    g = j.get("geneval")
    if g:
        b = g["baselines"]
        cols = [("model", g), ("shuffled prompts", b["shuffled_prompts"]), ("VQ ceiling", b["vq_ceiling"]),
                ("verifier on ground truth", b["verifier_on_ground_truth"])]
        L += [f"### Text to image, GenEval-style ({g['n_items']} held-out prompts, guidance {g['cfg_weight']:g})",
              "", "| category | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---|" * len(cols)]
        for cat in g["categories"]:
            L.append(f"| {cat} | " + " | ".join(
                f"{_pct(x['categories'][cat]['pass@1'])} ({_ci(x['categories'][cat]['ci'])})"
                if cat in x["categories"] else "—" for _, x in cols) + " |")
        L.append("| **overall** | " + " | ".join(f"{_pct(x['overall']['pass@1'])} ({_ci(x['overall']['ci'])})"
                                                for _, x in cols) + " |")
        L += ["", "95% Wilson intervals. *Shuffled prompts*: images generated for another held-out prompt, scored "
              "against this one (what ignoring the prompt scores). *VQ ceiling*: the verifier on ground-truth images "
              "after a VQ round trip (what the tokenizer allows). *Verifier on ground truth*: the checker itself.", "",
              "![generated images](janus-grid.png)", "",
              "One row per category, its first held-out prompts left to right; the first column: "
              + "; ".join(f"{c}: *{ps[0]}*" for c, ps in g.get("grid_prompts", {}).items() if ps) + ".", ""]
    v = j.get("vqa")
    if v:
        m = v.get("baselines", {}).get("majority_answer", {})
        enc = ENCODER_NAMES.get(v["encoder"], v["encoder"])
        L += [f"### Understanding ({v['n_items']} questions on held-out scenes, through the {enc})",
              "", "| question | model | majority-answer guesser |", "|---|---|---|"]
        for k, e in v["kinds"].items():
            mk = m.get("kinds", {}).get(k)
            L.append(f"| {k} | {_pct(e['pass@1'])} ({_ci(e['ci'])}) | "
                     + (f"{_pct(mk['pass@1'])} ({_ci(mk['ci'])})" if mk else "—") + " |")
        L.append(f"| **overall** | {_pct(v['overall']['pass@1'])} ({_ci(v['overall']['ci'])}) | "
                 + (f"{_pct(m['overall']['pass@1'])} ({_ci(m['overall']['ci'])})" if m else "—") + " |")
        L.append("")
    if j.get("guidance"):
        L += ["### Guidance", "", "| guidance weight | " + " | ".join(j["guidance"]) + " |",
              "|---|" + "---|" * len(j["guidance"]),
              "| accuracy (95% CI) | " + " | ".join(f"{_pct(c['overall']['pass@1'])} ({_ci(c['overall']['ci'])})"
                                                  for c in j["guidance"].values()) + " |", "",
              "![guidance curve](janus-guidance.png)", "",
              "The full sweep (1-10) and what too much guidance draws: docs/findings/janus.md.", ""]
    return L


def janus_guidance_chart(guidance: dict[str, Any], png: Path) -> Path:
    cells = guidance.values()
    return guidance_chart([float(w) for w in guidance], [c["overall"] for c in cells],
                          [c["categories"] for c in cells], png, figsize=(5.5, 3.4), dpi=110)
