"""GRPO step time: `nanoseek rl` vs TRL's `GRPOTrainer` on the same model, prompts and settings, in one run.

Both sides train the same `small` model (nanoseek's `save_pretrained` directory, loaded by TRL through
`AutoModelForCausalLM` as transformers' DeepseekV3ForCausalLM, fp32), with the same tokenizer and chat template,
on the same arithmetic prompts rendered with the R1 chat template, with the same rule-based reward (nanoseek's
`arithmetic_accuracy` + `format_reward`, which follow TRL's reward signature):

    P prompts x G completions per step, one optimizer step per rollout batch (mu = 1, one mini-batch),
    loss_type "grpo" on both sides (per-sequence token mean), rewards scaled by the group std, beta = 0 (no
    reference model), temperature 1, top_p 1, AdamW at a constant lr, gradient clipping at 1.0,
    completions forced to exactly N tokens: nanoseek `ignore_eos`, TRL `generation_kwargs={"min_new_tokens": N}`.

A step is everything from sampling the rollouts to the optimizer step (TRL: `on_step_begin` -> `on_step_end`;
nanoseek: the `step_time` it logs). The model is random (`small` preset, MTP off since transformers has none):
speed does not depend on what the model says when lengths are forced. Medians over the steps after the first.
Wall time with the machine's torch threads (default 2 here); run alone — these CPUs are shared and noisy.

    .venv/bin/pip install -e '.[bench]'                     # TRL and datasets (the peer)
    .venv/bin/python benchmarks/rl_step.py                   # small, P=4 G=8 N=128, 6 steps each (~4 minutes)
    .venv/bin/python benchmarks/rl_step.py --quick           # tiny, 3 steps: smoke run
    .venv/bin/python benchmarks/rl_step.py --json out.json
    .venv/bin/python benchmarks/rl_step.py --trl-no-checkpointing --rounds 3   # sides alternate 3 times, pooled
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from nanoseek import save_pretrained, synthetic  # noqa: E402
from nanoseek.data import train_tokenizer  # noqa: E402
from nanoseek.files import read_jsonl  # noqa: E402
from nanoseek.model import ModelConfig, build  # noqa: E402
from nanoseek.rewards import arithmetic_accuracy, format_reward  # noqa: E402
from nanoseek.rl import RLConfig, rl  # noqa: E402
from nanoseek.tasks import get_task  # noqa: E402

TASK_OPTIONS = {"max_digits": 2, "mul_digits": (2, 1)}


def make_model_dir(root: Path, preset: str) -> Path:
    """A tokenizer trained on the arithmetic corpus and a random `preset` model saved with it (HF layout)."""
    items = synthetic.generate("arithmetic", 2000, "train", 0, **TASK_OPTIONS)
    (root / "corpus.txt").write_text("\n\n".join(synthetic.to_text(it) for it in items))
    tok = train_tokenizer([root / "corpus.txt"], 512, root / "tok")
    cfg = ModelConfig.from_preset(preset, vocab_size=tok.vocab_size, num_nextn_predict_layers=0)
    torch.manual_seed(0)
    model_dir = root / "model"
    save_pretrained(build(cfg), model_dir, tokenizer=root / "tok")
    return model_dir


def run_nanoseek(model_dir: Path, out: Path, args: argparse.Namespace) -> list[float]:
    cfg = RLConfig(model=str(model_dir), task="arithmetic", task_options=TASK_OPTIONS, out=str(out),
                   steps=args.steps, group_size=args.group, batch_prompts=args.prompts, max_new_tokens=args.tokens,
                   ignore_eos=True, loss="grpo", beta=0.0, temperature=1.0, top_p=1.0, lr=1e-6, eval_n=0,
                   save_every=0, sample_every=0, progress=False, dtype=args.dtype, n_train_items=200)
    rl(cfg)
    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "step_time" in r]
    assert all(r["len_mean"] == args.tokens for r in recs), "nanoseek completions were not of the forced length"
    # where each step's time went (rollouts vs the rest) and reward-worker failures: a slow step can be told apart
    args.nanoseek_detail = getattr(args, "nanoseek_detail", []) + [
        {k: [r[k] for r in recs] for k in ("rollout_tok_s", "train_tok_s", "reward_failures")}]  # one per round
    return [r["step_time"] for r in recs]


def run_trl(model_dir: Path, out: Path, args: argparse.Namespace) -> list[float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.set_verbosity_error()
    task = get_task("arithmetic", **TASK_OPTIONS)
    items = task.items("train", 200, 0)
    data = Dataset.from_list([{"prompt": task.messages(it), "answer": str(it["answer"])} for it in items])
    times: list[float] = []
    lengths: list[int] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.perf_counter() - self.t0)

    def texts(completions: list[Any]) -> list[str]:  # conversational datasets give [{"role", "content"}] lists
        return [c if isinstance(c, str) else c[0]["content"] for c in completions]

    def accuracy(completions: list[Any], answer: list[Any], **kw: Any) -> list[float]:
        lengths.extend(len(ids) for ids in kw["completion_ids"])
        return arithmetic_accuracy(texts(completions), answer)

    def fmt(completions: list[Any], **kw: Any) -> list[float]:
        return format_reward(texts(completions))

    config = GRPOConfig(
        output_dir=str(out), per_device_train_batch_size=args.prompts * args.group, num_generations=args.group,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens}, temperature=1.0, top_p=1.0, top_k=0,
        loss_type="grpo", scale_rewards="group", beta=0.0, learning_rate=1e-6, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=True, bf16=args.dtype == "bf16", fp16=False, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False,
        gradient_checkpointing=not args.trl_no_checkpointing)  # TRL's GRPO default is on: an extra forward
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, fmt], args=config, train_dataset=data,
                          processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[StepTimer()])
    trainer.train()
    assert set(lengths) == {args.tokens}, f"TRL completions were not of the forced length: {sorted(set(lengths))}"
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompts", type=int, default=4, help="P prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G completions per prompt")
    ap.add_argument("--tokens", type=int, default=128, help="N tokens per completion (EOS ignored)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="tiny preset, P=2 G=4 N=32, 3 steps")
    ap.add_argument("--trl-no-checkpointing", action="store_true",
                    help="turn off TRL's default gradient checkpointing (nanoseek does not checkpoint)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="both sides: fp32, or bf16 autocast over fp32 master weights (TRL's bf16=True)")
    ap.add_argument("--only", choices=("nanoseek", "trl"), help="time one side only (no ratio): for A/B runs")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run both sides this many times, alternating (medians pool every round's timed steps)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.prompts, args.group, args.tokens, args.steps = "tiny", 2, 4, 32, 3
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; preset {args.preset}, P={args.prompts} G={args.group} "
          f"N={args.tokens}, {args.steps} steps per side, {args.dtype}, wall time")
    # each round runs both sides one after the other; a side's first step in a round is its warm-up (nanoseek starts
    # its reward worker and compiles or loads its decode graph, both allocate caches) and is left out of the medians
    ns_rounds: list[list[float]] = []
    trl_rounds: list[list[float]] = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        model_dir = make_model_dir(root, args.preset)
        for r in range(args.rounds):
            if args.only != "trl":
                ns_rounds.append(run_nanoseek(model_dir, root / f"ns{r}", args))
            if args.only != "nanoseek":
                trl_rounds.append(run_trl(model_dir, root / f"trl{r}", args))
            if args.rounds > 1 and not args.only:
                print(f"round {r + 1}: nanoseek {statistics.median(ns_rounds[-1][1:]):.2f} s, "
                      f"TRL {statistics.median(trl_rounds[-1][1:]):.2f} s per step", flush=True)
    ns, trl = (sum(rounds, []) for rounds in (ns_rounds, trl_rounds))
    ns_med, trl_med = (statistics.median([x for t in rounds for x in (t[1:] or t)]) if rounds else math.nan
                       for rounds in (ns_rounds, trl_rounds))
    tokens = args.prompts * args.group * args.tokens
    res = {"preset": args.preset, "P": args.prompts, "G": args.group, "N": args.tokens, "steps": args.steps,
           "threads": torch.get_num_threads(), "trl_gradient_checkpointing": not args.trl_no_checkpointing,
           "dtype": args.dtype,
           "nanoseek_step_s": ns, "trl_step_s": trl, "nanoseek_detail": getattr(args, "nanoseek_detail", None),
           "rounds": args.rounds, "ratio_by_round": [statistics.median(t[1:]) / statistics.median(n[1:])
                                                     for n, t in zip(ns_rounds, trl_rounds)],
           "load_average": os.getloadavg(),
           "nanoseek_median_s": ns_med, "trl_median_s": trl_med, "speedup": trl_med / ns_med}
    print(f"{'':10s} {'step (s)':>9s} {'completion tok/s':>17s}")
    print(f"{'nanoseek':10s} {ns_med:9.2f} {tokens / ns_med:17.0f}")
    print(f"{'TRL':10s} {trl_med:9.2f} {tokens / trl_med:17.0f}")
    if not args.only:
        print(f"nanoseek GRPO step is {res['speedup']:.2f}x faster than TRL GRPOTrainer in {args.dtype} "
              f"(target >= 2.5x, 3x the moonshot)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
