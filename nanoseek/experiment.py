"""One runner for multi-stage experiments: the demo, `nanoseek experiment NAME` and `nanoseek distill experiment`.

A stage is a named function that does a fixed amount of work (steps, samples, problems) and returns its results as
JSON-able numbers. The runner
  - runs the selected stages in order (`skip` / `only`), and refuses, before any work, a selection in which a stage
    needs another that is neither finished nor selected;
  - keeps OUT/state.json: the plan the run was started with and each finished stage's results. A re-run skips the
    finished stages (resume), `fresh` starts over, and a different plan is refused: its results would be mixed
    with this one's;
  - keeps the timings apart, in OUT/timings.json (seconds per stage and per invocation): they are the only numbers
    that differ between two runs of the same plan on the same machine, so results stay comparable byte for byte;
  - with a time limit (`max_minutes`), hands each stage that can shrink its work (`fits_time`) a budget in seconds:
    the time left, minus the estimated time of the fixed-work stages still to come (scaled by how much slower than
    the reference this machine has been so far), shared among the shrinkable stages in proportion to their
    estimates. Without a limit no stage ever sees a clock.

Below the runner, the experiments it hosts besides the demo (nanoseek/demo.py) and V3's ablations
(nanoseek/ablations.py: `moe-balance`, `mtp`): `distill-vs-rl`, the finding of docs/findings/distill-vs-rl.md. This
is the composition floor: it imports the stages (train, rl, distill, eval); they never import it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from . import synthetic
from .files import atomic_write_json, atomic_write_jsonl, read_jsonl
from .stats import paired_difference
from .tasks import Task, get_task

STATE_FILE, TIMINGS_FILE = "state.json", "timings.json"


@dataclass
class Stage:
    name: str
    run: Callable[[StageRun], dict[str, Any]]
    needs: tuple[str, ...] = ()  # stages whose outputs this one reads
    work: str = ""  # the fixed work in words, printed when the stage starts
    estimate_s: float = 0.0  # seconds on the reference machine (each experiment says which one)
    fits_time: bool = False  # can shrink its work to a time budget (training stages); others always finish


@dataclass
class StageRun:
    """What a stage function gets: where to write, the results of the stages before it, and its time budget (None:
    do the planned work, whatever it takes)."""

    root: Path
    console: Console
    results: dict[str, dict[str, Any]]
    budget_s: float | None = None
    clock: Callable[[], float] = time.perf_counter


@dataclass
class Outcome:
    results: dict[str, dict[str, Any]]  # every finished stage's results, in stage order
    timings: dict[str, Any]
    ran: list[str] = field(default_factory=list)  # stages run by this invocation
    interrupted: str | None = None  # the stage a KeyboardInterrupt stopped


def parse_stage_list(value: str | Sequence[str] | None) -> list[str]:
    """`a,b` or ["a", "b,c"] -> ["a", "b", "c"]: --skip / --only accept both repeated and comma-separated names."""
    if not value:
        return []
    items = [value] if isinstance(value, str) else list(value)
    return [n.strip() for item in items for n in item.split(",") if n.strip()]


def select(stages: Sequence[Stage], skip: Sequence[str] = (), only: Sequence[str] = ()) -> list[Stage]:
    """The stages to consider, in order; unknown names are a ValueError naming the valid ones."""
    names = [s.name for s in stages]
    for flag, given in (("--skip", skip), ("--only", only)):
        unknown = [n for n in given if n not in names]
        if unknown:
            raise ValueError(f"{flag}: unknown stage {', '.join(map(repr, unknown))} (stages: {', '.join(names)})")
    if skip and only:
        raise ValueError("give --skip or --only, not both")
    return [s for s in stages if (not only or s.name in only) and s.name not in skip]


def load_state(root: Path) -> dict[str, Any]:
    f = root / STATE_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def run(root: str | Path, stages: Sequence[Stage], plan: dict[str, Any], *, skip: Sequence[str] = (),
        only: Sequence[str] = (), fresh: bool = False, max_minutes: float | None = None,
        slowdown: float | Callable[[], float] = 1.0,
        console: Console | None = None, title: str = "experiment", threads: int | None = None,
        clock: Callable[[], float] = time.perf_counter) -> Outcome:
    """Run (or resume) `stages` under OUT = `root`. `plan` identifies the run (JSON-able): a directory holding
    another plan's results is refused. `slowdown` is this machine's time relative to the reference machine's, or
    a calibration that measures it (called only when a stage is left to run, after the checks), used for the
    estimate printed at the start and for the time budgets. `threads` is recorded
    (results differ in their last digits between thread counts, so a resume with another count is flagged)."""
    console = console or Console()
    root = Path(root)
    if max_minutes is not None and max_minutes <= 0:
        raise ValueError(f"--max-minutes must be > 0, got {max_minutes}")
    chosen = select(stages, skip, only)
    if fresh and root.exists():
        shutil.rmtree(root)
    if root.exists() and not (root / STATE_FILE).exists() and any(root.iterdir()):
        # checkpoints there would be resumed as if they were this plan's
        raise ValueError(f"{root} is not empty and has no {STATE_FILE} (an older layout or other files): use "
                         "--fresh to start over there, or another --out")
    root.mkdir(parents=True, exist_ok=True)
    state = load_state(root)
    plan = json.loads(json.dumps(plan))  # the JSON form, so a plan compares equal to its stored self
    if state.get("plan") is not None and state["plan"] != plan:
        differ = sorted(k for k in set(plan) | set(state["plan"]) if plan.get(k) != state["plan"].get(k))
        raise ValueError(f"{root} holds a run of another plan (differs in: {', '.join(differ)}): use --fresh to "
                         "start over, or another --out")
    state["plan"] = plan
    done: dict[str, dict[str, Any]] = state.setdefault("stages", {})
    if threads is not None:
        if state.get("threads") not in (None, threads) and any(s.name not in done for s in chosen):
            console.print(f"[yellow]this run uses {threads} threads; its finished stages used {state['threads']}: "
                          "float rounding differs between thread counts, so the numbers will not match an "
                          "uninterrupted run's to the last digit[/]")
        state.setdefault("threads", threads)
    names = {s.name for s in chosen}
    for s in chosen:
        missing = [n for n in s.needs if n not in done and n not in names]
        if missing and s.name not in done:
            raise ValueError(f"stage {s.name!r} needs {', '.join(map(repr, missing))}, which is neither finished "
                             "nor selected (drop it from --skip, or add it to --only)")
    timings_file = root / TIMINGS_FILE
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {"stages": {}, "invocations": []}
    todo = [s for s in chosen if s.name not in done]
    if callable(slowdown):
        slowdown = slowdown() if todo else 1.0
    t_start = clock()
    deadline = None if max_minutes is None else t_start + 60 * max_minutes
    planned = sum(s.estimate_s for s in todo)
    console.rule(f"{title} -> {root}")
    if todo:
        expect = planned * slowdown
        console.print(f"to run: {', '.join(s.name for s in todo)} — about {planned / 60:.1f} min on the reference "
                      f"machine" + (f"; this machine measured {slowdown:.2f}x its time, so expect about "
                                    f"{expect / 60:.1f} min" if abs(slowdown - 1) > 0.05 else ""))
        if max_minutes is not None:
            console.print(f"--max-minutes {max_minutes:g}: the training stages shrink their steps to fit (their "
                          "learning-rate decay still completes); the report says the run was time-limited")
        elif slowdown > 1.5:
            console.print(f"[yellow]this machine is {slowdown:.1f}x slower than the reference: expect about "
                          f"{expect / 60:.0f} min. `--max-minutes M` caps the run (training stages then do less "
                          "work, and the report says so)[/]")
    invocation = {"started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"), "stages": [],
                  "max_minutes": max_minutes, "slowdown": slowdown, "threads": threads}
    outcome = Outcome(results={}, timings=timings)
    speed = slowdown  # observed / estimated time of this invocation's fixed-work stages, refined as they finish
    spent_est = spent = 0.0
    for s in chosen:
        if s.name in done:
            t = timings["stages"].get(s.name, {}).get("seconds")
            console.print(f"[dim]{s.name}: done{f' ({t:.0f}s)' if t is not None else ''}, skipped — `--fresh` to "
                          "redo[/]")
            continue
        budget = None
        if deadline is not None and s.fits_time:
            rest = todo[todo.index(s):]
            fixed = sum(r.estimate_s for r in rest if not r.fits_time) * speed
            shrinkable = sum(r.estimate_s for r in rest if r.fits_time)
            budget = max(1.0, (deadline - clock() - fixed) * s.estimate_s / max(shrinkable, 1e-9))
        console.rule(f"[bold]{s.name}[/]" + (f" — {s.work}" if s.work else "")
                     + (f" (budget {budget:.0f}s)" if budget is not None else ""))
        ts = clock()
        try:
            result = s.run(StageRun(root=root, console=console, results={**done}, budget_s=budget, clock=clock))
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted in {s.name}; finished stages are kept — run the same command to "
                          "resume[/]")
            outcome.interrupted = s.name
            break
        seconds = clock() - ts
        done[s.name] = result
        atomic_write_json(root / STATE_FILE, state)
        timings["stages"][s.name] = {"seconds": seconds, "estimate_s": s.estimate_s, "budget_s": budget}
        invocation["stages"].append(s.name)
        atomic_write_json(timings_file, timings)
        outcome.ran.append(s.name)
        if s.estimate_s > 0 and not s.fits_time:  # a shrinkable stage's time reflects its budget, not the machine
            spent_est, spent = spent_est + s.estimate_s, spent + seconds
            speed = spent / spent_est
    atomic_write_json(root / STATE_FILE, state)  # the plan and thread count, even when nothing ran
    invocation["seconds"] = clock() - t_start
    timings["invocations"].append(invocation)
    atomic_write_json(timings_file, timings)
    outcome.results = {s.name: done[s.name] for s in stages if s.name in done}
    return outcome


# ------------------------------------------------------------------------------------------------------------
# distill-vs-rl: the finding of docs/findings/distill-vs-rl.md (`nanoseek experiment distill-vs-rl`,
# also `nanoseek distill experiment`)
#
# R1 §4.1: Qwen-32B-Base with >10k steps of large-scale RL (DeepSeek-R1-Zero-Qwen-32B) is about QwQ-32B-Preview,
# while R1-Distill-Qwen-32B (SFT on R1's traces) is far better on every benchmark. Here: a larger teacher
# (cold-start SFT, then GRPO) and a smaller student from the same cold start, then (a) GRPO on the student vs (b) SFT
# on the teacher's rejection-sampled traces, at comparable compute; held-out accuracy with confidence intervals.


@dataclass
class ExperimentConfig:
    out: str = "runs/distill-vs-rl"
    fast: bool = False  # toy sizes: checks the pipeline in minutes, the numbers mean nothing
    seed: int = 0
    # the task: synthetic arithmetic (exact-integer verifier), sized for small models
    max_digits: int = 2
    mul_digits: tuple[int, int] = (2, 1)
    n_train: int = 4000
    n_test: int = 200
    # models: the tiny preset's shape, the teacher wider and deeper (both keep MoE + MLA + MTP)
    teacher_model: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384, "moe_intermediate_size": 64,
        "q_lora_rank": 96, "kv_lora_rank": 64})
    student_model: dict[str, Any] = field(default_factory=dict)  # the tiny preset itself (~1M parameters)
    # cold start (R1 §2.3.1): SFT on chat items with the reference reasoning
    cold_start_items: int = 12000
    teacher_cold_steps: int = 1500
    student_cold_steps: int = 400  # shorter: a weak (not hopeless) student leaves room for both paths
    batch_size: int = 16
    seq_len: int = 256
    cold_lr: float = 3e-3
    # GRPO (both the teacher and path (a))
    teacher_rl_steps: int = 60
    student_rl_steps: int = 400
    group_size: int = 8
    batch_prompts: int = 4
    rl_lr: float = 1e-4  # the teacher's GRPO
    # path (a) is run at each of these learning rates and its best result compared: a sweep RL gets and SFT
    # does not, so any tuning advantage goes to RL (the sweep's extra runs are not charged to (a)'s compute)
    student_rl_lrs: tuple[float, ...] = (1e-4, 3e-5)  # 5e-4 collapsed in a shorter run (docs/findings)
    max_new_tokens: int = 128
    # path (b): rejection-sampled traces, SFT at matched compute
    trace_prompts: int = 2000  # teacher sampling is charged to (b): 5x the student's FLOPs per token
    trace_samples: int = 2
    sft_lr: float = 1e-3
    match_compute: bool = True  # SFT steps chosen so (b)'s FLOPs (sampling included) equal (a)'s
    sft_steps: int = 100  # used when match_compute is false (or as the floor's cap when the budget is spent)
    # evaluation (R1 §3.1: k samples at T 0.6 / top_p 0.95 -> pass@1; plus greedy)
    eval_k: int = 2

    def __post_init__(self) -> None:
        self.mul_digits = tuple(self.mul_digits)  # type: ignore[assignment]
        self.student_rl_lrs = tuple(self.student_rl_lrs)
        if self.fast:
            self.n_train, self.n_test, self.cold_start_items = 400, 24, 300
            self.teacher_cold_steps, self.student_cold_steps, self.batch_size = 12, 6, 4
            self.teacher_rl_steps, self.student_rl_steps, self.group_size, self.batch_prompts = 2, 3, 4, 2
            self.max_new_tokens, self.trace_prompts, self.trace_samples, self.eval_k = 24, 8, 2, 2
            self.student_rl_lrs = self.student_rl_lrs[:1]
            self.seq_len = 128


def experiment_config(overrides: Sequence[str] = (), cls: type = ExperimentConfig, **kwargs: Any) -> Any:
    """An experiment's config (`cls`, by default distill-vs-rl's ExperimentConfig) from keyword arguments and
    `key=value` strings (TOML values, as `nanoseek train`)."""
    from .train import _parse_value, _unknown

    values = dict(kwargs)
    names = {f.name for f in dataclasses.fields(cls)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        k, v = (x.strip() for x in item.split("=", 1))
        if k not in names:
            raise ValueError(_unknown(k, names, "experiment config key"))
        values[k] = _parse_value(v)
    return cls(**values)


def _task(cfg: ExperimentConfig) -> Task:
    return get_task("arithmetic", max_digits=cfg.max_digits, mul_digits=cfg.mul_digits)


def _task_items(cfg: ExperimentConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(RL / trace prompts, held-out problems, cold-start problems): deterministic in the config, so every stage can
    rebuild them instead of passing them along."""
    task = _task(cfg)
    train_items = task.items("train", cfg.n_train, cfg.seed)
    test_items = task.items("test", cfg.n_test, cfg.seed)
    # cold start: a disjoint slice of train problems, as chats that keep the reference reasoning
    cold = task.items("train", cfg.n_train + cfg.cold_start_items, cfg.seed)[cfg.n_train:]
    return train_items, test_items, cold


def experiment_stages(cfg: ExperimentConfig) -> list[Any]:
    """The distill-vs-RL comparison as nanoseek.experiment stages (each resumable; results in OUT/state.json).

    Estimates are minutes on the 2-core reference machine at the default sizes (docs/findings/distill-vs-rl.md's
    wall clock with OMP_NUM_THREADS=1)."""
    from . import accounting
    from .distill import GenerateConfig, SFTConfig, generate, matched_sft_steps, print_stats, rl_flops, sft
    from .eval import EvalConfig, evaluate
    from .rl import RLConfig, rl
    from .tokenizer import Tokenizer
    from .train import TrainConfig, train
    from .weights import load

    out = Path(cfg.out)
    train_file, tok_dir = out / "task" / "task_train.jsonl", out / "tok"
    progress = not cfg.fast

    def setup(r: StageRun) -> dict[str, Any]:
        from .data import prepare, train_tokenizer

        train_items, test_items, cold = _task_items(cfg)
        task = out / "task"
        task.mkdir(parents=True, exist_ok=True)
        # RL and trace prompts: prompt + answer columns (no reference reasoning: RL and the teacher find their own)
        atomic_write_jsonl(train_file, [{k: v for k, v in it.items() if k != "reasoning"} for it in train_items])
        atomic_write_jsonl(task / "task_test.jsonl", [{k: v for k, v in it.items() if k != "reasoning"}
                                                      for it in test_items])
        atomic_write_jsonl(task / "cold_start.jsonl", [{"id": it["id"], "messages": _task(cfg).sft_messages(it)}
                                                       for it in cold])
        (task / "corpus.txt").write_text("\n\n".join(synthetic.to_text(it) for it in train_items[:2000] + cold))
        train_tokenizer([task / "corpus.txt"], 512, tok_dir)
        prepare([task / "cold_start.jsonl"], tok_dir, out / "cold_data", sft=True, overwrite=True)
        return {"train": len(train_items), "test": len(test_items), "cold_start": len(cold)}

    def cold_start(name: str, arch: dict[str, Any], steps: int) -> dict[str, Any]:
        run = out / f"{name}-cold"
        tcfg = TrainConfig(preset="tiny", model_overrides=dict(arch), data=str(out / "cold_data"),
                           tokenizer=str(tok_dir), seq_len=cfg.seq_len, batch_size=cfg.batch_size, max_steps=steps,
                           lr=cfg.cold_lr, warmup_steps=max(1, steps // 20), out=str(run), save_every=100,
                           seed=cfg.seed, progress=progress, dtype="fp32", resume=True)
        train(tcfg)
        model_dir = run / (run / "latest").read_text().strip()
        fpt = accounting.flops_per_token(load(model_dir).config, cfg.seq_len, training=True, mtp=True)
        return {"model": str(model_dir.relative_to(out)), "flops": fpt * steps * cfg.batch_size * cfg.seq_len}

    def grpo(name: str, model_dir: Path, steps: int, lr: float) -> dict[str, Any]:
        run = out / name
        rcfg = RLConfig(model=str(model_dir), task=str(train_file), rewards=["arithmetic", "format=0.5"],
                        replace_rewards=True, out=str(run), steps=steps, group_size=cfg.group_size,
                        batch_prompts=cfg.batch_prompts, max_new_tokens=cfg.max_new_tokens, lr=lr,
                        loss="dr_grpo", temperature=1.0, eval_n=0, save_every=10, seed=cfg.seed,
                        progress=progress, resume=True, n_train_items=cfg.n_train)
        if not (run / "final" / "config.json").is_file():
            rl(rcfg)
        train_items = _task_items(cfg)[0]
        tok = Tokenizer.load(tok_dir)
        prompt_len = sum(len(_task(cfg).encode_prompt(it, tok, "chat"))
                         for it in train_items[:200]) / min(200, len(train_items))
        return {"model": str((run / "final").relative_to(out)), "lr": lr,
                "flops": rl_flops(load(run / "final").config, run / "metrics.jsonl", cfg.group_size, prompt_len)}

    def student_rl(r: StageRun) -> dict[str, Any]:
        base = out / r.results["student_cold"]["model"]
        runs = [grpo("student-rl" if i == 0 else f"student-rl-{i}", base, cfg.student_rl_steps, lr)
                for i, lr in enumerate(cfg.student_rl_lrs)]
        # the runs differ only through completion lengths: (a)'s budget is their mean
        return {"runs": runs, "flops": sum(x["flops"] for x in runs) / len(runs)}

    def traces(r: StageRun) -> dict[str, Any]:
        gstats = generate(GenerateConfig(out=str(out / "traces"), teacher=str(out / r.results["teacher_rl"]["model"]),
                                         prompts=str(train_file), n_prompts=cfg.trace_prompts,
                                         samples=cfg.trace_samples, max_tokens=cfg.max_new_tokens,
                                         verifier="arithmetic", seed=cfg.seed, progress=progress))
        print_stats(gstats, r.console)
        return {k: gstats.get(k, 0.0) for k in ("samples", "accepted", "acceptance_rate", "rejected",
                                                "prompt_coverage", "accepted_mean_completion_tokens",
                                                "teacher_sampling_flops")}

    def student_distill(r: StageRun) -> dict[str, Any]:
        student_base = out / r.results["student_cold"]["model"]
        per_step = accounting.flops_per_token(load(student_base).config, cfg.seq_len, training=True,
                                              mtp=True) * cfg.batch_size * cfg.seq_len
        f_gen = r.results["traces"]["teacher_sampling_flops"]
        steps = matched_sft_steps(r.results["student_rl"]["flops"], f_gen, per_step) if cfg.match_compute \
            else cfg.sft_steps
        sft_out = out / "student-distill"
        if r.results["traces"]["accepted"] == 0:  # --fast teachers rarely finish a trace: report, do not fail
            r.console.print("[bold red]rejection sampling accepted no trace[/]: path (b) is skipped (train the "
                            "teacher longer)")
            return {"sft_steps": 0, "per_step": per_step, "skipped": "rejection sampling accepted no trace"}
        if not (sft_out / "final" / "config.json").is_file():
            sft(SFTConfig(traces=str(out / "traces"), out=str(sft_out), student=str(student_base), overrides=[
                f"max_steps={steps}", f"seq_len={cfg.seq_len}", f"batch_size={cfg.batch_size}", f"lr={cfg.sft_lr}",
                "dtype=fp32", f"seed={cfg.seed}", f"progress={'false' if cfg.fast else 'true'}", "save_every=100"]))
        return {"sft_steps": steps, "per_step": per_step, "model": str((sft_out / "final").relative_to(out))}

    def evaluation(r: StageRun) -> dict[str, Any]:
        test_items = _task_items(cfg)[1]
        paths = {"teacher (cold start + GRPO)": r.results["teacher_rl"]["model"],
                 "teacher cold start": r.results["teacher_cold"]["model"],
                 "student cold start": r.results["student_cold"]["model"],
                 **{f"(a) student + GRPO, lr {x['lr']:g}": x["model"] for x in r.results["student_rl"]["runs"]},
                 "(b) student + distillation": r.results["student_distill"].get("model")}
        models = {}
        for name, rel in paths.items():
            if rel is None or not (out / rel / "config.json").is_file():
                continue
            ev_dir = out / "eval" / _slug(name)
            if (ev_dir / "summary.json").is_file():
                s = json.loads((ev_dir / "summary.json").read_text())
            else:
                s = evaluate(EvalConfig(task="arithmetic", model=str(out / rel), k=cfg.eval_k, n=len(test_items),
                                        max_tokens=cfg.max_new_tokens, seed=cfg.seed, out=str(ev_dir)),
                             items=test_items)
            models[name] = {"path": str(out / rel), **{k: s.get(k) for k in (
                "pass@1", "pass@1_ci", "greedy", "greedy_ci", f"cons@{cfg.eval_k}", f"pass@{cfg.eval_k}")},
                "params": load(out / rel).num_params()}
        return {"models": models}

    minutes = 60.0 if not cfg.fast else 1.0
    return [Stage("setup", setup, work=f"{cfg.n_train:,} + {cfg.cold_start_items:,} problems, tokenizer",
                  estimate_s=0.2 * minutes),
            Stage("teacher_cold", lambda r: cold_start("teacher", cfg.teacher_model, cfg.teacher_cold_steps),
                  ("setup",), f"{cfg.teacher_cold_steps} SFT steps", 15 * minutes),
            Stage("student_cold", lambda r: cold_start("student", cfg.student_model, cfg.student_cold_steps),
                  ("setup",), f"{cfg.student_cold_steps} SFT steps", 2 * minutes),
            Stage("teacher_rl", lambda r: grpo("teacher-rl", out / r.results["teacher_cold"]["model"],
                                               cfg.teacher_rl_steps, cfg.rl_lr), ("teacher_cold",),
                  f"{cfg.teacher_rl_steps} GRPO steps", 1.5 * minutes),
            Stage("student_rl", student_rl, ("student_cold",), f"{len(cfg.student_rl_lrs)} x "
                  f"{cfg.student_rl_steps} GRPO steps", 7 * minutes * len(cfg.student_rl_lrs)),
            Stage("traces", traces, ("teacher_rl",), f"{cfg.trace_prompts:,} prompts x {cfg.trace_samples}",
                  2 * minutes),
            Stage("student_distill", student_distill, ("student_cold", "student_rl", "traces"),
                  "SFT at (a)'s compute", 1 * minutes),
            Stage("eval", evaluation, ("teacher_rl", "student_cold", "student_rl", "student_distill"),
                  f"{cfg.n_test} held-out problems per model", 0.25 * minutes * (4 + len(cfg.student_rl_lrs)))]


def experiment(cfg: ExperimentConfig, skip: Sequence[str] = (), only: Sequence[str] = (),
               fresh: bool = False) -> dict[str, Any]:
    """Runs the whole comparison through nanoseek.experiment (resumable: OUT/state.json; --skip / --only); writes
    OUT/results.json, OUT/results.md and OUT/accuracy.png once every stage has finished."""
    from .eval import per_item

    console = Console()
    out = Path(cfg.out)
    plan = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}
    outcome = run(out, experiment_stages(cfg), plan, skip=skip, only=only, fresh=fresh, console=console,
                  title="distill-vs-rl")
    (out / "experiment_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1) + "\n")
    res = outcome.results
    if "eval" not in res:
        console.print("[yellow]not every stage has run: results.json is written once `eval` has[/]")
        return {"stages": res}
    results: dict[str, Any] = {"config": dataclasses.asdict(cfg), "models": res["eval"]["models"]}
    a_names = [n for n in results["models"] if n.startswith("(a)")]
    b_name = "(b) student + distillation"
    if a_names and b_name in results["models"]:  # paired over the same held-out problems: tighter than two CIs
        best_a = max(a_names, key=lambda n: results["models"][n]["pass@1"])
        d = paired_difference(*(per_item(read_jsonl(out / "eval" / _slug(n) / "items.jsonl"))
                                for n in (best_a, b_name)), seed=cfg.seed)
        results["b_minus_best_a"] = {"vs": best_a, "pass@1": d["mean"], "ci": d["ci"]}
    f_gen = res["traces"]["teacher_sampling_flops"]
    sft_steps, per_step = res["student_distill"]["sft_steps"], res["student_distill"]["per_step"]
    f_b = f_gen + sft_steps * per_step
    f_teacher = res["teacher_cold"]["flops"] + res["teacher_rl"]["flops"]
    results["flops"] = {"teacher_cold_start": res["teacher_cold"]["flops"],
                        "teacher_grpo": res["teacher_rl"]["flops"], "student_cold_start": res["student_cold"]["flops"],
                        "a_student_grpo": res["student_rl"]["flops"],
                        "a_runs": {f"{x['lr']:g}": x["flops"] for x in res["student_rl"]["runs"]},
                        "b_teacher_sampling": f_gen, "b_student_sft": sft_steps * per_step, "b_total": f_b,
                        "b_total_with_teacher_training": f_b + f_teacher}
    results["sft_steps"] = sft_steps
    if res["student_distill"].get("skipped"):
        results["notes"] = [f"path (b) skipped: {res['student_distill']['skipped']}"]
    results["traces"] = {k: res["traces"][k] for k in ("samples", "accepted", "acceptance_rate", "rejected",
                                                       "prompt_coverage", "accepted_mean_completion_tokens")}
    results["timings_s"] = {k: v["seconds"] for k, v in outcome.timings["stages"].items()}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(results))
    try:
        plot_experiment(results, out / "accuracy.png")
    except Exception as e:  # plotting never fails a run
        results["plot_error"] = str(e)
    console.print(results_markdown(results))
    return results


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def results_markdown(r: dict[str, Any]) -> str:
    f = r["flops"]
    lines = ["| model | params | pass@1 (95% CI) | greedy (95% CI) |", "|---|---|---|---|"]
    for name, m in r["models"].items():
        p, pc, g, gc = m["pass@1"], m["pass@1_ci"], m["greedy"], m["greedy_ci"]
        lines.append(f"| {name} | {m['params'] / 1e6:.2f}M | {100 * p:.1f}% ({100 * pc[0]:.1f}-{100 * pc[1]:.1f}) | "
                     f"{100 * g:.1f}% ({100 * gc[0]:.1f}-{100 * gc[1]:.1f}) |")
    lines += ["", "| compute (training FLOPs) | |", "|---|---|",
              f"| shared: student cold start | {_fmt_flops(f['student_cold_start'])} |",
              f"| (a) student GRPO (rollouts + updates; mean of the lr runs) | {_fmt_flops(f['a_student_grpo'])} |",
              f"| (b) teacher sampling for traces | {_fmt_flops(f['b_teacher_sampling'])} |",
              f"| (b) student SFT ({r['sft_steps']} steps) | {_fmt_flops(f['b_student_sft'])} |",
              f"| (b) total | {_fmt_flops(f['b_total'])} |",
              f"| teacher training (cold start + GRPO), not charged to (b) | "
              f"{_fmt_flops(f['teacher_cold_start'] + f['teacher_grpo'])} |",
              f"| (b) total with the teacher's training | {_fmt_flops(f['b_total_with_teacher_training'])} |"]
    if "b_minus_best_a" in r:
        d = r["b_minus_best_a"]
        lo, hi = (100 * x for x in d["ci"])
        lines += ["", f"(b) - best (a) [{d['vs']}], paired over the held-out problems: pass@1 "
                  f"{100 * d['pass@1']:+.1f} points (95% bootstrap CI {lo:+.1f} to {hi:+.1f})."]
    t = r["traces"]
    lines += ["", f"Traces: {t['samples']} samples, {t['accepted']} accepted ({100 * t['acceptance_rate']:.1f}%), "
              f"rejected {t['rejected']}; {100 * t['prompt_coverage']:.1f}% of prompts have an accepted trace."]
    return "\n".join(lines) + "\n"


def plot_experiment(r: dict[str, Any], png: str | os.PathLike) -> Path:
    """Left: held-out pass@1 (bars) and greedy accuracy (dots) of every model, 95 % CIs. Right: the student's
    pass@1 against the training FLOPs spent on it after the shared cold start (teacher sampling included for (b))."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = r["models"]
    names = list(models)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.6), gridspec_kw={"width_ratios": [3, 2]})
    x = list(range(len(names)))
    vals = [models[n]["pass@1"] for n in names]
    err = [[v - models[n]["pass@1_ci"][0] for n, v in zip(names, vals)],
           [models[n]["pass@1_ci"][1] - v for n, v in zip(names, vals)]]
    colors = ["#1f77b4" if n.startswith("(b)") else "#d62728" if n.startswith("(a)") else "#999" for n in names]
    ax.bar(x, vals, yerr=err, capsize=4, color=colors, label="pass@1 (k samples, T 0.6)")
    g = [models[n]["greedy"] for n in names]
    gerr = [[v - models[n]["greedy_ci"][0] for n, v in zip(names, g)],
            [models[n]["greedy_ci"][1] - v for n, v in zip(names, g)]]
    ax.errorbar([i + 0.25 for i in x], g, yerr=gerr, fmt="o", color="black", ms=4, capsize=2, label="greedy")
    ax.set_xticks(x)
    ax.set_xticklabels([textwrap.fill(n, 16) for n in names], fontsize=7)
    ax.set_ylabel("held-out accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    f = r["flops"]
    points = [("student cold start", 0.0)]
    points += [(n, f["a_runs"][n.rsplit("lr ", 1)[1]]) for n in names if n.startswith("(a)")]
    points += [(n, f["b_total"]) for n in names if n.startswith("(b)")]
    for n, flops in points:
        m = models.get(n)
        if m is None:
            continue
        c = "#1f77b4" if n.startswith("(b)") else "#d62728" if n.startswith("(a)") else "#999"
        lo, hi = m["pass@1"] - m["pass@1_ci"][0], m["pass@1_ci"][1] - m["pass@1"]
        ax2.errorbar([flops], [m["pass@1"]], yerr=[[lo], [hi]], fmt="o", color=c, capsize=3, label=n)
    ax2.set_xlabel("training FLOPs on the student after the cold start")
    ax2.set_ylabel("student held-out pass@1 (95% CI)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.suptitle(f"distillation vs GRPO on the student: (a) {_fmt_flops(f['a_student_grpo'])} FLOPs, "
                 f"(b) {_fmt_flops(f['b_total'])} FLOPs (teacher sampling included)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return Path(png)
