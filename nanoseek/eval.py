"""Evaluation as the R1 paper defines it: `nanoseek eval --model DIR|--url URL --task NAME|FILE.jsonl [--k 8]`.

For each held-out item: k samples at temperature 0.6 / top_p 0.95 (R1 §3.1) and one greedy answer.
  pass@1   mean correctness over the k samples, averaged over items (the paper's headline metric)
  pass@k   unbiased estimator 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), for k' in {1, 2, 4, ..., k}
  cons@k   majority vote over the k extracted answers (maj@k), then verified
  greedy   accuracy of the temperature-0 answer
Confidence intervals: Wilson for per-item binary metrics (greedy, cons@k), a percentile bootstrap over items for
pass@1. Per-item results are saved as JSONL, the summary as JSON + markdown.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import synthetic


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1), computed stably."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95 % by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def bootstrap_ci(values: list[float], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap of the mean over items."""
    if not values:
        return (0.0, 1.0)
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    return (means[int(0.025 * reps)], means[int(0.975 * reps) - 1])


def paired_difference(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], key: str = "pass1",
                      seed: int = 0) -> dict[str, Any]:
    """Mean of (b - a) over the items both evaluations share (matched by id; per-item `items.jsonl` rows), with a
    95 % bootstrap CI over items: paired over the same problems, tighter than comparing two separate CIs."""
    a = {r["id"]: float(r[key]) for r in rows_a}
    diffs = [float(r[key]) - a[r["id"]] for r in rows_b if r["id"] in a]
    if not diffs:
        raise ValueError("the two evaluations share no item ids: evaluate both on the same held-out items")
    return {"mean": sum(diffs) / len(diffs), "ci": bootstrap_ci(diffs, seed=seed), "n": len(diffs)}


def majority(answers: list[str | None]) -> str | None:
    """The most common non-empty answer; ties go to the earliest sampled."""
    votes = Counter(a for a in answers if a)
    if not votes:
        return None
    best = max(votes.values())
    return next(a for a in answers if a and votes[a] == best)


# ------------------------------------------------------------------------------------------------------------
# grading


def normalize_answer(task: str, text: str) -> str | None:
    """The comparable answer of a completion, for majority voting."""
    if task == "arithmetic":
        v = synthetic.arithmetic_answer(text)
        return None if v is None else str(v)
    ans = synthetic.extract_answer(text)
    if ans is None:
        return None
    return " ".join(ans.split())


def grader(task: str) -> Callable[[dict[str, Any], str], bool]:
    if task in synthetic.TASKS:
        return lambda item, text: synthetic.verify(task, item, text) >= 1.0

    def math_grade(item: dict[str, Any], text: str) -> bool:
        from .rewards import math_verify_accuracy

        return math_verify_accuracy([text], [item["answer"]])[0] >= 1.0

    return math_grade


# ------------------------------------------------------------------------------------------------------------
# samplers: a local model through the engine, or any OpenAI-compatible endpoint


@dataclass
class EvalConfig:
    task: str = "arithmetic"
    task_options: dict[str, Any] | None = None  # synthetic difficulty (must match what the model was trained on)
    model: str | None = None
    url: str | None = None
    served_model: str | None = None  # model name at the URL
    api_key: str | None = None
    k: int = 8
    n: int = 200
    temperature: float = 0.6
    top_p: float = 0.95
    max_tokens: int = 256
    prompt_format: str = "chat"  # chat | r1_zero (for local models)
    greedy: bool = True
    seed: int = 0
    out: str | None = None
    concurrency: int = 8
    device: str | None = None  # local model: None = nanoseek.device.default_device() (CUDA if available, else CPU)
    dtype: str = "auto"  # local model's weights and cache: auto (bf16 on CUDA, fp32 on a CPU) | float32 | ...

    def __post_init__(self) -> None:
        from .device import dtype_name

        if (self.model is None) == (self.url is None):
            raise ValueError("give exactly one of --model DIR or --url URL")
        dtype_name(self.dtype)
        if self.k < 1 or self.n < 1:
            raise ValueError(f"k and n must be >= 1, got k={self.k}, n={self.n}")
        if self.url and not self.served_model:
            raise ValueError("--url needs --served-model NAME (the model name at the endpoint)")


def _local_sampler(cfg: EvalConfig):
    from .device import resolve_device, resolve_dtype
    from .infer import Engine, SamplingParams
    from .rl import format_prompt
    from .tokenizer import Tokenizer
    from .weights import load

    device = resolve_device(cfg.device)
    model = load(cfg.model, device=device, dtype=resolve_dtype(cfg.dtype, device)).eval()
    tok = Tokenizer.load(cfg.model)

    def run(items: list[dict[str, Any]], k: int, temperature: float) -> list[list[str]]:
        prompts = [format_prompt(it, tok, cfg.prompt_format) for it in items]
        engine = Engine(model, tok, max_batch=32, max_model_len=max(map(len, prompts)) + cfg.max_tokens + 1,
                        seed=cfg.seed)
        params = [SamplingParams(max_tokens=cfg.max_tokens, temperature=temperature, top_p=cfg.top_p if temperature
                                 else 1.0, seed=cfg.seed * 1_000_003 + i) for i in range(len(items) * k)]
        outs = engine.generate([p for p in prompts for _ in range(k)], params)
        # the chat template pre-fills "<think>\n": graders see the completion, reasoning then "</think>" and answer
        texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
        return [texts[i * k:(i + 1) * k] for i in range(len(items))]

    return run


def _remote_sampler(cfg: EvalConfig):
    from openai import OpenAI

    client = OpenAI(base_url=cfg.url, api_key=cfg.api_key or "EMPTY", max_retries=3)

    def one(prompt: str, temperature: float, seed: int) -> str:
        r = client.chat.completions.create(
            model=cfg.served_model, messages=[{"role": "user", "content": prompt}], temperature=temperature,
            top_p=cfg.top_p if temperature else 1.0, max_tokens=cfg.max_tokens, seed=seed)
        msg = r.choices[0].message
        reasoning = getattr(msg, "reasoning_content", None) or (msg.model_extra or {}).get("reasoning_content")
        content = msg.content or ""
        return f"{reasoning}\n</think>\n\n{content}" if reasoning else content

    def run(items: list[dict[str, Any]], k: int, temperature: float) -> list[list[str]]:
        jobs = [(i, j) for i in range(len(items)) for j in range(k)]
        prompts = [it["prompt"] + (synthetic.ANSWER_INSTRUCTION if "<answer>" not in it["prompt"] else "")
                   for it in items]
        with ThreadPoolExecutor(cfg.concurrency) as pool:
            texts = list(pool.map(lambda ij: one(prompts[ij[0]], temperature, cfg.seed * 1_000_003 + ij[0] * k
                                                 + ij[1]), jobs))
        return [texts[i * k:(i + 1) * k] for i in range(len(items))]

    return run


def load_items(task: str, n: int, seed: int = 0, options: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Held-out items: the synthetic test split, or the rows of a JSONL file (`prompt`, `answer`)."""
    if task in synthetic.TASKS:
        return synthetic.generate(task, n, "test", seed, **(options or {}))
    from .rewards import load_task

    return load_task(task).items[:n]


def evaluate(cfg: EvalConfig, items: list[dict[str, Any]] | None = None,
             sampler: Callable[[list[dict[str, Any]], int, float], list[list[str]]] | None = None) -> dict[str, Any]:
    """Run the evaluation; returns the summary (and writes OUT/items.jsonl, summary.json, summary.md)."""
    items = items if items is not None else load_items(cfg.task, cfg.n, cfg.seed, cfg.task_options)
    if not items:
        raise ValueError(f"task {cfg.task!r} has no items to evaluate")
    sampler = sampler or (_local_sampler(cfg) if cfg.model else _remote_sampler(cfg))
    grade = grader(cfg.task)
    samples = sampler(items, cfg.k, cfg.temperature)
    greedy = sampler(items, 1, 0.0) if cfg.greedy else [[None]] * len(items)
    rows = []
    for it, texts, g in zip(items, samples, greedy):
        ok = [grade(it, t) for t in texts]
        answers = [normalize_answer(cfg.task, t) for t in texts]
        maj = majority(answers)
        maj_ok = False
        if maj is not None:  # the majority answer is correct iff a sample giving it was graded correct
            maj_ok = any(o for o, a in zip(ok, answers) if a == maj)
        rows.append({"id": it.get("id"), "prompt": it["prompt"], "answer": it.get("answer"), "correct": ok,
                     "pass1": sum(ok) / len(ok), "majority_answer": maj, "cons_correct": maj_ok,
                     "greedy_correct": grade(it, g[0]) if g[0] is not None else None,
                     "greedy_text": g[0], "samples": texts, "lengths": [len(t) for t in texts]})
    summary = summarize(rows, cfg)
    if cfg.out:
        write_results(Path(cfg.out), rows, summary)
    return summary


def summarize(rows: list[dict[str, Any]], cfg: EvalConfig) -> dict[str, Any]:
    n, k = len(rows), cfg.k
    pass1 = [r["pass1"] for r in rows]
    cons = sum(r["cons_correct"] for r in rows)
    out: dict[str, Any] = {
        "task": cfg.task, "n_items": n, "k": k, "temperature": cfg.temperature, "top_p": cfg.top_p,
        "prompt_format": cfg.prompt_format, "source": cfg.model or cfg.url,
        "pass@1": sum(pass1) / n, "pass@1_ci": bootstrap_ci(pass1, seed=cfg.seed),
        f"cons@{k}": cons / n, f"cons@{k}_ci": wilson(cons, n),
    }
    ks = sorted({1, *(2**i for i in range(1, 8) if 2**i <= k), k})
    for kk in ks:
        out[f"pass@{kk}"] = sum(pass_at_k(k, sum(r["correct"]), kk) for r in rows) / n
    if rows[0]["greedy_correct"] is not None:
        g = sum(bool(r["greedy_correct"]) for r in rows)
        out["greedy"], out["greedy_ci"] = g / n, wilson(g, n)
    out["config"] = {k2: v for k2, v in asdict(cfg).items() if k2 != "api_key"}  # never write the key
    return out


def write_results(out: Path, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "items.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def summary_markdown(s: dict[str, Any]) -> str:
    k = s["k"]
    lines = [f"# Evaluation: {s['task']} ({s['n_items']} held-out items)", "",
             f"Source: `{s['source']}`; prompt format `{s['prompt_format']}`; k = {k} samples at temperature "
             f"{s['temperature']}, top_p {s['top_p']}.", "", "| metric | value | 95% CI |", "|---|---|---|"]
    lines.append(f"| pass@1 (mean of {k}) | {_pct(s['pass@1'])} | {_pct(s['pass@1_ci'][0])} - "
                 f"{_pct(s['pass@1_ci'][1])} (bootstrap) |")
    lines.append(f"| cons@{k} (majority) | {_pct(s[f'cons@{k}'])} | {_pct(s[f'cons@{k}_ci'][0])} - "
                 f"{_pct(s[f'cons@{k}_ci'][1])} (Wilson) |")
    if "greedy" in s:
        lines.append(f"| greedy | {_pct(s['greedy'])} | {_pct(s['greedy_ci'][0])} - {_pct(s['greedy_ci'][1])} "
                     "(Wilson) |")
    for key in sorted((x for x in s if x.startswith("pass@") and not x.endswith("_ci") and x != "pass@1"),
                      key=lambda x: int(x[5:])):
        lines.append(f"| {key} (unbiased) | {_pct(s[key])} | |")
    return "\n".join(lines) + "\n"
