"""`nanoseek demo`: the whole DeepSeek recipe on a laptop CPU, ending in a report card.

Stages (each resumable; a finished stage is skipped on re-run, `--fresh` starts over; each has a time budget
that the stage enforces by stopping early and keeping its last checkpoint):
  1. data      synthetic arithmetic with chain of thought, rendered in the R1 chat format; a BPE tokenizer
  2. pretrain  a `small` MLA + DeepSeekMoE + MTP model (aux-loss-free balancing on) on that corpus
  3. rl        GRPO, R1-Zero style (rule-based accuracy + format rewards), in the chat format `nanoseek chat` uses
  4. distill   the RL model's rejection-sampled traces SFT-distilled into a smaller student (R1 §3 "distillation")
  5. eval      base, RL and student on the same held-out items (greedy, pass@1 over k samples, cons@k)
  6. report    OUT/report/report.md + PNG plots
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from .files import atomic_dir, atomic_write_json


@dataclass
class DemoPlan:
    """Sizes and budgets of one demo run (seconds are wall-clock budgets on a 2-core CPU)."""

    fast: bool = False
    task: str = "arithmetic"
    # 2-digit +, -, and 2x1-digit products with a column-by-column chain of thought (~140 tokens per document)
    task_options: dict[str, Any] = field(default_factory=lambda: {"max_digits": 2, "mul_digits": (2, 1)})
    n_train: int = 12000
    vocab_size: int = 1024
    # pretraining: the `small` preset's architecture (MLA + DeepSeekMoE with a shared expert + MTP, aux-loss-free
    # balancing) at half its width and 4 of its 6 layers. Measured on a 2-core CPU (docs/LOG.md): in 300 s the
    # full `small` reaches 0-5% held-out accuracy (240-450 steps), this one 56% (530 steps): at this budget the
    # number of optimizer steps, not the width, limits what the model learns.
    preset: str = "small"
    model_overrides: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 4, "intermediate_size": 384, "moe_intermediate_size": 64,
        "q_lora_rank": 96, "kv_lora_rank": 64})
    seq_len: int = 256
    batch_size: int = 16
    pretrain_steps: int = 5000  # an upper bound: the schedule is fitted to the time budget (fit_to_time)
    pretrain_lr: float = 3e-3
    pretrain_warmup: int = 20
    pretrain_budget: float = 300.0
    # RL
    rl_steps: int = 400  # an upper bound: the budget ends the stage (constant lr, so nothing is cut off)
    rl_group: int = 8
    rl_prompts: int = 8
    rl_max_new: int = 160
    rl_lr: float = 4e-5  # measured (docs/LOG.md): 1e-4 lost 20 points in 60 steps, 2e-5 gained 2.5 in 79
    rl_budget: float = 240.0
    # distillation: rejection-sampled traces of the RL model on training prompts, SFT into a smaller student
    student_preset: str = "small"
    student_overrides: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 6, "n_routed_experts": 16,
        "intermediate_size": 256, "moe_intermediate_size": 48, "q_lora_rank": 64, "kv_lora_rank": 48})
    distill_prompts: int = 1500
    distill_samples: int = 1
    distill_epochs: float = 20.0  # passes over the accepted traces (fewer if the budget runs out first)
    distill_verifier: str | None = None  # None: the task's verifier (rejection sampling); "none" keeps every trace
    distill_budget: float = 160.0
    # evaluation
    eval_n: int = 300
    eval_k: int = 4
    eval_budget: float = 120.0
    # where every stage runs: None = CUDA if available, else CPU; "auto" precision is fp32 on a CPU (the budgets
    # above were measured so) and bf16 on CUDA (nanoseek.device.resolve_dtype)
    device: str | None = None
    dtype: str = "auto"

    @classmethod
    def make(cls, fast: bool) -> DemoPlan:
        if not fast:
            return cls()
        return cls(fast=True, n_train=600, vocab_size=512, preset="tiny", model_overrides={}, seq_len=128,
                   batch_size=8, pretrain_steps=12, pretrain_warmup=2, pretrain_budget=30, rl_steps=3, rl_group=4,
                   rl_prompts=2, rl_max_new=24, rl_budget=30, student_preset="tiny",
                   student_overrides={"num_hidden_layers": 1, "first_k_dense_replace": 0},
                   distill_prompts=16, distill_samples=1, distill_epochs=4, distill_budget=30, eval_n=6, eval_k=2,
                   distill_verifier="none",  # a toy model solves nothing: keep its traces to exercise the path
                   eval_budget=30)


class Stage:
    def __init__(self, name: str, fn: Callable[[Path, DemoPlan, Console], dict[str, Any]], budget: float):
        self.name, self.fn, self.budget = name, fn, budget


def _stages(plan: DemoPlan) -> list[Stage]:
    return [Stage("data", stage_data, 60), Stage("pretrain", stage_pretrain, plan.pretrain_budget),
            Stage("rl", stage_rl, plan.rl_budget), Stage("distill", stage_distill, plan.distill_budget),
            Stage("eval", stage_eval, plan.eval_budget), Stage("report", stage_report, 60)]


def run_demo(out: str = "runs/demo", fast: bool = False, fresh: bool = False, device: str | None = None,
             dtype: str = "auto") -> int:
    from .device import dtype_name, resolve_device

    console = Console()
    root = Path(out)
    resolve_device(device)  # bad --device/--dtype fail now, not after the data stage
    dtype_name(dtype, training=True)
    plan = DemoPlan.make(fast)
    plan.device, plan.dtype = device, dtype
    if fresh and root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    state_file = root / "demo_state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {}
    if state.get("fast") is not None and state["fast"] != fast:
        raise ValueError(f"{root} holds a {'--fast' if state['fast'] else 'full'} demo: use --fresh or another --out")
    state["fast"] = fast
    console.rule(f"nanoseek demo{' --fast' if fast else ''} -> {root}")
    t0 = time.perf_counter()
    for stage in _stages(plan):
        done = state.get("stages", {}).get(stage.name)
        if done and done.get("status") == "done":
            console.print(f"[dim]{stage.name}: done ({done['seconds']:.0f}s), skipped — `--fresh` to redo[/]")
            continue
        console.rule(f"[bold]{stage.name}[/] (budget {stage.budget:.0f}s)")
        ts = time.perf_counter()
        try:
            info = stage.fn(root, plan, console)
        except KeyboardInterrupt:
            console.print(f"[yellow]interrupted in {stage.name}; finished stages are kept — run the same command "
                          "to resume[/]")
            return 130
        state.setdefault("stages", {})[stage.name] = {**info, "status": "done",
                                                      "seconds": time.perf_counter() - ts, "budget": stage.budget}
        atomic_write_json(state_file, state)
    total = sum(s["seconds"] for s in state["stages"].values())
    console.rule("done")
    console.print(f"demo finished in {time.perf_counter() - t0:.0f}s this run ({total:.0f}s over all stages)")
    console.print(f"report:  [bold]{root / 'report' / 'report.md'}[/]")
    for name in ("base", "rl", "student"):
        console.print(f"model {name:8s} {root / 'models' / name}")
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


def chat_document(item: dict[str, Any], tok: Any) -> str:
    """One training document in the R1 chat format, reasoning kept (the plain template would drop it)."""
    from . import synthetic
    from .reasoning import join as join_reasoning

    messages = synthetic.to_messages(item)
    prompt = tok.render_chat(messages[:-1], add_generation_prompt=True)
    if tok.bos_token and prompt.startswith(tok.bos_token):
        prompt = prompt[len(tok.bos_token):]  # data.prepare adds BOS (and EOS) to every document
    last = messages[-1]
    return prompt + join_reasoning(last["reasoning_content"], last["content"])


def stage_data(root: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    from . import synthetic
    from .data import prepare, train_tokenizer
    from .tokenizer import Tokenizer

    d = root / "data"
    d.mkdir(parents=True, exist_ok=True)
    items = synthetic.generate(plan.task, plan.n_train, "train", 0, **plan.task_options)
    (d / "plain.txt").write_text("\n\n".join(synthetic.to_text(it) for it in items) + "\n")
    train_tokenizer([d / "plain.txt"], plan.vocab_size, d / "tokenizer")
    tok = Tokenizer.load(d / "tokenizer")
    with (d / "chat.jsonl").open("w") as f:
        for it in items:
            f.write(json.dumps({"text": chat_document(it, tok)}) + "\n")
    manifest = prepare([d / "chat.jsonl"], d / "tokenizer", d / "tokens", overwrite=True)
    console.print(f"{len(items)} {plan.task} problems -> {manifest['total_tokens']:,} tokens "
                  f"({manifest['total_tokens'] / len(items):.0f} per document), tokenizer vocab {tok.vocab_size}")
    return {"tokens": manifest["total_tokens"], "documents": len(items)}


def stage_pretrain(root: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    from .train import TrainConfig, train

    out = root / "pretrain"
    cfg = TrainConfig(preset=plan.preset, model_overrides={"vocab_size": plan.vocab_size, **plan.model_overrides},
                      data=str(root / "data" / "tokens"), tokenizer=str(root / "data" / "tokenizer"),
                      seq_len=plan.seq_len, batch_size=plan.batch_size, max_steps=plan.pretrain_steps,
                      lr=plan.pretrain_lr, warmup_steps=plan.pretrain_warmup, schedule="wsd",
                      decay_ratio=0.3, save_every=50, out=str(out), max_time=plan.pretrain_budget,
                      fit_to_time=True, resume=(out / "latest").exists(), keep_last=1, device=plan.device,
                      dtype=plan.dtype)
    summary = train(cfg)
    ckpt = out / (out / "latest").read_text().strip()
    _publish(ckpt, root / "models" / "base")
    return {"steps": summary["step"], "stopped_by": summary["status"]}


def stage_rl(root: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    from .rl import RLConfig, rl

    out = root / "rl"
    cfg = RLConfig(model=str(root / "models" / "base"), task=plan.task, task_options=plan.task_options,
                   out=str(out), steps=plan.rl_steps, group_size=plan.rl_group, batch_prompts=plan.rl_prompts,
                   max_new_tokens=plan.rl_max_new, lr=plan.rl_lr, loss="grpo", beta=0.0, temperature=1.0,
                   prompt_format="chat", eval_n=0, save_every=10, sample_every=5, max_time=plan.rl_budget,
                   resume=(out / "latest").exists(), device=plan.device, dtype=plan.dtype)
    summary = rl(cfg)
    _publish(Path(summary["final_model"]), root / "models" / "rl")
    return {"steps": summary["steps"]}


def stage_distill(root: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    """Rejection-sampled traces of the RL model on training prompts (R1 §3: distillation), SFT into a student."""
    from . import synthetic
    from .distill import GenerateConfig, SFTConfig, generate, sft

    out = root / "distill"
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / "prompts.jsonl"  # the demo's difficulty; held-out items are never used here
    if not prompts.exists():
        items = synthetic.generate(plan.task, plan.distill_prompts, "train", 7, **plan.task_options)
        prompts.write_text("".join(json.dumps({k: v for k, v in it.items() if k != "reasoning"}) + "\n"
                                   for it in items))
    t0 = time.perf_counter()
    stats = generate(GenerateConfig(out=str(out / "traces"), teacher=str(root / "models" / "rl"),
                                    prompts=str(prompts), verifier=plan.distill_verifier or plan.task,
                                    samples=plan.distill_samples,
                                    max_tokens=plan.rl_max_new, progress=True, seed=0, device=plan.device,
                                    dtype=plan.dtype))
    left = max(10.0, plan.distill_budget - (time.perf_counter() - t0))
    overrides = [f"max_time={left}", "fit_to_time=true", f"seq_len={plan.seq_len}",
                 f"batch_size={plan.batch_size}", "lr=3e-3", "progress=true", "save_every=0", "keep_last=1",
                 *(f"model.{k}={v!r}" if isinstance(v, str) else f"model.{k}={v}"
                   for k, v in plan.student_overrides.items())]
    acc = stats.get("accepted", 0)
    traces = out / "traces"
    if acc < 4 * plan.batch_size and not plan.fast:  # ~2 traces per packed window: not one batch in two
        console.print(f"[yellow]rejection sampling accepted {acc} traces: the RL model solved too few of the "
                      "training prompts to fill a few training batches, so the student is skipped[/]")
        return {"traces": acc, "skipped": f"only {acc} verified traces"}
    if not acc:  # --fast: a toy teacher writes no complete trace; exercise SFT on the reference solutions instead
        traces = out / "reference_traces.jsonl"
        items = synthetic.generate(plan.task, plan.distill_prompts, "train", 7, **plan.task_options)
        traces.write_text("".join(json.dumps({"messages": synthetic.to_messages(it)}) + "\n" for it in items))
        console.print("[yellow]--fast: no teacher trace accepted; the toy student trains on reference solutions[/]")
    res = sft(SFTConfig(traces=str(traces), out=str(out / "student"), preset=plan.student_preset,
                        epochs=plan.distill_epochs,
                        tokenizer=str(root / "models" / "rl"), overrides=overrides, device=plan.device,
                        dtype=plan.dtype))
    _publish(Path(res["final_model"]), root / "models" / "student")
    console.print(f"traces: {acc} accepted of {stats.get('samples')} sampled; student "
                  f"trained {res['train']['step']} steps on {res['data_tokens']:,} tokens")
    return {"traces": acc, "steps": res["train"]["step"]}


def stage_eval(root: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    from .eval import EvalConfig, evaluate

    results = {}
    for name in ("base", "rl", "student"):
        model = root / "models" / name
        if not model.exists():
            continue
        s = evaluate(EvalConfig(task=plan.task, task_options=plan.task_options, model=str(model), n=plan.eval_n,
                                k=plan.eval_k, max_tokens=plan.rl_max_new, prompt_format="chat",
                                out=str(root / "eval" / name), device=plan.device, dtype=plan.dtype))
        cons = f"cons@{plan.eval_k}"
        results[name] = {"greedy": s.get("greedy"), "pass@1": s["pass@1"], cons: s[cons]}
        console.print(f"{name:8s} greedy {100 * s.get('greedy', 0):5.1f}%  pass@1 {100 * s['pass@1']:5.1f}%  "
                      f"cons@{plan.eval_k} {100 * s[f'cons@{plan.eval_k}']:5.1f}%")
    return {"results": results}


def stage_report(root: Path, plan: DemoPlan, console: Console) -> dict[str, Any]:
    from .report import write_report

    path = write_report(root, plan)
    console.print(f"report written: {path}")
    return {"report": str(path)}
