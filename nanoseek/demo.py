"""`nanoseek demo`: the DeepSeek recipe on a laptop CPU, ending in a report card whose numbers are the same on every
run (same seed, machine type and thread count) and whose judgements come from rules over those numbers.

Stages (nanoseek.experiment runs them: resumable, `--skip` / `--only`, timings kept apart from results). Every stage
does a fixed amount of work — steps, samples, problems — so no clock decides a headline number; `--max-minutes M`
is the one way to trade work for time, and the report then says the run was time-limited.
  data              synthetic arithmetic with chain of thought in the R1 chat format; a BPE tokenizer; token shards
  pretrain          the base: a narrowed `small` MLA + DeepSeekMoE + MTP model (aux-loss-free balancing)
  rl                GRPO on the base, R1-Zero style (rule-based accuracy + format rewards), in the chat format
  student_pretrain  a smaller student (the `tiny` shape), pretrained on the same corpus with the same recipe
  student_rl        path (a): GRPO on the student itself
  traces            path (b), part 1: the RL model's traces on training prompts, kept by rejection sampling
  student_distill   path (b), part 2: SFT of the pretrained student on them, for as many steps as make (b)'s
                    training FLOPs (teacher sampling included) equal to (a)'s — R1 §4.1's comparison
  eval              base, RL, student base, student + RL, student + distillation on the same held-out problems
  janus_data .. janus_eval   the mini Janus (nanoseek.janus_experiment): the shapes world, its VQ tokenizer, the
                    unified model trained from scratch, the GenEval-style and VQA evaluation; `--only janus` /
                    `--skip janus` select the four
Then the report: OUT/report/report.md + report.json + PNGs (nanoseek.report).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from . import experiment
from .experiment import Stage, StageRun
from .files import atomic_dir, atomic_write_jsonl, read_jsonl
from .janus_experiment import JanusPlan, expand_stage_names
from .janus_experiment import demo_stages as janus_stages
from .stats import derive_seed
from .tasks import Task, get_task

# The models the demo publishes under OUT/models, in the order the report lists them.
MODELS = ("base", "rl", "student-base", "student-rl", "student")


@dataclass
class DemoPlan:
    """The work of one demo run. Every number here is fixed work; the `*_step_s` and other timing fields are
    reference estimates (a 2-core Xeon running alone, fp32, 2 threads; docs/demo.md says where each comes from) used
    only for the time printed at the start and for `--max-minutes` budgets, never for results."""

    fast: bool = False
    seed: int = 0
    task: str = "arithmetic"
    # 2-digit +, -, and 2x1-digit products with a column-by-column chain of thought (~140 tokens per document)
    task_options: dict[str, Any] = field(default_factory=lambda: {"max_digits": 2, "mul_digits": (2, 1)})
    n_train: int = 12000
    vocab_size: int = 1024
    # the base: the `small` preset's architecture (MLA + DeepSeekMoE with a shared expert + MTP, aux-loss-free
    # balancing) at half its width and 4 of its 6 layers. Measured (docs/LOG.md, 2026-11-24): in 300 s the full
    # `small` reaches 0-5% held-out accuracy, this one 56%: at this budget optimizer steps, not width, limit learning
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384, "moe_intermediate_size": 64,
        "q_lora_rank": 96, "kv_lora_rank": 64})
    seq_len: int = 256
    batch_size: int = 16
    # 600 steps, WSD with the decay over the last 30%: what the 300 s budget of the time-sized demo reached on a quiet
    # machine (479-587 steps, docs/LOG.md), now fixed. Measured (docs/LOG.md, 2026-12-05): at 450 steps the base
    # solved 25% and its RL model was a weaker teacher than the student it was distilled into; the base's strength
    # is what the distillation comparison stands on, so GRPO and the student's pretraining shrank instead
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 20
    decay_ratio: float = 0.3
    # GRPO on the base. lr measured (docs/LOG.md): 1e-4 lost 20 points in 60 steps, 4e-5 gained 4.5 greedy in 79.
    # 56 steps (8 prompts x 8 samples each): the time-sized demo ran ~118 in 240 s; it shrank to make room for the
    # student's stages and the 15-minute text recipe
    rl_steps: int = 56
    rl_group: int = 8
    rl_prompts: int = 8
    rl_max_new: int = 160
    rl_lr: float = 4e-5
    # the student: the `tiny` shape (hidden 64, 2 layers, 8 routed experts), ~12x fewer parameters than the base.
    # docs/findings/distill-vs-rl.md: this shape at 1,200 steps of the same 16 x 256 batches on the same task
    # reached 43% held-out pass@1 — weak enough that both paths have room, strong enough that GRPO gets signal;
    # 800 steps here (at 1,000 the demo's student reached 48%, at 1,200 70%: more than the base)
    student_preset: str = "tiny"
    student_overrides: dict[str, Any] = field(default_factory=dict)
    student_pretrain_steps: int = 800
    # GRPO on the student: the base's recipe at the lr that worked for this shape (docs/findings/distill-vs-rl.md:
    # 1e-4 of 3e-5 / 1e-4 / 5e-4)
    student_rl_steps: int = 96
    student_rl_lr: float = 1e-4
    # distillation: one sample per training prompt from the RL model at R1's T 0.6 / top_p 0.95, rejection-sampled
    # by the task's verifier; the SFT lr of docs/findings/distill-vs-rl.md
    distill_prompts: int = 1500
    distill_samples: int = 1
    distill_lr: float = 1e-3
    distill_verifier: str | None = None  # None: the task's verifier (rejection sampling); "none" keeps every trace
    # evaluation: the same held-out problems for every model
    eval_n: int = 300
    eval_k: int = 4
    # engine rows for evaluation and trace sampling: at 128 rows eval ran 44% faster than at 32 (same answers), the
    # per-token Python step being shared by more rows
    sample_batch: int = 128
    # where every stage runs: None = CUDA if available, else CPU; "auto" precision is fp32 on a CPU (the estimates
    # were measured so) and bf16 on CUDA (nanoseek.device.resolve_dtype)
    device: str | None = None
    dtype: str = "auto"
    # ---- reference timings (not part of the plan's identity): see docs/demo.md
    # the quiet fixed-work run of docs/LOG.md (2026-12-04, run 2) on the 2-core Zen 4: 600 base steps in 420 s, 80
    # GRPO steps in 200 s, 1,200 student steps in 192 s, 120 student GRPO steps in 73 s, eval 150 s at 32 rows
    pretrain_step_s: float = 0.70
    student_step_s: float = 0.16
    rl_step_s: float = 2.5
    student_rl_step_s: float = 0.60
    # one completion of the base / the student at 128 rows: run 2's eval (at 32 rows) times 0.56, split as before
    sample_s: float = 0.013
    student_sample_s: float = 0.0075
    # the Janus part (nanoseek.janus_experiment: world, VQ, unified training, eval; `--only janus`, `--skip janus`)
    janus: JanusPlan = field(default_factory=JanusPlan)

    @classmethod
    def make(cls, fast: bool) -> DemoPlan:
        if not fast:
            return cls()
        # toy sizes that still run every stage and every code path; the numbers mean nothing
        return cls(fast=True, n_train=300, vocab_size=512, preset="tiny", model_overrides={}, seq_len=128,
                   batch_size=8, pretrain_steps=6, pretrain_warmup=2, rl_steps=2, rl_group=2, rl_prompts=2,
                   rl_max_new=16, student_overrides={"num_hidden_layers": 1, "first_k_dense_replace": 0},
                   student_pretrain_steps=4, student_rl_steps=2, distill_prompts=6, eval_n=4, eval_k=2,
                   distill_verifier="none",  # a toy model solves nothing: keep its traces to exercise the path
                   pretrain_step_s=0.04, student_step_s=0.02, rl_step_s=0.3, student_rl_step_s=0.2, sample_s=0.01,
                   student_sample_s=0.01, janus=JanusPlan.make(True))

    def identity(self) -> dict[str, Any]:
        """What must match for two runs (or a run and its resume) to be the same experiment: everything but the
        reference timings."""
        timing = {"pretrain_step_s", "student_step_s", "rl_step_s", "student_rl_step_s", "sample_s",
                  "student_sample_s"}
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k not in timing},
                "janus": self.janus.identity()}

    def estimates(self) -> dict[str, float]:
        """Seconds per stage on the reference machine (the work above times the per-step references, plus a few
        seconds per stage for loading, saving and plots)."""
        n_eval = self.eval_n * (self.eval_k + 1)
        return {"data": 8.0 if not self.fast else 1.0,
                "pretrain": self.pretrain_steps * self.pretrain_step_s + 5,
                "rl": self.rl_steps * self.rl_step_s + 5,
                "student_pretrain": self.student_pretrain_steps * self.student_step_s + 5,
                "student_rl": self.student_rl_steps * self.student_rl_step_s + 5,
                "traces": self.distill_prompts * self.distill_samples * self.sample_s + 5,
                # matched compute gave 84 SFT steps in the 2026-12-05 run (docs/LOG.md)
                "student_distill": (90 if not self.fast else 2) * self.student_step_s + 8,
                "eval": 2 * n_eval * self.sample_s + 3 * n_eval * self.student_sample_s + 10}


def stages(plan: DemoPlan) -> list[Stage]:
    est = plan.estimates()
    tok = plan.batch_size * plan.seq_len

    def stage(name: str, fn: Any, work: str, needs: tuple[str, ...] = (), fits_time: bool = False) -> Stage:
        return Stage(name, lambda r: fn(r, plan), needs=needs, work=work, estimate_s=est[name], fits_time=fits_time)

    return [
        stage("data", stage_data, f"{plan.n_train:,} problems, BPE vocab {plan.vocab_size}"),
        stage("pretrain", stage_pretrain, f"{plan.pretrain_steps} steps x {tok:,} tokens", ("data",), True),
        stage("rl", stage_rl, f"{plan.rl_steps} GRPO steps x {plan.rl_prompts} prompts x {plan.rl_group} samples",
              ("pretrain",), True),
        stage("student_pretrain", stage_student_pretrain, f"{plan.student_pretrain_steps} steps x {tok:,} tokens",
              ("data",), True),
        stage("student_rl", stage_student_rl, f"{plan.student_rl_steps} GRPO steps x {plan.rl_prompts} prompts x "
              f"{plan.rl_group} samples", ("student_pretrain",), True),
        stage("traces", stage_traces, f"{plan.distill_prompts:,} prompts x {plan.distill_samples} sample(s) from "
              "the RL model", ("rl",)),
        stage("student_distill", stage_student_distill, "SFT steps matching path (a)'s training FLOPs",
              ("student_pretrain", "student_rl", "traces"), True),
        stage("eval", stage_eval, f"{len(MODELS)} models x {plan.eval_n} held-out problems x ({plan.eval_k} "
              "samples + greedy)", ("pretrain",)),
        *janus_stages(plan.janus),
    ]


def calibrate(plan: DemoPlan, device: str | None = None) -> float:
    """This machine's time relative to the reference: two timed training steps of the base model (after one
    warm-up) on random tokens, against `plan.pretrain_step_s`. A few seconds; no global RNG is touched."""
    from .device import resolve_device
    from .model import ModelConfig, build
    from .train import TrainConfig, build_optimizers

    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build(ModelConfig.from_preset(plan.preset, vocab_size=plan.vocab_size, **plan.model_overrides),
                      device=dev)
        opts = build_optimizers(model, TrainConfig(lr=plan.pretrain_lr))
        x = torch.randint(0, plan.vocab_size, (plan.batch_size, plan.seq_len + 1), device=dev)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            model.loss(x[:, :-1], x[:, 1:], mtp_lambda=0.3)["loss"].backward()
            for o in opts:
                o.step()
                o.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
    return min(times[1:]) / plan.pretrain_step_s


def run_demo(out: str = "runs/demo", fast: bool = False, fresh: bool = False, device: str | None = None,
             dtype: str = "auto", skip: list[str] | None = None, only: list[str] | None = None,
             max_minutes: float | None = None, threads: int | None = None) -> int:
    from .device import dtype_name, resolve_device
    from .report import write_report

    console = Console()
    root = Path(out)
    resolve_device(device)  # bad --device/--dtype fail now, not after the data stage
    dtype_name(dtype, training=True)
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    plan = DemoPlan.make(fast)
    plan.device, plan.dtype = device, dtype
    plan.janus.seed, plan.janus.device = plan.seed, device
    all_stages = stages(plan)
    threads_before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)  # results differ in their last digits between thread counts
    try:
        outcome = experiment.run(root, all_stages, plan.identity(), skip=expand_stage_names(skip or []),
                                 only=expand_stage_names(only or []), fresh=fresh,
                                 max_minutes=max_minutes, slowdown=lambda: calibrate(plan, device), console=console,
                                 title=f"nanoseek demo{' --fast' if fast else ''}", threads=torch.get_num_threads())
        if outcome.interrupted:
            return 130
        path = write_report(root, plan, outcome.results, outcome.timings)
    finally:
        torch.set_num_threads(threads_before)
    total = sum(s["seconds"] for s in outcome.timings["stages"].values())
    console.rule("done")
    console.print(f"{len(outcome.ran)} stage(s) run this time; {total / 60:.1f} min over all stages")
    console.print(f"report:  [bold]{path}[/]")
    for name in MODELS:
        if (root / "models" / name).exists():
            console.print(f"model {name:13s} {root / 'models' / name}")
    if (root / "models" / "janus").exists():
        console.print(f"model janus         {root / 'models' / 'janus'}   (nanoseek imagine --model "
                      f"{root / 'models' / 'janus'} \"a red circle left of a blue square\" --out pictures/)")
    console.print(f"talk to it:  nanoseek chat --model {root / 'models' / 'rl'}")
    console.print(f"serve it:    nanoseek serve --model {root / 'models' / 'rl'}")
    return 0


def _publish(src: Path, dst: Path) -> Path:
    """Copy a finished model directory to OUT/models/NAME atomically."""
    with atomic_dir(dst) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            "optimizer.safetensors", "rng.safetensors", "trainer_state.json"))
    return dst


# ------------------------------------------------------------------------------------------------------------
# stages


def chat_document(item: dict[str, Any], tok: Any, task: Task) -> str:
    """One training document in the R1 chat format, reasoning kept (the plain template would drop it)."""
    from .reasoning import join as join_reasoning

    messages = task.sft_messages(item)
    prompt = tok.render_chat(messages[:-1], add_generation_prompt=True)
    if tok.bos_token and prompt.startswith(tok.bos_token):
        prompt = prompt[len(tok.bos_token):]  # data.prepare adds BOS (and EOS) to every document
    last = messages[-1]
    return prompt + join_reasoning(last["reasoning_content"], last["content"])


def stage_data(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    from . import synthetic
    from .data import prepare, train_tokenizer
    from .tokenizer import Tokenizer

    d = r.root / "data"
    d.mkdir(parents=True, exist_ok=True)
    task = get_task(plan.task, **plan.task_options)
    items = task.items("train", plan.n_train, derive_seed(plan.seed, "data", bits=31))
    (d / "plain.txt").write_text("\n\n".join(synthetic.to_text(it) for it in items) + "\n")
    train_tokenizer([d / "plain.txt"], plan.vocab_size, d / "tokenizer")
    tok = Tokenizer.load(d / "tokenizer")
    atomic_write_jsonl(d / "chat.jsonl", [{"text": chat_document(it, tok, task)} for it in items])
    manifest = prepare([d / "chat.jsonl"], d / "tokenizer", d / "tokens", overwrite=True)
    r.console.print(f"{len(items)} {plan.task} problems -> {manifest['total_tokens']:,} tokens "
                    f"({manifest['total_tokens'] / len(items):.0f} per document), tokenizer vocab {tok.vocab_size}")
    return {"documents": len(items), "tokens": manifest["total_tokens"], "tokenizer_vocab": tok.vocab_size,
            "tokenizer_sha256": tok.sha256}


def _pretrain(r: StageRun, plan: DemoPlan, run: str, preset: str, overrides: dict[str, Any], steps: int,
              publish: str) -> dict[str, Any]:
    """Pretraining on the demo corpus (the base and the student share the recipe): fixed steps, WSD schedule;
    with a time budget the schedule is re-fitted at every step so its decay still completes."""
    from . import accounting
    from .train import TrainConfig, train
    from .weights import config_from_hf

    out = r.root / run
    cfg = TrainConfig(preset=preset, model_overrides={"vocab_size": plan.vocab_size, **overrides},
                      data=str(r.root / "data" / "tokens"), tokenizer=str(r.root / "data" / "tokenizer"),
                      seq_len=plan.seq_len, batch_size=plan.batch_size, max_steps=steps, lr=plan.pretrain_lr,
                      warmup_steps=plan.pretrain_warmup, schedule="wsd", decay_ratio=plan.decay_ratio,
                      save_every=50, out=str(out), seed=derive_seed(plan.seed, run, bits=31),
                      max_time=r.budget_s, fit_to_time=r.budget_s is not None, refit=True,
                      resume=(out / "latest").exists(), keep_last=1, device=plan.device, dtype=plan.dtype)
    summary = train(cfg, clock=r.clock)
    ckpt = out / (out / "latest").read_text().strip()
    _publish(ckpt, r.root / "models" / publish)
    recs = [x for x in read_jsonl(out / "metrics.jsonl") if "event" not in x]
    mcfg = config_from_hf(ckpt / "config.json")
    tokens = summary["step"] * plan.batch_size * plan.seq_len
    tenth = max(1, len(recs) // 10)
    return {"planned_steps": steps, "steps": summary["step"], "time_limited": summary["step"] < steps,
            "tokens": tokens, "train_flops": accounting.flops_per_token(mcfg, plan.seq_len, training=True, mtp=True)
            * tokens, "loss_first": recs[0]["loss"], "loss_last": recs[-1]["loss"], "main_last": recs[-1]["main"],
            "mtp_last": recs[-1].get("mtp"),
            # MaxVio (max expert load / mean - 1) per step and MoE layer; what the report judges balance by
            "maxvio": {"first_steps": median_worst(recs[:tenth]), "last_steps": median_worst(recs[-tenth:]),
                       "steps_each": tenth, "last_per_layer": recs[-1]["maxvio"],
                       "tokens_per_step": plan.batch_size * plan.seq_len, "experts": mcfg.n_routed_experts,
                       "experts_per_token": mcfg.num_experts_per_tok}}


def median_worst(recs: list[dict[str, Any]], key: str = "maxvio") -> float:
    """Per step the worst MoE layer's MaxVio (`maxvio` batch-wise, `seq_maxvio` sequence-wise), then the median
    over the steps: the balance statistic the report and docs/findings/moe-balance.md judge by."""
    worst = sorted(max(x[key]) for x in recs)
    return worst[len(worst) // 2]


def stage_pretrain(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    return _pretrain(r, plan, "pretrain", plan.preset, plan.model_overrides, plan.pretrain_steps, "base")


def stage_student_pretrain(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    return _pretrain(r, plan, "student-pretrain", plan.student_preset, plan.student_overrides,
                     plan.student_pretrain_steps, "student-base")


def _grpo(r: StageRun, plan: DemoPlan, run: str, model: str, steps: int, lr: float, publish: str) -> dict[str, Any]:
    """GRPO in the R1-Zero style (rule-based accuracy + format rewards) in the chat format; constant lr, so a time
    budget only ends it early. Returns the rollout statistics and the training FLOPs (rollouts + updates)."""
    from .distill import rl_flops
    from .rl import RLConfig, rl
    from .weights import config_from_hf

    out = r.root / run
    cfg = RLConfig(model=str(r.root / "models" / model), task=plan.task, task_options=plan.task_options,
                   out=str(out), steps=steps, group_size=plan.rl_group, batch_prompts=plan.rl_prompts,
                   max_new_tokens=plan.rl_max_new, lr=lr, loss="grpo", beta=0.0, temperature=1.0,
                   prompt_format="chat", eval_n=0, save_every=10, sample_every=5, max_time=r.budget_s,
                   seed=derive_seed(plan.seed, run, bits=31), resume=(out / "latest").exists(), device=plan.device,
                   dtype=plan.dtype)
    summary = rl(cfg, clock=r.clock)
    _publish(Path(summary["final_model"]), r.root / "models" / publish)
    recs = [x for x in read_jsonl(out / "metrics.jsonl") if "reward_mean" in x]
    fifth = max(1, len(recs) // 5)

    def avg(rs: list[dict[str, Any]], k: str) -> float:
        return sum(x[k] for x in rs) / len(rs)

    mcfg = config_from_hf(Path(summary["final_model"]) / "config.json")
    return {"planned_steps": steps, "steps": summary["steps"], "time_limited": summary.get("stopped") is not None,
            "lr": lr, "flops": rl_flops(mcfg, out / "metrics.jsonl", plan.rl_group, 0.0),
            "rollouts": sum(x["groups"] * plan.rl_group for x in recs),
            **{f"{k}_{which}": avg(rs, k) for k in ("reward_mean", "accuracy", "len_mean", "zero_var_frac")
               for which, rs in (("first", recs[:fifth]), ("last", recs[-fifth:]))},
            "steps_averaged": fifth, "reward_failures": summary.get("reward_failures", {})}


def stage_rl(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    return _grpo(r, plan, "rl", "base", plan.rl_steps, plan.rl_lr, "rl")


def stage_student_rl(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    return _grpo(r, plan, "student-rl", "student-base", plan.student_rl_steps, plan.student_rl_lr, "student-rl")


def stage_traces(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    """The RL model's traces on training prompts, kept by rejection sampling (R1 §2.3.3): path (b)'s data."""
    from .distill import GenerateConfig, generate

    out = r.root / "distill"
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"  # training problems only: the held-out ones are never used here
    items = get_task(plan.task, **plan.task_options).items(
        "train", plan.distill_prompts, derive_seed(plan.seed, "distill-prompts", bits=31))
    atomic_write_jsonl(prompts, [{k: v for k, v in it.items() if k != "reasoning"} for it in items])
    stats = generate(GenerateConfig(out=str(out / "traces"), teacher=str(r.root / "models" / "rl"),
                                    prompts=str(prompts), verifier=plan.distill_verifier or plan.task,
                                    samples=plan.distill_samples, max_tokens=plan.rl_max_new, progress=True,
                                    max_batch=plan.sample_batch,
                                    batch_prompts=max(1, plan.sample_batch // plan.distill_samples),
                                    seed=derive_seed(plan.seed, "traces", bits=31), device=plan.device,
                                    dtype=plan.dtype))
    r.console.print(f"traces: {stats['accepted']} accepted of {stats['samples']} sampled")
    return {k: stats[k] for k in ("prompts", "samples", "accepted", "acceptance_rate", "rejected",
                                  "prompt_coverage", "accepted_mean_completion_tokens", "teacher_prompt_tokens",
                                  "teacher_completion_tokens", "teacher_sampling_flops")}


def stage_student_distill(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    """SFT of the pretrained student on the verified traces, at the training compute path (a) spent."""
    from . import accounting
    from .distill import SFTConfig, matched_sft_steps, sft
    from .weights import config_from_hf

    out = r.root / "distill"
    traces = out / "traces" / "traces.jsonl"
    accepted = r.results["traces"]["accepted"]
    fallback = None
    if not accepted and not plan.fast:  # nothing to distill: path (b) has no model, the report judges nothing
        reason = "rejection sampling accepted no trace (OUT/distill/traces/stats.json)"
        r.console.print(f"[yellow]{reason}: no distilled student[/]")
        return {"planned_steps": 0, "steps": 0, "time_limited": False, "sft_flops": 0.0, "skipped": reason}
    if not accepted:
        # --fast: a toy teacher writes no complete trace; exercise SFT on the reference solutions instead
        traces = out / "reference_traces.jsonl"
        # enough documents for a few packed batches whatever the toy plan's prompt count
        task = get_task(plan.task, **plan.task_options)
        items = task.items("train", 4 * plan.batch_size, derive_seed(plan.seed, "reference"))
        atomic_write_jsonl(traces, [{"messages": task.sft_messages(it)} for it in items])
        fallback = "reference solutions (--fast: the toy teacher wrote no complete trace)"
        r.console.print(f"[yellow]--fast: the student trains on {fallback}[/]")
    student = r.root / "models" / "student-base"
    mcfg = config_from_hf(student / "config.json")
    per_step = accounting.flops_per_token(mcfg, plan.seq_len, training=True, mtp=True) * plan.batch_size * plan.seq_len
    f_a = r.results["student_rl"]["flops"]
    f_gen = r.results["traces"]["teacher_sampling_flops"]
    steps = matched_sft_steps(f_a, f_gen, per_step)
    overrides = [f"max_steps={steps}", f"seq_len={plan.seq_len}", f"batch_size={plan.batch_size}",
                 f"lr={plan.distill_lr}", f"seed={derive_seed(plan.seed, 'student-distill', bits=31)}",
                 "progress=true", "save_every=50", "keep_last=1"]
    if r.budget_s is not None:
        overrides += [f"max_time={r.budget_s}", "fit_to_time=true", "refit=true"]
    res = sft(SFTConfig(traces=str(traces), out=str(out / "student"), student=str(student), overrides=overrides,
                        resume=(out / "student" / "latest").exists(), device=plan.device, dtype=plan.dtype))
    _publish(Path(res["final_model"]), r.root / "models" / "student")
    done = res["train"]["step"]
    r.console.print(f"student SFT: {done} steps on {res['traces']} traces ({res['data_tokens']:,} tokens)")
    return {"planned_steps": steps, "steps": done, "time_limited": done < steps, "flops_per_step": per_step,
            "sft_flops": done * per_step, "traces": res["traces"], "data_tokens": res["data_tokens"],
            "lr": plan.distill_lr, "fallback": fallback}


def stage_eval(r: StageRun, plan: DemoPlan) -> dict[str, Any]:
    from .eval import EvalConfig, evaluate

    results = {}
    for name in MODELS:
        model = r.root / "models" / name
        if not model.exists():
            continue
        s = evaluate(EvalConfig(task=plan.task, task_options=plan.task_options, model=str(model), n=plan.eval_n,
                                k=plan.eval_k, max_tokens=plan.rl_max_new, prompt_format="chat",
                                seed=derive_seed(plan.seed, "eval", bits=31), out=str(r.root / "eval" / name),
                                device=plan.device, dtype=plan.dtype, max_batch=plan.sample_batch))
        cons = f"cons@{plan.eval_k}"
        results[name] = {k: s[k] for k in ("n_items", "k", "greedy", "greedy_ci", "pass@1", "pass@1_ci", cons,
                                           f"{cons}_ci", f"pass@{plan.eval_k}")}
        r.console.print(f"{name:13s} greedy {100 * s['greedy']:5.1f}%  pass@1 {100 * s['pass@1']:5.1f}%  "
                        f"{cons} {100 * s[cons]:5.1f}%")
    return results

